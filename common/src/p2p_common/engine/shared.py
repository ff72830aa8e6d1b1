"""What every torrent of one engine shares: identity, limits, the disk, the announcer, bans and
connection slots. The engine creates one and hands it to each torrent, so a torrent never
reaches back into the engine that owns it."""

from __future__ import annotations

from dataclasses import dataclass, field

from p2p_common import wire
from p2p_common.engine.announce import Announcer
from p2p_common.engine.disk import DiskRunner
from p2p_common.engine.flusher import Flusher
from p2p_common.ratelimit import RateLimiter
from p2p_common.session import LocalPeer


class Bans:
    """Peers we refuse: by id, by endpoint, and (optionally) by address."""

    def __init__(self, *, by_address: bool) -> None:
        self.by_address = by_address
        self._ids: set[bytes] = set()
        self._addresses: set[str] = set()
        self._endpoints: set[tuple[str, int]] = set()

    def ban(self, peer_id: bytes, address: tuple[str, int]) -> None:
        self._ids.add(peer_id)
        self._endpoints.add(address)
        if self.by_address:
            self._addresses.add(address[0])

    def is_banned(self, peer_id: bytes | None, host: str, port: int | None = None) -> bool:
        return (
            (peer_id is not None and peer_id in self._ids)
            or host in self._addresses
            or (port is not None and (host, port) in self._endpoints)
        )


class ConnectionSlots:
    """The process-wide bound on peer connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        self.used -= 1


@dataclass(eq=False)
class EngineShared:
    peer_id: bytes
    local: LocalPeer
    reserved: bytes
    download_limiter: RateLimiter
    upload_limiter: RateLimiter
    disk: DiskRunner
    announcer: Announcer
    bans: Bans
    slots: ConnectionSlots
    super_seed: bool
    flusher: Flusher = field(default_factory=Flusher)
    """Wakes writers that hold back HAVEs (Engine.serve runs it)."""
    self_addresses: set[tuple[str, int]] = field(default_factory=set)
    """Our own listening addresses as others see them (never dialled)."""

    @property
    def max_block(self) -> int:
        return self.local.max_block

    def handshake_for(self, info_hash: bytes) -> bytes:
        return wire.encode_handshake(info_hash, self.peer_id, self.reserved)
