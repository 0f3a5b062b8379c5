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
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import anyio.to_thread
import ijson

from router.durable import fsync_dir
from router.parse import BadMessage, Parsed, duplicate_key, from_meta, key_of

#: Bodies up to this size stay in memory; larger ones go to a file as they arrive.
SPOOL_THRESHOLD = 1024 * 1024
#: A spooled body is written in pieces of about this size.
WRITE_SIZE = 1024 * 1024
BODIES = "bodies"
_BOM = b"\xef\xbb\xbf"


class Spool:
    """One request body being received."""

    def __init__(self, directory: Path, threshold: int = SPOOL_THRESHOLD) -> None:
        self.directory = directory
        self.threshold = threshold
        self.size = 0
        self._chunks: list[bytes] = []
        self._pending = 0  # bytes in _chunks not yet written to the file
        self._file: IO[bytes] | None = None
        self.path: Path | None = None

    @property
    def spooled(self) -> bool:
        return self.path is not None

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._chunks.append(chunk)
        self._pending += len(chunk)
        if self._file is None:
            if self.size > self.threshold:
                await anyio.to_thread.run_sync(self._spill)
        elif self._pending >= WRITE_SIZE:  # one trip to a worker thread per WRITE_SIZE bytes
            await anyio.to_thread.run_sync(self._flush)

    def _flush(self) -> None:
        assert self._file is not None
        self._file.write(b"".join(self._chunks))
        self._chunks = []
        self._pending = 0

    def _spill(self) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self.path = self.directory / f"incoming-{uuid.uuid4().hex}.tmp"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb")
        self._flush()

    async def finish(self) -> None:
        """The whole body has arrived: a spooled body is then entirely in its file."""
        if self._file is not None:
            await anyio.to_thread.run_sync(self._finish)

    def _finish(self) -> None:
        assert self._file is not None
        self._flush()
        self._file.flush()

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
        self._flush()
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


# -- streaming parse ----------------------------------------------------------------------------

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
    meta: dict[str, Any] = {}
    ping: Any = None
    keys: dict[str, set[str]] = {"": set(), "meta": set()}  # top-level keys, meta's keys
    ids: list[set[str]] = [set(), set(), set()]
    depth = 0
    try:
        for prefix, event, value in events:
            if event in ("start_map", "start_array"):
                if depth == 0 and event != "start_map":
                    raise BadMessage("body must be a JSON object")
                if prefix == "meta" and event != "start_map":
                    raise BadMessage("meta must be a JSON object")
                if prefix.startswith("meta.") and prefix.count(".") == 1:
                    meta[prefix[5:]] = {}  # not a string: meta_field says so
                depth += 1
            elif event in ("end_map", "end_array"):
                depth -= 1
            elif depth == 0:
                raise BadMessage("body must be a JSON object")
            elif event == "map_key" and prefix in keys and depth <= 2:
                if value in keys[prefix]:
                    raise duplicate_key(value, "meta" if prefix else "the body")
                keys[prefix].add(value)
            elif prefix == "meta":
                raise BadMessage("meta must be a JSON object")
            elif event == "map_key":
                pass
            elif depth == 2 and prefix.startswith("meta."):
                meta[prefix[5:]] = value
            elif depth == 1 and prefix == "ping":
                ping = value
            elif prefix in _PATIENTS and isinstance(value, str):
                ids[_PATIENTS[prefix]].add(value)
    except BadMessage:
        raise
    except (ijson.JSONError, ijson.IncompleteJSONError, UnicodeDecodeError, ValueError):
        # ijson's own text quotes the document: never pass it on.
        raise BadMessage("body is not valid JSON") from None
    if "meta" not in keys[""]:
        raise BadMessage("meta must be a JSON object")
    return from_meta(meta, ping, key_of(next((s for s in ids if s), set())))
