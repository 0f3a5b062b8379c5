"""Several worker processes on one host (``server.workers``), under one supervisor.

One router process uses one core (hypercorn's HTTP layer is pure Python). With
``server.workers: N`` the ``serve`` process becomes a supervisor that stays the service's main
process and runs N workers, each an ordinary ``webhook-router serve`` (``router.app``) that
ingests and delivers through the one journal; the journal's claims and leases keep two workers
from sending the same delivery, and take a killed worker's claims over.

The supervisor:

- does the start-up clean-up once (``Journal.open`` with maintenance: orphan bodies; deliveries
  to sinks no configuration has are dead-lettered), then closes the journal: it holds no
  journal while the workers run;
- binds the listeners once and hands them down (``fd://N``): every worker accepts on the same
  sockets, so ``fd://`` and systemd socket activation work as they do with one process;
- gives each worker ``$NOTIFY_SOCKET`` pointing at its own datagram socket (the sender's pid
  comes with each datagram, ``SO_PASSCRED``), and tells systemd ``READY=1`` once every worker
  has said ``READY=1`` (they do once listening);
- forwards SIGHUP once it has validated the file itself (a file it refuses reaches no worker),
  and says ``READY=1`` again when every worker has answered; SIGTERM/SIGINT go to every
  worker, which stop gracefully; past ``graceful_timeout`` + the delivery drain + a margin a
  worker still running is killed;
- restarts a worker that dies (logging its exit status), at once the first time and with a
  growing delay if it keeps dying young; a worker that dies before the service was ever ready
  stops the service (exit 1: a configuration that cannot start);
- pings systemd's watchdog only while every worker runs and pings it (a worker pings while
  its journal writer is alive);
- keeps, for ``/readyz``, a file saying how many workers are ready (``ready`` in its private
  folder), and the folder prometheus-client's multiprocess mode keeps the workers' metrics in
  (``router.metrics``).

A worker dies with its supervisor: it asks the kernel for SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``), so a SIGKILLed supervisor leaves no orphan serving on old sockets.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from router import app, server
from router.config import Config, load_config
from router.errors import ConfigError
from router.journal import journal_for
from router.logs import kv
from router.metrics import MULTIPROC_ENV
from router.notify import notify

log = logging.getLogger("router")

#: The environment variable that makes ``serve`` a worker (JSON, see ``worker_from_env``).
WORKER_ENV = "WEBHOOK_ROUTER_WORKER"
#: A worker that ran at least this long before dying is restarted at once.
HEALTHY_UPTIME = 10.0
#: The longest wait before restarting a worker that keeps dying young.
MAX_RESTART_DELAY = 30.0
#: Beyond the workers' own bounds (graceful timeout, delivery drain), what closing sinks and
#: the journal may take before a worker still running at shutdown is killed.
STOP_MARGIN = 10.0
_PR_SET_PDEATHSIG = 1
_UCRED = struct.Struct("3i")  # pid, uid, gid


# -- the worker's side -----------------------------------------------------------------------


def worker_from_env() -> app.Worker | None:
    """The ``Worker`` this process is, when a supervisor started it; else ``None``. Asks to
    die with the supervisor first (and exits if it is already gone)."""
    text = os.environ.get(WORKER_ENV)
    if not text:
        return None
    doc = json.loads(text)
    _die_with(int(doc["supervisor"]))
    return app.Worker(
        index=int(doc["index"]),
        listen=list(doc["listen"]),
        admin_listen=list(doc["admin"]),
        ready=functools.partial(_read_ready, Path(doc["state"]) / "ready"),
    )


def _die_with(supervisor: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning(kv("pdeathsig-failed", errno=ctypes.get_errno()))
    if os.getppid() != supervisor:  # it died before the request took effect
        raise SystemExit("error: the supervisor is gone")


def _read_ready(path: Path) -> tuple[int, int]:
    try:
        up, of = path.read_text().split()
        return int(up), int(of)
    except (OSError, ValueError):
        return 0, 1


# -- the supervisor --------------------------------------------------------------------------


@dataclass
class _Slot:
    """One worker place: the process in it now, and its history."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    started: float = 0.0  # time.monotonic()
    pinged: float = 0.0  # the last WATCHDOG=1 from it
    young_deaths: int = 0  # in a row
    restart_at: float | None = None
    reload_due: bool = False  # a reload happened while it was starting: send it one when ready

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def run(config: Config, log_level: str | None) -> int:
    """Supervise ``config.server.workers`` workers until SIGTERM/SIGINT; the exit code.
    Raises ``JournalUnavailable`` or ``ListenError`` when the service cannot start."""
    anyio.run(_clean_up, config, backend="asyncio")
    return Supervisor(config, log_level).run()


