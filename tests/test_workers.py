"""Several worker processes under one supervisor (``server.workers``), end to end: the real
``webhook-router serve`` on an inherited loopback socket, real signals, a real notify socket,
SQLite and PostgreSQL journals.

Every acknowledged message must reach every sink it was routed to, with its exact bytes; with
no kill, exactly once per sink. Sizes grow for ``make soak`` through ``WORKERS_ACKS``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from router.config import load_config
from router.journal import journal_for
from router.testing import RouterProcess, body_for, listening_socket, wait_until, write_config
from tests.conftest import TEST_KEY, signed
from tests.test_crash import Load, delivered
from tests.test_notify import Served, _field

ACKS = int(os.environ.get("WORKERS_ACKS", "240"))
CLIENTS = 8


def document(proc: RouterProcess, workers: int, journal: dict[str, Any]) -> dict[str, Any]:
    """Two types, each to its own sink and to ``all``: a message reaches two sinks."""
    return {
        "server": {"listen": [proc.listen], "workers": workers},
        "auth": {"keys": [TEST_KEY]},
        "journal": journal,
        "routes": [
            {"match": "patient.*", "to": ["events", "all"]},
            {"match": "medical.*", "to": ["medical", "all"]},
        ],
        "sinks": {
            "events": {"type": "file", "path": "out/events/{type}.jsonl"},
            "medical": {"type": "file", "path": "out/medical/{date}.jsonl"},
            "all": {"type": "file", "path": "out/all/{date}.jsonl"},
        },
    }


@pytest.fixture
def router(tmp_path: Path) -> Iterator[RouterProcess]:
    sock = listening_socket()
    proc = RouterProcess(tmp_path / "config.yaml", sock)
    try:
        yield proc
    finally:
        proc.kill()
        sock.close()


def workers_of(proc: RouterProcess) -> dict[int, int]:
    """The worker index → pid now, from the supervisor's ``worker-ready`` log lines."""
    found = {}
    for m in re.finditer(r"worker-ready worker=(\d+) pid=(\d+)", proc.logs()):
        found[int(m[1])] = int(m[2])
    return found


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # exited, not yet reaped by whoever adopted it


def routers_on(config_path: Path) -> list[int]:
    """The pids of the routers registered on the journal (what ``status`` lists)."""

    async def read() -> list[int]:
        journal = journal_for(load_config(config_path, secrets=False).journal)
        await journal.open(maintenance=False, create=False)
        try:
            status = await journal.status()
        finally:
            await journal.close()
        return sorted(info.pid for info, _ in status.routers)

    return anyio.run(read)


def load_until(load: Load, count: int) -> None:
    target = load.count() + count
    wait_until(lambda: load.count() >= target, 120, f"{count} more acks")


def check_delivered(acked: dict[str, bytes], out: Path, *, exactly_once: bool) -> None:
    """Every acked message in its type's sink and in ``all``, byte for byte."""
    for sink in ("all", "events", "medical"):
        expected = {
            mid
            for mid, body in acked.items()
            if sink == "all" or (b'"patient.' in body) == (sink == "events")
        }
        wait_until(
            lambda s=sink, e=expected: e <= delivered(out / s).keys(), 120, f"acks in {sink}"
        )
        found = delivered(out / sink)
        assert not [m for m in expected if acked[m] not in found[m]], f"{sink}: bytes differ"
        if exactly_once:
            twice = {m: len(b) for m, b in found.items() if len(b) > 1}
            assert not twice, f"{sink}: delivered more than once: {twice}"


def run_load(proc: RouterProcess, acks: int) -> dict[str, bytes]:
    load = Load(proc.base_url + "/webhook")
    with ThreadPoolExecutor(CLIENTS) as pool:
        for client in range(CLIENTS):
            pool.submit(load.client, client)
        try:
            load_until(load, acks)
        finally:
            load.stop.set()
    assert load.refused == 0 and load.failed == 0
    return dict(load.acked)


def accepted_total(proc: RouterProcess) -> float:
    text = httpx.get(proc.base_url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("webhook_router_messages_accepted_total{")
    )


