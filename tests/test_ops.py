"""The operator commands (``status``, ``dead list|retry|purge``, ``replay``, ``explain``), run as
the real program in child processes against journals written by a real daemon: beside the
running daemon (whose runners notice journal changes within ``dispatcher.IDLE_POLL``) and after
it stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from router.config import CONFIG_ENV
from router.journal.sqlite import SQLiteJournal as Journal
from router.testing import (
    RouterProcess,
    body_for,
    listening_socket,
    signed_headers,
    wait_until,
    write_config,
)
from tests.conftest import FIXTURES, TEST_KEY, query_journal

REPO = Path(__file__).resolve().parent.parent
#: In every body the tests post, and in a sink's secret header: never in any command's output.
SECRET = "PATIENT-SECRET-7f3a9c"
SINK_TOKEN = "sink-token-5be1d0"
WAIT = 30.0


# -- helpers -----------------------------------------------------------------------------------


class Cli:
    """Runs ``webhook-router ARGS --config CONFIG`` in a child process; every run is checked for
    tracebacks and for body text or keys in its output."""

    def __init__(self, config: Path) -> None:
        self.config = config

    def __call__(
        self, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
        r = subprocess.run(
            [sys.executable, "-m", "router", *args, "--config", str(self.config)],
            cwd=REPO,
            env={**base, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = r.stdout + r.stderr
        assert "Traceback" not in out, out
        for secret in (SECRET, TEST_KEY, SINK_TOKEN):
            assert secret not in out, f"{secret!r} printed by {args}"
        return r

    def many(self, *calls: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
        """Several read-only commands at once (each in its own process)."""
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(lambda args: self(*args), calls))

    def ok(self, *args: str) -> str:
        r = self(*args)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


@dataclass
class Downstream:
    """A tiny HTTP receiver in a thread. It answers every POST with ``status`` (a 4xx answer
    echoes the body back, so a sink that stored the answer would leak it) and records
    (message id, attempt, status answered)."""

    status: int = 400
    port: int = 0
    seen: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/in"

    def answered(self, status: int) -> list[tuple[str, str]]:
        return [(mid, attempt) for mid, attempt, s in list(self.seen) if s == status]


@pytest.fixture
def downstream() -> Iterator[Downstream]:
    state = Downstream()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            status = state.status
            echo = body if status >= 400 else b""
            self.send_response(status)
            self.send_header("content-length", str(len(echo)))
            self.end_headers()
            self.wfile.write(echo)
            mid = self.headers.get("x-webhook-router-message-id", "")
            state.seen.append((mid, self.headers.get("x-webhook-router-attempt", ""), status))

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL on a bound port nobody listens on: connections are refused (→ retrying)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{closed.getsockname()[1]}/down"


class Router:
    """A real ``webhook-router serve`` (``RouterProcess``) with its configuration, journal and
    output folder under the test's directory."""

    def __init__(self, tmp: Path, sock: socket.socket) -> None:
        self.config = tmp / "config.yaml"
        self.journal = tmp / "journal"
        self.out = tmp / "out"
        self.proc = RouterProcess(self.config, sock)
        self.client = httpx.Client(timeout=10)
        self.cli = Cli(self.config)

    def configure(
        self,
        sinks: Mapping[str, Any],
        routes: Sequence[Mapping[str, Any]],
        default: Sequence[str] = (),
    ) -> None:
        doc: dict[str, Any] = {
            "server": {"listen": [self.proc.listen], "path": "/webhook"},
            "auth": {"accept": ["signature"], "keys": [TEST_KEY]},
            "journal": {"path": str(self.journal)},
            "routes": list(routes),
            "sinks": dict(sinks),
        }
        if default:
            doc["default"] = list(default)
        write_config(self.config.parent, doc, self.config.name)

    def file_sink(self, name: str) -> dict[str, Any]:
        return {"type": "file", "path": str(self.out / name / "{type}.jsonl")}

    def post(self, type_: str, body: bytes | None = None) -> str:
        """Post a signed message (carrying ``SECRET``) and return its id."""
        body = body or body_for(type_, patient={"id": SECRET})
        r = self.client.post(
            self.proc.base_url + "/webhook", content=body, headers=signed_headers(body, TEST_KEY)
        )
        assert r.status_code == 200, r.text
        return str(json.loads(body)["meta"]["messageId"])

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return query_journal(self.journal, sql, *params)

    def deliveries(self, sink: str | None = None) -> dict[tuple[str, str], tuple[str, int]]:
        """{(message id, sink): (state, attempts)}."""
        rows = self.rows(
            "SELECT m.message_id, d.sink, d.state, d.attempts FROM deliveries d"
            " JOIN messages m USING (seq)"
        )
        return {(m, s): (st, a) for m, s, st, a in rows if sink is None or s == sink}

    def snapshot(self) -> list[tuple[Any, ...]]:
        """Every column of every delivery and message row except bodies."""
        return self.rows(
            "SELECT d.*, m.message_id, m.routed FROM deliveries d JOIN messages m USING (seq)"
            " ORDER BY d.seq, d.sink"
        ) + self.rows("SELECT seq, routed, duplicates FROM messages ORDER BY seq")

    def received_at(self, message_id: str) -> float:
        ((at,),) = self.rows("SELECT received_at FROM messages WHERE message_id = ?", message_id)
        return float(at)

    def wait_for(self, what: str, predicate: Callable[[], bool]) -> None:
        try:
            wait_until(predicate, timeout=WAIT, what=what)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\nrouter log:\n{self.proc.logs()}") from None

    def reload(self) -> None:
        """SIGHUP, and wait until the daemon says it switched to the new configuration."""
        assert self.proc.proc is not None
        before = self.proc.logs().count(" reloaded ")
        self.proc.proc.send_signal(signal.SIGHUP)
        self.wait_for("reload", lambda: self.proc.logs().count(" reloaded ") > before)
        assert "reload-refused" not in self.proc.logs()


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    sock = listening_socket()
    r = Router(tmp_path, sock)
    try:
        yield r
    finally:
        r.client.close()
        r.proc.kill()
        sock.close()


