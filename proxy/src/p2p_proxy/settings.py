"""p2p-proxy configuration (file keys in camelCase, env prefix ``P2P_PROXY_``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, ValidationInfo, field_validator

from p2p_common.settings import ByteSize, HostPort, RegistryList, ServiceSettings, StrList


class ProxySettings(ServiceSettings):
    ENV_PREFIX: ClassVar[str] = "P2P_PROXY_"

    listen: HostPort = "0.0.0.0:5005"
    """The HTTP API for agents (manifests, metainfo, blob fallback), health and metrics."""
    peer_port: int = Field(6882, ge=1, le=65535)
    """BitTorrent peer port the proxy seeds from."""
    data_dir: Path = Path("/p2p_proxy_data")
    """Blob cache and torrent state."""
    registry: RegistryList
    """The origin registries, one or a list: ``registry.example.com`` (https) or
    ``http://host:port``. The first is the default; agents select another with
    ``?ns=<host[:port]>``. No other registry is ever contacted."""
    registry_ca_file: Path | None = None
    """CA bundle (PEM) that verifies the origins' TLS certificates instead of the system store."""
    tls_cert_file: Path | None = None
    """Certificate chain (PEM) of the agent API: given with ``tlsKeyFile``, ``listen`` serves
    HTTPS, so that the pull secrets agents pass on never cross the network in clear."""
    tls_key_file: Path | None = None
    """Private key (PEM) of ``tlsCertFile``."""
    token_realm_hosts: StrList = Field(default_factory=list)
    """Hosts besides the registry's own (and its parent domain's, e.g. auth.docker.io for
    registry-1.docker.io) whose token realm the proxy may send credentials to."""
    trackers: StrList = Field(default_factory=list)
    """Tracker announce URLs written into every metainfo (``http://p2p-tracker:6969/announce``)."""
    cache_size: ByteSize = 50 * 10**9
    """Disk quota for cached blobs; least recently used blobs are evicted beyond it
    (0 = no quota)."""
    upload_rate: ByteSize = 0
    """Process-wide seeding limit in bytes per second (0 = unlimited)."""
    auth_cache_ttl: float = Field(60.0, ge=0)
    """Seconds an origin authorization decision is reused for the same credentials,
    registry, repository and digest (0 = ask the origin every time)."""
    manifest_cache_size: ByteSize = 64 * 10**6
    """Memory for manifest bodies cached by digest (tags are still resolved at the origin on
    every request); least recently used dropped beyond it. 0 = every manifest request goes to
    the origin."""
    progressive_streams: int = Field(0, ge=0)
    """Agents that may stream a blob from the proxy while the proxy is still fetching it from
    the origin (they get every byte from the proxy, then seed); the others follow the blob's
    chunks in the swarm. 0 (the default) turns progressive streams off: since the swarm starts
    with the first chunk, a stream only takes uplink from the swarm (docs/rollout.md)."""
    super_seed: bool = True
    """Reveal each blob's pieces to the agents a few at a time (BEP 16 super-seeding), so the
    proxy's upload brings every piece into the swarm once before it sends any piece twice."""
    max_connections: int = Field(1000, ge=1)
    """Most BitTorrent peer connections at once."""
    shutdown_timeout: float = Field(90.0, ge=0)
    """Seconds in-flight requests get to finish after SIGTERM before the proxy stops anyway
    (keep it below the pod's ``terminationGracePeriodSeconds``)."""
    send_timeout: float = Field(30.0, ge=1)
    """Seconds a response waits for a client that takes none of its bytes before its
    connection is cut (TCP_USER_TIMEOUT); a stop waits at most this long for such clients."""

    @field_validator("tls_key_file")
    @classmethod
    def _tls_pair(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        if (key is None) != (info.data.get("tls_cert_file") is None):
            raise ValueError("tlsCertFile and tlsKeyFile go together: give both or neither")
        return key

    @property
    def default_registry(self) -> str:
        """The first registry: the one served when a request names none."""
        return self.registry[0]
