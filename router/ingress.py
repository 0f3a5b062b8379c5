"""The ASGI application: the webhook endpoint, health, readiness and metrics.

``POST <server.path>``: size cap (413), verification on the raw bytes (401, empty body), parse
(400 with a JSON error), ping (200 pong), journal (200 once durable, 503 if it cannot be
stored). Every other method on the path is 405. ``GET /healthz``, ``/readyz``, ``/metrics``.
The state it works with (config, routes, journal, dispatcher) is one ``Runtime`` object, read
once per request, so a reload can swap it atomically.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from router import plugins
from router.auth import Verifier
from router.config import Config
from router.dispatcher import Dispatcher
from router.errors import JournalUnavailable
from router.journal import Journal
from router.logs import kv
from router.message import Message
from router.metrics import CONTENT_TYPE, Metrics
from router.parse import BadMessage, parse

log = logging.getLogger("router.ingress")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
JSON = b"application/json"


@dataclass(frozen=True)
class Runtime:
    """Everything a request needs, swapped as one piece on reload."""

    config: Config
    verifier: Verifier
    journal: Journal
    dispatcher: Dispatcher
    metrics: Metrics


class TooLarge(Exception):
    pass


class Disconnected(Exception):
    pass


class Ingress:
    """The ASGI app. ``webhook``/``admin`` choose what it serves: with ``server.admin_listen``
    the daemon runs one instance for the webhook and another, on the admin address, for
    health, readiness and metrics."""

    def __init__(self, runtime: Runtime, *, webhook: bool = True, admin: bool = True) -> None:
        self.runtime = runtime
        self.webhook = webhook
        self.admin = admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        rt = self.runtime
        path = scope["path"]
        if self.webhook and path == rt.config.server.path:
            status = await self._webhook(rt, scope, receive, send)
            rt.metrics.requests.labels(str(status)).inc()
        elif self.admin and path in ("/healthz", "/readyz", "/metrics"):
            if scope["method"] not in ("GET", "HEAD"):
                await respond(send, 405, headers=[(b"allow", b"GET, HEAD")])
            elif path == "/healthz":
                await respond(send, 200, b'{"status":"ok"}', JSON)
            elif path == "/readyz":
                await self._ready(rt, send)
            else:
                await rt.metrics.refresh(rt.journal, rt.dispatcher.runners)
                await respond(send, 200, rt.metrics.render(), CONTENT_TYPE.encode())
        else:
            await respond(send, 404, b'{"error":"not found"}', JSON)

    async def _webhook(self, rt: Runtime, scope: Scope, receive: Receive, send: Send) -> int:
        start = time.perf_counter()
        if scope["method"] != "POST":
            return await respond(send, 405, headers=[(b"allow", b"POST")])
        headers: Sequence[tuple[bytes, bytes]] = scope["headers"]
        limit = rt.config.server.max_body_bytes
        if _content_length(headers) > limit:
            return await respond(send, 413, _error(f"body larger than {limit} bytes"), JSON)
        verification = rt.verifier.start(headers)
        if verification.hopeless:
            rt.metrics.verification_failures.inc()
            return await respond(send, 401)
        try:
            body = await _read_body(receive, limit, verification.update)
        except TooLarge:
            return await respond(send, 413, _error(f"body larger than {limit} bytes"), JSON)
        except Disconnected:
            return 499
        if not verification.verified():
            rt.metrics.verification_failures.inc()
            log.warning(kv("rejected", reason="verification failed", bytes=len(body)))
            return await respond(send, 401)
        try:
            parsed = parse(body)
        except BadMessage as e:
            log.warning(kv("rejected", reason=str(e), bytes=len(body)))
            return await respond(send, 400, _error(str(e)), JSON)

        pong = json.dumps({"pong": parsed.ping}).encode() if parsed.is_ping else b""
        if parsed.is_ping and not rt.config.server.route_ping:
            return await respond(send, 200, pong, JSON)

        message = Message(
            parsed.message_id,
            parsed.type,
            parsed.when,
            body,
            time.time(),
            parsed.request_id,
            order_key=parsed.order_key,
        )
        sinks = rt.config.routes.sinks_for(parsed.type)
        try:
            appended = await rt.journal.append(message, sinks)
        except JournalUnavailable as e:
            log.error(kv("refused", id=message.message_id, type=message.type, error=str(e)))
            return await respond(send, 503, _error("journal unavailable: message not stored"), JSON)

        if appended.duplicate:
            rt.metrics.duplicates.inc()
            log.info(kv("duplicate", id=message.message_id, type=message.type))
            return await respond(send, 200, pong, JSON if pong else None)

        rt.dispatcher.notify(sinks)
        status = await respond(send, 200, pong, JSON if pong else None)
        rt.metrics.ack_seconds.observe(time.perf_counter() - start)
        rt.metrics.accepted.labels(message.type).inc()
        if not sinks:
            rt.metrics.unrouted.inc()
        log.info(
            kv(
                "accepted",
                id=message.message_id,
                type=message.type,
                bytes=len(body),
                sinks=",".join(sinks) or "(unrouted)",
            )
        )
        await plugins.notify(
            rt.config.plugin_manager, "router_message_received", message=message, sinks=sinks
        )
        return status

    async def _ready(self, rt: Runtime, send: Send) -> None:
        sinks = {
            name: (
                "up" if r.opened and r.last_error is None else "degraded" if r.opened else "down"
            )
            for name, r in rt.dispatcher.runners.items()
        }
        ready = rt.journal.healthy
        body = {"ready": ready, "journal": "ok" if ready else "failing", "sinks": sinks}
        await respond(send, 200 if ready else 503, json.dumps(body).encode(), JSON)


def _error(text: str) -> bytes:
    return json.dumps({"error": text}).encode()


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def _read_body(receive: Receive, limit: int, update: Callable[[bytes], None]) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise Disconnected
        chunk = event.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise TooLarge
            update(chunk)
            chunks.append(chunk)
        if not event.get("more_body", False):
            return b"".join(chunks)


async def respond(
    send: Send,
    status: int,
    body: bytes = b"",
    content_type: bytes | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> int:
    all_headers = [(b"content-length", str(len(body)).encode()), *headers]
    if content_type:
        all_headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})
    return status


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
