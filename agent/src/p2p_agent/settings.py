"""p2p-agent configuration (file keys in camelCase, env prefix ``P2P_AGENT_``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from p2p_common.cachepolicy import CachePolicy
from p2p_common.settings import (
    ByteSize,
    Duration,
    HostPort,
    ListenAddress,
    RegistryList,
    ServiceSettings,
    StrList,
    join_host_port,
    split_host_port,
    split_listen,
)


def _loopback(value: str) -> str:
    host, _port = split_host_port(value)
    if host == "localhost":
        return value
    try:
        if ipaddress.ip_address(host).is_loopback:
            return value
    except ValueError:
        pass
    raise ValueError(
        f"{value!r} is not a loopback address (use 127.0.0.1:5004, [::1]:5004 or localhost:5004)"
    )


LoopbackHostPort = Annotated[HostPort, AfterValidator(_loopback)]


def _bind_host(value: str) -> str:
    """An address or name to bind (``[v6]`` brackets dropped), or empty for every address."""
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host:
        split_listen(join_host_port(host, 0))
    return host


def _percent(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("expected a percentage, not a boolean")  # pydantic takes True as 1
    if isinstance(value, str) and value.strip().endswith("%"):
        return value.strip()[:-1].strip()
    return value


Percent = Annotated[int, BeforeValidator(_percent), Field(ge=0, le=100)]
"""A whole percentage, 0 to 100 (``85`` or ``"85%"``)."""


class AgentSettings(ServiceSettings):
    ENV_PREFIX: ClassVar[str] = "P2P_AGENT_"

    listen: LoopbackHostPort = "127.0.0.1:5004"
    """The registry API containerd pulls from. Only a loopback address is accepted: the API
    serves cached private layers to callers the origin authorized, and forwards their
    credentials; nothing off the node may reach it."""
    metrics_listen: ListenAddress = ":5014"
    """``/metrics``, ``/healthz`` and ``/readyz`` (``:5014``: every address, IPv6 and IPv4)."""
    peer_port: int = Field(6881, ge=1, le=65535)
    """BitTorrent peer port."""
    peer_host: Annotated[str, AfterValidator(_bind_host)] = ""
    """Address the BitTorrent listener binds; empty (the default): every address, IPv6 and
    IPv4 (other nodes connect to the address the tracker saw the agent announce from)."""
    data_dir: Path = Path("/p2p_agent_data")
    """Blob cache, partial downloads and their bitfields."""
    registry: RegistryList
    """Registries to accelerate. The first is the target of rewrite mode
    (``localhost:5004/<repo>``); all of them are served in mirror mode (``?ns=``)."""
    proxies: StrList = Field(default_factory=list)
    """Proxy API URLs. A host name resolving to several addresses (a headless Service)
    counts as one proxy per address. ``https://`` URLs are verified against ``proxyCaFile``
    (the certificate must name the URL's host name, even when the agent connects to one of its
    addresses)."""
    proxy_ca_file: Path | None = None
    """CA bundle (PEM) that verifies the proxies' certificates instead of the system store."""
    download_rate: ByteSize = 0
    """Process-wide download limit in bytes per second (0 = unlimited); ``100MB`` style units."""
    upload_rate: ByteSize = 0
    """Process-wide upload limit in bytes per second (0 = unlimited)."""
    disk_write_latency_limit: float = Field(0.0, ge=0, le=60)
    """Adaptive download limit (0 = off): each second the agent flushes what it wrote
    (``fdatasync``) and times it; when that, or any write, takes longer than this many seconds,
    the download rate drops (to 0.7 times what was downloaded), and it grows again (by a quarter
    a second, up to ``downloadRate``) while flushes take at most half of it. Flushing every
    second bounds the writes in flight to about a second of downloading, so 0.5 keeps the
    agent to about half of what the disk can write. Live."""
    disk_min_download_rate: ByteSize = Field(10**6, ge=1)
    """The lowest download rate the adaptive limit sets (bytes per second)."""
    cache_size: ByteSize = 20 * 10**9
    """Disk quota for cached blobs, least recently used evicted beyond it (0 = no quota).
    Applied live."""
    cache_high_watermark: Percent = 85
    """Percent of the dataDir filesystem used above which least recently used blobs are
    evicted, down to ``cacheLowWatermark`` (0 = off). Applied live."""
    cache_low_watermark: Percent = 80
    """Percent of the dataDir filesystem used that evicting for the high watermark aims for;
    must be below ``cacheHighWatermark``. Applied live."""
    cache_max_unused: Duration = 0.0
    """Blobs not used (served to a client, or downloaded) for this long are evicted: seconds,
    or ``30m``, ``12h``, ``7d`` (0 = never). Applied live."""
    cache_sweep_interval: Annotated[Duration, Field(ge=1, le=3600)] = 30.0
    """How often the cache policy is checked (besides after every download), 1 s to 1 h.
    Applied live."""
    swarm_min_size: ByteSize = 10**6
    """Blobs smaller than this (image configs, tiny layers) come from the proxy over HTTP and
    are not seeded: a swarm gains nothing on a piece or four, and every seeded blob costs the
    tracker an announce per node and interval. 0 = every blob through the swarm."""
    fallback_after: float = Field(10.0, gt=0)
    """Seconds without swarm progress before a blob is fetched from the proxy over HTTP."""
    auth_cache_ttl: float = Field(60.0, ge=0)
    """Seconds an origin authorization decision is reused (same credentials, repository, blob)."""
    max_connections: int = Field(200, ge=1)
    """Most BitTorrent peer connections at once."""
    mirror_config_path: Path | None = None
    """containerd's registry ``config_path`` (``/etc/containerd/certs.d``) as the agent sees it,
    for the status view only: the agent reads ``<path>/<registry>/hosts.toml`` of each
    configured registry and shows whether containerd is told to pull through it. Unset: the
    mirror state shows as ``unknown``. The chart sets it (a read-only mount) in mirror mode."""
    send_timeout: float = Field(30.0, ge=1)
    """Seconds a response waits for a client that takes none of its bytes before its
    connection is cut (TCP_USER_TIMEOUT)."""

    @field_validator("cache_low_watermark")
    @classmethod
    def _low_below_high(cls, low: int, info: ValidationInfo) -> int:
        high = info.data.get("cache_high_watermark")
        if high and low >= high:
            raise ValueError(f"must be below cacheHighWatermark ({high})")
        return low

    def cache_policy(self) -> CachePolicy:
        """The cache limits these settings ask for."""
        return CachePolicy(
            quota=self.cache_size,
            high_watermark=self.cache_high_watermark,
            low_watermark=self.cache_low_watermark,
            max_unused=self.cache_max_unused,
        )
