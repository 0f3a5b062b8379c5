"""The message as the router stores it and as sinks receive it."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio.to_thread

CHUNK = 256 * 1024


class Message:
    """One Metriport webhook message (treat it as read-only: it may be shared between sinks).

    The body is the exact bytes that were received (and verified): forward them verbatim so
    that a downstream system can verify Metriport's signature itself. A small body is held in
    memory; a large one (see ``router.spool``) stays in a file beside the journal
    (``body_file``), and ``body`` reads it whole on each use: a sink that may meet large bodies
    should use ``body_chunks`` / ``aiter_body`` and ``body_size`` instead. The ``meta`` fields
    are copied out for routing, naming and logging. ``attempt`` is the 1-based number of this
    delivery attempt to the sink receiving it. ``order_key`` is the patient the message is
    about, for ordered delivery (see ``router.parse``), empty when it names none: an
    identifier, never to be logged.
    """

    __slots__ = (
        "_body",
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
        self.body_file = body_file
        self.body_size = len(body) if body is not None else body_size or 0
        self.received_at = received_at
        self.request_id = request_id
        self.attempt = attempt
        self.order_key = order_key

    @property
    def body(self) -> bytes:
        """The whole body (read from its file each time for a large body)."""
        if self._body is not None:
            return self._body
        assert self.body_file is not None
        return self.body_file.read_bytes()

    @property
    def in_memory(self) -> bool:
        return self._body is not None

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
            f.close()

    def with_attempt(self, attempt: int) -> Message:
        """This message as delivery attempt ``attempt`` sees it."""
        return Message(
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
            and self.body == other.body
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        where = "memory" if self._body is not None else str(self.body_file)
        return (
            f"Message({self.message_id!r}, {self.type!r}, attempt={self.attempt},"
            f" body={self.body_size} bytes in {where})"
        )
