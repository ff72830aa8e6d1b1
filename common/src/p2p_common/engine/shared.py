"""What every torrent of one engine shares: identity, limits, the disk, the announcer, bans and
connection slots. The engine creates one and hands it to each torrent, so a torrent never
reaches back into the engine that owns it."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from p2p_common import wire
from p2p_common.engine.announce import Announcer
from p2p_common.engine.disk import DiskRunner
from p2p_common.engine.flusher import Flusher
from p2p_common.ratelimit import RateLimiter
from p2p_common.session import LocalPeer

BAN_SECONDS = 1800.0
"""How long a peer caught sending bad data is refused."""


class Bans:
    """Peers we refuse for a while (:data:`BAN_SECONDS`): by peer id and by endpoint. Never a
    whole address: a node's agent must not pay for a liar that shares its address, and one
    contributor's fault never reaches the others (see SwarmCore.piece_failed)."""

    def __init__(self, seconds: float = BAN_SECONDS) -> None:
        self.seconds = seconds
        self._ids: dict[bytes, float] = {}
        self._endpoints: dict[tuple[str, int], float] = {}

    def ban(self, peer_id: bytes, address: tuple[str, int] | None) -> None:
        until = trio.current_time() + self.seconds
        self._ids[peer_id] = until
        if address is not None:
            self._endpoints[address] = until

    def is_banned(self, peer_id: bytes | None, host: str, port: int | None = None) -> bool:
        now = trio.current_time()
        if peer_id is not None and self._ids.get(peer_id, -1.0) > now:
            return True
        return port is not None and self._endpoints.get((host, port), -1.0) > now

    def expire(self) -> None:
        now = trio.current_time()
        for table in (self._ids, self._endpoints):
            for key in [k for k, until in table.items() if until <= now]:
                del table[key]  # type: ignore[arg-type]


STRIKE_BURST = 5.0
"""Connections from one address that may be dropped for breaking the protocol in a row ..."""
STRIKE_RATE = 1 / 12
"""... and how fast that allowance comes back (one per 12 s)."""
MAX_STRIKE_ADDRESSES = 10_000


class Strikes:
    """Addresses whose peers keep breaking the protocol (floods of refused requests, bitfields,
    HAVEs, bad handshakes): each drop is a strike, and an address over its allowance gets its
    incoming connections closed unanswered until the allowance comes back. Each connection
    starts with a fresh per-connection budget (PeerSession), so without this a peer that
    reconnects after every drop would make the engine redo the work: 72% of a core with
    growing bitfields (tests/bench/bench_hostile.py). Only connections of peers that break the
    protocol count: a node whose processes behave is never held back. Pure but for the clock
    (``now`` is passed in)."""

    def __init__(
        self,
        burst: float = STRIKE_BURST,
        rate: float = STRIKE_RATE,
        max_addresses: int = MAX_STRIKE_ADDRESSES,
    ) -> None:
        self.burst = burst
        self.rate = rate
        self.max_addresses = max_addresses
        self._level: dict[str, tuple[float, float]] = {}
        """address -> (strike level, when it was last updated)."""

    def _current(self, host: str, now: float) -> float:
        level, when = self._level.get(host, (0.0, now))
        return max(0.0, level - (now - when) * self.rate)

    def strike(self, host: str, now: float) -> None:
        level = self._current(host, now)
        self._level.pop(host, None)  # re-inserted last: the dict stays in order of activity
        self._level[host] = (level + 1.0, now)
        while len(self._level) > self.max_addresses:
            del self._level[next(iter(self._level))]

    def refused(self, host: str, now: float) -> bool:
        return host in self._level and self._current(host, now) > self.burst

    def expire(self, now: float) -> None:
        for host in [h for h in self._level if self._current(h, now) <= 0.0]:
            del self._level[host]

    def __len__(self) -> int:
        return len(self._level)


