"""Plugins: sink types from inline plugins and from files named in the YAML, loading errors,
and observer hooks that must never break delivery."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from router import Message, PermanentError, RetryableError, SendResult, Sink, SinkOptions, hookimpl
from router.config import Config, load_config
from router.errors import ConfigError
from router.testing import (
    Recorder,
    RouterProcess,
    SinkPlugin,
    body_for,
    eventually,
    listening_socket,
    running_router,
    wait_until,
    write_config,
)
from tests.conftest import base_config, post, recording_sink, signed
from tests.test_cli import run as cli

pytestmark = pytest.mark.anyio


def load_with_plugins(tmp_path: Path, plugins: list[str], **overrides: Any) -> Config:
    path = write_config(tmp_path, base_config(tmp_path, plugins=plugins, **overrides))
    return load_config(path, entry_points=False)


async def test_an_inline_sink_type_is_used(make_config: Callable[..., Config]) -> None:
    received: list[tuple[str, str, int]] = []
    Collecting = recording_sink("collect", received)
    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Collecting), recorder),
        default=["mine"],
        sinks={"mine": {"type": "collect"}},
    )
    assert config.sinks["mine"].cls is Collecting
    async with running_router(config) as router, httpx.AsyncClient() as client:
        r = await post(client, router.webhook_url, body_for(message_id="m-1"))
        assert r.status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
    assert received == [("mine", "m-1", 1)]


PLUGIN_FILE = '''
"""A sink plugin kept beside the configuration."""

from collections.abc import Sequence
from pathlib import Path

from router import ConfigPath, Message, SendResult, Sink, SinkOptions, hookimpl


class Options(SinkOptions):
    path: ConfigPath
    prefix: str = ""


class LineSink(Sink[Options]):
    type = "lines"
    Options = Options

    async def send(self, batch: Sequence[Message]) -> SendResult:
        with Path(self.options.path).open("ab") as f:
            for m in batch:
                f.write(self.options.prefix.encode() + m.message_id.encode() + b"\\n")
        return None


@hookimpl
def router_sink_types():
    return [LineSink]
'''


async def test_a_plugin_file_named_in_the_yaml_is_loaded(tmp_path: Path) -> None:
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "lines_plugin.py").write_text(PLUGIN_FILE)
    recorder = Recorder()
    path = write_config(
        tmp_path,
        base_config(
            tmp_path,
            plugins=["local/lines_plugin.py"],  # relative to the configuration file
            default=["lines"],
            sinks={"lines": {"type": "lines", "path": "out.txt", "prefix": "got "}},
        ),
    )
    config = load_config(path, entry_points=False, extra_plugins=(recorder,))
    assert config.sinks["lines"].type == "lines"
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for mid in ("m-1", "m-2"):
            assert (
                await post(client, router.webhook_url, body_for(message_id=mid))
            ).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 2)
    # The option path resolved against the configuration file's folder.
    assert sorted((tmp_path / "out.txt").read_text().splitlines()) == ["got m-1", "got m-2"]


def test_a_misspelt_hook_is_a_config_error(make_config: Callable[..., Config]) -> None:
    class Misspelt:
        __name__ = "misspelt"

        @hookimpl
        def router_sink_typez(self) -> list[type[Sink[Any]]]:
            return []

    with pytest.raises(ConfigError) as info:
        make_config(extra_plugins=(Misspelt(),))
    text = str(info.value)
    assert "router_sink_typez" in text
    assert "unknown hook" in text
    assert "hookspecs" in text  # points the author at the list of hooks


def test_a_misspelt_hook_in_a_plugin_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "typo.py").write_text(
        "from router import hookimpl\n\n\n@hookimpl\ndef router_mesage_delivered(message):\n"
        "    pass\n"
    )
    with pytest.raises(ConfigError) as info:
        load_with_plugins(tmp_path, ["typo.py"])
    text = str(info.value)
    assert "router_mesage_delivered" in text
    assert "unknown hook" in text
    assert "plugins[0]" in text
    assert str(tmp_path / "typo.py") in text


def test_a_hook_without_hookimpl_is_a_config_error(tmp_path: Path) -> None:
    # pluggy silently ignores an undecorated function; the router refuses it instead.
    (tmp_path / "forgot.py").write_text(
        "def router_message_delivered(message):\n    pass\n\n\n"
        "def router_message_delivred(message):\n    pass\n"
    )
    with pytest.raises(ConfigError) as info:
        load_with_plugins(tmp_path, ["forgot.py"])
    text = str(info.value)
    assert "router_message_delivered" in text
    assert "router_message_delivred" in text
    assert "@router.hookimpl" in text
    assert "plugins[0]" in text


def test_two_plugins_providing_one_sink_type_is_a_config_error(
    make_config: Callable[..., Config],
) -> None:
    first = SinkPlugin(recording_sink("dup", []), name="alpha")
    second = SinkPlugin(recording_sink("dup", []), name="beta")
    with pytest.raises(ConfigError) as info:
        make_config(extra_plugins=(first, second))
    text = str(info.value)
    assert "'dup'" in text
    assert "alpha" in text
    assert "beta" in text


def test_a_plugin_shadowing_a_built_in_sink_type_is_a_config_error(
    make_config: Callable[..., Config],
) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(extra_plugins=(SinkPlugin(recording_sink("file", []), name="impostor"),))
    text = str(info.value)
    assert "'file'" in text
    assert "plugins.file" in text
    assert "impostor" in text


def test_a_plugin_file_that_fails_to_import_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import no_such_module_for_webhook_router_tests\n")
    with pytest.raises(ConfigError) as info:
        load_with_plugins(tmp_path, ["broken_plugin.py"])
    text = str(info.value)
    assert str(broken) in text
    assert "failed to import" in text
    assert "no_such_module_for_webhook_router_tests" in text


def test_a_plugin_file_with_a_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "syntax.py"
    broken.write_text("def router_sink_types(:\n")
    with pytest.raises(ConfigError) as info:
        load_with_plugins(tmp_path, ["syntax.py"])
    assert str(broken) in str(info.value)
    assert "SyntaxError" in str(info.value)


def test_a_missing_plugin_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_with_plugins(tmp_path, ["nowhere/plugin.py"])
    assert str(tmp_path / "nowhere" / "plugin.py") in str(info.value)
    assert "does not exist" in str(info.value)


SECRET = "Jane Doe 1970-01-01"


class Grumpy:
    """Observers that all raise, synchronous and asynchronous, quoting data in their errors."""

    __name__ = "grumpy"

    @hookimpl
    async def router_message_received(self, message: Message, sinks: Sequence[str]) -> None:
        await anyio.lowlevel.checkpoint()
        raise RuntimeError(f"received {SECRET}")

    @hookimpl
    def router_delivery_failed(self, message: Message, sink: str, error: BaseException) -> None:
        raise ValueError(f"failed {SECRET}")

    @hookimpl
    def router_message_delivered(self, message: Message, sink: str) -> None:
        raise KeyError(f"delivered {SECRET}")

    @hookimpl
    async def router_message_dead_lettered(
        self, message: Message, sink: str, error: BaseException
    ) -> None:
        raise LookupError(f"dead {SECRET}")


async def test_raising_observers_never_break_delivery(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sent: list[tuple[str, int]] = []

    class Picky(Sink[SinkOptions]):
        type = "picky"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            sent.extend((m.message_id, m.attempt) for m in batch)
            errors: dict[str, BaseException] = {}
            for m in batch:
                if m.message_id == "dead" or (m.message_id == "flaky" and m.attempt == 1):
                    errors[m.message_id] = (
                        PermanentError("no") if m.message_id == "dead" else RetryableError("later")
                    )
            return errors

    recorder = Recorder()
    # Grumpy is registered first, so its hooks run before the Recorder's each time.
    config = make_config(
        extra_plugins=(SinkPlugin(Picky), Grumpy(), recorder),
        default=["picky"],
        sinks={"picky": {"type": "picky", "retry": {"initial": "10ms", "max": "20ms"}}},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for mid in ("ok", "flaky", "dead"):
            r = await post(client, router.webhook_url, body_for(message_id=mid))
            assert (r.status_code, r.content) == (200, b"")
        await recorder.wait_for(lambda r: len(r.delivered) == 2 and len(r.dead) == 1)

    assert sorted(mid for mid, _ in recorder.received) == ["dead", "flaky", "ok"]
    assert recorder.failed == [("flaky", "picky", "RetryableError")]
    assert sorted(recorder.delivered) == [("flaky", "picky", 2), ("ok", "picky", 1)]
    assert recorder.dead == [("dead", "picky", "PermanentError")]
    assert sorted(sent) == [("dead", 1), ("flaky", 1), ("flaky", 2), ("ok", 1)]

    # Each failure is logged with the plugin, hook and exception class, never its text.
    for hook, cls in [
        ("router_message_received", "RuntimeError"),
        ("router_delivery_failed", "ValueError"),
        ("router_message_delivered", "KeyError"),
        ("router_message_dead_lettered", "LookupError"),
    ]:
        assert any(
            "grumpy" in rec.getMessage() and hook in rec.getMessage() and cls in rec.getMessage()
            for rec in caplog.records
        ), hook
    assert "Jane" not in caplog.text
    assert "1970" not in caplog.text


async def test_an_async_observer_is_awaited(make_config: Callable[..., Config]) -> None:
    seen: list[tuple[str, str]] = []

    class Slowpoke:
        __name__ = "slowpoke"

        @hookimpl
        async def router_message_delivered(self, message: Message, sink: str) -> None:
            await anyio.lowlevel.checkpoint()
            seen.append(("delivered", message.message_id))

        @hookimpl
        async def router_message_received(self, message: Message, sinks: Sequence[str]) -> None:
            await anyio.lowlevel.checkpoint()
            seen.append(("received", message.message_id))

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(recording_sink("c", [])), Slowpoke(), recorder),
        default=["c"],
        sinks={"c": {"type": "c"}},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (
            await post(client, router.webhook_url, body_for(message_id="m-1"))
        ).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1 and len(r.received) == 1)
        # pluggy calls every implementation (the Recorder's at once), then each coroutine
        # returned is awaited.
        await eventually(lambda: sorted(seen) == [("delivered", "m-1"), ("received", "m-1")])


async def test_observer_hooks_go_through_pluggy_order_wrappers_and_tracing(
    make_config: Callable[..., Config],
) -> None:
    # tryfirst/trylast and registration order as pluggy defines them, a wrapper=True
    # implementation around the call, pluggy's tracing sees it; a failing observer in the
    # middle stops none of the others.
    calls: list[str] = []

    class First:
        __name__ = "first"

        @hookimpl(trylast=True)
        def router_message_received(self, message: Message) -> None:
            calls.append("last")

    class Failing:
        __name__ = "failing"

        @hookimpl
        def router_message_received(self, message: Message) -> None:
            calls.append("failing")
            raise RuntimeError("boom")

    class Early:
        __name__ = "early"

        @hookimpl(tryfirst=True)
        def router_message_received(self, message: Message) -> None:
            calls.append("first")

    class Around:
        __name__ = "around"

        @hookimpl(wrapper=True)
        def router_message_received(self, message: Message) -> Any:
            calls.append("wrapper-before")
            result = yield
            calls.append("wrapper-after")
            return result

    recorder = Recorder()
    config = make_config(
        extra_plugins=(First(), Failing(), Early(), Around(), recorder),
        default=["archive"],
    )
    traced: list[str] = []
    config.plugin_manager.add_hookcall_monitoring(
        lambda name, impls, kwargs: traced.append(name), lambda *a: None
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (await post(client, router.webhook_url, body_for(message_id="m-1"))).status_code
        await recorder.wait_for(lambda r: len(r.received) == 1)
    assert calls == ["wrapper-before", "first", "failing", "last", "wrapper-after"]
    assert "router_message_received" in traced


# --- Installed plugins, `webhook-router plugins`, `check`: the real program -----------------


def install(
    site: Path, dist: str, version: str, entry_points: dict[str, str], **modules: str
) -> None:
    """An installed distribution ``dist`` (as pip would leave it in ``site``, a folder on
    PYTHONPATH) with ``webhook_router`` entry points and the given modules."""
    for module, code in modules.items():
        (site / f"{module}.py").write_text(code)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[webhook_router]\n{lines}")


AUDIT_PLUGIN = """\
from router import Sink, SinkOptions, hookimpl


