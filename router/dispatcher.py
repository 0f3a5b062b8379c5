"""The dispatcher: one runner per sink, reading due deliveries from the journal.

Each sink has its own runner task and its own worker tasks (up to the sink's ``concurrency``),
so a sink that fails, retries or hangs never delays another sink. The journal is the queue: a
runner asks it for the sink's due deliveries (new ones and retries whose time has come), skips
those it already has in flight, and sleeps until woken by a new message or until the next retry
falls due. In memory there are only row numbers, so a crash loses nothing: every delivery not
marked done is found again at start.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import anyio
import pluggy

from router import plugins
from router.config import Config, SinkConfig
from router.errors import JournalUnavailable
from router.journal import Due, Journal, Outcome
from router.logs import kv
from router.message import Message
from router.metrics import Metrics
from router.retry import backoff, decide, describe_error
from router.sink import Sink

log = logging.getLogger("router.delivery")


class SinkRunner:
    """Delivers the pending deliveries of one sink."""

    def __init__(
        self,
        cfg: SinkConfig,
        sink: Sink[Any],
        journal: Journal,
        pm: pluggy.PluginManager,
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self.sink = sink
        self.journal = journal
        self.pm = pm
        self.metrics = metrics
        self.inflight: set[int] = set()
        self._finished: set[int] = set()
        self.active = 0
        self.opened = False
        self.stopping = False
        self._stopped = anyio.Event()
        self.last_error: str | None = None
        self._wake = anyio.Event()

    @property
    def name(self) -> str:
        return self.cfg.name

    def notify(self) -> None:
        """A delivery may be due: look again."""
        self._wake.set()

    def stop(self) -> None:
        """Start no new deliveries; ``run`` returns once those in flight have finished."""
        self.stopping = True
        self._stopped.set()
        self._wake.set()

    async def run(self) -> None:
        await self._open()
        async with anyio.create_task_group() as tg:
            while not self.stopping:
                wake = self._wake = anyio.Event()
                try:
                    next_at = await self._dispatch_due(tg)
                except JournalUnavailable as e:
                    log.error(kv("journal-read-failed", sink=self.name, error=str(e)))
                    next_at = time.time() + 1.0
                if next_at == 0.0:
                    continue
                timeout = math.inf if next_at is None else max(0.0, next_at - time.time())
                with anyio.move_on_after(timeout):
                    await wake.wait()

    async def _dispatch_due(self, tg: anyio.abc.TaskGroup) -> float | None:
        """Start workers for due deliveries. Returns 0.0 to look again at once, else when the
        next delivery falls due (``None``: nothing pending, wait to be woken)."""
        free = self.cfg.concurrency - self.active
        if free <= 0:
            return None  # a finishing worker wakes us
        size = self.cfg.batch_size
        ordered = self.cfg.ordered
        # The read runs on a snapshot taken in a worker thread: a delivery that finishes (is
        # recorded and leaves ``inflight``) while it runs may still look pending in it, so
        # whatever finishes meanwhile is dropped from the answer too.
        self._finished = set()
        exclude = frozenset(self.inflight)
        due = await self.journal.due(self.name, time.time(), free * size, exclude, ordered)
        due = [d for d in due if d.seq not in self._finished]
        if due:
            for i in range(0, len(due), size):
                chunk = due[i : i + size]
                self.inflight.update(d.seq for d in chunk)
                self.active += 1
                tg.start_soon(self._deliver, chunk)
            return 0.0
        return await self.journal.next_due_at(self.name, frozenset(self.inflight), ordered)

    async def _open(self) -> None:
        attempt = 0
        while not self.stopping:
            try:
                with anyio.fail_after(self.cfg.timeout):
                    await self.sink.open()
            except Exception as e:
                attempt += 1
                self.last_error = describe_error(e)
                delay = backoff(self.cfg.retry, attempt)
                log.warning(
                    kv("sink-open-failed", sink=self.name, error=self.last_error, retry_in=delay)
                )
                self.metrics.sink_up.labels(self.name).set(0)
                with anyio.move_on_after(delay):
                    await self._stopped.wait()
            else:
                self.opened = True
                self.metrics.sink_up.labels(self.name).set(1)
                return

    async def _deliver(self, chunk: Sequence[Due]) -> None:
        seqs = [d.seq for d in chunk]
        try:
            stored = await self.journal.messages(seqs)
            batch = [
                (d, dataclasses.replace(stored[d.seq], attempt=d.attempts + 1))
                for d in chunk
                if d.seq in stored
            ]
            await self._attempt(batch)
        except JournalUnavailable as e:
            # The deliveries stay pending in the journal; pause so a broken disk is not spun on.
            log.error(kv("journal-write-failed", sink=self.name, error=str(e)))
            await anyio.sleep(1.0)
        finally:
            self.inflight.difference_update(seqs)
            self._finished.update(seqs)
            self.active -= 1
            self._wake.set()

    async def _attempt(self, batch: list[tuple[Due, Message]]) -> None:
        messages = [m for _, m in batch]
        start = time.monotonic()
        errors: dict[str, BaseException]
        try:
            with anyio.fail_after(self.cfg.timeout):
                result = await self.sink.send(messages)
            errors = dict(result or {})
        except Exception as e:
            errors = {m.message_id: e for m in messages}
        duration = time.monotonic() - start
        now = time.time()

        outcomes: list[Outcome] = []
        events: list[tuple[str, dict[str, Any]]] = []
        for due, message in batch:
            error = errors.get(message.message_id)
            attempts = due.attempts + 1
            if error is None:
                outcomes.append(Outcome(due.seq, self.name, "delivered", attempts))
                events.append(("delivered", {"message": message, "duration": duration}))
                continue
            decision = decide(self.cfg.retry, attempts, error)
            text = describe_error(error)
            if decision.dead:
                outcomes.append(Outcome(due.seq, self.name, "dead", attempts, now, text))
                events.append(("dead", {"message": message, "error": error, "text": text}))
            else:
                at = now + decision.delay
                outcomes.append(Outcome(due.seq, self.name, "pending", attempts, at, text))
                events.append(
                    (
                        "retry",
                        {
                            "message": message,
                            "error": error,
                            "text": text,
                            "retry_in": decision.delay,
                        },
                    )
                )
        await self.journal.record(outcomes)
        self.last_error = None if not errors else describe_error(next(iter(errors.values())))
        self.metrics.sink_up.labels(self.name).set(0 if len(errors) == len(batch) else 1)
        await self._report(events, duration)

    async def _report(self, events: Iterable[tuple[str, dict[str, Any]]], duration: float) -> None:
        for outcome, ev in events:
            m: Message = ev["message"]
            self.metrics.deliveries.labels(self.name, outcome).inc()
            fields = dict(id=m.message_id, type=m.type, sink=self.name, attempt=m.attempt)
            if outcome == "delivered":
                self.metrics.delivery_seconds.labels(self.name).observe(time.time() - m.received_at)
                log.info(kv("delivered", **fields, ms=round(duration * 1000, 1)))
                await plugins.notify(
                    self.pm,
                    "router_message_delivered",
                    message=m,
                    sink=self.name,
                    duration=duration,
                )
            elif outcome == "retry":
                log.warning(kv("retry", **fields, error=ev["text"], retry_in=ev["retry_in"]))
                await plugins.notify(
                    self.pm,
                    "router_delivery_failed",
                    message=m,
                    sink=self.name,
                    error=ev["error"],
                    retry_in=ev["retry_in"],
                )
            else:
                log.error(kv("dead-letter", **fields, error=ev["text"]))
                await plugins.notify(
                    self.pm,
                    "router_message_dead_lettered",
                    message=m,
                    sink=self.name,
                    error=ev["error"],
                )


class Dispatcher:
    """All sink runners of one configuration."""

    def __init__(self, config: Config, journal: Journal, metrics: Metrics) -> None:
        self.runners = {
            name: SinkRunner(
                cfg,
                cfg.build(config.base_dir),
                journal,
                config.plugin_manager,
                metrics,
            )
            for name, cfg in config.sinks.items()
        }

    def notify(self, sinks: Iterable[str]) -> None:
        for name in sinks:
            runner = self.runners.get(name)
            if runner is not None:
                runner.notify()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for runner in self.runners.values():
                tg.start_soon(runner.run, name=f"sink:{runner.name}")

    def stop(self) -> None:
        for runner in self.runners.values():
            runner.stop()

    async def close(self) -> None:
        """Close every sink that was opened; a failure to close is logged, not raised."""
        for runner in self.runners.values():
            if not runner.opened:
                continue
            try:
                with anyio.fail_after(runner.cfg.timeout):
                    await runner.sink.close()
            except Exception as e:
                log.warning(kv("sink-close-failed", sink=runner.name, error=describe_error(e)))
