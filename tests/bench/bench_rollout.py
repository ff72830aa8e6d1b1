"""A rollout on emulated nodes: N nodes pull one image at once, straight from the origin and then
through their agents; the origin's uplink is the bottleneck p2p removes.

    python -m tests.bench.bench_rollout                       # 8 nodes, 100 Mbit/s, 160 MB, 1 round
    python -m tests.bench.bench_rollout --nodes 8 --rate 100mbit --size-mb 160 --rounds 2
    python -m tests.bench.bench_rollout --nodes 3 --rate 500mbit --size-mb 10 --json out.json
    python -m tests.bench.bench_rollout --no-baseline --proxy-set progressiveStreams=0

``--infra-rate``, ``--queue-ms``, ``--tcp-cc``, ``--agent-set`` and ``--proxy-set`` vary one thing
at a time to find out what limits a rollout (results and findings: docs/rollout.md).

Topology (every host is a network namespace; nothing is added to the caller's namespace):

    switch ns: bridge br0, one veth end h<i> per host (egress tbf = the host's DOWNLOAD rate)
    origin ns: 10.77.0.1   CNCF distribution registry on :5000
    infra  ns: 10.77.0.2   p2p-tracker on :6969, one p2p-proxy on :5005 (BitTorrent :6882)
    node<i> ns: 10.77.0.(10+i)  p2p-agent (registry API 127.0.0.1:5004, BitTorrent :6881,
                                metrics on the node address :5014) and one pull client
    each host's eth0 egress tbf = the host's UPLOAD rate

Every link is shaped to the same rate R in both directions with two egress token buckets, one on
each end of the host's veth pair: ``tc qdisc replace dev eth0 root tbf rate R burst B latency
50ms`` inside the host's namespace (what it sends) and the same on its peer ``h<i>`` in the switch
namespace (what it receives: every packet to the host leaves the switch there). That is the same
shaping an ifb device with a mirred redirect would do on the host's ingress, with one queue fewer
and no ifb device to clean up. No delay or loss is emulated (this kernel has no netem).

Per round (``--rounds`` alternates them):

- baseline: every node's pull client fetches the manifest and then every blob (3 at a time, like
  containerd) straight from the origin, all nodes starting at the same instant;
- p2p: a fresh tracker, proxy and agents with empty caches are started and become ready; then every
  node's client pulls ``127.0.0.1:5004`` (its own agent), all at the same instant.

Measured: each node's time to the whole image (from the common start to the last byte, every blob
checked against its digest and the manifest against the pushed one); the slowest node and the
median; the bytes the origin sent (its access log); for p2p where the agents' bytes came from
(their ``/metrics``: other agents, the proxy, the HTTP fallback); the CPU used by our processes and
by the whole machine. Ideal lower bounds: ``size / R`` for one node, ``N * size / R`` for the
baseline (the origin's uplink carries every copy).

The pull clients are long-lived worker processes (``--worker``, one per node namespace) that take
commands as JSON lines on stdin, so no Python start-up lands inside a measurement. Data goes to
tmpfs (``/dev/shm``) by default: the benchmark measures the network, not this machine's disk.

Cleanup: every process is a :class:`~tests.realparts.procs.ManagedProcess`; the namespaces (and
with them every veth and the bridge) are deleted on exit, on failure and on Ctrl-C/SIGTERM.
Namespace names are ``p2prb-<pid>-<random>-<host>``; at start, namespaces of this prefix whose
owner process is gone (a crashed run) are removed, together with any process still inside them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
import yaml

from tests.bench.common import default_workdir
from tests.demo.cluster import Kind, ProcessSet, service_command
from tests.demo.report import Traffic, agent_traffic, metric, parse_metrics
from tests.realparts import images
from tests.realparts.procs import ManagedProcess, ProcessFailedError, clean_env, poll_until, require
from tests.realparts.registry import count_blob_gets, parse_access_log, registry_config

__all__ = [
    "PREFIX",
    "NodeResult",
    "Options",
    "Report",
    "RolloutError",
    "ScenarioResult",
    "leftover_namespaces",
    "main",
    "run",
]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "p2prb-"
"""Every namespace this benchmark creates is named ``p2prb-<pid>-<random>-<host>``."""
WORK_PREFIX = "p2p-bench-rollout-"
"""Work directories are ``p2p-bench-rollout-<pid>-<random>-…`` under ``--workdir``."""
SUBNET = "10.77.0"
ORIGIN_IP, INFRA_IP = f"{SUBNET}.1", f"{SUBNET}.2"
REGISTRY_PORT, TRACKER_PORT, PROXY_PORT, PROXY_PEER_PORT = 5000, 6969, 5005, 6882
AGENT_API, AGENT_PEER_PORT, AGENT_METRICS_PORT = "127.0.0.1:5004", 6881, 5014
REPOSITORY, TAG = "bench/rollout", "1.0"
MAX_NODES = 200
QUEUE_MS = 50
"""Default tbf queue bound (``latency``) in milliseconds, as REAL-PARTS.md measured it."""
READY_TIMEOUT = 90.0
METRICS_TIMEOUT = 20.0
START_DELAY = 0.5
"""Seconds between sending the pull commands and the common start instant."""
MB = 1e6

MANIFEST_ACCEPT = ", ".join(
    [
        images.OCI_MANIFEST,
        images.DOCKER_MANIFEST,
        images.OCI_INDEX,
        images.DOCKER_LIST,
    ]
)


class RolloutError(RuntimeError):
    """The benchmark could not run or a pull failed; the message says what and where."""


# --- options and results -------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What to run (the command line, or a test)."""

    nodes: int = 8
    rate: str = "100mbit"
    """Per-link rate in tc syntax (``100mbit``, ``1gbit``, ``500kbit``), both directions."""
    size_mb: float = 160.0
    layers: int = 4
    rounds: int = 1
    concurrency: int = 3
    """Blobs each pull client fetches at once (containerd's default is 3)."""
    baseline: bool = True
    workdir: str | None = field(default_factory=default_workdir)
    keep: bool = False
    agent_settings: dict[str, Any] = field(default_factory=dict)
    """Extra agent configuration keys (camelCase)."""
    proxy_settings: dict[str, Any] = field(default_factory=dict)
    """Extra proxy configuration keys (camelCase)."""
    verbose: bool = True

    infra_rate: str | None = None
    """The infra host's (tracker and proxy) link rate; ``None``: the same as every link."""
    queue_ms: int = QUEUE_MS
    """tbf ``latency``: how long a packet may wait in a link's queue before it is dropped."""
    tcp_cc: str | None = None
    """TCP congestion control between the hosts (``cubic``, ``bbr``, set on the subnet's route);
    ``None``: what a new namespace inherits (the machine's ``net.ipv4.tcp_congestion_control``)."""

    @property
    def rate_bps(self) -> int:
        return parse_rate(self.rate)

    @property
    def infra_rate_bps(self) -> int:
        return parse_rate(self.infra_rate) if self.infra_rate else self.rate_bps


