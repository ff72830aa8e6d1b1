"""p2p-proxy configuration (file keys in camelCase, env prefix ``P2P_PROXY_``)."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    IPvAnyNetwork,
    PlainSerializer,
    SecretStr,
    ValidationInfo,
    field_validator,
)

from p2p_common.settings import (
    ByteSize,
    ConfigError,
    ListenAddress,
    RegistryList,
    Sensitive,
    ServiceSettings,
    StrList,
)
from p2p_proxy.origin.egress import EgressRoutes, parse_no_proxy, parse_proxy_url, redact


def _proxy_url(value: object) -> object:
    """``""`` or None: no proxy; else a proxy URL, kept as a secret (it may hold a password)."""
    if value is None:
        return None
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        raise ValueError("expected a URL such as http://proxy.example.com:3128")
    if not value.strip():
        return None
    return SecretStr(parse_proxy_url(value))


ProxyURL = Annotated[
    SecretStr | None,
    BeforeValidator(_proxy_url),
    Sensitive(),
    PlainSerializer(
        lambda v: None if v is None else redact(v.get_secret_value()), return_type=str | None
    ),
]
"""An HTTP(S) proxy URL, maybe with credentials: shown (repr, dumps, errors) without them."""


def _no_proxy(values: list[str]) -> list[str]:
    parse_no_proxy(values)
    return values


class ProxySettings(ServiceSettings):
    ENV_PREFIX: ClassVar[str] = "P2P_PROXY_"

    listen: ListenAddress = ":5005"
    """The HTTP API for agents (manifests, metainfo, blob fallback), health and metrics
    (``:5005``: every address, IPv6 and IPv4)."""
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
    origin_proxy: ProxyURL = None
    """Outbound HTTP proxy for the origin traffic only (registries, their token realms, their
    blob redirects): ``http://[user:password@]host:port`` (``https://`` for TLS to the proxy).
    Trackers, agents and peers are never reached through it. Empty: direct."""
    origin_no_proxy: Annotated[StrList, AfterValidator(_no_proxy)] = Field(default_factory=list)
    """Origin hosts reached directly despite ``originProxy`` (or the environment's proxy):
    ``NO_PROXY`` entries, Go's rules (``registry.internal``, ``.example.com``, ``10.0.0.0/8``,
    ``10.1.2.3:5000``, ``*``)."""
    origin_proxy_from_env: bool = False
    """Take the origin's proxy from the environment: ``HTTPS_PROXY`` for https origins,
    ``HTTP_PROXY`` for http ones, ``NO_PROXY`` (plus ``originNoProxy``) for exceptions. Off by
    default: the variables are then ignored by every client of the proxy."""
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

    @field_validator("origin_proxy_from_env")
    @classmethod
    def _one_proxy_source(cls, from_env: bool, info: ValidationInfo) -> bool:
        if from_env and info.data.get("origin_proxy") is not None:
            raise ValueError("give originProxy or originProxyFromEnv, not both")
        return from_env

    def egress_routes(self, environ: Mapping[str, str]) -> EgressRoutes | None:
        """Which origin requests go through which proxy (None: all direct). ``environ`` is
        read only with ``originProxyFromEnv``; a bad variable is a :class:`ConfigError` naming
        it (never its value)."""
        if self.origin_proxy is not None:
            return EgressRoutes.explicit(self.origin_proxy.get_secret_value(), self.origin_no_proxy)
        if not self.origin_proxy_from_env:
            return None
        try:
            return EgressRoutes.from_environment(environ, self.origin_no_proxy)
        except ValueError as exc:
            raise ConfigError(f"originProxyFromEnv: {exc}") from None

    @property
    def default_registry(self) -> str:
        """The first registry: the one served when a request names none."""
        return self.registry[0]

    # --- limits on the origin work clients start (docs/proxy-api.md, "Limits") -------------
    origin_requests_per_address: int = Field(16, ge=0)
    """Origin requests (blob fetches, manifest requests) that one client address started and
    that are still in progress; one more is refused with 429. Joining a fetch in progress and
    cache hits are free. 0 = no limit."""
    origin_rate_per_address: float = Field(5.0, ge=0, allow_inf_nan=False)
    """Requests a second that one client address may start origin work with (a token bucket
    of ``originBurstPerAddress``); beyond it 429. 0 = no limit."""
    origin_burst_per_address: int = Field(100, ge=1)
    """Requests starting origin work that one client address may send at once before
    ``originRatePerAddress`` applies."""
    max_origin_fetches: int = Field(32, ge=1)
    """Distinct blob fetches from the origins running at once (half of an origin's 64 HTTP
    connections: manifest requests and authorization checks keep the rest); a new one waits
    for a slot."""
    origin_queue_timeout: float = Field(30.0, ge=0, allow_inf_nan=False)
    """Seconds a new blob fetch waits for one of the ``maxOriginFetches`` slots before its
    callers get 503 (the agent then asks the next proxy)."""
    large_fetches_per_origin: int = Field(1, ge=0)
    """Large blobs (4 MiB and more) fetched from one origin at once, in the order asked; the
    next starts when one is nearly done or stalls (p2p_proxy.fetchline). Raise it where one
    fetch cannot fill the proxy's link (an origin that sends one connection slower than
    several, or one faster than a fetch can hash and write). 0 = no order: every fetch
    starts at once."""
    uncapped_addresses: Annotated[
        list[IPvAnyNetwork],
        BeforeValidator(lambda v: v.replace(",", " ").split() if isinstance(v, str) else v),
    ] = Field(default_factory=lambda: [ip_network("127.0.0.0/8"), ip_network("::1/128")])
    """Networks (``10.0.0.0/8``, ``::1/128``, a bare address) without per-address limits.
    Loopback by default: in a cluster only the proxy's own node connects from it."""