async def _clean_up(config: Config) -> None:
    """The start-up clean-up, once for all workers (they open the journal without it)."""
    journal = journal_for(config.journal)
    await journal.open()
    try:
        await app.dead_letter_orphaned(journal, config)
    finally:
        await journal.close()


class Supervisor:
    def __init__(self, config: Config, log_level: str | None) -> None:
        self.config = config
        self.log_level = log_level
        self.slots = [_Slot(i) for i in range(config.server.workers)]
        self.announced = False  # READY=1 sent to systemd
        self.stopping: float | None = None  # the deadline for the workers to exit
        self.failed = False
        self.reload_waiting: set[int] = set()  # pids whose answer to a SIGHUP is awaited
        self.reload_refusals = 0
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID")
        ours = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_usec = int(usec) if ours else 0
        self.next_ping = 0.0
        self.withheld = False

    # -- start and the loop ------------------------------------------------------------------

    def run(self) -> int:
        hc = server.hypercorn_config(self.config.server)
        sockets = app._bind(hc, self.config.server.listen)
        admin: list[socket.socket] = []
        if self.config.server.admin_listen:
            admin_hc = server.hypercorn_config(self.config.server, self.config.server.admin_listen)
            admin = app._bind(admin_hc, self.config.server.admin_listen).insecure_sockets
        self.listening = server.addresses(sockets)
        self.fds = [s.fileno() for s in sockets.insecure_sockets]
        self.admin_fds = [s.fileno() for s in admin]
        for sock in [*sockets.insecure_sockets, *admin]:
            sock.set_inheritable(True)
        with contextlib.ExitStack() as stack:
            self.state = Path(
                stack.enter_context(
                    tempfile.TemporaryDirectory(
                        prefix="webhook-router-", dir=os.environ.get("RUNTIME_DIRECTORY")
                    )
                )
            )
            (self.state / "metrics").mkdir()
            self.notify_sock = stack.enter_context(
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            )
            self.notify_sock.bind(str(self.state / "notify.sock"))
            self.notify_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.notify_sock.setblocking(False)
            wake_r, wake_w = socket.socketpair()
            stack.enter_context(wake_r)
            stack.enter_context(wake_w)
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            stack.callback(self._kill_all)
            stack.enter_context(_signals(wake_w.fileno()))
            self._write_ready()
            log.info(kv("workers-starting", workers=len(self.slots), on=",".join(self.listening)))
            for slot in self.slots:
                self._start(slot)
            with selectors.DefaultSelector() as selector:
                selector.register(wake_r, selectors.EVENT_READ)
                selector.register(self.notify_sock, selectors.EVENT_READ)
                while not (self.stopping is not None and not any(s.running() for s in self.slots)):
                    for key, _ in selector.select(self._timeout()):
                        if key.fileobj is wake_r:
                            with contextlib.suppress(BlockingIOError):
                                for signum in wake_r.recv(256):
                                    self._signal(signum)
                        else:
                            self._datagrams()
                    self._reap()
                    self._tick()
        for sock in [*sockets.insecure_sockets, *admin]:
            sock.close()
        log.info(kv("stopped"))
        return 1 if self.failed else 0

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [now + 1.0]
        due.extend(s.restart_at for s in self.slots if s.restart_at is not None)
        if self.watchdog_usec:
            due.append(self.next_ping)
        if self.stopping is not None:
            due.append(self.stopping)
        return max(0.0, min(due) - now)

    def _start(self, slot: _Slot) -> None:
        env = dict(os.environ)
        env[WORKER_ENV] = json.dumps(
            {
                "index": slot.index,
                "supervisor": os.getpid(),
                "listen": [f"fd://{fd}" for fd in self.fds],
                "admin": [f"fd://{fd}" for fd in self.admin_fds],
                "state": str(self.state),
            }
        )
        env["NOTIFY_SOCKET"] = str(self.state / "notify.sock")
        env[MULTIPROC_ENV] = str(self.state / "metrics")
        env.pop("WATCHDOG_PID", None)
        env.pop("WATCHDOG_USEC", None)
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        args = [sys.executable, "-m", "router", "serve", "--config", str(self.config.file)]
        if self.log_level:
            args += ["--log-level", self.log_level]
        slot.proc = subprocess.Popen(args, env=env, pass_fds=(*self.fds, *self.admin_fds))
        slot.ready = False
        slot.restart_at = None
        slot.started = slot.pinged = time.monotonic()
        log.info(kv("worker-started", worker=slot.index, pid=slot.pid))

    # -- events ------------------------------------------------------------------------------

    def _signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._reload()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            log.info(kv("signal", name=signal.Signals(signum).name))
            self._stop()
        # SIGCHLD only wakes the loop up: ``_reap`` follows every wake-up.

    def _datagrams(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.notify_sock.recvmsg(
                    4096, socket.CMSG_SPACE(_UCRED.size)
                )
            except BlockingIOError:
                return
            pid = 0
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(value[: _UCRED.size])[0]
            slot = next((s for s in self.slots if s.pid == pid and s.running()), None)
            if slot is not None:
                self._notified(slot, data.decode(errors="replace").split("\n"))

    def _notified(self, slot: _Slot, fields: list[str]) -> None:
        if "WATCHDOG=1" in fields:
            slot.pinged = time.monotonic()
        if "READY=1" not in fields:
            return
        if not slot.ready:
            slot.ready = True
            log.info(kv("worker-ready", worker=slot.index, pid=slot.pid))
            self._write_ready()
            if slot.reload_due:
                slot.reload_due = False
                self._forward_reload(slot)
            if not self.announced and all(s.ready for s in self.slots):
                self.announced = True
                log.info(kv("workers-ready", workers=len(self.slots)))
                notify(
                    "READY=1",
                    f"STATUS={len(self.slots)} workers listening on {', '.join(self.listening)}",
                )
        elif slot.pid in self.reload_waiting:  # its answer to the SIGHUP
            self.reload_waiting.discard(slot.pid)
            if any(f.startswith("STATUS=reload refused") for f in fields):
                self.reload_refusals += 1
            self._reload_answered()

    def _reap(self) -> None:
        for slot in self.slots:
            if not slot.running() or slot.proc is None:
                continue
            code = slot.proc.poll()
            if code is None:
                continue
            pid = slot.pid
            self._forget(pid)
            slot.ready = False
            self._write_ready()
            if self.stopping is not None:
                log.info(kv("worker-stopped", worker=slot.index, pid=pid, code=_exit(code)))
                if code != 0:
                    self.failed = True
                continue
            log.error(kv("worker-exited", worker=slot.index, pid=pid, code=_exit(code)))
            if not self.announced:
                # Dying before the service was ever ready: what made it fail will make its
                # successor fail too (its log says what). Stop rather than loop.
                log.error(kv("workers-failed", worker=slot.index, hint="see the worker's log"))
                self.failed = True
                self._stop()
                continue
            uptime = time.monotonic() - slot.started
            slot.young_deaths = slot.young_deaths + 1 if uptime < HEALTHY_UPTIME else 0
            delay = (
                0.0
                if slot.young_deaths <= 1
                else min(MAX_RESTART_DELAY, 0.5 * 2 ** (slot.young_deaths - 2))
            )
            slot.restart_at = time.monotonic() + delay
            if delay:
                log.warning(kv("worker-restart-delayed", worker=slot.index, seconds=delay))

    def _forget(self, pid: int) -> None:
        """A worker's process is gone: its live gauges go, its pending reload answer too."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.state / "metrics"))  # type: ignore[no-untyped-call]
        if pid in self.reload_waiting:
            self.reload_waiting.discard(pid)
            self._reload_answered()

    def _tick(self) -> None:
        now = time.monotonic()
        if self.stopping is None:
            for slot in self.slots:
                if slot.restart_at is not None and now >= slot.restart_at:
                    self._start(slot)
        elif now >= self.stopping:
            for slot in self.slots:
                if slot.running() and slot.proc is not None:
                    log.error(kv("worker-killed", worker=slot.index, pid=slot.pid, reason="stop"))
                    slot.proc.kill()
            self.stopping = now + 5.0
        if self.watchdog_usec and now >= self.next_ping:
            self.next_ping = now + self.watchdog_usec / 2e6
            self._watchdog(now)

    def _watchdog(self, now: float) -> None:
        """Ping only while every worker runs and has pinged within the watchdog interval."""
        limit = self.watchdog_usec / 1e6
        stalled = [s.index for s in self.slots if not s.running() or now - s.pinged > limit]
        if not stalled:
            notify("WATCHDOG=1")
            self.withheld = False
        elif not self.withheld and self.announced:
            self.withheld = True
            log.warning(kv("watchdog-withheld", workers=",".join(map(str, stalled))))

    # -- reload and stop ---------------------------------------------------------------------

    def _reload(self) -> None:
        if self.stopping is not None:
            return
        notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            load_config(self.config.file)
        except ConfigError as e:
            for problem in e.problems:
                log.error(kv("reload-refused", problem=str(problem)))
            notify("READY=1", "STATUS=reload refused: configuration invalid, old one kept")
            return
        except Exception as e:  # a plugin failing to import, say: never a traceback
            log.error(kv("reload-refused", error=type(e).__name__, detail=str(e)[:200]))
            notify("READY=1", "STATUS=reload refused, old configuration kept")
            return
        self.reload_refusals = 0
        for slot in self.slots:
            if slot.running() and slot.ready:
                self._forward_reload(slot)
            elif slot.running():
                # Its signal handlers may not be installed yet (SIGHUP would kill it).
                slot.reload_due = True
        self._reload_answered()

    def _forward_reload(self, slot: _Slot) -> None:
        assert slot.proc is not None
        self.reload_waiting.add(slot.pid)
        slot.proc.send_signal(signal.SIGHUP)

    def _reload_answered(self) -> None:
        if self.reload_waiting or any(s.reload_due for s in self.slots):
            return
        if self.reload_refusals:
            log.error(kv("reload-refused-by-workers", workers=self.reload_refusals))
            notify("READY=1", "STATUS=reload refused by some workers: see the log")
        else:
            log.info(kv("workers-reloaded", workers=len(self.slots)))
            notify("READY=1", "STATUS=configuration reloaded")

    def _stop(self) -> None:
        if self.stopping is not None:
            return
        server = self.config.server
        self.stopping = (
            time.monotonic() + server.graceful_timeout + app.DELIVERY_DRAIN_SECONDS + STOP_MARGIN
        )
        notify("STOPPING=1")
        log.info(kv("stopping", workers=sum(s.running() for s in self.slots)))
        for slot in self.slots:
            slot.restart_at = None
            if slot.running() and slot.proc is not None:
                slot.proc.send_signal(signal.SIGTERM)

    def _kill_all(self) -> None:
        """Leaving for any reason: no worker outlives the supervisor."""
        for slot in self.slots:
            if slot.running() and slot.proc is not None:
                slot.proc.kill()
                slot.proc.wait()

    def _write_ready(self) -> None:
        path = self.state / "ready"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{sum(s.ready for s in self.slots)} {len(self.slots)}\n")
        tmp.replace(path)


@contextlib.contextmanager
def _signals(wake_fd: int) -> Iterator[None]:
    """Signals write their number to ``wake_fd`` (the loop reads it); the old handlers and
    wake-up fd come back at the end."""
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
    old = {s: signal.signal(s, lambda *_: None) for s in handled}
    old_fd = signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, handler in old.items():
            signal.signal(s, handler)


def _exit(code: int) -> str:
    """An exit status as an operator reads it: ``0``, ``1``, ``SIGKILL``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return str(code)
