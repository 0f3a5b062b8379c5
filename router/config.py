"""Configuration: YAML in, frozen typed objects out, or every problem at once.

This module is the loader: it reads the file (``router.yamlsource``), builds the plugin
manager, validates the document against the section models (``router.configmodels``, made of
the value types in ``router.configtypes``) and each sink's options against its sink type's
``Options`` model, and turns every error into a problem naming the file, the key path and the
line (``router.configerrors``). Relative paths resolve against the configuration file's
folder. Secrets are ``{env: NAME}`` or ``{file: PATH}`` wherever a string is accepted (see
``router.yamlsource``). The names of those modules that callers use are importable from here
too.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from router import plugins, yamlsource
from router.configerrors import report
from router.configmodels import (
    COMMON_KEYS,
    DEFAULT_ACCEPT,
    RETRY_WHEN,
    AuthConfig,
    Config,
    JournalConfig,
    LogConfig,
    MetriportBackoff,
    MetriportConfig,
    PostgresConfig,
    RetryFailedConfig,
    RetryPolicy,
    RetryWhen,
    RouteConfig,
    Scheme,
    ServerConfig,
    SinkCommon,
    SinkConfig,
)
from router.configtypes import (
    MAX_WORKERS,
    ConfigPath,
    Duration,
    Strict,
    one_or_many,
    parse_duration,
)
from router.errors import ConfigError
from router.routing import Route, RouteTable
from router.sink import SinkOptions

__all__ = [
    "COMMON_KEYS",
    "CONFIG_ENV",
    "DEFAULT_ACCEPT",
    "DEFAULT_CONFIG",
    "MAX_WORKERS",
    "RETRY_WHEN",
    "AuthConfig",
    "Config",
    "ConfigPath",
    "Duration",
    "JournalConfig",
    "LogConfig",
    "MetriportBackoff",
    "MetriportConfig",
    "PostgresConfig",
    "RetryFailedConfig",
    "RetryPolicy",
    "RetryWhen",
    "RouteConfig",
    "Scheme",
    "ServerConfig",
    "SinkCommon",
    "SinkConfig",
    "config_path",
    "load_config",
    "parse_duration",
]

DEFAULT_CONFIG = Path("/etc/webhook-router/config.yaml")
CONFIG_ENV = "WEBHOOK_ROUTER_CONFIG"


class _Document(Strict):
    """The file's top level: its sections. Sinks are checked one by one against their own
    types' models (``_sink``), so that each problem names its sink."""

    server: ServerConfig = ServerConfig()
    auth: AuthConfig
    journal: JournalConfig = JournalConfig()
    log: LogConfig = LogConfig()
    metriport: MetriportConfig | None = None
    routes: list[RouteConfig] = Field(default_factory=list)
    default: Annotated[list[str], BeforeValidator(one_or_many)] = Field(default_factory=list)
    sinks: dict[str, dict[str, Any]] = Field(min_length=1)
    #: Plugin modules or files to load, each alone or with its options (``NAME: {…}``,
    #: checked by ``router.plugins``).
    plugins: list[str | dict[str, Any]] = Field(default_factory=list)


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
        src, entry_points=entry_points, extra_plugins=extra_plugins, context=context, report=report
    )

    doc: _Document | None = None
    try:
        doc = _Document.model_validate(src.data, context=context)
    except ValidationError as e:
        report(src, (), e, _CORE_MODELS)

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
        report(src, path, e, {(): SinkCommon, ("retry",): RetryPolicy})
    if cls is None:
        return None
    options: SinkOptions | None = None
    try:
        options = cls.Options.model_validate(
            {k: v for k, v in raw.items() if k not in COMMON_KEYS}, context=context
        )
    except ValidationError as e:
        report(src, path, e, {(): cls.Options}, extra_allowed=COMMON_KEYS)
    if common is None or options is None:
        return None
    sink = SinkConfig(
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
    try:
        # Made once here (a sink's constructor does no I/O: ``open`` does), so that one that
        # raises (a plugin's bad metric name, say) is a problem at its line, not a crash.
        sink.build(context["base_dir"])
    except Exception as e:
        src.problem((*path, "type"), f"a {cls.type} sink cannot be made: {plugins.raised(e)}")
        return None
    return sink


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
