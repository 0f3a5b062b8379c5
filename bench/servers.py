"""The servers under test (floor, router, peer), started pinned to the server CPU and stopped
by their own pid; the router's /metrics; a follower of the router's sink file."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from procfs import tree_kb

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = Path(sys.executable).parent
KEY = "BENCH-not-a-secret-k1"  # 21 characters, like a Metriport webhook key
MIB = 1 << 20


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: The nice value for servers and load generators (``--nice``).
NICE = 0


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    """``argv`` on one CPU (``taskset``), at the ``--nice`` priority."""
    if NICE:
        argv = ["nice", "-n", str(NICE), *argv]
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

    def journal_mb(self) -> dict[str, float]:
        """Sizes of the journal's files (database, write-ahead log, ...) in MB."""
        folder = self.server.workdir / "journal"
        files = sorted(folder.iterdir()) if folder.exists() else []
        return {f.name: round(f.stat().st_size / MIB, 1) for f in files if f.is_file()}


#: The diagnostic "ingest only" router: the same, with no route to any sink and WARNING logs
#: (what the router does before its 200, without delivery and per-message log lines).
INGEST_ONLY_CONFIG = (
    ROUTER_CONFIG.replace('match: "*"', 'match: "no.such.type"')
    + "log:\n  level: warning                 # no per-message lines\n"
)


def start_router(name: str, tmp: Path, cpu: int | None, config_text: str = ROUTER_CONFIG) -> Router:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
    port = free_port()
    config = workdir / "config.yaml"
    config.write_text(config_text.format(port=port, max_body=300 * MIB))
    server = Server(
        name,
        [str(VENV_BIN / "webhook-router"), "serve", "--config", str(config)],
        port,
        workdir,
        cpu,
        env={"BENCH_WEBHOOK_KEY": KEY},
    )
    server.wait_listening(ready_path="/readyz")
    return Router(server, workdir / "out" / "messages.jsonl")


def start_floor(tmp: Path, cpu: int | None, loop: str) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix="floor-", dir=tmp))
    port = free_port()
    argv = [sys.executable, str(BENCH / "floor_app.py"), "--bind", f"127.0.0.1:{port}"]
    server = Server("floor", [*argv, "--loop", loop], port, workdir, cpu)
    server.wait_listening()
    return server


def start_peer(tmp: Path, cpu: int | None) -> tuple[Server, Path]:
    workdir = Path(tempfile.mkdtemp(prefix="peer-", dir=tmp))
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
    server = Server("peer", [*argv, "-port", str(port)], port, workdir, cpu)
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
