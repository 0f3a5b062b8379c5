"""Observability: /metrics after real traffic, the admin listener, the retention sweep, and the
log formats (JSON lines that parse; plain lines a sender cannot forge; never a body or a key).

The router runs in-process on loopback ports; metrics are read over HTTP and parsed with
prometheus-client's own text parser; logs are read from the real stderr handler that
``router.logs.setup`` installs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router import Message, PermanentError, RetryableError, SendResult, Sink, SinkOptions, logs
from router.config import Config, load_config
from router.logs import kv
from router.metrics import MULTIPROC_ENV, Metrics
from router.testing import Recorder, SinkPlugin, body_for, running_router, write_config
from tests.conftest import (
    FIXTURES,
    TEST_KEY,
    base_config,
    fixture_vectors,
    post,
    query_journal,
    recording_sink,
    signed,
)

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """``logs.setup`` replaces the root logger's handlers: restore them afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class Stuck(Sink[SinkOptions]):
    """Fails every send, asking to be retried in an hour: its deliveries stay pending."""

    type = "stuck"

    async def send(self, batch: Sequence[Message]) -> SendResult:
        raise RetryableError("peer is down", retry_after=3600)


class Refusing(Sink[SinkOptions]):
    type = "refusing"

    async def send(self, batch: Sequence[Message]) -> SendResult:
        raise PermanentError("HTTP 422")


