"""Hostile and malformed requests against the real server, one named case each.

Every case is sent as raw bytes over a loopback socket, so it can carry what HTTP clients refuse
to produce: chunked framing beside a lying Content-Length, headers alone without the body they
announce, repeated or non-ASCII headers, oversized header blocks. Each case runs against a
router of its own and asserts the exact status, the shape of the answer's body, whether the
router closes the connection, exactly what the journal holds afterwards (nothing for a
rejection; the body verbatim for an acceptance), and that the same router then accepts a good
message.

The decisions the cases pin down:

- A key repeated in the top-level object or in ``meta`` is 400: parsers disagree about which
  value counts, so a downstream reader of the forwarded bytes could route or deduplicate
  differently. Repeats deeper in the body are accepted (the router reads nothing there).
- ``Content-Encoding`` other than ``identity`` is 415 with ``Accept-Encoding: identity``, before
  the body is read: the signature, the journal and the sinks all work on the body as sent.
- ``Content-Length`` beside ``Transfer-Encoding`` is 400 and the connection is closed (RFC 9112
  section 6.1: a proxy in front could frame the body differently).
- HTTP strips the optional whitespace around a header value, so a key or signature header with
  surrounding spaces verifies; whitespace inside does not.
- Keys are UTF-8: a non-ASCII configured key works in the signature (HMAC keyed with its UTF-8
  bytes) and in ``x-webhook-key`` sent as UTF-8 bytes; any other encoding of it is 401.
- Integers of more than 4300 digits are 400 (Python's int parsing limit; Metriport's
  JavaScript serialiser cannot produce them); huge floats and 400-digit integers are accepted.

Covered elsewhere, not repeated: wrong key, a changed byte, repeated signature or key headers
and both headers with one wrong (``tests/test_ingress.py``, REJECTED); other methods and paths;
a chunked body growing past the cap; every parse rejection at unit level
(``tests/test_parse.py``); comparing with every key in constant time (``tests/test_auth.py``,
by code path); hostile ``{type}`` values and templates escaping their folder, file modes
(``tests/test_file_sink.py``); secret files readable by others (``tests/test_config.py``).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.config import Config
from router.testing import (
    RouterProcess,
    body_for,
    listening_socket,
    running_router,
    sign,
    signed_headers,
    write_config,
)
from tests.conftest import TEST_KEY, base_config, query_journal
from tests.rawhttp import Headers, chunked, exchange, http

pytestmark = pytest.mark.anyio

#: A configured key with non-ASCII characters (21 characters, like Metriport's).
UNICODE_KEY = "clé-ключ-🔑-Ωmega-21c"
#: The same text in another Unicode normalisation (é as e + combining acute): other bytes.
NFD_KEY = unicodedata.normalize("NFD", UNICODE_KEY).encode()
BOM = b"\xef\xbb\xbf"
CAP = 2000  # server.max_body_bytes where a case needs a small cap


# -- building raw requests ---------------------------------------------------------------------


def signature(body: bytes, key: str | bytes = TEST_KEY) -> list[tuple[bytes, bytes]]:
    return [(b"x-metriport-signature", sign(body, key).encode())]


def key_header(value: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"x-webhook-key", value)]


def length(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-length", str(len(body)).encode())]


def post(body: bytes, *extra: tuple[bytes, bytes], auth: Headers | None = None) -> bytes:
    """``body`` with a right Content-Length and a right signature (unless ``auth`` is given)."""
    auth = signature(body) if auth is None else auth
    return http([*length(body), (b"content-type", b"application/json"), *auth, *extra], body)


def message(**fields: Any) -> bytes:
    return body_for("patient.admit", **fields)


def with_meta(meta_json: bytes, rest: bytes = b"") -> bytes:
    return b'{"meta":' + meta_json + rest + b"}"


GOOD_META = b'{"messageId":"%s","when":"2026-01-01T00:00:00.000Z","type":"patient.admit"}'
DEEP = 100_000


def fresh_meta() -> bytes:
    message_id: str = json.loads(message())["meta"]["messageId"]
    return GOOD_META % message_id.encode()


# -- the table ---------------------------------------------------------------------------------

EMPTY, ERROR, ANY = "empty", "error", "any"


@dataclass(frozen=True)
class Case:
    request: bytes
    status: int
    shape: str  # EMPTY: no body; ERROR: JSON {"error": <text>}; ANY: not checked
    stores: bytes | None = None  # the body the journal holds afterwards, byte for byte
    closes: bool = False  # the router closes the connection after answering
    headers: dict[bytes, bytes] = field(default_factory=dict)  # expected answer headers
    server: dict[str, Any] = field(default_factory=dict)  # server: overrides
    keys: tuple[str, ...] = (TEST_KEY,)
    reason: str = ""  # text the error must contain


def accepted(body: bytes, request: bytes | None = None, **kw: Any) -> Case:
    return Case(post(body) if request is None else request, 200, EMPTY, stores=body, **kw)


def bad(body: bytes, reason: str, **kw: Any) -> Case:
    return Case(post(body), 400, ERROR, reason=reason, **kw)


def unauthorized(request: bytes, **kw: Any) -> Case:
    return Case(request, 401, EMPTY, **kw)


def _gzip_case() -> Case:
    packed = gzip.compress(message())
    request = post(packed, (b"content-encoding", b"gzip"))
    return Case(request, 415, ERROR, closes=True, headers={b"accept-encoding": b"identity"})


def _lying_length_case() -> Case:
    body = message(pad="x" * 500)
    head = [(b"content-length", b"10"), (b"transfer-encoding", b"chunked"), *signature(body)]
    return Case(http(head, chunked(body)), 400, ERROR, closes=True, reason="Transfer-Encoding")


def _headers_only_over_cap() -> Case:
    body = message(pad="x" * CAP)
    request = http([*length(body), *signature(body)])  # the headers, and never the body
    return Case(request, 413, ERROR, closes=True, server={"max_body_bytes": CAP})


SIG_OK = message()
UNICODE_BODY = message()
BIG = message(pad="x" * 300_000)

CASES = [
    # -- bodies --
    pytest.param(bad(b"", "not valid JSON"), id="empty-body"),
    pytest.param(bad(b" \r\n\t ", "not valid JSON"), id="whitespace-only"),
    pytest.param(bad(b"\xff\xfe{}\x80", "not UTF-8"), id="not-utf8"),
    pytest.param(bad(message().replace(b"admit", b"adm\xc3\x28t"), "not UTF-8"), id="bad-utf8"),
    pytest.param(accepted(BOM + message()), id="utf8-bom-accepted-verbatim"),
    pytest.param(bad(message().decode().encode("utf-16"), "not UTF-8"), id="utf16-with-bom"),
    pytest.param(
        bad(with_meta(fresh_meta(), b',"meta":' + fresh_meta()), "duplicate key 'meta'"),
        id="meta-key-twice",
    ),
    pytest.param(
        bad(with_meta(fresh_meta()[:-1] + b',"type":"patient.discharge"}'), "'type' in meta"),
        id="meta-type-twice",
    ),
    pytest.param(
        bad(with_meta(fresh_meta()[:-1] + b',"messageId":"other"}'), "'messageId' in meta"),
        id="meta-messageId-twice",
    ),
    pytest.param(
        accepted(with_meta(fresh_meta(), b',"payload":{"patientId":"a","patientId":"b"}')),
        id="key-twice-in-payload-accepted",
    ),
    pytest.param(bad(b"[" * DEEP + b"]" * DEEP, "nested too deeply"), id="arrays-100000-deep"),
    pytest.param(
        bad(b'{"a":' * DEEP + b"1" + b"}" * DEEP, "nested too deeply"), id="objects-100000-deep"
    ),
    pytest.param(
        bad(with_meta(fresh_meta(), b',"payload":' + b"[" * DEEP + b"]" * DEEP), "too deeply"),
        id="100000-deep-in-payload",
    ),
    pytest.param(
        bad(b'{"meta":' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}", "nested too deeply"),
        id="100000-deep-in-meta",
    ),
    pytest.param(
        accepted(with_meta(fresh_meta(), b',"n":' + b"[" * 500 + b"]" * 500)),
        id="nesting-500-deep-accepted",
    ),
    pytest.param(
        bad(with_meta(fresh_meta(), b',"n":' + b"7" * 5000), "a number has over 4300 digits"),
        id="integer-5000-digits",
    ),
    pytest.param(accepted(with_meta(fresh_meta(), b',"n":' + b"7" * 400)), id="integer-400-digits"),
    pytest.param(accepted(with_meta(fresh_meta(), b',"n":1e999999')), id="float-1e999999"),
    pytest.param(accepted(with_meta(fresh_meta(), b',"n":-0.0e-99999')), id="float-tiny"),
    pytest.param(bad(with_meta(fresh_meta(), b',"n":NaN'), "NaN is not allowed"), id="nan"),
    pytest.param(
        bad(with_meta(fresh_meta(), b',"n":Infinity'), "Infinity is not allowed"), id="infinity"
    ),
    pytest.param(
        bad(with_meta(fresh_meta(), b',"n":[-Infinity]'), "-Infinity is not allowed"),
        id="minus-infinity",
    ),
    pytest.param(
        bad(body_for("x" * 10_000_000), "meta.type is longer than 256 characters"),
        id="meta-type-10MB",
    ),
    pytest.param(bad(b'{"meta":"patient.admit"}', "meta must be a JSON object"), id="meta-string"),
    pytest.param(bad(b'{"meta":[' + fresh_meta() + b"]}", "meta must be"), id="meta-array"),
    pytest.param(bad(b'{"meta":null}', "meta must be a JSON object"), id="meta-null"),
    pytest.param(bad(message() + b"garbage", "Extra data"), id="trailing-garbage"),
    pytest.param(bad(message() + b"\x00", "Extra data"), id="trailing-nul"),
    # -- framing and encodings --
    pytest.param(_lying_length_case(), id="chunked-with-lying-content-length"),
    pytest.param(_headers_only_over_cap(), id="content-length-over-cap-413-before-the-body"),
    pytest.param(
        Case(
            http([(b"content-length", b"99999999999999999"), *signature(b"")]),
            413,
            ERROR,
            closes=True,
        ),
        id="content-length-huge-headers-only",
    ),
    pytest.param(
        Case(http([(b"content-length", b"12x")]), 400, EMPTY, closes=True),
        id="content-length-not-a-number",
    ),
    pytest.param(
        Case(http([(b"content-length", b"-5")]), 400, EMPTY, closes=True),
        id="content-length-negative",
    ),
    pytest.param(
        Case(
            http(
                [(b"content-length", b"3"), (b"content-length", b"4"), *signature(b"abc")], b"abc"
            ),
            400,
            EMPTY,
            closes=True,
        ),
        id="content-length-repeated-conflicting",
    ),
    pytest.param(
        accepted(SIG_OK, http([*length(SIG_OK), *length(SIG_OK), *signature(SIG_OK)], SIG_OK)),
        id="content-length-repeated-same-accepted",
    ),
    pytest.param(
        Case(
            http([*length(SIG_OK), *signature(SIG_OK)], SIG_OK[:-1]),
            408,
            ERROR,
            closes=True,
            server={"body_timeout": "300ms"},
        ),
        id="content-length-longer-than-body-408",
    ),
    pytest.param(
        Case(
            http([(b"transfer-encoding", b"gzip"), *signature(SIG_OK)], SIG_OK),
            501,
            EMPTY,
            closes=True,
        ),
        id="transfer-encoding-gzip",
    ),
    pytest.param(
        Case(
            http([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")]),
            501,
            EMPTY,
            closes=True,
        ),
        id="transfer-encoding-repeated",
    ),
    pytest.param(
        accepted(
            SIG_OK, http([(b"transfer-encoding", b"chunked"), *signature(SIG_OK)], chunked(SIG_OK))
        ),
        id="chunked-accepted",
    ),
    pytest.param(_gzip_case(), id="content-encoding-gzip-415"),
    pytest.param(
        Case(post(SIG_OK, (b"content-encoding", b"identity, br")), 415, ERROR, closes=True),
        id="content-encoding-list-415",
    ),
    pytest.param(
        accepted(SIG_OK, post(SIG_OK, (b"content-encoding", b"identity"))),
        id="content-encoding-identity-accepted",
    ),
    # -- credentials --
    pytest.param(
        unauthorized(post(SIG_OK, auth=[(b"x-metriport-signature", b"0" * 64)])),
        id="signature-right-length-wrong",
    ),
    pytest.param(
        unauthorized(post(SIG_OK, auth=[(b"x-metriport-signature", b"z" * 64)])),
        id="signature-right-length-not-hex",
    ),
    pytest.param(
        unauthorized(
            post(
                SIG_OK,
                auth=[
                    (
                        b"x-metriport-signature",
                        b"%s, %s"
                        % (sign(SIG_OK, TEST_KEY).encode(), sign(SIG_OK, TEST_KEY).encode()),
                    )
                ],
            )
        ),
        id="signature-two-in-one-header",
    ),
    pytest.param(
        accepted(
            SIG_OK,
            post(
                SIG_OK,
                auth=[(b"x-metriport-signature", b" \t" + sign(SIG_OK, TEST_KEY).encode() + b"  ")],
            ),
        ),
        id="signature-surrounded-by-whitespace-accepted",
    ),
    pytest.param(
        accepted(SIG_OK, post(SIG_OK, auth=key_header(b"   " + TEST_KEY.encode() + b"\t "))),
        id="key-surrounded-by-whitespace-accepted",
    ),
    pytest.param(
        unauthorized(
            post(SIG_OK, auth=key_header(TEST_KEY[:5].encode() + b" " + TEST_KEY[5:].encode()))
        ),
        id="key-with-whitespace-inside",
    ),
    pytest.param(
        unauthorized(post(SIG_OK, auth=[(b"x-metriport-signature", b"a" * 8192)])),
        id="signature-8KB",
    ),
    pytest.param(
        unauthorized(post(SIG_OK, auth=key_header(TEST_KEY.encode() * 700))),
        id="key-header-14KB",
    ),
    pytest.param(
        Case(post(SIG_OK, (b"x-padding", b"p" * 20_000)), 431, ERROR, closes=True),
        id="header-block-over-max-header-bytes",
    ),
    pytest.param(
        Case(
            post(SIG_OK, (b"x-padding", b"p" * 3000)),
            431,
            ERROR,
            closes=True,
            server={"max_header_bytes": 2048},
        ),
        id="header-block-over-configured-max-header-bytes",
    ),
    pytest.param(  # never ends: hypercorn stops buffering past max_header_bytes
        Case(
            post(SIG_OK, (b"x-padding", b"p" * 20_000)).split(b"\r\n\r\n")[0],
            431,
            EMPTY,
            closes=True,
        ),
        id="header-block-endless",
    ),
    pytest.param(
        Case(
            post(SIG_OK, (b"x-padding", b"p" * 3000)).split(b"\r\n\r\n")[0],
            431,
            EMPTY,
            closes=True,
            server={"max_header_bytes": 2048},
        ),
        id="header-block-endless-over-configured-max-header-bytes",
    ),
    pytest.param(
        unauthorized(post(SIG_OK, auth=[(b"x-metriport-signature", "é".encode() * 32)])),
        id="signature-non-ascii-bytes",
    ),
    pytest.param(
        unauthorized(post(SIG_OK, auth=key_header(b"\xff\xfe" + TEST_KEY.encode()))),
        id="key-header-non-ascii-bytes",
    ),
    pytest.param(
        Case(post(SIG_OK, ("x-ké".encode(), b"v")), 400, EMPTY, closes=True),
        id="header-name-non-ascii",
    ),
    pytest.param(
        Case(post(SIG_OK, (b"x-thing", b"a\x00b")), 400, EMPTY, closes=True),
        id="header-value-nul",
    ),
    pytest.param(
        accepted(
            UNICODE_BODY,
            post(UNICODE_BODY, auth=signature(UNICODE_BODY, UNICODE_KEY)),
            keys=(UNICODE_KEY,),
        ),
        id="non-ascii-key-signature-accepted",
    ),
    pytest.param(
        accepted(
            UNICODE_BODY,
            post(UNICODE_BODY, auth=key_header(UNICODE_KEY.encode())),
            keys=(UNICODE_KEY,),
        ),
        id="non-ascii-key-header-utf8-accepted",
    ),
    pytest.param(
        unauthorized(
            post(UNICODE_BODY, auth=key_header(NFD_KEY)),
            keys=(UNICODE_KEY,),
        ),
        id="non-ascii-key-header-other-normalisation",
    ),
    pytest.param(
        unauthorized(
            post(UNICODE_BODY, auth=signature(UNICODE_BODY, NFD_KEY)),
            keys=(UNICODE_KEY,),
        ),
        id="non-ascii-key-signed-in-other-normalisation",
    ),
    pytest.param(
        accepted(BIG, post(BIG), keys=(UNICODE_KEY, TEST_KEY)),
        id="big-body-second-key-accepted",
    ),
]


@pytest.mark.parametrize("case", CASES)
async def test_hostile_request(case: Case, tmp_path: Path) -> None:
    config = _config(tmp_path, case)
    async with running_router(config) as router:
        answer = await exchange(router.base_url, case.request, wait_for_close=case.closes)
        assert answer.status == case.status, answer
        if case.shape == EMPTY:
            assert answer.body == b""
        elif case.shape == ERROR:
            assert answer.headers[b"content-type"] == b"application/json"
            error = json.loads(answer.body)
            assert list(error) == ["error"]
            assert isinstance(error["error"], str) and error["error"]
            assert case.reason in error["error"]
        for name, value in case.headers.items():
            assert answer.headers[name] == value
        if case.closes:
            assert answer.closed
        assert stored(config) == ([] if case.stores is None else [_id_and(case.stores)])

        # The same router still takes a good message.
        good = await post_good(router.webhook_url, case.keys[0])
        assert stored(config)[-1] == _id_and(good)


# -- helpers -----------------------------------------------------------------------------------


def _config(tmp_path: Path, case: Case) -> Config:
    from router.config import load_config

    doc = base_config(
        tmp_path,
        server={"listen": ["127.0.0.1:0"], "path": "/webhook", **case.server},
        auth={"accept": ["signature", "key"], "keys": list(case.keys)},
    )
    return load_config(write_config(tmp_path, doc))


def stored(config: Config) -> list[tuple[str, bytes]]:
    rows = query_journal(config.journal.path, "SELECT message_id, body FROM messages ORDER BY seq")
    return [(mid, bytes(body)) for mid, body in rows]


def _id_and(body: bytes) -> tuple[str, bytes]:
    return json.loads(body.removeprefix(BOM))["meta"]["messageId"], body


async def post_good(url: str, key: str) -> bytes:
    body = body_for("patient.admit")
    async with httpx.AsyncClient() as client:
        r = await client.post(url, content=body, headers=signed_headers(body, key))
    assert (r.status_code, r.content) == (200, b"")
    return body


# -- keys never leak ---------------------------------------------------------------------------

KEY_A = "KeyFromEnv-7Xq2Lm9Pz4"
KEY_B = "KeyFromFile-Rt5Wv8Ny1"


def test_keys_never_appear_in_logs_answers_metrics_or_errors(tmp_path: Path) -> None:
    """The real program, logging at DEBUG, takes good and bad requests (some carrying a key in
    the wrong place or almost right); the keys appear in none of its answers, /metrics,
    /readyz, its log, or ``check``'s output, also for a configuration with errors."""
    key_file = tmp_path / "old.key"
    key_file.write_text(KEY_B + "\n")
    key_file.chmod(0o600)
    sock = listening_socket()
    auth = {
        "accept": ["signature", "key"],
        "keys": [{"env": "WR_TEST_KEY_A"}, {"file": str(key_file)}],
    }
    doc = base_config(
        tmp_path, server={"listen": [f"fd://{sock.fileno()}"], "path": "/webhook"}, auth=auth
    )
    config_path = write_config(tmp_path, doc)
    env = {**os.environ, "WR_TEST_KEY_A": KEY_A}
    seen: list[str] = []
    good = body_for("patient.admit")
    router = RouterProcess(config_path, sock, env=env)
    router.start(args=["--log-level", "DEBUG"])
    try:
        url = router.base_url + "/webhook"
        attempts: list[tuple[bytes, dict[str, str] | list[tuple[str, str]], int]] = [
            (good, signed_headers(good, KEY_A), 200),
            (good, {"x-webhook-key": KEY_B}, 200),  # a duplicate
            (good, {"x-webhook-key": KEY_A + "x"}, 401),
            (good, {"x-webhook-key": KEY_B[:-1]}, 401),
            (good, {"x-metriport-signature": KEY_A}, 401),
            (good, [("x-webhook-key", KEY_A), ("x-webhook-key", KEY_B)], 401),
            (b'{"meta":{"type":"' + KEY_A.encode() + b'\\n"}}', {"x-webhook-key": KEY_A}, 400),
            (good, {"x-webhook-key": KEY_A, "content-encoding": "gzip"}, 415),
        ]
        with httpx.Client() as client:
            for body, headers, status in attempts:
                r = client.post(url, content=body, headers=headers)
                assert r.status_code == status
                seen += [r.text, str(r.headers)]
            for path in ("/metrics", "/readyz", "/healthz"):
                seen.append(client.get(router.base_url + path).text)
        assert "webhook_router_requests_total" in seen[-3]
        assert router.terminate() == 0
    finally:
        router.kill()
    seen.append(router.logs())
    assert "accepted" in seen[-1] and "rejected" in seen[-1]  # the log is there, at DEBUG

    check = subprocess.run(
        [sys.executable, "-m", "router", "check", "--config", str(config_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert check.returncode == 0
    seen += [check.stdout, check.stderr]
    doc["auth"]["accept"] = ["signature", "password"]
    doc["auth"]["keys"].append({"env": "WR_TEST_UNSET"})
    doc["auth"]["keys"].append(12345)
    bad = subprocess.run(
        [sys.executable, "-m", "router", "check", "--config", str(write_config(tmp_path, doc))],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert bad.returncode == 2
    seen += [bad.stdout, bad.stderr]
    text = "\n".join(seen)
    for key in (KEY_A, KEY_B):
        assert key not in text
        assert key[:12] not in text  # nor a recognisable part of it
