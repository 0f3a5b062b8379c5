"""Slow and greedy clients against the real server: cut off by timeouts, bounded by limits,
never holding up anyone else.

Timeouts are configured small (0.3 s) and each test waits on the router's own answer or its
closing of the socket, under a generous deadline: nothing here sleeps to synchronise. A slow
client's pause between two pieces is spent watching the socket (``closes_within``).

The limits are made observable without timing: a request sent with ``Expect: 100-continue``
gets its ``100 Continue`` only after hypercorn has started the application task for it, and that
task takes its admission slot before it first waits, so once the ``100`` has arrived the slot is
certainly taken.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from router.config import Config, load_config
from router.errors import ConfigError
from router.testing import (
    RunningRouter,
    body_for,
    running_router,
    sign,
    signed_headers,
    write_config,
)
from tests.conftest import TEST_KEY, base_config, query_journal
from tests.rawhttp import DEADLINE, Answer, Connection, chunked, connect, exchange, http

pytestmark = pytest.mark.anyio

PAUSE = 0.05  # between two bytes of a slow client (spent watching the socket)


def server(**options: Any) -> dict[str, Any]:
    return {"listen": ["127.0.0.1:0"], "path": "/webhook", **options}


def stored_ids(config: Config) -> list[str]:
    rows = query_journal(config.journal.path, "SELECT message_id FROM messages ORDER BY seq")
    return [message_id for (message_id,) in rows]


def id_of(body: bytes) -> str:
    return str(json.loads(body)["meta"]["messageId"])


def head(body: bytes, *extra: tuple[bytes, bytes]) -> bytes:
    """The request line and headers for ``body`` (signed, with its length), without it."""
    signature = (b"x-metriport-signature", sign(body, TEST_KEY).encode())
    return http([(b"content-length", str(len(body)).encode()), signature, *extra])


async def good_request(router: RunningRouter) -> str:
    """A normal client, on a new connection: 200 and stored."""
    body = body_for("patient.admit")
    async with httpx.AsyncClient() as client:
        r = await client.post(
            router.webhook_url, content=body, headers=signed_headers(body, TEST_KEY)
        )
    assert (r.status_code, r.content) == (200, b"")
    return id_of(body)


async def admitted(router: RunningRouter, request: bytes) -> Answer:
    """``request``, sent again while the router answers 503: a slot given back when an answer
    went out is free a moment later. A slot never given back fails the test at the deadline."""
    with anyio.fail_after(DEADLINE):
        while True:
            answer = await exchange(router.base_url, request)
            if answer.status != 503:
                return answer


async def trickle(conn: Connection, data: bytes) -> int:
    """Send ``data`` a byte at a time, watching the socket between bytes; return how many bytes
    went out before the router answered or closed (``len(data)`` if it never did)."""
    for i in range(len(data)):
        if not await conn.send(data[i : i + 1]) or await conn.closes_within(PAUSE):
            return i
    return len(data)


# -- timeouts ----------------------------------------------------------------------------------


async def test_a_slowloris_client_is_cut_off_and_others_are_served(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(server=server(keep_alive_timeout="300ms"))
    body = body_for("patient.admit")
    request = head(body) + body
    headers_end = request.index(b"\r\n\r\n")
    async with running_router(config) as router, connect(router.base_url) as slow:
        sent: list[int] = []
        async with anyio.create_task_group() as tg:

            async def slowloris() -> None:
                sent.append(await trickle(slow, request[:headers_end]))  # never ends its headers

            tg.start_soon(slowloris)
            served = await good_request(router)  # while the slow client is still sending
        assert sent[0] < headers_end, "the headers were never cut off"
        assert await slow.closed()
        assert slow.buffer == b""  # cut off without an answer: it never made a request
        assert stored_ids(config) == [served]
        assert await good_request(router)


async def test_an_idle_connection_is_closed_after_keep_alive_timeout(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(server=server(keep_alive_timeout="300ms"))
    body = body_for("patient.admit")
    async with running_router(config) as router, connect(router.base_url) as conn:
        await conn.send(head(body) + body)
        assert (await conn.answer()).status == 200
        assert await conn.closed()  # nothing more sent: the router hangs up
    assert stored_ids(config) == [id_of(body)]


async def test_a_slow_body_is_answered_408_and_closed_while_others_are_served(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(server=server(body_timeout="300ms"))
    body = body_for("patient.admit", pad="x" * 400)
    async with running_router(config) as router, connect(router.base_url) as slow:
        await slow.send(head(body) + body[:50])
        sent: list[int] = []
        async with anyio.create_task_group() as tg:

            async def sloth() -> None:
                sent.append(await trickle(slow, body[50:]))

            tg.start_soon(sloth)
            served = await good_request(router)
        assert sent[0] < len(body) - 50, "the body was never cut off"
        answer = await slow.answer()
        assert answer.status == 408
        assert json.loads(answer.body) == {"error": "body not received within 0.3s"}
        assert await slow.closed()
        assert stored_ids(config) == [served]
        await good_request(router)


# -- limits ------------------------------------------------------------------------------------


async def hold(conn: Connection, body: bytes) -> None:
    """Start a request and stop before its body, once the router has admitted it."""
    await conn.send(head(body, (b"expect", b"100-continue")))
    assert await conn.interim() == 100


async def finish(conn: Connection, body: bytes) -> None:
    await conn.send(body)
    answer = await conn.answer()
    assert (answer.status, answer.body) == (200, b"")


async def test_requests_over_max_concurrent_requests_get_503_with_retry_after(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(server=server(max_concurrent_requests=3))
    bodies = [body_for("patient.admit") for _ in range(3)]
    extra = body_for("patient.admit")
    async with running_router(config) as router, contextlib.AsyncExitStack() as stack:
        holders = [await stack.enter_async_context(connect(router.base_url)) for _ in bodies]
        for conn, body in zip(holders, bodies, strict=True):
            await hold(conn, body)

        # Full: the next request is refused at once, its body unread (only headers are sent).
        answer = await exchange(router.base_url, head(extra), wait_for_close=True)
        assert answer.status == 503
        assert answer.headers[b"retry-after"] == b"1"
        assert json.loads(answer.body) == {"error": "too many requests in progress: retry later"}
        assert answer.closed
        async with httpx.AsyncClient() as client:  # health and metrics are not webhook requests
            assert (await client.get(router.base_url + "/healthz")).status_code == 200
            metrics = (await client.get(router.base_url + "/metrics")).text
            assert 'webhook_router_requests_total{status="503"} 1.0' in metrics

        for conn, body in zip(holders, bodies, strict=True):
            await finish(conn, body)
        answer = await admitted(router, head(extra) + extra)  # the slots are free again
        assert answer.status == 200
    assert stored_ids(config) == [*map(id_of, bodies), id_of(extra)]


async def test_bodies_over_max_buffered_bytes_get_503(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(server=server(max_body_bytes=1000, max_buffered_bytes=1000))
    holder_body = body_for("patient.admit", pad="x" * 600)  # ~700 bytes reserved
    announced = body_for("patient.admit", pad="y" * 300)  # ~400 more would go over
    growing = body_for("patient.admit", pad="z" * 300)  # chunked: counted as it arrives
    small = body_for("patient.admit")  # ~120 more fit
    assert len(holder_body) + len(announced) > 1000 >= len(holder_body) + len(small)
    async with running_router(config) as router, connect(router.base_url) as holder:
        await hold(holder, holder_body)

        answer = await exchange(router.base_url, head(announced), wait_for_close=True)
        assert (answer.status, answer.headers[b"retry-after"]) == (503, b"1")
        assert json.loads(answer.body)["error"].startswith("too many request bodies in memory")
        assert answer.closed

        signature = (b"x-metriport-signature", sign(growing, TEST_KEY).encode())
        request = http([(b"transfer-encoding", b"chunked"), signature], chunked(growing))
        answer = await exchange(router.base_url, request, wait_for_close=True)
        assert answer.status == 503
        assert answer.closed

        assert (await exchange(router.base_url, head(small) + small)).status == 200
        await finish(holder, holder_body)
        # Alone, a body up to max_body_bytes is always admitted.
        assert (await admitted(router, head(announced) + announced)).status == 200
    assert stored_ids(config) == [id_of(small), id_of(holder_body), id_of(announced)]


async def test_slots_and_memory_are_given_back_whatever_happened(
    make_config: Callable[..., Config],
) -> None:
    # Every way a request can end (refused by headers, 401, 400, 408, a client that hangs up
    # mid-body, accepted) frees its slot and its bytes: with room for one request at a time,
    # each next one is still admitted.
    config = make_config(
        server=server(max_concurrent_requests=1, max_buffered_bytes=2000, body_timeout="300ms")
    )
    good = body_for("patient.admit", pad="x" * 1000)
    async with running_router(config) as router:
        for request, status in [
            (head(good, (b"content-encoding", b"gzip")) + good, 415),
            (http([(b"content-length", str(len(good)).encode())], good), 401),
            (head(b"[]") + b"[]", 400),
            (head(good) + good[:10], 408),
        ]:
            assert (await admitted(router, request)).status == status
        async with connect(router.base_url) as gone:
            await hold(gone, good)
            await gone.send(good[:100])
        assert (await admitted(router, head(good) + good)).status == 200
    assert stored_ids(config) == [id_of(good)]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("keep_alive_timeout", "0s"),
        ("body_timeout", 0),
        ("body_timeout", "soon"),
        ("max_header_bytes", 100),
        ("max_concurrent_requests", 0),
        ("max_buffered_bytes", -1),
    ],
)
def test_limits_that_would_refuse_everything_are_configuration_errors(
    tmp_path: Path, key: str, value: object
) -> None:
    doc = base_config(tmp_path, server=server(**{key: value}))
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, doc))
    assert f"server.{key}:" in str(info.value)
