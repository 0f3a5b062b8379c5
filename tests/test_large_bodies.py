"""Large bodies end to end: spooled to disk past the threshold, journaled by file name,
streamed out byte for byte by the file and http sinks, removed with their message."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from router import durable
from router.config import Config
from router.journal.sqlite import SQLiteJournal as Journal
from router.message import Message
from router.parse import parse
from router.spool import SPOOL_THRESHOLD
from router.testing import Recorder, body_for, eventually, running_router, sign
from tests import rawhttp
from tests.conftest import TEST_KEY, fixture_vectors, post, query_journal
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


@pytest.mark.parametrize(
    ("patient", "key"),
    [
        ("\udc00p", "?p"),
        ("p\ud800\ud800", "p??"),
        ("p\ud800A", "p?A"),
        ("p\ud83d\ude00", "p\U0001f600"),
    ],
)
async def test_a_large_body_with_lone_surrogates_gets_the_in_memory_order_key(
    make_config: Callable[..., Config], patient: str, key: str
) -> None:
    # json.dumps escapes them: the body holds "\udc00" and the like, which yajl read otherwise
    # (a low one failed the body as not JSON; a high one took the escape after it along).
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,))
    body = big_body("big-s").replace(b'"p-big"', json.dumps(patient).encode())
    elsewhere = big_body("big-m").replace(b'"x', b'"\\udc00x', 1)
    async with running_router(config) as router, httpx.AsyncClient(timeout=60) as client:
        assert (await post(client, router.webhook_url, body)).status_code == 200
        assert (await post(client, router.webhook_url, elsewhere)).status_code == 200
        bad = body.replace(b'"big-s"', b'"big-\\udc00"', 1)
        r = await post(client, router.webhook_url, bad)
        assert r.status_code == 400
        assert r.json() == {
            "error": "meta.messageId is not valid Unicode: it holds a lone UTF-16 surrogate"
        }
        await recorder.wait_for(lambda r: len(r.delivered) == 2)
    rows = query_journal(config.journal.path, "SELECT message_id, order_key FROM messages")
    assert sorted(rows) == [("big-m", "p-big"), ("big-s", key)]
    assert parse(body).order_key == key


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
        assert await stored.read_body() == body
    finally:
        await journal.close()


def test_every_metriport_fixture_stays_in_memory() -> None:
    assert max(len(body) for _, body, _ in fixture_vectors()) < SPOOL_THRESHOLD


async def test_a_body_failing_verification_is_removed_before_the_answer(
    make_config: Callable[..., Config],
) -> None:
    config = make_config()
    body = big_body("big-unsigned")
    async with running_router(config) as router, httpx.AsyncClient(timeout=60) as client:
        r = await client.post(
            router.webhook_url,
            content=body,
            headers={"x-metriport-signature": sign(body, "not-the-key")},
        )
        assert r.status_code == 401
        assert bodies_dir(config) == []  # at once, not some time after the 401


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="no-credential"),
        pytest.param([(b"x-webhook-key", b"not-the-key")], id="wrong-key"),
    ],
)
async def test_a_request_that_cannot_verify_is_refused_before_its_body_is_stored(
    make_config: Callable[..., Config], headers: list[tuple[bytes, bytes]]
) -> None:
    config = make_config()
    size = 8 * SPOOL_THRESHOLD
    head = rawhttp.http([*headers, (b"content-length", str(size).encode())])
    async with running_router(config) as router, rawhttp.connect(router.base_url) as conn:
        await conn.send(head + b"{" + b" " * (2 * SPOOL_THRESHOLD))  # past the spool threshold
        assert (await conn.answer()).status == 401
        assert not (config.journal.path / "bodies").exists()


async def test_a_body_over_the_unverified_budget_is_refused_unread(
    make_config: Callable[..., Config],
) -> None:
    budget = 5 * SPOOL_THRESHOLD
    config = make_config(server={"max_unverified_bytes": budget})
    body = big_body("big-fits", 3 * SPOOL_THRESHOLD)
    async with running_router(config) as router:
        never = rawhttp.http(
            [(b"x-metriport-signature", b"0" * 64), (b"content-length", b"%d" % (budget + 1))]
        )
        answer = await rawhttp.exchange(router.base_url, never, wait_for_close=True)
        assert answer.status == 413 and answer.closed
        assert b"unverified" in answer.body

        # One body holds 3 of the 5 MiB while it arrives: a second one has to wait.
        async with rawhttp.connect(router.base_url) as first:
            head = rawhttp.http(
                [
                    (b"x-metriport-signature", sign(body, TEST_KEY).encode()),
                    (b"content-length", b"%d" % len(body)),
                ]
            )
            await first.send(head + body[: 2 * SPOOL_THRESHOLD])
            await eventually(lambda: len(bodies_dir(config)) == 1)
            second = rawhttp.http(
                [(b"x-metriport-signature", b"0" * 64), (b"content-length", b"%d" % len(body))]
            )
            answer = await rawhttp.exchange(router.base_url, second, wait_for_close=True)
            assert (answer.status, answer.headers[b"retry-after"]) == (503, b"1")
            assert answer.closed and len(bodies_dir(config)) == 1  # its bytes were not written
            await first.send(body[2 * SPOOL_THRESHOLD :])
            assert (await first.answer()).status == 200
        # Verified and stored: its bytes no longer count against the budget.
        async with httpx.AsyncClient(timeout=60) as client:
            assert (await post(client, router.webhook_url, big_body("big-next"))).status_code == 200


async def test_a_chunked_body_is_held_to_the_budget_as_it_grows(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(
        server={"max_unverified_bytes": 4 * SPOOL_THRESHOLD, "graceful_timeout": "200ms"}
    )
    body = big_body("big-chunked", 6 * SPOOL_THRESHOLD)
    headers = [
        (b"x-metriport-signature", sign(body, TEST_KEY).encode()),
        (b"transfer-encoding", b"chunked"),
    ]
    async with running_router(config) as router, rawhttp.connect(router.base_url) as conn:
        request = rawhttp.http(headers, rawhttp.chunked(body, 64 * 1024))
        sent = 0
        while sent < len(request) and await conn.send(request[sent : sent + 256 * 1024]):
            sent += 256 * 1024
        with contextlib.suppress(AssertionError):  # the answer may be lost to the reset
            assert (await conn.answer()).status == 413  # never fits: it is over the budget
        await eventually(lambda: bodies_dir(config) == [])
    assert query_journal(config.journal.path, "SELECT count(*) FROM messages") == [(0,)]


#: Each step that writes a stored body, as ``router.durable`` names it.
WRITE_STEPS = ["make_dirs", "create", "write_all", "fsync", "rename", "fsync_dir"]


@pytest.mark.parametrize(
    ("step", "error"),
    [*((step, errno.ENOSPC) for step in WRITE_STEPS), ("write_all", errno.EIO)],
    ids=[*(f"{step}-ENOSPC" for step in WRITE_STEPS), "write_all-EIO"],
)
async def test_a_failed_write_at_any_step_is_503_and_leaves_nothing(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, step: str, error: int
) -> None:
    recorder = Recorder()
    # A body refused midway leaves hypercorn waiting on its connection until shutdown.
    config = make_config(extra_plugins=(recorder,), server={"graceful_timeout": "200ms"})
    real = getattr(durable, step)
    failures: list[str] = []

    def failing_once(*args: Any) -> Any:
        if not failures:
            failures.append(step)
            raise OSError(error, os.strerror(error))
        return real(*args)

    async with running_router(config) as router, httpx.AsyncClient(timeout=60) as client:
        monkeypatch.setattr(durable, step, failing_once)
        r = await post(client, router.webhook_url, big_body("big-failed"))
        assert failures == [step]
        assert r.status_code == 503
        assert r.json() == {"error": "journal unavailable: message not stored"}
        assert [p for p in bodies_dir(config) if p.is_file()] == []
        assert query_journal(config.journal.path, "SELECT count(*) FROM messages") == [(0,)]
        # The disk is fine again (the next call works): so are /readyz and the next message.
        ready = await client.get(router.base_url + "/readyz")
        assert ready.status_code == 200
        r = await post(client, router.webhook_url, big_body("big-failed"))
        assert r.status_code == 200
        await recorder.wait_for(lambda r: r.delivered == [("big-failed", "archive", 1)])
    assert len(bodies_dir(config)) == 1
