"""The PostgreSQL test harness itself (``tests.pg_peer``): fresh databases, stop, crash and
start again on the same folder, read-only databases. What the journal's tests and the fault
tests rely on, proven once here."""

from __future__ import annotations

import contextlib

import psycopg
import pytest
from psycopg import errors

from tests.conftest import PgDatabase


def test_each_test_gets_an_empty_database_of_its_own(pg_database: PgDatabase) -> None:
    server = pg_database.server
    assert server.query(
        pg_database.name, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
    ) == [(0,)]
    server.query(pg_database.name, "CREATE TABLE t (a int)")
    server.query(pg_database.name, "INSERT INTO t VALUES (1)")
    # Another database copied from the same template does not see it.
    other = server.create_database()
    try:
        assert server.query(other, "SELECT to_regclass('public.t') IS NULL") == [(True,)]
    finally:
        server.drop_database(other)
    # The settings the journal's promise rests on are the server's defaults.
    assert server.query(pg_database.name, "SHOW synchronous_commit") == [("on",)]
    assert server.query(pg_database.name, "SHOW fsync") == [("on",)]
    # The URI is a unix socket's: nothing listens on TCP.
    assert "host=/" in pg_database.uri
    assert server.query(pg_database.name, "SHOW listen_addresses") == [("",)]


def test_a_stopped_server_refuses_connections_and_starts_again_with_its_data(
    pg_database: PgDatabase,
) -> None:
    server, name = pg_database.server, pg_database.name
    server.query(name, "CREATE TABLE t (a int)")
    server.query(name, "INSERT INTO t VALUES (1)")
    session = psycopg.connect(pg_database.uri, autocommit=True)
    with contextlib.closing(session):
        server.stop()
        assert not server.running
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg_database.uri, connect_timeout=5).close()
    starts = server.starts
    server.start()
    assert server.running and server.starts == starts + 1
    assert server.query(name, "SELECT a FROM t") == [(1,)]  # the same URI, the same data
    server.start()  # running already: nothing to do
    assert server.starts == starts + 1


def test_a_killed_server_recovers_every_committed_row_at_the_next_start(
    pg_database: PgDatabase,
) -> None:
    server, name = pg_database.server, pg_database.name
    server.query(name, "CREATE TABLE t (a int)")
    server.query(name, "INSERT INTO t SELECT generate_series(1, 1000)")
    uncommitted = psycopg.connect(pg_database.uri)
    with contextlib.closing(uncommitted):
        uncommitted.execute("INSERT INTO t VALUES (-1)")  # open transaction, never committed
        server.kill()
        assert not server.running
    server.start()
    assert server.query(name, "SELECT count(*), min(a) FROM t") == [(1000, 1)]


def test_a_read_only_database_ends_its_sessions_and_refuses_writes_until_turned_back(
    pg_database: PgDatabase,
) -> None:
    server, name = pg_database.server, pg_database.name
    server.query(name, "CREATE TABLE t (a int)")
    session = psycopg.connect(pg_database.uri, autocommit=True)
    with contextlib.closing(session):
        server.read_only(name)
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")  # ended: a client must reconnect
    with pytest.raises(errors.ReadOnlySqlTransaction):
        server.query(name, "INSERT INTO t VALUES (1)")
    assert server.query(name, "SELECT count(*) FROM t") == [(0,)]  # reads still work
    # Other databases on the server are not affected.
    assert server.query("postgres", "SHOW default_transaction_read_only") == [("off",)]

    session = psycopg.connect(pg_database.uri, autocommit=True)
    with contextlib.closing(session):
        server.read_only(name, on=False)
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")  # a read-only session would stay read-only: ended too
    server.query(name, "INSERT INTO t VALUES (1)")
    assert server.query(name, "SELECT count(*) FROM t") == [(1,)]


def test_terminate_sessions_ends_only_that_databases_sessions(pg_database: PgDatabase) -> None:
    server = pg_database.server
    other = server.create_database()
    try:
        mine = psycopg.connect(pg_database.uri, autocommit=True)
        theirs = psycopg.connect(server.uri(other), autocommit=True)
        with contextlib.closing(mine), contextlib.closing(theirs):
            assert server.terminate_sessions(pg_database.name) == 1
            with pytest.raises(psycopg.OperationalError):
                mine.execute("SELECT 1")
            assert theirs.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.drop_database(other)
