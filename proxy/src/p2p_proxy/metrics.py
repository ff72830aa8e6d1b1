"""The proxy's Prometheus metrics, in a registry of its own (several proxies may share a
process in tests). Listed in docs/metrics.md; counters end in ``_total``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2p_common.metrics import filesystem_gauges, render, service_registry
from p2p_proxy import __version__

__all__ = ["ProxyMetrics"]


class _Live(Collector):
    """Values read at scrape time from the engine and the cache."""

    def __init__(self, read: Callable[[], dict[str, float]], data_dir: str | None) -> None:
        self._read = read
        self._data_dir = data_dir

    def describe(self) -> Iterator[Metric]:
        return self._families({}, None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self._read(), self._data_dir)

    @staticmethod
    def _families(values: dict[str, float], data_dir: str | None) -> Iterator[Metric]:
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
        yield GaugeMetricFamily(
            "p2p_proxy_cache_quota_bytes",
            "The cache's size quota (cacheSize); 0 means no quota.",
            value=values.get("cache_quota", 0.0),
        )
        yield from filesystem_gauges("proxy", data_dir)


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = service_registry("proxy", __version__)
        r = self.registry
        self.origin_bytes = Counter(
            "p2p_proxy_origin_bytes_total",
            "Blob bytes received from origin registries.",
            registry=r,
        )
        self.blobs_fetched = Counter(
            "p2p_proxy_blobs_fetched_total",
            "Blobs fetched from an origin, verified and cached.",
            registry=r,
        )
        self.blob_bytes_fetched = Counter(
            "p2p_proxy_blob_bytes_fetched_total",
            "Sizes of the blobs fetched from an origin, verified and cached (once per fetch): "
            "p2p_proxy_origin_bytes_total above it means bytes read from the origin in vain.",
            registry=r,
        )
        self.fetch_failures = Counter(
            "p2p_proxy_fetch_failures_total",
            "Blob fetches from an origin that failed, by error code.",
            ["code"],
            registry=r,
        )
        self.cache_hits = Counter(
            "p2p_proxy_cache_hits_total", "Blob requests answered from the cache.", registry=r
        )
        self.cache_misses = Counter(
            "p2p_proxy_cache_misses_total",
            "Blob requests that needed a fetch (or waited for one in flight).",
            registry=r,
        )
        self.metainfo_requests = Counter(
            "p2p_proxy_metainfo_requests_total",
            "Metainfo requests answered with a torrent.",
            registry=r,
        )
        self.auth_checks = Counter(
            "p2p_proxy_authorization_checks_total",
            "Authorization checks, by where the decision came from (origin or cache).",
            ["source"],
            registry=r,
        )
        self.auth_denials = Counter(
            "p2p_proxy_authorization_denials_total",
            "Authorization checks the origin refused, by error code.",
            ["code"],
            registry=r,
        )
        self.progressive_streams = Counter(
            "p2p_proxy_progressive_streams_total",
            "Blobs streamed to an agent while still being fetched from the origin.",
            registry=r,
        )
        self.stream_bytes = Counter(
            "p2p_proxy_stream_bytes_total",
            "Blob bytes streamed to agents while the blob was still being fetched.",
            registry=r,
        )
        self.fallback_bytes = Counter(
            "p2p_proxy_http_fallback_bytes_total",
            "Blob bytes served over HTTP (fallback).",
            registry=r,
        )
        self.manifest_requests = Counter(
            "p2p_proxy_manifest_requests_total", "Manifest requests from agents.", registry=r
        )
        self.listing_requests = Counter(
            "p2p_proxy_listing_requests_total",
            "Tag list and referrers requests from agents (each one an origin request), by kind.",
            ["kind"],
            registry=r,
        )
        self.manifest_origin_requests = Counter(
            "p2p_proxy_manifest_origin_requests_total",
            "Manifest requests sent to an origin, by method.",
            ["method"],
            registry=r,
        )
        self.manifest_cache_hits = Counter(
            "p2p_proxy_manifest_cache_hits_total",
            "Manifest bodies served from the proxy's by-digest cache.",
            registry=r,
        )
        self.errors = Counter(
            "p2p_proxy_errors_total",
            "Error responses, by registry error code.",
            ["code"],
            registry=r,
        )
        self.evictions = Counter(
            "p2p_proxy_evictions_total", "Blobs evicted from the cache by the quota.", registry=r
        )
        self.origin_refusals = Counter(
            "p2p_proxy_origin_refusals_total",
            "Requests refused instead of starting origin work, by reason: requests (the "
            "client's originRequestsPerAddress), rate (its originRatePerAddress), busy "
            "(maxOriginFetches stayed full for originQueueTimeout).",
            ["reason"],
            registry=r,
        )
        for reason in ("requests", "rate", "busy"):
            self.origin_refusals.labels(reason=reason)  # 0 from the start, for rate() queries
        self.origin_joins = Counter(
            "p2p_proxy_origin_joins_total",
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
        self.origin_fetches_in_line = Gauge(
            "p2p_proxy_origin_fetches_in_line",
            "Large blob fetches waiting for their turn at their origin (largeFetchesPerOrigin).",
            registry=r,
        )

    def watch(
        self, read: Callable[[], dict[str, float]], data_dir: os.PathLike[str] | None = None
    ) -> None:
        """Expose the live values ``read()`` returns (keys: see :class:`_Live`) and the free
        space of ``data_dir``'s filesystem, at every scrape."""
        self.registry.register(_Live(read, None if data_dir is None else os.fspath(data_dir)))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The body and content type of a scrape with this ``Accept`` header."""
        return render(self.registry, accept)
