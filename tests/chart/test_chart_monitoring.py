"""The chart's monitoring (issue 10, section 4): ServiceMonitors, the PrometheusRule and the
Grafana dashboard, all off by default.

The alerts are checked by the real promtool (Debian's prometheus package; installed by
tests/install-real-parts.sh): ``promtool check rules`` on the rendered groups and
``promtool test rules`` with tests/chart/alerts_test.yaml, which fires every alert. Every metric
the alerts and the dashboard query must be one docs/metrics.md lists, and
tests/component/test_metrics_docs.py holds the services to that list.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.chart.conftest import CHART, KUBE_VERSION, REQUIRED, Render, Rendered, merged
from tests.metrics_catalog import Documented, all_names

HERE = Path(__file__).resolve().parent
ALERTS_TEST = HERE / "alerts_test.yaml"

MONITORING = merged(
    REQUIRED,
    {
        "metrics": {
            "podAnnotations": False,
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True, "labels": {"role": "alert-rules"}},
            "dashboard": {"enabled": True, "annotations": {"grafana_folder": "p2p"}},
        }
    },
)
TLS = merged(MONITORING, {"proxy": {"tls": {"secretName": "p2p-proxy-tls"}}})

ALERTS = {
    "P2PAgentDown",
    "P2PPullsFailing",
    "P2PHttpFallbackHigh",
    "P2PCacheNearFull",
    "P2POriginBytesPerPullHigh",
}
COMPONENTS = {"agent": "DaemonSet", "proxy": "Deployment", "tracker": "Deployment"}
TARGET_LABELS = {"job", "instance", "node"}
"""Labels Prometheus (and our ServiceMonitors) put on every scraped series."""


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: run tests/install-real-parts.sh (Debian package prometheus)"
    return found


def rules(rendered: Rendered) -> dict[str, Any]:
    spec: dict[str, Any] = rendered.get("PrometheusRule", "p2p")["spec"]
    return spec


def dashboard(rendered: Rendered) -> dict[str, Any]:
    text = rendered.get("ConfigMap", "p2p-dashboard")["data"]["p2p.json"]
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def expressions(rendered: Rendered) -> list[str]:
    """Every PromQL expression of the alerts and of the dashboard's panels."""
    found = [rule["expr"] for group in rules(rendered)["groups"] for rule in group["rules"]]
    for panel in dashboard(rendered)["panels"]:
        found.extend(target["expr"] for target in panel.get("targets", []))
    return found


# --- PromQL, as far as these tests need it ---------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w.])(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan", "le"}


