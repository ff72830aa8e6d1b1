"""A rollout in virtual time: origin, proxies, trackers, agents and pull clients.

What each party does, as the services do it (docs/architecture.md, "A pull"):

- **Pull client** (one per node, like ``tests/bench/rollout/client.py``): at its start instant
  it asks its agent for the manifest (through the proxy to the origin: two requests), then for
  the config and the layers in manifest order, ``concurrency`` at once. The config is below
  ``swarmMinSize`` (the proxy sends it over HTTP: one request, no swarm). A layer is done when
  its last piece is stored: the client streams it in order as pieces arrive.
- **Agent**: one download per blob. It asks the proxy ranked first for the digest (rendezvous)
  for the blob's chunks (an authorization check and the metainfo request); with the first
  chunk it joins the swarm (the proxy's seeding address as its first peer, then the tracker),
  starts a streaming reader at piece 0, and makes each later chunk's pieces wanted as the
  proxy publishes them. Without progress for ``fallbackAfter`` seconds it fetches the missing
  pieces from the proxy over HTTP, one after the other.
- **Proxy**: on the first request for a blob, fetches it from the origin once, as one HTTP
  flow over the origin's uplink and its own downlink, piece by piece; publishes each chunk of
  :data:`~p2p_common.blobinfo.CHUNK_PIECES` pieces as soon as its last piece arrived (the last
  chunk after the whole blob, where the SHA-256 check would be), to the agents following the
  fetch and to its own torrent, which seeds (super-seeding) from the first chunk on. Warm
  (``origin_rate`` 0): every blob is cached, seeded and announced before the clock starts.

Sizes are in MB (10^6 bytes), rates in Mbit/s (10^6 bit/s), like the rollout benchmark.
"""

from __future__ import annotations

import hashlib
import inspect
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from p2p_agent.settings import AgentSettings
from p2p_common import rendezvous
from p2p_common.bitfield import Bitfield
from p2p_common.blobinfo import Geometry
from p2p_common.engine.engine import Engine
from p2p_common.engine.shared import admits_incoming, dials_peers
from p2p_proxy.fetchline import FetchLine, in_line
from p2p_proxy.settings import ProxySettings
from tests.sim.loop import Loop
from tests.sim.network import Flow, Link, Network
from tests.sim.peers import Blob, Connection, Process, SimTorrent
from tests.sim.tracker import SimTracker

AGENT_PORT = 6881
PROXY_PORT = 6882
UNLIMITED = 1e15
"""Bytes per second of a link that is never the bottleneck (the origin's downlink)."""


def _default(settings: type[AgentSettings] | type[ProxySettings], name: str) -> Any:
    return settings.model_fields[name].default


MAX_PEERS_PER_TORRENT: int = inspect.signature(Engine).parameters["max_peers_per_torrent"].default


