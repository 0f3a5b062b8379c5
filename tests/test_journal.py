"""The journal's contract (``router.journal.base``), proven on every backend alike.

Each test talks to the journal only through the base class's methods, on a ``journal_store``
parametrised over ``JOURNAL_BACKENDS`` (tests/conftest.py): storage, dedupe, due order,
recovery after reopening, retention, dead letters of removed sinks, claims with leases and
fencing tokens, ordered lanes, several routers on one store, the operator methods. Two journal
objects on one store stand for two routers. What only one backend has (SQLite's file, its disk
and damage cases) is in tests/test_journal_sqlite.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence

import anyio
import pytest

from router.errors import JournalUnavailable
from router.journal import (
    FIRST_TOKEN,
    Appended,
    Claim,
    Filter,
    Journal,
    Outcome,
    RouterInfo,
)
from router.message import Message
from router.testing import body_for
from tests.conftest import JournalStore

pytestmark = pytest.mark.anyio

FUTURE = 4_000_000_000.0  # a "now" after every receive time used here
LONG = 600.0  # a lease no test outlives
SHORT = 0.2  # a lease a test waits out (by polling for its end, never by sleeping)
#: The longest a test waits for a short lease to end, on a slow, busy machine.
WITHIN = 30.0


def msg(
    message_id: str, received_at: float = 1000.0, type_: str = "patient.admit", key: str = ""
) -> Message:
    body = body_for(type_, message_id)
    return Message(
        message_id, type_, "2026-01-01T00:00:00.000Z", body, received_at, "req-1", order_key=key
    )


@contextlib.asynccontextmanager
async def opened(store: JournalStore) -> AsyncIterator[Journal]:
    """A journal object of its own on ``store``, open for the block."""
    journal = store.journal()
    await journal.open()
    try:
        yield journal
    finally:
        await journal.close()


@pytest.fixture
async def journal(journal_store: JournalStore) -> AsyncIterator[Journal]:
    async with opened(journal_store) as journal:
        yield journal


@pytest.fixture
async def other(journal_store: JournalStore, journal: Journal) -> AsyncIterator[Journal]:
    """A second journal object on the same store: another router's."""
    async with opened(journal_store) as second:
        yield second


async def claim(
    journal: Journal,
    sink: str,
    owner: str = "r1",
    limit: int = 100,
    *,
    ordered: bool = False,
    lease: float = LONG,
) -> list[Claim]:
    """``journal.claim``, the claims by row (which ones, not their order, is the contract)."""
    claims = await journal.claim(sink, owner, limit, ordered=ordered, lease=lease)
    return sorted(claims, key=lambda c: c.seq)


async def seqs(journal: Journal, sink: str, owner: str = "r1", **kw: object) -> list[int]:
    """Claim what can be claimed of ``sink`` and return the rows."""
    return [c.seq for c in await claim(journal, sink, owner, **kw)]  # type: ignore[arg-type]


def delivered(sink: str, claims: Sequence[Claim]) -> list[Outcome]:
    return [Outcome(c.seq, sink, "delivered", c.attempts + 1, c.token) for c in claims]


def failed(sink: str, c: Claim, delay: float = 0.0, error: str = "RetryableError: x") -> Outcome:
    return Outcome(c.seq, sink, "pending", c.attempts + 1, c.token, delay=delay, error=error)


async def claim_within(
    journal: Journal, sink: str, owner: str, *, ordered: bool = False, limit: int = 100
) -> list[Claim]:
    """Claim until something is claimed (a lease ending, a router going away); fail after
    ``WITHIN`` seconds."""
    with anyio.fail_after(WITHIN):
        while True:
            claims = await claim(journal, sink, owner, limit, ordered=ordered)
            if claims:
                return claims
            await anyio.sleep(0.02)


# -- ingest ------------------------------------------------------------------------------------


