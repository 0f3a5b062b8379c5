"""The ``webhook-router`` command line, run as the real program in a child process."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from router.config import CONFIG_ENV
from router.testing import RouterProcess, listening_socket, wait_until, write_config
from tests.conftest import FIXTURES, TEST_KEY

REPO = Path(__file__).resolve().parent.parent
UNSET = "WR_TEST_CLI_UNSET_VARIABLE"
ANSWER = re.compile(r"^(\d{3}) in [0-9.]+ ms(: .*)?$")


def run(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``webhook-router ARGS`` with a clean environment (no ``$WEBHOOK_ROUTER_CONFIG``)."""
    base = {k: v for k, v in os.environ.items() if k not in (CONFIG_ENV, UNSET)}
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        cwd=REPO,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


GOOD = """\
server:
  listen: ["127.0.0.1:8080"]
auth:
  keys: [k1]
journal:
  path: ./journal
routes:
  - match: "medical.*"
    to: [medical]
  - match: ["patient.admit", "patient.discharge"]
    to: [events, medical]
default: [archive]
sinks:
  medical: {type: file, path: ./out/medical.jsonl}
  events: {type: file, path: ./out/events.jsonl}
  archive: {type: file, path: ./out/archive.jsonl}
"""

BAD = """\
server:
  listen: ["127.0.0.1:8080"]
auth:
  keys: [k1]
default: [archive]
sinks:
  archive:
    type: file
    path: ./out.jsonl
    timeout: 10 parsecs
  other:
    type: carrier-pigeon
  third:
    type: file
    path: ./third.jsonl
    colour: red
"""


def route_rows(stdout: str) -> dict[str, str]:
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^  (\S.*?)\s+->\s+(.+)$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# -- check -------------------------------------------------------------------------------------


