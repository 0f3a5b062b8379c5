"""Operator commands over the journal: status, dead letters, replay, explain.

They open the journal through its interface (``router.journal``), as the daemon does but
without its start-up maintenance, so they work on either backend and beside running routers
(SQLite in WAL mode lets them run beside the daemon; PostgreSQL is shared anyway). A running
router notices changes (retried dead letters, replays) within ``dispatcher.IDLE_POLL`` seconds.
A journal whose schema is newer than this version understands is refused. Nothing here reads
or prints a body.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio

from router.config import Config, parse_duration
from router.errors import JournalUnavailable
from router.journal import DeadLetter, Filter, Journal, SinkCounts, journal_for
from router.parse import BadMessage, parse
from router.routing import matches, route

__all__ = ["DeadLetter", "Filter", "OpsError"]

BATCH = 1000
T = TypeVar("T")


class OpsError(Exception):
    """An operator command cannot proceed; the text says why and what to do."""


def _with_journal(config: Config, fn: Callable[[Journal], Awaitable[T]]) -> T:
    """Open the journal of ``config`` for an operator command, run ``fn`` on it, close it."""

    async def run() -> T:
        journal = journal_for(config.journal)
        try:
            await journal.open(maintenance=False, create=False)
        except JournalUnavailable as e:
            raise OpsError(str(e)) from e
        try:
            return await fn(journal)
        except JournalUnavailable as e:
            raise OpsError(f"journal {journal.describe()}: {e}") from e
        finally:
            await journal.close()

    return anyio.run(run)


#: For operator commands beside these (``webhook-router metriport``).
with_journal = _with_journal


def type_ok(where: Filter, type_: str) -> bool:
    return not where.types or any(matches(p, type_) for p in where.types)


def parse_time(text: str, now: float | None = None) -> float:
    """An ISO 8601 date or time (UTC unless it says otherwise), or a duration ago (``2h``)."""
    now = time.time() if now is None else now
    try:
        return now - float(parse_duration(text))
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise OpsError(f"cannot read time {text!r}: use 2026-11-30T10:00:00Z or 6h (ago)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


# -- status -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkStatus:
    name: str
    configured: bool
    counts: SinkCounts
    last_error: str | None


@dataclass(frozen=True)
class RouterStatus:
    id: str
    host: str
    pid: int
    sinks: list[str]
    seen_at: float


@dataclass(frozen=True)
class Status:
    messages: int
    unrouted: int
    duplicates: int
    journal_bytes: int
    sinks: list[SinkStatus]
    journal: str = ""
    routers: list[RouterStatus] | None = None


def status(config: Config) -> Status:
    async def read(journal: Journal) -> Status:
        st = await journal.status([n for n, c in config.sinks.items() if c.ordered])
        counts = st.sinks
        names = list(config.sinks) + sorted(set(counts) - set(config.sinks))
        sinks = [
            SinkStatus(
                name,
                name in config.sinks,
                counts.get(name, SinkCounts(0, 0, 0, None)),
                st.last_errors.get(name),
            )
            for name in names
        ]
        routers = [RouterStatus(r.id, r.host, r.pid, list(r.sinks), seen) for r, seen in st.routers]
        return Status(
            st.messages,
            st.unrouted,
            st.duplicates,
            st.size_bytes,
            sinks,
            journal.describe(),
            routers,
        )

    return _with_journal(config, read)


# -- dead letters -----------------------------------------------------------------------------


def dead_letters(config: Config, where: Filter, limit: int | None = None) -> list[DeadLetter]:
    found = _with_journal(config, lambda journal: journal.dead_letters(where))
    found = [d for d in found if type_ok(where, d.type)]
    return found[:limit] if limit else found


def retry_dead(config: Config, where: Filter, dry_run: bool = False) -> list[DeadLetter]:
    """Make matching dead letters pending again with a fresh retry budget. Only sinks in the
    configuration can be retried."""
    found = dead_letters(config, where)
    unknown = sorted({d.sink for d in found} - set(config.sinks))
    if unknown:
        raise OpsError(
            f"dead letters for sinks not in the configuration: {', '.join(unknown)};"
            " add the sinks back, or narrow with --sink, or use `replay --sink` to another sink"
        )
    if not dry_run and found:
        _with_journal(config, lambda journal: journal.retry_dead(found))
    return found


def purge_dead(config: Config, where: Filter, dry_run: bool = False) -> list[DeadLetter]:
    """Delete matching dead letters. Their messages leave with the next retention sweep once no
    other delivery needs them."""
    found = dead_letters(config, where)
    if not dry_run and found:
        _with_journal(config, lambda journal: journal.purge_dead(found))
    return found


# -- replay -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayPlan:
    messages: int
    deliveries: int
    by_sink: dict[str, int]


def replay(
    config: Config,
    since: float,
    until: float | None,
    where: Filter,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayPlan:
    """Deliver stored messages received in [since, until) again: to ``where.sinks`` if given,
    else to the sinks today's routes choose. Existing deliveries (delivered or dead) become
    pending with a fresh retry budget; missing ones are created."""
    unknown = sorted(set(where.sinks) - set(config.sinks))
    if unknown:
        raise OpsError(f"no sink named {', '.join(unknown)} in the configuration")
    end = time.time() if until is None else until

    async def run(journal: Journal) -> ReplayPlan:
        rows = await journal.stored_messages(since, end)
        chosen = [
            (m, tuple(where.sinks) or route(config.routes, m.type))
            for m in rows
            if type_ok(where, m.type)
        ]
        by_sink: dict[str, int] = {}
        for _, sinks in chosen:
            for sink in sinks:
                by_sink[sink] = by_sink.get(sink, 0) + 1
        plan = ReplayPlan(len(chosen), sum(by_sink.values()), by_sink)
        if dry_run:
            return plan
        for i in range(0, len(chosen), BATCH):
            await journal.redeliver(chosen[i : i + BATCH])
            if progress is not None:
                progress(min(i + BATCH, len(chosen)), len(chosen))
        return plan

    return _with_journal(config, run)


# -- explain ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Explanation:
    type: str
    message_id: str
    is_ping: bool
    matched: list[tuple[str, tuple[str, ...]]]  # (pattern that matched, that route's sinks)
    sinks: tuple[str, ...]
    by_default: bool


def explain(config: Config, body: bytes) -> Explanation:
    """Which routes and sinks a message would reach under ``config``."""
    try:
        parsed = parse(body)
    except BadMessage as e:
        raise OpsError(f"the router would answer 400: {e}") from e
    matched = []
    for r in config.routes.routes:
        hit = next((p for p in r.match if matches(p, parsed.type)), None)
        if hit is not None:
            matched.append((hit, r.to))
    ping_only = parsed.is_ping and not config.server.route_ping
    sinks = () if ping_only else config.routes.sinks_for(parsed.type)
    return Explanation(
        parsed.type, parsed.message_id, parsed.is_ping, matched, sinks, not matched and bool(sinks)
    )


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def to_json(value: Any) -> str:
    def default(o: Any) -> Any:
        if hasattr(o, "__dataclass_fields__"):
            return {k: getattr(o, k) for k in o.__dataclass_fields__}
        raise TypeError(type(o).__name__)

    return json.dumps(value, default=default, indent=2)
