"""Accepting connections (router/server.py): at the file-descriptor limit connections wait in
the backlog instead of being reset, the failures are counted and logged without flooding, and
the listener serves again as soon as descriptors are free."""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from router import server
from router.config import Config
from router.metrics import Metrics
from router.testing import (
    RouterProcess,
    body_for,
    listening_socket,
    running_router,
    wait_until,
    write_config,
)
from tests.conftest import TEST_KEY, post, signed

#: Descriptors the router may open beyond those it holds when it is ready.
HEADROOM = 8
#: More connections than the headroom: some of them must wait for a descriptor.
CONNECTIONS = 5 * HEADROOM


@pytest.fixture
def router(tmp_path: Path) -> Iterator[RouterProcess]:
    sock = listening_socket()
    proc = RouterProcess(tmp_path / "config.yaml", sock)
    write_config(
        tmp_path,
        {
            # Idle connections stay open however slowly this test runs.
            "server": {"listen": [proc.listen], "keep_alive_timeout": "10m"},
            "auth": {"accept": ["signature"], "keys": [TEST_KEY]},
            "journal": {"path": "journal"},
            "default": ["archive"],
            "sinks": {"archive": {"type": "file", "path": "out/{type}.jsonl"}},
        },
    )
    try:
        with proc:
            yield proc
    finally:
        sock.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def held(pid: int) -> list[str]:
    """What the process's descriptors are (for a failure's message)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(out)


def accept_lines(logs: str) -> list[str]:
    return [line for line in logs.splitlines() if " accept-failed " in line]


def answer(conn: socket.socket) -> bytes:
    """Everything the router sends on ``conn`` until it closes it."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def request(base_url: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    client = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        headers = signed(body) if body else {}
        client.request(method, path, body=body or None, headers=headers)
        response = client.getresponse()
        return response.status, response.read()
    finally:
        client.close()


def test_at_the_fd_limit_connections_wait_are_counted_and_logged_once(
    router: RouterProcess,
) -> None:
    assert router.proc is not None
    pid = router.proc.pid
    # First what opens descriptors for good on first use (the journal's reader connections,
    # the sink's file), so that the headroom is left for connections.
    status, _ = request(router.base_url, "POST", "/webhook", body_for("patient.admit"))
    assert status == 200
    sink_file = router.config_path.parent / "out" / "patient.admit.jsonl"
    wait_until(sink_file.exists, what="the delivery to the file sink")
    assert request(router.base_url, "GET", "/metrics")[0] == 200
    limit = open_fds(pid) + HEADROOM
    resource.prlimit(
        pid, resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    host, port = router.sock.getsockname()[:2]
    conns = [socket.create_connection((host, port), timeout=30) for _ in range(CONNECTIONS)]
    try:
        # Idle connections hold every descriptor the router may have: the rest wait.
        wait_until(lambda: accept_lines(router.logs()), what="the accept-failed line")
        # Each connection asks once and is closed after its answer, which frees a descriptor
        # for one that waits: all are answered, none was reset, at the same limit.
        for conn in conns:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: router\r\nconnection: close\r\n\r\n")
        try:
            answers = [answer(conn) for conn in conns]
        except TimeoutError:
            pytest.fail(
                f"a connection got no answer; the router holds {held(pid)}\n{router.logs()}"
            )
    finally:
        for conn in conns:
            conn.close()
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 "] * CONNECTIONS

    status, _ = request(router.base_url, "POST", "/webhook", body_for("patient.admit"))
    assert status == 200
    status, metrics = request(router.base_url, "GET", "/metrics")
    assert status == 200
    (counted,) = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.decode().splitlines()
        if line.startswith('webhook_router_accept_errors_total{reason="fd_limit"} ')
    ]
    assert counted >= 1
    (line,) = accept_lines(router.logs())  # once, not once per connection or per retry
    assert " WARNING router.server accept-failed reason=fd_limit error=EMFILE " in line
    assert f" failures=1 nofile={limit} " in line
    assert "Traceback" not in router.logs()
    assert router.terminate() == 0


def test_accept_failures_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "router.server")
    now = [1000.0]
    metrics = Metrics()
    errors = server.AcceptErrors(metrics, every=60.0, clock=lambda: now[0])
    emfile = OSError(errno.EMFILE, "Too many open files")
    for t in [0.0, 0.25, 0.5, 59.9, 60.0, 61.0, 200.0]:
        now[0] = 1000.0 + t
        errors.failed(emfile, "http://127.0.0.1:8080")
    assert errors.failed(OSError(errno.ENOBUFS, "No buffer space"), "unix:/s") == "memory"
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" failures=")[1].split(" ")[0] for line in lines] == ["1", "4", "2"]
    assert all(line.startswith("accept-failed reason=fd_limit error=EMFILE ") for line in lines)
    registry = metrics.registry
    assert (
        registry.get_sample_value("webhook_router_accept_errors_total", {"reason": "fd_limit"}) == 7
    )
    assert (
        registry.get_sample_value("webhook_router_accept_errors_total", {"reason": "memory"}) == 1
    )


@pytest.mark.anyio
async def test_a_unix_socket_listener_accepts_and_stops_at_shutdown(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    path = tmp_path / "router.sock"
    config = make_config(server={"listen": [f"unix:{path}"], "path": "/webhook"})
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:
        async with running_router(config) as router:
            assert router.base_url == f"unix:{path}"
            for _ in range(3):  # one connection after another, each its own
                async with httpx.AsyncClient(
                    transport=httpx.AsyncHTTPTransport(uds=str(path))
                ) as c:
                    assert (await post(c, "http://router/webhook", body_for())).status_code == 200
            assert (await client.get("http://router/healthz")).status_code == 200
        with pytest.raises(httpx.ConnectError):  # the listener closed with the router
            await client.get("http://router/healthz")


def test_a_log_line_needing_quotes_is_written_at_the_fd_limit() -> None:
    """Quoting a value (``kv``) takes the ``unicode_escape`` codec, which Python imports on
    first use: at the descriptor limit that import failed, and the dispatcher's
    ``journal-read-failed`` line raised instead, which stopped the daemon. A fresh interpreter
    (so that nothing imported the codec before) at its limit builds such a line."""
    code = (
        "import os, resource\n"
        "from router.logs import kv\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir('/proc/self/fd')) - 1,"
        " resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "print(kv('journal-read-failed', error='unable to open database file'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == 'journal-read-failed error="unable to open database file"\n'
