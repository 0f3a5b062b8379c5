"""The shared journal: PostgreSQL, for several routers (hosts or workers) on one database.

The same contract as the SQLite journal (``router.journal.base``), for routers that share it:

- **Durable before 200**: every write batch runs in one transaction with ``SET LOCAL
  synchronous_commit = on`` and returns only after COMMIT. Writes queue for one writer task per
  router (group commit: concurrent requests share one transaction and one WAL flush). A batch
  whose commit fails fails every write in it; a write that fails alone is retried in a
  savepoint so that only it fails. A deadlock or serialization failure between routers retries
  the batch.
- **Dedupe across routers**: a unique index on ``message_id``. ``INSERT … ON CONFLICT DO UPDATE``
  waits for another router's uncommitted insert of the same id, and the duplicate's answer comes
  only after its own commit: both answers are backed by a durable row.
- **Commit order for ordered sinks**: rows come from a sequence, so with several writers id 101
  can commit before id 100. A message routed to an ordered sink takes a transaction-scoped
  advisory lock on its order key before its row is allocated (all of a batch's keys, sorted, so
  two batches cannot deadlock): one patient's rows are then allocated in commit order.
- **Claims**: ``FOR UPDATE SKIP LOCKED`` in a CTE, then ``UPDATE … RETURNING``; deadlines from the
  database's clock (``clock_timestamp()``).
- **Large bodies** are stored in ``wr_bodies`` in 1 MiB parts (uploaded from the spool file in
  their own transaction before the message row commits; an unreferenced upload is removed by
  the sweep) and streamed back part by part into a local cache file for the sinks.
- **Wake-ups**: after a commit that left deliveries for other routers to claim, a ``NOTIFY``
  names their sinks (at most one per 50 ms per router); every router LISTENs and wakes those
  runners. A hint only: runners also poll. ``listen: false`` (PgBouncer transaction pooling)
  polls only, and turns prepared statements off.
- **Unavailable**: a database that cannot be reached or is read-only makes writes raise
  ``JournalUnavailable`` (503), and the pool reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import psycopg
import psycopg.errors
from psycopg_pool import AsyncConnectionPool

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
from router.message import Message

if TYPE_CHECKING:
    from router.config import PostgresConfig

log = logging.getLogger("router.journal")

SCHEMA_VERSION = 1
#: The advisory lock that lets one router at a time create or migrate the schema.
_MIGRATION_LOCK = 0x77725F6D6967  # "wr_mig"
#: The NOTIFY channel.
CHANNEL = "wr_wake"
#: Large bodies are stored and read in parts of this size.
PART = 1024 * 1024
#: At most one wake-up NOTIFY per this many seconds per router.
NOTIFY_EVERY = 0.05
_RETRY_BATCH = {"40P01", "40001"}  # deadlock, serialization failure

NOW = "extract(epoch from clock_timestamp())"

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS wr_schema (version integer NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS wr_messages (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        message_id text NOT NULL UNIQUE,
        type text NOT NULL,
        "when" text,
        request_id text,
        received_at double precision NOT NULL,
        body bytea,
        body_id text,
        body_size bigint NOT NULL,
        routed boolean NOT NULL,
        order_key text NOT NULL DEFAULT '',
        duplicates integer NOT NULL DEFAULT 0,
        last_duplicate_at double precision
    )""",
    """CREATE TABLE IF NOT EXISTS wr_deliveries (
        seq bigint NOT NULL REFERENCES wr_messages(seq) ON DELETE CASCADE,
        sink text NOT NULL,
        order_key text NOT NULL DEFAULT '',
        state text NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        last_error text,
        updated_at double precision NOT NULL,
        lease_owner text,
        lease_until double precision,
        token bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (seq, sink)
    ) WITH (fillfactor = 80)""",
    """CREATE INDEX IF NOT EXISTS wr_deliveries_due
        ON wr_deliveries (sink, next_attempt_at, seq) WHERE state = 'pending'""",
    """CREATE INDEX IF NOT EXISTS wr_deliveries_order
        ON wr_deliveries (sink, order_key, seq) WHERE state = 'pending'""",
    """CREATE INDEX IF NOT EXISTS wr_deliveries_dead
        ON wr_deliveries (sink, seq) WHERE state = 'dead'""",
    """CREATE INDEX IF NOT EXISTS wr_deliveries_leased
        ON wr_deliveries (lease_owner) WHERE lease_owner IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS wr_messages_unrouted ON wr_messages (seq) WHERE NOT routed""",
    """CREATE INDEX IF NOT EXISTS wr_messages_received ON wr_messages (received_at)""",
    """CREATE TABLE IF NOT EXISTS wr_bodies (
        body_id text NOT NULL,
        part integer NOT NULL,
        data bytea NOT NULL,
        stored_at double precision NOT NULL,
        PRIMARY KEY (body_id, part)
    )""",
    """CREATE TABLE IF NOT EXISTS wr_locks (
        name text PRIMARY KEY,
        owner text NOT NULL,
        until double precision NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS wr_state (
        key text PRIMARY KEY,
        value text NOT NULL,
        updated_at double precision NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS wr_routers (
        id text PRIMARY KEY,
        host text NOT NULL,
        pid integer NOT NULL,
        started_at double precision NOT NULL,
        seen_at double precision NOT NULL,
        alive_until double precision NOT NULL,
        sinks text NOT NULL
    )""",
]

_FREE = "(d.lease_until IS NULL OR d.lease_until <= %(now)s)"
_HEAD = """NOT EXISTS (SELECT 1 FROM wr_deliveries e WHERE e.sink = d.sink
    AND e.order_key = d.order_key AND e.state = 'pending' AND e.seq < d.seq)"""
