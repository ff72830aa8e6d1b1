"""``nox -s bench``: every benchmark in turn, each with its baseline measured in the same run.

    python -m tests.bench            # all of them
    python -m tests.bench peer pull  # some of them

peer     p2p engine versus libtorrent, 1 GiB between two processes (bench_peer)
tracker  p2p-tracker versus opentracker under wrk (bench_tracker)
tracker-udp    UDP (BEP 15) announces/s: p2p-tracker versus opentracker, one generator and
               one stream for both (bench_tracker_udp)
tracker-load   5,000 peers on 16 source addresses: p2p-tracker (per-address caps on) versus
               opentracker, announces/s, p50/p99 and peak RSS (bench_tracker_load)
tracker-flood  the tracker's pure core under floods, and its memory per peer (bench_tracker_flood)
tracker-scale  5,000 nodes x 2,000 cached blobs announced in batches, a 1,000-node rollout on
               top, against seeds announcing alone: tracker CPU, p99, memory (bench_tracker_scale)
pull     one 1 GiB blob with curl: direct, cold and warm through the agent (bench_pull)
rollout  8 emulated nodes (network namespaces, 100 Mbit/s links) pull one image at once, from
         the origin and through their agents (bench_rollout; needs root)
idle     the CPU an agent spends seeding 5,000 cached blobs while nobody pulls (bench_idle)
hostile  what request, bitfield and HAVE floods and silent sockets cost a seed (bench_hostile)
disk     a pull onto a throttled disk with the adaptive download limit off and on, and what a
         neighbouring writer waits meanwhile (bench_disk; needs root)
sim-validate   the rollout scenarios of docs/scale.md emulated now and simulated, side by side
               (tests.sim.validate --measure; needs root)
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS: dict[str, str | list[str]] = {
    "peer": "tests.bench.bench_peer",
    "tracker": "tests.bench.bench_tracker",
    "tracker-udp": "tests.bench.bench_tracker_udp",
    "tracker-load": "tests.bench.bench_tracker_load",
    "tracker-flood": "tests.bench.bench_tracker_flood",
    "tracker-scale": "tests.bench.bench_tracker_scale",
    "pull": "tests.bench.bench_pull",
    "rollout": "tests.bench.bench_rollout",
    "idle": "tests.bench.bench_idle",
    "hostile": "tests.bench.bench_hostile",
    "disk": "tests.bench.bench_disk",
    "sim-validate": ["tests.sim.validate", "--measure"],
}
"""Module to run with ``python -m``, or the module and its arguments."""


def main() -> int:
    chosen = sys.argv[1:] or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
        return 2
    failed = 0
    for name in chosen:
        target = BENCHMARKS[name]
        argv = [target] if isinstance(target, str) else target
        print(f"=== {name} ({' '.join(argv)})", flush=True)
        failed |= subprocess.run([sys.executable, "-m", *argv], check=False).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
