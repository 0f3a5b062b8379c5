"""The daemon's lifecycle: one task group for the whole process.

Start: open the journal (recovery is implicit: pending deliveries are simply due), dead-letter
deliveries to sinks that no longer exist, bind the listeners, start the dispatcher, report
READY. Stop (SIGTERM/SIGINT): stop accepting, let requests in flight finish (hypercorn's
graceful timeout), let deliveries in flight finish (bounded), close sinks, checkpoint and close
the journal.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import anyio

from router import server
from router.auth import Verifier
from router.config import Config
from router.dispatcher import Dispatcher
from router.errors import ListenError
from router.ingress import Ingress, Runtime
from router.journal import Journal
from router.logs import kv
from router.metrics import Metrics
from router.notify import notify

log = logging.getLogger("router")

#: How long deliveries in flight may take to finish at shutdown before they are cancelled
#: (a cancelled delivery stays pending and is sent again after the restart).
DELIVERY_DRAIN_SECONDS = 5.0


async def serve(
    config: Config,
    *,
    stop: anyio.Event | None = None,
    on_ready: Callable[[list[str]], None] | None = None,
) -> None:
    """Run the daemon until SIGTERM or SIGINT, or until ``stop`` is set when one is given (then
    no signal handlers are installed: that is how tests run it in-process)."""
    journal = Journal(config.journal.path)
    await journal.open()
    try:
        await _serve(config, journal, stop, on_ready)
    finally:
        with anyio.CancelScope(shield=True):
            await journal.close()
    log.info(kv("stopped"))


async def _serve(
    config: Config,
    journal: Journal,
    stop: anyio.Event | None,
    on_ready: Callable[[list[str]], None] | None,
) -> None:
    orphans = await journal.dead_letter_sinks_not_in(config.sinks, "sink is no longer configured")
    for sink, count in orphans.items():
        log.warning(kv("dead-letter", sink=sink, count=count, reason="sink no longer configured"))
    metrics = Metrics()
    dispatcher = Dispatcher(config, journal, metrics)
    runtime = Runtime(
        config=config,
        verifier=Verifier(config.key_bytes(), config.auth.accept),
        journal=journal,
        dispatcher=dispatcher,
        metrics=metrics,
    )
    hc = server.hypercorn_config(config.server)
    try:
        sockets = server.bind(hc)
    except (OSError, ValueError) as e:
        raise ListenError(f"cannot listen on {', '.join(config.server.listen)}: {e}") from e
    listening = server.addresses(sockets)
    dispatched = anyio.Event()

    async def dispatch() -> None:
        try:
            await dispatcher.run()
        finally:
            dispatched.set()

    async with anyio.create_task_group() as tg:
        if stop is None:
            stop = anyio.Event()
            tg.start_soon(_watch_signals, stop)
        tg.start_soon(dispatch)
        log.info(
            kv(
                "listening",
                on=",".join(listening),
                path=config.server.path,
                sinks=",".join(config.sinks),
                journal=str(journal.path),
            )
        )
        notify("READY=1", f"STATUS=listening on {', '.join(listening)}")
        if on_ready is not None:
            on_ready(listening)
        await server.serve(Ingress(runtime), hc, sockets, stop.wait)
        notify("STOPPING=1")
        log.info(kv("stopping", reason="signal"))
        dispatcher.stop()
        with anyio.move_on_after(DELIVERY_DRAIN_SECONDS):
            await dispatched.wait()
        tg.cancel_scope.cancel()
    with anyio.CancelScope(shield=True):
        await dispatcher.close()


async def _watch_signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.warning(kv("reload-unsupported", hint="restart the service to apply changes"))
                continue
            log.info(kv("signal", name=signal.Signals(signum).name))
            stop.set()