def parse_metrics(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_metrics_after_traffic(make_config: Callable[..., Config]) -> None:
    may_open = anyio.Event()
    received: list[tuple[str, str, int]] = []

    class Closed(Sink[SinkOptions]):
        """Cannot open until the test lets it: its deliveries are pending, never attempted."""

        type = "closed"

        async def open(self) -> None:
            await may_open.wait()

        async def send(self, batch: Sequence[Message]) -> SendResult:
            return None

    recorder = Recorder()
    config = make_config(
        extra_plugins=(
            SinkPlugin(Stuck, Refusing, Closed, recording_sink("rec", received)),
            recorder,
        ),
        routes=[
            {"match": "patient.*", "to": ["ok", "stuck"]},
            {"match": "medical.*", "to": ["ok", "refusing"]},
            {"match": "devices.*", "to": ["closed"]},
        ],
        default=[],
        sinks={
            "ok": {"type": "rec"},
            "stuck": {"type": "stuck"},
            "refusing": {"type": "refusing"},
            "closed": {"type": "closed"},
        },
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        url = router.webhook_url
        statuses = [
            (await post(client, url, body_for("patient.admit", "m-1"))).status_code,
            (await post(client, url, body_for("medical.document-download", "m-2"))).status_code,
            (await post(client, url, body_for("devices.health-data", "m-3"))).status_code,
            (await post(client, url, body_for("patient.admit", "m-1"))).status_code,  # duplicate
            (await post(client, url, body_for("other.thing", "m-4"))).status_code,  # unrouted
            (
                await client.post(url, content=body_for(), headers=signed(body_for(), "wrong"))
            ).status_code,
            (await post(client, url, b"not json")).status_code,
        ]
        assert statuses == [200, 200, 200, 200, 200, 401, 400]
        await recorder.wait_for(
            lambda r: len(r.delivered_to("ok")) == 2 and len(r.failed) == 1 and len(r.dead) == 1
        )
        response = await client.get(f"{router.base_url}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        may_open.set()  # lets the closed sink's runner stop at shutdown

    m = parse_metrics(response.text)

    def get(name: str, **labels: str) -> float | None:
        return sample(m, name, **labels)

    assert get("webhook_router_requests_total", status="200") == 5
    assert get("webhook_router_requests_total", status="401") == 1
    assert get("webhook_router_requests_total", status="400") == 1
    assert get("webhook_router_messages_accepted_total", type="patient.admit") == 1
    assert get("webhook_router_messages_accepted_total", type="medical.document-download") == 1
    assert get("webhook_router_messages_accepted_total", type="devices.health-data") == 1
    assert get("webhook_router_messages_accepted_total", type="other.thing") == 1
    assert get("webhook_router_duplicates_total") == 1
    assert get("webhook_router_unrouted_total") == 1
    assert get("webhook_router_verification_failures_total") == 1
    assert get("webhook_router_ack_seconds_count") == 4

    assert get("webhook_router_deliveries_total", sink="ok", outcome="delivered") == 2
    assert get("webhook_router_deliveries_total", sink="stuck", outcome="retry") == 1
    assert get("webhook_router_deliveries_total", sink="refusing", outcome="dead") == 1
    assert get("webhook_router_delivery_seconds_count", sink="ok") == 2

    gauges = {
        sink: (
            get("webhook_router_pending_deliveries", sink=sink),
            get("webhook_router_retrying_deliveries", sink=sink),
            get("webhook_router_dead_letters", sink=sink),
        )
        for sink in ("ok", "stuck", "refusing", "closed")
    }
    assert gauges == {
        "ok": (0, 0, 0),
        "stuck": (1, 1, 0),  # attempted once, waiting for its retry
        "refusing": (0, 0, 1),
        "closed": (1, 0, 0),  # never attempted
    }
    oldest = {s: get("webhook_router_oldest_pending_seconds", sink=s) for s in gauges}
    assert oldest["ok"] == oldest["refusing"] == 0
    assert oldest["stuck"] is not None and oldest["stuck"] > 0
    assert oldest["closed"] is not None and oldest["closed"] > 0
    journal_bytes = get("webhook_router_journal_bytes")
    assert journal_bytes is not None and journal_bytes > 0


def listening_event(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    (record,) = [
        r for r in caplog.records if isinstance(r.msg, logs.Event) and r.msg.event == "listening"
    ]
    assert isinstance(record.msg, logs.Event)
    return record.msg.fields


async def test_admin_listen_serves_health_and_metrics_apart_from_the_webhook(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    recorder = Recorder()
    config = make_config(
        extra_plugins=(recorder,),
        server={"listen": ["127.0.0.1:0"], "path": "/webhook", "admin_listen": ["127.0.0.1:0"]},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        admin = listening_event(caplog)["admin"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", admin)
        assert admin != router.base_url
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)

        health = await client.get(f"{admin}/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        ready = await client.get(f"{admin}/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "journal": "ok", "sinks": {"archive": "up"}}
        metrics = await client.get(f"{admin}/metrics")
        assert metrics.status_code == 200
        m = parse_metrics(metrics.text)
        assert sample(m, "webhook_router_requests_total", status="200") == 1

        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(f"{router.base_url}{path}")).status_code == 404, path
        # ... and the admin address has no webhook endpoint.
        body = body_for(message_id="m-2")
        r = await client.post(f"{admin}/webhook", content=body, headers=signed(body))
        assert r.status_code == 404


async def test_scrapers_add_no_journal_work_and_the_gauges_follow(
    make_config: Callable[..., Config],
) -> None:
    # Each scrape used to scan the pending rows: 8 scrapers on 200k of them raised the ack p99
    # from 6.8 to 55.7 ms. Now the journal is read at most once per refresh interval.
    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Stuck), recorder),
        default=["stuck"],
        sinks={"stuck": {"type": "stuck"}},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        metrics = router.daemon.metrics

        async def scrape() -> float | None:
            r = await client.get(f"{router.base_url}/metrics")
            assert r.status_code == 200
            return sample(parse_metrics(r.text), "webhook_router_pending_deliveries", sink="stuck")

        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(scrape)
        for _ in range(50):
            assert await scrape() == 0
        elapsed = anyio.current_time() - started
        assert metrics.refreshes <= 1 + elapsed // metrics.refresh_every

        # The gauges still follow the journal, one refresh interval behind at most.
        metrics.refresh_every = 0.05
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        await recorder.wait_for(lambda r: len(r.failed) == 1)
        with anyio.fail_after(15):
            while await scrape() != 1:  # polled, as Prometheus does
                await anyio.sleep(0.01)


async def test_retention_sweep_removes_only_fully_delivered_messages(tmp_path: Path) -> None:
    received: list[tuple[str, str, int]] = []
    recorder = Recorder()

    def document(retention: str) -> dict[str, Any]:
        return base_config(
            tmp_path,
            journal={"path": str(tmp_path / "journal"), "retention": retention},
            routes=[
                {"match": "patient.*", "to": ["ok"]},
                {"match": "medical.*", "to": ["ok", "refusing"]},
                {"match": "devices.*", "to": ["ok", "stuck"]},
            ],
            default=[],
            sinks={
                "ok": {"type": "rec"},
                "stuck": {"type": "stuck"},
                "refusing": {"type": "refusing"},
            },
        )

    path = write_config(tmp_path, document("1h"))
    config = load_config(
        path,
        extra_plugins=(SinkPlugin(Stuck, Refusing, recording_sink("rec", received)), recorder),
    )
    messages = {
        "done-1": "patient.admit",  # delivered: removed
        "done-2": "patient.discharge",  # delivered: removed
        "dead-1": "medical.document-download",  # delivered to ok, dead-lettered by refusing
        "pending-1": "devices.health-data",  # delivered to ok, still pending for stuck
        "unrouted-1": "other.thing",  # no route, no default
    }

    def stored() -> set[str]:
        return {
            row[0] for row in query_journal(config.journal.path, "SELECT message_id FROM messages")
        }

    async with running_router(config) as router, httpx.AsyncClient() as client:
        for mid, type_ in messages.items():
            assert (await post(client, router.webhook_url, body_for(type_, mid))).status_code == 200
        await recorder.wait_for(
            lambda r: len(r.delivered) == 4 and len(r.dead) == 1 and len(r.failed) == 1
        )
        await router.daemon.sweep()  # retention 1h: everything is younger
        assert stored() == set(messages)

        write_config(tmp_path, document("0s"))
        assert await router.reload() is True
        await router.daemon.sweep()
        assert stored() == {"dead-1", "pending-1", "unrouted-1"}
        swept = router.daemon.metrics.registry.get_sample_value(
            "webhook_router_swept_messages_total"
        )
        assert swept == 2

    rows = query_journal(
        config.journal.path,
        "SELECT m.message_id, d.sink, d.state FROM deliveries d JOIN messages m USING (seq)",
    )
    assert sorted(rows) == [
        ("dead-1", "ok", "delivered"),
        ("dead-1", "refusing", "dead"),
        ("pending-1", "ok", "delivered"),
        ("pending-1", "stuck", "pending"),
    ]


def _identifiers(value: Any) -> Iterator[str]:
    """Patient and user identifiers anywhere in a fixture document."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("patientId", "userId", "externalId") and isinstance(v, str):
                yield v
            yield from _identifiers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _identifiers(v)


PLAIN_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ \S"
)


@pytest.mark.parametrize("fmt", ["json", "plain"])
async def test_logs_are_lines_with_ids_and_never_patient_data_or_keys(
    make_config: Callable[..., Config], capsys: pytest.CaptureFixture[str], fmt: logs.LogFormat
) -> None:
    vectors = [v for v in fixture_vectors() if v[0] != "ping.json"]
    secrets = {TEST_KEY, *(sig for _, _, sig in vectors)}
    for name, _, _ in vectors:
        secrets.update(_identifiers(json.loads((FIXTURES / name).read_text())))
    assert len(secrets) > len(vectors) + 1  # the fixtures do name patients

    logs.setup("INFO", fmt)
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,))
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for _, body, signature in vectors:
            headers = {"x-metriport-signature": signature, "content-type": "application/json"}
            assert (
                await client.post(router.webhook_url, content=body, headers=headers)
            ).status_code == 200
        # Rejections are logged too: a wrong signature over a fixture, and a body that is
        # not JSON.
        body = vectors[0][1]
        r = await client.post(router.webhook_url, content=body, headers=signed(body, "wrong"))
        assert r.status_code == 401
        assert (await post(client, router.webhook_url, body + b"}")).status_code == 400
        await recorder.wait_for(lambda r: len(r.delivered) == len(vectors))

    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines
    for secret in secrets:
        assert secret not in err
    ids = {
        json.loads(body)["meta"]["messageId"]: json.loads(body)["meta"]["type"]
        for _, body, _ in vectors
    }

    if fmt == "plain":
        for line in lines:
            assert PLAIN_LINE.match(line), line
        for mid, type_ in ids.items():
            assert any(f"accepted id={mid} type={type_} " in line for line in lines)
            assert any(f"delivered id={mid} type={type_} sink=archive " in line for line in lines)
        return

    docs = [json.loads(line) for line in lines]
    # The test's own HTTP client logs through the same handler: only the router's lines are
    # held to the event format.
    docs = [d for d in docs if not d["logger"].startswith(("httpx", "httpcore"))]
    assert all(d["logger"].startswith("router") for d in docs), docs
    for doc in docs:
        assert {"ts", "level", "logger", "event"} <= set(doc), doc
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])
    accepted = {(d["id"], d["type"]) for d in docs if d["event"] == "accepted"}
    delivered = {(d["id"], d["type"], d["sink"]) for d in docs if d["event"] == "delivered"}
    assert accepted == set(ids.items())
    assert delivered == {(mid, type_, "archive") for mid, type_ in ids.items()}
    assert all(
        d["level"] == "info" and d["logger"] == "router.delivery"
        for d in docs
        if d["event"] == "delivered"
    )
    rejected = [d["reason"] for d in docs if d["event"] == "rejected"]
    assert rejected[0] == "verification failed"
    assert len(rejected) == 2


HOSTILE = [
    "a\nb",
    "a\rb",
    "a\u2028b",
    "a\x85b",
    "a\x1b[31mb",
    'a" level=ERROR forged="yes',
    "a level=ERROR",
]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_plain_log_values_cannot_forge_a_line_or_a_field(
    hostile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    event = kv("accepted", id="m-1", type=hostile, bytes=12)
    assert str(event).isprintable()
    logs.setup("INFO", "plain")
    logging.getLogger("router.ingress").info(event)
    err = capsys.readouterr().err
    (line,) = err.splitlines()  # one line, by every definition of a line break
    assert err == line + "\n"
    assert PLAIN_LINE.match(line)
    fields = shlex.split(line.split(" router.ingress ", 1)[1])
    assert fields[0] == "accepted"
    assert [f.split("=", 1)[0] for f in fields[1:]] == ["id", "type", "bytes"]
    assert fields[1] == "id=m-1" and fields[3] == "bytes=12"


@pytest.mark.parametrize("hostile", HOSTILE)
def test_json_log_values_stay_in_their_field(
    hostile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup("INFO", "json")
    logging.getLogger("router.ingress").info(kv("accepted", id="m-1", type=hostile))
    err = capsys.readouterr().err
    (line,) = err.split("\n")[:-1]
    doc = json.loads(line)
    assert (doc["event"], doc["id"], doc["type"]) == ("accepted", "m-1", hostile)
    assert set(doc) == {"ts", "level", "logger", "event", "id", "type"}


class _CountingBytes(io.BytesIO):
    """The bytes a log stream wrote, and how many writes reached it."""

    writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


def _handler_on_counting_stream() -> tuple[logging.Logger, _CountingBytes]:
    raw = _CountingBytes()
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=False)
    handler = logs.CoalescingHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.coalescing")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, raw


async def test_log_lines_of_one_loop_iteration_go_out_in_one_write() -> None:
    logger, raw = _handler_on_counting_stream()
    for i in range(3):
        logger.info("line %d", i)
    assert raw.getvalue() == b""  # queued for the end of this iteration, not yet written
    await anyio.sleep(0)
    assert raw.getvalue() == b"line 0\nline 1\nline 2\n"
    assert raw.writes == 1
    logger.info("line 3")
    await anyio.sleep(0)
    assert raw.getvalue().endswith(b"line 2\nline 3\n")
    assert raw.writes == 2


@pytest.mark.parametrize("unbuffered", [False, True])
async def test_the_daemons_log_stream_is_not_written_line_by_line(
    monkeypatch: pytest.MonkeyPatch, unbuffered: bool
) -> None:
    """stderr as Python makes it when not a terminal (line-buffered), or with PYTHONUNBUFFERED
    (each write goes through): ``setup`` makes it buffer, so lines go out together."""
    raw = _CountingBytes()
    stream = io.TextIOWrapper(raw, encoding="utf-8", line_buffering=True, write_through=unbuffered)
    monkeypatch.setattr(sys, "stderr", stream)
    logs.setup("INFO", "plain")
    logger = logging.getLogger("router.test")
    for i in range(5):
        logs.emit(logger, logging.INFO, "accepted", id=f"m-{i}")
        logger.info(kv("duplicate", id=f"m-{i}"))
    assert raw.writes == 0
    await anyio.sleep(0)
    assert raw.getvalue().endswith(b"duplicate id=m-4\n")
    assert raw.writes == 1


def test_log_lines_outside_a_loop_go_out_at_once_and_a_loops_last_line_is_not_lost() -> None:
    logger, raw = _handler_on_counting_stream()

    async def log_and_leave() -> None:
        logger.info("in a loop")  # its write is queued in a loop that then ends

    anyio.run(log_and_leave)
    logger.info("after")
    assert raw.getvalue() == b"in a loop\nafter\n"
    logger.info("again")
    assert raw.getvalue() == b"in a loop\nafter\nagain\n"


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_the_direct_log_path_writes_the_line_logging_would(
    fmt: logs.LogFormat, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``logs.emit`` (the per-message lines) skips logging's record and handler chain when only
    the daemon's handler would see the line: the line must be the one logging writes."""
    monkeypatch.setattr(time, "time", lambda: 1_767_225_600.25)
    logs.setup("INFO", fmt)
    logger = logging.getLogger("router.dispatcher")
    fields = dict(id="m-1", type="patient.admit", sink="a b", attempt=1, ms=1.5, request=None)
    logger.info(kv("delivered", **fields))
    logs.emit(logger, logging.INFO, "delivered", **fields)
    logs.emit(logger, logging.DEBUG, "delivered", **fields)  # below the level: nothing
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]


def test_the_direct_log_path_leaves_other_handlers_their_records(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.setup("INFO", "plain")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    router_logger = logging.getLogger("router")
    router_logger.addHandler(keep)
    try:
        logs.emit(logging.getLogger("router.ingress"), logging.INFO, "accepted", id="m-1")
    finally:
        router_logger.removeHandler(keep)
    assert [r.getMessage() for r in seen] == ["accepted id=m-1"]
    assert capsys.readouterr().err.endswith(" INFO router.ingress accepted id=m-1\n")


def test_observing_a_batch_at_once_counts_as_observing_each() -> None:
    """``Metrics.observe_many`` (a batch's delivery times) must expose what ``observe`` one by
    one does: the same buckets, bounds included, the same count and sum."""
    values = [0.0, 0.005, 0.0051, 0.3, 0.3, 1.0, 7.5, 3600.0, 1e9, -1.0]
    rendered = []
    for many in (False, True):
        registry = CollectorRegistry()
        h = Histogram("lag", "", ["sink"], buckets=(0.005, 0.25, 1, 3600), registry=registry)
        child = h.labels("a")
        if many:
            Metrics.observe_many(child, values)
        else:
            for v in values:
                child.observe(v)
        rendered.append(generate_latest(registry))
    assert rendered[0] == rendered[1]
    assert b'lag_bucket{le="0.005",sink="a"} 3.0' in rendered[1]


_SET_GAUGE = """
import sys
from router.metrics import Metrics
Metrics().metriport_failed_seen.set(float(sys.argv[1]))
"""


def test_with_workers_the_metriport_gauge_is_one_series_not_one_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the worker holding the Metriport lock checks; any worker (or a restarted one, with
    a new pid) may be the one: /metrics shows the latest count once, not a series per pid."""
    folder = tmp_path / "multiproc"
    folder.mkdir()
    env = {**os.environ, MULTIPROC_ENV: str(folder)}
    for value in ("3", "5"):  # two worker processes, one after the other
        subprocess.run([sys.executable, "-c", _SET_GAUGE, value], env=env, check=True)
    monkeypatch.setenv(MULTIPROC_ENV, str(folder))
    text = Metrics().render().decode()
    samples = [
        s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "webhook_router_metriport_failed_seen"
    ]
    assert [(s.labels, s.value) for s in samples] == [({}, 5.0)]