_CLAIM = f"""WITH c AS (
        SELECT d.seq FROM wr_deliveries d
        WHERE d.sink = %(sink)s AND d.state = 'pending' AND d.next_attempt_at <= %(now)s
            AND {_FREE}
        ORDER BY d.next_attempt_at, d.seq LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    UPDATE wr_deliveries d SET lease_owner = %(owner)s, lease_until = %(now)s + %(lease)s,
        token = d.token + 1
    FROM c WHERE d.sink = %(sink)s AND d.seq = c.seq
    RETURNING d.seq, d.attempts, d.token"""  # noqa: S608
_CLAIM_ORDERED = f"""WITH c AS (
        SELECT d.seq FROM wr_deliveries d
        WHERE d.sink = %(sink)s AND d.state = 'pending' AND d.next_attempt_at <= %(now)s
            AND {_FREE} AND {_HEAD}
        ORDER BY d.seq LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    UPDATE wr_deliveries d SET lease_owner = %(owner)s, lease_until = %(now)s + %(lease)s,
        token = d.token + 1
    FROM c WHERE d.sink = %(sink)s AND d.seq = c.seq
        AND (d.lease_until IS NULL OR d.lease_until <= %(now)s)
    RETURNING d.seq, d.attempts, d.token"""  # noqa: S608
_NEXT_FREE = """SELECT next_attempt_at FROM wr_deliveries
    WHERE sink = %(sink)s AND state = 'pending' AND lease_until IS NULL
    ORDER BY next_attempt_at, seq LIMIT 1"""
_NEXT_LEASED = """SELECT min(greatest(next_attempt_at, lease_until)) FROM wr_deliveries
    WHERE lease_owner IS NOT NULL AND sink = %(sink)s AND state = 'pending'"""
_NEXT_ORDERED = f"""SELECT min(greatest(d.next_attempt_at, coalesce(d.lease_until, 0)))
    FROM wr_deliveries d WHERE d.sink = %(sink)s AND d.state = 'pending' AND {_HEAD}"""  # noqa: S608
_COUNTS = """SELECT d.sink, count(*) FILTER (WHERE d.attempts = 0),
        count(*) FILTER (WHERE d.attempts > 0), min(m.received_at),
        count(*) FILTER (WHERE d.lease_until > %(now)s)
    FROM wr_deliveries d JOIN wr_messages m USING (seq)
    WHERE d.state = 'pending' GROUP BY d.sink"""
_HOLDERS = """SELECT DISTINCT sink, lease_owner FROM wr_deliveries
    WHERE lease_owner IS NOT NULL AND lease_until > %(now)s AND state = 'pending'"""
_BLOCKED = f"""SELECT count(*) FROM wr_deliveries d
    WHERE d.sink = %(sink)s AND d.state = 'pending' AND d.attempts > 0 AND {_HEAD}"""  # noqa: S608

_APPEND = f"""WITH m AS (
        INSERT INTO wr_messages (message_id, type, "when", request_id, received_at, body,
            body_id, body_size, routed, order_key)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (message_id) DO UPDATE
            SET duplicates = wr_messages.duplicates + 1, last_duplicate_at = excluded.received_at
        RETURNING seq, duplicates, received_at, order_key),
    d AS (
        INSERT INTO wr_deliveries (seq, sink, order_key, state, next_attempt_at, updated_at,
            lease_owner, lease_until, token)
        SELECT m.seq, t.sink, m.order_key, 'pending', m.received_at, m.received_at,
            CASE WHEN t.mine THEN %s END,
            CASE WHEN t.mine THEN {NOW} + %s END,
            CASE WHEN t.mine THEN {FIRST_TOKEN} ELSE 0 END
        FROM m, unnest(%s::text[], %s::bool[]) AS t(sink, mine)
        WHERE m.duplicates = 0)
    SELECT seq, duplicates FROM m"""  # noqa: S608

Conn = psycopg.AsyncConnection[tuple[Any, ...]]
Job = Callable[[Conn], Awaitable[Any]]


class _Pending:
    __slots__ = ("fn", "future", "locks", "notify", "order")

    def __init__(
        self, fn: Job, locks: Collection[str], notify: Collection[str], order: str | None
    ) -> None:
        self.fn = fn
        self.locks = locks
        self.notify = notify
        #: A message id: appends run in message id order within a batch (see ``_write_loop``).
        self.order = order
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()


def _unavailable(e: BaseException, doing: str) -> JournalUnavailable:
    # psycopg's message may quote a value of the statement: keep the class and SQLSTATE only.
    state = getattr(e, "sqlstate", None)
    detail = f"{type(e).__name__}" + (f" (SQLSTATE {state})" if state else "")
    if isinstance(e, psycopg.errors.ReadOnlySqlTransaction):
        detail = "the database is read-only"
    elif isinstance(e, (psycopg.OperationalError, *psycopg_pool_errors())):
        detail = "the database cannot be reached"
    return JournalUnavailable(f"journal {doing} failed: {detail}")


def psycopg_pool_errors() -> tuple[type[BaseException], ...]:
    from psycopg_pool import PoolTimeout

    return (PoolTimeout,)


