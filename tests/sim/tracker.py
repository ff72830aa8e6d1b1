"""Trackers in virtual time: the tracker's own pure core behind a request delay.

Every announce is a real :class:`~p2p_common.tracker_proto.AnnounceRequest` answered by
:class:`p2p_tracker.swarm.Swarm` with the service's default settings (caps, ``numwant``,
the ``interval`` it hands out); the agents' and proxies' announcer asks for
:data:`~p2p_common.engine.announce.NUMWANT` peers. Several trackers are ranked per swarm by
rendezvous hashing, as the engine's announcer does.

Seeds are announced the way the engine's announcer does it (:class:`SeedBatches`, after
``p2p_common.engine.announce``): in one batch per process and tracker
(:meth:`Swarm.announce_seeds`), new ones after ``BATCH_DELAY``, all of them every
``seedAnnounceInterval``, an empty batch every heartbeat (``announceInterval``); a tracker
that does not answer moves its seeds to the next one ranked for each.

A tracker can be lost (``--kill-tracker-at``): from then on a request to it fails after one
round trip (a refused connection) or after the announcer's timeout (``--tracker-loss
timeout``: the node is gone), and each announcer goes on to the next tracker ranked for the
swarm, as the engine does; a failed request also tells that process's batches (as
``Announcer._reached`` does). Reported per swarm that was on it: how long until every peer
it listed is listed at the swarm's new tracker.

What is not modelled: the HTTP server's own cost, a lost tracker coming back, trackers
without the batch endpoint, and expiry (runs are shorter than ``peerExpiry``).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from p2p_common.engine.announce import (
    ANNOUNCE_TIMEOUT,
    BATCH_DELAY,
    BATCH_SIZE,
    HEARTBEAT_SHARE,
    rank_trackers,
)
from p2p_common.tracker_proto import AnnounceRequest
from p2p_common.tracker_proto import Event as AnnounceEvent
from p2p_tracker.settings import TrackerSettings
from p2p_tracker.swarm import IP, PORT, PeerConflictError, Swarm, SwarmFullError

if TYPE_CHECKING:
    from tests.sim.peers import Process, SimTorrent
    from tests.sim.scenario import Simulation

Response = tuple[float, list[tuple[str, int]]] | None
"""(interval, peers), or None when the tracker refused."""


def _default(name: str) -> int:
    value = TrackerSettings.model_fields[name].default
    assert isinstance(value, int)
    return value


class SimTracker:
    def __init__(self, sim: Simulation, count: int, rng: random.Random) -> None:
        self.sim = sim
        self.interval = float(_default("announce_interval"))
        self.seed_interval = float(_default("seed_announce_interval"))
        self.urls = [f"http://10.0.1.{i + 1}:6969/announce" for i in range(count)]
        self.swarms = {
            url: Swarm(
                peer_expiry=_default("peer_expiry"),
                max_torrents=_default("max_torrents"),
                max_peers_per_torrent=_default("max_peers_per_torrent"),
                default_numwant=_default("default_numwant"),
                max_numwant=_default("max_numwant"),
                max_peers=_default("max_peers"),
                max_torrents_per_address=_default("max_torrents_per_address"),
                max_peers_per_address=_default("max_peers_per_address"),
                rng=random.Random(rng.getrandbits(64)),
                seed_expiry=_default("seed_expiry"),
                max_batch_seeds=_default("max_batch_seeds"),
            )
            for url in self.urls
        }
        self._ranked: dict[bytes, list[str]] = {}
        self.requests: Counter[str] = Counter()
        """Announces answered, per tracker (a batch counts once)."""
        self.batches: Counter[str] = Counter()
        """Batched announces answered, per tracker."""
        self.per_second: Counter[int] = Counter()
        """Announces answered in each virtual second (all trackers)."""
        self.dead: set[str] = set()
        self.fail_delay = sim.request_time
        """What a request to a lost tracker costs before the next one is tried."""
        self.killed: tuple[float, str] | None = None
        self.kill_pending = False
        """A loss is scheduled and has not happened yet (the run waits for it)."""
        self.relisted: dict[bytes, dict[bytes, float | None]] = {}
        """Swarms that were on the lost tracker: their peers then, and when each was listed
        at the swarm's new tracker."""

    def ranked(self, swarm_id: bytes) -> list[str]:
        urls = self._ranked.get(swarm_id)
        if urls is None:
            urls = self._ranked[swarm_id] = rank_trackers(swarm_id, self.urls)
        return urls

    def tracker_for(self, swarm_id: bytes) -> str:
        """The tracker a swarm is on: the first ranked that is not lost."""
        return next((u for u in self.ranked(swarm_id) if u not in self.dead), self.urls[0])

    # -- losing a tracker ------------------------------------------------------------------------

    def kill(self, index: int, timeout: bool = False) -> None:
        """Tracker ``index`` is lost now: requests to it fail (refused, or after the
        announcer's timeout)."""
        url = self.urls[index]
        self.kill_pending = False
        self.dead.add(url)
        self.killed = (self.sim.loop.now, url)
        if timeout:
            self.fail_delay = ANNOUNCE_TIMEOUT
        for swarm_id, torrent in self.swarms[url]._torrents.items():
            self.relisted[swarm_id] = dict.fromkeys(torrent.peers)
        if self.failover_done():
            self.sim.maybe_stop()

    def _listed(self, url: str, swarm_id: bytes, peer_id: bytes) -> None:
        peers = self.relisted.get(swarm_id)
        if peers is not None and url not in self.dead and peers.get(peer_id, 0) is None:
            peers[peer_id] = self.sim.loop.now
            if self.failover_done():
                self.sim.maybe_stop()

    def failover_done(self) -> bool:
        if self.kill_pending:
            return False
        return all(t is not None for peers in self.relisted.values() for t in peers.values())

    def failover(self) -> dict[str, Any] | None:
        if self.killed is None:
            return None
        at, url = self.killed
        per_swarm = {
            swarm_id.hex(): (
                None
                if any(t is None for t in peers.values())
                else round(max(peers.values(), default=at) - at, 3)  # type: ignore[type-var]
            )
            for swarm_id, peers in self.relisted.items()
        }
        known = [v for v in per_swarm.values() if v is not None]
        return {
            "tracker": self.urls.index(url),
            "at_s": round(at, 3),
            "swarms": len(per_swarm),
            "relisted_s": per_swarm,
            "max_s": max(known) if len(known) == len(per_swarm) and known else None,
            "heartbeat_s": self.interval,
        }

    def announce(
        self,
        torrent: SimTorrent,
        event: AnnounceEvent,
        numwant: int,
        callback: Callable[[Response], object],
    ) -> None:
        """One HTTP announce: it reaches the tracker half a request later, the answer comes
        back after the other half. Lost trackers ranked before the first live one cost
        ``fail_delay`` each (and tell the process's batches)."""
        delay = 0.0
        for url in self.ranked(torrent.blob.swarm_id):
            if url not in self.dead:
                break
            delay += self.fail_delay
            self.sim.loop.after(delay, torrent.proc.seeds.tracker_failed, url)
        else:
            self.sim.loop.after(delay, callback, None)
            return
        self.sim.loop.after(
            delay + self.sim.request_time / 2, self._receive, torrent, event, numwant, callback
        )

    def batch(
        self,
        proc: Process,
        url: str,
        entries: list[tuple[SimTorrent, AnnounceEvent]],
        callback: Callable[[bool], object],
    ) -> None:
        """One batched announce of ``proc``'s seeds to tracker ``url`` (True: answered)."""
        if url in self.dead:
            self.sim.loop.after(self.fail_delay, callback, False)
            return
        self.sim.loop.after(
            self.sim.request_time / 2, self._receive_batch, proc, url, entries, callback
        )

    def _receive_batch(
        self,
        proc: Process,
        url: str,
        entries: list[tuple[SimTorrent, AnnounceEvent]],
        callback: Callable[[bool], object],
    ) -> None:
        now = self.sim.loop.now
        self.requests[url] += 1
        self.batches[url] += 1
        self.per_second[int(now)] += 1
        outcome = self.swarms[url].announce_seeds(
            proc.peer_id,
            proc.port,
            [(t.blob.swarm_id, e) for t, e in entries],
            proc.ip,
            now,
        )
        for torrent, event in entries:
            swarm_id = torrent.blob.swarm_id
            if event is not AnnounceEvent.STOPPED and swarm_id not in outcome.failed:
                self._listed(url, swarm_id, proc.peer_id)
        self.sim.loop.after(self.sim.request_time / 2, callback, True)

    def _receive(
        self,
        torrent: SimTorrent,
        event: AnnounceEvent,
        numwant: int,
        callback: Callable[[Response], object],
    ) -> None:
        sim = self.sim
        now = sim.loop.now
        core, proc = torrent.core, torrent.proc
        request = AnnounceRequest(
            info_hash=torrent.blob.swarm_id,
            peer_id=proc.peer_id,
            port=proc.port,
            uploaded=core.uploaded,
            downloaded=core.downloaded,
            left=core.left,
            event=event,
            numwant=0 if event is AnnounceEvent.STOPPED else numwant,
            compact=True,
        )
        url = self.tracker_for(request.info_hash)
        if url in self.dead:  # lost while the request was on its way
            self.sim.loop.after(self.fail_delay, callback, None)
            return
        self.requests[url] += 1
        self.per_second[int(now)] += 1
        response: Response
        try:
            outcome = self.swarms[url].announce(request, proc.ip, now)
        except (SwarmFullError, PeerConflictError):
            response = None
        else:
            response = (self.interval, [(peer[IP], peer[PORT]) for peer in outcome.peers])
            if event is not AnnounceEvent.STOPPED and outcome.unlisted is None:
                self._listed(url, request.info_hash, proc.peer_id)
        sim.loop.after(sim.request_time / 2, callback, response)


