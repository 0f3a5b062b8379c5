"""What the router's own code costs per message, without the HTTP layer.

The benchmark's router/floor ratio mixes hypercorn's cost (the same in both) with ours. This
drives the router's ASGI app in-process, as hypercorn would call it, with the benchmark's
configuration (HMAC check, SQLite journal with group commit, a file sink, INFO logs to a file):
N signed ~1 KB messages from C concurrent callers, then waits until the sink has every one.
It prints the process CPU time (all threads: event loop, journal writer, sink thread) per
message, which is what the HTTP layer's cost per request is compared with.

    python bench/app_cost.py [-n 20000] [-c 32]
    valgrind --tool=callgrind --callgrind-out-file=cg.out python bench/app_cost.py -n 3000

Under callgrind the figure to compare is instructions (``callgrind_annotate cg.out | head``),
which is the same from run to run whatever else the machine is doing; CPU seconds move with
the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from payloads import message_body, sign  # noqa: E402
from servers import KEY, ROUTER_CONFIG  # noqa: E402

from router import app, logs  # noqa: E402
from router.config import load_config  # noqa: E402


def _loop_options() -> dict[str, bool]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


async def _drive(
    config_path: Path, n: int, concurrency: int, delivered: bool, out: dict[str, Any]
) -> None:
    config = load_config(config_path)
    bodies = [message_body(7, i) for i in range(n)]
    signed = [(sign(b, KEY.encode()).encode(), b) for b in bodies]
    stop = anyio.Event()
    ready = anyio.Event()
    daemon: list[app.Daemon] = []

    def on_ready(_listening: list[str], d: app.Daemon) -> None:
        daemon.append(d)
        ready.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: app.serve(config, stop=stop, on_ready=on_ready))
        await ready.wait()
        ingress = daemon[0].ingress
        statuses: dict[int, int] = {}

        async def one(sig: bytes, body: bytes) -> None:
            scope = {
                "type": "http",
                "method": "POST",
                "path": "/webhook",
                "headers": [
                    (b"host", b"127.0.0.1"),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-metriport-signature", sig),
                ],
            }
            # As hypercorn does: its receive is the get of a queue it fills from the socket.
            queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            queue.put_nowait({"type": "http.request", "body": body, "more_body": True})
            queue.put_nowait({"type": "http.request", "body": b"", "more_body": False})

            async def send(event: dict[str, Any]) -> None:
                if event["type"] == "http.response.start":
                    statuses[event["status"]] = statuses.get(event["status"], 0) + 1

            await ingress(scope, queue.get, send)

        async def caller(k: int) -> None:
            for i in range(k, n, concurrency):
                await one(*signed[i])

        sink = config_path.parent / "out" / "messages.jsonl"
        _callgrind(out, "-z")  # under callgrind: count from here
        threads0, kernel0 = _thread_cpu(), _thread_cpu(kernel=True)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        async with anyio.create_task_group() as callers:
            for k in range(concurrency):
                callers.start_soon(caller, k)
        acked = time.perf_counter()
        while delivered and _lines(sink) < n:  # noqa: ASYNC110 (polling a file another thread writes)
            await anyio.sleep(0.005)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        threads1, kernel1 = _thread_cpu(), _thread_cpu(kernel=True)
        _callgrind(out, "-d")  # … to here
        stop.set()
    out.pop("callgrind", None)
    out.update(
        messages=n,
        statuses=statuses,
        cpu_us_per_message=round((cpu1 - cpu0) / n * 1e6, 1),
        by_thread_us_per_message={
            name: round((t - threads0.get(name, 0.0)) / n * 1e6, 1)
            for name, t in sorted(threads1.items(), key=lambda kv: -kv[1])
            if t - threads0.get(name, 0.0) > 0
        },
        of_which_kernel_us={
            name: round((t - kernel0.get(name, 0.0)) / n * 1e6, 1)
            for name, t in sorted(kernel1.items(), key=lambda kv: -kv[1])
            if t - kernel0.get(name, 0.0) > 0
        },
        wall_s_to_last_ack=round(acked - wall0, 3),
        wall_s_to_all_delivered=round(wall1 - wall0, 3),
    )


def _callgrind(out: dict[str, Any], option: str) -> None:
    """Under ``--callgrind``: zero (``-z``) or dump (``-d``) this process's counts."""
    if out.get("callgrind"):
        subprocess.run(
            [shutil.which("callgrind_control") or "callgrind_control", option, str(os.getpid())],
            check=True,
            capture_output=True,
        )


