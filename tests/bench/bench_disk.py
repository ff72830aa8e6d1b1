"""The adaptive download limit on a slow disk: what a pull costs the node's other writers.

    python -m tests.bench.bench_disk                       # 8 MB/s disk, 200 MB blob, 40 MB/s
    python -m tests.bench.bench_disk --disk-mbps 4 --size-mb 64 --rounds 2

The agent's data directory is an ext4 file system on a loop device whose writes the kernel
throttles to ``--disk-mbps`` (tests/realparts/slowdisk.py; needs root). An agent with
``downloadRate`` ``--rate-mbps`` pulls one blob of ``--size-mb`` from a proxy that already holds
it, once with the adaptive limit off and once with ``diskWriteLatencyLimit: --limit`` (the order
alternates by round; each round on a fresh file system). Meanwhile a neighbour process does what
containerd and the kubelet do on a node: it writes 64 KiB and ``fdatasync``\\ s it every 100 ms on
the same file system, and records how long each took. Reported per mode: the pull's time (first
request to last byte), the time until its data is on the disk (the pull, then ``syncfs``), the
most bytes the client had received that the device had not yet written (its backlog, from the
device's statistics), the neighbour's p50/p90/p99/worst write latency, and the ratios
adaptive / off. Registry, proxy and the loop device's backing file are in memory (tmpfs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from tests.bench.common import default_workdir
from tests.cluster import run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.registry import run_registry
from tests.realparts.slowdisk import SlowDisk, slow_disk

MB = 10**6
MiB = 1024 * 1024

NEIGHBOUR = r"""
import json, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
block = os.urandom(65536)
latencies = []
offset = 0
print("ready", flush=True)
try:
    while True:
        started = time.perf_counter()
        os.pwrite(fd, block, offset)
        os.fdatasync(fd)
        latencies.append(time.perf_counter() - started)
        offset = (offset + len(block)) % (16 << 20)
        time.sleep(max(0.0, 0.1 - (time.perf_counter() - started)))
except KeyboardInterrupt:
    pass
json.dump(latencies, sys.stdout)
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


