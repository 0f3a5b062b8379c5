"""Instructions per request, floor and router, under callgrind: a figure that does not move.

The throughput benchmark's router/floor ratio is a ratio of two rates measured one after the
other, and on a shared virtual machine the speed of a core drifts by a fifth within a minute.
Instructions executed do not drift: this runs the floor (bare hypercorn) and the router (the
benchmark's configuration) under ``valgrind --tool=callgrind``, sends each the same N signed
~1 KB requests over loopback from C keep-alive connections after a warm-up, waits (router)
until the sink has every message, and reads the instructions counted in between (all threads;
user space only: the kernel's work, such as fsync, is not counted).

    python bench/instructions.py [-n 3000] [-c 32]

About two minutes per server (Python under callgrind runs some 50 times slower).
floor/router in instructions is the per-core efficiency without the kernel's share.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import payloads  # noqa: E402
from servers import KEY, MIB, ROUTER_CONFIG, Server, free_port  # noqa: E402


def _request(port: int, signature: str, body: bytes) -> bytes:
    head = (
        f"POST /webhook HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-metriport-signature: {signature}\r\n\r\n"
    )
    return head.encode() + body


def _exchange(sock: socket.socket, request: bytes, buf: bytearray) -> int:
    """Send one request, read its whole response; return the status."""
    sock.sendall(request)
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    length = int(m.group(1)) if (m := re.search(rb"(?i)content-length: *(\d+)", head)) else 0
    while len(buf) < end + length:
        buf += sock.recv(65536)
    del buf[: end + length]
    return int(head.split(b" ", 2)[1])


def _send_all(port: int, requests: list[bytes], connections: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def worker(k: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            buf = bytearray()
            for i in range(k, len(requests), connections):
                status = _exchange(sock, requests[i], buf)
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _measure(name: str, n: int, connections: int, tmp: Path, tag: int) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
    port = free_port()
    out = workdir / "callgrind.out"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"]
    if name == "router":
        config = workdir / "config.yaml"
        config.write_text(ROUTER_CONFIG.format(port=port, max_body=300 * MIB))
        argv = [sys.executable, "-m", "router", "serve", "--config", str(config)]
        env = {"BENCH_WEBHOOK_KEY": KEY}
    else:
        argv = [sys.executable, str(BENCH / "floor_app.py"), "--bind", f"127.0.0.1:{port}"]
        argv += ["--loop", "uvloop"]
        env = {}
    server = Server(name, [*valgrind, *argv], port, workdir, None, env=env)
    try:
        server.wait_listening(timeout=600)
        rows = [
            (payloads.sign(body, KEY.encode()), body)
            for body in (payloads.message_body(tag, i) for i in range(n + 200))
        ]
        requests = [_request(port, sig, body) for sig, body in rows]
        warm = _send_all(port, requests[:200], connections)
        sink = workdir / "out" / "messages.jsonl"
        while name == "router" and _lines(sink) < 200:
            time.sleep(0.2)
        _control("-z", server.pid)  # count from here
        started = time.monotonic()
        statuses = _send_all(port, requests[200:], connections)
        while name == "router" and _lines(sink) < n + 200:
            time.sleep(0.2)
        _control("-d", server.pid)  # dump what was counted
        seconds = time.monotonic() - started
    finally:
        server.stop()
    dumps = sorted(workdir.glob("callgrind.out*"))
    # The dump asked for with -d after -z holds exactly the measured window.
    totals = [_total(p) for p in dumps if p.name != "callgrind.out"]
    instructions = totals[-1] if totals else _total(out)
    return {
        "requests": n,
        "statuses": statuses,
        "warmup_statuses": warm,
        "instructions": instructions,
        "instructions_per_request": round(instructions / n),
        "seconds_under_callgrind": round(seconds, 1),
    }


def _control(option: str, pid: int) -> None:
    tool = shutil.which("callgrind_control")
    if tool is None:
        raise SystemExit("needs callgrind_control (valgrind, from Debian's packages)")
    subprocess.run([tool, option, str(pid)], check=True, capture_output=True)


def _total(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=3000, help="measured requests per server (3,000)")
    p.add_argument("-c", type=int, default=32, help="connections (32)")
    p.add_argument("--only", choices=["floor", "router"], help="measure one server only")
    a = p.parse_args()
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="instructions-") as tmp:
        for tag, name in enumerate(["floor", "router"]):
            if a.only in (None, name):
                results[name] = _measure(name, a.n, a.c, Path(tmp), 900 + tag)
                print(name, json.dumps(results[name]), flush=True)
    if len(results) == 2:
        floor = results["floor"]["instructions_per_request"]
        router = results["router"]["instructions_per_request"]
        assert isinstance(floor, int) and isinstance(router, int)
        print(f"floor / router (instructions per request): {floor / router:.3f}")


if __name__ == "__main__":
    main()
