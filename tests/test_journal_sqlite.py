"""What only the SQLite backend has: its file, and what a full disk or a damaged file does to
it. Everything else the journal promises is proven on every backend in tests/test_journal.py;
these tests reach into the SQLite file and its writer on purpose."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from router.errors import JournalUnavailable
from router.journal import Appended, Claim, Outcome
from router.journal.sqlite import SCHEMA_VERSION, WRITER_CACHE_KIB, SQLiteJournal
from router.message import Message
from router.testing import body_for
from tests.conftest import query_journal as query

pytestmark = pytest.mark.anyio

FUTURE = 4_000_000_000.0  # a "now" after every receive time used here


def msg(message_id: str, received_at: float = 1000.0, type_: str = "patient.admit") -> Message:
    body = body_for(type_, message_id)
    return Message(message_id, type_, "2026-01-01T00:00:00.000Z", body, received_at, "req-1")


@contextlib.asynccontextmanager
async def opened(directory: Path) -> AsyncIterator[SQLiteJournal]:
    journal = SQLiteJournal(directory)
    await journal.open()
    try:
        yield journal
    finally:
        await journal.close()


async def pending(journal: SQLiteJournal, sink: str) -> list[Claim]:
    """Claim every due delivery of ``sink`` (and so see what is pending)."""
    return await journal.claim(sink, "test", 1000, ordered=False, lease=600.0)


async def test_a_journal_that_cannot_write_refuses_and_stores_nothing(tmp_path: Path) -> None:
    # A real write failure, the same SQLITE_FULL a full disk gives. File permissions cannot be
    # used: tests may run as root, which writes through them, and the writer connection holds an
    # open descriptor anyway. Instead we cap the database at its current size with SQLite's own
    # `max_page_count` limit on the writer connection (the only connection that writes), so a
    # message that needs new pages genuinely fails to be written.
    async with opened(tmp_path) as journal:
        await journal.append(msg("before"), ["s"])
        pages = await journal._write(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await journal._write(lambda c: c.execute(f"PRAGMA max_page_count={pages}"))

        big = Message("big", "patient.admit", None, b"{" + b" " * 200_000 + b"}", 1001.0)
        with pytest.raises(JournalUnavailable, match="full"):
            await journal.append(big, ["s", "t"])

        # Nothing half-stored: no message row, no delivery, and the id is not taken.
        assert [m for (m,) in query(tmp_path, "SELECT message_id FROM messages")] == ["before"]
        assert await pending(journal, "t") == []
        assert len(await pending(journal, "s")) == 1

        # Once space is back the same message is stored as new.
        await journal._write(lambda c: c.execute("PRAGMA max_page_count=1073741823"))
        assert not (await journal.append(big, ["s", "t"])).duplicate
        assert len(await pending(journal, "t")) == 1


async def test_a_journal_with_a_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    async with opened(tmp_path) as journal:
        await journal.append(msg("m-1"), ["s"])
    with contextlib.closing(sqlite3.connect(tmp_path / "journal.sqlite3")) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    for maintenance in (True, False):
        journal = SQLiteJournal(tmp_path)
        with pytest.raises(JournalUnavailable) as info:
            await journal.open(maintenance=maintenance)
        assert f"schema {SCHEMA_VERSION + 1}, newer" in str(info.value)
        assert "upgrade webhook-router" in str(info.value)
        await journal.close()
    assert query(tmp_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert query(tmp_path, "SELECT message_id FROM messages") == [("m-1",)]


async def test_a_schema_1_journal_is_migrated_to_claims_keeping_its_deliveries(
    tmp_path: Path,
) -> None:
    """Journals written before claims and leases (schema 1) have no lease columns."""
    async with opened(tmp_path) as journal:
        kept = await journal.append(msg("kept"), ["s"])
    with contextlib.closing(sqlite3.connect(tmp_path / "journal.sqlite3")) as conn:
        conn.execute("DROP INDEX deliveries_leased")
        for column in ("lease_owner", "lease_until", "token"):
            conn.execute(f"ALTER TABLE deliveries DROP COLUMN {column}")
        conn.execute("PRAGMA user_version=1")
    async with opened(tmp_path) as journal:
        (held,) = await pending(journal, "s")
        assert (held.seq, held.attempts) == (kept.seq, 0)
        assert await journal.record([Outcome(held.seq, "s", "delivered", 1, held.token)]) == 1
        assert (await journal.append(msg("kept"), ["s"])).duplicate
    assert query(tmp_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert query(tmp_path, "SELECT state, lease_owner FROM deliveries") == [("delivered", None)]


async def test_a_file_that_is_not_a_database_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(b"this is not a journal, just some text an operator left here\n" * 100)
    journal = SQLiteJournal(tmp_path)
    with pytest.raises(JournalUnavailable) as info:
        await journal.open()
    text = str(info.value)
    assert str(path) in text
    assert "not a database" in text
    assert not journal.healthy
    await journal.close()
    # The file is left as it was: nothing was written over it.
    assert path.read_bytes().startswith(b"this is not a journal")


async def in_one_batch(
    journal: SQLiteJournal, writes: list[Callable[[], Awaitable[object]]]
) -> None:
    """Run ``writes`` concurrently so that the writer thread takes them as one batch: it is
    held by a job of its own until all of them are queued behind it."""
    entered, gate = threading.Event(), threading.Event()

    def hold(conn: object) -> None:
        entered.set()
        gate.wait(30)

    writer = journal._writer
    assert writer is not None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_awaited, journal._write(hold))
        await anyio.to_thread.run_sync(entered.wait, 30)
        for write in writes:
            tg.start_soon(write)
        while writer._jobs.qsize() < len(writes):
            await anyio.sleep(0)
        gate.set()


async def _awaited(future: Awaitable[object]) -> None:
    await future


async def test_a_write_refused_for_want_of_space_fails_alone_in_its_batch(tmp_path: Path) -> None:
    async with opened(tmp_path) as journal:
        await journal.append(msg("before"), ["s"])
        pages = await journal._write(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await journal._write(lambda c: c.execute(f"PRAGMA max_page_count={pages + 8}"))
        big = Message("big", "patient.admit", None, b"{" + b" " * 200_000 + b"}", 1001.0)
        outcomes: dict[str, Appended | BaseException] = {}

        def append(message: Message) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                try:
                    outcomes[message.message_id] = await journal.append(message, ["s"])
                except JournalUnavailable as e:
                    outcomes[message.message_id] = e

            return run

        await in_one_batch(journal, [append(m) for m in (msg("ok-1"), big, msg("ok-2"))])
        assert isinstance(outcomes["big"], JournalUnavailable) and "full" in str(outcomes["big"])
        assert isinstance(outcomes["ok-1"], Appended) and isinstance(outcomes["ok-2"], Appended)
        stored = sorted(m for (m,) in query(tmp_path, "SELECT message_id FROM messages"))
        assert stored == ["before", "ok-1", "ok-2"]


async def test_only_a_batch_with_something_durable_in_it_is_fsynced(tmp_path: Path) -> None:
    """Outcomes and claims may be lost to a power failure (the delivery is made again): a batch
    of them alone is committed with ``synchronous=NORMAL``, no fsync. A batch with anything
    else in it (an append: a message acknowledged once committed) keeps FULL."""

    def synchronous(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    full, normal = 2, 1
    async with opened(tmp_path) as journal:
        assert await journal._write(synchronous) == full
        assert await journal._write(synchronous, durable=False) == normal
        seen: list[int] = []

        def job(durable: bool) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                seen.append(await journal._write(synchronous, durable=durable))

            return run

        await in_one_batch(journal, [job(False), job(True), job(False)])
        assert seen == [full, full, full]
        await in_one_batch(journal, [job(False), job(False)])
        assert seen[3:] == [normal, normal]
        # What the journal's own writes ask for: an append, durable; an outcome, not.
        writer = journal._writer
        assert writer is not None
        appended = await journal.append(msg("m-1"), ["s"], claim_for={"s"}, owner="me")
        assert writer._synchronous == "FULL"
        await journal.record([Outcome(appended.seq, "s", "delivered", 1, 1)])
        assert writer._synchronous == "NORMAL"
        await journal.claim("s", "me", 10, ordered=False, lease=30.0)
        assert writer._synchronous == "NORMAL"


async def test_appends_in_one_batch_are_stored_together_as_one_at_a_time_would(
    tmp_path: Path,
) -> None:
    """A batch's appends are made in two statements (``_append_many``): each still gets its
    own answer, sequence numbers keep the order they were queued in, a duplicate of an
    earlier message or of one in the same batch is a duplicate, claims are as asked."""
    async with opened(tmp_path) as journal:
        before = await journal.append(msg("before"), ["a"])
        answers: list[tuple[str, Appended]] = []

        def append(message_id: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                got = await journal.append(
                    msg(message_id), ["a", "b"], claim_for={"a"}, owner="me", lease=60.0
                )
                answers.append((message_id, got))

            return run

        await in_one_batch(journal, [append(m) for m in ("m-1", "before", "m-2", "m-3")])
        got = dict(answers)
        assert got["before"] == Appended(before.seq, duplicate=True)
        assert all(not got[m].duplicate and got[m].claimed == ("a",) for m in ("m-1", "m-2", "m-3"))
        answers.clear()
        await in_one_batch(journal, [append(m) for m in ("m-4", "m-4", "m-1")])  # a repeat in it
        assert sorted((m, a.duplicate) for m, a in answers) == [
            ("m-1", True),
            ("m-4", False),
            ("m-4", True),
        ]
        seqs = dict(query(tmp_path, "SELECT message_id, seq FROM messages"))
        assert seqs["before"] < seqs["m-1"] < seqs["m-2"] < seqs["m-3"] < seqs["m-4"]
        assert {m: got[m].seq for m in ("m-1", "m-2", "m-3")} == {
            m: seqs[m] for m in ("m-1", "m-2", "m-3")
        }
        rows = query(
            tmp_path,
            "SELECT m.message_id, d.sink, d.lease_owner, d.lease_until IS NOT NULL"
            " FROM deliveries d JOIN messages m USING (seq) ORDER BY d.seq, d.sink",
        )
        assert rows == [
            ("before", "a", None, 0),
            *[
                (m, s, "me" if s == "a" else None, int(s == "a"))
                for m in ("m-1", "m-2", "m-3", "m-4")
                for s in ("a", "b")
            ],
        ]
        dups = dict(query(tmp_path, "SELECT message_id, duplicates FROM messages"))
        assert dups == {"before": 1, "m-1": 1, "m-2": 0, "m-3": 0, "m-4": 1}


async def test_when_a_failed_write_ends_the_transaction_the_others_are_made_again(
    tmp_path: Path,
) -> None:
    """SQLite may undo the whole transaction when a write fails (full disk, I/O error): the
    writes before it in the batch are undone too, so they are made again, without it."""
    async with opened(tmp_path) as journal:
        failed: list[BaseException] = []

        def undone_by_sqlite(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO messages (message_id, type, received_at, body_size, routed)"
                " VALUES ('half', 't', 1, 0, 0)"
            )
            conn.execute("ROLLBACK")  # what SQLite does itself in such a case
            raise sqlite3.OperationalError("database or disk is full")

        async def failing() -> None:
            try:
                await journal._write(undone_by_sqlite)
            except JournalUnavailable as e:
                failed.append(e)

        await in_one_batch(
            journal,
            [
                lambda: journal.append(msg("ok-1"), ["s"]),
                failing,
                lambda: journal.append(msg("ok-2"), ["s"]),
            ],
        )
        assert len(failed) == 1 and "full" in str(failed[0])
        stored = sorted(m for (m,) in query(tmp_path, "SELECT message_id FROM messages"))
        assert stored == ["ok-1", "ok-2"]
        assert len(await pending(journal, "s")) == 2


# -- disk space ----------------------------------------------------------------------------------


def files_on_disk(directory: Path) -> int:
    """Bytes of every file under ``directory``, as ``du --apparent-size`` counts them."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


