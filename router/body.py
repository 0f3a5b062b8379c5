"""Receiving a request's body: into memory while small, into a spool file (``router.spool``)
past ``SPOOL_THRESHOLD``, feeding the signature check piece by piece as it arrives.

A body the server has queued whole already (the usual webhook of a few KB) is taken at once,
with no timer and no spool task (``queued``, ``take_whole``); any other is read as it comes
(``read_body``), under the ingress's ``body_timeout``. What ends a body early is an exception:
``TooLarge`` (past ``max_body_bytes``), ``Disconnected``, ``NotStored`` (a write failed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from router.asgi import Event, Receive
from router.spool import Spool


class TooLarge(Exception):
    """The body goes past ``max_body_bytes``."""


class Disconnected(Exception):
    """The client went away before the body was whole."""


class NotStored(Exception):
    """A body could not be written (``OSError``: ENOSPC, EIO, …)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror)
        self.error = error


def queued(receive: Receive, threshold: int) -> tuple[list[Event], bool]:
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


def take_whole(events: list[Event], limit: int, update: Callable[[bytes], None]) -> bytes:
    """The body a server queued whole (``queued``), fed to the signature check: what
    ``read_body`` makes of it, with nothing to wait for. ``Disconnected`` for a disconnect,
    ``TooLarge`` past ``limit``."""
    pieces: list[bytes] = []
    size = 0
    for event in events:
        chunk = _piece(event, limit, update, size)
        if chunk:
            size += len(chunk)
            pieces.append(chunk)
    return b"".join(pieces)  # (one piece, the usual case: that piece itself, not a copy)


def _piece(event: Event, limit: int, update: Callable[[bytes], None], size: int) -> bytes:
    """A request event's body piece (``size`` bytes came before it), fed to the signature
    check; ``Disconnected`` for a disconnect, ``TooLarge`` past ``limit``."""
    if event["type"] == "http.disconnect":
        raise Disconnected
    chunk: bytes = event.get("body", b"")
    if chunk:
        if size + len(chunk) > limit:
            raise TooLarge
        update(chunk)
    return chunk


def replay(events: list[Event], receive: Receive) -> Receive:
    """``receive`` that first gives back ``events`` (taken by ``queued``), in order."""
    pending = list(events)

    async def replayed() -> Event:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def read_body(
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
            chunk = _piece(event, limit, update, spool.size)
            if chunk:
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