def test_check_good_config_prints_the_route_table(tmp_path: Path) -> None:
    config = tmp_path / "good.yaml"
    config.write_text(GOOD)
    r = run("check", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert f"{config}: OK" in r.stdout.splitlines()
    assert route_rows(r.stdout) == {
        "medical.*": "medical",
        "patient.admit, patient.discharge": "events, medical",
        "(default)": "archive",
    }
    assert f"journal: {tmp_path / 'journal'}" in r.stdout
    for name in ("medical", "events", "archive"):
        assert re.search(rf"^  {name}\s+file ", r.stdout, re.M), name
    assert "k1" not in r.stdout
    assert r.stderr == ""


def test_check_without_default_shows_unrouted(tmp_path: Path) -> None:
    config = tmp_path / "good.yaml"
    config.write_text(GOOD.replace("default: [archive]\n", ""))
    r = run("check", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert route_rows(r.stdout)["(default)"] == "(none: unrouted)"


def test_check_prints_secret_file_warning(tmp_path: Path) -> None:
    key = tmp_path / "current.key"
    key.write_text("s3cret-key\n")
    key.chmod(0o644)
    config = tmp_path / "good.yaml"
    config.write_text(GOOD.replace("keys: [k1]", "keys: [{file: current.key}]"))
    r = run("check", "--config", str(config))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert f"chmod 600 {key}" in warnings[0]
    assert "s3cret-key" not in r.stdout + r.stderr


def test_check_warns_when_x_webhook_key_is_accepted(tmp_path: Path) -> None:
    config = tmp_path / "good.yaml"
    config.write_text(GOOD.replace("keys: [k1]", "keys: [k1]\n  accept: [key]"))
    r = run("check", "--config", str(config))
    assert r.returncode == 0, r.stderr
    (warning,) = [line for line in r.stdout.splitlines() if line.startswith("warning:")]
    assert "auth.accept: accepts x-webhook-key" in warning
    assert "auth:    key, 1 key(s)" in r.stdout


def test_check_bad_config_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(BAD)
    r = run("check", "--config", str(config))
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert f"{config}: 3 problems:" in r.stderr
    for line, path in [
        (10, "sinks.archive.timeout"),
        (12, "sinks.other.type"),
        (16, "sinks.third.colour"),
    ]:
        assert f"  {config}:{line}: {path}: " in r.stderr, path
    assert len([line for line in r.stderr.splitlines() if line.startswith(f"  {config}:")]) == 3


def test_check_yaml_syntax_error_exits_2_with_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("auth:\n  keys: [k1\nsinks: {}\n")
    r = run("check", "--config", str(config))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert re.search(rf"^  {re.escape(str(config))}:\d+: invalid YAML: ", r.stderr, re.M)


def test_check_missing_config_file_hints_at_config_option(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    r = run("check", "--config", str(missing))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{missing}: cannot read: " in r.stderr
    hint = [line for line in r.stderr.splitlines() if line.startswith("hint:")]
    assert len(hint) == 1
    assert "--config" in hint[0]
    assert CONFIG_ENV in hint[0]


def test_config_falls_back_to_environment_variable(tmp_path: Path) -> None:
    config = tmp_path / "good.yaml"
    config.write_text(GOOD)
    r = run("check", env={CONFIG_ENV: str(config)})
    assert r.returncode == 0, r.stderr
    assert f"{config}: OK" in r.stdout.splitlines()


def test_config_from_environment_variable_is_reported_when_bad(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(BAD)
    r = run("check", env={CONFIG_ENV: str(config)})
    assert r.returncode == 2
    assert f"{config}: 3 problems:" in r.stderr


def test_config_option_wins_over_environment_variable(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    r = run("check", "--config", str(good), env={CONFIG_ENV: str(tmp_path / "missing.yaml")})
    assert r.returncode == 0, r.stderr
    assert f"{good}: OK" in r.stdout.splitlines()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["check", "--no-such-option"],
        ["send", "--url", "http://127.0.0.1:9/webhook"],
        ["send", "--url", "http://127.0.0.1:9/webhook", "--key", "k"],
        ["serve", "--log-level", "CHATTY"],
    ],
    ids=[
        "no command",
        "unknown command",
        "unknown option",
        "send without key",
        "send w/o body",
        "bad log level",
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    r = run(*args)
    assert r.returncode == 2
    assert "usage: webhook-router" in r.stderr
    assert "Traceback" not in r.stderr


# -- serve -------------------------------------------------------------------------------------


def serve_config(tmp_path: Path, listen: str, journal: Path) -> Path:
    return write_config(
        tmp_path,
        {
            "server": {"listen": [listen]},
            "auth": {"keys": [TEST_KEY]},
            "journal": {"path": str(journal)},
            "default": ["archive"],
            "sinks": {"archive": {"type": "file", "path": str(tmp_path / "out.jsonl")}},
        },
    )


def test_serve_on_a_port_in_use_exits_1_with_one_error_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = serve_config(tmp_path, f"127.0.0.1:{port}", tmp_path / "journal")
        r = run("serve", "--config", str(config))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "in use" in line
    assert "CRITICAL" not in r.stderr


def test_serve_with_journal_under_a_regular_file_exits_1(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    journal = blocker / "journal"
    config = serve_config(tmp_path, "127.0.0.1:0", journal)
    r = run("serve", "--config", str(config))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert line.startswith(f"error: cannot open journal {journal / 'journal.sqlite3'}: ")
    assert "Not a directory" in line


def test_serve_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(BAD)
    r = run("serve", "--config", str(config))
    assert r.returncode == 2
    assert f"{config}: 3 problems:" in r.stderr
    assert "Traceback" not in r.stderr


# -- send --------------------------------------------------------------------------------------


def test_send_to_an_unreachable_url_exits_1(tmp_path: Path) -> None:
    # A bound socket that does not listen: connections to its port are refused.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/webhook"
        r = run("send", "--url", url, "--key", TEST_KEY, "--type", "patient.admit")
    assert r.returncode == 1
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert line.startswith(f"error: cannot reach {url}: ")


def test_send_with_unset_key_variable_exits_2() -> None:
    r = run("send", "--url", "http://127.0.0.1:9/webhook", "--key-env", UNSET, "--type", "ping")
    assert r.returncode == 2
    assert error_lines(r.stderr) == [f"error: environment variable {UNSET} is not set"]


def test_send_missing_body_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    r = run("send", "--url", "http://127.0.0.1:9/webhook", "--key", "k", str(missing))
    assert r.returncode == 2
    (line,) = error_lines(r.stderr)
    assert line.startswith(f"error: cannot read {missing}: ")


@pytest.fixture
def router(tmp_path: Path) -> Iterator[RouterProcess]:
    """A real ``webhook-router serve`` on a socket this test owns; every message to one file
    sink writing ``out/{type}.jsonl``."""
    sock = listening_socket()
    config_path = tmp_path / "config.yaml"
    proc = RouterProcess(config_path, sock)
    write_config(
        tmp_path,
        {
            "server": {"listen": [proc.listen], "path": "/webhook"},
            "auth": {"accept": ["signature"], "keys": [TEST_KEY]},
            "journal": {"path": str(tmp_path / "journal")},
            "default": ["archive"],
            "sinks": {"archive": {"type": "file", "path": str(tmp_path / "out" / "{type}.jsonl")}},
        },
    )
    try:
        with proc:
            yield proc
    finally:
        sock.close()


def lines_in(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def answered_status(stdout: str) -> str:
    """The HTTP status in ``send``'s one-line answer (``200 in 3.1 ms``)."""
    m = ANSWER.match(stdout.strip())
    assert m is not None, stdout
    return m.group(1)


@pytest.mark.parametrize("how", ["--key", "--key-env"])
def test_send_generated_message_to_a_running_router(
    router: RouterProcess, tmp_path: Path, how: str
) -> None:
    key_args = ["--key", TEST_KEY] if how == "--key" else ["--key-env", "WR_TEST_SEND_KEY"]
    r = run(
        "send",
        "--url",
        router.base_url + "/webhook",
        *key_args,
        "--type",
        "patient.admit",
        env={"WR_TEST_SEND_KEY": TEST_KEY},
    )
    assert r.returncode == 0, r.stderr + router.logs()
    assert answered_status(r.stdout) == "200"
    out = tmp_path / "out" / "patient.admit.jsonl"
    wait_until(lambda: len(lines_in(out)) == 1, timeout=30, what="delivery to the file sink")
    assert b'"type":"patient.admit"' in lines_in(out)[0]
    assert router.terminate() == 0


def test_send_with_a_wrong_key_gets_401_and_exits_1(router: RouterProcess, tmp_path: Path) -> None:
    r = run(
        "send",
        "--url",
        router.base_url + "/webhook",
        "--key",
        "not-the-key",
        "--type",
        "patient.admit",
    )
    assert r.returncode == 1
    assert answered_status(r.stdout) == "401"
    assert router.terminate() == 0
    assert not (tmp_path / "out").exists()  # refused messages are never journaled


def test_send_a_fixture_file_to_a_running_router(router: RouterProcess, tmp_path: Path) -> None:
    fixture = FIXTURES / "patient.admit.json"
    body = fixture.read_bytes()
    r = run("send", "--url", router.base_url + "/webhook", "--key", TEST_KEY, str(fixture))
    assert r.returncode == 0, r.stderr + router.logs()
    assert answered_status(r.stdout) == "200"
    out = tmp_path / "out" / "patient.admit.jsonl"
    wait_until(lambda: len(lines_in(out)) == 1, timeout=30, what="delivery to the file sink")
    assert lines_in(out)[0].endswith(b',"body":' + body + b"}")
    assert router.terminate() == 0


def installed_plugin(site: Path, module: str, code: str) -> dict[str, str]:
    """An installed distribution ``wr-test-plugin 1.0`` with a ``webhook_router`` entry point
    ``broken`` -> ``module`` (in a folder put on PYTHONPATH, as pip would install it)."""
    (site / f"{module}.py").write_text(code)
    info = site / "wr_test_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wr-test-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[webhook_router]\nbroken = {module}\n")
    return {"PYTHONPATH": str(site)}


def test_an_installed_plugin_that_fails_to_load_is_named_and_can_be_switched_off(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    env = installed_plugin(site, "wr_missing_dep", "import wr_no_such_module_anywhere\n")
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.replace("./journal", str(tmp_path / "journal")))
    done = run("check", "--config", str(path), env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        "entry point 'broken' (wr_missing_dep) of wr-test-plugin 1.0 failed to load:"
        " ModuleNotFoundError" in done.stderr
    )
    assert "WEBHOOK_ROUTER_DISABLE_PLUGINS=broken" in done.stderr
    ok = run(
        "check", "--config", str(path), env={**env, "WEBHOOK_ROUTER_DISABLE_PLUGINS": "broken"}
    )
    assert ok.returncode == 0, ok.stderr


def test_sink_types_returned_as_a_class_and_a_forgotten_hookimpl_are_clear_errors(
    tmp_path: Path,
) -> None:
    # Both from an installed package (not a plugin file): exit 2, one line each, no traceback.
    site = tmp_path / "site"
    site.mkdir()
    code = (
        "from router import Sink, SinkOptions, hookimpl\n"
        "class One(Sink[SinkOptions]):\n"
        "    type = 'one'\n"
        "    async def send(self, batch):\n"
        "        return None\n"
        "@hookimpl\n"
        "def router_sink_types():\n"
        "    return One\n"
    )
    env = installed_plugin(site, "wr_class_not_list", code)
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.replace("./journal", str(tmp_path / "journal")))
    done = run("check", "--config", str(path), env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "router_sink_types must return a list of Sink classes, not class One" in done.stderr
    (site / "wr_class_not_list.py").write_text(
        code.replace("@hookimpl\n", "").replace("return One", "return [One]")
    )
    done = run("check", "--config", str(path), env=env)
    assert done.returncode == 2, done.stderr
    assert "router_sink_types look like hooks but are not decorated" in done.stderr


def test_log_level_is_taken_in_either_case_as_in_yaml(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    for level in ("debug", "DEBUG", "Warning"):
        done = run("serve", "--log-level", level, "--config", missing)
        assert "invalid choice" not in done.stderr, level
        assert done.returncode == 2 and "cannot read" in done.stderr  # got past the options
    assert "invalid choice" in run("serve", "--log-level", "loud", "--config", missing).stderr
