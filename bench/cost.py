"""Where the microseconds go: CPU per request of the floor and the router, by thread, in user
space and in the kernel, with context switches and system calls per request.

The throughput phase's ratio compares requests per second, which moves with everything else on
the machine; ``make bench-instructions`` counts instructions, which leaves the kernel out. This
phase (``bench/run.py --phases cost``) measures what each request costs in CPU time as the
kernel accounts it (``/proc/PID/task/TID/stat``: utime and stime), thread by thread: the event
loop (the process's main thread), the journal's writer (``journal-writer``, named by the
router) and worker threads (the file sink's writes and fsyncs). With ``perf`` installed and
allowed (tracepoints: root, or ``kernel.perf_event_paranoid`` <= 1), it also counts system
calls per request by name, which is where the router's extra kernel time comes from.

Floor and router are measured in alternating rounds under the same wrk load as the throughput
phase (both pinned to the server CPU, the load generator to the other).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from statistics import median
from typing import Any

#: The system calls counted by name (the others are in the total).
SYSCALLS = [
    *("getpid", "futex", "read", "write", "pread64", "pwrite64", "fcntl", "fdatasync", "fsync"),
    *("epoll_pwait", "epoll_wait", "openat", "close", "newfstatat", "flock", "mprotect"),
    *("sendto", "recvfrom", "writev"),
]


def thread_times(pid: int) -> dict[int, tuple[str, int, int, int]]:
    """Each thread of ``pid``: (name, utime ticks, stime ticks, context switches)."""
    out = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir(f"/proc/{pid}/task"):
            tid = int(entry)
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
                # voluntary (it waited) and involuntary (preempted) switches
                switches = sum(int(ln.split()[1]) for ln in status if "ctxt_switches:" in ln)
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                out[tid] = (name, int(fields[11]), int(fields[12]), switches)
    return out


def role(pid: int, tid: int, name: str) -> str:
    if tid == pid:
        return "event loop"
    if name == "journal-writer":
        return "journal writer"
    return "worker threads"


def per_request(
    pid: int,
    before: dict[int, tuple[str, int, int, int]],
    after: dict[int, tuple[str, int, int, int]],
    requests: int,
) -> dict[str, dict[str, float]]:
    """µs of user and kernel CPU and context switches per request, by role."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, dict[str, float]] = {}
    for tid, (name, user, system, switches) in after.items():
        _, user0, system0, switches0 = before.get(tid, (name, 0, 0, 0))
        r = out.setdefault(role(pid, tid, name), {"user_us": 0.0, "kernel_us": 0.0, "ctxsw": 0.0})
        r["user_us"] += (user - user0) / hz * 1e6 / requests
        r["kernel_us"] += (system - system0) / hz * 1e6 / requests
        r["ctxsw"] += (switches - switches0) / requests
    for r in out.values():
        for k in r:
            r[k] = round(r[k], 2 if k == "ctxsw" else 1)
    return {k: v for k, v in out.items() if v["user_us"] + v["kernel_us"] > 0.05}


class Syscalls:
    """System calls of a process while active, by name, counted by ``perf stat`` on the
    kernel's tracepoints; ``counts`` stays None if perf is missing or not allowed."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.counts: Counter[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._out = Path(tempfile.mkstemp(prefix="perf-", suffix=".csv")[1])

    def __enter__(self) -> Syscalls:
        perf = shutil.which("perf")
        if perf is None:
            return self
        events = ["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{s}" for s in SYSCALLS)]
        argv = [perf, "stat", "-x,", "-o", str(self._out), "-e", ",".join(events)]
        self._proc = subprocess.Popen(
            [*argv, "-p", str(self.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        counts: Counter[str] = Counter()
        with contextlib.suppress(OSError):
            for line in self._out.read_text().splitlines():
                parts = line.split(",")
                if len(parts) > 2 and parts[0].strip().isdigit():
                    name = parts[2].removeprefix("syscalls:sys_enter_")
                    counts["all" if name == "raw_syscalls:sys_enter" else name] += int(parts[0])
        self._out.unlink(missing_ok=True)
        self.counts = counts if counts.get("all") else None


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of one server: µs per request by role, switches, syscalls."""

    roles = sorted({r for one in rounds for r in one["threads"]})
    threads = {
        r: {
            k: round(median([one["threads"].get(r, {}).get(k, 0.0) for one in rounds]), 2)
            for k in ("user_us", "kernel_us", "ctxsw")
        }
        for r in roles
    }
    out: dict[str, Any] = {
        "threads": threads,
        "cpu_us_per_request": round(median([one["cpu_us"] for one in rounds]), 1),
        "kernel_us_per_request": round(median([one["kernel_us"] for one in rounds]), 1),
        "rps": [one["rps"] for one in rounds],
    }
    counted = [one["syscalls"] for one in rounds if one.get("syscalls")]
    if counted:
        names = {n for c in counted for n in c}
        out["syscalls_per_request"] = {
            n: round(median([c.get(n, 0.0) for c in counted]), 2) for n in sorted(names)
        }
    return out
