"""p2p-trackers inside the test process, behind an httpx mock transport, in trio's time.

Each tracker is the service's pure core (:class:`p2p_tracker.core.Tracker`) at
``http://10.0.9.N:6969/announce``; every node gets an httpx client whose requests reach the
tracker named by the URL's host with the node's own address as the TCP source. No sockets:
with trio's ``MockClock`` (``autojump_clock``) hours of announces pass in a moment. A
tracker can die (requests fail to connect), come back (the same table) or restart (an
empty table, a new instance), and can lack the batch endpoint (404, as opentracker).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import httpx
import trio

from p2p_common.batch_proto import BATCH_PATH, parse_batch_request
from p2p_common.engine.announce import Announcer
from p2p_tracker.core import Tracker
from p2p_tracker.settings import TrackerSettings


def tracker_url(index: int) -> str:
    return f"http://10.0.9.{index + 1}:6969/announce"


@dataclass
class Requests:
    """What reached the trackers."""

    singles: Counter[str] = field(default_factory=Counter)
    batches: Counter[str] = field(default_factory=Counter)
    batch_entries: Counter[str] = field(default_factory=Counter)
    log: list[tuple[float, str, str, int]] = field(default_factory=list)
    """(time, host, "single" or "batch", infohashes)."""


class InProcessTrackers:
    def __init__(self, count: int, **settings: object) -> None:
        settings.setdefault("listen", "127.0.0.1:0")
        self.settings = TrackerSettings.load(None, environ={}, **settings)
        self.urls = [tracker_url(i) for i in range(count)]
        self.hosts = [httpx.URL(u).host for u in self.urls]
        self._seed = 0
        self.cores = {host: self._new_core() for host in self.hosts}
        self.dead: set[str] = set()
        self.batchless: set[str] = set()
        self.batchless_status = 404
        """What a tracker without the endpoint answers (opentracker: 400)."""
        self.requests = Requests()

    def _new_core(self) -> Tracker:
        self._seed += 1
        return Tracker(self.settings, rng=random.Random(self._seed))

    def core(self, index: int) -> Tracker:
        return self.cores[self.hosts[index]]

    def kill(self, index: int) -> None:
        self.dead.add(self.hosts[index])

    def revive(self, index: int) -> None:
        self.dead.discard(self.hosts[index])

    def restart(self, index: int) -> None:
        """The tracker comes back empty, as a new instance."""
        host = self.hosts[index]
        self.dead.discard(host)
        self.cores[host] = self._new_core()

    def client(self, node_ip: str) -> httpx.AsyncClient:
        """An HTTP client whose requests come from ``node_ip``."""

        async def handle(request: httpx.Request) -> httpx.Response:
            host = request.url.host
            await trio.sleep(0.001)  # a round trip
            if host in self.dead or host not in self.cores:
                raise httpx.ConnectError("connection refused", request=request)
            body = request.content
            now = trio.current_time()
            if request.url.path == BATCH_PATH:
                if host in self.batchless:
                    return httpx.Response(self.batchless_status, content=b"<title>no</title>")
                self.requests.batches[host] += 1
                try:
                    entries = len(parse_batch_request(body).entries)
                except Exception:  # counted as an empty batch
                    entries = 0
                self.requests.batch_entries[host] += entries
                self.requests.log.append((now, host, "batch", entries))
            elif request.url.path == "/announce":
                self.requests.singles[host] += 1
                self.requests.log.append((now, host, "single", 1))
            reply = self.cores[host].handle(
                request.method, request.url.path, request.url.query, node_ip, now, body=body
            )
            return httpx.Response(reply.status, content=reply.body)

        return httpx.AsyncClient(transport=httpx.MockTransport(handle))

    def announcer(self, node: int, *, port: int = 6881) -> Announcer:
        """An announcer for node ``node`` (address 10.1.x.y, its own peer id)."""
        ip = f"10.1.{node // 250}.{node % 250 + 1}"
        peer_id = b"-PA0100-" + node.to_bytes(12, "big")
        announcer = Announcer(self.client(ip), peer_id=peer_id)
        announcer.port = port
        return announcer

    def seeds_at(self, index: int, info_hash: bytes) -> set[bytes]:
        """Peer ids listed as seeds of ``info_hash`` at tracker ``index``."""
        return {
            p[0]
            for p in self.core(index).swarm.peers_of(info_hash)
            if p[4] == 0  # LEFT
        }

    def peers_at(self, index: int, info_hash: bytes) -> set[bytes]:
        return {p[0] for p in self.core(index).swarm.peers_of(info_hash)}
