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
import itertools
import operator
import os
import uuid
from collections.abc import Callable, Iterator
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
#
# A big body holds millions of JSON events (a 64 MiB FHIR bundle: 6.7 M), and a Python loop over
# each of them costs more than the C tokenizer that makes them. So the events are first filtered
# in C (itertools over ijson's C generator) down to the few whose prefix can matter: the root,
# ``meta`` and the fields read from it, ``ping``, the patient ids and their lists. Python then
# sees a few dozen events. ijson's prefixes are dotted paths, so they are unambiguous only while
# no top-level key is empty or holds a dot; a body with such a key (Metriport sends none) is read
# again by the exact loop, which places every event by its real path of keys.

_PATIENTS = {"payload.patientId": 0, "patients.item.patientId": 1, "users.item.userId": 2}
_META_FIELDS = ("type", "messageId", "when", "requestId")
_SHALLOW = frozenset(
    {"", "meta", "ping", "patients", "users", *_PATIENTS, *(f"meta.{k}" for k in _META_FIELDS)}
)
_CONTAINERS = frozenset({"start_map", "start_array"})
#: Read size: each read hands the GIL back, so the event loop waits at most one piece's parse.
_BUF_SIZE = 64 * 1024


class _Ambiguous(Exception):
    """A top-level key makes ijson's prefixes ambiguous: read the body with the exact loop."""


def parse_file(path: Path) -> Parsed:
    """``router.parse.parse`` for a body in a file, reading it as a stream: the same checks
    (one JSON object, ``meta`` an object with string ``type`` and ``messageId``) and the same
    order key, in constant memory."""
    with path.open("rb") as f:
        try:
            return _read(f, _parse_shallow)
        except _Ambiguous:
            return _read(f, _parse_events)


def _read(f: IO[bytes], parser: Callable[[Iterator[tuple[str, str, Any]]], Parsed]) -> Parsed:
    f.seek(0)
    if f.read(3) != _BOM:
        f.seek(0)
    try:
        return parser(ijson.parse(f, use_float=True, buf_size=_BUF_SIZE))
    except (BadMessage, _Ambiguous):
        raise
    except (ijson.JSONError, ijson.IncompleteJSONError, UnicodeDecodeError, ValueError):
        # ijson's own text quotes the document: never pass it on.
        raise BadMessage("body is not valid JSON") from None


def _parse_shallow(events: Iterator[tuple[str, str, Any]]) -> Parsed:
    """The events that matter, picked out in C; see the comment above."""
    everything, probe = itertools.tee(events)
    wanted = map(_SHALLOW.__contains__, map(operator.itemgetter(0), probe))
    meta: dict[str, Any] = {}
    ping: Any = None
    keys: dict[str, set[str]] = {"": set(), "meta": set()}
    ids: list[set[str]] = [set(), set(), set()]
    lists = {"patients": False, "users": False}
    root = False
    for prefix, event, value in itertools.compress(everything, wanted):
        if not root:  # the first event of all: the root value
            if event != "start_map":
                raise BadMessage("body must be a JSON object")
            root = True
        elif event == "map_key":
            if prefix == "":
                if not value or "." in value:
                    raise _Ambiguous
                if value in keys[""]:
                    raise duplicate_key(value, "the body")
                keys[""].add(value)
            elif prefix == "meta":
                if value in keys["meta"]:
                    raise duplicate_key(value, "meta")
                keys["meta"].add(value)
        elif prefix == "meta":
            if event not in ("start_map", "end_map"):
                raise BadMessage("meta must be a JSON object")
        elif prefix in lists:
            if event in _CONTAINERS:
                lists[prefix] = event == "start_array"
        elif prefix.startswith("meta."):
            if event in _CONTAINERS:
                meta[prefix[5:]] = {}  # not a string: from_meta says so
            elif event not in ("end_map", "end_array"):
                meta[prefix[5:]] = value
        elif prefix == "ping":
            if event not in _CONTAINERS and event not in ("end_map", "end_array"):
                ping = value
        elif (
            prefix in _PATIENTS
            and isinstance(value, str)
            and (prefix == "payload.patientId" or lists[prefix.partition(".")[0]])
        ):
            ids[_PATIENTS[prefix]].add(value)
    if "meta" not in keys[""]:
        raise BadMessage("meta must be a JSON object")
    return from_meta(meta, ping, key_of(next((s for s in ids if s), set())))


def _parse_events(events: Iterator[tuple[str, str, Any]]) -> Parsed:
    """Every event, placed by the real path of keys that leads to it (``None`` for an array's
    item) rather than by ijson's dotted prefix: exact whatever the keys are."""
    meta: dict[str, Any] = {}
    ping: Any = None
    keys: dict[tuple[str | None, ...], set[str]] = {(): set(), ("meta",): set()}
    ids: list[set[str]] = [set(), set(), set()]
    path: list[str | None] = []  # the key (or None) at each open level below the root
    depth = 0
    for _prefix, event, value in events:
        if event in ("end_map", "end_array"):
            depth -= 1
            del path[depth:]
            continue
        if depth == 0:  # the root value
            if event != "start_map":
                raise BadMessage("body must be a JSON object")
            depth = 1
            continue
        if event == "map_key":
            scope = tuple(path[: depth - 1]) if depth <= 2 else None
            if scope in keys:
                if value in keys[scope]:
                    raise duplicate_key(value, "meta" if scope else "the body")
                keys[scope].add(value)
            del path[depth - 1 :]
            path.append(value)
            continue
        if len(path) < depth:
            path.append(None)  # an item of the array at this level
        at = tuple(path[:depth])
        container = event in ("start_map", "start_array")
        if at == ("meta",):
            if event != "start_map":
                raise BadMessage("meta must be a JSON object")
        elif depth == 2 and at[0] == "meta":
            meta[str(at[1])] = {} if container else value  # a container is not a string
        elif at == ("ping",) and not container:
            ping = value
        elif at in _PATHS and isinstance(value, str):
            ids[_PATHS[at]].add(value)
        if container:
            depth += 1
    if "meta" not in keys[()]:
        raise BadMessage("meta must be a JSON object")
    return from_meta(meta, ping, key_of(next((s for s in ids if s), set())))


_PATHS: dict[tuple[str | None, ...], int] = {
    ("payload", "patientId"): 0,
    ("patients", None, "patientId"): 1,
    ("users", None, "userId"): 2,
}
