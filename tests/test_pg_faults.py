"""Faults with several routers on one real PostgreSQL journal, each test with an oracle.

Routers (two or three) run as real child processes (``RouterProcess``, each on a listening
socket the test owns, so a killed router is restarted on the same port) on one database of a
PostgreSQL server of this module's own (``tests.pg_peer``: the tests stop, kill and restart
it, so it is never one other tests share). Concurrent clients post signed messages to the
routers, as a load balancer would: to any router that is up. The oracle is what was answered
200: every acknowledged message id must reach each sink it was routed to, byte for byte. Each
router has its own file per sink (``out/<sink>/<router>/<type>.jsonl``, all in one folder):
any router may deliver any message, so a message is found in whichever router's file
delivered it. Duplicates are counted and printed, never a loss.

- ``test_sigkill_routers_under_load_loses_nothing``: random SIGKILLs of the routers under
  8-way load, each killed router restarted; every third kill (the first included) waits
  first until the killed router's leases (3 s) have expired and the others have taken its
  deliveries over, the others restart it at once (a restart on the same host releases a dead
  process's claims).
- ``test_reads_and_writes_while_the_server_is_down_raise_journal_unavailable``: the journal
  itself, driven directly, while the server is down and once it is back.
- ``test_postgres_stopped_and_restarted_under_load`` (two routers): the server shut down
  (``-m fast``) and crashed (``-m immediate``) under load, then started again: 503s while it
  is down, no 200 for a request made while it was down, ``/readyz`` 503 then 200, the same
  router processes serving again, every acknowledged message delivered.
- ``test_router_killed_while_sending_has_its_deliveries_completed_by_another`` (two
  routers): a router's HTTP downstream holds its requests; its leases are renewed past their
  first deadline while it sends; it is killed; the other router takes the deliveries over
  once the leases expire.
- ``test_concurrent_duplicates_across_routers``: the same ids to all three routers at once:
  one row per id, one delivery per sink.
- ``test_read_only_database`` (two routers): 503 while the database refuses writes, never a
  200; 200 again once it accepts them, without a restart.
- ``test_sigkill_routers_polling_only``: the kill test with ``listen: false`` (PgBouncer's
  transaction pooling: no LISTEN/NOTIFY, the routers poll), smaller.

Sizes come from the environment (``make soak`` runs them bigger): ``PGFAULTS_KILLS``,
``PGFAULTS_ACKS_PER_ROUND``, ``PGFAULTS_POLL_KILLS``, ``PGFAULTS_POLL_ACKS_PER_ROUND``,
``PGFAULTS_OUTAGES``, ``PGFAULTS_HELD``, ``PGFAULTS_DUPLICATES``; ``PGFAULTS_SEED`` picks the
kill victims.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from router.config import PostgresConfig
from router.errors import JournalUnavailable
from router.journal.postgres import PostgresJournal
from router.message import Message
from router.testing import RouterProcess, body_for, listening_socket, wait_until, write_config
from tests.conftest import TEST_KEY, signed
from tests.http_peer import HttpPeer, Reply, Request
from tests.pg_peer import PostgresPeer, postgres_peer, server_log

KILLS = int(os.environ.get("PGFAULTS_KILLS", "3"))
ACKS_PER_ROUND = int(os.environ.get("PGFAULTS_ACKS_PER_ROUND", "60"))
POLL_KILLS = int(os.environ.get("PGFAULTS_POLL_KILLS", "2"))
POLL_ACKS_PER_ROUND = int(os.environ.get("PGFAULTS_POLL_ACKS_PER_ROUND", "30"))
OUTAGES = int(os.environ.get("PGFAULTS_OUTAGES", "1"))  # each: a clean stop, then a crash
HELD = int(os.environ.get("PGFAULTS_HELD", "12"))
DUPLICATES = int(os.environ.get("PGFAULTS_DUPLICATES", "40"))
SEED = int(os.environ.get("PGFAULTS_SEED", str(random.randrange(1 << 30))))
CLIENTS = 8
ROUTERS = 3
LEASE = 3.0  # the shortest journal.lease: takeovers happen within the test
#: Deadline of each wait, in seconds (generous: these are not timings).
WITHIN = 120.0
#: Where each type is routed (the oracle's expectation).
ROUTES = [
    {"match": "patient.*", "to": ["events", "archive"]},
    {"match": "medical.*", "to": ["medical", "archive"]},
]
TYPES = ("patient.admit", "medical.document-download")
FILE_SINKS = ("archive", "events", "medical")


def routed_to(type_: str) -> tuple[str, ...]:
    return ("events", "archive") if type_.startswith("patient.") else ("medical", "archive")


def digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


# -- the PostgreSQL server and the routers ----------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresPeer]:
    """A server of this module's own: its tests stop and kill it (its folder is outside
    pytest's temporary root: see ``PostgresPeer``)."""
    with postgres_peer() as peer:
        yield peer


