"""The webhook-router benchmark: the router beside its floor and a peer, in one run.

    .venv/bin/python bench/run.py            # full run (about 5 minutes)
    .venv/bin/python bench/run.py --quick    # a smoke run (about 1 minute)
    .venv/bin/python bench/run.py --profile 10   # also a py-spy profile of the router

Phases (each server is a process of its own, pinned to one CPU; the load generators and this
script are pinned to another):

1. throughput: wrk (``bench/post.lua``), the same duration and connections for
   *floor* (``bench/floor_app.py``: bare hypercorn app, same worker and loop as the router),
   *router* (``webhook-router serve``: signature check, fsync'd journal, file sink) and
   *peer* (adnanh/webhook: key-header check, appends the payload to a file); median of N runs.
2. latency (a fresh router): end-to-end burst of N messages (time until all are in the sink
   file), ack and delivery-lag percentiles at 50 % of the router's max rate (open-loop client,
   ``bench/fixed_rate.py``) with pings beside it, and ping latency at that rate.
3. large bodies (a fresh router): old-style ``medical.consolidated-data`` bodies of 16, 64 and
   256 MiB: time to 200, time until delivered, peak RSS growth.
4. optional profile (``--profile SECONDS``): py-spy on the router under wrk load.
5. optional cost (``--phases cost``, ``bench/cost.py``): CPU per request by thread, user and
   kernel, context switches and system calls per request, floor and router alternating.

Prints a table and writes everything to ``bench/results/bench-<UTC time>.json`` (and
``latest.json``). See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost
import payloads
import pyspy_breakdown
import report
import servers
from procfs import Sampler, clear_peak_rss, filesystem_of, task_ticks
from servers import (
    BENCH,
    INGEST_ONLY_CONFIG,
    KEY,
    MIB,
    ROOT,
    VENV_BIN,
    Router,
    Server,
    SinkWatcher,
    buckets,
    delivered_and_accepted,
    histogram_quantile,
    log,
    metric_sum,
    pinned,
    scrape,
    start_floor,
    start_peer,
    start_router,
    wait_drained,
)

# -- load generators --------------------------------------------------------------------------


@dataclass
class Options:
    duration: float
    connections: int
    threads: int
    runs: int
    warmup: float
    fixed_duration: float
    e2e_count: int
    large_sizes: list[int]
    large_throttled: int
    large_throttle_mbit: float
    profile: float
    skip_peer: bool
    ingest_only: bool
    soak: float
    soak_slice: float
    retries: int
    nice: int
    phases: set[str]
    server_cpu: int | None
    load_cpu: int | None
    floor_loop: str
    quick: bool
    tmp: Path = Path()
    wrk: str | None = None
    keep_tmp: bool = False


def run_wrk(url: str, pool: Path, mode: str, opts: Options, duration: float, key: str = "") -> Any:
    argv = [
        opts.wrk or "wrk",
        f"-t{opts.threads}",
        f"-c{opts.connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "post.lua"),
        url,
        "--",
        str(pool),
        str(opts.threads),
        mode,
        key,
    ]
    proc = subprocess.run(
        pinned(opts.load_cpu, argv), capture_output=True, text=True, timeout=duration + 120
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result = json.loads(line.removeprefix("BENCH_JSON "))
            result["rps"] = round(result["requests"] / (result["duration_us"] / 1e6), 1)
            return result
    tail = (proc.stdout + proc.stderr)[-2000:]
    raise RuntimeError(f"wrk failed ({proc.returncode}): {tail}")


def run_fixed_rate(
    url: str, pool: Path, opts: Options, *, rate: float, duration: float = 0, count: int = 0
) -> subprocess.Popen[bytes]:
    out = pool.with_suffix(".result.json")
    argv = [sys.executable, str(BENCH / "fixed_rate.py"), "--url", url, "--pool", str(pool)]
    argv += ["--rate", str(rate), "--connections", str(opts.connections), "--out", str(out)]
    argv += ["--count", str(count)] if count else ["--duration", str(duration)]
    return subprocess.Popen(pinned(opts.load_cpu, argv), stdout=subprocess.DEVNULL)


def fixed_rate_result(proc: subprocess.Popen[bytes], pool: Path, timeout: float) -> Any:
    proc.wait(timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"fixed_rate.py failed with {proc.returncode}")
    return json.loads(pool.with_suffix(".result.json").read_text())


def disturbed(window: dict[str, Any], saturating: bool = False) -> bool:
    """Whether other processes (more than 10 % of a CPU) took a noticeable share (20 %) of the
    server's CPU or of the load generator's during a window. The server's own kernel work
    (fsync, loopback) also shows on the cores, hence the test on other processes too. For a
    ``saturating`` run (wrk at full speed) a busy load-generator CPU matters only if the server
    was then not kept busy (its CPU under 95 % busy)."""
    if window["other_processes_cpu_pct"] <= 10:
        return False
    if window["server_core_not_server_pct"] > 20:
        return True
    starved = window["load_core_not_ours_pct"] > 20
    return starved and (not saturating or window["server_core_busy_pct"] < 95)


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the undisturbed runs (over all of them if every one was disturbed)."""
    clean = [r["rps"] for r in runs if not r.get("disturbed")]
    rates = clean or [r["rps"] for r in runs]
    return {
        "rps_median": round(statistics.median(rates), 1) if rates else None,
        "rps_runs": rates,
        "disturbed_runs_left_out": len(runs) - len(clean) if clean else 0,
        "all_disturbed": not clean,
        "runs": runs,
    }


