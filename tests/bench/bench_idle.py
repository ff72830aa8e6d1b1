"""What an idle agent costs: CPU of a p2p-agent process that seeds thousands of cached blobs.

    python -m tests.bench.bench_idle                    # 5,000 blobs, 60 s measured
    python -m tests.bench.bench_idle --blobs 1000 --seconds 30

A cache of ``--blobs`` small blobs (64 KiB each, with their stored chunks, as a real pull leaves
them) is written to a data directory, and a real ``p2p-agent`` process starts on it
(``swarmMinSize: 0``, so every blob is seeded) next to a real ``p2p-tracker`` with its default
intervals. The agent reseeds every blob at start-up and spreads their first announces over
30 s; they go out in batches (``POST /p2p/v1/announce-batch``, all seeds every
``seedAnnounceInterval``, 1,800 s, and a heartbeat in between). Measured from the agent's CPU
time (user + system, ``/proc``): the cost of announcing one seed (the first window, minus the
idle rate) and the idle rate between announces (the next ``--seconds``); reported with the
steady state they make at the default interval, against the goal (5% of a core). No peer
ever connects: this is the cost of having blobs, not of serving them.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from p2p_common.blobcache import BlobCache
from p2p_common.blobinfo import ChunkBuilder
from p2p_common.engine.announce import BATCH_DELAY
from p2p_common.engine.torrent import RESEED_ANNOUNCE_SPREAD
from p2p_tracker.settings import TrackerSettings
from tests.bench.common import default_workdir
from tests.demo.cluster import service_command
from tests.realparts.procs import ManagedProcess, free_port, poll_until
from tests.services import service_env

BLOB_SIZE = 64 * 1024
ANNOUNCE_INTERVAL = float(TrackerSettings.model_fields["seed_announce_interval"].default)
"""p2p-tracker's default interval of batched seeds (docs/tracker.md)."""


def make_cache(data_dir: Path, count: int, announce: str) -> None:
    """``count`` cached blobs with their chunks, as the agent stores them."""
    cache = BlobCache(data_dir)
    for number in range(count):
        content = hashlib.sha256(number.to_bytes(8, "big")).digest() * (BLOB_SIZE // 32)
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        builder = ChunkBuilder(digest, len(content), [announce])
        builder.piece(hashlib.sha1(content).digest())
        builder.finish()
        scratch = data_dir / "tmp" / "blob"
        scratch.write_bytes(content)
        cache.adopt(scratch, digest, builder.blob)


def ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def metric(url: str, name: str) -> float:
    text = httpx.get(url, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--workdir", default=default_workdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="p2p-bench-idle-") as tmp:
        work = Path(tmp)
        tracker_port, agent_metrics = free_port(), free_port()
        announce = f"http://127.0.0.1:{tracker_port}/announce"
        started = time.monotonic()
        make_cache(work / "agent", args.blobs, announce)
        print(
            f"bench_idle: {args.blobs} cached blobs of {BLOB_SIZE >> 10} KiB written in "
            f"{time.monotonic() - started:.1f} s",
            flush=True,
        )
        (work / "tracker.yaml").write_text(yaml.safe_dump({"listen": f"127.0.0.1:{tracker_port}"}))
        (work / "agent.yaml").write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{free_port()}",
                    "metricsListen": f"127.0.0.1:{agent_metrics}",
                    "peerHost": "127.0.0.1",
                    "peerPort": free_port(),
                    "dataDir": str(work / "agent"),
                    "registry": "http://127.0.0.1:9",
                    "proxies": ["http://127.0.0.1:9"],
                    "swarmMinSize": 0,
                    "cacheSize": 0,
                }
            )
        )
        env = service_env()
        with (
            ManagedProcess(
                [*service_command("tracker"), "--config", str(work / "tracker.yaml")],
                work / "tracker.log",
                env=env,
            ) as tracker,
            ManagedProcess(
                [*service_command("agent"), "--config", str(work / "agent.yaml")],
                work / "agent.log",
                env=env,
            ) as agent,
        ):
            tracker_url = f"http://127.0.0.1:{tracker_port}"
            poll_until(lambda: ready(f"{tracker_url}/readyz"), 30, "the tracker to be ready")
            status = f"http://127.0.0.1:{agent_metrics}"
            poll_until(lambda: ready(f"{status}/readyz"), 300, "the agent to reseed its cache")
            seeding = metric(f"{status}/metrics", "p2p_agent_active_torrents")
            print(f"  agent ready in {time.monotonic() - started:.1f} s, seeding {seeding:.0f}")
            # Window 1: the first announce of every blob (spread over 30 s, in batches).
            cpu1, wall1 = agent.cpu_seconds(), time.monotonic()
            time.sleep(RESEED_ANNOUNCE_SPREAD + BATCH_DELAY + 5)
            announced1 = metric(f"{tracker_url}/metrics", "p2p_tracker_announces_total")
            cpu1, wall1 = agent.cpu_seconds() - cpu1, time.monotonic() - wall1
            # Window 2: nothing to do until the next announces, 300 s later.
            cpu2, wall2 = agent.cpu_seconds(), time.monotonic()
            time.sleep(args.seconds)
            cpu2, wall2 = agent.cpu_seconds() - cpu2, time.monotonic() - wall2
            announced2 = metric(f"{tracker_url}/metrics", "p2p_tracker_announces_total")
            if not (tracker.running and agent.running):
                raise RuntimeError("the tracker or the agent stopped during the measurement")
    idle = cpu2 / wall2
    per_announce = max(0.0, cpu1 - idle * wall1) / max(1.0, announced1)
    steady = idle + args.blobs / ANNOUNCE_INTERVAL * per_announce
    verdict = "met" if steady <= 0.05 else "NOT met"
    print(
        f"  between announces: {100 * idle:.2f}% of a core over {wall2:.0f} s "
        f"({announced2 - announced1:.0f} announces)"
    )
    print(
        f"  first announces: {announced1:.0f} seeds in {wall1:.0f} s, {1000 * per_announce:.3f} "
        f"ms of CPU each"
    )
    print(
        f"  steady state at the default {ANNOUNCE_INTERVAL:.0f} s interval "
        f"({args.blobs / ANNOUNCE_INTERVAL:.1f} announces/s): {100 * steady:.1f}% of a core "
        f"(goal <= 5%: {verdict})"
    )
    return 0 if seeding >= args.blobs else 1


if __name__ == "__main__":
    sys.exit(main())