def ids_in(directory: Path) -> list[str]:
    """Message ids of the complete lines the file sinks wrote under ``directory``."""
    ids = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_bytes().split(b"\n")[:-1]:
            ids.append(json.loads(line)["messageId"])
    return ids


STATUS_ROW = re.compile(
    r"^(?P<name>\S+(?: \(not configured\))?)\s+(?P<pending>\d+)\s+(?P<retrying>\d+)"
    r"\s+(?P<dead>\d+)\s+(?P<oldest>\S+)(?:\s+(?P<error>\S.*))?$"
)


def status_table(stdout: str) -> tuple[str, dict[str, dict[str, str]]]:
    """The summary line and {sink: row} of ``status``'s table."""
    lines = stdout.splitlines()
    assert re.match(r"^sink\s+pending\s+retrying\s+dead\s+oldest\s+last error$", lines[1])
    rows = {}
    for line in lines[2:]:
        m = STATUS_ROW.match(line)
        assert m is not None, line
        rows[m["name"]] = {k: v or "" for k, v in m.groupdict().items()}
    return lines[0], rows


#: What ``status`` says of claims once deliveries have settled (none held, no ordered sink).
SETTLED = {"leased": 0, "holders": [], "blocked_lanes": 0}


def expected_status(router: Router) -> dict[str, dict[str, Any]]:
    """Per sink with undelivered rows, what ``status --json`` must say, read from the journal
    independently of the code under test."""
    found: dict[str, dict[str, Any]] = {}
    rows = router.rows(
        "SELECT d.sink, d.state, d.attempts, m.received_at, d.last_error, d.updated_at"
        " FROM deliveries d JOIN messages m USING (seq) WHERE d.state != 'delivered'"
    )
    latest: dict[str, float] = {}
    for sink, state, attempts, received_at, error, updated_at in rows:
        s = found.setdefault(
            sink,
            {"pending": 0, "retrying": 0, "dead": 0, "oldest_pending_at": None, "last_error": None}
            | SETTLED,
        )
        if state == "dead":
            s["dead"] += 1
        else:
            s["pending" if attempts == 0 else "retrying"] += 1
            oldest = s["oldest_pending_at"]
            s["oldest_pending_at"] = received_at if oldest is None else min(oldest, received_at)
        if error is not None and updated_at >= latest.get(sink, 0.0):
            latest[sink] = updated_at
            s["last_error"] = error
    return found


