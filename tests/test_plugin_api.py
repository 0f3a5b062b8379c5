"""The plugin author's API: body access that never does disk I/O on the event loop, parsed
bodies, ``router.testing.make_sink``, metrics and logging for sinks, partial-failure maps, and
the public surface (``router.__all__``, what the built-in sinks import).

Body files are watched with an audit hook (``sys.addaudithook``): every ``open`` of a file in
the journal's ``bodies/`` folder is recorded with the thread that made it, so a test can say
truthfully that no body file was opened on the event loop's thread, and that it was opened at
all (elsewhere), instead of guessing from timings.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from plugins.file import FileSink
from router import (
    ConfigError,
    ConfigPath,
    Duration,
    PermanentError,
    SendResult,
    Sink,
    SinkContext,
    SinkOptions,
)
from router.config import Config, load_config
from router.message import BodyNotInMemory, Message
from router.spool import SPOOL_THRESHOLD
from router.testing import (
    Recorder,
    RouterProcess,
    SinkPlugin,
    body_for,
    listening_socket,
    make_sink,
    running_router,
    wait_until,
    write_config,
)
from tests.conftest import base_config, deliveries, post, signed
from tests.http_peer import HttpPeer
from tests.kafka_peer import TansuBroker

pytestmark = pytest.mark.anyio


class _Opens:
    """The opens for reading of files under ``folder`` while watching: (path, thread id)."""

    #: The watches the audit hook feeds (the hook is installed once per process).
    watching: list[_Opens] = []

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)
        self.calls: list[tuple[str, int]] = []

    def on_loop(self, loop_thread: int) -> list[str]:
        return [path for path, thread in self.calls if thread == loop_thread]

    def off_loop(self, loop_thread: int) -> list[str]:
        return [path for path, thread in self.calls if thread != loop_thread]


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not _Opens.watching or not isinstance(args[0], str | bytes | Path):
        return
    path, mode, flags = os.fsdecode(args[0]), args[1], args[2]
    # Opens for reading only: ``open(path, "rb")`` (a mode) or ``os.open`` (flags alone).
    reading = "r" in mode and "+" not in mode if mode else flags & os.O_ACCMODE == os.O_RDONLY
    for watch in _Opens.watching:
        if reading and path.startswith(watch.folder):
            watch.calls.append((path, threading.get_ident()))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one is idle unless watching


@pytest.fixture
def body_opens(tmp_path: Path) -> Iterator[Callable[[Path], _Opens]]:
    def watch(folder: Path) -> _Opens:
        opens = _Opens(folder)
        _Opens.watching.append(opens)
        return opens

    yield watch
    _Opens.watching.clear()


def big_body(message_id: str, size: int = 2 * SPOOL_THRESHOLD) -> bytes:
    """A body past the spool threshold (kept in a file), with patients to summarise."""
    entry = {"resource": {"resourceType": "Observation", "note": "x" * 1000}}
    n = size // 1050
    body = body_for(
        "medical.consolidated-data",
        message_id,
        patients=[{"patientId": "p-1", "status": "completed", "bundle": {"entry": [entry] * n}}],
    )
    assert len(body) > SPOOL_THRESHOLD
    return body


# -- Bug 4: no body file is read on the event loop -------------------------------------------


async def test_slack_and_kafka_never_read_a_spooled_body_on_the_event_loop(
    make_config: Callable[..., Config], tmp_path: Path, body_opens: Callable[[Path], _Opens]
) -> None:
    recorder = Recorder()
    loop_thread = threading.get_ident()  # running_router runs the daemon in this loop
    with TansuBroker(tmp_path) as broker, HttpPeer() as slack:
        config = make_config(
            extra_plugins=(recorder,),
            default=["chat", "bus"],
            sinks={
                "chat": {"type": "slack", "webhook_url": slack.url("/services/T/B/hook")},
                "bus": {
                    "type": "kafka",
                    "bootstrap_servers": broker.bootstrap,
                    "topic": "big",
                    "max_message_bytes": 8 * SPOOL_THRESHOLD,
                },
            },
        )
        opens = body_opens(config.journal.path / "bodies")
        body = big_body("big-1")
        async with running_router(config) as router, httpx.AsyncClient(timeout=60) as client:
            assert (await post(client, router.webhook_url, body)).status_code == 200
            await recorder.wait_for(lambda r: len(r.delivered) == 2 or bool(r.failed))
        assert recorder.failed == []
        (request,) = slack.requests
        (record,) = await broker.consume("big")
    # Both sinks read the file: Kafka has the exact body, and the Slack summary was made from
    # the parsed body ...
    assert record.value == body
    assert b"patients: 1" in request.body and b"completed" in request.body
    # ... and no read of it happened on the event loop's thread.
    assert len(opens.off_loop(loop_thread)) >= 2, opens.calls
    assert opens.on_loop(loop_thread) == []


# -- Message's accessors ------------------------------------------------------------------------


def spooled(tmp_path: Path, body: bytes) -> Message:
    path = tmp_path / "bodies" / "1.json"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(body)
    return Message("m-1", "patient.admit", None, body_file=path, body_size=len(body))


async def test_the_synchronous_accessors_refuse_a_body_in_a_file_saying_what_to_use(
    tmp_path: Path, body_opens: Callable[[Path], _Opens]
) -> None:
    message = spooled(tmp_path, body_for("patient.admit", "m-1"))
    opens = body_opens(tmp_path / "bodies")
    with pytest.raises(BodyNotInMemory, match=r"use await message\.read_body\(\)"):
        _ = message.body
    with pytest.raises(BodyNotInMemory, match=r"use await message\.read_json\(\)"):
        message.json()
    assert opens.calls == []  # refused without touching the file
    # Retryable, so a sink that uses them on a large body delays its messages, never loses them.
    from router import RetryableError

    assert isinstance(BodyNotInMemory("body", 1), RetryableError)


async def test_the_async_accessors_read_any_body_in_worker_threads(
    tmp_path: Path, body_opens: Callable[[Path], _Opens]
) -> None:
    body = b"\xef\xbb\xbf" + body_for("patient.admit", "m-1", patients=[{"n": 1}, {"n": 2.5}])
    message = spooled(tmp_path, body)
    in_memory = Message("m-1", "patient.admit", None, body)
    opens = body_opens(tmp_path / "bodies")
    loop_thread = threading.get_ident()

    assert await message.read_body() == body
    assert (await message.read_json())["patients"] == [{"n": 1}, {"n": 2.5}]
    assert [b"".join([c async for c in message.aiter_body(7)])] == [body]
    for m in (message, in_memory):
        # A small chunk size: values and the BOM cross chunk boundaries.
        assert [v async for v in m.aiter_json("patients.item", size=2)] == [{"n": 1}, {"n": 2.5}]
        assert [v async for v in m.aiter_json("meta.messageId")] == ["m-1"]
    assert len(opens.calls) == 5 and opens.on_loop(loop_thread) == []


async def test_json_is_parsed_once_and_shared_by_later_attempts() -> None:
    message = Message("m-1", "patient.admit", None, body_for("patient.admit", "m-1"))
    doc = message.json()
    assert doc["meta"]["messageId"] == "m-1"
    assert message.json() is doc
    assert await message.read_json() is doc
    assert message.with_attempt(2).json() is doc


async def test_a_body_that_is_not_json_is_a_value_error_from_every_parser(tmp_path: Path) -> None:
    for message in (Message("m", "t", None, b'{"a": [1,'), spooled(tmp_path, b'{"a": [1,')):
        with pytest.raises(ValueError, match="not valid JSON"):
            _ = [v async for v in message.aiter_json("a.item")]
        with pytest.raises(ValueError):
            await message.read_json()


# -- The partial-failure map ----------------------------------------------------------------


class _Confused(Sink[SinkOptions]):
    """Returns a failure map naming a message that is not in the batch (or another malformed
    result), as a sink that mixed up its batches would."""

    type = "confused"
    results: ClassVar[dict[str, Any]] = {
        "stray": lambda batch: {"not-" + batch[0].message_id: PermanentError("x")},
        "not-an-exception": lambda batch: {batch[0].message_id: "failed"},
        "not-a-mapping": lambda batch: [m.message_id for m in batch],
    }

    async def send(self, batch: Sequence[Message]) -> SendResult:
        result: SendResult = self.results[self.name](batch)
        return result


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("stray", "its failure map names 1 message id(s) not in the batch"),
        ("not-an-exception", "its failure map holds a value that is not an exception"),
        ("not-a-mapping", "send returned a list, not a mapping of failures or None"),
    ],
)
async def test_a_malformed_partial_failure_map_fails_the_batch_never_a_silent_success(
    make_config: Callable[..., Config], case: str, says: str
) -> None:
    recorder = Recorder()
    config = make_config(
        extra_plugins=(recorder, SinkPlugin(_Confused)),
        default=[case],
        sinks={case: {"type": "confused", "retry": {"max_attempts": 2, "initial": "10ms"}}},
    )
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for i in range(2):
            r = await post(client, router.webhook_url, body_for(message_id=f"m-{i}"))
            assert r.status_code == 200
        await recorder.wait_for(lambda r: len(r.dead) == 2)
    assert recorder.delivered == []
    assert len(recorder.failed) == 2  # the first attempt of each was retried, as a failure
    expected = f"RetryableError: sink broke the send contract: {says}"
    assert deliveries(config) == [
        ("m-0", case, "dead", 2, expected),
        ("m-1", case, "dead", 2, expected),
    ]


# -- Metrics and logging for sinks ------------------------------------------------------------

METERED_PLUGIN = """
import os