async def test_append_stores_body_verbatim_and_one_pending_delivery_per_sink(
    journal: Journal,
) -> None:
    # Bytes a re-encoding would change: spacing, key order, escapes, raw UTF-8, a trailing CRLF.
    body = (
        b'{ "z": 1,  "meta":{"type":"patient.admit","messageId":"m-1",'
        b'"when":"2026-01-01T00:00:00Z"}, "name":"Ren\xc3\xa9e \\u00e9", "a": [1 ,2]}\r\n'
    )
    message = Message("m-1", "patient.admit", "2026-01-01T00:00:00Z", body, 1000.0, "req-9")
    appended = await journal.append(message, ["archive", "ehr"])
    assert appended == Appended(appended.seq, duplicate=False)
    loaded = await journal.messages([appended.seq])
    assert loaded[appended.seq].body == body
    assert loaded[appended.seq] == message
    counts = await journal.sink_counts()
    assert {s: (c.pending, c.retrying, c.dead) for s, c in counts.items()} == {
        "archive": (1, 0, 0),
        "ehr": (1, 0, 0),
    }
    assert counts["archive"].oldest_pending_at == 1000.0
    for sink in ("archive", "ehr"):
        assert [(c.seq, c.attempts) for c in await claim(journal, sink)] == [(appended.seq, 0)]
    assert await claim(journal, "other") == []
    status = await journal.status()
    assert (status.messages, status.unrouted, status.duplicates) == (1, 0, 0)
    assert status.size_bytes > 0


async def test_duplicate_message_id_is_counted_and_creates_no_delivery(journal: Journal) -> None:
    first = await journal.append(msg("m-1"), ["archive"])
    again = await journal.append(msg("m-1", received_at=2000.0), ["archive", "ehr"])
    third = await journal.append(msg("m-1", received_at=3000.0), ["ehr"], claim_for={"ehr"})
    assert not first.duplicate
    assert again == Appended(first.seq, duplicate=True)
    assert third == Appended(first.seq, duplicate=True)  # nothing claimed either
    assert await claim(journal, "ehr") == []
    assert await seqs(journal, "archive") == [first.seq]
    status = await journal.status()
    assert (status.messages, status.duplicates) == (1, 2)
    assert set(status.sinks) == {"archive"}


async def test_unrouted_messages_are_kept_and_counted(journal: Journal) -> None:
    assert (await journal.status()).unrouted == 0
    lost = await journal.append(msg("lost"), [])
    await journal.append(msg("routed"), ["s"])
    assert not lost.duplicate
    assert (await journal.status()).unrouted == 1
    assert (await journal.messages([lost.seq]))[lost.seq].body == body_for("patient.admit", "lost")
    assert (await journal.append(msg("lost"), [])).duplicate
    status = await journal.status()
    assert (status.messages, status.unrouted) == (2, 1)
    assert set(status.sinks) == {"s"}


async def test_concurrent_appends_all_succeed_and_survive_reopen(
    journal_store: JournalStore,
) -> None:
    n = 200
    results: dict[str, Appended] = {}

    async with opened(journal_store) as journal:

        async def append(i: int) -> None:
            results[f"m-{i}"] = await journal.append(msg(f"m-{i}", 1000.0 + i), ["archive"])

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(append, i)

    assert len(results) == n
    assert not any(r.duplicate for r in results.values())
    assert len({r.seq for r in results.values()}) == n

    async with opened(journal_store) as journal:
        assert set(await seqs(journal, "archive", limit=1000)) == {r.seq for r in results.values()}
        loaded = await journal.messages([r.seq for r in results.values()])
        for mid, r in results.items():
            assert loaded[r.seq].message_id == mid
            assert loaded[r.seq].body == body_for("patient.admit", mid)


async def test_concurrent_appends_of_one_id_store_it_once(journal: Journal) -> None:
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
    assert len(await claim(journal, "s")) == 7
    assert (await journal.status()).duplicates == 63


