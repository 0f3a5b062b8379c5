"""Plugins: sink types from inline plugins and from files named in the YAML, loading errors,
and observer hooks that must never break delivery."""

from __future__ import annotations

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
from router.testing import Recorder, SinkPlugin, body_for, eventually, running_router, write_config
from tests.conftest import base_config, post, recording_sink

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
