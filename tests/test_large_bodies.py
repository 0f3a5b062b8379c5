"""Large bodies end to end: spooled to disk past the threshold, journaled by file name,
streamed out byte for byte by the file and http sinks, removed with their message."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from router.config import Config
from router.journal.sqlite import SQLiteJournal as Journal
from router.message import Message
from router.spool import SPOOL_THRESHOLD
from router.testing import Recorder, body_for, running_router, sign
from tests.conftest import fixture_vectors, post, query_journal
from tests.http_peer import HttpPeer

pytestmark = pytest.mark.anyio

DOWNSTREAM_KEY = "downstream-key-for-large-bodies"


def big_body(message_id: str, size: int = 3 * SPOOL_THRESHOLD) -> bytes:
    """An old-style medical.consolidated-data message with its FHIR bundle inline."""
    entry = {"resource": {"resourceType": "Observation", "note": "x" * 1000}}
    count = size // 1050 + 1
    body = body_for(
        "medical.consolidated-data",
        message_id,
        patients=[{"patientId": "p-big", "bundle": {"entry": [entry] * count}}],
    )
    assert len(body) > SPOOL_THRESHOLD
    return body


def bodies_dir(config: Config) -> list[Path]:
    folder = config.journal.path / "bodies"
    return sorted(folder.iterdir()) if folder.exists() else []


async def test_a_large_body_is_spooled_journaled_and_streamed_out_intact(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    recorder = Recorder()
    with HttpPeer() as peer:
        config = make_config(
            extra_plugins=(recorder,),
            default=["archive", "ehr"],
            sinks={
                "archive": {"type": "file", "path": str(tmp_path / "out" / "{type}.jsonl")},
                "ehr": {"type": "http", "url": peer.url("/in"), "sign": {"key": DOWNSTREAM_KEY}},
            },
        )
        body = big_body("big-1")
        async with running_router(config) as router, httpx.AsyncClient(timeout=60) as client:
            r = await post(client, router.webhook_url, body)
            assert (r.status_code, r.content) == (200, b"")
            await recorder.wait_for(lambda r: len(r.delivered) == 2)

        (row,) = query_journal(
            config.journal.path,
            "SELECT body IS NULL, body_file, body_size, order_key FROM messages",
        )
        assert row[0] == 1 and row[1].startswith("bodies/") and row[2] == len(body)
        assert row[3] == "p-big"
        assert (config.journal.path / row[1]).read_bytes() == body
        assert [p.name for p in bodies_dir(config)] == [row[1].removeprefix("bodies/")]

        (line,) = (tmp_path / "out" / "medical.consolidated-data.jsonl").read_bytes().splitlines()
        assert line.endswith(b',"body":' + body + b"}")
        assert json.loads(line)["messageId"] == "big-1"

        (request,) = peer.requests
        assert request.body == body
        assert request.header("content-length") == str(len(body))
        assert request.header("transfer-encoding") is None
        assert request.header("x-metriport-signature") == sign(body, DOWNSTREAM_KEY)


async def test_the_body_file_leaves_with_its_message(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    recorder = Recorder()
    config = make_config(
        extra_plugins=(recorder,), journal={"path": str(tmp_path / "j"), "retention": 0}
    )
    async with running_router(config) as router, httpx.AsyncClient(timeout=60) as client:
        assert (await post(client, router.webhook_url, big_body("big-2"))).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
        assert len(bodies_dir(config)) == 1
        await router.daemon.sweep()
    assert bodies_dir(config) == []
    assert query_journal(config.journal.path, "SELECT count(*) FROM messages") == [(0,)]


@pytest.mark.parametrize(
    ("case", "status"),
    [("duplicate", 200), ("bad signature", 401), ("not json", 400), ("no meta.type", 400)],
)
async def test_a_large_body_not_kept_leaves_no_file(
    make_config: Callable[..., Config], case: str, status: int
) -> None:
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,))
    first = big_body("big-3")
    async with running_router(config) as router, httpx.AsyncClient(timeout=60) as client:
        assert (await post(client, router.webhook_url, first)).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
        if case == "duplicate":
            # Same messageId, other bytes (as a retried message arrives): answered 200.
            r = await post(client, router.webhook_url, first + b" ")
        elif case == "bad signature":
            r = await client.post(
                router.webhook_url,
                content=first,
                headers={"x-metriport-signature": sign(first, "not-the-key")},
            )
        elif case == "not json":
            r = await post(client, router.webhook_url, first[:-1])
        else:
            r = await post(client, router.webhook_url, first.replace(b'"type"', b'"kind"', 1))
        assert r.status_code == status
    assert len(bodies_dir(config)) == 1  # the first message's, and no other
    assert query_journal(config.journal.path, "SELECT count(*) FROM messages") == [(1,)]
    assert recorder.delivered == [("big-3", "archive", 1)]


async def test_a_body_file_no_message_refers_to_is_removed_at_start(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    await journal.open()
    await journal.close()
    stray = tmp_path / "journal" / "bodies"
    stray.mkdir()
    (stray / "incoming-0123.tmp").write_bytes(b"{}")
    (stray / "0123.json").write_bytes(b"{}")
    journal = Journal(tmp_path / "journal")
    await journal.open()
    try:
        assert list(stray.iterdir()) == []
    finally:
        await journal.close()


async def test_the_body_file_of_a_stored_message_survives_a_restart(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    journal = Journal(folder)
    await journal.open()
    try:
        journal.bodies.mkdir()
        body = big_body("big-kept")
        kept = journal.bodies / "0123.json"
        kept.write_bytes(body)
        message = Message(
            "big-kept", "medical.consolidated-data", None, body_file=kept, body_size=len(body)
        )
        await journal.append(message, ["archive"])  # pending: not delivered yet
    finally:
        await journal.close()
    journal = Journal(folder)
    await journal.open()  # clears unreferenced body files, and only those
    try:
        assert kept.read_bytes() == body
        (stored,) = (await journal.messages([1])).values()
        assert stored.body == body
    finally:
        await journal.close()


def test_every_metriport_fixture_stays_in_memory() -> None:
    assert max(len(body) for _, body, _ in fixture_vectors()) < SPOOL_THRESHOLD
