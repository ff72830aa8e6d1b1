"""The swarm registry: which peers are in which torrent, pure and synchronous.

No clock and no I/O: every call that needs the time takes ``now`` (seconds, from a
monotonic clock the shell owns). Peers are keyed by peer id within an infohash; each
has an address, a port, ``left`` and the time it was last seen. ``event=stopped`` removes a
peer, a silent peer is forgotten ``peer_expiry`` seconds after its last announce
(:meth:`Swarm.expire`), and a torrent without peers is forgotten with its last peer.

Bounded, so that no client can exhaust the tracker:

- at most ``max_peers_per_torrent`` peers in one torrent and ``max_peers`` in all;
- at most ``max_peers_per_address`` peers from one address in one torrent and at most
  ``max_torrents_per_address`` torrents that one address is a peer of (addresses in the
  ``uncapped`` networks are exempt from these two; the service passes loopback);
- at most ``max_torrents`` infohashes.

A new peer beyond a cap on its torrent or its address still gets peers back but is not
remembered (:attr:`AnnounceOutcome.unlisted` says which cap); for a new infohash there is
no peer to give, so the answer is empty. When the torrent table or the global peer cap is
full, room is made by evicting a torrent whose peers all come from one address (the cheap
way to fill the table: one address announcing made-up infohashes), the least recently
announced first; only when no such torrent exists is a new infohash refused with
:class:`SwarmFullError` (a new peer of a known torrent then gets
:attr:`Unlisted.TRACKER_FULL`). The per-address counters are exact at every step: they
change only where a peer is added, removed (stopped, expired, evicted) or changes address.

Cost per announce: O(1) dictionary operations whatever the caps, plus the peers it returns;
finding an eviction victim is O(1) and evicting it removes at most
``max_peers_per_address`` peers (or a whole swarm of an uncapped address); expiry costs only
what it removes.

Peer selection: a leecher gets other leechers and seeds alike (inside a cluster leechers
trade pieces with each other from the first second, so the mesh should not form around the
seeds only), in proportion to their numbers; a seed gets only leechers, since another seed
has nothing for it. The requester itself is never returned. Each torrent keeps its seeds
and its leechers in uniformly random order (a peer joins at a random place, and every
re-announce swaps the peer with a random other: "inside-out" Fisher-Yates), and an answer
is a run of consecutive peers from a uniformly random place, wrapping around. Every peer
is handed out equally often, as with uniform random subsets, for two random draws instead
of one per peer (``random.sample`` cost 25 us of a 60 us UDP announce); what differs is that
two peers next to each other in the order go out together more often until either
re-announces. For the same reason each group also keeps the 6-byte compact form of its
members in one ``bytearray`` in the same order, so that an IPv4 answer
(:meth:`Swarm.announce_packed`) is a few slices and touches no peer tuple.

Memory layout: each peer is one plain tuple of atomic values (:data:`SwarmPeer`, read it
with the index constants :data:`PEER_ID`, :data:`IP`, :data:`PORT`, :data:`PACKED`,
:data:`LEFT`). CPython's cycle collector stops tracking such tuples, so a million peers add
about 10 ms to a full collection instead of about 300 ms with one object per peer: the
collector's pauses would otherwise dominate the announce latency of a large tracker (the
compact buffers are two more objects per torrent). The per-address counters are
``str -> int`` dictionaries (one per torrent, one for the whole tracker), which the
collector never tracks either; the eviction order is one ordered dictionary of infohashes.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from p2p_common.errors import LocalError, RemoteError
from p2p_common.tracker_proto import AnnounceRequest, Event, ScrapeStats, pack_peer

__all__ = [
    "IP",
    "KEY",
    "LEFT",
    "PACKED",
    "PEER_ID",
    "PORT",
    "SEEN",
    "AnnounceOutcome",
    "BatchOutcome",
    "Network",
    "PeerConflictError",
    "Swarm",
    "SwarmFullError",
    "SwarmPeer",
    "Unlisted",
]


class SwarmFullError(LocalError):
    """The tracker is full (``max_torrents`` or ``max_peers``) and nothing can be evicted."""


class PeerConflictError(RemoteError):
    """A peer id already registered from another address was announced without its key."""


class Unlisted(enum.Enum):
    """Why an announcing peer got peers back but was not remembered (value: metric label)."""

    SWARM_FULL = "swarm_full"
    """Its torrent already has ``max_peers_per_torrent`` peers."""
    ADDRESS_PEERS = "address_peers"
    """Its address already has ``max_peers_per_address`` peers in this torrent."""
    ADDRESS_TORRENTS = "address_torrents"
    """Its address is already a peer of ``max_torrents_per_address`` torrents."""
    TRACKER_FULL = "tracker_full"
    """The tracker holds ``max_peers`` peers and no torrent could be evicted."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SwarmPeer = tuple[bytes, str, int, bytes, int, bytes | None, float | None, int]
