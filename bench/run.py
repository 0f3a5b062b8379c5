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

Prints a table and writes everything to ``bench/results/bench-<UTC time>.json`` (and
``latest.json``). See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import payloads
import pyspy_breakdown

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = Path(sys.executable).parent
KEY = "BENCH-not-a-secret-k1"  # 21 characters, like a Metriport webhook key
MIB = 1 << 20

# -- targets from issue 5 (checked in the table; never in tests) -------------------------------
TARGETS = {
    "router_vs_floor": 0.8,
    "router_vs_peer": 3.0,
    "ack_p99_ms": 25.0,
    "ping_p99_ms": 10.0,
    "e2e_drain_after_last_ack_s": 2.0,
    "delivery_lag_p99_ms": 250.0,
    "rss_idle_mb": 60.0,
    "rss_load_mb": 150.0,
    "large_rss_growth_mb": 64.0,
}


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- /proc helpers ----------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    tree = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_kb(pid: int, field_name: str) -> int:
    return sum(status_kb(p, field_name) for p in process_tree(pid))


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all threads) and of its waited-for children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def core_times(cpu: int | None) -> tuple[float, float]:
    """(busy, total) jiffies of one CPU (or all) from /proc/stat."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts[0] == name:
            values = [int(x) for x in parts[1:9]]
            idle = values[3] + values[4]
            return float(sum(values) - idle), float(sum(values))
    return 0.0, 0.0


def clear_peak_rss(pid: int) -> bool:
    """Reset VmHWM (``echo 5 > /proc/PID/clear_refs``, Linux 4.0+, needs the right to)."""
    ok = True
    for p in process_tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


class Sampler:
    """While active: the largest RSS of a process tree (every 50 ms), its CPU use, and how busy
    the server's CPU was (to see whether something else ran there)."""

    def __init__(self, pid: int, cpu: int | None) -> None:
        self.pid, self.cpu = pid, cpu
        self.max_rss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_rss_kb = max(self.max_rss_kb, tree_kb(self.pid, "VmRSS"))
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._t0 = time.monotonic()
        self._cpu0 = cpu_seconds(self.pid)
        self._core0 = core_times(self.cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self._t0
        busy0, total0 = self._core0
        busy1, total1 = core_times(self.cpu)
        self.process_cpu_pct = round(100 * (cpu_seconds(self.pid) - self._cpu0) / wall, 1)
        self.core_busy_pct = round(100 * (busy1 - busy0) / max(total1 - total0, 1), 1)

    def summary(self) -> dict[str, Any]:
        return {
            "max_rss_mb": round(self.max_rss_kb / 1024, 1),
            "server_process_cpu_pct": self.process_cpu_pct,
            "server_core_busy_pct": self.core_busy_pct,
            # CPU time on the server's core not used by the server: other processes (noise).
            "other_on_server_core_pct": round(
                max(0.0, self.core_busy_pct - self.process_cpu_pct), 1
            ),
        }


# -- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv


class Server:
    """A server process we started (stopped by its own pid, SIGTERM then SIGKILL)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        workdir: Path,
        cpu: int | None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.port, self.workdir = name, port, workdir
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            pinned(cpu, argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, **(env or {})},
        )
        self.pid = self.proc.pid

    def wait_listening(self, timeout: float = 30.0, ready_path: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}: "
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            try:
                if ready_path:
                    url = f"http://127.0.0.1:{self.port}{ready_path}"
                    with urllib.request.urlopen(url, timeout=1) as r:
                        if r.status == 200:
                            return
                else:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start listening within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def rss_mb(self, field_name: str = "VmRSS") -> float:
        return round(tree_kb(self.pid, field_name) / 1024, 1)

    def uses_uvloop(self) -> bool:
        try:
            return "uvloop" in Path(f"/proc/{self.pid}/maps").read_text()
        except OSError:
            return False


ROUTER_CONFIG = """\
# webhook-router benchmark configuration (written by bench/run.py)
server:
  listen: ["127.0.0.1:{port}"]
  path: /webhook
  max_body_bytes: {max_body}     # above 256 MiB, for the large-body phase
auth:
  accept: [signature]            # x-metriport-signature: HMAC-SHA256 over every body
  keys:
    - env: BENCH_WEBHOOK_KEY
journal:
  path: ./journal                # SQLite WAL, synchronous=FULL, group commit before each 200
routes:
  - match: "*"
    to: [archive]
sinks:
  archive:
    type: file
    path: ./out/messages.jsonl   # envelope lines, fsync per batch (the default)
"""


@dataclass
class Router:
    server: Server
    sink: Path


def start_router(name: str, opts: Options) -> Router:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=opts.tmp))
    port = free_port()
    config = workdir / "config.yaml"
    config.write_text(ROUTER_CONFIG.format(port=port, max_body=300 * MIB))
    server = Server(
        name,
        [str(VENV_BIN / "webhook-router"), "serve", "--config", str(config)],
        port,
        workdir,
        opts.server_cpu,
        env={"BENCH_WEBHOOK_KEY": KEY},
    )
    server.wait_listening(ready_path="/readyz")
    return Router(server, workdir / "out" / "messages.jsonl")


def start_floor(opts: Options, loop: str) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix="floor-", dir=opts.tmp))
    port = free_port()
    argv = [sys.executable, str(BENCH / "floor_app.py"), "--bind", f"127.0.0.1:{port}"]
    server = Server("floor", [*argv, "--loop", loop], port, workdir, opts.server_cpu)
    server.wait_listening()
    return server


def start_peer(opts: Options) -> tuple[Server, Path]:
    workdir = Path(tempfile.mkdtemp(prefix="peer-", dir=opts.tmp))
    out = workdir / "peer-out.jsonl"
    script = workdir / "append.sh"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$1\" >> {out}\n")
    script.chmod(0o755)
    hooks = [
        {
            "id": "metriport",
            "execute-command": str(script),
            "command-working-directory": str(workdir),
            "http-methods": ["POST"],
            "pass-arguments-to-command": [{"source": "entire-payload"}],
            # Answer after the command ran (the payload is in the file), as the router answers
            # after the journal commit; without it webhook answers first and runs it later.
            "include-command-output-in-response": True,
            "trigger-rule-mismatch-http-response-code": 401,
            "trigger-rule": {
                "match": {
                    "type": "value",
                    "value": KEY,
                    "parameter": {"source": "header", "name": "x-webhook-key"},
                }
            },
        }
    ]
    (workdir / "hooks.json").write_text(json.dumps(hooks, indent=2))
    port = free_port()
    argv = ["webhook", "-hooks", str(workdir / "hooks.json"), "-ip", "127.0.0.1"]
    server = Server("peer", [*argv, "-port", str(port)], port, workdir, opts.server_cpu)
    server.wait_listening()
    return server, out


# -- metrics ----------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except (OSError, urllib.error.URLError):
        return []
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return out


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(
        v
        for n, lab, v in samples
        if n == name and all(lab.get(k) == want for k, want in labels.items())
    )


def buckets(samples: list[tuple[str, dict[str, str], float]], name: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for n, lab, v in samples:
        if n == name + "_bucket":
            le = float(lab["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def histogram_quantile(
    before: dict[float, float], after: dict[float, float], q: float
) -> float | None:
    """Prometheus-style quantile (linear within the bucket) of the observations between two
    scrapes; None when there are none. Above the last finite bucket: that bucket's bound."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            width = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / width if width else 1)
        prev_bound, prev_count = bound, count
    return None


def delivered_and_accepted(port: int) -> tuple[float, float]:
    s = scrape(port)
    return (
        metric_sum(s, "webhook_router_deliveries_total", outcome="delivered"),
        metric_sum(s, "webhook_router_messages_accepted_total"),
    )


def wait_drained(router: Router, timeout: float = 180.0) -> float | None:
    """Wait until every accepted message is delivered (metrics); the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        delivered, accepted = delivered_and_accepted(router.server.port)
        if accepted and delivered >= accepted:
            return round(time.monotonic() - t0, 3)
        time.sleep(0.05)
    log(f"warning: {router.server.name}: backlog not delivered within {timeout} s")
    return None


# -- the sink file watcher ------------------------------------------------------------------

_RECEIVED = re.compile(rb'"receivedAt":"([^"]+)"')


class SinkWatcher:
    """Follows the sink file (every 2 ms): counts lines, notes when a count was reached, and
    the lag of each line = the time it became visible - its envelope ``receivedAt``."""

    def __init__(self, path: Path, target: int | None = None) -> None:
        self.path, self.target = path, target
        self.offset = path.stat().st_size if path.exists() else 0
        self.lines = 0
        self.lags: list[float] = []
        self.reached_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pending = b""
        f = None
        try:
            while not self._stop.is_set():
                if f is None:
                    if not self.path.exists():
                        time.sleep(0.002)
                        continue
                    f = self.path.open("rb")
                    f.seek(self.offset)
                data = f.read()
                if data:
                    now = time.time()
                    pending += data
                    *complete, pending = pending.split(b"\n")
                    for line in complete:
                        self.lines += 1
                        m = _RECEIVED.search(line, 0, 400)
                        if m:
                            received = dt.datetime.fromisoformat(m[1].decode()).timestamp()
                            self.lags.append(now - received)
                    if self.target and self.reached_at is None and self.lines >= self.target:
                        self.reached_at = now
                else:
                    time.sleep(0.002)
        finally:
            if f is not None:
                f.close()

    def __enter__(self) -> SinkWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def lag_ms(self) -> dict[str, float]:
        return percentiles_ms(self.lags)


def percentiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1] * 1000, 1)}


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
    profile: float
    skip_peer: bool
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
        f"-d{duration}s",
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


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["rps"] for r in runs]
    return {
        "rps_median": round(statistics.median(rates), 1) if rates else None,
        "rps_runs": rates,
        "runs": runs,
    }


def errors_of(result: dict[str, Any]) -> int:
    return int(sum(result["errors"].values()))


# -- phases ---------------------------------------------------------------------------------


def throughput_phase(opts: Options, results: dict[str, Any]) -> None:
    out: dict[str, Any] = results.setdefault("throughput", {})
    if not opts.wrk:
        out["skipped"] = "wrk is not installed (apt-get install -y wrk): no throughput figures"
        log(out["skipped"])
        return
    cycle_pool = payloads.write_pool(opts.tmp / "cycle-pool.txt", 20_000, KEY.encode())
    results["body_bytes_mean"] = round(cycle_pool.mean_body_bytes)

    log("router (throughput instance): starting")
    router = start_router("router", opts)
    try:
        time.sleep(1.0)
        loop = opts.floor_loop
        uvloop = router.server.uses_uvloop()
        if loop == "auto":
            loop = "uvloop" if uvloop else "asyncio"
        out["router_loop"] = "uvloop" if uvloop else "asyncio"
        out["floor_loop"] = loop
        results.setdefault("memory", {})["rss_idle_mb"] = router.server.rss_mb()

        log(f"floor: hypercorn {loop} bare app")
        floor = start_floor(opts, loop)
        try:
            url = f"http://127.0.0.1:{floor.port}/webhook"
            run_wrk(url, cycle_pool.path, "cycle", opts, opts.warmup)
            runs = []
            for i in range(opts.runs):
                with Sampler(floor.pid, opts.server_cpu) as sampler:
                    r = run_wrk(url, cycle_pool.path, "cycle", opts, opts.duration)
                r.update(sampler.summary(), loadavg=os.getloadavg()[0])
                runs.append(r)
                log(f"  floor run {i + 1}: {r['rps']:,.0f} req/s, errors {errors_of(r)}")
            out["floor"] = summarize_runs(runs)
        finally:
            floor.stop()

        floor_rps = out["floor"]["rps_median"] or 5000
        rows = int(max(floor_rps, 3000) * opts.duration * 1.6) + 2000
        log(f"router: {opts.runs} runs, {rows:,} fresh signed requests each (unique ids)")
        url = f"http://127.0.0.1:{router.server.port}/webhook"
        warm = payloads.write_pool(opts.tmp / "router-warmup.txt", rows, KEY.encode())
        run_wrk(url, warm.path, "once", opts, opts.warmup)
        warm.path.unlink()
        wait_drained(router)
        runs = []
        max_rss = 0.0
        for i in range(opts.runs):
            pool = payloads.write_pool(opts.tmp / f"router-{i}.txt", rows, KEY.encode())
            dup0 = metric_sum(scrape(router.server.port), "webhook_router_duplicates_total")
            with Sampler(router.server.pid, opts.server_cpu) as sampler:
                r = run_wrk(url, pool.path, "once", opts, opts.duration)
            r.update(sampler.summary(), loadavg=os.getloadavg()[0])
            r["drain_after_load_s"] = wait_drained(router)
            dup1 = metric_sum(scrape(router.server.port), "webhook_router_duplicates_total")
            r["duplicates"] = int(dup1 - dup0)
            if r["wraps"]:
                log(f"  warning: the pool ran out ({r['wraps']} wraps): ids repeated")
            max_rss = max(max_rss, sampler.max_rss_kb / 1024)
            pool.path.unlink()
            runs.append(r)
            log(
                f"  router run {i + 1}: {r['rps']:,.0f} req/s, errors {errors_of(r)}, "
                f"backlog delivered {r['drain_after_load_s']} s after the load stopped"
            )
        out["router"] = summarize_runs(runs)
        mem = results["memory"]
        mem["rss_load_max_mb"] = round(max_rss, 1)
        mem["vmhwm_after_load_mb"] = router.server.rss_mb("VmHWM")
        time.sleep(2.0)
        mem["rss_after_load_idle_mb"] = router.server.rss_mb()
    finally:
        router.server.stop()

    if opts.skip_peer:
        out["peer"] = {"skipped": "--skip-peer"}
    elif not shutil.which("webhook"):
        out["peer"] = {"skipped": "adnanh/webhook is not installed (apt-get install -y webhook)"}
        log(out["peer"]["skipped"])
    else:
        log("peer: adnanh/webhook, key header check, appends the payload to a file")
        peer, peer_out = start_peer(opts)
        try:
            url = f"http://127.0.0.1:{peer.port}/hooks/metriport"
            run_wrk(url, cycle_pool.path, "cycle", opts, opts.warmup, KEY)
            runs = []
            for i in range(opts.runs):
                with Sampler(peer.pid, opts.server_cpu) as sampler:
                    r = run_wrk(url, cycle_pool.path, "cycle", opts, opts.duration, KEY)
                r.update(sampler.summary(), loadavg=os.getloadavg()[0])
                runs.append(r)
                log(f"  peer run {i + 1}: {r['rps']:,.0f} req/s, errors {errors_of(r)}")
            out["peer"] = summarize_runs(runs)
            with peer_out.open("rb") as f:
                out["peer"]["lines_written"] = sum(chunk.count(b"\n") for chunk in iter_chunks(f))
        finally:
            peer.stop()

    r_rps, f_rps = out["router"]["rps_median"], out["floor"]["rps_median"]
    out["router_vs_floor"] = round(r_rps / f_rps, 3) if f_rps else None
    p_rps = out["peer"].get("rps_median")
    out["router_vs_peer"] = round(r_rps / p_rps, 2) if p_rps else None


def iter_chunks(f: Any) -> Iterator[bytes]:
    while chunk := f.read(MIB):
        yield chunk


def latency_phase(opts: Options, results: dict[str, Any]) -> None:
    out: dict[str, Any] = results.setdefault("latency", {})
    log("router (latency instance): starting")
    router = start_router("router-latency", opts)
    port = router.server.port
    url = f"http://127.0.0.1:{port}/webhook"
    try:
        time.sleep(1.0)
        # End-to-end: N messages as fast as the router takes them (closed loop).
        n = opts.e2e_count
        pool = payloads.write_pool(opts.tmp / "e2e.txt", n, KEY.encode())
        log(f"end-to-end: {n:,} messages, closed loop over {opts.connections} connections")
        before = buckets(scrape(port), "webhook_router_delivery_seconds")
        with (
            SinkWatcher(router.sink, target=n) as watcher,
            Sampler(router.server.pid, opts.server_cpu) as sampler,
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
            Sampler(router.server.pid, opts.server_cpu) as sampler,
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
        proc = run_fixed_rate(url, ping_pool.path, opts, rate=rate, duration=secs)
        ping = fixed_rate_result(proc, ping_pool.path, timeout=secs + 300)
        out["ping"] = {
            "rate": rate,
            "answered": ping["statuses"],
            "achieved_rate": ping["achieved_rate"],
            "latency_ms": ping["latency_ms"],
        }
        results["memory"]["vmhwm_latency_instance_mb"] = router.server.rss_mb("VmHWM")
    finally:
        router.server.stop()


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


def post_file(port: int, path: Path, size: int, signature: str, timeout: float) -> int:
    """POST a file as the body (streamed with sendfile); the answer's status."""
    head = (
        f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: Metriport API\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n"
        f"x-metriport-signature: {signature}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        with path.open("rb") as f, contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendfile(f)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def large_phase(opts: Options, results: dict[str, Any]) -> None:
    out: dict[str, Any] = results.setdefault("large_bodies", {})
    bodies = []
    for i, mib in enumerate(opts.large_sizes):
        path = opts.tmp / f"consolidated-{mib}MiB.json"
        size, signature = payloads.write_large_body(path, mib * MIB, KEY.encode(), tag=1000 + i)
        bodies.append((mib, path, size, signature))
    log(f"large bodies: generated {', '.join(f'{m} MiB' for m, *_ in bodies)}")
    router = start_router("router-large", opts)
    port = router.server.port
    try:
        time.sleep(1.0)
        out["rss_idle_mb"] = router.server.rss_mb()
        for mib, path, size, signature in bodies:
            delivered0, _ = delivered_and_accepted(port)
            peak_reset = clear_peak_rss(router.server.pid)
            rss0 = router.server.rss_mb()
            t0 = time.monotonic()
            with Sampler(router.server.pid, opts.server_cpu) as sampler:
                status = post_file(port, path, size, signature, timeout=600)
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
                "time_to_200_s": round(t_200, 2),
                "time_to_delivered_s": round(t_delivered, 2) if t_delivered else None,
                "rss_before_mb": rss0,
                "peak_rss_mb": round(peak, 1),
                "peak_rss_growth_mb": round(peak - rss0, 1),
                "peak_rss_growth_until_200_mb": round(hwm_at_200 - rss0, 1) if peak_reset else None,
                "peak_measured_by": "VmHWM after clear_refs" if peak_reset else "VmRSS sampling",
                "rss_after_mb": router.server.rss_mb(),
            }
            out[f"{mib}MiB"] = row
            log(
                f"  {mib} MiB: {status} after {row['time_to_200_s']} s, delivered after "
                f"{row['time_to_delivered_s']} s, peak RSS +{row['peak_rss_growth_mb']} MB"
            )
            path.unlink()
    finally:
        router.server.stop()


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
    for name in ("router", "floor"):
        if name == "router":
            router = start_router("router-profile", opts)
            server, wrk_pool_mode = router.server, "once"
            rows = int(6000 * (secs + 6))
        else:
            server, wrk_pool_mode, rows = start_floor(opts, "asyncio"), "cycle", 20_000
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
            subprocess.run(
                pinned(opts.load_cpu, [*argv, "-o", str(raw)]),
                capture_output=True,
                check=True,
                timeout=secs + 60,
            )
            load.join()
            out[name] = {
                "raw_stacks": str(raw.relative_to(ROOT)),
                "rps_under_profile": box.get("rps"),
                **pyspy_breakdown.breakdown(raw),
            }
            print(pyspy_breakdown.format_breakdown(out[name]))
        finally:
            server.stop()


# -- report -----------------------------------------------------------------------------------


def machine_info(opts: Options) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "server_cpu": opts.server_cpu,
        "load_cpu": opts.load_cpu,
        "pinning": (
            f"servers on CPU {opts.server_cpu}, load generators and this script on CPU "
            f"{opts.load_cpu} (taskset)"
            if opts.server_cpu is not None
            else "no pinning (one CPU)"
        ),
    }


