"""The agent's Prometheus metrics (served on ``metricsListen``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pull_bytes = Counter(
            "p2p_agent_pull_bytes", "Blob bytes sent to local clients (containerd)", registry=r
        )
        self.pull_seconds = Histogram(
            "p2p_agent_blob_pull_seconds",
            "Time to send a whole blob to a client",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.pull_speed = Gauge(
            "p2p_agent_last_pull_bytes_per_second",
            "Speed of the last complete blob pull",
            registry=r,
        )
        self.download_bytes = Counter(
            "p2p_agent_download_bytes",
            "Blob bytes received, by source (agent, proxy, foreign peer, http_fallback)",
            ["source"],
            registry=r,
        )
        self.upload_bytes = Gauge(
            "p2p_agent_upload_bytes", "Bytes uploaded to peers since start", registry=r
        )
        self.disk_write_bytes = Counter(
            "p2p_agent_disk_write_bytes", "Verified piece bytes written to disk", registry=r
        )
        self.cache_hits = Counter(
            "p2p_agent_cache_hits", "Blob requests served from the cache", registry=r
        )
        self.cache_misses = Counter(
            "p2p_agent_cache_misses", "Blob requests that needed a download", registry=r
        )
        self.cache_bytes = Gauge("p2p_agent_cache_bytes", "Bytes of cached blobs", registry=r)
        self.active_torrents = Gauge(
            "p2p_agent_active_torrents", "Torrents being downloaded or seeded", registry=r
        )
        self.fallbacks = Counter(
            "p2p_agent_http_fallbacks", "Downloads that fell back to the proxy's HTTP", registry=r
        )
        self.errors = Counter(
            "p2p_agent_errors", "Registry API errors answered, by OCI code", ["code"], registry=r
        )
        self.download_rate = Gauge(
            "p2p_agent_download_rate_limit_bytes",
            "Configured downloadRate (0 = unlimited)",
            registry=r,
        )
        self.upload_rate = Gauge(
            "p2p_agent_upload_rate_limit_bytes", "Configured uploadRate (0 = unlimited)", registry=r
        )
