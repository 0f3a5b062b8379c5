"""The ``http`` sink against a real HTTP server on loopback (``tests.http_peer``).

Delivery is tested end to end: the real router on a loopback port receives signed Metriport
messages and forwards them to the peer, which records what arrived. The mapping of answers to
outcomes, ``Retry-After`` and the request a message becomes are also unit-tested directly.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from plugins import _httpclient
from plugins.http import HttpOptions, HttpSink
from router import PermanentError, RetryableError, SinkContext, hookimpl
from router.auth import sign
from router.config import Config
from router.errors import ConfigError
from router.message import Message
from router.testing import Recorder, body_for, message_for, running_router
from tests.conftest import TEST_KEY, fixture_vectors, post, query_journal
from tests.http_peer import HttpPeer, Reply, Request

pytestmark = pytest.mark.anyio

#: Fast, unlimited retries: the tests wait for an outcome, never for a number of attempts.
FAST = {"initial": "10ms", "max": "50ms", "max_attempts": 0}
DOWNSTREAM_KEY = "downstream-key-6789xyz"
FIXTURES = [(name, body) for name, body, _ in fixture_vectors() if name != "ping.json"]


class RetryDelays:
    """A plugin recording ``retry_in`` of every failed attempt: (message id, sink, seconds)."""

    __name__ = "retry-delays"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, float]] = []

    @hookimpl
    def router_delivery_failed(self, message: Message, sink: str, retry_in: float) -> None:
        self.seen.append((message.message_id, sink, retry_in))


def http_router_config(
    make_config: Callable[..., Config], sinks: dict[str, dict[str, Any]], *plugins: object
) -> Config:
    """Every message goes to every one of ``sinks`` (http sinks with fast retries)."""
    return make_config(
        extra_plugins=plugins,
        default=list(sinks),
        sinks={name: {"type": "http", "retry": FAST, **s} for name, s in sinks.items()},
    )


def by_key(requests: list[Request]) -> dict[str, list[Request]]:
    """Requests grouped by their Idempotency-Key."""
    groups: dict[str, list[Request]] = {}
    for r in requests:
        groups.setdefault(r.header("idempotency-key") or "", []).append(r)
    return groups


def journal_rows(config: Config) -> dict[tuple[str, str], tuple[str, int, float, float, str]]:
    """(message id, sink) → (state, attempts, next_attempt_at, updated_at, last_error)."""
    rows = query_journal(
        config.journal.path,
        "SELECT m.message_id, d.sink, d.state, d.attempts, d.next_attempt_at, d.updated_at,"
        " d.last_error FROM deliveries d JOIN messages m USING (seq)",
    )
    return {(r[0], r[1]): (r[2], r[3], r[4], r[5], r[6] or "") for r in rows}


# -- what arrives ------------------------------------------------------------------------------


async def test_every_fixture_arrives_byte_for_byte_with_the_router_headers(
    make_config: Callable[..., Config],
) -> None:
    recorder = Recorder()
    with HttpPeer() as peer:
        config = http_router_config(make_config, {"ehr": {"url": peer.url("/in")}}, recorder)
        async with running_router(config) as router, httpx.AsyncClient() as client:
            for _, body in FIXTURES:
                assert (await post(client, router.webhook_url, body)).status_code == 200
            await recorder.wait_for(lambda r: len(r.delivered) == len(FIXTURES))

    received = by_key(peer.requests)
    assert len(peer.requests) == len(FIXTURES)
    for name, body in FIXTURES:
        meta = json.loads(body)["meta"]
        [request] = received[meta["messageId"]]
        assert request.body == body, name  # verbatim: not re-serialised
        assert (request.method, request.path) == ("POST", "/in")
        assert request.header("content-type") == "application/json"
        assert request.header("x-webhook-router-message-id") == meta["messageId"]
        assert request.header("x-webhook-router-type") == meta["type"]
        assert request.header("x-webhook-router-attempt") == "1"
        assert request.header("user-agent") == _httpclient.USER_AGENT
        # Metriport's own signature is not passed on: without `sign`, nothing is signed.
        assert request.header("x-metriport-signature") is None
    assert recorder.dead == [] and recorder.failed == []


async def test_extra_headers_signing_and_url_placeholders(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EHR_TOKEN", "Bearer t0k3n-from-env")
    monkeypatch.setenv("EHR_WEBHOOK_KEY", DOWNSTREAM_KEY)
    recorder = Recorder()
    odd_type, odd_id = "vendor.odd type/x", "id with/slash?&#%"
    with HttpPeer() as peer:
        config = http_router_config(
            make_config,
            {
                "ehr": {
                    "url": peer.url("/ehr/{type}/{messageId}"),
                    "method": "PUT",
                    "headers": {"authorization": {"env": "EHR_TOKEN"}, "x-tenant": "acme"},
                    "sign": {"key": {"env": "EHR_WEBHOOK_KEY"}},
                },
                "legacy": {
                    "url": peer.url("/legacy?id={messageId}"),
                    "sign": {"key": {"env": "EHR_WEBHOOK_KEY"}, "header": "x-signature"},
                },
            },
            recorder,
        )
        admit = dict(FIXTURES)["patient.admit.json"]
        odd = body_for(odd_type, odd_id)
        async with running_router(config) as router, httpx.AsyncClient() as client:
            for body in (admit, odd):
                assert (await post(client, router.webhook_url, body)).status_code == 200
            await recorder.wait_for(lambda r: len(r.delivered) == 4)

    admit_id = json.loads(admit)["meta"]["messageId"]
    requests = {(r.path.split("/")[1].split("?")[0], r.body): r for r in peer.requests}
    assert len(requests) == len(peer.requests) == 4

    ehr = requests["ehr", admit]
    assert (ehr.method, ehr.path) == ("PUT", f"/ehr/patient.admit/{admit_id}")
    assert ehr.header("authorization") == "Bearer t0k3n-from-env"
    assert ehr.header("x-tenant") == "acme"
    assert ehr.header("x-metriport-signature") == sign(admit, DOWNSTREAM_KEY)
    assert ehr.header("x-metriport-signature") != sign(admit, TEST_KEY)

    ehr_odd = requests["ehr", odd]
    assert ehr_odd.path == "/ehr/vendor.odd%20type%2Fx/id%20with%2Fslash%3F%26%23%25"
    assert ehr_odd.header("idempotency-key") == odd_id
    assert ehr_odd.header("x-webhook-router-type") == odd_type

    legacy = requests["legacy", admit]
    assert (legacy.method, legacy.path) == ("POST", f"/legacy?id={admit_id}")
    assert legacy.header("x-signature") == sign(admit, DOWNSTREAM_KEY)
    assert legacy.header("x-metriport-signature") is None
    assert legacy.header("authorization") is None  # headers are per sink
    assert requests["legacy", odd].path == "/legacy?id=id%20with%2Fslash%3F%26%23%25"


async def test_a_non_ascii_type_is_delivered_not_retried_forever(
    make_config: Callable[..., Config],
) -> None:
    """Header values carry the type and id as sent (UTF-8), like the body does."""
    recorder = Recorder()
    with HttpPeer() as peer:
        config = http_router_config(
            make_config,
            {"ehr": {"url": peer.url("/in"), "retry": {**FAST, "max_attempts": 2}}},
            recorder,
        )
        body = body_for("patient.admission-é", "id-ü")
        async with running_router(config) as router, httpx.AsyncClient() as client:
            assert (await post(client, router.webhook_url, body)).status_code == 200
            await recorder.wait_for(lambda r: len(r.delivered) + len(r.dead) == 1)

    assert recorder.delivered == [("id-ü", "ehr", 1)]
    [request] = peer.requests
    assert request.body == body
    # http.server decodes header bytes as ISO-8859-1: undo that to compare the UTF-8 bytes.
    raw = request.header("x-webhook-router-type") or ""
    assert raw.encode("latin-1").decode() == "patient.admission-é"


def test_url_and_headers_for_a_message(tmp_path: Path) -> None:
    options = HttpOptions.model_validate(
        {
            "url": "https://ehr.example/{type}/x/{messageId}/{type}",
            "headers": {"x-extra": "1", "content-type": "text/plain"},
            "sign": {"key": DOWNSTREAM_KEY, "header": "x-sig"},
        }
    )
    sink = HttpSink(options, SinkContext("ehr", tmp_path, 5.0, 1, 1))
    message = message_for("a/b c", "m?1")
    retried = Message(message.message_id, message.type, None, message.body, 0.0, attempt=7)

    assert sink.url_for(message) == "https://ehr.example/a%2Fb%20c/x/m%3F1/a%2Fb%20c"
    assert sink.headers_for(retried) == {
        "x-extra": "1",
        "content-type": "application/json",  # the router's own headers win
        "idempotency-key": "m?1",
        "x-webhook-router-message-id": "m?1",
        "x-webhook-router-type": "a/b c",
        "x-webhook-router-attempt": "7",
        "x-sig": sign(message.body, DOWNSTREAM_KEY),
    }


# -- answers -----------------------------------------------------------------------------------

DELIVERED = [200, 201, 202, 204]
RETRIED = [408, 425, 429, 500, 502, 503, 504]
DEAD = [400, 401, 403, 404, 409, 410, 422, 301, 302, 307, 308]


def first_answer_by_id(request: Request) -> Reply:
    """Message ``s-<status>`` is answered ``<status>`` on its first attempt, 200 after."""
    if request.path == "/moved":
        return Reply(200)
    status = int((request.header("idempotency-key") or "s-200").split("-")[1])
    if request.header("x-webhook-router-attempt") != "1":
        return Reply(200)
    location = {"location": "/moved"} if 300 <= status < 400 else {}
    return Reply(status, location, b"rejected" if status >= 300 else b"")


async def test_every_status_class_maps_to_its_outcome(
    make_config: Callable[..., Config],
) -> None:
    recorder = Recorder()
    statuses = DELIVERED + RETRIED + DEAD
    with HttpPeer(first_answer_by_id) as peer:
        config = http_router_config(
            make_config,
            {
                "plain": {"url": peer.url("/plain")},
                "lenient": {"url": peer.url("/lenient"), "retry_on": [409]},
            },
            recorder,
        )
        async with running_router(config) as router, httpx.AsyncClient() as client:
            for status in statuses:
                body = body_for(message_id=f"s-{status}")
                assert (await post(client, router.webhook_url, body)).status_code == 200
            await recorder.wait_for(lambda r: len(r.delivered) + len(r.dead) == 2 * len(statuses))

    def expected(status: int, sink: str) -> tuple[str, int]:
        if status in DELIVERED:
            return ("delivered", 1)
        if status in RETRIED or (status == 409 and sink == "lenient"):
            return ("delivered", 2)
        return ("dead", 1)

    outcomes = {(mid, sink): ("delivered", n) for mid, sink, n in recorder.delivered}
    outcomes |= {(mid, sink): ("dead", 1) for mid, sink, _ in recorder.dead}
    assert outcomes == {
        (f"s-{s}", sink): expected(s, sink) for s in statuses for sink in ("plain", "lenient")
    }
    attempts = Counter((r.path, r.header("idempotency-key")) for r in peer.requests)
    assert attempts == {
        (f"/{sink}", f"s-{s}"): expected(s, sink)[1]
        for s in statuses
        for sink in ("plain", "lenient")
    }
    assert all(r.path != "/moved" for r in peer.requests)  # redirects are not followed
    rows = journal_rows(config)
    # The downstream's answer body is not kept: it may echo the message.
    assert rows["s-302", "plain"][4] == (
        "PermanentError: HTTP 302 (redirect not followed; see follow_redirects)"
    )
    assert rows["s-422", "plain"][4] == "PermanentError: HTTP 422"
    assert rows["s-409", "lenient"][:2] == ("delivered", 2)


@pytest.mark.parametrize(
    ("status", "retry_on", "outcome"),
    [
        *[(s, (), None) for s in (200, 201, 204, 299)],
        *[(s, (), RetryableError) for s in (408, 425, 429, 500, 503, 599)],
        *[(s, (), PermanentError) for s in (300, 301, 302, 304, 307, 308)],
        *[(s, (), PermanentError) for s in (400, 401, 403, 404, 409, 410, 422, 451, 499)],
        (409, (409,), RetryableError),
        (404, (409,), PermanentError),
    ],
)
def test_status_error(
    status: int, retry_on: tuple[int, ...], outcome: type[Exception] | None
) -> None:
    error = _httpclient.status_error(status, {}, "code", retry_on=retry_on)
    if outcome is None:
        assert error is None
    else:
        assert type(error) is outcome
        assert str(error).startswith(f"HTTP {status}: code")


async def test_retry_after_in_seconds_and_as_a_date_sets_the_next_attempt(
    make_config: Callable[..., Config],
) -> None:
    in_five_minutes = email.utils.format_datetime(
        dt.datetime.now(dt.UTC) + dt.timedelta(seconds=300), usegmt=True
    )
    answers = {
        "seconds": Reply(503, {"Retry-After": "120"}),
        "date": Reply(429, {"Retry-After": in_five_minutes}),
        "garbage": Reply(503, {"Retry-After": "soon"}),
    }

    def answer(request: Request) -> Reply:
        if request.header("x-webhook-router-attempt") == "1":
            return answers[request.header("idempotency-key") or ""]
        return Reply(200)

    recorder, delays = Recorder(), RetryDelays()
    with HttpPeer(answer) as peer:
        config = http_router_config(make_config, {"ehr": {"url": peer.url("/")}}, recorder, delays)
        async with running_router(config) as router, httpx.AsyncClient() as client:
            for mid in answers:
                body = body_for(message_id=mid)
                assert (await post(client, router.webhook_url, body)).status_code == 200
            await recorder.wait_for(lambda r: len(r.failed) == 3 and len(r.delivered) == 1)

    seen = {mid: delay for mid, _, delay in delays.seen}
    assert seen["seconds"] == 120.0
    assert 295.0 <= seen["date"] <= 300.0  # the date has whole seconds
    assert seen["garbage"] <= 0.05  # ignored: the sink's own backoff
    rows = journal_rows(config)
    for mid, low, high in (("seconds", 119.0, 121.0), ("date", 294.0, 301.0)):
        state, attempts, next_at, updated_at, _ = rows[mid, "ehr"]
        assert (state, attempts) == ("pending", 1)
        assert low <= next_at - updated_at <= high
    assert rows["garbage", "ehr"][:2] == ("delivered", 2)
    assert recorder.delivered == [("garbage", "ehr", 2)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: at once
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("", None),
    ],
)
def test_retry_after_parsing(value: str, expected: float | None) -> None:
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert _httpclient.retry_after({"retry-after": value}, now=now) == expected


def test_retry_after_absent_and_carried_by_the_error() -> None:
    assert _httpclient.retry_after({}) is None
    error = _httpclient.status_error(503, httpx.Headers({"Retry-After": "42"}))
    assert isinstance(error, RetryableError) and error.retry_after == 42.0
    error = _httpclient.status_error(500, httpx.Headers({}))
    assert isinstance(error, RetryableError) and error.retry_after is None


# -- a downstream that is down, or hangs -------------------------------------------------------


async def test_a_downstream_down_then_back_gets_every_message_exactly_once(
    make_config: Callable[..., Config],
) -> None:
    recorder = Recorder()
    peer = HttpPeer().start()
    try:
        config = http_router_config(make_config, {"ehr": {"url": peer.url("/in")}}, recorder)
        ids = [f"m-{i}" for i in range(6)]
        async with running_router(config) as router, httpx.AsyncClient() as client:
            # Up: the first message goes through (and leaves a pooled keep-alive connection).
            assert (await post(client, router.webhook_url, body_for(message_id=ids[0]))).is_success
            await recorder.wait_for(lambda r: len(r.delivered) == 1)

            peer.stop()  # down: connection refused, the pooled connection is closed
            for mid in ids[1:]:
                assert (await post(client, router.webhook_url, body_for(message_id=mid))).is_success
            await recorder.wait_for(lambda r: {mid for mid, _, _ in r.failed} == set(ids[1:]))
            assert recorder.delivered_to("ehr") == ids[:1]

            peer.start()  # back, on the same port
            await peer.until(lambda rs: {r.header("idempotency-key") for r in rs} >= set(ids))
            await recorder.wait_for(lambda r: len(r.delivered) == len(ids))
    finally:
        peer.stop()

    assert Counter(r.header("idempotency-key") for r in peer.requests) == dict.fromkeys(ids, 1)
    assert sorted(recorder.delivered_to("ehr")) == ids
    assert recorder.dead == []
    assert {e for _, _, e in recorder.failed} == {"RetryableError"}
    rows = journal_rows(config)
    assert all(rows[mid, "ehr"][0] == "delivered" for mid in ids)


async def test_a_downstream_that_hangs_past_the_timeout_is_retried(
    make_config: Callable[..., Config],
) -> None:
    recorder = Recorder()
    with HttpPeer() as peer:
        peer.script(Reply(hang=True))  # the first request is never answered
        config = http_router_config(
            make_config, {"ehr": {"url": peer.url("/in"), "timeout": "500ms"}}, recorder
        )
        async with running_router(config) as router, httpx.AsyncClient() as client:
            body = body_for(message_id="m-1")
            assert (await post(client, router.webhook_url, body)).status_code == 200
            await recorder.wait_for(lambda r: len(r.delivered) == 1)

    # Normally attempt 2 succeeds; on a very slow machine it may time out too: any later
    # attempt is fine as long as the hang was retried and the message delivered once.
    attempts = [r.header("x-webhook-router-attempt") for r in peer.requests]
    assert attempts == [str(n) for n in range(1, len(attempts) + 1)]
    assert len(attempts) >= 2
    assert all(r.body == body and r.header("idempotency-key") == "m-1" for r in peer.requests)
    assert len(recorder.failed) == len(attempts) - 1
    assert {e for _, _, e in recorder.failed} <= {"RetryableError", "TimeoutError"}
    assert recorder.delivered == [("m-1", "ehr", len(attempts))]


async def test_transport_failures_map_to_retryable_or_permanent() -> None:
    """``post`` itself, on a client with a short deadline: a hanging or absent server is
    retryable, a URL no client can use is permanent."""
    client = _httpclient.new_client(timeout=0.5, connect_timeout=0.5, connections=2)
    async with client:
        with HttpPeer() as peer:
            peer.script(Reply(hang=True))
            with pytest.raises(RetryableError, match="no answer in time"):
                await _httpclient.post(client, "POST", peer.url("/in"), b"{}", {})
            status, _, answer = await _httpclient.post(client, "POST", peer.url("/in"), b"{}", {})
            assert (status, answer) == (200, b"")
        # stopped: nothing listens on that port any more
        with pytest.raises(RetryableError, match="ConnectError"):
            await _httpclient.post(client, "POST", peer.url("/in"), b"{}", {})
        with pytest.raises(PermanentError, match="cannot send to this URL"):
            await _httpclient.post(client, "POST", "ftp://127.0.0.1/in", b"{}", {})


async def test_a_redirect_that_would_drop_the_body_is_not_delivered(
    make_config: Callable[..., Config],
) -> None:
    """With ``follow_redirects``, a 301/302/303 turns a POST into a body-less GET: that must not
    count as delivered. 307/308 keep method and body and are followed."""

    def answer(request: Request) -> Reply:
        if request.path.startswith("/moved"):
            return Reply(200)
        status = int(request.header("idempotency-key") or "0")
        return Reply(status, {"location": f"/moved/{status}"})

    recorder = Recorder()
    with HttpPeer(answer) as peer:
        config = http_router_config(
            make_config, {"ehr": {"url": peer.url("/in"), "follow_redirects": True}}, recorder
        )
        async with running_router(config) as router, httpx.AsyncClient() as client:
            for status in ("301", "302", "303", "307", "308"):
                body = body_for(message_id=status)
                assert (await post(client, router.webhook_url, body)).status_code == 200
            await recorder.wait_for(lambda r: len(r.delivered) + len(r.dead) == 5)

    assert sorted(recorder.delivered_to("ehr")) == ["307", "308"]
    assert sorted(mid for mid, _, _ in recorder.dead) == ["301", "302", "303"]
    moved = {r.path: r for r in peer.requests if r.path.startswith("/moved")}
    for status in ("307", "308"):
        assert moved[f"/moved/{status}"].method == "POST"
        assert moved[f"/moved/{status}"].body == body_for(message_id=status)
    rows = journal_rows(config)
    assert "redirect" in rows["302", "ehr"][4]


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "key", "text"),
    [
        ({"url": "ftp://ehr.example/in"}, "sinks.ehr.url", "http:// or https://"),
        ({"url": "ehr.example/in"}, "sinks.ehr.url", "http:// or https://"),
        ({"url": "https://ehr.example/{patientId}"}, "sinks.ehr.url", "{patientId}"),
        ({"url": "https://x/", "retry_on": [409, 500]}, "sinks.ehr.retry_on[1]", "499"),
        ({"url": "https://x/", "retry_on": [302]}, "sinks.ehr.retry_on[0]", "400"),
        ({"url": "https://x/", "method": "GET"}, "sinks.ehr.method", ""),
        ({"url": "https://x/", "bogus": 1}, "sinks.ehr.bogus", ""),
    ],
)
def test_config_errors_name_the_key(
    make_config: Callable[..., Config], options: dict[str, Any], key: str, text: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(default=["ehr"], sinks={"ehr": {"type": "http", **options}})
    problems = [(p.path, p.message) for p in caught.value.problems]
    assert any(path == key and text in message for path, message in problems), problems


def test_a_valid_configuration_loads(make_config: Callable[..., Config]) -> None:
    config = make_config(
        default=["ehr"],
        sinks={"ehr": {"type": "http", "url": "https://x/{type}", "retry_on": [409, 423]}},
    )
    assert config.sinks["ehr"].options == HttpOptions(url="https://x/{type}", retry_on=[409, 423])
    assert config.sinks["ehr"].build(config.base_dir).describe() == "http POST https://x/{type}"