@dataclass
class Scenario:
    nodes: int = 8
    size_mb: float = 160.0
    layers: int = 4
    rate: float = 100.0
    """Every node's upload and download, Mbit/s."""
    proxy_rate: float | None = None
    """Each proxy's upload and download, Mbit/s (default: ``rate``)."""
    origin_rate: float | None = None
    """The origin's upload, Mbit/s (default: ``rate``); 0: the proxies hold the image already."""
    proxies: int = 1
    trackers: int = 1
    concurrency: int = 3
    """Blobs a pull client asks for at once (containerd: 3)."""
    latency_ms: float = 0.5
    """One-way propagation delay between any two hosts."""
    http_ms: float = 1.0
    """Time an HTTP request takes beyond its round trip (server work, connection set-up)."""
    goodput: float = 0.95
    """Fraction of a link's nominal rate that carries payload: a token bucket on the
    interface counts every Ethernet, IP and TCP header (1448 payload bytes in 1514 on the wire:
    0.956) and the ACKs of the other direction share the link. The emulated baseline (every
    node straight from the origin) measured 1.05x its ideal ``N * size / R``."""
    wave_size: int = 0
    """Nodes per arrival wave (0: every node starts at 0)."""
    wave_gap: float = 0.0
    """Seconds between waves."""
    seed: int = 1
    max_time: float = 3600.0
    """Virtual seconds after which the run stops, finished or not."""
    exact_interval: float = 1.0
    """Virtual seconds between exact global max-min solves (0: local re-solves only)."""
    kill_tracker_at: float | None = None
    """Virtual second at which tracker ``kill_tracker`` is lost (None: never)."""
    kill_tracker: int = 0
    tracker_loss: str = "refused"
    """How a lost tracker fails a request: ``refused`` (one round trip: the node is up, the
    tracker is not) or ``timeout`` (the announcer's timeout: the node is gone)."""
    origin_line: int = field(
        default_factory=lambda: _default(ProxySettings, "large_fetches_per_origin")
    )
    """Large blobs a proxy fetches from the origin at once, in the order asked (the proxy's
    ``largeFetchesPerOrigin``; 0: every fetch at once)."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.layers < 1 or self.proxies < 1 or self.trackers < 1:
            raise ValueError("nodes, layers, proxies and trackers must be at least 1")
        if self.kill_tracker_at is not None and not 0 <= self.kill_tracker < self.trackers:
            raise ValueError("kill_tracker must name one of the trackers")
        if self.tracker_loss not in ("refused", "timeout"):
            raise ValueError("tracker_loss is refused or timeout")
        if self.origin_line < 0:
            raise ValueError("origin_line must be 0 or more")
        if self.size_mb <= 0 or self.rate <= 0 or self.concurrency < 1:
            raise ValueError("size, rate and concurrency must be positive")
        if not 0 < self.goodput <= 1:
            raise ValueError("goodput must be in (0, 1]")
        if (self.proxy_rate is not None and self.proxy_rate <= 0) or (
            self.origin_rate is not None and self.origin_rate < 0
        ):
            raise ValueError("the proxy rate must be positive and the origin rate not negative")

    @property
    def warm(self) -> bool:
        return self.origin_rate == 0

    @property
    def image_bytes(self) -> int:
        return round(self.size_mb * 1e6)

    @property
    def ideal_s(self) -> float:
        """One node's image at the node rate: size / R."""
        return self.image_bytes * 8 / (self.rate * 1e6)


@dataclass
class Stats:
    control_bytes: int = 0
    """Control messages (not blocks) sent between peers."""
    closed: dict[str, int] = field(default_factory=dict)
    """Connections closed, by reason."""
    origin_bytes: int = 0
    fallbacks: int = 0
    fallback_bytes: int = 0
    connects: int = 0
    connect_failures: int = 0


