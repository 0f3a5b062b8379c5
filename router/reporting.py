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
        for done in each:
            m = done.message
            kind = done.kind
            metrics.child(metrics.deliveries, sink, kind).inc()
            fields = dict(id=m.message_id, type=m.type, sink=sink, attempt=m.attempt)
            if kind == "delivered":
                metrics.child(metrics.delivery_seconds, sink).observe(time.time() - m.received_at)
                emit(log, logging.INFO, kv("delivered", **fields, ms=round(duration * 1000, 1)))
                await plugins.notify(
                    pm, "router_message_delivered", message=m, sink=sink, duration=duration
                )
            elif kind == "retry":
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