async def test_one_id_appended_through_two_journals_is_stored_once_and_answered_after_commit(
    journal_store: JournalStore, journal: Journal, other: Journal
) -> None:
    """Two routers receive the same message at the same moment: one stores it, the other
    counts a duplicate, and neither returns before the row is durable (a third connection
    sees it as soon as either append returns)."""
    async with opened(journal_store) as reader:
        results: dict[str, list[Appended]] = {}

        async def append(via: Journal, i: int) -> None:
            appended = await via.append(msg(f"m-{i}", 1000.0 + i), ["s"])
            # Returned: committed, so visible to anyone.
            assert appended.seq in await reader.messages([appended.seq])
            results.setdefault(f"m-{i}", []).append(appended)

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(append, journal, i)
                tg.start_soon(append, other, i)

        assert len(results) == 60
        for appended in results.values():
            assert len(appended) == 2
            assert sum(not a.duplicate for a in appended) == 1
            assert len({a.seq for a in appended}) == 1
        assert len(await claim(reader, "s")) == 60
        status = await reader.status()
        assert (status.messages, status.duplicates) == (60, 60)


async def test_a_closed_journal_refuses_writes(journal_store: JournalStore) -> None:
    journal = journal_store.journal()
    assert (journal.healthy, journal.last_error) == (False, "journal is not open")
    with pytest.raises(JournalUnavailable):
        await journal.append(msg("m"), ["s"])
    await journal.open()
    assert (journal.healthy, journal.last_error) == (True, None)
    await journal.close()
    assert (journal.healthy, journal.last_error) == (False, "journal is not open")
    with pytest.raises(JournalUnavailable):
        await journal.append(msg("m"), ["s"])


async def test_empty_requests_are_answered_without_touching_anything(journal: Journal) -> None:
    assert await journal.messages([]) == {}
    assert await journal.record([]) == 0
    await journal.release("s", [])
    await journal.renew("r1", LONG, {})
    await journal.renew("r1", LONG, {"s": []})
    await journal.retry_dead([])
    await journal.purge_dead([])
    await journal.redeliver([])
    assert await journal.dead_letter_orphaned(set(), "removed") == {}
    assert await journal.sweep(retention=0.0, now=FUTURE) == 0
    assert await journal.dead_letters(Filter()) == []
    assert await journal.stored_messages(0.0, FUTURE) == []
    assert await journal.sink_counts() == {}
    status = await journal.status(ordered=["s"])
    assert (status.messages, status.unrouted, status.duplicates, status.sinks) == (0, 0, 0, {})


async def test_opening_without_create_refuses_a_store_with_no_journal(
    journal_store: JournalStore,
) -> None:
    """What the operator commands do: they never create a journal where there is none."""
    for _ in range(2):  # a refused open leaves nothing behind that a second would accept
        journal = journal_store.journal()
        with pytest.raises(JournalUnavailable):
            await journal.open(maintenance=False, create=False)
        await journal.close()
    async with opened(journal_store) as journal:
        appended = await journal.append(msg("m"), ["s"])
    journal = journal_store.journal()
    await journal.open(maintenance=False, create=False)
    try:
        assert await seqs(journal, "s") == [appended.seq]
    finally:
        await journal.close()


# -- due order, outcomes, recovery ---------------------------------------------------------


async def test_claims_take_the_oldest_due_first_up_to_the_limit(journal: Journal) -> None:
    first = await journal.append(msg("first"), ["s"])
    second = await journal.append(msg("second", received_at=1001.0), ["s"])
    third = await journal.append(msg("third", received_at=1002.0), ["s"])
    await journal.append(msg("elsewhere"), ["t"])
    held = {c.seq: c for c in await claim(journal, "s")}
    # Failed, and due again in the order third, first, second: not the order of their rows.
    # (Delays before the database's now: all due at once, without waiting.)
    await journal.record(
        [
            failed("s", held[third.seq], delay=-30.0),
            failed("s", held[first.seq], delay=-20.0),
            failed("s", held[second.seq], delay=-10.0),
        ]
    )
    taken = await claim(journal, "s", limit=2)
    assert sorted(c.seq for c in taken) == sorted([third.seq, first.seq])
    assert all(c.attempts == 1 for c in taken)
    assert await seqs(journal, "s") == [second.seq]
    assert await claim(journal, "s") == []  # all leased now
    assert len(await claim(journal, "t")) == 1


