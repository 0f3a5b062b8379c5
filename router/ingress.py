"""The ASGI application: the webhook endpoint, health, readiness and metrics.

``POST <server.path>``: refusals the headers decide, before any of the body is read (413 over
the size cap, 415 for a Content-Encoding, 400 for Content-Length beside Transfer-Encoding),
admission (503 with Retry-After past ``max_concurrent_requests`` or ``max_buffered_bytes``),
verification on the raw bytes (401, empty body), the body within ``body_timeout`` (408), parse
(400 with a JSON error), ping (200 pong), journal (200 once durable, 503 if it cannot be
stored). Every other method on the path is 405. ``GET /healthz``, ``/readyz``, ``/metrics``.
The state it works with (config, routes, journal, dispatcher) is one ``Runtime`` object, read
once per request, so a reload can swap it atomically.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

from router import plugins
from router.auth import Verification, Verifier
from router.config import Config, ServerConfig
from router.diskbudget import STEP, OverBudget, Ticket, budget_for
from router.dispatcher import Dispatcher
from router.errors import JournalUnavailable
from router.health import CommitProbe, readiness, sink_states
from router.journal import Journal
from router.logs import emit, kv
from router.message import Message
from router.metrics import CONTENT_TYPE, Metrics
from router.parse import BadMessage, parse
from router.spool import SPOOL_THRESHOLD, Spool

log = logging.getLogger("router.ingress")

Scope = MutableMapping[str, Any]
Event = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Event]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
JSON = b"application/json"
CLOSE = (b"connection", b"close")
#: Bodies at least this large are parsed in a worker thread, so that the event loop keeps
#: answering other requests (pings must be answered within 2 s) while a 200 MB one is parsed.
PARSE_IN_THREAD_BYTES = 1024 * 1024


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


class Overloaded(Exception):
    pass


class NotStored(Exception):
    """A body could not be written (``OSError``: ENOSPC, EIO, …)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror)
        self.error = error


