"""Operator commands over the journal: status, dead letters, replay, explain.

They open the journal file directly (SQLite in WAL mode lets them run beside the daemon; writes
wait for the daemon's writer through SQLite's busy timeout). A running daemon notices changes
(retried dead letters, replays) within ``dispatcher.IDLE_POLL`` seconds. Nothing here reads or
prints a body.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from router.config import Config, parse_duration
from router.journal import SinkCounts, sink_counts, size_on_disk
from router.parse import BadMessage, parse
from router.routing import matches, route

BATCH = 1000


class OpsError(Exception):
    """An operator command cannot proceed; the text says why and what to do."""


@contextmanager
def journal_db(config: Config) -> Iterator[sqlite3.Connection]:
    """The journal of ``config``, opened for an operator command."""
    path = config.journal.path / "journal.sqlite3"
    if not path.exists():
        raise OpsError(
            f"no journal at {path}: has `webhook-router serve` run with this configuration?"
        )
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error as e:
        raise OpsError(f"cannot open journal {path}: {e}") from e
    try:
        yield conn
    except sqlite3.Error as e:
        raise OpsError(f"journal {path}: {e}") from e
    finally:
        conn.close()


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
class Status:
    messages: int
    unrouted: int
    duplicates: int
    journal_bytes: int
    sinks: list[SinkStatus]


def status(config: Config) -> Status:
    with journal_db(config) as conn:
        counts = sink_counts(conn)
        # SQLite takes the bare column from the row holding max(): the latest error.
        errors = {
            sink: error
            for sink, error, _ in conn.execute(
                """SELECT sink, last_error, max(updated_at) FROM deliveries
                   WHERE state IN ('pending', 'dead') AND last_error IS NOT NULL
                   GROUP BY sink"""
            )
        }
        messages, unrouted, duplicates = conn.execute(
            "SELECT count(*), coalesce(sum(routed = 0), 0), coalesce(sum(duplicates), 0)"
            " FROM messages"
        ).fetchone()
    names = list(config.sinks) + sorted(set(counts) - set(config.sinks))
    sinks = [
        SinkStatus(
            name,
            name in config.sinks,
            counts.get(name, SinkCounts(0, 0, 0, None)),
            errors.get(name),
        )
        for name in names
    ]
    return Status(messages, unrouted, duplicates, size_on_disk(config.journal.path), sinks)


# -- dead letters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    sinks: Sequence[str] = ()
    types: Sequence[str] = ()  # globs
    ids: Sequence[str] = ()

    def empty(self) -> bool:
        return not (self.sinks or self.types or self.ids)

    def where(self, alias_d: str = "d", alias_m: str = "m") -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.sinks:
            clauses.append(f"{alias_d}.sink IN ({','.join('?' * len(self.sinks))})")
            params += list(self.sinks)
        if self.ids:
            clauses.append(f"{alias_m}.message_id IN ({','.join('?' * len(self.ids))})")
            params += list(self.ids)
        return (" AND ".join(clauses) or "1"), params

    def type_ok(self, type_: str) -> bool:
        return not self.types or any(matches(p, type_) for p in self.types)


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    message_id: str
    type: str
    sink: str
    attempts: int
    dead_at: float
    error: str | None


def dead_letters(config: Config, where: Filter, limit: int | None = None) -> list[DeadLetter]:
    sql, params = where.where()
    with journal_db(config) as conn:
        rows = conn.execute(
            f"""SELECT d.seq, m.message_id, m.type, d.sink, d.attempts, d.updated_at,
                       d.last_error
                FROM deliveries d JOIN messages m USING (seq)
                WHERE d.state = 'dead' AND {sql} ORDER BY d.updated_at, d.seq""",  # noqa: S608
            params,
        ).fetchall()
    found = [DeadLetter(*row) for row in rows if where.type_ok(row[2])]
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
    if not dry_run:
        now = time.time()
        with journal_db(config) as conn:
            for chunk in _chunks(found):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                    " last_error = NULL, updated_at = ? WHERE seq = ? AND sink = ?"
                    " AND state = 'dead'",
                    [(now, now, d.seq, d.sink) for d in chunk],
                )
                conn.execute("COMMIT")
    return found


def purge_dead(config: Config, where: Filter, dry_run: bool = False) -> list[DeadLetter]:
    """Delete matching dead letters. Their messages leave with the next retention sweep once no
    other delivery needs them."""
    found = dead_letters(config, where)
    if not dry_run:
        with journal_db(config) as conn:
            for chunk in _chunks(found):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "DELETE FROM deliveries WHERE seq = ? AND sink = ? AND state = 'dead'",
                    [(d.seq, d.sink) for d in chunk],
                )
                conn.execute("COMMIT")
    return found


def _chunks(items: Sequence[DeadLetter]) -> Iterator[Sequence[DeadLetter]]:
    for i in range(0, len(items), BATCH):
        yield items[i : i + BATCH]


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
    until = time.time() if until is None else until
    with journal_db(config) as conn:
        rows = conn.execute(
            "SELECT seq, type, order_key FROM messages WHERE received_at >= ? AND received_at < ?"
            " ORDER BY seq",
            (since, until),
        ).fetchall()
        chosen = [
            (seq, order_key, tuple(where.sinks) or route(config.routes, type_))
            for seq, type_, order_key in rows
            if where.type_ok(type_)
        ]
        by_sink: dict[str, int] = {}
        for _, _, sinks in chosen:
            for sink in sinks:
                by_sink[sink] = by_sink.get(sink, 0) + 1
        plan = ReplayPlan(len(chosen), sum(by_sink.values()), by_sink)
        if dry_run:
            return plan
        now = time.time()
        done = 0
        for i in range(0, len(chosen), BATCH):
            chunk = chosen[i : i + BATCH]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                """INSERT INTO deliveries (seq, sink, order_key, state, attempts,
                       next_attempt_at, updated_at)
                   VALUES (?, ?, ?, 'pending', 0, ?, ?)
                   ON CONFLICT (seq, sink) DO UPDATE SET state = 'pending', attempts = 0,
                       next_attempt_at = excluded.next_attempt_at, last_error = NULL,
                       updated_at = excluded.updated_at""",
                [(seq, sink, key, now, now) for seq, key, sinks in chunk for sink in sinks],
            )
            conn.executemany(
                "UPDATE messages SET routed = 1 WHERE seq = ?",
                [(seq,) for seq, _, sinks in chunk if sinks],
            )
            conn.execute("COMMIT")
            done += len(chunk)
            if progress is not None:
                progress(done, len(chosen))
    return plan


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
