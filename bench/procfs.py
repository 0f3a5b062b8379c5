"""What the benchmark reads from /proc: memory and CPU of a process tree, per-thread CPU,
busy time of one CPU, CPU used by everyone else, and the filesystem under a path."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any


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


def _own_ticks() -> dict[tuple[int, str], int]:
    """utime + stime of every user-space process, keyed by (pid, start time)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == "2" or entry == "2":  # kernel threads (children of kthreadd)
            continue
        out[(int(entry), fields[19])] = int(fields[11]) + int(fields[12])
    return out


def foreign_cpu_pct(before: dict[tuple[int, str], int], wall: float) -> float:
    """CPU (% of one core) used since ``before`` by processes outside this benchmark's process
    tree: other people's tests, builds... Processes that started and ended in between are
    missed; kernel threads (which also do our own fsyncs) are left out."""
    ours = set(process_tree(os.getpid()))
    ticks = sum(now - before.get(key, 0) for key, now in _own_ticks().items() if key[0] not in ours)
    return round(100 * ticks / os.sysconf("SC_CLK_TCK") / wall, 1)


def _tree_cpu(root: int, exclude: int) -> dict[tuple[int, str], float]:
    """CPU seconds (with reaped children) of each process under ``root`` that is not under
    ``exclude``, keyed by (pid, start time)."""
    skip = set(process_tree(exclude))
    out = {}
    for pid in process_tree(root):
        if pid in skip:
            continue
        with contextlib.suppress(OSError, IndexError):
            start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
            out[(pid, start)] = cpu_seconds(pid)
    return out


class Sampler:
    """While active: the largest RSS of a server's process tree (every 50 ms), its CPU use, how
    busy the server's CPU was (did something else run there?), and how busy the load
    generator's CPU was beside the benchmark's own processes (was the load generator starved?)."""

    def __init__(self, pid: int, cpu: int | None, load_cpu: int | None = None) -> None:
        self.pid, self.cpu, self.load_cpu = pid, cpu, load_cpu
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
        self._load0 = core_times(self.load_cpu)
        self._ours0 = _tree_cpu(os.getpid(), self.pid)
        self._procs0 = _own_ticks()
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
        lbusy0, ltotal0 = self._load0
        lbusy1, ltotal1 = core_times(self.load_cpu)
        self.load_core_busy_pct = round(100 * (lbusy1 - lbusy0) / max(ltotal1 - ltotal0, 1), 1)
        ours = sum(
            now - self._ours0.get(key, 0.0) for key, now in _tree_cpu(os.getpid(), self.pid).items()
        )
        self.load_cpu_ours_pct = round(100 * ours / wall, 1)
        self.foreign_cpu_pct = foreign_cpu_pct(self._procs0, wall)
        self.loadavg = round(os.getloadavg()[0], 2)

    def summary(self) -> dict[str, Any]:
        return {
            "max_rss_mb": round(self.max_rss_kb / 1024, 1),
            "server_process_cpu_pct": self.process_cpu_pct,
            "server_core_busy_pct": self.core_busy_pct,
            # Busy time on the server's core not charged to the server: other processes, and
            # kernel work done for the server (fsync in jbd2/kworkers, loopback softirqs).
            "server_core_not_server_pct": round(
                max(0.0, self.core_busy_pct - self.process_cpu_pct), 1
            ),
            # The load generator's core: the benchmark's own processes (wrk, clients, this
            # script) and what else ran there.
            "load_core_busy_pct": self.load_core_busy_pct,
            "load_generator_cpu_pct": self.load_cpu_ours_pct,
            "load_core_not_ours_pct": round(
                max(0.0, self.load_core_busy_pct - self.load_cpu_ours_pct), 1
            ),
            "other_processes_cpu_pct": self.foreign_cpu_pct,
            "loadavg_1m": self.loadavg,
        }


def task_ticks(pid: int) -> dict[int, int]:
    """utime + stime of each thread of a process, by thread id."""
    out = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def filesystem_of(path: Path) -> str:
    """The type and device of the filesystem holding ``path`` (fsync on tmpfs is free)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            inside = str(path).startswith(mount.rstrip("/") + "/") or str(path) == mount
            if inside and len(mount) >= len(best):
                best, kind = mount, f"{fstype} ({device} on {mount})"
    return kind
