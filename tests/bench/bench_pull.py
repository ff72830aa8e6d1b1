"""Single-node pull of one large blob with curl: direct from the origin, cold through the
agent, warm through the agent; CPU and memory of the agent and the proxy. Same run.

    python -m tests.bench.bench_pull                 # 1 GiB blob, 2 rounds
    python -m tests.bench.bench_pull --size-mib 256 --rounds 3 --workdir /dev/shm
    python -m tests.bench.bench_pull --rounds 1 --profile /tmp/prof   # py-spy samples

The origin is the CNCF distribution registry (no auth); the blob is one uncompressed
layer pushed with skopeo. Tracker, proxy and agent run as processes with their console
scripts. ``curl -o /dev/null`` is the client every time:

- direct: ``curl`` straight from the registry (the baseline);
- cold: through the agent with empty proxy and agent caches: origin -> proxy (fetch,
  hash, cache, metainfo) -> BitTorrent -> agent (verify, write) -> curl;
- warm: the same request again: from the agent's cache.

Each round starts a fresh proxy and agent on empty data directories. Reported: MB/s and
the ratio to direct (medians), CPU seconds per GiB of agent and proxy during cold and warm
pulls, and the agent's peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench.common import default_workdir, random_image_layout, warm_memory
from tests.realparts import images
from tests.realparts.procs import ManagedProcess, free_port, require
from tests.realparts.registry import run_registry

GIB = 1 << 30


def big_image_layout(directory: Path, size: int) -> tuple[str, int]:
    """An OCI image layout with one layer of ``size`` random bytes; the layer's digest and size."""
    (layer,) = random_image_layout(directory, size, 1, "1.0").layers
    return layer, size