from router import Sink, SinkOptions, hookimpl


class MeteredSink(Sink[SinkOptions]):
    type = "metered"

    def __init__(self, options, context):
        super().__init__(options, context)
        self.sent = context.metrics.counter("metered_sent", "Messages taken.", ["kind"])
        self.log = context.logger

    async def send(self, batch):
        for message in batch:
            self.sent.labels(kind=message.type).inc()
            self.log.info("took", id=message.message_id, pid=os.getpid())


@hookimpl
def router_sink_types():
    return [MeteredSink]
"""


def metered_config(directory: Path, listen: str, **server: Any) -> dict[str, Any]:
    (directory / "metered.py").write_text(METERED_PLUGIN)
    return base_config(
        directory,
        server={"listen": [listen], **server},
        plugins=["./metered.py"],
        default=["meter"],
        sinks={"meter": {"type": "metered"}},
    )


def metered_sent(metrics_text: str) -> float:
    """The sum of the plugin's counter over its series in a /metrics answer."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith('metered_sent_total{kind="patient.admit",sink="meter"}')
    )


async def test_a_sinks_metrics_reach_metrics_and_survive_a_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.sink")
    doc = metered_config(tmp_path, "127.0.0.1:0")
    config = load_config(write_config(tmp_path, doc), extra_plugins=[recorder := Recorder()])
    async with running_router(config) as router, httpx.AsyncClient() as client:
        assert (await post(client, router.webhook_url, body_for(message_id="m-1"))).is_success
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
        scraped = (await client.get(router.base_url + "/metrics")).text
        assert metered_sent(scraped) == 1
        assert "# HELP metered_sent_total Messages taken." in scraped
        (line,) = [r for r in caplog.records if r.name == "router.sink.meter"]
        assert line.getMessage() == f"took sink=meter id=m-1 pid={os.getpid()}"

        # A changed sink is rebuilt: it gets the metric it registered before, counting on.
        doc["sinks"]["meter"]["timeout"] = "5s"
        write_config(tmp_path, doc)
        assert await router.reload()
        assert (await post(client, router.webhook_url, body_for(message_id="m-2"))).is_success
        await recorder.wait_for(lambda r: len(r.delivered) == 2)
        assert metered_sent((await client.get(router.base_url + "/metrics")).text) == 2


