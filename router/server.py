"""Hypercorn as a component: we bind the sockets, we accept the connections, we own the
shutdown trigger.

Hypercorn has no anyio entry point, so the daemon runs on anyio's asyncio backend and calls
hypercorn's asyncio worker with sockets bound beforehand (so binding errors surface before the
daemon reports ready, and ``fd://N`` sockets from systemd or a test harness work) and with our
own ``shutdown_trigger`` (so hypercorn installs no signal handlers of its own).

Accepting is ours too (``Listener``): the event loop's own accept loop hides running out of
file descriptors. uvloop (libuv) then accepts each waiting connection on a spare descriptor and
closes it at once, so clients see resets and nothing is logged (and if the spare cannot be
reopened it closes the listening socket for good); plain asyncio calls its exception handler.
Ours counts it (``webhook_router_accept_errors_total``), logs it at most once a minute, pauses
accepting for ``ACCEPT_RETRY_SECONDS`` while connections wait in the listen backlog, and never
closes the listener. The seam is the one call hypercorn's ``worker_serve`` makes for each
socket, ``asyncio.start_server(callback, backlog=..., sock=sock)``: ``hypercorn.asyncio.run``
sees ``asyncio`` through ``_HypercornAsyncio``, whose ``start_server`` returns a ``Listener``
when a ``serve`` call is running (``worker_serve`` only closes its servers and waits on them).
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import logging
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import hypercorn.asyncio.run
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets

from router.config import ServerConfig
from router.logs import kv
from router.metrics import Metrics

__all__ = [
    "AcceptErrors",
    "HypercornConfig",
    "Listener",
    "Sockets",
    "addresses",
    "bind",
    "hypercorn_config",
    "serve",
]

log = logging.getLogger("router.server")

#: How long accepting pauses after an accept failed for want of descriptors or memory: the
#: listening socket stays readable meanwhile, so retrying at once would spin, and connections
#: wait in the backlog (asyncio's own accept loop pauses 1 s).
ACCEPT_RETRY_SECONDS = 0.25
#: While accepts keep failing, at most one log line per this many seconds.
ACCEPT_LOG_EVERY_SECONDS = 60.0
#: Connections accepted per wakeup at most (asyncio's accept loop takes up to its backlog).
ACCEPT_BATCH = 128
#: ``asyncio.start_server``'s default buffer limit of a connection's ``StreamReader``.
_STREAM_LIMIT = 2**16

_REASONS = {
    errno.EMFILE: "fd_limit",  # this process's RLIMIT_NOFILE
    errno.ENFILE: "fd_limit",  # the system's file table
    errno.ENOBUFS: "memory",
    errno.ENOMEM: "memory",
}
#: What accept(2) reports for a connection that failed before we took it: try the next one.
_SKIP = {errno.EPROTO, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EHOSTUNREACH}


def hypercorn_config(server: ServerConfig, listen: list[str] | None = None) -> HypercornConfig:
    """Hypercorn's settings for ``listen`` (default: ``server.listen``)."""
    hc = HypercornConfig()
    hc.bind = list(server.listen if listen is None else listen)
    hc.graceful_timeout = server.graceful_timeout
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.include_server_header = False
    # Idle connections, and a request's headers: hypercorn runs one timer for both (it starts
    # when a connection opens or an answer is sent and stops when a request's headers are in).
    hc.keep_alive_timeout = server.keep_alive_timeout
    # Not hypercorn's read_timeout: it closes a connection on which nothing arrives while we
    # are still storing its request (its answer would be lost). Bodies have body_timeout.
    hc.read_timeout = None
    hc.h11_max_incomplete_size = server.max_header_bytes
    hc.h2_max_header_list_size = server.max_header_bytes
    hc.backlog = 1024
    return hc


def bind(hc: HypercornConfig) -> Sockets:
    """Bind (or adopt, for ``fd://``) the listening sockets and start listening, so that
    connections queue in the backlog from the moment we report ready. Raises ``OSError``."""
    sockets = hc.create_sockets()
    for sock in sockets.insecure_sockets:
        sock.listen(hc.backlog)
    return sockets


def addresses(sockets: Sockets) -> list[str]:
    return [_address(sock) for sock in sockets.insecure_sockets]


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    return f"http://{name[0]}:{name[1]}" if isinstance(name, tuple) else f"unix:{name}"


async def serve(
    app: Callable[..., Awaitable[None]],
    hc: HypercornConfig,
    sockets: Sockets,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    metrics: Metrics | None = None,
) -> None:
    """Serve until ``shutdown_trigger`` returns, then stop accepting and let requests in flight
    finish (up to ``graceful_timeout``). Failed accepts are counted in ``metrics``.

    Hypercorn's worker runs in a task of its own: on Python 3.11 the ``asyncio.TaskGroup`` it
    uses leaves a stray cancellation request on the task that ran it (fixed in 3.12), which
    would make our own cancel scopes re-raise at shutdown. That task starts with a copy of
    this context, so ``_HypercornAsyncio.start_server`` finds the ``AcceptErrors`` to use.
    """
    token = _accept_errors.set(AcceptErrors(metrics))
    try:
        worker = worker_serve(
            ASGIWrapper(app), hc, sockets=sockets, shutdown_trigger=shutdown_trigger
        )
        await asyncio.ensure_future(worker)
    finally:
        _accept_errors.reset(token)


