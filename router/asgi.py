"""The ASGI plumbing the endpoints share: the callables' types and how an answer is sent."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Event = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Event]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
JSON = b"application/json"
CLOSE = (b"connection", b"close")


def error_body(text: str) -> bytes:
    """The body of a refusal: ``{"error": text}``."""
    return json.dumps({"error": text}).encode()


async def respond(
    send: Send,
    status: int,
    body: bytes = b"",
    content_type: bytes | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> int:
    """Send a whole answer; return its status (for the requests metric)."""
    all_headers = [(b"content-length", str(len(body)).encode()), *headers]
    if content_type:
        all_headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})
    return status


async def lifespan(receive: Receive, send: Send) -> None:
    """The lifespan protocol: nothing to start or stop (the daemon does that)."""
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