async def test_outcomes_alike_recorded_together_stay_with_their_sink(journal: Journal) -> None:
    a = await journal.append(msg("a"), ["s", "t"])
    b = await journal.append(msg("b"), ["s", "t"])
    c = await journal.append(msg("c"), ["s"])
    on_s = await claim(journal, "s")
    on_t = {x.seq: x for x in await claim(journal, "t")}
    assert await journal.record([*delivered("s", on_s), failed("t", on_t[a.seq])]) == 4
    assert await claim(journal, "s") == []
    await journal.release("t", [on_t[b.seq]])
    # Both due again on t: b (never attempted, due since its receipt) before a (due from now).
    assert [(x.seq, x.attempts) for x in await claim(journal, "t", limit=1)] == [(b.seq, 0)]
    assert [(x.seq, x.attempts) for x in await claim(journal, "t")] == [(a.seq, 1)]
    counts = await journal.sink_counts()
    assert (counts["t"].pending, counts["t"].retrying) == (1, 1)
    assert "s" not in counts or (counts["s"].pending, counts["s"].retrying) == (0, 0)
    assert (await journal.status()).last_errors == {"t": "RetryableError: x"}
    assert c.seq in {x.seq for x in on_s}


async def test_outcomes_decide_what_is_due_next(journal: Journal) -> None:
    a = await journal.append(msg("a", received_at=1000.0), ["s"])
    b = await journal.append(msg("b", received_at=1001.0), ["s"])
    c = await journal.append(msg("c", received_at=1002.0), ["s"])
    held = {x.seq: x for x in await claim(journal, "s")}
    stored = await journal.record(
        [
            *delivered("s", [held[a.seq]]),
            failed("s", held[b.seq], delay=3600.0),
            Outcome(c.seq, "s", "dead", 3, held[c.seq].token, error="PermanentError: no"),
        ]
    )
    assert stored == 3
    assert await claim(journal, "s") == []  # b waits an hour, c is dead
    due_in = await journal.next_due_in("s", ordered=False)
    assert due_in is not None and 3000.0 < due_in <= 3600.0
    counts = (await journal.sink_counts())["s"]
    assert (counts.pending, counts.retrying, counts.dead, counts.leased) == (0, 1, 1, 0)
    assert counts.oldest_pending_at == 1001.0
    letters = await journal.dead_letters(Filter())
    assert [(d.seq, d.sink, d.attempts, d.error) for d in letters] == [
        (c.seq, "s", 3, "PermanentError: no")
    ]


async def test_pending_deliveries_are_due_again_after_reopen(journal_store: JournalStore) -> None:
    async with opened(journal_store) as journal:
        done = await journal.append(msg("done"), ["s"])
        waiting = await journal.append(msg("waiting", received_at=1001.0), ["s"])
        retrying = await journal.append(msg("retrying", received_at=1002.0), ["s"])
        held = {x.seq: x for x in await claim(journal, "s")}
        await journal.record(
            [
                *delivered("s", [held[done.seq]]),
                Outcome(retrying.seq, "s", "pending", 2, held[retrying.seq].token),
            ]
        )
        await journal.release("s", [held[waiting.seq]])

    async with opened(journal_store) as journal:
        due = await claim(journal, "s")
        assert [(d.seq, d.attempts) for d in due] == [(waiting.seq, 0), (retrying.seq, 2)]
        # The message ids are still known: a resent message is a duplicate.
        assert (await journal.append(msg("done"), ["s"])).duplicate


# -- claims, leases, fencing ---------------------------------------------------------------


async def test_two_owners_claiming_at_once_never_get_the_same_delivery(
    journal: Journal, other: Journal
) -> None:
    n = 300
    appended = [await journal.append(msg(f"m-{i}", 1000.0 + i), ["s"]) for i in range(n)]
    taken: dict[int, list[str]] = {}

    async def take(via: Journal, owner: str) -> None:
        for c in await claim(via, "s", owner, limit=7):
            taken.setdefault(c.seq, []).append(owner)

    # Rounds of eight claims at once, four through each journal, until nothing is left.
    while len(taken) < n:
        before = len(taken)
        async with anyio.create_task_group() as tg:
            for k in range(4):
                tg.start_soon(take, journal, f"a{k}")
                tg.start_soon(take, other, f"b{k}")
        assert len(taken) > before

    assert sorted(taken) == sorted(a.seq for a in appended)
    assert [seq for seq, owners in taken.items() if len(owners) > 1] == []
    # Both journals took part (the store, not one object's memory, decides).
    owners = {o for held in taken.values() for o in held}
    assert any(o.startswith("a") for o in owners) and any(o.startswith("b") for o in owners)


