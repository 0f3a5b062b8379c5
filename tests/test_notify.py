"""The systemd notification protocol, end to end: ``webhook-router serve`` runs as a child
process with ``$NOTIFY_SOCKET`` naming a real AF_UNIX datagram socket this test listens on for
the whole life of the process, and is driven with real signals (SIGHUP, SIGTERM).

Also ``{credential: NAME}`` secrets, as systemd's ``LoadCredential=`` provides them through
``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.notify import notify
from router.testing import body_for, listening_socket, signed_headers, wait_until, write_config
from tests.conftest import TEST_KEY, base_config

STATES = ("READY=1", "RELOADING=1", "STOPPING=1")
#: Variables the test's own environment must not pass on to the child (it may itself run
#: under systemd).
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY")
CREDENTIAL_KEY = "key-from-a-systemd-credential"
SECOND_KEY = "second-webhook-key-for-rotation"

Datagram = list[str]


class NotifySocket:
    """Stands in for systemd's notify socket: receives and keeps every datagram."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.received: list[Datagram] = []

    def wait_for(
        self,
        predicate: Callable[[Datagram], bool],
        within: float = 15.0,
        sender_alive: Callable[[], bool] = lambda: True,
    ) -> Datagram:
        """Receive until a datagram satisfies ``predicate``; return it. Gives up at the
        deadline, or once the sender has exited and nothing more is queued."""
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no such notification; received: {self.received}")
            alive = sender_alive()
            self.sock.settimeout(min(left, 0.5) if alive else 0.001)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if not alive:
                    raise RuntimeError(f"sender exited; received: {self.received}") from None
                continue
            datagram = data.decode().split("\n")
            self.received.append(datagram)
            if predicate(datagram):
                return datagram

    def drain(self) -> None:
        """Take in whatever has arrived (call after the sender exited)."""
        self.sock.setblocking(False)
        try:
            while True:
                self.received.append(self.sock.recv(65536).decode().split("\n"))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def states(self) -> list[str]:
        return [field for d in self.received for field in d if field in STATES]

    def close(self) -> None:
        self.sock.close()


class Served:
    """One ``webhook-router serve`` child process and what it talks to."""

    def __init__(self, tmp_path: Path, notify_dir: Path) -> None:
        self.tmp_path = tmp_path
        self.listener = listening_socket()
        self.notify = NotifySocket(notify_dir)
        self.config_path = tmp_path / "config.yaml"
        self.log_path = tmp_path / "router.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"http://{host}:{port}/webhook"

    def document(self, **overrides: Any) -> dict[str, Any]:
        server = {"listen": [f"fd://{self.listener.fileno()}"], "path": "/webhook"}
        return base_config(self.tmp_path, server=server, **overrides)

    def write(self, **overrides: Any) -> None:
        write_config(self.tmp_path, self.document(**overrides))

    def env(self, extra: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARS}
        return {**env, "NOTIFY_SOCKET": str(self.notify.path), **extra}

    def start(self, extra_env: Mapping[str, str] | None = None) -> Datagram:
        """Start the daemon and wait for its READY=1."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "router", "serve", "--config", str(self.config_path)],
                pass_fds=(self.listener.fileno(),),
                env=self.env(extra_env or {}),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.wait_for("READY=1")

    def wait_for(self, field: str, within: float = 15.0) -> Datagram:
        """The next datagram holding ``field`` (e.g. ``READY=1``); fails with the daemon's
        log if it exits without sending one."""
        try:
            return self.notify.wait_for(lambda d: field in d, within, self.running)
        except (TimeoutError, RuntimeError) as e:
            raise AssertionError(f"{e}\n--- daemon log ---\n{self.logs()}") from None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM; wait for STOPPING=1 and the exit; return the exit code."""
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        self.wait_for("STOPPING=1")
        code = self.proc.wait(30)
        self.notify.drain()
        return code

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def post(self, key: str, message_id: str) -> int:
        body = body_for("patient.admit", message_id)
        return httpx.post(self.url, content=body, headers=signed_headers(body, key)).status_code

    def delivered(self, message_id: str) -> bool:
        out = self.tmp_path / "out" / "patient.admit.jsonl"
        return out.exists() and message_id in out.read_text()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.listener.close()
        self.notify.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    # A socket path has at most 107 bytes: tmp_path can be longer, so the notify socket lives
    # in a short temporary folder.
    with tempfile.TemporaryDirectory(prefix="wr-notify-") as short:
        s = Served(tmp_path, Path(short))
        try:
            yield s
        finally:
            if s.proc is not None and s.proc.poll() is None:
                print(s.logs())
            s.close()


def _field(datagram: Datagram, name: str) -> str:
    (value,) = [f.split("=", 1)[1] for f in datagram if f.startswith(f"{name}=")]
    return value


