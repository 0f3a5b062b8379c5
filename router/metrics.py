"""Prometheus metrics, one registry per running router (so tests can run several)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from router.errors import JournalUnavailable
from router.journal import Journal

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "webhook_router_requests", "HTTP requests answered, by status.", ["status"], registry=r
        )
        self.accepted = Counter(
            "webhook_router_messages_accepted",
            "Messages journaled and answered 200, by meta.type.",
            ["type"],
            registry=r,
        )
        self.duplicates = Counter(
            "webhook_router_duplicates", "Messages whose messageId was already stored.", registry=r
        )
        self.unrouted = Counter(
            "webhook_router_unrouted", "Messages no route or default took (kept).", registry=r
        )
        self.verification_failures = Counter(
            "webhook_router_verification_failures", "Requests answered 401.", registry=r
        )
        self.ack_seconds = Histogram(
            "webhook_router_ack_seconds",
            "Time from request start to the 200 for accepted messages.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.deliveries = Counter(
            "webhook_router_deliveries",
            "Delivery attempts by sink and outcome (delivered, retry, dead).",
            ["sink", "outcome"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "webhook_router_delivery_seconds",
            "Time from receipt to successful delivery, by sink.",
            ["sink"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300, 3600),
            registry=r,
        )
        self.sink_up = Gauge(
            "webhook_router_sink_up",
            "1 when the sink opened and its last send worked.",
            ["sink"],
            registry=r,
        )

        self.pending = Gauge(
            "webhook_router_pending_deliveries",
            "Deliveries waiting, by sink (retrying ones included).",
            ["sink"],
            registry=r,
        )
        self.retrying = Gauge(
            "webhook_router_retrying_deliveries",
            "Deliveries that failed at least once and wait for their next attempt.",
            ["sink"],
            registry=r,
        )
        self.dead = Gauge(
            "webhook_router_dead_letters",
            "Dead-lettered deliveries kept, by sink.",
            ["sink"],
            registry=r,
        )
        self.oldest_pending = Gauge(
            "webhook_router_oldest_pending_seconds",
            "Age of the oldest message waiting for the sink (0 when none waits).",
            ["sink"],
            registry=r,
        )
        self.journal_bytes = Gauge(
            "webhook_router_journal_bytes", "Size of the journal on disk.", registry=r
        )
        self.reloads = Counter(
            "webhook_router_reloads", "Configuration reloads, by result.", ["result"], registry=r
        )
        self.swept = Counter(
            "webhook_router_swept_messages",
            "Messages removed by the retention sweep.",
            registry=r,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once (``labels`` costs a lock and a tuple per
        call, and the hot path calls it for every message)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    async def refresh(self, journal: Journal, sinks: Iterable[str]) -> None:
        """Set the gauges read from the journal (called on each scrape)."""
        try:
            counts = await journal.sink_counts()
        except JournalUnavailable:
            return
        now = time.time()
        for sink in set(sinks) | set(counts):
            c = counts.get(sink)
            self.pending.labels(sink).set(c.pending + c.retrying if c else 0)
            self.retrying.labels(sink).set(c.retrying if c else 0)
            self.dead.labels(sink).set(c.dead if c else 0)
            oldest = c.oldest_pending_at if c else None
            self.oldest_pending.labels(sink).set(0 if oldest is None else max(0.0, now - oldest))
        self.journal_bytes.set(await journal.size_bytes())

    def render(self) -> bytes:
        return generate_latest(self.registry)
