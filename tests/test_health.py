"""The commit proof behind ``/readyz`` (``router.health.CommitProbe``): one real write per
``every`` seconds however often it is asked, shared by concurrent askers, and a clear reason
when the journal cannot commit. Driven on a real SQLite journal (the write ``/readyz`` makes:
this router's lease renewal with no leases); the end-to-end cases (a journal that cannot
commit → ``/readyz`` 503 with the reason) are in tests/test_disk.py and tests/test_postgres.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from router.health import CommitProbe
from router.journal import RouterInfo
from router.journal.sqlite import SQLiteJournal

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Renewals:
    """This router's lease renewal on a real journal, counted."""

    def __init__(self, journal: SQLiteJournal) -> None:
        self.journal = journal
        self.count = 0
        self.gate: anyio.Event | None = None

    async def __call__(self) -> None:
        self.count += 1
        if self.gate is not None:
            await self.gate.wait()
        await self.journal.renew("me", 30.0, {})

    async def seen_at(self) -> float:
        routers = (await self.journal.status()).routers
        return next(seen for info, seen in routers if info.id == "me")


@pytest.fixture
async def renewals(tmp_path: Path) -> AsyncIterator[Renewals]:
    journal = SQLiteJournal(tmp_path / "journal")
    await journal.open()
    await journal.register(RouterInfo("me", "host", 1, ("s",)), 30.0)
    try:
        yield Renewals(journal)
    finally:
        await journal.close()


async def test_askers_within_a_second_share_one_write(renewals: Renewals) -> None:
    clock = Clock()
    probe = CommitProbe(every=1.0, clock=clock)
    renewals.gate = anyio.Event()
    answers: list[str | None] = []

    async def ask() -> None:
        answers.append(await probe.failure(renewals))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(ask)
        await anyio.wait_all_tasks_blocked()
        renewals.gate.set()
    assert answers == [None] * 20
    assert renewals.count == 1
    renewals.gate = None

    clock.now += 0.9
    assert await probe.failure(renewals) is None
    assert renewals.count == 1  # the answer stands
    before = await renewals.seen_at()
    clock.now += 0.1
    assert await probe.failure(renewals) is None
    assert renewals.count == 2
    assert await renewals.seen_at() >= before  # a real write: the router's row


async def test_a_journal_that_cannot_commit_is_named(renewals: Renewals) -> None:
    clock = Clock()
    probe = CommitProbe(every=1.0, clock=clock)
    await renewals.journal.close()  # every write refused from here
    assert await probe.failure(renewals) == "journal is not open"
    await renewals.journal.open()
    assert await probe.failure(renewals) == "journal is not open"  # within the second
    clock.now += 1.0
    assert await probe.failure(renewals) is None


async def test_a_commit_that_hangs_counts_as_failing(renewals: Renewals) -> None:
    probe = CommitProbe(every=1.0, timeout=0.05, clock=Clock())
    renewals.gate = anyio.Event()  # never set
    assert await probe.failure(renewals) == "journal commit did not finish within 0.05s"


async def test_an_asker_cancelled_mid_write_leaves_the_others_an_answer(
    renewals: Renewals,
) -> None:
    clock = Clock()
    probe = CommitProbe(every=1.0, clock=clock)
    renewals.gate = anyio.Event()
    first = anyio.CancelScope()
    second: list[str | None] = []

    async def ask_first() -> None:
        with first:
            await probe.failure(renewals)

    async def ask_second() -> None:
        second.append(await probe.failure(renewals))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask_first)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(ask_second)
        await anyio.wait_all_tasks_blocked()
        first.cancel()
    assert second == [None]  # the last answer (none yet: not failing), not a hang
    renewals.gate.set()
    assert await probe.failure(renewals) is None  # no answer stood: written again
    assert renewals.count == 2