class ConnectionSlots:
    """The process-wide bound on peer connections. A fifth of them (at least 4) is kept for
    the connections we dial, so peers dialling us cannot crowd out our own downloads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept_for_dialling = min(limit // 2, max(4, limit // 5))
        self.used = 0

    def reserve(self, *, outgoing: bool = True) -> bool:
        limit = self.limit if outgoing else self.limit - self.kept_for_dialling
        if self.used >= limit:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        self.used -= 1


def may_dial(outgoing: int, connections: int, max_peers: int) -> bool:
    """Whether a torrent with ``outgoing`` connections it dialled (or is dialling) and
    ``connections`` in all may dial one more.

    Half of ``max_peers`` is for the connections a torrent dials, the other half for peers that
    dial it. If every node of a swarm dialled up to ``max_peers``, the first nodes of a rollout
    would fill each other's connections and the later ones find every node with pieces full
    (the simulator showed half of 100 nodes waiting for the HTTP fallback). The swarm simulator
    asks the same."""
    return outgoing < max(1, max_peers // 2) and connections < max_peers


def admits_incoming(incoming: int, connections: int, max_peers: int, *, dials: bool = True) -> bool:
    """Whether a torrent with ``incoming`` connections that peers dialled, ``connections`` in
    all, takes one more that a peer dialled.

    ``max_peers`` bounds a torrent's connections in both directions: without it the first
    layer's swarm of a rollout takes every incoming slot of the process and the later layers
    find every neighbour full (docs/scale.md, finding 1). A torrent that ``dials`` (a
    download) takes at most the other half of ``max_peers`` from peers dialling it, as it dials
    at most half itself (:func:`may_dial`): otherwise the nodes that announce first are dialled
    by every later one and fill up with incoming connections, the later ones find them full
    and hold little more than the half they dialled, and the least connected node finishes
    last (finding 10). With the room kept, the first nodes dial the later ones once they learn
    of them (:func:`short_of_peers`). A seed dials nobody and takes up to ``max_peers``. The
    swarm simulator asks the same."""
    if connections >= max_peers:
        return False
    return not dials or incoming < max(1, max_peers - max_peers // 2)


def short_of_peers(outgoing: int, connections: int, max_peers: int, known: int) -> bool:
    """Whether a download with ``outgoing`` connections it dialled (or is dialling),
    ``connections`` in all and ``known`` candidate peers should announce again soon (a few
    times, early) instead of at the tracker's interval: it would dial more and knows fewer
    peers than ``max_peers``. The nodes that announce first in a rollout learn only the few
    that came before them; without this they never dial the later ones, which are then left
    with the half they dialled (finding 10). A node that has heard of ``max_peers`` peers
    already knows enough to dial (and the tracker is spared its announces)."""
    return known < max_peers and may_dial(outgoing, connections, max_peers)


YOUNG_CONNECTIONS = 8
"""A download with fewer connections than this (or ``max_peers``) is a young swarm."""
SHORT_OF_PEERS_DELAY = 8.0
"""A download short of peers it could dial announces again after 0.5, 1, 2, 4 and 8 s (then
at the tracker's interval): the rollout's later nodes have announced by then."""


def quick_announce(
    delay: float,
    *,
    complete: bool,
    outgoing: int,
    connections: int,
    connecting: int,
    max_peers: int,
    known: int,
) -> bool:
    """Whether a torrent with ``outgoing`` of its ``connections`` dialled, ``connecting``
    dials in progress and ``known`` candidates announces again after ``delay`` instead of the
    tracker's interval: it downloads and its swarm is young (fewer established connections
    than :data:`YOUNG_CONNECTIONS`), or, for the first few quick announces (``delay`` at most
    :data:`SHORT_OF_PEERS_DELAY`), it is :func:`short_of_peers`. The swarm simulator asks the
    same."""
    if complete:
        return False
    if connections < min(max_peers, YOUNG_CONNECTIONS):
        return True
    return delay <= SHORT_OF_PEERS_DELAY and short_of_peers(
        outgoing + connecting, connections + connecting, max_peers, known
    )


def dials_peers(complete: bool, super_seed: bool) -> bool:
    """Whether a torrent dials peers (a download), so that half of ``max_peers`` stays for
    its dials (:func:`admits_incoming`): not a seed, not a super-seeding proxy."""
    return not (complete or super_seed)


MAX_PENDING_HANDSHAKES = 64
"""Incoming connections waiting for their handshake, in all."""
MAX_PENDING_PER_ADDRESS = 8
"""... and from one address."""


class PendingHandshakes:
    """The small budget of incoming connections that have not handshaken yet."""

    def __init__(
        self, limit: int = MAX_PENDING_HANDSHAKES, per_address: int = MAX_PENDING_PER_ADDRESS
    ) -> None:
        self.limit = limit
        self.per_address = per_address
        self.total = 0
        self._by_address: dict[str, int] = {}

    def admit(self, host: str) -> bool:
        count = self._by_address.get(host, 0)
        if self.total >= self.limit or count >= self.per_address:
            return False
        self._by_address[host] = count + 1
        self.total += 1
        return True

    def leave(self, host: str) -> None:
        self.total -= 1
        count = self._by_address[host] - 1
        if count:
            self._by_address[host] = count
        else:
            del self._by_address[host]


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
    strikes: Strikes = field(default_factory=Strikes)
    flusher: Flusher = field(default_factory=Flusher)
    """Wakes writers that hold back HAVEs (Engine.serve runs it)."""
    self_addresses: set[tuple[str, int]] = field(default_factory=set)
    """Our own listening addresses as others see them (never dialled)."""

    @property
    def max_block(self) -> int:
        return self.local.max_block

    def handshake_for(self, info_hash: bytes) -> bytes:
        return wire.encode_handshake(info_hash, self.peer_id, self.reserved)
