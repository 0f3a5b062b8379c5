"""Helpers for testing the router and sink plugins over real sockets.

- ``make_sink`` builds one sink from its options exactly as the router does (the same
  validation, ``{env: …}`` secrets, paths relative to ``base_dir``, a real ``SinkContext``),
  for unit tests of a sink; ``load_config`` (also ``router.load_config``) loads a whole file.
- ``body_for`` / ``message_for`` build Metriport-shaped messages; ``sign`` signs a body,
  ``signed_headers`` gives the headers Metriport sends with it and ``post_signed`` posts it.
- ``write_config`` writes a configuration file from plain Python data.
- ``running_router`` runs the whole daemon in-process (in the caller's event loop) on a free
  loopback port; ``Recorder`` is a plugin whose observer hooks let a test wait for deliveries.
- ``SinkPlugin`` registers sink classes defined inline in a test, through the same
  ``router_sink_types`` hook every sink plugin implements.
- ``RouterProcess`` runs ``webhook-router serve`` as a child process on a socket the test bound
  (passed as ``fd://N``, so it survives restarts) and waits for its ``READY=1`` notification.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import yaml

from router import app, plugins
from router.auth import sign
from router.config import Config, load_config
from router.hookspecs import hookimpl
from router.message import Message
from router.sink import Sink

if TYPE_CHECKING:  # httpx is a test dependency, not one of the router's
    import httpx

__all__ = [
    "Recorder",
    "RouterProcess",
    "RunningRouter",
    "SinkPlugin",
    "body_for",
    "eventually",
    "listening_socket",
    "load_config",
    "make_sink",
    "message_for",
    "post_signed",
    "running_router",
    "sign",
    "signed_headers",
    "wait_until",
    "write_config",
]


SinkT = TypeVar("SinkT", bound=Sink[Any])
#: The file ``make_sink`` writes in ``base_dir`` (problems in the options name it and a line).
MAKE_SINK_FILE = "make_sink.yaml"


def make_sink(
    cls: type[SinkT],
    options: Mapping[str, Any] | None = None,
    *,
    base_dir: Path,
    name: str = "sink",
    environ: Mapping[str, str] | None = None,
) -> SinkT:
    """A sink of class ``cls`` with ``options`` (what its entry under ``sinks:`` would hold;
    the router-level ``timeout``, ``batch_size``, ``concurrency``, ``ordered`` and ``retry``
    included), built as the router builds it: the options go through a configuration file
    (``base_dir/make_sink.yaml``) and ``load_config``, so they are validated the same way
    (``ConfigError`` naming key and line), ``{env: NAME}`` and ``{file: PATH}`` are resolved
    (from ``environ``, by default the process environment), relative paths resolve against
    ``base_dir``, and the sink gets the ``SinkContext`` it would get under the name ``name``
    (its metrics on a registry of its own: ``sink.context.registry``). The sink is not opened:
    ``await sink.open()`` … ``await sink.close()`` as the router would."""
    builtin = plugins.sink_types(plugins.new_manager(entry_points=False))[0]
    extra = [] if builtin.get(cls.type) is cls else [SinkPlugin(cls, name=f"make_sink {cls.type}")]
    sink = {"type": cls.type, **_plain(dict(options or {}))}
    document = {"auth": {"keys": ["make-sink"]}, "default": [name], "sinks": {name: sink}}
    path = write_config(base_dir, document, MAKE_SINK_FILE)
    config = load_config(path, environ=environ, entry_points=False, extra_plugins=extra)
    built = config.sinks[name].build(config.base_dir)
    assert isinstance(built, cls)
    return built


def _plain(data: Any) -> Any:
    """``data`` with paths as strings, for YAML."""
    if isinstance(data, Mapping):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_plain(v) for v in data]
    return str(data) if isinstance(data, Path) else data


def body_for(type_: str = "patient.admit", message_id: str | None = None, **fields: Any) -> bytes:
    """A compact JSON body shaped like Metriport's, with ``fields`` beside ``meta``."""
    meta = {"messageId": message_id or str(uuid.uuid4()), "when": "2026-01-01T00:00:00.000Z"}
    meta["type"] = type_
    return json.dumps({"meta": meta, **fields}, separators=(",", ":")).encode()


def message_for(
    type_: str = "patient.admit", message_id: str | None = None, body: bytes | None = None
) -> Message:
    """A ``Message`` as a sink's ``send`` receives it (for unit tests of sinks)."""
    message_id = message_id or str(uuid.uuid4())
    body = body if body is not None else body_for(type_, message_id)
    return Message(message_id, type_, "2026-01-01T00:00:00.000Z", body, time.time())


def signed_headers(body: bytes, key: str) -> dict[str, str]:
    """The headers Metriport sends with ``body``: its ``x-metriport-signature`` under ``key``
    and a JSON content type."""
    return {"x-metriport-signature": sign(body, key), "content-type": "application/json"}


async def post_signed(client: httpx.AsyncClient, url: str, body: bytes, key: str) -> httpx.Response:
    """POST ``body`` to ``url`` as Metriport would, signed with ``key`` (``signed_headers``)."""
    return await client.post(url, content=body, headers=signed_headers(body, key))


def write_config(directory: Path, data: Mapping[str, Any], name: str = "config.yaml") -> Path:
    """Write ``data`` as YAML to ``directory/name`` and return the path."""
    path = directory / name
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    return path