"""One peer of one torrent: (peer_id, ip, port, packed, left, key, seen, slot)."""

# Indices into SwarmPeer. PACKED is the compact form: 6 bytes (IPv4, BEP 23) or 18 bytes
# (IPv6, BEP 7); SEEN is None for a peer that announces alone (its time is kept in the expiry
# order) and, for a seed from batched announces, the time it was listed (the time of its
# last batch is in its torrent's ``seen`` array); _SLOT is the peer's index in its torrent's
# seed or leecher list.
PEER_ID: Final = 0
IP: Final = 1
PORT: Final = 2
PACKED: Final = 3
LEFT: Final = 4
KEY: Final = 5
SEEN: Final = 6
_SLOT: Final = 7

_EVICTION_TRIES: Final = 8
"""Torrents evicted at most to make room for one new torrent (an evicted torrent may hold
peers of the other kind than the one at its cap)."""

_UNCAPPED_CACHE: Final = 4096
"""Addresses whose ``uncapped`` answer is remembered (all forgotten when full)."""


_HOLE: Final = bytes(6)
"""What an IPv6 peer is in a group's 6-byte buffer (never handed out from it)."""

Window = tuple[list[SwarmPeer], int, int, int]
"""A choice of peers: (group, start, count, skip) -- ``count`` members of ``group`` from
``start`` on, wrapping around, leaving out the one in slot ``skip`` (-1: none) if it is
among them, else the last one (``count`` then includes one spare)."""


class _Torrent:
    __slots__ = (
        "addresses",
        "downloaded",
        "info_hash",
        "leechers",
        "leechers4",
        "peers",
        "seeds",
        "seeds4",
        "seen",
        "wide",
    )

    def __init__(self, info_hash: bytes) -> None:
        self.info_hash = info_hash
        """The key of this torrent in the table (the one object the expiry order refers to)."""
        self.peers: dict[bytes, SwarmPeer] = {}
        self.seeds: list[SwarmPeer] = []
        self.leechers: list[SwarmPeer] = []
        self.seeds4 = bytearray()
        self.leechers4 = bytearray()
        self.seen = array("d")
        """When each member of ``seeds`` was last announced in a batch, in the same order
        (0 for a seed announcing alone): a batch refreshes a seed by writing one number here,
        without a new tuple, so that the peers table is not handed back to the cycle
        collector's youngest generation on every refresh (a gen-0 pass would then walk every
        swarm a batch touched: 100+ ms with 10 million seeds)."""
        """The 6-byte compact form of each member of ``seeds``/``leechers``, in the same
        order (:data:`_HOLE` for an IPv6 peer): an answer to an IPv4 client is slices of it,
        without touching a peer tuple."""
        self.wide = 0
        """IPv6 peers in the torrent (when there are any, answers are built from the tuples)."""
        self.addresses: dict[str, int] = {}
        """Peers of this torrent per address (only addresses with at least one)."""
        self.downloaded = 0

    def buffer(self, group: list[SwarmPeer]) -> bytearray:
        return self.seeds4 if group is self.seeds else self.leechers4


@dataclass(frozen=True, slots=True)
class AnnounceOutcome:
    """What an announce gets back."""

    peers: list[SwarmPeer]
    complete: int
    """Seeders in the swarm (the requester included)."""
    incomplete: int
    """Leechers in the swarm (the requester included)."""
    unlisted: Unlisted | None = None
    """Set when the requester was not remembered, to the cap that stopped it."""
    evicted: int = 0
    """Torrents evicted to make room for this announce."""
    packed: bytes = b""
    """From :meth:`Swarm.announce_packed`: the chosen peers in compact form (``peers`` is
    then empty)."""

    @property
    def full(self) -> bool:
        """True when the requester got an answer but was not remembered."""
        return self.unlisted is not None


@dataclass(slots=True)
class BatchOutcome:
    """What a batch of seed announces gets back (:meth:`Swarm.announce_seeds`)."""

    peers4: dict[bytes, bytes] = field(default_factory=dict)
    """Compact IPv4 peers (6 bytes each) per infohash, only where there are some."""
    peers6: dict[bytes, bytes] = field(default_factory=dict)
    """Compact IPv6 peers (18 bytes each) per infohash, only where there are some."""
    failed: dict[bytes, tuple[str, str]] = field(default_factory=dict)
    """Entries refused, not recorded: infohash -> (reason label, message); the reasons are
    ``conflict`` (the peer id belongs to another address) and ``tracker_full``."""
    unlisted: dict[Unlisted, int] = field(default_factory=dict)
    """Entries answered but not remembered, per cap."""
    events: dict[Event, int] = field(default_factory=dict)
    """Entries recorded (or stopped), per event."""
    evicted: int = 0
    """Torrents evicted to make room."""


