"""Configuration section models: what each section of the file may hold, and what a loaded
configuration is (``Config``, ``SinkConfig``).

Strict: unknown keys are errors. The loader (``router.config``) validates a file against
these; value types come from ``router.configtypes``.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from prometheus_client import CollectorRegistry
from pydantic import BeforeValidator, Field, SecretStr

from router import plugins
from router.configtypes import (
    MAX_WORKERS,
    ConfigPath,
    Duration,
    Names,
    Strict,
    Timeout,
    api_url,
    listen_address,
    no_surrounding_space,
    off,
    parse_duration,
    workers_count,
)
from router.diskbudget import Limit, bytes_or_share
from router.routing import RouteTable
from router.sink import Sink, SinkContext, SinkOptions


class ServerConfig(Strict):
    """``server:``, the HTTP listener.

    - ``listen``, ``path``, ``admin_listen``: where requests are taken; ``route_ping``: whether
      pings are also journaled and routed; ``graceful_timeout``: how long requests in flight
      may take to finish at shutdown.
    - ``max_body_bytes`` (256 MiB): a larger body is answered 413, before it is read when its
      Content-Length says so.
    - ``keep_alive_timeout`` (75s): an idle connection is closed after this long. It is also
      the time a client has to send a request's headers once connected (hypercorn runs one
      timer for both), so a slowloris client sending headers byte by byte is cut off.
    - ``body_timeout`` (60s): once its headers are in, a request's whole body must arrive
      within this time; a slower client is answered 408 and its connection closed.
    - ``max_header_bytes`` (16 KiB): a request line and headers larger than this are answered
      431 and the connection closed.
    - ``max_concurrent_requests`` (1024): webhook requests handled at once, counted from the
      end of their headers to the answer. One more is answered 503 with ``Retry-After`` at once,
      its body unread, and its connection closed.
    - ``max_buffered_bytes`` (1 GiB): the bodies of the requests in progress hold at most this
      many bytes of memory together. A body past 1 MiB is written to the journal's folder as it
      arrives and counts as 1 MiB. A request that would go over is answered 503 with
      ``Retry-After``; a request alone is always admitted up to ``max_body_bytes``.
    - ``max_unverified_bytes`` (50%) and ``min_free_bytes`` (5%): bodies written to the
      journal's folder before their signature is verified hold at most this much disk together
      (bytes, or a share of the space free beyond the reserve), and never take the journal's
      filesystem below this much free space (bytes, or a share of its size); see
      ``router.diskbudget``.
    - ``workers`` (1): worker processes serving ``listen`` together on one journal, under a
      supervisor (``router.supervisor``); ``auto``: one per CPU this process may use. 1 is a
      single process, as before workers existed.
    """

    listen: list[Annotated[str, BeforeValidator(listen_address)]] = Field(
        default_factory=lambda: ["127.0.0.1:8080"], min_length=1
    )
    path: Annotated[str, Field(pattern=r"^/")] = "/webhook"
    #: Where /healthz, /readyz and /metrics are served instead of on ``listen`` (keeps them
    #: off the public address). Empty: served on ``listen``.
    admin_listen: list[Annotated[str, BeforeValidator(listen_address)]] = Field(
        default_factory=list
    )
    max_body_bytes: Annotated[int, Field(gt=0)] = 256 * 1024 * 1024
    route_ping: bool = False
    graceful_timeout: Duration = 10.0
    keep_alive_timeout: Timeout = 75.0  # above common proxy idle timeouts
    body_timeout: Timeout = 60.0
    max_header_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024
    max_concurrent_requests: Annotated[int, Field(ge=1)] = 1024
    max_buffered_bytes: Annotated[int, Field(gt=0)] = 1024 * 1024 * 1024
    max_unverified_bytes: Annotated[Limit, BeforeValidator(bytes_or_share)] = 0.5
    min_free_bytes: Annotated[Limit, BeforeValidator(bytes_or_share)] = 0.05
    workers: Annotated[int, BeforeValidator(workers_count), Field(ge=1, le=MAX_WORKERS)] = 1


Scheme = Literal["signature", "key"]
DEFAULT_ACCEPT: tuple[Scheme, ...] = ("signature",)


class AuthConfig(Strict):
    """``auth:``. ``accept`` defaults to ``[signature]`` alone: ``x-webhook-key`` carries the
    shared key itself in a header (through every proxy and header log, and whoever sees it
    once can sign anything), and Metriport has sent only ``x-metriport-signature`` since
    2024-07. ``key`` is accepted only when configured, with a warning."""

    accept: list[Scheme] = Field(default_factory=lambda: list(DEFAULT_ACCEPT), min_length=1)
    keys: list[Annotated[SecretStr, BeforeValidator(no_surrounding_space)]] = Field(min_length=1)


class PostgresConfig(Strict):
    """``journal.postgres``: a PostgreSQL journal shared by several routers.

    - ``dsn``: any libpq connection URI or ``key=value`` string (unix-socket URIs included);
      usually a secret: ``{env: WEBHOOK_ROUTER_DATABASE_URL}``.
    - ``pool`` (10): connections this router keeps (one more listens for wake-ups).
    - ``listen`` (true): wake idle routers with LISTEN/NOTIFY; false behind PgBouncer's
      transaction pooling, where LISTEN does not work (routers then poll).
    - ``connect_timeout`` (5s): the longest a connection attempt may take.
    """

    dsn: SecretStr
    pool: Annotated[int, Field(ge=2, le=1000)] = 10
    listen: bool = True
    connect_timeout: Timeout = 5.0


class JournalConfig(Strict):
    #: The SQLite journal's folder; with ``postgres`` the folder where large bodies are
    #: received before they are stored in the database.
    path: ConfigPath = Path("var/journal")
    postgres: PostgresConfig | None = None
    #: How long a router's claim on a delivery lasts without renewal: after a router dies,
    #: another takes its deliveries over after at most this long.
    lease: Annotated[float, BeforeValidator(parse_duration), Field(ge=3, le=3600)] = 30.0
    #: How long a message stays after every sink it was routed to has it. Dead letters and
    #: unrouted messages stay until an operator deals with them.
    retention: Duration = 7 * 86400.0
    #: How often the retention sweep runs (the first run comes a minute after start, or
    #: sooner when this is shorter).
    sweep_every: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 3600.0


class MetriportBackoff(Strict):
    """Waits after a failed call to Metriport's API (an error, a 429, no answer): attempt n
    waits min(max, initial * 2**(n-1)), or what ``Retry-After`` asks when that is longer."""

    initial: Timeout = 30.0
    max: Timeout = 3600.0


RetryWhen = Literal["recovered", "start"]
RETRY_WHEN: tuple[RetryWhen, ...] = ("recovered", "start")


class RetryFailedConfig(Strict):
    """``metriport.retry_failed``: when to ask Metriport to resend what it failed to deliver.

    - ``when``: ``recovered`` (after the router answered 503 or was not ready, once it is ready
      again) and ``start`` (after every start: the router was stopped or crashed, and what
      Metriport sent meanwhile failed). These names are a contract.
    - ``every`` (15m): a periodic check besides, for failures of other causes (Metriport's
      timeout, a proxy's error); ``off`` for none.
    - ``poll`` (15s): how often, after a retry call, Metriport is asked whether it is still
      resending; no other retry call is made until it reports none processing.
    - ``backoff``: waits after failed calls (see ``MetriportBackoff``).
    """

    when: list[RetryWhen] = Field(default_factory=lambda: list(RETRY_WHEN))
    every: Annotated[Timeout | None, BeforeValidator(off)] = 900.0
    poll: Timeout = 15.0
    backoff: MetriportBackoff = MetriportBackoff()


class MetriportConfig(Strict):
    """``metriport:``, the router's access to Metriport's API (``x-api-key``), used to ask it to
    resend failed deliveries (``retry_failed``) and by ``webhook-router metriport …``.

    ``base_url``: production by default; the sandbox is ``https://api.sandbox.metriport.com``.
    ``timeout`` (10s): the deadline on each call.
    """

    api_key: Annotated[SecretStr, BeforeValidator(no_surrounding_space)]
    base_url: Annotated[str, BeforeValidator(api_url)] = "https://api.metriport.com"
    retry_failed: Annotated[RetryFailedConfig | None, BeforeValidator(off)] = RetryFailedConfig()
    timeout: Timeout = 10.0


class LogConfig(Strict):
    format: Literal["plain", "json"] = "plain"
    level: Literal["debug", "info", "warning", "error", "DEBUG", "INFO", "WARNING", "ERROR"] = (
        "info"
    )


class RouteConfig(Strict):
    """A route names at least one pattern and one sink: a type that should go nowhere is
    simply left unrouted (kept and counted), so an empty route has no meaning."""

    match: Names
    to: Names


class RetryPolicy(Strict):
    """Backoff: attempt n waits uniform(0, min(max, initial * 2**(n-1))) (full jitter).
    ``max_attempts: 0`` retries without limit."""

    max_attempts: Annotated[int, Field(ge=0)] = 50
    initial: Duration = 1.0
    max: Duration = 600.0


class SinkCommon(Strict):
    """Router-level options every sink accepts beside its own."""

    type: str
    retry: RetryPolicy = RetryPolicy()
    timeout: Duration = 30.0
    concurrency: Annotated[int, Field(ge=1, le=1024)] | None = None
    batch_size: Annotated[int, Field(ge=1, le=10_000)] | None = None
    ordered: bool = False


COMMON_KEYS = frozenset(SinkCommon.model_fields)


@dataclass(frozen=True)
class SinkConfig:
    name: str
    type: str
    cls: builtins.type[Sink[Any]]
    options: SinkOptions
    retry: RetryPolicy
    timeout: float
    concurrency: int
    batch_size: int
    ordered: bool

    def context(self, base_dir: Path, registry: CollectorRegistry | None = None) -> SinkContext:
        """What the sink is told; ``registry``: the running router's metrics registry."""
        return SinkContext(
            name=self.name,
            base_dir=base_dir,
            timeout=self.timeout,
            concurrency=self.concurrency,
            batch_size=self.batch_size,
            ordered=self.ordered,
            registry=registry or CollectorRegistry(),
        )

    def build(self, base_dir: Path, registry: CollectorRegistry | None = None) -> Sink[Any]:
        """A new sink instance (not yet opened)."""
        return self.cls(self.options, self.context(base_dir, registry))


@dataclass(frozen=True)
class Config:
    file: Path
    server: ServerConfig
    auth: AuthConfig
    journal: JournalConfig
    log: LogConfig
    routes: RouteTable
    sinks: Mapping[str, SinkConfig]
    plugin_manager: plugins.Manager = field(compare=False, repr=False)
    #: ``metriport:``, when configured.
    metriport: MetriportConfig | None = None
    warnings: tuple[str, ...] = ()
    #: The ``extra_plugins`` given to ``load_config``: a reload registers them again.
    extra_plugins: tuple[object, ...] = field(default=(), compare=False, repr=False)
    #: Where secrets were left unread (``load_config(..., secrets=False)``): such a
    #: configuration serves the operator commands, never the daemon.
    unresolved_secrets: tuple[str, ...] = ()

    @property
    def base_dir(self) -> Path:
        return self.file.parent

    def routes_ordered(self, sinks: Sequence[str]) -> bool:
        """Whether any of ``sinks`` delivers in order (see ``Journal.append``)."""
        return any(self.sinks[name].ordered for name in sinks if name in self.sinks)

    def key_bytes(self) -> tuple[bytes, ...]:
        if self.unresolved_secrets:
            raise ValueError("the configuration was loaded without its secrets")
        return tuple(k.get_secret_value().encode() for k in self.auth.keys)
