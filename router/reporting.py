"""What each delivery outcome tells the outside: the metrics, one log line (id, type, sink,
attempt and outcome; never the body), and the plugins' observer hooks."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import pluggy

from router import plugins
from router.logs import emit, kv
from router.metrics import Metrics
from router.outcomes import Attempted

log = logging.getLogger("router.delivery")


class Reporter:
    """Reports the outcomes of one sink's attempts."""

    def __init__(self, sink: str, metrics: Metrics) -> None:
        self.sink = sink
        self.metrics = metrics

    async def report(
        self, each: Sequence[Attempted], duration: float, pm: pluggy.PluginManager
    ) -> None:
        """Report one attempt's outcomes; ``duration``: how long its ``send`` took."""
        metrics, sink = self.metrics, self.sink
        # What is the same for the whole batch is looked up once (a batch of a busy sink holds
        # dozens of messages, and this runs for each).
        counts: dict[str, int] = {}
        now = time.time()
        ms = round(duration * 1000, 1)
        lag = metrics.child(metrics.delivery_seconds, sink)
        observed = plugins.observed(pm, "router_message_delivered")
        lags: list[float] = []
        for done in each:
            m = done.message
            kind = done.kind
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "delivered":
                lags.append(now - m.received_at)
                emit(
                    log,
                    logging.INFO,
                    "delivered",
                    id=m.message_id,
                    type=m.type,
                    sink=sink,
                    attempt=m.attempt,
                    ms=ms,
                )
                if observed:
                    await plugins.notify(
                        pm, "router_message_delivered", message=m, sink=sink, duration=duration
                    )
                continue
            fields = dict(id=m.message_id, type=m.type, sink=sink, attempt=m.attempt)
            if kind == "retry":
                retry_in = done.outcome.delay
                log.warning(kv("retry", **fields, error=done.outcome.error, retry_in=retry_in))
                await plugins.notify(
                    pm,
                    "router_delivery_failed",
                    message=m,
                    sink=sink,
                    error=done.error,
                    retry_in=retry_in,
                )
            else:
                log.error(kv("dead-letter", **fields, error=done.outcome.error))
                await plugins.notify(
                    pm, "router_message_dead_lettered", message=m, sink=sink, error=done.error
                )
        metrics.observe_many(lag, lags)
        for outcome, count in counts.items():
            metrics.child(metrics.deliveries, sink, outcome).inc(count)