def errors_of(result: dict[str, Any]) -> int:
    return int(sum(result["errors"].values()))


# -- phases ---------------------------------------------------------------------------------


@dataclass
class Target:
    """One server measured with wrk: how to reach it and what to send."""

    name: str
    server: Server
    url: str
    mode: str  # "cycle": ids may repeat (floor, peer); "once": fresh unique ids (router)
    key: str = ""
    router: Router | None = None
    delivers: bool = True  # False: nothing is routed to a sink (no backlog to wait for)


def _without_wrk(opts: Options, out: dict[str, Any], consequence: str = "") -> bool:
    """True (the phase marked skipped, and why) when wrk is not installed."""
    if opts.wrk:
        return False
    out["skipped"] = f"wrk is not installed (apt-get install -y wrk){consequence}"
    log(out["skipped"])
    return True


def throughput_phase(opts: Options, results: dict[str, Any]) -> None:
    """floor, router and peer up at once (all pinned to the server CPU, idle when not
    measured), measured in interleaved rounds (floor, router, peer; floor, router, peer; ...)
    so that a burst of outside load hits all three alike; medians per server."""
    out: dict[str, Any] = results.setdefault("throughput", {})
    if _without_wrk(opts, out, ": no throughput figures"):
        return
    cycle_pool = payloads.write_pool(opts.tmp / "cycle-pool.txt", 20_000, KEY.encode())
    results["body_bytes_mean"] = round(cycle_pool.mean_body_bytes)
    targets: list[Target] = []
    try:
        log("router (throughput instance): starting")
        router = start_router("router", opts.tmp, opts.server_cpu)
        url = f"http://127.0.0.1:{router.server.port}/webhook"
        targets.append(Target("router", router.server, url, "once", router=router))
        if opts.ingest_only:
            log("router, ingest only (no sink, WARNING logs; diagnostic): starting")
            ingest = start_router("ingest", opts.tmp, opts.server_cpu, INGEST_ONLY_CONFIG)
            url = f"http://127.0.0.1:{ingest.server.port}/webhook"
            targets.append(
                Target("ingest", ingest.server, url, "once", router=ingest, delivers=False)
            )
        time.sleep(1.0)
        uvloop = router.server.uses_uvloop()
        loop = opts.floor_loop if opts.floor_loop != "auto" else "uvloop" if uvloop else "asyncio"
        out["router_loop"] = "uvloop" if uvloop else "asyncio"
        out["floor_loop"] = loop
        results["memory"]["rss_idle_mb"] = router.server.rss_mb()

        log(f"floor: hypercorn ({loop}) bare app: starting")
        floor = start_floor(opts.tmp, opts.server_cpu, loop)
        targets.insert(0, Target("floor", floor, f"http://127.0.0.1:{floor.port}/webhook", "cycle"))
        peer_out = None
        if opts.skip_peer:
            out["peer"] = {"skipped": "--skip-peer"}
        elif not shutil.which("webhook"):
            out["peer"] = {
                "skipped": "adnanh/webhook is not installed (apt-get install -y webhook)"
            }
            log(out["peer"]["skipped"])
        else:
            log("peer: adnanh/webhook (key header check, appends the payload to a file): starting")
            peer, peer_out = start_peer(opts.tmp, opts.server_cpu)
            url = f"http://127.0.0.1:{peer.port}/hooks/metriport"
            targets.append(Target("peer", peer, url, "cycle", KEY))

        # Fresh, unique ids for every router run: enough rows for the floor's rate (the router
        # does more work on the same HTTP stack), grown if a run used most of its pool.
        rows = 0
        warm: dict[str, float] = {}
        for t in targets:
            if t.mode == "once":
                rows = int(max(warm.get("floor", 5000), 3000) * opts.duration * 1.6) + 2000
            warm[t.name] = one_run(t, opts, cycle_pool.path, opts.warmup, rows, "warmup")["rps"]
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        max_rss = 0.0
        for i in range(opts.runs):
            for t in targets:
                for attempt in range(1 + opts.retries):
                    r = one_run(t, opts, cycle_pool.path, opts.duration, rows, f"run {i + 1}")
                    runs[t.name].append(r)
                    if t.name == "router":
                        max_rss = max(max_rss, r["max_rss_mb"])
                    if t.router is not None and r["sent"] > 0.8 * rows:
                        rows = int(rows * 1.5)
                    if not r["disturbed"]:
                        break
                    if attempt < opts.retries:
                        log(f"  {t.name} run {i + 1} was disturbed by other processes: again")
        for t in targets:
            out[t.name] = summarize_runs(runs[t.name])
        mem = results["memory"]
        mem["rss_load_max_mb"] = round(max_rss, 1)
        mem["vmhwm_after_load_mb"] = router.server.rss_mb("VmHWM")
        time.sleep(2.0)
        mem["rss_after_load_idle_mb"] = router.server.rss_mb()
        if peer_out is not None:
            with peer_out.open("rb") as f:
                out["peer"]["lines_written"] = sum(chunk.count(b"\n") for chunk in iter_chunks(f))
    finally:
        for t in targets:
            t.server.stop()

    r_rps, f_rps = out["router"]["rps_median"], out["floor"]["rps_median"]
    out["router_vs_floor"] = round(r_rps / f_rps, 3) if f_rps else None
    i_rps = out.get("ingest", {}).get("rps_median")
    out["ingest_vs_floor"] = round(i_rps / f_rps, 3) if i_rps and f_rps else None
    p_rps = out.get("peer", {}).get("rps_median")
    out["router_vs_peer"] = round(r_rps / p_rps, 2) if p_rps else None
    # The same ratios round by round (each round's runs are seconds apart).
    for other in ("floor", "peer"):
        if "rps_runs" in out.get(other, {}):
            out[f"router_vs_{other}_by_round"] = [
                round(r / o, 3)
                for r, o in zip(out["router"]["rps_runs"], out[other]["rps_runs"], strict=False)
            ]