async def test_append_claims_for_the_receiving_router(journal: Journal, other: Journal) -> None:
    appended = await journal.append(msg("m"), ["a", "b"], claim_for={"a"}, owner="r1")
    assert appended.claimed == ("a",)
    assert await claim(other, "a", "r2") == []  # leased to r1 already
    assert await seqs(other, "b", "r2") == [appended.seq]
    counts = (await other.sink_counts())["a"]
    assert (counts.leased, counts.holders) == (1, ("r1",))
    # r1 records with the first token, without claiming.
    outcome = Outcome(appended.seq, "a", "delivered", 1, FIRST_TOKEN)
    assert await journal.record([outcome]) == 1
    assert await claim(other, "a", "r2") == []


async def test_an_outcome_with_a_stale_token_changes_nothing(
    journal: Journal, other: Journal
) -> None:
    appended = await journal.append(msg("m"), ["s"])
    (mine,) = await claim(journal, "s", "r1", lease=SHORT)
    # r1 stalls past its lease; r2 takes the delivery over, with a newer token.
    (theirs,) = await claim_within(other, "s", "r2")
    assert theirs.seq == appended.seq and theirs.token > mine.token
    # r1 wakes up: its outcome, its release and its renewal are all ignored.
    assert await journal.record(delivered("s", [mine])) == 0
    await journal.release("s", [mine])
    await journal.renew("r1", LONG, {"s": [mine.seq]})
    assert await claim(journal, "s", "r3") == []  # still r2's
    counts = (await journal.sink_counts())["s"]
    assert (counts.pending, counts.leased, counts.holders) == (1, 1, ("r2",))
    assert await other.record([failed("s", theirs, delay=3600.0)]) == 1
    counts = (await journal.sink_counts())["s"]
    assert (counts.pending, counts.retrying, counts.leased) == (0, 1, 0)


async def test_renew_keeps_a_claim_past_its_lease_and_an_unrenewed_one_expires(
    journal: Journal, other: Journal
) -> None:
    kept = await journal.append(msg("kept"), ["s"])
    dropped = await journal.append(msg("dropped", received_at=1001.0), ["s"])
    held = await claim(journal, "s", "r1", lease=SHORT)
    assert [c.seq for c in held] == [kept.seq, dropped.seq]
    # A long send: r1 renews only what it still holds in memory.
    await journal.renew("r1", LONG, {"s": [kept.seq]})
    taken = await claim_within(other, "s", "r2")
    assert [c.seq for c in taken] == [dropped.seq]
    assert await claim(other, "s", "r2") == []  # the renewed one stays r1's
    assert await journal.record(delivered("s", [c for c in held if c.seq == kept.seq])) == 1


async def test_released_claims_can_be_claimed_by_anyone_at_once(
    journal: Journal, other: Journal
) -> None:
    appended = await journal.append(msg("m"), ["s"])
    held = await claim(journal, "s", "r1")
    await journal.release("s", held)
    (again,) = await claim(other, "s", "r2")
    assert again.seq == appended.seq and again.token > held[0].token
    assert again.attempts == 0  # a release is not an attempt


async def test_next_due_in_counts_retries_and_leases(journal: Journal) -> None:
    assert await journal.next_due_in("s", ordered=False) is None
    await journal.append(msg("m"), ["s"])
    assert await journal.next_due_in("s", ordered=False) == 0.0
    (held,) = await claim(journal, "s", lease=LONG)
    due_in = await journal.next_due_in("s", ordered=False)  # from the lease's end
    assert due_in is not None and LONG - 100 < due_in <= LONG
    await journal.release("s", [held])
    assert await journal.next_due_in("s", ordered=False) == 0.0
    (held,) = await claim(journal, "s")
    await journal.record([failed("s", held, delay=3600.0)])
    due_in = await journal.next_due_in("s", ordered=False)
    assert due_in is not None and 3000.0 < due_in <= 3600.0
    assert await claim(journal, "s") == []
    assert await journal.next_due_in("other", ordered=False) is None


