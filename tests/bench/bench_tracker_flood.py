"""What a flood costs the tracker's pure core, and what one entry costs in memory.

Run from the repository root::

    python -m tests.bench.bench_tracker_flood                # ~15 s
    python -m tests.bench.bench_tracker_flood --flood 20000 --rounds 5

No HTTP and no clock inside the core (``now`` is passed in), so these are the tracker's own
costs per announce, the part the per-address caps and the eviction add to; the HTTP server
costs about 270 us per request on top (docs/tracker.md). Phases, each the median of
``--rounds`` fresh runs with the default settings unless said otherwise:

- ``flood, new infohashes``: one address announces ``--flood`` random infohashes
  (:class:`~p2p_tracker.swarm.Swarm` only; each creates a torrent);
- ``flood, table overfilled``: the same with ``maxTorrents`` at a quarter of the flood, so
  three quarters of the announces first evict the least recently announced single-address
  torrent;
- ``flood, one swarm``: one address announces ``--flood`` made-up peer ids in one known swarm;
  all but ``maxPeersPerAddress`` are answered without being listed;
- ``flood, through Tracker.announce``: the first phase as query strings, parsed, recorded and
  answered with a bencoded body (:class:`~p2p_tracker.core.Tracker`);
- ``re-announce``: ``--flood`` known peers, each on its own address, announce again (the
  steady state of a real cluster).

Memory (tracemalloc, after a collection): bytes per flood torrent (one peer, one address)
and per peer of 100 swarms of 1,000 peers, each peer on its own address.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable

from p2p_common.tracker_proto import AnnounceRequest, announce_url
from p2p_tracker.core import Tracker
from p2p_tracker.settings import TrackerSettings
from p2p_tracker.swarm import Swarm


def _swarm(settings: TrackerSettings) -> Swarm:
    return Tracker(settings, rng=random.Random(1)).swarm


def _flood_requests(count: int, rng: random.Random) -> list[AnnounceRequest]:
    peer_id = b"-FL0001-" + rng.randbytes(12)
    return [AnnounceRequest(rng.randbytes(20), peer_id, 6881, left=1) for _ in range(count)]


def bench_flood(count: int, rounds: int) -> list[tuple[str, float, str]]:
    """Median microseconds per announce of each phase; every phase times only its loop."""
    defaults = TrackerSettings()
    small = max(1, count // 4)
    rng = random.Random(8)

    def new_infohashes() -> float:
        swarm = _swarm(defaults)
        requests = _flood_requests(count, rng)
        start = time.perf_counter()
        for n, request in enumerate(requests):
            swarm.announce(request, "203.0.113.66", n / 1000)
        return time.perf_counter() - start

    def overfilled() -> float:
        swarm = _swarm(TrackerSettings(max_torrents=small))
        requests = _flood_requests(count, rng)
        start = time.perf_counter()
        for n, request in enumerate(requests):
            swarm.announce(request, "203.0.113.66", n / 1000)
        elapsed = time.perf_counter() - start
        if swarm.evicted_torrents != count - small:
            raise RuntimeError(f"expected {count - small} evictions, got {swarm.evicted_torrents}")
        return elapsed

    def one_swarm() -> float:
        swarm = _swarm(defaults)
        info_hash = rng.randbytes(20)
        swarm.announce(AnnounceRequest(info_hash, b"-LG0001-" + bytes(12), 6881), "10.0.0.1", 0)
        requests = [
            AnnounceRequest(info_hash, b"-FL0001-" + n.to_bytes(12, "big"), 6881, left=1)
            for n in range(count)
        ]
        start = time.perf_counter()
        for n, request in enumerate(requests):
            swarm.announce(request, "203.0.113.66", n / 1000)
        elapsed = time.perf_counter() - start
        if swarm.peers_from(info_hash, "203.0.113.66") != defaults.max_peers_per_address:
            raise RuntimeError("the per-address cap did not hold")
        return elapsed

    def through_handle() -> float:
        tracker = Tracker(defaults, rng=random.Random(1))
        queries = [
            announce_url("", request).partition("?")[2].encode()
            for request in _flood_requests(count, rng)
        ]
        start = time.perf_counter()
        for n, query in enumerate(queries):
            reply = tracker.announce(query, "203.0.113.66", n / 1000)
            if reply.status != 200:
                raise RuntimeError(reply.body.decode(errors="replace"))
        return time.perf_counter() - start

    def reannounce() -> float:
        swarm = _swarm(defaults)
        hashes = [rng.randbytes(20) for _ in range(max(1, count // 20))]
        requests = [
            (
                AnnounceRequest(hashes[n % len(hashes)], n.to_bytes(20, "big"), 6881, left=1),
                f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
            )
            for n in range(count)
        ]
        for request, ip in requests:
            swarm.announce(request, ip, 0)
        gc.collect()
        start = time.perf_counter()
        for request, ip in requests:
            swarm.announce(request, ip, 1)
        return time.perf_counter() - start

    phases: list[tuple[str, Callable[[], float], str]] = [
        ("flood, new infohashes", new_infohashes, "one address, default caps"),
        ("flood, table overfilled", overfilled, f"maxTorrents {small:,}: evicts"),
        ("flood, one swarm", one_swarm, "all but 8 answered unlisted"),
        ("flood, through Tracker.announce", through_handle, "parse + swarm + bencode"),
        ("re-announce", reannounce, f"{count // 20:,} swarms, one address a peer"),
    ]
    results: list[tuple[str, float, str]] = []
    for name, phase, note in phases:
        samples = []
        for _ in range(rounds):
            gc.collect()
            samples.append(phase() / count * 1e6)
        results.append((name, statistics.median(samples), note))
    return results


def bench_memory(count: int) -> list[tuple[str, float]]:
    rng = random.Random(9)
    defaults = TrackerSettings()
    gc.collect()
    tracemalloc.start()
    try:
        requests = _flood_requests(count, rng)
        swarm = _swarm(defaults)
        before = tracemalloc.get_traced_memory()[0]
        for n, request in enumerate(requests):
            swarm.announce(request, "203.0.113.66", n / 1000)
        gc.collect()
        per_torrent = (tracemalloc.get_traced_memory()[0] - before) / count
        del swarm, requests
        gc.collect()

        swarms, peers_each = 100, 1000
        hashes = [rng.randbytes(20) for _ in range(swarms)]
        swarm = _swarm(defaults)
        before = tracemalloc.get_traced_memory()[0]
        n = 0
        for info_hash in hashes:
            for _ in range(peers_each):
                # a new request and a new address string per peer, as the HTTP shell makes them
                request = AnnounceRequest(info_hash, n.to_bytes(20, "big"), 6881, left=n % 4)
                swarm.announce(request, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 0)
                n += 1
        gc.collect()
        per_peer = (tracemalloc.get_traced_memory()[0] - before) / n
        del swarm
    finally:
        tracemalloc.stop()
    return [
        ("per flood torrent (1 peer, 1 address)", per_torrent),
        (f"per peer ({swarms} swarms x {peers_each:,} peers, 1 address each)", per_peer),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=20_000, help="announces per phase")
    parser.add_argument("--rounds", type=int, default=3, help="runs per phase (median)")
    args = parser.parse_args(argv)
    print(f"tracker core, {args.flood:,} announces per phase, median of {args.rounds}")
    for name, micros, note in bench_flood(args.flood, args.rounds):
        total = micros * args.flood / 1e6
        print(f"  {name:32} {micros:6.1f} us/announce  {total:5.2f} s in all  ({note})")
    for name, size in bench_memory(args.flood):
        print(f"  memory {name:56} {size:6.0f} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
