"""p2p-tracker configuration (file keys in camelCase, env prefix ``P2P_TRACKER_``)."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BeforeValidator, Field, IPvAnyNetwork

from p2p_common.settings import ListenAddress, ServiceSettings, split_listen


def _as_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _optional_host_port(value: str) -> str:
    value = value.strip()
    if value:
        split_listen(value)
    return value


class TrackerSettings(ServiceSettings):
    ENV_PREFIX: ClassVar[str] = "P2P_TRACKER_"

    listen: ListenAddress = ":6969"
    """Where the HTTP announce, scrape, health and metrics endpoints listen (``:6969``: every
    address, IPv6 and IPv4)."""
    udp_listen: Annotated[str, AfterValidator(_optional_host_port)] = ""
    """Where the UDP tracker (BEP 15, ``udp://`` announce URLs) listens; empty (the default)
    turns it off. The conventional value is the HTTP port on UDP, ``:6969``: then
    ``udp://host:6969`` and ``http://host:6969/announce`` rank alike (docs/tracker.md)."""
    announce_interval: int = Field(300, ge=1, le=3600)
    """Seconds a peer should wait between regular announces (the ``interval`` answer)."""
    min_announce_interval: int = Field(5, ge=1, le=3600)
    """Seconds a peer must wait at least between announces (``min interval``)."""
    peer_expiry: int = Field(900, ge=1, le=86400)
    """Seconds after its last announce that a silent peer is forgotten."""
    seed_announce_interval: int = Field(1800, ge=1, le=86400)
    """Seconds between the batched announces of a seed (the ``interval`` of a batch answer,
    ``POST /p2p/v1/announce-batch``): a seed only needs to be findable, so p2p services
    announce the blobs they seed this rarely, all in one request per tracker."""
    seed_expiry: int = Field(5400, ge=1, le=7 * 86400)
    """Seconds after its last batched announce that a seed is forgotten."""
    max_batch_seeds: int = Field(10_500_000, ge=1)
    """Most seeds from batched announces kept in all torrents together (about 250 bytes
    each: with ``max_peers`` full too, about 3.7 GB, inside the chart's 4 GB limit); beyond
    it, like ``max_peers``."""
    max_torrents: int = Field(100_000, ge=1)
    """Most infohashes tracked at once. Beyond it a torrent whose peers all share one address
    is evicted (least recently announced first); a new infohash is refused only when there is
    none."""
    max_peers_per_torrent: int = Field(5_000, ge=1)
    """Most peers kept per infohash; new peers beyond it get peers but are not listed."""
    max_peers: int = Field(2_000_000, ge=1)
    """Most peers kept in all torrents together (about 0.5 KB each); beyond it, like
    ``max_torrents``."""
    max_torrents_per_address: int = Field(20_000, ge=1)
    """Most torrents one address may be a peer of. A node's agent and proxy (both on the host
    network, so one address) announce every blob they cache; beyond it the address is not
    listed in further torrents (it still gets their peers; a new infohash is not tracked)."""
    max_peers_per_address: int = Field(8, ge=1)
    """Most peers (peer ids) one address may have in one torrent: an agent, a proxy and the
    leftovers of a few restarts. Beyond it a new peer gets peers but is not listed."""
    uncapped_addresses: Annotated[list[IPvAnyNetwork], BeforeValidator(_as_list)] = Field(
        default_factory=lambda: [ip_network("127.0.0.0/8"), ip_network("::1/128")]
    )
    """Networks (``10.0.0.0/8``, ``::1/128``, a bare address) exempt from the two per-address
    caps. Loopback by default: only the tracker's own pod can announce from it, while a local
    demo or test runs every peer on 127.0.0.1."""
    default_numwant: int = Field(50, ge=0)
    """Peers returned when the announce does not say ``numwant``."""
    max_numwant: int = Field(200, ge=0)
    """Cap on ``numwant``."""
    trust_ip_param: bool = False
    """Use the announce's ``ip`` parameter (when it is an IP address) instead of the TCP
    source address. Off by default: any client could then list someone else's address
    (traffic reflection, swarm poisoning). Turn it on only when every announce reaches the
    tracker through a proxy or NAT that hides the real source and clients are trusted."""