# -- ordered sinks -------------------------------------------------------------------------


async def test_an_ordered_sink_hands_out_only_the_head_of_each_lane(journal: Journal) -> None:
    p1 = [await journal.append(msg(f"p1-{i}", 1000.0 + i, key="p1"), ["s"]) for i in range(3)]
    p2 = await journal.append(msg("p2-0", 1010.0, key="p2"), ["s"])

    heads = await claim(journal, "s", ordered=True)
    assert [c.seq for c in heads] == [p1[0].seq, p2.seq]
    # A leased head blocks its lane: nothing behind it can be claimed.
    assert await claim(journal, "s", "r2", ordered=True) == []
    due_in = await journal.next_due_in("s", ordered=True)
    assert due_in is not None and due_in > LONG - 100

    # A failed head keeps blocking its lane (and shows as a blocked lane).
    first = next(c for c in heads if c.seq == p1[0].seq)
    await journal.record([failed("s", first), *delivered("s", [c for c in heads if c != first])])
    status = await journal.status(ordered=["s"])
    assert status.sinks["s"].blocked_lanes == 1
    assert (await journal.status()).sinks["s"].blocked_lanes == 0  # counted for ordered sinks
    (retry,) = await claim(journal, "s", "r2", ordered=True)
    assert (retry.seq, retry.attempts) == (p1[0].seq, 1)
    await journal.record([failed("s", retry, delay=3600.0)])
    assert await claim(journal, "s", "r2", ordered=True) == []
    due_in = await journal.next_due_in("s", ordered=True)  # the head's retry, not the rest
    assert due_in is not None and 3000.0 < due_in <= 3600.0


async def test_an_ordered_lane_moves_on_once_its_head_is_delivered(journal: Journal) -> None:
    lane = [await journal.append(msg(f"m-{i}", 1000.0 + i, key="p1"), ["s"]) for i in range(3)]
    order = []
    while claims := await claim(journal, "s", ordered=True):
        assert len(claims) == 1
        order.append(claims[0].seq)
        if len(order) == 1:  # the first fails once first
            await journal.record([failed("s", claims[0])])
            (claims[0],) = await claim(journal, "s", ordered=True)
            assert claims[0].seq == order[0]
            assert (await journal.status(ordered=["s"])).sinks["s"].blocked_lanes == 1
        await journal.record(delivered("s", claims))
    assert order == [a.seq for a in lane]
    done = (await journal.status(ordered=["s"])).sinks.get("s")
    assert done is None or (done.pending, done.retrying, done.blocked_lanes) == (0, 0, 0)
    # Unordered, the same sink would have handed out all three at once.
    more = [await journal.append(msg(f"n-{i}", 2000.0 + i, key="p1"), ["t"]) for i in range(3)]
    assert await seqs(journal, "t") == [a.seq for a in more]


# -- several routers -----------------------------------------------------------------------


def router(rid: str, *sinks: str, pid: int | None = None) -> RouterInfo:
    return RouterInfo(rid, socket.gethostname(), os.getpid() if pid is None else pid, sinks)


async def test_a_sink_known_to_a_live_router_is_not_dead_lettered(
    journal: Journal, other: Journal
) -> None:
    """A rolling configuration change: r2 already has sink b, r1 not yet. r1's clean-up must
    leave b's deliveries alone while r2 lives, and dead-letter them once it is gone."""
    await journal.register(router("r1", "a"), LONG)
    await other.register(router("r2", "a", "b"), LONG)
    one = await journal.append(msg("one"), ["a", "b", "c"])

    assert await journal.dead_letter_orphaned({"a"}, "sink is no longer configured") == {"c": 1}
    assert await seqs(other, "b", "r2") == [one.seq]
    status = await journal.status()
    assert sorted((r.id, r.sinks) for r, _ in status.routers) == [
        ("r1", ("a",)),
        ("r2", ("a", "b")),
    ]

    await other.unregister("r2")  # released its claim on b too
    assert await journal.dead_letter_orphaned({"a"}, "gone") == {"b": 1}
    assert await journal.dead_letter_orphaned({"a"}, "again") == {}
    letters = await journal.dead_letters(Filter())
    assert sorted((d.sink, d.error) for d in letters) == [
        ("b", "gone"),
        ("c", "sink is no longer configured"),
    ]
    assert await seqs(journal, "a") == [one.seq]
    assert [r.id for r, _ in (await journal.status()).routers] == ["r1"]


