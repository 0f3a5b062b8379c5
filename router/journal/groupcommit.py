"""Group commit: one writer thread, many waiters, one transaction (and one fsync) per batch.

Jobs are functions of a SQLite connection. ``submit`` queues one and waits for its result; the
writer thread takes whatever is queued (up to ``max_batch``), runs it all in one transaction
and commits, then hands every result back to its event loop in one wake-up. If a job fails, the
batch is run again with each job in its own savepoint, so that only the failing job fails;
if the commit itself fails, every job of the batch fails (nothing half-stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import queue
import sqlite3
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import anyio.to_thread

from router.errors import JournalUnavailable

log = logging.getLogger("router.journal")

#: SQLite result codes that mean the disk failed a write, not the job: READONLY, IOERR, FULL.
STORAGE_ERRORS = frozenset({8, 10, 13})


#: Runs several jobs' work in one go: ``together(conn, [job.arg ...])`` returns their results
#: in order (see ``GroupCommit.submit``).
Together = Callable[[sqlite3.Connection, list[Any]], list[Any]]


class _Job:
    __slots__ = ("arg", "durable", "error", "fn", "future", "loop", "result", "together")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        together: Together | None = None,
        arg: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        durable: bool = True,
    ) -> None:
        self.fn = fn
        self.together = together
        self.arg = arg
        self.durable = durable
        self.loop = loop if loop is not None and loop.is_running() else asyncio.get_running_loop()
        self.future: asyncio.Future[Any] = self.loop.create_future()
        self.result: Any = None
        self.error: BaseException | None = None

    def settle(self) -> None:
        _settle_all([self])

    def _settle(self) -> None:
        if self.future.done():  # the waiting request was cancelled
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.result)


def _settle_all(jobs: Sequence[_Job]) -> None:
    """Hand results back to their event loops: one wake-up per loop, not one per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
    for job in jobs:
        by_loop.setdefault(job.loop, []).append(job)
    for loop, mine in by_loop.items():
        # The loop may be gone if the daemon is shutting down: nobody waits for the answer.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle_each, mine)


def _settle_each(jobs: list[_Job]) -> None:
    for job in jobs:
        job._settle()


def _name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the operating system too, not only in Python: what
    ``top -H``, ``ps -L`` and ``/proc/PID/task/TID/comm`` show (Linux; 15 bytes at most)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