@pytest.fixture
def database(pg: PostgresPeer) -> Iterator[str]:
    """A fresh database on a running server; the server's log is shown if the test fails."""
    pg.start()  # a test that failed may have left it stopped
    name = pg.create_database()
    yield name


def owner_pattern(pid: int) -> str:
    """A LIKE pattern for the lease owner of the router process ``pid``
    (``host:pid:random``, ``router.dispatcher.router_id``)."""
    return f"%:{pid}:%"


class Cluster:
    """``ROUTERS`` routers on one database, each with a folder, socket and log of its own."""

    def __init__(
        self,
        tmp_path: Path,
        uri: str,
        *,
        listen: bool = True,
        sinks: Callable[[int], dict[str, Any]] | None = None,
        routes: list[dict[str, Any]] | None = None,
        default: list[str] | None = None,
        connect_timeout: str = "2s",
        n: int = ROUTERS,
    ) -> None:
        self.out = tmp_path / "out"
        self.routers: list[RouterProcess] = []
        for i in range(n):
            folder = tmp_path / f"r{i}"
            folder.mkdir()
            sock = listening_socket()
            proc = RouterProcess(folder / "config.yaml", sock)
            doc: dict[str, Any] = {
                "server": {"listen": [proc.listen]},
                "auth": {"keys": [TEST_KEY]},
                "journal": {
                    "path": "spool",
                    "lease": f"{LEASE:g}s",
                    "postgres": {
                        "dsn": uri,
                        "pool": 4,
                        "listen": listen,
                        "connect_timeout": connect_timeout,
                    },
                },
                "routes": ROUTES if routes is None else routes,
                "sinks": self.file_sinks(i) if sinks is None else sinks(i),
            }
            if default is not None:
                doc["default"] = default
            write_config(folder, doc)
            self.routers.append(proc)

    def file_sinks(self, i: int) -> dict[str, Any]:
        return {
            name: {"type": "file", "path": str(self.out / name / f"r{i}" / "{type}.jsonl")}
            for name in FILE_SINKS
        }

    @property
    def urls(self) -> list[str]:
        return [r.base_url + "/webhook" for r in self.routers]

    def start(self) -> None:
        """Start every router (side by side: each takes a second or so to be ready)."""
        with ThreadPoolExecutor(len(self.routers)) as pool:
            for future in [pool.submit(r.start) for r in self.routers]:
                future.result()

    def pid(self, i: int) -> int:
        proc = self.routers[i].proc
        assert proc is not None and proc.poll() is None
        return proc.pid

    def ready(self) -> list[int]:
        """Each router's ``/readyz`` status."""
        with httpx.Client(timeout=30) as http:
            return [http.get(r.base_url + "/readyz").status_code for r in self.routers]

    def terminate(self) -> list[int]:
        """SIGTERM every router at once; their exit codes once each has stopped."""
        for r in self.routers:
            assert r.proc is not None
            r.proc.terminate()
        return [r.proc.wait(30) for r in self.routers if r.proc is not None]

    def close(self) -> None:
        for r in self.routers:
            r.kill()
            r.sock.close()

    def logs(self) -> str:
        return "\n".join(f"--- router r{i}\n{r.logs()[-4000:]}" for i, r in enumerate(self.routers))


