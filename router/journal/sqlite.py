"""The embedded journal: one SQLite file, for one host (the default).

SQLite in WAL mode with ``synchronous=FULL``: a commit returns only after the write-ahead log is
fsync'd. All writes of a process go through one writer thread (``groupcommit``) that commits
whatever is queued as one transaction, so concurrent requests share one fsync, and a failed
commit fails every write of the batch (nothing half-stored). Reads run in worker threads on
their own connections, which WAL lets proceed beside the writer. Several processes may share
the file (``BEGIN IMMEDIATE`` waits for the other writers through the busy timeout): one
writer at a time means rows are allocated in commit order.

Tables: ``messages`` holds each message once (raw body bytes verbatim, the meta fields, receive
time, a duplicate counter); ``deliveries`` holds one row per (message, sink) with its state,
attempts, next-attempt time and its claim (``lease_owner``, ``lease_until``, ``token``);
``routers`` the processes working on the journal and their sinks.

A small body lives in the ``body`` column; a large one in a file under ``bodies/`` named by
``body_file`` (see ``router.spool``), removed with its message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from router import durable
from router.errors import JournalUnavailable
from router.journal.base import (
    DEFAULT_LEASE,
    FIRST_TOKEN,
    Appended,
    Claim,
    DeadLetter,
    Filter,
    Journal,
    JournalStatus,
    Outcome,
    RouterInfo,
    SinkCounts,
    StoredMessage,
    process_gone,
)
from router.journal.groupcommit import GroupCommit, Together
from router.logs import kv
from router.message import Message

log = logging.getLogger("router.journal")

SCHEMA_VERSION = 2
#: The writer connection's page cache, KiB (readers keep SQLite's default).
WRITER_CACHE_KIB = 16 * 1024
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
    -- (Spelled with OR: an IN list builds a table each time a row is checked.)
    state TEXT NOT NULL CHECK (state = 'pending' OR state = 'delivered' OR state = 'dead'),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    token INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (seq, sink)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (sink, next_attempt_at, seq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_order
    ON deliveries (sink, order_key, seq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (sink, seq) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS deliveries_leased
    ON deliveries (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_unrouted ON messages (seq) WHERE routed = 0;
CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS routers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    seen_at REAL NOT NULL,
    alive_until REAL NOT NULL,
    sinks TEXT NOT NULL
);
"""
#: Schema 1 → 2: claims and leases instead of in-memory in-flight sets.
_MIGRATE_1 = """
ALTER TABLE deliveries ADD COLUMN lease_owner TEXT;
ALTER TABLE deliveries ADD COLUMN lease_until REAL;
ALTER TABLE deliveries ADD COLUMN token INTEGER NOT NULL DEFAULT 0;
"""

#: The database's clock, in seconds since the epoch (one clock for every process on the file).
NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_FREE = "(d.lease_until IS NULL OR d.lease_until <= :now)"
# A lease runs from the database's clock, read in the statement rather than by one more
# statement per message (NULL + now is NULL: not claimed).
_INSERT_DELIVERY = f"""INSERT INTO deliveries (seq, sink, order_key, state, next_attempt_at,
    updated_at, lease_owner, lease_until, token)
    VALUES (?, ?, ?, 'pending', ?, ?, ?, ? + {NOW}, ?)"""  # noqa: S608
# The head of each order key: no earlier pending delivery to the same sink with the same key.
_HEAD = """NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.sink = d.sink
    AND e.order_key = d.order_key AND e.state = 'pending' AND e.seq < d.seq)"""
_CLAIM = f"""UPDATE deliveries SET lease_owner = :owner, lease_until = :now + :lease,
        token = token + 1
    WHERE sink = :sink AND seq IN (
        SELECT d.seq FROM deliveries d
        WHERE d.sink = :sink AND d.state = 'pending' AND d.next_attempt_at <= :now AND {_FREE}
        ORDER BY d.next_attempt_at, d.seq LIMIT :limit)
    RETURNING seq, attempts, token"""  # noqa: S608