class GroupCommit:
    """The writer thread of one SQLite connection (see the module docstring)."""

    max_batch = 1024

    def __init__(self, conn: sqlite3.Connection, name: str) -> None:
        self._conn = conn
        #: The connection's ``PRAGMA synchronous`` now (it is opened with FULL).
        self._synchronous = "FULL"
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        #: False after a commit failed or a job failed for want of disk, until one succeeds.
        self.healthy = True
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._write_loop, name=name, daemon=True)
        self._thread.start()
        # The loop it is opened in, which is the loop that submits (``asyncio.get_running_loop``
        # makes a getpid system call on Python 3.11, and this runs for every message).
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def submit(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        together: Together | None = None,
        arg: Any = None,
        *,
        durable: bool = True,
    ) -> asyncio.Future[Any]:
        """Run ``fn`` in the next batch; the future is its result once committed (durable).
        (A future, not a coroutine: one level less to go through for every message.)

        ``together``: jobs of a batch queued one after the other with the same ``together``
        are run as one call of it, given their ``arg``s (say, one multi-row INSERT for many
        messages: one statement instead of one per job). It must do what their ``fn``s would
        do, one after the other; if it raises, the batch is run again job by job (``fn``), so
        that only a failing job fails.

        ``durable=False``: the job's writes may be lost to a power failure (never to the
        process dying: they are in the operating system's cache), as bookkeeping that is
        redone if lost may be (a delivery's outcome: the message is delivered again; a
        lease). A batch of such jobs only is committed without an fsync (``synchronous=
        NORMAL``); the next durable commit's fsync makes them durable too, the log being
        written in order."""
        job = _Job(fn, together, arg, self._loop, durable)
        self._jobs.put(job)
        return job.future

    async def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        self._jobs.put(None)
        await anyio.to_thread.run_sync(self._thread.join)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _write_loop(self) -> None:
        _name_os_thread(self._thread.name)
        conn = self._conn
        while True:
            first = self._jobs.get()
            if first is None:
                return
            jobs = [first]
            stop = False
            while len(jobs) < self.max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            try:
                self._commit(conn, jobs)
            except BaseException as e:  # never let the writer die: later writes would hang
                log.critical("journal writer failed: %s", type(e).__name__)
                for job in jobs:
                    if job.error is None:
                        job.error = JournalUnavailable(f"journal writer failed: {type(e).__name__}")
                    job.settle()
            if stop:
                return

    def _commit(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        synchronous = "FULL" if any(job.durable for job in jobs) else "NORMAL"
        if synchronous != self._synchronous:
            try:
                conn.execute(f"PRAGMA synchronous={synchronous}")
                self._synchronous = synchronous
            except sqlite3.Error:
                pass  # (FULL stays: only ever more durable than asked)
        if not self._commit_all(conn, jobs):
            self._commit_each(conn, jobs)
        _settle_all(jobs)

    def _commit_all(self, conn: sqlite3.Connection, jobs: list[_Job]) -> bool:
        """The usual case, cheaply: every job in one transaction, no savepoints. False (and
        nothing written) if a job failed, so that ``_commit_each`` can isolate it."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return False
        try:
            _run_all(conn, jobs)
        except Exception:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return False
        try:
            conn.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return False
        self.healthy = True
        self.last_error = None
        return True

    def _commit_each(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        """Each job in its own savepoint: a failing job is rolled back alone; a failed commit
        fails them all (nothing half-stored)."""
        storage_error: str | None = None  # a job that failed for want of disk
        for job in jobs:
            job.result = None
        todo = list(jobs)
        try:
            while not self._each_in_savepoints(conn, todo):
                # SQLite undid the whole transaction (it may, for a full disk): the jobs run
                # before the failing one are undone too. Run them again without it.
                todo = [job for job in todo if job.error is None]
            for job in jobs:
                if job.error is not None and _is_storage_error(job.error.__cause__):
                    storage_error = str(job.error.__cause__)
            conn.execute("COMMIT")
            self.healthy = storage_error is None
            self.last_error = storage_error
        except sqlite3.Error as e:
            self.healthy = False
            self.last_error = str(e)
            log.error("journal commit failed, %d writes refused: %s", len(jobs), e)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for job in jobs:
                job.error = JournalUnavailable(f"journal commit failed: {e}")

    @staticmethod
    def _each_in_savepoints(conn: sqlite3.Connection, jobs: list[_Job]) -> bool:
        """Run ``jobs`` in a new transaction, each in a savepoint, recording a failing job's
        error. False if a failure ended the transaction itself (nothing of it is left)."""
        conn.execute("BEGIN IMMEDIATE")
        for job in jobs:
            conn.execute("SAVEPOINT job")
            try:
                job.result = job.fn(conn)
            except Exception as e:
                job.error = _as_unavailable(e)
                if not conn.in_transaction:
                    return False
                conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
        return True


def _run_all(conn: sqlite3.Connection, jobs: list[_Job]) -> None:
    """Every job's work, runs of alike jobs together (``GroupCommit.submit``)."""
    i = 0
    while i < len(jobs):
        job = jobs[i]
        together = job.together
        end = i + 1
        if together is not None:
            while end < len(jobs) and jobs[end].together is together:
                end += 1
        if end - i == 1 or together is None:
            job.result = job.fn(conn)
        else:
            run = jobs[i:end]
            results = together(conn, [j.arg for j in run])
            if len(results) != len(run):
                raise RuntimeError("a together function gave the wrong number of results")
            for j, result in zip(run, results, strict=True):
                j.result = result
        i = end


def _as_unavailable(e: Exception) -> JournalUnavailable:
    if isinstance(e, JournalUnavailable):
        return e
    error = JournalUnavailable(f"journal write failed: {e}")
    error.__cause__ = e
    return error


def _is_storage_error(e: BaseException | None) -> bool:
    return getattr(e, "sqlite_errorcode", 0) & 0xFF in STORAGE_ERRORS