def one_run(
    t: Target, opts: Options, cycle_pool: Path, duration: float, rows: int, label: str
) -> dict[str, Any]:
    pool = cycle_pool
    if t.mode == "once":
        wanted = max(1000, int(rows * duration / opts.duration))
        pool = payloads.write_pool(opts.tmp / f"{t.name}-pool.txt", wanted, KEY.encode()).path
    assert t.router is None or t.mode == "once"
    dup0 = metric_sum(scrape(t.server.port), "webhook_router_duplicates_total") if t.router else 0
    with Sampler(t.server.pid, opts.server_cpu, opts.load_cpu) as sampler:
        r: dict[str, Any] = run_wrk(t.url, pool, t.mode, opts, duration, t.key)
    r.update(sampler.summary())
    r["disturbed"] = disturbed(r, saturating=True)
    text = f"  {t.name} {label}: {r['rps']:,.0f} req/s, errors {errors_of(r)}"
    if r["disturbed"]:
        text += (
            f" (disturbed: other processes took {r['server_core_not_server_pct']:.0f}% of the"
            f" server's CPU, {r['load_core_not_ours_pct']:.0f}% of the load generator's)"
        )
    if t.router is not None:
        if t.delivers:
            r["drain_after_load_s"] = wait_drained(t.router)
            text += f", backlog delivered {r['drain_after_load_s']} s after the load stopped"
        dup1 = metric_sum(scrape(t.server.port), "webhook_router_duplicates_total")
        r["duplicates"] = int(dup1 - dup0)
        r["journal_mb"] = t.router.journal_mb()
        if r["wraps"]:
            log(f"  warning: the pool ran out ({r['wraps']} wraps): ids repeated")
        pool.unlink()
    log(text)
    return r


def cost_phase(opts: Options, results: dict[str, Any]) -> None:
    """CPU per request by thread, user and kernel, and system calls per request (``perf``, if
    allowed), floor and router in alternating rounds under wrk (see ``bench/cost.py``)."""
    out: dict[str, Any] = results.setdefault("cost", {})
    if _without_wrk(opts, out):
        return
    cycle_pool = payloads.write_pool(opts.tmp / "cost-cycle.txt", 20_000, KEY.encode())
    router = start_router("router-cost", opts.tmp, opts.server_cpu)
    loop = "uvloop" if router.server.uses_uvloop() else "asyncio"
    floor = start_floor(opts.tmp, opts.server_cpu, loop)
    targets = [("floor", floor, "cycle"), ("router", router.server, "once")]
    routers = {"router": router}
    if opts.ingest_only:  # accepting alone: where delivering's share shows
        routers["ingest"] = start_router(
            "ingest-cost", opts.tmp, opts.server_cpu, INGEST_ONLY_CONFIG
        )
        targets.append(("ingest", routers["ingest"].server, "once"))
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
    rows = int(5000 * opts.duration * 1.6) + 2000
    try:
        for i in range(opts.runs + 1):  # the first round warms both up and is not counted
            duration = opts.warmup if i == 0 else opts.duration
            for name, server, mode in targets:
                pool = cycle_pool.path
                if mode == "once":
                    want = max(1000, int(rows * duration / opts.duration))
                    pool = payloads.write_pool(opts.tmp / "cost-once.txt", want, KEY.encode()).path
                url = f"http://127.0.0.1:{server.port}/webhook"
                before = cost.thread_times(server.pid)
                with cost.Syscalls(server.pid) as calls:
                    r = run_wrk(url, pool, mode, opts, duration)
                after = cost.thread_times(server.pid)
                if mode == "once":
                    if r["sent"] > 0.8 * want:
                        rows = int(rows * 1.5)
                    pool.unlink()
                    if name == "router":
                        wait_drained(router)
                if i == 0:
                    continue
                n = max(1, r["requests"])
                threads = cost.per_request(server.pid, before, after, n)
                one: dict[str, Any] = {
                    "rps": r["rps"],
                    "threads": threads,
                    "cpu_us": sum(t["user_us"] + t["kernel_us"] for t in threads.values()),
                    "kernel_us": sum(t["kernel_us"] for t in threads.values()),
                }
                if calls.counts is not None:
                    one["syscalls"] = {k: v / n for k, v in calls.counts.items()}
                rounds[name].append(one)
                log(
                    f"  cost {name} round {i}: {r['rps']:,.0f} req/s, {one['cpu_us']:.0f} us"
                    f" of CPU per request ({one['kernel_us']:.0f} in the kernel)"
                )
    finally:
        for r_ in routers.values():
            r_.server.stop()
        floor.stop()
    for name, measured in rounds.items():
        out[name] = cost.summarize(measured)
    f_us, r_us = out["floor"]["cpu_us_per_request"], out["router"]["cpu_us_per_request"]
    out["router_vs_floor_cpu"] = round(f_us / r_us, 3) if r_us else None
    if "ingest" in out:
        i_us = out["ingest"]["cpu_us_per_request"]
        out["ingest_vs_floor_cpu"] = round(f_us / i_us, 3) if i_us else None
    if not any("syscalls_per_request" in out[n] for n in rounds):
        out["syscalls_skipped"] = "perf is not installed or may not read tracepoints (as root)"


