"""The webhook endpoint over a real loopback socket: verification, parsing, answers."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from router import app
from router.config import Config
from router.testing import Recorder, body_for, eventually, running_router, sign
from tests.conftest import TEST_KEY, deliveries, fixture_vectors, query_journal, signed

pytestmark = pytest.mark.anyio


async def test_every_fixture_is_accepted_and_filed_by_type(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,))
    vectors = [v for v in fixture_vectors() if v[0] != "ping.json"]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for _, body, signature in vectors:
            r = await client.post(
                router.webhook_url,
                content=body,
                headers={"x-metriport-signature": signature, "content-type": "application/json"},
            )
            assert (r.status_code, r.content) == (200, b"")
        await recorder.wait_for(lambda r: len(r.delivered) == len(vectors))
    for _, body, _ in vectors:
        type_ = json.loads(body)["meta"]["type"]
        lines = (tmp_path / "out" / f"{type_}.jsonl").read_bytes().splitlines(keepends=True)
        assert any(line.endswith(b',"body":' + body + b"}\n") for line in lines)


# -- helpers -----------------------------------------------------------------------------------

FIXTURES = {name: (body, signature) for name, body, signature in fixture_vectors()}
ADMIT, ADMIT_SIG = FIXTURES["patient.admit.json"]
PING, PING_SIG = FIXTURES["ping.json"]
OLD_KEY = "old-key-0123456789abc"


def stored(tmp_path: Path) -> list[tuple[str, str, int, int]]:
    """(message id, type, routed, duplicates) of every journaled message, read from the
    SQLite file itself."""
    return query_journal(
        tmp_path / "journal",
        "SELECT message_id, type, routed, duplicates FROM messages ORDER BY seq",
    )


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def server(**options: object) -> dict[str, object]:
    return {"listen": ["127.0.0.1:0"], "path": "/webhook", **options}


async def post(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    return await client.post(url, content=body, headers=headers)


# -- verification ------------------------------------------------------------------------------


def _changed(body: bytes, at: int) -> bytes:
    return body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1 :]


REJECTED = [
    pytest.param(ADMIT, {"x-metriport-signature": sign(ADMIT, OLD_KEY)}, id="wrong-key"),
    pytest.param(_changed(ADMIT, 200), {"x-metriport-signature": ADMIT_SIG}, id="one-byte-changed"),
    pytest.param(ADMIT + b" ", {"x-metriport-signature": ADMIT_SIG}, id="one-byte-added"),
    pytest.param(ADMIT, {"x-metriport-signature": ADMIT_SIG.upper()}, id="upper-case-signature"),
    pytest.param(ADMIT, {"x-metriport-signature": "sha256=" + ADMIT_SIG}, id="sha256-prefix"),
    pytest.param(ADMIT, {}, id="no-auth-header"),
    pytest.param(ADMIT, {"x-webhook-key": OLD_KEY}, id="wrong-key-header"),
    pytest.param(
        ADMIT,
        {"x-metriport-signature": ADMIT_SIG, "x-webhook-key": OLD_KEY},
        id="both-headers-key-wrong",
    ),
    pytest.param(
        ADMIT,
        {"x-metriport-signature": sign(ADMIT, OLD_KEY), "x-webhook-key": TEST_KEY},
        id="both-headers-signature-wrong",
    ),
    pytest.param(
        ADMIT,
        [("x-metriport-signature", ADMIT_SIG), ("x-metriport-signature", ADMIT_SIG)],
        id="repeated-signature-header",
    ),
    pytest.param(
        ADMIT,
        [("x-webhook-key", TEST_KEY), ("x-webhook-key", TEST_KEY)],
        id="repeated-key-header",
    ),
]


@pytest.mark.parametrize(("body", "headers"), REJECTED)
async def test_failed_verification_is_401_with_an_empty_body_and_nothing_stored(
    make_config: Callable[..., Config],
    tmp_path: Path,
    body: bytes,
    headers: dict[str, str] | list[tuple[str, str]],
) -> None:
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,))
    async with running_router(config) as router, httpx.AsyncClient() as client:
        r = await client.post(router.webhook_url, content=body, headers=headers)
        assert (r.status_code, r.content) == (401, b"")
        # The same router takes the genuine message: the 401 was about the credentials.
        ok = await post(client, router.webhook_url, ADMIT, signed(ADMIT))
        assert ok.status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
    assert [row[0] for row in stored(tmp_path)] == [json.loads(ADMIT)["meta"]["messageId"]]
    assert len(recorder.received) == 1
    assert len(lines_of(tmp_path / "out" / "patient.admit.jsonl")) == 1


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


@pytest.mark.parametrize(
    ("accept", "scheme", "status"),
    [
        (["signature", "key"], "key", 200),
        (["signature", "key"], "signature", 200),
        (["key"], "key", 200),
        (["signature"], "key", 401),
        (["key"], "signature", 401),
        (["signature"], "signature", 200),
    ],
)
async def test_accepted_schemes(
    make_config: Callable[..., Config],
    tmp_path: Path,
    accept: list[str],
    scheme: str,
    status: int,
) -> None:
    config = make_config(auth={"accept": accept, "keys": [TEST_KEY]})
    headers = {"x-webhook-key": TEST_KEY} if scheme == "key" else signed(ADMIT)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        r = await post(client, router.webhook_url, ADMIT, headers)
        assert r.status_code == status
        if status == 401:
            assert r.content == b""
    assert len(stored(tmp_path)) == (1 if status == 200 else 0)


async def test_two_configured_keys_both_work_during_a_rotation(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config(auth={"accept": ["signature", "key"], "keys": [OLD_KEY, TEST_KEY]})
    bodies = [body_for("patient.admit") for _ in range(5)]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for body, headers in zip(
            bodies,
            [
                signed(bodies[0], OLD_KEY),
                signed(bodies[1], TEST_KEY),
                {"x-webhook-key": OLD_KEY},
                {"x-webhook-key": TEST_KEY},
                signed(bodies[4], "a-third-key-not-set-up"),
            ],
            strict=True,
        ):
            r = await post(client, router.webhook_url, body, headers)
            assert r.status_code == (401 if body is bodies[4] else 200)
    assert len(stored(tmp_path)) == 4


# -- ping --------------------------------------------------------------------------------------


async def test_ping_is_answered_with_pong_and_not_routed_by_default(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,))
    async with running_router(config) as router, httpx.AsyncClient() as client:
        r = await post(client, router.webhook_url, PING, signed(PING))
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"pong": json.loads(PING)["ping"]}
        unsigned = await post(client, router.webhook_url, PING, {})
        assert (unsigned.status_code, unsigned.content) == (401, b"")  # authenticated like any
    assert stored(tmp_path) == []
    assert files(tmp_path / "out") == []
    assert recorder.received == recorder.delivered == []


async def test_ping_is_routed_when_configured(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,), server=server(route_ping=True))
    async with running_router(config) as router, httpx.AsyncClient() as client:
        r = await post(client, router.webhook_url, PING, signed(PING))
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"pong": "V1StGXR8_Z5jdHi6B-myT"}
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
        again = await post(client, router.webhook_url, PING, signed(PING))  # a duplicate ping
        assert again.json() == {"pong": "V1StGXR8_Z5jdHi6B-myT"}
    [line] = lines_of(tmp_path / "out" / "ping.jsonl")
    assert line.endswith(b',"body":' + PING + b"}")


# -- bad messages ------------------------------------------------------------------------------

BAD = [
    pytest.param(b'{"meta": {"type": "patient.admit", "messageId": "m"', id="malformed-json"),
    pytest.param(b"[" + ADMIT + b"]", id="json-array"),
    pytest.param(b'{"payload": {}}', id="meta-missing"),
    pytest.param(b'{"meta": "patient.admit"}', id="meta-not-an-object"),
    pytest.param(b'{"meta": {"messageId": "m"}}', id="type-missing"),
    pytest.param(b'{"meta": {"type": "patient.admit", "messageId": 12345}}', id="messageId-number"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param(body_for("patient.admit").decode().encode("utf-16"), id="utf-16"),
]


@pytest.mark.parametrize("body", BAD)
async def test_a_verified_body_that_is_not_a_message_is_400_with_a_json_error(
    make_config: Callable[..., Config], tmp_path: Path, body: bytes
) -> None:
    async with running_router(make_config()) as router, httpx.AsyncClient() as client:
        r = await post(client, router.webhook_url, body, signed(body))
        assert r.status_code == 400
        assert r.headers["content-type"] == "application/json"
        error = r.json()
        assert list(error) == ["error"]
        assert isinstance(error["error"], str)
        assert error["error"]
    assert stored(tmp_path) == []


# -- size cap ----------------------------------------------------------------------------------

CAP = 2000


def sized(size: int) -> bytes:
    """A valid message body of exactly ``size`` bytes."""
    body = body_for("patient.admit", pad="")
    return body_for(
        "patient.admit", json.loads(body)["meta"]["messageId"], pad="x" * (size - len(body))
    )


async def chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


async def test_a_content_length_over_the_cap_is_413(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config(server=server(max_body_bytes=CAP))
    at_cap, over = sized(CAP), sized(CAP + 1)
    assert (len(at_cap), len(over)) == (CAP, CAP + 1)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        r = await post(client, router.webhook_url, over, signed(over))
        assert r.status_code == 413
        assert "error" in r.json()
        r = await post(client, router.webhook_url, at_cap, signed(at_cap))
        assert r.status_code == 200
    assert [row[0] for row in stored(tmp_path)] == [json.loads(at_cap)["meta"]["messageId"]]


async def test_a_chunked_body_growing_past_the_cap_is_413(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config(server=server(max_body_bytes=CAP))
    under, over = sized(CAP - 100), sized(CAP + 300)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        r = await client.post(router.webhook_url, content=chunks(over, 700), headers=signed(over))
        assert "content-length" not in r.request.headers
        assert r.request.headers["transfer-encoding"] == "chunked"
        assert r.status_code == 413
        assert "error" in r.json()
        r = await client.post(router.webhook_url, content=chunks(under, 700), headers=signed(under))
        assert r.status_code == 200
    assert [row[0] for row in stored(tmp_path)] == [json.loads(under)["meta"]["messageId"]]


# -- other methods and paths -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_the_webhook_path_are_405_with_allow(
    make_config: Callable[..., Config], tmp_path: Path, method: str
) -> None:
    async with running_router(make_config()) as router, httpx.AsyncClient() as client:
        content = ADMIT if method in ("PUT", "PATCH") else None
        r = await client.request(method, router.webhook_url, content=content, headers=signed(ADMIT))
        assert r.status_code == 405
        assert "POST" in r.headers["allow"]
    assert stored(tmp_path) == []


@pytest.mark.parametrize("path", ["/", "/nope", "/webhook/", "/webhookx", "/WEBHOOK"])
async def test_an_unknown_path_is_404(
    make_config: Callable[..., Config], tmp_path: Path, path: str
) -> None:
    async with running_router(make_config()) as router, httpx.AsyncClient() as client:
        r = await post(client, router.base_url + path, ADMIT, signed(ADMIT))
        assert r.status_code == 404
        assert (await client.get(router.base_url + path)).status_code == 404
    assert stored(tmp_path) == []


async def test_health_ready_and_metrics(make_config: Callable[..., Config], tmp_path: Path) -> None:
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,))
    async with running_router(config) as router, httpx.AsyncClient() as client:
        r = await client.get(router.base_url + "/healthz")
        assert r.status_code == 200
        assert (await post(client, router.webhook_url, ADMIT, signed(ADMIT))).status_code == 200
        assert (await post(client, router.webhook_url, ADMIT, {})).status_code == 401
        await recorder.wait_for(lambda r: len(r.delivered) == 1)

        r = await client.get(router.base_url + "/readyz")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        ready = r.json()
        assert ready["ready"] is True
        assert ready["journal"] == "ok"
        assert ready["sinks"] == {"archive": "up"}

        r = await client.get(router.base_url + "/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        text = r.text
        assert 'webhook_router_requests_total{status="200"} 1.0' in text
        assert 'webhook_router_requests_total{status="401"} 1.0' in text
        assert 'webhook_router_messages_accepted_total{type="patient.admit"} 1.0' in text
        assert "webhook_router_verification_failures_total 1.0" in text

        assert (await client.post(router.base_url + "/healthz")).status_code == 405


# -- duplicates and routing --------------------------------------------------------------------


async def test_a_duplicate_message_id_is_200_and_delivered_once(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,))
    message_id = json.loads(ADMIT)["meta"]["messageId"]
    other_id = "another-message-id"
    # A retried message keeps its id but loses meta.data and has its keys re-ordered.
    retried = json.dumps(
        {"payload": json.loads(ADMIT)["payload"], "meta": json.loads(ADMIT)["meta"]}
    ).encode()
    assert retried != ADMIT
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for body in (ADMIT, ADMIT, retried):
            r = await post(client, router.webhook_url, body, signed(body))
            assert (r.status_code, r.content) == (200, b"")
        other = body_for("patient.admit", other_id)
        assert (await post(client, router.webhook_url, other, signed(other))).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 2)
    assert recorder.delivered_to("archive").count(message_id) == 1
    assert len(recorder.delivered) == 2
    assert [(row[0], row[3]) for row in stored(tmp_path)] == [(message_id, 2), (other_id, 0)]
    written = lines_of(tmp_path / "out" / "patient.admit.jsonl")
    assert len(written) == 2
    assert written[0].endswith(b',"body":' + ADMIT + b"}")  # the first bytes are kept


async def test_an_unknown_type_goes_to_the_default_route(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    recorder = Recorder()
    config = make_config(
        extra_plugins=(recorder,),
        routes=[{"match": "patient.*", "to": ["alerts"]}],
        default=["archive"],
        sinks={
            "archive": {"type": "file", "path": str(tmp_path / "out" / "archive.jsonl")},
            "alerts": {"type": "file", "path": str(tmp_path / "out" / "alerts.jsonl")},
        },
    )
    unknown = body_for("brand.new-type")
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for body in (unknown, ADMIT):
            assert (await post(client, router.webhook_url, body, signed(body))).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 2)
    assert recorder.delivered_to("archive") == [json.loads(unknown)["meta"]["messageId"]]
    assert recorder.delivered_to("alerts") == [json.loads(ADMIT)["meta"]["messageId"]]


async def test_with_no_default_an_unmatched_message_is_kept_unrouted(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    recorder = Recorder()
    config = make_config(
        extra_plugins=(recorder,), routes=[{"match": "patient.*", "to": ["archive"]}], default=[]
    )
    unknown = body_for("brand.new-type")
    unknown_id = json.loads(unknown)["meta"]["messageId"]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        r = await post(client, router.webhook_url, unknown, signed(unknown))
        assert (r.status_code, r.content) == (200, b"")
        assert (await post(client, router.webhook_url, ADMIT, signed(ADMIT))).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
        metrics = (await client.get(router.base_url + "/metrics")).text
        assert "webhook_router_unrouted_total 1.0" in metrics
    assert (unknown_id, ()) in recorder.received
    assert unknown_id not in [mid for mid, _, _ in recorder.delivered]
    assert (unknown_id, "brand.new-type", 0, 0) in stored(tmp_path)
    assert unknown_id not in [mid for mid, *_ in deliveries(config)]
    assert [p.name for p in files(tmp_path / "out")] == ["patient.admit.jsonl"]


async def test_a_sink_listed_twice_in_the_default_is_delivered_once(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,), default=["archive", "archive"])
    body = body_for("brand.new-type")
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (await post(client, router.webhook_url, body, signed(body))).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
    assert len(lines_of(tmp_path / "out" / "brand.new-type.jsonl")) == 1


# -- logs --------------------------------------------------------------------------------------

SECRETS_IN_ADMIT = [
    "01937f2e-5c4b-7a1d-8e3f-2b6c9d0a4e71",  # payload.patientId
    "ACME-000482",  # payload.externalId
    "48213",  # additionalIds.athenahealth
    "22d4cc85015a20955e3fb3b57c2b4729e4117a41f46f997a73bd75e0a91dfc4f",  # presigned URL signature
    "ASIAEXAMPLEFAKEKEY42",
    "example-hl7-conversion",
    "whenSourceSent",
    "admitTimestamp",
]


async def test_logs_never_carry_bodies_patient_identifiers_or_the_key(
    make_config: Callable[..., Config], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for secret in SECRETS_IN_ADMIT:
        assert secret.encode() in ADMIT  # each really is in the fixture
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,))
    truncated = ADMIT[:-40]
    bad_type = ADMIT.replace(b'"type":"patient.admit"', b'"type":"ACME-000482\\n48213"')
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for body, headers, status in [
            (ADMIT, signed(ADMIT), 200),
            (ADMIT, {"x-webhook-key": TEST_KEY}, 200),  # duplicate
            (_changed(ADMIT, 300), signed(ADMIT), 401),
            (ADMIT, {"x-webhook-key": TEST_KEY[:-1]}, 401),
            (truncated, signed(truncated), 400),
            (bad_type, signed(bad_type), 400),
            (ADMIT[:-2] + b"}}x", signed(ADMIT[:-2] + b"}}x"), 400),
        ]:
            r = await post(client, router.webhook_url, body, headers)
            assert r.status_code == status
            assert TEST_KEY not in r.text
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
    text = caplog.text
    assert "accepted" in text and json.loads(ADMIT)["meta"]["messageId"] in text  # logs exist
    assert "rejected" in text
    for secret in [*SECRETS_IN_ADMIT, TEST_KEY]:
        assert secret not in text


# -- graceful shutdown -------------------------------------------------------------------------


async def _read_until(stream: anyio.abc.ByteStream, buffer: bytearray, marker: bytes) -> bytes:
    while marker not in buffer:
        buffer.extend(await stream.receive())
    end = buffer.index(marker) + len(marker)
    head = bytes(buffer[:end])
    del buffer[:end]
    return head


async def test_a_request_in_flight_at_stop_still_gets_its_200(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config()
    stop = anyio.Event()
    ready = anyio.Event()
    urls: list[str] = []

    def on_ready(addresses: list[str], daemon: app.Daemon) -> None:
        urls.extend(addresses)
        ready.set()

    body = body_for("patient.admit")
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(app.serve, config, stop=stop, on_ready=on_ready))
            await ready.wait()
            host, port = httpx.URL(urls[0]).host, httpx.URL(urls[0]).port
            assert port is not None
            async with await anyio.connect_tcp(host, port) as stream:
                head = (
                    f"POST /webhook HTTP/1.1\r\nhost: {host}\r\n"
                    f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                    f"x-metriport-signature: {sign(body, TEST_KEY)}\r\n"
                    "expect: 100-continue\r\n\r\n"
                )
                await stream.send(head.encode())
                buffer = bytearray()
                # 100 Continue: the server has the request and is waiting for its body.
                interim = await _read_until(stream, buffer, b"\r\n\r\n")
                assert interim.startswith(b"HTTP/1.1 100 ")
                stop.set()

                def refused() -> bool:
                    try:
                        socket.create_connection((host, port), timeout=5).close()
                    except ConnectionRefusedError:
                        return True
                    return False

                await eventually(refused)  # the router is shutting down: no longer listening
                await stream.send(body)
                response = await _read_until(stream, buffer, b"\r\n\r\n")
            assert response.startswith(b"HTTP/1.1 200 ")
    assert [row[0] for row in stored(tmp_path)] == [json.loads(body)["meta"]["messageId"]]


# -- text UTF-8 cannot carry --------------------------------------------------------------------


async def test_lone_surrogates_in_patient_ids_are_stored_and_in_meta_refused_saying_why(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    # "\ud800" is valid JSON but no UTF-8 text: stored as is, it failed the journal write (503
    # on every retry) or, in a key over 256 characters, its hashing (500 and a traceback).
    config = make_config()
    padding = {"data": "x" * (2 * 1024 * 1024)}  # read by the streaming parser
    bodies = {
        "short": body_for("patient.admit", "short", payload={"patientId": "p\ud800"}),
        "long": body_for("patient.admit", "long", patients=[{"patientId": "p\ud800" * 200}]),
        "streamed": body_for(
            "patient.admit", "streamed", payload={"patientId": "p\ud800"}, **padding
        ),
        "plain": body_for("patient.admit", "plain", payload={"patientId": "p-1"}),
    }
    assert b'"p\\ud800"' in bodies["short"]
    async with running_router(config) as router, httpx.AsyncClient(timeout=30) as client:
        answers: dict[str, httpx.Response] = {}

        async def send(name: str) -> None:
            answers[name] = await post(
                client, router.webhook_url, bodies[name], signed(bodies[name])
            )

        async with anyio.create_task_group() as tg:  # in one group commit, if they meet
            for name in bodies:
                tg.start_soon(send, name)
        assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(bodies, 200)
        bad = body_for("patient.admit", "m-\udc00")
        r = await post(client, router.webhook_url, bad, signed(bad))
        assert r.status_code == 400
        assert r.json() == {
            "error": "meta.messageId is not valid Unicode: it holds a lone UTF-16 surrogate"
        }
    keys = dict(query_journal(tmp_path / "journal", "SELECT message_id, order_key FROM messages"))
    assert keys == {
        "short": "p?",
        "long": "sha256:" + hashlib.sha256(b"p?" * 200).hexdigest(),
        "streamed": "p?",
        "plain": "p-1",
    }


async def test_a_refusal_before_the_body_is_read_closes_the_connection(
    make_config: Callable[..., Config],
) -> None:
    # A request with no credential or a wrong key is refused before its body is read; the
    # connection then cannot carry another request, and the answer must say so, or a
    # keep-alive client sends its next request into a closed connection.
    config = make_config()
    body = body_for("patient.admit")
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for headers in ({}, {"x-webhook-key": "not-the-key"}):
            r = await client.post(router.webhook_url, content=body, headers=headers)
            assert (r.status_code, r.headers.get("connection")) == (401, "close"), headers
        r = await client.post(router.webhook_url, content=body, headers=signed(body))
        assert r.status_code == 200


async def test_a_body_already_queued_is_taken_whole_and_a_partial_one_is_replayed() -> None:
    """The fast path (``router.body.queued``): what hypercorn has queued is taken without
    waiting; when the body is not all there, the pieces taken are given back first, in
    order."""
    from router.body import queued, replay

    whole: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    whole.put_nowait({"type": "http.request", "body": b"ab", "more_body": True})
    whole.put_nowait({"type": "http.request", "body": b"c", "more_body": False})
    whole.put_nowait({"type": "http.request", "body": b"next request", "more_body": False})
    events, complete = queued(whole.get, 1024)
    assert complete and [e["body"] for e in events] == [b"ab", b"c"]
    assert whole.qsize() == 1  # nothing past the end of this body is taken

    partial: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    partial.put_nowait({"type": "http.request", "body": b"ab", "more_body": True})
    events, complete = queued(partial.get, 1024)
    assert not complete
    receive = replay(events, partial.get)
    partial.put_nowait({"type": "http.request", "body": b"c", "more_body": False})
    assert [(await receive())["body"], (await receive())["body"]] == [b"ab", b"c"]

    big: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    big.put_nowait({"type": "http.request", "body": b"x" * 10, "more_body": False})
    events, complete = queued(big.get, 9)  # would be spooled: read the usual way
    assert not complete and len(events) == 1

    async def not_a_queue() -> dict[str, object]:
        raise AssertionError("never called")

    assert queued(not_a_queue, 1024) == ([], False)
