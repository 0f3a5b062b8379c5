"""HTTP/2 on the plain listener: hypercorn speaks it to a client that starts with the HTTP/2
preface ("prior knowledge"), even though Metriport sends HTTP/1.1. The same rules then hold: a
signed message is stored and answered 200, an unsigned one 401, headers over
``server.max_header_bytes`` 431; a header block past what HTTP/2's header decoder accepts
(64 KiB) ends the connection; and the router goes on serving. Driven by the ``h2`` library (a
dependency of hypercorn) over a real loopback socket.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import anyio
import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest

from router.config import load_config
from router.testing import body_for, post_signed, running_router, signed_headers, write_config
from tests.conftest import TEST_KEY, base_config, query_journal

pytestmark = pytest.mark.anyio


async def h2_post(url: str, headers: list[tuple[str, str]], body: bytes) -> list[object]:
    """POST over HTTP/2 with prior knowledge; the events received until the stream or the
    connection ends."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    # Advertise no limit of our own: only the server's should apply.
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 30}
    )
    conn.initiate_connection()
    request = [
        (":method", "POST"),
        (":path", parts.path),
        (":scheme", "http"),
        (":authority", parts.netloc),
        *headers,
    ]
    events: list[object] = []
    async with await anyio.connect_tcp(parts.hostname, parts.port) as sock:
        conn.send_headers(1, request, end_stream=not body)
        if body:
            conn.send_data(1, body, end_stream=True)
        await sock.send(conn.data_to_send())
        with anyio.fail_after(10):
            while True:
                try:
                    data = await sock.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    events.append("closed")
                    return events
                for event in conn.receive_data(data):
                    events.append(event)
                    if isinstance(
                        event,
                        h2.events.StreamEnded
                        | h2.events.StreamReset
                        | h2.events.ConnectionTerminated,
                    ):
                        return events
                if pending := conn.data_to_send():
                    await sock.send(pending)


def status_of(events: list[object]) -> int | None:
    for event in events:
        if isinstance(event, h2.events.ResponseReceived):
            return int(dict(event.headers)[":status"])
    return None


async def test_http2_prior_knowledge_keeps_the_same_limits(tmp_path: Path) -> None:
    doc = base_config(
        tmp_path,
        server={"listen": ["127.0.0.1:0"], "path": "/webhook", "max_header_bytes": 8192},
        auth={"accept": ["signature"], "keys": [TEST_KEY]},
    )
    config = load_config(write_config(tmp_path, doc))
    async with running_router(config) as router:
        body = body_for("patient.admit")
        signed = [(k.lower(), v) for k, v in signed_headers(body, TEST_KEY).items()]
        events = await h2_post(router.webhook_url, signed, body)
        assert status_of(events) == 200
        assert status_of(await h2_post(router.webhook_url, [], body)) == 401

        def padding(kib: int) -> list[tuple[str, str]]:
            return [(f"x-padding-{i}", "p" * 1024) for i in range(kib)]

        events = await h2_post(router.webhook_url, [*signed, *padding(12)], body)
        assert status_of(events) == 431
        events = await h2_post(router.webhook_url, [*signed, *padding(100)], body)
        assert status_of(events) is None
        assert isinstance(events[-1], h2.events.ConnectionTerminated) or events[-1] == "closed"

        stored = query_journal(config.journal.path, "SELECT body FROM messages")
        assert stored == [(body,)]
        # Still serving, over HTTP/1.1 too.
        again = body_for("patient.discharge")
        async with httpx.AsyncClient() as client:
            r = await post_signed(client, router.webhook_url, again, TEST_KEY)
        assert r.status_code == 200
