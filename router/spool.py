"""Large bodies: received to disk, parsed as a stream, never held in memory whole.

A body stays in memory while it is small (``SPOOL_THRESHOLD``); past that, what arrived so far
and everything after it goes to a file in the journal's ``bodies/`` folder (written in worker
threads). The signature is computed on the chunks as they pass (see ``router.auth``), ``meta``
and the order key are read with a streaming JSON parser (ijson's C backend) from the file, and
the journal keeps the file's name instead of the bytes. Sinks read such a body in chunks
(``Message.body_chunks``); the file leaves with its message.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import anyio.to_thread
import ijson

from router.parse import MAX_ID_LENGTH, BadMessage, Parsed

#: Bodies up to this size stay in memory; larger ones go to a file as they arrive.
SPOOL_THRESHOLD = 1024 * 1024
BODIES = "bodies"
CHUNK = 256 * 1024
_BOM = b"\xef\xbb\xbf"


class Spool:
    """One request body being received."""

    def __init__(self, directory: Path, threshold: int = SPOOL_THRESHOLD) -> None:
        self.directory = directory
        self.threshold = threshold
        self.size = 0
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.path: Path | None = None

    @property
    def spooled(self) -> bool:
        return self.path is not None

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._file is None:
            self._chunks.append(chunk)
            if self.size > self.threshold:
                await anyio.to_thread.run_sync(self._spill)
        else:
            await anyio.to_thread.run_sync(self._file.write, chunk)

    def _spill(self) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self.path = self.directory / f"incoming-{uuid.uuid4().hex}.tmp"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb")
        for chunk in self._chunks:
            self._file.write(chunk)
        self._chunks = []

    def body(self) -> bytes:
        """The whole body, when it stayed in memory."""
        assert self._file is None
        return b"".join(self._chunks)

    async def seal(self) -> str:
        """Make the spooled body durable under its final name; return that name (relative to
        the journal's folder), for the journal row."""
        assert self._file is not None and self.path is not None
        return await anyio.to_thread.run_sync(self._seal)

    def _seal(self) -> str:
        assert self._file is not None and self.path is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.path.with_name(f"{uuid.uuid4().hex}.json")
        os.rename(self.path, final)
        fsync_dir(self.directory)
        self.path = final
        return f"{BODIES}/{final.name}"

    async def discard(self) -> None:
        """Remove the file of a body that will not be kept (refused, duplicate, not stored)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                await anyio.to_thread.run_sync(self.path.unlink)
            self.path = None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chunks(path: Path, size: int = CHUNK) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


# -- streaming parse ----------------------------------------------------------------------------

_WANTED = {"meta.type", "meta.messageId", "meta.when", "meta.requestId", "ping"}
_PATIENTS = {"payload.patientId": 0, "patients.item.patientId": 1, "users.item.userId": 2}


def parse_file(path: Path) -> Parsed:
    """``router.parse.parse`` for a body in a file, reading it as a stream: the same checks
    (one JSON object, ``meta`` an object with string ``type`` and ``messageId``) and the same
    order key, in constant memory."""
    with path.open("rb") as f:
        if f.read(3) != _BOM:
            f.seek(0)
        return _parse_events(ijson.parse(f, use_float=True))


def _parse_events(events: Iterator[tuple[str, str, Any]]) -> Parsed:
    found: dict[str, Any] = {}
    ids: list[set[str]] = [set(), set(), set()]
    depth = 0
    try:
        for prefix, event, value in events:
            if event in ("start_map", "start_array"):
                if depth == 0 and event != "start_map":
                    raise BadMessage("body must be a JSON object")
                if prefix == "meta" and event != "start_map":
                    raise BadMessage("meta must be a JSON object")
                depth += 1
            elif event in ("end_map", "end_array"):
                depth -= 1
            elif depth == 0:
                raise BadMessage("body must be a JSON object")
            elif prefix in _WANTED:
                if prefix in found and prefix != "ping":
                    raise BadMessage(f"{prefix} appears twice")
                found[prefix] = value
            elif prefix == "meta" and event != "map_key":
                raise BadMessage("meta must be a JSON object")
            elif prefix in _PATIENTS and isinstance(value, str):
                ids[_PATIENTS[prefix]].add(value)
    except BadMessage:
        raise
    except (ijson.JSONError, ijson.IncompleteJSONError, UnicodeDecodeError, ValueError):
        # ijson's own text quotes the document: never pass it on.
        raise BadMessage("body is not valid JSON") from None
    return Parsed(
        message_id=_field(found, "messageId", required=True),
        type=_field(found, "type", required=True),
        when=_field(found, "when", required=False),
        request_id=_field(found, "requestId", required=False),
        ping=found.get("ping") if found.get("meta.type") == "ping" else None,
        order_key=_key(next((s for s in ids if s), set())),
    )


def _field(found: dict[str, Any], name: str, *, required: bool) -> Any:
    key = f"meta.{name}"
    if key not in found or found[key] is None:
        if required:
            raise BadMessage(f"meta.{name} is missing")
        return None
    value = found[key]
    if not isinstance(value, str):
        raise BadMessage(f"meta.{name} must be a string")
    if required and not value:
        raise BadMessage(f"meta.{name} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise BadMessage(f"meta.{name} is longer than {MAX_ID_LENGTH} characters")
    if not value.isprintable():
        raise BadMessage(f"meta.{name} contains control characters")
    return value


def _key(ids: set[str]) -> str:
    key = ",".join(sorted(ids))
    if len(key) > MAX_ID_LENGTH:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key
