"""The journal's named locks and shared state (coordination between routers), on SQLite and on
PostgreSQL: one owner at a time, extended by its owner, free again once its time is up or given
back; two journal objects on one store stand for two routers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from pydantic import SecretStr

from router.config import PostgresConfig
from router.journal import Journal
from router.journal.postgres import PostgresJournal
from router.journal.sqlite import SQLiteJournal

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, str]:
    uri = request.getfixturevalue("postgres_uri") if request.param == "postgres" else ""
    return request.param, tmp_path, uri


@contextlib.asynccontextmanager
async def two(backend: tuple[str, Path, str]) -> AsyncIterator[tuple[Journal, Journal]]:
    kind, folder, uri = backend
    journals: list[Journal] = []
    for name in ("a", "b"):
        if kind == "sqlite":
            journals.append(SQLiteJournal(folder / "journal"))
        else:
            config = PostgresConfig(dsn=SecretStr(uri), pool=2)
            journals.append(PostgresJournal(config, spool_dir=folder / name))
    for j in journals:
        await j.open()
    try:
        yield journals[0], journals[1]
    finally:
        for j in journals:
            await j.close()


async def test_a_lock_has_one_owner_until_given_back_or_expired(
    backend: tuple[str, Path, str],
) -> None:
    async with two(backend) as (a, b):
        assert await a.try_lock("metriport-retry", "router-a", 60)
        assert not await b.try_lock("metriport-retry", "router-b", 60)
        assert await a.try_lock("metriport-retry", "router-a", 60)  # its owner extends it
        await b.unlock("metriport-retry", "router-b")  # not b's: nothing happens
        assert not await b.try_lock("metriport-retry", "router-b", 60)
        await a.unlock("metriport-retry", "router-a")
        assert await b.try_lock("metriport-retry", "router-b", 0.2)
        assert not await a.try_lock("metriport-retry", "router-a", 60)
        with anyio.fail_after(10):
            while not await a.try_lock("metriport-retry", "router-a", 60):
                await anyio.sleep(0.05)  # b's 0.2 s run out
        assert not await b.try_lock("metriport-retry", "router-b", 60)


async def test_shared_state_is_seen_by_every_router(backend: tuple[str, Path, str]) -> None:
    async with two(backend) as (a, b):
        assert await b.get_state("metriport") is None
        await a.set_state("metriport", '{"asked": 1}')
        await a.set_state("metriport", '{"asked": 2}')
        found = await b.get_state("metriport")
        assert found is not None and found[0] == '{"asked": 2}' and found[1] > 0
