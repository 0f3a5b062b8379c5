"""Delivery end to end: the real server on a loopback port, the real journal, throwaway sinks.

Each test defines its sink classes inline and registers them through the same hook every sink
plugin uses. Tests wait on the router's observer hooks (``Recorder``) or on events the sinks
set; what was delivered exactly once is checked after the router has shut down, against the
sinks' own records and the journal file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import httpx
import pytest

from router import (
    Message,
    PermanentError,
    RetryableError,
    SendResult,
    Sink,
    SinkOptions,
)
from router.config import Config
from router.dispatcher import Dispatcher, SinkRunner
from router.freshcache import FRESH_BYTES, FRESH_COUNT, FRESH_ENTRY_BYTES
from router.journal.sqlite import SQLiteJournal as Journal
from router.metrics import Metrics
from router.testing import (
    Recorder,
    SinkPlugin,
    body_for,
    eventually,
    message_for,
    running_router,
)
from tests.conftest import deliveries, post, query_journal, recording_sink

pytestmark = pytest.mark.anyio

FAST = {"initial": "10ms", "max": "20ms"}


async def test_retryable_errors_are_retried_until_delivered_once(
    make_config: Callable[..., Config],
) -> None:
    calls: list[tuple[str, int]] = []

    class Flaky(Sink[SinkOptions]):
        type = "flaky"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            calls.extend((m.message_id, m.attempt) for m in batch)
            if len(calls) <= 3:
                raise RetryableError(f"not yet ({len(calls)})")
            return None

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Flaky), recorder),
        default=["flaky"],
        sinks={"flaky": {"type": "flaky", "retry": FAST}},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        r = await post(client, router.webhook_url, body_for("patient.admit", "m-1"))
        assert (r.status_code, r.content) == (200, b"")
        await recorder.wait_for(lambda r: len(r.delivered) == 1)

    assert calls == [("m-1", 1), ("m-1", 2), ("m-1", 3), ("m-1", 4)]
    assert recorder.failed == [("m-1", "flaky", "RetryableError")] * 3
    assert recorder.delivered == [("m-1", "flaky", 4)]
    assert recorder.dead == []
    assert deliveries(config) == [("m-1", "flaky", "delivered", 4, None)]


async def test_permanent_error_dead_letters_at_once(make_config: Callable[..., Config]) -> None:
    calls: list[str] = []

    class Refusing(Sink[SinkOptions]):
        type = "refusing"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            calls.extend(m.message_id for m in batch)
            raise PermanentError("HTTP 422: schema mismatch")

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Refusing), recorder),
        default=["refusing"],
        sinks={"refusing": {"type": "refusing", "retry": FAST}},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        await recorder.wait_for(lambda r: len(r.dead) == 1)

    assert calls == ["m-1"]
    assert recorder.dead == [("m-1", "refusing", "PermanentError")]
    assert recorder.failed == []
    assert recorder.delivered == []
    assert deliveries(config) == [
        ("m-1", "refusing", "dead", 1, "PermanentError: HTTP 422: schema mismatch")
    ]


async def test_exhausting_max_attempts_dead_letters(make_config: Callable[..., Config]) -> None:
    calls: list[int] = []

    class Down(Sink[SinkOptions]):
        type = "down"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            calls.extend(m.attempt for m in batch)
            raise RetryableError("connection refused")

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Down), recorder),
        default=["down"],
        sinks={"down": {"type": "down", "retry": {**FAST, "max_attempts": 3}}},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        await recorder.wait_for(lambda r: len(r.dead) == 1)

    assert calls == [1, 2, 3]
    assert recorder.failed == [("m-1", "down", "RetryableError")] * 2
    assert recorder.dead == [("m-1", "down", "RetryableError")]
    assert deliveries(config) == [("m-1", "down", "dead", 3, "RetryableError: connection refused")]


async def test_a_hanging_sink_does_not_delay_another(make_config: Callable[..., Config]) -> None:
    entered = anyio.Event()
    release = anyio.Event()
    hung: list[str] = []
    received: list[tuple[str, str, int]] = []

    class Hanging(Sink[SinkOptions]):
        type = "hanging"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            entered.set()
            await release.wait()  # hangs until the test has seen the other sink deliver
            hung.extend(m.message_id for m in batch)
            return None

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Hanging, recording_sink("quick", received)), recorder),
        default=["slow", "fast"],
        sinks={"slow": {"type": "hanging"}, "fast": {"type": "quick"}},
    )
    ids = [f"m-{i}" for i in range(5)]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for mid in ids:
            assert (
                await post(client, router.webhook_url, body_for(message_id=mid))
            ).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered_to("fast")) == len(ids))
        assert entered.is_set()
        assert hung == []  # the slow sink is still stuck in its first send
        assert sorted(mid for _, mid, _ in received) == ids
        release.set()
        await recorder.wait_for(lambda r: len(r.delivered_to("slow")) == len(ids))

    assert sorted(hung) == ids
    assert all(state == "delivered" for _, _, state, _, _ in deliveries(config))


async def test_a_send_that_times_out_is_retried(make_config: Callable[..., Config]) -> None:
    attempts: list[int] = []

    class Sluggish(Sink[SinkOptions]):
        type = "sluggish"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            attempts.extend(m.attempt for m in batch)
            if len(attempts) == 1:
                await anyio.Event().wait()  # never returns: only the timeout ends it
            return None

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Sluggish), recorder),
        default=["sluggish"],
        sinks={"sluggish": {"type": "sluggish", "timeout": "50ms", "retry": FAST}},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)

    assert attempts == [1, 2]
    assert recorder.failed == [("m-1", "sluggish", "TimeoutError")]
    assert recorder.delivered == [("m-1", "sluggish", 2)]
    assert deliveries(config) == [("m-1", "sluggish", "delivered", 2, None)]


async def test_a_batch_partial_failure_retries_only_the_failed(
    make_config: Callable[..., Config],
) -> None:
    may_open = anyio.Event()
    batches: list[list[tuple[str, int]]] = []
    bad = {"m-1", "m-4"}

    class Batching(Sink[SinkOptions]):
        type = "batching"

        async def open(self) -> None:
            await may_open.wait()  # hold deliveries back until every message is journaled

        async def send(self, batch: Sequence[Message]) -> SendResult:
            batches.append([(m.message_id, m.attempt) for m in batch])
            return {
                m.message_id: RetryableError("rejected by peer")
                for m in batch
                if m.message_id in bad and m.attempt == 1
            }

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Batching), recorder),
        default=["batching"],
        sinks={"batching": {"type": "batching", "batch_size": 10, "retry": FAST}},
    )
    ids = [f"m-{i}" for i in range(6)]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for mid in ids:
            assert (
                await post(client, router.webhook_url, body_for(message_id=mid))
            ).status_code == 200
        may_open.set()
        await recorder.wait_for(lambda r: len(r.delivered) == len(ids))

    assert sorted(batches[0]) == [(mid, 1) for mid in ids]  # one batch of all six
    later = sorted(item for batch in batches[1:] for item in batch)
    assert later == [("m-1", 2), ("m-4", 2)]
    assert sorted(recorder.failed) == [
        ("m-1", "batching", "RetryableError"),
        ("m-4", "batching", "RetryableError"),
    ]
    assert sorted(recorder.delivered) == sorted(
        (mid, "batching", 2 if mid in bad else 1) for mid in ids
    )
    assert sorted((mid, state, n) for mid, _, state, n, _ in deliveries(config)) == sorted(
        (mid, "delivered", 2 if mid in bad else 1) for mid in ids
    )


async def test_an_unexpected_exception_in_send_is_retried_not_lost(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    attempts: list[int] = []

    class Kaboom(Exception):
        pass

    class Buggy(Sink[SinkOptions]):
        type = "buggy"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            attempts.extend(m.attempt for m in batch)
            if len(attempts) == 1:
                raise Kaboom("bug in sink while handling patient Jane Doe")
            return None

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Buggy), recorder),
        default=["buggy"],
        sinks={"buggy": {"type": "buggy", "retry": FAST}},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)

    assert attempts == [1, 2]
    assert recorder.failed == [("m-1", "buggy", "Kaboom")]
    assert recorder.delivered == [("m-1", "buggy", 2)]
    assert deliveries(config) == [("m-1", "buggy", "delivered", 2, None)]
    # The retry is logged with the exception's class; its text may quote data and is not.
    assert "Kaboom" in caplog.text
    assert "Jane" not in caplog.text


async def test_fan_out_reaches_each_sink_exactly_once(make_config: Callable[..., Config]) -> None:
    received: list[tuple[str, str, int]] = []

    class Recording(Sink[SinkOptions]):
        type = "rec"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            received.extend((self.name, m.message_id, m.attempt) for m in batch)
            if self.name == "c" and batch[0].attempt == 1:
                # c's retry must not re-send a's or b's copy
                raise RetryableError("c is briefly down")
            return None

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Recording), recorder),
        # Two routes match and both name "b": it still gets the message once.
        routes=[
            {"match": "patient.*", "to": ["a", "b"]},
            {"match": ["patient.admit"], "to": ["b", "c"]},
        ],
        default=[],
        sinks={name: {"type": "rec", "retry": FAST} for name in ("a", "b", "c")},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        body = body_for("patient.admit", "m-1")
        assert (await post(client, router.webhook_url, body)).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 3)

    assert recorder.received == [("m-1", ("a", "b", "c"))]
    assert sorted(received) == [("a", "m-1", 1), ("b", "m-1", 1), ("c", "m-1", 1), ("c", "m-1", 2)]
    assert sorted(recorder.delivered) == [("m-1", "a", 1), ("m-1", "b", 1), ("m-1", "c", 2)]
    assert deliveries(config) == [
        ("m-1", "a", "delivered", 1, None),
        ("m-1", "b", "delivered", 1, None),
        ("m-1", "c", "delivered", 2, None),
    ]


async def test_a_sink_that_fails_to_open_gets_its_messages_once_open(
    make_config: Callable[..., Config],
) -> None:
    opens = 0
    may_open = anyio.Event()
    sent: list[tuple[str, str, int]] = []
    other: list[tuple[str, str, int]] = []

    class Reluctant(Sink[SinkOptions]):
        type = "reluctant"

        async def open(self) -> None:
            nonlocal opens
            opens += 1
            if opens <= 2:
                raise ConnectionRefusedError("peer not up yet")
            await may_open.wait()

        async def send(self, batch: Sequence[Message]) -> SendResult:
            sent.extend(("late", m.message_id, m.attempt) for m in batch)
            return None

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Reluctant, recording_sink("rec", other)), recorder),
        default=["late", "ok"],
        sinks={"late": {"type": "reluctant", "retry": FAST}, "ok": {"type": "rec"}},
    )
    ids = [f"m-{i}" for i in range(3)]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for mid in ids:
            assert (
                await post(client, router.webhook_url, body_for(message_id=mid))
            ).status_code == 200
        # The other sink delivers everything while this one has failed twice and is not open.
        await recorder.wait_for(lambda r: len(r.delivered_to("ok")) == len(ids))
        await eventually(lambda: opens == 3)
        assert sent == []
        may_open.set()
        await recorder.wait_for(lambda r: len(r.delivered_to("late")) == len(ids))

    assert opens == 3
    assert sorted(sent) == [("late", mid, 1) for mid in ids]
    assert sorted(other) == [("ok", mid, 1) for mid in ids]
    assert recorder.failed == []


async def test_a_type_no_route_matches_goes_to_default(make_config: Callable[..., Config]) -> None:
    received: list[tuple[str, str, int]] = []
    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(recording_sink("rec", received)), recorder),
        routes=[{"match": "medical.*", "to": ["medical"]}],
        default=["fallback"],
        sinks={"medical": {"type": "rec"}, "fallback": {"type": "rec"}},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for type_, mid in [("patient.admit", "p-1"), ("medical.document-download", "d-1")]:
            assert (await post(client, router.webhook_url, body_for(type_, mid))).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 2)

    assert sorted(received) == [("fallback", "p-1", 1), ("medical", "d-1", 1)]
    assert sorted(recorder.received) == [("d-1", ("medical",)), ("p-1", ("fallback",))]


async def test_without_default_an_unmatched_message_is_kept_unrouted(
    make_config: Callable[..., Config],
) -> None:
    received: list[tuple[str, str, int]] = []
    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(recording_sink("rec", received)), recorder),
        routes=[{"match": "medical.*", "to": ["medical"]}],
        default=[],
        sinks={"medical": {"type": "rec"}},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        r = await post(client, router.webhook_url, body_for("patient.admit", "p-1"))
        assert (r.status_code, r.content) == (200, b"")
        # A routed message sent after it, as a marker that the dispatcher has run.
        r = await post(client, router.webhook_url, body_for("medical.document-download", "d-1"))
        assert r.status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1 and len(r.received) == 2)

    assert received == [("medical", "d-1", 1)]
    assert ("p-1", ()) in recorder.received
    assert deliveries(config) == [("d-1", "medical", "delivered", 1, None)]
    journal = Journal(config.journal.path)
    await journal.open()
    try:
        assert (await journal.status()).unrouted == 1
    finally:
        await journal.close()


async def test_a_duplicate_message_id_is_delivered_once(
    make_config: Callable[..., Config],
) -> None:
    received: list[tuple[str, str, int]] = []
    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(recording_sink("rec", received)), recorder),
        default=["only"],
        sinks={"only": {"type": "rec"}},
    )
    body = body_for("patient.admit", "m-1")
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for _ in range(3):
            r = await post(client, router.webhook_url, body)
            assert (r.status_code, r.content) == (200, b"")
        # Sent after the duplicates: once it is delivered, any second copy would have been too.
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-2"))
        ).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 2)

    assert sorted(received) == [("only", "m-1", 1), ("only", "m-2", 1)]
    assert [mid for mid, _ in recorder.received] == ["m-1", "m-2"]
    rows = query_journal(
        config.journal.path, "SELECT message_id, duplicates FROM messages ORDER BY seq"
    )
    assert rows == [("m-1", 2), ("m-2", 0)]


async def test_the_sink_receives_the_body_bytes_verbatim(
    make_config: Callable[..., Config],
) -> None:
    bodies: list[bytes] = []

    class Keeping(Sink[SinkOptions]):
        type = "keeping"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            bodies.extend(m.body for m in batch)
            return None

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Keeping), recorder),
        default=["keep"],
        sinks={"keep": {"type": "keeping"}},
    )
    body = (
        b'{"meta": {"messageId":"m-1", "type":"patient.admit", "when":"2026-01-01T00:00:00Z"},'
        b'  "name": "Ren\xc3\xa9e \\u00e9" }'
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (await post(client, router.webhook_url, body)).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
    assert bodies == [body]


async def test_concurrent_workers_never_send_one_delivery_twice(
    make_config: Callable[..., Config],
) -> None:
    # Regression: a due-read snapshot taken while a worker finished used to show that
    # worker's delivery as still pending, so it was sent again with the same attempt number.
    calls: list[tuple[str, str, int]] = []

    class FailFirst(Sink[SinkOptions]):
        type = "failfirst"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            for m in batch:
                calls.append((self.name, m.message_id, m.attempt))
                if m.attempt == 1:
                    raise RetryableError("first attempt fails")
            return None

    policy = {"type": "failfirst", "concurrency": 8, "retry": {**FAST, "max_attempts": 0}}
    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(FailFirst), recorder),
        default=["a", "b"],
        sinks={"a": policy, "b": policy},
    )
    count = 40
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for i in range(count):
            assert (
                await post(client, router.webhook_url, body_for(message_id=f"m-{i}"))
            ).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 2 * count)
    assert sorted(calls) == sorted(
        (sink, f"m-{i}", attempt) for sink in "ab" for i in range(count) for attempt in (1, 2)
    )


async def test_the_fresh_message_cache_is_bounded_by_count_and_bytes(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    # Offers to a runner that takes nothing (as when its sink hangs) stay in its cache: 100k
    # small ones must not all be kept (the count bound), and larger ones are counted with
    # each entry's overhead (the bytes bound). What does not fit is read from the journal.
    config = make_config()
    cfg = config.sinks["archive"]

    def runner() -> SinkRunner:
        sink = cfg.build(config.base_dir)
        journal = Journal(tmp_path / "j")
        return SinkRunner(cfg, sink, journal, config.plugin_manager, Metrics(), "me", 30.0)

    def offer(runner: SinkRunner, seq: int, message: Message) -> None:
        if runner.has_room(message):  # what the ingress asks before claiming it at append
            runner.offer(seq, message)

    small = message_for(message_id="small")
    many = runner()
    for seq in range(1, 100_001):
        offer(many, seq, small)
    assert many.fresh.size == (FRESH_COUNT, FRESH_COUNT * (small.body_size + FRESH_ENTRY_BYTES))

    # 64 KiB with the overhead: 256 fit in FRESH_BYTES (258 would, counting bodies alone).
    large = message_for(message_id="large", body=b"x" * (64 * 1024 - FRESH_ENTRY_BYTES))
    big = runner()
    for seq in range(1, 1001):
        offer(big, seq, large)
    assert big.fresh.size == (FRESH_BYTES // (64 * 1024), FRESH_BYTES)


async def test_a_send_longer_than_the_lease_keeps_its_claim(
    make_config: Callable[..., Config],
) -> None:
    # The lease is 3 s; the send takes longer. While it runs, another router on the same
    # journal (a second connection set, as a second process would have) must never be able to
    # claim the delivery: the dispatcher renews the lease every second. Then it is delivered
    # once and the journal says so.
    started, finish = anyio.Event(), anyio.Event()
    sent: list[str] = []

    class Slow(Sink[SinkOptions]):
        type = "slow"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            started.set()
            await finish.wait()
            sent.extend(m.message_id for m in batch)
            return None

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Slow), recorder),
        sinks={"s": {"type": "slow", "timeout": "60s"}},
        default=["s"],
        journal={"path": str(Path(make_config().journal.path)), "lease": "3s"},
    )
    other = Journal(config.journal.path)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (await post(client, router.webhook_url, body_for(message_id="long-1"))).status_code
        await started.wait()
        await other.open(maintenance=False)
        try:
            taken = []
            with anyio.move_on_after(4.5):  # past the lease: only renewal keeps it held
                while not taken:
                    taken = await other.claim("s", "other-router", 10, ordered=False, lease=3)
                    await anyio.sleep(0.1)
            assert taken == []
        finally:
            await other.close()
        finish.set()
        await recorder.wait_for(lambda r: r.delivered_to("s") == ["long-1"])
    assert sent == ["long-1"]
    assert deliveries(config) == [("long-1", "s", "delivered", 1, None)]


async def test_a_lease_of_ours_that_ran_out_is_not_sent_a_second_time(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stalled process misses its renewals: its lease on a delivery it is still sending runs
    # out, and its own runner (with a free slot) claims that delivery again from the journal.
    # It must keep holding it (with the new token) without starting a second send.
    started, finish = anyio.Event(), anyio.Event()
    sends: list[str] = []

    class Hanging(Sink[SinkOptions]):
        type = "hang"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            sends.extend(m.message_id for m in batch)
            started.set()
            await finish.wait()
            return None

    async def no_renewal(self: Dispatcher) -> None:
        return None

    monkeypatch.setattr(Dispatcher, "renew", no_renewal)
    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Hanging), recorder),
        sinks={"h": {"type": "hang", "timeout": "60s", "concurrency": 2}},
        default=["h"],
        journal={"path": str(Path(make_config().journal.path)), "lease": "3s"},
    )
    other = Journal(config.journal.path)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (await post(client, router.webhook_url, body_for(message_id="once-1"))).status_code
        await started.wait()
        await other.open(maintenance=False)
        try:
            # Until the journal shows the lease taken again (token 2) by the router itself.
            with anyio.fail_after(20):
                while not (await other.status()).sinks["h"].leased:
                    await anyio.sleep(0.1)
                while router.daemon.dispatcher.runners["h"].held[1].token < 2:
                    await anyio.sleep(0.1)
        finally:
            await other.close()
        finish.set()
        await recorder.wait_for(lambda r: r.delivered_to("h") == ["once-1"])
    assert sends == ["once-1"]
    assert deliveries(config) == [("once-1", "h", "delivered", 1, None)]
