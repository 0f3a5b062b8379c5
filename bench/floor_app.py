"""The floor: a bare ASGI app on hypercorn's asyncio worker that reads the body and answers 200.

This is what hypercorn alone can do on this machine, so ``router / floor`` says how much of the
HTTP layer's capacity the router's own work (HMAC, JSON, journal, delivery) costs. It is served
the way the router serves (``hypercorn.asyncio.serve``, access log off, no server header, the
same keep-alive and backlog), on the plain asyncio loop or on uvloop (``--loop``), so that the
floor uses the same worker and loop as the router being measured.

    python bench/floor_app.py --bind 127.0.0.1:8081 [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    size = 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            return
        size += len(event.get("body", b""))
        if not event.get("more_body", False):
            break
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
    )
    await send({"type": "http.response.body", "body": b""})


def config(bind: str) -> Config:
    hc = Config()
    hc.bind = [bind]
    hc.accesslog = None
    hc.include_server_header = False
    hc.keep_alive_timeout = 75
    hc.backlog = 1024
    return hc


async def main(bind: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(app, config(bind), shutdown_trigger=stop.wait)  # type: ignore[arg-type]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8081")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main(args.bind))
    else:
        asyncio.run(main(args.bind))