class Neighbour:
    """The other writer on the disk (a separate process: its waits are the kernel's alone)."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", NEIGHBOUR, str(path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the neighbour writer did not start")

    def stop(self) -> list[float]:
        self.process.send_signal(2)
        out, _ = self.process.communicate(timeout=120)
        return [float(v) for v in json.loads(out)]


async def one_pull(
    disk: SlowDisk,
    registry_url: str,
    path: str,
    digest: str,
    size: int,
    options: argparse.Namespace,
    limit: float,
) -> dict[str, Any]:
    async with (
        run_tracker() as announce,
        # the proxy's cache is on the ordinary disk: only the agent writes to the slow one
        run_proxy(disk.mountpoint.parent / "proxy", [registry_url], [announce]) as proxy,
        run_agent(
            disk.mountpoint / "agent",
            [registry_url],
            [proxy.url],
            download_rate=int(options.rate_mbps * MB),
            disk_write_latency_limit=limit,
        ) as agent,
    ):
        neighbour = Neighbour(disk.mountpoint / "neighbour")
        base = disk.written_bytes()
        received = 0
        backlog = 0
        done = trio.Event()

        async def watch_backlog() -> None:
            nonlocal backlog
            while not done.is_set():
                backlog = max(backlog, received - (disk.written_bytes() - base))
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_backlog)
            started = time.perf_counter()
            hasher = hashlib.sha256()
            async with agent.http.stream("GET", path) as response:
                response.raise_for_status()
                async for data in response.aiter_bytes():
                    hasher.update(data)
                    received += len(data)
            pulled = time.perf_counter() - started
            rates = (await agent.status.get("/status")).json()["rates"]
            await trio.to_thread.run_sync(_syncfs, disk.mountpoint)
            durable = time.perf_counter() - started
            done.set()
        latencies = neighbour.stop()
        if "sha256:" + hasher.hexdigest() != digest:
            raise RuntimeError("the pulled blob has the wrong digest")
        cuts = (rates.get("adaptive") or {}).get("cuts", 0)
    return {
        "pull": pulled,
        "durable": durable,
        "backlog": backlog,
        "p50": percentile(latencies, 0.5),
        "p90": percentile(latencies, 0.9),
        "p99": percentile(latencies, 0.99),
        "worst": max(latencies, default=0.0),
        "cuts": cuts,
        "samples": len(latencies),
        "size": size,
    }


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the directory; then the whole file system:
        subprocess.run(["sync", "-f", str(path)], check=True, timeout=600)
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--disk-mbps", type=float, default=8.0, help="disk write throttle, MB/s (0: none)"
    )
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rate-mbps", type=float, default=40.0, help="downloadRate, MB/s")
    parser.add_argument("--limit", type=float, default=0.5, help="diskWriteLatencyLimit, s")
    parser.add_argument("--rounds", type=int, default=1)
    options = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_disk needs root (a loop device and the block I/O throttle)")
        return 2
    results: dict[str, list[dict[str, Any]]] = {"off": [], "adaptive": []}
    # Registry, proxy and the loop device's backing file in memory: only the agent's writes
    # meet the slow disk.
    with tempfile.TemporaryDirectory(prefix="bench-disk-", dir=default_workdir()) as scratch:
        base = Path(scratch)
        with run_registry(base / "registry", auth="none") as registry:
            image = images.build_image(
                base / "layout", seed="bench-disk", tag="1.0", layer_sizes=(options.size_mb * MB,)
            )
            images.push_image(base / "layout", image, registry.host, "bench/disk")
            layer = image.layers[0]
            path = f"/v2/bench/disk/blobs/{layer.digest}"
            for number in range(options.rounds):
                order = ["off", "adaptive"] if number % 2 == 0 else ["adaptive", "off"]
                for mode in order:
                    limit = options.limit if mode == "adaptive" else 0.0
                    size_mib = 2 * options.size_mb + 96
                    with slow_disk(
                        base / f"disk-{number}-{mode}",
                        size_mib=size_mib,
                        write_bps=int(options.disk_mbps * MB),
                    ) as disk:
                        result = trio.run(
                            one_pull,
                            disk,
                            registry.url,
                            path,
                            layer.digest,
                            layer.size,
                            options,
                            limit,
                        )
                    results[mode].append(result)
                    print(
                        f"round {number + 1} {mode:8}: pull {result['pull']:6.1f} s, on disk "
                        f"{result['durable']:6.1f} s, backlog {result['backlog'] / MB:6.1f} "
                        f"MB, neighbour fdatasync p50 {result['p50'] * 1000:7.1f} ms p90 "
                        f"{result['p90'] * 1000:7.1f} ms p99 "
                        f"{result['p99'] * 1000:7.1f} ms worst {result['worst'] * 1000:7.1f} ms, "
                        f"cuts {result['cuts']}",
                        flush=True,
                    )

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    disk_rate = f"{options.disk_mbps:g} MB/s" if options.disk_mbps else "unthrottled"
    print(
        f"\nbench_disk: disk {disk_rate}, blob {options.size_mb} MB, downloadRate "
        f"{options.rate_mbps:g} MB/s, diskWriteLatencyLimit {options.limit:g} s, "
        f"{options.rounds} round(s), medians"
    )
    print(f"{'':24}{'off':>10}{'adaptive':>10}{'ratio':>8}")
    for key, label, scale, unit in (
        ("pull", "pull", 1, "s"),
        ("durable", "pull + on disk", 1, "s"),
        ("backlog", "most not on disk", 1 / MB, "MB"),
        ("p50", "neighbour p50", 1000, "ms"),
        ("p90", "neighbour p90", 1000, "ms"),
        ("p99", "neighbour p99", 1000, "ms"),
        ("worst", "neighbour worst", 1000, "ms"),
    ):
        off, on = median("off", key), median("adaptive", key)
        ratio = on / off if off else float("nan")
        print(f"{label + ' (' + unit + ')':24}{off * scale:10.1f}{on * scale:10.1f}{ratio:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
