"""The ``kafka`` sink: produce each message to a Kafka topic (aiokafka).

Options::

    bootstrap_servers: [kafka-1:9092, kafka-2:9092]
    topic: metriport.{type}          # placeholders {type}, {messageId}, {orderKey}
    key: "{messageId}"               # the record key; "{orderKey}" keys by patient (a message
                                     # naming no patient then has no key)
    acks: all                        # all, 1 or 0 (all: acknowledged by every in-sync replica)
    compression: none                # none, gzip, snappy, lz4, zstd (the last three need their
                                     # codec package installed)
    max_message_bytes: 1048576       # larger bodies are dead-lettered, saying so
    enable_idempotence: false        # needs a broker that supports idempotent producers
    client_id: webhook-router
    security_protocol: PLAINTEXT     # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    sasl_mechanism: PLAIN            # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: router
    sasl_password: {env: KAFKA_PASSWORD}
    ssl_cafile: /etc/ssl/kafka-ca.pem
    ssl_certfile: /etc/webhook-router/kafka.pem
    ssl_keyfile: /etc/webhook-router/kafka.key

The record value is the raw body; headers carry ``type``, ``messageId`` and ``when``. A
delivery counts as done only once the broker acknowledged the record (per ``acks``). An
unreachable broker is retried; a body larger than ``max_message_bytes``, an invalid topic or a
topic the credentials may not write are dead-lettered with a message saying why.
Topic names come from the sender's types, so characters Kafka does not allow become ``_``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator

from router import (
    ConfigPath,
    Message,
    PermanentError,
    RetryableError,
    SendResult,
    Sink,
    SinkContext,
    SinkOptions,
    hookimpl,
)

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

_PLACEHOLDER = re.compile(r"\{(type|messageId|orderKey)\}")
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _template(value: str) -> str:
    leftover = re.search(r"\{[^}]*\}", _PLACEHOLDER.sub("", value))
    if leftover:
        known = "{type}, {messageId}, {orderKey}"
        raise ValueError(f"unknown placeholder {leftover.group(0)} (known: {known})")
    return value


class KafkaOptions(SinkOptions):
    bootstrap_servers: list[str] = Field(min_length=1)
    topic: str = "metriport.{type}"
    key: str = "{messageId}"
    acks: Literal["all", 1, 0] = "all"
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    max_message_bytes: int = Field(default=1024 * 1024, gt=0)
    enable_idempotence: bool = False
    client_id: str = "webhook-router"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: ConfigPath | None = None
    ssl_certfile: ConfigPath | None = None
    ssl_keyfile: ConfigPath | None = None

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("topic", "key")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        return _template(value)

    @field_validator("compression")
    @classmethod
    def _codec_installed(cls, value: str) -> str:
        from aiokafka import codec

        available = {
            "none": True,
            "gzip": codec.has_gzip(),
            "snappy": codec.has_snappy(),
            "lz4": codec.has_lz4(),
            "zstd": codec.has_zstd(),
        }
        if not available[value]:
            raise ValueError(f"compression {value} needs its codec package installed")
        return value

    @model_validator(mode="after")
    def _sasl_complete(self) -> Self:
        if self.security_protocol.startswith("SASL_"):
            given = {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_username": self.sasl_username,
                "sasl_password": self.sasl_password,
            }
            missing = [name for name, value in given.items() if not value]
            if missing:
                raise ValueError(f"{self.security_protocol} needs {', '.join(missing)}")
        return self


#: aiokafka errors that retrying cannot fix: the message is dead-lettered.
_PERMANENT = (
    "MessageSizeTooLargeError",
    "RecordTooLargeError",
    "RecordListTooLargeError",
    "InvalidTopicError",
    "TopicAuthorizationFailedError",
    "InvalidMessageError",
)


def _error(e: Exception) -> PermanentError | RetryableError:
    name = type(e).__name__
    if name in _PERMANENT:
        return PermanentError(f"Kafka refused the record: {name}")
    return RetryableError(f"Kafka: {name}: {e}"[:300])


class KafkaSink(Sink[KafkaOptions]):
    """Produce each message's raw body to a Kafka topic."""

    type = "kafka"
    Options = KafkaOptions
    default_batch_size = 100

    def __init__(self, options: KafkaOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self._producer: AIOKafkaProducer | None = None

    def describe(self) -> str:
        servers = ",".join(self.options.bootstrap_servers)
        return f"kafka {servers} topic {self.options.topic} key {self.options.key}"

    async def open(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.helpers import create_ssl_context

        o = self.options
        ssl_context = None
        if o.security_protocol in ("SSL", "SASL_SSL"):
            ssl_context = create_ssl_context(
                cafile=str(o.ssl_cafile) if o.ssl_cafile else None,
                certfile=str(o.ssl_certfile) if o.ssl_certfile else None,
                keyfile=str(o.ssl_keyfile) if o.ssl_keyfile else None,
            )
        # aiokafka's own deadline stays inside the router's deadline on each send.
        request_timeout_ms = max(1000, int(self.context.timeout * 1000 * 0.9))
        producer = AIOKafkaProducer(
            bootstrap_servers=o.bootstrap_servers,
            client_id=o.client_id,
            acks=o.acks,
            compression_type=None if o.compression == "none" else o.compression,
            max_request_size=o.max_message_bytes + 64 * 1024,
            request_timeout_ms=request_timeout_ms,
            enable_idempotence=o.enable_idempotence,
            security_protocol=o.security_protocol,
            ssl_context=ssl_context,
            sasl_mechanism=o.sasl_mechanism or "PLAIN",
            sasl_plain_username=o.sasl_username,
            sasl_plain_password=o.sasl_password.get_secret_value() if o.sasl_password else None,
        )
        try:
            await producer.start()
        except Exception as e:
            await producer.stop()
            raise RetryableError(f"cannot connect to Kafka: {type(e).__name__}: {e}") from e
        self._producer = producer

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    def _fill(self, template: str, message: Message) -> str:
        values = {
            "type": message.type,
            "messageId": message.message_id,
            "orderKey": message.order_key,
        }
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)

    def topic_for(self, message: Message) -> str:
        return _TOPIC_UNSAFE.sub("_", self._fill(self.options.topic, message))[:249]

    async def send(self, batch: Sequence[Message]) -> SendResult:
        from aiokafka.errors import KafkaError

        assert self._producer is not None, "open() was not called"
        errors: dict[str, BaseException] = {}
        pending = []
        for message in batch:
            if message.body_size > self.options.max_message_bytes:
                errors[message.message_id] = PermanentError(
                    f"body of {message.body_size} bytes is larger than the sink's"
                    f" max_message_bytes ({self.options.max_message_bytes})"
                )
                continue
            headers = [("type", message.type.encode()), ("messageId", message.message_id.encode())]
            if message.when is not None:
                headers.append(("when", message.when.encode()))
            try:
                future = await self._producer.send(
                    self.topic_for(message),
                    # (a body in a file is read in a worker thread, not on the event loop)
                    value=await message.read_body(),
                    # An empty key (no patient for "{orderKey}") means no key: the producer
                    # then spreads those records over the partitions.
                    key=self._fill(self.options.key, message).encode() or None,
                    headers=headers,
                )
            except KafkaError as e:
                errors[message.message_id] = _error(e)
                continue
            pending.append((message, future))
        for message, future in pending:
            try:
                await future
            except KafkaError as e:
                errors[message.message_id] = _error(e)
        return errors


@hookimpl
def router_sink_types() -> list[type[Sink[KafkaOptions]]]:
    return [KafkaSink]
