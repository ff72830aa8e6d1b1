"""The control plane at 5,000 nodes: one p2p-tracker, batched seeds, a rollout on top.

Run from the repository root (a few minutes and about 2.5 GB of tracker memory with the
defaults)::

    python -m tests.bench.bench_tracker_scale
    python -m tests.bench.bench_tracker_scale --nodes 1000 --blobs 500 --window 20   # quick

What it simulates, speaking the real protocols over HTTP to a real p2p-tracker process at
its default settings (``uncappedAddresses: []``, so that the per-address caps apply to the
loopback addresses as they do to node addresses in a cluster):

- ``--nodes`` nodes, each on its own source address (127.1.x.y), each seeding ``--blobs``
  cached blobs: the ``--common`` most popular blobs of the catalogue (base layers: every
  node has them) and a share of the ``--catalog`` others. Each node announces its seeds the
  way the engine's announcer does (``p2p_common.engine.announce``): batches of
  ``BATCH_SIZE`` infohashes to ``POST /p2p/v1/announce-batch``, all of them again every
  ``seedAnnounceInterval`` (1800 s), an empty batch every heartbeat (``announceInterval``,
  300 s). Every request opens its own connection (the tracker closes idle keep-alive
  connections after 10 s, and a node's batches are minutes apart).
- ``load``: every node announces all its seeds (``started``), as after a tracker restart;
  reported: time, tracker CPU, memory per seed.
- ``steady``: ``--window`` seconds of the steady state at the real rates (open loop: a
  node's round or heartbeat is sent at its time whatever the answers): the tracker's CPU from
  /proc is the goal check (< 0.5 core).
- ``rollout``: ``--rollout-nodes`` nodes pulling a new image of ``--layers`` layers,
  starting over ``--rollout-spread`` seconds, three layers at a time, 4-12 s per layer, once
  alone and once on top of the steady load: per layer ``started`` (and, for the first 50
  nodes, whose swarms are still young, re-announces 0.5 and 1.5 s later), each a single
  BEP 3 announce (``numwant=80``, a keep-alive connection per node, as the engine's httpx
  client), and ``completed`` in the node's next batch (``BATCH_DELAY`` after the first layer
  done, with the layers done meanwhile). The p99 latency of those single announces on top of
  the steady load is the goal check (< 20 ms).
- ``baseline``: today's design, every node announcing every cached blob alone every
  ``announceInterval``: ``--baseline-peers`` x ``--baseline-blobs`` single re-announces
  of seeds, closed loop with 16 in flight, into the same loaded tracker; the CPU per
  announce times ``nodes x blobs / 300 s`` is what that design would need.
- ``expiry``: batched seeds are expired lazily (each batch's entries are looked at once when
  it expires, after ``seedExpiry``, 90 minutes, beyond any window here): the cost per entry
  is measured on the pure core in this process and added to the steady CPU.

Latency is measured from the request's first byte (the connect included when it opens a
connection) to the last byte of the answer. The generator's lag behind its schedule is
reported: when it grows, the generator, not the tracker, is the limit.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import random
import selectors
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote_from_bytes

from p2p_common import udp_tracker_proto as udp_proto
from p2p_common.batch_proto import BATCH_PATH, BatchRequest, encode_batch_request
from p2p_common.engine.announce import BATCH_DELAY, BATCH_SIZE, NUMWANT
from p2p_common.service_main import raise_open_files_limit
from p2p_common.tracker_proto import AnnounceRequest, Event, TrackerProtocolError
from p2p_tracker.settings import TrackerSettings
from p2p_tracker.swarm import Swarm
from tests.realparts.procs import ManagedProcess, free_port, require
from tests.realparts.procstats import MiB, proc_stats
from tests.services import service_env

KEEPALIVE = 5.0
"""Seconds a rollout node reuses its connection (httpx's default ``keepalive_expiry``, which
the engine's tracker client keeps; the tracker closes idle ones after 10 s)."""
IDLE_LIMIT = 30.0
"""Seconds without any answer after which a phase fails."""


def _default(name: str) -> int:
    value = TrackerSettings.model_fields[name].default
    assert isinstance(value, int)
    return value


SEED_INTERVAL = _default("seed_announce_interval")
HEARTBEAT = _default("announce_interval")
SEED_EXPIRY = _default("seed_expiry")


# --- the simulated cluster ----------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    nodes: int
    blobs: int
    catalog: int
    common: int

    def __post_init__(self) -> None:
        if not 0 < self.common <= self.blobs <= self.catalog:
            raise SystemExit("need 0 < --common <= --blobs <= --catalog")
        if self.nodes > 60000:
            raise SystemExit("at most 60,000 --nodes (source addresses 127.1.0.1 ...)")

    def address(self, node: int) -> str:
        return f"127.{1 + node // 62500}.{node // 250 % 250}.{node % 250 + 1}"

    def peer_id(self, node: int) -> bytes:
        return b"-PA0100-" + node.to_bytes(12, "big")

    def port(self, node: int) -> int:
        return 6881

    def blob(self, index: int) -> bytes:
        return hashlib.sha1(b"bench-scale-blob-%d" % index).digest()

    def seeds_of(self, node: int, hashes: list[bytes]) -> list[bytes]:
        """Node ``node``'s cached blobs: the common ones and its share of the others."""
        tail = self.catalog - self.common
        rest = self.blobs - self.common
        return hashes[: self.common] + [
            hashes[self.common + (node * rest + j) % tail] for j in range(rest)
        ]

    def batch(self, node: int, entries: list[tuple[bytes, Event]]) -> bytes:
        body = encode_batch_request(
            BatchRequest(self.peer_id(node), self.port(node), tuple(entries), key=b"k%d" % node)
        )
        return (
            f"POST {BATCH_PATH} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode() + body

    def single(self, node: int, info_hash: bytes, *, left: int, event: str) -> bytes:
        query = (
            f"info_hash={quote_from_bytes(info_hash, safe='')}"
            f"&peer_id={quote_from_bytes(self.peer_id(node), safe='')}"
            f"&port={self.port(node)}&uploaded=0&downloaded=0&left={left}"
            f"&compact=1&numwant={NUMWANT}" + (f"&event={event}" if event else "")
        )
        return f"GET /announce?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


# --- the load generator -------------------------------------------------------------------------


@dataclass(order=True)
class Job:
    at: float
    seq: int
    address: str = field(compare=False)
    payload: bytes = field(compare=False)
    kind: str = field(compare=False)
    """``batch``, ``heartbeat``, ``single`` (rollout), ``complete`` (a rollout batch),
    ``base`` (baseline)."""
    reuse: str | None = field(default=None, compare=False)
    """A key under which the connection is kept for the next job (keep-alive)."""
    udp: AnnounceRequest | None = field(default=None, compare=False)
    """Send this announce over UDP (BEP 15) instead of ``payload`` over HTTP."""


@dataclass(eq=False)
class UdpNode:
    """One node's UDP socket and BEP 15 connection id (reused for a minute, as the engine)."""

    sock: socket.socket
    cid: int | None = None
    cid_at: float = 0.0


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    address: str
    job: Job | None = None
    started: int = 0
    buffer: bytearray = field(default_factory=bytearray)
    unsent: memoryview = field(default_factory=lambda: memoryview(b""))
    length: int | None = None
    status: int = 0
    idle_since: float = 0.0


@dataclass
class Stats:
    latencies: dict[str, list[int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lag_max: float = 0.0
    connects: int = 0

    def add(self, kind: str, ns: int) -> None:
        self.latencies.setdefault(kind, []).append(ns)

    def count(self, kind: str) -> int:
        return len(self.latencies.get(kind, []))

    def percentile(self, kind: str, fraction: float) -> float:
        ordered = sorted(self.latencies.get(kind, [0]))
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e6


MAX_INFLIGHT = 8000
"""Requests waiting for answers beyond which the tracker is saturated (the run fails)."""


class Loader:
    """Plain non-blocking sockets and ``selectors``: every job is sent at its time (open
    loop) on a connection from its own source address."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.idle: dict[str, Conn] = {}
        self.inflight = 0
        self.stats = Stats()
        self.udp_port = 0
        self.udp_nodes: dict[str, UdpNode] = {}
        self.udp_pending: dict[int, tuple[Job, int, UdpNode, bool]] = {}
        """Transaction id -> (job, started, node, is the connect)."""
        self.rng = random.Random(7)

    def send_udp(self, job: Job) -> None:
        """Start a BEP 15 announce: a connect first unless the node has a fresh id."""
        started = time.perf_counter_ns()
        node = self.udp_nodes.get(job.address)
        if node is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((job.address, 0))
            sock.connect(("127.0.0.1", self.udp_port))
            sock.setblocking(False)
            node = self.udp_nodes[job.address] = UdpNode(sock)
            self.selector.register(sock, selectors.EVENT_READ, node)
        self.inflight += 1
        fresh = node.cid is not None and time.monotonic() - node.cid_at < 60
        self._udp_request(job, started, node, connect=not fresh)

    def _udp_request(self, job: Job, started: int, node: UdpNode, *, connect: bool) -> None:
        tid = self.rng.getrandbits(32)
        assert job.udp is not None
        if connect:
            data = udp_proto.encode_connect_request(tid)
        else:
            assert node.cid is not None
            data = udp_proto.encode_announce_request(node.cid, tid, job.udp)
        self.udp_pending[tid] = (job, started, node, connect)
        node.sock.send(data)

    def _udp_answer(self, node: UdpNode) -> None:
        try:
            data = node.sock.recv(udp_proto.MAX_ANSWER)
        except OSError as exc:
            self.stats.errors.append(f"udp: {exc}")
            return
        tid = udp_proto.transaction_of(data)
        pending = self.udp_pending.pop(tid, None) if tid is not None else None
        if pending is None:
            return
        job, started, node, connect = pending
        try:
            if connect:
                node.cid = udp_proto.parse_connect_response(data, tid)  # type: ignore[arg-type]
                node.cid_at = time.monotonic()
                self._udp_request(job, started, node, connect=False)
                return
            udp_proto.parse_announce_response(data, tid)  # type: ignore[arg-type]
        except TrackerProtocolError as exc:
            self.stats.errors.append(f"udp: {exc}")
        self.inflight -= 1
        self.stats.add(job.kind, time.perf_counter_ns() - started)

    def send(self, job: Job) -> None:
        """Start ``job``: on its node's kept-alive connection, or a new one (connected
        without blocking: a full accept queue shows as latency, not as a stalled
        generator); the request goes out once the connection is writable."""
        if job.udp is not None:
            self.send_udp(job)
            return
        started = time.perf_counter_ns()
        conn = None
        if job.reuse is not None:
            conn = self.idle.pop(job.reuse, None)
            if conn is not None and time.monotonic() - conn.idle_since > KEEPALIVE:
                conn.sock.close()
                conn = None
        if conn is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            sock.bind((job.address, 0))
            sock.connect_ex(("127.0.0.1", self.port))
            self.stats.connects += 1
            conn = Conn(sock, job.address)
        conn.job, conn.started = job, started
        conn.buffer.clear()
        conn.length = None
        conn.unsent = memoryview(job.payload)
        self.selector.register(conn.sock, selectors.EVENT_WRITE, conn)
        self.inflight += 1

    def _write(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.unsent)
        except BlockingIOError:
            return
        except OSError as exc:
            self.stats.errors.append(f"send: {exc}")
            self._done(conn, ok=False)
            return
        conn.unsent = conn.unsent[sent:]
        if not conn.unsent:
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def poll(self, timeout: float) -> None:
        for key, events in self.selector.select(timeout):
            if isinstance(key.data, UdpNode):
                self._udp_answer(key.data)
                continue
            conn: Conn = key.data
            if conn.unsent:
                if events & selectors.EVENT_WRITE:
                    self._write(conn)
                continue
            try:
                data = conn.sock.recv(262144)
            except OSError:
                data = b""
            if not data:
                self._done(conn, ok=False)
                continue
            conn.buffer += data
            if conn.length is None:
                end = conn.buffer.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head = bytes(conn.buffer[:end]).split(b"\r\n")
                conn.status = int(head[0].split()[1])
                conn.length = (
                    end
                    + 4
                    + next(
                        (
                            int(h.partition(b":")[2])
                            for h in head
                            if h.lower().startswith(b"content-length:")
                        ),
                        0,
                    )
                )
            if len(conn.buffer) >= conn.length:
                self._done(conn, ok=True)

    def _done(self, conn: Conn, *, ok: bool) -> None:
        job = conn.job
        assert job is not None
        self.selector.unregister(conn.sock)
        self.inflight -= 1
        self.stats.add(job.kind, time.perf_counter_ns() - conn.started)
        body = bytes(conn.buffer[conn.buffer.find(b"\r\n\r\n") + 4 :]) if ok else b""
        if not ok:
            self.stats.errors.append(f"{job.kind}: connection closed")
        elif conn.status != 200 or b"failure reason" in body:
            self.stats.errors.append(f"{job.kind}: HTTP {conn.status} {body[:100]!r}")
        elif job.kind in ("batch", "heartbeat", "complete") and (
            b"6:failed" in body or b"8:unlisted" in body
        ):
            self.stats.errors.append(f"{job.kind}: entries refused {body[:200]!r}")
        conn.job = None
        if ok and job.reuse is not None:
            conn.idle_since = time.monotonic()
            old = self.idle.pop(job.reuse, None)
            if old is not None:
                old.sock.close()
            self.idle[job.reuse] = conn
        else:
            conn.sock.close()

    def run_open(self, jobs: list[Job]) -> float:
        """Send ``jobs`` at their times (seconds from now); returns the seconds taken."""
        heapq.heapify(jobs)
        start = time.monotonic()
        last_answer = start
        while jobs or self.inflight:
            now = time.monotonic() - start
            while jobs and jobs[0].at <= now:
                if self.inflight >= MAX_INFLIGHT:
                    raise RuntimeError(
                        f"{self.inflight} requests waiting: the tracker is saturated"
                    )
                job = heapq.heappop(jobs)
                self.stats.lag_max = max(self.stats.lag_max, now - job.at)
                self.send(job)
            wait = 0.05 if not jobs else max(0.0, min(0.05, jobs[0].at - now))
            before = self.inflight
            self.poll(wait)
            if self.inflight < before:
                last_answer = time.monotonic()
            elif self.inflight and time.monotonic() - last_answer > IDLE_LIMIT:
                raise RuntimeError(f"no answer for {IDLE_LIMIT:g} s ({self.inflight} waiting)")
        return time.monotonic() - start

    def run_closed(self, jobs: Iterator[Job], inflight: int) -> float:
        """Send ``jobs`` with at most ``inflight`` waiting for answers; seconds taken."""
        start = time.monotonic()
        last_answer = start
        pending = True
        while pending or self.inflight:
            while pending and self.inflight < inflight:
                job = next(jobs, None)
                if job is None:
                    pending = False
                    break
                self.send(job)
            before = self.inflight
            self.poll(0.05)
            if self.inflight < before:
                last_answer = time.monotonic()
            elif self.inflight and time.monotonic() - last_answer > IDLE_LIMIT:
                raise RuntimeError(f"no answer for {IDLE_LIMIT:g} s ({self.inflight} waiting)")
        return time.monotonic() - start

    def close(self) -> None:
        for conn in self.idle.values():
            conn.sock.close()
        for node in self.udp_nodes.values():
            node.sock.close()
        self.selector.close()


# --- the phases ---------------------------------------------------------------------------------


def chunks(items: list[bytes], size: int) -> Iterator[list[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_jobs(cluster: Cluster, hashes: list[bytes]) -> Iterator[Job]:
    seq = 0
    for node in range(cluster.nodes):
        for part in chunks(cluster.seeds_of(node, hashes), BATCH_SIZE):
            seq += 1
            payload = cluster.batch(node, [(h, Event.STARTED) for h in part])
            yield Job(0.0, seq, cluster.address(node), payload, "batch")


def steady_jobs(cluster: Cluster, hashes: list[bytes], window: float, first: int) -> list[Job]:
    """Rounds (all of a node's seeds, every SEED_INTERVAL) and heartbeats (an empty batch
    every HEARTBEAT) of every node, at the real rates, for ``window`` seconds."""
    jobs: list[Job] = []
    seq = 0
    rounds = round(window * cluster.nodes / SEED_INTERVAL)
    for m in range(rounds):
        node = (first + m) % cluster.nodes
        at = m * SEED_INTERVAL / cluster.nodes
        for part in chunks(cluster.seeds_of(node, hashes), BATCH_SIZE):
            seq += 1
            payload = cluster.batch(node, [(h, Event.NONE) for h in part])
            jobs.append(Job(at, seq, cluster.address(node), payload, "batch"))
    beats = round(window * cluster.nodes / HEARTBEAT)
    for m in range(beats):
        node = (first * 7 + m) % cluster.nodes
        seq += 1
        jobs.append(
            Job(
                m * HEARTBEAT / cluster.nodes,
                seq,
                cluster.address(node),
                cluster.batch(node, []),
                "heartbeat",
            )
        )
    return jobs


YOUNG_NODES = 50
"""Nodes of a rollout (the first to start) whose swarms are still young (fewer than 8
connections) at their re-announce 0.5 s after ``started``, and again 1 s later."""


def rollout_jobs(
    cluster: Cluster,
    rollout_nodes: int,
    layers: int,
    spread: float,
    rng: random.Random,
    image: int = 0,
    *,
    udp: bool = False,
) -> tuple[list[Job], float]:
    """A rollout as the engine announces it: per node and layer ``started``; the young
    swarm's re-announces for the first :data:`YOUNG_NODES` nodes only (the engine skips a
    quick re-announce once the torrent has 8 connections, which later nodes have within a
    round trip of their first answer); ``completed`` in the node's next batch (a batch
    :data:`BATCH_DELAY` after the first completion, with those that follow meanwhile).
    Returns the jobs and when the last one is due."""
    jobs: list[Job] = []
    seq = 1_000_000
    layer_hashes = [
        hashlib.sha1(b"bench-scale-rollout-%d-%d" % (image, j)).digest() for j in range(layers)
    ]
    starts = sorted(rng.uniform(0, spread) for _ in range(rollout_nodes))
    last = 0.0
    for node, start in enumerate(starts):
        address = cluster.address(node)
        ends = [start] * 3  # three layers at a time
        completions: list[tuple[float, bytes]] = []
        for info_hash in layer_hashes:
            slot = min(range(3), key=lambda s: ends[s])
            begin = ends[slot]
            end = begin + rng.uniform(4.0, 12.0)
            ends[slot] = end
            young = ((0.0, "started"), (0.5, ""), (1.5, "")) if node < YOUNG_NODES else ()
            for delay, event in young or ((0.0, "started"),):
                if begin + delay < end:
                    seq += 1
                    if udp:
                        request = AnnounceRequest(
                            info_hash,
                            cluster.peer_id(node),
                            cluster.port(node),
                            left=1 << 20,
                            event=Event(event),
                            numwant=NUMWANT,
                        )
                        jobs.append(Job(begin + delay, seq, address, b"", "single", udp=request))
                        continue
                    payload = cluster.single(node, info_hash, left=1 << 20, event=event)
                    jobs.append(Job(begin + delay, seq, address, payload, "single", reuse=address))
            completions.append((end, info_hash))
        completions.sort()
        while completions:
            due = completions[0][0] + BATCH_DELAY
            batch = [h for t, h in completions if t <= due]
            completions = [(t, h) for t, h in completions if t > due]
            seq += 1
            payload = cluster.batch(node, [(h, Event.COMPLETED) for h in batch])
            jobs.append(Job(due, seq, address, payload, "complete", reuse=address))
            last = max(last, due)
    return jobs, last


def baseline_jobs(cluster: Cluster, hashes: list[bytes], peers: int, blobs: int) -> Iterator[Job]:
    """Seeds announcing alone (today's design): ``peers`` peers on their own addresses
    (127.250.x.y) re-announcing ``blobs`` tail blobs each (event none)."""
    seq = 0
    for n in range(peers):
        node = 200_000 + n
        address = f"127.250.{n // 250 % 250}.{n % 250 + 1}"
        for j in range(blobs):
            info_hash = hashes[
                cluster.common + (n * blobs + j) % (cluster.catalog - cluster.common)
            ]
            seq += 1
            payload = cluster.single(node, info_hash, left=0, event="")
            yield Job(0.0, seq, address, payload, "base", reuse=address)


def expiry_cost_us(nodes: int, blobs: int) -> float:
    """Microseconds per entry that the lazy expiry of batched seeds costs in steady state:
    every entry of an expiring batch is looked at once (here: all refreshed since, the
    usual case), measured on the pure core."""
    swarm = Swarm(
        peer_expiry=900,
        seed_expiry=SEED_EXPIRY,
        max_torrents=100_000,
        max_peers_per_torrent=5000,
        default_numwant=50,
        max_numwant=200,
        max_peers=2_000_000,
        max_batch_seeds=20_000_000,
        max_torrents_per_address=20_000,
        max_peers_per_address=8,
        rng=random.Random(1),
    )
    hashes = [hashlib.sha1(b"expiry-%d" % i).digest() for i in range(blobs * 4)]
    for when in (0.0, 1000.0):
        for n in range(nodes):
            mine = hashes[n % 4 :: 4][:blobs]
            swarm.announce_seeds(
                b"-PA0100-" + n.to_bytes(12, "big"),
                6881,
                [(h, Event.NONE) for h in mine],
                f"10.0.{n // 250}.{n % 250 + 1}",
                when,
            )
    started = time.perf_counter()
    removed = swarm.expire(SEED_EXPIRY + 500.0)
    seconds = time.perf_counter() - started
    assert removed == 0
    return 1e6 * seconds / (nodes * blobs)


# --- the tracker --------------------------------------------------------------------------------


@contextmanager
def p2p_tracker(workdir: Path, *, udp: bool = False) -> Iterator[tuple[int, ManagedProcess]]:
    """p2p-tracker at its defaults (caps on for loopback too); ``udp``: with ``udpListen``
    on the HTTP port number (the chart's ``tracker.udp``)."""
    port = free_port()
    config = workdir / "p2p-tracker.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nlogLevel: warning\nuncappedAddresses: []\n"
        + (f"udpListen: 127.0.0.1:{port}\n" if udp else "")
    )
    binary = Path(sys.executable).with_name("p2p-tracker")
    argv = [str(binary)] if binary.exists() else [require("p2p-tracker")]
    process = ManagedProcess(
        [*argv, "--config", str(config)],
        workdir / "p2p-tracker.log",
        name="p2p-tracker",
        env=service_env(),
    )
    with process:
        process.wait_port(port, timeout=15)
        yield port, process


def full_collections(port: int) -> float:
    """Full (generation 2) collections of the tracker's garbage collector so far."""
    return metric(port, 'python_gc_collections_total{generation="2"}')


def metric(port: int, name: str) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    for line in raw.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    steady_cpu: float = 0.0
    rollout_p99: float = 0.0
    baseline_cores: float = 0.0
    peak_rss: int = 0


def phase_load(
    cluster: Cluster,
    hashes: list[bytes],
    port: int,
    tracker: ManagedProcess,
    inflight: int,
    report: Report,
) -> None:
    """Every node announces all its seeds (as after a tracker restart)."""
    entries = cluster.nodes * cluster.blobs
    empty = proc_stats(tracker.pid).rss
    loader = Loader(port)
    gc0 = full_collections(port)
    cpu0 = tracker.cpu_seconds()
    seconds = loader.run_closed(load_jobs(cluster, hashes), inflight)
    cpu = tracker.cpu_seconds() - cpu0
    rss = proc_stats(tracker.pid).rss
    listed = metric(port, "p2p_tracker_batch_seeds")
    s = loader.stats
    print(
        f"load    : {s.count('batch'):,} batches, {listed:,.0f} seeds listed in {seconds:.1f} s; "
        f"tracker CPU {cpu:.1f} s ({1e6 * cpu / entries:.1f} us per seed); batch p50 "
        f"{s.percentile('batch', 0.5):.1f} ms, p99 {s.percentile('batch', 0.99):.1f} ms; "
        f"RSS {rss / MiB:,.0f} MiB ({(rss - empty) / max(1, listed):.0f} bytes per seed); "
        f"{full_collections(port) - gc0:.0f} full GC",
        flush=True,
    )
    report.failures.extend(f"load: {e}" for e in s.errors[:5])
    if listed != entries:
        report.failures.append(f"load: {listed:,.0f} seeds listed of {entries:,}")
    loader.close()


def phase_steady(
    cluster: Cluster,
    hashes: list[bytes],
    port: int,
    tracker: ManagedProcess,
    window: float,
    report: Report,
) -> None:
    """The steady state at the real rates: the goal's CPU."""
    loader = Loader(port)
    jobs = steady_jobs(cluster, hashes, window, first=0)
    gc0 = full_collections(port)
    cpu0 = tracker.cpu_seconds()
    seconds = loader.run_open(jobs)
    report.steady_cpu = (tracker.cpu_seconds() - cpu0) / seconds
    s = loader.stats
    rate = cluster.nodes * cluster.blobs / SEED_INTERVAL
    print(
        f"steady  : {s.count('batch')} batches ({rate:,.0f} seed announces/s) and "
        f"{s.count('heartbeat')} heartbeats in {seconds:.1f} s: tracker CPU "
        f"{report.steady_cpu:.3f} core; batch p50 {s.percentile('batch', 0.5):.2f} ms, "
        f"p99 {s.percentile('batch', 0.99):.2f} ms; heartbeat p99 "
        f"{s.percentile('heartbeat', 0.99):.2f} ms; generator lag max {s.lag_max * 1e3:.0f} ms; "
        f"{full_collections(port) - gc0:.0f} full GC",
        flush=True,
    )
    report.failures.extend(f"steady: {e}" for e in s.errors[:5])
    loader.close()


def phase_rollout(
    cluster: Cluster,
    hashes: list[bytes],
    port: int,
    tracker: ManagedProcess,
    args: argparse.Namespace,
    report: Report,
    *,
    steady: bool,
) -> float:
    """A rollout, alone or on top of the steady state (the goal's p99); returns its p99."""
    loader = Loader(port)
    loader.udp_port = port
    nodes = min(args.rollout_nodes, cluster.nodes)
    rollout, last = rollout_jobs(
        cluster,
        nodes,
        args.layers,
        args.rollout_spread,
        random.Random(args.seed),
        image=int(steady),
        udp=args.udp,
    )
    jobs: list[Job] = []
    if steady:
        first = round(args.window * cluster.nodes / SEED_INTERVAL)
        jobs = steady_jobs(cluster, hashes, last, first=first)
    gc0 = full_collections(port)
    cpu0 = tracker.cpu_seconds()
    seconds = loader.run_open(jobs + rollout)
    cpu = (tracker.cpu_seconds() - cpu0) / seconds
    s = loader.stats
    p99 = s.percentile("single", 0.99)
    name = "rollout+" if steady else "rollout "
    print(
        f"{name}: {nodes:,} nodes x {args.layers} layers over {seconds:.1f} s"
        + (" with the steady load" if steady else " alone")
        + (", downloads over UDP" if args.udp else "")
        + f": {s.count('single'):,} single announces ({s.count('single') / seconds:,.0f}/s) "
        f"p50 {s.percentile('single', 0.5):.2f} ms, p99 {p99:.2f} ms, "
        f"max {s.percentile('single', 1.0):.2f} ms; {s.count('complete'):,} batches of "
        f"completed layers p99 {s.percentile('complete', 0.99):.2f} ms"
        + (f"; steady batches p99 {s.percentile('batch', 0.99):.2f} ms" if steady else "")
        + f"; tracker CPU {cpu:.3f} core; {s.connects:,} connections; generator lag max "
        f"{s.lag_max * 1e3:.0f} ms; {full_collections(port) - gc0:.0f} full GC",
        flush=True,
    )
    report.failures.extend(f"{name.strip()}: {e}" for e in s.errors[:5])
    loader.close()
    return p99


def phase_baseline(
    cluster: Cluster,
    hashes: list[bytes],
    port: int,
    tracker: ManagedProcess,
    args: argparse.Namespace,
    report: Report,
) -> None:
    """Today's design: seeds announcing alone, every announceInterval."""
    loader = Loader(port)
    loader.run_closed(baseline_jobs(cluster, hashes, args.baseline_peers, args.baseline_blobs), 16)
    loader.stats = Stats()
    again = baseline_jobs(cluster, hashes, args.baseline_peers, args.baseline_blobs)
    gc0 = full_collections(port)
    cpu0 = tracker.cpu_seconds()
    seconds = loader.run_closed(again, 16)
    cpu = tracker.cpu_seconds() - cpu0
    s = loader.stats
    per_announce = cpu / max(1, s.count("base"))
    rate = cluster.nodes * cluster.blobs / HEARTBEAT
    report.baseline_cores = rate * per_announce
    print(
        f"baseline: {s.count('base'):,} single re-announces of seeds at "
        f"{s.count('base') / seconds:,.0f}/s (saturated, 16 in flight), "
        f"{1e6 * per_announce:.0f} us of tracker CPU each, p99 {s.percentile('base', 0.99):.1f} "
        f"ms; today's design needs {rate:,.0f} announces/s = {report.baseline_cores:.1f} cores; "
        f"{full_collections(port) - gc0:.0f} full GC",
        flush=True,
    )
    report.failures.extend(f"baseline: {e}" for e in s.errors[:5])
    loader.close()


def main(argv: list[str] | None = None) -> int:
    raise_open_files_limit()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--blobs", type=int, default=2000, help="cached blobs per node")
    parser.add_argument("--catalog", type=int, default=20000, help="distinct blobs")
    parser.add_argument("--common", type=int, default=500, help="blobs every node has")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of steady state")
    parser.add_argument("--rollout-nodes", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--rollout-spread", type=float, default=30.0)
    parser.add_argument("--baseline-peers", type=int, default=1000)
    parser.add_argument("--baseline-blobs", type=int, default=20)
    parser.add_argument("--inflight", type=int, default=4, help="batches in flight while loading")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--udp",
        action="store_true",
        help="downloads announce over UDP (udpListen on, the chart's tracker.udp); seeds "
        "keep their batches over HTTP",
    )
    args = parser.parse_args(argv)
    cluster = Cluster(args.nodes, args.blobs, args.catalog, args.common)
    hashes = [cluster.blob(i) for i in range(cluster.catalog)]
    entries = cluster.nodes * cluster.blobs
    print(
        f"cluster: {cluster.nodes:,} nodes x {cluster.blobs:,} cached blobs = {entries:,} seeds "
        f"({cluster.catalog:,} distinct blobs, {cluster.common} on every node); defaults: "
        f"seedAnnounceInterval {SEED_INTERVAL} s, heartbeat {HEARTBEAT} s, "
        f"{BATCH_SIZE} infohashes per batch",
        flush=True,
    )
    report = Report()
    with (
        tempfile.TemporaryDirectory(prefix="bench-tracker-scale-") as tmp,
        p2p_tracker(Path(tmp), udp=args.udp) as (port, tracker),
    ):
        phase_load(cluster, hashes, port, tracker, args.inflight, report)
        phase_steady(cluster, hashes, port, tracker, args.window, report)
        alone = phase_rollout(cluster, hashes, port, tracker, args, report, steady=False)
        report.rollout_p99 = phase_rollout(
            cluster, hashes, port, tracker, args, report, steady=True
        )
        phase_baseline(cluster, hashes, port, tracker, args, report)
        report.peak_rss = proc_stats(tracker.pid).hwm
        tracker.check_alive()

    rate = entries / SEED_INTERVAL
    expiry_us = expiry_cost_us(200, min(2000, cluster.blobs))
    expiry_cores = rate * expiry_us / 1e6
    total = report.steady_cpu + expiry_cores
    print(
        f"expiry  : {expiry_us:.2f} us per batched seed looked at (pure core, in this process) "
        f"x {rate:,.0f}/s = {expiry_cores:.4f} core"
    )
    print()
    cpu_ok = "MET" if total < 0.5 else "NOT MET"
    p99_ok = "MET" if report.rollout_p99 < 20 else "NOT MET"
    print(
        f"goal: steady CPU {total:.3f} core (measured {report.steady_cpu:.3f} + expiry "
        f"{expiry_cores:.4f}) < 0.5: {cpu_ok}; rollout announce p99 "
        f"{report.rollout_p99:.2f} ms < 20 ms: {p99_ok}"
    )
    print(
        f"rollout p99 with / without the steady load of batches: {report.rollout_p99:.2f} / "
        f"{alone:.2f} ms = {report.rollout_p99 / alone:.2f}x"
    )
    print(
        f"baseline/batched: {report.baseline_cores:.1f} / {total:.3f} cores = "
        f"{report.baseline_cores / total:,.0f}x; tracker peak RSS {report.peak_rss / MiB:,.0f} MiB"
    )
    for failure in report.failures:
        print(f"FAILED: {failure}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
