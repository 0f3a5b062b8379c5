"""The journal: the durable store that is the router's source of truth.

SQLite in WAL mode with ``synchronous=FULL``: a commit returns only after the write-ahead log is
fsync'd. All writes go through one writer thread (``router.groupcommit``) that commits whatever
is queued as one transaction, so concurrent requests share one fsync, and a failed commit fails
every write of the batch (nothing half-stored). Reads run in worker threads on their own
connections, which WAL lets proceed beside the writer.

Tables: ``messages`` holds each message once (raw body bytes verbatim, the meta fields, receive
time, a duplicate counter); ``deliveries`` holds one row per (message, sink), created in the same
transaction as the message from the routes in force at that moment, with its state, attempt count
and persisted next-attempt time. A pending delivery is resumed after any restart.

A small body lives in the ``body`` column; a large one in a file under ``bodies/`` named by
``body_file`` (see ``router.spool``), removed with its message.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread

from router import durable
from router.errors import JournalUnavailable
from router.groupcommit import GroupCommit
from router.logs import kv
from router.message import Message

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    "when" TEXT,
    request_id TEXT,
    received_at REAL NOT NULL,
    body BLOB,
    body_file TEXT,
    body_size INTEGER NOT NULL,
    routed INTEGER NOT NULL,
    order_key TEXT NOT NULL DEFAULT '',
    duplicates INTEGER NOT NULL DEFAULT 0,
    last_duplicate_at REAL
);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER NOT NULL REFERENCES messages(seq) ON DELETE CASCADE,
    sink TEXT NOT NULL,
    order_key TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (seq, sink)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (sink, next_attempt_at, seq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_order
    ON deliveries (sink, order_key, seq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (sink, seq) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS messages_unrouted ON messages (seq) WHERE routed = 0;
CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at);
"""

_DUE = """SELECT seq, attempts FROM deliveries
    WHERE sink = ? AND state = 'pending' AND next_attempt_at <= ?
    ORDER BY next_attempt_at, seq LIMIT ?"""
_NEXT = """SELECT seq, next_attempt_at FROM deliveries WHERE sink = ? AND state = 'pending'
    ORDER BY next_attempt_at, seq LIMIT ?"""
# The head of each order key: no earlier pending delivery to the same sink with the same key.
_HEAD = """NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.sink = d.sink
    AND e.order_key = d.order_key AND e.state = 'pending' AND e.seq < d.seq)"""
_ORDERED_DUE = f"""SELECT seq, attempts FROM deliveries d
    WHERE sink = ? AND state = 'pending' AND next_attempt_at <= ? AND {_HEAD}
    ORDER BY seq LIMIT ?"""  # noqa: S608
_ORDERED_NEXT = f"""SELECT seq, next_attempt_at FROM deliveries d
    WHERE sink = ? AND state = 'pending' AND {_HEAD}
    ORDER BY next_attempt_at, seq LIMIT ?"""  # noqa: S608

DeliveryState = Literal["pending", "delivered", "dead"]


@dataclass(frozen=True, slots=True)
class Appended:
    """What ``Journal.append`` did: ``seq`` is the message's row; ``duplicate`` means the
    message id was already stored, so nothing new will be delivered."""

    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Due:
    """A pending delivery that is due: message row and the attempts made so far."""

    seq: int
    attempts: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """The new state of one delivery after an attempt."""

    seq: int
    sink: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float = 0.0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SinkCounts:
    pending: int  # never attempted yet
    retrying: int  # attempted, waiting for the next attempt
    dead: int
    oldest_pending_at: float | None


def sink_counts(conn: sqlite3.Connection) -> dict[str, SinkCounts]:
    """Pending, retrying and dead counts and the oldest pending receipt time, per sink."""
    counts: dict[str, list[Any]] = {}
    for sink, fresh, retrying, oldest in conn.execute(
        """SELECT d.sink, sum(d.attempts = 0), sum(d.attempts > 0), min(m.received_at)
           FROM deliveries d JOIN messages m USING (seq)
           WHERE d.state = 'pending' GROUP BY d.sink"""
    ):
        counts[sink] = [fresh, retrying, 0, oldest]
    for sink, dead in conn.execute(
        "SELECT sink, count(*) FROM deliveries WHERE state = 'dead' GROUP BY sink"
    ):
        counts.setdefault(sink, [0, 0, 0, None])[2] = dead
    return {sink: SinkCounts(*values) for sink, values in counts.items()}


_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
#: Free pages given back to the file system per transaction after a sweep (4 KiB each).
VACUUM_PAGES = 500


