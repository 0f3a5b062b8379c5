"""Where the router's CPU time goes: a py-spy ``--format raw`` profile, bucketed.

py-spy samples only threads that are running (not those waiting in epoll, on a lock or in
fsync), so the shares below are shares of the CPU the process used, across all its threads.
Each sampled stack goes to one bucket: the first rule that holds, in this order:

1. logging           a ``logging`` frame anywhere in the stack (``log.info("accepted")``, …)
2. metrics           ``prometheus_client`` or ``router/metrics.py``
3. HMAC / auth       ``router/auth.py`` or ``hmac.py``
4. JSON parse        ``router/parse.py`` (decode, ``json.loads``, meta checks, order key)
5. plugin hooks      ``pluggy`` or ``router/plugins.py`` (``router_message_received`` …)
6. journal           ``router/journal.py`` or ``sqlite3`` (writer thread, reads, job plumbing)
7. dispatcher+sink   ``router/dispatcher.py``, ``router/sink.py`` or ``plugins/``
8. otherwise by the innermost library frame: ``h11`` (HTTP parsing and serialising),
   ``hypercorn`` (protocol, ASGI glue, task per request), ``router/ingress.py`` (the app's own
   code), ``anyio``, the event loop (asyncio's, or uvloop's C loop, which shows as
   ``asyncio/runners.py``: transports, sockets, callbacks), threads, other.

    python bench/pyspy_breakdown.py profile.raw [--json]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path

_THREAD = re.compile(r"^thread \((0x[0-9a-fA-F]+|\d+)\): ?(.*)$")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

ORDERED_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("logging", ("logging/", "router/logs.py")),
    ("metrics (prometheus_client)", ("prometheus_client/", "router/metrics.py")),
    ("HMAC / auth", ("router/auth.py", "hmac.py")),
    ("JSON parse (router/parse.py)", ("router/parse.py",)),
    ("plugin hooks (pluggy)", ("pluggy/", "router/plugins.py")),
    ("journal (SQLite, writer thread, reads)", ("router/journal/", "sqlite3/")),
    ("dispatcher + file sink", ("router/dispatcher.py", "router/sink.py", "plugins/")),
]
LEAF_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("HTTP: h11 parse/serialise", ("h11/",)),
    ("HTTP: hypercorn protocol + ASGI", ("hypercorn/",)),
    ("ingress (app code)", ("router/ingress.py",)),
    ("anyio", ("anyio/",)),
    # With uvloop the loop's own C code (sockets, callbacks) shows as asyncio's Runner.run.
    ("event loop (asyncio/uvloop) + sockets", ("asyncio/", "selectors.py", "socket.py", "uvloop/")),
    ("threads / queues", ("threading.py", "queue.py", "concurrent/")),
]


def parse_line(line: str) -> tuple[int, str, list[tuple[str, str]], int] | None:
    """(thread id, thread name, frames root first as (function, file), sample count)."""
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
        return None
    frames = stack.split(";")
    tid, thread = 0, ""
    if frames:
        m = _THREAD.match(frames[0])
        if m:
            tid, thread = int(m[1], 0), re.sub(r"\d+$", "N", m[2].strip()) or "?"
            frames = frames[1:]
    parsed = []
    for frame in frames:
        m = _FRAME.match(frame)
        parsed.append((m["func"], m["file"]) if m else (frame, ""))
    return tid, thread, parsed, int(count)


def thread_names(raw: Path) -> dict[int, str]:
    """Thread id -> Python thread name, from the ``thread (TID): NAME`` frames."""
    names = {}
    for line in raw.read_text().splitlines():
        parsed = parse_line(line)
        if parsed is not None:
            names[parsed[0]] = parsed[1]
    return names


def bucket(frames: list[tuple[str, str]]) -> str:
    files = [f for _, f in frames]
    for name, markers in ORDERED_RULES:
        if any(marker in f for f in files for marker in markers):
            return name
    for _, f in reversed(frames):
        for name, markers in LEAF_RULES:
            if any(marker in f for marker in markers):
                return name
    return "other"


def breakdown(
    raw: Path, thread_cpu: dict[int, float] | None = None, top: int = 15
) -> dict[str, object]:
    """Bucket shares (%) of the samples; with ``thread_cpu`` (CPU seconds each thread used
    while sampling, from /proc) also weighted by each thread's real CPU use: py-spy counts a
    thread blocked in some system calls (the journal writer in fsync) as running, which
    over-weights it in the raw sample shares."""
    per_thread: dict[int, Counter[str]] = {}
    names: dict[int, str] = {}
    leaves: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        parsed = parse_line(line)
        if parsed is None:
            continue
        tid, thread, frames, count = parsed
        names[tid] = thread
        per_thread.setdefault(tid, Counter())[bucket(frames)] += count
        if frames:
            func, file = frames[-1]
            leaves[f"{func} ({file})"] += count
    total = sum(sum(c.values()) for c in per_thread.values())
    samples: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for tid, counts in per_thread.items():
        samples.update(counts)
        threads[names[tid]] += sum(counts.values())

    def pct(counter: Mapping[str, float], n: int | None = None) -> dict[str, float]:
        whole = sum(counter.values())
        ranked = sorted(counter.items(), key=lambda kv: -kv[1])[:n]
        return {k: round(100 * v / whole, 1) for k, v in ranked} if whole else {}

    result: dict[str, object] = {
        "samples": total,
        "buckets_pct": pct(samples),
        "threads_pct": pct(threads),
        "top_leaf_functions_pct": pct(leaves, top),
    }
    if thread_cpu:
        weighted: dict[str, float] = defaultdict(float)
        cpu_by_name: dict[str, float] = defaultdict(float)
        for tid, counts in per_thread.items():
            cpu = thread_cpu.get(tid, 0.0)
            cpu_by_name[names[tid]] += cpu
            n = sum(counts.values())
            for name, c in counts.items():
                weighted[name] += cpu * c / n
        result["buckets_pct_cpu_weighted"] = pct(weighted)
        result["threads_pct_cpu"] = pct(cpu_by_name)
    return result


def format_breakdown(result: dict[str, object]) -> str:
    lines = [f"py-spy samples: {result['samples']} (running threads only)"]
    for title, key in (
        (
            "where the CPU goes (samples weighted by each thread's CPU from /proc)",
            "buckets_pct_cpu_weighted",
        ),
        ("by thread (CPU from /proc)", "threads_pct_cpu"),
        ("where the samples fall (py-spy's own view)", "buckets_pct"),
        ("samples by thread", "threads_pct"),
        ("top leaf functions (self time, % of samples)", "top_leaf_functions_pct"),
    ):
        if key not in result:
            continue
        lines.append(f"  {title}:")
        values = result[key]
        assert isinstance(values, dict)
        for name, share in values.items():
            lines.append(f"    {share:5.1f}%  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    result = breakdown(args.raw)
    print(json.dumps(result, indent=2) if args.json else format_breakdown(result))


if __name__ == "__main__":
    main()