def versions(opts: Options) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("webhook-router", "hypercorn", "h11", "anyio", "uvloop", "prometheus-client"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    for name, argv in (("wrk", [opts.wrk or "wrk", "-v"]), ("webhook", ["webhook", "-version"])):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            text = (proc.stdout + proc.stderr).strip().splitlines()
            out[name] = text[0] if text else None
        except OSError:
            out[name] = None
    git = shutil.which("git")
    with contextlib.suppress(OSError, subprocess.SubprocessError, TypeError):
        out["git_commit"] = subprocess.run(
            [git, "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        changed = subprocess.run(
            [git, "-C", str(ROOT), "status", "--porcelain", "--", "router", "plugins"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
        out["router_files_changed_since_commit"] = len(changed)
    return out


def verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "ok" if ok else "MISS"


def fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}{unit}"
    return str(value)


def report(results: dict[str, Any]) -> str:
    m, o = results["machine"], results["options"]
    lines = [
        "",
        f"webhook-router benchmark  {results['date']}  ({'quick' if o['quick'] else 'full'})",
        f"machine: {m['nproc']} x {m['cpu_model']}, {m['memory_gb']} GB; {m['pinning']}",
        f"load average at start {results['loadavg_start']}, at end {results['loadavg_end']}",
        f"router {results['versions'].get('webhook-router')} @ "
        f"{results['versions'].get('git_commit')}, hypercorn "
        f"{results['versions'].get('hypercorn')}, Python {results['versions']['python']}",
        "",
    ]
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, value: str, target: str = "", ok: str = "") -> None:
        rows.append((name, value, target, ok))

    t = results.get("throughput", {})
    if "skipped" in t:
        row("throughput", "skipped: " + t["skipped"])
    elif t:
        spec = f"{o['duration']:g} s x {o['runs']}, {o['connections']} conns, wrk -t{o['threads']}"
        row(f"throughput (req/s, median; {spec})", "")
        for name, label in (
            ("floor", f"floor: hypercorn {t.get('floor_loop')}, bare app"),
            ("router", f"router: HMAC + fsync'd journal + file sink ({t.get('router_loop')})"),
            ("peer", "peer: adnanh/webhook, key check + append"),
        ):
            r = t.get(name, {})
            if "skipped" in r:
                row("  " + label, "skipped: " + r["skipped"])
            elif r:
                runs = " / ".join(f"{x:,.0f}" for x in r["rps_runs"])
                row("  " + label, f"{r['rps_median']:,.0f}  ({runs})")
        rf, rp = t.get("router_vs_floor"), t.get("router_vs_peer")
        row("  router / floor", fmt(rf, digits=2), ">= 0.8", verdict(rf, TARGETS["router_vs_floor"], True))
        row("  router / peer", fmt(rp, digits=2), ">= 3", verdict(rp, TARGETS["router_vs_peer"], True))
    lat = results.get("latency", {})
    if lat:
        e = lat.get("e2e", {})
        row(f"end-to-end: {e.get('messages', 0):,} messages, closed loop", "")
        acks = fmt(e.get("acks_s"), " s", 2) + f"  ({fmt(e.get('ack_rate'))}/s)"
        row("  first POST -> last 200", acks)
        row("  first POST -> all in sink file", fmt(e.get("all_in_sink_s"), " s", 2))
        d = e.get("drain_after_last_ack_s")
        row("  last 200 -> all in sink file", fmt(d, " s", 2), "<= 2 s", verdict(d, TARGETS["e2e_drain_after_last_ack_s"], False))
        lag = e.get("delivery_lag_ms_sink_file", {})
        row(
            "  delivery lag p50 / p99 (sink file)",
            f"{fmt(lag.get('p50'), ' ms')} / {fmt(lag.get('p99'), ' ms')}",
        )
        h = lat.get("half_rate", {})
        row(f"at 50% of max rate: {h.get('rate', 0):,} msg/s, open loop", "")
        ack = h.get("ack_latency_ms", {})
        p99 = ack.get("p99")
        row(
            "  ack latency p50 / p99",
            f"{fmt(ack.get('p50'), ' ms', 1)} / {fmt(p99, ' ms', 1)}",
            "p99 <= 25 ms",
            verdict(p99, TARGETS["ack_p99_ms"], False),
        )
        lag = h.get("delivery_lag_ms_sink_file", {})
        p99 = lag.get("p99")
        row(
            "  delivery lag p50 / p99 (sink file)",
            f"{fmt(lag.get('p50'), ' ms')} / {fmt(p99, ' ms')}",
            "p99 <= 250 ms",
            verdict(p99, TARGETS["delivery_lag_p99_ms"], False),
        )
        row(
            "  delivery lag p99 (metrics histogram)",
            fmt(h.get("delivery_lag_p99_ms_histogram"), " ms"),
        )
        beside = h.get("ping_beside_latency_ms", {})
        row("  ping p99, 20/s beside that load", fmt(beside.get("p99"), " ms", 1))
        p = lat.get("ping", {})
        pl = p.get("latency_ms", {})
        row(
            f"ping alone at {p.get('rate', 0):,}/s: p50 / p99",
            f"{fmt(pl.get('p50'), ' ms', 1)} / {fmt(pl.get('p99'), ' ms', 1)}",
            "p99 <= 10 ms",
            verdict(pl.get("p99"), TARGETS["ping_p99_ms"], False),
        )
    mem = results.get("memory", {})
    if mem:
        row("memory (router, VmRSS)", "")
        v = mem.get("rss_idle_mb")
        row("  idle after start", fmt(v, " MB", 1), "<= 60 MB", verdict(v, TARGETS["rss_idle_mb"], False))
        loads = [mem.get(k) for k in ("rss_load_max_mb", "rss_e2e_max_mb", "rss_half_rate_max_mb")]
        v = max((x for x in loads if x is not None), default=None)
        row("  max under load (sampled)", fmt(v, " MB", 1), "<= 150 MB", verdict(v, TARGETS["rss_load_mb"], False))
        row("  idle after wrk load", fmt(mem.get("rss_after_load_idle_mb"), " MB", 1))
    big = results.get("large_bodies", {})
    if big:
        row("large consolidated-data bodies", "")
        for key, r in big.items():
            if not isinstance(r, dict):
                continue
            growth = r["peak_rss_growth_mb"]
            target = "<= 64 MB" if r["size_mib"] == 256 else ""
            ok = verdict(growth, TARGETS["large_rss_growth_mb"], False) if target else ""
            row(
                f"  {key}: status {r['status']}, 200 after / delivered after",
                f"{fmt(r['time_to_200_s'], ' s', 2)} / {fmt(r['time_to_delivered_s'], ' s', 2)}",
            )
            row(f"  {key}: peak RSS growth", fmt(growth, " MB", 1), target, ok)
    width = max(len(r[0]) for r in rows) + 2
    vwidth = max(len(r[1]) for r in rows) + 2
    for name, value, target, ok in rows:
        lines.append(f"{name:<{width}}{value:<{vwidth}}{target:<14}{ok}".rstrip())
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


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
    p.add_argument("--large", default=None, help="MiB sizes, comma-separated (16,64,256)")
    p.add_argument(
        "--phases",
        default="throughput,latency,large",
        help="which of throughput,latency,large to run (default: all)",
    )
    p.add_argument("--profile", type=float, default=0, help="also py-spy the router N seconds")
    p.add_argument("--skip-peer", action="store_true", help="do not run adnanh/webhook")
    p.add_argument("--server-cpu", type=int, help="CPU for servers (default: the last one)")
    p.add_argument("--load-cpu", type=int, help="CPU for load generators (default: CPU 0)")
    p.add_argument(
        "--floor-loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="the floor's event loop (auto: the one the router process has loaded)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    a = p.parse_args()
    ncpu = len(os.sched_getaffinity(0))
    server_cpu = a.server_cpu if a.server_cpu is not None else (max(os.sched_getaffinity(0)))
    load_cpu = a.load_cpu if a.load_cpu is not None else min(os.sched_getaffinity(0))
    if ncpu < 2:
        server_cpu = load_cpu = None
    quick = a.quick
    sizes = a.large or ("16" if quick else "16,64,256")
    return Options(
        duration=a.duration or (3.0 if quick else 10.0),
        connections=a.connections,
        threads=max(1, min(a.threads, a.connections)),
        runs=a.runs or (1 if quick else 3),
        warmup=1.0 if quick else 3.0,
        fixed_duration=a.fixed_duration or (5.0 if quick else 15.0),
        e2e_count=a.e2e_count or (5_000 if quick else 20_000),
        large_sizes=[int(x) for x in sizes.split(",") if x.strip()],
        profile=a.profile,
        skip_peer=a.skip_peer,
        phases={x.strip() for x in a.phases.split(",") if x.strip()},
        server_cpu=server_cpu,
        load_cpu=load_cpu,
        floor_loop=a.floor_loop,
        quick=quick,
        wrk=shutil.which("wrk"),
        keep_tmp=a.keep_tmp,
    )


def main() -> int:
    opts = parse_args()
    if opts.load_cpu is not None:
        os.sched_setaffinity(0, {opts.load_cpu})
    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    tmp = Path(tempfile.mkdtemp(prefix="webhook-router-bench-"))
    opts.tmp = tmp
    results: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_info(opts),
        "versions": versions(opts),
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
    if max(results["loadavg_start"][0], results["loadavg_end"][0]) > 0.5:
        results["notes"].append(
            "other processes were using the CPU (load average above 0.5): compare the ratios, "
            "and the server_core_busy_pct vs server_process_cpu_pct of each run in the JSON"
        )
    path = results_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    shutil.copyfile(path, results_dir / "latest.json")
    print(report(results))
    print(f"\nfull results: {path.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