def size_on_disk(directory: Path) -> int:
    """Bytes the journal in ``directory`` holds on disk: the database with its write-ahead log
    and shared-memory file, and every body stored in ``bodies/``. ``status`` and the
    ``journal_bytes`` gauge both report this."""
    total = 0
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            if path.name.startswith("journal.sqlite3"):
                with contextlib.suppress(OSError):
                    total += path.stat().st_size
    with contextlib.suppress(OSError):
        for path in (directory / "bodies").iterdir():
            with contextlib.suppress(OSError):
                total += path.stat().st_size
    return total


#: What the error for a damaged journal file tells the operator to do.
RECOVERY = (
    "stop, move the journal folder aside and rebuild it with `sqlite3 DAMAGED .recover | sqlite3"
    ' NEW` (or .dump): see "Recovering a damaged journal" in the README'
)


def _damaged(e: BaseException) -> str:
    """The way out, when SQLite reports the file as damaged or not a database."""
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF
    return f": the file is damaged, {RECOVERY}" if code in (11, 26) else ""  # CORRUPT, NOTADB


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    # First: SQLite takes auto_vacuum only before the file's first page is written, and the
    # switch to WAL writes it. Only on a new file: on an existing one the pragma writes the
    # header, and a damaged file must be left as it was found.
    if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class Journal:
    """The durable message and delivery store. Open with ``await journal.open()``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "journal.sqlite3"
        self._writer: GroupCommit | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        """Whether the last commit succeeded (False before open and after close)."""
        return self._writer is not None and self._writer.healthy

    @property
    def last_error(self) -> str | None:
        return None if self._writer is None else self._writer.last_error

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open_sync)
        self._writer = GroupCommit(self._conn, "journal-writer")

    def _open_sync(self) -> None:
        try:
            durable.make_dirs(self.directory)  # its entry on disk before any promise in it
            conn = _connect(self.path)
        except (sqlite3.Error, OSError) as e:
            raise JournalUnavailable(f"cannot open journal {self.path}: {e}{_damaged(e)}") from e
        try:
            self.path.chmod(0o600)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalUnavailable(
                    f"journal {self.path} has schema {version}, newer than this version "
                    f"understands ({SCHEMA_VERSION}): upgrade webhook-router"
                )
            # Checked before anything is written, so a damaged file is left as it was found.
            check = " ".join(conn.execute("PRAGMA quick_check").fetchone()[0].split())
            if check != "ok":
                raise JournalUnavailable(f"journal {self.path} is damaged: {check}; {RECOVERY}")
            if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL:
                self._migrate_auto_vacuum(conn)
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.Error, OSError, JournalUnavailable) as e:
            conn.close()
            if isinstance(e, JournalUnavailable):
                raise
            raise JournalUnavailable(f"cannot open journal {self.path}: {e}{_damaged(e)}") from e
        try:
            self._remove_orphan_bodies(conn)
        except OSError as e:
            log.warning("could not clear unreferenced stored files: %s", e.strerror)
        self._conn = conn

    def _migrate_auto_vacuum(self, conn: sqlite3.Connection) -> None:
        """Journals made by earlier versions have no auto_vacuum (the switch to WAL came first),
        so retention never gave space back. One VACUUM rewrites the file with it; it needs free
        space about the database's size, and a failure leaves the journal as it was (it keeps
        working, without giving space back; the next start tries again)."""
        before = size_on_disk(self.directory)
        log.warning(kv("journal-vacuum", reason="enabling auto_vacuum", bytes=before))
        started = time.monotonic()
        try:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # what the VACUUM then applies
            conn.execute("VACUUM")
        except sqlite3.Error as e:
            log.error(kv("journal-vacuum-failed", error=str(e)))
            return
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log.warning(
            kv(
                "journal-vacuumed",
                bytes=size_on_disk(self.directory),
                seconds=round(time.monotonic() - started, 3),
            )
        )

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        with self._readers_lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
        self._local = threading.local()
        if hasattr(self, "_conn"):
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("journal checkpoint at close failed: %s", e)
            self._conn.close()
            del self._conn

    def alive(self) -> bool:
        """Whether the writer thread runs (for the systemd watchdog)."""
        return self._writer is not None and self._writer.alive()

    async def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._writer is None:
            raise JournalUnavailable("journal is not open")
        return await self._writer.submit(fn)

    # -- reads -----------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def run() -> Any:
            try:
                return fn(self._reader())
            except sqlite3.Error as e:
                raise JournalUnavailable(f"journal read failed: {e}") from e

        return await anyio.to_thread.run_sync(run)

    # -- the operations --------------------------------------------------------------------

    async def append(self, message: Message, sinks: Sequence[str]) -> Appended:
        """Store a message and its pending deliveries; return once durable.

        A message id already stored is counted as a duplicate and creates no delivery.
        """

        def write(conn: sqlite3.Connection) -> Appended:
            seq, duplicates = conn.execute(
                """INSERT INTO messages (message_id, type, "when", request_id, received_at,
                       body, body_file, body_size, routed, order_key)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (message_id) DO UPDATE
                       SET duplicates = duplicates + 1, last_duplicate_at = excluded.received_at
                   RETURNING seq, duplicates""",
                (
                    message.message_id,
                    message.type,
                    message.when,
                    message.request_id,
                    message.received_at,
                    message.body if message.in_memory else None,
                    self._relative(message.body_file),
                    message.body_size,
                    1 if sinks else 0,
                    message.order_key,
                ),
            ).fetchone()
            if duplicates:
                return Appended(seq, duplicate=True)
            conn.executemany(
                "INSERT INTO deliveries (seq, sink, order_key, state, next_attempt_at, updated_at)"
                " VALUES (?, ?, ?, 'pending', ?, ?)",
                [
                    (seq, sink, message.order_key, message.received_at, message.received_at)
                    for sink in sinks
                ],
            )
            return Appended(seq, duplicate=False)

        result: Appended = await self._write(write)
        return result

    def _relative(self, body_file: Path | None) -> str | None:
        if body_file is None:
            return None
        return str(body_file.relative_to(self.directory))

    @functools.cached_property
    def bodies(self) -> Path:
        """Where large bodies are stored, one file each (see ``router.spool``)."""
        return self.directory / "bodies"

    async def record(self, outcomes: Iterable[Outcome]) -> None:
        """Store the result of delivery attempts."""
        now = time.time()
        # Outcomes alike but for their row (a batch delivered at once, most of the time) go in
        # one statement: SQLite does the per-row work in C, and the writer thread hands the
        # GIL back and forth once per statement, not once per row.
        alike: dict[tuple[str, str, int, float | None, str | None], list[int]] = {}
        for o in outcomes:
            alike.setdefault((o.sink, o.state, o.attempts, o.next_attempt_at, o.error), []).append(
                o.seq
            )
        rows = [
            (state, attempts, next_at, error, now, sink, json.dumps(seqs))
            for (sink, state, attempts, next_at, error), seqs in alike.items()
        ]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?,"
                " last_error = ?, updated_at = ?"
                " WHERE sink = ? AND seq IN (SELECT value FROM json_each(?))",
                rows,
            )

        await self._write(write)

    async def dead_letter_sinks_not_in(self, sinks: Collection[str], reason: str) -> dict[str, int]:
        """Dead-letter pending deliveries to sinks that are no longer configured."""
        names = sorted(sinks)
        now = time.time()

        def write(conn: sqlite3.Connection) -> dict[str, int]:
            marks = ",".join("?" * len(names))
            found = dict(
                conn.execute(
                    f"SELECT sink, count(*) FROM deliveries WHERE state = 'pending'"  # noqa: S608
                    f" AND sink NOT IN ({marks}) GROUP BY sink",
                    names,
                ).fetchall()
            )
            conn.execute(
                f"UPDATE deliveries SET state = 'dead', last_error = ?, updated_at = ?"  # noqa: S608
                f" WHERE state = 'pending' AND sink NOT IN ({marks})",
                [reason, now, *names],
            )
            return found

        result: dict[str, int] = await self._write(write)
        return result

    async def due(
        self, sink: str, now: float, limit: int, exclude: Collection[int], ordered: bool = False
    ) -> list[Due]:
        """Pending deliveries to ``sink`` due at ``now``, skipping ``exclude``.

        Unordered: oldest due first. Ordered: only the earliest pending delivery of each order
        key (a later message about the same patient waits until the earlier one is delivered or
        dead-lettered), in receipt order."""

        def read(conn: sqlite3.Connection) -> list[Due]:
            rows = conn.execute(
                _ORDERED_DUE if ordered else _DUE, (sink, now, limit + len(exclude))
            ).fetchall()
            return [Due(seq, attempts) for seq, attempts in rows if seq not in exclude][:limit]

        result: list[Due] = await self._read(read)
        return result

    async def next_due_at(
        self, sink: str, exclude: Collection[int], ordered: bool = False
    ) -> float | None:
        """When the earliest pending delivery to ``sink`` outside ``exclude`` falls due (for an
        ordered sink, among those not waiting behind an earlier one)."""

        def read(conn: sqlite3.Connection) -> float | None:
            rows = conn.execute(
                _ORDERED_NEXT if ordered else _NEXT, (sink, len(exclude) + 1)
            ).fetchall()
            return next((at for seq, at in rows if seq not in exclude), None)

        result: float | None = await self._read(read)
        return result

    async def messages(self, seqs: Sequence[int]) -> dict[int, Message]:
        """Load messages (with bodies) by row."""

        def read(conn: sqlite3.Connection) -> dict[int, Message]:
            marks = ",".join("?" * len(seqs))
            rows = conn.execute(
                f"""SELECT seq, message_id, type, "when", request_id, received_at, body,
                           body_file, order_key, body_size
                    FROM messages WHERE seq IN ({marks})""",  # noqa: S608
                list(seqs),
            ).fetchall()
            found = {}
            for seq, mid, type_, when, request_id, received_at, body, body_file, key, size in rows:
                found[seq] = Message(
                    mid,
                    type_,
                    when,
                    None if body is None else bytes(body),
                    received_at,
                    request_id,
                    order_key=key,
                    body_file=None if body_file is None else self.directory / body_file,
                    body_size=size,
                )
            return found

        result: dict[int, Message] = await self._read(read)
        return result

    async def sink_counts(self) -> dict[str, SinkCounts]:
        """Pending, retrying and dead counts and the oldest pending receipt time, per sink.
        Reads only undelivered rows (partial indexes), so it stays cheap on a large journal."""
        result: dict[str, SinkCounts] = await self._read(sink_counts)
        return result

    async def unrouted_count(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT count(*) FROM messages WHERE routed = 0").fetchone()
            return int(row[0])

        result: int = await self._read(read)
        return result

    def size_bytes(self) -> int:
        """The journal's size on disk (see ``size_on_disk``)."""
        return size_on_disk(self.directory)

    async def sweep(self, retention: float, now: float | None = None, batch: int = 1000) -> int:
        """Remove messages older than ``retention`` whose every delivery is done; return how
        many. Dead letters and unrouted messages are kept. Works in small transactions so
        requests are never held up for long."""
        cutoff = (time.time() if now is None else now) - retention
        removed = 0
        while True:

            def write(conn: sqlite3.Connection) -> tuple[int, list[str]]:
                rows = conn.execute(
                    """SELECT m.seq, m.body_file FROM messages m
                       WHERE m.received_at < ? AND m.routed = 1 AND NOT EXISTS (
                           SELECT 1 FROM deliveries d
                           WHERE d.seq = m.seq AND d.state != 'delivered')
                       ORDER BY m.seq LIMIT ?""",
                    (cutoff, batch),
                ).fetchall()
                seqs = [seq for seq, _ in rows]
                marks = ",".join("?" * len(seqs))
                conn.execute(f"DELETE FROM deliveries WHERE seq IN ({marks})", seqs)  # noqa: S608
                conn.execute(f"DELETE FROM messages WHERE seq IN ({marks})", seqs)  # noqa: S608
                return len(seqs), [name for _, name in rows if name]

            count: int
            files: list[str]
            count, files = await self._write(write)
            # Only after the commit: a crash before it keeps both row and file.
            await anyio.to_thread.run_sync(self._unlink, files)
            removed += count
            if count < batch:
                break
        if removed:
            await self._give_space_back()
        return removed

    async def _give_space_back(self) -> None:
        """Hand the pages the sweep freed back to the file system (``auto_vacuum=INCREMENTAL``;
        the file shrinks at the next checkpoint), ``VACUUM_PAGES`` per transaction so that
        requests are never held up for long. Python's sqlite3 steps a statement that returns
        no rows once, and each step of ``incremental_vacuum`` frees one page: hence the loop."""

        def write(conn: sqlite3.Connection) -> tuple[int, int]:
            free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            for _ in range(min(free, VACUUM_PAGES)):
                conn.execute("PRAGMA incremental_vacuum")
            return free, int(conn.execute("PRAGMA freelist_count").fetchone()[0])

        while True:
            before, after = await self._write(write)
            if after == 0 or after >= before:  # all given back, or auto_vacuum is off
                break

    def _unlink(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()

    def _remove_orphan_bodies(self, conn: sqlite3.Connection) -> None:
        """Body files no message refers to: left by a crash between storing a large body and
        committing its message (which was then never answered 200)."""
        if not self.bodies.is_dir():
            return
        # IS NOT NULL: a bare ``WHERE body_file`` reads the text as a number (0: false).
        kept = {
            row[0]
            for row in conn.execute("SELECT body_file FROM messages WHERE body_file IS NOT NULL")
        }
        for path in self.bodies.iterdir():
            if f"bodies/{path.name}" not in kept:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    async def ping(self) -> None:
        """Prove the journal can commit a transaction (for readiness)."""
        await self._write(lambda conn: conn.execute("SELECT 1"))