def iter_chunks(f: Any) -> Iterator[bytes]:
    while chunk := f.read(MIB):
        yield chunk


def latency_phase(opts: Options, results: dict[str, Any]) -> None:
    out: dict[str, Any] = results.setdefault("latency", {})
    log("router (latency instance): starting")
    router = start_router("router-latency", opts.tmp, opts.server_cpu)
    port = router.server.port
    url = f"http://127.0.0.1:{port}/webhook"
    try:
        time.sleep(1.0)
        results["memory"].setdefault("rss_idle_mb", router.server.rss_mb())
        # End-to-end: N messages as fast as the router takes them (closed loop).
        n = opts.e2e_count
        pool = payloads.write_pool(opts.tmp / "e2e.txt", n, KEY.encode())
        log(f"end-to-end: {n:,} messages, closed loop over {opts.connections} connections")
        before = buckets(scrape(port), "webhook_router_delivery_seconds")
        with (
            SinkWatcher(router.sink, target=n) as watcher,
            Sampler(router.server.pid, opts.server_cpu, opts.load_cpu) as sampler,
        ):
            proc = run_fixed_rate(url, pool.path, opts, rate=0, count=n)
            client = fixed_rate_result(proc, pool.path, timeout=600)
            deadline = time.monotonic() + 120
            while watcher.reached_at is None and time.monotonic() < deadline:
                time.sleep(0.01)
        after = buckets(scrape(port), "webhook_router_delivery_seconds")
        first, last = client["first_send_wall"], client["last_ack_wall"]
        done = watcher.reached_at
        out["e2e"] = {
            "messages": n,
            "answered": client["statuses"],
            "acks_s": round(last - first, 3),
            "ack_rate": client["achieved_rate"],
            "all_in_sink_s": round(done - first, 3) if done else None,
            "drain_after_last_ack_s": round(done - last, 3) if done else None,
            "sink_lines": watcher.lines,
            "ack_latency_ms": client["latency_ms"],
            "delivery_lag_ms_sink_file": watcher.lag_ms(),
            "delivery_lag_p99_ms_histogram": _ms(histogram_quantile(before, after, 0.99)),
            **sampler.summary(),
        }
        results["memory"]["rss_e2e_max_mb"] = round(sampler.max_rss_kb / 1024, 1)
        wait_drained(router)

        # 50 % of max rate: messages, with a trickle of pings beside them.
        max_rps = results.get("throughput", {}).get("router", {}).get("rps_median")
        basis = "wrk median" if max_rps else "end-to-end burst rate (no wrk)"
        max_rps = max_rps or client["achieved_rate"]
        rate = round(max_rps / 2)
        out["half_rate"] = {"rate": rate, "basis": f"50% of the router's {basis}: {max_rps}"}
        secs = opts.fixed_duration
        log(f"half load: {rate:,} msg/s for {secs} s (open loop), 20 pings/s beside it")
        msgs = payloads.write_pool(opts.tmp / "half.txt", int(rate * secs) + 100, KEY.encode())
        pings = payloads.write_pool(opts.tmp / "pings-beside.txt", 2000, KEY.encode(), "ping")
        before = buckets(scrape(port), "webhook_router_delivery_seconds")
        with (
            SinkWatcher(router.sink) as watcher,
            Sampler(router.server.pid, opts.server_cpu, opts.load_cpu) as sampler,
        ):
            proc = run_fixed_rate(url, msgs.path, opts, rate=rate, duration=secs)
            ping_proc = subprocess.Popen(
                pinned(
                    opts.load_cpu,
                    [
                        sys.executable,
                        str(BENCH / "fixed_rate.py"),
                        "--url",
                        url,
                        "--pool",
                        str(pings.path),
                        "--rate",
                        "20",
                        "--duration",
                        str(secs),
                        "--connections",
                        "1",
                        "--out",
                        str(pings.path.with_suffix(".result.json")),
                    ],
                ),
                stdout=subprocess.DEVNULL,
            )
            client = fixed_rate_result(proc, msgs.path, timeout=secs + 300)
            beside = fixed_rate_result(ping_proc, pings.path, timeout=secs + 300)
            drained = wait_drained(router)
        after = buckets(scrape(port), "webhook_router_delivery_seconds")
        out["half_rate"].update(
            {
                "answered": client["statuses"],
                "errors": client["errors"],
                "achieved_rate": client["achieved_rate"],
                "late_sends": client["late_sends"],
                "ack_latency_ms": client["latency_ms"],
                "ack_service_ms": client["service_ms"],
                "ping_beside_latency_ms": beside["latency_ms"],
                "delivery_lag_ms_sink_file": watcher.lag_ms(),
                "delivery_lag_p99_ms_histogram": _ms(histogram_quantile(before, after, 0.99)),
                "drain_after_load_s": drained,
                **sampler.summary(),
            }
        )
        results["memory"]["rss_half_rate_max_mb"] = round(sampler.max_rss_kb / 1024, 1)

        # Pings alone at the same rate.
        log(f"pings: {rate:,}/s for {secs} s (open loop)")
        ping_pool = payloads.write_pool(
            opts.tmp / "pings.txt", int(rate * secs) + 100, KEY.encode(), "ping"
        )
        with Sampler(router.server.pid, opts.server_cpu, opts.load_cpu) as sampler:
            proc = run_fixed_rate(url, ping_pool.path, opts, rate=rate, duration=secs)
            ping = fixed_rate_result(proc, ping_pool.path, timeout=secs + 300)
        out["ping"] = {
            "rate": rate,
            "answered": ping["statuses"],
            "errors": ping["errors"],
            "achieved_rate": ping["achieved_rate"],
            "late_sends": ping["late_sends"],
            "latency_ms": ping["latency_ms"],
            "service_ms": ping["service_ms"],
            **sampler.summary(),
        }
        results["memory"]["vmhwm_latency_instance_mb"] = router.server.rss_mb("VmHWM")
    finally:
        router.server.stop()


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


