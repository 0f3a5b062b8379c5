"""A real HTTP server on loopback for the tests of the HTTP-speaking sinks.

``HttpPeer`` runs the standard library's ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive) in a
background thread on ``127.0.0.1``. It records every request it reads (method, path, headers,
exact body bytes) and answers from a script: replies queued with ``script(...)`` are used first,
one per request, then the ``responder`` callable (by default: 200 with an empty body).

- ``stop()`` closes the listening socket *and* every open connection (so a client's pooled
  keep-alive connection breaks too: the server is really down), and ``start()`` binds the same
  port again: "the downstream is down, then comes back".
- A ``Reply(hang=True)`` holds its request unanswered until ``stop()`` (a downstream that hangs).
- Waiting is condition-based: ``wait_for`` blocks on a ``threading.Condition`` notified by every
  recorded request; ``until`` does the same from async code, in a worker thread, so the event
  loop (which may be running the router under test) keeps running.

Use it as a context manager: ``with HttpPeer() as peer: ... peer.url("/in")``.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import anyio.to_thread

__all__ = ["HttpPeer", "Reply", "Request", "Responder"]


@dataclass(frozen=True)
class Request:
    """One request as the peer read it. Header names are lower-case; repeated headers are
    joined with ", "."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class Reply:
    """How the peer answers one request."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Never answer: hold the request until the peer is stopped.
    hang: bool = False


Responder = Callable[[Request], Reply]


def _ok(_: Request) -> Reply:
    return Reply()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the sinks' pooled clients use it
    server: _Server

    def _handle(self) -> None:
        body = self._read_body()
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        request = Request(self.command, self.path, headers, body)
        reply = self.server.peer._record(request)
        if reply.hang:
            self.server.peer._released.wait()
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)
        self.wfile.flush()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(chunks)
                chunks += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: pytest shows the tests' own output


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], peer: HttpPeer) -> None:
        self.peer = peer
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self.peer._lock:
            self.peer._connections.add(request)
            self.peer._threads.append(thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self.peer._lock:
            self.peer._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError | ValueError):
            return  # the client went away, or the peer was stopped mid-request
        super().handle_error(request, client_address)


class HttpPeer:
    """A scripted, recording HTTP server on ``127.0.0.1`` (see the module docstring)."""

    def __init__(self, responder: Responder = _ok, host: str = "127.0.0.1") -> None:
        self.responder = responder
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._requests: list[Request] = []
        self._script: deque[Reply] = deque()
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._released = threading.Event()
        self._server: _Server | None = None
        self._serving: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> HttpPeer:
        """Listen (again): on a free port the first time, then on that same port."""
        if self._server is not None:
            raise RuntimeError("the peer is already running")
        self._released = threading.Event()
        server = _Server((self.host, self.port), self)
        self.port = server.server_address[1]
        self._server = server
        self._serving = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._serving.start()
        return self

    def stop(self) -> None:
        """Stop listening, release hanging requests and close every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        self._released.set()
        server.shutdown()
        server.server_close()
        assert self._serving is not None
        self._serving.join()
        with self._lock:
            connections = list(self._connections)
            threads, self._threads = self._threads, []
        for conn in connections:
            with contextlib.suppress(OSError):  # closed already
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=10)

    def __enter__(self) -> HttpPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the peer has not been started")
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    # -- script and records ---------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order, before the responder."""
        with self._lock:
            self._script.extend(replies)

    def _record(self, request: Request) -> Reply:
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()
            if self._script:
                return self._script.popleft()
        return self.responder(request)

    @property
    def requests(self) -> list[Request]:
        """A copy of the requests recorded so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def wait_for(
        self, predicate: Callable[[list[Request]], bool], timeout: float = 10.0
    ) -> list[Request]:
        """Block until ``predicate(requests)`` holds; return the requests then.
        ``TimeoutError`` after ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self._requests), timeout):
                raise TimeoutError(f"the peer did not see the expected requests in {timeout}s")
            return list(self._requests)

    async def until(
        self, predicate: Callable[[list[Request]], bool], timeout: float = 10.0
    ) -> list[Request]:
        """``wait_for`` from async code, without blocking the event loop."""
        return await anyio.to_thread.run_sync(self.wait_for, predicate, timeout)
