"""p2p-tracker configuration (file keys in camelCase, env prefix ``P2P_TRACKER_``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from p2p_common.settings import HostPort, ServiceSettings


class TrackerSettings(ServiceSettings):
    ENV_PREFIX: ClassVar[str] = "P2P_TRACKER_"

    listen: HostPort = "0.0.0.0:6969"
    """Where the HTTP announce, scrape, health and metrics endpoints listen."""
    announce_interval: int = Field(300, ge=1, le=3600)
    """Seconds a peer should wait between regular announces (the ``interval`` answer)."""
    min_announce_interval: int = Field(5, ge=1, le=3600)
    """Seconds a peer must wait at least between announces (``min interval``)."""
    peer_expiry: int = Field(900, ge=1, le=86400)
    """Seconds after its last announce that a silent peer is forgotten."""
    max_torrents: int = Field(100_000, ge=1)
    """Most infohashes tracked at once; announces for new ones are refused beyond it."""
    max_peers_per_torrent: int = Field(5_000, ge=1)
    """Most peers kept per infohash; new peers are refused beyond it."""
    default_numwant: int = Field(50, ge=0)
    """Peers returned when the announce does not say ``numwant``."""
    max_numwant: int = Field(200, ge=0)
    """Cap on ``numwant``."""
    trust_ip_param: bool = False
    """Use the announce's ``ip`` parameter (when it is an IP address) instead of the TCP
    source address. Off by default: any client could then list someone else's address
    (traffic reflection, swarm poisoning). Turn it on only when every announce reaches the
    tracker through a proxy or NAT that hides the real source and clients are trusted."""