def post_file(
    port: int, path: Path, size: int, signature: str, timeout: float, rate: float = 0.0
) -> tuple[int, float]:
    """POST a file as the body (streamed with sendfile, or paced at ``rate`` bytes/s); the
    answer's status and the silence after the last byte: from the last byte handed to the
    socket to the first byte of the answer. That is what Metriport's sender times (axios's
    ``timeout`` is the socket's inactivity timeout: 5 s)."""
    head = (
        f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: Metriport API\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n"
        f"x-metriport-signature: {signature}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        with path.open("rb") as f, contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if rate <= 0:
                sock.sendfile(f)
            else:  # paced: a piece every piece/rate seconds, as a real link would take it
                start, sent = time.monotonic(), 0
                while piece := f.read(64 * 1024):
                    sock.sendall(piece)
                    sent += len(piece)
                    ahead = start + sent / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
        last_byte = time.monotonic()
        answer = sock.recv(4096)
        silence = time.monotonic() - last_byte
        while answer and b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, silence


def large_phase(opts: Options, results: dict[str, Any]) -> None:
    out: dict[str, Any] = results.setdefault("large_bodies", {})
    bodies = []
    for i, mib in enumerate(opts.large_sizes):
        path = opts.tmp / f"consolidated-{mib}MiB.json"
        size, signature = payloads.write_large_body(path, mib * MIB, KEY.encode(), tag=1000 + i)
        bodies.append((f"{mib}MiB", mib, path, size, signature, 0.0))
    if opts.large_throttled and opts.large_throttle_mbit > 0:
        mib = opts.large_throttled
        path = opts.tmp / f"consolidated-{mib}MiB-throttled.json"
        size, signature = payloads.write_large_body(path, mib * MIB, KEY.encode(), tag=1900)
        rate = opts.large_throttle_mbit * 1e6 / 8
        name = f"{mib}MiB@{opts.large_throttle_mbit:g}Mbit"
        bodies.append((name, mib, path, size, signature, rate))
    log(f"large bodies: generated {', '.join(name for name, *_ in bodies)}")
    router = start_router("router-large", opts.tmp, opts.server_cpu)
    port = router.server.port
    try:
        time.sleep(1.0)
        out["rss_idle_mb"] = router.server.rss_mb()
        for name, mib, path, size, signature, rate in bodies:
            delivered0, _ = delivered_and_accepted(port)
            peak_reset = clear_peak_rss(router.server.pid)
            rss0 = router.server.rss_mb()
            t0 = time.monotonic()
            with Sampler(router.server.pid, opts.server_cpu, opts.load_cpu) as sampler:
                status, silence = post_file(port, path, size, signature, 600, rate)
                t_200 = time.monotonic() - t0
                hwm_at_200 = router.server.rss_mb("VmHWM")
                t_delivered = None
                while status == 200 and time.monotonic() - t0 < 600:
                    if delivered_and_accepted(port)[0] > delivered0:
                        t_delivered = time.monotonic() - t0
                        break
                    time.sleep(0.02)
            hwm = router.server.rss_mb("VmHWM")
            peak = hwm if peak_reset else sampler.max_rss_kb / 1024
            row = {
                "size_mib": mib,
                "bytes": size,
                "status": status,
                "upload_mbit_s": round(rate * 8 / 1e6) if rate else None,
                "silence_after_last_byte_s": round(silence, 2),
                "time_to_200_s": round(t_200, 2),
                "time_to_delivered_s": round(t_delivered, 2) if t_delivered else None,
                "rss_before_mb": rss0,
                "peak_rss_mb": round(peak, 1),
                "peak_rss_growth_mb": round(peak - rss0, 1),
                "peak_rss_growth_until_200_mb": round(hwm_at_200 - rss0, 1) if peak_reset else None,
                "peak_measured_by": "VmHWM after clear_refs" if peak_reset else "VmRSS sampling",
                "rss_after_mb": router.server.rss_mb(),
                **{k: v for k, v in sampler.summary().items() if k != "max_rss_mb"},
            }
            out[name] = row
            log(
                f"  {name}: {status} after {row['time_to_200_s']} s (silence after the last byte"
                f" {row['silence_after_last_byte_s']} s), delivered after "
                f"{row['time_to_delivered_s']} s, peak RSS +{row['peak_rss_growth_mb']} MB"
            )
            path.unlink()
    finally:
        router.server.stop()


def soak_phase(opts: Options, results: dict[str, Any]) -> None:
    """One router under wrk for ``--soak`` seconds, in slices of ``--soak-slice`` seconds, each
    with fresh ids (a few seconds apart while the next pool is written): does the rate decay as
    the journal grows?"""
    out: dict[str, Any] = results.setdefault("soak", {})
    if _without_wrk(opts, out):
        return
    slices = max(2, round(opts.soak / opts.soak_slice))
    log(f"soak: {slices} x {opts.soak_slice:g} s of wrk load on one router")
    router = start_router("router-soak", opts.tmp, opts.server_cpu)
    url = f"http://127.0.0.1:{router.server.port}/webhook"
    guess = results.get("throughput", {}).get("router", {}).get("rps_median") or 4000
    rows = int(guess * opts.soak_slice * 1.5) + 2000
    runs = []
    try:
        for i in range(slices):
            pool = payloads.write_pool(opts.tmp / "soak-pool.txt", rows, KEY.encode())
            with Sampler(router.server.pid, opts.server_cpu, opts.load_cpu) as sampler:
                r: dict[str, Any] = run_wrk(url, pool.path, "once", opts, opts.soak_slice)
            pool.path.unlink()
            r.update(sampler.summary(), journal_mb=router.journal_mb())
            r["disturbed"] = disturbed(r, saturating=True)
            if r["sent"] > 0.8 * rows:
                rows = int(rows * 1.5)
            runs.append(r)
            log(
                f"  slice {i + 1}: {r['rps']:,.0f} req/s, journal {r['journal_mb']} MB, "
                f"RSS max {r['max_rss_mb']} MB" + (" (disturbed)" if r["disturbed"] else "")
            )
        out["drain_after_load_s"] = wait_drained(router)
    finally:
        router.server.stop()
    out["slice_s"] = opts.soak_slice
    out["runs"] = runs
    out["rps_slices"] = [r["rps"] for r in runs]
    out["last_vs_first"] = round(runs[-1]["rps"] / runs[0]["rps"], 3)
    out["journal_mb_end"] = runs[-1]["journal_mb"]
    messages = sum(r["requests"] for r in runs)
    out["messages"] = messages
    out["journal_bytes_per_message"] = round(sum(out["journal_mb_end"].values()) * MIB / messages)


def _wrk_into(box: dict[str, Any], *args: Any) -> None:
    box.update(run_wrk(*args))


def profile_phase(opts: Options, results: dict[str, Any], results_dir: Path, stamp: str) -> None:
    out: dict[str, Any] = results.setdefault("profile", {})
    spy = shutil.which("py-spy", path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if not spy or not opts.wrk:
        out["skipped"] = "needs py-spy (.venv/bin/pip install py-spy) and wrk"
        log(out["skipped"])
        return
    secs = opts.profile
    loop = "asyncio"
    for name in ("router", "floor"):
        if name == "router":
            router = start_router("router-profile", opts.tmp, opts.server_cpu)
            server, wrk_pool_mode = router.server, "once"
            rows = int(6000 * (secs + 6))
            loop = "uvloop" if server.uses_uvloop() else "asyncio"
        else:
            server, wrk_pool_mode, rows = (
                start_floor(opts.tmp, opts.server_cpu, loop),
                "cycle",
                20_000,
            )
        try:
            pool = payloads.write_pool(opts.tmp / f"profile-{name}.txt", rows, KEY.encode())
            url = f"http://127.0.0.1:{server.port}/webhook"
            raw = results_dir / f"profile-{name}-{stamp}.txt"
            log(f"profile: py-spy on the {name} for {secs} s under wrk load")
            box: dict[str, Any] = {}
            load = threading.Thread(
                target=_wrk_into, args=(box, url, pool.path, wrk_pool_mode, opts, secs + 4)
            )
            load.start()
            time.sleep(2.0)
            argv = [spy, "record", "--pid", str(server.pid), "--duration", str(int(secs))]
            argv += ["--rate", "250", "--nonblocking", "--threads", "--format", "raw"]
            ticks0, t0 = task_ticks(server.pid), time.monotonic()
            subprocess.run(
                pinned(opts.load_cpu, [*argv, "-o", str(raw)]),
                capture_output=True,
                check=True,
                timeout=secs + 60,
            )
            ticks1, wall = task_ticks(server.pid), time.monotonic() - t0
            load.join()
            names = pyspy_breakdown.thread_names(raw)
            hz = os.sysconf("SC_CLK_TCK")
            by_tid = {tid: (t - ticks0.get(tid, 0)) / hz for tid, t in ticks1.items()}
            thread_cpu: dict[str, float] = {}
            for tid, used in by_tid.items():
                label = names.get(tid, "threads py-spy did not see")
                thread_cpu[label] = round(thread_cpu.get(label, 0.0) + 100 * used / wall, 1)
            out[name] = {
                "loop": loop,
                "raw_stacks": str(raw.relative_to(ROOT)),
                "rps_under_profile": box.get("rps"),
                "thread_cpu_pct_of_a_core": thread_cpu,
                **pyspy_breakdown.breakdown(raw, by_tid),
            }
            print(f"{name} ({loop}) under wrk: {box.get('rps')} req/s while profiled")
            print(f"CPU per thread from /proc (% of a core): {thread_cpu}")
            print(pyspy_breakdown.format_breakdown(out[name]))
        finally:
            server.stop()


# -- main -------------------------------------------------------------------------------------


def parse_args() -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 10; quick 3)")
    p.add_argument("--connections", type=int, default=32, help="connections (default 32)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--runs", type=int, help="wrk runs per server, median (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="short runs, 5,000 e2e, 16 MiB only")
    p.add_argument("--e2e-count", type=int, help="end-to-end messages (default 20,000)")
    p.add_argument("--fixed-duration", type=float, help="seconds per fixed-rate run (15)")
    p.add_argument("--large", default=None, help="MiB sizes, comma-separated (16,64,200,256)")
    p.add_argument(
        "--large-throttled",
        type=int,
        default=None,
        help="MiB of one more large body sent paced at --large-throttle-mbit (200; 0: none)",
    )
    p.add_argument(
        "--large-throttle-mbit",
        type=float,
        default=100.0,
        help="upload rate of the throttled large body, Mbit/s (100: a real link)",
    )
    p.add_argument(
        "--phases",
        default="throughput,latency,large",
        help="which of throughput,latency,large,cost to run (default: the first three; cost:"
        " CPU per request by thread, user and kernel, and system calls, floor and router)",
    )
    p.add_argument("--profile", type=float, default=0, help="also py-spy the router N seconds")
    p.add_argument("--skip-peer", action="store_true", help="do not run adnanh/webhook")
    p.add_argument(
        "--skip-ingest-only",
        action="store_true",
        help="do not run the diagnostic ingest-only router (no sink, WARNING logs)",
    )
    p.add_argument(
        "--soak", type=float, default=0, help="also a soak of N seconds on one router (600)"
    )
    p.add_argument("--soak-slice", type=float, default=60, help="soak slice seconds (60)")
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="repeat a wrk run disturbed by other processes up to N times (default 2)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run servers and load generators at this nice value (e.g. -10 as root on a "
        "shared machine: steadier figures, other people's jobs slow down meanwhile)",
    )
    p.add_argument("--server-cpu", type=int, help="CPU for servers (default: the last one)")
    p.add_argument("--load-cpu", type=int, help="CPU for load generators (default: CPU 0)")
    p.add_argument(
        "--floor-loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="the floor's event loop (auto: the one the router process has loaded)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--tmp-dir",
        type=Path,
        help="where journals, sink files and bodies go (default: $TMPDIR; use a real disk, "
        "not tmpfs, or fsync costs nothing)",
    )
    a = p.parse_args()
    ncpu = len(os.sched_getaffinity(0))
    server_cpu = a.server_cpu if a.server_cpu is not None else (max(os.sched_getaffinity(0)))
    load_cpu = a.load_cpu if a.load_cpu is not None else min(os.sched_getaffinity(0))
    if ncpu < 2:
        server_cpu = load_cpu = None
    quick = a.quick
    sizes = a.large or ("16" if quick else "16,64,200,256")
    return Options(
        duration=a.duration or (3.0 if quick else 10.0),
        connections=a.connections,
        threads=max(1, min(a.threads, a.connections)),
        runs=a.runs or (1 if quick else 3),
        warmup=1.0 if quick else 3.0,
        fixed_duration=a.fixed_duration or (5.0 if quick else 15.0),
        e2e_count=a.e2e_count or (5_000 if quick else 20_000),
        large_sizes=[int(x) for x in sizes.split(",") if x.strip()],
        large_throttled=(
            a.large_throttled if a.large_throttled is not None else (0 if quick else 200)
        ),
        large_throttle_mbit=a.large_throttle_mbit,
        profile=a.profile,
        skip_peer=a.skip_peer,
        ingest_only=not a.skip_ingest_only,
        soak=a.soak,
        soak_slice=a.soak_slice,
        retries=a.retries,
        nice=a.nice,
        phases={x.strip() for x in a.phases.split(",") if x.strip()},
        server_cpu=server_cpu,
        load_cpu=load_cpu,
        floor_loop=a.floor_loop,
        quick=quick,
        wrk=shutil.which("wrk"),
        keep_tmp=a.keep_tmp,
        tmp=a.tmp_dir or Path(tempfile.gettempdir()),
    )


def main() -> int:
    opts = parse_args()
    servers.NICE = opts.nice
    if opts.nice:
        os.nice(opts.nice)  # this script too: it follows the sink file
    if opts.load_cpu is not None:
        os.sched_setaffinity(0, {opts.load_cpu})
    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    tmp = Path(tempfile.mkdtemp(prefix="webhook-router-bench-", dir=opts.tmp))
    opts.tmp = tmp
    results: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "machine": {
            **report.machine_info(opts.server_cpu, opts.load_cpu),
            "tmp_filesystem": filesystem_of(tmp),
        },
        "versions": report.versions(opts.wrk),
        "options": {
            "quick": opts.quick,
            "duration": opts.duration,
            "connections": opts.connections,
            "threads": opts.threads,
            "runs": opts.runs,
            "warmup": opts.warmup,
            "fixed_duration": opts.fixed_duration,
            "e2e_count": opts.e2e_count,
            "large_sizes_mib": opts.large_sizes,
            "auth": "x-metriport-signature (HMAC-SHA256) on every request, pre-signed pools",
            "nice": opts.nice,
            "retries_of_disturbed_runs": opts.retries,
        },
        "memory": {},
        "notes": [],
    }
    log(f"{results['machine']['pinning']}; temporary files in {tmp}")
    failed = False
    try:
        for name, phase in (
            ("throughput", throughput_phase),
            ("latency", latency_phase),
            ("large", large_phase),
            ("cost", cost_phase),
        ):
            if name not in opts.phases:
                continue
            results.setdefault("loadavg_phases", {})[name] = round(os.getloadavg()[0], 2)
            try:
                phase(opts, results)
            except Exception as e:  # report what we have; say what failed
                failed = True
                results["notes"].append(f"{name} phase failed: {type(e).__name__}: {e}")
                log(f"{name} phase failed: {type(e).__name__}: {e}")
        if opts.soak:
            try:
                soak_phase(opts, results)
            except Exception as e:
                failed = True
                results["notes"].append(f"soak failed: {type(e).__name__}: {e}")
        if opts.profile:
            try:
                profile_phase(opts, results, results_dir, stamp)
            except Exception as e:
                failed = True
                results["notes"].append(f"profile failed: {type(e).__name__}: {e}")
    finally:
        if opts.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    for where, window in report.windows(results, ""):
        if window.get("disturbed", disturbed(window)):
            results["notes"].append(
                f"{where}: disturbed: other processes used {window['other_processes_cpu_pct']:.0f}%"
                f" of a CPU; {window['server_core_not_server_pct']:.0f}% of the server's CPU and "
                f"{window['load_core_not_ours_pct']:.0f}% of the load generator's went elsewhere"
            )
    for where in ("half_rate", "ping"):
        run = results.get("latency", {}).get(where, {})
        late, sent = run.get("late_sends", 0), sum(run.get("answered", {}).values())
        if sent and late > 0.01 * sent:
            results["notes"].append(
                f"latency.{where}: the client sent {late:,} of {sent:,} requests more than 1 ms "
                "late (its CPU was busy); their latency still counts from when they were due"
            )
    noise = max(report.values_of(results, "other_processes_cpu_pct"), default=None)
    results["other_processes_cpu_pct_max"] = noise
    if noise is not None and noise > 5:
        results["notes"].append(
            f"other processes used up to {noise:.0f}% of a CPU during a measurement (see "
            "other_processes_cpu_pct per run in the JSON): figures are noisier than usual; "
            "the ratios to floor and peer hold better than absolute rates"
        )
    path = results_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    shutil.copyfile(path, results_dir / "latest.json")
    print(report.report(results))
    print(f"\nfull results: {path.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