@dataclass
class NodeResult:
    """One node's pull in one scenario."""

    node: str
    seconds: float
    """From the common start to the last byte of the last blob."""
    first_byte: float
    """From the common start to the first byte of any layer."""
    bytes: int
    verified: bool
    problems: list[str] = field(default_factory=list)
    blobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per blob: ``bytes``, ``start``, ``first_byte``, ``end`` (seconds from the common start)."""
    traffic: dict[str, Any] | None = None
    """p2p only: the agent's bytes by source (``Traffic.to_json``)."""
    cpu_agent: float = 0.0


@dataclass
class ScenarioResult:
    """One scenario (baseline or p2p) of one round."""

    scenario: str
    round: int
    nodes: list[NodeResult]
    origin_blob_bytes: int
    origin_blob_gets: int
    wall: float
    cpu: dict[str, float]
    """CPU seconds over the scenario: by our process group, and ``machine`` (all cores, all
    processes, kernel networking included, from /proc/stat)."""
    machine_busy: float
    """Fraction of the machine's cores busy over the scenario (0..1)."""
    proxy: dict[str, float] = field(default_factory=dict)

    @property
    def slowest(self) -> float:
        return max(node.seconds for node in self.nodes)

    @property
    def median(self) -> float:
        return statistics.median(node.seconds for node in self.nodes)

    @property
    def verified(self) -> bool:
        return all(node.verified for node in self.nodes)

    def traffic_total(self, key: str) -> int:
        return sum(int((node.traffic or {}).get(key, 0)) for node in self.nodes)


@dataclass
class Report:
    """The whole run."""

    run_id: str
    options: dict[str, Any]
    rate_bps: int
    image_bytes: int
    image_blobs: int
    manifest_digest: str
    namespaces: list[str]
    commands: list[str]
    tcp_cc: str = ""
    """TCP congestion control in the namespaces."""
    scenarios: list[ScenarioResult] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    """Every process the run started (all stopped when :func:`run` returns)."""
    setup_seconds: float = 0.0
    total_seconds: float = 0.0
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)

    def of(self, scenario: str) -> list[ScenarioResult]:
        return [s for s in self.scenarios if s.scenario == scenario]

    @property
    def ideal_node(self) -> float:
        """``size / R``: one node's download link alone."""
        return self.image_bytes * 8 / self.rate_bps

    @property
    def ideal_baseline(self) -> float:
        """``N * size / R``: every copy through the origin's uplink."""
        return self.ideal_node * int(self.options["nodes"])

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ideal_node_seconds"] = self.ideal_node
        doc["ideal_baseline_seconds"] = self.ideal_baseline
        return doc


# --- small helpers -------------------------------------------------------------------------------

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def parse_rate(text: str) -> int:
    """Bits per second of a tc-style rate: ``100mbit``, ``1gbit``, ``800kbit`` or plain bits."""
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"not a rate such as 100mbit or 1gbit: {text!r}")
    bps = int(float(match[1]) * _RATE_UNITS[(match[2] or "bit").lower()])
    if not 1_000_000 <= bps <= 10 * 10**9:
        raise ValueError(f"rate {text!r} is outside 1mbit..10gbit")
    return bps