_CLAIM_ORDERED = f"""UPDATE deliveries SET lease_owner = :owner, lease_until = :now + :lease,
        token = token + 1
    WHERE sink = :sink AND seq IN (
        SELECT d.seq FROM deliveries d
        WHERE d.sink = :sink AND d.state = 'pending' AND d.next_attempt_at <= :now AND {_FREE}
            AND {_HEAD}
        ORDER BY d.seq LIMIT :limit)
    RETURNING seq, attempts, token"""  # noqa: S608
# When something can be claimed: the earliest unleased due time, or the earliest lease end.
_NEXT_FREE = """SELECT next_attempt_at FROM deliveries
    WHERE sink = :sink AND state = 'pending' AND lease_until IS NULL
    ORDER BY next_attempt_at, seq LIMIT 1"""
_NEXT_LEASED = """SELECT min(max(next_attempt_at, lease_until)) FROM deliveries
    WHERE lease_owner IS NOT NULL AND sink = :sink AND state = 'pending'"""
_NEXT_ORDERED = f"""SELECT min(max(d.next_attempt_at, coalesce(d.lease_until, 0)))
    FROM deliveries d
    WHERE d.sink = :sink AND d.state = 'pending' AND {_HEAD}"""  # noqa: S608
_COUNTS = """SELECT d.sink, sum(d.attempts = 0), sum(d.attempts > 0), min(m.received_at),
        sum(d.lease_until > :now)
    FROM deliveries d JOIN messages m USING (seq)
    WHERE d.state = 'pending' GROUP BY d.sink"""
_HOLDERS = """SELECT DISTINCT sink, lease_owner FROM deliveries
    WHERE lease_owner IS NOT NULL AND lease_until > :now AND state = 'pending'"""
_BLOCKED = f"""SELECT count(*) FROM deliveries d
    WHERE d.sink = ? AND d.state = 'pending' AND d.attempts > 0 AND {_HEAD}"""  # noqa: S608


_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
#: Free pages given back to the file system per transaction after a sweep (4 KiB each).
VACUUM_PAGES = 500


def size_on_disk(directory: Path) -> int:
    """Bytes the journal in ``directory`` holds on disk: the database with its write-ahead log,
    and every body stored in ``bodies/`` (not the ``-shm`` index, which exists only while the
    file is open). ``status`` and the ``journal_bytes`` gauge both report this."""
    total = 0
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            if path.name.startswith("journal.sqlite3") and not path.name.endswith("-shm"):
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


#: The oldest SQLite the journal's statements run on (``RETURNING`` came in 3.35.0, 2021).
MIN_SQLITE = (3, 35, 0)


