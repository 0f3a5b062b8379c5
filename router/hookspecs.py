"""Every hook a webhook-router plugin can implement.

A plugin is a module (or object) with functions decorated by ``router.hookimpl`` whose names are
those below. Hook names carry the ``router_`` prefix; a function with that prefix and no
matching spec here is a startup error (a misspelt hook must not fail silently).

Observer hooks (``router_message_*``, ``router_delivery_*``) are called after the fact and may
be plain functions or ``async def``. An exception raised by one is logged with the plugin's name
and never breaks, delays beyond its timeout, or changes a delivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from router.message import Message
    from router.sink import Sink

PROJECT = "webhook_router"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def router_sink_types() -> Sequence[type[Sink]]:  # type: ignore[type-arg]
    """Return the sink classes this plugin provides.

    Called once per configuration load, before sink options are validated. Each class needs a
    unique ``type`` name; two plugins providing the same name is a startup error.
    """
    raise NotImplementedError


@hookspec
def router_message_received(message: Message, sinks: Sequence[str]) -> None:
    """Called after a message was journaled and answered 200, with the sinks it was routed to
    (empty when unrouted). Not called for duplicates or pings."""


@hookspec
def router_message_delivered(message: Message, sink: str, duration: float) -> None:
    """Called after ``sink`` accepted ``message``; ``duration`` is the send time in seconds and
    ``message.attempt`` the attempt that succeeded."""


@hookspec
def router_delivery_failed(
    message: Message, sink: str, error: BaseException, retry_in: float
) -> None:
    """Called after a failed attempt that will be retried in ``retry_in`` seconds."""


@hookspec
def router_message_dead_lettered(message: Message, sink: str, error: BaseException) -> None:
    """Called when a delivery is given up (permanent error or retries exhausted). The message
    stays in the journal as a dead letter."""