@dataclass(eq=False)
class _Instance:
    url: str
    seeds: dict[bytes, None] = field(default_factory=dict)
    pending: dict[bytes, None] = field(default_factory=dict)
    down: bool = False
    busy: bool = False
    next_round: float = math.inf
    last_request: float = -math.inf
    timer: int = 0
    """Version of the one timer that may be set (older ones do nothing)."""


class SeedBatches:
    """One process's seeds, announced in batches: ``Announcer.add_seed`` and its task
    (``p2p_common.engine.announce``), in virtual time, with the engine's constants."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc
        self.sim = proc.sim
        self.seeds: dict[bytes, tuple[SimTorrent, AnnounceEvent | None, str | None]] = {}
        self.instances: dict[str, _Instance] = {}

    def add(self, torrent: SimTorrent, event: AnnounceEvent) -> None:
        """A torrent that has everything hands itself over."""
        self.seeds[torrent.blob.swarm_id] = (torrent, event, None)
        self._place(torrent.blob.swarm_id)

    def tracker_failed(self, url: str) -> None:
        """A request of this process to ``url`` got no answer: its seeds there move on."""
        instance = self.instances.get(url)
        if instance is None or instance.down:
            return
        instance.down = True
        moved = list(instance.seeds)
        instance.seeds.clear()
        instance.pending.clear()
        for swarm_id in moved:
            torrent, event, _ = self.seeds[swarm_id]
            self.seeds[swarm_id] = (torrent, event or AnnounceEvent.STARTED, None)
            self._place(swarm_id, at_once=True)

    def _place(self, swarm_id: bytes, *, at_once: bool = False) -> None:
        torrent, event, _ = self.seeds[swarm_id]
        tracker = self.sim.tracker
        ranked = tracker.ranked(swarm_id)
        url = next((u for u in ranked if not self._instance(u).down), ranked[0])
        instance = self._instance(url)
        self.seeds[swarm_id] = (torrent, event, url)
        instance.seeds[swarm_id] = None
        if not instance.busy and (at_once or not instance.pending):
            self._arm(instance, self.sim.loop.now + (0.0 if at_once else BATCH_DELAY))
        instance.pending[swarm_id] = None

    def _instance(self, url: str) -> _Instance:
        instance = self.instances.get(url)
        if instance is None:
            instance = self.instances[url] = _Instance(url)
        return instance

    def _arm(self, instance: _Instance, at: float) -> None:
        instance.timer += 1
        self.sim.loop.after(max(0.0, at - self.sim.loop.now), self._due, instance, instance.timer)

    def _rearm(self, instance: _Instance) -> None:
        """Set the timer for the next request due (a round, new seeds, a heartbeat)."""
        if instance.down or not instance.seeds:
            return
        heartbeat = instance.last_request + HEARTBEAT_SHARE * self.sim.tracker.interval
        at = min(instance.next_round, heartbeat)
        if instance.pending:
            at = min(at, self.sim.loop.now + BATCH_DELAY)
        self._arm(instance, at)

    def _due(self, instance: _Instance, version: int) -> None:
        if version != instance.timer or instance.busy or instance.down:
            return
        now = self.sim.loop.now
        if now >= instance.next_round:
            hashes = list(instance.seeds)
            instance.next_round = now + self._jittered()
        else:
            hashes = list(instance.pending)
            if instance.next_round == math.inf:
                instance.next_round = now + self._jittered()
        instance.pending.clear()
        entries = []
        for swarm_id in hashes:
            torrent, event, at = self.seeds[swarm_id]
            self.seeds[swarm_id] = (torrent, None, at)
            entries.append((torrent, event or AnnounceEvent.NONE))
        instance.last_request = now
        instance.busy = True
        self._send(instance, entries, 0)

    def _send(
        self, instance: _Instance, entries: list[tuple[SimTorrent, AnnounceEvent]], start: int
    ) -> None:
        chunk = entries[start : start + BATCH_SIZE]

        def answered(ok: bool) -> None:
            if not ok:
                instance.busy = False
                for torrent, event in entries[start:]:  # their events go where they move
                    swarm_id = torrent.blob.swarm_id
                    held = self.seeds.get(swarm_id)
                    if held is not None and held[1] is None and event is not AnnounceEvent.NONE:
                        self.seeds[swarm_id] = (held[0], event, held[2])
                self.tracker_failed(instance.url)
                return
            if start + BATCH_SIZE < len(entries):
                self._send(instance, entries, start + BATCH_SIZE)
                return
            instance.busy = False
            self._rearm(instance)

        self.sim.tracker.batch(self.proc, instance.url, chunk, answered)

    def _jittered(self) -> float:
        return self.sim.tracker.seed_interval * (1.0 - 0.1 * self.sim.rng.random())
