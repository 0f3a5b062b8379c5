"""The monitoring files (``monitoring/``): the Grafana dashboard has the structure Grafana needs,
the alert rules say what an operator needs, and every metric the dashboard and the rules query
is one the router really exports, with the labels they use: scraped from the real
``webhook-router serve`` on one process and on two workers (prometheus-client's multiprocess
mode, where a metric nobody has touched yet is not listed at all).

PromQL is parsed with a real PromQL parser (promql-parser), not with regular expressions. Then
a real Prometheus scrapes a real router whose sinks fail in two ways, evaluates ``alerts.yml``
and answers every panel's query. promtool checks the rules themselves and runs their unit tests
(``monitoring/alerts_test.yml``) in ``make check-monitoring``, which ``make test`` runs before
pytest and which installs the ``prometheus`` binary this test runs.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router.testing import RouterProcess, body_for, listening_socket, wait_until, write_config
from tests.conftest import TEST_KEY, signed
from tests.http_peer import HttpPeer, Reply

MONITORING = Path(__file__).parent.parent / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"
#: How every panel, target and query variable names its data source: the dashboard's variable.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Series the rules and the dashboard use that the router cannot export itself, with their
#: labels: Prometheus's own per target.
EXTERNAL = {"up": {"job", "instance"}}
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
#: What Grafana's own variables stand for when an expression is parsed.
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}

#: Gauges that several workers list only once one of them has set it (prometheus-client's
#: ``mostrecent`` mode has no value before): Metriport's failed count, set by the first check of
#: a router with a ``metriport:`` section. One process lists it from the start (checked there).
SET_ON_FIRST_USE = {"webhook_router_metriport_failed_seen"}

#: A series name → the label names it is exported with.
Exported = dict[str, set[str]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every query: panel targets, query variables, alert rules."""
    found = [
        (f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in all_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
    ]
    for name, variable in variables().items():
        if variable["type"] == "query":
            # label_values(<selector>, <label>) is Grafana's, not PromQL: its selector is.
            query = variable["query"]["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert m, f"variable {name}: {query!r} is not label_values(selector, label)"
            found.append((f"variable {name}", m[1]))
    found += [(f"alert {rule['alert']}", str(rule["expr"])) for rule in alert_rules()]
    return found


def parse(where: str, expr: str) -> Any:
    """The expression's syntax tree, the dashboard's variables filled in as Grafana would."""
    defined = set(variables())

    def fill(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        assert name in defined, f"{where}: ${name} is not a variable of the dashboard"
        return "x"

    filled = re.sub(r"\$\{(\w+)\}|\$(\w+)", fill, expr)
    try:
        return promql_parser.parse(filled)
    except ValueError as e:
        raise AssertionError(f"{where}: {expr!r} does not parse: {e}") from None


def selectors(node: Any) -> list[Any]:
    """The vector selectors (the series an expression reads) in a syntax tree."""
    found: list[Any] = []

    def visit(n: Any) -> None:
        if isinstance(n, promql_parser.VectorSelector):
            found.append(n)

    promql_parser.walk(node, visit)
    return found


def series_name(selector: Any) -> str:
    if selector.name:
        return str(selector.name)
    names = [m.value for m in selector.matchers.matchers if m.name == "__name__"]
    assert names, f"{selector}: a selector without a metric name"
    return str(names[0])


def labels_of(name: str, exported: Exported) -> set[str]:
    if name in EXTERNAL:
        return EXTERNAL[name]
    return exported[name] | TARGET_LABELS


def check_expression(where: str, expr: str, exported: Exported) -> None:
    """Every series the expression reads is exported, every label it matches or groups by is
    one of those series' labels (a typo there would make a panel empty or an alert silent)."""
    tree = parse(where, expr)
    for selector in selectors(tree):
        name = series_name(selector)
        assert name in exported or name in EXTERNAL, (
            f"{where}: {name} is not in the router's /metrics ({expr!r})"
        )
        used = {m.name for m in selector.matchers.matchers} - {"__name__"}
        assert used <= labels_of(name, exported), (
            f"{where}: {name} has no label {used - labels_of(name, exported)}"
        )

    def visit(n: Any) -> None:
        if isinstance(n, promql_parser.AggregateExpr) and n.modifier is not None:
            assert n.modifier.type == promql_parser.AggModifierType.By, f"{where}: use by ()"
            available = set().union(*(labels_of(series_name(s), exported) for s in selectors(n)))
            missing = set(n.modifier.labels) - available
            assert not missing, f"{where}: by {missing}: no such label under {n}"

    promql_parser.walk(tree, visit)


# -- the dashboard's structure -------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() -> None:
    board = dashboard()
    assert board["title"] and board["uid"]
    assert isinstance(board["schemaVersion"], int)
    datasources = [v for v in variables().values() if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in datasources] == [("datasource", "prometheus")]

    panels = list(all_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    assert all(isinstance(i, int) for i in ids)
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["title"], panel
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
    for variable in variables().values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_no_datasource_uid_is_hard_coded() -> None:
    """A dashboard imported into another Grafana must not point at this one's data source."""

    def uids(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource" and isinstance(value, dict):
                    yield str(value.get("uid"))
                elif key == "datasource" and isinstance(value, str):
                    yield value
                else:
                    yield from uids(value)
        elif isinstance(node, list):
            for item in node:
                yield from uids(item)

    found = set(uids(dashboard()))
    assert found == {"${datasource}"}


def test_the_dashboard_shows_what_operators_asked_for() -> None:
    """Issue 15's list: acks/s by status, delivery lag and pending per sink, dead letters,
    journal size, verification failures, readiness, 503s."""
    exprs = " ".join(e for where, e in expressions() if where.startswith("panel"))
    for needed in (
        "sum by (status) (rate(webhook_router_requests_total",
        "sum by (le, sink) (rate(webhook_router_delivery_seconds_bucket",
        "webhook_router_pending_deliveries",
        "webhook_router_oldest_pending_seconds",
        "webhook_router_dead_letters",
        "webhook_router_journal_bytes",
        "webhook_router_verification_failures_total",
        "webhook_router_ready",
        'status="503"',
    ):
        assert needed in exprs, needed


# -- the alert rules -----------------------------------------------------------------------------


def test_each_alert_waits_has_a_severity_and_tells_what_to_do() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "WebhookRouterDeadLetters",
        "WebhookRouterDeliveryStalled",
        "WebhookRouterSinkDown",
        "WebhookRouterNotReady",
        "WebhookRouterDown",
        "WebhookRouterRefusing",
    }
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{name}: no for:"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        tree = parse(name, str(rule["expr"]))
        # An alert per sink names the sink, in its summary and its description.
        by_sink = []

        def visit(n: Any, found: list[bool] = by_sink) -> None:
            if isinstance(n, promql_parser.AggregateExpr) and n.modifier is not None:
                found.append("sink" in n.modifier.labels)

        promql_parser.walk(tree, visit)
        if by_sink and by_sink[0]:
            for text in rule["annotations"].values():
                assert "{{ $labels.sink }}" in text, f"{name}: the sink is not named"


# -- the names against a real router -------------------------------------------------------------


@pytest.fixture
def router(tmp_path: Path) -> Iterator[RouterProcess]:
    sock = listening_socket()
    proc = RouterProcess(tmp_path / "config.yaml", sock)
    try:
        yield proc
    finally:
        proc.kill()
        sock.close()


def scrape(proc: RouterProcess) -> str:
    response = httpx.get(proc.base_url + "/metrics")
    assert response.status_code == 200
    return response.text


def exported_series(text: str) -> Exported:
    exported: Exported = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            exported.setdefault(s.name, set()).update(s.labels)
    return exported


@pytest.mark.parametrize("workers", [1, 2])
def test_every_series_queried_is_exported_by_a_running_router(
    router: RouterProcess, tmp_path: Path, workers: int
) -> None:
    write_config(
        tmp_path,
        {
            "server": {"listen": [router.listen], "workers": workers},
            "auth": {"keys": [TEST_KEY]},
            "journal": {"path": "journal"},
            "default": ["archive"],
            "sinks": {"archive": {"type": "file", "path": "out/{type}.jsonl"}},
        },
    )
    router.start()
    url = router.base_url + "/webhook"
    body = body_for("patient.admit")
    assert httpx.post(url, content=body, headers=signed(body)).status_code == 200
    assert httpx.post(url, content=body, headers=signed(body, "wrong key")).status_code == 401
    wait_until(
        lambda: 'webhook_router_deliveries_total{outcome="delivered"' in scrape(router),
        30,
        "the delivery in /metrics",
    )
    exported = exported_series(scrape(router))
    assert router.terminate() == 0
    if workers > 1:
        assert not SET_ON_FIRST_USE & exported.keys()  # (else it needs no place in that list)
        exported.update((name, set()) for name in SET_ON_FIRST_USE)

    assert not [n for n in exported if n.endswith("_created")], "prometheus-client's *_created"
    assert {"webhook_router_requests_total", "webhook_router_sink_up"} <= exported.keys()
    checked = expressions()
    assert len(checked) > 20
    for where, expr in checked:
        check_expression(where, expr, exported)


def test_the_check_finds_a_misspelt_series_and_a_missing_label() -> None:
    """The check above can fail: a name the router does not export, a label it lacks."""
    exported = {"webhook_router_dead_letters": {"sink"}, "webhook_router_journal_bytes": set()}
    check_expression("ok", "max by (job, sink) (webhook_router_dead_letters) > 0", exported)
    with pytest.raises(AssertionError, match="not in the router's /metrics"):
        check_expression("typo", "webhook_router_dead_letter > 0", exported)
    with pytest.raises(AssertionError, match="no label"):
        check_expression("matcher", 'webhook_router_journal_bytes{sink="a"}', exported)
    with pytest.raises(AssertionError, match=re.escape("by {'sink'}")):
        check_expression("by", "max by (sink) (webhook_router_journal_bytes)", exported)


# -- the rules and the dashboard on a real Prometheus --------------------------------------------

#: Panels whose query is empty while nothing fails: no 503 has been answered.
EMPTY_WHEN_HEALTHY = ('status="503"',)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """The real Prometheus server (``make check-monitoring`` puts it beside the venv's Python)
    on a loopback port, scraping every second and loading ``monitoring/alerts.yml``."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        binary = Path(sys.executable).parent / "prometheus"
        if not binary.exists():
            pytest.fail(f"{binary} is missing: `make check-monitoring` installs it")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "webhook-router", "static_configs": [{"targets": targets}]}
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tmp / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(binary),
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(self._ready, 30, f"Prometheus ready (log: {self.log})")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(self.url + "/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": expr})
        assert response.status_code == 200, (expr, response.text)
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    def alerts(self) -> set[tuple[str, str]]:
        """(alert name, the sink or else the instance it is about), pending or firing."""
        found = httpx.get(self.url + "/api/v1/alerts").json()["data"]["alerts"]
        return {
            (a["labels"]["alertname"], a["labels"].get("sink") or a["labels"]["instance"])
            for a in found
        }

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def grafana_filled(expr: str) -> str:
    """The expression as Grafana sends it with every router and sink selected."""
    values = {
        "job": "webhook-router",
        "instance": ".*",
        "sink": ".*",
        "__rate_interval": "1m",
    }
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m[1]], expr)


def test_the_rules_and_the_dashboard_on_a_real_prometheus_scraping_a_real_router(
    router: RouterProcess, tmp_path: Path
) -> None:
    """Prometheus scrapes a router with a working sink, a sink whose peer refuses (422: a dead
    letter, and its last send failed) and a sink whose peer is gone, plus an address where no
    router runs. Exactly the alerts about those go pending (their ``for:`` is longer than the
    test), and every panel's query has data but those that only show trouble not made here."""
    # Bound, never listening: connections to it are refused.
    with socket.socket() as gone, HttpPeer(lambda _: Reply(422)) as refusing:
        gone.bind(("127.0.0.1", 0))
        gone_at = f"127.0.0.1:{gone.getsockname()[1]}"
        write_config(
            tmp_path,
            {
                "server": {"listen": [router.listen]},
                "auth": {"keys": [TEST_KEY]},
                "journal": {"path": "journal"},
                "default": ["archive", "refusing", "unreachable"],
                "sinks": {
                    "archive": {"type": "file", "path": "out/{type}.jsonl"},
                    "refusing": {"type": "http", "url": refusing.url("/in")},
                    "unreachable": {"type": "http", "url": f"http://{gone_at}/in"},
                },
            },
        )
        router.start()
        url = router.base_url + "/webhook"
        body = body_for("patient.admit")
        assert httpx.post(url, content=body, headers=signed(body)).status_code == 200
        assert httpx.post(url, content=body, headers=signed(body, "wrong")).status_code == 401
        at = router.base_url.removeprefix("http://")
        prometheus = Prometheus(tmp_path, [at, gone_at])
        try:
            expected = {
                ("WebhookRouterDeadLetters", "refusing"),
                ("WebhookRouterSinkDown", "refusing"),
                ("WebhookRouterSinkDown", "unreachable"),
                ("WebhookRouterDown", gone_at),
            }
            try:
                wait_until(lambda: expected <= prometheus.alerts(), 60, "the alerts")
            except TimeoutError:
                pytest.fail(f"pending or firing: {prometheus.alerts()}, expected {expected}")
            panels = [(w, e) for w, e in expressions() if not w.startswith("alert")]
            quiet = [(w, e) for w, e in panels if any(s in e for s in EMPTY_WHEN_HEALTHY)]
            wanted = [(w, e) for w, e in panels if (w, e) not in quiet]

            def empty() -> list[str]:
                return [w for w, e in wanted if not prometheus.query(grafana_filled(e))]

            try:
                wait_until(lambda: not empty(), 60, "data for every panel")
            except TimeoutError:
                pytest.fail(f"no data for {empty()}")
            alerts = prometheus.alerts()
            assert not [q for q in quiet if prometheus.query(grafana_filled(q[1]))]
        finally:
            prometheus.close()
        assert router.terminate() == 0
    assert alerts == expected
