"""Reload (what SIGHUP does), in-process: the configuration file is rewritten and
``RunningRouter.reload()`` switches to it.

The promise under test: a reload never re-routes what was already accepted, never loses a
pending delivery (it continues to a sink that still exists, or is dead-lettered with a reason
when its sink was removed), lets deliveries in flight finish once, and an invalid new
configuration changes nothing. Sinks are defined inline and record which instance (and which
option value) handled each delivery; the journal file is read after the router has stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from router import (
    Message,
    RetryableError,
    SendResult,
    Sink,
    SinkContext,
    SinkOptions,
    hookimpl,
)
from router.config import Config, load_config
from router.dispatcher import SinkRunner
from router.testing import (
    Recorder,
    SinkPlugin,
    body_for,
    eventually,
    post_signed,
    running_router,
    write_config,
)
from tests.conftest import TEST_KEY, base_config, deliveries, post

pytestmark = pytest.mark.anyio

FAST = {"initial": "10ms", "max": "20ms", "max_attempts": 0}
SECOND_KEY = "second-webhook-key-for-rotation"


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """A reload may reconfigure the root logger (``log:`` section): restore it afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class TagOptions(SinkOptions):
    tag: str = "v1"


@dataclass(frozen=True)
class Sent:
    sink: str
    tag: str
    instance: int
    message_id: str
    attempt: int
    ok: bool


@dataclass
class Tracker:
    """What the ``tracking`` sinks did, across every instance a test's reloads create."""

    opened: list[tuple[str, int, str]] = field(default_factory=list)
    closed: list[tuple[str, int, str]] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    #: Sends by instances with one of these tags raise ``RetryableError``.
    failing_tags: set[str] = field(default_factory=set)
    #: ``retry_after`` of those errors (None: the sink's backoff policy).
    retry_after: float | None = None
    #: The first attempt of a message whose id ends with this fails (retries under load).
    fail_first_suffix: str | None = None
    #: A send by an instance with this tag waits for ``release`` (after setting ``entered``).
    hold_tag: str | None = None
    entered: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)
    #: Message ids of held sends that were cancelled instead of released.
    cancelled: list[str] = field(default_factory=list)
    #: ("open" | "close", sink, tag) in the order they happened.
    lifecycle: list[tuple[str, str, str]] = field(default_factory=list)

    def delivered(self, sink: str) -> list[str]:
        return [s.message_id for s in self.sent if s.sink == sink and s.ok]

    def sink_class(self) -> type[Sink[Any]]:
        tracker = self
        counter = itertools.count(1)

        class Tracking(Sink[TagOptions]):
            type = "tracking"
            Options = TagOptions

            def __init__(self, options: TagOptions, context: SinkContext) -> None:
                super().__init__(options, context)
                self.instance = next(counter)

            async def open(self) -> None:
                tracker.opened.append((self.name, self.instance, self.options.tag))
                tracker.lifecycle.append(("open", self.name, self.options.tag))

            async def close(self) -> None:
                tracker.closed.append((self.name, self.instance, self.options.tag))
                tracker.lifecycle.append(("close", self.name, self.options.tag))

            async def send(self, batch: Sequence[Message]) -> SendResult:
                tag = self.options.tag
                if tag == tracker.hold_tag:
                    tracker.entered.set()
                    try:
                        await tracker.release.wait()
                    except anyio.get_cancelled_exc_class():
                        tracker.cancelled.extend(m.message_id for m in batch)
                        raise
                ok = tag not in tracker.failing_tags and not any(
                    tracker.fail_first_suffix is not None
                    and m.message_id.endswith(tracker.fail_first_suffix)
                    and m.attempt == 1
                    for m in batch
                )
                tracker.sent.extend(
                    Sent(self.name, tag, self.instance, m.message_id, m.attempt, ok) for m in batch
                )
                if not ok:
                    raise RetryableError(f"{self.name} is down", retry_after=tracker.retry_after)
                return None

        return Tracking


def tracking(tag: str = "v1", **common: Any) -> dict[str, Any]:
    return {"type": "tracking", "tag": tag, **common}