def _unsupported(conn: sqlite3.Connection) -> str | None:
    """Why the SQLite library this Python uses cannot hold the journal, if it cannot: too
    old, or built without its JSON functions. (Else the first message would fail to append,
    after the daemon had said it was ready.)"""
    found = sqlite3.sqlite_version_info
    if found < MIN_SQLITE:
        need = ".".join(map(str, MIN_SQLITE))
        return (
            f"SQLite {need} or newer is needed; this Python's sqlite3 module uses"
            f" {sqlite3.sqlite_version}: run webhook-router on a Python built against a newer"
            " SQLite (Debian 12 and Ubuntu 22.04 have one, as do the builds uv installs), or use"
            " journal.postgres"
        )
    try:
        conn.execute("SELECT count(*) FROM json_each('[1]')").fetchone()
    except sqlite3.OperationalError:
        return (
            f"the SQLite library this Python uses ({sqlite3.sqlite_version}) was built without"
            " its JSON functions (json_each): run webhook-router on a Python whose SQLite has"
            " them (3.38 and newer always do), or use journal.postgres"
        )
    return None


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


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Statement by statement (``executescript`` would commit the transaction first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


@dataclass(slots=True)  # read-only by convention: frozen costs a setattr per field
class _Append:
    """One message to store: its ``messages`` row, and its deliveries' rows but for ``seq``
    (order key, sink, received at, lease owner, lease length, token)."""

    row: tuple[Any, ...]
    deliveries: list[tuple[Any, ...]]
    claimed: tuple[str, ...]


def _append_one(append: _Append, conn: sqlite3.Connection) -> Appended:
    _, seq, duplicates = conn.execute(_insert_messages(1), append.row).fetchone()
    if duplicates:
        return Appended(seq, duplicate=True)
    _insert_deliveries(conn, _delivery_rows(seq, append))
    return Appended(seq, duplicate=False, claimed=append.claimed)


def _append_many(conn: sqlite3.Connection, appends: list[_Append]) -> list[Appended]:
    """What ``_append_one`` does for each, in two statements for the whole batch (a group
    commit's worth of messages): the per-statement cost was most of the writer thread's."""
    ids = [a.row[0] for a in appends]
    if len(set(ids)) != len(ids):  # one message twice in a batch: one at a time, in order
        return [_append_one(a, conn) for a in appends]
    params = [value for a in appends for value in a.row]
    # VALUES rows are inserted in their order, so seq keeps the order they were queued in.
    stored = {
        mid: (seq, duplicates)
        for mid, seq, duplicates in conn.execute(_insert_messages(len(appends)), params)
    }
    results: list[Appended] = []
    deliveries: list[tuple[Any, ...]] = []
    for a in appends:
        seq, duplicates = stored[a.row[0]]
        if duplicates:
            results.append(Appended(seq, duplicate=True))
        else:
            deliveries += _delivery_rows(seq, a)
            results.append(Appended(seq, duplicate=False, claimed=a.claimed))
    _insert_deliveries(conn, deliveries)
    return results


#: Delivery rows per INSERT statement (8 parameters each: well within SQLite's 32,766).
_DELIVERIES_PER_INSERT = 1000


def _insert_deliveries(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert delivery rows, many per statement: ``executemany`` runs the statement once per
    row, and each run has a fixed cost (a statement transaction, the state CHECK's table)
    about as large as the row's own."""
    for i in range(0, len(rows), _DELIVERIES_PER_INSERT):
        chunk = rows[i : i + _DELIVERIES_PER_INSERT]
        conn.execute(_insert_delivery_rows(len(chunk)), [v for row in chunk for v in row])


@functools.cache
def _insert_delivery_rows(rows: int) -> str:
    head, values = _INSERT_DELIVERY.split("VALUES")
    return f"{head}VALUES {', '.join([values.strip()] * rows)}"


def _delivery_rows(seq: int, append: _Append) -> list[tuple[Any, ...]]:
    return [
        (seq, sink, key, at, at, owner, lease, token)
        for key, sink, at, owner, lease, token in append.deliveries
    ]


@functools.cache
def _insert_messages(rows: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return f"""INSERT INTO messages (message_id, type, "when", request_id, received_at,
           body, body_file, body_size, routed, order_key)
       VALUES {values}
       ON CONFLICT (message_id) DO UPDATE
           SET duplicates = duplicates + 1, last_duplicate_at = excluded.received_at
       RETURNING message_id, seq, duplicates"""  # noqa: S608 (placeholders only)


def _now(conn: sqlite3.Connection) -> float:
    return float(conn.execute(f"SELECT {NOW}").fetchone()[0])


class SQLiteJournal(Journal):
    """The durable message and delivery store in one SQLite file. Open with ``await
    journal.open()``."""

    kind = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "journal.sqlite3"
        self._bodies = directory / "bodies"
        self._writer: GroupCommit | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        return self._writer is not None and self._writer.healthy

    @property
    def last_error(self) -> str | None:
        if self._writer is None:
            return "journal is not open"
        return None if self._writer.healthy else self._writer.last_error

    def describe(self) -> str:
        return str(self.path)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, *, maintenance: bool = True, create: bool = True) -> None:
        await anyio.to_thread.run_sync(self._open_sync, maintenance, create)
        self._writer = GroupCommit(self._conn, "journal-writer")

    def _open_sync(self, maintenance: bool = True, create: bool = True) -> None:
        if not create and not self.path.exists():
            raise JournalUnavailable(
                f"no journal at {self.path}: has `webhook-router serve` run with this"
                " configuration?"
            )
        with contextlib.closing(sqlite3.connect(":memory:")) as probe:
            if problem := _unsupported(probe):
                raise JournalUnavailable(f"cannot open journal {self.path}: {problem}")
        try:
            durable.make_dirs(self.directory)  # its entry on disk before any promise in it
            conn = _connect(self.path)
        except (sqlite3.Error, OSError) as e:
            raise JournalUnavailable(f"cannot open journal {self.path}: {e}{_damaged(e)}") from e
        try:
            if maintenance:
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
            if version < SCHEMA_VERSION:
                self._migrate(conn)
            if maintenance and conn.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL:
                self._migrate_auto_vacuum(conn)  # outside a transaction: VACUUM needs that
        except (sqlite3.Error, OSError, JournalUnavailable) as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()
            if isinstance(e, JournalUnavailable):
                raise
            raise JournalUnavailable(f"cannot open journal {self.path}: {e}{_damaged(e)}") from e
        if maintenance:
            try:
                self._remove_orphan_bodies(conn)
            except OSError as e:
                log.warning("could not clear unreferenced stored files: %s", e.strerror)
        # The writer's page cache: SQLite's default (2 MiB) is smaller than the indexes an
        # insert touches once a journal holds a few days of messages (message ids and patients
        # come in no order), and each miss is a read of the file.
        conn.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create the schema, or bring an older one up to date: one process at a time (the
        write lock), each step once (the version is read again under the lock)."""
        conn.execute("BEGIN IMMEDIATE")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 1:
            _run_script(conn, _MIGRATE_1)
            log.info("journal migrated from schema 1 to %d (claims and leases)", SCHEMA_VERSION)
        if version < SCHEMA_VERSION:
            _run_script(conn, _SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")

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
        return self._writer is not None and self._writer.alive()

    def _write(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        together: Together | None = None,
        arg: Any = None,
        *,
        durable: bool = True,
    ) -> asyncio.Future[Any]:
        """``fn`` in the writer's next batch (``GroupCommit.submit``): await the result."""
        if self._writer is None:
            raise JournalUnavailable("journal is not open")
        return self._writer.submit(fn, together, arg, durable=durable)

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

    # -- ingest ----------------------------------------------------------------------------

    async def append(
        self,
        message: Message,
        sinks: Sequence[str],
        *,
        claim_for: Collection[str] = (),
        owner: str = "",
        ordered: bool = False,
        lease: float = DEFAULT_LEASE,
    ) -> Appended:
        # One writer at a time on the file: rows are allocated in commit order already, so
        # ``ordered`` needs nothing more here.
        row = (
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
        )
        claimed = tuple(s for s in sinks if s in claim_for) if owner else ()
        at = message.received_at
        deliveries = [
            (message.order_key, sink, at, owner, lease, FIRST_TOKEN)
            if sink in claimed
            else (message.order_key, sink, at, None, None, 0)
            for sink in sinks
        ]
        append = _Append(row, deliveries, claimed)
        result: Appended = await self._write(
            functools.partial(_append_one, append), _append_many, append
        )
        return result

    def _relative(self, body_file: Path | None) -> str | None:
        if body_file is None:
            return None
        return str(body_file.relative_to(self.directory))

    @property
    def local_dir(self) -> Path:
        return self.directory

    @property
    def bodies(self) -> Path:
        """Where large bodies are stored, one file each (see ``router.spool``)."""
        return self._bodies

    def body_path(self, name: str) -> Path:
        return self.directory / name

    # -- delivery --------------------------------------------------------------------------

    async def claim(
        self, sink: str, owner: str, limit: int, *, ordered: bool, lease: float
    ) -> list[Claim]:
        sql = _CLAIM_ORDERED if ordered else _CLAIM

        def write(conn: sqlite3.Connection) -> list[Claim]:
            params = {"sink": sink, "owner": owner, "limit": limit, "lease": lease}
            params["now"] = _now(conn)
            rows = conn.execute(sql, params).fetchall()
            return [Claim(seq, attempts, token) for seq, attempts, token in sorted(rows)]

        # Not durable: a claim lost to a power failure is lost with every process holding
        # one (``GroupCommit.submit``).
        result: list[Claim] = await self._write(write, durable=False)
        return result

    async def record(self, outcomes: Iterable[Outcome]) -> int:
        # Outcomes alike but for their row (a batch delivered at once, most of the time) go in
        # one statement: SQLite does the per-row work in C, and the writer thread hands the
        # GIL back and forth once per statement, not once per row.
        alike: dict[tuple[str, str, int, float, str | None, int], list[int]] = {}
        for o in outcomes:
            key = (o.sink, o.state, o.attempts, o.delay, o.error, o.token)
            alike.setdefault(key, []).append(o.seq)
        if not alike:
            return 0

        def write(conn: sqlite3.Connection) -> int:
            now = _now(conn)
            stored = 0
            for (sink, state, attempts, delay, error, token), seqs in alike.items():
                stored += conn.execute(
                    "UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?,"
                    " last_error = ?, updated_at = ?, lease_owner = NULL, lease_until = NULL"
                    " WHERE sink = ? AND seq IN (SELECT value FROM json_each(?)) AND token = ?",
                    (state, attempts, now + delay, error, now, sink, json.dumps(seqs), token),
                ).rowcount
            return stored

        # Not durable: an outcome lost to a power failure means the delivery is made again.
        result: int = await self._write(write, durable=False)
        return result

    async def release(self, sink: str, claims: Iterable[Claim]) -> None:
        rows = [(sink, c.seq, c.token) for c in claims]
        if not rows:
            return

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL"
                " WHERE sink = ? AND seq = ? AND token = ? AND state = 'pending'",
                rows,
            )

        await self._write(write)

    async def renew(self, owner: str, lease: float, held: Mapping[str, Collection[int]]) -> None:
        rows = [(sink, json.dumps(sorted(seqs))) for sink, seqs in held.items() if seqs]

        def write(conn: sqlite3.Connection) -> None:
            now = _now(conn)
            conn.executemany(
                "UPDATE deliveries SET lease_until = ? WHERE lease_owner = ? AND sink = ?"
                " AND seq IN (SELECT value FROM json_each(?)) AND state = 'pending'",
                [(now + lease, owner, sink, seqs) for sink, seqs in rows],
            )
            conn.execute(
                "UPDATE routers SET seen_at = ?, alive_until = ? WHERE id = ?",
                (now, now + lease, owner),
            )

        await self._write(write)

    async def next_due_in(self, sink: str, *, ordered: bool) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            params = {"sink": sink}
            if ordered:
                found = [conn.execute(_NEXT_ORDERED, params).fetchone()]
            else:
                found = [
                    conn.execute(_NEXT_FREE, params).fetchone(),
                    conn.execute(_NEXT_LEASED, params).fetchone(),
                ]
            times = [row[0] for row in found if row is not None and row[0] is not None]
            return None if not times else max(0.0, min(times) - _now(conn))

        result: float | None = await self._read(read)
        return result

    async def messages(self, seqs: Sequence[int]) -> dict[int, Message]:
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

    # -- maintenance -----------------------------------------------------------------------

    async def register(self, router: RouterInfo, lease: float) -> None:
        def write(conn: sqlite3.Connection) -> None:
            now = _now(conn)
            gone = [
                rid
                for rid, pid in conn.execute(
                    "SELECT id, pid FROM routers WHERE host = ? AND id != ?",
                    (router.host, router.id),
                )
                if process_gone(pid)
            ]
            for rid in gone:
                _forget(conn, rid)
            conn.execute(
                """INSERT INTO routers (id, host, pid, started_at, seen_at, alive_until, sinks)
                   VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at,
                       alive_until = excluded.alive_until, sinks = excluded.sinks""",
                (
                    router.id,
                    router.host,
                    router.pid,
                    now,
                    now,
                    now + lease,
                    json.dumps(router.sinks),
                ),
            )
            # Routers not seen for a day are history.
            conn.execute("DELETE FROM routers WHERE alive_until < ?", (now - 86400,))

        await self._write(write)

    async def unregister(self, router_id: str) -> None:
        await self._write(lambda conn: _forget(conn, router_id))

    async def dead_letter_orphaned(self, sinks: Collection[str], reason: str) -> dict[str, int]:
        def write(conn: sqlite3.Connection) -> dict[str, int]:
            now = _now(conn)
            known = set(sinks)
            for (names,) in conn.execute("SELECT sinks FROM routers WHERE alive_until > ?", (now,)):
                known.update(json.loads(names))
            names = sorted(known)
            marks = ",".join("?" * len(names))
            found = dict(
                conn.execute(
                    f"SELECT sink, count(*) FROM deliveries WHERE state = 'pending'"  # noqa: S608
                    f" AND sink NOT IN ({marks}) GROUP BY sink",
                    names,
                ).fetchall()
            )
            if found:
                conn.execute(
                    f"UPDATE deliveries SET state = 'dead', last_error = ?, updated_at = ?,"  # noqa: S608
                    f" lease_owner = NULL, lease_until = NULL"
                    f" WHERE state = 'pending' AND sink NOT IN ({marks})",
                    [reason, now, *names],
                )
            return found

        result: dict[str, int] = await self._write(write)
        return result

    async def sink_counts(self) -> dict[str, SinkCounts]:
        result: dict[str, SinkCounts] = await self._read(_sink_counts)
        return result

    async def size_bytes(self) -> int:
        return await anyio.to_thread.run_sync(self._size_bytes)

    def _size_bytes(self) -> int:
        return size_on_disk(self.directory)

    async def sweep(self, retention: float, now: float | None = None, batch: int = 1000) -> int:
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
            # Shielded: a queued delete commits even if the sweep is cancelled (a shutdown),
            # and its files must then go too, or nothing refers to them any more. Only after
            # the commit: a crash before it keeps both row and file.
            with anyio.CancelScope(shield=True):
                count, files = await self._write(write)
                await anyio.to_thread.run_sync(self._unlink, files)
            await anyio.lowlevel.checkpoint()  # a cancellation lands between batches
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
        committing its message (which was then never answered 200). Files still being
        received by another process on the file (``incoming-*``) are left alone while fresh."""
        if not self.bodies.is_dir():
            return
        # IS NOT NULL: a bare ``WHERE body_file`` reads the text as a number (0: false).
        kept = {
            row[0]
            for row in conn.execute("SELECT body_file FROM messages WHERE body_file IS NOT NULL")
        }
        young = time.time() - 3600
        for path in self.bodies.iterdir():
            if f"bodies/{path.name}" in kept:
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < young or not _others_alive(conn):
                    path.unlink()

    # -- coordination between routers ------------------------------------------------------

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            now = _now(conn)
            row = conn.execute(
                """INSERT INTO locks (name, owner, until) VALUES (?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,
                       until = excluded.until
                   WHERE locks.owner = excluded.owner OR locks.until <= ?
                   RETURNING owner""",
                (name, owner, now + ttl, now),
            ).fetchone()
            return row is not None

        result: bool = await self._write(write)
        return result

    async def unlock(self, name: str, owner: str) -> None:
        await self._write(
            lambda conn: conn.execute(
                "DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner)
            )
        )

    async def get_state(self, key: str) -> tuple[str, float] | None:
        def read(conn: sqlite3.Connection) -> tuple[str, float] | None:
            row = conn.execute(
                "SELECT value, updated_at FROM state WHERE key = ?", (key,)
            ).fetchone()
            return None if row is None else (row[0], row[1])

        result: tuple[str, float] | None = await self._read(read)
        return result

    async def set_state(self, key: str, value: str) -> None:
        await self._write(
            lambda conn: conn.execute(
                f"""INSERT INTO state (key, value, updated_at) VALUES (?, ?, {NOW})
                    ON CONFLICT (key) DO UPDATE SET value = excluded.value,
                        updated_at = excluded.updated_at""",  # noqa: S608
                (key, value),
            )
        )

    # -- operator --------------------------------------------------------------------------

    async def status(self, ordered: Collection[str] = ()) -> JournalStatus:
        def read(conn: sqlite3.Connection) -> JournalStatus:
            counts = _sink_counts(conn, ordered)
            # SQLite takes the bare column from the row holding max(): the latest error.
            errors = {
                sink: error
                for sink, error, _ in conn.execute(
                    """SELECT sink, last_error, max(updated_at) FROM deliveries
                       WHERE state IN ('pending', 'dead') AND last_error IS NOT NULL
                       GROUP BY sink"""
                )
            }
            messages, unrouted, duplicates = conn.execute(
                "SELECT count(*), coalesce(sum(routed = 0), 0), coalesce(sum(duplicates), 0)"
                " FROM messages"
            ).fetchone()
            routers = [
                (RouterInfo(rid, host, pid, tuple(json.loads(sinks))), seen)
                for rid, host, pid, sinks, seen in conn.execute(
                    "SELECT id, host, pid, sinks, seen_at FROM routers WHERE alive_until > ?"
                    " ORDER BY started_at",
                    (_now(conn),),
                )
            ]
            return JournalStatus(messages, unrouted, duplicates, 0, counts, errors, routers)

        result: JournalStatus = await self._read(read)
        size = await self.size_bytes()
        return JournalStatus(
            result.messages,
            result.unrouted,
            result.duplicates,
            size,
            result.sinks,
            result.last_errors,
            result.routers,
        )

    async def dead_letters(self, where: Filter) -> list[DeadLetter]:
        clauses, params = ["d.state = 'dead'"], []
        if where.sinks:
            clauses.append(f"d.sink IN ({','.join('?' * len(where.sinks))})")
            params += list(where.sinks)
        if where.ids:
            clauses.append(f"m.message_id IN ({','.join('?' * len(where.ids))})")
            params += list(where.ids)

        def read(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows = conn.execute(
                f"""SELECT d.seq, m.message_id, m.type, d.sink, d.attempts, d.updated_at,
                           d.last_error
                    FROM deliveries d JOIN messages m USING (seq)
                    WHERE {" AND ".join(clauses)} ORDER BY d.updated_at, d.seq""",  # noqa: S608
                params,
            ).fetchall()
            return [DeadLetter(*row) for row in rows]

        result: list[DeadLetter] = await self._read(read)
        return result

    async def retry_dead(self, letters: Sequence[DeadLetter]) -> None:
        for i in range(0, len(letters), 1000):
            rows = [(d.seq, d.sink) for d in letters[i : i + 1000]]

            def write(conn: sqlite3.Connection, rows: list[tuple[int, str]] = rows) -> None:
                now = _now(conn)
                conn.executemany(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                    " last_error = NULL, updated_at = ? WHERE seq = ? AND sink = ?"
                    " AND state = 'dead'",
                    [(now, now, seq, sink) for seq, sink in rows],
                )

            await self._write(write)

    async def purge_dead(self, letters: Sequence[DeadLetter]) -> None:
        for i in range(0, len(letters), 1000):
            rows = [(d.seq, d.sink) for d in letters[i : i + 1000]]

            def write(conn: sqlite3.Connection, rows: list[tuple[int, str]] = rows) -> None:
                conn.executemany(
                    "DELETE FROM deliveries WHERE seq = ? AND sink = ? AND state = 'dead'", rows
                )

            await self._write(write)

    async def stored_messages(self, since: float, until: float) -> list[StoredMessage]:
        def read(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute(
                "SELECT seq, type, order_key FROM messages"
                " WHERE received_at >= ? AND received_at < ? ORDER BY seq",
                (since, until),
            ).fetchall()
            return [StoredMessage(*row) for row in rows]

        result: list[StoredMessage] = await self._read(read)
        return result

    async def redeliver(self, chosen: Sequence[tuple[StoredMessage, Sequence[str]]]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            now = _now(conn)
            conn.executemany(
                """INSERT INTO deliveries (seq, sink, order_key, state, attempts,
                       next_attempt_at, updated_at)
                   VALUES (?, ?, ?, 'pending', 0, ?, ?)
                   ON CONFLICT (seq, sink) DO UPDATE SET state = 'pending', attempts = 0,
                       next_attempt_at = excluded.next_attempt_at, last_error = NULL,
                       updated_at = excluded.updated_at""",
                [(m.seq, sink, m.order_key, now, now) for m, sinks in chosen for sink in sinks],
            )
            conn.executemany(
                "UPDATE messages SET routed = 1 WHERE seq = ?",
                [(m.seq,) for m, sinks in chosen if sinks],
            )

        await self._write(write)


def _sink_counts(conn: sqlite3.Connection, ordered: Collection[str] = ()) -> dict[str, SinkCounts]:
    """Pending, retrying, dead and leased counts, the oldest pending receipt time, the lease
    holders and the blocked ordered lanes, per sink."""
    now = _now(conn)
    counts: dict[str, dict[str, Any]] = {}

    def entry(sink: str) -> dict[str, Any]:
        return counts.setdefault(
            sink,
            {"pending": 0, "retrying": 0, "dead": 0, "oldest_pending_at": None, "leased": 0},
        )

    for sink, fresh, retrying, oldest, leased in conn.execute(_COUNTS, {"now": now}):
        entry(sink).update(
            pending=fresh, retrying=retrying, oldest_pending_at=oldest, leased=leased or 0
        )
    for sink, dead in conn.execute(
        "SELECT sink, count(*) FROM deliveries WHERE state = 'dead' GROUP BY sink"
    ):
        entry(sink)["dead"] = dead
    holders: dict[str, list[str]] = {}
    for sink, owner in conn.execute(_HOLDERS, {"now": now}):
        holders.setdefault(sink, []).append(owner)
    blocked = {sink: conn.execute(_BLOCKED, (sink,)).fetchone()[0] for sink in ordered}
    return {
        sink: SinkCounts(
            **values,
            holders=tuple(sorted(holders.get(sink, ()))),
            blocked_lanes=blocked.get(sink, 0),
        )
        for sink, values in counts.items()
    }


def _forget(conn: sqlite3.Connection, router_id: str) -> None:
    conn.execute(
        "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
        (router_id,),
    )
    conn.execute("DELETE FROM routers WHERE id = ?", (router_id,))


def _others_alive(conn: sqlite3.Connection) -> bool:
    """Whether another live process works on this journal file."""
    me = os.getpid()
    host = socket.gethostname()
    return any(
        not (h == host and pid == me) and not (h == host and process_gone(pid))
        for h, pid in conn.execute(
            f"SELECT host, pid FROM routers WHERE alive_until > {NOW}"  # noqa: S608
        )
    )
