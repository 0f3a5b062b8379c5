"""Disk trouble under the journal: full, read-only, damaged.

A full disk is a real one where the tests may mount (a 2 MiB tmpfs filled with a ballast file:
root, as on the CI machine). Everywhere, the same test also runs with SQLite's own
``max_page_count`` capped at the database's size on the router's writer connection (the only
connection that writes), which fails writes with the same SQLITE_FULL. File permissions cannot
stand in: root writes through them, and a read-only remount is refused while the journal is
open for writing (``mount point is busy``), so a journal made read-only is tested at start.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from router.config import Config, load_config
from router.journal.sqlite import SQLiteJournal as Journal
from router.journal.sqlite import _unsupported
from router.message import Message
from router.testing import (
    Recorder,
    RunningRouter,
    SinkPlugin,
    body_for,
    eventually,
    running_router,
    write_config,
)
from tests import rawhttp
from tests.conftest import TEST_KEY, NeverOpens, base_config, query_journal, signed

REPO = Path(__file__).resolve().parent.parent
MOUNT, UMOUNT, SQLITE3 = shutil.which("mount"), shutil.which("umount"), shutil.which("sqlite3")
BASH = shutil.which("bash") or "/bin/bash"


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "2m") -> Iterator[bool]:
    """Mount a tmpfs of ``size`` on ``directory``; yields False where mounting is not allowed."""
    directory.mkdir(parents=True, exist_ok=True)
    if MOUNT is None or UMOUNT is None or os.geteuid() != 0:
        yield False
        return
    done = subprocess.run(
        [MOUNT, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run([UMOUNT, "-l", str(directory)], check=False)


class Disk:
    """Takes the journal's free space away and gives it back."""

    def __init__(self, kind: str, mount_point: Path) -> None:
        self.kind = kind
        self.ballast = mount_point / "ballast"

    async def fill(self, router: RunningRouter) -> None:
        if self.kind == "tmpfs":
            fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                size = 1 << 16
                while size:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                        size //= 2
            finally:
                os.close(fd)
        else:
            journal = router.daemon.journal
            pages = await journal._write(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
            await journal._write(lambda c: c.execute(f"PRAGMA max_page_count={pages}"))

    async def free(self, router: RunningRouter) -> None:
        if self.kind == "tmpfs":
            self.ballast.unlink()
        else:
            await router.daemon.journal._write(
                lambda c: c.execute("PRAGMA max_page_count=1073741823")
            )


def rows(config: Config) -> dict[str, bytes]:
    found = query_journal(config.journal.path, "SELECT message_id, body FROM messages")
    return {mid: bytes(body) for mid, body in found}


def id_of(body: bytes) -> str:
    return str(json.loads(body)["meta"]["messageId"])


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["tmpfs", "page-limit"])
async def test_a_full_disk_answers_503_stores_nothing_and_recovers_by_itself(
    kind: str, tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    # The page-limit variant takes space away inside SQLite: its folder is roomy (the WAL
    # holds every write between checkpoints).
    with tmpfs(tmp_path / "disk", "2m" if kind == "tmpfs" else "64m") as mounted:
        if kind == "tmpfs" and not mounted:
            pytest.skip("mounting a tmpfs needs root (the page-limit variant runs instead)")
        disk = Disk(kind, tmp_path / "disk")
        recorder = Recorder()
        config = make_config(
            extra_plugins=(recorder,), journal={"path": str(tmp_path / "disk" / "journal")}
        )
        first = body_for("patient.admit")
        big = body_for("patient.admit", pad="x" * 600_000)  # needs new space, whatever is free
        smalls = [body_for("patient.admit", pad="s" * 2000) for _ in range(20)]
        async with running_router(config) as router, httpx.AsyncClient() as client:

            async def post(body: bytes) -> httpx.Response:
                return await client.post(router.webhook_url, content=body, headers=signed(body))

            assert (await post(first)).status_code == 200
            # Delivered and recorded first: /readyz reflects the journal's last commit, and a
            # small delivery record can still commit on a full disk (see the README).
            await recorder.wait_for(lambda r: r.delivered_to("archive") == [id_of(first)])
            await disk.fill(router)

            r = await post(big)
            assert r.status_code == 503
            assert r.json() == {"error": "journal unavailable: message not stored"}
            ready = await client.get(router.base_url + "/readyz")
            assert (ready.status_code, ready.json()["journal"]) == (503, "failing")
            # Small messages may still fit in space SQLite already has: every 200 is stored
            # (byte for byte), every 503 is not.
            answers = {id_of(b): (await post(b)).status_code for b in smalls}
            assert set(answers.values()) <= {200, 503}
            acked = {mid for mid, status in answers.items() if status == 200}
            held = rows(config)
            assert set(held) == {id_of(first), *acked}
            assert all(held[id_of(b)] == b for b in smalls if id_of(b) in acked)

            await disk.free(router)  # no restart: the next write simply works
            assert (await post(big)).status_code == 200
            ready = await client.get(router.base_url + "/readyz")
            assert (ready.status_code, ready.json()["journal"]) == (200, "ok")
            for body in smalls:  # what was refused is taken when sent again
                assert (await post(body)).status_code == 200
            everything = {id_of(b) for b in [first, big, *smalls]}
            await recorder.wait_for(lambda r: set(r.delivered_to("archive")) == everything)
        held = rows(config)
        assert held == {id_of(b): b for b in [first, big, *smalls]}


# -- at start ----------------------------------------------------------------------------------


def serve(config_path: Path) -> subprocess.CompletedProcess[str]:
    """``webhook-router serve`` as the real program; expected to fail at start."""
    return subprocess.run(
        [sys.executable, "-m", "router", "serve", "--config", str(config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_journal(directory: Path, count: int = 300) -> dict[str, bytes]:
    """A journal holding ``count`` messages pending for ``archive``, checkpointed and closed."""
    bodies = {}

    async def fill() -> None:
        journal = Journal(directory)
        await journal.open()
        try:
            for i in range(count):
                body = body_for("patient.admit", pad=f"{i:05d}" * 40)
                message = Message(id_of(body), "patient.admit", None, body, 1000.0 + i)
                await journal.append(message, ["archive"])
                bodies[message.message_id] = body
        finally:
            await journal.close()

    anyio.run(fill)
    return bodies


def cli_config(tmp_path: Path, journal: Path) -> Path:
    # The signature alone: accepting x-webhook-key would add a warning to the one line.
    auth = {"accept": ["signature"], "keys": [TEST_KEY]}
    doc = base_config(tmp_path, journal={"path": str(journal)}, auth=auth)
    return write_config(tmp_path, doc)


def _overwrite(path: Path, at: int, size: int) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        f.write(bytes((i * 37 + 11) % 256 for i in range(size)))


DAMAGE: list[Any] = [
    pytest.param(lambda p: os.truncate(p, p.stat().st_size // 2 + 100), id="truncated-mid-page"),
    pytest.param(lambda p: os.truncate(p, 4096 * 3), id="truncated-at-a-page"),
    pytest.param(lambda p: _overwrite(p, 4096 * 20, 300), id="page-header-overwritten"),
    pytest.param(lambda p: _overwrite(p, 4096 * 5, 4096 * 3), id="pages-overwritten"),
    pytest.param(lambda p: _overwrite(p, 0, 100), id="header-overwritten"),
    pytest.param(lambda p: p.write_bytes(b"an operator's notes\n" * 500), id="not-a-database"),
]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_journal_stops_start_with_one_line_naming_the_recovery(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    journal = tmp_path / "journal"
    write_journal(journal)
    db = journal / "journal.sqlite3"
    damage(db)
    before = db.read_bytes()
    done = serve(cli_config(tmp_path, journal))
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and str(db) in line
    assert "damaged" in line
    assert "sqlite3 DAMAGED .recover | sqlite3 NEW" in line
    assert 'see "Recovering a damaged journal" in the README' in line
    assert "Traceback" not in done.stdout + done.stderr
    assert db.read_bytes() == before  # left exactly as found, for the recovery


#: ``webhook-router serve`` on a Python whose sqlite3 module reports an old SQLite library.
_OLD_SQLITE = """
import sqlite3, sys
sqlite3.sqlite_version_info, sqlite3.sqlite_version = (3, 31, 1), "3.31.1"
from router.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_sqlite_too_old_for_the_journal_stops_start_with_one_line_saying_what_to_do(
    tmp_path: Path,
) -> None:
    """Else the daemon would start, say it is ready, and fail every message (its
    statements need SQLite 3.35)."""
    journal = tmp_path / "journal"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _OLD_SQLITE,
            "serve",
            "--config",
            str(cli_config(tmp_path, journal)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("error: cannot open journal ")
    assert "SQLite 3.35.0 or newer is needed; this Python's sqlite3 module uses 3.31.1" in line
    assert "journal.postgres" in line
    assert "Traceback" not in done.stdout + done.stderr
    assert not journal.exists()  # nothing created


def test_a_sqlite_without_its_json_functions_is_named_with_what_to_do() -> None:
    class WithoutJson:
        def execute(self, sql: str) -> None:
            raise sqlite3.OperationalError("no such table: json_each")

    problem = _unsupported(WithoutJson())  # type: ignore[arg-type]
    assert problem is not None and "was built without its JSON functions" in problem


def test_a_journal_on_a_read_only_filesystem_stops_start_with_one_line(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    with tmpfs(disk) as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs needs root")
        write_journal(disk / "journal", count=5)
        subprocess.run([str(MOUNT), "-o", "remount,ro", str(disk)], check=True)
        done = serve(cli_config(tmp_path, disk / "journal"))
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: cannot open journal {disk / 'journal' / 'journal.sqlite3'}: ")
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.skipif(SQLITE3 is None, reason="needs the sqlite3 command")
def test_the_documented_recovery_gets_the_router_going_again(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    bodies = write_journal(journal)
    _overwrite(journal / "journal.sqlite3", 4096 * 20, 300)
    assert serve(cli_config(tmp_path, journal)).returncode == 1

    # The README's procedure, step by step.
    aside = tmp_path / "journal.damaged"
    journal.rename(aside)
    journal.mkdir(mode=0o700)
    damaged, rebuilt = aside / "journal.sqlite3", journal / "journal.sqlite3"
    script = f"sqlite3 '{damaged}' .recover | sqlite3 '{rebuilt}'"
    if subprocess.run([BASH, "-o", "pipefail", "-c", script], check=False).returncode != 0:
        rebuilt.unlink(missing_ok=True)  # this sqlite3 has no .recover: the .dump way
        script = (
            f"sqlite3 '{damaged}' .dump | sed 's/^ROLLBACK; -- due to errors$/COMMIT;/'"
            f" | sqlite3 '{rebuilt}'"
        )
        subprocess.run([BASH, "-o", "pipefail", "-c", script], check=True)
    cleanup = "DELETE FROM deliveries WHERE seq NOT IN (SELECT seq FROM messages);"
    subprocess.run([str(SQLITE3), str(rebuilt), cleanup], check=True)
    check = subprocess.run(
        [str(SQLITE3), str(rebuilt), "PRAGMA integrity_check"], capture_output=True, text=True
    )
    assert check.stdout.strip() == "ok"
    rebuilt.chmod(0o600)

    pending = {
        mid
        for (mid,) in query_journal(
            journal,
            "SELECT message_id FROM messages JOIN deliveries USING (seq) WHERE state = 'pending'",
        )
    }
    assert 0 < len(pending) <= len(bodies)  # most came back; the damaged page's rows did not

    async def run() -> None:
        recorder = Recorder()
        config = load_config(cli_config(tmp_path, journal), extra_plugins=[recorder])
        async with running_router(config) as router:
            await recorder.wait_for(lambda r: set(r.delivered_to("archive")) == pending)
            body = body_for("patient.admit")  # and new messages are taken
            async with httpx.AsyncClient() as client:
                r = await client.post(router.webhook_url, content=body, headers=signed(body))
            assert r.status_code == 200

    anyio.run(run)
    lines = (tmp_path / "out" / "patient.admit.jsonl").read_bytes().splitlines()
    delivered = {id_of(line[line.index(b',"body":') + 8 : -1]): line for line in lines}
    for mid in pending:  # byte for byte what was first received
        assert delivered[mid].endswith(b',"body":' + bodies[mid] + b"}")


def test_journal_files_are_0600_even_in_a_folder_others_can_read(tmp_path: Path) -> None:
    # systemd's StateDirectory= and a hand-made folder are often 0755: the files holding bodies
    # (database, write-ahead log, shared memory) must not be readable by others all the same.
    directory = tmp_path / "journal"
    directory.mkdir()
    directory.chmod(0o755)
    modes: dict[str, int] = {}

    async def run() -> None:
        journal = Journal(directory)
        await journal.open()
        try:
            body = body_for("patient.admit")
            await journal.append(Message(id_of(body), "patient.admit", None, body, 1.0), ["s"])
            await journal.messages([1])  # a reader connection too
            modes.update({p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()})
        finally:
            await journal.close()

    anyio.run(run)
    assert {"journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o600)


# -- large bodies: the disk-fill attack and a real ENOSPC while spooling ------------------------

MIB = 1024 * 1024


async def _stream_bogus(base_url: str, size: int, watch: Callable[[], None]) -> int:
    """What the attack sends: a bogus signature and ``size`` bytes of zeros, as fast as the
    router takes them; the status (0: no answer, the connection reset)."""
    head = rawhttp.http([(b"x-metriport-signature", b"0" * 64), (b"content-length", b"%d" % size)])
    async with rawhttp.connect(base_url) as conn:
        if not await conn.send(head):
            return 0
        piece = b"0" * MIB
        for _ in range(size // MIB):
            watch()
            if not await conn.send(piece):
                break
        try:
            return (await conn.answer()).status
        except AssertionError:
            return 0


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["tmpfs", "budget"])
async def test_the_disk_fill_attack_leaves_signed_messages_200_and_the_disk_not_full(
    kind: str, tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    # Issue 13: four clients with a bogus signature each streaming a big body at a small
    # journal filesystem (here 48 MiB and 16 MiB each; the 600 MiB and 200 MiB scaled).
    with tmpfs(tmp_path / "disk", "48m") as mounted:
        if kind == "tmpfs" and not mounted:
            pytest.skip("mounting a tmpfs needs root (the budget variant runs instead)")
        server: dict[str, Any] = {"graceful_timeout": "200ms"}
        if kind == "budget":  # any filesystem: the budget set in bytes
            server["max_unverified_bytes"] = 24 * MIB
        recorder = Recorder()
        journal = tmp_path / "disk" / "journal"
        config = make_config(
            extra_plugins=(recorder,), journal={"path": str(journal)}, server=server
        )
        lowest = [1 << 62]

        def watch() -> None:
            st = os.statvfs(tmp_path / "disk")
            lowest[0] = min(lowest[0], st.f_bavail * st.f_frsize)

        attacks: list[int] = []
        smalls = [body_for("patient.admit", pad="s" * 2000) for _ in range(20)]
        async with running_router(config) as router, httpx.AsyncClient() as client:

            async def attacker() -> None:
                for _ in range(2):
                    attacks.append(await _stream_bogus(router.base_url, 16 * MIB, watch))

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(attacker)
                answers = []
                for body in smalls:
                    watch()
                    r = await client.post(router.webhook_url, content=body, headers=signed(body))
                    answers.append(r.status_code)
            watch()
            assert answers == [200] * len(smalls)
            assert set(attacks) <= {401, 503, 0} and 401 in attacks
            await recorder.wait_for(
                lambda r: set(r.delivered_to("archive")) == {id_of(b) for b in smalls}
            )
            assert [p for p in (journal / "bodies").iterdir()] == []
        if kind == "tmpfs":
            assert lowest[0] > 0  # the filesystem was never full
        assert set(rows(config)) == {id_of(b) for b in smalls}


@pytest.mark.anyio
async def test_a_disk_filling_up_while_a_large_body_arrives_is_503_and_readyz_recovers(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    with tmpfs(tmp_path / "disk", "16m") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs needs root")
        disk = Disk("tmpfs", tmp_path / "disk")
        journal = tmp_path / "disk" / "journal"
        config = make_config(journal={"path": str(journal)}, server={"graceful_timeout": "200ms"})
        body = body_for("medical.consolidated-data", pad="x" * (4 * MIB))
        signature = signed(body)["x-metriport-signature"].encode()
        head = rawhttp.http(
            [(b"content-length", b"%d" % len(body)), (b"x-metriport-signature", signature)]
        )
        async with running_router(config) as router, httpx.AsyncClient() as client:
            async with rawhttp.connect(router.base_url) as conn:
                await conn.send(head + body[: 2 * MIB])
                await eventually(
                    lambda: (journal / "bodies").is_dir() and any((journal / "bodies").iterdir())
                )
                await disk.fill(router)  # full while the body is on its way
                await conn.send(body[2 * MIB :])
                answer = await conn.answer()
            assert answer.status == 503
            assert json.loads(answer.body) == {"error": "journal unavailable: message not stored"}
            assert list((journal / "bodies").iterdir()) == []
            # What the body had written is free again: taken too, so the disk stays full.
            rest = Disk("tmpfs", tmp_path / "disk")
            rest.ballast = rest.ballast.with_name("ballast-2")
            await rest.fill(router)
            ready = await client.get(router.base_url + "/readyz")
            assert (ready.status_code, ready.json()["journal"]) == (503, "failing")
            await disk.free(router)
            await rest.free(router)
            ready = await client.get(router.base_url + "/readyz")  # by itself: no write between
            assert (ready.status_code, ready.json()["journal"]) == (200, "ok")
            r = await client.post(router.webhook_url, content=body, headers=signed(body))
            assert r.status_code == 200
        assert query_journal(config.journal.path, "SELECT message_id FROM messages") == [
            (id_of(body),)
        ]


@pytest.mark.anyio
async def test_readyz_proves_the_journal_can_commit_and_says_why_not(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    # An idle router (its one sink never opens: nothing claims) whose journal can no longer
    # write is not ready, though no write has failed yet: /readyz commits a small write of its
    # own to know.
    # Here the writer connection refuses writes (SQLite's query_only: SQLITE_READONLY, as a
    # read-only remount would give).
    sinks = {"down": {"type": "never-opens"}}
    config = make_config(sinks=sinks, default=["down"], extra_plugins=(SinkPlugin(NeverOpens),))
    async with running_router(config) as router, httpx.AsyncClient() as client:
        metrics_url = router.base_url + "/metrics"
        assert "\nwebhook_router_ready 1.0\n" in (await client.get(metrics_url)).text
        writer = router.daemon.journal._conn
        await anyio.to_thread.run_sync(writer.execute, "PRAGMA query_only=ON")
        with anyio.fail_after(15):  # the healthy probe's answer stands a second
            while "\nwebhook_router_ready 0.0\n" not in (await client.get(metrics_url)).text:
                await anyio.sleep(0.05)  # /metrics says it too: an alert needs no probe
        ready = await client.get(router.base_url + "/readyz")
        assert ready.status_code == 503
        assert ready.json()["journal"] == "failing"
        # (the probe's own words, or the journal's once the probe's failure marked it failing)
        assert ready.json()["reason"].endswith("attempt to write a readonly database")
        body = body_for("patient.admit")
        r = await client.post(router.webhook_url, content=body, headers=signed(body))
        assert r.status_code == 503
        ready = await client.get(router.base_url + "/readyz")
        assert ready.json()["reason"] == "attempt to write a readonly database"

        await anyio.to_thread.run_sync(writer.execute, "PRAGMA query_only=OFF")
        r = await client.post(router.webhook_url, content=body, headers=signed(body))
        assert r.status_code == 200
        with anyio.fail_after(15):
            while (ready := await client.get(router.base_url + "/readyz")).status_code != 200:
                await anyio.sleep(0.05)  # the failed probe's answer stands a second
        assert "reason" not in ready.json()