class Simulation:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.loop = Loop()
        self.net = Network(self.loop, exact_interval=scenario.exact_interval)
        self.rng = random.Random(scenario.seed)
        self.latency = scenario.latency_ms / 1000
        self.request_time = 2 * self.latency + scenario.http_ms / 1000
        """One HTTP request and its answer between two hosts."""
        self.stats = Stats()

        def _bps(mbit: float) -> float:
            """Payload bytes per second of a link of ``mbit`` Mbit/s."""
            return mbit * 1e6 / 8 * scenario.goodput

        self.fallback_after = float(_default(AgentSettings, "fallback_after"))
        self.by_address: dict[tuple[str, int], Process] = {}
        self.timeline: list[tuple[float, int, int, int, int]] = []

        size = scenario.image_bytes
        sizes = [size // scenario.layers] * scenario.layers
        sizes[-1] += size - sum(sizes)
        self.blobs = []
        for i, length in enumerate(sizes):
            digest = "sha256:" + hashlib.sha256(b"sim layer %d" % i).hexdigest()
            geometry = Geometry.for_size(length)
            self.blobs.append(
                (Blob(digest, length, geometry.piece_length, geometry.num_pieces), geometry)
            )

        self.origin_up: Link | None = None
        if not scenario.warm:
            origin_rate = (
                scenario.origin_rate if scenario.origin_rate is not None else scenario.rate
            )
            self.origin_up = self.net.link(_bps(origin_rate), "origin.up")
        proxy_rate = _bps(scenario.proxy_rate if scenario.proxy_rate is not None else scenario.rate)
        self.proxies: list[ProxyService] = []
        for i in range(scenario.proxies):
            ip = f"10.0.0.{i + 2}"
            proc = Process(
                self,
                name=f"proxy{i}",
                ip=ip,
                port=PROXY_PORT,
                role="proxy",
                up=self.net.link(proxy_rate, f"proxy{i}.up"),
                down=self.net.link(proxy_rate, f"proxy{i}.down"),
                super_seed=_default(ProxySettings, "super_seed"),
                max_connections=_default(ProxySettings, "max_connections"),
                max_peers=MAX_PEERS_PER_TORRENT,
                index=1_000_000 + i,
            )
            self.by_address[proc.address] = proc
            self.proxies.append(ProxyService(self, proc, f"http://{ip}:5005"))
        self._proxy_urls = {p.url: p for p in self.proxies}
        self.tracker = SimTracker(self, scenario.trackers, random.Random(self.rng.getrandbits(64)))

        rate = _bps(scenario.rate)
        self.agents: list[AgentService] = []
        self.clients: list[Client] = []
        for i in range(scenario.nodes):
            ip = f"10.{1 + i // 65536}.{(i // 256) % 256}.{i % 256}"
            proc = Process(
                self,
                name=f"node{i}",
                ip=ip,
                port=AGENT_PORT,
                role="agent",
                up=self.net.link(rate, f"node{i}.up"),
                down=self.net.link(rate, f"node{i}.down"),
                super_seed=False,
                max_connections=_default(AgentSettings, "max_connections"),
                max_peers=MAX_PEERS_PER_TORRENT,
                index=i,
            )
            self.by_address[proc.address] = proc
            agent = AgentService(self, proc)
            self.agents.append(agent)
            start = 0.0
            if scenario.wave_size:
                start = (i // scenario.wave_size) * scenario.wave_gap
            self.clients.append(Client(self, agent, start))
        self.finished = 0

    # -- wiring ----------------------------------------------------------------------------------

    def proxy_for(self, blob: Blob) -> ProxyService:
        """The proxy ranked first for the digest (rendezvous, as the agents rank them)."""
        return self._proxy_urls[rendezvous.rank(blob.digest.encode(), self._proxy_urls)[0]]

    def connect(self, torrent: SimTorrent, address: tuple[str, int]) -> None:
        """Torrent._connect_one: a slot, TCP connect, handshakes both ways (1.5 round trips)."""
        self.stats.connects += 1
        if not torrent.proc.slots.reserve():
            self.loop.soon(self._failed, torrent, address)
            return
        self.loop.after(3 * self.latency, self._establish, torrent, address)

    def _failed(self, torrent: SimTorrent, address: tuple[str, int]) -> None:
        self.stats.connect_failures += 1
        torrent.attempt_ended(address, connected=False)

    def _establish(self, torrent: SimTorrent, address: tuple[str, int]) -> None:
        proc = torrent.proc
        target = self.by_address.get(address)
        remote = target.torrents.get(torrent.blob.swarm_id) if target is not None else None
        if target is None or remote is None or not target.slots.reserve(outgoing=False):
            # Nobody there, an unknown infohash (no handshake back) or no slot left.
            proc.slots.release()
            self._failed(torrent, address)
            return
        incoming = sum(1 for conn in remote.conns.values() if conn.dialer is not remote)
        dials = dials_peers(remote.core.complete, remote.core.super_seed)
        if not admits_incoming(incoming, len(remote.conns), target.max_peers, dials=dials):
            # The torrent dialled is full (max_peers, or half of it from peers dialling it
            # while it dials): no handshake back (engine.py).
            proc.slots.release()
            target.slots.release()
            self._failed(torrent, address)
            return
        if target.peer_id in torrent.conns or proc.peer_id in remote.conns:
            # Both handshakes went through, but one side has this peer already: it drops the
            # new connection (Torrent.run_connection).
            proc.slots.release()
            target.slots.release()
            torrent.attempt_ended(address, connected=True)
            return
        # A connection now, counted in conns: no longer a dial in progress (torrent.py).
        torrent.connecting.pop(address, None)
        Connection(self, torrent, remote, address)

    def node_finished(self) -> None:
        self.finished += 1
        self.maybe_stop()

    def maybe_stop(self) -> None:
        """Stop once every node has its image (and, after a tracker loss, every peer of its
        swarms is listed again elsewhere)."""
        if self.finished == len(self.clients) and self.tracker.failover_done():
            self.loop.stopped = True

    # -- running ---------------------------------------------------------------------------------

    def _sample(self) -> None:
        by_role = {"agent": 0, "proxy": 0}
        for agent in self.agents:
            for torrent in agent.proc.torrents.values():
                for role, count in torrent.core.downloaded_by_role.items():
                    by_role[role] = by_role.get(role, 0) + count
        self.timeline.append(
            (
                round(self.loop.now, 3),
                by_role.get("proxy", 0),
                by_role.get("agent", 0),
                self.stats.fallback_bytes,
                self.stats.origin_bytes,
            )
        )
        if not self.loop.stopped:
            self.loop.after(1.0, self._sample)

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        if self.scenario.warm:
            for proxy in self.proxies:
                proxy.preheat([blob for blob, _ in self.blobs if self.proxy_for(blob) is proxy])
        for client in self.clients:
            self.loop.at(client.start_at, client.start)
        if self.scenario.kill_tracker_at is not None:
            self.tracker.kill_pending = True
            self.loop.at(
                self.scenario.kill_tracker_at,
                self.tracker.kill,
                self.scenario.kill_tracker,
                self.scenario.tracker_loss == "timeout",
            )
        self.loop.soon(self._sample)
        self.loop.run(self.scenario.max_time)
        wall = time.perf_counter() - started
        self._sample()
        return self.results(wall)

    def results(self, wall: float) -> dict[str, Any]:
        scenario = self.scenario
        image = scenario.image_bytes
        done = [c.finished_at for c in self.clients]
        finished = [t for t in done if t is not None]
        by_source: dict[str, int] = {}
        nodes = []
        for agent, client in zip(self.agents, self.clients, strict=True):
            roles: dict[str, int] = {}
            uploaded = 0
            for torrent in agent.proc.torrents.values():
                for role, count in torrent.core.downloaded_by_role.items():
                    roles[role] = roles.get(role, 0) + count
                uploaded += torrent.core.uploaded
            roles["http_fallback"] = agent.fallback_bytes
            for role, count in roles.items():
                by_source[role] = by_source.get(role, 0) + count
            first = [
                t.first_piece_at
                for t in agent.proc.torrents.values()
                if t.first_piece_at is not None
            ]
            nodes.append(
                {
                    "node": agent.proc.name,
                    "start_s": client.start_at,
                    "completion_s": client.finished_at,
                    "first_byte_s": min(first) if first else None,
                    "downloaded": roles,
                    "uploaded": uploaded,
                    "connections": sum(len(t.conns) for t in agent.proc.torrents.values()),
                }
            )
        proxy_upload = [
            sum(t.core.uploaded for t in p.proc.torrents.values()) + p.fallback_served
            for p in self.proxies
        ]
        ideal = scenario.ideal_s
        p50 = statistics.median(finished) if finished else None
        slowest = max(finished) if len(finished) == len(done) and finished else None
        per_second = self.tracker.per_second
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "scenario": {**asdict(scenario), "warm": scenario.warm},
            "completion_s": done,
            "image_bytes": image,
            "origin_bytes": self.stats.origin_bytes,
            "ideal_s": ideal,
            "p50_s": p50,
            "max_s": slowest,
            "p50_ratio": p50 / ideal if p50 is not None else None,
            "max_ratio": slowest / ideal if slowest is not None else None,
            "unfinished": len(done) - len(finished),
            "first_byte_s": [n["first_byte_s"] for n in nodes],
            "download_bytes_by_source": by_source,
            "proxy_upload_bytes": proxy_upload,
            "proxy_upload_copies": sum(proxy_upload) / image,
            "uploaded_bytes": sum(n["uploaded"] for n in nodes) + sum(proxy_upload),  # type: ignore[misc]
            "control_bytes": self.stats.control_bytes,
            "tracker": {
                "announces": sum(self.tracker.requests.values()),
                "per_tracker": dict(self.tracker.requests),
                "peak_per_second": max(per_second.values()) if per_second else 0,
                "mean_per_second": (
                    sum(per_second.values()) / (max(per_second) + 1) if per_second else 0.0
                ),
                "batches": sum(self.tracker.batches.values()),
                "failover": self.tracker.failover(),
            },
            "connections": {
                "dialled": self.stats.connects,
                "failed": self.stats.connect_failures,
                "closed": dict(self.stats.closed),
            },
            "fallbacks": self.stats.fallbacks,
            "nodes": nodes,
            "timeline": {
                "columns": ["t", "from_proxy", "from_agent", "http_fallback", "origin"],
                "rows": self.timeline,
            },
            "sim": {
                "wall_s": wall,
                "virtual_s": self.loop.now,
                "events": self.loop.events,
                "local_resolves": self.net.resolves,
                "resolved_flows": self.net.resolved_flows,
                "peak_rss_mb": usage.ru_maxrss / 1024,
            },
        }


# -- services ------------------------------------------------------------------------------------


class _ProxyBlob:
    """A blob at one proxy: absent, being fetched (``pieces`` so far), or cached."""

    def __init__(self, blob: Blob, geometry: Geometry) -> None:
        self.blob = blob
        self.geometry = geometry
        self.fetching = False
        self.pieces = 0
        self.chunks = 0
        self.torrent: SimTorrent | None = None
        self.followers: list[Callable[[int], object]] = []


class ProxyService:
    def __init__(self, sim: Simulation, proc: Process, url: str) -> None:
        self.sim = sim
        self.proc = proc
        self.url = url
        self.blobs: dict[str, _ProxyBlob] = {}
        self.fallback_served = 0
        width = sim.scenario.origin_line
        self.line = FetchLine(width) if width else None
        """The proxy's own rule for the order of large origin fetches (p2p_proxy.fetchline)."""
        self.in_line: list[_ProxyBlob] = []
        self._line_check: float | None = None

    def _state(self, blob: Blob) -> _ProxyBlob:
        state = self.blobs.get(blob.digest)
        if state is None:
            geometry = next(g for b, g in self.sim.blobs if b is blob)
            state = self.blobs[blob.digest] = _ProxyBlob(blob, geometry)
        return state

    def has_piece(self, blob: Blob, index: int) -> bool:
        return index < self._state(blob).pieces

    def preheat(self, blobs: list[Blob]) -> None:
        """Warm: the blobs are cached, seeded and announced before the clock starts."""
        for blob in blobs:
            state = self._state(blob)
            state.pieces = blob.num_pieces
            state.chunks = state.geometry.num_chunks
            torrent = SimTorrent(self.proc, blob, have=Bitfield(blob.num_pieces, full=True))
            state.torrent = torrent
            torrent.start_announcing()

    def follow(self, blob: Blob, on_chunks: Callable[[int], object]) -> None:
        """GET /p2p/v1/metainfo arrived: answer with the chunks so far (the first one as soon
        as there is one), then each chunk as it is published. Starts the origin fetch."""
        state = self._state(blob)
        if state.chunks:
            self.sim.loop.after(self.sim.request_time / 2, on_chunks, state.chunks)
        if state.chunks < state.geometry.num_chunks:
            state.followers.append(on_chunks)
        if not state.fetching and not state.pieces:
            state.fetching = True
            blob = state.blob
            line = self.line
            if (
                line is not None
                and in_line(blob.length, line.width)
                and not line.ask(blob.digest, blob.length, self.sim.loop.now)
            ):
                self.in_line.append(state)
                self._check_line()
                return
            self._start(state)

    def _start(self, state: _ProxyBlob) -> None:
        # The origin's answer starts one request later (its headers, then the body).
        self.sim.loop.after(self.sim.request_time, self._fetch, state)

    def _check_line(self) -> None:
        """Start the fetches whose turn came (FetchLine.may_start), in order; look again at
        the line's next change."""
        line, now = self.line, self.sim.loop.now
        assert line is not None
        waiting = []
        for state in self.in_line:
            if line.may_start(state.blob.digest, now):
                self._start(state)
            else:
                waiting.append(state)
        self.in_line = waiting
        change = line.next_change(now)
        if change is not None and (self._line_check is None or change < self._line_check):
            self._line_check = change
            self.sim.loop.at(change, self._line_timer, change)

    def _line_timer(self, when: float) -> None:
        if self._line_check == when:
            self._line_check = None
            self._check_line()

    def _fetch(self, state: _ProxyBlob) -> None:
        origin = self.sim.origin_up
        assert origin is not None
        flow = self.sim.net.flow(
            origin, self.proc.down, lambda flow: self._piece_fetched(state, flow)
        )
        self.sim.net.send(flow, state.blob.piece_size(0))

    def _piece_fetched(self, state: _ProxyBlob, flow: Flow) -> None:
        """Ingest.on_piece: the piece is on disk and hashed; publish its chunk if complete."""
        blob, geometry, sim = state.blob, state.geometry, self.sim
        index = state.pieces
        state.pieces += 1
        sim.stats.origin_bytes += blob.piece_size(index)
        if state.pieces == geometry.pieces_through(state.chunks + 1):
            # A chunk is complete (the last one once the whole blob is verified: now too).
            state.chunks += 1
            known = geometry.pieces_through(state.chunks)
            if state.torrent is None:
                # Seeder._start_ingest: the torrent joins with the first chunk, ingesting.
                state.torrent = SimTorrent(
                    self.proc, blob, known=known, published=known, ingest=True
                )
                for piece in range(state.pieces):
                    state.torrent.piece_arrived(piece)
                state.torrent.chunks_added(known)
                state.torrent.start_announcing()
            else:
                state.torrent.chunks_added(known)
            for follower in state.followers:
                sim.loop.after(sim.latency, follower, state.chunks)
            if state.chunks == geometry.num_chunks:
                state.followers.clear()
        if state.torrent is not None:
            state.torrent.piece_arrived(index)
        line = self.line
        if line is not None and in_line(blob.length, line.width):
            received = min(blob.length, state.pieces * blob.piece_length)
            if state.pieces == blob.num_pieces:
                line.leave(blob.digest)
                self._check_line()
            elif line.progress(blob.digest, received, sim.loop.now):
                self._check_line()
        if state.pieces < blob.num_pieces:
            sim.net.send(flow, blob.piece_size(state.pieces))
        else:
            state.fetching = False


class _Download:
    """One blob's download at one agent (downloads.py's SwarmDownload and its task)."""

    def __init__(self, agent: AgentService, blob: Blob, geometry: Geometry) -> None:
        self.agent = agent
        self.sim = agent.sim
        self.blob = blob
        self.geometry = geometry
        self.proxy = self.sim.proxy_for(blob)
        self.torrent: SimTorrent | None = None
        self.waiters: list[Callable[[], object]] = []
        self.done = False
        self._fallback_flow: Flow | None = None
        self._fallback_index = 0

    def start(self) -> None:
        # HEAD (the proxy checks with the origin), then GET /p2p/v1/metainfo.
        sim = self.sim
        sim.loop.after(
            2 * sim.request_time + sim.request_time / 2, self.proxy.follow, self.blob, self._chunks
        )

    def _chunks(self, chunks: int) -> None:
        known = self.geometry.pieces_through(chunks)
        if self.torrent is None:
            torrent = SimTorrent(self.agent.proc, self.blob, known=known, published=known)
            self.torrent = torrent
            torrent.on_complete.append(self._complete)
            torrent.add_peers([self.proxy.proc.address])
            torrent.start_announcing()
            torrent.start_reader()
            self.sim.loop.after(self.sim.fallback_after / 2, self._check)
        else:
            self.torrent.chunks_added(known)

    def _complete(self, _torrent: SimTorrent) -> None:
        self.done = True
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter()

    # -- the HTTP fallback (Downloads._complete / _fallback) -------------------------------------

    def _check(self) -> None:
        torrent = self.torrent
        if torrent is None or self.done:
            return
        if self.sim.loop.now - torrent.core.last_progress >= self.sim.fallback_after:
            self.sim.stats.fallbacks += 1
            self._fallback_index = 0
            self._fallback_next()
            return
        self.sim.loop.after(self.sim.fallback_after / 2, self._check)

    def _fallback_next(self) -> None:
        torrent = self.torrent
        assert torrent is not None
        have = torrent.core.picker.have
        index = self._fallback_index
        while index < self.blob.num_pieces and index in have:
            index += 1
        self._fallback_index = index
        if index >= self.blob.num_pieces or not self.proxy.has_piece(self.blob, index):
            # Done, or the proxy does not have it yet (simplified: the fallback round ends).
            self.sim.loop.after(self.sim.fallback_after / 2, self._check)
            return
        self.sim.loop.after(self.sim.request_time, self._fallback_send, index)

    def _fallback_send(self, index: int) -> None:
        if self._fallback_flow is None:
            self._fallback_flow = self.sim.net.flow(
                self.proxy.proc.up, self.agent.proc.down, self._fallback_piece
            )
        self.sim.net.send(self._fallback_flow, self.blob.piece_size(index))

    def _fallback_piece(self, _flow: Flow) -> None:
        index = self._fallback_index
        size = self.blob.piece_size(index)
        self.proxy.fallback_served += size
        self.sim.stats.fallback_bytes += size
        self.agent.fallback_bytes += size
        assert self.torrent is not None
        self.torrent.add_piece(index)
        self._fallback_index = index + 1
        if not self.done:
            self._fallback_next()


class AgentService:
    def __init__(self, sim: Simulation, proc: Process) -> None:
        self.sim = sim
        self.proc = proc
        self.downloads: dict[str, _Download] = {}
        self.fallback_bytes = 0

    def get(self, blob: Blob, geometry: Geometry, on_done: Callable[[], object]) -> None:
        """A client asks for a blob: its bytes stream until the last piece is stored."""
        download = self.downloads.get(blob.digest)
        if download is not None and download.done:
            self.sim.loop.soon(on_done)
            return
        if download is None:
            download = self.downloads[blob.digest] = _Download(self, blob, geometry)
            download.start()
        download.waiters.append(on_done)


class Client:
    """A node's pull client: manifest, then config and layers, ``concurrency`` at once."""

    def __init__(self, sim: Simulation, agent: AgentService, start_at: float) -> None:
        self.sim = sim
        self.agent = agent
        self.start_at = start_at
        self.finished_at: float | None = None
        self._next = 0
        self._active = 0
        self._done = 0
        self._items = 1 + len(sim.blobs)  # the config, then the layers

    def start(self) -> None:
        # The manifest: agent -> proxy -> origin and back (two requests).
        self.sim.loop.after(2 * self.sim.request_time, self._fill)

    def _fill(self) -> None:
        while self._active < self.sim.scenario.concurrency and self._next < self._items:
            item = self._next
            self._next += 1
            self._active += 1
            if item == 0:  # the config: over HTTP from the proxy (which gets it from the origin)
                self.sim.loop.after(2 * self.sim.request_time, self._item_done)
            else:
                blob, geometry = self.sim.blobs[item - 1]
                self.agent.get(blob, geometry, self._item_done)

    def _item_done(self) -> None:
        self._active -= 1
        self._done += 1
        if self._done == self._items:
            self.finished_at = self.sim.loop.now
            self.sim.node_finished()
        else:
            self._fill()


def simulate(scenario: Scenario) -> dict[str, Any]:
    return Simulation(scenario).run()