class PostgresJournal(Journal):
    """The journal in a PostgreSQL database shared by several routers."""

    kind = "postgres"
    max_batch = 512

    def __init__(self, config: PostgresConfig, *, spool_dir: Path) -> None:
        self.config = config
        self.spool_dir = spool_dir
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._notifier: asyncio.Task[None] | None = None
        self._to_notify: set[str] = set()
        self._notify_event = asyncio.Event()
        self._closing = False
        self._healthy = False
        self._last_error: str | None = "journal is not open"
        self._wake: Callable[[set[str] | None], None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy and self._writer is not None and not self._writer.done()

    @property
    def last_error(self) -> str | None:
        if self._writer is None:
            return "journal is not open"
        if self._writer.done():
            return "journal writer stopped"
        return None if self._healthy else self._last_error

    def _failed(self, error: JournalUnavailable) -> JournalUnavailable:
        """A write failed for want of the database (or its disk): not healthy until one
        succeeds."""
        self._healthy = False
        self._last_error = str(error)
        return error

    def alive(self) -> bool:
        return self._writer is not None and not self._writer.done()

    def describe(self) -> str:
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.config.dsn.get_secret_value())
        except psycopg.ProgrammingError:
            return "postgresql (unparsable dsn)"
        host = info.get("host") or "localhost"
        return f"postgresql://{host}/{info.get('dbname') or info.get('user') or ''}"

    @property
    def local_dir(self) -> Path:
        return self.spool_dir

    def body_path(self, name: str) -> Path:
        return self.spool_dir / name

    @property
    def _cache(self) -> Path:
        return self.spool_dir / "cache"

    def _kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "autocommit": False,
            "connect_timeout": max(1, round(self.config.connect_timeout)),
            "application_name": "webhook-router",
        }
        if not self.config.listen:
            kwargs["prepare_threshold"] = None  # PgBouncer transaction pooling
        return kwargs

    async def open(self, *, maintenance: bool = True, create: bool = True) -> None:
        dsn = self.config.dsn.get_secret_value()
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            dsn,
            kwargs=self._kwargs(),
            min_size=1,
            max_size=self.config.pool,
            timeout=self.config.connect_timeout,
            # A connection that cannot be replaced at once is given up (no retrying with
            # growing backoff in the background): the next request that needs one makes a
            # new one, so the router is back as soon as the database is (503s meanwhile).
            reconnect_timeout=0,
            open=False,
            name="webhook-router",
        )
        try:
            await pool.open(wait=True, timeout=self.config.connect_timeout)
        except Exception as e:
            await pool.close()
            raise JournalUnavailable(
                f"cannot open journal {self.describe()}: {_unavailable(e, 'connect')}"
            ) from e
        self._pool = pool
        try:
            await self._migrate(create)
            if maintenance:
                await anyio.to_thread.run_sync(self._prepare_dirs)
        except BaseException:
            await pool.close()
            self._pool = None
            raise
        self._healthy = True
        self._last_error = None
        self._writer = asyncio.create_task(self._write_loop(), name="journal-writer")
        self._notifier = asyncio.create_task(self._notify_loop(), name="journal-notify")
        if self.config.listen:
            self._listener = asyncio.create_task(self._listen_loop(), name="journal-listen")

    def _prepare_dirs(self) -> None:
        durable.make_dirs(self.bodies)
        durable.make_dirs(self._cache)
        for path in self._cache.iterdir():  # a crash may have left partial downloads
            with contextlib.suppress(OSError):
                path.unlink()

    async def _migrate(self, create: bool) -> None:
        assert self._pool is not None
        try:
            async with self._pool.connection() as conn:
                await conn.set_autocommit(True)
                try:
                    await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
                    try:
                        await self._migrate_locked(conn, create)
                    finally:
                        await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
                finally:
                    await conn.set_autocommit(False)
        except JournalUnavailable:
            raise
        except psycopg.Error as e:
            raise JournalUnavailable(
                f"cannot open journal {self.describe()}: {_unavailable(e, 'schema')}"
            ) from e

    async def _migrate_locked(self, conn: Conn, create: bool) -> None:
        found = await (await conn.execute("SELECT to_regclass('wr_schema') IS NOT NULL")).fetchone()
        exists = bool(found and found[0])
        version = 0
        if exists:
            row = await (await conn.execute("SELECT max(version) FROM wr_schema")).fetchone()
            version = int(row[0] or 0) if row else 0
        if version > SCHEMA_VERSION:
            raise JournalUnavailable(
                f"journal {self.describe()} has schema {version}, newer than this version "
                f"understands ({SCHEMA_VERSION}): upgrade webhook-router"
            )
        if version == SCHEMA_VERSION:
            return
        if not create:
            raise JournalUnavailable(
                f"no journal in {self.describe()}: has `webhook-router serve` run with this"
                " configuration?"
            )
        async with conn.transaction():
            for statement in _SCHEMA:
                await conn.execute(statement)
            await conn.execute("DELETE FROM wr_schema")
            await conn.execute("INSERT INTO wr_schema VALUES (%s)", (SCHEMA_VERSION,))
        log.info("journal schema %d created in %s", SCHEMA_VERSION, self.describe())

    async def close(self) -> None:
        if self._writer is not None:
            await self._queue.put(None)
            with contextlib.suppress(Exception):
                await self._writer
            self._writer = None
        if self._notifier is not None:
            # Let it send what the last writes left for other routers, then end.
            self._closing = True
            self._notify_event.set()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._notifier, 5.0)
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
        self._listener = self._notifier = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        self._healthy = False
        self._last_error = "journal is not open"

    def subscribe(self, wake: Callable[[set[str] | None], None]) -> None:
        self._wake = wake

    # -- the writer ---------------------------------------------------------------------------

    async def _write(
        self,
        fn: Job,
        *,
        locks: Collection[str] = (),
        notify: Collection[str] = (),
        order: str | None = None,
    ) -> Any:
        if self._writer is None or self._writer.done():
            raise JournalUnavailable("journal is not open")
        job = _Pending(fn, locks, notify, order)
        await self._queue.put(job)
        return await job.future

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            jobs = [first]
            stop = False
            while len(jobs) < self.max_batch and not self._queue.empty():
                job = self._queue.get_nowait()
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            # Appends in message id order: two routers' batches holding the same ids (a
            # message posted to both) then wait for each other in one order, never in a
            # cycle (a deadlock costs a second and a retried batch, and the leases given at
            # append run meanwhile). Other writes keep their order, after them.
            jobs.sort(key=lambda j: (j.order is None, j.order or ""))
            try:
                await self._commit(jobs)
            except BaseException as e:  # never let the writer die: later writes would hang
                log.critical("journal writer failed: %s", type(e).__name__)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(
                            JournalUnavailable(f"journal writer failed: {type(e).__name__}")
                        )
                if isinstance(e, asyncio.CancelledError):
                    raise
            if stop:
                return

    async def _commit(self, jobs: list[_Pending]) -> None:
        assert self._pool is not None
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        for attempt in range(3):
            results.clear()
            errors.clear()
            try:
                async with self._pool.connection() as conn:
                    if await self._run_all(conn, jobs, results):
                        break
                    results.clear()
                    await self._run_each(conn, jobs, results, errors)
                    break
            except psycopg.Error as e:
                if getattr(e, "sqlstate", None) in _RETRY_BATCH and attempt < 2:
                    continue
                error = self._failed(_unavailable(e, "commit"))
                log.error("journal commit failed, %d writes refused: %s", len(jobs), error)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                return
            except Exception as e:  # the pool: no connection within the timeout
                error = self._failed(_unavailable(e, "commit"))
                log.error("journal commit failed, %d writes refused: %s", len(jobs), error)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                return
        storage = next((e for e in errors.values() if _is_storage(e)), None)
        self._healthy = storage is None
        self._last_error = None if storage is None else str(storage)
        notify: set[str] = set()
        for i, job in enumerate(jobs):
            if job.future.done():
                continue
            if i in errors:
                job.future.set_exception(errors[i])
            else:
                job.future.set_result(results.get(i))
                notify.update(job.notify)
        if notify and self.config.listen:
            self._to_notify |= notify
            self._notify_event.set()

    async def _begin(self, conn: Conn, jobs: Sequence[_Pending]) -> None:
        await conn.execute("SET LOCAL synchronous_commit TO on")
        keys = sorted({k for job in jobs for k in job.locks})
        if keys:
            # One patient's rows allocated in commit order (see the module docstring); sorted,
            # so that two routers' batches cannot deadlock on each other's keys.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(k, 0))"
                " FROM unnest(%s::text[]) WITH ORDINALITY AS t(k, i) ORDER BY i",
                (keys,),
            )

    async def _run_all(self, conn: Conn, jobs: Sequence[_Pending], results: dict[int, Any]) -> bool:
        """Every job in one transaction. False (nothing written) if a job failed, so that
        ``_run_each`` can isolate it; a failed commit raises."""
        try:
            async with conn.transaction():
                await self._begin(conn, jobs)
                for i, job in enumerate(jobs):
                    results[i] = await job.fn(conn)
        except psycopg.errors.QueryCanceled:
            raise
        except psycopg.Error as e:
            if getattr(e, "sqlstate", None) in _RETRY_BATCH or conn.closed or conn.broken:
                raise
            if isinstance(e, psycopg.OperationalError):
                raise
            return False
        except JournalUnavailable:
            return False
        return True

    async def _run_each(
        self,
        conn: Conn,
        jobs: Sequence[_Pending],
        results: dict[int, Any],
        errors: dict[int, BaseException],
    ) -> None:
        async with conn.transaction():
            await self._begin(conn, jobs)
            for i, job in enumerate(jobs):
                try:
                    async with conn.transaction():  # a savepoint
                        results[i] = await job.fn(conn)
                except (psycopg.Error, JournalUnavailable) as e:
                    if isinstance(e, psycopg.OperationalError) or conn.broken:
                        raise
                    errors[i] = e if isinstance(e, JournalUnavailable) else _unavailable(e, "write")
                    errors[i].__cause__ = e

    # -- wake-ups -----------------------------------------------------------------------------

    async def _notify_loop(self) -> None:
        while True:
            await self._notify_event.wait()
            self._notify_event.clear()
            await self._send_notify()
            if self._closing:
                return
            await asyncio.sleep(NOTIFY_EVERY)

    async def _send_notify(self) -> None:
        """NOTIFY the sinks that got work to claim since the last one (a hint: runners poll
        too, so a failure here loses nothing)."""
        sinks, self._to_notify = self._to_notify, set()
        if not sinks or self._pool is None:
            return
        payload = ",".join(sorted(sinks))
        if len(payload.encode()) > 7000:  # NOTIFY refuses 8000 bytes: wake every runner
            payload = ""
        try:
            async with self._pool.connection() as conn:
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                await conn.commit()
        except Exception as e:
            log.debug("journal notify failed: %s", type(e).__name__)

    async def _listen_loop(self) -> None:
        dsn = self.config.dsn.get_secret_value()
        delay = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    dsn, autocommit=True, connect_timeout=max(1, round(self.config.connect_timeout))
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.5
                    if self._wake is not None:
                        self._wake(None)  # whatever was missed while not listening
                    async for note in conn.notifies():
                        if self._wake is not None:
                            names = {n for n in note.payload.split(",") if n}
                            self._wake(names or None)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning(
                    "journal listen failed (%s): retrying in %.1fs", type(e).__name__, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # -- reads --------------------------------------------------------------------------------

    async def _read(self, fn: Job) -> Any:
        if self._pool is None:
            raise JournalUnavailable("journal is not open")
        try:
            async with self._pool.connection() as conn, conn.transaction():
                return await fn(conn)
        except psycopg.Error as e:
            raise _unavailable(e, "read") from e
        except JournalUnavailable:
            raise
        except Exception as e:
            if isinstance(e, psycopg_pool_errors()):
                raise _unavailable(e, "read") from e
            raise

    # -- ingest -------------------------------------------------------------------------------

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
        body_id = None
        if message.body_file is not None:
            body_id = await self._store_body(message.body_file)
            # The database has it; the received file becomes this router's cached copy, which
            # a sink given the message straight away reads (``message.body_file``).
            cached = self._cache / f"{body_id}.json"
            await anyio.to_thread.run_sync(os.replace, message.body_file, cached)
            message.body_file = cached
        claimed = tuple(s for s in sinks if s in claim_for) if owner else ()
        row = (
            message.message_id,
            message.type,
            message.when,
            message.request_id,
            message.received_at,
            message.body if message.in_memory else None,
            body_id,
            message.body_size,
            bool(sinks),
            message.order_key,
        )

        names = list(sinks)
        mine = [name in claimed for name in names]

        async def write(conn: Conn) -> Appended:
            # One statement, one round trip: the message, and its deliveries unless it is a
            # duplicate (those claimed for this router leased from the database's clock).
            cur = await conn.execute(_APPEND, (*row, owner, lease, names, mine))
            found = await cur.fetchone()
            assert found is not None
            seq, duplicates = found
            if duplicates:
                return Appended(seq, duplicate=True)
            return Appended(seq, duplicate=False, claimed=claimed)

        others = [s for s in sinks if s not in claimed]
        locks = [message.order_key] if ordered else []
        try:
            result: Appended = await self._write(
                write, locks=locks, notify=others, order=message.message_id
            )
        except BaseException:
            if body_id is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self._drop_body(body_id)
            raise
        if result.duplicate and body_id is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._drop_body(body_id)
        return result

    async def _store_body(self, path: Path) -> str:
        """Upload a large body in parts, committed before the message row refers to it."""
        assert self._pool is not None
        body_id = uuid.uuid4().hex
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit TO on")
                f = await anyio.to_thread.run_sync(path.open, "rb")
                try:
                    part = 0
                    while chunk := await anyio.to_thread.run_sync(f.read, PART):
                        await conn.execute(
                            f"INSERT INTO wr_bodies (body_id, part, data, stored_at)"  # noqa: S608
                            f" VALUES (%s, %s, %s, {NOW})",
                            (body_id, part, chunk),
                        )
                        part += 1
                finally:
                    f.close()
        except psycopg.Error as e:
            raise self._failed(_unavailable(e, "body write")) from e
        except Exception as e:
            if isinstance(e, psycopg_pool_errors()):
                raise self._failed(_unavailable(e, "body write")) from e
            raise
        return body_id

    async def _drop_body(self, body_id: str) -> None:
        assert self._pool is not None
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("DELETE FROM wr_bodies WHERE body_id = %s", (body_id,))

    # -- delivery -----------------------------------------------------------------------------

    async def claim(
        self, sink: str, owner: str, limit: int, *, ordered: bool, lease: float
    ) -> list[Claim]:
        sql = _CLAIM_ORDERED if ordered else _CLAIM

        async def write(conn: Conn) -> list[Claim]:
            params = {"sink": sink, "owner": owner, "limit": limit, "lease": lease}
            params["now"] = await _now(conn)
            rows = await (await conn.execute(sql, params)).fetchall()
            return [Claim(seq, attempts, token) for seq, attempts, token in sorted(rows)]

        result: list[Claim] = await self._write(write)
        return result

    async def record(self, outcomes: Iterable[Outcome]) -> int:
        rows = [(o.state, o.attempts, o.delay, o.error, o.sink, o.seq, o.token) for o in outcomes]
        if not rows:
            return 0
        wake = {o[4] for o in rows if o[0] == "pending"}

        async def write(conn: Conn) -> int:
            cur = await conn.execute(
                f"""UPDATE wr_deliveries d SET state = v.state, attempts = v.attempts,
                        next_attempt_at = {NOW} + v.delay, last_error = v.error,
                        updated_at = {NOW}, lease_owner = NULL, lease_until = NULL
                    FROM unnest(%s::text[], %s::int[], %s::float8[], %s::text[], %s::text[],
                        %s::bigint[], %s::bigint[])
                        AS v(state, attempts, delay, error, sink, seq, token)
                    WHERE d.sink = v.sink AND d.seq = v.seq AND d.token = v.token""",  # noqa: S608
                [list(col) for col in zip(*rows, strict=True)],
            )
            return cur.rowcount

        result: int = await self._write(write, notify=wake)
        return result

    async def release(self, sink: str, claims: Iterable[Claim]) -> None:
        rows = [(c.seq, c.token) for c in claims]
        if not rows:
            return

        async def write(conn: Conn) -> None:
            await conn.execute(
                """UPDATE wr_deliveries d SET lease_owner = NULL, lease_until = NULL
                   FROM unnest(%s::bigint[], %s::bigint[]) AS v(seq, token)
                   WHERE d.sink = %s AND d.seq = v.seq AND d.token = v.token
                       AND d.state = 'pending'""",
                ([r[0] for r in rows], [r[1] for r in rows], sink),
            )

        await self._write(write, notify=[sink])

    async def renew(self, owner: str, lease: float, held: Mapping[str, Collection[int]]) -> None:
        pairs = [(sink, seq) for sink, seqs in held.items() for seq in seqs]

        async def write(conn: Conn) -> None:
            now = await _now(conn)
            if pairs:
                await conn.execute(
                    """UPDATE wr_deliveries d SET lease_until = %s
                       FROM unnest(%s::text[], %s::bigint[]) AS v(sink, seq)
                       WHERE d.sink = v.sink AND d.seq = v.seq AND d.lease_owner = %s
                           AND d.state = 'pending'""",
                    (now + lease, [p[0] for p in pairs], [p[1] for p in pairs], owner),
                )
            await conn.execute(
                "UPDATE wr_routers SET seen_at = %s, alive_until = %s WHERE id = %s",
                (now, now + lease, owner),
            )

        await self._write(write)

    async def next_due_in(self, sink: str, *, ordered: bool) -> float | None:
        async def read(conn: Conn) -> float | None:
            params = {"sink": sink}
            queries = [_NEXT_ORDERED] if ordered else [_NEXT_FREE, _NEXT_LEASED]
            times = []
            for sql in queries:
                row = await (await conn.execute(sql, params)).fetchone()
                if row is not None and row[0] is not None:
                    times.append(float(row[0]))
            return None if not times else max(0.0, min(times) - await _now(conn))

        result: float | None = await self._read(read)
        return result

    async def messages(self, seqs: Sequence[int]) -> dict[int, Message]:
        async def read(conn: Conn) -> list[tuple[Any, ...]]:
            return await (
                await conn.execute(
                    """SELECT seq, message_id, type, "when", request_id, received_at, body,
                              body_id, order_key, body_size
                       FROM wr_messages WHERE seq = ANY(%s)""",
                    (list(seqs),),
                )
            ).fetchall()

        rows: list[tuple[Any, ...]] = await self._read(read)
        found = {}
        for seq, mid, type_, when, request_id, received_at, body, body_id, key, size in rows:
            body_file = None if body_id is None else await self._cached_body(body_id)
            found[seq] = Message(
                mid,
                type_,
                when,
                None if body is None else bytes(body),
                received_at,
                request_id,
                order_key=key,
                body_file=body_file,
                body_size=size,
            )
        return found

    async def _cached_body(self, body_id: str) -> Path:
        """The body's file in the local cache, fetched from the database part by part."""
        path = self._cache / f"{body_id}.json"
        if await anyio.to_thread.run_sync(path.exists):
            return path
        assert self._pool is not None
        partial = self._cache / f"{body_id}.{os.getpid()}.{uuid.uuid4().hex[:6]}.part"
        await anyio.to_thread.run_sync(lambda: durable.make_dirs(self._cache))
        f = await anyio.to_thread.run_sync(partial.open, "wb")
        try:
            async with self._pool.connection() as conn:
                part = 0
                while True:
                    row = await (
                        await conn.execute(
                            "SELECT data FROM wr_bodies WHERE body_id = %s AND part = %s",
                            (body_id, part),
                        )
                    ).fetchone()
                    if row is None:
                        break
                    await anyio.to_thread.run_sync(f.write, bytes(row[0]))
                    part += 1
                await conn.rollback()
            f.close()
            await anyio.to_thread.run_sync(os.replace, partial, path)
        except psycopg.Error as e:
            raise _unavailable(e, "body read") from e
        finally:
            f.close()
            with contextlib.suppress(OSError):
                partial.unlink()
        return path

    # -- maintenance --------------------------------------------------------------------------

    async def register(self, router: RouterInfo, lease: float) -> None:
        async def write(conn: Conn) -> None:
            now = await _now(conn)
            rows = await (
                await conn.execute(
                    "SELECT id, pid FROM wr_routers WHERE host = %s AND id != %s",
                    (router.host, router.id),
                )
            ).fetchall()
            for rid, pid in rows:
                if process_gone(pid):
                    await _forget(conn, rid)
            await conn.execute(
                """INSERT INTO wr_routers (id, host, pid, started_at, seen_at, alive_until, sinks)
                   VALUES (%s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at,
                       alive_until = excluded.alive_until, sinks = excluded.sinks""",
                (
                    router.id,
                    router.host,
                    router.pid,
                    now,
                    now,
                    now + lease,
                    json.dumps(list(router.sinks)),
                ),
            )
            await conn.execute("DELETE FROM wr_routers WHERE alive_until < %s", (now - 86400,))

        await self._write(write)

    async def unregister(self, router_id: str) -> None:
        async def write(conn: Conn) -> None:
            await _forget(conn, router_id)

        await self._write(write)

    async def dead_letter_orphaned(self, sinks: Collection[str], reason: str) -> dict[str, int]:
        async def write(conn: Conn) -> dict[str, int]:
            now = await _now(conn)
            known = set(sinks)
            for (names,) in await (
                await conn.execute("SELECT sinks FROM wr_routers WHERE alive_until > %s", (now,))
            ).fetchall():
                known.update(json.loads(names))
            rows = await (
                await conn.execute(
                    """WITH gone AS (
                           UPDATE wr_deliveries SET state = 'dead', last_error = %s,
                               updated_at = %s, lease_owner = NULL, lease_until = NULL
                           WHERE state = 'pending' AND NOT (sink = ANY(%s))
                           RETURNING sink)
                       SELECT sink, count(*) FROM gone GROUP BY sink""",
                    (reason, now, sorted(known)),
                )
            ).fetchall()
            return {sink: int(n) for sink, n in rows}

        result: dict[str, int] = await self._write(write)
        return result

    async def sink_counts(self) -> dict[str, SinkCounts]:
        async def read(conn: Conn) -> dict[str, SinkCounts]:
            return await _sink_counts(conn, ())

        result: dict[str, SinkCounts] = await self._read(read)
        return result

    async def size_bytes(self) -> int:
        async def read(conn: Conn) -> int:
            row = await (
                await conn.execute(
                    "SELECT coalesce(sum(pg_total_relation_size(c)), 0)"
                    " FROM unnest(%s::regclass[]) c",
                    (["wr_messages", "wr_deliveries", "wr_bodies", "wr_routers"],),
                )
            ).fetchone()
            return int(row[0]) if row else 0

        result: int = await self._read(read)
        return result

    async def sweep(self, retention: float, now: float | None = None, batch: int = 1000) -> int:
        cutoff = (time.time() if now is None else now) - retention
        removed = 0
        while True:

            async def write(conn: Conn) -> int:
                rows = await (
                    await conn.execute(
                        """WITH gone AS (
                               DELETE FROM wr_messages WHERE seq IN (
                                   SELECT m.seq FROM wr_messages m
                                   WHERE m.received_at < %s AND m.routed AND NOT EXISTS (
                                       SELECT 1 FROM wr_deliveries d
                                       WHERE d.seq = m.seq AND d.state != 'delivered')
                                   ORDER BY m.seq LIMIT %s
                                   FOR UPDATE SKIP LOCKED)
                               RETURNING body_id)
                           SELECT body_id FROM gone""",
                        (cutoff, batch),
                    )
                ).fetchall()
                ids = [r[0] for r in rows if r[0] is not None]
                if ids:
                    await conn.execute("DELETE FROM wr_bodies WHERE body_id = ANY(%s)", (ids,))
                return len(rows)

            count: int = await self._write(write)
            removed += count
            if count < batch:
                break
        await self._write(_drop_orphan_bodies)
        await anyio.to_thread.run_sync(self._trim_cache)
        return removed

    def _trim_cache(self) -> None:
        """Cached copies of large bodies older than an hour (fetched again when needed)."""
        old = time.time() - 3600
        with contextlib.suppress(OSError):
            for path in self._cache.iterdir():
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < old:
                        path.unlink()

    # -- coordination between routers ---------------------------------------------------------

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        async def write(conn: Conn) -> bool:
            now = await _now(conn)
            row = await (
                await conn.execute(
                    """INSERT INTO wr_locks (name, owner, until) VALUES (%s, %s, %s)
                       ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,
                           until = excluded.until
                       WHERE wr_locks.owner = excluded.owner OR wr_locks.until <= %s
                       RETURNING owner""",
                    (name, owner, now + ttl, now),
                )
            ).fetchone()
            return row is not None

        result: bool = await self._write(write)
        return result

    async def unlock(self, name: str, owner: str) -> None:
        async def write(conn: Conn) -> None:
            await conn.execute("DELETE FROM wr_locks WHERE name = %s AND owner = %s", (name, owner))

        await self._write(write)

    async def get_state(self, key: str) -> tuple[str, float] | None:
        async def read(conn: Conn) -> tuple[str, float] | None:
            row = await (
                await conn.execute("SELECT value, updated_at FROM wr_state WHERE key = %s", (key,))
            ).fetchone()
            return None if row is None else (row[0], float(row[1]))

        result: tuple[str, float] | None = await self._read(read)
        return result

    async def set_state(self, key: str, value: str) -> None:
        async def write(conn: Conn) -> None:
            await conn.execute(
                f"""INSERT INTO wr_state (key, value, updated_at) VALUES (%s, %s, {NOW})
                    ON CONFLICT (key) DO UPDATE SET value = excluded.value,
                        updated_at = excluded.updated_at""",  # noqa: S608
                (key, value),
            )

        await self._write(write)

    # -- operator -----------------------------------------------------------------------------

    async def status(self, ordered: Collection[str] = ()) -> JournalStatus:
        async def read(conn: Conn) -> JournalStatus:
            counts = await _sink_counts(conn, ordered)
            errors = {
                sink: error
                for sink, error in await (
                    await conn.execute(
                        """SELECT DISTINCT ON (sink) sink, last_error FROM wr_deliveries
                           WHERE state IN ('pending', 'dead') AND last_error IS NOT NULL
                           ORDER BY sink, updated_at DESC"""
                    )
                ).fetchall()
            }
            row = await (
                await conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE NOT routed),"
                    " coalesce(sum(duplicates), 0) FROM wr_messages"
                )
            ).fetchone()
            assert row is not None
            now = await _now(conn)
            routers = [
                (RouterInfo(rid, host, pid, tuple(json.loads(sinks))), seen)
                for rid, host, pid, sinks, seen in await (
                    await conn.execute(
                        "SELECT id, host, pid, sinks, seen_at FROM wr_routers"
                        " WHERE alive_until > %s ORDER BY started_at",
                        (now,),
                    )
                ).fetchall()
            ]
            return JournalStatus(int(row[0]), int(row[1]), int(row[2]), 0, counts, errors, routers)

        st: JournalStatus = await self._read(read)
        size = await self.size_bytes()
        return JournalStatus(
            st.messages, st.unrouted, st.duplicates, size, st.sinks, st.last_errors, st.routers
        )

    async def dead_letters(self, where: Filter) -> list[DeadLetter]:
        clauses, params = ["d.state = 'dead'"], []
        if where.sinks:
            clauses.append("d.sink = ANY(%s)")
            params.append(list(where.sinks))
        if where.ids:
            clauses.append("m.message_id = ANY(%s)")
            params.append(list(where.ids))

        async def read(conn: Conn) -> list[DeadLetter]:
            rows = await (
                await conn.execute(
                    f"""SELECT d.seq, m.message_id, m.type, d.sink, d.attempts, d.updated_at,
                               d.last_error
                        FROM wr_deliveries d JOIN wr_messages m USING (seq)
                        WHERE {" AND ".join(clauses)}
                        ORDER BY d.updated_at, d.seq""",  # noqa: S608
                    params,
                )
            ).fetchall()
            return [DeadLetter(*row) for row in rows]

        result: list[DeadLetter] = await self._read(read)
        return result

    async def retry_dead(self, letters: Sequence[DeadLetter]) -> None:
        for i in range(0, len(letters), 1000):
            chunk = letters[i : i + 1000]

            async def write(conn: Conn, chunk: Sequence[DeadLetter] = chunk) -> None:
                await conn.execute(
                    f"""UPDATE wr_deliveries d SET state = 'pending', attempts = 0,
                            next_attempt_at = {NOW}, last_error = NULL, updated_at = {NOW}
                        FROM unnest(%s::bigint[], %s::text[]) AS v(seq, sink)
                        WHERE d.seq = v.seq AND d.sink = v.sink AND d.state = 'dead'""",  # noqa: S608
                    ([d.seq for d in chunk], [d.sink for d in chunk]),
                )

            await self._write(write, notify={d.sink for d in chunk})

    async def purge_dead(self, letters: Sequence[DeadLetter]) -> None:
        for i in range(0, len(letters), 1000):
            chunk = letters[i : i + 1000]

            async def write(conn: Conn, chunk: Sequence[DeadLetter] = chunk) -> None:
                await conn.execute(
                    """DELETE FROM wr_deliveries d
                       USING unnest(%s::bigint[], %s::text[]) AS v(seq, sink)
                       WHERE d.seq = v.seq AND d.sink = v.sink AND d.state = 'dead'""",
                    ([d.seq for d in chunk], [d.sink for d in chunk]),
                )

            await self._write(write)

    async def stored_messages(self, since: float, until: float) -> list[StoredMessage]:
        async def read(conn: Conn) -> list[StoredMessage]:
            rows = await (
                await conn.execute(
                    "SELECT seq, type, order_key FROM wr_messages"
                    " WHERE received_at >= %s AND received_at < %s ORDER BY seq",
                    (since, until),
                )
            ).fetchall()
            return [StoredMessage(*row) for row in rows]

        result: list[StoredMessage] = await self._read(read)
        return result

    async def redeliver(self, chosen: Sequence[tuple[StoredMessage, Sequence[str]]]) -> None:
        pairs = [(m.seq, sink, m.order_key) for m, sinks in chosen for sink in sinks]
        routed = [m.seq for m, sinks in chosen if sinks]

        async def write(conn: Conn) -> None:
            now = await _now(conn)
            if pairs:
                await conn.execute(
                    """INSERT INTO wr_deliveries (seq, sink, order_key, state, attempts,
                           next_attempt_at, updated_at)
                       SELECT v.seq, v.sink, v.key, 'pending', 0, %s, %s
                       FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS v(seq, sink, key)
                       ON CONFLICT (seq, sink) DO UPDATE SET state = 'pending', attempts = 0,
                           next_attempt_at = excluded.next_attempt_at, last_error = NULL,
                           updated_at = excluded.updated_at""",
                    (now, now, [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]),
                )
            if routed:
                await conn.execute(
                    "UPDATE wr_messages SET routed = true WHERE seq = ANY(%s)", (routed,)
                )

        await self._write(write, notify={p[1] for p in pairs})


