"""Admission: what is refused before a request's body is read, and what a request may hold.

- Refusals the headers decide (``refused_by_headers``): the size cap (413 when Content-Length
  says the body is too large), headers too large (431), Content-Length beside
  Transfer-Encoding (400), a Content-Encoding (415).
- Concurrency and memory (``Admission``): past ``max_concurrent_requests`` requests, or when
  a body would take the bodies in memory past ``max_buffered_bytes``, the answer is 503 with
  ``Retry-After`` at once (a request alone is always admitted up to ``max_body_bytes``).
- Disk (``router.diskbudget``): a body that will be spooled unverified is reserved before it is
  read; refused with 413 when it could never fit, 503 when it does not fit now.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from router.asgi import CLOSE, JSON, Send, error_body, respond
from router.configmodels import ServerConfig
from router.diskbudget import OverBudget, Ticket
from router.journal import Journal
from router.logs import kv
from router.spool import SPOOL_THRESHOLD

log = logging.getLogger("router.ingress")


class Overloaded(Exception):
    """A body being received would take the bodies in memory past ``max_buffered_bytes``."""


class Held:
    """The body bytes one request holds in memory."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class Admission:
    """The webhook requests being handled and the body bytes they hold, against the limits."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.buffered = 0
        self._shedding = False

    def admit(self, headers: Sequence[tuple[bytes, bytes]], server: ServerConfig) -> Held | str:
        """Take a request in (its ``Held``, to ``leave`` with once answered), or say why not."""
        if self.in_flight >= server.max_concurrent_requests:
            return "too many requests in progress"
        # Memory a body will hold: all of it while small, the spool threshold once on disk.
        declared = min(max(content_length(headers), 0), SPOOL_THRESHOLD)
        if self.buffered and self.buffered + declared > server.max_buffered_bytes:
            return "too many request bodies in memory"
        self._shedding = False
        self.in_flight += 1
        held = Held()
        held.bytes = declared  # reserved at once: a body announced is a body coming
        self.buffered += declared
        return held

    def hold(self, held: Held, received: int, server: ServerConfig) -> None:
        """Count body bytes received beyond what was reserved (chunked, or a lying
        Content-Length), refusing them past the budget unless this request is alone."""
        more = received - held.bytes
        if more > 0:
            held.bytes += more
            self.buffered += more
            if self.buffered > server.max_buffered_bytes and self.buffered > held.bytes:
                raise Overloaded

    def leave(self, held: Held) -> None:
        """The request was answered: its slot and bytes are free."""
        self.in_flight -= 1
        self.buffered -= held.bytes

    async def overloaded(self, send: Send, why: str) -> int:
        """Answer 503 with ``Retry-After``: one log line when shedding starts, not one per
        request."""
        if not self._shedding:
            self._shedding = True
            log.warning(
                kv("overloaded", reason=why, requests=self.in_flight, buffered=self.buffered)
            )
        return await respond(
            send, 503, error_body(f"{why}: retry later"), JSON, [(b"retry-after", b"1"), CLOSE]
        )


def reserve(
    journal: Journal, server: ServerConfig, ticket: Ticket, total: int, needed: int | None = None
) -> None:
    """Reserve disk for a body about to be spooled unverified (``OverBudget`` if it does not
    fit)."""
    ticket.reserve(
        journal.local_dir, total, server.max_unverified_bytes, server.min_free_bytes, needed
    )


def over_budget_refusal(e: OverBudget) -> str | None:
    """The 413 text for a body that could never be stored unverified; None when it only does
    not fit now (503, ``Admission.overloaded``)."""
    if e.never:
        return f"body larger than the {e.limit} bytes that may be stored unverified"
    return None


def refused_by_headers(
    headers: Sequence[tuple[bytes, bytes]], server: ServerConfig
) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
    """A refusal the headers alone decide, so that none of the body is read: (status, reason,
    extra response headers), or None."""
    # One pass over the headers (this runs for every request).
    size = 0
    length: bytes | None = None
    chunked = False
    codings: list[bytes] = []
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            if length is None:
                length = value
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"content-encoding":
            codings.append(value)
    # hypercorn's limit (h11's) holds only while headers arrive in pieces: checked here too.
    if size > server.max_header_bytes:
        return 431, f"request headers larger than {server.max_header_bytes} bytes", []
    if length is not None and chunked:
        # Servers and proxies disagree about which one frames the body (request smuggling).
        return 400, "both Content-Length and Transfer-Encoding: send only one", []
    limit = server.max_body_bytes
    if length is not None and _as_length(length) > limit:
        return 413, f"body larger than {limit} bytes", []
    for value in codings:
        for coding in value.split(b","):
            if coding.strip().lower() not in (b"", b"identity"):
                # What is signed, stored and forwarded is the body as sent: uncompressed JSON.
                text = "Content-Encoding is not supported: send the body uncompressed"
                return 415, text, [(b"accept-encoding", b"identity")]
    return None


def content_length(headers: Sequence[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            return _as_length(value)
    return 0


def _as_length(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        return 0