async def test_a_router_that_stops_renewing_no_longer_keeps_its_sinks(
    journal: Journal, other: Journal
) -> None:
    await other.register(router("r2", "a", "b"), LONG)
    await journal.append(msg("one"), ["b"])
    assert await journal.dead_letter_orphaned({"a"}, "removed") == {}
    await other.register(router("r2", "a", "b"), SHORT)  # then r2 is cut off
    with anyio.fail_after(WITHIN):
        while not (found := await journal.dead_letter_orphaned({"a"}, "removed")):
            await anyio.sleep(0.02)
    assert found == {"b": 1}
    assert (await journal.status()).routers == []


async def test_renew_keeps_a_router_alive(journal: Journal, other: Journal) -> None:
    await other.register(router("r2", "b"), SHORT)
    await journal.append(msg("one"), ["b"])
    with anyio.fail_after(WITHIN):
        while (await journal.status()).routers:  # r2 has not renewed in time
            await anyio.sleep(0.02)
    await other.renew("r2", LONG, {})
    assert [r.id for r, _ in (await journal.status()).routers] == ["r2"]
    assert await journal.dead_letter_orphaned(set(), "removed") == {}


async def test_unregister_releases_what_the_router_held(journal: Journal, other: Journal) -> None:
    await other.register(router("r2", "s"), LONG)
    appended = await other.append(msg("m"), ["s", "t"], claim_for={"s", "t"}, owner="r2")
    assert await claim(journal, "s", "r1") == []
    await other.unregister("r2")
    assert await seqs(journal, "s", "r1") == [appended.seq]
    assert await seqs(journal, "t", "r1") == [appended.seq]