def by_sink(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``status --json``'s sinks as {name: counts + last_error + configured}."""
    return {
        s["name"]: {**s["counts"], "last_error": s["last_error"], "configured": s["configured"]}
        for s in doc["sinks"]
    }


def json_status(cli: Cli) -> dict[str, dict[str, Any]]:
    return by_sink(cli.json("status"))


@dataclass
class StatusOutput:
    doc: dict[str, Any]  # status --json
    sinks: dict[str, dict[str, Any]]  # its sinks, by name
    summary: str  # status: the first line
    table: dict[str, dict[str, str]]  # status: the rows, by sink


def both_statuses(cli: Cli) -> StatusOutput:
    """``status --json`` and ``status``, side by side."""
    as_json, as_text = cli.many(("status", "--json"), ("status",))
    assert as_json.returncode == as_text.returncode == 0, as_json.stderr + as_text.stderr
    doc = json.loads(as_json.stdout)
    return StatusOutput(doc, by_sink(doc), *status_table(as_text.stdout))


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


# -- status ------------------------------------------------------------------------------------


def test_status_counts_ages_and_errors_match_the_journal(
    router: Router, downstream: Downstream, refused_url: str
) -> None:
    sinks = {
        "archive": router.file_sink("archive"),
        "down": {
            "type": "http",
            "url": refused_url,
            "retry": {"max_attempts": 0, "initial": "1h", "max": "1h"},
        },
        "reject": {"type": "http", "url": downstream.url, "headers": {"authorization": SINK_TOKEN}},
    }
    routes = [
        {"match": "patient.*", "to": ["archive", "down", "reject"]},
        {"match": "medical.*", "to": ["archive"]},
    ]
    router.configure(sinks, routes)
    router.proc.start()
    p1 = router.post("patient.admit")
    p2 = router.post("patient.discharge")
    router.post("medical.document-download")
    router.post("other.thing")  # unrouted: no default
    dup = body_for("patient.admit", message_id=p1, patient={"id": SECRET})
    router.post("patient.admit", dup)  # a duplicate: counted, not delivered again

    def settled() -> bool:
        d = router.deliveries()
        return (
            sum(st == "delivered" for (_, s), (st, _) in d.items() if s == "archive") == 3
            and sum(st == "pending" and a > 0 for (_, s), (st, a) in d.items() if s == "down") == 2
            and sum(st == "dead" for (_, s), (st, _) in d.items() if s == "reject") == 2
        )

    router.wait_for("deliveries settled", settled)
    cli = router.cli

    # Beside the running daemon.
    expected = expected_status(router)
    assert set(expected) == {"down", "reject"}
    assert expected["down"]["retrying"] == 2 and expected["reject"]["dead"] == 2
    assert expected["down"]["last_error"].startswith("RetryableError: ConnectError")
    assert expected["reject"]["last_error"] == "PermanentError: HTTP 400"
    st = both_statuses(cli)
    assert (st.doc["messages"], st.doc["unrouted"], st.doc["duplicates"]) == (4, 1, 1)
    assert st.doc["journal_bytes"] > 0
    got = st.sinks
    assert list(got) == ["archive", "down", "reject"]  # configuration order
    assert got["archive"] == {
        "pending": 0,
        "retrying": 0,
        "dead": 0,
        "oldest_pending_at": None,
        "last_error": None,
        "configured": True,
        **SETTLED,
    }
    for sink in ("down", "reject"):
        assert got[sink] == {**expected[sink], "configured": True}, sink

    assert re.match(
        rf"^journal: {re.escape(str(router.journal))}  \d+\.\d MB  messages 4  unrouted 1"
        r"  duplicates received 1$",
        st.summary,
    ), st.summary
    table = st.table
    assert list(table) == ["archive", "down", "reject"]
    columns = ("pending", "retrying", "dead", "oldest", "error")
    assert [table["archive"][k] for k in columns] == ["0", "0", "0", "-", ""]
    assert [table["down"][k] for k in ("pending", "retrying", "dead")] == ["0", "2", "0"]
    assert re.match(r"^\d+(\.\d)?[smhd]$", table["down"]["oldest"])
    assert table["down"]["error"] == expected["down"]["last_error"][:80]
    assert [table["reject"][k] for k in columns] == ["0", "0", "2", "-", "PermanentError: HTTP 400"]
    assert router.proc.terminate() == 0

    # After it stopped: the same journal, and fresh pending deliveries (attempts 0).
    assert json_status(cli) == got
    assert cli.ok("dead", "retry", "--sink", "reject") == "retrying 2 dead letter(s) for reject\n"
    st = both_statuses(cli)
    assert st.sinks["reject"] == {
        "pending": 2,
        "retrying": 0,
        "dead": 0,
        "oldest_pending_at": min(router.received_at(p1), router.received_at(p2)),
        "last_error": None,
        "configured": True,
        **SETTLED,
    }
    assert st.sinks["reject"] == {**expected_status(router)["reject"], "configured": True}
    assert [st.table["reject"][k] for k in ("pending", "retrying", "dead")] == ["2", "0", "0"]
    assert re.match(r"^\d+(\.\d)?[smhd]$", st.table["reject"]["oldest"])
    # What the journal holds on disk, counted as the daemon's journal_bytes gauge counts it.
    on_disk = sum(p.stat().st_size for p in router.journal.rglob("*") if p.is_file())
    assert st.doc["journal_bytes"] == on_disk

    # A sink still in the journal but gone from the configuration.
    del sinks["reject"]
    router.configure(sinks, [{"match": "patient.*", "to": ["archive", "down"]}])
    st = both_statuses(cli)
    assert list(st.sinks) == ["archive", "down", "reject"]
    assert st.sinks["reject"]["configured"] is False
    assert st.sinks["reject"]["pending"] == 2
    assert list(st.table) == ["archive", "down", "reject (not configured)"]
    assert st.table["reject (not configured)"]["pending"] == "2"


# -- dead letters ------------------------------------------------------------------------------


def test_dead_list_retry_and_purge(router: Router, downstream: Downstream) -> None:
    sinks = {
        "archive": router.file_sink("archive"),
        "reject": {"type": "http", "url": downstream.url},
    }
    routes = [{"match": "patient.*", "to": ["archive", "reject"]}]
    router.configure(sinks, routes, default=["reject"])
    router.proc.start()
    a1 = router.post("patient.admit")
    a2 = router.post("patient.admit")
    d1 = router.post("patient.discharge")
    m1 = router.post("medical.document-download")
    m2 = router.post("medical.consolidated-data")
    h1 = router.post("devices.health-data")
    everything = {a1, a2, d1, m1, m2, h1}
    router.wait_for(
        "six dead letters",
        lambda: (
            [st for st, _ in router.deliveries("reject").values()] == ["dead"] * 6
            and [st for st, _ in router.deliveries("archive").values()] == ["delivered"] * 3
        ),
    )
    cli = router.cli

    # list, with each filter (read-only: run side by side)
    filters: dict[tuple[str, ...], set[str]] = {
        (): everything,
        ("--type", "patient.*"): {a1, a2, d1},
        ("--type", "medical.*", "--type", "devices.*"): {m1, m2, h1},
        ("--id", a1, "--id", h1): {a1, h1},
        ("--sink", "reject", "--type", "patient.admit"): {a1, a2},
        ("--sink", "archive"): set(),
        ("--limit", "2"): set(),  # checked below
    }
    before = router.snapshot()
    answers = cli.many(*[("dead", "list", *f, "--json") for f in filters])
    answers += cli.many(
        ("dead", "list", "--type", "patient.admit"),
        ("dead", "list", "--sink", "archive"),
        ("dead", "retry"),
        ("dead", "purge"),
        ("dead", "retry", "--all", "--dry-run"),
        ("dead", "purge", "--type", "medical.c*", "--dry-run"),
    )
    assert [r.returncode for r in answers] == [0] * (len(filters) + 2) + [2, 2, 0, 0]
    found = [json.loads(r.stdout) for r in answers[: len(filters)]]
    listed = found[0]
    for d in listed:
        assert (d["sink"], d["attempts"], d["error"]) == ("reject", 1, "PermanentError: HTTP 400")
    types = {d["message_id"]: d["type"] for d in listed}
    assert types[a1] == types[a2] == "patient.admit" and types[h1] == "devices.health-data"
    for (f, ids), rows in list(zip(filters.items(), found, strict=True))[:-1]:
        assert {d["message_id"] for d in rows} == ids, f
    assert found[-1] == listed[:2]  # --limit: the oldest dead letters first

    text, empty, retry, purge, retry_dry, purge_dry = answers[len(filters) :]
    lines = text.stdout.splitlines()
    assert lines[-1] == "2 dead letter(s)"
    entries = lines[:-1]
    assert len(entries) == 4
    for head, error in zip(entries[::2], entries[1::2], strict=True):
        assert re.match(
            rf"^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ  reject  patient\.admit  ({a1}|{a2})"
            r"  attempts=1$",
            head,
        ), head
        assert error == "    PermanentError: HTTP 400"
    assert empty.stdout == "0 dead letter(s)\n"

    # retry and purge need a filter or --all; --dry-run changes nothing
    for verb, r in (("retry", retry), ("purge", purge)):
        assert r.stdout == ""
        assert r.stderr == f"error: dead {verb} needs a filter (--sink, --type, --id) or --all\n"
    assert retry_dry.stdout == "would retry 6 dead letter(s) for reject\n"
    assert purge_dry.stdout == "would purge 1 dead letter(s) for reject\n"
    assert router.snapshot() == before

    # purge beside the running daemon: the row is gone from the journal
    assert cli.ok("dead", "purge", "--type", "medical.consolidated-data") == (
        "purged 1 dead letter(s) for reject\n"
    )
    assert (m2, "reject") not in router.deliveries()
    assert len(router.deliveries("reject")) == 5

    # retry beside the running daemon, the downstream now accepting: delivered again, as a
    # first attempt (fresh retry budget)
    downstream.status = 200
    assert (
        cli.ok("dead", "retry", "--type", "patient.*") == "retrying 3 dead letter(s) for reject\n"
    )
    router.wait_for(
        "retried dead letters delivered",
        lambda: {mid for mid, _ in downstream.answered(200)} == {a1, a2, d1},
    )
    assert sorted(downstream.answered(200)) == sorted((m, "1") for m in (a1, a2, d1))
    router.wait_for(
        "deliveries recorded",
        lambda: all(router.deliveries()[(m, "reject")] == ("delivered", 1) for m in (a1, a2, d1)),
    )
    assert router.deliveries()[(m1, "reject")] == ("dead", 1)  # not matched: untouched
    assert router.proc.terminate() == 0

    # After the daemon stopped. Dead letters of a sink no longer configured cannot be retried.
    router.configure({"archive": sinks["archive"]}, [], default=["archive"])
    before = router.snapshot()
    refusals = cli.many(
        ("dead", "retry", "--all"), ("dead", "retry", "--sink", "reject", "--dry-run")
    )
    for r in refusals:
        assert r.returncode == 1
        assert r.stdout == ""
        assert r.stderr.startswith(
            "error: dead letters for sinks not in the configuration: reject;"
        ), r.stderr
        assert "replay --sink" in r.stderr
    assert router.snapshot() == before

    # Configured again: a real retry makes the delivery pending with attempts 0 and no error.
    router.configure(sinks, routes, default=["reject"])
    assert cli.ok("dead", "retry", "--id", m1) == "retrying 1 dead letter(s) for reject\n"
    assert router.rows(
        "SELECT d.state, d.attempts, d.last_error FROM deliveries d JOIN messages m USING (seq)"
        " WHERE m.message_id = ? AND d.sink = 'reject'",
        m1,
    ) == [("pending", 0, None)]

    # purge --all takes what is left, and only dead letters
    assert cli.ok("dead", "purge", "--all") == "purged 1 dead letter(s) for reject\n"
    assert router.rows("SELECT count(*) FROM deliveries WHERE state = 'dead'") == [(0,)]
    remaining = router.deliveries("reject")
    assert (h1, "reject") not in remaining
    assert remaining[(m1, "reject")] == ("pending", 0)


# -- replay ------------------------------------------------------------------------------------


def test_replay_to_a_new_sink_and_by_todays_routes(router: Router) -> None:
    sinks: dict[str, Any] = {"archive": router.file_sink("archive")}
    routes = [{"match": "patient.*", "to": ["archive"]}]
    router.configure(sinks, routes)  # no default: other types are kept unrouted
    router.proc.start()
    a1 = router.post("patient.admit")
    a2 = router.post("patient.admit")
    m1 = router.post("medical.document-download")
    d1 = router.post("patient.discharge")  # received after the others were answered
    router.wait_for(
        "all delivered",
        lambda: [st for st, _ in router.deliveries().values()] == ["delivered"] * 3,
    )
    first = max(router.received_at(m) for m in (a1, a2, m1))
    assert router.received_at(d1) > first
    cut = iso((first + router.received_at(d1)) / 2)
    cli = router.cli

    r = cli("replay", "--since", "1h", "--sink", "copy")
    assert r.returncode == 1
    assert r.stderr == "error: no sink named copy in the configuration\n"

    # Two new sinks and a default, by SIGHUP.
    sinks |= {"copy": router.file_sink("copy"), "picky": router.file_sink("picky")}
    router.configure(sinks, routes, default=["copy"])
    router.reload()

    before = router.snapshot()
    bad_since, bad_until, dry_picky, dry_routes, status = cli.many(
        ("replay", "--since", "yesterday", "--sink", "picky"),
        ("replay", "--since", "1h", "--until", "2026-13-45", "--sink", "picky"),
        ("replay", "--since", "1h", "--sink", "picky", "--dry-run"),
        ("replay", "--since", "1h", "--dry-run"),
        ("status", "--json"),
    )
    for r, text in ((bad_since, "yesterday"), (bad_until, "2026-13-45")):
        assert r.returncode == 2, r.stderr  # a usage error
        assert r.stdout == ""
        assert r.stderr.startswith(f"error: cannot read time {text!r}: use "), r.stderr
    assert dry_picky.stdout == "would replay 4 message(s): 4 to picky\n"
    assert dry_routes.stdout == "would replay 4 message(s): 3 to archive, 1 to copy\n"
    assert "replaying:" not in dry_picky.stderr + dry_routes.stderr
    assert json.loads(status.stdout)["unrouted"] == 1
    assert router.snapshot() == before

    # --until and --type, to a named sink, beside the running daemon.
    r = cli("replay", "--since", "1h", "--until", cut, "--type", "patient.*", "--sink", "picky")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "replaying 2 message(s): 2 to picky\n"
    assert "replaying: 2/2 messages" in r.stderr
    assert {m for m, _ in router.deliveries("picky")} == {a1, a2}
    router.wait_for(
        "replay to picky", lambda: sorted(ids_in(router.out / "picky")) == sorted([a1, a2])
    )

    # No --sink: today's routes, so the unrouted message now goes to the default.
    r = cli("replay", "--since", "1h", "--type", "medical.*")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "replaying 1 message(s): 1 to copy\n"
    assert "replaying: 1/1 messages" in r.stderr
    assert router.rows("SELECT routed FROM messages WHERE message_id = ?", m1) == [(1,)]
    assert cli.json("status")["unrouted"] == 0
    router.wait_for("replay by today's routes", lambda: ids_in(router.out / "copy") == [m1])
    assert router.proc.terminate() == 0

    # Everything to the new sink while the daemon is stopped: pending until it runs again.
    r = cli("replay", "--since", "1h", "--sink", "copy")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "replaying 4 message(s): 4 to copy\n"
    assert "replaying: 4/4 messages" in r.stderr
    copy = json_status(cli)["copy"]
    assert (copy["pending"], copy["retrying"], copy["dead"]) == (4, 0, 0)
    assert router.deliveries("copy") == {(m, "copy"): ("pending", 0) for m in (a1, a2, m1, d1)}
    assert ids_in(router.out / "copy") == [m1]
    router.proc.start()
    router.wait_for("full replay", lambda: len(ids_in(router.out / "copy")) == 5)
    assert sorted(ids_in(router.out / "copy")) == sorted([a1, a2, d1, m1, m1])
    assert len(ids_in(router.out / "archive")) == 3  # never replayed to archive
    assert sorted(ids_in(router.out / "picky")) == sorted([a1, a2])


# -- explain -----------------------------------------------------------------------------------

EXPLAIN_CONFIG: dict[str, Any] = {
    "server": {"listen": ["127.0.0.1:0"]},
    "auth": {"keys": [TEST_KEY]},
    "journal": {"path": "./journal"},
    "routes": [
        {"match": "medical.*", "to": ["medical"]},
        {"match": ["patient.admit", "patient.discharge"], "to": ["events", "medical"]},
        {"match": "patient.*", "to": ["audit", "events"]},
    ],
    "sinks": {
        name: {"type": "file", "path": f"./out/{name}.jsonl"}
        for name in ("medical", "events", "audit", "archive")
    },
}


def fixture_id(name: str) -> str:
    return str(json.loads((FIXTURES / name).read_bytes())["meta"]["messageId"])


def test_explain_routes_default_unrouted_ping_and_bad_body(tmp_path: Path) -> None:
    with_default = Cli(write_config(tmp_path, {**EXPLAIN_CONFIG, "default": ["archive"]}, "d.yaml"))
    without = Cli(write_config(tmp_path, EXPLAIN_CONFIG, "n.yaml"))

    bad = {
        "not-json.json": (b"{not json", "body is not valid JSON"),
        "no-type.json": (
            b'{"meta":{"messageId":"m-1"},"p":"' + SECRET.encode() + b'"}',
            "meta.type is missing",
        ),
    }
    for name, (body, _) in bad.items():
        (tmp_path / name).write_bytes(body)
    missing = tmp_path / "missing.json"
    calls: list[tuple[Cli, Path]] = [
        (with_default, FIXTURES / "patient.admit.json"),
        (without, FIXTURES / "medical.document-download.json"),
        (with_default, FIXTURES / "devices.health-data.json"),
        (without, FIXTURES / "devices.health-data.json"),
        (with_default, FIXTURES / "ping.json"),
        *[(with_default, tmp_path / name) for name in bad],
        (with_default, missing),
    ]
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(lambda call: call[0]("explain", str(call[1])), calls))
    good, refused, unreadable = answers[:5], answers[5:-1], answers[-1]
    assert [r.returncode for r in good] == [0] * 5, [r.stderr for r in good]
    assert [r.stderr for r in good] == [""] * 5
    admit, download, devices, devices_unrouted, ping = (r.stdout.splitlines() for r in good)
    assert admit == [
        f"type patient.admit  messageId {fixture_id('patient.admit.json')}",
        "  route 'patient.admit' matches -> events, medical",
        "  route 'patient.*' matches -> audit, events",
        "delivered to: events, medical, audit",
    ]
    assert download == [
        f"type medical.document-download  messageId {fixture_id('medical.document-download.json')}",
        "  route 'medical.*' matches -> medical",
        "delivered to: medical",
    ]
    devices_id = fixture_id("devices.health-data.json")
    assert devices == [
        f"type devices.health-data  messageId {devices_id}",
        "  no route matches: default -> archive",
        "delivered to: archive",
    ]
    assert devices_unrouted == [
        f"type devices.health-data  messageId {devices_id}",
        "delivered to no sink: kept as unrouted (add a route or a default)",
    ]
    assert ping == [
        f"type ping  messageId {fixture_id('ping.json')}",
        "a ping: answered with a pong and not routed (server.route_ping: false)",
    ]

    for (name, (_, why)), r in zip(bad.items(), refused, strict=True):
        assert r.returncode == 1, name
        assert r.stdout == ""
        (line,) = r.stderr.splitlines()
        assert line.startswith("error: the router would answer 400: "), line
        assert why in line, name

    assert unreadable.returncode == 2
    assert unreadable.stderr.startswith(f"error: cannot read {missing}: ")
    # explain needs the configuration only: no journal was made or needed
    assert not (tmp_path / "journal").exists()


