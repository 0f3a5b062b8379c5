"""Prometheus metrics, one registry per running router (so tests can run several).

The gauges read from the journal (pending, retrying, dead, oldest pending, journal bytes) cost a
scan of the undelivered rows. They are read at most every ``GAUGE_REFRESH_SECONDS``, by the
first scrape after that, and scrapes arriving meanwhile wait for that one read: so no number of
scrapers adds journal work (8 scrapers on 200k pending rows had raised the ack p99 from 6.8 to
55.7 ms). ``webhook-router status`` stays exact: it reads the journal itself.

Several workers (``server.workers``) are one service with one ``/metrics``: each worker runs
prometheus-client's multiprocess mode (its supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before
the worker imports the client), so every value lives in a small memory-mapped file per process
and whichever worker answers a scrape renders all of them. Counters and histograms add up over
the workers (a restarted worker's dead predecessor's counts stay, as counters must); a journal
gauge is the most recent reading, whichever worker made it (each reads the whole journal);
``sink_up`` is the lowest over the live workers (a sink is up when it is up everywhere).
Chosen over the supervisor scraping its workers: a scrape reaches a worker, never the
supervisor (which accepts no connections), and needs no request to the other workers.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import anyio
import anyio.to_thread
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from router.errors import JournalUnavailable
from router.journal import Journal

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The ``*_created`` series (when each counter was created) say nothing about this daemon.
disable_created_metrics()  # type: ignore[no-untyped-call]
#: How old the journal's gauges may be when scraped.
GAUGE_REFRESH_SECONDS = 5.0
#: Set (by ``router.supervisor``) in a worker's environment: the folder of the workers' values.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self, refresh_every: float = GAUGE_REFRESH_SECONDS) -> None:
        self.refresh_every = refresh_every
        self._fresh_until = float("-inf")  # time.monotonic() until which the gauges stand
        self._refreshing = anyio.Lock()
        #: How many times the gauges were read from the journal.
        self.refreshes = 0
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
        self.ready = Gauge(
            "webhook_router_ready",
            "1 when /readyz would answer 200 (the journal commits, its disk has room), else 0;"
            " kept current every few seconds and at each scrape (with server.workers: 0 while"
            " any worker is not ready).",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.sink_up = Gauge(
            "webhook_router_sink_up",
            "1 when the sink opened and its last send worked.",
            ["sink"],
            multiprocess_mode="livemin",
            registry=r,
        )

        self.pending = Gauge(
            "webhook_router_pending_deliveries",
            "Deliveries waiting, by sink (retrying ones included).",
            ["sink"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.retrying = Gauge(
            "webhook_router_retrying_deliveries",
            "Deliveries that failed at least once and wait for their next attempt.",
            ["sink"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.dead = Gauge(
            "webhook_router_dead_letters",
            "Dead-lettered deliveries kept, by sink.",
            ["sink"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.oldest_pending = Gauge(
            "webhook_router_oldest_pending_seconds",
            "Age of the oldest message waiting for the sink (0 when none waits).",
            ["sink"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.journal_bytes = Gauge(
            "webhook_router_journal_bytes",
            "Size of the journal on disk.",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.reloads = Counter(
            "webhook_router_reloads", "Configuration reloads, by result.", ["result"], registry=r
        )
        self.accept_errors = Counter(
            "webhook_router_accept_errors",
            "Failed accepts of a connection, by reason (fd_limit: out of file descriptors;"
            " accepting then pauses and connections wait in the listen backlog).",
            ["reason"],
            registry=r,
        )
        self.swept = Counter(
            "webhook_router_swept_messages",
            "Messages removed by the retention sweep.",
            registry=r,
        )

        self.metriport_failed_seen = Gauge(
            "webhook_router_metriport_failed_seen",
            "Failed deliveries Metriport reported at the last check (-1: it could not count).",
            # With workers: the latest check's, whichever worker made it (one holds the lock).
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.metriport_retries = Counter(
            "webhook_router_metriport_retries_requested",
            "Times this router asked Metriport to resend its failed deliveries.",
            registry=r,
        )
        self.metriport_calls = Counter(
            "webhook_router_metriport_calls",
            "Calls to Metriport's API, by kind (settings, retry) or failed.",
            ["call"],
            registry=r,
        )

    @staticmethod
    def observe_many(histogram: Any, values: Sequence[float]) -> None:
        """``histogram.observe(v)`` for each of ``values`` (one labelled histogram), its buckets
        and sum incremented once each: a batch of deliveries is observed at the cost of one.
        Through the client's own value objects (each bucket counts the values up to its bound,
        as ``observe`` counts them; the exposition adds them up); ``observe`` one by one where
        this client has none of them."""
        if not values:
            return
        bounds = getattr(histogram, "_upper_bounds", None)
        buckets = getattr(histogram, "_buckets", None)
        total = getattr(histogram, "_sum", None)
        if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
            for v in values:
                histogram.observe(v)
            return
        counts: dict[int, int] = {}
        for v in values:
            i = bisect.bisect_left(bounds, v)
            counts[i] = counts.get(i, 0) + 1
        total.inc(sum(values))
        for i, count in counts.items():
            buckets[i].inc(count)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once (``labels`` costs a lock and a tuple per
        call, and the hot path calls it for every message)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    async def refresh(self, journal: Journal, sinks: Iterable[str]) -> None:
        """Set the gauges read from the journal, unless they were read less than
        ``refresh_every`` seconds ago (called on each scrape; see the module's docstring)."""
        if time.monotonic() < self._fresh_until:
            return
        async with self._refreshing:
            if time.monotonic() < self._fresh_until:  # read while this scrape waited
                return
            try:
                await self._read(journal, sinks)
            finally:
                self._fresh_until = time.monotonic() + self.refresh_every

    async def _read(self, journal: Journal, sinks: Iterable[str]) -> None:
        self.refreshes += 1
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
        folder = os.environ.get(MULTIPROC_ENV)
        if folder:  # a worker: every worker's values (see the module docstring)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, folder)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
