"""A small open-loop HTTP load client: latency at a fixed request rate (wrk2 is not in Debian).

Sends the signed requests of a pool file (``payloads.write_pool``) over ``--connections``
keep-alive connections. With ``--rate R`` request *k* is due at ``start + k/R`` and goes out on
connection ``k mod C``; its latency is measured from the moment it was *due*, not from when it
could be sent, so a stall on the server counts for every request it delays (no coordinated
omission, as in wrk2). The time from the actual write to the answer is reported too
(``service``). With ``--rate 0`` it is closed-loop: every connection sends its next request as
soon as the previous one is answered, which is how the end-to-end run pushes a burst of N
messages as fast as the server takes them.

    python bench/fixed_rate.py --url http://127.0.0.1:8080/webhook --pool POOL \\
        --rate 1500 --duration 15 --connections 32 [--count N] [--out result.json]

Prints a one-line summary and writes the full result as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from payloads import read_pool


@dataclass
class Result:
    rate_target: float
    connections: int
    scheduled: int = 0
    completed: int = 0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    achieved_rate: float = 0.0
    first_send_wall: float = 0.0
    last_ack_wall: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    service_ms: dict[str, float] = field(default_factory=dict)
    late_sends: int = 0


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round(ordered[-1] * 1000, 3),
        "mean": round(sum(ordered) / len(ordered) * 1000, 3),
    }


def build_requests(host: str, port: int, path: str, pool: Path, key: str | None) -> list[bytes]:
    out = []
    for sig, body in read_pool(pool):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: Metriport API\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"x-metriport-signature: {sig}\r\n"
        )
        if key:
            head += f"x-webhook-key: {key}\r\n"
        out.append(head.encode() + b"\r\n" + body)
    return out


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def run(
    url: str,
    pool: Path,
    rate: float,
    duration: float,
    count: int | None,
    connections: int,
    key: str | None,
) -> Result:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    requests = build_requests(host, port, path, pool, key)
    total = count if count is not None else int(rate * duration) if rate else 10**12
    if count is None and not rate:
        raise SystemExit("--rate 0 (closed loop) needs --count")
    result = Result(rate_target=rate, connections=connections)
    latencies: list[float] = []
    services: list[float] = []
    first_send = float("inf")
    last_ack = 0.0
    next_index = 0
    clock = time.perf_counter
    wall_offset = time.time() - clock()
    start = clock() + 0.05

    def take(c: int, k: int) -> int | None:
        """The next request index for connection c (k: its previous one, -1 at first)."""
        nonlocal next_index
        if rate:
            k = c if k < 0 else k + connections
            return k if k < total else None
        if next_index >= total:
            return None
        next_index += 1
        return next_index - 1

    async def worker(c: int) -> None:
        nonlocal first_send, last_ack
        reader, writer = await asyncio.open_connection(host, port)
        k = -1
        try:
            while (nk := take(c, k)) is not None:
                k = nk
                due = start + k / rate if rate else 0.0
                if rate:
                    delay = due - clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    elif delay < -0.001:
                        result.late_sends += 1
                sent = clock()
                due = due or sent
                first_send = min(first_send, sent)
                result.scheduled += 1
                try:
                    writer.write(requests[k % len(requests)])
                    status = await read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    result.errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                done = clock()
                last_ack = max(last_ack, done)
                latencies.append(done - due)
                services.append(done - sent)
                result.statuses[str(status)] = result.statuses.get(str(status), 0) + 1
                result.completed += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(c) for c in range(connections)))
    result.duration_s = round(last_ack - first_send, 3) if result.completed else 0.0
    if result.duration_s:
        result.achieved_rate = round(result.completed / result.duration_s, 1)
    result.first_send_wall = first_send + wall_offset
    result.last_ack_wall = last_ack + wall_offset
    result.latency_ms = percentiles(latencies)
    result.service_ms = percentiles(services)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--pool", type=Path, required=True, help="file from payloads.write_pool")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s; 0: closed loop")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (with --rate)")
    parser.add_argument("--count", type=int, help="send exactly this many requests")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--key", help="also send x-webhook-key")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    result = asyncio.run(
        run(
            args.url,
            args.pool,
            args.rate,
            args.duration,
            args.count,
            args.connections,
            args.key,
        )
    )
    summary = asdict(result)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    lat = result.latency_ms
    print(
        f"{result.completed} answered ({result.statuses}, {result.errors} errors) in "
        f"{result.duration_s} s = {result.achieved_rate} req/s (target {args.rate or 'max'}); "
        f"latency p50 {lat.get('p50')} ms p99 {lat.get('p99')} ms max {lat.get('max')} ms"
    )


if __name__ == "__main__":
    main()
