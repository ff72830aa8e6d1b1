"""The swarm registry: which peers are in which torrent, pure and synchronous.

No clock and no I/O: every call that needs the time takes ``now`` (seconds, from a
monotonic clock the shell owns). Peers are keyed by peer id within an infohash; each
has an address, a port, ``left`` and the time it was last seen. ``event=stopped`` removes a
peer, a silent peer is forgotten ``peer_expiry`` seconds after its last announce
(:meth:`Swarm.expire`), and a torrent without peers is forgotten with its last peer.

Bounded: at most ``max_torrents`` infohashes (a new one beyond it raises
:class:`SwarmFullError`) and ``max_peers_per_torrent`` peers each (a new peer beyond it still
gets peers back but is not remembered: :attr:`AnnounceOutcome.full` is true).

Peer selection: a leecher gets a uniformly random subset of all other peers (seeds and
leechers alike: inside a cluster leechers trade pieces with each other from the first
second, so the mesh should not form around the seeds only); a seed gets only leechers,
since another seed has nothing for it. The requester itself is never returned.

Memory layout: each peer is one plain tuple of atomic values (:data:`SwarmPeer`, read it
with the index constants :data:`PEER_ID`, :data:`IP`, :data:`PORT`, :data:`PACKED`,
:data:`LEFT`). CPython's cycle collector stops tracking such tuples, so a million peers add
about 10 ms to a full collection instead of about 300 ms with one object per peer: the
collector's pauses would otherwise dominate the announce latency of a large tracker.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from p2p_common.errors import LocalError, RemoteError
from p2p_common.tracker_proto import AnnounceRequest, Event, ScrapeStats, pack_peer

__all__ = [
    "IP",
    "KEY",
    "LEFT",
    "PACKED",
    "PEER_ID",
    "PORT",
    "AnnounceOutcome",
    "PeerConflictError",
    "Swarm",
    "SwarmFullError",
    "SwarmPeer",
]


class SwarmFullError(LocalError):
    """The tracker already holds ``max_torrents`` infohashes and cannot take a new one."""


class PeerConflictError(RemoteError):
    """A peer id already registered from another address was announced without its key."""


SwarmPeer = tuple[bytes, str, int, bytes, int, bytes | None, int]
"""One peer of one torrent: (peer_id, ip, port, packed, left, key, slot)."""

# Indices into SwarmPeer. PACKED is the compact form: 6 bytes (IPv4, BEP 23) or 18 bytes
# (IPv6, BEP 7); _SLOT is the peer's index in its torrent's seed or leecher list.
PEER_ID: Final = 0
IP: Final = 1
PORT: Final = 2
PACKED: Final = 3
LEFT: Final = 4
KEY: Final = 5
_SLOT: Final = 6


class _Torrent:
    __slots__ = ("downloaded", "leechers", "peers", "seeds")

    def __init__(self) -> None:
        self.peers: dict[bytes, SwarmPeer] = {}
        self.seeds: list[SwarmPeer] = []
        self.leechers: list[SwarmPeer] = []
        self.downloaded = 0


@dataclass(frozen=True, slots=True)
class AnnounceOutcome:
    """What an announce gets back."""

    peers: list[SwarmPeer]
    complete: int
    """Seeders in the swarm (the requester included)."""
    incomplete: int
    """Leechers in the swarm (the requester included)."""
    full: bool = False
    """True when the swarm was full and the requester was not remembered."""


class Swarm:
    """Peers per infohash with expiry, caps and random peer selection."""

    def __init__(
        self,
        *,
        peer_expiry: float,
        max_torrents: int,
        max_peers_per_torrent: int,
        default_numwant: int,
        max_numwant: int,
        rng: random.Random | None = None,
    ) -> None:
        self.peer_expiry = peer_expiry
        self.max_torrents = max_torrents
        self.max_peers_per_torrent = max_peers_per_torrent
        self.default_numwant = min(default_numwant, max_numwant)
        self.max_numwant = max_numwant
        self._rng = rng or random.Random()
        self._torrents: dict[bytes, _Torrent] = {}
        # Last-seen time of every peer of every torrent, least recent first (key:
        # info_hash + peer_id), so that expiry costs only what it removes.
        self._by_age: OrderedDict[bytes, float] = OrderedDict()
        self._seeders = 0

    # --- counters ----------------------------------------------------------------------------

    @property
    def torrent_count(self) -> int:
        return len(self._torrents)

    @property
    def peer_count(self) -> int:
        return len(self._by_age)

    @property
    def seeder_count(self) -> int:
        return self._seeders

    def scrape(self, info_hash: bytes) -> ScrapeStats:
        """Counters of one infohash; zeros for one the tracker does not know."""
        torrent = self._torrents.get(info_hash)
        if torrent is None:
            return ScrapeStats()
        return ScrapeStats(
            complete=len(torrent.seeds),
            downloaded=torrent.downloaded,
            incomplete=len(torrent.leechers),
        )

    # --- announce ----------------------------------------------------------------------------

    def announce(self, request: AnnounceRequest, ip: str, now: float) -> AnnounceOutcome:
        """Record ``request`` from address ``ip`` at time ``now`` and pick peers for it.

        Raises :class:`SwarmFullError` for a new infohash beyond ``max_torrents``,
        :class:`PeerConflictError` when the peer id is registered from another address with
        a different (or no) key, and ``ValueError`` when ``ip`` is not an IP address.
        """
        info_hash = request.info_hash
        peer_id = request.peer_id
        torrent = self._torrents.get(info_hash)
        if request.event is Event.STOPPED:
            if torrent is None:
                return AnnounceOutcome([], 0, 0)
            old = torrent.peers.get(peer_id)
            if old is not None:
                _check_owner(old, ip, request.key)
                self._remove(info_hash, torrent, old)
            return AnnounceOutcome([], len(torrent.seeds), len(torrent.leechers))

        packed = pack_peer(ip, request.port)
        if torrent is None:
            if len(self._torrents) >= self.max_torrents:
                raise SwarmFullError(f"tracker is full ({self.max_torrents} torrents)")
            torrent = self._torrents[info_hash] = _Torrent()

        left = request.left
        full = False
        old = torrent.peers.get(peer_id)
        if old is None:
            if len(torrent.peers) >= self.max_peers_per_torrent:
                full = True
            else:
                group = torrent.leechers if left else torrent.seeds
                peer = (peer_id, ip, request.port, packed, left, request.key, len(group))
                group.append(peer)
                torrent.peers[peer_id] = peer
                self._by_age[info_hash + peer_id] = now
                if not left:
                    self._seeders += 1
                if request.event is Event.COMPLETED:
                    torrent.downloaded += 1
        else:
            _check_owner(old, ip, request.key)
            if request.event is Event.COMPLETED and old[LEFT]:
                torrent.downloaded += 1
            key = old[KEY] if request.key is None else request.key
            if bool(old[LEFT]) == bool(left):
                group = torrent.leechers if left else torrent.seeds
                peer = (peer_id, ip, request.port, packed, left, key, old[_SLOT])
                group[old[_SLOT]] = peer
            else:  # became a seed, or a leecher again
                if left:
                    self._unslot(torrent, torrent.seeds, old)
                    group = torrent.leechers
                    self._seeders -= 1
                else:
                    self._unslot(torrent, torrent.leechers, old)
                    group = torrent.seeds
                    self._seeders += 1
                peer = (peer_id, ip, request.port, packed, left, key, len(group))
                group.append(peer)
            torrent.peers[peer_id] = peer
            age_key = info_hash + peer_id
            self._by_age[age_key] = now
            self._by_age.move_to_end(age_key)

        numwant = self.default_numwant if request.numwant is None else request.numwant
        picked = self._pick(torrent, peer_id, seed=not left, want=min(numwant, self.max_numwant))
        return AnnounceOutcome(picked, len(torrent.seeds), len(torrent.leechers), full)

    def _pick(self, torrent: _Torrent, me: bytes, *, seed: bool, want: int) -> list[SwarmPeer]:
        if want <= 0:
            return []
        seeds, leechers = torrent.seeds, torrent.leechers
        nl = len(leechers)
        total = nl if seed else nl + len(seeds)
        if total == 0:
            return []
        if want >= total:  # everybody but the requester: no need to draw
            everyone = leechers if seed else leechers + seeds
            return [p for p in everyone if p[PEER_ID] != me]
        # Draw one extra in case the requester is among them, then drop it.
        chosen = self._rng.sample(range(total), want + 1)
        out: list[SwarmPeer] = []
        for index in chosen:
            peer = leechers[index] if index < nl else seeds[index - nl]
            if peer[PEER_ID] != me:
                out.append(peer)
                if len(out) == want:
                    break
        return out

    # --- bookkeeping -------------------------------------------------------------------------

    @staticmethod
    def _unslot(torrent: _Torrent, group: list[SwarmPeer], peer: SwarmPeer) -> None:
        """Remove ``peer`` from ``group`` in O(1) by moving the last entry into its slot."""
        last = group.pop()
        slot = peer[_SLOT]
        if slot != len(group):
            moved = (last[0], last[1], last[2], last[3], last[4], last[5], slot)
            group[slot] = moved
            torrent.peers[last[PEER_ID]] = moved

    def _remove(self, info_hash: bytes, torrent: _Torrent, peer: SwarmPeer) -> None:
        del torrent.peers[peer[PEER_ID]]
        self._by_age.pop(info_hash + peer[PEER_ID], None)
        if peer[LEFT]:
            self._unslot(torrent, torrent.leechers, peer)
        else:
            self._unslot(torrent, torrent.seeds, peer)
            self._seeders -= 1
        if not torrent.peers:
            del self._torrents[info_hash]

    def expire(self, now: float, *, limit: int | None = None) -> int:
        """Forget peers last seen more than ``peer_expiry`` seconds before ``now``.

        Returns how many were forgotten: all of them, or at most ``limit`` (the caller
        calls again while it gets ``limit`` back, so that a mass expiry does not stall the
        event loop). Costs only what it removes.
        """
        cutoff = now - self.peer_expiry
        removed = 0
        by_age = self._by_age
        while by_age and (limit is None or removed < limit):
            key, seen = next(iter(by_age.items()))
            if seen >= cutoff:
                break
            info_hash, peer_id = key[:20], key[20:]
            torrent = self._torrents[info_hash]
            self._remove(info_hash, torrent, torrent.peers[peer_id])
            removed += 1
        return removed


def _check_owner(peer: SwarmPeer, ip: str, key: bytes | None) -> None:
    if peer[IP] != ip and (peer[KEY] is None or peer[KEY] != key):
        raise PeerConflictError("peer_id is registered from another address")