def test_a_sinks_metrics_add_up_over_workers_and_its_log_lines_name_it(tmp_path: Path) -> None:
    sock = listening_socket()
    proc = RouterProcess(tmp_path / "config.yaml", sock)
    try:
        write_config(tmp_path, metered_config(tmp_path, proc.listen, workers=2))
        proc.start()
        ids: list[str] = []

        def took() -> dict[str, str]:
            """Message id → pid of the worker whose sink took it, from the sink's log lines."""
            return dict(re.findall(r"took sink=meter id=(m-\d+) pid=(\d+)", proc.logs()))

        with httpx.Client(timeout=10) as client:
            # New connections, until both workers' sinks took some (the kernel spreads them).
            while len(set(took().values())) < 2:
                assert len(ids) < 500, "every message went to one worker"
                ids.append(f"m-{len(ids)}")
                body = body_for(message_id=ids[-1])
                headers = {**signed(body), "connection": "close"}
                r = client.post(proc.base_url + "/webhook", content=body, headers=headers)
                assert r.status_code == 200
                wait_until(lambda: ids[-1] in took(), 30, "the sink to take it")
            # One /metrics for the service: whichever worker answers counts both workers'.
            for _ in range(4):
                assert metered_sent(client.get(proc.base_url + "/metrics").text) == len(ids)
        assert sorted(took()) == sorted(ids)
        assert proc.terminate() == 0
    finally:
        proc.kill()
        sock.close()


