"""Prometheus metrics, one registry per running router (so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