@pytest.mark.parametrize("workers", [2, 4])
def test_every_acked_message_reaches_each_sink_once_on_sqlite(
    router: RouterProcess, tmp_path: Path, workers: int
) -> None:
    write_config(tmp_path, document(router, workers, {"path": "journal"}))
    router.start()
    # READY=1 came after every worker registered on the journal and listened.
    assert len(routers_on(router.config_path)) == workers
    assert sorted(workers_of(router)) == list(range(workers))
    acked = run_load(router, ACKS)
    check_delivered(acked, tmp_path / "out", exactly_once=True)
    # One /metrics for the service, whichever worker answers: every worker's acks counted.
    assert accepted_total(router) == len(acked)
    ready = httpx.get(router.base_url + "/readyz").json()
    assert ready["ready"] is True and ready["workers"] == f"{workers}/{workers}"
    assert router.terminate() == 0
    assert "worker-exited" not in router.logs()


@pytest.mark.parametrize("workers", [2, 4])
def test_every_acked_message_reaches_each_sink_once_on_postgres(
    router: RouterProcess, tmp_path: Path, workers: int, postgres_uri: str
) -> None:
    journal = {"path": "spool", "postgres": {"dsn": postgres_uri, "pool": 3}}
    write_config(tmp_path, document(router, workers, journal))
    router.start()
    assert len(routers_on(router.config_path)) == workers
    acked = run_load(router, ACKS)
    check_delivered(acked, tmp_path / "out", exactly_once=True)
    assert accepted_total(router) == len(acked)
    assert router.terminate() == 0