def test_sink_metrics_are_idempotent_and_refuse_clashes() -> None:
    registry = CollectorRegistry()
    a, b = (
        SinkContext("a", Path("."), 1, 1, 1, registry=registry),
        SinkContext("b", Path("."), 1, 1, 1, registry=registry),
    )
    first = a.metrics.counter("things", "Things.", ["kind"])
    assert b.metrics.counter("things", "Things.", ["kind"]).metric is first.metric
    first.labels(kind="x").inc()
    b.metrics.counter("things", "Things.", ["kind"]).labels("x").inc(2)
    assert registry.get_sample_value("things_total", {"sink": "a", "kind": "x"}) == 1
    assert registry.get_sample_value("things_total", {"sink": "b", "kind": "x"}) == 2
    with pytest.raises(ValueError, match="already registered as a counter with labels"):
        a.metrics.gauge("things", "Things.")
    with pytest.raises(ValueError, match="webhook_router_ is the router's"):
        a.metrics.counter("webhook_router_deliveries", "Mine.")
    with pytest.raises(ValueError, match="invalid metric name"):
        a.metrics.histogram("bad-name", "Bad.")


# -- router.testing.make_sink ---------------------------------------------------------------


class _PathOptions(SinkOptions):
    folder: ConfigPath
    token: SecretStr
    pause: Duration = 1.0


class _PathSink(Sink[_PathOptions]):
    type = "paths"
    Options = _PathOptions
    default_batch_size = 7


def test_make_sink_builds_a_sink_as_the_router_does(tmp_path: Path) -> None:
    sink = make_sink(
        _PathSink,
        {"folder": "out", "token": {"env": "T"}, "pause": "250ms", "timeout": "5s"},
        base_dir=tmp_path,
        name="paths-1",
        environ={"T": "secret"},
    )
    assert isinstance(sink, _PathSink)
    assert sink.options.folder == tmp_path / "out"
    assert sink.options.token.get_secret_value() == "secret"
    assert sink.options.pause == 0.25
    ctx = sink.context
    assert (ctx.name, ctx.base_dir, ctx.timeout, ctx.batch_size, ctx.concurrency) == (
        "paths-1",
        tmp_path,
        5.0,
        7,
        1,
    )
    ctx.metrics.counter("paths_made", "Made.").labels().inc()
    assert ctx.registry.get_sample_value("paths_made_total", {"sink": "paths-1"}) == 1


