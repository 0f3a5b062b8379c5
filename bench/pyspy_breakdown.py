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
   code), ``anyio``, ``asyncio`` (event loop, transports, sockets), threads, other.

    python bench/pyspy_breakdown.py profile.raw [--json]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

ORDERED_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("logging", ("logging/", "router/logs.py")),
    ("metrics (prometheus_client)", ("prometheus_client/", "router/metrics.py")),
    ("HMAC / auth", ("router/auth.py", "hmac.py")),
    ("JSON parse (router/parse.py)", ("router/parse.py",)),
    ("plugin hooks (pluggy)", ("pluggy/", "router/plugins.py")),
    ("journal (SQLite, writer thread, reads)", ("router/journal.py", "sqlite3/")),
    ("dispatcher + file sink", ("router/dispatcher.py", "router/sink.py", "plugins/")),
]
LEAF_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("HTTP: h11 parse/serialise", ("h11/",)),
    ("HTTP: hypercorn protocol + ASGI", ("hypercorn/",)),
    ("ingress (app code)", ("router/ingress.py",)),
    ("anyio", ("anyio/",)),
    ("asyncio loop + sockets", ("asyncio/", "selectors.py", "socket.py", "uvloop/")),
    ("threads / queues", ("threading.py", "queue.py", "concurrent/")),
]


def parse_line(line: str) -> tuple[str, list[tuple[str, str]], int] | None:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
        return None
    frames = stack.split(";")
    thread = ""
    if frames and frames[0].startswith("thread ("):
        thread = frames[0].split(": ", 1)[-1]
        frames = frames[1:]
    parsed = []
    for frame in frames:
        m = _FRAME.match(frame)
        parsed.append((m["func"], m["file"]) if m else (frame, ""))
    return thread, parsed, int(count)


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


def breakdown(raw: Path, top: int = 15) -> dict[str, object]:
    buckets: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        parsed = parse_line(line)
        if parsed is None:
            continue
        thread, frames, count = parsed
        total += count
        buckets[bucket(frames)] += count
        threads[re.sub(r"\d+$", "N", thread) or "?"] += count
        if frames:
            func, file = frames[-1]
            leaves[f"{func} ({file})"] += count

    def pct(counter: Counter[str], n: int | None = None) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in counter.most_common(n)} if total else {}

    return {
        "samples": total,
        "buckets_pct": pct(buckets),
        "threads_pct": pct(threads),
        "top_leaf_functions_pct": pct(leaves, top),
    }


def format_breakdown(result: dict[str, object]) -> str:
    lines = [f"py-spy samples: {result['samples']} (running threads only)"]
    for title, key in (
        ("where the CPU goes", "buckets_pct"),
        ("by thread", "threads_pct"),
        ("top leaf functions (self time)", "top_leaf_functions_pct"),
    ):
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
