"""Large bodies: received to disk, parsed as they arrive, never held in memory whole.

A body stays in memory while it is small (``SPOOL_THRESHOLD``); past that, what arrived so far
and everything after it goes to a file in the journal's ``bodies/`` folder, and is fed at the
same time to a streaming JSON parser (ijson's push interface, C backend), both in worker
threads, one trip per ``WRITE_SIZE`` bytes, made while the next piece is received. The
signature is computed on the chunks as they pass
(see ``router.auth``). So when the last byte arrives only the last piece's write and parse
remain, then the fsyncs and the commit: the silence a sender sees after its upload does not grow
with the body (Metriport gives up after 5 s of it). The journal keeps the file's name instead of
the bytes. Sinks read such a body in chunks (``Message.body_chunks``); the file leaves with its
message. Every write step goes through ``router.durable``; an ``OSError`` there (ENOSPC, EIO)
reaches the caller, and ``discard`` then removes what was written.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import operator
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import anyio.to_thread
import ijson

from router import durable
from router.parse import BadMessage, Parsed, duplicate_key, from_meta, key_of

log = logging.getLogger(__name__)

#: Bodies up to this size stay in memory; larger ones go to a file as they arrive.
SPOOL_THRESHOLD = 1024 * 1024
#: A spooled body is written (and parsed) in pieces of about this size.
WRITE_SIZE = 1024 * 1024
BODIES = "bodies"
_BOM = b"\xef\xbb\xbf"


class Spool:
    """One request body being received.

    Inside ``receiving()`` the spool is a two-stage pipeline: each piece is written and parsed
    in a worker thread while the next one is received (one trip in flight, so it holds at most
    two pieces), and the upload runs at the socket's speed instead of waiting for each trip.
    Outside it (tests, a small body) each trip is awaited as it is made. A trip's ``OSError``
    is raised by the next ``write`` or by ``finish``."""

    def __init__(self, directory: Path, threshold: int = SPOOL_THRESHOLD) -> None:
        self.directory = directory
        self.threshold = threshold
        self.size = 0
        self._chunks: list[bytes] = []
        self._pending = 0  # bytes in _chunks not yet written to the file
        self._fd: int | None = None
        self._written = 0  # bytes in the file
        self._parser: StreamParser | None = None
        self._parsed: Parsed | BadMessage | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._trip: _Trip | None = None  # the piece being written and parsed
        self.path: Path | None = None

    @property
    def spooled(self) -> bool:
        return self.path is not None

    @property
    def held(self) -> int:
        """Body bytes in memory: those not yet written, and the piece being written."""
        return self._pending + (self._trip.size if self._trip is not None else 0)

    @contextlib.asynccontextmanager
    async def receiving(self) -> AsyncIterator[None]:
        """While the body arrives: pieces are written and parsed while the next one is
        received. On the way out (whatever the reason) the trip in flight is waited for, so
        that ``discard`` never closes the file under it."""
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                try:
                    yield
                finally:
                    self._tasks = None
        except BaseExceptionGroup as group:  # trips never raise: the receiver's own exception
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    def keep(self, chunk: bytes) -> None:
        """``write`` of a piece that leaves the body in memory (within the threshold): nothing
        to wait for."""
        assert self.path is None and self.size + len(chunk) <= self.threshold
        self._add(chunk)

    def _add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._chunks.append(chunk)
        self._pending += len(chunk)

    async def write(self, chunk: bytes) -> None:
        self._add(chunk)
        if self.path is None:
            if self.size > self.threshold:
                await anyio.to_thread.run_sync(self._spill)
        elif self._pending >= WRITE_SIZE:  # one trip to a worker thread per WRITE_SIZE bytes
            await self._landed()  # the previous piece: at most two held
            data = self._take()
            if self._tasks is None:
                await anyio.to_thread.run_sync(self._store, data)
            else:
                self._trip = _Trip(len(data))
                self._tasks.start_soon(self._travel, self._trip, data)

    async def _travel(self, trip: _Trip, data: bytes) -> None:
        try:
            await anyio.to_thread.run_sync(self._store, data)
        except Exception as e:  # raised by the next write or finish
            trip.error = e
        finally:
            trip.landed.set()

    async def _landed(self) -> None:
        """Wait for the trip in flight, if any; raise what it raised."""
        trip, self._trip = self._trip, None
        if trip is not None:
            await trip.landed.wait()
            if trip.error is not None:
                raise trip.error

    def _take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks = []
        self._pending = 0
        return data

    def _store(self, data: bytes) -> None:
        assert self._fd is not None and self._parser is not None
        durable.write_all(self._fd, data)
        durable.start_writeback(self._fd, self._written, len(data))
        self._written += len(data)
        self._parser.feed(data)

    def _spill(self) -> None:
        durable.make_dirs(self.directory)
        path = self.directory / f"incoming-{uuid.uuid4().hex}.tmp"
        self._fd = durable.create(path)
        self.path = path
        self._parser = StreamParser(path)
        self._store(self._take())

    async def finish(self) -> None:
        """The whole body has arrived: a spooled body is then entirely in its file, and
        parsed."""
        if self.path is not None:
            await self._landed()
            await anyio.to_thread.run_sync(self._finish, self._take())

    def _finish(self, data: bytes) -> None:
        assert self._parser is not None
        self._store(data)
        try:
            self._parsed = self._parser.close()
        except BadMessage as e:
            self._parsed = e

    def parsed(self) -> Parsed:
        """What ``router.parse.parse`` makes of a spooled body (raises its ``BadMessage``), once
        ``finish`` returned."""
        assert self._parsed is not None
        if isinstance(self._parsed, BadMessage):
            raise self._parsed
        return self._parsed

    def body(self) -> bytes:
        """The whole body, when it stayed in memory."""
        assert self.path is None
        return b"".join(self._chunks)

    async def seal(self) -> str:
        """Make the spooled body durable under its final name; return that name (relative to
        the journal's folder), for the journal row."""
        assert self._fd is not None and self.path is not None
        return await anyio.to_thread.run_sync(self._seal)

    def _seal(self) -> str:
        assert self._fd is not None and self.path is not None
        durable.fsync(self._fd)
        self._close()
        final = self.path.with_name(f"{uuid.uuid4().hex}.json")
        durable.rename(self.path, final)
        self.path = final
        durable.fsync_dir(self.directory)
        return f"{BODIES}/{final.name}"

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    async def discard(self) -> None:
        """Remove the file of a body that will not be kept (refused, duplicate, not stored).
        Never raises: a file it cannot remove is logged, and removed at the next start."""
        with contextlib.suppress(OSError):
            self._close()
        if self.path is not None:
            path, self.path = self.path, None
            try:
                await anyio.to_thread.run_sync(path.unlink)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error(
                    "could not remove a spooled file not kept (%s): %s", path.name, e.strerror
                )


class _Trip:
    """One piece on its way to the file and the parser."""

    __slots__ = ("error", "landed", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.landed = anyio.Event()
        self.error: Exception | None = None


# -- streaming parse ----------------------------------------------------------------------------
#
# A big body holds millions of JSON events (a 64 MiB FHIR bundle: 6.7 M), and a Python loop over
# each of them costs more than the C tokenizer that makes them. So the events are first filtered
# in C (itertools over the list ijson's C parser appends them to) down to the few whose prefix
# can matter: the root, ``meta`` and the fields read from it, ``ping``, the patient ids and their
# lists. Python then sees a few dozen events. ijson's prefixes are dotted paths, so they are
# unambiguous only while no top-level key is empty or holds a dot; a body with such a key
# (Metriport sends none) is read again from its file by the exact loop, which places every event
# by its real path of keys.

_PATIENTS = {"payload.patientId": 0, "patients.item.patientId": 1, "users.item.userId": 2}
_META_FIELDS = ("type", "messageId", "when", "requestId")
_SHALLOW = frozenset(
    {"", "meta", "ping", "patients", "users", *_PATIENTS, *(f"meta.{k}" for k in _META_FIELDS)}
)
_CONTAINERS = frozenset({"start_map", "start_array"})
#: Parse size: each piece hands the GIL back, so the event loop waits at most one piece's parse.
#: Small enough that a piece's events stay in the CPU's caches (16 KiB parses about twice as fast
#: as 256 KiB, and faster than 64 KiB).
_BUF_SIZE = 16 * 1024
_NOT_JSON = (ijson.JSONError, ijson.IncompleteJSONError, UnicodeDecodeError, ValueError)


class _Target:
    """What ijson's C coroutines are given to send to: ``send`` is the next stage itself."""

    def __init__(self, send: object) -> None:
        self.send = send


def _parse_coro(events: ijson.sendable_list) -> Any:
    """``ijson.parse_coro(events)``, chained in C. ``ijson.parse_coro`` hands each event from
    one stage to the next, and to the list, through a Python-level call (``target.send``, a
    bound method); each C stage calls the next one directly when that is a C parse stage, and
    appends directly when it is a list. Chained so, the push parser is about twice as fast
    (about 14 ms per MiB of a FHIR bundle instead of 32; faster than ijson's pulling ``parse``
    too). Without the C backend, or if an ijson release no longer takes these shortcuts,
    ijson's own chain."""
    backend = _chained()
    if backend is None:
        return ijson.parse_coro(events, use_float=True)
    return backend.basic_parse_basecoro(
        _Target(backend.parse_basecoro(_Target(events))), use_float=True
    )


@functools.cache
def _chained() -> Any:
    """ijson's C backend if its stages take the shortcuts ``_parse_coro`` relies on, else
    None."""
    try:
        backend = ijson.get_backend("yajl2_c")
        probe = ijson.sendable_list()
        coro = backend.basic_parse_basecoro(_Target(backend.parse_basecoro(_Target(probe))))
        coro.send(b"[1]")
        coro.close()
    except (ImportError, TypeError):  # no C backend; a stage called its target
        return None
    expected = [("", "start_array", None), ("item", "number", 1), ("", "end_array", None)]
    return backend if probe == expected else None


# -- surrogate escapes --------------------------------------------------------------------------
#
# JSON may escape a lone UTF-16 surrogate (``"\ud800"``), which ``json`` decodes as such, and
# yajl does not: it pairs a high surrogate with whatever escape follows, makes ``?`` of one
# alone and fails on a low one. So before yajl sees them, the escapes of surrogates (and the
# marker character itself) are rewritten into text yajl passes through: ``\uXXXX`` becomes the
# marker followed by ``XXXX``, a literal marker two markers. The strings the router reads
# (keys at the top and in ``meta``, meta fields, ids, ping) are then decoded back exactly as
# ``json`` decodes them (``_exact``); the rest of the body is only checked for syntax, which
# the rewriting does not change (an escape is rewritten only where one is, inside a string).
# The search is one C-speed scan per piece: a body without such escapes costs no more.

_MARK = "\U0010f7ff"  # a private-use character, as good as any: the scheme is exact
_MARK_BYTES = _MARK.encode()
_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # no alternative: a fast search
_CANDIDATE = re.compile(_ESCAPE.pattern + b"|" + re.escape(_MARK_BYTES))
_MARKED = re.compile(_MARK + "(?:(" + _MARK + ")|([0-9a-fA-F]{4}))")
#: The bytes kept back at the end of a piece: an escape cut there is rewritten with the next.
_TAIL = 5


class _Escapes:
    """Rewrites the surrogate escapes of a stream fed in pieces (see above)."""

    def __init__(self) -> None:
        self._carry = b""
        self._odd = False  # the bytes passed on end inside an odd run of backslashes

    def feed(self, data: bytes, final: bool = False) -> bytes:
        buf = self._carry + data if self._carry else data
        cut = len(buf)
        if not final and (b"\\" in buf[-_TAIL:] or b"\xf4" in buf[-_TAIL:]):
            cut = max(cut - _TAIL, 0)  # an escape or the marker may be cut there
        escape = _ESCAPE.search(buf)
        mark = buf.find(_MARK_BYTES)
        if escape is None and mark < 0:  # the usual case: two scans at C speed, no copy
            out = buf if cut == len(buf) else buf[:cut]
        else:
            start = min(escape.start() if escape else len(buf), mark if mark >= 0 else len(buf))
            out, cut = self._rewrite(buf, cut, start)
        self._carry = buf[cut:]
        if cut and buf[cut - 1] == 0x5C:  # "\\"
            run = cut - len(buf[:cut].rstrip(b"\\"))
            self._odd = (run + (self._odd if run == cut else 0)) % 2 == 1
        elif cut:
            self._odd = False
        return out

    def _rewrite(self, buf: bytes, cut: int, start: int) -> tuple[bytes, int]:
        parts: list[bytes] = []
        at = 0
        for m in _CANDIDATE.finditer(buf, start):
            s = m.start()
            if s >= cut:
                break
            cut = max(cut, m.end())
            if m[0] == _MARK_BYTES:
                replacement = _MARK_BYTES * 2
            else:
                first = s
                while first > 0 and buf[first - 1] == 0x5C:
                    first -= 1
                run = s - first + 1 + (self._odd if first == 0 else 0)
                if run % 2 == 0:  # an escaped backslash, then "u": not an escape
                    continue
                replacement = _MARK_BYTES + m[0][2:]
            parts += (buf[at:s], replacement)
            at = m.end()
        parts.append(buf[at:cut])
        return b"".join(parts), cut


class _Rewritten:
    """A file read through ``_Escapes``."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._escapes = _Escapes()

    def read(self, size: int) -> bytes:
        if size == 0:
            return b""
        while True:
            data = self._f.read(size)
            out = self._escapes.feed(data, final=not data)
            if out or not data:
                return out


def _exact(text: str) -> str:
    """A string yajl read from the rewritten stream, as ``json`` reads the original."""
    if _MARK not in text:
        return text
    text = _MARKED.sub(lambda m: _MARK if m[1] else chr(int(m[2], 16)), text)
    # json pairs a high surrogate's escape with a low one's that follows at once.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


class _Ambiguous(Exception):
    """A top-level key makes ijson's prefixes ambiguous: read the body with the exact loop."""


class StreamParser:
    """``router.parse.parse`` fed a piece at a time (``feed``, then ``close``): the same checks
    (one JSON object, no repeated key at the top or in ``meta``, ``meta`` an object with string
    ``type`` and ``messageId``) and the same order key, in constant memory. ``path`` holds the
    bytes fed so far: the exact loop reads it when the prefixes are ambiguous."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._events = ijson.sendable_list()
        self._coro = _parse_coro(self._events)
        self._shallow = _Shallow()
        self._escapes = _Escapes()
        self._head = b""  # the first bytes, until it is known whether they are a BOM
        self._started = False
        self._outcome: BadMessage | _Ambiguous | None = None

    def feed(self, data: bytes) -> None:
        if self._outcome is not None:
            return  # decided: the rest need not be parsed
        if not self._started:
            self._head += data
            if len(self._head) < len(_BOM):
                return
            data = self._head.removeprefix(_BOM)
            self._head = b""
            self._started = True
        view = memoryview(self._escapes.feed(data))
        try:
            for at in range(0, len(view), _BUF_SIZE):
                self._push(view[at : at + _BUF_SIZE])
        except (BadMessage, _Ambiguous) as e:
            self._outcome = e

    def close(self) -> Parsed:
        """The result once every byte was fed; raises ``BadMessage``."""
        if not self._started:
            self._started = True
            self.feed(self._head.removeprefix(_BOM))
        if self._outcome is None:
            try:
                rest = self._escapes.feed(b"", final=True)  # the bytes kept back
                if rest:
                    self._push(memoryview(rest))
                self._push(None)
            except (BadMessage, _Ambiguous) as e:
                self._outcome = e
        if isinstance(self._outcome, _Ambiguous):
            with self.path.open("rb") as f:
                return _read(f, _parse_events)
        if self._outcome is not None:
            raise self._outcome
        return self._shallow.result()

    def _push(self, piece: memoryview | None) -> None:
        """Parse one piece (``None``: the end), then look at the events it made: those before
        a syntax error count first, as when the parser pulls."""
        error = None
        try:
            if piece is None:
                self._coro.close()
            else:
                self._coro.send(piece)
        except _NOT_JSON as e:
            error = e
        try:
            self._shallow.feed(self._events)
        finally:
            self._events.clear()
        if error is not None:
            # ijson's own text quotes the document: never pass it on.
            raise BadMessage("body is not valid JSON") from None


def parse_file(path: Path) -> Parsed:
    """``router.parse.parse`` for a body in a file, reading it as a stream (the same checks and
    order key as ``StreamParser``, in constant memory)."""
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
        return parser(ijson.parse(_Rewritten(f), use_float=True, buf_size=_BUF_SIZE))
    except (BadMessage, _Ambiguous):
        raise
    except _NOT_JSON:
        # ijson's own text quotes the document: never pass it on.
        raise BadMessage("body is not valid JSON") from None


def _parse_shallow(events: Iterator[tuple[str, str, Any]]) -> Parsed:
    """The pulling form of ``_Shallow``: all events of a document at once."""
    shallow = _Shallow()
    shallow.feed(events)
    return shallow.result()


class _Shallow:
    """The events that matter, picked out in C (see the comment above), fed as they come."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.ping: Any = None
        self.keys: dict[str, set[str]] = {"": set(), "meta": set()}
        self.ids: list[set[str]] = [set(), set(), set()]
        self.lists = {"patients": False, "users": False}
        self.root = False

    def feed(self, events: Iterable[tuple[str, str, Any]]) -> None:
        # A list (pushed pieces) is walked twice; an iterator (a whole file pulled) is teed.
        everything, probe = (events, events) if isinstance(events, list) else itertools.tee(events)
        wanted = map(_SHALLOW.__contains__, map(operator.itemgetter(0), probe))
        meta, keys, ids, lists = self.meta, self.keys, self.ids, self.lists
        for prefix, event, value in itertools.compress(everything, wanted):
            if not self.root:  # the first event of all: the root value
                if event != "start_map":
                    raise BadMessage("body must be a JSON object")
                self.root = True
            elif event == "map_key":
                value = _exact(value)
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
                    meta[prefix[5:]] = _exact(value) if isinstance(value, str) else value
            elif prefix == "ping":
                if event not in _CONTAINERS and event not in ("end_map", "end_array"):
                    self.ping = _exact(value) if isinstance(value, str) else value
            elif (
                prefix in _PATIENTS
                and isinstance(value, str)
                and (prefix == "payload.patientId" or lists[prefix.partition(".")[0]])
            ):
                ids[_PATIENTS[prefix]].add(_exact(value))

    def result(self) -> Parsed:
        if "meta" not in self.keys[""]:
            raise BadMessage("meta must be a JSON object")
        return from_meta(self.meta, self.ping, key_of(next((s for s in self.ids if s), set())))


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
            value = _exact(value)
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
            if isinstance(value, str):
                value = _exact(value)
            meta[str(at[1])] = {} if container else value  # a container is not a string
        elif at == ("ping",) and not container:
            ping = _exact(value) if isinstance(value, str) else value
        elif at in _PATHS and isinstance(value, str):
            ids[_PATHS[at]].add(_exact(value))
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
