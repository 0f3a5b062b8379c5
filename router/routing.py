"""Routing: which sinks a message type goes to. Pure functions, no I/O.

Every route whose glob pattern matches ``meta.type`` fires; the sinks of all matching routes are
merged in configuration order, each sink once. A type no route matches goes to ``default``; with
no default it goes nowhere and the message is kept as *unrouted*. Patterns are shell-style globs
matched case-sensitively against the whole type: ``*`` matches any run of characters, dots
included (``medical.*`` matches ``medical.document-download.failed``), ``?`` one character,
``[abc]`` one of a set.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class Route:
    match: tuple[str, ...]
    to: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RouteTable:
    routes: tuple[Route, ...]
    default: tuple[str, ...] = ()

    def sinks_for(self, type_: str) -> tuple[str, ...]:
        """The sinks a message of this type goes to, in configuration order, each once."""
        return _sinks_for(self, type_)

    def sink_names(self) -> set[str]:
        names = set(self.default)
        for route in self.routes:
            names.update(route.to)
        return names


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def matches(pattern: str, type_: str) -> bool:
    """Whether a route pattern matches a message type."""
    return _compiled(pattern).match(type_) is not None


def route(table: RouteTable, type_: str) -> tuple[str, ...]:
    """The sinks a message of this type goes to (see the module docstring)."""
    chosen: dict[str, None] = {}
    for r in table.routes:
        if any(matches(p, type_) for p in r.match):
            chosen.update(dict.fromkeys(r.to))
    if not chosen:
        # Each sink once here too: a sink listed twice would get two deliveries (a journal
        # conflict that refused every message the default takes).
        return tuple(dict.fromkeys(table.default))
    return tuple(chosen)


@lru_cache(maxsize=4096)
def _sinks_for(table: RouteTable, type_: str) -> tuple[str, ...]:
    # Types come from the sender; the cache is bounded so hostile variety cannot grow memory.
    return route(table, type_)


def describe(table: RouteTable) -> list[tuple[str, str]]:
    """(pattern, sinks) rows for printing the route table."""
    rows = [(", ".join(r.match), ", ".join(r.to)) for r in table.routes]
    rows.append(("(default)", ", ".join(table.default) if table.default else "(none: unrouted)"))
    return rows
