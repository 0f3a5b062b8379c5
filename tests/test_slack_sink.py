"""The ``slack`` sink against a local server speaking Slack's two APIs (``FakeSlack``).

End to end: the real router receives signed Metriport messages and posts summaries to the fake
Slack over loopback, through an incoming webhook (``webhook_url``) and through the Web API
(``token`` + ``channel`` + ``api_url``). The summary text itself is also unit-tested directly.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from plugins.slack import SlackOptions, SlackSink, summary
from router import RetryableError, SinkContext, hookimpl
from router.config import Config
from router.errors import ConfigError
from router.message import Message
from router.testing import Recorder, body_for, running_router
from tests.conftest import FIXTURES, post, query_journal
from tests.http_peer import HttpPeer, Reply, Request

pytestmark = pytest.mark.anyio

TOKEN = "xoxb-0000-test-token"
CHANNEL = "#metriport-alerts"
HOOK = "/services/T0000/B0000/hook"
FAST = {"initial": "10ms", "max": "50ms", "max_attempts": 0}
JSON = {"content-type": "application/json; charset=utf-8"}


class FakeSlack:
    """Slack's incoming webhooks (``/services/...``) and Web API (``/api/chat.postMessage``).

    Webhook: ``HOOK`` answers ``ok``; ``/services/.../gone`` 404 ``channel_not_found``; other
    paths 404 ``no_service``; a body without ``text`` 400 ``invalid_payload``. Web API: a wrong
    token gets ``{"ok": false, "error": "invalid_auth"}``, a channel not in ``channels``
    ``channel_not_found``, else ``{"ok": true}``. ``once[path or channel]`` holds replies given
    before the normal answer (rate limits, transient errors)."""

    def __init__(self, channels: tuple[str, ...] = (CHANNEL,)) -> None:
        self.channels = channels
        self.once: dict[str, deque[Reply]] = {}
        self.peer = HttpPeer(self.answer)

    def answer(self, request: Request) -> Reply:
        if request.path.startswith("/services/"):
            return self._webhook(request)
        if request.path == "/api/chat.postMessage" and request.method == "POST":
            return self._post_message(request)
        return Reply(404, {"content-type": "text/plain"}, b"not_found")

    def _next(self, key: str) -> Reply | None:
        queue = self.once.get(key)
        return queue.popleft() if queue else None

    def _webhook(self, request: Request) -> Reply:
        if request.path.endswith("/gone"):
            return Reply(404, {"content-type": "text/plain"}, b"channel_not_found")
        if request.path != HOOK:
            return Reply(404, {"content-type": "text/plain"}, b"no_service")
        if not isinstance(json.loads(request.body).get("text"), str):
            return Reply(400, {"content-type": "text/plain"}, b"invalid_payload")
        return self._next(request.path) or Reply(200, {"content-type": "text/plain"}, b"ok")

    def _post_message(self, request: Request) -> Reply:
        if request.header("authorization") != f"Bearer {TOKEN}":
            return _api({"ok": False, "error": "invalid_auth"})
        doc = json.loads(request.body)
        if doc.get("channel") not in self.channels:
            return _api({"ok": False, "error": "channel_not_found"})
        return self._next(doc["channel"]) or _api(
            {"ok": True, "channel": "C0123", "ts": "1700000000.000100"}
        )

    def __enter__(self) -> FakeSlack:
        self.peer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peer.stop()

    def posted(self, path: str) -> list[dict[str, Any]]:
        """The JSON documents posted to ``path``, in order."""
        return [json.loads(r.body) for r in self.peer.requests if r.path == path]


def _api(doc: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {**JSON, **(headers or {})}, json.dumps(doc).encode())


class RetryDelays:
    """A plugin recording ``retry_in`` of every failed attempt by (message id, sink)."""

    __name__ = "retry-delays"

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}

    @hookimpl
    def router_delivery_failed(self, message: Message, sink: str, retry_in: float) -> None:
        self.seen[message.message_id, sink] = retry_in


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake


def slack_config(
    make_config: Callable[..., Config], sinks: dict[str, dict[str, Any]], *plugins: object
) -> Config:
    """Every message goes to every one of ``sinks`` (slack sinks with fast retries)."""
    return make_config(
        extra_plugins=plugins,
        default=list(sinks),
        sinks={name: {"type": "slack", "retry": FAST, **s} for name, s in sinks.items()},
    )


def delivered(n: int) -> Callable[[Recorder], bool]:
    return lambda r: len(r.delivered) == n


def web_api(slack: FakeSlack, **options: Any) -> dict[str, Any]:
    return {"token": TOKEN, "channel": CHANNEL, "api_url": slack.peer.url("/api"), **options}


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_message(name: str) -> Message:
    body = fixture(name)
    meta = json.loads(body)["meta"]
    return Message(meta["messageId"], meta["type"], meta["when"], body, 0.0)


# -- what is posted ----------------------------------------------------------------------------

UNKNOWN = body_for("vendor.new-thing", "m-unknown", payload={"patientId": "p-77", "x": 1})
EXPECTED: dict[str, tuple[bytes, str]] = {
    "admit": (
        fixture("patient.admit.json"),
        "*Patient admitted* (`patient.admit`)\n"
        "message `a1b2c3d4-0001-4e5f-8a9b-0c1d2e3f4a5b` at 2025-10-16T02:14:09.771Z\n"
        "patients: 1",
    ),
    "download": (
        fixture("medical.document-download.json"),
        "*Document download completed* (`medical.document-download`)\n"
        "message `b2a7e5d1-3c94-4f60-8e1b-9a0c7d5f2e13` at 2025-10-14T15:42:07.318Z\n"
        "patients: 1 · documents: 3 · status: completed",
    ),
    "download-failed": (
        fixture("medical.document-download.failed.json"),
        "*Document download failed* (`medical.document-download`)\n"
        "message `0c9d8e7f-6a5b-4c3d-9e2f-1a0b9c8d7e65` at 2025-10-15T08:03:55.902Z\n"
        "patients: 1 · status: failed",
    ),
    "unknown": (
        UNKNOWN,
        "*Metriport message* (`vendor.new-thing`)\n"
        "message `m-unknown` at 2026-01-01T00:00:00.000Z\n"
        "patients: 1",
    ),
}


async def test_the_exact_json_posted_through_both_apis(
    make_config: Callable[..., Config], slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLACK_WEBHOOK_URL", slack.peer.url(HOOK))
    monkeypatch.setenv("SLACK_BOT_TOKEN", TOKEN)
    recorder = Recorder()
    config = slack_config(
        make_config,
        {
            "hook": {"webhook_url": {"env": "SLACK_WEBHOOK_URL"}},
            "api": {**web_api(slack), "token": {"env": "SLACK_BOT_TOKEN"}},
        },
        recorder,
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for i, (body, _) in enumerate(EXPECTED.values(), start=1):
            assert (await post(client, router.webhook_url, body)).status_code == 200
            # one at a time, so that the posts arrive in a known order
            await recorder.wait_for(delivered(2 * i))

    texts = [text for _, text in EXPECTED.values()]
    assert slack.posted(HOOK) == [{"text": t, "unfurl_links": False} for t in texts]
    assert slack.posted("/api/chat.postMessage") == [
        {"channel": CHANNEL, "text": t, "unfurl_links": False} for t in texts
    ]
    for request in slack.peer.requests:
        assert request.method == "POST"
        if request.path == HOOK:
            assert request.header("content-type") == "application/json"
            assert request.header("authorization") is None
        else:
            assert request.header("content-type") == "application/json; charset=utf-8"
            assert request.header("authorization") == f"Bearer {TOKEN}"
    assert recorder.dead == [] and recorder.failed == []


def identifiers(doc: Any) -> set[str]:
    """Every identifier, link and description in a Metriport body: the values a summary must
    never show unless asked to."""
    sensitive = {"patientId", "externalId", "userId", "url", "description", "fileName", "id"}
    whole = {"additionalIds", "data", "subject", "requestId"}
    found: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in whole:
                found |= set(_strings(v))
            elif k in sensitive and isinstance(v, str):
                found.add(v)
            else:
                found |= identifiers(v)
    elif isinstance(doc, list):
        for v in doc:
            found |= identifiers(v)
    return found


def _strings(doc: Any) -> Iterator[str]:
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for v in doc.values():
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)


NOT_PING = sorted(
    p.name for p in FIXTURES.glob("*.json") if p.name not in ("ping.json", "signature-vectors.json")
)


async def test_no_identifier_link_or_description_is_posted(
    make_config: Callable[..., Config], slack: FakeSlack
) -> None:
    recorder = Recorder()
    config = slack_config(
        make_config,
        {"hook": {"webhook_url": slack.peer.url(HOOK)}, "api": web_api(slack)},
        recorder,
    )
    secrets: set[str] = set()
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for name in NOT_PING:
            body = fixture(name)
            secrets |= identifiers(json.loads(body))
            assert (await post(client, router.webhook_url, body)).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 2 * len(NOT_PING))

    # The extraction found what it must (else this test could not fail).
    assert {
        "01937f2e-5c4b-7a1d-8e3f-2b6c9d0a4e71",  # patientId
        "ACME-000482",  # externalId
        "48213",  # additionalIds
        "Summarization of Episode Note",  # document description
        "8f14e45f-ceea-467a-9a2b-3c4d5e6f7a8b",  # device userId
        "opp-88231",  # meta.data
    } <= secrets
    assert any(s.startswith("https://") for s in secrets)
    posted = [r.body.decode() for r in slack.peer.requests]
    assert len(posted) == 2 * len(NOT_PING)
    for raw in posted:
        text = json.loads(raw)["text"]
        for value in (raw, text):
            assert not [s for s in secrets if s in value]
            assert "http" not in value and "s3." not in value


async def test_fields_add_the_chosen_values(
    make_config: Callable[..., Config], slack: FakeSlack
) -> None:
    recorder = Recorder()
    fields = [
        "payload.externalId",
        "payload.additionalIds",
        "patients[0].documents[1].description",
        "patients[0].documents[9].description",  # absent: not shown
        "payload.nothing",
    ]
    config = slack_config(
        make_config, {"hook": {"webhook_url": slack.peer.url(HOOK), "fields": fields}}, recorder
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (await post(client, router.webhook_url, EXPECTED["admit"][0])).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
        assert (await post(client, router.webhook_url, EXPECTED["download"][0])).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 2)

    assert [doc["text"] for doc in slack.posted(HOOK)] == [
        EXPECTED["admit"][1]
        + "\npayload.externalId: ACME-000482"
        + '\npayload.additionalIds: {"athenahealth": ["48213"]}',
        EXPECTED["download"][1]
        + "\npatients[0].documents[1].description:"
        + " Discharge Summary (Résumé de sortie) \u2013 Hôpital Saint-Éloi",
    ]


def test_sender_text_cannot_use_slack_markup() -> None:
    options = SlackOptions.model_validate(
        {"webhook_url": "http://slack.invalid/hook", "fields": ["payload.note"]}
    )
    body = body_for("vendor.<!channel>", "m-<@U1>", payload={"note": "<!here> & <http://x|y>"})
    text = summary(Message("m-<@U1>", "vendor.<!channel>", None, body, 0.0), options)
    assert "<" not in text and ">" not in text
    assert "`vendor.&lt;!channel&gt;`" in text
    assert "message `m-&lt;@U1&gt;`" in text
    assert "payload.note: &lt;!here&gt; &amp; &lt;http://x|y&gt;" in text


async def test_a_batch_stops_at_the_first_refusal_and_reports_the_rest_failed(
    slack: FakeSlack,
) -> None:
    options = SlackOptions.model_validate({"webhook_url": slack.peer.url(HOOK)})
    context = SinkContext("hook", Path("."), timeout=10, concurrency=1, batch_size=3)
    sink = SlackSink(options, context)
    slack.once[HOOK] = deque([Reply(200, {}, b"ok"), Reply(429, {"retry-after": "3"}, b"")])
    batch = [
        Message(f"m-{i}", "patient.admit", None, body_for(message_id=f"m-{i}"), 0.0)
        for i in range(3)
    ]
    await sink.open()
    try:
        errors = await sink.send(batch)
    finally:
        await sink.close()
    assert errors is not None
    assert sorted(errors) == ["m-1", "m-2"]
    assert all(isinstance(e, RetryableError) and e.retry_after == 3 for e in errors.values())
    assert len(slack.posted(HOOK)) == 2  # m-2 was not tried after Slack said to wait


def test_templates_override_the_text_per_type_glob() -> None:
    options = SlackOptions.model_validate(
        {
            "webhook_url": "http://slack.invalid/hook",
            "templates": {
                "patient.admit": "{title}! {messageId}",
                "patient.*": "{type}: {title} ({patients})",
                "medical.*": "{title}: {status}, {documents} documents,"
                " {patients} patient at {when}",
            },
        }
    )
    admit = fixture_message("patient.admit.json")
    discharge = Message("m-2", "patient.discharge", None, body_for("patient.discharge"), 0.0)
    download = fixture_message("medical.document-download.json")
    unknown = Message("m-unknown", "vendor.new-thing", "2026-01-01T00:00:00.000Z", UNKNOWN, 0.0)

    assert summary(admit, options) == "Patient admitted! a1b2c3d4-0001-4e5f-8a9b-0c1d2e3f4a5b"
    assert summary(discharge, options) == "patient.discharge: Patient discharged (0)"
    assert summary(download, options) == (
        "Document download completed: completed, 3 documents, 1 patient at 2025-10-14T15:42:07.318Z"
    )
    assert summary(unknown, options) == EXPECTED["unknown"][1]  # no template: the default


@pytest.mark.parametrize(
    ("type_", "title"),
    [
        ("patient.discharge", "Patient discharged"),
        ("network-query.hie", "Network query"),
        ("devices.provider-connected", "Device provider connected"),
        ("medical.consolidated-data", "Consolidated data finished"),
        ("something.else", "Metriport message"),
    ],
)
def test_titles_by_type(type_: str, title: str) -> None:
    options = SlackOptions.model_validate({"webhook_url": "http://slack.invalid/hook"})
    message = Message("m-1", type_, "t", body_for(type_, "m-1"), 0.0)
    assert summary(message, options) == f"*{title}* (`{type_}`)\nmessage `m-1` at t"


# -- Slack's answers ---------------------------------------------------------------------------


async def test_slack_answers_map_to_retry_or_dead_letter(
    make_config: Callable[..., Config], slack: FakeSlack, tmp_path: Path
) -> None:
    slack.channels = (CHANNEL, "#busy", "#throttled")
    retry_after = {"retry-after": "1"}
    slack.once = {
        HOOK: deque([Reply(429, {**retry_after, "content-type": "text/plain"}, b"rate_limited")]),
        "#busy": deque([_api({"ok": False, "error": "ratelimited"}, headers=retry_after)]),
        "#throttled": deque([_api({"ok": False, "error": "ratelimited"}, 429, retry_after)]),
        CHANNEL: deque([_api({"ok": False, "error": "internal_error"})]),
    }
    recorder, delays = Recorder(), RetryDelays()
    config = slack_config(
        make_config,
        {
            "hook-429": {"webhook_url": slack.peer.url(HOOK)},
            "hook-gone": {"webhook_url": slack.peer.url("/services/T0000/B0000/gone")},
            "api-ratelimited": web_api(slack, channel="#busy"),
            "api-429": web_api(slack, channel="#throttled"),
            "api-internal": web_api(slack),
            "api-no-channel": web_api(slack, channel="#nowhere"),
            "api-bad-token": web_api(slack, token="xoxb-revoked"),
        },
        recorder,
        delays,
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        body = EXPECTED["admit"][0]
        assert (await post(client, router.webhook_url, body)).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) + len(r.dead) == 7)

    mid = "a1b2c3d4-0001-4e5f-8a9b-0c1d2e3f4a5b"
    assert sorted(recorder.delivered) == [
        (mid, "api-429", 2),
        (mid, "api-internal", 2),
        (mid, "api-ratelimited", 2),
        (mid, "hook-429", 2),
    ]
    assert sorted((sink, error) for _, sink, error in recorder.dead) == [
        ("api-bad-token", "PermanentError"),
        ("api-no-channel", "PermanentError"),
        ("hook-gone", "PermanentError"),
    ]
    assert delays.seen[mid, "hook-429"] == 1.0  # Retry-After honoured
    assert delays.seen[mid, "api-429"] == 1.0
    assert delays.seen[mid, "api-ratelimited"] == 1.0
    assert delays.seen[mid, "api-internal"] <= 0.05  # no Retry-After: the sink's backoff
    errors = dict(
        query_journal(
            tmp_path / "journal",
            "SELECT sink, last_error FROM deliveries WHERE state = 'dead' ORDER BY sink",
        )
    )
    assert errors == {
        "api-bad-token": "PermanentError: Slack error invalid_auth",
        "api-no-channel": "PermanentError: Slack error channel_not_found",
        "hook-gone": "PermanentError: HTTP 404: channel_not_found",
    }
    texts = {json.loads(r.body)["text"] for r in slack.peer.requests}
    assert texts == {EXPECTED["admit"][1]}  # every attempt posted the same summary


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "key", "text"),
    [
        ({}, "sinks.alerts", "give either webhook_url, or token and channel"),
        ({"channel": "#x"}, "sinks.alerts", "give either webhook_url, or token and channel"),
        (
            {"webhook_url": "https://hooks.slack.invalid/x", "token": "xoxb-1", "channel": "#x"},
            "sinks.alerts",
            "give either webhook_url, or token and channel",
        ),
        ({"token": "xoxb-1"}, "sinks.alerts", "channel is required with token"),
        ({"token": "xoxb-1", "channel": ""}, "sinks.alerts", "channel is required with token"),
        (
            {"webhook_url": "https://hooks.slack.invalid/x", "fields": ["payload..x"]},
            "sinks.alerts.fields[0]",
            "",
        ),
        (
            {"webhook_url": "https://hooks.slack.invalid/x", "templates": {"*": "{title"}},
            "sinks.alerts.templates.*",
            "invalid template",
        ),
        (
            {"webhook_url": "https://hooks.slack.invalid/x", "templates": {"*": "{patientId}"}},
            "sinks.alerts.templates.*",
            "unknown placeholder {patientId}",
        ),
        (
            {"webhook_url": "https://hooks.slack.invalid/x", "templates": {"*": "{title.upper}"}},
            "sinks.alerts.templates.*",
            "unknown placeholder {title.upper}",
        ),
    ],
)
def test_config_errors_name_the_key(
    make_config: Callable[..., Config], options: dict[str, Any], key: str, text: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(default=["alerts"], sinks={"alerts": {"type": "slack", **options}})
    problems = [(p.path, p.message) for p in caught.value.problems]
    assert any(path == key and text in message for path, message in problems), problems


def test_valid_configurations_load(make_config: Callable[..., Config]) -> None:
    config = make_config(
        default=["hook", "api"],
        sinks={
            "hook": {
                "type": "slack",
                "webhook_url": "https://hooks.slack.invalid/x",
                "templates": {"patient.*": "{title} {patients:>3} {when}"},
            },
            "api": {"type": "slack", "token": "xoxb-1", "channel": "#c"},
        },
    )
    assert config.sinks["hook"].build(config.base_dir).describe() == "slack incoming webhook"
    assert config.sinks["api"].build(config.base_dir).describe() == "slack chat.postMessage to #c"