class Setup:
    """Writes the configuration file (``base_config`` + overrides) and loads it with the
    test's plugins; ``rewrite`` writes the next version for a reload."""

    def __init__(self, tmp_path: Path, *plugins: object) -> None:
        self.tmp_path = tmp_path
        self.plugins = plugins

    def rewrite(self, **overrides: Any) -> Path:
        return write_config(self.tmp_path, base_config(self.tmp_path, **overrides))

    def load(self, **overrides: Any) -> Config:
        return load_config(self.rewrite(**overrides), extra_plugins=self.plugins)


def rows_by_message(config: Config) -> dict[str, dict[str, str]]:
    """{message id: {sink: state}} from the journal file."""
    out: dict[str, dict[str, str]] = {}
    for mid, sink, state, _, _ in deliveries(config):
        out.setdefault(mid, {})[sink] = state
    return out


async def test_new_routes_apply_to_messages_accepted_after_the_reload(tmp_path: Path) -> None:
    tracker, recorder = Tracker(), Recorder()
    setup = Setup(tmp_path, SinkPlugin(tracker.sink_class()), recorder)
    config = setup.load(
        routes=[{"match": "patient.*", "to": ["a"]}], default=[], sinks={"a": tracking()}
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for type_, mid in [("patient.admit", "before-1"), ("medical.x", "before-unrouted")]:
            assert (await post(client, router.webhook_url, body_for(type_, mid))).status_code == 200
        await recorder.wait_for(lambda r: "before-1" in r.delivered_to("a"))

        setup.rewrite(
            routes=[{"match": "patient.*", "to": ["a", "b"]}],
            default=["b"],
            sinks={"a": tracking(), "b": tracking()},
        )
        assert await router.reload() is True
        for type_, mid in [("patient.admit", "after-1"), ("medical.x", "after-default")]:
            assert (await post(client, router.webhook_url, body_for(type_, mid))).status_code == 200
        await recorder.wait_for(
            lambda r: (
                {"after-1", "after-default"} <= set(r.delivered_to("b"))
                and "after-1" in r.delivered_to("a")
            )
        )

    assert sorted(recorder.received) == [
        ("after-1", ("a", "b")),
        ("after-default", ("b",)),
        ("before-1", ("a",)),
        ("before-unrouted", ()),
    ]
    assert rows_by_message(config) == {
        "before-1": {"a": "delivered"},
        "after-1": {"a": "delivered", "b": "delivered"},
        "after-default": {"b": "delivered"},
    }
    assert sorted(tracker.delivered("a")) == ["after-1", "before-1"]
    assert sorted(tracker.delivered("b")) == ["after-1", "after-default"]


INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "unknown key": (
        {"journal": {"path": "journal", "retension": "1d"}},
        "journal.retension: unknown key",
    ),
    "missing env secret": (
        {"auth": {"keys": [{"env": "WR_TEST_UNSET_RELOAD_KEY"}]}},
        "environment variable WR_TEST_UNSET_RELOAD_KEY is not set",
    ),
    "route to unknown sink": (
        {"routes": [{"match": "patient.*", "to": ["b", "nowhere"]}]},
        "route sends to unknown sink 'nowhere'",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
async def test_an_invalid_config_is_refused_and_the_old_one_keeps_working(
    tmp_path: Path,
    case: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.delenv("WR_TEST_UNSET_RELOAD_KEY", raising=False)
    tracker, recorder = Tracker(), Recorder()
    setup = Setup(tmp_path, SinkPlugin(tracker.sink_class()), recorder)
    config = setup.load(default=["a"], sinks={"a": tracking()})
    overrides, problem = INVALID[case]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        runner = router.daemon.dispatcher.runners["a"]
        # Besides the problem, the new file adds a sink and routes everything to it: none of
        # that may take effect.
        bad = {"routes": [{"match": "*", "to": ["b"]}], **overrides}
        setup.rewrite(default=["b"], sinks={"a": tracking("v2"), "b": tracking()}, **bad)
        assert await router.reload() is False
        assert problem in caplog.text
        assert "reload-refused" in caplog.text

        assert router.daemon.config is config
        assert router.daemon.dispatcher.runners == {"a": runner}
        r = await post(client, router.webhook_url, body_for("patient.admit", "after"))
        assert r.status_code == 200
        await recorder.wait_for(lambda r: r.delivered_to("a") == ["after"])

    assert recorder.received == [("after", ("a",))]
    assert [(s.sink, s.tag, s.message_id) for s in tracker.sent] == [("a", "v1", "after")]
    assert [(name, tag) for name, _, tag in tracker.opened] == [("a", "v1")]
    assert rows_by_message(config) == {"after": {"a": "delivered"}}


async def test_a_removed_sinks_pending_deliveries_are_dead_lettered_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tracker, recorder = Tracker(failing_tags={"down"}, retry_after=3600), Recorder()
    setup = Setup(tmp_path, SinkPlugin(tracker.sink_class()), recorder)
    config = setup.load(default=["a", "gone"], sinks={"a": tracking(), "gone": tracking("down")})
    ids = ["m-1", "m-2", "m-3"]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for mid in ids:
            assert (
                await post(client, router.webhook_url, body_for(message_id=mid))
            ).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered_to("a")) == 3 and len(r.failed) == 3)

        setup.rewrite(default=["a"], sinks={"a": tracking()})
        assert await router.reload() is True
        assert "gone" not in router.daemon.dispatcher.runners

    rows = deliveries(config)
    assert sorted((mid, sink, state, error) for mid, sink, state, _, error in rows) == sorted(
        [(mid, "a", "delivered", None) for mid in ids]
        + [(mid, "gone", "dead", "sink removed from the configuration") for mid in ids]
    )
    assert [(name, tag) for name, _, tag in tracker.closed if name == "gone"] == [("gone", "down")]
    assert "sink=gone count=3" in caplog.text


async def test_a_changed_sinks_pending_deliveries_continue_to_its_new_instance(
    tmp_path: Path,
) -> None:
    tracker, recorder = Tracker(failing_tags={"v1"}), Recorder()
    setup = Setup(tmp_path, SinkPlugin(tracker.sink_class()), recorder)
    config = setup.load(default=["s"], sinks={"s": tracking("v1", retry=FAST)})
    ids = ["m-1", "m-2", "m-3"]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for mid in ids:
            assert (
                await post(client, router.webhook_url, body_for(message_id=mid))
            ).status_code == 200
        await recorder.wait_for(lambda r: {mid for mid, _, _ in r.failed} == set(ids))
        old = router.daemon.dispatcher.runners["s"]

        setup.rewrite(default=["s"], sinks={"s": tracking("v2", retry=FAST)})
        assert await router.reload() is True
        assert router.daemon.dispatcher.runners["s"] is not old
        await eventually(lambda: [(n, tag) for n, _, tag in tracker.closed] == [("s", "v1")])
        await recorder.wait_for(lambda r: sorted(r.delivered_to("s")) == ids)

    (v1,) = {s.instance for s in tracker.sent if s.tag == "v1"}
    successes = [s for s in tracker.sent if s.ok]
    assert sorted(s.message_id for s in successes) == ids  # each exactly once
    (instance,) = {(s.tag, s.instance) for s in successes}  # one instance delivered them all
    assert instance[0] == "v2" and instance[1] > v1  # the new runner's
    assert all(s.attempt > 1 for s in successes)  # the attempts went on from where they were
    assert not any(s.ok for s in tracker.sent if s.tag == "v1")
    assert rows_by_message(config) == {mid: {"s": "delivered"} for mid in ids}


async def test_an_unchanged_sink_keeps_its_runner_and_connection(tmp_path: Path) -> None:
    tracker, recorder = Tracker(), Recorder()
    setup = Setup(tmp_path, SinkPlugin(tracker.sink_class()), recorder)
    config = setup.load(
        default=["keep", "other"], sinks={"keep": tracking("k"), "other": tracking("o1")}
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 2)
        keep = router.daemon.dispatcher.runners["keep"]

        setup.rewrite(
            default=["keep", "other", "extra"],
            sinks={"keep": tracking("k"), "other": tracking("o2"), "extra": tracking("e")},
        )
        assert await router.reload() is True
        runners = router.daemon.dispatcher.runners
        assert runners["keep"] is keep
        assert isinstance(runners["extra"], SinkRunner)
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-2"))
        ).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 5)
        assert [(n, tag) for n, _, tag in tracker.opened if n == "keep"] == [("keep", "k")]
        assert [n for n, _, _ in tracker.closed] == ["other"]

    keep_instances = {s.instance for s in tracker.sent if s.sink == "keep"}
    assert len(keep_instances) == 1  # m-1 and m-2 went through the same sink object
    assert sorted(tracker.delivered("keep")) == ["m-1", "m-2"]
    assert [(s.tag, s.message_id) for s in tracker.sent if s.sink == "other"] == [
        ("o1", "m-1"),
        ("o2", "m-2"),
    ]
    assert tracker.delivered("extra") == ["m-2"]


