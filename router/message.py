"""The message as the router stores it and as sinks receive it."""

from __future__ import annotations

import datetime as dt
import json as _json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import ijson

from router.errors import RetryableError

CHUNK = 256 * 1024
_BOM = b"\xef\xbb\xbf"


class BodyNotInMemory(RetryableError):
    """``Message.body`` or ``Message.json()`` was asked of a body kept in a file.

    Reading a large body whole on the event loop would stall every request and delivery of the
    router while the disk works, so the synchronous accessors refuse instead. Retryable: the
    message is kept (and retried) until the sink is fixed to use ``await message.read_body()``,
    ``await message.read_json()`` or the streaming ``aiter_body()`` / ``aiter_json()``. The text
    names sizes only, never content, so it is safe to log and store."""

    def __init__(self, accessor: str, size: int) -> None:
        instead = "read_body()" if accessor == "body" else "read_json()"
        stream = "aiter_body()" if accessor == "body" else "aiter_json(prefix)"
        super().__init__(
            f"Message.{accessor} needs a body held in memory; this one ({size} bytes) is in a"
            f" file: use await message.{instead} or message.{stream}"
        )


class Message:
    """One Metriport webhook message (treat it as read-only: it may be shared between sinks).

    The body is the exact bytes that were received (and verified): forward them verbatim so
    that a downstream system can verify Metriport's signature itself. A small body (up to
    1 MiB) is held in memory (``in_memory``); a large one (see ``router.spool``) stays in a file
    beside the journal (``body_file``). Its accessors, for bytes and for parsed JSON:

    - ``body`` / ``json()``: synchronous and cheap, for a body held in memory only; for a body
      in a file they raise ``BodyNotInMemory`` (they never read a file on the event loop).
      ``json()`` is parsed once and cached (treat the result as read-only too).
    - ``await read_body()`` / ``await read_json()``: any body, whole; one in a file is read
      (and parsed) in a worker thread.
    - ``aiter_body()`` / ``aiter_json(prefix)``: any body, streamed, read (and parsed, with
      ijson) in worker threads: for bodies too large to hold whole. ``body_size`` is known
      without reading anything.

    The ``meta`` fields
    are copied out for routing, naming and logging. ``attempt`` is the 1-based number of this
    delivery attempt to the sink receiving it. ``order_key`` is the patient the message is
    about, for ordered delivery (see ``router.parse``), empty when it names none: an
    identifier, never to be logged.
    """

    __slots__ = (
        "_body",
        "_json",
        "attempt",
        "body_file",
        "body_size",
        "message_id",
        "order_key",
        "received_at",
        "request_id",
        "type",
        "when",
    )

    def __init__(
        self,
        message_id: str,
        type: str,
        when: str | None,
        body: bytes | None = None,
        received_at: float = 0.0,
        request_id: str | None = None,
        attempt: int = 1,
        order_key: str = "",
        *,
        body_file: Path | None = None,
        body_size: int | None = None,
    ) -> None:
        if (body is None) == (body_file is None):
            raise ValueError("a message has either body bytes or a body_file")
        self.message_id = message_id
        self.type = type
        self.when = when
        self._body = body
        self._json: Any = _UNPARSED
        self.body_file = body_file
        self.body_size = len(body) if body is not None else body_size or 0
        self.received_at = received_at
        self.request_id = request_id
        self.attempt = attempt
        self.order_key = order_key

    @property
    def body(self) -> bytes:
        """The whole body, when held in memory (``in_memory``); else ``BodyNotInMemory``."""
        if self._body is None:
            raise BodyNotInMemory("body", self.body_size)
        return self._body

    @property
    def in_memory(self) -> bool:
        """Whether the body is held in memory (then ``body`` and ``json()`` are cheap)."""
        return self._body is not None

    def json(self) -> Any:
        """The body parsed as JSON, when held in memory; parsed on first use and cached. A body
        in a file raises ``BodyNotInMemory`` (see ``read_json`` and ``aiter_json``)."""
        if self._json is _UNPARSED:
            if self._body is None:
                raise BodyNotInMemory("json()", self.body_size)
            self._json = _loads(self._body)
        return self._json

    async def read_body(self) -> bytes:
        """The whole body, whatever its size: one in a file is read in a worker thread (it is
        then in memory as a whole: for a large body prefer ``aiter_body``)."""
        if self._body is not None:
            return self._body
        assert self.body_file is not None
        return await anyio.to_thread.run_sync(self.body_file.read_bytes)

    async def read_json(self) -> Any:
        """The body parsed as JSON, whatever its size: ``json()`` for a body in memory; one in
        a file is read and parsed in a worker thread, each call (not cached: it can be large;
        for a large body prefer ``aiter_json``)."""
        if self._body is not None:
            return self.json()
        assert self.body_file is not None
        return await anyio.to_thread.run_sync(_loads_file, self.body_file)

    async def aiter_json(self, prefix: str, size: int = CHUNK) -> AsyncIterator[Any]:
        """The JSON values at ``prefix`` (ijson's notation: ``"patients.item"`` is each
        element of the top-level ``patients`` array, ``"meta"`` the ``meta`` object), streamed:
        the body is read and parsed in worker threads, ``size`` bytes at a time, so only the
        values found, not the document, are held in memory. Numbers with a fraction are
        floats, as with ``json()``. Raises ``ValueError`` on a body that is not JSON."""
        found = ijson.sendable_list()
        parser = ijson.items_coro(found, prefix, use_float=True)
        chunks = self.body_chunks(size)
        first = True

        def step() -> bool:
            nonlocal first
            raw = next(chunks, b"")
            while first and raw and len(raw) < len(_BOM) and (more := next(chunks, b"")):
                raw += more  # the whole of a BOM, to tell it
            chunk = raw.removeprefix(_BOM) if first else raw
            try:
                if chunk:  # (an empty send would end ijson's input)
                    parser.send(chunk)
                elif not raw:
                    parser.close()
            except (ijson.JSONError, UnicodeDecodeError) as e:
                raise ValueError(f"body is not valid JSON: {type(e).__name__}") from None
            first = False
            return bool(raw)

        try:
            more = True
            while more:
                more = step() if self._body is not None else await anyio.to_thread.run_sync(step)
                for value in found:
                    yield value
                del found[:]
        finally:
            await _close_off_loop(chunks, self._body is None)

    def body_chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The body in pieces of at most ``size`` bytes (blocking reads: use in a thread)."""
        if self._body is not None:
            for i in range(0, len(self._body), size):
                yield self._body[i : i + size]
            return
        assert self.body_file is not None
        with self.body_file.open("rb") as f:
            while chunk := f.read(size):
                yield chunk

    async def aiter_body(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        """The body in pieces, read in worker threads (for streaming it out)."""
        if self._body is not None:
            for chunk in self.body_chunks(size):
                yield chunk
            return
        assert self.body_file is not None
        f = await anyio.to_thread.run_sync(self.body_file.open, "rb")
        try:
            while chunk := await anyio.to_thread.run_sync(f.read, size):
                yield chunk
        finally:
            await _close_off_loop(f, True)

    def with_attempt(self, attempt: int) -> Message:
        """This message as delivery attempt ``attempt`` sees it (sharing the parsed body)."""
        again = Message(
            self.message_id,
            self.type,
            self.when,
            self._body,
            self.received_at,
            self.request_id,
            attempt,
            self.order_key,
            body_file=self.body_file,
            body_size=self.body_size,
        )
        again._json = self._json
        return again

    @property
    def received_datetime(self) -> dt.datetime:
        """The receive time as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.received_at, tz=dt.UTC)

    def describe(self) -> str:
        """The fields that may be logged: never the body."""
        return f"id={self.message_id} type={self.type}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        mine = (self.message_id, self.type, self.when, self.received_at, self.request_id)
        theirs = (other.message_id, other.type, other.when, other.received_at, other.request_id)
        return (
            mine == theirs
            and (self.attempt, self.order_key) == (other.attempt, other.order_key)
            and self.body_size == other.body_size
            and (self._body, self.body_file) == (other._body, other.body_file)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        where = "memory" if self._body is not None else str(self.body_file)
        return (
            f"Message({self.message_id!r}, {self.type!r}, attempt={self.attempt},"
            f" body={self.body_size} bytes in {where})"
        )


#: ``Message._json`` before the body was parsed (``None`` is a valid JSON document).
_UNPARSED: Any = object()


def _loads(body: bytes) -> Any:
    """The body as JSON: UTF-8 with an optional BOM, as the router accepted it."""
    return _json.loads(body.decode("utf-8-sig"))


def _loads_file(path: Path) -> Any:
    return _loads(path.read_bytes())


async def _close_off_loop(closable: Any, in_thread: bool) -> None:
    """Close a body file (or a generator reading one) in a worker thread, even when cancelled:
    a close is a system call on the file, which stays off the event loop like its reads."""
    if not in_thread:
        closable.close()
        return
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(closable.close)
