"""The ``slack`` sink: a human-readable summary of each message in a Slack channel.

Options (one of ``webhook_url`` or ``token`` + ``channel``)::

    webhook_url: {env: SLACK_WEBHOOK_URL}   # an incoming webhook
    token: {env: SLACK_BOT_TOKEN}           # or the Web API (chat.postMessage) ...
    channel: "#metriport-alerts"            # ... into this channel
    api_url: https://slack.com/api          # the Web API's root
    fields: [payload.externalId]            # extra JSON paths to show (PHI: your choice)
    templates:                              # per-type text, first matching glob wins
      "patient.*": "{title}: {status} ({messageId})"

The summary has a title per type family (document download finished, consolidated data ready,
patient admitted, …; a generic one for unknown types), the type, message id, ``meta.when``,
counts of patients and documents and their statuses. It never shows patient identifiers or
links unless a deployment lists them under ``fields``: bodies are protected health information.
Template placeholders: ``{title}``, ``{type}``, ``{messageId}``, ``{when}``, ``{status}``,
``{patients}``, ``{documents}``.

Slack's answers: 429 waits for ``Retry-After``; with the Web API, ``ok: false`` is retried for
transient error codes (``ratelimited``, ``internal_error``, ``service_unavailable`` …) and
dead-lettered for the others (``channel_not_found``, ``invalid_auth`` …).
"""

from __future__ import annotations

import contextlib
import json
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Self

import httpx
from pydantic import AfterValidator, Field, SecretStr, model_validator

from plugins import _httpclient
from router import (
    Duration,
    Message,
    PermanentError,
    RetryableError,
    SendResult,
    Sink,
    SinkContext,
    SinkOptions,
    hookimpl,
)
from router.sinkutils import matches

#: Titles by type pattern; the first match wins. ``{status}`` is filled from the payload.
TITLES: tuple[tuple[str, str], ...] = (
    ("ping", "Connection test from Metriport"),
    ("medical.document-download", "Document download {status}"),
    ("medical.document-conversion", "Document conversion {status}"),
    ("medical.document-bulk-download-urls", "Bulk document download links ready"),
    ("medical.document-bulk-download-paged", "Bulk document download page ready"),
    ("medical.consolidated-data", "Consolidated data {status}"),
    ("medical.bulk-patient-create", "Bulk patient import {status}"),
    ("patient.admit", "Patient admitted"),
    ("patient.discharge", "Patient discharged"),
    ("patient.transfer", "Patient transferred"),
    ("patient.pharmacy", "Pharmacy event"),
    ("patient.laboratory", "Laboratory event"),
    ("network-query.*", "Network query {status}"),
    ("message.*", "Message status update"),
    ("devices.provider-connected", "Device provider connected"),
    ("devices.provider-disconnected", "Device provider disconnected"),
    ("devices.health-data", "Device health data received"),
    ("*", "Metriport message"),
)
#: Bodies larger than this are summarised from their meta fields alone (not parsed).
MAX_SUMMARISED_BYTES = 8 * 1024 * 1024
#: Web API error codes worth retrying; every other ``ok: false`` is permanent.
TRANSIENT_ERRORS = frozenset(
    {
        "ratelimited",
        "rate_limited",
        "internal_error",
        "fatal_error",
        "service_unavailable",
        "request_timeout",
        "team_added_to_org",
    }
)
_PATH = re.compile(r"^[A-Za-z0-9_-]+(\[\d+\])?(\.[A-Za-z0-9_-]+(\[\d+\])?)*$")
#: The placeholders a template may use, with sample values to try it on at load time.
_PLACEHOLDERS: dict[str, Any] = dict.fromkeys(
    ("title", "type", "messageId", "when", "status"), "x"
) | {"patients": 1, "documents": 1}


def _template(value: str) -> str:
    """A template must format with the known placeholders only: a broken one would otherwise
    fail every send (retried, then dead-lettered) instead of failing at load."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
    except ValueError as e:
        raise ValueError(f"invalid template: {e}") from None
    for name in names:
        if name not in _PLACEHOLDERS:
            known = ", ".join("{" + n + "}" for n in _PLACEHOLDERS)
            raise ValueError(f"unknown placeholder {{{name}}} (known: {known})")
    try:
        value.format_map(_PLACEHOLDERS)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"invalid template: {e}") from None
    return value


class SlackOptions(SinkOptions):
    webhook_url: SecretStr | None = None
    token: SecretStr | None = None
    channel: str | None = None
    api_url: str = "https://slack.com/api"
    fields: list[Annotated[str, Field(pattern=_PATH.pattern)]] = Field(default_factory=list)
    templates: dict[str, Annotated[str, AfterValidator(_template)]] = Field(default_factory=dict)
    connect_timeout: Duration = 10.0

    @model_validator(mode="after")
    def _one_destination(self) -> Self:
        if (self.webhook_url is None) == (self.token is None):
            raise ValueError("give either webhook_url, or token and channel")
        if self.token is not None and not self.channel:
            raise ValueError("channel is required with token")
        return self


def lookup(doc: Any, path: str) -> Any:
    """The value at a dotted path (``a.b[0].c``) of a JSON document, or None."""
    for part in path.split("."):
        name, _, index = part.partition("[")
        doc = doc.get(name) if isinstance(doc, dict) else None
        if index:
            i = int(index.rstrip("]"))
            doc = doc[i] if isinstance(doc, list) and i < len(doc) else None
        if doc is None:
            return None
    return doc


def facts(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Counts and statuses of a message, without identifiers."""
    people = doc.get("patients") if isinstance(doc.get("patients"), list) else None
    if people is None and isinstance(doc.get("users"), list):
        people = doc["users"]
    statuses: Counter[str] = Counter()
    documents = 0
    for person in people or []:
        if isinstance(person, dict):
            if isinstance(person.get("status"), str):
                statuses[person["status"]] += 1
            if isinstance(person.get("documents"), list):
                documents += len(person["documents"])
    payload = doc.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("status"), str):
        statuses[payload["status"]] += 1
    if people is None and isinstance(payload, dict):
        people = [payload] if payload.get("patientId") else []
    status = ", ".join(
        s if n == 1 and len(statuses) == 1 else f"{n} {s}" for s, n in sorted(statuses.items())
    )
    return {"patients": len(people or []), "documents": documents, "status": status}