async def test_key_rotation_by_reload(tmp_path: Path) -> None:
    recorder = Recorder()
    setup = Setup(tmp_path, recorder)
    config = setup.load()  # keys: [TEST_KEY]
    auth = {"accept": ["signature"]}

    async def status(client: httpx.AsyncClient, url: str, key: str) -> int:
        return (await post_signed(client, url, body_for(), key)).status_code

    async with running_router(config) as router, httpx.AsyncClient() as client:
        url = router.webhook_url
        assert (await status(client, url, TEST_KEY), await status(client, url, SECOND_KEY)) == (
            200,
            401,
        )
        setup.rewrite(auth={**auth, "keys": [TEST_KEY, SECOND_KEY]})
        assert await router.reload() is True
        assert (await status(client, url, TEST_KEY), await status(client, url, SECOND_KEY)) == (
            200,
            200,
        )
        setup.rewrite(auth={**auth, "keys": [SECOND_KEY]})
        assert await router.reload() is True
        old = await post_signed(client, url, body_for(), TEST_KEY)
        assert (old.status_code, old.content) == (401, b"")
        assert await status(client, url, SECOND_KEY) == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 4)


async def test_a_reload_changing_a_busy_sink_switches_at_once_and_hands_over_once(
    tmp_path: Path,
) -> None:
    # The send in flight when its sink changes holds the reload up no longer: the reload
    # returns while it is held, lets it finish (not cancelled), and a message accepted
    # meanwhile goes to the successor, which opens only once the old instance is closed.
    tracker, recorder = Tracker(hold_tag="v1"), Recorder()
    setup = Setup(tmp_path, SinkPlugin(tracker.sink_class()), recorder)
    config = setup.load(default=["s"], sinks={"s": tracking("v1", retry=FAST)})
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        with anyio.fail_after(10):
            await tracker.entered.wait()
        old = router.daemon.dispatcher.runners["s"]
        setup.rewrite(default=["s"], sinks={"s": tracking("v2", retry=FAST)})

        assert await router.reload() is True
        assert old.stopping  # retiring in the background ...
        assert (tracker.sent, tracker.cancelled) == ([], [])  # ... its send still in flight
        assert router.daemon.dispatcher.runners["s"] is not old
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-2"))
        ).status_code == 200
        assert tracker.lifecycle == [("open", "s", "v1")]  # the successor waits
        tracker.release.set()
        await recorder.wait_for(lambda r: sorted(r.delivered_to("s")) == ["m-1", "m-2"])

    assert [(s.tag, s.message_id, s.attempt, s.ok) for s in tracker.sent] == [
        ("v1", "m-1", 1, True),
        ("v2", "m-2", 1, True),
    ]
    assert tracker.cancelled == []
    assert tracker.lifecycle == [
        ("open", "s", "v1"),
        ("close", "s", "v1"),
        ("open", "s", "v2"),
        ("close", "s", "v2"),
    ]
    assert sorted(recorder.delivered) == [("m-1", "s", 1), ("m-2", "s", 1)]
    assert recorder.failed == []
    assert deliveries(config) == [
        ("m-1", "s", "delivered", 1, None),
        ("m-2", "s", "delivered", 1, None),
    ]


