"""The services' metrics, piece by piece: the shared registry and negotiation
(p2p_common.metrics), the agent's scrape-time values, first-byte timer and last pull, the
proxy's live values. (tests/component/test_metrics_docs.py checks the whole set per service.)"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from p2p_agent.metrics import AgentMetrics, Live, engine_reader
from p2p_common.metrics import render, service_registry
from p2p_proxy.metrics import ProxyMetrics

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(body: bytes, name: str, **labels: str) -> float:
    return samples(body)[(name, tuple(sorted(labels.items())))]


# --- p2p_common.metrics --------------------------------------------------------------------------


def test_a_service_registry_has_runtime_collectors_and_build_info() -> None:
    registry = service_registry("tracker", "9.8.7")
    Counter("p2p_tracker_things_total", "Things.", registry=registry).inc(3)
    body, content_type = render(registry, None)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    names = {name for name, _ in samples(body)}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    assert "python_gc_collections_total" in names
    (build,) = [labels for name, labels in samples(body) if name == "p2p_build_info"]
    assert dict(build)["service"] == "tracker"
    assert dict(build)["version"] == "9.8.7"
    assert value(body, "p2p_tracker_things_total") == 3
    assert b"_created" not in body


def test_openmetrics_only_when_asked() -> None:
    registry = service_registry("proxy", "1.0.0")
    Counter("p2p_proxy_things_total", "Things.", registry=registry).inc()
    for accept in (None, "", "text/plain", "*/*", "application/json"):
        body, content_type = render(registry, accept)
        assert content_type.startswith("text/plain; version=0.0.4"), accept
        assert not body.endswith(b"# EOF\n")
    body, content_type = render(registry, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert b"_created" not in body
    families = {f.name: f for f in openmetrics_families(body.decode())}
    assert families["p2p_proxy_things"].type == "counter"
    assert families["p2p_proxy_things"].samples[0].name == "p2p_proxy_things_total"


# --- the agent ----------------------------------------------------------------------------------


@dataclass
class _Stats:
    peers_by_role: dict[str, int]


class _Torrent:
    def __init__(self, **roles: int) -> None:
        self.roles = roles

    def statistics(self) -> _Stats:
        return _Stats(dict(self.roles))


@dataclass
class _Limiter:
    total: int


@dataclass
class _Engine:
    torrents: dict[bytes, Any]
    upload_limiter: _Limiter


@dataclass
class _Cache:
    quota: int
    evictions: dict[str, int] = field(default_factory=dict)

    def eviction_counts(self) -> dict[str, int]:
        return dict(self.evictions)


def test_agent_live_values_are_read_at_scrape_time(tmp_path: Path) -> None:
    metrics = AgentMetrics()
    engine = _Engine(
        {b"a": _Torrent(agent=2, proxy=1), b"b": _Torrent(agent=1, foreign=1)}, _Limiter(1000)
    )
    cache = _Cache(5_000_000, {"watermark": 3})
    unmet = {"watermark": True}
    metrics.watch(engine_reader(engine, cache, tmp_path, lambda: unmet))  # type: ignore[arg-type]
    body, _ = metrics.render(None)
    assert value(body, "p2p_agent_upload_bytes_total") == 1000
    assert value(body, "p2p_agent_peer_connections", role="agent") == 3
    assert value(body, "p2p_agent_peer_connections", role="proxy") == 1
    assert value(body, "p2p_agent_peer_connections", role="foreign") == 1
    assert value(body, "p2p_agent_cache_quota_bytes") == 5_000_000
    size = value(body, "p2p_agent_cache_filesystem_size_bytes")
    free = value(body, "p2p_agent_cache_filesystem_free_bytes")
    assert 0 < free <= size
    engine.upload_limiter.total = 4000  # a counter: it only grows, read fresh every scrape
    del engine.torrents[b"a"]
    body, _ = metrics.render(None)
    assert value(body, "p2p_agent_upload_bytes_total") == 4000
    assert value(body, "p2p_agent_peer_connections", role="agent") == 1
    assert value(body, "p2p_agent_peer_connections", role="proxy") == 0
    # Cache evictions by reason, every reason present from the start; limits the janitor
    # could not meet.
    assert value(body, "p2p_agent_cache_evictions_total", reason="watermark") == 3
    assert value(body, "p2p_agent_cache_evictions_total", reason="expired") == 0
    assert value(body, "p2p_agent_cache_limit_unmet", limit="watermark") == 1
    assert value(body, "p2p_agent_cache_limit_unmet", limit="quota") == 0
    cache.evictions["operator"] = 2
    unmet["watermark"] = False
    body, _ = metrics.render(None)
    assert value(body, "p2p_agent_cache_evictions_total", reason="operator") == 2
    assert value(body, "p2p_agent_cache_limit_unmet", limit="watermark") == 0


def test_agent_without_a_readable_data_dir_reports_zero(tmp_path: Path) -> None:
    metrics = AgentMetrics()
    metrics.watch(lambda: Live(uploaded=5, data_dir=str(tmp_path / "gone")))
    body, _ = metrics.render(None)
    assert value(body, "p2p_agent_cache_filesystem_size_bytes") == 0
    assert value(body, "p2p_agent_upload_bytes_total") == 5


async def test_time_to_first_byte_is_observed_once_at_the_first_body_byte() -> None:
    metrics = AgentMetrics()
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    started = time.monotonic() - 0.3
    timed = metrics.timed_first_byte(send, started, "download")
    await timed({"type": "http.response.start", "status": 200, "headers": []})
    await timed({"type": "http.response.body", "body": b"", "more_body": True})
    body, _ = metrics.render(None)
    count = "p2p_agent_blob_time_to_first_byte_seconds_count"
    assert value(body, count, source="download") == 0
    await timed({"type": "http.response.body", "body": b"abc", "more_body": True})
    await timed({"type": "http.response.body", "body": b"def", "more_body": False})
    assert len(sent) == 4  # every message passed on
    body, _ = metrics.render(None)
    assert value(body, count, source="download") == 1
    assert value(body, count, source="cache") == 0
    assert value(body, "p2p_agent_blob_time_to_first_byte_seconds_sum", source="download") >= 0.3
    assert (
        value(
            body, "p2p_agent_blob_time_to_first_byte_seconds_bucket", source="download", le="0.25"
        )
        == 0
    )


def test_last_successful_pull_is_a_unix_time() -> None:
    metrics = AgentMetrics()
    body, _ = metrics.render(None)
    assert value(body, "p2p_agent_last_successful_pull_timestamp_seconds") == 0
    before = time.time()
    metrics.pulled()
    body, _ = metrics.render(None)
    assert before <= value(body, "p2p_agent_last_successful_pull_timestamp_seconds") <= time.time()


def test_agent_errors_carry_code_and_status() -> None:
    metrics = AgentMetrics()
    metrics.errors.labels("UNKNOWN", "502").inc()
    body, _ = metrics.render(OPENMETRICS)
    assert b'p2p_agent_errors_total{code="UNKNOWN",status="502"} 1.0' in body


# --- the proxy ----------------------------------------------------------------------------------


def test_proxy_live_values_and_its_disk(tmp_path: Path) -> None:
    metrics = ProxyMetrics()
    metrics.watch(lambda: {"uploaded": 7.0, "cache_quota": 100.0, "connections": 2.0}, tmp_path)
    metrics.blob_bytes_fetched.inc(10)
    body, _ = metrics.render()
    assert value(body, "p2p_proxy_peer_upload_bytes_total") == 7
    assert value(body, "p2p_proxy_cache_quota_bytes") == 100
    assert value(body, "p2p_proxy_peer_connections") == 2
    assert value(body, "p2p_proxy_blob_bytes_fetched_total") == 10
    assert value(body, "p2p_proxy_cache_filesystem_free_bytes") > 0
    (build,) = [labels for name, labels in samples(body) if name == "p2p_build_info"]
    assert dict(build)["service"] == "proxy"