class _Held:
    """The body bytes one request holds in memory."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class Ingress:
    """The ASGI app. ``webhook``/``admin`` choose what it serves: with ``server.admin_listen``
    the daemon runs one instance for the webhook and another, on the admin address, for
    health, readiness and metrics."""

    def __init__(self, runtime: Runtime, *, webhook: bool = True, admin: bool = True) -> None:
        self.runtime = runtime
        self.webhook = webhook
        self.admin = admin
        #: Webhook requests being handled, and the body bytes they hold (admission control).
        self.in_flight = 0
        self.buffered = 0
        self._shedding = False
        #: For a worker of a supervisor (``router.supervisor``): how many of the service's
        #: workers are ready, of how many (``/readyz`` is ready only when all of them are).
        self.workers: Callable[[], tuple[int, int]] | None = None
        #: Called whenever a request is answered 503 or ``/readyz`` says not ready: Metriport
        #: may then hold failed messages (``router.metriport.Resender.refused``).
        self.on_refused: Callable[[], None] | None = None
        #: Proves the journal can commit for ``/readyz`` (one write a second at most).
        self._commit_probe = CommitProbe()

    def _refused(self) -> None:
        if self.on_refused is not None:
            self.on_refused()

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
            rt.metrics.child(rt.metrics.requests, str(status)).inc()
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
        server = rt.config.server
        refusal = _refused_by_headers(headers, server)
        if refusal is not None:
            status, text, extra = refusal
            log.warning(kv("rejected", reason=text, status=status))
            return await respond(send, status, _error(text), JSON, [CLOSE, *extra])
        if self.in_flight >= server.max_concurrent_requests:
            return await self._overloaded(send, "too many requests in progress")
        # Memory a body will hold: all of it while small, the spool threshold once on disk.
        declared = min(max(_content_length(headers), 0), SPOOL_THRESHOLD)
        if self.buffered and self.buffered + declared > server.max_buffered_bytes:
            return await self._overloaded(send, "too many request bodies in memory")
        self._shedding = False
        self.in_flight += 1
        held = _Held()
        held.bytes = declared  # reserved at once: a body announced is a body coming
        self.buffered += declared
        try:
            return await self._admitted(rt, scope, receive, send, start, held)
        finally:
            self.in_flight -= 1
            self.buffered -= held.bytes

    async def _overloaded(self, send: Send, why: str) -> int:
        self._refused()
        if not self._shedding:  # one line when shedding starts, not one per request
            self._shedding = True
            log.warning(
                kv("overloaded", reason=why, requests=self.in_flight, buffered=self.buffered)
            )
        return await respond(
            send, 503, _error(f"{why}: retry later"), JSON, [(b"retry-after", b"1"), CLOSE]
        )

    async def _admitted(
        self, rt: Runtime, scope: Scope, receive: Receive, send: Send, start: float, held: _Held
    ) -> int:
        verification = rt.verifier.start(scope["headers"])
        if verification.hopeless:  # no credential, or a wrong key: refused before any is stored
            rt.metrics.verification_failures.inc()
            # The body is left unread, so the connection cannot carry another request: say
            # so, or a keep-alive client sends its next request into a closed connection.
            return await respond(send, 401, headers=[CLOSE])
        ticket = budget_for(rt.journal.local_dir).ticket()
        try:
            declared = _content_length(scope["headers"])
            if declared > SPOOL_THRESHOLD:  # will go to disk unverified: reserved before read
                self._reserve(rt, ticket, declared)
            return await self._verifying(
                rt, scope, receive, send, start, held, verification, ticket
            )
        except OverBudget as e:
            return await self._over_budget(rt, send, e)
        finally:
            ticket.release()

    def _reserve(self, rt: Runtime, ticket: Ticket, total: int, needed: int | None = None) -> None:
        server = rt.config.server
        ticket.reserve(
            rt.journal.local_dir,
            total,
            server.max_unverified_bytes,
            server.min_free_bytes,
            needed,
        )

    async def _over_budget(self, rt: Runtime, send: Send, e: OverBudget) -> int:
        if e.never:
            text = f"body larger than the {e.limit} bytes that may be stored unverified"
            log.warning(kv("rejected", reason=text, status=413))
            return await respond(send, 413, _error(text), JSON, [CLOSE])
        return await self._overloaded(send, "too many unverified bodies on disk")

    async def _verifying(
        self,
        rt: Runtime,
        scope: Scope,
        receive: Receive,
        send: Send,
        start: float,
        held: _Held,
        verification: Verification,
        ticket: Ticket,
    ) -> int:
        server = rt.config.server

        def hold(received: int) -> None:
            """Count body bytes received beyond what was reserved (chunked, or a lying
            Content-Length), refusing them past the budget unless this request is alone."""
            more = received - held.bytes
            if more > 0:
                held.bytes += more
                self.buffered += more
                if self.buffered > server.max_buffered_bytes and self.buffered > held.bytes:
                    raise Overloaded

        spool = Spool(rt.journal.bodies)

        def on_disk(size: int) -> None:
            """Before the spool grows to ``size``: count what it holds on disk, and reserve
            more (a chunked body: ``STEP`` at a time) before it goes past its reservation."""
            ticket.written = spool.size if spool.spooled else 0
            if size > spool.threshold and size > ticket.reserved:
                self._reserve(rt, ticket, max(size, min(size + STEP, server.max_body_bytes)), size)

        try:
            return await self._received(
                rt, receive, send, start, verification, spool, hold, on_disk, ticket
            )
        finally:
            await spool.discard()  # unless the journal took it (then it is no longer ours)

    async def _received(
        self,
        rt: Runtime,
        receive: Receive,
        send: Send,
        start: float,
        verification: Verification,
        spool: Spool,
        hold: Callable[[int], None],
        on_disk: Callable[[int], None],
        ticket: Ticket,
    ) -> int:
        server = rt.config.server
        limit = server.max_body_bytes
        try:
            queued, whole = _queued(receive, spool.threshold)
            if whole:  # the usual webhook: all here already, so no timer and no spool task
                _take_queued(queued, limit, verification.update, hold, spool)
            else:
                if queued:
                    receive = _replay(queued, receive)
                with anyio.fail_after(server.body_timeout):
                    await _read_body(receive, limit, verification.update, hold, on_disk, spool)
        except TooLarge:
            return await respond(
                send, 413, _error(f"body larger than {limit} bytes"), JSON, [CLOSE]
            )
        except TimeoutError:
            text = f"body not received within {server.body_timeout:g}s"
            log.warning(kv("rejected", reason=text, status=408, bytes=spool.size))
            return await respond(send, 408, _error(text), JSON, [CLOSE])
        except Overloaded:
            return await self._overloaded(send, "too many request bodies in memory")
        except OverBudget as e:
            await spool.discard()
            return await self._over_budget(rt, send, e)
        except NotStored as e:
            return await self._not_stored(rt, send, spool, e.error, [CLOSE])
        except Disconnected:
            return 499
        size = spool.size
        if not verification.verified():
            await spool.discard()  # at once: its bytes are nobody's
            rt.metrics.verification_failures.inc()
            log.warning(kv("rejected", reason="verification failed", bytes=size))
            return await respond(send, 401)
        ticket.release()  # verified: the journal stores or refuses it like any message
        body = None if spool.spooled else spool.body()
        try:
            if body is not None and size < PARSE_IN_THREAD_BYTES:
                parsed = parse(body)
            elif body is not None:
                parsed = await anyio.to_thread.run_sync(parse, body)
            else:
                parsed = spool.parsed()  # parsed as it arrived
        except BadMessage as e:
            log.warning(kv("rejected", reason=str(e), bytes=size))
            return await respond(send, 400, _error(str(e)), JSON)

        pong = json.dumps({"pong": parsed.ping}).encode() if parsed.is_ping else b""
        if parsed.is_ping and not rt.config.server.route_ping:
            return await respond(send, 200, pong, JSON)

        sinks = rt.config.routes.sinks_for(parsed.type)
        try:
            body_file = None
            if body is None:
                body_file = rt.journal.body_path(await spool.seal())
            message = Message(
                parsed.message_id,
                parsed.type,
                parsed.when,
                body,
                time.time(),
                parsed.request_id,
                order_key=parsed.order_key,
                body_file=body_file,
                body_size=size,
            )
            dispatcher = rt.dispatcher
            appended = await rt.journal.append(
                message,
                sinks,
                claim_for=dispatcher.claimable(sinks, message),
                owner=dispatcher.owner,
                ordered=rt.config.routes_ordered(sinks),
                lease=dispatcher.lease,
            )
            if body_file is not None and not appended.duplicate:
                spool.path = None  # the journal has it now
        except OSError as e:
            return await self._not_stored(rt, send, spool, e, [], parsed.type)
        except JournalUnavailable as e:
            log.error(kv("refused", id=message.message_id, type=message.type, error=str(e)))
            self._refused()
            return await respond(send, 503, _error("journal unavailable: message not stored"), JSON)

        if appended.duplicate:
            rt.metrics.duplicates.inc()
            log.info(kv("duplicate", id=message.message_id, type=message.type))
            return await respond(send, 200, pong, JSON if pong else None)

        rt.dispatcher.offer(appended.seq, message, sinks, appended.claimed)
        status = await respond(send, 200, pong, JSON if pong else None)
        rt.metrics.ack_seconds.observe(time.perf_counter() - start)
        rt.metrics.child(rt.metrics.accepted, message.type).inc()
        if not sinks:
            rt.metrics.unrouted.inc()
        emit(
            log,
            logging.INFO,
            kv(
                "accepted",
                id=message.message_id,
                type=message.type,
                bytes=size,
                sinks=",".join(sinks) or "(unrouted)",
            ),
        )
        await plugins.notify(
            rt.config.plugin_manager, "router_message_received", message=message, sinks=sinks
        )
        return status

    async def _not_stored(
        self,
        rt: Runtime,
        send: Send,
        spool: Spool,
        error: OSError,
        headers: Sequence[tuple[bytes, bytes]],
        type_: str | None = None,
    ) -> int:
        """A body write failed (ENOSPC, EIO, …): nothing of it is kept, and ``/readyz`` says
        the journal is failing until there is space again."""
        await spool.discard()
        self._refused()
        reason = f"cannot store: {error.strerror or type(error).__name__}"
        budget_for(rt.journal.local_dir).write_error = reason
        log.error(kv("refused", type=type_, error=reason, bytes=spool.size))
        text = _error("journal unavailable: message not stored")
        return await respond(send, 503, text, JSON, headers)

    async def _ready(self, rt: Runtime, send: Send) -> None:
        why = await readiness(rt, self._commit_probe)
        body: dict[str, object] = {
            "ready": why is None,
            "journal": "ok" if why is None else "failing",
            "sinks": sink_states(rt.dispatcher.runners),
        }
        if self.workers is not None:
            up, of = self.workers()
            body["workers"] = f"{up}/{of}"
            if why is None and up < of:
                why = f"{up} of {of} workers ready"
        if why is not None:
            body["ready"] = False
            body["reason"] = why
            self._refused()
        await respond(send, 200 if why is None else 503, json.dumps(body).encode(), JSON)


def _error(text: str) -> bytes:
    return json.dumps({"error": text}).encode()


def _refused_by_headers(
    headers: Sequence[tuple[bytes, bytes]], server: ServerConfig
) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
    """A refusal the headers alone decide, so that none of the body is read: (status, reason,
    extra response headers), or None."""
    # hypercorn's limit (h11's) holds only while headers arrive in pieces: checked here too.
    if sum(len(name) + len(value) + 4 for name, value in headers) > server.max_header_bytes:
        return 431, f"request headers larger than {server.max_header_bytes} bytes", []
    framings = {name for name, _ in headers if name in (b"content-length", b"transfer-encoding")}
    if len(framings) == 2:
        # Servers and proxies disagree about which one frames the body (request smuggling).
        return 400, "both Content-Length and Transfer-Encoding: send only one", []
    limit = server.max_body_bytes
    if _content_length(headers) > limit:
        return 413, f"body larger than {limit} bytes", []
    codings = [
        coding.strip().lower()
        for name, value in headers
        if name == b"content-encoding"
        for coding in value.split(b",")
    ]
    if any(coding not in (b"", b"identity") for coding in codings):
        # What is signed, stored and forwarded is the body as sent: uncompressed JSON.
        text = "Content-Encoding is not supported: send the body uncompressed"
        return 415, text, [(b"accept-encoding", b"identity")]
    return None


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _queued(receive: Receive, threshold: int) -> tuple[list[Event], bool]:
    """The request's events the server has queued already, taken without waiting, and
    whether they hold the whole body (within ``threshold`` bytes, so it stays in memory).

    hypercorn's ``receive`` is the ``get`` of an ``asyncio.Queue`` filled as the connection
    is read, and a webhook of a few KB arrives in the packets that carry its headers: most
    of the time the whole body is there when the app starts. Taking it at once saves the
    body timer and the spool's task (a good part of what a request costs). Any other
    ``receive`` gives nothing here, and the body is read as it comes."""
    queue = getattr(receive, "__self__", None)
    events: list[Event] = []
    if not isinstance(queue, asyncio.Queue):
        return events, False
    size = 0
    while not queue.empty():
        event = queue.get_nowait()
        events.append(event)
        size += len(event.get("body", b""))
        if size > threshold:
            break
        if event["type"] != "http.request" or not event.get("more_body", False):
            return events, True  # the last piece, or a disconnect
    return events, False


def _take_queued(
    events: list[Event],
    limit: int,
    update: Callable[[bytes], None],
    hold: Callable[[int], None],
    spool: Spool,
) -> None:
    """What ``_read_body`` does, for a whole body already queued (``_queued``): it stays in
    memory, so nothing waits."""
    for event in events:
        if event["type"] == "http.disconnect":
            raise Disconnected
        chunk = event.get("body", b"")
        if chunk:
            if spool.size + len(chunk) > limit:
                raise TooLarge
            update(chunk)
            spool.keep(chunk)
            hold(spool.held)


def _replay(events: list[Event], receive: Receive) -> Receive:
    """``receive`` that first gives back ``events`` (taken by ``_queued``), in order."""
    pending = list(events)

    async def replayed() -> Event:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _read_body(
    receive: Receive,
    limit: int,
    update: Callable[[bytes], None],
    hold: Callable[[int], None],
    on_disk: Callable[[int], None],
    spool: Spool,
) -> None:
    """Receive the body into ``spool``, feeding the signature check as it comes; ``hold`` is
    told how many bytes it holds in memory (a spooled body: two pieces at most),
    ``on_disk`` how large the body is about to be (the disk budget). A failed write raises
    ``NotStored``. A spooled piece is written and parsed while the next one is received."""
    async with spool.receiving():
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                raise Disconnected
            chunk = event.get("body", b"")
            if chunk:
                if spool.size + len(chunk) > limit:
                    raise TooLarge
                update(chunk)
                on_disk(spool.size + len(chunk))
                try:
                    await spool.write(chunk)
                except OSError as e:
                    raise NotStored(e) from e
                hold(spool.held)
            if not event.get("more_body", False):
                try:
                    await spool.finish()
                except OSError as e:
                    raise NotStored(e) from e
                return


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
