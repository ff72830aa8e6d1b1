"""Trackers in virtual time: the tracker's own pure core behind a request delay.

Every announce is a real :class:`~p2p_common.tracker_proto.AnnounceRequest` answered by
:class:`p2p_tracker.swarm.Swarm` with the service's default settings (caps, ``numwant``,
the ``interval`` it hands out); the agents' and proxies' announcer asks for
:data:`~p2p_common.engine.announce.NUMWANT` peers. Several trackers are ranked per swarm by
rendezvous hashing, as the engine's announcer does. What is not modelled: the HTTP server's
own cost, tracker failures and failover, and expiry (runs are shorter than ``peerExpiry``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from p2p_common import rendezvous
from p2p_common.tracker_proto import AnnounceRequest
from p2p_common.tracker_proto import Event as AnnounceEvent
from p2p_tracker.settings import TrackerSettings
from p2p_tracker.swarm import IP, PORT, PeerConflictError, Swarm, SwarmFullError

if TYPE_CHECKING:
    from tests.sim.peers import SimTorrent
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
            )
            for url in self.urls
        }
        self._ranked: dict[bytes, str] = {}
        self.requests: Counter[str] = Counter()
        """Announces answered, per tracker."""
        self.per_second: Counter[int] = Counter()
        """Announces answered in each virtual second (all trackers)."""

    def tracker_for(self, swarm_id: bytes) -> str:
        url = self._ranked.get(swarm_id)
        if url is None:
            url = self._ranked[swarm_id] = rendezvous.rank(swarm_id, self.urls)[0]
        return url

    def announce(
        self,
        torrent: SimTorrent,
        event: AnnounceEvent,
        numwant: int,
        callback: Callable[[Response], object],
    ) -> None:
        """One HTTP announce: it reaches the tracker half a request later, the answer comes
        back after the other half."""
        self.sim.loop.after(
            self.sim.request_time / 2, self._receive, torrent, event, numwant, callback
        )

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
        self.requests[url] += 1
        self.per_second[int(now)] += 1
        response: Response
        try:
            outcome = self.swarms[url].announce(request, proc.ip, now)
        except (SwarmFullError, PeerConflictError):
            response = None
        else:
            response = (self.interval, [(peer[IP], peer[PORT]) for peer in outcome.peers])
        sim.loop.after(sim.request_time / 2, callback, response)