class Swarm:
    """Peers per infohash with expiry, caps, eviction and random peer selection."""

    def __init__(
        self,
        *,
        peer_expiry: float,
        max_torrents: int,
        max_peers_per_torrent: int,
        default_numwant: int,
        max_numwant: int,
        max_peers: int,
        max_torrents_per_address: int,
        max_peers_per_address: int,
        uncapped: Iterable[Network] = (),
        rng: random.Random | None = None,
        seed_expiry: float | None = None,
        max_batch_seeds: int | None = None,
    ) -> None:
        self.peer_expiry = peer_expiry
        self.seed_expiry = peer_expiry if seed_expiry is None else seed_expiry
        """Seconds a seed from a batched announce stays without announcing again."""
        self.max_torrents = max_torrents
        self.max_peers_per_torrent = max_peers_per_torrent
        self.max_peers = max_peers
        self.max_batch_seeds = max_peers if max_batch_seeds is None else max_batch_seeds
        self.max_torrents_per_address = max_torrents_per_address
        self.max_peers_per_address = max_peers_per_address
        self.uncapped = tuple(uncapped)
        self._uncapped_cache: dict[str, bool] = {}
        self.default_numwant = min(default_numwant, max_numwant)
        self.max_numwant = max_numwant
        self._rng = rng or random.Random()
        self._torrents: dict[bytes, _Torrent] = {}
        # Last-seen time of every peer that announces alone, least recent first (key:
        # info_hash + peer_id), so that expiry costs only what it removes.
        self._by_age: OrderedDict[bytes, float] = OrderedDict()
        # The batched seeds' expiry order: one record per batch (its time, the peer id and
        # the infohashes it listed), oldest first. A record's entries expire when it does,
        # unless a later announce refreshed them (their SEEN is later then): a few pointers
        # per seed instead of an ordered-dictionary entry each.
        self._batches: deque[tuple[float, bytes, list[bytes]]] = deque()
        self._batch_cursor = 0
        """Entries of the oldest record already looked at (expiry works in bounded steps)."""
        self._batch_peers = 0
        # Torrents a peer of, per address (only addresses with at least one).
        self._address_torrents: dict[str, int] = {}
        # The eviction candidates: torrents whose peers all share one address, least recently
        # announced first (a torrent enters at the back when it gets down to one address and
        # moves to the back whenever one of its peers announces).
        self._single: OrderedDict[bytes, None] = OrderedDict()
        self._seeders = 0
        self.evicted_torrents = 0
        """Torrents evicted so far to make room."""

    # --- counters ----------------------------------------------------------------------------

    @property
    def torrent_count(self) -> int:
        return len(self._torrents)

    @property
    def peer_count(self) -> int:
        return len(self._by_age) + self._batch_peers

    @property
    def batch_seed_count(self) -> int:
        """Peers listed by batched announces (the rest announce alone)."""
        return self._batch_peers

    @property
    def seeder_count(self) -> int:
        return self._seeders

    @property
    def address_count(self) -> int:
        """Addresses with at least one peer."""
        return len(self._address_torrents)

    @property
    def single_address_count(self) -> int:
        """Torrents whose peers all share one address (the eviction candidates)."""
        return len(self._single)

    def torrents_of(self, ip: str) -> int:
        """How many torrents address ``ip`` is a peer of."""
        return self._address_torrents.get(ip, 0)

    def peers_from(self, info_hash: bytes, ip: str) -> int:
        """How many peers of ``info_hash`` are at address ``ip``."""
        torrent = self._torrents.get(info_hash)
        return 0 if torrent is None else torrent.addresses.get(ip, 0)

    def peers_of(self, info_hash: bytes) -> list[SwarmPeer]:
        """Every peer of ``info_hash`` (a copy; for tests and tools, O(peers))."""
        torrent = self._torrents.get(info_hash)
        return [] if torrent is None else list(torrent.peers.values())

    def seen_of(self, info_hash: bytes, peer_id: bytes) -> float | None:
        """When a batched seed was last announced (None: not a batched seed; for tests)."""
        torrent = self._torrents.get(info_hash)
        peer = None if torrent is None else torrent.peers.get(peer_id)
        if torrent is None or peer is None or peer[SEEN] is None:
            return None
        return torrent.seen[peer[_SLOT]]

    def eviction_order(self) -> list[bytes]:
        """The single-address torrents, next victim first (a copy; for tests and tools)."""
        return list(self._single)

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

        Raises :class:`SwarmFullError` for a new infohash when the tracker is full and no
        torrent can be evicted, :class:`PeerConflictError` when the peer id is registered
        from another address with a different (or no) key, and ``ValueError`` when ``ip`` is
        not an IP address.
        """
        recorded = self._record_request(request, ip, now)
        if isinstance(recorded, AnnounceOutcome):
            return recorded
        torrent, unlisted, evicted, windows = recorded
        return AnnounceOutcome(
            _materialize(windows), len(torrent.seeds), len(torrent.leechers), unlisted, evicted
        )

    def announce_packed(
        self, request: AnnounceRequest, ip: str, now: float, *, ipv6: bool = False
    ) -> AnnounceOutcome:
        """:meth:`announce` for a compact answer: the chosen peers of one family only (IPv4,
        6 bytes each, or IPv6, 18 bytes each) in :attr:`AnnounceOutcome.packed`.

        The same choice as :meth:`announce` (peers of the other family count against
        ``numwant`` and are left out); in a torrent without IPv6 peers an IPv4 answer is
        copied from the group buffers, which costs a few slices instead of a look at every
        chosen peer.
        """
        recorded = self._record_request(request, ip, now)
        if isinstance(recorded, AnnounceOutcome):
            return recorded
        torrent, unlisted, evicted, windows = recorded
        if not torrent.wide and not ipv6:
            packed = b"".join([_window_bytes(torrent.buffer(w[0]), *w) for w in windows])
        else:
            size = 18 if ipv6 else 6
            packed = b"".join([p[PACKED] for p in _materialize(windows) if len(p[PACKED]) == size])
        return AnnounceOutcome(
            [], len(torrent.seeds), len(torrent.leechers), unlisted, evicted, packed
        )

    def announce_seeds(
        self,
        peer_id: bytes,
        port: int,
        entries: Iterable[tuple[bytes, Event]],
        ip: str,
        now: float,
        *,
        key: bytes | None = None,
        numwant: int = 0,
    ) -> BatchOutcome:
        """Record a batched announce: ``peer_id`` at ``ip``:``port`` seeds every infohash of
        ``entries`` (each with its event; ``STOPPED`` removes it).

        Every entry goes through the same rules as an announce of its own: the per-address
        and per-torrent caps, the global caps (``max_batch_seeds``) with eviction, the
        ``key`` ownership rule. An entry the tracker refuses (``tracker is full``, a peer id
        registered from another address) is reported in :attr:`BatchOutcome.failed` and
        costs only itself. The recorded seeds expire ``seed_expiry`` seconds after their
        last announce (:meth:`expire`). A seed gets leechers only, at most ``numwant`` per
        infohash (capped at ``max_numwant``), for infohashes that have some.

        Raises ``ValueError`` when ``ip`` is not an IP address (before recording anything).
        """
        packed = pack_peer(ip, port)
        want = min(numwant, self.max_numwant)
        out = BatchOutcome()
        listed: list[bytes] = []
        seen = float(now)  # one object for every entry of the batch
        events, unlisted_counts = out.events, out.unlisted
        torrents, single = self._torrents, self._single
        for info_hash, event in entries:
            recorded: AnnounceOutcome | tuple[_Torrent, Unlisted | None, int, list[Window]]
            torrent = torrents.get(info_hash)
            old = None if torrent is None else torrent.peers.get(peer_id)
            if (
                old is not None
                and old[SEEN] is not None
                and (event is Event.NONE or event is Event.STARTED)
                and old[IP] == ip
                and old[PORT] == port
                and (key is None or key == old[KEY])
            ):
                # The usual case, a seed announced again from where it was: a new time,
                # nothing else changes (no reshuffle: the order is random since the seed
                # joined, and leechers announcing keep shuffling it).
                assert torrent is not None
                torrent.seen[old[_SLOT]] = seen
                if len(torrent.addresses) == 1:
                    single.move_to_end(info_hash)
                events[event] = events.get(event, 0) + 1
                listed.append(torrent.info_hash)
                if not want or not torrent.leechers:
                    continue
                recorded = (torrent, None, 0, self._pick(torrent, peer_id, seed=True, want=want))
            else:
                try:
                    recorded = self._record(
                        info_hash,
                        peer_id,
                        port,
                        0,
                        event,
                        key=key,
                        ip=ip,
                        packed=packed,
                        now=now,
                        seen=seen,
                        numwant=want,
                    )
                except PeerConflictError as exc:
                    out.failed[info_hash] = ("conflict", str(exc))
                    continue
                except SwarmFullError as exc:
                    out.failed[info_hash] = ("tracker_full", str(exc))
                    continue
                events[event] = events.get(event, 0) + 1
                if isinstance(recorded, AnnounceOutcome):  # stopped, or not taken in
                    if recorded.unlisted is not None:
                        unlisted_counts[recorded.unlisted] = (
                            unlisted_counts.get(recorded.unlisted, 0) + 1
                        )
                    continue
                if recorded[1] is None:
                    listed.append(recorded[0].info_hash)
            torrent, unlisted, evicted, windows = recorded
            out.evicted += evicted
            if unlisted is not None:
                unlisted_counts[unlisted] = unlisted_counts.get(unlisted, 0) + 1
            if not any(w[2] for w in windows):
                continue
            if not torrent.wide:
                four = b"".join([_window_bytes(torrent.buffer(w[0]), *w) for w in windows])
                six = b""
            else:
                chosen = _materialize(windows)
                four = b"".join([p[PACKED] for p in chosen if len(p[PACKED]) == 6])
                six = b"".join([p[PACKED] for p in chosen if len(p[PACKED]) == 18])
            if four:
                out.peers4[info_hash] = four
            if six:
                out.peers6[info_hash] = six
        if listed:
            self._batches.append((seen, peer_id, listed))
        return out

    def _record_request(
        self, request: AnnounceRequest, ip: str, now: float
    ) -> AnnounceOutcome | tuple[_Torrent, Unlisted | None, int, list[Window]]:
        return self._record(
            request.info_hash,
            request.peer_id,
            request.port,
            request.left,
            request.event,
            key=request.key,
            ip=ip,
            packed=None,
            now=now,
            seen=None,
            numwant=request.numwant,
        )

    def _record(
        self,
        info_hash: bytes,
        peer_id: bytes,
        port: int,
        left: int,
        event: Event,
        *,
        key: bytes | None,
        ip: str,
        packed: bytes | None,
        now: float,
        seen: float | None,
        numwant: int | None,
    ) -> AnnounceOutcome | tuple[_Torrent, Unlisted | None, int, list[Window]]:
        """Record an announce; an early answer, or what to choose the peers from.

        ``seen`` is None for an announce of its own (the peer joins the expiry order) and
        the batch's time for a batched seed; ``packed`` the compact address if known.
        """
        torrent = self._torrents.get(info_hash)
        if event is Event.STOPPED:
            if torrent is None:
                return AnnounceOutcome([], 0, 0)
            old = torrent.peers.get(peer_id)
            if old is not None:
                _check_owner(old, ip, key)
                self._remove(info_hash, torrent, old)
            return AnnounceOutcome([], len(torrent.seeds), len(torrent.leechers))

        old = None if torrent is None else torrent.peers.get(peer_id)
        if old is not None and old[IP] == ip and old[PORT] == port:
            packed = old[PACKED]  # the usual re-announce: nothing to pack
        elif packed is None:
            packed = pack_peer(ip, port)
        evicted_before = self.evicted_torrents
        unlisted: Unlisted | None = None
        fields = (peer_id, ip, port, packed, left, key, seen)
        if torrent is None:
            at_cap = self._address_torrents.get(ip, 0) >= self.max_torrents_per_address
            if at_cap and not self._is_uncapped(ip):
                return AnnounceOutcome([], 0, 0, Unlisted.ADDRESS_TORRENTS)
            tries = 0
            while len(self._torrents) >= self.max_torrents or self._full(seen):
                if tries >= _EVICTION_TRIES or not self._evict(None):
                    what = (
                        f"{self.max_torrents} torrents"
                        if len(self._torrents) >= self.max_torrents
                        else f"{self.max_peers} peers"
                        if seen is None
                        else f"{self.max_batch_seeds} batched seeds"
                    )
                    raise SwarmFullError(f"tracker is full ({what})")
                tries += 1
            torrent = self._torrents[info_hash] = _Torrent(info_hash)
            self._add(torrent, fields, event, now)
        elif old is None:
            unlisted = self._address_cap(torrent, ip)
            if unlisted is None and len(torrent.peers) >= self.max_peers_per_torrent:
                unlisted = Unlisted.SWARM_FULL
            if unlisted is None and self._full(seen):
                self._evict(info_hash)
                if self._full(seen):
                    unlisted = Unlisted.TRACKER_FULL
            if unlisted is None:
                self._add(torrent, fields, event, now)
        else:
            _check_owner(old, ip, key)
            if old[IP] != ip:  # moved, with its key
                unlisted = self._address_cap(torrent, ip)
                if unlisted is not None:  # its old entry is stale: forget it
                    self._remove(info_hash, torrent, old)
                    if not torrent.peers:
                        return AnnounceOutcome([], 0, 0, unlisted)
                else:
                    self._join(info_hash, torrent, ip)
                    self._leave(info_hash, torrent, old[IP])
            if unlisted is None:
                if seen is not None and old[SEEN] is None and self._full(seen):
                    # from announcing alone to batches, at the batched seeds' cap: it stays
                    # a peer announcing alone (the cap holds, and it is not dropped)
                    self._evict(info_hash)
                    if self._full(seen):
                        fields = (*fields[:SEEN], None)
                        unlisted = Unlisted.TRACKER_FULL
                self._refresh(torrent, fields, event, old, now)

        if numwant is None:
            numwant = self.default_numwant
        windows = self._pick(torrent, peer_id, seed=not left, want=min(numwant, self.max_numwant))
        return torrent, unlisted, self.evicted_torrents - evicted_before, windows

    def _full(self, seen: float | None) -> bool:
        """Whether the global cap of this kind of peer (alone or batched) is reached."""
        if seen is None:
            return len(self._by_age) >= self.max_peers
        return self._batch_peers >= self.max_batch_seeds

    def _address_cap(self, torrent: _Torrent, ip: str) -> Unlisted | None:
        """The per-address cap a new peer at ``ip`` in ``torrent`` would exceed, if any."""
        here = torrent.addresses.get(ip, 0)
        if here >= self.max_peers_per_address:
            reason = Unlisted.ADDRESS_PEERS
        elif not here and self._address_torrents.get(ip, 0) >= self.max_torrents_per_address:
            reason = Unlisted.ADDRESS_TORRENTS
        else:
            return None
        return None if self._is_uncapped(ip) else reason

    def _is_uncapped(self, ip: str) -> bool:
        """Whether ``ip`` is in an ``uncapped`` network (checked only when a cap bites; the
        answers for the last few thousand addresses are remembered, since parsing an
        address costs more than the rest of an announce)."""
        if not self.uncapped:
            return False
        known = self._uncapped_cache.get(ip)
        if known is not None:
            return known
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        answer = any(address in network for network in self.uncapped)
        if len(self._uncapped_cache) >= _UNCAPPED_CACHE:
            self._uncapped_cache.clear()
        self._uncapped_cache[ip] = answer
        return answer

    def _pick(self, torrent: _Torrent, me: bytes, *, seed: bool, want: int) -> list[Window]:
        """Choose up to ``want`` peers for ``me``: leechers only for a seed, both for a
        leecher (see :func:`_materialize`).

        Each group is kept in uniformly random order (see :meth:`_insert`), so a window of
        consecutive members at a uniformly random place (wrapping around) is a random
        choice in which every member has the same chance. A leecher gets seeds and
        leechers in proportion to their numbers (the count of seeds rounded up or down at
        random), as a uniform subset would hold them on average. The requester is never in
        its own answer.
        """
        if want <= 0:
            return []
        leechers = torrent.leechers
        mine = torrent.peers.get(me)
        slot = mine[_SLOT] if mine is not None and mine[LEFT] else -1  # among the leechers
        others = len(leechers) - (slot >= 0)
        if seed:
            return [self._window(leechers, min(want, others), slot)]
        seeds = torrent.seeds
        total = others + len(seeds)
        if want >= total:  # everybody but the requester: no need to draw
            return [(leechers, 0, len(leechers), slot), (seeds, 0, len(seeds), -1)]
        from_seeds = int(want * len(seeds) / total + self._rng.random())
        from_seeds = max(want - others, min(from_seeds, len(seeds)))
        return [
            self._window(leechers, want - from_seeds, slot),
            self._window(seeds, from_seeds, -1),
        ]

    def _window(self, group: list[SwarmPeer], count: int, skip: int) -> Window:
        """``count`` members of ``group`` from a random place, without slot ``skip``."""
        if count <= 0:
            return (group, 0, 0, -1)
        if skip >= 0:
            count += 1  # one spare, in case the skipped one is among them
        total = len(group)
        return (group, 0 if count >= total else int(self._rng.random() * total), count, skip)

    # --- bookkeeping -------------------------------------------------------------------------

    def _add(self, torrent: _Torrent, fields: tuple[Any, ...], event: Event, now: float) -> None:
        """Add a peer: ``fields`` is its tuple without the slot."""
        info_hash, peer_id, left = torrent.info_hash, fields[PEER_ID], fields[LEFT]
        group = torrent.leechers if left else torrent.seeds
        self._insert(torrent, group, fields)
        if fields[SEEN] is None:
            self._by_age[info_hash + peer_id] = now
        else:
            self._batch_peers += 1
        if not left:
            self._seeders += 1
        if event is Event.COMPLETED:
            torrent.downloaded += 1
        self._join(info_hash, torrent, fields[IP])
        if len(torrent.addresses) == 1:
            self._single.move_to_end(info_hash)

    def _refresh(
        self,
        torrent: _Torrent,
        fields: tuple[Any, ...],
        event: Event,
        old: SwarmPeer,
        now: float,
    ) -> None:
        """Refresh a known peer with the fields of its new announce (alone or batched:
        a peer may move between the two expiry orders)."""
        info_hash, peer_id, left = torrent.info_hash, fields[PEER_ID], fields[LEFT]
        if event is Event.COMPLETED and old[LEFT]:
            torrent.downloaded += 1
        if fields[KEY] is None and old[KEY] is not None:
            fields = (*fields[:KEY], old[KEY], fields[SEEN])
        if bool(old[LEFT]) == bool(left):
            self._reinsert(torrent, torrent.leechers if left else torrent.seeds, fields, old)
        else:  # became a seed, or a leecher again
            if left:
                self._unslot(torrent, torrent.seeds, old)
                group = torrent.leechers
                self._seeders -= 1
            else:
                self._unslot(torrent, torrent.leechers, old)
                group = torrent.seeds
                self._seeders += 1
            self._insert(torrent, group, fields)
        age_key = info_hash + peer_id
        if fields[SEEN] is None:
            if old[SEEN] is not None:
                self._batch_peers -= 1
            self._by_age[age_key] = now
            self._by_age.move_to_end(age_key)
        elif old[SEEN] is None:
            del self._by_age[age_key]
            self._batch_peers += 1
        if len(torrent.addresses) == 1:
            self._single.move_to_end(info_hash)

    def _insert(self, torrent: _Torrent, group: list[SwarmPeer], fields: tuple[Any, ...]) -> None:
        """Add a peer (its fields without the slot) at a uniformly random place of ``group``
        (the peer that was there moves to the end): "inside-out" Fisher-Yates, so the group
        stays in uniformly random order."""
        n = len(group)
        buffer = torrent.buffer(group)
        compact = fields[PACKED]
        if len(compact) != 6:
            torrent.wide += 1
            compact = _HOLE
        j = int(self._rng.random() * (n + 1))
        seen = torrent.seen if group is torrent.seeds else None
        when = fields[SEEN] or 0.0
        if j >= n:
            peer: SwarmPeer = (*fields, n)
            group.append(peer)
            buffer += compact
            if seen is not None:
                seen.append(when)
        else:
            other = group[j]
            moved: SwarmPeer = (*other[:_SLOT], n)
            group.append(moved)
            torrent.peers[other[PEER_ID]] = moved
            peer = (*fields, j)
            group[j] = peer
            at = 6 * j
            buffer += buffer[at : at + 6]
            buffer[at : at + 6] = compact
            if seen is not None:
                seen.append(seen[j])
                seen[j] = when
        torrent.peers[fields[PEER_ID]] = peer

    def _reinsert(
        self, torrent: _Torrent, group: list[SwarmPeer], fields: tuple[Any, ...], old: SwarmPeer
    ) -> None:
        """Refresh a peer of ``group`` and swap it with a uniformly random member: the order
        stays uniformly random and keeps changing in a swarm nobody joins or leaves."""
        slot = old[_SLOT]
        buffer = torrent.buffer(group)
        compact = fields[PACKED]
        if len(compact) != 6:
            compact = _HOLE
            torrent.wide += 1
        if len(old[PACKED]) != 6:
            torrent.wide -= 1
        j = int(self._rng.random() * len(group))
        at = 6 * slot
        seen = torrent.seen if group is torrent.seeds else None
        when = fields[SEEN] or 0.0
        if j == slot or j >= len(group):
            peer: SwarmPeer = (*fields, slot)
            group[slot] = peer
            buffer[at : at + 6] = compact
            if seen is not None:
                seen[slot] = when
        else:
            other = group[j]
            moved: SwarmPeer = (*other[:_SLOT], slot)
            group[slot] = moved
            torrent.peers[other[PEER_ID]] = moved
            peer = (*fields, j)
            group[j] = peer
            there = 6 * j
            buffer[at : at + 6] = buffer[there : there + 6]
            buffer[there : there + 6] = compact
            if seen is not None:
                seen[slot] = seen[j]
                seen[j] = when
        torrent.peers[fields[PEER_ID]] = peer

    def _join(self, info_hash: bytes, torrent: _Torrent, ip: str) -> None:
        """Count one more peer of ``torrent`` at ``ip``."""
        addresses = torrent.addresses
        here = addresses.get(ip, 0)
        addresses[ip] = here + 1
        if not here:
            self._address_torrents[ip] = self._address_torrents.get(ip, 0) + 1
            if len(addresses) == 1:
                self._single[info_hash] = None
            elif len(addresses) == 2:
                del self._single[info_hash]

    def _leave(self, info_hash: bytes, torrent: _Torrent, ip: str) -> None:
        """Count one peer fewer of ``torrent`` at ``ip``."""
        addresses = torrent.addresses
        here = addresses[ip] - 1
        if here:
            addresses[ip] = here
            return
        del addresses[ip]
        count = self._address_torrents[ip] - 1
        if count:
            self._address_torrents[ip] = count
        else:
            del self._address_torrents[ip]
        if len(addresses) == 1:
            self._single[info_hash] = None
        elif not addresses:
            del self._single[info_hash]

    def _evict(self, keep: bytes | None) -> bool:
        """Forget the least recently announced single-address torrent other than ``keep``.

        False when there is none. Looks at two candidates at most: O(1) plus the peers it
        removes.
        """
        victim = None
        for info_hash in self._single:
            if info_hash != keep:
                victim = info_hash
                break
        if victim is None:
            return False
        torrent = self._torrents.pop(victim)
        del self._single[victim]
        for peer_id, peer in torrent.peers.items():
            if peer[SEEN] is None:
                del self._by_age[victim + peer_id]
            else:
                self._batch_peers -= 1
        self._seeders -= len(torrent.seeds)
        for ip in torrent.addresses:  # just one
            count = self._address_torrents[ip] - 1
            if count:
                self._address_torrents[ip] = count
            else:
                del self._address_torrents[ip]
        self.evicted_torrents += 1
        return True

    @staticmethod
    def _unslot(torrent: _Torrent, group: list[SwarmPeer], peer: SwarmPeer) -> None:
        """Remove ``peer`` from ``group`` in O(1) by moving the last entry into its slot."""
        buffer = torrent.buffer(group)
        last = group.pop()
        slot = peer[_SLOT]
        seen = torrent.seen if group is torrent.seeds else None
        last_seen = seen.pop() if seen is not None else 0.0
        if slot != len(group):
            moved = (last[0], last[1], last[2], last[3], last[4], last[5], last[6], slot)
            group[slot] = moved
            torrent.peers[last[PEER_ID]] = moved
            buffer[6 * slot : 6 * slot + 6] = buffer[-6:]
            if seen is not None:
                seen[slot] = last_seen
        del buffer[-6:]
        if len(peer[PACKED]) != 6:
            torrent.wide -= 1

    def _remove(self, info_hash: bytes, torrent: _Torrent, peer: SwarmPeer) -> None:
        del torrent.peers[peer[PEER_ID]]
        if peer[SEEN] is None:
            self._by_age.pop(info_hash + peer[PEER_ID], None)
        else:
            self._batch_peers -= 1
        if peer[LEFT]:
            self._unslot(torrent, torrent.leechers, peer)
        else:
            self._unslot(torrent, torrent.seeds, peer)
            self._seeders -= 1
        self._leave(info_hash, torrent, peer[IP])
        if not torrent.peers:
            del self._torrents[info_hash]

    def expire(self, now: float, *, limit: int | None = None) -> int:
        """Forget peers that announced alone more than ``peer_expiry`` seconds before
        ``now``, and batched seeds not announced for ``seed_expiry`` seconds.

        Returns how many were forgotten. ``limit`` bounds the work of one call (peers
        removed plus batched entries looked at), so that a mass expiry does not stall the
        event loop: the caller calls again while :meth:`expiry_due` says so. Costs what it
        removes, plus one look per entry of each expired batch (an entry announced again
        since is in a later batch and stays).
        """
        removed = work = 0
        cutoff = now - self.peer_expiry
        by_age = self._by_age
        torrents = self._torrents
        while by_age and (limit is None or work < limit):
            key, seen = next(iter(by_age.items()))
            if seen >= cutoff:
                break
            info_hash, peer_id = key[:20], key[20:]
            torrent = torrents[info_hash]
            self._remove(info_hash, torrent, torrent.peers[peer_id])
            removed += 1
            work += 1
        cutoff = now - self.seed_expiry
        batches = self._batches
        while batches and (limit is None or work < limit):
            seen, peer_id, hashes = batches[0]
            if seen >= cutoff:
                break
            start = self._batch_cursor
            end = len(hashes) if limit is None else min(len(hashes), start + limit - work)
            for info_hash in hashes[start:end]:
                holder = torrents.get(info_hash)
                if holder is None:
                    continue
                peer = holder.peers.get(peer_id)
                if peer is not None and peer[SEEN] is not None and holder.seen[peer[_SLOT]] <= seen:
                    self._remove(info_hash, holder, peer)
                    removed += 1
            work += end - start
            if end >= len(hashes):
                batches.popleft()
                self._batch_cursor = 0
            else:
                self._batch_cursor = end
        return removed

    def expiry_due(self, now: float) -> bool:
        """Whether :meth:`expire` has work at ``now``."""
        by_age, batches = self._by_age, self._batches
        if by_age and next(iter(by_age.values())) < now - self.peer_expiry:
            return True
        return bool(batches) and batches[0][0] < now - self.seed_expiry


def _materialize(windows: list[Window]) -> list[SwarmPeer]:
    """The peers a list of windows chose."""
    out: list[SwarmPeer] = []
    for group, start, count, skip in windows:
        if not count:
            continue
        total = len(group)
        end = start + count
        if count >= total:
            window = group[:]
        elif end <= total:
            window = group[start:end]
        else:
            window = group[start:] + group[: end - total]
        if skip >= 0:
            offset = (skip - start) % total
            if offset < len(window):
                del window[offset]
            else:
                window.pop()
        out += window
    return out


def _window_bytes(
    buffer: bytearray, group: list[SwarmPeer], start: int, count: int, skip: int
) -> bytes:
    """What :func:`_materialize` gives for one window, from the group's 6-byte buffer."""
    if not count:
        return b""
    total = len(group)
    end = start + count
    if count >= total:
        window = buffer[:]
    elif end <= total:
        window = buffer[6 * start : 6 * end]
    else:
        window = buffer[6 * start :] + buffer[: 6 * (end - total)]
    if skip >= 0:
        offset = (skip - start) % total
        if 6 * offset < len(window):
            del window[6 * offset : 6 * offset + 6]
        else:
            del window[-6:]
    return bytes(window)


def _check_owner(peer: SwarmPeer, ip: str, key: bytes | None) -> None:
    if peer[IP] != ip and (peer[KEY] is None or peer[KEY] != key):
        raise PeerConflictError("peer_id is registered from another address")
