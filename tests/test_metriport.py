"""Asking Metriport to resend what it failed to deliver (``router.metriport``), against a fake
Metriport (``tests.metriport_peer``): a real HTTP server with its API and its sender."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from router.__main__ import main
from router.config import Config, load_config
from router.errors import ConfigError
from router.journal.sqlite import SQLiteJournal
from router.metrics import Metrics
from router.metriport import Resender
from router.testing import Recorder, body_for, running_router, write_config
from tests.conftest import FIXTURES, TEST_KEY, base_config, fixture_vectors
from tests.metriport_peer import FakeMetriport, Scripted, reordered
from tests.rawhttp import connect
from tests.test_slow_clients import hold

pytestmark = pytest.mark.anyio

API_KEY = "mp-api-key-for-tests-0001"


def metriport(url: str, key: str = API_KEY, **retry: Any) -> dict[str, Any]:
    """A ``metriport:`` section with short timers (the defaults are minutes)."""
    settings: dict[str, Any] = {
        "when": ["recovered", "start"],
        "every": "off",
        "poll": "50ms",
        "backoff": {"initial": "50ms", "max": "30s"},
    }
    settings.update(retry)
    return {"api_key": key, "base_url": url, "retry_failed": settings, "timeout": "5s"}


@pytest.fixture
def fake() -> Iterator[FakeMetriport]:
    with FakeMetriport(API_KEY, TEST_KEY) as peer:
        yield peer


def config_for(
    tmp_path: Path, fake: FakeMetriport, recorder: Recorder, name: str = "config.yaml", **retry: Any
) -> Config:
    """A router whose address is known before it starts, and given to the fake Metriport
    then: a resend may begin as soon as the router is up."""
    key = retry.pop("key", API_KEY)
    with socket.socket() as probe:  # a free port (the router binds it a moment later)
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    server = {"listen": [address], "path": "/webhook"}
    doc = base_config(tmp_path, server=server, metriport=metriport(fake.url, key, **retry))
    config = load_config(write_config(tmp_path, doc, name), extra_plugins=[recorder])
    fake.target = f"http://{address}/webhook"
    return config


def sample_bodies() -> list[bytes]:
    """Every sample body but the ping (Metriport stores no ping, nor devices messages; the
    router takes them all the same)."""
    return [body for name, body, _ in fixture_vectors() if name != "ping.json"]


def ids(bodies: list[bytes]) -> list[str]:
    return [json.loads(b)["meta"]["messageId"] for b in bodies]


async def send_all(fake: FakeMetriport, bodies: list[bytes]) -> None:
    for body in bodies:
        await anyio.to_thread.run_sync(fake.send, body)


# -- configuration ----------------------------------------------------------------------------


def test_defaults_and_off(tmp_path: Path) -> None:
    doc = base_config(tmp_path, metriport={"api_key": "k"})
    config = load_config(write_config(tmp_path, doc))
    assert config.metriport is not None
    assert config.metriport.base_url == "https://api.metriport.com"
    retry = config.metriport.retry_failed
    assert retry is not None
    assert (retry.when, retry.every, retry.poll) == (["recovered", "start"], 900.0, 15.0)
    doc["metriport"] = {"api_key": "k", "retry_failed": False}  # YAML's `off`
    assert load_config(write_config(tmp_path, doc)).metriport.retry_failed is None  # type: ignore[union-attr]
    (tmp_path / "off.yaml").write_text(
        (tmp_path / "config.yaml").read_text().replace("retry_failed: false", "retry_failed: off")
    )
    assert load_config(tmp_path / "off.yaml").metriport.retry_failed is None  # type: ignore[union-attr]


def test_bad_section_names_line_and_key(tmp_path: Path) -> None:
    doc = base_config(
        tmp_path,
        metriport={
            "api_key": {"env": "WR_TEST_MP_UNSET"},
            "base_url": "api.metriport.com",
            "retry_failed": {"when": ["recover"], "every": "soon", "nope": 1},
        },
    )
    path = write_config(tmp_path, doc)
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    text = str(e.value)
    lines = path.read_text().splitlines()

    def line(key: str) -> int:
        return next(i for i, t in enumerate(lines, 1) if t.strip().startswith(key))

    assert f":{line('api_key')}: metriport.api_key: environment variable WR_TEST_MP_UNSET" in text
    assert f":{line('base_url')}: metriport.base_url: expected an http(s) URL" in text
    assert "metriport.retry_failed.when[0]: Input should be 'recovered' or 'start'" in text
    assert f":{line('every')}: metriport.retry_failed.every: expected a duration" in text
    assert "metriport.retry_failed.nope: unknown key (allowed: backoff, every, poll, when)" in text


def test_operator_commands_need_no_api_key(tmp_path: Path) -> None:
    """`status`, `dead …` read no secret; `metriport …` reads the API key alone."""
    doc = base_config(tmp_path, metriport={"api_key": {"env": "WR_TEST_MP_UNSET"}})
    doc["auth"]["keys"] = [{"env": "WR_TEST_WEBHOOK_UNSET"}]
    path = write_config(tmp_path, doc)
    assert load_config(path, environ={}, secrets=False).metriport is not None
    config = load_config(path, environ={"WR_TEST_MP_UNSET": API_KEY}, secrets=("metriport",))
    assert config.metriport is not None
    assert config.metriport.api_key.get_secret_value() == API_KEY
    assert config.unresolved_secrets == ("auth.keys[0]",)


# -- automatic retry --------------------------------------------------------------------------


async def test_router_down_then_back_every_failed_message_arrives_once(
    tmp_path: Path, fake: FakeMetriport, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    config = config_for(tmp_path, fake, recorder)
    early = body_for("patient.discharge")
    down = [*sample_bodies(), *(body_for("patient.admit") for _ in range(5))]

    # Up first: a message delivered, which Metriport nevertheless counts as failed (it
    # answered after Metriport's timeout, say): resent, and deduplicated by the router.
    async with running_router(config) as router:
        await send_all(fake, [early])
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
    fake.fail_later(early)
    fake.target = None  # the router is down: Metriport's deliveries fail
    await send_all(fake, down)
    assert len(fake.failed) == len(down) + 1

    recorder = Recorder()
    config = config_for(tmp_path, fake, recorder)
    async with running_router(config) as router:
        await recorder.wait_for(lambda r: len(r.delivered) == len(down), within=60)
        await anyio.to_thread.run_sync(
            lambda: fake.wait_for(lambda f: f.processing == 0 and not f.failed)
        )
        await router.daemon.resender.wait_checks(1)
        metrics = (await httpx.AsyncClient().get(router.base_url + "/metrics")).text
    assert Counter(recorder.delivered_to("archive")) == Counter(ids(down))  # each once
    assert fake.retry_calls == 1 and fake.overlaps == 0
    assert "webhook_router_metriport_retries_requested_total 1.0" in metrics
    assert "webhook_router_metriport_failed_seen 0.0" in metrics  # at the last check
    assert f"metriport-retry-requested failed={len(down) + 1} reason=start" in caplog.text
    # The resent bodies are other bytes (reordered, no meta.data) of the same messages.
    lines = (tmp_path / "out" / "medical.consolidated-data.jsonl").read_text().splitlines()
    (stored,) = [json.loads(line)["body"] for line in lines]
    assert stored == json.loads(
        reordered((FIXTURES / "medical.consolidated-data.json").read_bytes())
    )


async def test_a_periodic_check_catches_failures_of_other_causes(
    tmp_path: Path, fake: FakeMetriport, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    config = config_for(tmp_path, fake, recorder, when=[], every="200ms")
    late = body_for("patient.admit")
    async with running_router(config):
        fake.fail_later(late)  # Metriport's timeout passed, say: no refusal, no restart
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
        await anyio.to_thread.run_sync(lambda: fake.wait_for(lambda f: f.processing == 0))
    assert fake.retry_calls == 1
    assert "metriport-retry-requested failed=1 reason=periodic" in caplog.text


async def test_two_routers_on_one_journal_make_one_retry_call(
    tmp_path: Path, fake: FakeMetriport
) -> None:
    down = [body_for("patient.admit") for _ in range(8)]
    await send_all(fake, down)  # no router yet
    first, second = Recorder(), Recorder()
    config_a = config_for(tmp_path, fake, first, "a.yaml")
    config_b = config_for(tmp_path, fake, second, "b.yaml")
    fake.target = f"http://{config_a.server.listen[0]}/webhook"  # A is up first
    async with running_router(config_a) as a, running_router(config_b) as b:
        await anyio.to_thread.run_sync(
            lambda: fake.wait_for(lambda f: len(f.sent_ok) == len(down) and f.processing == 0)
        )
        await a.daemon.resender.wait_checks(1)
        await b.daemon.resender.wait_checks(1)
    assert fake.retry_calls == 1 and fake.overlaps == 0
    assert sorted(ids(fake.sent_ok)) == sorted(ids(down))


async def test_the_journal_lock_keeps_a_second_router_out_of_a_check(
    tmp_path: Path, fake: FakeMetriport
) -> None:
    """Two routers' checks at the same moment: while the first holds the lock (its GET is
    held unanswered here), the second leaves at once instead of asking too, so the two can
    never both see failed > 0 and both call the retry."""
    fake.fail_later(body_for("patient.admit"))
    config = config_for(tmp_path, fake, Recorder())
    assert config.metriport is not None and config.metriport.retry_failed is not None
    settings = config.metriport.retry_failed
    journals = [SQLiteJournal(config.journal.path) for _ in range(2)]  # two routers' views
    for journal in journals:
        await journal.open()
    first, second = (
        Resender(lambda: config, j, Metrics(), f"router-{i}", lambda: True)
        for i, j in enumerate(journals)
    )
    fake.hold_gets = threading.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(first.check, "start", settings)
            await anyio.to_thread.run_sync(lambda: fake.wait_for(lambda f: f.gets_waiting == 1))
            with anyio.fail_after(10):  # without the lock it would wait for its own GET
                await second.check("start", settings)
            assert fake.gets_waiting == 1  # the second asked nothing
            fake.hold_gets.set()
    finally:
        for journal in journals:
            await journal.close()
    assert fake.retry_calls == 1 and fake.overlaps == 0


async def test_a_refusal_then_recovery_asks_for_a_resend(
    tmp_path: Path, fake: FakeMetriport
) -> None:
    """The router answers 503 (here: too many requests in progress); Metriport keeps the
    message as failed; once the router is ready again it asks for the resend."""
    recorder = Recorder()
    doc = base_config(
        tmp_path,
        server={"listen": ["127.0.0.1:0"], "path": "/webhook", "max_concurrent_requests": 1},
        metriport=metriport(fake.url, when=["recovered"]),
    )
    config = load_config(write_config(tmp_path, doc), extra_plugins=[recorder])
    refused = body_for("patient.admit")
    async with running_router(config) as router:
        fake.target = router.webhook_url
        held = body_for("patient.transfer")
        async with connect(router.base_url) as conn:
            await hold(conn, held)  # takes the one slot
            assert not await anyio.to_thread.run_sync(fake.send, refused)  # 503
            await conn.send(held)
            assert (await conn.answer()).status == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 2, within=30)
        await router.daemon.resender.wait_checks(1)
    assert recorder.delivered_to("archive")[-1] == ids([refused])[0]
    assert fake.retry_calls == 1


async def test_wrong_api_key_is_a_clear_error_and_no_storm(
    tmp_path: Path, fake: FakeMetriport, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    config = config_for(tmp_path, fake, recorder, key="not-the-key")
    fake.fail_later(body_for("patient.admit"))
    async with running_router(config) as router:
        resender = router.daemon.resender
        await resender.wait_checks(1)
        for _ in range(20):  # more refusals: they do not shorten the wait after a refused key
            resender.refused()
        await anyio.sleep(0)
    assert resender.last_error == "Metriport refused the API key (401): check metriport.api_key"
    assert list(resender.waits) == [30.0]  # backoff.max at once
    assert fake.calls() == [("GET", "/settings/webhook", 401)]
    assert "Metriport refused the API key (401)" in caplog.text
    assert "not-the-key" not in caplog.text


async def test_errors_and_429_back_off(tmp_path: Path, fake: FakeMetriport) -> None:
    recorder = Recorder()
    config = config_for(tmp_path, fake, recorder)
    fake.fail_later(body_for("patient.admit"))
    fake.script(500, 503, Scripted(429, {"retry-after": "0.5"}))
    async with running_router(config) as router:
        await anyio.to_thread.run_sync(lambda: fake.wait_for(lambda f: f.retry_calls == 1))
        await anyio.to_thread.run_sync(lambda: fake.wait_for(lambda f: f.processing == 0))
        resender = router.daemon.resender
        await resender.wait_checks(4)
    # Doubling from backoff.initial; a 429's Retry-After when it asks for longer.
    assert list(resender.waits) == [0.05, 0.1, 0.5]
    assert [c[2] for c in fake.calls("GET")][:4] == [500, 503, 429, 200]
    assert fake.retry_calls == 1


async def test_requests_processing_are_followed_before_any_call(
    tmp_path: Path, fake: FakeMetriport
) -> None:
    """Metriport is still resending (the dashboard's Retry, say): the router waits for it to
    finish and then finds nothing failed, so it never overlaps a retry."""
    down = [body_for("patient.admit") for _ in range(3)]
    await send_all(fake, down)
    fake.hold_resend = True
    async with httpx.AsyncClient() as client:  # someone pressed Retry meanwhile
        r = await client.post(fake.url + "/settings/webhook/retry", headers={"x-api-key": API_KEY})
        assert r.status_code == 200
    recorder = Recorder()
    config = config_for(tmp_path, fake, recorder)
    async with running_router(config) as router:
        await anyio.to_thread.run_sync(
            lambda: fake.wait_for(lambda f: len(f.calls("GET")) >= 2)  # following
        )
        fake.release()
        await router.daemon.resender.wait_checks(1)
    assert fake.retry_calls == 1 and fake.overlaps == 0
    assert sorted(recorder.delivered_to("archive")) == sorted(ids(down))


# -- operator commands ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    """``webhook-router ARGS`` in this process (the tests' fake Metriport runs in threads)."""

    def run(*args: str, env: dict[str, str] | None = None) -> Ran:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in (env or {}).items():
                mp.setenv(name, value)
            code = main(list(args))
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return run


def cli_config(tmp_path: Path, url: str) -> Path:
    """A configuration whose keys are all in the environment, and a journal that exists."""
    doc = base_config(tmp_path, metriport={"api_key": {"env": "WR_TEST_MP_KEY"}, "base_url": url})
    doc["auth"]["keys"] = [{"env": "WR_TEST_WEBHOOK_UNSET"}]
    path = write_config(tmp_path, doc)

    async def create() -> None:
        journal = SQLiteJournal(tmp_path / "journal")
        await journal.open()
        await journal.close()

    anyio.run(create)
    return path


def test_status_shows_the_four_fields_and_the_last_retry(
    tmp_path: Path, run: Callable[..., Ran]
) -> None:
    with FakeMetriport(API_KEY, TEST_KEY) as fake:
        path = cli_config(tmp_path, fake.url)
        for _ in range(2):
            fake.send(body_for("patient.admit"))
        env = {"WR_TEST_MP_KEY": API_KEY}
        before = run("metriport", "status", "--config", str(path), env=env)
        assert before.returncode == 0, before.stderr
        assert "requests failed:      2" in before.stdout
        assert "requests processing:  0" in before.stdout
        assert "webhook enabled:      yes" in before.stdout
        assert "last asked to resend: never" in before.stdout

        asked = run("metriport", "retry", "--config", str(path), env=env)
        assert asked.returncode == 0, asked.stderr
        assert "asked Metriport to resend 2 failed deliveries" in asked.stdout
        after = run("metriport", "status", "--json", "--config", str(path), env=env)
    st = json.loads(after.stdout)
    assert st["last_retry"]["reason"] == "operator" and st["last_retry"]["failed"] == 2
    assert set(st["settings"]) == {"enabled", "status_detail", "processing", "failed"}
    assert fake.retry_calls == 1
    assert API_KEY not in before.stdout + before.stderr + asked.stdout + after.stdout


def test_retry_refuses_while_processing_unless_forced(
    tmp_path: Path, run: Callable[..., Ran]
) -> None:
    with FakeMetriport(API_KEY, TEST_KEY) as fake:
        path = cli_config(tmp_path, fake.url)
        fake.send(body_for("patient.admit"))
        fake.send(body_for("patient.admit"))
        fake.hold_resend = True
        env = {"WR_TEST_MP_KEY": API_KEY}
        assert run("metriport", "retry", "--config", str(path), env=env).returncode == 0
        refused = run("metriport", "retry", "--config", str(path), env=env)
        assert refused.returncode == 1
        assert "Metriport is still resending (2 request(s) processing)" in refused.stderr
        assert "--force" in refused.stderr
        assert fake.retry_calls == 1
        forced = run("metriport", "retry", "--force", "--config", str(path), env=env)
        assert forced.returncode == 0, forced.stderr
        assert fake.retry_calls == 2 and fake.overlaps == 1  # what --force risks


def test_wrong_key_and_missing_section_are_clear_errors(
    tmp_path: Path, run: Callable[..., Ran]
) -> None:
    with FakeMetriport(API_KEY, TEST_KEY) as fake:
        path = cli_config(tmp_path, fake.url)
        for verb in ("status", "retry"):
            r = run("metriport", verb, "--config", str(path), env={"WR_TEST_MP_KEY": "wrong"})
            assert (r.returncode, r.stdout) == (1, "")
            assert (
                r.stderr == "error: Metriport refused the API key (401): check metriport.api_key\n"
            )
        missing = run("metriport", "status", "--config", str(path))
        assert missing.returncode == 2
        assert "metriport.api_key: environment variable WR_TEST_MP_KEY is not set" in missing.stderr
        # The other operator commands read no secret: they work without the key.
        assert run("status", "--config", str(path)).returncode == 0
    doc = base_config(tmp_path)
    r = run("metriport", "status", "--config", str(write_config(tmp_path, doc, "plain.yaml")))
    assert r.returncode == 2
    assert "has no metriport: section" in r.stderr


def test_check_describes_the_section_without_the_key(
    tmp_path: Path, run: Callable[..., Ran]
) -> None:
    path = cli_config(tmp_path, "https://api.sandbox.metriport.com")
    env = {"WR_TEST_MP_KEY": API_KEY, "WR_TEST_WEBHOOK_UNSET": TEST_KEY}
    r = run("check", "--config", str(path), env=env)
    assert r.returncode == 0, r.stderr
    assert (
        "metriport: https://api.sandbox.metriport.com, asks to resend failed deliveries on"
        " recovered and start and every 900s (follows processing every 15s)"
    ) in r.stdout
    assert API_KEY not in r.stdout + r.stderr