@pytest.fixture
def cluster_factory(
    tmp_path: Path, pg: PostgresPeer, database: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Cluster]]:
    """Make the test's routers on its database; killed at the end (logs shown on failure)."""
    made: list[Cluster] = []
    failed_before = request.session.testsfailed

    def make(**kwargs: Any) -> Cluster:
        cluster = Cluster(tmp_path, pg.uri(database), **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
    if request.session.testsfailed > failed_before:  # this test failed: show why
        print(*(c.logs() for c in made), server_log(pg)[-4000:], sep="\n")


# -- the load and the oracle -------------------------------------------------------------------


class Load:
    """Concurrent clients posting signed messages to the routers that are up (a load
    balancer's view); remembers what was acknowledged, refused and when."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.up = set(range(len(urls)))
        self.acked: dict[str, tuple[str, bytes]] = {}  # message id → (type, SHA-256 of body)
        self.refused: set[str] = set()  # answered 503
        self.statuses: Counter[int] = Counter()
        self.failed = 0  # no answer (the router was killed mid-request)
        #: (sent at, answered at, status) of every answered request (monotonic clock).
        self.answers: list[tuple[float, float, int]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def client(self, worker: int) -> None:
        rng = random.Random(SEED + worker)
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                with self.lock:
                    up = sorted(self.up)
                url = self.urls[rng.choice(up)]
                message_id = str(uuid.uuid4())
                type_ = TYPES[worker % 2]
                body = body_for(type_, message_id, payload={"worker": worker, "n": message_id})
                sent = time.monotonic()
                try:
                    r = http.post(url, content=body, headers=signed(body))
                except httpx.HTTPError:
                    with self.lock:
                        self.failed += 1
                    continue
                with self.lock:
                    self.answers.append((sent, time.monotonic(), r.status_code))
                    self.statuses[r.status_code] += 1
                    if r.status_code == 200:
                        self.acked[message_id] = (type_, digest(body))
                    elif r.status_code == 503:
                        self.refused.add(message_id)

    def run(self, pool: ThreadPoolExecutor) -> None:
        for worker in range(CLIENTS):
            pool.submit(self.client, worker)

    def count(self, status: int = 200) -> int:
        with self.lock:
            return self.statuses[status]

    def more(self, n: int, status: int = 200) -> Callable[[], bool]:
        """A condition: ``n`` more answers with ``status`` than now."""
        target = self.count(status) + n
        return lambda: self.count(status) >= target

    def set_up(self, i: int, up: bool) -> None:
        with self.lock:
            (self.up.add if up else self.up.discard)(i)

    def sent_within(self, start: float, end: float) -> Counter[int]:
        """Statuses of the requests sent at ``start`` or later and answered by ``end``."""
        with self.lock:
            return Counter(s for sent, done, s in self.answers if sent >= start and done <= end)


class SinkFiles:
    """What the file sinks under ``out`` hold: (sink, message id) → SHA-256 of each body,
    read incrementally (only whole lines: a router may be writing the last one)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.found: dict[tuple[str, str], list[bytes]] = {}
        self._offsets: dict[Path, int] = {}

    def read(self) -> dict[tuple[str, str], list[bytes]]:
        for path in sorted(self.out.rglob("*.jsonl")):
            sink = path.relative_to(self.out).parts[0]
            with path.open("rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
            whole = data[: data.rfind(b"\n") + 1]
            self._offsets[path] = self._offsets.get(path, 0) + len(whole)
            for line in whole.splitlines():
                head, sep, rest = line.partition(b',"body":')
                assert sep, f"malformed line in {path}: {line[:200]!r}"
                envelope = json.loads(head + b"}")
                self.found.setdefault((sink, envelope["messageId"]), []).append(digest(rest[:-1]))
        return self.found

    def has(self, wanted: set[tuple[str, str]]) -> Callable[[], bool]:
        return lambda: wanted <= self.read().keys()


def expected(acked: dict[str, tuple[str, bytes]]) -> set[tuple[str, str]]:
    """(sink, id) for each acknowledged id and each sink its type is routed to."""
    return {(sink, mid) for mid, (type_, _) in acked.items() for sink in routed_to(type_)}


class Verdict:
    """The oracle's findings for ``acked`` in the sink files and the database."""

    def __init__(
        self, acked: dict[str, tuple[str, bytes]], files: SinkFiles, pg: PostgresPeer, db: str
    ) -> None:
        found = files.read()
        self.wanted = expected(acked)
        self.missing = self.wanted - found.keys()
        self.altered = [
            (sink, mid)
            for sink, mid in self.wanted
            if (sink, mid) in found and acked[mid][1] not in found[sink, mid]
        ]
        self.duplicates = sum(len(d) - 1 for d in found.values())
        stored = {str(mid) for (mid,) in pg.query(db, "SELECT message_id FROM wr_messages")}
        self.stored = len(stored)
        self.false_200s = acked.keys() - stored  # answered 200, not in the database
        self.dead = pg.query(db, "SELECT sink, last_error FROM wr_deliveries WHERE state = 'dead'")
        self.not_done = pg.query(
            db, "SELECT count(*) FROM wr_deliveries WHERE state != 'delivered'"
        )[0][0]

    def figures(self) -> str:
        return (
            f"delivered={len(self.wanted) - len(self.missing)}/{len(self.wanted)}"
            f" duplicate-deliveries={self.duplicates} lost={len(self.missing)}"
            f" altered={len(self.altered)} false-200s={len(self.false_200s)}"
            f" dead={len(self.dead)}"
        )

    def check(self) -> None:
        assert not self.false_200s, f"{len(self.false_200s)} acknowledged ids not stored"
        assert not self.missing, f"{len(self.missing)} deliveries lost: {sorted(self.missing)[:5]}"
        assert not self.altered, f"delivered with different bytes: {self.altered[:5]}"
        assert self.dead == [], self.dead[:5]
        assert self.not_done == 0


def settle(
    files: SinkFiles, acked: dict[str, tuple[str, bytes]], pg: PostgresPeer, db: str
) -> None:
    """Wait until every acknowledged id is in the files of the sinks it was routed to and the
    journal has nothing pending (so nothing more will arrive to be counted)."""
    wait_until(files.has(expected(acked)), WITHIN + len(acked) / 50, "every ack delivered")
    wait_until(
        lambda: (
            pg.query(db, "SELECT count(*) FROM wr_deliveries WHERE state = 'pending'") == [(0,)]
        ),
        WITHIN,
        "nothing pending",
    )


def leased_to(pg: PostgresPeer, db: str, pid: int) -> int:
    """Pending deliveries leased to the router process ``pid``."""
    rows = pg.query(
        db,
        "SELECT count(*) FROM wr_deliveries WHERE state = 'pending' AND lease_owner LIKE %s",
        owner_pattern(pid),
    )
    return int(str(rows[0][0]))


# -- the journal itself while the server is down ----------------------------------------------


@pytest.mark.anyio
async def test_reads_and_writes_while_the_server_is_down_raise_journal_unavailable(
    tmp_path: Path, pg: PostgresPeer, database: str
) -> None:
    # Every journal method raises ``JournalUnavailable`` (503, "retry later") when the database
    # cannot be reached: a read (a runner's ``next_due_in``, ``messages``) that raised anything
    # else ended the whole router process during an outage.
    journal = PostgresJournal(
        PostgresConfig(dsn=SecretStr(pg.uri(database)), pool=2, connect_timeout=1.0),
        spool_dir=tmp_path / "spool",
    )
    await journal.open()
    try:
        appended = await journal.append(body_message("before"), ["archive"])
        pg.kill()
        try:
            reads: list[Callable[[], Awaitable[object]]] = [
                lambda: journal.next_due_in("archive", ordered=False),  # the open connection
                lambda: journal.messages([appended.seq]),  # a new one: the pool times out
                journal.sink_counts,
            ]
            for read in reads:
                with pytest.raises(JournalUnavailable, match="cannot be reached"):
                    await read()
            with pytest.raises(JournalUnavailable, match="cannot be reached"):
                await journal.append(body_message("during"), ["archive"])
            assert not journal.healthy
        finally:
            pg.start()
        # Back without reopening: the pool reconnects.
        await journal.append(body_message("after"), ["archive"])
        assert journal.healthy
        assert await journal.next_due_in("archive", ordered=False) == 0.0
    finally:
        await journal.close()


def body_message(message_id: str) -> Message:
    return Message(message_id, "patient.admit", None, body_for(message_id=message_id), time.time())


# -- 1 and 6: SIGKILL routers under load -------------------------------------------------------


def sigkill_routers(
    cluster: Cluster,
    pg: PostgresPeer,
    db: str,
    kills: int,
    acks_per_round: int,
    *,
    listen: bool,
    what: str,
) -> None:
    cluster.start()
    rng = random.Random(SEED)
    load = Load(cluster.urls)
    files = SinkFiles(cluster.out)
    held_at_kills: list[int] = []
    taken_over = 0  # deliveries a killed router held, claimed by another after expiry
    with ThreadPoolExecutor(CLIENTS) as pool:
        load.run(pool)
        try:
            for kill in range(kills):
                wait_until(load.more(acks_per_round), WITHIN, "acks before the kill")
                victim = rng.randrange(len(cluster.routers))
                pid = cluster.pid(victim)
                load.set_up(victim, False)
                cluster.routers[victim].kill()
                held = leased_to(pg, db, pid)
                held_at_kills.append(held)
                if kill % 3 == 0:
                    # Its leases expire (3 s) and the other routers take its work over; a
                    # restart would release them at once (same host), so not before.
                    wait_until(lambda p=pid: leased_to(pg, db, p) == 0, WITHIN, "a takeover")
                    taken_over += held
                cluster.routers[victim].start()
                load.set_up(victim, True)
            wait_until(load.more(acks_per_round), WITHIN, "acks after the last restart")
        finally:
            load.stop.set()

    acked = dict(load.acked)
    settle(files, acked, pg, db)
    listeners = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
    if listen:
        wait_until(lambda: pg.query(db, listeners) == [(ROUTERS,)], WITHIN, "listeners")
    else:
        assert pg.query(db, listeners) == [(0,)]  # polling only
    codes = cluster.terminate()
    verdict = Verdict(acked, files, pg, db)
    print(
        f"\n{what}: routers={len(cluster.routers)} seed={SEED} kills={kills}"
        f" leases-held-at-kills={held_at_kills} taken-over-after-expiry={taken_over}"
        f" acks={len(acked)} failed-requests={load.failed}"
        f" refused={sum(n for s, n in load.statuses.items() if s != 200)}"
        f" stored={verdict.stored} {verdict.figures()}"
    )
    assert set(load.statuses) == {200}, load.statuses
    verdict.check()
    assert codes == [0] * len(cluster.routers)
    assert len(acked) >= (kills + 1) * acks_per_round


def test_sigkill_routers_under_load_loses_nothing(
    cluster_factory: Callable[..., Cluster], pg: PostgresPeer, database: str
) -> None:
    cluster = cluster_factory()
    sigkill_routers(cluster, pg, database, KILLS, ACKS_PER_ROUND, listen=True, what="pg kill test")


def test_sigkill_routers_polling_only(
    cluster_factory: Callable[..., Cluster], pg: PostgresPeer, database: str
) -> None:
    cluster = cluster_factory(listen=False)
    sigkill_routers(
        cluster,
        pg,
        database,
        POLL_KILLS,
        POLL_ACKS_PER_ROUND,
        listen=False,
        what="pg kill test, polling only",
    )


# -- 2: PostgreSQL stopped and restarted under load -----------------------------------------


def test_postgres_stopped_and_restarted_under_load(
    cluster_factory: Callable[..., Cluster], pg: PostgresPeer, database: str
) -> None:
    cluster = cluster_factory(connect_timeout="1s", n=2)
    cluster.start()
    n = len(cluster.routers)
    pids = [cluster.pid(i) for i in range(n)]
    load = Load(cluster.urls)
    files = SinkFiles(cluster.out)
    outages: list[str] = []  # each outage and how long it took to see it, then to recover
    while_down: Counter[int] = Counter()  # answers to requests sent while the server was down
    with ThreadPoolExecutor(CLIENTS) as pool:
        load.run(pool)
        try:
            for mode in ["fast", "immediate"] * OUTAGES:
                wait_until(load.more(ACKS_PER_ROUND), WITHIN, "acks before the outage")
                (pg.stop if mode == "fast" else pg.kill)()
                down = time.monotonic()  # the server is down from here (pg_ctl -w)
                refused = load.more(CLIENTS, status=503)
                wait_until(refused, WITHIN, "503s while the server is down")
                wait_until(lambda: cluster.ready() == [503] * n, WITHIN, "readyz 503")
                back = time.monotonic()
                pg.start()
                while_down += load.sent_within(down, back)
                wait_until(load.more(ACKS_PER_ROUND), WITHIN, "acks after the restart")
                wait_until(lambda: cluster.ready() == [200] * n, WITHIN, "readyz 200")
                outages.append(
                    f"{mode}: down {back - down:.1f}s, back {time.monotonic() - back:.1f}s"
                )
        finally:
            load.stop.set()

    acked = dict(load.acked)
    settle(files, acked, pg, database)
    assert [cluster.pid(i) for i in range(n)] == pids  # recovered without a restart
    codes = cluster.terminate()
    verdict = Verdict(acked, files, pg, database)
    stored = {str(mid) for (mid,) in pg.query(database, "SELECT message_id FROM wr_messages")}
    print(
        f"\npg outage test: routers={n} outages={outages} acks={len(acked)}"
        f" 503s={load.statuses[503]} (stored all the same: {len(load.refused & stored)})"
        f" answers-while-down={dict(while_down)} failed-requests={load.failed}"
        f" statuses={dict(load.statuses)} {verdict.figures()}"
    )
    assert while_down[200] == 0, "a request made while the server was down was answered 200"
    assert set(load.statuses) == {200, 503}, load.statuses
    assert load.failed == 0
    verdict.check()
    assert codes == [0] * n


# -- 3: a router killed while its sink hangs ---------------------------------------------------


def test_router_killed_while_sending_has_its_deliveries_completed_by_another(
    cluster_factory: Callable[..., Cluster], pg: PostgresPeer, database: str
) -> None:
    # Router r0's downstream holds its requests (each router has its own URL for the one
    # ``ehr`` sink); r1's answers 200. r0 holds its claims while it sends, renewing them past
    # their first deadline; then it is killed, never restarted (a restart on this host would
    # release its claims at once), and r1 completes each delivery once the leases have
    # expired.
    def answer(request: Request) -> Reply:
        return Reply(hang=True) if request.path == "/in/r0" else Reply(200)

    peer = HttpPeer(answer).start()
    try:
        cluster = cluster_factory(
            sinks=lambda i: {
                "ehr": {
                    "type": "http",
                    "url": peer.url(f"/in/r{i}"),
                    "timeout": "10m",  # r0's hang outlasts the test
                    "concurrency": 4,
                    "retry": {"initial": "50ms", "max": "500ms", "max_attempts": 0},
                }
            },
            routes=[],
            default=["ehr"],
            n=2,
        )
        cluster.start()
        ids = [f"held-{i}" for i in range(HELD)]
        with httpx.Client(timeout=60) as http:
            for mid in ids:
                body = body_for("patient.admit", mid)
                assert (
                    http.post(cluster.urls[0], content=body, headers=signed(body)).status_code
                    == 200
                )
        sending = min(HELD, 4)  # r0's concurrency: the rest wait at hand, claimed too
        peer.wait_for(lambda rs: len(rs) >= sending, WITHIN)
        pid = cluster.pid(0)
        held = pg.query(
            database,
            "SELECT count(*), max(lease_until), extract(epoch from clock_timestamp())"
            " FROM wr_deliveries WHERE state = 'pending' AND lease_owner LIKE %s",
            owner_pattern(pid),
        )[0]
        assert held[0] == HELD, held  # r0 holds every one of them
        first_deadline = float(str(held[1]))

        def renewed_past_first_deadline() -> bool:
            rows = pg.query(
                database,
                "SELECT count(*) FILTER (WHERE lease_owner LIKE %s AND lease_until > %s),"
                " extract(epoch from clock_timestamp()) > %s FROM wr_deliveries",
                owner_pattern(pid),
                first_deadline,
                first_deadline,
            )
            return rows == [(HELD, True)]

        wait_until(renewed_past_first_deadline, WITHIN, "leases renewed past their deadline")
        assert {r.path for r in peer.requests} == {"/in/r0"}  # not taken over while renewed
        cluster.routers[0].kill()

        def completed(requests: list[Request]) -> bool:
            done = {r.header("idempotency-key") for r in requests if r.path != "/in/r0"}
            return set(ids) <= done

        requests = peer.wait_for(completed, WITHIN)
        wait_until(
            lambda: (
                pg.query(database, "SELECT count(*) FROM wr_deliveries WHERE state = 'delivered'")
                == [(HELD,)]
            ),
            WITHIN,
            "the deliveries recorded",
        )
        codes = [cluster.routers[1].terminate()]
    finally:
        peer.stop()
    by = Counter(r.path for r in requests)
    taken = Counter(r.header("idempotency-key") for r in requests if r.path != "/in/r0")
    rows = pg.query(database, "SELECT state, count(*) FROM wr_deliveries GROUP BY state")
    print(
        f"\npg lease takeover test: held={HELD} (sending when killed: {by['/in/r0']})"
        f" completed-by-r1={by['/in/r1']}"
        f" duplicate-deliveries={sum(n - 1 for n in taken.values())}"
        f" lost={len(set(ids) - taken.keys())} journal={dict(rows)}"
    )
    assert rows == [("delivered", HELD)]
    assert codes == [0]


# -- 4: the same ids to all three routers at once ----------------------------------------------


def test_concurrent_duplicates_across_routers(
    cluster_factory: Callable[..., Cluster], pg: PostgresPeer, database: str
) -> None:
    cluster = cluster_factory()
    cluster.start()
    bodies = {
        f"dup-{i}": body_for(TYPES[i % 2], f"dup-{i}", payload={"n": i}) for i in range(DUPLICATES)
    }
    answers: Counter[int] = Counter()
    lock = threading.Lock()

    def post(http: httpx.Client, url: str, body: bytes) -> None:
        status = http.post(url, content=body, headers=signed(body)).status_code
        with lock:
            answers[status] += 1

    # Each id's three posts are queued one after another, so three threads send them to the
    # three routers at the same moment.
    limits = httpx.Limits(max_connections=3 * CLIENTS)
    with (
        httpx.Client(timeout=60, limits=limits) as http,
        ThreadPoolExecutor(3 * CLIENTS) as pool,
    ):
        futures = [pool.submit(post, http, url, b) for b in bodies.values() for url in cluster.urls]
        for future in futures:
            future.result()
    acked = {mid: (json.loads(b)["meta"]["type"], digest(b)) for mid, b in bodies.items()}
    files = SinkFiles(cluster.out)
    settle(files, acked, pg, database)
    codes = cluster.terminate()
    verdict = Verdict(acked, files, pg, database)
    rows = pg.query(
        database, "SELECT count(*), count(DISTINCT message_id), sum(duplicates) FROM wr_messages"
    )
    per_sink = Counter(sink for sink, _ in files.found)
    print(
        f"\npg duplicates test: ids={DUPLICATES} posts={sum(answers.values())}"
        f" answers={dict(answers)} rows={rows[0][0]} duplicates-counted={rows[0][2]}"
        f" per-sink={dict(per_sink)} {verdict.figures()}"
    )
    assert answers == {200: 3 * DUPLICATES}
    assert rows == [(DUPLICATES, DUPLICATES, 2 * DUPLICATES)]  # one row per id
    verdict.check()
    assert verdict.duplicates == 0  # one delivery per sink
    assert codes == [0] * ROUTERS


# -- 5: the database read-only, then writable again --------------------------------------------


def test_read_only_database(
    cluster_factory: Callable[..., Cluster], pg: PostgresPeer, database: str
) -> None:
    cluster = cluster_factory(n=2)
    cluster.start()
    n = len(cluster.routers)
    pids = [cluster.pid(i) for i in range(n)]
    load = Load(cluster.urls)
    files = SinkFiles(cluster.out)
    with ThreadPoolExecutor(CLIENTS) as pool:
        load.run(pool)
        try:
            wait_until(load.more(ACKS_PER_ROUND), WITHIN, "acks before")
            pg.read_only(database)
            read_only = time.monotonic()  # no session can write from here
            wait_until(load.more(CLIENTS, status=503), WITHIN, "503s while read-only")
            wait_until(lambda: cluster.ready() == [503] * n, WITHIN, "readyz 503")
            writable = time.monotonic()
            pg.read_only(database, on=False)
            while_read_only = load.sent_within(read_only, writable)
            wait_until(load.more(ACKS_PER_ROUND), WITHIN, "acks after")
            wait_until(lambda: cluster.ready() == [200] * n, WITHIN, "readyz 200")
        finally:
            load.stop.set()
    acked = dict(load.acked)
    settle(files, acked, pg, database)
    assert [cluster.pid(i) for i in range(n)] == pids  # recovered without a restart
    codes = cluster.terminate()
    verdict = Verdict(acked, files, pg, database)
    stored = {str(mid) for (mid,) in pg.query(database, "SELECT message_id FROM wr_messages")}
    print(
        f"\npg read-only test: routers={n} acks={len(acked)} 503s={load.statuses[503]}"
        f" (stored all the same: {len(load.refused & stored)})"
        f" answers-while-read-only={dict(while_read_only)} failed-requests={load.failed}"
        f" {verdict.figures()}"
    )
    assert while_read_only[200] == 0, "a request made while read-only was answered 200"
    assert while_read_only[503] > 0
    assert set(load.statuses) == {200, 503}, load.statuses
    assert load.failed == 0
    verdict.check()
    assert codes == [0] * n
