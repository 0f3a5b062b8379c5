"""Logging: one line per event, ``key=value`` fields, never a body or a key.

Callers pass only identifiers (message id, type, sink), outcomes and durations. Values are
quoted when they contain spaces and control characters are escaped, so a value that came from
the sender cannot forge a log line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # hypercorn logs each request when its access log is on; we keep it off and log our own.
    logging.getLogger("hypercorn.error").setLevel(max(logging.WARNING, root.level))


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    text = str(v)
    if text and text.isprintable() and " " not in text and '"' not in text and "=" not in text:
        return text
    escaped = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return f'"{escaped}"'


def kv(event: str, **fields: Any) -> str:
    """``event key=value ...`` with safe quoting; ``None`` fields are left out."""
    parts = [event]
    parts.extend(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)
    return " ".join(parts)
