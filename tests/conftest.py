"""Shared fixtures: the Metriport fixtures, configuration factories, a real router, a real
PostgreSQL server; helpers to post signed messages, throwaway sinks and readers of the journal
file."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from router import Message, RetryableError, SendResult, Sink, SinkOptions
from router.config import Config, load_config
from router.journal import Journal
from router.testing import post_signed, signed_headers, write_config

if TYPE_CHECKING:
    from tests.pg_peer import PostgresPeer

FIXTURES = Path(__file__).parent / "fixtures" / "metriport"
_VECTORS = json.loads((FIXTURES / "signature-vectors.json").read_text())
TEST_KEY: str = _VECTORS["key"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def fixture_vectors() -> list[tuple[str, bytes, str]]:
    """(file name, exact body bytes, x-metriport-signature) for every Metriport fixture."""
    return [
        (v["file"], (FIXTURES / v["file"]).read_bytes(), v["x-metriport-signature"])
        for v in _VECTORS["vectors"]
    ]


def base_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A configuration document: in-process listener on a free port, the test key, one file
    sink ``archive`` taking everything by default. ``overrides`` replace top-level sections."""
    doc: dict[str, Any] = {
        "server": {"listen": ["127.0.0.1:0"], "path": "/webhook"},
        "auth": {"accept": ["signature", "key"], "keys": [TEST_KEY]},
        "journal": {"path": str(tmp_path / "journal")},
        "routes": [],
        "default": ["archive"],
        "sinks": {"archive": {"type": "file", "path": str(tmp_path / "out" / "{type}.jsonl")}},
    }
    server = overrides.get("server")
    if isinstance(server, dict) and "listen" not in server:
        # A test that changes other server settings still gets a free port (the default,
        # 127.0.0.1:8080, may be taken by anything on the machine).
        overrides = {**overrides, "server": {"listen": ["127.0.0.1:0"], **server}}
    doc.update(overrides)
    return doc


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Write a configuration (``base_config`` + overrides) and load it."""

    def make(*, extra_plugins: tuple[object, ...] = (), **overrides: Any) -> Config:
        path = write_config(tmp_path, base_config(tmp_path, **overrides))
        return load_config(path, extra_plugins=extra_plugins)

    return make


def signed(body: bytes, key: str = TEST_KEY) -> dict[str, str]:
    """Headers for ``body`` signed with ``key`` (the test key unless given)."""
    return signed_headers(body, key)


async def post(client: httpx.AsyncClient, url: str, body: bytes) -> httpx.Response:
    """POST ``body`` to ``url`` signed with the test key."""
    return await post_signed(client, url, body, TEST_KEY)


def recording_sink(type_name: str, log: list[tuple[str, str, int]]) -> type[Sink[Any]]:
    """A sink type that accepts everything, logging (sink name, message id, attempt)."""

    class Recording(Sink[SinkOptions]):
        type = type_name

        async def send(self, batch: Sequence[Message]) -> SendResult:
            log.extend((self.name, m.message_id, m.attempt) for m in batch)
            return None

    return Recording


class NeverOpens(Sink[SinkOptions]):
    """A sink that never opens: its runner never reads or writes the journal (the router is
    idle), for tests that must see what the journal does without the dispatcher's writes."""

    type = "never-opens"

    async def open(self) -> None:
        raise RetryableError("never opens")

    async def send(self, batch: Sequence[Message]) -> SendResult:
        raise AssertionError("never opened")


def query_journal(directory: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the journal file in ``directory`` with a separate, plain SQLite connection."""
    with contextlib.closing(sqlite3.connect(directory / "journal.sqlite3")) as conn:
        return conn.execute(sql, params).fetchall()


def deliveries(config: Config) -> list[tuple[str, str, str, int, str | None]]:
    """(message id, sink, state, attempts, last error) rows of the journal file."""
    return query_journal(
        config.journal.path,
        "SELECT m.message_id, d.sink, d.state, d.attempts, d.last_error"
        " FROM deliveries d JOIN messages m USING (seq) ORDER BY m.seq, d.sink",
    )


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresPeer]:
    """One real PostgreSQL server for the whole session (``tests.pg_peer``), started the first
    time a test asks for it, stopped and deleted at the end."""
    from tests.pg_peer import PostgresPeer

    peer = PostgresPeer()
    try:
        peer.start()
        yield peer
    finally:
        peer.close()


@dataclass(frozen=True)
class PgDatabase:
    """A database of its own for one test on the session's server."""

    server: PostgresPeer
    name: str
    uri: str


@pytest.fixture
def pg_database(pg_server: PostgresPeer) -> Iterator[PgDatabase]:
    """A fresh, empty database for this test (a copy of an empty template), dropped after it.
    Starts the server again first if a fault test before stopped it."""
    pg_server.start()
    name = pg_server.create_database()
    yield PgDatabase(pg_server, name, pg_server.uri(name))
    pg_server.start()
    pg_server.drop_database(name)


@pytest.fixture
def postgres_uri(pg_database: PgDatabase) -> str:
    """The URI of a fresh database on the session's real PostgreSQL server."""
    return pg_database.uri


# -- journals ------------------------------------------------------------------------------------

#: The backends the journal's contract suite (tests/test_journal.py) runs on.
JOURNAL_BACKENDS = ["sqlite", "postgres"]


class JournalStore:
    """Where one journal lives (a SQLite folder, a PostgreSQL database). ``journal()`` makes
    another, unopened journal object on it: two of them are two processes' (or two routers')
    worth of connections on one store."""

    def __init__(self, backend: str, directory: Path, database: PgDatabase | None) -> None:
        self.backend = backend
        self.directory = directory
        self.database = database
        self._made = 0

    def journal(self) -> Journal:
        self._made += 1
        if self.backend == "sqlite":
            from router.journal.sqlite import SQLiteJournal

            return SQLiteJournal(self.directory / "journal")
        assert self.backend == "postgres" and self.database is not None
        from pydantic import SecretStr

        from router.config import PostgresConfig
        from router.journal.postgres import PostgresJournal

        config = PostgresConfig(dsn=SecretStr(self.database.uri), pool=4, listen=True)
        # Each router receives large bodies into a folder of its own.
        return PostgresJournal(config, spool_dir=self.directory / f"spool-{self._made}")


@pytest.fixture(params=JOURNAL_BACKENDS)
def journal_store(request: pytest.FixtureRequest, tmp_path: Path) -> JournalStore:
    """An empty journal store on each backend in ``JOURNAL_BACKENDS``."""
    database = request.getfixturevalue("pg_database") if request.param == "postgres" else None
    return JournalStore(request.param, tmp_path, database)