def curl(url: str) -> tuple[float, int]:
    """(seconds, bytes) of one ``curl`` download to /dev/null."""
    done = subprocess.run(
        [
            require("curl"),
            "-sS",
            "-f",
            "-o",
            "/dev/null",
            "-w",
            "%{time_total} %{size_download}",
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds, size = done.stdout.split()
    return float(seconds), int(size)


def peak_rss_mib(process: ManagedProcess) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Round:
    direct: float
    cold: float
    warm: float
    agent_cpu_cold: float
    proxy_cpu_cold: float
    agent_cpu_warm: float
    agent_rss_mib: float


@contextlib.contextmanager
def profiled(processes: dict[str, ManagedProcess], directory: Path | None, tag: str):
    """While inside: py-spy samples each process into ``<name>-<tag>.txt`` (collapsed stacks).
    The sampler takes CPU from the pull, so a profiled round's speeds are not results."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).parent / "py-spy")
    samplers = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(process.pid),
                "--rate",
                "200",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(directory / f"{name}-{tag}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, process in processes.items()
    ]
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        for sampler in samplers:
            sampler.send_signal(signal.SIGINT)
        for sampler in samplers:
            sampler.wait(timeout=60)


def services(work: Path, registry_url: str, index: int) -> tuple[list[ManagedProcess], int]:
    """Tracker, proxy and agent as processes; returns them and the agent's API port."""
    tracker_port, proxy_port, agent_port = free_port(), free_port(), free_port()
    (work / f"tracker{index}.yaml").write_text(f"listen: 127.0.0.1:{tracker_port}\n")
    (work / f"proxy{index}.yaml").write_text(
        f"listen: 127.0.0.1:{proxy_port}\npeerPort: {free_port()}\n"
        f"dataDir: {work / f'proxy-data{index}'}\nregistry: {registry_url}\n"
        f"trackers: [http://127.0.0.1:{tracker_port}/announce]\ncacheSize: 0\n"
    )
    (work / f"agent{index}.yaml").write_text(
        f"listen: 127.0.0.1:{agent_port}\nmetricsListen: 127.0.0.1:{free_port()}\n"
        f"peerHost: 127.0.0.1\npeerPort: {free_port()}\ndataDir: {work / f'agent-data{index}'}\n"
        f"registry: {registry_url}\nproxies: [http://127.0.0.1:{proxy_port}]\ncacheSize: 0\n"
    )
    bindir = Path(sys.executable).parent
    started = []
    for name, port in (("tracker", tracker_port), ("proxy", proxy_port), ("agent", agent_port)):
        process = ManagedProcess(
            [str(bindir / f"p2p-{name}"), "--config", str(work / f"{name}{index}.yaml")],
            work / f"{name}{index}.log",
        ).start()
        process.wait_port(port, timeout=60)
        started.append(process)
    return started, agent_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=default_workdir(), help="where the files go")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the agent and proxy during the cold pull, the agent during the warm one",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="p2p-bench-pull-") as tmp:
        work = Path(tmp)
        warm_memory(work, 5 * (args.size_mib << 20))  # registry, layout, proxy, agent, spare
        with run_registry(work / "registry", auth="none") as registry:
            digest, size = big_image_layout(work / "layout", args.size_mib << 20)
            images.skopeo(
                [
                    "copy",
                    "--quiet",
                    "--preserve-digests",
                    "--dest-tls-verify=false",
                    f"oci:{work / 'layout'}:1.0",
                    f"docker://{registry.host}/bench/big:1.0",
                ],
                timeout=900,
            )
            shutil.rmtree(work / "layout")
            path = f"/v2/bench/big/blobs/{digest}"
            print(
                f"bench_pull: one blob of {size / 1e6:.0f} MB, {args.rounds} rounds",
                flush=True,
            )
            rounds: list[Round] = []
            for index in range(args.rounds):
                direct, got = curl(registry.url + path)
                assert got == size
                processes, port = services(work, registry.url, index)
                _tracker, proxy, agent = processes
                try:
                    spied = args.profile / f"round{index + 1}" if args.profile else None
                    with profiled({"agent": agent, "proxy": proxy}, spied, "cold"):
                        agent_cpu, proxy_cpu = agent.cpu_seconds(), proxy.cpu_seconds()
                        cold, got = curl(f"http://127.0.0.1:{port}{path}")
                        assert got == size
                        time.sleep(1.0)  # let the agent finish publishing (SHA-256 of the blob)
                        agent_cold = agent.cpu_seconds() - agent_cpu
                        proxy_cold = proxy.cpu_seconds() - proxy_cpu
                    with profiled({"agent": agent}, spied, "warm"):
                        agent_cpu = agent.cpu_seconds()
                        warm, got = curl(f"http://127.0.0.1:{port}{path}")
                        assert got == size
                        agent_warm = agent.cpu_seconds() - agent_cpu
                    rss = peak_rss_mib(agent)
                finally:
                    for process in reversed(processes):
                        process.stop()
                result = Round(direct, cold, warm, agent_cold, proxy_cold, agent_warm, rss)
                rounds.append(result)
                mb = size / 1e6
                print(
                    f"  round {index + 1}: direct {mb / direct:6.0f} MB/s  "
                    f"cold {mb / cold:6.0f} MB/s  warm {mb / warm:6.0f} MB/s  "
                    f"agent RSS {rss:.0f} MiB",
                    flush=True,
                )
    gib = size / GIB
    direct = statistics.median(r.direct for r in rounds)
    cold = statistics.median(r.cold for r in rounds)
    warm = statistics.median(r.warm for r in rounds)
    mb = size / 1e6
    print(f"direct from origin : {mb / direct:6.0f} MB/s")
    print(f"cold through agent : {mb / cold:6.0f} MB/s  {direct / cold:.2f}x direct (goal >= 0.5x)")
    print(f"warm through agent : {mb / warm:6.0f} MB/s  {direct / warm:.2f}x direct (goal >= 0.9x)")
    print(
        "CPU s/GiB: agent cold "
        f"{statistics.median(r.agent_cpu_cold for r in rounds) / gib:.2f}, proxy cold "
        f"{statistics.median(r.proxy_cpu_cold for r in rounds) / gib:.2f}, agent warm "
        f"{statistics.median(r.agent_cpu_warm for r in rounds) / gib:.2f}"
    )
    peak = max(r.agent_rss_mib for r in rounds)
    print(f"agent peak RSS: {peak:.0f} MiB (goal <= 150 MB)")


if __name__ == "__main__":
    main()