def test_a_worker_killed_under_load_is_restarted_and_no_ack_is_lost(
    router: RouterProcess, tmp_path: Path
) -> None:
    write_config(tmp_path, document(router, 2, {"path": "journal"}))
    router.start()
    victim = workers_of(router)[0]
    load = Load(router.base_url + "/webhook")
    with ThreadPoolExecutor(CLIENTS) as pool:
        for client in range(CLIENTS):
            pool.submit(load.client, client)
        try:
            load_until(load, ACKS // 2)
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: workers_of(router).get(0, victim) != victim, 60, "a new worker 0")
            load_until(load, ACKS // 2)
        finally:
            load.stop.set()
    assert load.refused == 0  # requests cut by the kill fail; none is refused
    assert f"worker-exited worker=0 pid={victim} code=SIGKILL" in router.logs()
    check_delivered(dict(load.acked), tmp_path / "out", exactly_once=False)
    wait_until(lambda: httpx.get(router.base_url + "/readyz").status_code == 200, 30, "ready")
    assert router.terminate() == 0


def test_sigkill_of_the_supervisor_leaves_no_worker_behind(
    router: RouterProcess, tmp_path: Path
) -> None:
    write_config(tmp_path, document(router, 2, {"path": "journal"}))
    router.start()
    pids = list(workers_of(router).values())
    assert len(pids) == 2 and not any(gone(pid) for pid in pids)
    router.kill()  # SIGKILL: the supervisor can do nothing about it
    wait_until(lambda: all(gone(pid) for pid in pids), 30, "the workers to exit")


def test_reload_under_load_a_bad_file_is_refused_by_all_a_good_one_taken_by_all(
    router: RouterProcess, tmp_path: Path
) -> None:
    doc = document(router, 2, {"path": "journal"})
    write_config(tmp_path, doc)
    router.start()
    assert router.proc is not None
    load = Load(router.base_url + "/webhook")
    with ThreadPoolExecutor(CLIENTS) as pool:
        for client in range(CLIENTS):
            pool.submit(load.client, client)
        try:
            load_until(load, ACKS // 4)
            write_config(tmp_path, {**doc, "sinks": {**doc["sinks"], "late": {"type": "nope"}}})
            router.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "reload-refused" in router.logs(), 30, "the refusal")
            load_until(load, ACKS // 4)
            routes = [{"match": "patient.*", "to": ["events", "all", "late"]}, doc["routes"][1]]
            late = {"type": "file", "path": "out/late/{type}.jsonl"}
            write_config(
                tmp_path, {**doc, "routes": routes, "sinks": {**doc["sinks"], "late": late}}
            )
            router.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "workers-reloaded" in router.logs(), 30, "every worker's reload")
            load_until(load, ACKS // 4)
        finally:
            load.stop.set()
    acked = dict(load.acked)
    logs = router.logs()
    assert logs.count(" reloaded sinks=") == 2  # each worker once: the good file only
    check_delivered(acked, tmp_path / "out", exactly_once=True)
    # Every worker routes patient.* to `late` too now (a new connection each: either worker).
    later = [f"late-{i}" for i in range(20)]
    for mid in later:
        body = body_for("patient.admit", mid)
        assert httpx.post(
            router.base_url + "/webhook", content=body, headers=signed(body)
        ).is_success
    wait_until(lambda: set(later) <= delivered(tmp_path / "out" / "late").keys(), 60, "late")
    assert router.terminate() == 0


def test_an_ordered_sink_keeps_each_patients_order_across_workers(
    router: RouterProcess, tmp_path: Path
) -> None:
    doc = {
        "server": {"listen": [router.listen], "workers": 2},
        "auth": {"keys": [TEST_KEY]},
        "journal": {"path": "journal"},
        "default": ["lane"],
        "sinks": {"lane": {"type": "file", "path": "out/lane.jsonl", "ordered": True}},
    }
    write_config(tmp_path, doc)
    router.start()
    per_patient = max(10, ACKS // 24)
    errors: list[str] = []

    def patient(n: int) -> None:
        # One patient's messages one after the other (each after the previous one's 200), on
        # a new connection each: consecutive messages land on either worker.
        for i in range(per_patient):
            body = body_for("patient.admit", f"p{n}-{i}", payload={"patientId": f"p{n}"})
            r = httpx.post(router.base_url + "/webhook", content=body, headers=signed(body))
            if r.status_code != 200:
                errors.append(f"{r.status_code}")

    threads = [threading.Thread(target=patient, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    out = tmp_path / "out" / "lane.jsonl"

    def lines() -> list[str]:
        if not out.exists():
            return []
        whole = out.read_bytes().rpartition(b"\n")[0]
        return [json.loads(line)["messageId"] for line in whole.splitlines()]

    wait_until(lambda: len(lines()) >= CLIENTS * per_patient, 60, "every message")
    for n in range(CLIENTS):
        got = [mid for mid in lines() if mid.startswith(f"p{n}-")]
        assert got == [f"p{n}-{i}" for i in range(per_patient)]
    assert router.terminate() == 0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with tempfile.TemporaryDirectory(prefix="wr-notify-") as short:
        s = Served(tmp_path, Path(short))
        try:
            yield s
        finally:
            if s.proc is not None and s.proc.poll() is None:
                print(s.logs())
            s.close()


def test_sd_notify_ready_once_all_workers_listen_reload_stop_and_watchdog(
    served: Served, tmp_path: Path
) -> None:
    doc = served.document()
    doc["server"]["workers"] = 2
    write_config(tmp_path, doc)
    ready = served.start({"WATCHDOG_USEC": "2000000"})  # pings every second
    assert _field(ready, "STATUS").startswith("2 workers listening on ")
    # READY=1 once, from the supervisor alone: the workers' own go to the supervisor.
    assert served.notify.states() == ["READY=1"]
    assert len(routers_on(served.config_path)) == 2
    assert served.post(TEST_KEY, "m-1") == 200
    served.wait_for("WATCHDOG=1")

    # A worker that stops answering (stopped, so it stops pinging): no more pings for it.
    (stalled,) = [int(m[1]) for m in re.finditer(r"worker-ready worker=0 pid=(\d+)", served.logs())]
    os.kill(stalled, signal.SIGSTOP)
    wait_until(lambda: "watchdog-withheld workers=0" in served.logs(), 15, "withheld")
    os.kill(stalled, signal.SIGCONT)
    served.notify.received.clear()
    served.wait_for("WATCHDOG=1")

    write_config(tmp_path, {**doc, "bogus": 1})
    served.signal(signal.SIGHUP)
    refused = served.wait_for("READY=1")
    assert "STATUS=reload refused: configuration invalid, old one kept" in refused
    write_config(tmp_path, doc)
    served.signal(signal.SIGHUP)
    reloaded = served.wait_for("READY=1")
    assert "STATUS=configuration reloaded" in reloaded
    assert served.notify.states() == ["RELOADING=1", "READY=1", "RELOADING=1", "READY=1"]
    assert served.stop() == 0
    assert served.notify.states()[-1] == "STOPPING=1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), (4, 4), ("auto", len(os.sched_getaffinity(0))), (0, None), ("x", None), (True, None)],
)
def test_server_workers_takes_a_count_or_auto_and_names_the_line_otherwise(
    tmp_path: Path, value: object, expected: int | None
) -> None:
    from router.errors import ConfigError

    doc = {
        "server": {"workers": value},
        "auth": {"keys": [TEST_KEY]},
        "default": ["a"],
        "sinks": {"a": {"type": "file", "path": "out.jsonl"}},
    }
    path = write_config(tmp_path, doc)
    if expected is not None:
        assert load_config(path).server.workers == expected
        return
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert [str(p) for p in e.value.problems] == [
        f"{path}:2: server.workers: "
        + (
            "Input should be greater than or equal to 1"
            if value == 0
            else "expected a number of worker processes (1 or more) or auto"
        )
    ]