# -- no journal, closed pipe -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--json"],
        ["dead", "list"],
        ["dead", "retry", "--all"],
        ["dead", "purge", "--all", "--dry-run"],
        ["replay", "--since", "1h"],
    ],
    ids=" ".join,
)
def test_commands_without_a_journal_exit_1(tmp_path: Path, args: list[str]) -> None:
    journal = tmp_path / "var" / "journal"
    config = write_config(
        tmp_path,
        {
            "server": {"listen": ["127.0.0.1:0"]},
            "auth": {"keys": [TEST_KEY]},
            "journal": {"path": str(journal)},
            "default": ["archive"],
            "sinks": {"archive": {"type": "file", "path": str(tmp_path / "out.jsonl")}},
        },
    )
    r = Cli(config)(*args)
    assert r.returncode == 1
    assert r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"error: no journal at {journal / 'journal.sqlite3'}: ")
    assert "webhook-router serve" in line
    assert not journal.exists()  # the command created nothing


def test_operator_commands_work_without_any_secret_while_serve_and_check_need_them(
    tmp_path: Path,
) -> None:
    # config.example.yaml as a new user runs it, with no METRIPORT_WEBHOOK_KEY set, plus keys
    # and a sink secret they cannot read either: a missing file, a systemd credential, a
    # Slack URL in an unset variable.
    text = (REPO / "config.example.yaml").read_text()
    keys = "    - env: METRIPORT_WEBHOOK_KEY\n"
    assert keys in text
    text = text.replace(keys, keys + "    - file: missing.key\n    - credential: webhook-key\n")
    text += "  alerts:\n    type: slack\n    webhook_url: {env: WR_TEST_UNSET_SLACK_URL}\n"
    config = tmp_path / "config.yaml"
    config.write_text(text)
    journal = Journal(tmp_path / "var" / "journal")
    anyio.run(journal.open)
    anyio.run(journal.close)
    body = tmp_path / "admit.json"
    body.write_bytes(body_for("patient.admit", "m-1"))
    unset = ("METRIPORT_WEBHOOK_KEY", "WR_TEST_UNSET_SLACK_URL", "CREDENTIALS_DIRECTORY")
    env = {k: v for k, v in os.environ.items() if k not in (*unset, CONFIG_ENV)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-m", "router", *args, "--config", str(config)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "Traceback" not in r.stdout + r.stderr
        return r

    for args in (
        ["status"],
        ["status", "--json"],
        ["dead", "list"],
        ["dead", "retry", "--all", "--dry-run"],
        ["replay", "--since", "1h", "--dry-run"],
        ["explain", str(body)],
    ):
        r = run(*args)
        assert (r.returncode, r.stderr) == (0, ""), args
        if args == ["status"]:
            assert re.search(r"^alerts\s+0\s+0\s+0", r.stdout, re.M), r.stdout
        if args[0] == "explain":
            assert "delivered to: events" in r.stdout
    for command in ("check", "serve"):
        r = run(command)
        assert r.returncode == 2, r.stderr
        assert "environment variable METRIPORT_WEBHOOK_KEY is not set" in r.stderr
        assert "environment variable WR_TEST_UNSET_SLACK_URL is not set" in r.stderr
        assert "missing.key" in r.stderr
        assert "$CREDENTIALS_DIRECTORY" in r.stderr


def test_output_into_a_closed_pipe_prints_no_traceback(router: Router) -> None:
    router.configure({"archive": router.file_sink("archive")}, [], default=["archive"])
    router.proc.start()
    router.post("patient.admit")
    router.wait_for("delivery", lambda: len(ids_in(router.out / "archive")) == 1)
    base = {k: v for k, v in os.environ.items() if k not in (CONFIG_ENV, "PYTHONUNBUFFERED")}

    def into_closed_pipe(args: Sequence[str], env: Mapping[str, str]) -> str:
        """Run with stdout a pipe whose reader is gone before the command writes anything;
        return its stderr."""
        read, write = os.pipe()
        os.close(read)
        try:
            r = subprocess.run(
                [sys.executable, "-m", "router", *args, "--config", str(router.config)],
                cwd=REPO,
                env={**base, **env},
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        finally:
            os.close(write)
        return f"exit {r.returncode}: {r.stderr}"

    # Buffered output (as from systemd or a shell) fails only when flushed at exit; unbuffered
    # output fails at the first print.
    runs = [
        (("status", "--json"), {}),
        (("status", "--json"), {"PYTHONUNBUFFERED": "1"}),
        (("status",), {}),
        (("dead", "list"), {"PYTHONUNBUFFERED": "1"}),
    ]
    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(lambda run: into_closed_pipe(*run), runs))
    assert results == ["exit 0: "] * len(runs)
