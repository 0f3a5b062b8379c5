"""The journal, driven directly on real SQLite files: storage, dedup, due order, recovery."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from router.errors import JournalUnavailable
from router.journal import Appended, Journal, Outcome
from router.message import Message
from router.testing import body_for
from tests.conftest import query_journal as query

pytestmark = pytest.mark.anyio

FUTURE = 4_000_000_000.0  # a "now" after every receive time used here


def msg(message_id: str, received_at: float = 1000.0, type_: str = "patient.admit") -> Message:
    body = body_for(type_, message_id)
    return Message(message_id, type_, "2026-01-01T00:00:00.000Z", body, received_at, "req-1")


@contextlib.asynccontextmanager
async def opened(directory: Path) -> AsyncIterator[Journal]:
    journal = Journal(directory)
    await journal.open()
    try:
        yield journal
    finally:
        await journal.close()


async def test_append_stores_body_verbatim_and_one_pending_delivery_per_sink(
    tmp_path: Path,
) -> None:
    # Bytes a re-encoding would change: spacing, key order, escapes, raw UTF-8, a trailing CRLF.
    body = (
        b'{ "z": 1,  "meta":{"type":"patient.admit","messageId":"m-1",'
        b'"when":"2026-01-01T00:00:00Z"}, "name":"Ren\xc3\xa9e \\u00e9", "a": [1 ,2]}\r\n'
    )
    message = Message("m-1", "patient.admit", "2026-01-01T00:00:00Z", body, 1000.0, "req-9")
    async with opened(tmp_path) as journal:
        appended = await journal.append(message, ["archive", "ehr"])
        assert appended == Appended(appended.seq, duplicate=False)
        loaded = await journal.messages([appended.seq])
        assert loaded[appended.seq].body == body
        assert loaded[appended.seq] == message
        for sink in ("archive", "ehr"):
            due = await journal.due(sink, FUTURE, 10, ())
            assert [(d.seq, d.attempts) for d in due] == [(appended.seq, 0)]
        assert await journal.due("other", FUTURE, 10, ()) == []

    assert query(tmp_path, "SELECT body, body_size, routed FROM messages") == [(body, len(body), 1)]
    assert query(tmp_path, "SELECT sink, state, attempts FROM deliveries ORDER BY sink") == [
        ("archive", "pending", 0),
        ("ehr", "pending", 0),
    ]


async def test_duplicate_message_id_is_counted_and_creates_no_delivery(tmp_path: Path) -> None:
    async with opened(tmp_path) as journal:
        first = await journal.append(msg("m-1"), ["archive"])
        again = await journal.append(msg("m-1", received_at=2000.0), ["archive", "ehr"])
        third = await journal.append(msg("m-1", received_at=3000.0), ["ehr"])
        assert not first.duplicate
        assert again == Appended(first.seq, duplicate=True)
        assert third == Appended(first.seq, duplicate=True)
        assert await journal.due("ehr", FUTURE, 10, ()) == []
        assert len(await journal.due("archive", FUTURE, 10, ())) == 1

    assert query(
        tmp_path, "SELECT count(*), sum(duplicates), max(last_duplicate_at) FROM messages"
    )[0] == (1, 2, 3000.0)
    assert query(tmp_path, "SELECT sink FROM deliveries") == [("archive",)]


async def test_concurrent_appends_all_succeed_and_survive_reopen(tmp_path: Path) -> None:
    n = 200
    results: dict[str, Appended] = {}

    async with opened(tmp_path) as journal:

        async def append(i: int) -> None:
            results[f"m-{i}"] = await journal.append(msg(f"m-{i}", 1000.0 + i), ["archive"])

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(append, i)

    assert len(results) == n
    assert not any(r.duplicate for r in results.values())
    assert len({r.seq for r in results.values()}) == n

    async with opened(tmp_path) as journal:
        due = await journal.due("archive", FUTURE, 1000, ())
        assert {d.seq for d in due} == {r.seq for r in results.values()}
        loaded = await journal.messages([r.seq for r in results.values()])
        for mid, r in results.items():
            assert loaded[r.seq].message_id == mid
            assert loaded[r.seq].body == body_for("patient.admit", mid)


async def test_due_is_oldest_first_and_honours_exclude_and_limit(tmp_path: Path) -> None:
    async with opened(tmp_path) as journal:
        # Appended out of time order: due() orders by due time, not by arrival in the table.
        late = await journal.append(msg("late", received_at=1030.0), ["s"])
        early = await journal.append(msg("early", received_at=1010.0), ["s"])
        middle = await journal.append(msg("middle", received_at=1020.0), ["s"])
        future = await journal.append(msg("future", received_at=5000.0), ["s"])
        await journal.append(msg("elsewhere", received_at=1000.0), ["t"])

        def seqs(due: list[Any]) -> list[int]:
            return [d.seq for d in due]

        assert seqs(await journal.due("s", 2000.0, 10, ())) == [early.seq, middle.seq, late.seq]
        assert seqs(await journal.due("s", 2000.0, 2, ())) == [early.seq, middle.seq]
        assert seqs(await journal.due("s", 2000.0, 2, {early.seq})) == [middle.seq, late.seq]
        assert seqs(await journal.due("s", 2000.0, 10, {early.seq, late.seq})) == [middle.seq]
        assert seqs(await journal.due("s", 1015.0, 10, ())) == [early.seq]
        assert seqs(await journal.due("s", 6000.0, 10, ())) == [
            early.seq,
            middle.seq,
            late.seq,
            future.seq,
        ]
        assert await journal.next_due_at("s", ()) == 1010.0
        assert await journal.next_due_at("s", {early.seq, middle.seq}) == 1030.0
        assert await journal.next_due_at("s", {early.seq, middle.seq, late.seq, future.seq}) is None
        assert await journal.next_due_at("nobody", ()) is None


async def test_outcomes_alike_recorded_together_stay_with_their_sink(tmp_path: Path) -> None:
    async with opened(tmp_path) as journal:
        a = await journal.append(msg("a"), ["s", "t"])
        b = await journal.append(msg("b"), ["s", "t"])
        c = await journal.append(msg("c"), ["s"])
        await journal.record(
            [
                Outcome(a.seq, "s", "delivered", 1),
                Outcome(b.seq, "s", "delivered", 1),
                Outcome(a.seq, "t", "pending", 1, next_attempt_at=5000.0, error="E: x"),
                Outcome(c.seq, "s", "delivered", 1),
            ]
        )
        assert await journal.due("s", FUTURE, 10, ()) == []
        due = await journal.due("t", FUTURE, 10, ())
        assert [(d.seq, d.attempts) for d in due] == [(b.seq, 0), (a.seq, 1)]  # by next attempt
        rows = query(tmp_path, "SELECT seq, sink, state, attempts, last_error FROM deliveries")
        assert sorted(rows) == [
            (a.seq, "s", "delivered", 1, None),
            (a.seq, "t", "pending", 1, "E: x"),
            (b.seq, "s", "delivered", 1, None),
            (b.seq, "t", "pending", 0, None),
            (c.seq, "s", "delivered", 1, None),
        ]


async def test_record_updates_what_is_due(tmp_path: Path) -> None:
    async with opened(tmp_path) as journal:
        a = await journal.append(msg("a", received_at=1000.0), ["s"])
        b = await journal.append(msg("b", received_at=1001.0), ["s"])
        c = await journal.append(msg("c", received_at=1002.0), ["s"])

        await journal.record(
            [
                Outcome(a.seq, "s", "delivered", 1),
                Outcome(
                    b.seq, "s", "pending", 1, next_attempt_at=3000.0, error="RetryableError: x"
                ),
            ]
        )
        due = await journal.due("s", 2000.0, 10, ())
        assert [(d.seq, d.attempts) for d in due] == [(c.seq, 0)]
        assert await journal.next_due_at("s", ()) == 1002.0

        await journal.record([Outcome(c.seq, "s", "dead", 3, 2000.0, "PermanentError: no")])
        assert await journal.due("s", 2000.0, 10, ()) == []
        assert await journal.next_due_at("s", ()) == 3000.0
        due = await journal.due("s", 3000.0, 10, ())
        assert [(d.seq, d.attempts) for d in due] == [(b.seq, 1)]

        await journal.record([Outcome(b.seq, "s", "delivered", 2)])
        assert await journal.due("s", FUTURE, 10, ()) == []
        assert await journal.next_due_at("s", ()) is None
        counts = (await journal.sink_counts())["s"]
        assert (counts.pending, counts.retrying, counts.dead) == (0, 0, 1)
        assert counts.oldest_pending_at is None

    rows = query(tmp_path, "SELECT seq, state, attempts, last_error FROM deliveries ORDER BY seq")
    assert rows == [
        (a.seq, "delivered", 1, None),
        (b.seq, "delivered", 2, None),
        (c.seq, "dead", 3, "PermanentError: no"),
    ]


async def test_pending_deliveries_are_due_again_after_reopen(tmp_path: Path) -> None:
    async with opened(tmp_path) as journal:
        done = await journal.append(msg("done"), ["s"])
        waiting = await journal.append(msg("waiting", received_at=1001.0), ["s"])
        retrying = await journal.append(msg("retrying", received_at=1002.0), ["s"])
        await journal.record(
            [
                Outcome(done.seq, "s", "delivered", 1),
                Outcome(retrying.seq, "s", "pending", 2, next_attempt_at=1500.0, error="e"),
            ]
        )

    async with opened(tmp_path) as journal:
        due = await journal.due("s", 2000.0, 10, ())
        assert [(d.seq, d.attempts) for d in due] == [(waiting.seq, 0), (retrying.seq, 2)]
        assert await journal.due("s", 1200.0, 10, ()) == [due[0]]
        # The message ids are still known: a resent message is a duplicate.
        assert (await journal.append(msg("done"), ["s"])).duplicate


async def test_dead_letter_sinks_not_in_marks_only_pending_of_removed_sinks(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as journal:
        one = await journal.append(msg("one"), ["kept", "gone", "old"])
        two = await journal.append(msg("two", received_at=1001.0), ["gone"])
        await journal.record([Outcome(two.seq, "gone", "delivered", 1)])

        found = await journal.dead_letter_sinks_not_in({"kept"}, "sink is no longer configured")
        assert found == {"gone": 1, "old": 1}
        assert [d.seq for d in await journal.due("kept", FUTURE, 10, ())] == [one.seq]
        assert await journal.due("gone", FUTURE, 10, ()) == []
        assert await journal.due("old", FUTURE, 10, ()) == []
        assert await journal.dead_letter_sinks_not_in({"kept"}, "again") == {}

    rows = query(tmp_path, "SELECT seq, sink, state, last_error FROM deliveries ORDER BY seq, sink")
    assert rows == [
        (one.seq, "gone", "dead", "sink is no longer configured"),
        (one.seq, "kept", "pending", None),
        (one.seq, "old", "dead", "sink is no longer configured"),
        (two.seq, "gone", "delivered", None),
    ]


async def test_unrouted_messages_are_kept_and_counted(tmp_path: Path) -> None:
    async with opened(tmp_path) as journal:
        assert await journal.unrouted_count() == 0
        lost = await journal.append(msg("lost"), [])
        await journal.append(msg("routed"), ["s"])
        assert not lost.duplicate
        assert await journal.unrouted_count() == 1
        assert (await journal.messages([lost.seq]))[lost.seq].body == body_for(
            "patient.admit", "lost"
        )
        assert (await journal.append(msg("lost"), [])).duplicate
        assert await journal.unrouted_count() == 1

    assert query(tmp_path, "SELECT message_id, routed FROM messages ORDER BY seq") == [
        ("lost", 0),
        ("routed", 1),
    ]
    assert query(tmp_path, "SELECT count(*) FROM deliveries WHERE seq = ?", lost.seq) == [(0,)]


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
        assert await journal.due("t", FUTURE, 10, ()) == []
        assert len(await journal.due("s", FUTURE, 10, ())) == 1

        # Once space is back the same message is stored as new.
        await journal._write(lambda c: c.execute("PRAGMA max_page_count=1073741823"))
        assert not (await journal.append(big, ["s", "t"])).duplicate
        assert len(await journal.due("t", FUTURE, 10, ())) == 1


async def test_a_closed_journal_refuses_writes(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    with pytest.raises(JournalUnavailable, match="not open"):
        await journal.append(msg("m"), ["s"])
    await journal.open()
    await journal.close()
    with pytest.raises(JournalUnavailable, match="not open"):
        await journal.append(msg("m"), ["s"])


async def test_a_file_that_is_not_a_database_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(b"this is not a journal, just some text an operator left here\n" * 100)
    journal = Journal(tmp_path)
    with pytest.raises(JournalUnavailable) as info:
        await journal.open()
    text = str(info.value)
    assert str(path) in text
    assert "not a database" in text
    assert not journal.healthy
    await journal.close()
    # The file is left as it was: nothing was written over it.
    assert path.read_bytes().startswith(b"this is not a journal")


async def test_concurrent_appends_store_each_id_once(tmp_path: Path) -> None:
    async with opened(tmp_path) as journal:
        results: dict[str, list[Appended]] = {}

        async def append(i: int) -> None:
            message_id = f"m{i % 7}"
            appended = await journal.append(msg(message_id, 1000.0 + i), ["s"])
            results.setdefault(message_id, []).append(appended)

        async with anyio.create_task_group() as tg:
            for i in range(70):
                tg.start_soon(append, i)
        for appended in results.values():
            assert len(appended) == 10
            assert sum(not a.duplicate for a in appended) == 1
            assert len({a.seq for a in appended}) == 1
        assert len(query(tmp_path, "SELECT seq FROM deliveries")) == 7


async def in_one_batch(journal: Journal, writes: list[Callable[[], Awaitable[object]]]) -> None:
    """Run ``writes`` concurrently so that the writer thread takes them as one batch: it is
    held by a job of its own until all of them are queued behind it."""
    entered, gate = threading.Event(), threading.Event()

    def hold(conn: object) -> None:
        entered.set()
        gate.wait(30)

    writer = journal._writer
    assert writer is not None
    async with anyio.create_task_group() as tg:
        tg.start_soon(journal._write, hold)
        await anyio.to_thread.run_sync(entered.wait, 30)
        for write in writes:
            tg.start_soon(write)
        while writer._jobs.qsize() < len(writes):
            await anyio.sleep(0)
        gate.set()


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
        assert len(await journal.due("s", FUTURE, 10, ())) == 2


# -- disk space ----------------------------------------------------------------------------------


def files_on_disk(directory: Path) -> int:
    """Bytes of every file under ``directory``, as ``du --apparent-size`` counts them."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


async def fill_and_sweep(journal: Journal, count: int) -> None:
    """Store ``count`` messages with 4 KiB bodies, deliver them all, sweep them all away."""
    filler = "x" * 4096
    for start in range(0, count, 500):
        appended = await in_parallel(
            [
                lambda i=i: journal.append(  # type: ignore[misc]
                    Message(f"m-{i}", "patient.admit", None, body_for(filler=filler), 1000.0),
                    ["archive"],
                )
                for i in range(start, min(count, start + 500))
            ]
        )
        await journal.record(Outcome(a.seq, "archive", "delivered", 1) for a in appended)
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
        assert [d.seq for d in await journal.due("archive", FUTURE, 10, ())] == [1]
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
        assert journal.size_bytes() == files_on_disk(tmp_path)
        assert journal.size_bytes() > 1_000_000