async def fill_and_sweep(journal: SQLiteJournal, count: int) -> None:
    """Store ``count`` messages with 4 KiB bodies, deliver them all, sweep them all away."""
    filler = "x" * 4096
    for start in range(0, count, 500):
        await in_parallel(
            [
                lambda i=i: journal.append(  # type: ignore[misc]
                    Message(f"m-{i}", "patient.admit", None, body_for(filler=filler), 1000.0),
                    ["archive"],
                )
                for i in range(start, min(count, start + 500))
            ]
        )
        claims = await pending(journal, "archive")
        await journal.record(Outcome(c.seq, "archive", "delivered", 1, c.token) for c in claims)
    assert await journal.sweep(retention=0, now=FUTURE) == count


async def in_parallel(calls: list[Callable[[], Awaitable[Appended]]]) -> list[Appended]:
    results: list[Appended] = []

    async def one(call: Callable[[], Awaitable[Appended]]) -> None:
        results.append(await call())

    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(one, call)
    return results


async def test_retention_gives_the_space_of_swept_messages_back(tmp_path: Path) -> None:
    async with opened(tmp_path) as journal:
        await fill_and_sweep(journal, 2000)  # about 9 MB of bodies
        ((free,),) = query(tmp_path, "PRAGMA freelist_count")
        assert free == 0
    # Closing checkpoints the write-ahead log into the database, which then shrinks.
    assert files_on_disk(tmp_path) < 1_000_000
    ((mode,),) = query(tmp_path, "PRAGMA auto_vacuum")
    assert mode == 2  # INCREMENTAL


