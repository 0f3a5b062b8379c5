"""The dispatcher: one runner per sink, claiming due deliveries from the journal.

Each sink has its own runner task and its own worker tasks (up to the sink's ``concurrency``),
so a sink that fails, retries or hangs never delays another sink. The journal is the queue and
the coordinator: a runner *claims* the sink's due deliveries (new ones and retries whose time
has come) with a lease and a fencing token, sends them, and records each outcome with its token;
then it sleeps until woken by a new message or until the next delivery falls due. A message
this router just received is claimed by the append itself and handed over in memory. The
dispatcher renews the leases of everything its runners hold; a router that dies stops renewing
and its claims are taken over once they expire (at once after a restart on the same host), so
a crash loses nothing, and with several routers on one journal no delivery is held by two.

This module schedules (``Dispatcher``: the runners of the configuration in force, reloads,
lease renewal; ``SinkRunner``: one sink's claims and attempts). What an attempt involves
besides has a module each: the sink's lifecycle (``router.sinkhandle``), the cache of fresh
messages (``router.freshcache``), turning an attempt into outcomes (``router.outcomes``, a
pure function) and reporting them (``router.reporting``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import anyio
import pluggy

from router.config import Config, SinkConfig
from router.errors import JournalUnavailable
from router.freshcache import FreshCache
from router.journal import FIRST_TOKEN, Claim, Journal, Outcome, RouterInfo
from router.logs import kv
from router.message import Message
from router.metrics import Metrics
from router.outcomes import outcomes
from router.reporting import Reporter
from router.sink import SendResult, Sink
from router.sinkhandle import SinkHandle

log = logging.getLogger("router.delivery")

#: The longest a runner waits before looking at the journal again (seconds).
IDLE_POLL = 2.0
#: While fresh messages keep coming, the journal is still read this often for due retries.
JOURNAL_LOOK = 0.5
#: How long a sink being retired by a reload may take to finish its deliveries in flight.
RETIRE_SECONDS = 10.0
#: The last error of a delivery dead-lettered because its sink was removed by a reload.
REMOVED = "sink removed from the configuration"


class SinkRunner:
    """Schedules the deliveries of one sink: claims what is due from the journal, takes what
    was just received from its cache, and runs up to ``concurrency`` attempts at once, each
    recorded with its claim's token. Its other jobs are modules of their own: the sink's
    lifecycle (``router.sinkhandle``), the cache of fresh messages (``router.freshcache``),
    turning an attempt into outcomes (``router.outcomes``) and reporting them
    (``router.reporting``)."""

    def __init__(
        self,
        cfg: SinkConfig,
        sink: Sink[Any],
        journal: Journal,
        pm: pluggy.PluginManager,
        metrics: Metrics,
        owner: str,
        lease: float,
    ) -> None:
        self.cfg = cfg
        self.handle = SinkHandle(cfg, sink, metrics)
        self.journal = journal
        self.pm = pm
        self.metrics = metrics
        self.owner = owner
        self.lease = lease
        #: The deliveries this runner holds (claimed, outcome not yet recorded), by row.
        self.held: dict[int, Claim] = {}
        self.fresh = FreshCache()
        self._reporter = Reporter(cfg.name, metrics)
        self._next_journal_look = 0.0
        self._fresh_turn = False
        self.active = 0
        self.stopping = False
        self._stopped = anyio.Event()
        self._done = anyio.Event()
        #: Set once retired (deliveries in flight ended, sink closed): a successor may start.
        self.retired = anyio.Event()
        self._scope = anyio.CancelScope()
        self._after: SinkRunner | None = None
        self._wake = anyio.Event()

    @property
    def name(self) -> str:
        return self.cfg.name

    def notify(self) -> None:
        """A delivery may be due: look again."""
        self._wake.set()

    def has_room(self, message: Message) -> bool:
        """Whether ``message``, just received, may be claimed for this runner and kept at hand
        (else it is claimed from the journal when its turn comes)."""
        return not self.cfg.ordered and not self.stopping and self.fresh.has_room(message)

    def offer(self, seq: int, message: Message) -> None:
        """A message just journaled and claimed for this sink (token ``FIRST_TOKEN``): keep it
        at hand, so that delivering it needs no journal read."""
        self.held[seq] = Claim(seq, 0, FIRST_TOKEN)
        self.fresh.add(seq, message)
        if self.active < self.cfg.concurrency:
            # (Else every attempt is taken: the one that ends wakes the runner, which then
            # takes this message with the others that came meanwhile.)
            self._wake.set()

    async def supervise(self, after: SinkRunner | None = None) -> None:
        """``run`` inside a cancel scope of its own, so that a reload can retire this runner
        alone. A runner that replaces ``after`` (the same sink name, changed by a reload)
        starts once ``after`` is retired: offers meanwhile wait in its cache and the journal."""
        self._after = after
        with anyio.CancelScope() as self._scope:
            try:
                if after is not None:
                    await after.retired.wait()
                await self.run()
            finally:
                # Also when retired before it ever ran: what it was handed goes back at once.
                with anyio.CancelScope(shield=True):
                    await self._release_fresh()
                self._done.set()

    async def done(self) -> None:
        """Wait until ``run`` has returned (after ``stop``)."""
        await self._done.wait()

    async def retire(self, grace: float) -> None:
        """After ``stop``: wait for deliveries in flight (cancelled after ``grace`` seconds),
        then close the sink."""
        try:
            with anyio.move_on_after(grace):
                await self._done.wait()
            if not self._done.is_set():
                self._scope.cancel()
                await self._done.wait()
            if self._after is not None:
                # Retired while still waiting for its predecessor (changed again by a quick
                # second reload): its own successor must wait for that one too.
                await self._after.retired.wait()
            await self.close_sink()
        finally:
            self.retired.set()

    async def close_sink(self) -> None:
        await self.handle.close()

    def stop(self) -> None:
        """Start no new deliveries; ``run`` returns once those in flight have finished."""
        self.stopping = True
        self._stopped.set()
        self._wake.set()

    async def run(self) -> None:
        await self.handle.open(self._stopped)
        async with anyio.create_task_group() as tg:
            while not self.stopping:
                wake = self._wake = anyio.Event()
                try:
                    wait = await self._dispatch_due(tg)
                except JournalUnavailable as e:
                    log.error(kv("journal-read-failed", sink=self.name, error=str(e)))
                    wait = 1.0
                if wait == 0.0:
                    continue
                # Look at the journal at least every IDLE_POLL seconds even when nothing is
                # due: operators (``dead retry``, ``replay``) and other routers change it.
                with anyio.move_on_after(IDLE_POLL if wait is None else min(wait, IDLE_POLL)):
                    await wake.wait()

    async def _release_fresh(self) -> None:
        """Give back the claims of messages kept at hand but never sent (stop, reload)."""
        claims = [self.held.pop(seq) for seq in self.fresh.clear()]
        if claims:
            with anyio.move_on_after(5.0):
                try:
                    await self.journal.release(self.name, claims)
                except JournalUnavailable as e:  # they expire instead
                    log.warning(kv("release-failed", sink=self.name, error=str(e)))

    async def _dispatch_due(self, tg: anyio.abc.TaskGroup) -> float | None:
        """Start workers for due deliveries. Returns how long to wait before looking again
        (0.0: at once; ``None``: nothing pending, wait to be woken)."""
        free = self.cfg.concurrency - self.active
        if free <= 0:
            return None  # a finishing worker wakes us
        size = self.cfg.batch_size
        fresh = self.fresh
        if fresh and time.monotonic() < self._next_journal_look:
            # Messages just accepted go out from memory; the journal is still asked at least
            # every JOURNAL_LOOK seconds, so retries that fall due are never starved.
            self._start(tg, fresh.take(free * size, self.held))
            return 0.0
        self._next_journal_look = time.monotonic() + JOURNAL_LOOK
        # Both kinds share this round: the journal's (retries due, other routers' messages)
        # and the ones at hand, so a stream of failing retries never starves fresh messages
        # nor the other way round (alternating when only one delivery can start).
        room = free * size
        self._fresh_turn = not self._fresh_turn
        share = min(len(fresh), room // 2 if room > 1 else int(self._fresh_turn))
        claims = []
        if room - share > 0:
            claims = await self.journal.claim(
                self.name, self.owner, room - share, ordered=self.cfg.ordered, lease=self.lease
            )
        due: list[tuple[Claim, Message | None]] = []
        for c in claims:
            # A lease of ours that ran out before its renewal (a stalled process) comes back
            # to us: hold it with its new token, but never start a second send of it.
            again = c.seq in self.held
            self.held[c.seq] = c
            if not again:
                due.append((c, None))
        due += fresh.take(room - len(due), self.held)
        if due:
            self._start(tg, due)
            return 0.0
        return await self.journal.next_due_in(self.name, ordered=self.cfg.ordered)

    def _start(self, tg: anyio.abc.TaskGroup, due: Sequence[tuple[Claim, Message | None]]) -> None:
        size = self.cfg.batch_size
        for i in range(0, len(due), size):
            chunk = due[i : i + size]
            self.active += 1
            tg.start_soon(self._deliver, chunk)

    async def _deliver(self, pairs: Sequence[tuple[Claim, Message | None]]) -> None:
        claims = [c for c, _ in pairs]
        recorded = False
        try:
            stored = {c.seq: m for c, m in pairs if m is not None}
            unknown = [c.seq for c in claims if c.seq not in stored]
            if unknown:
                stored.update(await self.journal.messages(unknown))
            missing = [c for c in claims if c.seq not in stored]
            if missing:
                # Only a hand-repaired journal can lose a message under its deliveries: end
                # them, or they would be due again at once, forever.
                await self.journal.record(
                    Outcome(c.seq, self.name, "dead", c.attempts, c.token, 0.0, "message missing")
                    for c in missing
                )
                log.error(kv("dead-letter", sink=self.name, count=len(missing), reason="missing"))
            batch = [
                (c, _as_attempt(stored[c.seq], c.attempts + 1)) for c in claims if c.seq in stored
            ]
            if batch:
                await self._attempt(batch)
            recorded = True
        except JournalUnavailable as e:
            # The deliveries stay pending in the journal; pause so a broken disk is not spun on.
            log.error(kv("journal-write-failed", sink=self.name, error=str(e)))
            await anyio.sleep(1.0)
        finally:
            if not recorded:
                # Cancelled (reload, shutdown) or failed: give the claims back at once rather
                # than leave them to expire.
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(5.0),
                    contextlib.suppress(JournalUnavailable),  # they expire instead
                ):
                    await self.journal.release(self.name, claims)
            for c in claims:
                self.held.pop(c.seq, None)
            self.active -= 1
            self._wake.set()

    async def _attempt(self, batch: list[tuple[Claim, Message]]) -> None:
        """Send ``batch``, record each delivery's outcome (with its claim's token now: it may
        have been claimed again meanwhile, see ``_dispatch_due``), then report them."""
        messages = [m for _, m in batch]
        result: SendResult | BaseException
        start = time.monotonic()
        try:
            with anyio.fail_after(self.cfg.timeout):
                result = await self.handle.sink.send(messages)
        except Exception as e:  # a timeout included: ``outcomes`` decides what it means
            result = e
        duration = time.monotonic() - start
        verdict = outcomes(self.name, self.cfg.retry, batch, result, held=self.held)
        await self.journal.record(verdict.outcomes)
        self.handle.last_error = verdict.error
        self.metrics.child(self.metrics.sink_up, self.name).set(
            0 if verdict.failed == len(batch) else 1
        )
        await self._reporter.report(verdict.each, duration, self.pm)


def _as_attempt(message: Message, attempt: int) -> Message:
    """``message`` as attempt ``attempt`` sees it: itself when it says so already (a message
    just received, on its first attempt), else a copy (``Message.with_attempt``)."""
    return message if message.attempt == attempt else message.with_attempt(attempt)


def router_id() -> str:
    """A name for this router process, unique across hosts and restarts (the lease owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Dispatcher:
    """The sink runners of the configuration in force; ``reconfigure`` swaps them on reload.
    Renews the leases its runners hold every third of the lease."""

    def __init__(self, config: Config, journal: Journal, metrics: Metrics) -> None:
        self.journal = journal
        self.metrics = metrics
        self.owner = router_id()
        self.lease = config.journal.lease
        self.runners: dict[str, SinkRunner] = {
            name: self._runner(config, cfg) for name, cfg in config.sinks.items()
        }
        #: Runners a reload took out, by sink name (the latest one), until they are retired.
        self.retiring: dict[str, SinkRunner] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = anyio.Event()
        journal.subscribe(self.wake)

    def _runner(self, config: Config, cfg: SinkConfig) -> SinkRunner:
        return SinkRunner(
            cfg,
            cfg.build(config.base_dir, self.metrics.registry),
            self.journal,
            config.plugin_manager,
            self.metrics,
            self.owner,
            self.lease,
        )

    def info(self) -> RouterInfo:
        return RouterInfo(self.owner, socket.gethostname(), os.getpid(), tuple(self.runners))

    async def register(self) -> None:
        """Tell the journal this router works on it, with its sinks."""
        await self.journal.register(self.info(), self.lease)

    def claimable(self, sinks: Iterable[str], message: Message) -> list[str]:
        """Of ``sinks``, those whose runner can take ``message``, just received, at once (so
        the append claims it for this router)."""
        return [n for n in sinks if (r := self.runners.get(n)) is not None and r.has_room(message)]

    def offer(
        self, seq: int, message: Message, sinks: Iterable[str], claimed: Iterable[str]
    ) -> None:
        """A message was just journaled for ``sinks`` and claimed for ``claimed``: hand it to
        those runners (a runner gone meanwhile by a reload: its claim is given back), and wake
        the others (an ordered sink's runner claims it from the journal)."""
        mine = set(claimed)
        orphans: list[str] = []
        for name in mine:
            runner = self.runners.get(name)
            if runner is not None and not runner.stopping:
                runner.offer(seq, message)
            else:
                orphans.append(name)
        for name in sinks:
            if name not in mine and (runner := self.runners.get(name)) is not None:
                runner.notify()
        if orphans and self._tg is not None:
            for name in orphans:
                self._tg.start_soon(self._release, name, Claim(seq, 0, FIRST_TOKEN))

    async def _release(self, sink: str, claim: Claim) -> None:
        with contextlib.suppress(JournalUnavailable):  # it expires instead
            await self.journal.release(sink, [claim])

    def wake(self, sinks: Iterable[str] | None = None) -> None:
        """Deliveries may have become due (another router's message, an operator): look."""
        for name, runner in self.runners.items():
            if sinks is None or name in sinks:
                runner.notify()

    async def run(self) -> None:
        """Run every runner until ``stop``; returns once their deliveries in flight ended."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for runner in self.runners.values():
                self._start(runner)
            renewing = anyio.CancelScope()
            tg.start_soon(self._renew_periodically, renewing)
            await self._stopping.wait()
            for runner in self.runners.values():
                runner.stop()
            await self._drained()
            renewing.cancel()

    async def _drained(self) -> None:
        for runner in [*self.runners.values(), *self.retiring.values()]:
            await runner.done()

    async def _renew_periodically(self, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                await anyio.sleep(self.lease / 3)
                await self.renew()

    async def renew(self) -> None:
        """Extend the leases of every delivery a runner of this router holds."""
        held: dict[str, set[int]] = {}
        for runner in [*self.runners.values(), *self.retiring.values()]:
            held.setdefault(runner.name, set()).update(runner.held)
        try:
            await self.journal.renew(self.owner, self.lease, held)
        except JournalUnavailable as e:
            log.error(kv("lease-renewal-failed", error=str(e)))

    def _start(self, runner: SinkRunner, after: SinkRunner | None = None) -> None:
        assert self._tg is not None
        self._tg.start_soon(runner.supervise, after, name=f"sink:{runner.name}")

    def stop(self) -> None:
        self._stopping.set()

    def reconfigure(self, config: Config) -> dict[str, str]:
        """Switch to ``config``'s sinks at once; return what happened to each changed sink name.

        Everything that can fail (building the new sinks) happens before anything changes, and
        nothing here waits: the switch is whole, or it did not happen. An unchanged sink keeps
        its runner and its connections. A new sink starts at once. A changed or removed sink
        takes no new work from now on and is retired in the background: it finishes what it
        has in flight (cancelled after ``RETIRE_SECONDS``; what was cancelled stays pending) and
        is closed. A changed sink's successor takes new messages at once and starts delivering
        once its predecessor is closed (so no delivery is in flight in both, and the old
        ``close`` comes before the new ``open``); a removed sink's pending deliveries are then
        dead-lettered with that reason."""
        changes: dict[str, str] = {}
        runners: dict[str, SinkRunner] = {}
        for name, cfg in config.sinks.items():
            old = self.runners.get(name)
            if old is not None and old.cfg == cfg:
                runners[name] = old
            else:
                runners[name] = self._runner(config, cfg)
                changes[name] = "added" if old is None else "changed"
        # From here on nothing can fail.
        for name, runner in runners.items():
            if name not in changes:
                runner.pm = config.plugin_manager
        retired = [r for name, r in self.runners.items() if runners.get(name) is not r]
        for runner in retired:
            changes.setdefault(runner.name, "removed")
        # The runner a new one must wait for: the one it replaces, or one of a sink removed
        # by an earlier reload and now added back that is still retiring.
        after = {name: self.runners.get(name) or self.retiring.get(name) for name in runners}
        self.runners = runners
        for runner in retired:
            runner.stop()
            self.retiring[runner.name] = runner
            assert self._tg is not None
            self._tg.start_soon(self._retire, runner, name=f"retire:{runner.name}")
        for name, change in changes.items():
            if change != "removed":
                self._start(runners[name], after[name])
        return changes

    async def _retire(self, runner: SinkRunner) -> None:
        try:
            await runner.retire(RETIRE_SECONDS)
        finally:
            if self.retiring.get(runner.name) is runner:
                del self.retiring[runner.name]
        if runner.name in self.runners:
            return  # changed (or added back): its successor resumes the pending deliveries
        while True:
            try:
                await self.dead_letter_removed()
                return
            except JournalUnavailable as e:
                # The deliveries stay pending (to no sink) until it works: try again.
                log.error(kv("dead-letter-failed", sink=runner.name, error=str(e), retry_in=1.0))
                await anyio.sleep(1.0)

    async def dead_letter_removed(self) -> dict[str, int]:
        """Dead-letter the pending deliveries to sinks that are no longer configured, except
        those of a removed sink still finishing its deliveries in flight (its retirement does
        it then)."""
        await self.register()  # other routers see this router's sinks as they are now
        keep = set(self.runners) | set(self.retiring)
        removed = await self.journal.dead_letter_orphaned(keep, REMOVED)
        for sink, count in removed.items():
            log.warning(kv("dead-letter", sink=sink, count=count, reason="sink removed"))
        return removed

    async def close(self) -> None:
        """Close every sink that was opened; a failure to close is logged, not raised."""
        for runner in [*self.runners.values(), *self.retiring.values()]:
            await runner.close_sink()