async def eventually(predicate: Callable[[], bool], within: float = 15.0) -> None:
    """Wait until ``predicate()`` over outside state (files, a peer's records) is true; fail
    with ``TimeoutError`` after ``within`` seconds. Prefer ``Recorder.wait_for`` where the
    router's own hooks can say when something happened."""
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 (state outside the process: poll it)
            await anyio.sleep(0.01)


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """Blocking ``eventually`` for synchronous tests."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


class SinkPlugin:
    """A throwaway plugin providing the given sink classes, for sink types defined inline in a
    test: ``load_config(path, extra_plugins=[SinkPlugin(MySink)])``. ``name`` is the plugin's
    name in errors (two plugins providing one sink type, say)."""

    def __init__(self, *classes: type[Sink[Any]], name: str = "test-sinks") -> None:
        self.classes = list(classes)
        self.__name__ = name

    @hookimpl
    def router_sink_types(self) -> list[type[Sink[Any]]]:
        return self.classes


@dataclass
class Recorder:
    """A plugin recording observer hook calls: register it with ``extra_plugins=[recorder]``."""

    received: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    delivered: list[tuple[str, str, int]] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    dead: list[tuple[str, str, str]] = field(default_factory=list)
    __name__ = "recorder"

    def __post_init__(self) -> None:
        self._changed: anyio.Event | None = None

    def _record(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def wait_for(self, predicate: Callable[[Recorder], bool], within: float = 15.0) -> None:
        """Wait until ``predicate(self)`` holds, re-checking after every recorded hook call."""
        with anyio.fail_after(within):
            while not predicate(self):
                self._changed = anyio.Event()
                await self._changed.wait()

    @hookimpl
    def router_message_received(self, message: Message, sinks: Sequence[str]) -> None:
        self.received.append((message.message_id, tuple(sinks)))
        self._record()

    @hookimpl
    def router_message_delivered(self, message: Message, sink: str) -> None:
        self.delivered.append((message.message_id, sink, message.attempt))
        self._record()

    @hookimpl
    def router_delivery_failed(self, message: Message, sink: str, error: BaseException) -> None:
        self.failed.append((message.message_id, sink, type(error).__name__))
        self._record()

    @hookimpl
    def router_message_dead_lettered(
        self, message: Message, sink: str, error: BaseException
    ) -> None:
        self.dead.append((message.message_id, sink, type(error).__name__))
        self._record()

    def delivered_to(self, sink: str) -> list[str]:
        return [mid for mid, s, _ in self.delivered if s == sink]


@dataclass(frozen=True)
class RunningRouter:
    base_url: str
    webhook_url: str
    config: Config
    daemon: app.Daemon

    async def reload(self) -> bool:
        """What SIGHUP does: re-read the configuration file and switch to it if valid."""
        return await self.daemon.reload()


@contextlib.asynccontextmanager
async def running_router(config: Config) -> AsyncIterator[RunningRouter]:
    """Run the daemon in-process until the block exits (then shut it down gracefully).

    Use ``listen: ["127.0.0.1:0"]`` in the configuration for a free port.
    """
    stop = anyio.Event()
    ready = anyio.Event()
    urls: list[str] = []

    daemons: list[app.Daemon] = []

    def on_ready(addresses: list[str], daemon: app.Daemon) -> None:
        urls.extend(addresses)
        daemons.append(daemon)
        ready.set()

    async with anyio.create_task_group() as tg:

        async def run() -> None:
            await app.serve(config, stop=stop, on_ready=on_ready)
            ready.set()  # if serve returned early, do not leave the caller waiting

        tg.start_soon(run)
        await ready.wait()
        if not urls:
            raise RuntimeError("router stopped before it was ready")
        base = urls[0]
        try:
            yield RunningRouter(base, base + config.server.path, config, daemons[0])
        finally:
            stop.set()


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A bound, listening, inheritable TCP socket on a free port (for ``fd://N``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class RouterProcess:
    """``webhook-router serve`` in a child process, listening on a socket the test owns.

    The configuration's ``server.listen`` must be ``[router_process.listen]`` (``fd://N``).
    The socket outlives the child, so a killed router can be restarted on the same port while
    clients' connections wait in its backlog.
    """

    def __init__(
        self,
        config_path: Path,
        sock: socket.socket,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.config_path = config_path
        self.sock = sock
        self.env = dict(os.environ if env is None else env)
        self.log_path = log_path or config_path.parent / "router.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def listen(self) -> str:
        return f"fd://{self.sock.fileno()}"

    @property
    def base_url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self, timeout: float = 30.0, args: Sequence[str] = ()) -> None:
        with tempfile.TemporaryDirectory(prefix="wr-notify-") as tmp:
            address = str(Path(tmp) / "notify.sock")
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
                notify.bind(address)
                env = {**self.env, "NOTIFY_SOCKET": address}
                with self.log_path.open("ab") as log:
                    self.proc = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "router",
                            "serve",
                            "--config",
                            str(self.config_path),
                            *args,
                        ],
                        pass_fds=(self.sock.fileno(),),
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                self._await_ready(notify, timeout)

    def _await_ready(self, notify: socket.socket, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([notify], [], [], 0.1)
            if readable and b"READY=1" in notify.recv(4096).split(b"\n"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"router exited with {self.proc.returncode} before ready:\n{self.logs()}"
                )
        self.kill()
        raise TimeoutError(f"router not ready within {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as in a crash or power loss of the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for a graceful exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> RouterProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
