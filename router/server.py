"""Hypercorn as a component: we bind the sockets, we own the shutdown trigger.

Hypercorn has no anyio entry point, so the daemon runs on anyio's asyncio backend and calls
hypercorn's asyncio worker with sockets bound beforehand (so binding errors surface before the
daemon reports ready, and ``fd://N`` sockets from systemd or a test harness work) and with our
own ``shutdown_trigger`` (so hypercorn installs no signal handlers of its own).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets

__all__ = ["HypercornConfig", "Sockets", "addresses", "bind", "hypercorn_config", "serve"]

from router.config import ServerConfig


def hypercorn_config(server: ServerConfig, listen: list[str] | None = None) -> HypercornConfig:
    """Hypercorn's settings for ``listen`` (default: ``server.listen``)."""
    hc = HypercornConfig()
    hc.bind = list(server.listen if listen is None else listen)
    hc.graceful_timeout = server.graceful_timeout
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.include_server_header = False
    # Idle connections, and a request's headers: hypercorn runs one timer for both (it starts
    # when a connection opens or an answer is sent and stops when a request's headers are in).
    hc.keep_alive_timeout = server.keep_alive_timeout
    # Not hypercorn's read_timeout: it closes a connection on which nothing arrives while we
    # are still storing its request (its answer would be lost). Bodies have body_timeout.
    hc.read_timeout = None
    hc.h11_max_incomplete_size = server.max_header_bytes
    hc.h2_max_header_list_size = server.max_header_bytes
    hc.backlog = 1024
    return hc


def bind(hc: HypercornConfig) -> Sockets:
    """Bind (or adopt, for ``fd://``) the listening sockets and start listening, so that
    connections queue in the backlog from the moment we report ready. Raises ``OSError``."""
    sockets = hc.create_sockets()
    for sock in sockets.insecure_sockets:
        sock.listen(hc.backlog)
    return sockets


def addresses(sockets: Sockets) -> list[str]:
    out = []
    for sock in sockets.insecure_sockets:
        name = sock.getsockname()
        out.append(f"http://{name[0]}:{name[1]}" if isinstance(name, tuple) else f"unix:{name}")
    return out


async def serve(
    app: Callable[..., Awaitable[None]],
    hc: HypercornConfig,
    sockets: Sockets,
    shutdown_trigger: Callable[[], Awaitable[Any]],
) -> None:
    """Serve until ``shutdown_trigger`` returns, then stop accepting and let requests in flight
    finish (up to ``graceful_timeout``).

    Hypercorn's worker runs in a task of its own: on Python 3.11 the ``asyncio.TaskGroup`` it
    uses leaves a stray cancellation request on the task that ran it (fixed in 3.12), which
    would make our own cancel scopes re-raise at shutdown.
    """
    worker = worker_serve(ASGIWrapper(app), hc, sockets=sockets, shutdown_trigger=shutdown_trigger)
    await asyncio.ensure_future(worker)
