"""The ``http`` sink: forward each message's exact body to an HTTP endpoint.

Options::

    url: https://ehr.example.internal/metriport/{type}   # placeholders {type}, {messageId}
    method: POST                     # POST, PUT or PATCH
    headers: {authorization: {env: EHR_TOKEN}}            # extra headers; values may be secrets
    sign: {key: {env: EHR_WEBHOOK_KEY}, header: x-metriport-signature}
    retry_on: [409]                  # 4xx statuses to retry instead of dead-lettering
    tls_verify: true                 # false disables certificate checks (never in production)
    ca_file: /etc/ssl/internal-ca.pem
    client_cert: {cert: /etc/webhook-router/client.pem, key: /etc/webhook-router/client.key}
    follow_redirects: false
    connect_timeout: 10s             # the whole request is bounded by the sink's `timeout`

Each request carries the raw body bytes verbatim with ``Content-Type: application/json``, and
``Idempotency-Key`` (the message id), ``X-Webhook-Router-Message-Id``,
``X-Webhook-Router-Type`` and ``X-Webhook-Router-Attempt``. With ``sign``, the body is signed
for the receiver the way Metriport signs (HMAC-SHA256, lowercase hex) with the receiver's own
key, so an existing Metriport receiver works unchanged behind the router.

Answers: 2xx delivered; 408, 425, 429, 5xx, connection errors and timeouts are retried
(honouring ``Retry-After``); redirects (not followed unless ``follow_redirects``) and other
4xx dead-letter unless listed in ``retry_on``. With ``follow_redirects``, a redirect that would
re-send the request as a body-less GET (301, 302, 303) dead-letters too; 307 and 308 keep the
method and body.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Literal
from urllib.parse import quote, urlsplit

import anyio
import httpx
from pydantic import AfterValidator, Field, SecretStr

from plugins import _httpclient
from router import (
    ConfigPath,
    Duration,
    Message,
    SendResult,
    Sink,
    SinkContext,
    SinkOptions,
    hookimpl,
)
from router.sinkutils import sign

_PLACEHOLDER = re.compile(r"\{(type|messageId)\}")


def _http_url(value: str) -> str:
    parts = urlsplit(_PLACEHOLDER.sub("x", value))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL")
    leftover = re.search(r"\{[^}]*\}", _PLACEHOLDER.sub("", value))
    if leftover:
        raise ValueError(
            f"unknown placeholder {leftover.group(0)} (known: {{type}}, {{messageId}})"
        )
    return value


class SignOptions(SinkOptions):
    key: SecretStr
    header: str = "x-metriport-signature"


class ClientCert(SinkOptions):
    cert: ConfigPath
    key: ConfigPath | None = None


class HttpOptions(SinkOptions):
    url: Annotated[str, AfterValidator(_http_url)]
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    sign: SignOptions | None = None
    retry_on: list[Annotated[int, Field(ge=400, le=499)]] = Field(default_factory=list)
    tls_verify: bool = True
    ca_file: ConfigPath | None = None
    client_cert: ClientCert | None = None
    follow_redirects: bool = False
    connect_timeout: Duration = 10.0


class HttpSink(Sink[HttpOptions]):
    """POST (or PUT/PATCH) each message's raw body to a URL."""

    type = "http"
    Options = HttpOptions
    default_concurrency = 8

    def __init__(self, options: HttpOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self._client: httpx.AsyncClient | None = None

    def describe(self) -> str:
        signed = ", signed" if self.options.sign else ""
        return f"http {self.options.method} {self.options.url}{signed}"

    async def open(self) -> None:
        o = self.options
        cert = (o.client_cert.cert, o.client_cert.key) if o.client_cert else None
        self._client = _httpclient.new_client(
            timeout=self.context.timeout,
            connect_timeout=o.connect_timeout,
            connections=self.context.concurrency * self.context.batch_size,
            verify=o.tls_verify,
            ca_file=o.ca_file,
            client_cert=cert,
            follow_redirects=o.follow_redirects,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def url_for(self, message: Message) -> str:
        values = {"type": message.type, "messageId": message.message_id}
        return _PLACEHOLDER.sub(lambda m: quote(values[m.group(1)], safe=""), self.options.url)

    def headers_for(self, message: Message) -> dict[str, str]:
        """The request's headers, signed over the body when ``sign`` is set."""
        headers = self._unsigned_headers(message)
        if self.options.sign is not None:
            key = self.options.sign.key.get_secret_value()
            headers[self.options.sign.header] = sign(message.body, key)
        return headers

    def _unsigned_headers(self, message: Message) -> dict[str, str]:
        headers = {k: v.get_secret_value() for k, v in self.options.headers.items()}
        headers.update(
            {
                "content-type": "application/json",
                "idempotency-key": message.message_id,
                "x-webhook-router-message-id": message.message_id,
                "x-webhook-router-type": message.type,
                "x-webhook-router-attempt": str(message.attempt),
            }
        )
        return headers

    async def _request(
        self, message: Message
    ) -> tuple[bytes | AsyncIterator[bytes], dict[str, str]]:
        """Body and headers; a large body is streamed from its file (with its length, so the
        receiver gets a plain Content-Length request) and signed reading it in a thread."""
        if message.in_memory:
            return message.body, self.headers_for(message)
        headers = self._unsigned_headers(message)
        if self.options.sign is not None:
            key = self.options.sign.key.get_secret_value().encode()
            digest = await anyio.to_thread.run_sync(_hmac_of, message, key)
            headers[self.options.sign.header] = digest
        headers["content-length"] = str(message.body_size)
        return message.aiter_body(), headers

    async def send(self, batch: Sequence[Message]) -> SendResult:
        errors: dict[str, BaseException] = {}

        async def deliver(message: Message) -> None:
            try:
                await self._send_one(message)
            except Exception as e:
                errors[message.message_id] = e

        async with anyio.create_task_group() as tg:
            for message in batch:
                tg.start_soon(deliver, message)
        return errors

    async def _send_one(self, message: Message) -> None:
        assert self._client is not None, "open() was not called"
        content, request_headers = await self._request(message)
        status, headers, _ = await _httpclient.post(
            self._client, self.options.method, self.url_for(message), content, request_headers
        )
        error = _httpclient.status_error(status, headers, retry_on=self.options.retry_on)
        if error is not None:
            raise error


def _hmac_of(message: Message, key: bytes) -> str:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for chunk in message.body_chunks():
        mac.update(chunk)
    return mac.hexdigest()


@hookimpl
def router_sink_types() -> list[type[Sink[HttpOptions]]]:
    return [HttpSink]