class _Values(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


async def parsed(message: Message) -> Any:
    """The body as JSON for the summary: ``{}`` when it is too large to summarise (a huge
    body gets the meta-only summary) or not JSON. A body in a file is read and parsed in a
    worker thread (``Message.read_json``), never on the event loop."""
    if message.body_size > MAX_SUMMARISED_BYTES:
        return {}
    try:
        return await message.read_json()
    except ValueError:
        return {}


def summary(message: Message, options: SlackOptions, doc: Any = None) -> str:
    """The text posted for a message whose parsed body is ``doc`` (see ``parsed``; left out,
    a body held in memory is parsed here, and one in a file is summarised from ``meta``)."""
    if doc is None:
        doc = {}
        if message.in_memory and message.body_size <= MAX_SUMMARISED_BYTES:
            with contextlib.suppress(ValueError):
                doc = message.json()
    info = facts(doc if isinstance(doc, dict) else {})
    status = info["status"] or ("finished" if message.type.startswith("medical.") else "")
    status = escape(status)
    title = next(t for pattern, t in TITLES if matches(pattern, message.type))
    title = title.replace("{status}", status).strip()
    type_, message_id, when = (
        escape(v) for v in (message.type, message.message_id, message.when or "")
    )
    values = _Values(
        title=title,
        type=type_,
        messageId=message_id,
        when=when,
        status=status,
        patients=info["patients"],
        documents=info["documents"],
    )
    for pattern, template in options.templates.items():
        if matches(pattern, message.type):
            return template.format_map(values)
    lines = [f"*{title}* (`{type_}`)", f"message `{message_id}` at {when}"]
    counts = []
    if info["patients"]:
        counts.append(f"patients: {info['patients']}")
    if info["documents"]:
        counts.append(f"documents: {info['documents']}")
    if info["status"]:
        counts.append(f"status: {status}")
    if counts:
        lines.append(" · ".join(counts))
    for path in options.fields:
        value = lookup(doc, path)
        if value is not None:
            shown = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"{path}: {escape(shown[:200])}")
    return "\n".join(lines)


def escape(text: str) -> str:
    """Text from the sender made inert in Slack's markup (``<!channel>``, links, mentions)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackSink(Sink[SlackOptions]):
    """Post a summary of each message to Slack."""

    type = "slack"
    Options = SlackOptions

    def __init__(self, options: SlackOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self._client: httpx.AsyncClient | None = None

    def describe(self) -> str:
        if self.options.token is not None:
            return f"slack chat.postMessage to {self.options.channel}"
        return "slack incoming webhook"

    async def open(self) -> None:
        self._client = _httpclient.new_client(
            timeout=self.context.timeout,
            connect_timeout=self.options.connect_timeout,
            connections=self.context.concurrency,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def send(self, batch: Sequence[Message]) -> SendResult:
        # One post per message, in order; after a failure the rest of the batch is not tried
        # (Slack is rate-limiting or refusing) and is reported failed with the same error.
        errors: dict[str, BaseException] = {}
        for message in batch:
            if errors:
                errors[message.message_id] = next(iter(errors.values()))
                continue
            try:
                await self._post(summary(message, self.options, await parsed(message)))
            except Exception as e:
                errors[message.message_id] = e
        return errors

    async def _post(self, text: str) -> None:
        assert self._client is not None, "open() was not called"
        o = self.options
        if o.token is not None:
            url = o.api_url.rstrip("/") + "/chat.postMessage"
            body = {"channel": o.channel, "text": text, "unfurl_links": False}
            headers = {
                "content-type": "application/json; charset=utf-8",
                "authorization": f"Bearer {o.token.get_secret_value()}",
            }
        else:
            assert o.webhook_url is not None
            url = o.webhook_url.get_secret_value()
            body = {"text": text, "unfurl_links": False}
            headers = {"content-type": "application/json"}
        content = json.dumps(body, ensure_ascii=False).encode()
        status, answer_headers, answer = await _httpclient.post(
            self._client, "POST", url, content, headers
        )
        detail = answer.decode(errors="replace")[:100] if status >= 400 else ""
        error = _httpclient.status_error(status, answer_headers, _safe(detail))
        if error is not None:
            raise error
        if o.token is not None:
            _check_api_answer(answer, answer_headers)


def _safe(text: str) -> str:
    """Slack's error bodies are short codes; keep only code-like text."""
    return text if re.fullmatch(r"[A-Za-z0-9_ .:-]*", text) else ""


def _check_api_answer(answer: bytes, headers: Mapping[str, str]) -> None:
    try:
        result = json.loads(answer)
    except ValueError:
        raise RetryableError("Slack answered something that is not JSON") from None
    if not isinstance(result, dict):
        raise RetryableError("Slack answered something that is not a JSON object")
    if result.get("ok") is True:
        return
    code = str(result.get("error", "unknown_error"))
    if code in TRANSIENT_ERRORS:
        raise RetryableError(
            f"Slack error {_safe(code)}", retry_after=_httpclient.retry_after(headers)
        )
    raise PermanentError(f"Slack error {_safe(code)}")


@hookimpl
def router_sink_types() -> list[type[Sink[SlackOptions]]]:
    return [SlackSink]
