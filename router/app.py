"""The daemon's lifecycle: one task group for the whole process.

Start: open the journal (recovery is implicit: pending deliveries are simply due), dead-letter
deliveries to sinks that no longer exist, bind the listeners, start the dispatcher, report
READY. SIGHUP: reload (validate and build everything first; on any error keep the running
configuration; else switch at once, retiring changed and removed sinks in the background).
SIGTERM/SIGINT: stop accepting, let requests in flight finish (hypercorn's graceful timeout),
let deliveries in flight finish (bounded), close sinks, checkpoint and close the journal.
Meanwhile: the retention sweep, the systemd watchdog when ``$WATCHDOG_USEC`` asks for it, and
asking Metriport to resend what it failed to deliver (``router.metriport``, when configured).

With ``server.workers`` above 1 this runs in each worker process of a supervisor
(``router.supervisor``), given a ``Worker``: the supervisor has bound the listeners (the worker
serves the inherited sockets), done the start-up clean-up (the worker opens the journal without
maintenance and dead-letters nothing at start) and receives the worker's notifications.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from router import logs, plugins, server
from router.auth import Verifier
from router.config import Config, load_config
from router.dispatcher import Dispatcher
from router.errors import ConfigError, JournalUnavailable, ListenError
from router.health import is_ready, readiness
from router.ingress import Ingress, Runtime
from router.journal import Journal, journal_for
from router.logs import kv
from router.metrics import Metrics
from router.metriport import Resender
from router.notify import notify

log = logging.getLogger("router")

#: How long deliveries in flight may take to finish at shutdown before they are cancelled
#: (a cancelled delivery stays pending and is sent again after the restart).
DELIVERY_DRAIN_SECONDS = 5.0
#: How often each process works out ``webhook_router_ready`` between scrapes.
READY_EVERY = 5.0
#: The retention sweep's first run after start (its period is ``journal.sweep_every``).
FIRST_SWEEP_AFTER = 60.0
#: What a reload cannot change (the listening sockets and the journal stay as they are).
RESTART_ONLY = (
    "server.listen",
    "server.admin_listen",
    "server.keep_alive_timeout",
    "server.max_header_bytes",
    "server.workers",
    "journal.path",
)


@dataclass(frozen=True)
class Worker:
    """What a worker process of a supervisor is (``router.supervisor`` makes one from the
    environment it starts the worker with)."""

    #: 0 … workers-1; worker 0 also runs the retention sweep (once per service is enough).
    index: int
    #: The inherited listening sockets (``fd://N``), for ``server.listen`` and
    #: ``server.admin_listen``.
    listen: list[str]
    admin_listen: list[str] = field(default_factory=list)
    #: How many of the service's workers are ready, of how many (for ``/readyz``).
    ready: Callable[[], tuple[int, int]] = lambda: (1, 1)


async def serve(
    config: Config,
    *,
    stop: anyio.Event | None = None,
    on_ready: Callable[[list[str], Daemon], None] | None = None,
    worker: Worker | None = None,
) -> None:
    """Run the daemon until SIGTERM or SIGINT, or until ``stop`` is set when one is given (then
    no signal handlers are installed: that is how tests run it in-process, calling
    ``Daemon.reload`` for what SIGHUP does). ``on_ready`` gets the listening addresses.
    ``worker``: run as one worker of a supervisor (see the module docstring)."""
    journal = journal_for(config.journal)
    await journal.open(maintenance=worker is None)
    try:
        await Daemon(config, journal, worker).run(stop, on_ready)
    finally:
        with anyio.CancelScope(shield=True):
            await journal.close()
    log.info(kv("stopped"))


class Daemon:
    def __init__(self, config: Config, journal: Journal, worker: Worker | None = None) -> None:
        self.journal = journal
        self.worker = worker
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(config, journal, self.metrics)
        self.ingress = Ingress(_runtime(config, journal, self.dispatcher, self.metrics))
        #: Asks Metriport to resend what it failed to deliver (``metriport.retry_failed``).
        self.resender = Resender(
            lambda: self.config,
            journal,
            self.metrics,
            self.dispatcher.owner,
            lambda: is_ready(self.ingress.runtime),
        )
        self.ingress.on_refused = self.resender.refused
        #: Reloads asked for, and the newest of them whose load has finished (see ``reload``).
        self._reloads_asked = 0
        self._reloads_decided = 0

    @property
    def config(self) -> Config:
        return self.ingress.runtime.config

    async def run(
        self, stop: anyio.Event | None, on_ready: Callable[[list[str], Daemon], None] | None
    ) -> None:
        config = self.config
        worker = self.worker
        await self.dispatcher.register()
        if worker is None:  # a supervisor did this once for all its workers
            await dead_letter_orphaned(self.journal, config)
        hc = server.hypercorn_config(config.server, worker.listen if worker else None)
        sockets = _bind(hc, config.server.listen)
        admin = None
        if config.server.admin_listen:
            admin_listen = worker.admin_listen if worker else config.server.admin_listen
            admin_hc = server.hypercorn_config(config.server, admin_listen)
            admin = (admin_hc, _bind(admin_hc, config.server.admin_listen))
            self.ingress.admin = False
        if worker is not None:
            self.ingress.workers = worker.ready
        listening = server.addresses(sockets)
        dispatched = anyio.Event()
        # Once nothing before serving can fail: plugins learn their configuration and start
        # before any sink opens or request is served (see router.hookspecs).
        plugins.configure(config)
        await plugins.startup(config)

        async def dispatch() -> None:
            try:
                await self.dispatcher.run()
            finally:
                dispatched.set()

        async with anyio.create_task_group() as tg:
            if stop is None:
                stop = anyio.Event()
                # Started (handlers installed) before READY=1: systemd may send SIGHUP or
                # SIGTERM as soon as it has READY, and their default action kills the process.
                await tg.start(self._watch_signals, stop)
            tg.start_soon(dispatch)
            if worker is None or worker.index == 0:
                tg.start_soon(self._sweep_periodically)
            tg.start_soon(self._watchdog)
            tg.start_soon(self._track_readiness)
            tg.start_soon(self.resender.run)
            if admin is not None:
                admin_app = Ingress(self.ingress.runtime, webhook=False)
                admin_app.workers = self.ingress.workers
                admin_app.on_refused = self.resender.refused
                follow = _Follow(self.ingress, admin_app)
                tg.start_soon(server.serve, follow, *admin, stop.wait, self.metrics)
            log.info(
                kv(
                    "listening",
                    worker=worker.index if worker else None,
                    on=",".join(listening),
                    admin=",".join(server.addresses(admin[1])) if admin else None,
                    path=config.server.path,
                    sinks=",".join(config.sinks),
                    journal=self.journal.describe(),
                )
            )
            notify("READY=1", f"STATUS=listening on {', '.join(listening)}")
            if on_ready is not None:
                on_ready(listening, self)
            await server.serve(self.ingress, hc, sockets, stop.wait, self.metrics)
            notify("STOPPING=1")
            log.info(kv("stopping"))
            self.dispatcher.stop()
            with anyio.move_on_after(DELIVERY_DRAIN_SECONDS):
                await dispatched.wait()
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self.dispatcher.close()
            with anyio.move_on_after(5.0):
                try:
                    await self.journal.unregister(self.dispatcher.owner)
                except JournalUnavailable as e:
                    log.warning(kv("unregister-failed", error=str(e)))
            await plugins.shutdown(self.config)

    async def reload(self) -> bool:
        """Load the configuration file again and switch to it; on any error keep running the
        current one. Returns whether the new configuration took effect.

        Reloads may overlap (two SIGHUPs a few ms apart), and their loads may finish in either
        order: the one asked for last decides. A reload whose load finishes after that of one
        asked for later is dropped (``reload-superseded``), valid or not, so the file in force
        is always the one read last, never an older one applied over it."""
        notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        self._reloads_asked += 1
        ticket = self._reloads_asked
        current = self.config
        new: Config | None = None
        error: Exception | None = None
        try:
            # Plugins the embedding program passed to ``load_config`` (not named in the file)
            # stay registered: without them the file's sinks of their types would be unknown.
            new = await anyio.to_thread.run_sync(
                functools.partial(load_config, current.file, extra_plugins=current.extra_plugins)
            )
        except Exception as e:
            error = e
        if not self._decides(ticket):
            log.info(kv("reload-superseded", hint="a later reload read the file"))
            self.metrics.reloads.labels("superseded").inc()
            notify("READY=1", "STATUS=reload superseded by a later one")
            return False
        if error is not None:
            return self._refused(error)
        assert new is not None
        old = self.config
        try:
            # Everything that can fail comes first; then routes, keys and sinks switch together
            # (no await in between: no request sees a mix of the two configurations).
            runtime = _runtime(new, self.journal, self.dispatcher, self.metrics)
            changes = self.dispatcher.reconfigure(new)
        except Exception as e:
            return self._refused(e)
        self.ingress.runtime = runtime
        # Still no await since the switch: the plugins have their new options before any new
        # sink opens (see router.hookspecs for the order).
        plugins.configure(new)
        for key in RESTART_ONLY:
            if _get(old, key) != _get(new, key):
                log.warning(kv("reload-needs-restart", key=key, hint="restart to apply"))
        if new.log != old.log:
            # Only then: an unchanged ``log:`` section keeps the running setup (a
            # ``--log-level`` given on the command line, handlers of an embedding program).
            logs.setup(new.log.level, new.log.format)
        for warning in new.warnings:
            log.warning(warning)
        self.metrics.reloads.labels("applied").inc()
        log.info(kv("reloaded", sinks=",".join(f"{n}:{c}" for n, c in sorted(changes.items()))))
        notify("READY=1", "STATUS=configuration reloaded")
        await plugins.startup(new, only_new_since=old)
        if plugins.departed(old, new):
            # Their sinks may still be finishing deliveries: shut a plugin down after them.
            for runner in list(self.dispatcher.retiring.values()):
                await runner.retired.wait()
            await plugins.shutdown(old, only_gone_in=new)
        return True

    def _decides(self, ticket: int) -> bool:
        """Whether the reload with this ticket decides, its load having finished: no reload
        asked for after it has finished loading first."""
        if ticket < self._reloads_decided:
            return False
        self._reloads_decided = ticket
        return True

    def _refused(self, e: Exception) -> bool:
        if isinstance(e, ConfigError):
            for problem in e.problems:
                log.error(kv("reload-refused", problem=str(problem)))
            status = "STATUS=reload refused: configuration invalid, old one kept"
        else:
            log.error(kv("reload-refused", error=type(e).__name__, detail=str(e)[:200]))
            status = "STATUS=reload refused, old configuration kept"
        self.metrics.reloads.labels("refused").inc()
        notify("READY=1", status)
        return False

    async def _watch_signals(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async with anyio.create_task_group() as reloads:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        # In a task of its own: a slow load must not hold up SIGTERM. Of
                        # overlapping reloads the last one asked for decides (see ``reload``).
                        reloads.start_soon(self.reload)
                        continue
                    log.info(kv("signal", name=signal.Signals(signum).name))
                    stop.set()

    async def _sweep_periodically(self) -> None:
        await anyio.sleep(min(FIRST_SWEEP_AFTER, self.config.journal.sweep_every))
        while True:
            await self.sweep()
            await anyio.sleep(self.config.journal.sweep_every)

    async def sweep(self) -> None:
        """Apply journal retention, and dead-letter deliveries left to sinks that are gone."""
        config = self.config
        try:
            removed = await self.journal.sweep(config.journal.retention)
            await self.dispatcher.dead_letter_removed()
        except JournalUnavailable as e:
            log.error(kv("sweep-failed", error=str(e)))
            return
        self.metrics.swept.inc(removed)
        if removed:
            log.info(kv("swept", messages=removed, retention_s=config.journal.retention))

    async def _track_readiness(self) -> None:
        """Keep ``webhook_router_ready`` what ``/readyz`` would say, so that an alert needs no
        probe of its own. Every process does (with ``server.workers`` a scrape reaches one
        worker, and the gauge's minimum over the live ones is what is served); the commit
        proof is ``/readyz``'s, shared, and made at most once a second."""
        while True:
            why = await readiness(self.ingress.runtime, self.ingress.commit_probe)
            self.metrics.ready.set(why is None)
            await anyio.sleep(READY_EVERY)

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog while the journal writer is alive."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
            return
        interval = int(usec) / 2e6
        while True:
            if self.journal.alive():
                notify("WATCHDOG=1")
            await anyio.sleep(interval)


class _Follow:
    """An ASGI app that always calls ``source``'s current runtime through ``app`` (the admin
    listener follows reloads of the main one)."""

    def __init__(self, source: Ingress, app: Ingress) -> None:
        self.source = source
        self.app = app

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        self.app.runtime = self.source.runtime
        await self.app(scope, receive, send)


async def dead_letter_orphaned(journal: Journal, config: Config) -> None:
    """Dead-letter deliveries to sinks neither this configuration nor a live router has (the
    start-up clean-up, with the orphan bodies ``Journal.open`` removes)."""
    orphans = await journal.dead_letter_orphaned(config.sinks, "sink is no longer configured")
    for sink, count in orphans.items():
        log.warning(kv("dead-letter", sink=sink, count=count, reason="sink not configured"))


def _runtime(config: Config, journal: Journal, dispatcher: Dispatcher, metrics: Metrics) -> Runtime:
    return Runtime(
        config=config,
        verifier=Verifier(config.key_bytes(), config.auth.accept),
        journal=journal,
        dispatcher=dispatcher,
        metrics=metrics,
    )


def _bind(hc: server.HypercornConfig, listen: list[str]) -> server.Sockets:
    try:
        return server.bind(hc)
    except (OSError, ValueError) as e:
        raise ListenError(f"cannot listen on {', '.join(listen)}: {e}") from e


def _get(config: Config, dotted: str) -> object:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)
