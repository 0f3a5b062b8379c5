"""Faults beyond a plain crash: SIGKILL during the retention sweep, WAL checkpoints and a file
sink's append; sink outages (HTTP 503 then down, Kafka broker stopped, Slack rate limiting).

Kills (``test_sigkill_during_sweep_and_checkpoints``): the real daemon runs with
``retention: 0`` and ``sweep_every: 50ms``, so delivered messages are deleted (and the file's
pages moved by ``incremental_vacuum``) all the time, while concurrent clients post signed 8 KiB
bodies (one client posts bodies just over the 1 MiB spool threshold, stored as files beside the
database and written by the file sink in two writes). 8 KiB bodies fill SQLite's write-ahead log
quickly, so the automatic checkpoint (at 1000 WAL frames) runs every few hundred messages. The
daemon is SIGKILLed after a number of new acknowledgements, by turns: at once; once it is frozen
(SIGSTOP) at a moment its WAL holds a checkpoint's worth of frames (a checkpoint due or
running); once it is frozen in the middle of a file sink append. It is restarted on the same
socket each time. After each kill a copy of the journal as the kill left it passes
``PRAGMA integrity_check``; at the end every acknowledged message is in the file sink byte for
byte, every line of the sink files is whole JSON, the sweep has emptied the journal (and its
``bodies/`` folder), and the journal passes ``PRAGMA integrity_check``.

Sink outages (``test_sink_outages_lose_nothing_and_never_hold_up_the_healthy_sink``): every
message goes to a file sink and to three sinks that fail: an HTTP downstream answering 503, then
stopped (connection refused), then back; a Kafka broker (tansu) stopped and restarted; Slack
answering 429 with ``Retry-After``. Nothing acknowledged is lost: each id reaches each sink at
least once, counted where it arrived (the HTTP server, the broker read back, Slack's posts, the
files); duplicates are counted. The healthy file sink delivers every message, each on its first
attempt, while the others are still failing: asserted structurally (all its lines are there
before any failing sink comes back), never by timing; its delivery lag is printed.

tansu keeps its data in memory: a restarted broker has lost its topics, and records produced
to a topic the producer knew from before the restart can be acknowledged and then never
returned to a consumer (a quirk of tansu, not of the router: the router got the broker's
acknowledgement and offset for each). A broker that kept its topics is therefore modelled by
giving the messages sent during the outage types whose topics are new to the producer.

Sizes come from the environment (``make soak`` runs them bigger): ``FAULTS_KILLS``,
``FAULTS_ACKS_PER_ROUND``, ``FAULTS_BODY_BYTES``, ``FAULTS_LARGE_CLIENTS`` and
``FAULTS_OUTAGE_MESSAGES``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from router.config import load_config
from router.spool import SPOOL_THRESHOLD
from router.testing import (
    Recorder,
    RouterProcess,
    body_for,
    eventually,
    listening_socket,
    running_router,
    wait_until,
    write_config,
)
from tests.conftest import TEST_KEY, base_config, deliveries, post, query_journal, signed
from tests.http_peer import HttpPeer, Reply, Request
from tests.kafka_peer import Record, TansuBroker
from tests.test_slack_sink import HOOK, FakeSlack

KILLS = int(os.environ.get("FAULTS_KILLS", "6"))
ACKS_PER_ROUND = int(os.environ.get("FAULTS_ACKS_PER_ROUND", "150"))
BODY_BYTES = int(os.environ.get("FAULTS_BODY_BYTES", "8192"))
LARGE_CLIENTS = int(os.environ.get("FAULTS_LARGE_CLIENTS", "1"))
OUTAGE_MESSAGES = int(os.environ.get("FAULTS_OUTAGE_MESSAGES", "40"))
CLIENTS = 8
#: SQLite's default ``wal_autocheckpoint``: a commit that leaves this many frames in the WAL
#: runs a checkpoint before the writer takes its next transaction.
CHECKPOINT_FRAMES = 1000
#: A body just over the spool threshold: stored as a file beside the database.
LARGE_BODY_BYTES = SPOOL_THRESHOLD + 64 * 1024


# -- SIGKILL during the retention sweep and WAL checkpoints -----------------------------------


class Load:
    """Concurrent clients posting signed messages; remembers what was acknowledged."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.acked: dict[str, bytes] = {}  # message id → SHA-256 of the body
        self.large = 0  # acknowledged bodies stored as files beside the database
        self.refused = 0
        self.failed = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def client(self, worker: int, size: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                message_id = str(uuid.uuid4())
                type_ = "patient.admit" if worker % 2 else "medical.document-download"
                body = body_for(type_, message_id, payload={"worker": worker})
                pad = size - len(body) - len(',"pad":""')
                if pad > 0:
                    body = body[:-1] + b',"pad":"' + message_id.encode() * (pad // 36 + 1)
                    body = body[: size - 2] + b'"}'
                try:
                    r = http.post(self.url, content=body, headers=signed(body))
                except httpx.HTTPError:
                    with self.lock:
                        self.failed += 1  # killed mid-request: not acknowledged
                    continue
                with self.lock:
                    if r.status_code == 200:
                        self.acked[message_id] = digest(body)
                        self.large += len(body) > SPOOL_THRESHOLD
                    else:
                        self.refused += 1

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def more(self, n: int) -> Callable[[], bool]:
        """A condition: ``n`` more acknowledgements than now."""
        target = self.count() + n
        return lambda: self.count() >= target


def digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def sink_lines(out: Path, complete_only: bool = True) -> Iterator[tuple[Path, bytes]]:
    """Every line (without its newline) of every sink file under ``out``. ``complete_only``:
    leave out a last line not ended by a newline (being written while the router runs)."""
    for path in sorted(out.rglob("*.jsonl")):
        with path.open("rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    yield path, line[:-1]
                elif not complete_only:
                    yield path, line


def delivered(out: Path, complete_only: bool = True) -> dict[str, list[bytes]]:
    """message id → SHA-256 of each body found for it in the sink files (envelope lines)."""
    found: dict[str, list[bytes]] = {}
    for path, line in sink_lines(out, complete_only):
        head, sep, rest = line.partition(b',"body":')
        assert sep, f"malformed line in {path}: {line[:200]!r}"
        envelope = json.loads(head + b"}")
        found.setdefault(envelope["messageId"], []).append(digest(rest[:-1]))
    return found


def line_in_progress(out: Path) -> bool:
    """Whether a sink file under ``out`` ends in the middle of a line (an append under way)."""
    for path in out.rglob("*.jsonl"):
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size and os.pread(f.fileno(), 1, size - 1) != b"\n":
                return True
    return False


def wal_frames(wal: Path) -> int:
    """How many frames the write-ahead log holds since it was last reset (frames whose salt
    matches the header's; SQLite writes the log from the start again after a checkpoint)."""
    try:
        with wal.open("rb") as f:
            header = f.read(32)
            if len(header) < 32:
                return 0
            page_size = int.from_bytes(header[8:12], "big")
            page_size = 65536 if page_size == 1 else page_size
            salts = header[16:24]
            frames = 0
            while True:
                f.seek(32 + frames * (24 + page_size))
                frame = f.read(24)
                if len(frame) < 24 or frame[8:16] != salts:
                    return frames
                frames += 1
    except FileNotFoundError:
        return 0


def frozen_when(router: RouterProcess, condition: Callable[[], bool]) -> Callable[[], bool]:
    """A condition for ``wait_until`` that stops the router (SIGSTOP, waiting until it is
    stopped), evaluates ``condition`` and leaves the router stopped if it holds (a SIGKILL then
    lands in exactly that state), else lets it continue (SIGCONT)."""

    def check() -> bool:
        assert router.proc is not None
        pid = router.proc.pid
        os.kill(pid, signal.SIGSTOP)
        os.waitpid(pid, os.WUNTRACED)  # returns once it is stopped (does not reap it)
        if condition():
            return True
        os.kill(pid, signal.SIGCONT)
        return False

    return check


def integrity(database: Path) -> str:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return " ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))


def integrity_as_left(journal: Path, scratch: Path) -> str:
    """``PRAGMA integrity_check`` of a copy of the journal (database and WAL) as it is on disk
    now. A copy, so that opening it cannot checkpoint or remove the real WAL before the router
    recovers from it."""
    scratch.mkdir()
    try:
        for name in ("journal.sqlite3", "journal.sqlite3-wal"):
            if (journal / name).exists():
                shutil.copyfile(journal / name, scratch / name)
        return integrity(scratch / "journal.sqlite3")
    finally:
        shutil.rmtree(scratch)


@pytest.fixture
def sweeping_router(tmp_path: Path) -> Iterator[RouterProcess]:
    sock = listening_socket()
    proc = RouterProcess(tmp_path / "config.yaml", sock)
    write_config(
        tmp_path,
        {
            "server": {"listen": [proc.listen]},
            "auth": {"keys": [TEST_KEY]},
            "journal": {"path": "journal", "retention": 0, "sweep_every": "50ms"},
            "default": ["archive"],
            "sinks": {"archive": {"type": "file", "path": "out/{type}.jsonl"}},
        },
    )
    try:
        yield proc
    finally:
        proc.kill()
        sock.close()


def test_sigkill_during_sweep_and_checkpoints(
    sweeping_router: RouterProcess, tmp_path: Path
) -> None:
    router = sweeping_router
    journal = tmp_path / "journal"
    wal = journal / "journal.sqlite3-wal"
    router.start()
    load = Load(router.base_url + "/webhook")
    kills: list[tuple[int, int]] = []  # (WAL bytes, WAL frames) as each kill left them
    cut_lines = 0  # kills that left a sink file ending in the middle of a line
    out = tmp_path / "out"
    with ThreadPoolExecutor(CLIENTS) as pool:
        for worker in range(CLIENTS):
            size = LARGE_BODY_BYTES if worker < LARGE_CLIENTS else BODY_BYTES
            pool.submit(load.client, worker, size)
        try:
            for kill in range(KILLS):
                wait_until(load.more(ACKS_PER_ROUND), 120, "acks before the kill")
                if kill % 3 == 1:
                    # Frozen (SIGSTOP) at a moment its WAL holds a checkpoint's worth of frames.
                    full_wal = frozen_when(router, lambda: wal_frames(wal) >= CHECKPOINT_FRAMES)
                    wait_until(full_wal, 120, "a checkpoint due")
                elif kill % 3 == 2 and LARGE_CLIENTS:
                    # Frozen in the middle of the file sink's append of a large line.
                    mid_append = frozen_when(router, lambda: line_in_progress(out))
                    wait_until(mid_append, 120, "an append in progress")
                    cut_lines += 1
                router.kill()
                kills.append((wal.stat().st_size if wal.exists() else 0, wal_frames(wal)))
                check = integrity_as_left(journal, tmp_path / f"after-kill-{kill}")
                assert check == "ok", f"journal left by kill {kill + 1}: {check}"
                router.start()
            wait_until(load.more(ACKS_PER_ROUND), 120, "acks after the last restart")
        finally:
            load.stop.set()

    acked = dict(load.acked)
    # Retention 0: the sweep removes each message once it is delivered (the files are
    # compared with what was acknowledged below).
    wait_until(
        lambda: query_journal(journal, "SELECT count(*) FROM messages") == [(0,)],
        120 + len(acked) / 100,
        "every message delivered and swept",
    )
    assert router.terminate() == 0

    found = delivered(out, complete_only=False)
    torn = [(p, line[:120]) for p, line in sink_lines(out, False) if not _is_json(line)]
    missing = acked.keys() - found.keys()
    altered = [mid for mid, body in acked.items() if body not in found.get(mid, [])]
    duplicates = sum(len(bodies) - 1 for bodies in found.values())
    logs = router.logs()
    swept = sum(int(n) for n in re.findall(r" swept messages=(\d+)", logs))
    cut_off = logs.count("cut off an incomplete last line")
    full = sum(frames >= CHECKPOINT_FRAMES for _, frames in kills)
    print(
        f"\nsweep/checkpoint kill test: kills={KILLS} (with a checkpoint due: {full},"
        f" mid-append: {cut_lines}, fragments cut off after restart: {cut_off})"
        f" acks={len(acked)} (large: {load.large})"
        f" failed-requests={load.failed} refused={load.refused} delivered-ids={len(found)}"
        f" duplicate-deliveries={duplicates} lost={len(missing)} altered={len(altered)}"
        f" torn-lines={len(torn)} swept={swept}"
        f" wal-at-kills=[{', '.join(f'{b // 1024}KiB/{f}fr' for b, f in kills)}]"
    )
    assert load.refused == 0
    assert not missing, f"{len(missing)} acknowledged messages lost"
    assert not altered, f"{len(altered)} messages delivered with different bytes"
    assert not torn, f"sink lines that are not whole JSON documents: {torn[:3]}"
    assert integrity(journal / "journal.sqlite3") == "ok"
    bodies = journal / "bodies"
    assert not bodies.exists() or not list(bodies.iterdir()), "body files left behind"
    assert swept > 0  # the sweep really ran
    assert full >= (KILLS + 1) // 3  # the kills chosen to land at a checkpoint did
    assert cut_off >= cut_lines  # each line a kill cut short was cut off before an append
    assert len(acked) >= (KILLS + 1) * ACKS_PER_ROUND


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


# -- sink outages --------------------------------------------------------------------------------

#: Fast retries without a limit: an outage never dead-letters anything here.
RETRY = {"initial": "50ms", "max": "500ms", "max_attempts": 0}
TYPES = ("patient.admit", "medical.document-download")
#: Types of the messages posted during the outages: their Kafka topics are new to the producer
#: when the broker comes back (see the test's docstring).
OUTAGE_TYPES = ("patient.discharge", "medical.document-conversion")
FAILING = ("ehr", "kafka", "slack")
SINKS = ("archive", *FAILING)
_SLACK_ID = re.compile(r"message `([^`]+)`")
#: Deadline of each wait of the outage test, in seconds (generous: these are not timings).
WITHIN = 60 + OUTAGE_MESSAGES / 10


class Downstream:
    """The HTTP downstream's answers: ``status`` for every request; records what it answered
    to each message id (``Idempotency-Key``)."""

    def __init__(self) -> None:
        self.status = 200
        self.lock = threading.Lock()
        self.answered: list[tuple[str, int]] = []

    def answer(self, request: Request) -> Reply:
        status = self.status
        with self.lock:
            self.answered.append((request.header("idempotency-key") or "", status))
        return Reply(status)

    def accepted(self) -> Counter[str]:
        with self.lock:
            return Counter(mid for mid, status in self.answered if status == 200)

    def statuses(self, ids: set[str]) -> set[int]:
        with self.lock:
            return {status for mid, status in self.answered if mid in ids}


class LimitedSlack(FakeSlack):
    """Slack's incoming webhook, answering ``429`` with ``Retry-After: 1`` while ``limited``;
    records the message id of every summary it accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.limited = False
        self.lock = threading.Lock()
        self.refused = 0
        self.accepted_ids: list[str] = []

    def answer(self, request: Request) -> Reply:
        if request.path == HOOK and self.limited:
            with self.lock:
                self.refused += 1
            return Reply(429, {"retry-after": "1", "content-type": "text/plain"}, b"rate_limited")
        reply = super().answer(request)
        if reply.status == 200:
            text = json.loads(request.body)["text"]
            with self.lock:
                self.accepted_ids.extend(_SLACK_ID.findall(text))
        return reply

    def accepted(self) -> Counter[str]:
        with self.lock:
            return Counter(self.accepted_ids)


async def post_many(
    client: httpx.AsyncClient, url: str, prefix: str, n: int, types: tuple[str, ...]
) -> list[str]:
    """Post ``n`` messages of ``types`` concurrently (16 at a time); each must be
    acknowledged."""
    ids = [f"{prefix}-{i}" for i in range(n)]
    limiter = anyio.CapacityLimiter(16)

    async def one(i: int, mid: str) -> None:
        async with limiter:
            r = await post(client, url, body_for(types[i % len(types)], mid, payload={"n": i}))
        assert (r.status_code, r.content) == (200, b""), r.text

    async with anyio.create_task_group() as tg:
        for i, mid in enumerate(ids):
            tg.start_soon(one, i, mid)
    return ids


def delivered_to_all(ids: list[str], sinks: tuple[str, ...]) -> Callable[[Recorder], bool]:
    """A ``Recorder.wait_for`` condition: every one of ``ids`` delivered to each of ``sinks``
    (reading only what was recorded since it last looked)."""
    return _every(ids, sinks, lambda r: r.delivered)


def failed_at_all(ids: list[str], sinks: tuple[str, ...]) -> Callable[[Recorder], bool]:
    """A ``Recorder.wait_for`` condition: every one of ``ids`` failed at least once at each of
    ``sinks``."""
    return _every(ids, sinks, lambda r: r.failed)


def _every(
    ids: list[str], sinks: tuple[str, ...], records: Callable[[Recorder], list[Any]]
) -> Callable[[Recorder], bool]:
    wanted = set(ids)
    seen: dict[str, set[str]] = {sink: set() for sink in sinks}
    read = 0

    def condition(recorder: Recorder) -> bool:
        nonlocal read
        new = records(recorder)[read:]
        read += len(new)
        for mid, sink, _ in new:
            if sink in seen:
                seen[sink].add(mid)
        return all(wanted <= got for got in seen.values())

    return condition


def lag_ms(rows: list[tuple[Any, ...]], sink: str, ids: set[str]) -> str:
    """Median and largest delivery lag (journal: receipt → marked delivered) in ms."""
    lags = [lag * 1000 for mid, s, lag in rows if s == sink and mid in ids]
    return f"median {statistics.median(lags):.0f} ms, max {max(lags):.0f} ms"


@pytest.mark.anyio
async def test_sink_outages_lose_nothing_and_never_hold_up_the_healthy_sink(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    downstream = Downstream()
    peer = HttpPeer(downstream.answer).start()
    slack = LimitedSlack()
    slack.peer.start()
    broker = TansuBroker(tmp_path)
    topics = sorted(f"metriport.{t}" for t in TYPES)
    out = tmp_path / "out"
    records: list[Record] = []
    try:
        await anyio.to_thread.run_sync(broker.start)
        sinks: dict[str, dict[str, Any]] = {
            "archive": {"type": "file", "path": str(out / "{type}.jsonl")},
            "ehr": {"type": "http", "url": peer.url("/in"), "retry": RETRY, "timeout": "2s"},
            "kafka": {
                "type": "kafka",
                "bootstrap_servers": [broker.bootstrap],
                "retry": RETRY,
                "timeout": "1s",
            },
            "slack": {"type": "slack", "webhook_url": slack.peer.url(HOOK), "retry": RETRY},
        }
        path = write_config(tmp_path, base_config(tmp_path, default=list(SINKS), sinks=sinks))
        config = load_config(path, extra_plugins=(recorder,))
        n = OUTAGE_MESSAGES
        async with running_router(config) as router, httpx.AsyncClient() as client:
            url = router.webhook_url
            # Everything up.
            up = await post_many(client, url, "up", n, TYPES)
            await recorder.wait_for(delivered_to_all(up, SINKS), WITHIN)
            records += [  # read now: the broker's memory storage is lost when it stops
                r for rs in (await broker.consume_topics(topics)).values() for r in rs
            ]

            # Outage 1: the downstream answers 503, the broker is stopped, Slack says 429.
            downstream.status = 503
            slack.limited = True
            await anyio.to_thread.run_sync(broker.stop)
            refused = await post_many(client, url, "503", n, OUTAGE_TYPES)
            await eventually(lambda: set(up + refused) <= delivered(out).keys(), WITHIN)
            await recorder.wait_for(failed_at_all(refused, FAILING), WITHIN)
            assert downstream.statuses(set(refused)) == {503}

            # Outage 2: the downstream is down too (connection refused).
            await anyio.to_thread.run_sync(peer.stop)
            down = await post_many(client, url, "down", n, OUTAGE_TYPES)
            await eventually(lambda: set(up + refused + down) <= delivered(out).keys(), WITHIN)
            await recorder.wait_for(failed_at_all(down, FAILING), WITHIN)
            ehr_errors = {
                error
                for mid, sink, _, _, error in deliveries(config)
                if sink == "ehr" and mid in down
            }
            assert all("ConnectError" in (e or "") for e in ehr_errors), ehr_errors

            # The healthy sink has every message while the three others are still failing:
            # nothing of either outage has reached them.
            outage = refused + down
            for sink in FAILING:
                assert not set(outage) & set(recorder.delivered_to(sink)), sink
            assert {a for mid, s, a in recorder.delivered if s == "archive"} == {1}

            # Everything comes back.
            downstream.status = 200
            await anyio.to_thread.run_sync(peer.start)  # the same port
            await anyio.to_thread.run_sync(broker.start)  # the same port, empty storage
            slack.limited = False
            await recorder.wait_for(delivered_to_all(outage, FAILING), 2 * WITHIN)
        outage_topics = sorted(f"metriport.{t}" for t in OUTAGE_TYPES)
        await broker.settle(outage_topics)
        records += [r for rs in (await broker.consume_topics(outage_topics)).values() for r in rs]
    finally:
        peer.stop()
        slack.peer.stop()
        await anyio.to_thread.run_sync(broker.stop)

    ids = set(up + outage)
    found = {
        "archive": Counter({mid: len(bodies) for mid, bodies in delivered(out, False).items()}),
        "ehr": downstream.accepted(),
        "kafka": Counter((r.key or b"").decode() for r in records),
        "slack": slack.accepted(),
    }
    rows = query_journal(
        config.journal.path,
        "SELECT m.message_id, d.sink, d.updated_at - m.received_at"
        " FROM deliveries d JOIN messages m USING (seq) WHERE d.state = 'delivered'",
    )
    print(
        f"\nsink outages: acks={len(ids)} (outage: {len(outage)}), slack 429s={slack.refused},"
        f" ehr 503s={sum(s == 503 for _, s in downstream.answered)}"
    )
    for sink in SINKS:
        counts = found[sink]
        print(
            f"  {sink}: delivered-ids={len(ids & counts.keys())}"
            f" duplicates={sum(counts[mid] - 1 for mid in ids if counts[mid])}"
            f" lost={len(ids - counts.keys())}"
        )
    print(f"  archive lag, all sinks up: {lag_ms(rows, 'archive', set(up))}")
    print(f"  archive lag, during the outages: {lag_ms(rows, 'archive', set(outage))}")
    for sink in FAILING:
        print(f"  {sink} lag of outage messages: {lag_ms(rows, sink, set(outage))}")
    for sink in SINKS:
        assert ids <= found[sink].keys(), f"{sink} lost {sorted(ids - found[sink].keys())[:5]}"
    assert recorder.dead == []
    assert {state for _, _, state, _, _ in deliveries(config)} == {"delivered"}
