"""The ASGI application: the webhook endpoint, and health, readiness and metrics.

A webhook request goes the way of the README's diagram, one stage after another, each named
here or a module of its own:

1. **size cap** and the other refusals the headers decide, before any of the body is read
   (413, 431, 400, 415), then **admission** (503 with Retry-After past
   ``max_concurrent_requests`` or ``max_buffered_bytes``): ``router.admission``;
2. **verify** on the raw bytes as the **body** is received (``router.auth``, ``router.body``;
   401 with an empty body, 408 past ``body_timeout``, 413 past the size cap);
3. **parse** ``meta`` (``router.parse``; 400 with a JSON error);
4. **ping**: answered ``{"pong": …}`` (journaled only with ``server.route_ping``);
5. **journal**: stored with one delivery per routed sink (``router.journal``), then
6. **answer**: 200 once durable (503 if it cannot be stored), and the dispatcher is handed
   the message.

Every other method on the path is 405. ``GET /healthz``, ``/readyz`` (``router.health``),
``/metrics``. The state a request works with (config, routes, journal, dispatcher) is one
``Runtime`` object, read once per request, so a reload can swap it atomically.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

from router import plugins
from router.admission import (
    Admission,
    Held,
    Overloaded,
    content_length,
    over_budget_refusal,
    refused_by_headers,
    reserve,
)
from router.asgi import CLOSE, JSON, Event, Receive, Scope, Send, error_body, lifespan, respond
from router.auth import Verification, Verifier
from router.body import Disconnected, NotStored, TooLarge, queued, read_body, replay, take_whole
from router.config import Config
from router.diskbudget import STEP, OverBudget, Ticket, budget_for
from router.dispatcher import Dispatcher
from router.errors import JournalUnavailable
from router.health import CommitProbe, readiness, readyz
from router.journal import Journal
from router.logs import emit, kv
from router.message import Message
from router.metrics import CONTENT_TYPE, Metrics
from router.parse import BadMessage, Parsed, parse
from router.spool import SPOOL_THRESHOLD, Spool

log = logging.getLogger("router.ingress")

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


class Ingress:
    """The ASGI app. ``webhook``/``admin`` choose what it serves: with ``server.admin_listen``
    the daemon runs one instance for the webhook and another, on the admin address, for
    health, readiness and metrics."""

    def __init__(self, runtime: Runtime, *, webhook: bool = True, admin: bool = True) -> None:
        self.runtime = runtime
        self.webhook = webhook
        self.admin = admin
        #: Webhook requests being handled, and the body bytes they hold.
        self.admission = Admission()
        #: For a worker of a supervisor (``router.supervisor``): how many of the service's
        #: workers are ready, of how many (``/readyz`` is ready only when all of them are).
        self.workers: Callable[[], tuple[int, int]] | None = None
        #: Called whenever a request is answered 503 or ``/readyz`` says not ready: Metriport
        #: may then hold failed messages (``router.metriport.Resender.refused``).
        self.on_refused: Callable[[], None] | None = None
        #: Proves the journal can commit for ``/readyz`` (one write a second at most).
        self.commit_probe = CommitProbe()
        #: What each message type needs of the runtime (``_routed``), for ``_routes_of``.
        self._routes: dict[str, _Routed] = {}
        self._routes_of: Runtime | None = None
        #: The requests counter of each status answered, for the metrics ``_requests_of``.
        self._requests: dict[int, Any] = {}
        self._requests_of: Metrics | None = None

    def _refused(self) -> None:
        if self.on_refused is not None:
            self.on_refused()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        rt = self.runtime
        path = scope["path"]
        if self.webhook and path == rt.config.server.path:
            status = await self._webhook(rt, scope, receive, send)
            self._counted(rt.metrics, status).inc()
        elif self.admin and path in ("/healthz", "/readyz", "/metrics"):
            if scope["method"] not in ("GET", "HEAD"):
                await respond(send, 405, headers=[(b"allow", b"GET, HEAD")])
            elif path == "/healthz":
                await respond(send, 200, b'{"status":"ok"}', JSON)
            elif path == "/readyz":
                ready, body = await readyz(rt, self.commit_probe, self.workers)
                if not ready:
                    self._refused()
                await respond(send, 200 if ready else 503, body, JSON)
            else:
                await rt.metrics.refresh(rt.journal, rt.dispatcher.runners)
                rt.metrics.ready.set(await readiness(rt, self.commit_probe) is None)
                await respond(send, 200, rt.metrics.render(), CONTENT_TYPE.encode())
        else:
            await respond(send, 404, b'{"error":"not found"}', JSON)

    # -- 1. size cap and admission ------------------------------------------------------------

    async def _webhook(self, rt: Runtime, scope: Scope, receive: Receive, send: Send) -> int:
        start = time.perf_counter()
        if scope["method"] != "POST":
            return await respond(send, 405, headers=[(b"allow", b"POST")])
        headers: Sequence[tuple[bytes, bytes]] = scope["headers"]
        server = rt.config.server
        refusal = refused_by_headers(headers, server)
        if refusal is not None:
            status, text, extra = refusal
            log.warning(kv("rejected", reason=text, status=status))
            return await respond(send, status, error_body(text), JSON, [CLOSE, *extra])
        held = self.admission.admit(headers, server)
        if isinstance(held, str):
            return await self._overloaded(send, held)
        try:
            return await self._admitted(rt, scope, receive, send, start, held)
        finally:
            self.admission.leave(held)

    async def _overloaded(self, send: Send, why: str) -> int:
        self._refused()
        return await self.admission.overloaded(send, why)

    async def _over_budget(self, send: Send, e: OverBudget) -> int:
        text = over_budget_refusal(e)
        if text is None:
            return await self._overloaded(send, "too many unverified bodies on disk")
        log.warning(kv("rejected", reason=text, status=413))
        return await respond(send, 413, error_body(text), JSON, [CLOSE])

    # -- 2. verify as the body is received; 3. parse; 4. ping ---------------------------------

    async def _admitted(
        self, rt: Runtime, scope: Scope, receive: Receive, send: Send, start: float, held: Held
    ) -> int:
        """An admitted request: verified on its raw bytes as they arrive, parsed, answered
        at once if a ping, else journaled (``_journal``)."""
        verification = rt.verifier.start(scope["headers"])
        if verification.hopeless:  # no credential, or a wrong key: refused before any is stored
            rt.metrics.verification_failures.inc()
            # The body is left unread, so the connection cannot carry another request: say
            # so, or a keep-alive client sends its next request into a closed connection.
            return await respond(send, 401, headers=[CLOSE])
        events, whole = queued(receive, SPOOL_THRESHOLD)
        if whole:  # the usual webhook: all here already (see ``_whole``)
            return await self._whole(rt, send, start, held, verification, events)
        if events:
            receive = replay(events, receive)
        ticket = budget_for(rt.journal.local_dir).ticket()
        try:
            declared = content_length(scope["headers"])
            if declared > SPOOL_THRESHOLD:  # will go to disk unverified: reserved before read
                reserve(rt.journal, rt.config.server, ticket, declared)
            spool = Spool(rt.journal.bodies)
            try:
                refused = await self._receive(rt, receive, send, verification, spool, held, ticket)
                if refused:
                    return refused
                if not verification.verified():
                    await spool.discard()  # at once: its bytes are nobody's
                    return await self._unverified(rt, send, spool.size)
                ticket.release()  # verified: the journal stores or refuses it like any message
                body = None if spool.spooled else spool.body()
                try:
                    if body is not None and len(body) >= PARSE_IN_THREAD_BYTES:
                        parsed = await anyio.to_thread.run_sync(parse, body)
                    else:
                        parsed = parse(body) if body is not None else spool.parsed()
                except BadMessage as e:
                    log.warning(kv("rejected", reason=str(e), bytes=spool.size))
                    return await respond(send, 400, error_body(str(e)), JSON)
                pong = _pong(parsed)
                if parsed.is_ping and not rt.config.server.route_ping:
                    return await respond(send, 200, pong, JSON)
                return await self._journal(rt, send, start, parsed, body, spool, pong)
            finally:
                await spool.discard()  # unless the journal took it (then it is no longer ours)
        except OverBudget as e:
            return await self._over_budget(send, e)
        finally:
            ticket.release()

    async def _receive(
        self,
        rt: Runtime,
        receive: Receive,
        send: Send,
        verification: Verification,
        spool: Spool,
        held: Held,
        ticket: Ticket,
    ) -> int:
        """Receive the body into ``spool``, feeding ``verification``; 0 once it is whole, else
        the status of the answer already given (408, 413, 503; 499: the client left)."""
        server = rt.config.server
        limit = server.max_body_bytes
        admission = self.admission

        def hold(received: int) -> None:
            admission.hold(held, received, server)

        def on_disk(size: int) -> None:
            """Before the spool grows to ``size``: count what it holds on disk, and reserve
            more (a chunked body: ``STEP`` at a time) before it goes past its reservation."""
            ticket.written = spool.size if spool.spooled else 0
            if size > spool.threshold and size > ticket.reserved:
                more = max(size, min(size + STEP, server.max_body_bytes))
                reserve(rt.journal, server, ticket, more, size)

        try:
            with anyio.fail_after(server.body_timeout):
                await read_body(receive, limit, verification.update, hold, on_disk, spool)
        except TooLarge:
            text = f"body larger than {limit} bytes"
            return await respond(send, 413, error_body(text), JSON, [CLOSE])
        except TimeoutError:
            text = f"body not received within {server.body_timeout:g}s"
            log.warning(kv("rejected", reason=text, status=408, bytes=spool.size))
            return await respond(send, 408, error_body(text), JSON, [CLOSE])
        except Overloaded:
            return await self._overloaded(send, "too many request bodies in memory")
        except OverBudget as e:
            await spool.discard()
            return await self._over_budget(send, e)
        except NotStored as e:
            return await self._not_stored(rt, send, spool, e.error, [CLOSE])
        except Disconnected:
            return 499
        return 0

    async def _whole(
        self,
        rt: Runtime,
        send: Send,
        start: float,
        held: Held,
        verification: Verification,
        events: list[Event],
    ) -> int:
        """``_admitted`` for a body the server has queued whole already, within the spool
        threshold (``router.body.queued``): what the general path does, less what only a body
        still arriving or going to disk needs (the body timer, the spool and its task, the
        disk budget's ticket). Most webhooks take this path: it is the per-request cost."""
        try:
            body = take_whole(events, rt.config.server.max_body_bytes, verification.update)
            self.admission.hold(held, len(body), rt.config.server)
        except TooLarge:
            text = f"body larger than {rt.config.server.max_body_bytes} bytes"
            return await respond(send, 413, error_body(text), JSON, [CLOSE])
        except Overloaded:
            return await self._overloaded(send, "too many request bodies in memory")
        except Disconnected:
            return 499
        if not verification.verified():
            return await self._unverified(rt, send, len(body))
        try:
            if len(body) >= PARSE_IN_THREAD_BYTES:
                parsed = await anyio.to_thread.run_sync(parse, body)
            else:
                parsed = parse(body)
        except BadMessage as e:
            log.warning(kv("rejected", reason=str(e), bytes=len(body)))
            return await respond(send, 400, error_body(str(e)), JSON)
        pong = _pong(parsed)
        if parsed.is_ping and not rt.config.server.route_ping:
            return await respond(send, 200, pong, JSON)
        return await self._journal(rt, send, start, parsed, body, None, pong)

    async def _unverified(self, rt: Runtime, send: Send, size: int) -> int:
        """Answer a body of ``size`` bytes that failed verification (nothing of it kept)."""
        rt.metrics.verification_failures.inc()
        log.warning(kv("rejected", reason="verification failed", bytes=size))
        return await respond(send, 401)

    # -- 5. journal; 6. answer ----------------------------------------------------------------

    async def _journal(
        self,
        rt: Runtime,
        send: Send,
        start: float,
        parsed: Parsed,
        body: bytes | None,
        spool: Spool | None,
        pong: bytes,
    ) -> int:
        """Store the message with one delivery per routed sink, then answer: 200 once it is
        durable (a duplicate too), 503 if it cannot be stored. ``spool``: where a body that is
        not in memory (``body`` None) is; None for a body that never left memory."""
        size = len(body) if body is not None else spool.size if spool is not None else 0
        routed = self._routed(rt, parsed.type)
        sinks = routed.sinks
        try:
            body_file = None
            if body is None:
                assert spool is not None
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
                ordered=routed.ordered,
                lease=dispatcher.lease,
            )
            if spool is not None and body_file is not None and not appended.duplicate:
                spool.path = None  # the journal has it now
        except OSError as e:
            return await self._not_stored(rt, send, spool, e, [], parsed.type)
        except JournalUnavailable as e:
            log.error(kv("refused", id=message.message_id, type=message.type, error=str(e)))
            self._refused()
            text = error_body("journal unavailable: message not stored")
            return await respond(send, 503, text, JSON)

        if appended.duplicate:
            rt.metrics.duplicates.inc()
            log.info(kv("duplicate", id=message.message_id, type=message.type))
            return await respond(send, 200, pong, JSON if pong else None)

        rt.dispatcher.offer(appended.seq, message, sinks, appended.claimed)
        status = await respond(send, 200, pong, JSON if pong else None)
        _accepted(rt, routed, message, size, start)
        pm = rt.config.plugin_manager
        if plugins.observed(pm, "router_message_received"):
            await plugins.notify(pm, "router_message_received", message=message, sinks=sinks)
        return status

    def _counted(self, metrics: Metrics, status: int) -> Any:
        """The requests counter of ``status`` (looked up once per status)."""
        if self._requests_of is not metrics:
            self._requests, self._requests_of = {}, metrics
        counter = self._requests.get(status)
        if counter is None:
            counter = self._requests[status] = metrics.child(metrics.requests, str(status))
        return counter

    def _routed(self, rt: Runtime, type_: str) -> _Routed:
        """What a message of ``type_`` needs of ``rt``, worked out once per type (per runtime:
        a reload starts afresh). Types come from the sender: the cache is bounded."""
        if self._routes_of is not rt or len(self._routes) >= _ROUTES_KEPT:
            self._routes, self._routes_of = {}, rt
        routed = self._routes.get(type_)
        if routed is None:
            sinks = rt.config.routes.sinks_for(type_)
            accepted = rt.metrics.child(rt.metrics.accepted, type_)
            routed = _Routed(sinks, rt.config.routes_ordered(sinks), accepted)
            self._routes[type_] = routed
        return routed

    async def _not_stored(
        self,
        rt: Runtime,
        send: Send,
        spool: Spool | None,
        error: OSError,
        headers: Sequence[tuple[bytes, bytes]],
        type_: str | None = None,
    ) -> int:
        """A body write failed (ENOSPC, EIO, …): nothing of it is kept, and ``/readyz`` says
        the journal is failing until there is space again."""
        size = 0
        if spool is not None:
            await spool.discard()
            size = spool.size
        self._refused()
        reason = f"cannot store: {error.strerror or type(error).__name__}"
        budget_for(rt.journal.local_dir).write_error = reason
        log.error(kv("refused", type=type_, error=reason, bytes=size))
        text = error_body("journal unavailable: message not stored")
        return await respond(send, 503, text, JSON, headers)


def _pong(parsed: Parsed) -> bytes:
    """The answer's body: ``{"pong": …}`` for a ping, else empty."""
    return json.dumps({"pong": parsed.ping}).encode() if parsed.is_ping else b""


#: Message types whose routing ``Ingress._routed`` keeps at hand.
_ROUTES_KEPT = 4096


@dataclass(frozen=True, slots=True)
class _Routed:
    """What a message of one type needs: its sinks, whether any delivers in order, and its
    ``accepted`` counter."""

    sinks: tuple[str, ...]
    ordered: bool
    accepted: Any


def _accepted(rt: Runtime, routed: _Routed, message: Message, size: int, start: float) -> None:
    """The metrics and the log line of a message accepted (never its body)."""
    metrics = rt.metrics
    sinks = routed.sinks
    metrics.ack_seconds.observe(time.perf_counter() - start)
    routed.accepted.inc()
    if not sinks:
        metrics.unrouted.inc()
    emit(
        log,
        logging.INFO,
        "accepted",
        id=message.message_id,
        type=message.type,
        bytes=size,
        sinks=",".join(sinks) or "(unrouted)",
    )
