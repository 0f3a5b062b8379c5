"""Property-based fuzzing of the ASGI app (``router.ingress.Ingress``) with a real journal.

Hypothesis draws whole requests: method, path, headers (credentials right, wrong, repeated or
missing; lying, huge or garbage Content-Length; Transfer-Encoding and Content-Encoding; noise),
and a body (random bytes, Metriport-shaped messages with colliding ids, those messages cut and
spliced with noise, repeated keys, deep nesting, a BOM), delivered in random chunks with a
client that may hang up part way. Against a journal that is up or down, the properties are:

- the app never raises and answers every request exactly once (or not at all, for a client that
  hung up), with a Content-Length matching its body;
- no 5xx except 503, and 503 only when the journal is down;
- every status has its documented body shape (401 empty, errors JSON, a pong for a ping);
- a 200 for a message means it is in the journal, and the journal holds the body exactly as first
  received for that id; anything else leaves the journal as it was;
- every request gives back its admission slot and its body bytes.

``pytest tests/test_fuzz.py`` runs a quick version (a few seconds). For a long run:
``HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz.py -q -s --timeout=0``
(100,000 requests; ``FUZZ_EXAMPLES=N`` sets another number; it prints a count by status).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.auth import Verifier
from router.config import load_config
from router.dispatcher import Dispatcher
from router.ingress import Ingress, Runtime
from router.journal.sqlite import SQLiteJournal as Journal
from router.metrics import Metrics
from router.testing import sign, write_config
from tests.conftest import TEST_KEY, base_config, query_journal

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 100_000 if LONG else 300))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CAP = 4096  # server.max_body_bytes, small enough for 413s to happen
OTHER_KEY = "another-key-0123456789"

# -- strategies --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
#: Text with lone UTF-16 surrogates (valid JSON as "\\ud800", not encodable as UTF-8).
lone_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
odd_text = st.lists(st.text(max_size=4) | lone_surrogates, min_size=1, max_size=4).map("".join)
ids = st.sampled_from([f"id-{i}" for i in range(12)] + ["id-\ud800"])  # few: duplicates happen
types = (
    st.sampled_from(
        ["patient.admit", "ping", "medical.document-download", "t" * 300, "a\nb", "", "p.\udc00"]
    )
    | st.text(max_size=12)
    | odd_text
)
#: Patient ids where the order key is read, some with lone surrogates, some over its length limit.
patient_ids = st.sampled_from(["p-1", "p-2"]) | odd_text | odd_text.map(lambda t: t * 100)
patient_fields = st.fixed_dictionaries(
    {},
    optional={
        "payload": st.fixed_dictionaries({"patientId": patient_ids}),
        "patients": st.lists(st.fixed_dictionaries({"patientId": patient_ids}), max_size=3),
        "users": st.lists(st.fixed_dictionaries({"userId": patient_ids}), max_size=2),
    },
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    meta: dict[str, Any] = {"messageId": draw(ids), "type": draw(types)}
    if draw(st.booleans()):
        meta["when"] = draw(st.sampled_from(["2026-01-01T00:00:00.000Z", 5, None]))
    meta.update(
        draw(st.dictionaries(st.sampled_from(["requestId", "data", "x"]), json_values, max_size=2))
    )
    doc = {
        "meta": meta,
        **draw(
            st.dictionaries(
                st.sampled_from(["ping", "payload", "patients"]), json_values, max_size=2
            )
            | patient_fields
        ),
    }
    if draw(st.booleans()):
        doc = dict(reversed(list(doc.items())))  # key order never matters
    return json.dumps(doc, separators=(",", ":") if draw(st.booleans()) else None).encode()


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["message", "message", "message", "spliced", "bytes", "special"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    body = draw(messages())
    if kind == "spliced":
        at = draw(st.integers(0, len(body)))
        cut = draw(st.integers(0, 8))
        noise = draw(
            st.sampled_from(
                [b"", b",", b"}", b"{", b'"', b"\\", b"\x00", b"\xff", b"NaN", b'"meta":{}', b" "]
            )
        )
        return body[:at] + noise + body[at + cut :]
    if kind == "special":
        depth = draw(st.integers(1, 5000))
        return draw(
            st.sampled_from(
                [
                    b"\xef\xbb\xbf" + body,
                    body[:-1] + b',"meta":{"type":"x","messageId":"id-0"}}',
                    body.replace(b'"messageId"', b'"messageId":"id-1","messageId"', 1),
                    b"[" * depth + b"]" * depth,
                    body[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}",
                    body + b" " * (CAP + 1 - len(body)),
                    body.decode("utf-8", "replace").encode("utf-16"),
                    b"",
                ]
            )
        )
    return body


def credentials(choice: str, body: bytes) -> list[tuple[bytes, bytes]]:
    right = sign(body, TEST_KEY).encode()
    return {
        "none": [],
        "sig": [(b"x-metriport-signature", right)],
        "old-key-sig": [(b"x-metriport-signature", sign(body, OTHER_KEY).encode())],
        "key": [(b"x-webhook-key", TEST_KEY.encode())],
        "both": [(b"x-metriport-signature", right), (b"x-webhook-key", TEST_KEY.encode())],
        "bad-sig": [(b"x-metriport-signature", right[:-1] + b"0")],
        "bad-key": [(b"x-webhook-key", TEST_KEY.encode()[:-1])],
        "sig-twice": [(b"x-metriport-signature", right)] * 2,
        "garbage": [(b"x-metriport-signature", b"\xff" * 64), (b"x-webhook-key", b"")],
    }[choice]


header_names = st.sampled_from(
    [
        b"content-length",
        b"transfer-encoding",
        b"content-encoding",
        b"content-type",
        b"expect",
        b"x-metriport-signature",
        b"x-webhook-key",
        b"connection",
        b"x-noise",
    ]
)
header_values = st.one_of(
    st.binary(max_size=24),
    st.sampled_from(
        [b"0", b"-1", b"99999999999999999999", b"chunked", b"gzip", b"identity", b"100-continue"]
    ),
    st.builds(lambda n: b"v" * n, st.integers(0, 20_000)),
)

# -- the driver --------------------------------------------------------------------------------


@dataclass
class Request:
    scope: dict[str, Any]
    events: list[dict[str, Any]]
    body: bytes
    hangs_up: bool


@st.composite
def requests(draw: st.DrawFn) -> Request:
    body = draw(bodies())
    headers = credentials(
        draw(
            st.sampled_from(
                [
                    "sig",
                    "sig",
                    "key",
                    "both",
                    "none",
                    "old-key-sig",
                    "bad-sig",
                    "bad-key",
                    "sig-twice",
                    "garbage",
                ]
            )
        ),
        body,
    )
    if draw(st.booleans()):
        headers.append((b"content-length", str(len(body)).encode()))
    headers += draw(st.lists(st.tuples(header_names, header_values), max_size=3))
    headers = draw(st.permutations(headers))
    method = draw(st.sampled_from(["POST"] * 8 + ["GET", "PUT", "HEAD"]))
    path = draw(
        st.sampled_from(["/webhook"] * 12 + ["/readyz", "/metrics", "/healthz", "/", "/webhook/"])
    )
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    events: list[dict[str, Any]] = [
        {"type": "http.request", "body": p, "more_body": True} for p in pieces
    ]
    events[-1]["more_body"] = False
    hangs_up = draw(st.integers(0, 9)) == 9  # hypothesis favours small values
    if hangs_up:
        events = [*events[: draw(st.integers(0, len(events) - 1))], {"type": "http.disconnect"}]
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": list(headers),
        "http_version": "1.1",
    }
    return Request(scope, events, body, hangs_up)


async def drive(app: Ingress, request: Request) -> list[MutableMapping[str, Any]]:
    """One request through the app; what it sent back."""
    events: Iterator[dict[str, Any]] = iter([dict(e) for e in request.events])
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return next(events, {"type": "http.disconnect"})

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(dict(request.scope), receive, send)
    return sent


@dataclass
class Router:
    """An Ingress over a real runtime (journal up or not), run in its own event loop thread."""

    directory: Path
    up: bool
    portal: BlockingPortal
    app: Ingress = field(init=False)
    first_body: dict[str, bytes] = field(default_factory=dict)  # the oracle: id -> first 200 body

    def __post_init__(self) -> None:
        self.app = self.portal.call(self._open)

    async def _open(self) -> Ingress:
        self.directory.mkdir()
        doc = base_config(
            self.directory,
            server={
                "listen": ["127.0.0.1:0"],
                "path": "/webhook",
                "max_body_bytes": CAP,
                "body_timeout": "10s",
            },
        )
        doc["auth"] = {"accept": ["signature", "key"], "keys": [TEST_KEY, OTHER_KEY]}
        config = load_config(write_config(self.directory, doc))
        journal = Journal(config.journal.path)
        if self.up:
            await journal.open()
        metrics = Metrics()
        dispatcher = Dispatcher(config, journal, metrics)
        verifier = Verifier(config.key_bytes(), config.auth.accept)
        return Ingress(Runtime(config, verifier, journal, dispatcher, metrics))

    def close(self) -> None:
        if self.up:
            self.portal.call(self.app.runtime.journal.close)

    def stored(self) -> dict[str, bytes]:
        if not self.up:
            return {}
        rows = query_journal(self.directory / "journal", "SELECT message_id, body FROM messages")
        return {mid: bytes(body) for mid, body in rows}

    def check(self, request: Request) -> int | None:
        """Send ``request``; assert every property; return the status (None: no answer)."""
        before = self.stored()
        sent = self.portal.call(drive, self.app, request)
        admission = self.app.admission
        assert admission.in_flight == admission.buffered == 0, "a slot or bytes were kept"
        if not sent:
            assert request.hangs_up, "no answer"
            assert self.stored() == before
            return None
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        assert not sent[1].get("more_body", False)
        status: int = sent[0]["status"]
        body: bytes = sent[1]["body"]
        headers = dict(sent[0]["headers"])
        assert headers[b"content-length"] == str(len(body)).encode()
        assert status < 500 or status == 503, status
        assert status != 503 or not self.up or request.scope["path"] != "/webhook"
        scope = request.scope
        if scope["path"] != "/webhook":
            assert self.stored() == before
            return status
        if status == 200:
            self._accepted(request, body, before)
        else:
            assert self.stored() == before
            if status == 401:
                assert body == b""
            elif status != 405:
                assert headers[b"content-type"] == b"application/json"
                error = json.loads(body)
                assert list(error) == ["error"] and isinstance(error["error"], str)
        return status

    def _accepted(self, request: Request, answer: bytes, before: dict[str, bytes]) -> None:
        assert request.scope["method"] == "POST"
        doc = json.loads(request.body.decode("utf-8-sig"))
        message_id, type_ = doc["meta"]["messageId"], doc["meta"]["type"]
        if type_ == "ping":
            assert json.loads(answer) == {"pong": doc.get("ping")}
            assert self.stored() == before  # pings are answered, not journaled (the default)
            return
        assert answer == b""
        held = self.stored()
        assert message_id in held, "answered 200 but not in the journal"
        first = self.first_body.setdefault(message_id, request.body)
        assert held[message_id] == first
        assert {k: v for k, v in held.items() if k != message_id} == {
            k: v for k, v in before.items() if k != message_id
        }


@pytest.fixture
def routers(tmp_path: Path) -> Iterator[tuple[Router, Router]]:
    with start_blocking_portal(backend="asyncio") as portal:
        up = Router(tmp_path / "up", True, portal)
        down = Router(tmp_path / "down", False, portal)
        try:
            yield up, down
        finally:
            up.close()


def test_the_app_keeps_its_promises_whatever_it_is_sent(routers: tuple[Router, Router]) -> None:
    up, down = routers
    seen: dict[int | None, int] = {}
    start = time.monotonic()

    @FUZZ
    @given(requests(), st.integers(0, 9))
    def one(request: Request, which: int) -> None:
        status = (down if which == 9 else up).check(request)
        seen[status] = seen.get(status, 0) + 1

    one()
    if LONG or EXAMPLES > 1000:
        took = time.monotonic() - start
        counts = sorted(seen.items(), key=str)
        print(f"\nfuzz: {sum(seen.values())} requests in {took:.0f}s, by status: {counts}")
    assert {200, 400, 401}.issubset(seen), seen  # the generator reaches every stage