async def test_register_releases_the_claims_of_a_gone_process_on_this_host(
    journal: Journal, other: Journal
) -> None:
    """A router restarted on the same host takes its predecessor's work at once, without
    waiting for the leases to end."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(gone.stdout)
    await other.register(router("old", "s", pid=dead_pid), LONG)
    appended = await other.append(msg("m"), ["s"], claim_for={"s"}, owner="old")
    assert await claim(journal, "s", "new") == []
    await journal.register(router("new", "s"), LONG)
    assert await seqs(journal, "s", "new") == [appended.seq]


# -- retention -----------------------------------------------------------------------------


async def test_sweep_removes_only_old_messages_whose_every_delivery_is_done(
    journal: Journal,
) -> None:
    done = await journal.append(msg("done", received_at=1000.0), ["s", "t"])
    half = await journal.append(msg("half", received_at=1001.0), ["s", "t"])
    dead = await journal.append(msg("dead", received_at=1002.0), ["s"])
    unrouted = await journal.append(msg("unrouted", received_at=1003.0), [])
    recent = await journal.append(msg("recent", received_at=5000.0), ["s"])
    on_s = {c.seq: c for c in await claim(journal, "s")}
    on_t = {c.seq: c for c in await claim(journal, "t")}
    await journal.record(
        [
            *delivered("s", [on_s[done.seq], on_s[half.seq], on_s[recent.seq]]),
            *delivered("t", [on_t[done.seq]]),
            Outcome(dead.seq, "s", "dead", 1, on_s[dead.seq].token, error="PermanentError: x"),
        ]
    )
    await journal.release("t", [on_t[half.seq]])

    # Received before 5050 - 100: done, half, dead, unrouted; of those only done is all done.
    assert await journal.sweep(retention=100.0, now=5050.0) == 1
    found = await journal.messages([done.seq, half.seq, dead.seq, unrouted.seq, recent.seq])
    assert sorted(found) == sorted([half.seq, dead.seq, unrouted.seq, recent.seq])
    assert await journal.sweep(retention=100.0, now=5050.0) == 0
    # The id of a swept message is forgotten: sent again, it is new.
    assert not (await journal.append(msg("done"), ["s"])).duplicate
    # Everything done and old enough goes, in batches.
    await journal.record(delivered("t", await claim(journal, "t")))
    await journal.purge_dead(await journal.dead_letters(Filter()))
    await journal.record(delivered("s", await claim(journal, "s")))
    assert await journal.sweep(retention=0.0, now=FUTURE, batch=1) == 4
    status = await journal.status()
    assert (status.messages, status.unrouted) == (1, 1)


# -- operator ------------------------------------------------------------------------------


async def test_dead_letters_can_be_listed_retried_and_purged(journal: Journal) -> None:
    ids = ["a", "b", "c"]
    rows = {i: await journal.append(msg(i, 1000.0 + n), ["s", "t"]) for n, i in enumerate(ids)}
    for sink in ("s", "t"):
        held = await claim(journal, sink)
        await journal.record(
            [
                Outcome(c.seq, sink, "dead", 5, c.token, error=f"PermanentError: {sink}")
                for c in held
            ]
        )
    every = await journal.dead_letters(Filter())
    assert len(every) == 6
    assert {(d.message_id, d.type, d.sink, d.attempts) for d in every} == {
        (i, "patient.admit", s, 5) for i in ids for s in ("s", "t")
    }
    on_t = await journal.dead_letters(Filter(sinks=["t"], ids=["a", "c"]))
    assert sorted((d.message_id, d.sink, d.error) for d in on_t) == [
        ("a", "t", "PermanentError: t"),
        ("c", "t", "PermanentError: t"),
    ]
    await journal.retry_dead(on_t)
    retried = await claim(journal, "t")
    assert [(c.seq, c.attempts) for c in retried] == [(rows["a"].seq, 0), (rows["c"].seq, 0)]
    await journal.record(delivered("t", retried))
    assert len(await journal.dead_letters(Filter())) == 4

    await journal.purge_dead(await journal.dead_letters(Filter(sinks=["s"])))
    remaining = await journal.dead_letters(Filter())
    assert [(d.message_id, d.sink) for d in remaining] == [("b", "t")]
    counts = await journal.sink_counts()
    assert "s" not in counts or counts["s"].dead == 0
    assert counts["t"].dead == 1
    assert (await journal.status()).messages == 3  # purging a dead letter keeps the message


async def test_stored_messages_and_redeliver_replay_what_was_received(journal: Journal) -> None:
    first = await journal.append(msg("first", 1000.0, key="p1"), ["s"])
    second = await journal.append(msg("second", 1500.0, type_="medical.document-download"), [])
    await journal.append(msg("later", 3000.0), ["s"])
    await journal.record(delivered("s", await claim(journal, "s")))

    stored = await journal.stored_messages(900.0, 2000.0)
    assert [(m.seq, m.type, m.order_key) for m in stored] == [
        (first.seq, "patient.admit", "p1"),
        (second.seq, "medical.document-download", ""),
    ]
    assert await journal.stored_messages(1000.0, 1000.0) == []
    assert [m.seq for m in await journal.stored_messages(1000.0, 1000.5)] == [first.seq]

    await journal.redeliver([(stored[0], ["s", "new"]), (stored[1], ["s"])])
    again = await claim(journal, "s")
    assert [(c.seq, c.attempts) for c in again] == [(first.seq, 0), (second.seq, 0)]
    assert await seqs(journal, "new") == [first.seq]
    assert (await journal.status()).unrouted == 0  # the unrouted one is routed now


async def test_status_shows_leases_and_their_holders(journal: Journal, other: Journal) -> None:
    await journal.register(router("r1", "s"), LONG)
    await other.register(router("r2", "s"), LONG)
    for i in range(4):
        await journal.append(msg(f"m-{i}", 1000.0 + i), ["s"])
    await claim(journal, "s", "r1", limit=1)
    await claim(other, "s", "r2", limit=2)
    status = await other.status()
    counts = status.sinks["s"]
    assert (counts.pending, counts.leased, counts.holders) == (4, 3, ("r1", "r2"))
    assert counts.oldest_pending_at == 1000.0
    assert {r.id for r, _ in status.routers} == {"r1", "r2"}
    assert status.messages == 4 and status.size_bytes > 0