def test_ready_reloading_ready_stopping_arrive_in_order(served: Served) -> None:
    served.write()
    ready = served.start()
    assert _field(ready, "STATUS").startswith("listening on ")
    assert served.post(TEST_KEY, "m-1") == 200

    served.write(auth={"keys": [SECOND_KEY]})
    before = time.monotonic_ns() // 1000
    served.signal(signal.SIGHUP)
    reloading = served.wait_for("RELOADING=1")
    reloaded = served.wait_for("READY=1")
    after = time.monotonic_ns() // 1000
    # systemd wants CLOCK_MONOTONIC in microseconds, taken when the reload began.
    assert before <= int(_field(reloading, "MONOTONIC_USEC")) <= after
    assert _field(reloaded, "STATUS") == "configuration reloaded"
    # The reload took effect: the new key is accepted, the old one refused.
    assert (served.post(SECOND_KEY, "m-2"), served.post(TEST_KEY, "m-3")) == (200, 401)

    assert served.stop() == 0
    assert served.notify.states() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert not any("WATCHDOG=1" in d for d in served.notify.received)  # not asked for
    assert served.delivered("m-1") and served.delivered("m-2")


def test_signals_right_after_ready_are_handled(served: Served) -> None:
    # systemd may reload or stop a unit as soon as it reported READY=1: the handlers must be
    # in place by then (the default action of SIGHUP and SIGTERM kills the process).
    served.write()
    served.start()
    served.signal(signal.SIGHUP)
    served.wait_for("RELOADING=1")
    served.wait_for("READY=1")
    assert served.stop() == 0
    assert served.notify.states() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_watchdog_pings_when_systemd_asks_for_them(served: Served) -> None:
    served.write()
    served.start({"WATCHDOG_USEC": "200000"})
    served.wait_for("WATCHDOG=1", within=10)
    served.wait_for("WATCHDOG=1", within=10)
    assert served.stop() == 0


def test_watchdog_meant_for_another_process_is_left_alone(served: Served) -> None:
    # WATCHDOG_PID names the process systemd watches; a child that inherited the variables
    # must not ping on its behalf. Observed from start to exit, with a request and a reload
    # in between.
    served.write()
    served.start({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert served.post(TEST_KEY, "m-1") == 200
    served.signal(signal.SIGHUP)
    served.wait_for("READY=1")
    assert served.stop() == 0
    assert not any("WATCHDOG=1" in d for d in served.notify.received)


def test_an_invalid_reload_is_refused_and_the_daemon_keeps_serving(served: Served) -> None:
    served.write()
    served.start()
    served.write(routes=[{"match": "patient.*", "to": ["nowhere"]}])
    served.signal(signal.SIGHUP)
    served.wait_for("RELOADING=1")
    refused = served.wait_for("READY=1")
    assert "refused" in _field(refused, "STATUS")
    assert served.proc is not None and served.proc.poll() is None

    assert served.post(TEST_KEY, "m-1") == 200  # still serving, with the old routes
    wait_until(lambda: served.delivered("m-1"), what="m-1 delivered to archive")
    assert "unknown sink 'nowhere'" in served.logs()
    assert served.stop() == 0
    assert served.notify.states() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_the_key_can_come_from_a_systemd_credential(served: Served, tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "webhook-key").write_text(CREDENTIAL_KEY + "\n")
    (credentials / "webhook-key").chmod(0o600)
    served.write(auth={"keys": [{"credential": "webhook-key"}]})
    served.start({"CREDENTIALS_DIRECTORY": str(credentials)})

    assert served.post(CREDENTIAL_KEY, "m-1") == 200
    assert served.post(TEST_KEY, "m-2") == 401
    wait_until(lambda: served.delivered("m-1"), what="m-1 delivered to archive")
    assert served.stop() == 0
    assert CREDENTIAL_KEY not in served.logs()


def test_a_credential_without_credentials_directory_is_a_config_error(served: Served) -> None:
    served.write(auth={"keys": [{"credential": "webhook-key"}]})
    env = served.env({})
    command = [sys.executable, "-m", "router"]
    config = ["--config", str(served.config_path)]
    check = subprocess.run([*command, "check", *config], env=env, capture_output=True, timeout=30)
    assert check.returncode == 2
    assert b"auth.keys[0]" in check.stderr
    assert b"$CREDENTIALS_DIRECTORY" in check.stderr

    serve = subprocess.run(
        [*command, "serve", *config],
        env=env,
        capture_output=True,
        timeout=30,
        pass_fds=(served.listener.fileno(),),
    )
    assert serve.returncode == 2
    assert b"$CREDENTIALS_DIRECTORY" in serve.stderr
    served.notify.drain()
    assert served.notify.received == []  # never reported ready


def test_notify_reaches_an_abstract_socket_and_is_quiet_without_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # systemd may name a socket in the abstract namespace ("@..."), e.g. for user services.
    name = f"wr-notify-test-{uuid.uuid4()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1", "STATUS=ok") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"

    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert notify("READY=1") is False  # no error: the daemon runs on
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1") is False
