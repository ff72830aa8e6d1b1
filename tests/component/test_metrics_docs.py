"""docs/metrics.md lists exactly the metrics the services expose (issue 10, section 4).

Each service runs in this process through its real ``serve()`` wiring; its ``/metrics`` is read
in both formats it speaks (the Prometheus text format and, when the scrape asks for it,
OpenMetrics), and the metric names it exposes must equal the names docs/metrics.md lists for it:
nothing undocumented, nothing documented that is gone. Names are the ones a query uses:
counters with ``_total``, histograms by their base name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import run_agent, run_proxy, run_tracker
from tests.metrics_catalog import DOCUMENTED, Documented

OPENMETRICS = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
"""What Prometheus 2.x sends."""


def exposed(families: Iterable[object]) -> dict[str, tuple[str, frozenset[str]]]:
    """Query name -> (type, label names) of parsed metric families."""
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for family in families:
        name, kind = getattr(family, "name"), getattr(family, "type")  # noqa: B009
        query = f"{name}_total" if kind == "counter" else name
        labels: set[str] = set()
        for sample in getattr(family, "samples"):  # noqa: B009
            labels.update(k for k in sample.labels if k not in ("le", "quantile"))
        found[query] = (kind, frozenset(labels))
    return found


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, tuple[str, frozenset[str]]]:
    """The service's metrics, read as text and as OpenMetrics; both must agree."""
    text = await client.get(url)
    text.raise_for_status()
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "_created" not in text.text
    classic = exposed(text_string_to_metric_families(text.text))

    om = await client.get(url, headers={"Accept": OPENMETRICS})
    om.raise_for_status()
    assert om.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert om.text.endswith("# EOF\n")
    assert "_created" not in om.text
    modern = exposed(openmetrics_families(om.text))
    assert {k: v[0] for k, v in modern.items()} == {k: v[0] for k, v in classic.items()}
    return classic


def check(service: str, found: dict[str, tuple[str, frozenset[str]]]) -> None:
    documented: dict[str, Documented] = DOCUMENTED[service]
    undocumented = sorted(set(found) - set(documented))
    gone = sorted(set(documented) - set(found))
    assert not undocumented, f"{service} exposes metrics docs/metrics.md does not list"
    assert not gone, f"docs/metrics.md lists {service} metrics it does not expose"
    for name, (kind, labels) in found.items():
        doc = documented[name]
        assert doc.type == kind, f"{name}: docs say {doc.type}, {service} exposes a {kind}"
        # A labelled metric with no child yet shows no labels: every label seen is documented.
        assert labels <= doc.labels, f"{name}: labels {sorted(labels - doc.labels)} undocumented"
    build = [k for k in found if k == "p2p_build_info"]
    assert build, f"{service} has no p2p_build_info"


def build_info(text: str) -> dict[str, str]:
    for family in text_string_to_metric_families(text):
        if family.name == "p2p_build_info":
            (sample,) = family.samples
            assert sample.value == 1
            return dict(sample.labels)
    raise AssertionError("no p2p_build_info")


@pytest.mark.trio
async def test_every_service_exposes_what_docs_metrics_md_lists(tmp_path: Path) -> None:
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", ["http://127.0.0.1:9"], [announce]) as proxy,
        run_agent(tmp_path / "agent", ["http://127.0.0.1:9"], [proxy.url]) as agent,
        httpx.AsyncClient(timeout=30) as client,
    ):
        tracker_metrics = announce.removesuffix("/announce") + "/metrics"
        proxy_metrics = f"{proxy.url}/metrics"
        agent_metrics = f"http://127.0.0.1:{agent.ports.metrics}/metrics"
        check("tracker", await scrape(client, tracker_metrics))
        check("proxy", await scrape(client, proxy_metrics))
        check("agent", await scrape(client, agent_metrics))
        for service, url in (
            ("tracker", tracker_metrics),
            ("proxy", proxy_metrics),
            ("agent", agent_metrics),
        ):
            labels = build_info((await client.get(url)).text)
            assert labels["service"] == service
            assert labels["version"] == "0.1.0"
            assert labels["python"].count(".") == 2
            head = await client.head(url)
            assert head.status_code == 200
            assert head.content == b""


def test_the_catalog_reads_every_section() -> None:
    assert set(DOCUMENTED) == {"agent", "proxy", "tracker"}
    for service, names in DOCUMENTED.items():
        assert "p2p_build_info" in names, service
        assert "process_cpu_seconds_total" in names, service
        assert any(name.startswith(f"p2p_{service}_") for name in names), service