def tbf_burst(rate_bps: int) -> int:
    """Token bucket size in bytes: 256 KiB (REAL-PARTS.md), more above ~500 Mbit/s so the bucket
    holds at least 4 ms of traffic (a timer tick at HZ=250)."""
    return max(256 * 1024, rate_bps // 8 // 250)


def _say(options: Options, text: str) -> None:
    if options.verbose:
        print(text, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


# --- the emulated network ------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One emulated machine: a network namespace with one veth link to the switch."""

    role: str
    """``origin``, ``infra`` or ``node<i>``."""
    index: int
    address: str
    netns: str

    @property
    def switch_port(self) -> str:
        """The veth end in the switch namespace (its egress is this host's download)."""
        return f"h{self.index}"


def _ip(argv: Sequence[str], *, check: bool = True, timeout: float = 20.0) -> str:
    """Run an ``ip``/``tc`` command; a failure raises :class:`RolloutError` with its stderr."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=clean_env(),
        )
    except subprocess.TimeoutExpired as exc:
        raise RolloutError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from exc
    if check and done.returncode != 0:
        raise RolloutError(
            f"`{' '.join(argv)}` failed (status {done.returncode}): {done.stderr.strip()}"
        )
    return done.stdout


def list_namespaces() -> list[str]:
    """Names of the network namespaces in /run/netns (``ip netns list``)."""
    out = _ip([require("ip"), "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def leftover_namespaces(run_id: str | None = None) -> list[str]:
    """This benchmark's namespaces (of one run, or of any run) that exist right now."""
    prefix = PREFIX + (f"{run_id}-" if run_id else "")
    return [name for name in list_namespaces() if name.startswith(prefix)]


def _kill_inside(netns: str) -> None:
    """SIGKILL every process still inside ``netns`` (by PID, from ``ip netns pids``)."""
    out = _ip([require("ip"), "netns", "pids", netns], check=False)
    for word in out.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def _delete_namespace(netns: str) -> None:
    _kill_inside(netns)
    _ip([require("ip"), "netns", "delete", netns], check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete the namespaces of earlier runs whose owner process is gone; return their names."""
    stale = []
    for name in leftover_namespaces():
        match = re.match(re.escape(PREFIX) + r"(\d+)-", name)
        if match and not _pid_alive(int(match[1])):
            _delete_namespace(name)
            stale.append(name)
    return stale


class Network:
    """The switch namespace with its bridge and one shaped veth link per host.

    :meth:`close` deletes every namespace it made (which removes the veths and the bridge) after
    killing any process still inside one; it is idempotent and safe after a partial build.
    """

    def __init__(
        self,
        run_id: str,
        rate_bps: int,
        nodes: int,
        infra_rate_bps: int | None = None,
        *,
        queue_ms: int = QUEUE_MS,
        tcp_cc: str | None = None,
    ) -> None:
        self.run_id = run_id
        self.queue_ms = queue_ms
        self.tcp_cc = tcp_cc
        self.rate_bps = rate_bps
        self.infra_rate_bps = infra_rate_bps or rate_bps
        self.ip = require("ip")
        self.tc = require("tc")
        self.switch = f"{PREFIX}{run_id}-sw"
        self.hosts = [
            Host("origin", 1, ORIGIN_IP, f"{PREFIX}{run_id}-origin"),
            Host("infra", 2, INFRA_IP, f"{PREFIX}{run_id}-infra"),
            *(
                Host(f"node{i}", 10 + i, f"{SUBNET}.{10 + i}", f"{PREFIX}{run_id}-node{i}")
                for i in range(1, nodes + 1)
            ),
        ]
        self.created: list[str] = []
        self.commands: list[str] = []
        """Every ``ip``/``tc`` command run, in order (reported for the docs)."""

    @property
    def origin(self) -> Host:
        return self.hosts[0]

    @property
    def infra(self) -> Host:
        return self.hosts[1]

    @property
    def nodes(self) -> list[Host]:
        return self.hosts[2:]

    def _run(self, *argv: str) -> str:
        self.commands.append(" ".join(argv))
        return _ip(argv)

    def _add_namespace(self, name: str) -> None:
        try:
            self._run(self.ip, "netns", "add", name)
        except RolloutError as exc:
            raise RolloutError(
                f"cannot create network namespaces ({exc}); this benchmark needs root "
                "(CAP_SYS_ADMIN and CAP_NET_ADMIN) and a kernel with network namespaces"
            ) from None
        self.created.append(name)

    def rate_of(self, host: Host) -> int:
        return self.infra_rate_bps if host.role == "infra" else self.rate_bps

    def tbf(self, netns: str, dev: str, rate_bps: int | None = None) -> list[str]:
        """The tc command that shapes ``dev``'s egress in ``netns`` to ``rate_bps`` (default:
        the common rate)."""
        rate = rate_bps or self.rate_bps
        return [
            self.tc,
            "-n",
            netns,
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            f"{rate}bit",
            "burst",
            str(tbf_burst(rate)),
            "latency",
            f"{self.queue_ms}ms",
        ]

    def build(self) -> None:
        """Create the switch, the hosts, their links, addresses and shaping."""
        self._add_namespace(self.switch)
        self._run(self.ip, "-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._run(self.ip, "-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_namespace(host.netns)
            self._run(
                self.ip, "link", "add", "eth0", "netns", host.netns, "type", "veth",
                "peer", "name", host.switch_port, "netns", self.switch,
            )  # fmt: skip
            self._run(
                self.ip, "-n", self.switch, "link", "set", host.switch_port, "master", "br0", "up"
            )
            self._run(self.ip, "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            self._run(self.ip, "-n", host.netns, "link", "set", "eth0", "up")
            self._run(self.ip, "-n", host.netns, "link", "set", "lo", "up")
            if self.tcp_cc:
                # Per route: a namespace may not set a restricted default (only init_net may).
                self._run(
                    self.ip, "-n", host.netns, "route", "replace", f"{SUBNET}.0/24", "dev",
                    "eth0", "src", host.address, "congctl", self.tcp_cc,
                )  # fmt: skip
            rate = self.rate_of(host)
            self._run(*self.tbf(host.netns, "eth0", rate))  # upload
            self._run(*self.tbf(self.switch, host.switch_port, rate))  # download

    def close(self) -> None:
        """Delete every namespace made (hosts first, the switch last)."""
        for name in reversed(self.created):
            _delete_namespace(name)
        self.created.clear()

    def exec_argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return [self.ip, "netns", "exec", host.netns, *argv]

    def http(self, host: Host, url: str, timeout: float = 3.0) -> tuple[int, str]:
        """(status, body) of a GET from inside ``host`` with curl; status 0 if nothing answered."""
        out = _ip(
            self.exec_argv(
                host,
                [require("curl"), "-s", "-m", f"{timeout:g}", "-w", "\n%{http_code}", url],
            ),
            check=False,
            timeout=timeout + 10,
        )
        body, _, status = out.rpartition("\n")
        return (int(status) if status.strip().isdigit() else 0), body


# --- the test image ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestImage:
    """What was pushed: the manifest's digest and every blob's size by digest."""

    manifest_digest: str
    blobs: dict[str, int]

    @property
    def size(self) -> int:
        return sum(self.blobs.values())


def build_layout(directory: Path, total: int, layers: int) -> TestImage:
    """An OCI image layout of ``layers`` layers of random bytes, ``total`` bytes together,
    streamed to disk in chunks (the test image builder keeps layers in memory)."""
    blobs_dir = directory / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True)
    sizes = [total // layers] * layers
    sizes[-1] += total - sum(sizes)
    descriptors: list[dict[str, Any]] = []
    for size in sizes:
        scratch = directory / "layer"
        digest = hashlib.sha256()
        with scratch.open("wb") as handle:
            remaining = size
            while remaining:
                chunk = os.urandom(min(remaining, 16 << 20))
                digest.update(chunk)
                handle.write(chunk)
                remaining -= len(chunk)
        scratch.rename(blobs_dir / digest.hexdigest())
        descriptors.append(
            {"mediaType": images.OCI_LAYER, "digest": "sha256:" + digest.hexdigest(), "size": size}
        )

    def add(doc: dict[str, Any]) -> tuple[str, int]:
        data = json.dumps(doc, sort_keys=True).encode()
        name = hashlib.sha256(data).hexdigest()
        (blobs_dir / name).write_bytes(data)
        return "sha256:" + name, len(data)

    config, config_size = add(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
        }
    )
    manifest, manifest_size = add(
        {
            "schemaVersion": 2,
            "mediaType": images.OCI_MANIFEST,
            "config": {"mediaType": images.OCI_CONFIG, "digest": config, "size": config_size},
            "layers": descriptors,
        }
    )
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": images.OCI_MANIFEST,
                        "digest": manifest,
                        "size": manifest_size,
                        "annotations": {"org.opencontainers.image.ref.name": TAG},
                    }
                ],
            }
        )
    )
    blobs = {config: config_size, **{str(d["digest"]): int(d["size"]) for d in descriptors}}
    return TestImage(manifest, blobs)


# --- the pull client (worker side) ---------------------------------------------------------------


async def _pull_image(command: dict[str, Any]) -> dict[str, Any]:
    """Pull the manifest and every blob from ``command['base']``, hashing as bytes arrive.

    Waits until ``command['at']`` (``time.monotonic()``, comparable across processes), then
    measures from that instant. Blobs are requested in manifest order (config first), at most
    ``concurrency`` at once, like containerd. ``first_byte`` is the first byte of any layer.
    """
    base, at = str(command["base"]), float(command["at"])
    repository, tag = str(command["repository"]), str(command["tag"])
    delay = at - time.monotonic()
    if delay > 0:
        await trio.sleep(delay)
    blobs: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    timeout = httpx.Timeout(float(command.get("read_timeout", 120.0)), connect=10.0)
    async with httpx.AsyncClient(trust_env=False, timeout=timeout) as client:
        url = f"{base}/v2/{repository}/manifests/{tag}"
        response = await client.get(url, headers={"accept": MANIFEST_ACCEPT})
        if response.status_code != 200:
            raise RuntimeError(f"GET {url}: {response.status_code} {response.text[:300]}")
        manifest = response.content
        doc = json.loads(manifest)
        layers = {str(d["digest"]) for d in doc["layers"]}
        descriptors = [doc["config"], *doc["layers"]]
        slots = trio.Semaphore(int(command.get("concurrency", 3)))

        async def fetch(descriptor: dict[str, Any]) -> None:
            digest, size = str(descriptor["digest"]), int(descriptor["size"])
            blob_url = f"{base}/v2/{repository}/blobs/{digest}"
            try:
                started = time.monotonic()
                hasher = hashlib.sha256()
                received = 0
                first = math.nan
                async with client.stream("GET", blob_url) as blob:
                    if blob.status_code != 200:
                        body = (await blob.aread())[:300].decode(errors="replace")
                        raise RuntimeError(f"GET {blob_url}: {blob.status_code} {body}")
                    async for chunk in blob.aiter_raw():
                        if received == 0:
                            first = time.monotonic()
                        received += len(chunk)
                        hasher.update(chunk)
                got = "sha256:" + hasher.hexdigest()
                if received != size:
                    problems.append(f"{digest}: {received} bytes, the manifest says {size}")
                elif got != digest:
                    problems.append(f"{digest}: the bytes hash to {got}")
                blobs[digest] = {
                    "bytes": received,
                    "start": started - at,
                    "first_byte": first - at,
                    "end": time.monotonic() - at,
                    "ok": received == size and got == digest,
                }
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for descriptor in descriptors:
                await slots.acquire()  # in manifest order
                nursery.start_soon(fetch, descriptor)
    finished = time.monotonic()
    firsts = [b["first_byte"] for d, b in blobs.items() if d in layers]
    return {
        "manifest_digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
        "seconds": finished - at,
        "first_byte": min(firsts) if firsts else math.nan,
        "bytes": sum(b["bytes"] for b in blobs.values()),
        "blobs": blobs,
        "problems": problems,
    }


def worker_main() -> int:
    """The pull client's loop: one JSON command a line on stdin, one JSON answer on stdout."""

    def answer(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    answer({"ok": True, "ready": True})
    while line := sys.stdin.readline():
        command = json.loads(line)
        if command.get("op") == "quit":
            break
        try:
            result = trio.run(_pull_image, command)
        except BaseException as exc:  # report everything, the parent decides
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            answer({"ok": False, "error": _describe(exc)})
        else:
            answer({"ok": True, **result})
    return 0


def _describe(exc: BaseException) -> str:
    """One line for an exception, the first leaf of an exception group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


# --- the pull client (parent side) ---------------------------------------------------------------


class PullWorker:
    """A long-lived pull client process inside one node's namespace."""

    def __init__(self, network: Network, host: Host, logs: Path) -> None:
        self.host = host
        self.process = ManagedProcess(
            network.exec_argv(
                host, [sys.executable, "-m", "tests.bench.bench_rollout", "--worker"]
            ),
            logs / f"client-{host.role}.log",
            name=f"client-{host.role}",
            cwd=ROOT,
            pipes=True,
            stop_timeout=3.0,
        )
        self._buffer = b""

    def start(self) -> None:
        self.process.start()

    def send(self, command: dict[str, Any]) -> None:
        try:
            self.process.stdin.write((json.dumps(command) + "\n").encode())
            self.process.stdin.flush()
        except OSError as exc:
            self.process.fail(f"cannot send a command: {exc}")

    def receive(self, deadline: float) -> dict[str, Any]:
        """The next answer; raises :class:`ProcessFailedError` if the client dies or is late."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.process.fail("no answer before the scenario's deadline")
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                self.process.check_alive()
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                self.process.fail("closed its output")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        if self.process.running:
            with contextlib.suppress(OSError, RuntimeError):
                self.send({"op": "quit"})
        self.process.stop()


# --- the benchmark -------------------------------------------------------------------------------


class Bench:
    """One run: network, origin, image, clients; the scenarios; and the cleanup of all of it."""

    def __init__(self, options: Options, work: Path, run_id: str) -> None:
        self.options = options
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.network = Network(
            self.run_id,
            options.rate_bps,
            options.nodes,
            options.infra_rate_bps,
            queue_ms=options.queue_ms,
            tcp_cc=options.tcp_cc,
        )
        self.workers: list[PullWorker] = []
        self.registry: ManagedProcess | None = None
        self.services = ProcessSet()
        self.image: TestImage | None = None
        self.pids: list[int] = []
        """Every process started, for the report."""
        self._generation = 0

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> TestImage:
        """Build the network, start the origin and push the image, start the pull clients."""
        stale = remove_stale_namespaces()
        if stale:
            _say(self.options, f"removed {len(stale)} namespaces of a crashed run: {stale}")
        self.network.build()
        self._start_registry()
        self.image = self._push_image()
        for host in self.network.nodes:
            worker = PullWorker(self.network, host, self.logs)
            self.workers.append(worker)
            worker.start()
            self.pids.append(worker.process.pid)
        deadline = time.monotonic() + READY_TIMEOUT
        for worker in self.workers:
            hello = worker.receive(deadline)
            if not hello.get("ready"):
                worker.process.fail(f"unexpected first answer {hello!r}")
        return self.image

    def _start_registry(self) -> None:
        storage = self.work / "registry"
        storage.mkdir()
        config = registry_config(storage, REGISTRY_PORT, None)
        config["http"]["addr"] = f"{ORIGIN_IP}:{REGISTRY_PORT}"
        path = self.work / "registry.yml"
        path.write_text(json.dumps(config, indent=2))
        origin = self.network.origin
        self.registry = ManagedProcess(
            self.network.exec_argv(origin, [require("docker-registry"), "serve", str(path)]),
            self.logs / "registry.log",
            name="registry",
        ).start()
        self.pids.append(self.registry.pid)
        url = f"http://{ORIGIN_IP}:{REGISTRY_PORT}/v2/"
        self.registry.wait_until(
            lambda: self.network.http(origin, url)[0] == 200, READY_TIMEOUT, f"{url} to answer"
        )

    def _push_image(self) -> TestImage:
        layout = self.work / "layout"
        total = int(self.options.size_mb * MB)
        image = build_layout(layout, total, self.options.layers)
        skopeo = ManagedProcess(
            self.network.exec_argv(
                self.network.origin,
                [
                    require("skopeo"),
                    "copy",
                    "--quiet",
                    "--preserve-digests",
                    "--dest-tls-verify=false",
                    f"oci:{layout}:{TAG}",
                    f"docker://{ORIGIN_IP}:{REGISTRY_PORT}/{REPOSITORY}:{TAG}",
                ],
            ),
            self.logs / "skopeo.log",
            name="skopeo",
        )
        with skopeo:
            self.pids.append(skopeo.pid)
            status = skopeo.wait_exit(600)
        if status != 0:
            skopeo.fail(f"push failed with status {status}")
        shutil.rmtree(layout)
        return image

    # -- measurement helpers ------------------------------------------------------------------

    def _registry_log(self) -> str:
        assert self.registry is not None
        return self.registry.log_path.read_text(errors="replace")

    def _sync_registry_log(self) -> None:
        """Wait until the access log holds every request answered so far (a marker request)."""
        assert self.registry is not None
        marker = uuid.uuid4().hex
        self.network.http(
            self.network.nodes[0], f"http://{ORIGIN_IP}:{REGISTRY_PORT}/v2/?p2p-log-marker={marker}"
        )
        self.registry.wait_until(
            lambda: marker in self._registry_log(), 10.0, "the marker in the access log"
        )

    def _processes(self) -> dict[str, ManagedProcess]:
        found = {name: p for name, p in self.services.processes.items() if p.running}
        if self.registry is not None:
            found["registry"] = self.registry
        for worker in self.workers:
            found[worker.process.name] = worker.process
        return found

    def _cpu(self) -> dict[str, float]:
        return {name: p.cpu_seconds() for name, p in self._processes().items()}

    def _deadline(self) -> float:
        """Generous bound for a scenario: twice the origin-bound ideal, plus a minute."""
        assert self.image is not None
        ideal = self.options.nodes * self.image.size * 8 / self.options.rate_bps
        return time.monotonic() + 2 * ideal + 60

    def _pull_everywhere(self, base: str) -> tuple[list[dict[str, Any]], float]:
        """Every client pulls from ``base`` starting at one instant; (answers, common start)."""
        at = time.monotonic() + START_DELAY
        deadline = self._deadline()
        for worker in self.workers:
            worker.send(
                {
                    "op": "pull",
                    "base": base,
                    "repository": REPOSITORY,
                    "tag": TAG,
                    "at": at,
                    "concurrency": self.options.concurrency,
                }
            )
        answers = []
        for worker in self.workers:
            answer = worker.receive(deadline)
            answer["node"] = worker.host.role
            answers.append(answer)
            _say(
                self.options,
                f"    {worker.host.role:<7} "
                + (
                    f"{answer['seconds']:7.2f} s"
                    if answer.get("ok")
                    else f"FAILED: {answer.get('error')}"
                ),
            )
        return answers, at

    def _node_result(self, answer: dict[str, Any]) -> NodeResult:
        assert self.image is not None
        node = str(answer["node"])
        if not answer.get("ok"):
            return NodeResult(node, math.inf, math.inf, 0, False, [str(answer.get("error"))])
        problems = list(answer["problems"])
        if answer["manifest_digest"] != self.image.manifest_digest:
            problems.append(
                f"manifest {answer['manifest_digest']} is not the pushed "
                f"{self.image.manifest_digest}"
            )
        got = set(answer["blobs"])
        problems += [f"{d} not pulled" for d in sorted(set(self.image.blobs) - got)]
        verified = not problems and all(b["ok"] for b in answer["blobs"].values())
        return NodeResult(
            node, float(answer["seconds"]), float(answer["first_byte"]), int(answer["bytes"]),
            verified, problems, blobs=dict(answer["blobs"]),
        )  # fmt: skip

    def _measure(
        self, scenario: str, round_number: int, base: str, extra: Callable[[], None] | None = None
    ) -> tuple[ScenarioResult, dict[str, float]]:
        """Run one pull everywhere and account for it (origin bytes, CPU)."""
        self._sync_registry_log()
        log_offset = len(self._registry_log())
        cpu_before, machine_before = self._cpu(), _machine_jiffies()
        answers, at = self._pull_everywhere(base)
        wall = time.monotonic() - at
        cpu_after, machine_after = self._cpu(), _machine_jiffies()
        if extra is not None:
            extra()
        self._sync_registry_log()
        entries = parse_access_log(self._registry_log()[log_offset:])
        blob_entries = [
            e
            for e in entries
            if e.method == "GET" and e.status in (200, 206) and "/blobs/" in e.path
        ]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (machine_after[0] - machine_before[0]) / hz
        total = (machine_after[1] - machine_before[1]) / hz
        cpu: dict[str, float] = {}
        for name, after in cpu_after.items():
            group = name.split("-")[0]
            cpu[group] = cpu.get(group, 0.0) + after - cpu_before.get(name, 0.0)
        cpu["machine"] = busy
        result = ScenarioResult(
            scenario=scenario,
            round=round_number,
            nodes=[self._node_result(a) for a in answers],
            origin_blob_bytes=sum(e.size for e in blob_entries),
            origin_blob_gets=sum(count_blob_gets(entries).values()),
            wall=wall,
            cpu=cpu,
            machine_busy=busy / total if total else 0.0,
        )
        per_process = {name: after - cpu_before.get(name, 0.0) for name, after in cpu_after.items()}
        return result, per_process

    # -- scenarios ----------------------------------------------------------------------------

    def baseline(self, round_number: int) -> ScenarioResult:
        """Every node straight from the origin, at once."""
        _say(self.options, f"  round {round_number}: baseline (every node from the origin)")
        result, _ = self._measure("baseline", round_number, f"http://{ORIGIN_IP}:{REGISTRY_PORT}")
        return result

    def p2p(self, round_number: int) -> ScenarioResult:
        """Fresh tracker, proxy and agents; every node through its own agent, at once."""
        _say(self.options, f"  round {round_number}: p2p (every node through its agent)")
        self._generation += 1
        self._start_services(self._generation)
        traffic: dict[str, Traffic] = {}
        proxy: dict[str, float] = {}

        def collect() -> None:
            traffic.update(self._agent_traffic())
            proxy.update(self._proxy_numbers())

        try:
            result, per_process = self._measure(
                "p2p", round_number, f"http://{AGENT_API}", extra=collect
            )
        except BaseException:
            self._stop_services(grace=2.0)  # failing or interrupted: do not wait for pulls
            raise
        self._stop_services(grace=15.0)
        for node in result.nodes:
            if node.node in traffic:
                node.traffic = traffic[node.node].to_json()
            node.cpu_agent = per_process.get(f"agent-{node.node}", 0.0)
        result.proxy = proxy
        return result

    def _stop_services(self, grace: float) -> None:
        """Stop tracker, proxy and agents (SIGTERM, ``grace`` seconds, SIGKILL); drop their
        data directories."""
        with _sigint_deferred():
            self.services.stop_all(timeout=grace)
        self.services = ProcessSet()
        for path in self.work.glob(f"data-{self._generation}-*"):
            shutil.rmtree(path, ignore_errors=True)

    def _start_services(self, generation: int) -> None:
        infra = self.network.infra
        announce = f"http://{INFRA_IP}:{TRACKER_PORT}/announce"
        configs: list[tuple[str, Host, dict[str, Any], Kind]] = [
            ("tracker", infra, {"listen": f"{INFRA_IP}:{TRACKER_PORT}"}, "tracker"),
            (
                "proxy",
                infra,
                {
                    "listen": f"{INFRA_IP}:{PROXY_PORT}",
                    "peerPort": PROXY_PEER_PORT,
                    "dataDir": str(self.work / f"data-{generation}-proxy"),
                    "registry": f"http://{ORIGIN_IP}:{REGISTRY_PORT}",
                    "trackers": [announce],
                    **self.options.proxy_settings,
                },
                "proxy",
            ),
        ]
        for host in self.network.nodes:
            configs.append(
                (
                    f"agent-{host.role}",
                    host,
                    {
                        "listen": AGENT_API,
                        "metricsListen": f"{host.address}:{AGENT_METRICS_PORT}",
                        "peerPort": AGENT_PEER_PORT,
                        "dataDir": str(self.work / f"data-{generation}-{host.role}"),
                        "registry": f"http://{ORIGIN_IP}:{REGISTRY_PORT}",
                        "proxies": [f"http://{INFRA_IP}:{PROXY_PORT}"],
                        **self.options.agent_settings,
                    },
                    "agent",
                )
            )
        for name, host, config, kind in configs:
            path = self.work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            process = ManagedProcess(
                self.network.exec_argv(host, [*service_command(kind), "--config", str(path)]),
                self.logs / f"{name}-{generation}.log",
                name=name,
                stop_timeout=10.0,
            )
            # Settings come from the config files only: drop P2P_* overrides of the caller.
            process.env = {k: v for k, v in process.env.items() if not k.startswith("P2P_")}
            process.start()
            self.pids.append(process.pid)
            self.services.add(name, process)
        ready = [
            ("tracker", infra, f"http://{INFRA_IP}:{TRACKER_PORT}/readyz"),
            ("proxy", infra, f"http://{INFRA_IP}:{PROXY_PORT}/readyz"),
            *(
                (f"agent-{h.role}", h, f"http://{h.address}:{AGENT_METRICS_PORT}/readyz")
                for h in self.network.nodes
            ),
        ]
        deadline = time.monotonic() + READY_TIMEOUT
        for name, host, url in ready:
            process = self.services.processes[name]
            process.wait_until(
                lambda host=host, url=url: self.network.http(host, url)[0] == 200,  # type: ignore[misc]
                max(1.0, deadline - time.monotonic()),
                f"{url} to answer 200",
                interval=0.1,
                max_interval=0.5,
            )
        time.sleep(1.0)  # let start-up CPU settle before the clock starts

    def _agent_traffic(self) -> dict[str, Traffic]:
        """Every agent's bytes by source, once its counters add up to the whole image (they
        are counted when a download is published, a moment after the client's last byte)."""
        assert self.image is not None
        size = self.image.size
        found: dict[str, Traffic] = {}
        deadline = time.monotonic() + METRICS_TIMEOUT
        for host in self.network.nodes:
            url = f"http://{host.address}:{AGENT_METRICS_PORT}/metrics"

            def read(host: Host = host, url: str = url) -> Traffic | None:
                status, body = self.network.http(host, url)
                if status != 200:
                    return None
                traffic = agent_traffic(parse_metrics(body))
                found[host.role] = traffic
                return traffic if traffic.downloaded >= size else None

            with contextlib.suppress(TimeoutError):
                poll_until(read, max(0.5, deadline - time.monotonic()), f"{url} totals")
        return found

    def _proxy_numbers(self) -> dict[str, float]:
        status, body = self.network.http(
            self.network.infra, f"http://{INFRA_IP}:{PROXY_PORT}/metrics"
        )
        if status != 200:
            return {}
        samples = parse_metrics(body)
        return {
            "origin_bytes": metric(samples, "p2p_proxy_origin_bytes_total"),
            "peer_upload_bytes": metric(samples, "p2p_proxy_peer_upload_bytes_total"),
            # Progressive streams count here too (the proxy's metric includes them).
            "http_bytes": metric(samples, "p2p_proxy_http_fallback_bytes_total")
            + metric(samples, "p2p_proxy_stream_bytes_total"),
            "progressive_streams": metric(samples, "p2p_proxy_progressive_streams_total"),
        }

    # -- cleanup ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process, then delete every namespace (idempotent)."""
        with _sigint_deferred():
            with contextlib.suppress(Exception):
                self.services.stop_all(timeout=2.0)
            for worker in self.workers:
                with contextlib.suppress(Exception):
                    worker.stop()
            if self.registry is not None:
                with contextlib.suppress(Exception):
                    self.registry.stop()
            self.network.close()


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ignore Ctrl-C while cleaning up (main thread only), so a second one cannot leave
    namespaces behind; SIGTERM is handled the same way by :func:`main`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _drop_stale_data(parent: Path) -> None:
    """Delete the data (not the logs) of work directories whose run was killed."""
    for work in parent.glob(f"{WORK_PREFIX}*"):
        match = re.match(re.escape(WORK_PREFIX) + r"(\d+)-", work.name)
        if match is None or _pid_alive(int(match[1])) or not work.is_dir():
            continue
        for path in work.iterdir():
            if path.name == "logs":
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _inherited_tcp_cc() -> str:
    """The congestion control a new network namespace starts with (the machine's)."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "?"


def _preflight() -> None:
    if os.geteuid() != 0:
        raise RolloutError(
            "this benchmark creates network namespaces and needs root; run it as root"
        )
    for binary in ("ip", "tc", "curl", "docker-registry", "skopeo"):
        try:
            require(binary)
        except RuntimeError as exc:
            raise RolloutError(str(exc)) from None


def run(options: Options) -> Report:
    """Run the benchmark and return its :class:`Report`; everything is cleaned up on return,
    on an exception and on KeyboardInterrupt. Raises :class:`RolloutError` when it cannot run
    (no root, no namespaces, a missing program) or when a pull fails."""
    if not 1 <= options.nodes <= MAX_NODES:
        raise RolloutError(f"--nodes must be between 1 and {MAX_NODES}")
    _preflight()
    started = time.monotonic()
    run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
    _drop_stale_data(Path(options.workdir or tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{run_id}-", dir=options.workdir))
    bench = Bench(options, work, run_id)
    ok = False
    try:
        _say(
            options,
            f"bench_rollout: {options.nodes} nodes, {options.rate} per link "
            f"({options.rate_bps / 8 / MB:.1f} MB/s), image {options.size_mb:g} MB in "
            f"{options.layers} layers, {options.rounds} round(s); run {bench.run_id}, work {work}",
        )
        image = bench.setup()
        report = Report(
            run_id=bench.run_id,
            options={k: v for k, v in asdict(options).items() if k != "verbose"},
            rate_bps=options.rate_bps,
            image_bytes=image.size,
            image_blobs=len(image.blobs),
            manifest_digest=image.manifest_digest,
            namespaces=list(bench.network.created),
            commands=list(bench.network.commands),
            tcp_cc=options.tcp_cc or _inherited_tcp_cc(),
            setup_seconds=time.monotonic() - started,
        )
        _say(options, f"  setup: {report.setup_seconds:.1f} s; shaping, per host:")
        for line in _shaping_lines(bench.network):
            _say(options, f"    {line}")
        for number in range(1, options.rounds + 1):
            if options.baseline:
                report.scenarios.append(bench.baseline(number))
            report.scenarios.append(bench.p2p(number))
        report.total_seconds = time.monotonic() - started
        report.pids = list(bench.pids)
        ok = True
        return report
    except ProcessFailedError as exc:
        raise RolloutError(f"{exc}\n(logs in {bench.logs})") from exc
    finally:
        bench.close()
        if ok and not options.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for path in work.iterdir():
                if path.is_dir() and path != bench.logs:
                    shutil.rmtree(path, ignore_errors=True)
            _say(options, f"logs kept in {bench.logs}")


def _shaping_lines(network: Network) -> list[str]:
    node = network.nodes[0]
    lines = [
        " ".join(network.tbf(node.netns, "eth0")) + "   # upload of node1",
        " ".join(network.tbf(network.switch, node.switch_port)) + "   # download of node1",
    ]
    if network.infra_rate_bps != network.rate_bps:
        infra = network.infra
        rate = network.infra_rate_bps
        lines += [
            " ".join(network.tbf(infra.netns, "eth0", rate)) + "   # upload of infra",
            " ".join(network.tbf(network.switch, infra.switch_port, rate))
            + "   # download of infra",
        ]
    return lines


# --- the report ----------------------------------------------------------------------------------


def _fmt(seconds: float) -> str:
    return f"{seconds:7.2f}" if math.isfinite(seconds) else "   fail"


def render(report: Report) -> list[str]:
    """The tables and ratios, as text lines."""
    size = report.image_bytes
    nodes = int(report.options["nodes"])
    lines = [
        "",
        f"image {size / MB:.1f} MB in {report.image_blobs} blobs, {nodes} nodes, "
        f"{report.rate_bps / 1e6:g} Mbit/s per link ({report.rate_bps / 8 / MB:.2f} MB/s) "
        f"both directions; tbf queue {report.options['queue_ms']} ms, TCP {report.tcp_cc}",
        f"ideal: one node size/R = {report.ideal_node:.1f} s; origin-bound baseline "
        f"N*size/R = {report.ideal_baseline:.1f} s",
    ]
    if report.options.get("infra_rate"):
        lines.append(f"the infra host (tracker, proxy) has {report.options['infra_rate']}")
    extra = {
        **{f"agent.{k}": v for k, v in report.options.get("agent_settings", {}).items()},
        **{f"proxy.{k}": v for k, v in report.options.get("proxy_settings", {}).items()},
    }
    if extra:
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    rounds = sorted({s.round for s in report.scenarios})
    for number in rounds:
        base = next((s for s in report.of("baseline") if s.round == number), None)
        p2p = next(s for s in report.of("p2p") if s.round == number)
        lines += [
            "",
            f"round {number}: seconds to the whole image (first byte), per node",
            f"  {'node':<7} {'baseline':>16} {'p2p':>16} {'from agents':>12} "
            f"{'from proxy':>11} {'fallback':>9} {'agent CPU':>9}",
        ]
        for index, node in enumerate(p2p.nodes):
            traffic = node.traffic or {}
            b = base.nodes[index] if base else None
            lines.append(
                f"  {node.node:<7} "
                + (f"{_fmt(b.seconds)} ({_fmt(b.first_byte).strip():>5})" if b else f"{'-':>16}")
                + f" {_fmt(node.seconds)} ({_fmt(node.first_byte).strip():>5})"
                + f" {traffic.get('from_agents', 0) / MB:9.1f} MB"
                + f" {traffic.get('from_proxies', 0) / MB:8.1f} MB"
                + f" {traffic.get('from_http_fallback', 0) / MB:6.1f} MB"
                + f" {node.cpu_agent:8.1f}s"
            )
    lines += ["", _summary_header()]
    for scenario in ("baseline", "p2p"):
        for result in report.of(scenario):
            lines.append(_summary_line(result, size, report.cpus))
    base_slowest = [s.slowest for s in report.of("baseline")]
    p2p_slowest = [s.slowest for s in report.of("p2p")]
    p2p_median = [s.median for s in report.of("p2p")]
    lines.append("")
    if base_slowest:
        lines.append(
            f"baseline slowest / p2p slowest (median over rounds): "
            f"{statistics.median(base_slowest) / statistics.median(p2p_slowest):.2f}x"
            f"   per round: "
            + ", ".join(f"{b / p:.2f}x" for b, p in zip(base_slowest, p2p_slowest, strict=True))
        )
    for result in report.of("p2p"):
        bt = result.proxy.get("peer_upload_bytes", 0.0)
        http = result.proxy.get("http_bytes", 0.0)
        lines.append(
            f"p2p {result.round}: the proxy uploaded {bt / MB:.0f} MB over BitTorrent + "
            f"{http / MB:.0f} MB over HTTP (progressive streams and fallback) = "
            f"{(bt + http) / size:.2f} copies of the image"
        )
    lines.append(
        f"p2p slowest vs ideal size/R: {statistics.median(p2p_slowest) / report.ideal_node:.2f}x"
        f"; p2p tail (slowest / median): "
        f"{statistics.median(p2p_slowest) / statistics.median(p2p_median):.2f}"
    )
    return lines


def _summary_header() -> str:
    return (
        f"  {'scenario':<10} {'slowest':>8} {'median':>8} {'tail':>5} {'origin sent':>13} "
        f"{'from agents':>12} {'from proxy':>11} {'fallback':>9} {'our CPU':>8} "
        f"{'machine':>8}  verified"
    )


def _summary_line(result: ScenarioResult, size: int, cpus: int) -> str:
    ours = sum(v for k, v in result.cpu.items() if k != "machine")
    pulled = sum(n.bytes for n in result.nodes) or 1
    agents = result.traffic_total("from_agents")
    proxies = result.traffic_total("from_proxies")
    fallback = result.traffic_total("from_http_fallback")
    peer_cols = (
        f"{agents / pulled:11.0%} {proxies / pulled:10.0%} {fallback / pulled:8.0%}"
        if result.scenario == "p2p"
        else f"{'-':>11} {'-':>10} {'-':>8}"
    )
    return (
        f"  {result.scenario + ' ' + str(result.round):<10} {_fmt(result.slowest):>8} "
        f"{_fmt(result.median):>8} {result.slowest / result.median:5.2f} "
        f"{result.origin_blob_bytes / MB:7.1f} MB {result.origin_blob_bytes / size:4.2f}x "
        f"{peer_cols} {ours:7.1f}s {result.machine_busy * cpus:4.2f}/{cpus}  "
        f"{'yes' if result.verified else 'NO'}"
    )


# --- command line --------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Options | None]:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_rollout",
        description="N emulated nodes (network namespaces, shaped links) pull one image at once: "
        "straight from the origin, then through their p2p agents (see docs/rollout.md).",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=8, help="emulated nodes (default 8)")
    parser.add_argument(
        "--rate", default="100mbit", help="every link, both directions (tc syntax; 100mbit)"
    )
    parser.add_argument(
        "--infra-rate", help="the tracker+proxy host's link (default: --rate), e.g. 1gbit"
    )
    parser.add_argument(
        "--queue-ms", type=int, default=QUEUE_MS, help="tbf latency: queue bound per link (50)"
    )
    parser.add_argument(
        "--tcp-cc", help="TCP congestion control in every namespace (default: inherited)"
    )
    parser.add_argument("--size-mb", type=float, default=160.0, help="image size (160 MB)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the image (4)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of baseline + p2p (1)")
    parser.add_argument("--concurrency", type=int, default=3, help="blobs at once per client")
    parser.add_argument("--no-baseline", action="store_true", help="only the p2p scenario")
    parser.add_argument("--workdir", default=default_workdir(), help="where files go (tmpfs)")
    parser.add_argument("--keep", action="store_true", help="keep the logs of a good run too")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument(
        "--agent-set", action="append", default=[], metavar="KEY=VALUE",
        help="extra agent setting (YAML value), e.g. fallbackAfter=5",
    )  # fmt: skip
    parser.add_argument(
        "--proxy-set", action="append", default=[], metavar="KEY=VALUE",
        help="extra proxy setting (YAML value), e.g. progressiveStreams=0",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.worker:
        return args, None
    try:
        parse_rate(args.rate)
        if args.infra_rate:
            parse_rate(args.infra_rate)
    except ValueError as exc:
        parser.error(str(exc))
    if not 1 <= args.queue_ms <= 1000:
        parser.error("--queue-ms must be between 1 and 1000")
    if args.size_mb <= 0 or args.layers < 1 or args.rounds < 1 or args.concurrency < 1:
        parser.error("--size-mb, --layers, --rounds and --concurrency must be positive")

    def settings(pairs: list[str]) -> dict[str, Any]:
        found = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                parser.error(f"not KEY=VALUE: {pair!r}")
            found[key] = yaml.safe_load(value)
        return found

    options = Options(
        nodes=args.nodes,
        rate=args.rate,
        infra_rate=args.infra_rate,
        queue_ms=args.queue_ms,
        tcp_cc=args.tcp_cc,
        size_mb=args.size_mb,
        layers=args.layers,
        rounds=args.rounds,
        concurrency=args.concurrency,
        baseline=not args.no_baseline,
        workdir=args.workdir,
        keep=args.keep,
        agent_settings=settings(args.agent_set),
        proxy_settings=settings(args.proxy_set),
    )
    return args, options


class _Terminated(KeyboardInterrupt):
    """SIGTERM arrived (handled like Ctrl-C: everything is cleaned up)."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0 when every node got the image, 1 on a failure, 2 when the
    benchmark cannot run here, 130/143 when interrupted by SIGINT/SIGTERM."""
    args, options = _parse(argv)
    if options is None:
        return worker_main()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        report = run(options)
    except RolloutError as exc:
        print(f"bench_rollout: {exc}", file=sys.stderr)
        return 2 if "cannot create network namespaces" in str(exc) or "root" in str(exc) else 1
    except KeyboardInterrupt as exc:
        print("bench_rollout: interrupted; everything was cleaned up", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    for line in render(report):
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2, default=str))
    failed = [
        f"{s.scenario} round {s.round} {n.node}: {'; '.join(n.problems) or 'not verified'}"
        for s in report.scenarios
        for n in s.nodes
        if not n.verified
    ]
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
