"""The agent's Prometheus metrics (served on ``metricsListen``; listed in docs/metrics.md).

Counters end in ``_total``, rates in ``_bytes_per_second``. What the engine and the cache know
anyway (bytes uploaded, peer connections, the cache's filesystem) is read when Prometheus
scrapes (:meth:`AgentMetrics.watch`) rather than copied into gauges by a timer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2p_agent import __version__
from p2p_common.asgi import Message, Send
from p2p_common.blobcache import BlobCache
from p2p_common.cachepolicy import REASONS
from p2p_common.engine import Engine
from p2p_common.metrics import filesystem_gauges, render, service_registry

__all__ = ["PEER_ROLES", "AgentMetrics", "Live", "engine_reader"]

PEER_ROLES = ("agent", "proxy", "foreign")
"""Roles of a peer connection: another p2p agent, a p2p proxy, or any other BitTorrent client."""

PULL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Live:
    """What the agent's parts report at scrape time."""

    uploaded: int = 0
    """Bytes uploaded to peers since start (the engine's upload limiter counts them)."""
    connections: dict[str, int] = field(default_factory=dict)
    """Peer connections by role."""
    cache_quota: int = 0
    data_dir: str | None = None
    evictions: dict[str, int] = field(default_factory=dict)
    """Blobs evicted from the cache since start, by reason."""
    limits_unmet: dict[str, bool] = field(default_factory=dict)
    """Cache limits (quota, watermark) the last sweep could not meet."""


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], Live]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        return self._families(Live())

    def collect(self) -> Iterator[Metric]:
        return self._families(self._read())

    @staticmethod
    def _families(live: Live) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "p2p_agent_upload_bytes",
            "Bytes uploaded to BitTorrent peers since start.",
            value=live.uploaded,
        )
        connections = GaugeMetricFamily(
            "p2p_agent_peer_connections",
            "Open BitTorrent connections by the peer's role: agent (another node), proxy (a "
            "p2p-proxy seed), foreign (any other BitTorrent client).",
            labels=["role"],
        )
        for role in PEER_ROLES:
            connections.add_metric([role], live.connections.get(role, 0))
        yield connections
        yield GaugeMetricFamily(
            "p2p_agent_cache_quota_bytes",
            "The cache's size quota (cacheSize); 0 means no quota.",
            value=live.cache_quota,
        )
        yield from filesystem_gauges("agent", live.data_dir)
        evictions = CounterMetricFamily(
            "p2p_agent_cache_evictions",
            "Blobs evicted from the cache since start, by reason: quota (cacheSize), watermark "
            "(the filesystem above cacheHighWatermark, or too full for a download), expired "
            "(unused for cacheMaxUnused), operator (p2p-agent cache rm or prune).",
            labels=["reason"],
        )
        for reason in REASONS:
            evictions.add_metric([reason], live.evictions.get(reason, 0))
        yield evictions
        unmet = GaugeMetricFamily(
            "p2p_agent_cache_limit_unmet",
            "1 when the last cache sweep could not meet a limit (quota, watermark) because "
            "every blob left is in use or the space is not the cache's; else 0.",
            labels=["limit"],
        )
        for limit in ("quota", "watermark"):
            unmet.add_metric([limit], 1 if live.limits_unmet.get(limit) else 0)
        yield unmet


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = service_registry("agent", __version__)
        r = self.registry
        self.requests = Counter(
            "p2p_agent_requests_total",
            "Requests to the registry API (manifests, blobs, pings).",
            registry=r,
        )
        self.pull_bytes = Counter(
            "p2p_agent_pull_bytes_total",
            "Blob bytes sent to local clients (containerd)",
            registry=r,
        )
        self.pull_seconds = Histogram(
            "p2p_agent_blob_pull_seconds",
            "Time to send a whole blob to a client",
            buckets=PULL_BUCKETS,
            registry=r,
        )
        self.first_byte_seconds = Histogram(
            "p2p_agent_blob_time_to_first_byte_seconds",
            "Time from a blob request to its first body byte, by source: cache (it was here) "
            "or download (it was not: the swarm or a proxy had to deliver it first).",
            ["source"],
            buckets=FIRST_BYTE_BUCKETS,
            registry=r,
        )
        for source in ("cache", "download"):
            self.first_byte_seconds.labels(source)
        self.pull_speed = Gauge(
            "p2p_agent_last_pull_bytes_per_second",
            "Speed of the last complete blob pull",
            registry=r,
        )
        self.last_success = Gauge(
            "p2p_agent_last_successful_pull_timestamp_seconds",
            "Unix time when the agent last sent a client a whole blob (or range) it asked for; "
            "0 before the first.",
            registry=r,
        )
        self.download_bytes = Counter(
            "p2p_agent_download_bytes_total",
            "Blob bytes received, by source (agent, proxy, foreign peer, proxy_stream, "
            "http_fallback); swarm downloads count when they complete.",
            ["source"],
            registry=r,
        )
        self.disk_write_bytes = Counter(
            "p2p_agent_disk_write_bytes_total", "Verified piece bytes written to disk", registry=r
        )
        self.cache_hits = Counter(
            "p2p_agent_cache_hits_total", "Blob requests served from the cache", registry=r
        )
        self.cache_misses = Counter(
            "p2p_agent_cache_misses_total", "Blob requests that needed a download", registry=r
        )
        self.cache_bytes = Gauge("p2p_agent_cache_bytes", "Bytes of cached blobs", registry=r)
        self.active_torrents = Gauge(
            "p2p_agent_active_torrents", "Torrents being downloaded or seeded", registry=r
        )
        self.fallbacks = Counter(
            "p2p_agent_http_fallbacks_total",
            "Downloads that fell back to the proxy's HTTP",
            registry=r,
        )
        self.errors = Counter(
            "p2p_agent_errors_total",
            "Registry API errors answered (or responses cut off), by OCI code and HTTP status",
            ["code", "status"],
            registry=r,
        )
        self.download_rate = Gauge(
            "p2p_agent_download_rate_limit_bytes_per_second",
            "Download rate in force: downloadRate, or the adaptive limit below it (0 = unlimited)",
            registry=r,
        )
        self.download_rate_adaptive = Gauge(
            "p2p_agent_download_rate_adaptive",
            "1 while the adaptive limit (diskWriteLatencyLimit) holds the download rate down",
            registry=r,
        )
        self.disk_flush_seconds = Histogram(
            "p2p_agent_disk_flush_seconds",
            "Time the agent's writes of one second took to reach the disk (adaptive limit on)",
            buckets=FLUSH_BUCKETS,
            registry=r,
        )
        self.upload_rate = Gauge(
            "p2p_agent_upload_rate_limit_bytes_per_second",
            "uploadRate in force (0 = unlimited)",
            registry=r,
        )

    def watch(self, read: Callable[[], Live]) -> None:
        """Expose what ``read()`` returns at every scrape (see :class:`Live`)."""
        self.registry.register(_LiveCollector(read))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type of a scrape with this ``Accept`` header."""
        return render(self.registry, accept)

    def pulled(self) -> None:
        """A client got what it asked for."""
        self.last_success.set(time.time())

    def timed_first_byte(self, send: Send, started: float, source: str) -> Send:
        """``send`` that observes, on the first body byte it passes on, the time since
        ``started`` (a :func:`time.monotonic` reading) in the time-to-first-byte histogram."""
        histogram = self.first_byte_seconds.labels(source)
        waiting = True

        async def timed(message: Message) -> None:
            nonlocal waiting
            if waiting and message["type"] == "http.response.body" and message.get("body"):
                waiting = False
                histogram.observe(time.monotonic() - started)
            await send(message)

        return timed


def engine_reader(
    engine: Engine,
    cache: BlobCache,
    data_dir: os.PathLike[str],
    limits_unmet: Callable[[], dict[str, bool]] = dict,
) -> Callable[[], Live]:
    """What :meth:`AgentMetrics.watch` reads from the agent's engine and cache (and, through
    ``limits_unmet``, its cache janitor)."""
    path = os.fspath(data_dir)

    def read() -> Live:
        roles: dict[str, int] = {}
        for torrent in list(engine.torrents.values()):
            for role, count in torrent.statistics().peers_by_role.items():
                roles[role] = roles.get(role, 0) + count
        return Live(
            uploaded=engine.upload_limiter.total,
            connections=roles,
            cache_quota=cache.quota,
            data_dir=path,
            evictions=cache.eviction_counts(),
            limits_unmet=dict(limits_unmet()),
        )

    return read