async def _now(conn: Conn) -> float:
    row = await (await conn.execute(f"SELECT {NOW}")).fetchone()
    assert row is not None
    return float(row[0])


async def _sink_counts(conn: Conn, ordered: Collection[str]) -> dict[str, SinkCounts]:
    now = await _now(conn)
    counts: dict[str, dict[str, Any]] = {}

    def entry(sink: str) -> dict[str, Any]:
        return counts.setdefault(
            sink,
            {"pending": 0, "retrying": 0, "dead": 0, "oldest_pending_at": None, "leased": 0},
        )

    for sink, fresh, retrying, oldest, leased in await (
        await conn.execute(_COUNTS, {"now": now})
    ).fetchall():
        entry(sink).update(
            pending=int(fresh),
            retrying=int(retrying),
            oldest_pending_at=oldest,
            leased=int(leased),
        )
    for sink, dead in await (
        await conn.execute(
            "SELECT sink, count(*) FROM wr_deliveries WHERE state = 'dead' GROUP BY sink"
        )
    ).fetchall():
        entry(sink)["dead"] = int(dead)
    holders: dict[str, list[str]] = {}
    for sink, owner in await (await conn.execute(_HOLDERS, {"now": now})).fetchall():
        holders.setdefault(sink, []).append(owner)
    blocked: dict[str, int] = {}
    for sink in ordered:
        row = await (await conn.execute(_BLOCKED, {"sink": sink})).fetchone()
        blocked[sink] = int(row[0]) if row else 0
    return {
        sink: SinkCounts(
            **values,
            holders=tuple(sorted(holders.get(sink, ()))),
            blocked_lanes=blocked.get(sink, 0),
        )
        for sink, values in counts.items()
    }


async def _forget(conn: Conn, router_id: str) -> None:
    await conn.execute(
        "UPDATE wr_deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = %s",
        (router_id,),
    )
    await conn.execute("DELETE FROM wr_routers WHERE id = %s", (router_id,))


async def _drop_orphan_bodies(conn: Conn) -> None:
    """Uploaded bodies no message refers to, older than an hour: left by a router that died
    between the upload and the commit of its message (which was never answered 200)."""
    await conn.execute(
        f"""DELETE FROM wr_bodies b WHERE b.stored_at < {NOW} - 3600
            AND NOT EXISTS (SELECT 1 FROM wr_messages m WHERE m.body_id = b.body_id)"""  # noqa: S608
    )


def _is_storage(e: BaseException) -> bool:
    cause = e.__cause__
    return isinstance(cause, psycopg.errors.DiskFull | psycopg.errors.ReadOnlySqlTransaction)


__all__ = ["PostgresJournal"]
