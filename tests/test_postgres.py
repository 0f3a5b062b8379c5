"""Several routers on one real PostgreSQL journal, end to end over loopback sockets: dedupe
across routers, every message delivered once per sink whichever router took it, ordered lanes
kept across routers, wake-ups through LISTEN/NOTIFY and by polling."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from router import (
    Message,
    PermanentError,
    RetryableError,
    SendResult,
    Sink,
    SinkOptions,
    dispatcher,
)
from router.config import Config, load_config
from router.journal import Filter, journal_for
from router.testing import Recorder, RunningRouter, SinkPlugin, body_for, running_router
from router.testing import write_config as write_yaml
from tests.conftest import NeverOpens, PgDatabase, base_config, post

pytestmark = pytest.mark.anyio


class Delivered:
    """What every router's ``rec`` sink received: (router, message id, order key)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.bodies: list[bytes] = []
        self.changed = anyio.Event()

    def ids(self) -> list[str]:
        return [mid for _, mid, _ in self.rows]

    async def wait_for(self, predicate: Callable[[Delivered], bool], within: float = 30) -> None:
        with anyio.fail_after(within):
            while not predicate(self):
                self.changed = anyio.Event()
                await self.changed.wait()


def recording(delivered: Delivered, router: str) -> type[Sink[Any]]:
    class Recording(Sink[SinkOptions]):
        type = "rec"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            for m in batch:
                chunks = [chunk async for chunk in m.aiter_body()]
                delivered.bodies.append(b"".join(chunks))
                delivered.rows.append((router, m.message_id, m.order_key))
            delivered.changed.set()
            return None

    return Recording


def pg_config(tmp_path: Path, uri: str, name: str, delivered: Delivered, **extra: Any) -> Config:
    folder = tmp_path / name
    folder.mkdir()
    postgres = {"dsn": uri, "pool": 4, **extra.pop("postgres", {})}
    doc = base_config(
        folder,
        journal={"path": str(folder / "spool"), "postgres": postgres, **extra.pop("journal", {})},
        sinks={"rec": {"type": "rec", **extra.pop("sink", {})}},
        default=["rec"],
        **extra,
    )
    path = write_yaml(folder, doc)
    return load_config(path, extra_plugins=(SinkPlugin(recording(delivered, name)), Recorder()))


@contextlib.asynccontextmanager
async def routers(*configs: Config) -> AsyncIterator[list[RunningRouter]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_router(c)) for c in configs]