class AcceptErrors:
    """Counts failed accepts by reason and logs them without flooding the log: a line at the
    first failure, then at most one per ``every`` seconds, saying how many failed since the
    previous line (the counter has them all). At the descriptor limit a retry fails every
    ``ACCEPT_RETRY_SECONDS``; one line per failure, or per connection, would fill the disk."""

    def __init__(
        self,
        metrics: Metrics | None,
        every: float = ACCEPT_LOG_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._every = every
        self._clock = clock
        self._logged_at = float("-inf")
        self._unlogged = 0  # failures since the last line

    def failed(self, error: OSError, address: str) -> str:
        """Count and maybe log ``error`` from accepting on ``address``; returns its reason."""
        reason = _REASONS.get(error.errno or 0, "other")
        if self._metrics is not None:
            self._metrics.child(self._metrics.accept_errors, reason).inc()
        self._unlogged += 1
        now = self._clock()
        if now - self._logged_at >= self._every:
            log.warning(
                kv(
                    "accept-failed",
                    reason=reason,
                    error=errno.errorcode.get(error.errno or 0, str(error.errno)),
                    on=address,
                    failures=self._unlogged,
                    nofile=_nofile_limit() if reason == "fd_limit" else None,
                    retry_ms=int(ACCEPT_RETRY_SECONDS * 1000),
                )
            )
            self._logged_at = now
            self._unlogged = 0
        return reason


def _nofile_limit() -> int:
    """This process's soft ``RLIMIT_NOFILE`` (what an operator raises with ``LimitNOFILE=``)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Listener:
    """Accepts connections on a listening socket and hands each to the event loop as a
    transport of ``protocol_factory``'s protocol (what ``loop.create_server`` does inside,
    except for what happens when accepting fails: see the module's docstring).

    ``close`` and ``wait_closed`` are what hypercorn's ``worker_serve`` uses of an
    ``asyncio.Server``."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        errors: AcceptErrors,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._address = _address(sock)
        self._protocol_factory = protocol_factory
        self._errors = errors
        self._retry: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[Any]] = set()  # also keeps them referenced
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno in _SKIP:
                    continue
                self._errors.failed(e, self._address)
                self._loop.remove_reader(self._fd)
                self._retry = self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume)
                return
            conn.setblocking(False)
            task = self._loop.create_task(
                self._loop.connect_accepted_socket(self._protocol_factory, conn)
            )
            self._connecting.add(task)
            task.add_done_callback(functools.partial(self._connected, conn))

    def _connected(self, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self._connecting.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            # The peer went away while its transport was made, or the loop refused the socket.
            log.debug(kv("connection-failed", on=self._address, error=type(e).__name__))
            conn.close()  # (a no-op if the transport took the descriptor and closed it)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket (as ``asyncio.Server.close`` does);
        connections already accepted stay open."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self._fd)
        self._sock.close()

    async def wait_closed(self) -> None:
        """Until the connections accepted before ``close`` have their transports (and so are
        among the connections hypercorn waits for at shutdown)."""
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)


_accept_errors: contextvars.ContextVar[AcceptErrors | None] = contextvars.ContextVar(
    "router.server.accept_errors", default=None
)


class _HypercornAsyncio:
    """The ``asyncio`` module as ``hypercorn.asyncio.run`` sees it: the module itself, except
    that ``start_server`` on a plain listening socket within a ``serve`` call gives a
    ``Listener`` (anything else, as from another hypercorn user, goes to asyncio's)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def start_server(
        client_connected_cb: Callable[..., Any],
        host: str | None = None,
        port: int | None = None,
        **kwds: Any,
    ) -> Any:
        errors = _accept_errors.get()
        sock = kwds.get("sock")
        if errors is None or host or port or sock is None or set(kwds) - {"sock", "backlog"}:
            return await asyncio.start_server(client_connected_cb, host, port, **kwds)
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.StreamReaderProtocol:  # as in asyncio.start_server
            reader = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
            return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

        return Listener(sock, factory, errors)


# Hypercorn's worker must still reach asyncio.start_server through its module's ``asyncio``.
if "start_server" not in worker_serve.__code__.co_names or not hasattr(
    hypercorn.asyncio.run, "asyncio"
):
    raise ImportError("hypercorn's worker_serve no longer calls asyncio.start_server")
hypercorn.asyncio.run.asyncio = _HypercornAsyncio()  # type: ignore[assignment]