class AuditSink(Sink[SinkOptions]):
    type = "audit"

    async def send(self, batch):
        return None


@hookimpl
def router_sink_types():
    return [AuditSink]


@hookimpl
def router_message_delivered(message, sink):
    pass
"""


def cli_config(tmp_path: Path, sinks: str, plugins: str = "[]") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"auth:\n  keys: [k1]\njournal:\n  path: {tmp_path / 'journal'}\n"
        f"default: [archive]\nsinks:\n  archive: {{type: file, path: ./out.jsonl}}\n{sinks}"
        f"plugins: {plugins}\n"
    )
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder of installed packages (PYTHONPATH) with wr-audit 2.1 (entry point ``audit``)."""
    folder = tmp_path / "site"
    folder.mkdir()
    install(folder, "wr-audit", "2.1", {"audit": "wr_audit"}, wr_audit=AUDIT_PLUGIN)
    return folder


def test_plugins_command_names_each_plugin_its_origin_sink_types_and_hooks(
    tmp_path: Path, site: Path
) -> None:
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "lines_plugin.py").write_text(PLUGIN_FILE)
    path = cli_config(tmp_path, "", plugins="[local/lines_plugin.py]")
    env = {"PYTHONPATH": str(site)}
    done = cli("plugins", "--config", str(path), env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    file_plugin = str(tmp_path / "local" / "lines_plugin.py")
    assert "  plugins.file  built in" in lines
    assert "      sink types: file" in lines
    at = lines.index("  audit  wr-audit 2.1 (entry point audit = wr_audit)")
    assert lines[at + 1 : at + 3] == [
        "      sink types: audit",
        "      hooks: router_message_delivered",
    ]
    at = lines.index(f"  {file_plugin}  plugin file")
    assert lines[at + 1] == "      sink types: lines"
    assert "webhook_router_plugin" not in done.stdout  # never an invented module name

    done = cli("plugins", "--json", "--config", str(path), env=env)
    assert done.returncode == 0, done.stderr
    listed = {p["name"]: p for p in json.loads(done.stdout)["plugins"]}
    assert listed["audit"]["kind"] == "entry point"
    assert listed["audit"]["distribution"] == "wr-audit 2.1"
    assert listed["audit"]["sink_types"] == ["audit"]
    assert listed["audit"]["hooks"] == ["router_message_delivered"]
    assert listed[file_plugin]["kind"] == "file"
    assert listed["plugins.kafka"]["kind"] == "built in"

    # A plugin that fails to load: the others are still listed; the failure said; exit 2.
    (tmp_path / "local" / "lines_plugin.py").write_text("import wr_no_such_module_here\n")
    done = cli("plugins", "--config", str(path), env=env)
    assert done.returncode == 2
    assert "  audit  wr-audit 2.1 (entry point audit = wr_audit)" in done.stdout
    assert f"plugin file {file_plugin} failed to import: ModuleNotFoundError" in done.stderr
    assert "Traceback" not in done.stderr

    # Without a configuration: what every configuration on this host gets.
    done = cli("plugins", env={**env, "WEBHOOK_ROUTER_DISABLE_PLUGINS": "audit"})
    assert done.returncode == 0, done.stderr
    assert "audit  wr-audit" not in done.stdout
    assert "switched off by $WEBHOOK_ROUTER_DISABLE_PLUGINS: audit" in done.stdout
    assert "  plugins.http  built in" in done.stdout


def test_check_names_each_sink_types_provider(tmp_path: Path, site: Path) -> None:
    (tmp_path / "lines_plugin.py").write_text(PLUGIN_FILE)
    path = cli_config(
        tmp_path,
        "  a: {type: audit}\n  l: {type: lines, path: ./l.txt}\n",
        plugins="[lines_plugin.py]",
    )
    done = cli("check", "--config", str(path), env={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    at = lines.index("sink types (provided by):")
    assert lines[at + 1 : at + 4] == [
        "  audit  wr-audit 2.1 (entry point audit = wr_audit)",
        "  file   built in (plugins.file)",
        f"  lines  file {tmp_path / 'lines_plugin.py'}",
    ]


def test_a_forgotten_hookimpl_in_an_installed_package_is_reported_like_in_a_file(
    tmp_path: Path, site: Path
) -> None:
    install(
        site,
        "wr-forgetful",
        "0.3",
        {"forgetful": "wr_forgetful"},
        wr_forgetful="def router_message_delivered(message, sink):\n    pass\n",
    )
    path = cli_config(tmp_path, "")
    done = cli("check", "--config", str(path), env={"PYTHONPATH": str(site)})
    assert done.returncode == 2, done.stdout
    assert "Traceback" not in done.stderr
    assert (
        "entry point 'forgetful' (wr_forgetful) of wr-forgetful 0.3: plugin forgetful:"
        " router_message_delivered look like hooks but are not decorated with @router.hookimpl"
    ) in done.stderr
    assert "WEBHOOK_ROUTER_DISABLE_PLUGINS=forgetful" in done.stderr


def problem_lines(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.startswith("  ")]


def test_a_plugin_that_failed_to_load_is_the_one_problem_not_its_unknown_sink_type(
    tmp_path: Path, site: Path
) -> None:
    # The sink comes first in the file, the plugin file after it; an installed plugin fails
    # too. Each load failure is the news and says which sink type waits for it; no "unknown
    # sink type" problem of its own, let alone listed first.
    (tmp_path / "lines_plugin.py").write_text("import wr_no_such_module_for_lines\n")
    install(site, "wr-broken", "1.0", {"broken": "wr_broken"}, wr_broken="import wr_nothing\n")
    path = cli_config(tmp_path, "  l: {type: lines, path: ./l.txt}\n", plugins="[lines_plugin.py]")
    done = cli("check", "--config", str(path), env={"PYTHONPATH": str(site)})
    assert done.returncode == 2, done.stdout
    problems = problem_lines(done.stderr)
    assert len(problems) == 2, done.stderr
    assert "entry point 'broken' (wr_broken) of wr-broken 1.0 failed to load" in problems[0]
    assert f"plugin file {tmp_path / 'lines_plugin.py'} failed to import" in problems[1]
    for problem in problems:
        assert problem.endswith("; until it loads, sink type 'lines' (sinks.l.type) is unknown")
    assert "unknown sink type" not in done.stderr

    # Without a failed plugin, an unknown type is reported as before.
    (tmp_path / "lines_plugin.py").write_text(PLUGIN_FILE.replace('"lines"', '"other"'))
    done = cli(
        "check",
        "--config",
        str(path),
        env={"PYTHONPATH": str(site), "WEBHOOK_ROUTER_DISABLE_PLUGINS": "broken"},
    )
    assert done.returncode == 2
    assert problem_lines(done.stderr) == [
        f"{path}:8: sinks.l.type: unknown sink type 'lines' (known: audit, download, file,"
        " http, kafka, other, slack)"
    ]


def test_unknown_plugin_given_options_is_a_yaml_error_with_its_line(tmp_path: Path) -> None:
    path = cli_config(tmp_path, "", plugins="\n  - wr_nowhere_plugin:\n      tenant: acme\n")
    done = cli("check", "--config", str(path))
    assert done.returncode == 2
    assert problem_lines(done.stderr) == [
        f"{path}:9: plugins[0].wr_nowhere_plugin: unknown plugin 'wr_nowhere_plugin': not the"
        " entry-point name of an installed plugin (installed: none), nor a module that can be"
        " imported (ModuleNotFoundError: No module named 'wr_nowhere_plugin'), nor a .py file"
    ]


# --- Plugin options and lifecycle hooks ----------------------------------------------------

OPTIONS_PLUGIN = """
from router import hookimpl
from router.plugins import PluginOptions


class Options(PluginOptions):
    tenant: str
    level: int = 1


@hookimpl
def router_plugin_options():
    return Options
"""


def load_problems(tmp_path: Path, plugins: list[Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_with_plugins(tmp_path, plugins)
    return [str(p) for p in info.value.problems]


def test_plugin_options_are_validated_strictly_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "opts.py").write_text(OPTIONS_PLUGIN)
    path = tmp_path / "config.yaml"
    problems = load_problems(
        tmp_path, [{"opts.py": {"tenant": "a", "colour": "red", "level": "x"}}]
    )
    text = path.read_text().splitlines()
    colour = next(i for i, line in enumerate(text, 1) if "colour" in line)
    level = next(i for i, line in enumerate(text, 1) if "level" in line)
    assert problems == [
        f"{path}:{colour}: plugins[0].opts.py.colour: unknown key (allowed: level, tenant)",
        f"{path}:{level}: plugins[0].opts.py.level: expected an integer",
    ]
    # Required options not given at all: said, with what to write.
    (problem,) = load_problems(tmp_path, ["opts.py"])
    assert "plugin " + str(tmp_path / "opts.py") + " needs options (tenant)" in problem
    # Options for a plugin that declares none.
    (problem,) = load_problems(tmp_path, [{"plugins.http": {"a": 1}}])
    assert "plugins[0].plugins.http: plugin plugins.http takes no options" in problem
    # Neither a name nor one NAME: {options}.
    (problem,) = load_problems(tmp_path, [{"opts.py": {"tenant": "a"}, "more.py": {}}])
    assert "plugins[0]: expected a plugin" in problem


def test_an_async_router_configure_is_refused_when_the_plugin_loads(tmp_path: Path) -> None:
    (tmp_path / "conf.py").write_text(
        "from router import hookimpl\n\n\n@hookimpl\nasync def router_configure(config):\n"
        "    pass\n"
    )
    (problem,) = load_problems(tmp_path, ["conf.py"])
    assert "router_configure must be a plain function, not async def" in problem
    assert str(tmp_path / "conf.py") in problem


class Lifecycle:
    """A plugin recording its lifecycle hooks and its sinks' open and close, in order."""

    __name__ = "lifecycle"

    def __init__(self, fail: bool = False) -> None:
        self.events: list[str] = []
        self.fail = fail
        events = self.events

        class LifeSink(Sink[SinkOptions]):
            type = "life"

            async def open(self) -> None:
                events.append("open")

            async def send(self, batch: Sequence[Message]) -> SendResult:
                events.append("send")
                return None

            async def close(self) -> None:
                events.append("close")

        self.sink = LifeSink

    @hookimpl
    def router_sink_types(self) -> list[type[Sink[Any]]]:
        return [self.sink]

    @hookimpl
    def router_configure(self, config: Config, options: object) -> None:
        self.events.append(f"configure {sorted(config.sinks)} {options}")
        if self.fail:
            raise ValueError(SECRET)

    @hookimpl
    async def router_startup(self, config: Config) -> None:
        await anyio.lowlevel.checkpoint()
        self.events.append("startup")
        if self.fail:
            raise RuntimeError(SECRET)

    @hookimpl
    def router_shutdown(self, config: Config) -> None:
        self.events.append("shutdown")
        if self.fail:
            raise LookupError(SECRET)


async def test_lifecycle_hooks_run_around_the_sinks(make_config: Callable[..., Config]) -> None:
    life = Lifecycle()
    recorder = Recorder()
    config = make_config(
        extra_plugins=(life, recorder), default=["l"], sinks={"l": {"type": "life"}}
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (await post(client, router.webhook_url, body_for(message_id="m"))).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
    assert life.events == ["configure ['l'] None", "startup", "open", "send", "close", "shutdown"]


async def test_failing_lifecycle_hooks_are_logged_with_file_and_line_and_the_daemon_serves(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    life = Lifecycle(fail=True)
    recorder = Recorder()
    config = make_config(
        extra_plugins=(life, recorder), default=["l"], sinks={"l": {"type": "life"}}
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (await post(client, router.webhook_url, body_for(message_id="m"))).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
    assert life.events[-1] == "shutdown"
    for hook, cls in [
        ("router_configure", "ValueError"),
        ("router_startup", "RuntimeError"),
        ("router_shutdown", "LookupError"),
    ]:
        assert any(
            rec.getMessage().startswith(f"plugin extra-0-lifecycle: hook {hook} raised {cls} at")
            and f"{__file__}:" in rec.getMessage()
            for rec in caplog.records
        ), hook
    assert "Jane" not in caplog.text


RELOAD_PLUGIN = """
from router import Sink, SinkOptions, hookimpl
from router.plugins import PluginOptions

import tests.test_plugins as t

VERSION = {version!r}


class Options(PluginOptions):
    tenant: str


class Tagged(Sink[SinkOptions]):
    type = "tagged"

    async def open(self):
        t.EVENTS.append(f"{{VERSION}} open")

    async def send(self, batch):
        return None

    async def close(self):
        t.EVENTS.append(f"{{VERSION}} close")


@hookimpl
def router_sink_types():
    return [Tagged]


@hookimpl
def router_plugin_options():
    return Options


@hookimpl
def router_configure(options):
    t.EVENTS.append(f"{{VERSION}} configure {{options.tenant}}")


@hookimpl
def router_startup():
    t.EVENTS.append(f"{{VERSION}} startup")


@hookimpl
def router_shutdown():
    t.EVENTS.append(f"{{VERSION}} shutdown")
"""
#: What the plugin file of RELOAD_PLUGIN records (it imports this module).
EVENTS: list[str] = []


async def test_reload_reconfigures_and_starts_only_plugins_it_brings_in(tmp_path: Path) -> None:
    EVENTS.clear()
    plugin = tmp_path / "tagged.py"
    plugin.write_text(RELOAD_PLUGIN.format(version="v1"))

    def write(tenant: str) -> Path:
        return write_config(
            tmp_path,
            base_config(
                tmp_path,
                plugins=[{"tagged.py": {"tenant": tenant}}],
                default=["t"],
                sinks={"t": {"type": "tagged"}},
            ),
        )

    config = load_config(write("acme"), entry_points=False)
    async with running_router(config) as router:
        await eventually(lambda: "v1 open" in EVENTS)
        assert EVENTS == ["v1 configure acme", "v1 startup", "v1 open"]
        # New options, same file: configured again, not started again, the sink kept.
        write("globex")
        assert await router.reload()
        assert EVENTS[3:] == ["v1 configure globex"]
        # The file edited: imported afresh. The new module is configured and started; the old
        # one shut down once its sink is closed; the new sink opens after the old one closed.
        plugin.write_text(RELOAD_PLUGIN.format(version="v2-edited"))
        assert await router.reload()
        await eventually(lambda: "v2-edited open" in EVENTS)
        later = EVENTS[4:]
        assert later[0] == "v2-edited configure globex"
        assert later.index("v1 close") < later.index("v1 shutdown")
        assert later.index("v1 close") < later.index("v2-edited open")
        assert sorted(later) == sorted(
            [
                "v2-edited configure globex",
                "v2-edited startup",
                "v1 close",
                "v1 shutdown",
                "v2-edited open",
            ]
        )
        del EVENTS[:]
        # A refused reload calls no hook.
        (tmp_path / "config.yaml").write_text("auth: [")
        assert not await router.reload()
        assert EVENTS == []
    assert EVENTS == ["v2-edited close", "v2-edited shutdown"]


def test_a_plugin_file_is_imported_under_its_path(tmp_path: Path) -> None:
    # Its loggers (logging.getLogger(__name__)) and classes name the file, not an invented
    # module name.
    (tmp_path / "lines_plugin.py").write_text(PLUGIN_FILE)
    config = load_with_plugins(
        tmp_path,
        ["lines_plugin.py"],
        default=["l"],
        sinks={"l": {"type": "lines", "path": "x.txt"}},
    )
    cls = config.sinks["l"].cls
    assert cls.__module__ == str(tmp_path / "lines_plugin.py")
    assert config.plugin_manager.provider("lines") == f"file {tmp_path / 'lines_plugin.py'}"


FAILING_LIFECYCLE = """\
from router import hookimpl


@hookimpl
async def router_startup(config):
    raise RuntimeError("Jane Doe")


@hookimpl
def router_shutdown(config):
    raise KeyError("Jane Doe")
"""


def test_a_daemon_whose_plugin_fails_to_start_serves_and_stops_cleanly(tmp_path: Path) -> None:
    plugin = tmp_path / "failing.py"
    plugin.write_text(FAILING_LIFECYCLE)
    sock = listening_socket()
    proc = RouterProcess(tmp_path / "config.yaml", sock)
    out = tmp_path / "out.jsonl"
    write_config(
        tmp_path,
        base_config(
            tmp_path,
            server={"listen": [proc.listen]},
            plugins=["failing.py"],
            sinks={"archive": {"type": "file", "path": str(out)}},
        ),
    )
    try:
        with proc:
            body = body_for(message_id="m-1")
            r = httpx.post(proc.base_url + "/webhook", content=body, headers=signed(body))
            assert r.status_code == 200
            wait_until(lambda: out.exists() and b"m-1" in out.read_bytes(), what="delivery")
            assert proc.terminate() == 0, proc.logs()
    finally:
        sock.close()
    logs = proc.logs()
    assert f"plugin {plugin}: hook router_startup raised RuntimeError at {plugin}:6" in logs
    assert f"plugin {plugin}: hook router_shutdown raised KeyError at {plugin}:11" in logs
    assert "Jane" not in logs
    assert "Traceback" not in logs


def test_an_installed_plugin_gets_its_options_by_its_entry_point_name(
    tmp_path: Path, site: Path
) -> None:
    install(site, "wr-opts", "1.4", {"opts": "wr_opts"}, wr_opts=OPTIONS_PLUGIN)
    env = {"PYTHONPATH": str(site)}
    path = cli_config(tmp_path, "", plugins="\n  - opts:\n      tenant: acme\n")
    done = cli("plugins", "--config", str(path), env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    at = lines.index("  opts  wr-opts 1.4 (entry point opts = wr_opts)")
    assert "      options: tenant, level" in lines[at + 1 : at + 3]
    assert "acme" not in done.stdout  # option names, never values

    path = cli_config(tmp_path, "", plugins="\n  - opts:\n      tenant: acme\n      colour: red\n")
    done = cli("check", "--config", str(path), env=env)
    assert done.returncode == 2
    assert problem_lines(done.stderr) == [
        f"{path}:11: plugins[0].opts.colour: unknown key (allowed: level, tenant)"
    ]
    # Switched off: its options are not checked, and check says they are not used.
    done = cli(
        "check", "--config", str(path), env={**env, "WEBHOOK_ROUTER_DISABLE_PLUGINS": "opts"}
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"warning: {path}:9: plugins[0].opts: plugin opts is switched off by"
        " WEBHOOK_ROUTER_DISABLE_PLUGINS: not used"
    ) in done.stdout
    # Not configured at all: its required option is said, with what to add.
    path = cli_config(tmp_path, "")
    done = cli("check", "--config", str(path), env=env)
    assert done.returncode == 2
    assert "plugin opts needs options (tenant): add `- opts: {…}` under plugins:" in done.stderr


RAISING_SINK = """\
from router import Sink, SinkOptions, hookimpl


class Raising(Sink[SinkOptions]):
    type = "raising"

    def __init__(self, options, context):
        super().__init__(options, context)
        context.metrics.counter("not a name!", "what the plugin counts")

    async def send(self, batch):
        return None


@hookimpl
def router_sink_types():
    return [Raising]
"""


@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_sink_whose_constructor_raises_is_a_problem_at_its_line(
    tmp_path: Path, command: str
) -> None:
    """Before: ``check`` printed OK, then a traceback; ``serve`` stopped with only
    "unexpectedly: ValueError". The sink is made once at load, so it is a problem like any
    other, naming the plugin's line."""
    (tmp_path / "raising.py").write_text(RAISING_SINK)
    path = cli_config(tmp_path, "  r: {type: raising}\n", plugins="[raising.py]")
    done = cli(command, "--config", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if " r: " in text)
    assert problem_lines(done.stderr) == [
        f"{path}:{line}: sinks.r.type: a raising sink cannot be made: ValueError: invalid metric"
        f" name 'not a name!': letters, digits and '_' only (at {tmp_path / 'raising.py'}:9)"
    ]