async def test_two_routers_share_the_journal_dedupe_and_deliver_each_message_once(
    tmp_path: Path, postgres_uri: str
) -> None:
    delivered = Delivered()
    a = pg_config(tmp_path, postgres_uri, "a", delivered)
    b = pg_config(tmp_path, postgres_uri, "b", delivered)
    async with routers(a, b) as (ra, rb), httpx.AsyncClient() as client:
        # The same message id at both routers at the same moment: both 200, stored once.
        same = body_for("patient.admit", "same-1")
        answers = []

        async def send(url: str, body: bytes) -> None:
            answers.append((await post(client, url, body)).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(send, ra.webhook_url, same)
                tg.start_soon(send, rb.webhook_url, same)
        assert answers == [200] * 10
        ids = [f"m-{i}" for i in range(40)]
        async with anyio.create_task_group() as tg:
            for i, mid in enumerate(ids):
                tg.start_soon(send, (ra, rb)[i % 2].webhook_url, body_for("patient.admit", mid))
        await delivered.wait_for(lambda d: set(d.ids()) >= {"same-1", *ids})
        status = (await ra.daemon.journal.status()).messages
    assert sorted(delivered.ids()) == sorted(["same-1", *ids])  # each once
    assert status == 41


@pytest.mark.parametrize("listen", [True, False])
async def test_work_left_by_another_process_reaches_an_idle_router_by_notify_or_by_polling(
    tmp_path: Path, postgres_uri: str, listen: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dead letter retried from outside (as `webhook-router dead retry` does, through its own
    # journal connection) must reach the router's idle runner. With LISTEN/NOTIFY the
    # notification alone wakes it (polling is made too slow to matter); with
    # ``listen: false`` (PgBouncer) it polls.
    monkeypatch.setattr(dispatcher, "IDLE_POLL", 3600.0 if listen else 0.05)
    delivered = Delivered()
    refusing = {"on": True}

    class Refusing(Sink[SinkOptions]):
        type = "rec"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            if refusing["on"]:
                raise PermanentError("not now")
            delivered.rows.extend(("a", m.message_id, m.order_key) for m in batch)
            delivered.changed.set()
            return None

    folder = tmp_path / "a"
    folder.mkdir()
    postgres = {"dsn": postgres_uri, "pool": 3, "listen": listen}
    doc = base_config(
        folder,
        journal={"path": str(folder / "spool"), "postgres": postgres},
        sinks={"rec": {"type": "rec"}},
        default=["rec"],
    )
    recorder = Recorder()
    config = load_config(write_yaml(folder, doc), extra_plugins=(SinkPlugin(Refusing), recorder))
    async with routers(config) as (ra,), httpx.AsyncClient() as client:
        assert (await post(client, ra.webhook_url, body_for(message_id="d-1"))).status_code == 200
        await recorder.wait_for(lambda r: len(r.dead) == 1)
        refusing["on"] = False
        operator = journal_for(config.journal)
        await operator.open(maintenance=False, create=False)
        try:
            await operator.retry_dead(await operator.dead_letters(Filter()))
        finally:
            await operator.close()
        await delivered.wait_for(lambda d: d.ids() == ["d-1"], within=20)


async def test_ordered_lanes_keep_receipt_order_across_routers_even_through_failures(
    tmp_path: Path, postgres_uri: str
) -> None:
    # One patient's messages land on alternating routers; the sink fails the second message
    # twice first. It still reaches the sink in receipt order, and another patient's messages
    # are not held back by it.
    delivered = Delivered()
    failures: dict[str, int] = {"p1-1": 2}

    def flaky(router: str) -> type[Sink[Any]]:
        class Flaky(Sink[SinkOptions]):
            type = "rec"

            async def send(self, batch: Sequence[Message]) -> SendResult:
                out: dict[str, BaseException] = {}
                for m in batch:
                    if failures.get(m.message_id, 0) > 0:
                        failures[m.message_id] -= 1
                        out[m.message_id] = RetryableError("not yet", retry_after=0.05)
                    else:
                        delivered.rows.append((router, m.message_id, m.order_key))
                delivered.changed.set()
                return out

        return Flaky

    configs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        doc = base_config(
            folder,
            journal={"path": str(folder / "spool"), "postgres": {"dsn": postgres_uri, "pool": 3}},
            sinks={"rec": {"type": "rec", "ordered": True, "concurrency": 4}},
            default=["rec"],
        )
        configs.append(
            load_config(write_yaml(folder, doc), extra_plugins=(SinkPlugin(flaky(name)),))
        )
    sent: dict[str, list[str]] = {"p1": [], "p2": []}
    async with routers(*configs) as rs, httpx.AsyncClient() as client:
        for i in range(6):
            for patient in ("p1", "p2"):
                mid = f"{patient}-{i}"
                body = body_for("patient.admit", mid, payload={"patientId": patient})
                assert (await post(client, rs[i % 2].webhook_url, body)).status_code == 200
                sent[patient].append(mid)
        await delivered.wait_for(lambda d: len(d.rows) == 12)
    for patient, ids in sent.items():
        assert [mid for _, mid, key in delivered.rows if key == patient] == ids
    assert {router for router, _, _ in delivered.rows} == {"a", "b"}  # both delivered


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_large_body_received_by_one_router_is_read_whole_by_another(
    tmp_path: Path, postgres_uri: str, ordered: bool
) -> None:
    # Past the spool threshold the body goes to the database in parts; the sink gets it whole
    # (handed over at once, or read back from the journal for an ordered sink), and another
    # router (its own spool folder, nothing shared on disk) streams it back byte for byte.
    delivered = Delivered()
    a = pg_config(tmp_path, postgres_uri, "a", delivered, sink={"ordered": ordered})
    pad = "x" * (3 * 1024 * 1024 + 17)
    body = body_for("medical.consolidated-data", "big-1", patients=[{"patientId": "p"}], pad=pad)
    async with routers(a) as (ra,), httpx.AsyncClient(timeout=60) as client:
        assert (await post(client, ra.webhook_url, body)).status_code == 200
        await delivered.wait_for(lambda d: d.ids() == ["big-1"])
        assert delivered.bodies == [body]
        assert not list((tmp_path / "a" / "spool" / "bodies").iterdir())  # in the database
    other = tmp_path / "other"
    journal = journal_for(
        load_config(
            write_yaml(
                tmp_path,
                base_config(other, journal={"path": str(other), "postgres": {"dsn": postgres_uri}}),
                name="other.yaml",
            )
        ).journal
    )
    await journal.open()
    try:
        (stored,) = [m for m in (await journal.stored_messages(0, 4e9))]
        (message,) = (await journal.messages([stored.seq])).values()
        assert message.body_file is not None and message.body_file.is_relative_to(other)
        assert message.body_size == len(body)
        assert b"".join(message.body_chunks()) == body
    finally:
        await journal.close()


def cli(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router", *args, "--config", str(config.file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_operator_commands_work_on_the_postgresql_journal(
    tmp_path: Path, postgres_uri: str
) -> None:
    # status, dead list/retry and replay through the journal's interface, beside a running
    # router: the same commands and answers as on SQLite.
    refusing = {"on": True}
    delivered = Delivered()

    class Refusing(Sink[SinkOptions]):
        type = "rec"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            if refusing["on"]:
                raise PermanentError("HTTP 400")
            delivered.rows.extend(("a", m.message_id, m.order_key) for m in batch)
            delivered.changed.set()
            return None

    folder = tmp_path / "a"
    folder.mkdir()
    doc = base_config(
        folder,
        journal={"path": str(folder / "spool"), "postgres": {"dsn": postgres_uri}},
        sinks={"rec": {"type": "rec"}},
        default=["rec"],
    )
    recorder = Recorder()
    config = load_config(write_yaml(folder, doc), extra_plugins=(SinkPlugin(Refusing), recorder))
    async with routers(config) as (ra,), httpx.AsyncClient() as client:
        for mid in ("d-1", "d-2"):
            assert (await post(client, ra.webhook_url, body_for(message_id=mid))).status_code
        await recorder.wait_for(lambda r: len(r.dead) == 2)
        # The CLI loads the file itself: the inline sink type is unknown there, so it gets a
        # configuration of its own naming a file sink "rec" (operator commands read no secret).
        ops_doc = {**doc, "sinks": {"rec": {"type": "file", "path": str(folder / "x.jsonl")}}}
        ops = load_config(write_yaml(folder, ops_doc, name="ops.yaml"))
        status = await anyio.to_thread.run_sync(cli, ops, "status", "--json")
        assert status.returncode == 0, status.stderr
        doc_status = json.loads(status.stdout)
        assert doc_status["messages"] == 2
        (rec,) = [s for s in doc_status["sinks"] if s["name"] == "rec"]
        assert rec["counts"]["dead"] == 2 and rec["last_error"] == "PermanentError: HTTP 400"
        assert [r["id"] for r in doc_status["routers"]] == [ra.daemon.dispatcher.owner]
        listed = await anyio.to_thread.run_sync(cli, ops, "dead", "list")
        assert listed.returncode == 0 and "2 dead letter(s)" in listed.stdout, listed.stderr
        refusing["on"] = False
        retried = await anyio.to_thread.run_sync(cli, ops, "dead", "retry", "--all")
        assert retried.stdout == "retrying 2 dead letter(s) for rec\n", retried.stderr
        await delivered.wait_for(lambda d: sorted(d.ids()) == ["d-1", "d-2"])
        replay = await anyio.to_thread.run_sync(cli, ops, "replay", "--since", "1h")
        assert replay.stdout == "replaying 2 message(s): 2 to rec\n", replay.stderr
        await delivered.wait_for(lambda d: len(d.ids()) == 4)


async def test_readyz_proves_the_journal_can_commit_and_says_why_not(
    tmp_path: Path, pg_database: PgDatabase
) -> None:
    # An idle router (its one sink never opens: nothing claims) on a database that went
    # read-only is not ready before any write has failed: /readyz commits a small write of its
    # own to know. Going read-only ends the sessions: the first write may find its connection
    # gone instead.
    journal = {"path": str(tmp_path / "spool"), "postgres": {"dsn": pg_database.uri}}
    sinks = {"down": {"type": "never-opens"}}
    doc = base_config(tmp_path, journal=journal, sinks=sinks, default=["down"])
    config = load_config(write_yaml(tmp_path, doc), extra_plugins=(SinkPlugin(NeverOpens),))
    body = body_for("patient.admit")
    async with running_router(config) as router, httpx.AsyncClient() as client:
        await anyio.to_thread.run_sync(pg_database.server.read_only, pg_database.name)
        with anyio.fail_after(15):  # the proof made before (the router probes at start too)
            while (ready := await client.get(router.base_url + "/readyz")).status_code != 503:
                await anyio.sleep(0.05)  # stands a second
        assert ready.json()["journal"] == "failing"
        # The probe's own words, or the journal's once the probe's failure marked it failing.
        assert ready.json()["reason"].endswith(
            ("the database is read-only", "the database cannot be reached")
        ), ready.json()["reason"]

        await anyio.to_thread.run_sync(
            lambda: pg_database.server.read_only(pg_database.name, on=False)
        )
        with anyio.fail_after(30):  # as Metriport would: resent until stored
            while (await post(client, router.webhook_url, body)).status_code != 200:
                await anyio.sleep(0.05)
            while (ready := await client.get(router.base_url + "/readyz")).status_code != 200:
                await anyio.sleep(0.05)  # the failed probe's answer stands a second
        assert "reason" not in ready.json()