async def test_a_busy_sink_changed_twice_in_a_row_hands_over_once(tmp_path: Path) -> None:
    # v2 is replaced before it ever started (v1 still busy): v3 waits for v1, not for v2.
    tracker, recorder = Tracker(hold_tag="v1"), Recorder()
    setup = Setup(tmp_path, SinkPlugin(tracker.sink_class()), recorder)
    config = setup.load(default=["s"], sinks={"s": tracking("v1", retry=FAST)})
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        with anyio.fail_after(10):
            await tracker.entered.wait()
        for tag in ("v2", "v3"):
            setup.rewrite(default=["s"], sinks={"s": tracking(tag, retry=FAST)})
            assert await router.reload() is True
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-2"))
        ).status_code == 200
        assert tracker.lifecycle == [("open", "s", "v1")]
        tracker.release.set()
        await recorder.wait_for(lambda r: sorted(r.delivered_to("s")) == ["m-1", "m-2"])

    assert [(s.tag, s.message_id, s.attempt, s.ok) for s in tracker.sent] == [
        ("v1", "m-1", 1, True),
        ("v3", "m-2", 1, True),
    ]
    assert tracker.lifecycle == [
        ("open", "s", "v1"),
        ("close", "s", "v1"),
        ("open", "s", "v3"),
        ("close", "s", "v3"),
    ]
    assert [state for _, _, state, _, _ in deliveries(config)] == ["delivered", "delivered"]


