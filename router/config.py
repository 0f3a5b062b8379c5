"""Configuration: YAML in, frozen typed objects out, or every problem at once.

Strict: unknown keys are errors; each sink's options are validated by its own sink type's
``Options`` model; every problem names the file, the key path and the line. Relative paths
resolve against the configuration file's folder. Secrets are ``{env: NAME}`` or
``{file: PATH}`` wherever a string is accepted (see ``router.yamlsource``).
"""

from __future__ import annotations

import builtins
import ipaddress
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from prometheus_client import CollectorRegistry
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
)

from router import plugins, yamlsource
from router.diskbudget import Limit, bytes_or_share
from router.errors import ConfigError
from router.routing import Route, RouteTable
from router.sink import Sink, SinkContext, SinkOptions

DEFAULT_CONFIG = Path("/etc/webhook-router/config.yaml")
CONFIG_ENV = "WEBHOOK_ROUTER_CONFIG"

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: Any) -> Any:
    """``1.5`` (seconds), ``"250ms"``, ``"30s"``, ``"10m"``, ``"1h"``, ``"7d"`` → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 10m or 250ms")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2) or "s"]
    raise ValueError("expected a duration like 30s, 10m or 250ms")


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, str | Path):
        base = (info.context or {}).get("base_dir")
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else Path(base) / path
    return value


#: A duration in seconds, written as a number or with a unit (ms, s, m, h, d).
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
#: A filesystem path; relative paths resolve against the configuration file's folder.
ConfigPath = Annotated[Path, BeforeValidator(_resolve_path)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_LISTEN = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}$|^unix:/.+$|^fd://\d+$")


def _listen_address(value: Any) -> Any:
    if isinstance(value, str) and not _LISTEN.match(value):
        raise ValueError("expected host:port, unix:/path or fd://N")
    return value


#: The most ``server.workers`` may ask for (a typo like 80 for 8 should not fork 80 routers).
MAX_WORKERS = 256


def _workers(value: Any) -> Any:
    """``auto`` → the CPUs this process may run on (its affinity mask, which is what a
    container's or systemd's ``CPUAffinity=`` leaves it, not the host's count)."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected a number of worker processes (1 or more) or auto")
    return value


#: A duration that must be more than zero.
_Timeout = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class ServerConfig(_Strict):
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

    listen: list[Annotated[str, BeforeValidator(_listen_address)]] = Field(
        default_factory=lambda: ["127.0.0.1:8080"], min_length=1
    )
    path: Annotated[str, Field(pattern=r"^/")] = "/webhook"
    #: Where /healthz, /readyz and /metrics are served instead of on ``listen`` (keeps them
    #: off the public address). Empty: served on ``listen``.
    admin_listen: list[Annotated[str, BeforeValidator(_listen_address)]] = Field(
        default_factory=list
    )
    max_body_bytes: Annotated[int, Field(gt=0)] = 256 * 1024 * 1024
    route_ping: bool = False
    graceful_timeout: Duration = 10.0
    keep_alive_timeout: _Timeout = 75.0  # above common proxy idle timeouts
    body_timeout: _Timeout = 60.0
    max_header_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024
    max_concurrent_requests: Annotated[int, Field(ge=1)] = 1024
    max_buffered_bytes: Annotated[int, Field(gt=0)] = 1024 * 1024 * 1024
    max_unverified_bytes: Annotated[Limit, BeforeValidator(bytes_or_share)] = 0.5
    min_free_bytes: Annotated[Limit, BeforeValidator(bytes_or_share)] = 0.05
    workers: Annotated[int, BeforeValidator(_workers), Field(ge=1, le=MAX_WORKERS)] = 1


Scheme = Literal["signature", "key"]
SCHEMES: tuple[Scheme, ...] = ("signature", "key")
DEFAULT_ACCEPT: tuple[Scheme, ...] = ("signature",)


def _no_surrounding_space(value: Any) -> Any:
    if isinstance(value, str) and value != value.strip():
        # HTTP strips the spaces around a header value, so x-webhook-key could never match.
        raise ValueError("a key must not start or end with whitespace")
    return value


class AuthConfig(_Strict):
    """``auth:``. ``accept`` defaults to ``[signature]`` alone: ``x-webhook-key`` carries the
    shared key itself in a header (through every proxy and header log, and whoever sees it
    once can sign anything), and Metriport has sent only ``x-metriport-signature`` since
    2024-07. ``key`` is accepted only when configured, with a warning."""

    accept: list[Scheme] = Field(default_factory=lambda: list(DEFAULT_ACCEPT), min_length=1)
    keys: list[Annotated[SecretStr, BeforeValidator(_no_surrounding_space)]] = Field(min_length=1)


class PostgresConfig(_Strict):
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
    connect_timeout: _Timeout = 5.0


class JournalConfig(_Strict):
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


def _off(value: Any) -> Any:
    """``off`` (which YAML reads as false) or ``"off"``: the feature is disabled (``None``)."""
    return None if value is False or value == "off" else value


class MetriportBackoff(_Strict):
    """Waits after a failed call to Metriport's API (an error, a 429, no answer): attempt n
    waits min(max, initial * 2**(n-1)), or what ``Retry-After`` asks when that is longer."""

    initial: _Timeout = 30.0
    max: _Timeout = 3600.0


RetryWhen = Literal["recovered", "start"]
RETRY_WHEN: tuple[RetryWhen, ...] = ("recovered", "start")


class RetryFailedConfig(_Strict):
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
    every: Annotated[_Timeout | None, BeforeValidator(_off)] = 900.0
    poll: _Timeout = 15.0
    backoff: MetriportBackoff = MetriportBackoff()


_API_URL = re.compile(r"^https?://[^\s/?#@]+(/[^\s?#]*)?$")


def _api_url(value: Any) -> Any:
    if isinstance(value, str) and not _API_URL.match(value):
        raise ValueError(
            "expected an http(s) URL without query, like https://api.metriport.com"
            " (sandbox: https://api.sandbox.metriport.com)"
        )
    return value


class MetriportConfig(_Strict):
    """``metriport:``, the router's access to Metriport's API (``x-api-key``), used to ask it to
    resend failed deliveries (``retry_failed``) and by ``webhook-router metriport …``.

    ``base_url``: production by default; the sandbox is ``https://api.sandbox.metriport.com``.
    ``timeout`` (10s): the deadline on each call.
    """

    api_key: Annotated[SecretStr, BeforeValidator(_no_surrounding_space)]
    base_url: Annotated[str, BeforeValidator(_api_url)] = "https://api.metriport.com"
    retry_failed: Annotated[RetryFailedConfig | None, BeforeValidator(_off)] = RetryFailedConfig()
    timeout: _Timeout = 10.0


class LogConfig(_Strict):
    format: Literal["plain", "json"] = "plain"
    level: Literal["debug", "info", "warning", "error", "DEBUG", "INFO", "WARNING", "ERROR"] = (
        "info"
    )


def _one_or_many(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError("expected a name or a list of names")
    return value


#: One name or a list of names (never empty).
_Names = Annotated[
    list[Annotated[str, Field(min_length=1)]], BeforeValidator(_one_or_many), Field(min_length=1)
]


class RouteConfig(_Strict):
    """A route names at least one pattern and one sink: a type that should go nowhere is
    simply left unrouted (kept and counted), so an empty route has no meaning."""

    match: _Names
    to: _Names


class RetryPolicy(_Strict):
    """Backoff: attempt n waits uniform(0, min(max, initial * 2**(n-1))) (full jitter).
    ``max_attempts: 0`` retries without limit."""

    max_attempts: Annotated[int, Field(ge=0)] = 50
    initial: Duration = 1.0
    max: Duration = 600.0


class SinkCommon(_Strict):
    """Router-level options every sink accepts beside its own."""

    type: str
    retry: RetryPolicy = RetryPolicy()
    timeout: Duration = 30.0
    concurrency: Annotated[int, Field(ge=1, le=1024)] | None = None
    batch_size: Annotated[int, Field(ge=1, le=10_000)] | None = None
    ordered: bool = False


COMMON_KEYS = frozenset(SinkCommon.model_fields)


class _Document(_Strict):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig
    journal: JournalConfig = JournalConfig()
    log: LogConfig = LogConfig()
    metriport: MetriportConfig | None = None
    routes: list[RouteConfig] = Field(default_factory=list)
    default: Annotated[list[str], BeforeValidator(_one_or_many)] = Field(default_factory=list)
    sinks: dict[str, dict[str, Any]] = Field(min_length=1)
    #: Plugin modules or files to load, each alone or with its options (``NAME: {…}``,
    #: checked by ``router.plugins``).
    plugins: list[str | dict[str, Any]] = Field(default_factory=list)


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


def config_path(arg: str | None) -> Path:
    """``--config``, else ``$WEBHOOK_ROUTER_CONFIG``, else ``/etc/webhook-router/config.yaml``."""
    return Path(arg or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


_SINK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def load_config(
    path: Path,
    *,
    environ: Mapping[str, str] | None = None,
    entry_points: bool = True,
    extra_plugins: Sequence[object] = (),
    secrets: bool | Collection[str] = True,
) -> Config:
    """Load and validate a configuration file; raise ``ConfigError`` listing every problem.

    ``extra_plugins`` are registered beside the configured ones (tests use it to add
    throwaway plugins inline). ``secrets=False`` reads no secret (see ``router.yamlsource``):
    for the operator commands, which need the journal and the routes, not the keys; a
    collection of sections (``("metriport",)``) reads the secrets of those alone."""
    path = path.absolute()
    src = yamlsource.load(path, environ, secrets=secrets)
    if src.data is None:  # unreadable, or not YAML: nothing more to check
        raise ConfigError(src.problems)
    if not isinstance(src.data, dict):
        src.problem((), "the configuration must be a mapping of sections")
        raise ConfigError(src.problems)
    context = {"base_dir": path.parent}

    pm = plugins.build(
        src, entry_points=entry_points, extra_plugins=extra_plugins, context=context, report=_report
    )

    doc: _Document | None = None
    try:
        doc = _Document.model_validate(src.data, context=context)
    except ValidationError as e:
        _report(src, (), e, _CORE_MODELS)

    sinks: dict[str, SinkConfig] = {}
    raw_sinks = src.data.get("sinks")
    if isinstance(raw_sinks, dict):
        for name, raw in raw_sinks.items():
            sink = _sink(src, name, raw, pm, context)
            if sink is not None:
                sinks[name] = sink

    _check_route_targets(src, raw_sinks if isinstance(raw_sinks, dict) else {})
    if doc is None or src.problems:
        raise ConfigError(src.problems)
    _warn_about_exposure(src, doc)
    table = RouteTable(
        tuple(Route(tuple(r.match), tuple(r.to)) for r in doc.routes), tuple(doc.default)
    )
    return Config(
        file=path,
        server=doc.server,
        auth=doc.auth,
        journal=doc.journal,
        log=doc.log,
        routes=table,
        sinks=sinks,
        plugin_manager=pm,
        metriport=doc.metriport,
        warnings=tuple(src.warnings),
        extra_plugins=tuple(extra_plugins),
        unresolved_secrets=tuple(yamlsource.dotted(p) for p in src.unresolved),
    )


def _warn_about_exposure(src: yamlsource.Source, doc: _Document) -> None:
    """Settings that are valid but expose more than they should: said by ``check`` and logged
    at start (and on each reload)."""
    if "key" in doc.auth.accept:
        src.warning(
            ("auth", "accept"),
            "accepts x-webhook-key: the webhook key itself then travels in a header, seen by"
            " every proxy and header log, and whoever sees it once can sign anything; Metriport"
            " sends x-metriport-signature only: remove `key` unless a legacy sender needs it",
        )
    public = [a for a in doc.server.listen if not _local(a)]
    if public and not doc.server.admin_listen:
        src.warning(
            ("server", "listen"),
            f"/metrics, /readyz and /healthz are served on {', '.join(public)}, which is not a"
            " loopback address: operational data (sink names and states, message counts by"
            ' type) on the public port; set server.admin_listen: ["127.0.0.1:9090"]',
        )


def _local(address: str) -> bool:
    """Whether a ``listen`` address is reachable from this host only: a loopback address or a
    unix socket. An inherited ``fd://N`` socket cannot be told from the file, and counts as
    local here."""
    if address.startswith(("unix:", "fd://")):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _sink(
    src: yamlsource.Source,
    name: str,
    raw: Any,
    pm: plugins.Manager,
    context: dict[str, Any],
) -> SinkConfig | None:
    path: yamlsource.KeyPath = ("sinks", name)
    if not _SINK_NAME.match(name):
        src.problem(path, "sink names are 1-64 letters, digits, '_', '.', '-'")
    if not isinstance(raw, dict):
        return None  # reported by the document model
    type_name = raw.get("type")
    cls = pm.sink_types.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        known = ", ".join(sorted(pm.sink_types)) or "none"
        if "type" not in raw:
            src.problem(path, f"missing key 'type' (one of: {known})")
        elif isinstance(type_name, str):
            plugins.unknown_sink_type(pm, src, (*path, "type"), type_name)
        else:
            src.problem((*path, "type"), f"unknown sink type {type_name!r} (known: {known})")
    common: SinkCommon | None = None
    common_raw = {k: v for k, v in raw.items() if k in COMMON_KEYS}
    common_raw.setdefault("type", "")  # a missing type is reported above, once
    try:
        common = SinkCommon.model_validate(common_raw, context=context)
    except ValidationError as e:
        _report(src, path, e, {(): SinkCommon, ("retry",): RetryPolicy})
    if cls is None:
        return None
    options: SinkOptions | None = None
    try:
        options = cls.Options.model_validate(
            {k: v for k, v in raw.items() if k not in COMMON_KEYS}, context=context
        )
    except ValidationError as e:
        _report(src, path, e, {(): cls.Options}, extra_allowed=COMMON_KEYS)
    if common is None or options is None:
        return None
    return SinkConfig(
        name=name,
        type=cls.type,
        cls=cls,
        options=options,
        retry=common.retry,
        timeout=common.timeout,
        concurrency=common.concurrency or cls.default_concurrency,
        batch_size=common.batch_size or cls.default_batch_size,
        ordered=common.ordered,
    )


def _check_route_targets(src: yamlsource.Source, sinks: Mapping[str, Any]) -> None:
    """Routes and default must name configured sinks. Checked on the raw document, so these
    problems are reported even when other sections are invalid."""
    targets: list[tuple[yamlsource.KeyPath, Any]] = [(("default",), src.data.get("default"))]
    routes = src.data.get("routes")
    if isinstance(routes, list):
        targets += [
            (("routes", i, "to"), r.get("to")) for i, r in enumerate(routes) if isinstance(r, dict)
        ]
    for path, names in targets:
        for name in [names] if isinstance(names, str) else names if isinstance(names, list) else []:
            if isinstance(name, str) and name and name not in sinks:
                what = "default" if path == ("default",) else "route"
                src.problem(path, f"{what} sends to unknown sink {name!r}")


_MESSAGES = {
    "missing": "required key is missing",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
}
_CORE_MODELS: dict[yamlsource.KeyPath, type[BaseModel]] = {
    (): _Document,
    ("server",): ServerConfig,
    ("auth",): AuthConfig,
    ("journal",): JournalConfig,
    ("journal", "postgres"): PostgresConfig,
    ("log",): LogConfig,
    ("metriport",): MetriportConfig,
    ("metriport", "retry_failed"): RetryFailedConfig,
    ("metriport", "retry_failed", "backoff"): MetriportBackoff,
    ("routes", 0): RouteConfig,
}
_UNION_TAG = re.compile(r"^(str|int|float|bool|[a-z]+\[.*\]|function-.*)$")


def _report(
    src: yamlsource.Source,
    prefix: yamlsource.KeyPath,
    error: ValidationError,
    models: Mapping[yamlsource.KeyPath, type[BaseModel]],
    extra_allowed: frozenset[str] = frozenset(),
) -> None:
    """Turn pydantic's errors into problems naming key path and line; a union's alternatives
    at one path are merged into one problem."""
    found: dict[yamlsource.KeyPath, list[str]] = {}
    reported = {p.path for p in src.problems}
    for item in error.errors(include_url=False):
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
        if item.get("input") is None and yamlsource.dotted((*prefix, *loc)) in reported:
            continue  # a value dropped while loading (e.g. a missing secret): reported already
        if item["type"] == "extra_forbidden":
            parent = tuple(0 if isinstance(p, int) else p for p in loc[:-1])
            model = models.get(parent)
            names = sorted(extra_allowed | set(model.model_fields)) if model else []
            text = f"unknown key (allowed: {', '.join(names)})" if names else "unknown key"
        else:
            text = _MESSAGES.get(item["type"], item["msg"].removeprefix("Value error, "))
        texts = found.setdefault((*prefix, *loc), [])
        if text not in texts:
            texts.append(text)
    for path, texts in found.items():
        src.problem(path, " or ".join(texts).replace(" or expected ", " or "))