def _thread_cpu(kernel: bool = False) -> dict[str, float]:
    """CPU seconds per thread name (``/proc/self/task``), for where the time goes (``kernel``:
    only the time in system calls, such as fsync and writes)."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name.split(" (")[0] for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = names.get(int(task.name), "other")
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[12]) + (0 if kernel else int(fields[11]))
        out[name] = out.get(name, 0.0) + ticks / tick
    return out


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _under_callgrind(a: argparse.Namespace) -> None:
    """Run this script again under callgrind, counting the measured window only."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("--callgrind needs valgrind (Debian's valgrind package)")
    with tempfile.TemporaryDirectory(prefix="app-cost-cg-") as tmp:
        out = Path(tmp) / "callgrind.out"
        argv = [sys.argv[0], "-n", str(a.n), "-c", str(a.c), "--json", "--log-level", a.log_level]
        argv += ["--no-sink"] if a.no_sink else []
        env = {**os.environ, "APP_COST_CALLGRIND": "1"}
        valgrind = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--dump-instr=no",
        ]
        run = subprocess.run(
            [*valgrind, sys.executable, *argv], env=env, capture_output=True, text=True, check=True
        )
        result = json.loads(run.stdout.strip().splitlines()[-1])
        dumps = [p for p in sorted(Path(tmp).glob("callgrind.out.*"))]
        total = 0
        for line in dumps[-1].read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
        result["instructions_per_message"] = round(total / a.n)
        for key in ("cpu_us_per_message", "by_thread_us_per_message"):
            result.pop(key, None)  # under callgrind, meaningless
        for k, v in result.items():
            print(f"{k:28} {v}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20000, help="messages (default 20,000)")
    p.add_argument("-c", type=int, default=32, help="concurrent callers (default 32)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--log-level", default="INFO", help="the daemon's log level (INFO as shipped)")
    p.add_argument(
        "--no-sink", action="store_true", help="route to no sink (what accepting alone costs)"
    )
    p.add_argument(
        "--callgrind",
        action="store_true",
        help="run under callgrind and print instructions per message (the same from run to run)",
    )
    a = p.parse_args()
    if a.callgrind:
        _under_callgrind(a)
        return
    with tempfile.TemporaryDirectory(prefix="app-cost-") as tmp:
        work = Path(tmp)
        config = work / "config.yaml"
        text = ROUTER_CONFIG.format(port=0, max_body=300 << 20)
        if a.no_sink:
            text = text.replace('match: "*"', 'match: "no.such.type"')
        config.write_text(text)
        os.environ["BENCH_WEBHOOK_KEY"] = KEY
        os.chdir(work)
        log_file = (work / "router.log").open("w")
        sys.stderr, real_stderr = log_file, sys.stderr
        logs.setup(a.log_level, "plain")
        out: dict[str, Any] = {"callgrind": bool(os.environ.get("APP_COST_CALLGRIND"))}
        try:
            anyio.run(
                _drive,
                config,
                a.n,
                a.c,
                not a.no_sink,
                out,
                backend="asyncio",
                backend_options=_loop_options(),
            )
        finally:
            logging.shutdown()
            sys.stderr = real_stderr
        out["log_lines"] = sum(1 for _ in (work / "router.log").open())
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28} {v}")


if __name__ == "__main__":
    main()