def metric_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it matches on) for every vector selector in ``expr``."""
    found: list[tuple[str, set[str]]] = []
    text = _RANGE.sub("", expr)
    text = _GROUPING.sub(" ", text)

    def selector(match: re.Match[str]) -> str:
        matchers = _STRING.sub('""', match.group(2))
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
        found.append((match.group(1) or "", labels))
        return " "

    text = _SELECTOR.sub(selector, _STRING.sub('""', text))
    # Bare metric names: identifiers that are neither functions, keywords nor numbers.
    for name, call in _IDENT.findall(text):
        if not call and name.lower() not in _KEYWORDS:
            found.append((name, set()))
    return [(name, labels) for name, labels in found if name]


def test_metric_selectors_parses_what_the_chart_writes() -> None:
    expr = (
        'sum by (le, source) (rate(p2p_a_bucket{source="x", le=~"1"}[$__rate_interval]))'
        ' / on (instance) group_left (service) p2p_build_info > 0.5 and up{job="p2p-agent"} == 0'
        " or time() - (p2p_b > 0)"
    )
    assert metric_selectors(expr) == [
        ("p2p_a_bucket", {"source", "le"}),
        ("up", {"job"}),
        ("p2p_build_info", set()),
        ("p2p_b", set()),
    ]


# --- off by default ---------------------------------------------------------------------------


def test_monitoring_objects_are_off_by_default(render: Render) -> None:
    kinds = {kind for kind, _ in render(REQUIRED).ids()}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert ("ConfigMap", "p2p-dashboard") not in render(REQUIRED).ids()


@pytest.mark.parametrize("part", ["serviceMonitor", "prometheusRule", "dashboard"])
def test_each_part_comes_alone(render: Render, part: str) -> None:
    added = render(merged(REQUIRED, {"metrics": {part: {"enabled": True}}})).ids()
    added -= render(REQUIRED).ids()
    expected = {
        "serviceMonitor": {("ServiceMonitor", f"p2p-{c}") for c in COMPONENTS}
        | {("Service", f"p2p-{c}-metrics") for c in COMPONENTS},
        "prometheusRule": {("PrometheusRule", "p2p")},
        "dashboard": {("ConfigMap", "p2p-dashboard")},
    }
    assert added == expected[part]


def test_lint_is_clean_with_monitoring_on() -> None:
    for values in (MONITORING, TLS):
        report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- ServiceMonitors ----------------------------------------------------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("values", [MONITORING, TLS], ids=["http", "tls"])
def test_each_service_monitor_scrapes_its_component_once(
    render: Render, values: dict[str, Any]
) -> None:
    rendered = render(values)
    services = [o for o in rendered.objects if o["kind"] == "Service"]
    for component, kind in COMPONENTS.items():
        monitor = rendered.get("ServiceMonitor", f"p2p-{component}")
        assert monitor["metadata"]["namespace"] == "kube-system"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        spec = monitor["spec"]
        assert spec["namespaceSelector"] == {"matchNames": ["kube-system"]}
        # Exactly one Service (the metrics one) is selected: no target is scraped twice.
        selected = [
            s
            for s in services
            if _matches(spec["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert [s["metadata"]["name"] for s in selected] == [f"p2p-{component}-metrics"]
        service = selected[0]
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True  # a failing pod: up == 0
        pod = rendered.get(kind, f"p2p-{component}")["spec"]["template"]
        assert _matches(service["spec"]["selector"], pod["metadata"]["labels"])
        (endpoint,) = spec["endpoints"]
        (port,) = service["spec"]["ports"]
        assert endpoint["port"] == port["name"] == port["targetPort"]
        container_ports = {
            p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]
        }
        assert container_ports[port["name"]] == port["port"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["interval"] == "30s"
        assert endpoint["scrapeTimeout"] == "10s"
        relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
        assert relabel["job"]["replacement"] == f"p2p-{component}"
        assert relabel["node"]["sourceLabels"] == ["__meta_kubernetes_pod_node_name"]
        tls = values is TLS and component == "proxy"
        assert endpoint["scheme"] == ("https" if tls else "http")
        if tls:
            assert endpoint["tlsConfig"] == {
                "serverName": "p2p-proxy-headless.kube-system.svc.cluster.local",
                "ca": {"secret": {"name": "p2p-proxy-tls", "key": "ca.crt"}},
            }
    assert ("Service", "p2p-agent-metrics") in rendered.ids()


def test_service_monitor_ports_follow_the_component_ports(render: Render) -> None:
    values = merged(
        MONITORING,
        {
            "agent": {"ports": {"metrics": 15014}},
            "proxy": {"ports": {"http": 15005}},
            "tracker": {"ports": {"http": 16969}},
            "metrics": {"serviceMonitor": {"interval": "1m", "scrapeTimeout": "20s"}},
        },
    )
    rendered = render(values, namespace="p2p-system")
    ports = {
        name: rendered.get("Service", f"p2p-{name}-metrics")["spec"]["ports"][0]["port"]
        for name in COMPONENTS
    }
    assert ports == {"agent": 15014, "proxy": 15005, "tracker": 16969}
    endpoint = rendered.get("ServiceMonitor", "p2p-agent")["spec"]["endpoints"][0]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("1m", "20s")
    for obj in rendered.objects:
        assert obj["metadata"]["namespace"] == "p2p-system"


# --- the PrometheusRule -------------------------------------------------------------------------


def test_the_rule_holds_the_five_alerts(render: Render) -> None:
    rendered = render(MONITORING)
    rule = rendered.get("PrometheusRule", "p2p")
    assert rule["metadata"]["labels"]["role"] == "alert-rules"
    alerts = {r["alert"]: r for group in rules(rendered)["groups"] for r in group["rules"]}
    assert set(alerts) == ALERTS
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert["annotations"]["summary"], name
        assert alert["annotations"]["description"], name


def test_thresholds_are_values(render: Render) -> None:
    values = merged(
        MONITORING,
        {
            "metrics": {
                "prometheusRule": {
                    "agentDownFor": "2m",
                    "pullFailureRatio": 0.25,
                    "httpFallbackRatio": 0.5,
                    "cacheFreeRatio": 0.05,
                    "originBytesPerPull": 1.5,
                }
            }
        },
    )
    alerts = {r["alert"]: r for g in rules(render(values))["groups"] for r in g["rules"]}
    assert alerts["P2PAgentDown"]["for"] == "2m"
    assert ") > 0.25" in alerts["P2PPullsFailing"]["expr"]
    assert alerts["P2PHttpFallbackHigh"]["expr"].endswith("> 0.5")
    assert alerts["P2PCacheNearFull"]["expr"].count("< 0.05") == 2
    assert alerts["P2POriginBytesPerPullHigh"]["expr"].endswith("> 1.5")


def _write_rules(rendered: Rendered, directory: Path) -> Path:
    path = directory / "p2p-rules.yaml"
    path.write_text(yaml.safe_dump(rules(rendered), sort_keys=False))
    return path


def test_promtool_accepts_the_rules(render: Render, tmp_path: Path) -> None:
    path = _write_rules(render(MONITORING), tmp_path)
    done = subprocess.run(
        [promtool(), "check", "rules", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_promtool_fires_every_alert(render: Render, tmp_path: Path) -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == ALERTS, "alerts_test.yaml must fire every alert"
    # The annotations are texts for people (promtool check rules parses their templates);
    # the unit tests compare what fires and with which labels.
    spec = rules(render(MONITORING))
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "p2p-rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    done = subprocess.run(
        [promtool(), "test", "rules", ALERTS_TEST.name],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


# --- the dashboard ------------------------------------------------------------------------------


def test_dashboard_configmap_for_the_grafana_sidecar(render: Render) -> None:
    rendered = render(MONITORING)
    configmap = rendered.get("ConfigMap", "p2p-dashboard")
    kubernetes_validate.validate(configmap, KUBE_VERSION, strict=True)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "p2p"}
    assert set(configmap["data"]) == {"p2p.json"}
    board = dashboard(rendered)
    assert board["uid"] == "p2p-overview"
    assert board["templating"]["list"][0]["type"] == "datasource"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    queries = [p for p in board["panels"] if p["type"] != "row"]
    assert len(queries) >= 20
    for panel in queries:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert all(t["expr"] for t in panel["targets"]), panel["title"]
    # The sidecar may watch another namespace; the labels are the user's to choose.
    moved = render(
        merged(
            MONITORING,
            {"metrics": {"dashboard": {"namespace": "monitoring", "labels": {"dash": "yes"}}}},
        )
    ).get("ConfigMap", "p2p-dashboard")
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["labels"]["dash"] == "yes"


# --- every query names metrics the services expose ----------------------------------------------


def test_alerts_and_dashboard_query_only_documented_metrics(render: Render) -> None:
    documented: dict[str, Documented] = all_names()
    used: set[str] = set()
    for expr in expressions(render(MONITORING)):
        selectors = metric_selectors(expr)
        assert selectors, f"no metric in {expr!r}"
        for name, labels in selectors:
            used.add(name)
            if name == "up":  # Prometheus's own, one per target
                assert labels <= {"job", "instance"}, expr
                continue
            assert name in documented, f"{name} (in {expr!r}) is not in docs/metrics.md"
            unknown = labels - documented[name].labels - TARGET_LABELS
            assert not unknown, f"{name} has no label {sorted(unknown)} (in {expr!r})"
    # And the alerts' metrics are all there: each service contributes.
    assert any(name.startswith("p2p_agent_") for name in used)
    assert any(name.startswith("p2p_proxy_") for name in used)
    assert any(name.startswith("p2p_tracker_") for name in used)
