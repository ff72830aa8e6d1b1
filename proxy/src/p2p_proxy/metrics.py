"""The proxy's Prometheus metrics, in a registry of its own (several proxies may share a
process in tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "ProxyMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Live(Collector):
    """Values read at scrape time from the engine and the cache."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        values = self._read()
        yield CounterMetricFamily(
            "p2p_proxy_peer_upload_bytes",
            "Bytes uploaded to BitTorrent peers.",
            value=values.get("uploaded", 0.0),
        )
        yield GaugeMetricFamily(
            "p2p_proxy_seeding_torrents",
            "Torrents being seeded.",
            value=values.get("seeding", 0.0),
        )
        yield GaugeMetricFamily(
            "p2p_proxy_peer_connections",
            "Open BitTorrent peer connections.",
            value=values.get("connections", 0.0),
        )
        yield GaugeMetricFamily(
            "p2p_proxy_cache_used_bytes",
            "Bytes of cached blobs plus space reserved for fetches in progress.",
            value=values.get("cache_used", 0.0),
        )
        yield GaugeMetricFamily(
            "p2p_proxy_cache_blobs", "Blobs in the cache.", value=values.get("cache_blobs", 0.0)
        )


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.origin_bytes = Counter(
            "p2p_proxy_origin_bytes", "Blob bytes received from origin registries.", registry=r
        )
        self.blobs_fetched = Counter(
            "p2p_proxy_blobs_fetched",
            "Blobs fetched from an origin, verified and cached.",
            registry=r,
        )
        self.fetch_failures = Counter(
            "p2p_proxy_fetch_failures",
            "Blob fetches from an origin that failed, by error code.",
            ["code"],
            registry=r,
        )
        self.cache_hits = Counter(
            "p2p_proxy_cache_hits", "Blob requests answered from the cache.", registry=r
        )
        self.cache_misses = Counter(
            "p2p_proxy_cache_misses",
            "Blob requests that needed a fetch (or waited for one in flight).",
            registry=r,
        )
        self.metainfo_requests = Counter(
            "p2p_proxy_metainfo_requests", "Metainfo requests answered with a torrent.", registry=r
        )
        self.auth_checks = Counter(
            "p2p_proxy_authorization_checks",
            "Authorization checks, by where the decision came from (origin or cache).",
            ["source"],
            registry=r,
        )
        self.auth_denials = Counter(
            "p2p_proxy_authorization_denials",
            "Authorization checks the origin refused, by error code.",
            ["code"],
            registry=r,
        )
        self.progressive_streams = Counter(
            "p2p_proxy_progressive_streams",
            "Blobs streamed to an agent while still being fetched from the origin.",
            registry=r,
        )
        self.stream_bytes = Counter(
            "p2p_proxy_stream_bytes",
            "Blob bytes streamed to agents while the blob was still being fetched.",
            registry=r,
        )
        self.fallback_bytes = Counter(
            "p2p_proxy_http_fallback_bytes", "Blob bytes served over HTTP (fallback).", registry=r
        )
        self.manifest_requests = Counter(
            "p2p_proxy_manifest_requests", "Manifest requests from agents.", registry=r
        )
        self.manifest_origin_requests = Counter(
            "p2p_proxy_manifest_origin_requests",
            "Manifest requests sent to an origin, by method.",
            ["method"],
            registry=r,
        )
        self.manifest_cache_hits = Counter(
            "p2p_proxy_manifest_cache_hits",
            "Manifest bodies served from the proxy's by-digest cache.",
            registry=r,
        )
        self.errors = Counter(
            "p2p_proxy_errors", "Error responses, by registry error code.", ["code"], registry=r
        )
        self.evictions = Counter(
            "p2p_proxy_evictions", "Blobs evicted from the cache by the quota.", registry=r
        )
        self.origin_refusals = Counter(
            "p2p_proxy_origin_refusals",
            "Requests refused instead of starting origin work, by reason: requests (the "
            "client's originRequestsPerAddress), rate (its originRatePerAddress), busy "
            "(maxOriginFetches stayed full for originQueueTimeout).",
            ["reason"],
            registry=r,
        )
        for reason in ("requests", "rate", "busy"):
            self.origin_refusals.labels(reason=reason)  # 0 from the start, for rate() queries
        self.origin_joins = Counter(
            "p2p_proxy_origin_joins",
            "Requests that joined origin work another request had started (one origin request "
            "for all of them), by kind: blob (fetches), manifest (manifest requests).",
            ["kind"],
            registry=r,
        )
        self.origin_fetches_running = Gauge(
            "p2p_proxy_origin_fetches_running",
            "Blob fetches from an origin running (at most maxOriginFetches).",
            registry=r,
        )
        self.origin_fetches_waiting = Gauge(
            "p2p_proxy_origin_fetches_waiting",
            "Blob fetches waiting for one of the maxOriginFetches slots.",
            registry=r,
        )

    def watch(self, read: Callable[[], dict[str, float]]) -> None:
        """Expose the live values ``read()`` returns (keys: see :class:`_Live`)."""
        self.registry.register(_Live(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
