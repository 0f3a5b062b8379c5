"""A fake Metriport for the tests: its webhook sender and the two settings routes of its API.

``FakeMetriport`` runs a ``ThreadingHTTPServer`` on loopback and behaves as Metriport's code
does (``packages/api/src/routes/settings.ts``, ``command/webhook/retry-failed.ts``):

- ``send(body)`` delivers a message as Metriport would (signed with the webhook key, 5 s
  timeout); a failure (no router, a non-2xx answer) keeps the message as failed.
- ``GET /settings/webhook`` and ``POST /settings/webhook/retry`` check ``x-api-key`` (401
  otherwise). The retry marks every failed message as processing, answers 200, then resends
  them in a thread one at a time, oldest first, with reordered keys and without ``meta.data``
  (other bytes, a fresh signature), pausing 0-200 ms after a success and not after a failure.
- ``script(status, ...)`` makes the next API calls fail with those statuses (500, 429 …).
- It counts calls, and records a retry call made while another is still resending
  (``overlaps``): tests assert there is none.
- ``hold_resend`` keeps a resend from finishing until ``release()`` (requests stay processing);
  ``hold_gets`` holds ``GET /settings/webhook`` answers until that event is set.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import httpx

from router.auth import sign


@dataclass(frozen=True)
class Scripted:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


def reordered(body: bytes) -> bytes:
    """The body as Metriport's retry resends it: keys in another order, no ``meta.data``."""
    doc = json.loads(body)
    meta = {k: v for k, v in doc["meta"].items() if k != "data"}
    doc["meta"] = dict(reversed(list(meta.items())))
    return json.dumps(dict(reversed(list(doc.items()))), separators=(",", ":")).encode()


class FakeMetriport:
    def __init__(self, api_key: str, webhook_key: str, *, pauses: bool = True) -> None:
        self.api_key = api_key
        self.webhook_key = webhook_key
        #: Where messages are sent (the router's webhook URL); None: the router is down.
        self.target: str | None = None
        self.pauses = pauses
        self.failed: list[bytes] = []  # oldest first
        self.processing = 0
        self.sent_ok: list[bytes] = []
        self.api_calls: list[tuple[str, str, int]] = []  # method, path, status
        self.retry_calls = 0
        self.overlaps = 0
        self.enabled = True
        self.hold_resend = False
        self._released = threading.Event()
        #: When set to an unset event, GETs wait for it (``gets_waiting`` counts them).
        self.hold_gets: threading.Event | None = None
        self.gets_waiting = 0
        self._scripted: deque[Scripted] = deque()
        self._cond = threading.Condition()
        self._resending = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._resenders: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> FakeMetriport:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self)

            def do_POST(self) -> None:
                fake._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
        for thread in self._resenders:
            thread.join(30)
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- the sender ----------------------------------------------------------------------------

    def _post(self, body: bytes) -> bool:
        target = self.target
        if target is None:
            return False
        headers = {
            "x-metriport-signature": sign(body, self.webhook_key),
            "content-type": "application/json",
            "user-agent": "Metriport API",
        }
        try:
            r = httpx.post(target, content=body, headers=headers, timeout=5.0)
        except httpx.HTTPError:
            return False
        return 200 <= r.status_code < 300

    def send(self, body: bytes) -> bool:
        """Deliver one message as Metriport does; on failure it is kept as failed."""
        ok = self._post(body)
        with self._cond:
            if ok:
                self.sent_ok.append(body)
            else:
                self.failed.append(body)
            self._cond.notify_all()
        return ok

    def fail_later(self, body: bytes) -> None:
        """Count a message as failed although it was delivered (Metriport's timeout passed)."""
        with self._cond:
            self.failed.append(body)

    def _resend(self, batch: list[bytes]) -> None:
        for body in batch:
            if self.hold_resend:
                self._released.wait(60)
            ok = self._post(reordered(body))
            with self._cond:
                self.processing -= 1
                (self.sent_ok if ok else self.failed).append(body)
                if self.processing == 0:
                    self._resending = False
                self._cond.notify_all()
            if ok and self.pauses:
                threading.Event().wait(random.uniform(0, 0.2))

    def release(self) -> None:
        self.hold_resend = False
        self._released.set()
        if self.hold_gets is not None:
            self.hold_gets.set()

    def wait_for(self, predicate: Callable[[FakeMetriport], bool], timeout: float = 30.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError("fake Metriport: condition not reached")

    def script(self, *answers: int | Scripted) -> None:
        """The next API calls get these answers instead of their own."""
        self._scripted.extend(a if isinstance(a, Scripted) else Scripted(a) for a in answers)

    # -- the API -------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        if length:
            h.rfile.read(length)
        route = (h.command, h.path)
        if route not in (("GET", "/settings/webhook"), ("POST", "/settings/webhook/retry")):
            self._answer(h, 404, {"message": "not found"})
            return
        if h.headers.get("x-api-key") != self.api_key:
            self._answer(h, 401, {"message": "Unauthorized"}, route)
            return
        with self._cond:
            scripted = self._scripted.popleft() if self._scripted else None
        if scripted is not None:
            self._answer(h, scripted.status, {"message": "scripted"}, route, scripted.headers)
            return
        if h.command == "GET":
            hold = self.hold_gets
            if hold is not None:
                with self._cond:
                    self.gets_waiting += 1
                    self._cond.notify_all()
                hold.wait(60)
            with self._cond:
                body = {
                    "webhookEnabled": self.enabled,
                    "webhookStatusDetail": None,
                    "webhookRequestsProcessing": self.processing,
                    "webhookRequestsFailed": len(self.failed),
                }
            self._answer(h, 200, body, route)
            return
        with self._cond:
            self.retry_calls += 1
            if self._resending:
                self.overlaps += 1
            batch, self.failed = self.failed, []
            self.processing += len(batch)
            self._resending = bool(batch) or self._resending
            self._cond.notify_all()
        self._answer(h, 200, None, route)
        thread = threading.Thread(target=self._resend, args=(batch,), daemon=True)
        self._resenders.append(thread)
        thread.start()

    def _answer(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: Any,
        route: tuple[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if route is not None:
            with self._cond:
                self.api_calls.append((*route, status))
                self._cond.notify_all()
        data = b"" if body is None else json.dumps(body).encode()
        with contextlib.suppress(OSError):
            h.send_response(status)
            for name, value in (headers or {}).items():
                h.send_header(name, value)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)

    def calls(self, method: str | None = None) -> list[tuple[str, str, int]]:
        with self._cond:
            return [c for c in self.api_calls if method is None or c[0] == method]
