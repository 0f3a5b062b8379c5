"""Every hook a webhook-router plugin can implement.

A plugin is a module (or object) with functions decorated by ``router.hookimpl`` whose names are
those below. Hook names carry the ``router_`` prefix; a function with that prefix and no
matching spec here is a startup error (a misspelt hook must not fail silently).

Observer hooks (``router_message_*``, ``router_delivery_*``) are called after the fact and may
be plain functions or ``async def``. An exception raised by one is logged with the plugin's name
and the file:line it was raised at, and never breaks, delays beyond its timeout, or changes a
delivery.

Lifecycle hooks, in the order a daemon process calls them::

    router_configure(config, options)   # sync: each time a configuration takes effect
    router_startup(config)              # once: before any sink opens or a request is served
    ...                                 # serving; SIGHUP: router_configure again (below)
    router_shutdown(config)             # once: after the last delivery, every sink closed

An exception in any of them is logged (plugin, hook, exception class, file:line; the frames at
debug level) and never stops the daemon from starting, serving, reloading or stopping: the
journal keeps every message, so a plugin that failed to start delays nothing but its own work.
Each ``async`` implementation of ``router_startup`` and ``router_shutdown`` is awaited in turn
within ``router.plugins.LIFECYCLE_TIMEOUT`` seconds (30), then given up (logged). A plain
function runs on the event loop, with no deadline: keep it short (``async def`` for anything
that waits).

On a reload (SIGHUP) that is applied: the switch happens (routes, keys, sinks), then
``router_configure`` is called with the new configuration, before any new sink opens; then
``router_startup`` of each plugin the reload brought in (a plugin file newly listed, or edited
and so imported afresh) and, once the sinks the reload retired are closed, ``router_shutdown``
of each plugin it dropped. A plugin kept across the reload (a built-in, an installed one, an
unchanged file) is not started or shut down again. A refused reload calls none of them.
Startup and shutdown run in each worker process (``server.workers``), not in the supervisor;
``check`` and the operator commands call none of the lifecycle hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from router.config import Config
    from router.message import Message
    from router.plugins import PluginOptions
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


@hookspec
def router_plugin_options() -> type[PluginOptions]:
    """Return this plugin's options model: a ``router.plugins.PluginOptions`` subclass (strict:
    unknown keys are errors; frozen).

    Called once per configuration load (``check`` included). The options are the plugin's
    entry under ``plugins:`` (``- NAME: {key: value}``; NAME is the plugin's module, ``.py``
    file or entry-point name), validated like a sink's: every problem is reported with file,
    key path and line. A plugin not given options gets the model's defaults; a required field
    without a default makes the plugin's options required. A plugin without this hook takes
    no options (giving it some is an error).
    """
    raise NotImplementedError


@hookspec
def router_configure(config: Config, options: PluginOptions | None) -> None:
    """Called each time a configuration takes effect in a daemon process: at start, before
    ``router_startup``, and after each reload that is applied (right after the switch, before
    any new sink opens). ``options``: this plugin's validated options (``None`` without a
    ``router_plugin_options`` hook); each plugin gets its own.

    Must be a plain function (``async def`` is refused when the plugin loads): it runs where
    nothing waits. Keep what you need from ``config`` and ``options``; do no I/O here (use
    ``router_startup``). Validation belongs in the options model, where ``check`` reports it;
    an exception here is logged and the daemon goes on with the new configuration.
    """


@hookspec
def router_startup(config: Config) -> None:
    """Called once per daemon process, after ``router_configure``, when the journal is open
    and before any sink opens or any request is served (a plugin brought in by a reload: at
    that reload, after the switch, while its sinks may already be opening). May be ``async``
    (awaited, within ``LIFECYCLE_TIMEOUT``). An exception is logged; the daemon serves anyway.
    """


@hookspec
def router_shutdown(config: Config) -> None:
    """Called once per daemon process when it stops: after requests and deliveries in flight
    finished and every sink was closed, before the journal is closed (a plugin a reload
    dropped: at that reload, once the sinks it retired are closed). May be ``async`` (awaited,
    within ``LIFECYCLE_TIMEOUT``). An exception is logged; the daemon stops anyway (exit 0).
    """