async def test_a_reload_removing_a_busy_sink_switches_routes_at_once(tmp_path: Path) -> None:
    # ``gone`` hangs on m-1 with m-2 queued behind it. The reload that removes it returns at
    # once; m-3, accepted while the send to ``gone`` is still in flight, follows the new
    # routes; the send in flight finishes; only m-2 (routed to ``gone`` before the switch
    # and never sent) is dead-lettered.
    tracker, recorder = Tracker(hold_tag="hung"), Recorder()
    setup = Setup(tmp_path, SinkPlugin(tracker.sink_class()), recorder)
    config = setup.load(
        default=["a", "gone"], sinks={"a": tracking(), "gone": tracking("hung", concurrency=1)}
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        url = router.webhook_url
        assert (await post(client, url, body_for(message_id="m-1"))).status_code == 200
        with anyio.fail_after(10):
            await tracker.entered.wait()
        assert (await post(client, url, body_for(message_id="m-2"))).status_code == 200
        await recorder.wait_for(lambda r: r.delivered_to("a") == ["m-1", "m-2"])

        setup.rewrite(default=["a"], sinks={"a": tracking()})
        assert await router.reload() is True
        assert tracker.cancelled == []  # the send to the removed sink is still in flight
        assert set(router.daemon.dispatcher.runners) == {"a"}
        assert (await post(client, url, body_for(message_id="m-3"))).status_code == 200
        await recorder.wait_for(lambda r: "m-3" in r.delivered_to("a"))
        assert recorder.received[-1] == ("m-3", ("a",))

        tracker.release.set()
        await eventually(lambda: rows_by_message(config)["m-2"]["gone"] == "dead")

    assert tracker.cancelled == []
    assert [(s.sink, s.message_id, s.ok) for s in tracker.sent if s.sink == "gone"] == [
        ("gone", "m-1", True)
    ]
    assert recorder.delivered_to("gone") == ["m-1"]
    assert deliveries(config) == [
        ("m-1", "a", "delivered", 1, None),
        ("m-1", "gone", "delivered", 1, None),
        ("m-2", "a", "delivered", 1, None),
        ("m-2", "gone", "dead", 0, "sink removed from the configuration"),
        ("m-3", "a", "delivered", 1, None),
    ]


class HeldLoad:
    """A plugin that holds one configuration load once ``armed``: its ``router_sink_types``
    hook runs inside ``load_config`` (in the reload's worker thread, after the file was read)
    and waits there until ``release`` is set. That is how a test decides which of two
    overlapping reloads finishes loading first."""

    __name__ = "held-load"

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    @hookimpl
    def router_sink_types(self) -> list[type[Sink[Any]]]:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(timeout=30)  # only a failing test ever waits this long
        return []


async def test_of_two_overlapping_reloads_the_later_file_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The first reload reads v2 and is held in its load; the second reads v3 and is applied;
    # then the first load finishes: it must not put v2 over v3.
    caplog.set_level(logging.INFO)
    tracker, recorder, held = Tracker(), Recorder(), HeldLoad()
    setup = Setup(tmp_path, SinkPlugin(tracker.sink_class()), recorder, held)
    sinks = {"a": tracking(), "b": tracking(), "c": tracking()}
    config = setup.load(default=["a"], sinks=sinks)
    results: list[bool] = []

    async def first_reload() -> None:
        results.append(await router.reload())

    async with running_router(config) as router, httpx.AsyncClient() as client:
        setup.rewrite(default=["b"], sinks=sinks)
        held.armed = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(first_reload)
            await eventually(held.entered.is_set)
            setup.rewrite(default=["c"], sinks=sinks)
            assert await router.reload() is True
            held.release.set()
        assert results == [False]
        assert "reload-superseded" in caplog.text
        assert router.daemon.config.routes.default == ("c",)
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        await recorder.wait_for(lambda r: r.delivered_to("c") == ["m-1"])

    assert recorder.received == [("m-1", ("c",))]


async def test_a_journal_failure_during_a_reload_does_not_half_apply_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Dead-lettering a removed sink's pending deliveries is a journal write. While the journal
    # refuses it, the reload still switches wholly (routes, keys and sinks together) and the
    # dead-lettering is tried again until it works.
    caplog.set_level(logging.INFO)
    tracker, recorder = Tracker(failing_tags={"down"}, retry_after=3600), Recorder()
    setup = Setup(tmp_path, SinkPlugin(tracker.sink_class()), recorder)
    config = setup.load(default=["a", "gone"], sinks={"a": tracking(), "gone": tracking("down")})
    journal_file = config.journal.path / "journal.sqlite3"
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        await recorder.wait_for(lambda r: r.delivered_to("a") == ["m-1"] and len(r.failed) == 1)
        # A real SQLite write failure, from the journal's own writer: a trigger refusing to
        # make any delivery dead.
        with contextlib.closing(sqlite3.connect(journal_file)) as conn:
            conn.execute(
                "CREATE TRIGGER no_dead_letters BEFORE UPDATE OF state ON deliveries"
                " WHEN NEW.state = 'dead' BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
            )
            conn.commit()

        setup.rewrite(default=["a"], sinks={"a": tracking()}, routes=[])
        assert await router.reload() is True
        daemon = router.daemon
        assert set(daemon.config.sinks) == set(daemon.dispatcher.runners) == {"a"}
        assert daemon.ingress.runtime.config is daemon.config
        await eventually(lambda: "dead-letter-failed" in caplog.text)
        assert rows_by_message(config)["m-1"]["gone"] == "pending"

        with contextlib.closing(sqlite3.connect(journal_file)) as conn:
            conn.execute("DROP TRIGGER no_dead_letters")
            conn.commit()
        await eventually(lambda: rows_by_message(config)["m-1"]["gone"] == "dead")
        assert "reload-refused" not in caplog.text

    assert rows_by_message(config) == {"m-1": {"a": "delivered", "gone": "dead"}}


async def test_a_reload_keeps_the_logging_setup_unless_the_log_section_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As with ``serve --log-level DEBUG``: a level set outside the file survives a reload
    # that leaves ``log:`` alone (and so do the handlers: caplog still sees what follows).
    caplog.set_level(logging.DEBUG)
    root = logging.getLogger()
    setup = Setup(tmp_path)
    config = setup.load()
    async with running_router(config) as router:
        handlers = root.handlers[:]
        setup.rewrite(default=["archive"])
        assert await router.reload() is True
        assert root.level == logging.DEBUG
        assert root.handlers == handlers
        assert "reloaded" in caplog.text

        setup.rewrite(log={"level": "warning"})
        assert await router.reload() is True
        assert root.level == logging.WARNING


# -- reload under load -------------------------------------------------------------------------

#: The configurations the load test moves through (all keep every sink, so nothing is
#: dead-lettered; routes change, and the last one changes sink b's options too).
GENERATIONS: list[dict[str, Any]] = [
    {
        "routes": [{"match": "patient.*", "to": ["a"]}, {"match": "medical.*", "to": ["b"]}],
        "default": [],
    },
    {
        "routes": [{"match": "patient.*", "to": ["b", "c"]}, {"match": "medical.*", "to": ["a"]}],
        "default": ["c"],
    },
    {
        "routes": [{"match": ["patient.*", "medical.*"], "to": ["a", "b"]}],
        "default": ["a"],
    },
]
TYPES = ["patient.admit", "medical.document-download", "devices.health-data"]


def expected_sinks(generation: int, type_: str) -> frozenset[str]:
    doc = GENERATIONS[generation]
    found: set[str] = set()
    for route in doc["routes"]:
        patterns = route["match"] if isinstance(route["match"], list) else [route["match"]]
        if any(type_.startswith(p.removesuffix("*")) for p in patterns):
            found.update(route["to"])
    return frozenset(found or doc["default"])


def generations_between(start_phase: int, end_phase: int) -> set[int]:
    """Phases: 2k = generation k in force; 2k+1 = the reload from k to k+1 is running."""
    out: set[int] = set()
    for phase in range(start_phase, end_phase + 1):
        out.update({phase // 2} if phase % 2 == 0 else {phase // 2, phase // 2 + 1})
    return out


async def test_reload_under_load_loses_nothing_and_never_reroutes(tmp_path: Path) -> None:
    # The first attempt of every tenth message fails, so retries are pending across reloads.
    tracker, recorder = Tracker(fail_first_suffix="7"), Recorder()
    flaky: dict[str, Any] = {"retry": FAST, "concurrency": 4}
    setup = Setup(tmp_path, SinkPlugin(tracker.sink_class()), recorder)

    def sinks(b_tag: str) -> dict[str, Any]:
        return {
            "a": tracking("v1", **flaky),
            "b": tracking(b_tag, **flaky),
            "c": tracking("v1", **flaky),
        }

    config = setup.load(**GENERATIONS[0], sinks=sinks("v1"))
    phase = 0
    acked: dict[str, tuple[str, int, int]] = {}  # id -> (type, phase at send, phase at answer)
    refused: list[int] = []
    done = anyio.Event()
    counter = itertools.count()
    per_phase = 15

    async def poster(client: httpx.AsyncClient, url: str) -> None:
        while not done.is_set():
            n = next(counter)
            mid, type_ = f"m-{n}", TYPES[n % len(TYPES)]
            start = phase
            r = await post(client, url, body_for(type_, mid))
            if r.status_code == 200:
                acked[mid] = (type_, start, phase)
            else:
                refused.append(r.status_code)

    def acked_in(p: int) -> int:
        return sum(1 for _, start, end in acked.values() if start == end == p)

    async def wait_for_traffic_in(p: int) -> None:
        await eventually(lambda: acked_in(p) >= per_phase)

    async with running_router(config) as router, httpx.AsyncClient() as client:
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(poster, client, router.webhook_url)
            for generation in (1, 2):
                await wait_for_traffic_in(phase)
                setup.rewrite(**GENERATIONS[generation], sinks=sinks(f"v{generation + 1}"))
                phase += 1
                assert await router.reload() is True
                phase += 1
            await wait_for_traffic_in(phase)
            done.set()
        expected_count = sum(len(recorder_sinks) for _, recorder_sinks in recorder.received)
        await recorder.wait_for(lambda r: len(r.delivered) == expected_count)

    assert refused == []
    rows = rows_by_message(config)
    received = dict(recorder.received)
    assert set(received) == set(acked)  # every acknowledged message was journaled once
    for mid, (type_, start, end) in acked.items():
        sinks_now = frozenset(received[mid])
        allowed = {expected_sinks(g, type_) for g in generations_between(start, end)}
        assert sinks_now in allowed, (mid, type_, start, end, sinks_now)
        assert rows.get(mid, {}) == dict.fromkeys(sinks_now, "delivered"), mid
    delivered = sorted((s.sink, s.message_id) for s in tracker.sent if s.ok)
    assert delivered == sorted((sink, mid) for mid in acked for sink in received[mid])
    for p in (0, 2, 4):  # each stable phase had traffic, with exactly its generation's routes
        assert acked_in(p) >= per_phase
