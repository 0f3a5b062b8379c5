"""PostgreSQL journal faults: the journal driven directly on a real server of this module's
own (``tests.pg_peer``), which the tests stop, kill and restart."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from router.config import PostgresConfig
from router.errors import JournalUnavailable
from router.journal.postgres import PostgresJournal
from router.message import Message
from router.testing import body_for
from tests.pg_peer import PostgresPeer, postgres_peer

KILLS = int(os.environ.get("PGFAULTS_KILLS", "3"))
ACKS_PER_ROUND = int(os.environ.get("PGFAULTS_ACKS_PER_ROUND", "100"))
POLL_KILLS = int(os.environ.get("PGFAULTS_POLL_KILLS", "2"))
POLL_ACKS_PER_ROUND = int(os.environ.get("PGFAULTS_POLL_ACKS_PER_ROUND", "50"))
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
    """A server of this module's own: its tests stop and kill it. Its folder is outside
    pytest's temporary root: as root the server runs as another OS user, which ``pg_ctl``
    must reach the folder as, and each pytest session makes that root private again (0700)."""
    with tempfile.TemporaryDirectory(prefix="wr-pg-faults-") as folder:
        Path(folder).chmod(0o755)
        with postgres_peer(Path(folder) / "data") as peer:
            yield peer


@pytest.fixture
def database(pg: PostgresPeer) -> Iterator[str]:
    """A fresh database on a running server; the server's log is shown if the test fails."""
    pg.start()  # a test that failed may have left it stopped
    name = pg.create_database()
    yield name


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
