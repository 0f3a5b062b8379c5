"""Configuration value types: how one value is written in the YAML and what it becomes.

Durations (``30s``, ``250ms``), paths relative to the configuration file, listen addresses,
worker counts, keys, ``off``, API URLs and "one name or a list of names": each a type with
its validator, shared by the section models (``router.configmodels``). Plugins use
``Duration`` and ``ConfigPath`` in their options (``router`` exports them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo

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


def resolve_path(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, str | Path):
        base = (info.context or {}).get("base_dir")
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else Path(base) / path
    return value


#: A duration in seconds, written as a number or with a unit (ms, s, m, h, d).
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
#: A filesystem path; relative paths resolve against the configuration file's folder.
ConfigPath = Annotated[Path, BeforeValidator(resolve_path)]


class Strict(BaseModel):
    """The base of every section model: an unknown key is an error, a loaded value frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_LISTEN = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}$|^unix:/.+$|^fd://\d+$")


def listen_address(value: Any) -> Any:
    if isinstance(value, str) and not _LISTEN.match(value):
        raise ValueError("expected host:port, unix:/path or fd://N")
    return value


#: The most ``server.workers`` may ask for (a typo like 80 for 8 should not fork 80 routers).
MAX_WORKERS = 256


def workers_count(value: Any) -> Any:
    """``auto`` → the CPUs this process may run on (its affinity mask, which is what a
    container's or systemd's ``CPUAffinity=`` leaves it, not the host's count)."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected a number of worker processes (1 or more) or auto")
    return value


#: A duration that must be more than zero.
Timeout = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


def no_surrounding_space(value: Any) -> Any:
    if isinstance(value, str) and value != value.strip():
        # HTTP strips the spaces around a header value, so x-webhook-key could never match.
        raise ValueError("a key must not start or end with whitespace")
    return value


def off(value: Any) -> Any:
    """``off`` (which YAML reads as false) or ``"off"``: the feature is disabled (``None``)."""
    return None if value is False or value == "off" else value


_API_URL = re.compile(r"^https?://[^\s/?#@]+(/[^\s?#]*)?$")


def api_url(value: Any) -> Any:
    if isinstance(value, str) and not _API_URL.match(value):
        raise ValueError(
            "expected an http(s) URL without query, like https://api.metriport.com"
            " (sandbox: https://api.sandbox.metriport.com)"
        )
    return value


def one_or_many(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError("expected a name or a list of names")
    return value


#: One name or a list of names (never empty).
Names = Annotated[
    list[Annotated[str, Field(min_length=1)]], BeforeValidator(one_or_many), Field(min_length=1)
]