async def test_a_journal_made_without_auto_vacuum_is_vacuumed_once_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(tmp_path) as journal:
        await journal.append(msg("m-1"), ["archive"])
    # What earlier versions made: the switch to WAL came first, so auto_vacuum stayed off.
    with contextlib.closing(sqlite3.connect(tmp_path / "journal.sqlite3")) as conn:
        conn.execute("PRAGMA auto_vacuum=NONE")
        conn.execute("VACUUM")
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    caplog.set_level(logging.INFO, logger="router")
    async with opened(tmp_path) as journal:
        assert (await journal.sink_counts())["archive"].pending == 1
    assert query(tmp_path, "PRAGMA auto_vacuum") == [(2,)]
    assert "journal-vacuum " in caplog.text
    assert "journal-vacuumed " in caplog.text
    caplog.clear()
    async with opened(tmp_path) as journal:
        await fill_and_sweep(journal, 500)
    assert "journal-vacuum" not in caplog.text  # once
    assert files_on_disk(tmp_path) < 500_000


async def test_size_bytes_counts_the_database_its_log_and_every_stored_body(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as journal:
        await journal.append(msg("m-1"), ["archive"])
        journal.bodies.mkdir()
        (journal.bodies / "a.json").write_bytes(b"{}" * 300_000)
        (journal.bodies / "b.json").write_bytes(b"{}" * 200_000)
        assert (tmp_path / "journal.sqlite3-wal").stat().st_size > 0
        # Not the -shm index: it exists only while the file is open.
        shm = (tmp_path / "journal.sqlite3-shm").stat().st_size
        assert await journal.size_bytes() == files_on_disk(tmp_path) - shm
        assert await journal.size_bytes() > 1_000_000


async def test_a_sweep_cancelled_at_its_commit_still_removes_the_bodies_it_swept(
    tmp_path: Path,
) -> None:
    """A shutdown cancels the retention sweep wherever it is. Once its delete is committed,
    the stored bodies of the deleted messages must go too: nothing refers to them any more,
    and another router on the journal keeps the next start from clearing them."""
    async with opened(tmp_path) as journal:
        journal.bodies.mkdir()
        path = journal.bodies / "big.json"
        body = body_for("patient.admit", "big")
        path.write_bytes(body)
        big = Message(
            "big", "patient.admit", None, None, 1000.0, body_file=path, body_size=len(body)
        )
        await journal.append(big, ["s"])
        (held,) = await pending(journal, "s")
        await journal.record([Outcome(held.seq, "s", "delivered", 1, held.token)])

        entered, gate = threading.Event(), threading.Event()

        def hold(conn: object) -> None:
            entered.set()
            gate.wait(30)

        writer = journal._writer
        assert writer is not None
        sweeping = anyio.CancelScope()

        async def sweep() -> None:
            with sweeping:
                await journal.sweep(retention=0, now=FUTURE)

        async with anyio.create_task_group() as tg:
            tg.start_soon(_awaited, journal._write(hold))
            await anyio.to_thread.run_sync(entered.wait, 30)
            tg.start_soon(sweep)
            while writer._jobs.qsize() < 1:  # the sweep's delete is queued behind ``hold``
                await anyio.sleep(0)
            sweeping.cancel()  # the shutdown
            gate.set()
        await journal._write(lambda conn: None)  # everything queued before is committed
        assert await journal.messages([held.seq]) == {}
        assert not path.exists(), "the swept message's body was left behind"


async def test_the_writer_keeps_a_page_cache_larger_than_sqlites_default(tmp_path: Path) -> None:
    """SQLite's 2 MiB cache is smaller than the indexes a busy journal's inserts touch (each
    miss is a read of the file): the writer's connection is given ``WRITER_CACHE_KIB``."""
    async with opened(tmp_path) as journal:
        size = await journal._write(lambda c: c.execute("PRAGMA cache_size").fetchone()[0])
        assert size == -WRITER_CACHE_KIB


async def test_the_writer_thread_is_named_for_top_and_ps(tmp_path: Path) -> None:
    """``top -H`` and ``ps -L`` tell the journal's writer from the event loop's thread (and the
    benchmark charges each its CPU)."""
    async with opened(tmp_path) as journal:
        assert journal._writer is not None
        tid = journal._writer._thread.native_id
        await journal._write(lambda conn: None)  # (the thread has started its loop)
        assert Path(f"/proc/self/task/{tid}/comm").read_text().strip() == "journal-writer"