def test_make_sink_reports_bad_options_as_the_router_does(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        make_sink(
            _PathSink,
            {"folder": "out", "token": {"env": "UNSET"}, "colour": 1},
            base_dir=tmp_path,
            environ={},
        )
    text = str(caught.value)
    assert f"{tmp_path / 'make_sink.yaml'}:" in text
    assert "sinks.sink.colour: unknown key (allowed:" in text
    assert "UNSET" in text


def test_make_sink_builds_a_built_in_sink_too(tmp_path: Path) -> None:
    sink = make_sink(FileSink, {"path": "out/{type}.jsonl"}, base_dir=tmp_path)
    assert isinstance(sink, FileSink) and sink.options.path == tmp_path / "out/{type}.jsonl"


def _readme_block(first_line: str) -> str:
    """The README's fenced Python block whose first line is ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (found,) = [b for b in blocks if b.startswith(first_line + "\n")]
    return found


def test_the_readme_sink_test_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "my_webhook_sinks.py").write_text(_readme_block("# my_webhook_sinks.py"))
    (tmp_path / "test_my_webhook_sinks.py").write_text(_readme_block("# test_my_webhook_sinks.py"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_my_webhook_sinks.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


# -- The public surface ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def documented_api() -> dict[str, set[str]]:
    """The names README's "The public API" subsection lists, by module: the bullets under
    each "From `module`:" line, names before the bullet's first ": "."""
    text = README.read_text()
    section = text.split("### The public API\n", 1)[1].split("\n#", 1)[0]
    found: dict[str, set[str]] = {}
    module = None
    for line in section.splitlines():
        if m := re.fullmatch(r"From `([\w.]+)`:", line):
            module = m[1]
            found[module] = set()
        elif line.startswith("- ") and module is not None:
            found[module] |= set(re.findall(r"`(\w+)`", line[2:].split(": ", 1)[0]))
    return found


def test_the_public_api_is_exactly_what_the_readme_lists() -> None:
    import router
    import router.sinkutils
    import router.testing

    documented = documented_api()
    assert set(documented) == {"router", "router.sinkutils", "router.testing"}
    assert sorted(router.__all__) == sorted(documented["router"])
    assert sorted(router.sinkutils.__all__) == sorted(documented["router.sinkutils"])
    assert sorted(router.testing.__all__) == sorted(documented["router.testing"])
    for module in (router, router.sinkutils, router.testing):
        assert all(hasattr(module, name) for name in module.__all__), module.__name__


def router_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every import from ``router`` or a ``router.*`` module in a file,
    wherever it is (inside functions too); ``import router.x`` counts as (``router.x``, "")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "router" or node.module.startswith("router."):
                found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "router"]
    return found


def test_the_built_in_sinks_use_only_the_public_api() -> None:
    allowed = documented_api()
    allowed.pop("router.testing")  # for tests, not for sinks
    files = sorted((ROOT / "plugins").glob("*.py"))
    assert {p.name for p in files} >= {"file.py", "http.py", "kafka.py", "slack.py", "download.py"}
    outside = [
        f"{path.name}: from {module} import {name or '(module)'}"
        for path in files
        for module, name in router_imports(path)
        if name not in allowed.get(module, set())
    ]
    assert outside == []
    # The check itself sees a private import (so it cannot pass by seeing nothing).
    probe = ROOT / "plugins" / "file.py"
    assert ("router", "Sink") in router_imports(probe)


def test_a_sink_logger_names_the_sink_and_escapes_control_characters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="router.sink")
    log = SinkContext("audit", Path("."), 1, 1, 1).logger
    log.warning("answered %d\nforged line", 503, id="m-1")
    log.debug("quiet")
    (warning, debug) = caplog.records
    assert warning.name == "router.sink.audit" and warning.levelno == logging.WARNING
    assert warning.getMessage() == "answered 503\\nforged line sink=audit id=m-1"
    assert debug.getMessage() == "quiet sink=audit"
