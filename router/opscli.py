"""Printing for the operator commands (``status``, ``dead …``, ``replay``, ``explain``,
``metriport …``, ``plugins``)."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from router import ops
from router import plugins as plugin_manager
from router.config import Config

if TYPE_CHECKING:
    from router import metriport

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def run(config: Config, args: argparse.Namespace) -> int:
    if args.command == "status":
        return _status(config, args.json)
    if args.command == "dead":
        return _dead(config, args)
    if args.command == "replay":
        return _replay(config, args)
    if args.command == "explain":
        return _explain(config, args.file)
    if args.command == "metriport":
        return _metriport(config, args)
    raise AssertionError(args.command)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(config: Config, as_json: bool) -> int:
    st = ops.status(config)
    if as_json:
        print(ops.to_json(st))
        return EXIT_OK
    now = time.time()
    print(
        f"journal: {config.journal.path}  {st.journal_bytes / 1e6:.1f} MB  messages {st.messages}"
        f"  unrouted {st.unrouted}  duplicates received {st.duplicates}"
    )
    header = ("sink", "pending", "retrying", "dead", "oldest", "last error")
    rows = [
        (
            s.name + ("" if s.configured else " (not configured)"),
            str(s.counts.pending),
            str(s.counts.retrying),
            str(s.counts.dead),
            ops.age(
                None if s.counts.oldest_pending_at is None else now - s.counts.oldest_pending_at
            ),
            (s.last_error or "")[:80],
        )
        for s in st.sinks
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _filter(args: argparse.Namespace) -> ops.Filter:
    return ops.Filter(args.sink, args.type, getattr(args, "id", []))


def _dead(config: Config, args: argparse.Namespace) -> int:
    where = _filter(args)
    if args.dead_command == "list":
        found = ops.dead_letters(config, where, args.limit)
        if args.json:
            print(ops.to_json(found))
            return EXIT_OK
        for d in found:
            print(f"{_when(d.dead_at)}  {d.sink}  {d.type}  {d.message_id}  attempts={d.attempts}")
            print(f"    {d.error or '(no error recorded)'}")
        print(f"{len(found)} dead letter(s)")
        return EXIT_OK
    if where.empty() and not args.all:
        print(
            f"error: dead {args.dead_command} needs a filter (--sink, --type, --id) or --all",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.dead_command == "retry":
        found = ops.retry_dead(config, where, args.dry_run)
        verb = "would retry" if args.dry_run else "retrying"
    else:
        found = ops.purge_dead(config, where, args.dry_run)
        verb = "would purge" if args.dry_run else "purged"
    sinks = sorted({d.sink for d in found})
    print(f"{verb} {len(found)} dead letter(s){' for ' + ', '.join(sinks) if sinks else ''}")
    return EXIT_OK


def _replay(config: Config, args: argparse.Namespace) -> int:
    try:
        since = ops.parse_time(args.since)
        until = ops.parse_time(args.until) if args.until else None
    except ops.OpsError as e:  # a malformed option value: a usage error, like argparse's
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    def progress(done: int, total: int) -> None:
        print(f"\rreplaying: {done}/{total} messages", end="", file=sys.stderr, flush=True)

    plan = ops.replay(config, since, until, _filter(args), args.dry_run, progress)
    if not args.dry_run and plan.messages:
        print(file=sys.stderr)
    verb = "would replay" if args.dry_run else "replaying"
    per_sink = ", ".join(f"{n} to {s}" for s, n in sorted(plan.by_sink.items()))
    print(f"{verb} {plan.messages} message(s){': ' + per_sink if per_sink else ''}")
    return EXIT_OK


def _explain(config: Config, file: Path) -> int:
    try:
        body = file.read_bytes()
    except OSError as e:
        print(f"error: cannot read {file}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    ex = ops.explain(config, body)
    print(f"type {ex.type}  messageId {ex.message_id}")
    if ex.is_ping and not config.server.route_ping:
        print("a ping: answered with a pong and not routed (server.route_ping: false)")
        return EXIT_OK
    for pattern, sinks in ex.matched:
        print(f"  route {pattern!r} matches -> {', '.join(sinks)}")
    if ex.by_default:
        print(f"  no route matches: default -> {', '.join(ex.sinks)}")
    if ex.sinks:
        print(f"delivered to: {', '.join(ex.sinks)}")
    else:
        print("delivered to no sink: kept as unrouted (add a route or a default)")
    return EXIT_OK


def _metriport(config: Config, args: argparse.Namespace) -> int:
    from router import metriport
    from router.dispatcher import router_id

    section = config.metriport
    if section is None:
        print(
            f"error: {config.file} has no metriport: section (api_key, base_url)", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        if args.metriport_command == "status":
            st = ops.with_journal(config, lambda j: metriport.status(section, j))
            return _metriport_status(st, args.json)
        found = ops.with_journal(
            config, lambda j: metriport.operator_retry(section, j, router_id(), args.force)
        )
    except metriport.MetriportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except metriport.RetryRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    if found.failed == 0 and not args.force:
        print("Metriport reports no failed deliveries: nothing to resend")
    else:
        count = "an unknown number of" if found.failed < 0 else str(found.failed)
        print(
            f"asked Metriport to resend {count} failed deliveries; follow it with"
            " `webhook-router metriport status` until none is processing"
        )
    return EXIT_OK


def _metriport_status(st: metriport.Status, as_json: bool) -> int:
    s = st.settings
    if as_json:
        print(ops.to_json(st))
        return EXIT_OK

    def count(n: int) -> str:
        return "unknown (Metriport could not count)" if n < 0 else str(n)

    print(f"metriport: {st.base_url}")
    detail = f" ({s.status_detail})" if s.status_detail else ""
    print(f"webhook enabled:      {'yes' if s.enabled else 'no'}{detail}")
    print(f"requests processing:  {count(s.processing)}")
    print(f"requests failed:      {count(s.failed)}")
    last = st.last_retry
    if last is None:
        print("last asked to resend: never (by any router on this journal)")
    else:
        print(
            f"last asked to resend: {last.at} by {last.router}, reason {last.reason},"
            f" {count(last.failed)} failed then"
        )
    return EXIT_OK


def plugins(path: Path | None, as_json: bool) -> int:
    """``webhook-router plugins``: each plugin, where it came from, its sink types and hooks;
    then the problems loading them (exit 2 when there is any, as ``check``)."""
    pm, problems = plugin_manager.inventory(path)
    found = plugin_manager.describe(pm)
    if as_json:
        print(
            ops.to_json(
                {
                    "config": None if path is None else str(path.absolute()),
                    "plugins": found,
                    "disabled": sorted(pm.disabled),
                    "problems": problems,
                }
            )
        )
        return EXIT_USAGE if problems else EXIT_OK
    where = f"{path.absolute()} and the" if path is not None else "the"
    print(f"{len(found)} plugin(s), from {where} installed packages:")
    for info in found:
        print(f"  {info.name}  {'plugin file' if info.kind == 'file' else info.origin}")
        if info.sink_types:
            print(f"      sink types: {', '.join(info.sink_types)}")
        if info.hooks:
            print(f"      hooks: {', '.join(info.hooks)}")
        if info.takes_options:
            # Their names, never their values (a plugin's options may hold a secret).
            options = pm.options.get(info.name)
            names = ", ".join(type(options).model_fields) if options is not None else ""
            print(f"      options: {names or '(none)'}")
    if pm.disabled:
        names = ", ".join(sorted(pm.disabled))
        print(f"switched off by ${plugin_manager.DISABLE_ENV}: {names}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_USAGE if problems else EXIT_OK
