"""Peer-to-peer throughput: two p2p engines versus two libtorrent peers, same run.

    python -m tests.bench.bench_peer                  # 1 GiB, 2 rounds
    python -m tests.bench.bench_peer --size-mib 256 --rounds 3

One seed and one leecher on 127.0.0.1, each its own process, the same file and the
same metainfo (our deterministic builder: 256 KiB pieces for 1 GiB). The clock starts
when the leecher is told about the seed and stops when its last piece is verified,
so process start-up is excluded for both; libtorrent's own ~0.5 s connect tick stays
in (it is how libtorrent behaves). CPU seconds are the two processes' user + system
time over the transfer. libtorrent runs its high-performance-seed profile with
encryption disabled (plain BitTorrent, like ours): its best case on loopback.
Rounds alternate between the two so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from p2p_common import metainfo as mi
from tests.bench.common import default_workdir, warm_memory
from tests.realparts.libtorrent_peer import libtorrent_leech, libtorrent_seed
from tests.realparts.procs import ManagedProcess

GIB = 1 << 30


@dataclass
class Result:
    seconds: float
    cpu: float


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 64 << 20))
            handle.write(chunk)
            remaining -= len(chunk)


def _meta_for(path: Path) -> mi.Metainfo:
    size = path.stat().st_size
    pieces, digest, length = mi.hash_file(path, mi.piece_length_for(size))
    return mi.build(digest, length, pieces, [])


def run_ours(work: Path, meta: mi.Metainfo, torrent: Path, source: Path) -> Result:
    target = work / "ours.out"
    for leftover in (target, Path(str(target) + ".bits")):
        leftover.unlink(missing_ok=True)
    peer = [sys.executable, "-m", "tests.bench.engine_peer"]
    with ManagedProcess(
        [*peer, "seed", "--torrent", str(torrent), "--data", str(source)],
        work / f"seed-{time.monotonic_ns()}.log",
    ) as seed:
        seed.wait_until(lambda: "listening" in seed.log_tail(), 30, "our seed to listen")
        port = next(
            json.loads(line)["port"] for line in seed.log_tail().splitlines() if "listening" in line
        )
        cpu_seed = seed.cpu_seconds()
        with ManagedProcess(
            [
                *peer,
                "leech",
                "--torrent",
                str(torrent),
                "--data",
                str(target),
                "--peer",
                f"127.0.0.1:{port}",
                "--keep-seeding",
            ],
            work / f"leech-{time.monotonic_ns()}.log",
        ) as leech:
            leech.wait_until(lambda: '"complete"' in leech.log_tail(), 600, "our download")
            done = next(
                json.loads(line) for line in leech.log_tail().splitlines() if '"complete"' in line
            )
            seed_cpu = seed.cpu_seconds() - cpu_seed
    if os.path.getsize(target) != meta.length:
        raise RuntimeError("our leecher produced a file of the wrong size")
    target.unlink()
    return Result(done["seconds"], done["cpu"] + seed_cpu)


def run_libtorrent(work: Path, meta: mi.Metainfo, seed_dir: Path) -> Result:
    out = work / "lt-out"
    out.mkdir(exist_ok=True)
    for leftover in out.iterdir():
        leftover.unlink()
    options = {"profile": "fast", "encryption": "disabled"}
    metainfo = meta.to_bytes()
    with (
        libtorrent_seed(work, metainfo, seed_dir, verify=False, **options) as seed,  # type: ignore[arg-type]
        libtorrent_leech(work, metainfo, out, **options) as leech,  # type: ignore[arg-type]
    ):
        seed_cpu = seed.cpu_seconds()
        started = time.monotonic()
        leech_cpu = leech.cpu_seconds()
        leech.connect_peer("127.0.0.1", seed.listen_port)
        done = leech.wait_complete(600)
        seconds = done.finished_at - started
        cpu = (leech.cpu_seconds() - leech_cpu) + (seed.cpu_seconds() - seed_cpu)
    if (out / meta.name).stat().st_size != meta.length:
        raise RuntimeError("libtorrent produced a file of the wrong size")
    # Free its memory now, as our round does: on tmpfs the next round's writes then get the
    # same recycled pages whichever peer runs next (fresh pages cost this VM several times
    # more to write; docs/benchmarks.md).
    (out / meta.name).unlink()
    return Result(seconds, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=default_workdir(), help="where the files go")
    args = parser.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="p2p-bench-peer-") as tmp:
        work = Path(tmp)
        seed_dir = work / "seed"
        seed_dir.mkdir()
        warm_memory(work, 3 * size)
        staging = work / "blob"
        _write_random(staging, size)
        meta = _meta_for(staging)
        source = seed_dir / meta.name
        staging.rename(source)
        torrent = work / "blob.torrent"
        torrent.write_bytes(meta.to_bytes())
        print(
            f"bench_peer: {args.size_mib} MiB, {meta.num_pieces} pieces of "
            f"{meta.piece_length >> 10} KiB, {args.rounds} rounds",
            flush=True,
        )
        ours: list[Result] = []
        theirs: list[Result] = []
        for round_number in range(args.rounds):
            for name, runner, results in (
                ("p2p", lambda: run_ours(work, meta, torrent, source), ours),
                ("libtorrent", lambda: run_libtorrent(work, meta, seed_dir), theirs),
            ):
                result = runner()
                results.append(result)
                speed = size / result.seconds / 1e6
                print(
                    f"  round {round_number + 1} {name:10}: {speed:7.0f} MB/s "
                    f"{result.seconds:6.2f} s  cpu {result.cpu / (size / GIB):5.2f} s/GiB",
                    flush=True,
                )
    ours_s = statistics.median(r.seconds for r in ours)
    theirs_s = statistics.median(r.seconds for r in theirs)
    ours_cpu = statistics.median(r.cpu for r in ours) / (size / GIB)
    theirs_cpu = statistics.median(r.cpu for r in theirs) / (size / GIB)
    ratio = theirs_s / ours_s
    print(f"p2p engine : {size / ours_s / 1e6:7.0f} MB/s  {ours_cpu:5.2f} CPU s/GiB (median)")
    print(f"libtorrent : {size / theirs_s / 1e6:7.0f} MB/s  {theirs_cpu:5.2f} CPU s/GiB (median)")
    verdict = "met" if ratio >= 1.5 else "NOT met"
    print(f"ratio p2p/libtorrent speed: {ratio:.2f}x (goal >= 1.5x: {verdict})")


if __name__ == "__main__":
    main()
