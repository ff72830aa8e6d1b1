"""Who we upload to: a pure choking policy (no I/O; ``now`` is passed in).

Two populations, one decision per round (the shell calls :meth:`Choker.decide`
about once a second):

* **Cluster peers** (p2p agents and proxies, recognised by their extension
  handshake): inside one cluster everyone cooperates, and the slowest node decides
  how long a rollout takes. Every interested cluster peer is unchoked, up to
  ``max_cooperative``; the upload rate limit shares bandwidth between them.
* **Foreign peers** (any other BitTorrent client): classic tit-for-tat. While
  downloading, the ``regular_slots`` peers that upload fastest to us are unchoked,
  re-ranked every ``rechoke_interval`` seconds, plus one optimistic unchoke rotated
  every ``optimistic_interval`` seconds. While seeding, slots rotate round-robin:
  a peer keeps its slot for ``seed_slot_time`` seconds, then the peer that has
  waited longest gets it.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class PeerStats:
    key: Hashable
    interested: bool
    cooperative: bool
    download_rate: float
    """Bytes per second this peer sends us (recent average)."""
    snubbed: bool = False
    """The peer has not sent us anything for a long time while we requested."""


class Choker:
    def __init__(
        self,
        *,
        max_cooperative: int = 64,
        regular_slots: int = 4,
        rechoke_interval: float = 10.0,
        optimistic_interval: float = 30.0,
        seed_slot_time: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.max_cooperative = max_cooperative
        self.regular_slots = regular_slots
        self.rechoke_interval = rechoke_interval
        self.optimistic_interval = optimistic_interval
        self.seed_slot_time = seed_slot_time
        self._rng = rng or random.Random()
        self._foreign_unchoked: set[Hashable] = set()
        self._optimistic: Hashable | None = None
        self._next_rechoke = float("-inf")
        self._next_optimistic = float("-inf")
        self._unchoked_since: dict[Hashable, float] = {}
        self._last_unchoked: dict[Hashable, float] = {}

    def forget(self, key: Hashable) -> None:
        """A peer disconnected."""
        self._foreign_unchoked.discard(key)
        self._unchoked_since.pop(key, None)
        self._last_unchoked.pop(key, None)
        if self._optimistic == key:
            self._optimistic = None

    def decide(self, peers: Iterable[PeerStats], *, seeding: bool, now: float) -> set[Hashable]:
        """The set of peers to keep (or make) unchoked; every other peer is choked."""
        cooperative: list[PeerStats] = []
        foreign: list[PeerStats] = []
        for peer in peers:
            if peer.interested:
                (cooperative if peer.cooperative else foreign).append(peer)
        unchoke = {p.key for p in cooperative[: self.max_cooperative]}
        unchoke |= self._foreign(foreign, seeding=seeding, now=now)
        for key in unchoke:
            self._unchoked_since.setdefault(key, now)
            self._last_unchoked[key] = now
        for key in list(self._unchoked_since):
            if key not in unchoke:
                del self._unchoked_since[key]
        return unchoke

    def _foreign(self, peers: list[PeerStats], *, seeding: bool, now: float) -> set[Hashable]:
        present = {p.key for p in peers}
        self._foreign_unchoked &= present
        if self._optimistic not in present:
            self._optimistic = None
            self._next_optimistic = float("-inf")
        if not peers:
            return set()
        if seeding:
            return self._seed_rotation(peers, now)
        if now >= self._next_rechoke:
            ranked = sorted(
                (p for p in peers if not p.snubbed), key=lambda p: p.download_rate, reverse=True
            )
            self._foreign_unchoked = {p.key for p in ranked[: self.regular_slots]}
            self._next_rechoke = now + self.rechoke_interval
        # An optimistic peer that earned a regular slot frees the optimistic one at once.
        if now >= self._next_optimistic or self._optimistic in self._foreign_unchoked:
            waiting = [p.key for p in peers if p.key not in self._foreign_unchoked]
            self._optimistic = self._rng.choice(waiting) if waiting else None
            self._next_optimistic = now + self.optimistic_interval
        result = set(self._foreign_unchoked)
        if self._optimistic is not None:
            result.add(self._optimistic)
        return result

    def _seed_rotation(self, peers: list[PeerStats], now: float) -> set[Hashable]:
        slots = self.regular_slots + 1
        keep = [
            p.key
            for p in peers
            if p.key in self._unchoked_since
            and now - self._unchoked_since[p.key] < self.seed_slot_time
        ]
        waiting = sorted(
            (p for p in peers if p.key not in keep),
            key=lambda p: self._last_unchoked.get(p.key, float("-inf")),
        )
        chosen = keep[:slots] + [p.key for p in waiting[: max(0, slots - len(keep))]]
        self._foreign_unchoked = set(chosen)
        return set(chosen)
