"""UDP announces per second (BEP 15): p2p-tracker versus opentracker, same stream, same run.

Run from the repository root::

    python -m tests.bench.bench_tracker_udp                 # ~1 minute with the defaults
    python -m tests.bench.bench_tracker_udp --duration 10 --rounds 3
    python -m tests.bench tracker-udp

The load generator is this process: one thread, an epoll loop over ``--sockets`` UDP
sockets, each with one announce in flight (closed loop: a socket sends its next announce
when the answer to the previous one arrives; one lost for a second is sent anew and
counted). Each socket connects first (BEP 15 action 0) and reconnects every 50 s, as the
connection id lives two minutes at most. Every announce is packed from one stream fixed by
the seed: a random peer out of ``--peers`` (distinct peer id and port, a quarter of them
seeds) in one of its 4 swarms out of ``--torrents`` (the infohashes, peer ids and ports of
``bench_tracker``'s wrk script), ``numwant=50``, event none. Both trackers get the
identical stream, round after round, alternating.

Both trackers run as separate processes on 127.0.0.1: ours as ``p2p-tracker --config``
with ``udpListen`` set, opentracker with ``listen.udp`` and the benchmark infohashes
whitelisted. Against opentracker the generator saturates its core before opentracker does,
so opentracker's rate is a lower bound; the CPU time each tracker spends per announce is
printed too and does not depend on the generator.

The issue's goal is at least 0.5x opentracker's UDP announces/s; the last lines say whether
it was met. The machine is shared and noisy: only the ratios measured in one run mean much.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from p2p_common import udp_tracker_proto as udp
from tests.bench.bench_tracker import bench_infohash
from tests.realparts.opentracker import opentracker
from tests.realparts.procs import ManagedProcess, free_port, require

ANNOUNCE = struct.Struct(">QII20s20sQQQIIIiH")
REPLY = struct.Struct(">II")
RECONNECT_AFTER = 50.0
"""Seconds a generator socket uses one connection id (BEP 15: the tracker accepts it for 2
minutes, a client should use it for 1)."""
LOST_AFTER = 1.0
"""Seconds without an answer before an announce counts as lost and the next one goes out."""


@dataclass
class Stream:
    """The announces, identical for every tracker: per entry the infohash, peer id, left
    and port."""

    info_hashes: list[bytes]
    peer_ids: list[bytes]
    lefts: list[int]
    ports: list[int]

    @classmethod
    def build(cls, count: int, torrents: int, peers: int, seed: int) -> Stream:
        rng = random.Random(seed)
        hashes = [bench_infohash(i) for i in range(torrents)]
        out = cls([], [], [], [])
        for _ in range(count):
            p = rng.randrange(peers)
            t = (p + rng.randrange(4) * 7919) % torrents  # every peer is in 4 swarms
            out.info_hashes.append(hashes[t])
            out.peer_ids.append(b"-WK0001-" + p.to_bytes(12, "big"))
            out.lefts.append(0 if p % 4 == 0 else 1048576)
            out.ports.append(10000 + p % 50000)
        return out

    @classmethod
    def warmup(cls, torrents: int, peers: int) -> Stream:
        """Every peer once into each of its 4 swarms (what the stream draws from)."""
        hashes = [bench_infohash(i) for i in range(torrents)]
        out = cls([], [], [], [])
        for p in range(peers):
            for k in range(4):
                out.info_hashes.append(hashes[(p + k * 7919) % torrents])
                out.peer_ids.append(b"-WK0001-" + p.to_bytes(12, "big"))
                out.lefts.append(0 if p % 4 == 0 else 1048576)
                out.ports.append(10000 + p % 50000)
        return out

    def __len__(self) -> int:
        return len(self.ports)


@dataclass
class Run:
    """One generator run against one tracker."""

    answered: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    lost: int
    errors: int
    """Answers that were not announce answers (error action, wrong size)."""
    peers_per_answer: float
    server_cpu: float
    generator_cpu: float

    @property
    def rate(self) -> float:
        return self.answered / self.seconds

    @property
    def cpu_us_per_announce(self) -> float:
        return 1e6 * self.server_cpu / max(1, self.answered)


def _connect(sock: socket.socket, tid: int) -> int:
    """A connection id for ``sock`` (blocking, retried)."""
    sock.setblocking(True)
    sock.settimeout(1.0)
    try:
        for _ in range(5):
            sock.send(udp.encode_connect_request(tid))
            try:
                return udp.parse_connect_response(sock.recv(2048), tid)
            except TimeoutError:
                continue
        raise RuntimeError("no answer to a connect request")
    finally:
        sock.setblocking(False)


def generate(
    port: int,
    server: ManagedProcess,
    stream: Stream,
    *,
    duration: float,
    sockets: int,
    limit: int | None = None,
) -> Run:
    """Send announces from ``stream`` to ``127.0.0.1:port`` for ``duration`` seconds, or
    until ``limit`` were answered."""
    socks = []
    for _ in range(sockets):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        socks.append(sock)
    try:
        return _generate(socks, server, stream, duration, limit or 2**62)
    finally:
        for sock in socks:
            sock.close()


def _generate(
    socks: list[socket.socket], server: ManagedProcess, stream: Stream, duration: float, limit: int
) -> Run:
    count = len(socks)
    clock = time.perf_counter
    cids = [_connect(s, 1 + i) for i, s in enumerate(socks)]
    connected = [clock()] * count
    tids = [0] * count
    sent = [0.0] * count
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    hashes, pids, lefts, ports = stream.info_hashes, stream.peer_ids, stream.lefts, stream.ports
    size = len(stream)
    pack = ANNOUNCE.pack
    latencies: list[float] = []
    record = latencies.append
    position = 0
    answered = lost = errors = peer_bytes = 0
    poller = select.epoll()
    for sock in socks:
        poller.register(sock.fileno(), select.EPOLLIN)

    def send(i: int, now: float) -> None:
        nonlocal position
        if now - connected[i] > RECONNECT_AFTER:
            cids[i] = _connect(socks[i], 1 + i)
            connected[i] = now = clock()
        k = position % size
        position += 1
        tid = tids[i] = (tids[i] + 1) & 0xFFFFFFFF
        socks[i].send(
            pack(cids[i], 1, tid, hashes[k], pids[k], 0, lefts[k], 0, 0, 0, 0, 50, ports[k])
        )
        sent[i] = now

    cpu0, gen0 = server.cpu_seconds(), time.process_time()
    start = clock()
    for i in range(count):
        send(i, start)
    end = start + duration
    next_check = start + LOST_AFTER
    now = start
    try:
        while now < end and answered < limit:
            events = poller.poll(0.1)
            now = clock()
            for fd, _ in events:
                i = by_fd[fd]
                try:
                    data = socks[i].recv(4096)
                except BlockingIOError:
                    continue
                if len(data) < 8 or REPLY.unpack_from(data)[1] != tids[i]:
                    continue  # late answer to an announce counted as lost
                if data[3] != 1 or (len(data) - 20) % 6:
                    errors += 1
                else:
                    peer_bytes += len(data) - 20
                answered += 1
                record(now - sent[i])
                send(i, now)
            if now >= next_check:
                next_check = now + LOST_AFTER / 4
                for i in range(count):
                    if now - sent[i] > LOST_AFTER:
                        lost += 1
                        send(i, now)
    finally:
        poller.close()
    seconds = clock() - start
    cpu1, gen1 = server.cpu_seconds(), time.process_time()
    server.check_alive()
    latencies.sort()

    def pct(q: float) -> float:
        return 1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    if not latencies:
        raise RuntimeError("the tracker answered nothing")
    return Run(
        answered=answered,
        seconds=seconds,
        p50_ms=pct(0.5),
        p99_ms=pct(0.99),
        max_ms=1e3 * latencies[-1],
        lost=lost,
        errors=errors,
        peers_per_answer=peer_bytes / 6 / max(1, answered),
        server_cpu=cpu1 - cpu0,
        generator_cpu=gen1 - gen0,
    )


@contextmanager
def p2p_tracker(workdir: Path) -> Iterator[tuple[int, ManagedProcess]]:
    """Our tracker as a process with HTTP and UDP on one port number, from a YAML file."""
    port = free_port()
    config = workdir / "p2p-tracker.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"udpListen: 127.0.0.1:{port}\n"
        "logLevel: warning\n"
        "maxTorrents: 100000\n"
        "maxPeersPerTorrent: 5000\n"
    )
    binary = Path(sys.executable).with_name("p2p-tracker")
    argv = [str(binary)] if binary.exists() else [require("p2p-tracker")]
    process = ManagedProcess(
        [*argv, "--config", str(config)], workdir / "p2p-tracker.log", name="p2p-tracker"
    )
    with process:
        process.wait_port(port, timeout=15)
        yield port, process


def _fmt(run: Run) -> str:
    return (
        f"{run.rate:9.0f}/s  p50 {run.p50_ms:6.3f} ms  p99 {run.p99_ms:6.3f} ms  "
        f"max {run.max_ms:6.1f} ms  {run.peers_per_answer:4.1f} peers/answer  "
        f"server CPU {run.server_cpu / run.seconds:4.2f} "
        f"({run.cpu_us_per_announce:5.1f} us/announce)  "
        f"generator CPU {run.generator_cpu / run.seconds:4.2f}"
        + (f"  LOST {run.lost}" if run.lost else "")
        + (f"  ERRORS {run.errors}" if run.errors else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--sockets", type=int, default=32, help="announces in flight")
    parser.add_argument("--torrents", type=int, default=1000)
    parser.add_argument("--peers", type=int, default=20000, help="distinct peers (< 50000)")
    parser.add_argument("--stream", type=int, default=500_000, help="announces in the stream")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    require("opentracker")
    stream = Stream.build(args.stream, args.torrents, args.peers, args.seed)
    warmup = Stream.warmup(args.torrents, args.peers)

    with tempfile.TemporaryDirectory(prefix="bench-tracker-udp-") as tmp:
        work = Path(tmp)
        hashes = [bench_infohash(i) for i in range(args.torrents)]
        print(
            f"load: this process, 1 thread, {args.sockets} UDP sockets with one announce in "
            f"flight each, {args.torrents} torrents, {args.peers} peers, numwant=50; "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
        with opentracker(work / "ot", hashes, udp=True) as ot, p2p_tracker(work) as (port, ours):
            targets = {"p2p-tracker": (port, ours), "opentracker": (ot.port, ot.process)}
            for tport, proc in targets.values():  # warm-up: every peer into its 4 swarms
                generate(
                    tport, proc, warmup, duration=60.0, sockets=args.sockets, limit=len(warmup)
                )
            results: dict[str, list[Run]] = {}
            for _ in range(args.rounds):
                for name, (tport, proc) in targets.items():
                    run = generate(
                        tport, proc, stream, duration=args.duration, sockets=args.sockets
                    )
                    results.setdefault(name, []).append(run)
                    print(f"{name:11} {_fmt(run)}", flush=True)

    def best(name: str) -> Run:
        return max(results[name], key=lambda r: r.rate)

    ours_best, ot_best = best("p2p-tracker"), best("opentracker")
    ratio = ours_best.rate / ot_best.rate
    print()
    print(
        f"UDP announces/s ratio (ours/opentracker), best of {args.rounds}: {ratio:.3f} "
        f"({ours_best.rate:.0f}/s vs {ot_best.rate:.0f}/s)"
    )
    ratios = [
        o.rate / t.rate for o, t in zip(results["p2p-tracker"], results["opentracker"], strict=True)
    ]
    print("ratio per round: " + ", ".join(f"{r:.3f}" for r in ratios))
    print(
        "CPU per announce ratio (ours/opentracker): "
        f"{ours_best.cpu_us_per_announce / ot_best.cpu_us_per_announce:.1f}x "
        f"({ours_best.cpu_us_per_announce:.1f} us vs {ot_best.cpu_us_per_announce:.1f} us)"
    )
    print(
        f"p99 at saturation: {ours_best.p99_ms:.2f} ms vs {ot_best.p99_ms:.2f} ms "
        f"({args.sockets} in flight)"
    )
    print(f"goal >= 0.5x opentracker's UDP announces/s: {'met' if ratio >= 0.5 else 'NOT met'}")
    failures = sum(r.errors for runs in results.values() for r in runs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
