"""One run of the rollout benchmark: the network, the origin and its image, the pull clients,
the scenarios (baseline, p2p, p2p-warm, libtorrent), the CPU quotas, and the cleanup of all of
it."""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from p2p_common import metainfo as mi
from tests.bench.common import RandomImage, warm_memory
from tests.bench.rollout.cgroups import PERIOD_US, CpuQuotas, remove_stale_cgroups
from tests.bench.rollout.client import PullWorker
from tests.bench.rollout.image import REPOSITORY, TAG, build_layout
from tests.bench.rollout.lt_node import LIBTORRENT_VERSION, LtNode, session_settings
from tests.bench.rollout.netns import (
    INFRA_IP,
    ORIGIN_IP,
    Host,
    Network,
    RolloutError,
    pid_alive,
    remove_stale_namespaces,
    run_ip,
)
from tests.bench.rollout.results import MB, NodeResult, Options, Report, ScenarioResult
from tests.demo.cluster import Kind, ProcessSet, service_command
from tests.demo.report import Traffic, agent_traffic, metric, parse_metrics
from tests.realparts.procs import ManagedProcess, ProcessFailedError, poll_until, require
from tests.realparts.registry import count_blob_gets, parse_access_log, registry_config

CLK_TCK = os.sysconf("SC_CLK_TCK")
WORK_PREFIX = "p2p-bench-rollout-"
"""Work directories are ``p2p-bench-rollout-<pid>-<random>-…`` under ``--workdir``."""
REGISTRY_PORT, TRACKER_PORT, PROXY_PORT, PROXY_PEER_PORT = 5000, 6969, 5005, 6882
AGENT_API, AGENT_PEER_PORT, AGENT_METRICS_PORT = "127.0.0.1:5004", 6881, 5014
MAX_NODES = 200
READY_TIMEOUT = 90.0
METRICS_TIMEOUT = 20.0
START_DELAY = 0.5
"""Seconds between sending the pull commands and the common start instant."""
LT_START_DELAY = 1.0
"""The same for the libtorrent leechers (their loop may see a command up to 0.25 s late)."""
SEED_TIMEOUT = 20.0
"""Seconds for a warm seed's announces to reach the tracker before the clock starts."""

Pull = Callable[[], tuple[list[NodeResult], float]]
"""Runs one scenario's downloads everywhere: (every node's result, the common start instant)."""


def _say(options: Options, text: str) -> None:
    if options.verbose:
        print(text, flush=True)


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


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
        self.image: RandomImage | None = None
        self.pids: list[int] = []
        """Every process started, for the report."""
        self._generation = 0
        self.quotas = (
            CpuQuotas(run_id, options.cpu_quota) if options.cpu_quota is not None else None
        )
        self.seed_dir = work / "seed-blobs"
        """The libtorrent seed's data: every blob of the image, named by digest."""
        self.torrents: dict[str, mi.Metainfo] = {}
        """The libtorrent scenario's metainfo, by blob digest (our deterministic builder)."""

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> RandomImage:
        """Build the network, start the origin and push the image, start the pull clients."""
        stale = remove_stale_namespaces()
        if stale:
            _say(self.options, f"removed {len(stale)} namespaces of a crashed run: {stale}")
        stale = remove_stale_cgroups()
        if stale:
            _say(self.options, f"removed {len(stale)} cgroups of a crashed run: {stale}")
        if self.quotas is not None:  # before anything else: no quota, no run
            self.quotas.create([host.role for host in self.network.nodes])
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

    def _push_image(self) -> RandomImage:
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
        if "libtorrent" in self.options.scenario_list:
            self._keep_seed_blobs(layout, image)
        shutil.rmtree(layout)
        return image

    def _keep_seed_blobs(self, layout: Path, image: RandomImage) -> None:
        """Move every blob out of the layout for the libtorrent seed and build its metainfo
        (piece length and info dictionary as the proxy builds them; the infra host's tracker
        as the announce URL)."""
        self.seed_dir.mkdir()
        announce = f"http://{INFRA_IP}:{TRACKER_PORT}/announce"
        for digest in image.blobs:
            target = self.seed_dir / digest  # the metainfo's name is the digest
            (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).rename(target)
            pieces, whole, length = mi.hash_file(target, mi.piece_length_for(image.blobs[digest]))
            if whole != digest or length != image.blobs[digest]:
                raise RolloutError(f"blob {digest} of the layout hashes to {whole}")
            self.torrents[digest] = mi.build(digest, length, pieces, [announce])

    # -- measurement helpers ------------------------------------------------------------------

    def _registry_log(self) -> str:
        assert self.registry is not None
        return self.registry.log_path.read_text(errors="replace")

    def _sync_registry_log(self) -> None:
        """Wait until the access log holds every request answered so far (a marker request)."""
        assert self.registry is not None
        marker = uuid.uuid4().hex
        url = f"http://{ORIGIN_IP}:{REGISTRY_PORT}/v2/?p2p-log-marker={marker}"
        # A loaded machine (dozens of nodes on two cores) can lose the first SYN or answer
        # late: ask again until the registry answers, then wait for its log line.
        for _ in range(5):
            status, _body = self.network.http(self.network.nodes[0], url, timeout=10.0)
            if status == 200:
                break
        else:
            raise RolloutError(f"the registry never answered the log marker request ({url})")
        self.registry.wait_until(
            lambda: marker in self._registry_log(), 30.0, "the marker in the access log"
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

    def _cpu_split(self) -> dict[str, tuple[float, float]]:
        """(user, system) CPU seconds of every running process, from /proc."""
        found = {}
        for name, process in self._processes().items():
            with contextlib.suppress(OSError, ValueError, IndexError, RuntimeError):
                stat = Path(f"/proc/{process.pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                found[name] = (int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK)
        return found

    def _deadline(self) -> float:
        """Generous bound for a scenario: twice the origin-bound ideal, plus a minute."""
        assert self.image is not None
        ideal = self.options.nodes * self.image.size * 8 / self.options.rate_bps
        return time.monotonic() + 2 * ideal + 60

    def _pull_everywhere(self, base: str) -> tuple[list[NodeResult], float]:
        """Every client pulls from ``base`` starting at one instant; (results, common start)."""
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
        return [self._node_result(a) for a in answers], at

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

    def _link_counters(self) -> dict[str, int]:
        """What every host's upload token bucket has sent and dropped so far, together."""
        total: dict[str, int] = {}
        for host in self.network.hosts:
            for key, value in self.network.egress_counters(host).items():
                total[key] = total.get(key, 0) + value
        return total

    def _throttled(self) -> dict[str, float]:
        """Seconds each node's cgroup has been throttled so far (none without a quota)."""
        if self.quotas is None:
            return {}
        return {
            node: stat.get("throttled_time", 0) / 1e9
            for node, stat in self.quotas.throttled().items()
        }

    def _measure(
        self,
        scenario: str,
        round_number: int,
        pull: Pull,
        extra: Callable[[], None] | None = None,
    ) -> tuple[ScenarioResult, dict[str, float]]:
        """Run one download everywhere (``pull``) and account for it (origin bytes, CPU);
        ``extra`` runs after the CPU is sampled."""
        self._sync_registry_log()
        log_offset = len(self._registry_log())
        throttled_before = self._throttled()
        links_before = self._link_counters()
        split_before = self._cpu_split()
        cpu_before, machine_before = self._cpu(), _machine_jiffies()
        nodes, at = pull()
        wall = time.monotonic() - at
        cpu_after, machine_after = self._cpu(), _machine_jiffies()
        split_after = self._cpu_split()
        throttled_after = self._throttled()
        links_after = self._link_counters()
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
        cpu_split: dict[str, dict[str, float]] = {}
        for name, (user, system) in split_after.items():
            group = cpu_split.setdefault(name.split("-")[0], {"user": 0.0, "system": 0.0})
            user_before, system_before = split_before.get(name, (0.0, 0.0))
            group["user"] += user - user_before
            group["system"] += system - system_before
        result = ScenarioResult(
            scenario=scenario,
            round=round_number,
            nodes=nodes,
            origin_blob_bytes=sum(e.size for e in blob_entries),
            origin_blob_gets=sum(count_blob_gets(entries).values()),
            origin_manifest_requests=dict(
                collections.Counter(e.method for e in entries if "/manifests/" in e.path)
            ),
            wall=wall,
            cpu=cpu,
            machine_busy=busy / total if total else 0.0,
            cpu_split=cpu_split,
            links={key: value - links_before.get(key, 0) for key, value in links_after.items()},
        )
        for node in result.nodes:
            node.throttled = throttled_after.get(node.node, 0.0) - throttled_before.get(
                node.node, 0.0
            )
        per_process = {name: after - cpu_before.get(name, 0.0) for name, after in cpu_after.items()}
        return result, per_process

    # -- scenarios ----------------------------------------------------------------------------

    def run_scenario(self, scenario: str, round_number: int) -> ScenarioResult:
        """One scenario by name (see :data:`tests.bench.rollout.results.SCENARIOS`)."""
        if scenario == "baseline":
            return self.baseline(round_number)
        if scenario == "p2p":
            return self.p2p(round_number)
        if scenario == "p2p-warm":
            return self.p2p(round_number, warm=True)
        if scenario == "libtorrent":
            return self.libtorrent(round_number)
        raise ValueError(f"unknown scenario {scenario!r}")

    def baseline(self, round_number: int) -> ScenarioResult:
        """Every node straight from the origin, at once."""
        _say(self.options, f"  round {round_number}: baseline (every node from the origin)")
        base = f"http://{ORIGIN_IP}:{REGISTRY_PORT}"
        result, _ = self._measure("baseline", round_number, lambda: self._pull_everywhere(base))
        return result

    def p2p(self, round_number: int, *, warm: bool = False) -> ScenarioResult:
        """Fresh tracker, proxy and agents; every node through its own agent, at once. ``warm``:
        the proxy fetches the manifest and every blob (and seeds them) before the clock."""
        name = "p2p-warm" if warm else "p2p"
        _say(
            self.options,
            f"  round {round_number}: {name} (every node through its agent"
            + (", the proxy holding the image already)" if warm else ")"),
        )
        self._generation += 1
        self._start_services(self._generation)
        traffic: dict[str, Traffic] = {}
        proxy: dict[str, float] = {}
        before: dict[str, float] = {}
        tracker: dict[str, float] = {}
        notes: list[str] = []

        def collect() -> None:
            traffic.update(self._agent_traffic())
            proxy.update(self._proxy_numbers())
            tracker.update(self._tracker_announces())

        try:
            if warm:
                notes += self._preheat()
                before = self._proxy_numbers()
            result, per_process = self._measure(
                name, round_number, lambda: self._pull_everywhere(f"http://{AGENT_API}"), collect
            )
        except BaseException:
            self._stop_services(grace=2.0)  # failing or interrupted: do not wait for pulls
            raise
        self._stop_services(grace=15.0)
        for node in result.nodes:
            if node.node in traffic:
                node.traffic = traffic[node.node].to_json()
            node.cpu_agent = per_process.get(f"agent-{node.node}", 0.0)
        result.proxy = {key: value - before.get(key, 0.0) for key, value in proxy.items()}
        if warm:
            result.proxy["preheat_origin_bytes"] = before.get("origin_bytes", 0.0)
        result.seed = {
            "cpu": per_process.get("proxy", 0.0),
            "uploaded": result.proxy.get("peer_upload_bytes", 0.0)
            + result.proxy.get("http_bytes", 0.0),
            "downloaded": result.proxy.get("origin_bytes", 0.0),
        }
        result.notes = notes
        result.tracker = tracker
        return result

    def _preheat(self) -> list[str]:
        """Make the proxy hold the image before the clock, the way an operator would: a
        preheat job (``POST /p2p/v1/preheat``, what ``p2p-proxy preheat`` sends), asked from
        the infra host itself, so no agent's cache is touched; then wait for it to finish."""
        assert self.image is not None
        started = time.monotonic()
        infra, api = self.network.infra, f"http://{INFRA_IP}:{PROXY_PORT}/p2p/v1/preheat"
        body = json.dumps({"image": f"{REPOSITORY}:{TAG}"})
        out = run_ip(
            self.network.exec_argv(
                infra,
                [
                    require("curl"), "-s", "-m", "30", "-X", "POST",
                    "-H", "Content-Type: application/json", "-d", body,
                    "-w", "\n%{http_code}", api,
                ],
            ),
            check=False,
            timeout=40,
        )  # fmt: skip
        answer, _, status = out.rpartition("\n")
        if status.strip() != "202":
            raise RolloutError(f"preheat: POST {api} answered {status.strip()}: {answer}")
        job = json.loads(answer)
        slowest = min(self.options.rate_bps, self.options.infra_rate_bps)
        deadline = time.monotonic() + 3 * sum(self.image.blobs.values()) * 8 / slowest + 60
        while job.get("state") not in ("done", "failed"):
            if time.monotonic() > deadline:
                raise RolloutError(f"preheat: still {job.get('state')} at the deadline")
            time.sleep(0.2)
            code, text = self.network.http(infra, f"{api}/{job['id']}", timeout=10.0)
            if code == 200:
                job = json.loads(text)
        if job["state"] != "done":
            raise RolloutError(f"preheat failed: {job.get('error')}")
        if {b["digest"] for b in job["blobs"]} != set(self.image.blobs):
            raise RolloutError("preheat: the job's blobs are not the image's")
        seconds = time.monotonic() - started
        _say(self.options, f"    preheat: the proxy fetched the image in {seconds:.1f} s")
        notes = [f"preheat (POST /p2p/v1/preheat): the proxy had the image in {seconds:.1f} s"]
        if not self._wait_tracker_announces(len(self.image.blobs)):
            notes.append("preheat: the tracker had not seen every blob announced at the start")
        time.sleep(1.0)  # let the fetch's CPU settle before the clock
        return notes

    def _tracker_announces(self) -> dict[str, float]:
        """The announces the tracker has answered so far, by event (``none``, ``started``...)."""
        status, body = self.network.http(
            self.network.infra, f"http://{INFRA_IP}:{TRACKER_PORT}/metrics"
        )
        if status != 200:
            return {}
        found: dict[str, float] = {}
        for name, labels, value in parse_metrics(body):
            if name == "p2p_tracker_announces_total":
                event = labels.get("event", "?")
                found[event] = found.get(event, 0.0) + value
        return found

    def _wait_tracker_announces(self, expected: int) -> bool:
        """Wait until the tracker has answered ``expected`` announces (the seed's, one a blob)."""
        url = f"http://{INFRA_IP}:{TRACKER_PORT}/metrics"

        def enough() -> bool:
            status, body = self.network.http(self.network.infra, url)
            return status == 200 and (
                metric(parse_metrics(body), "p2p_tracker_announces_total") >= expected
            )

        try:
            poll_until(enough, SEED_TIMEOUT, f"{expected} announces", interval=0.1)
        except TimeoutError:
            return False
        return True

    def libtorrent(self, round_number: int) -> ScenarioResult:
        """Fresh tracker, a libtorrent seed holding every blob on the infra host, a libtorrent
        leecher per node; every leecher downloads every blob, all at once."""
        _say(
            self.options,
            f"  round {round_number}: libtorrent (a libtorrent leecher per node, a warm "
            "libtorrent seed)",
        )
        self._generation += 1
        generation = self._generation
        statuses: dict[str, dict[str, Any]] = {}
        seed_after: dict[str, Any] = {}
        results: list[NodeResult] = []
        late: dict[str, float] = {}
        tracker: dict[str, float] = {}
        notes: list[str] = []
        try:
            self._start_services(generation, proxy_and_agents=False)
            seed, leechers = self._start_libtorrent(generation)
            if not self._wait_tracker_announces(len(self.torrents)):
                notes.append("the tracker had not seen the seed announce every blob at the start")
            time.sleep(1.0)  # let start-up CPU settle before the clock starts
            seed_before = seed.status()

            def pull() -> tuple[list[NodeResult], float]:
                at = time.monotonic() + LT_START_DELAY
                deadline = self._deadline()
                for leecher in leechers.values():
                    leecher.send({"op": "start", "at": at, "seed": [INFRA_IP, PROXY_PEER_PORT]})
                for role, leecher in leechers.items():
                    answer = leecher.receive(deadline)
                    results.append(self._lt_node_result(role, answer))
                    if answer.get("ok"):
                        late[role] = float(answer["done"].get("late", 0.0))
                    _say(
                        self.options,
                        f"    {role:<7} "
                        + (
                            f"{answer['done']['seconds']:7.2f} s"
                            if answer.get("ok")
                            else f"FAILED: {answer.get('error')}"
                        ),
                    )
                return results, at

            def collect() -> None:
                tracker.update(self._tracker_announces())
                seed_after.update(seed.status())
                for role, leecher in leechers.items():
                    statuses[role] = leecher.status()
                self._verify_lt(generation, results)

            result, per_process = self._measure("libtorrent", round_number, pull, collect)
        except BaseException:
            self._stop_services(grace=2.0)
            raise
        self._stop_services(grace=5.0)
        for node in result.nodes:
            node.cpu_agent = per_process.get(f"ltpeer-{node.node}", 0.0)
            if node.node in statuses:
                node.traffic = _lt_traffic(statuses[node.node], node)
        uploaded = _lt_total(seed_after, "total_payload_upload") - _lt_total(
            seed_before, "total_payload_upload"
        )
        result.seed = {"cpu": per_process.get("ltseed", 0.0), "uploaded": float(uploaded)}
        failures = sum(int(s.get("hash_failures", 0)) for s in statuses.values())
        redundant = sum(_lt_total(s, "total_redundant_bytes") for s in statuses.values())
        peers = sorted(
            max((int(b.get("peers_max", 0)) for b in n.blobs.values()), default=0)
            for n in result.nodes
        )
        notes.append(
            f"leechers: {failures} hash failures, {redundant / MB:.1f} MB redundant; started "
            f"at most {max(late.values(), default=0.0) * 1000:.1f} ms after the common instant; "
            f"connected to {peers[0]}-{peers[-1]} peers at most (of {len(peers) - 1} other "
            "leechers and the seed)"
        )
        result.notes = notes
        result.tracker = tracker
        return result

    def _start_libtorrent(self, generation: int) -> tuple[LtNode, dict[str, LtNode]]:
        """Start the seed (infra host) and a leecher per node; wait until all are ready."""
        torrent_dir = self.work / "torrents"
        torrent_dir.mkdir(exist_ok=True)
        blobs = []
        for digest, meta in self.torrents.items():
            path = torrent_dir / f"{digest.removeprefix('sha256:')}.torrent"
            path.write_bytes(meta.to_bytes())
            blobs.append({"digest": digest, "size": meta.length, "metainfo_path": str(path)})
        peers: list[tuple[LtNode, Host]] = []
        roles = [("ltseed", self.network.infra, True)] + [
            (f"ltpeer-{host.role}", host, False) for host in self.network.nodes
        ]
        for name, host, is_seed in roles:
            save = self.seed_dir if is_seed else self.work / f"data-{generation}-lt-{host.role}"
            save.mkdir(exist_ok=True)
            config = {
                "seed": is_seed,
                "host": host.address,
                "port": PROXY_PEER_PORT if is_seed else AGENT_PEER_PORT,
                "save_path": str(save),
                "torrents": blobs,
                "settings": dict(self.options.lt_settings),
                "super_seeding": is_seed and self.options.lt_super_seed,
                "start_timeout": READY_TIMEOUT,
            }
            path = self.work / f"{name}-{generation}.json"
            path.write_text(json.dumps(config, indent=1))
            node = LtNode(
                self.network.exec_argv(host, LtNode.command(path)),
                self.logs / f"{name}-{generation}.log",
                name,
                config,
            )
            node.start()
            self.pids.append(node.process.pid)
            self.services.add(name, node.process)
            if not is_seed and self.quotas is not None:
                self.quotas.add(host.role, node.process.pid)
            peers.append((node, host))
        deadline = time.monotonic() + READY_TIMEOUT
        for node, _host in peers:
            node.wait_ready(deadline)
        seed = peers[0][0]
        return seed, {host.role: node for node, host in peers[1:]}

    def _lt_node_result(self, role: str, answer: dict[str, Any]) -> NodeResult:
        if not answer.get("ok"):
            return NodeResult(role, math.inf, math.inf, 0, False, [str(answer.get("error"))])
        done = answer["done"]
        return NodeResult(
            role,
            float(done["seconds"]),
            float(done["first_byte"]),
            int(done["bytes"]),
            False,  # until _verify_lt has hashed the files
            blobs=dict(done["blobs"]),
        )

    def _verify_lt(self, generation: int, results: list[NodeResult]) -> None:
        """Check every leecher's files: each blob has its size and sha256 digest (after the
        clock and the CPU samples: this hashing is ours, not libtorrent's)."""
        assert self.image is not None
        for node in results:
            if not math.isfinite(node.seconds):
                continue
            directory = self.work / f"data-{generation}-lt-{node.node}"
            for digest, size in self.image.blobs.items():
                path = directory / digest
                ok = False
                if not path.is_file():
                    node.problems.append(f"{digest} not downloaded")
                elif path.stat().st_size != size:
                    node.problems.append(f"{digest}: {path.stat().st_size} bytes, not {size}")
                else:
                    got = "sha256:" + _sha256_file(path)
                    ok = got == digest
                    if not ok:
                        node.problems.append(f"{digest}: the bytes hash to {got}")
                if digest in node.blobs:
                    node.blobs[digest]["ok"] = ok
            node.verified = not node.problems

    def _stop_services(self, grace: float) -> None:
        """Stop tracker, proxy and agents (or libtorrent peers): SIGTERM, ``grace`` seconds,
        SIGKILL; drop their data directories."""
        with _sigint_deferred():
            self.services.stop_all(timeout=grace)
        self.services = ProcessSet()
        for path in self.work.glob(f"data-{self._generation}-*"):
            shutil.rmtree(path, ignore_errors=True)

    def _start_services(self, generation: int, *, proxy_and_agents: bool = True) -> None:
        """Start the tracker and (unless told otherwise) the proxy and an agent per node; wait
        until every one is ready."""
        infra = self.network.infra
        announce = f"http://{INFRA_IP}:{TRACKER_PORT}/announce"
        configs: list[tuple[str, Host, dict[str, Any], Kind]] = [
            ("tracker", infra, {"listen": f"{INFRA_IP}:{TRACKER_PORT}"}, "tracker"),
        ]
        if proxy_and_agents:
            configs.append(
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
                )
            )
        for host in self.network.nodes if proxy_and_agents else []:
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
            if kind == "agent" and self.quotas is not None:
                self.quotas.add(host.role, process.pid)
        ready = [
            ("tracker", infra, f"http://{INFRA_IP}:{TRACKER_PORT}/readyz"),
        ]
        if proxy_and_agents:
            ready += [
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
        if proxy_and_agents:
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
            if self.quotas is not None:
                left = self.quotas.close()
                if left:
                    _say(self.options, f"could not remove the cgroups {left}")
            self.network.close()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _lt_total(status: dict[str, Any], key: str) -> int:
    """The sum of ``key`` over every torrent of a libtorrent worker's status."""
    return sum(int(t.get(key, 0)) for t in status.get("torrents", {}).values())


def _lt_traffic(status: dict[str, Any], node: NodeResult) -> dict[str, Any]:
    """A leecher's bytes in the keys of ``Traffic.to_json``: ``from_proxies`` is what came from
    the seed (its connections to the seed, sampled while downloading), ``from_agents`` the rest
    (other leechers); ``downloaded`` and ``uploaded`` are libtorrent's payload counters."""
    downloaded = _lt_total(status, "total_payload_download")
    from_seed = min(downloaded, sum(int(b.get("from_seed", 0)) for b in node.blobs.values()))
    return {
        "sources": {"seed": from_seed, "leechers": downloaded - from_seed},
        "from_agents": downloaded - from_seed,
        "from_proxies": from_seed,
        "from_http_fallback": 0,
        "downloaded": downloaded,
        "uploaded": _lt_total(status, "total_payload_upload"),
        "redundant": _lt_total(status, "total_redundant_bytes"),
        "failed": _lt_total(status, "total_failed_bytes"),
        "hash_failures": int(status.get("hash_failures", 0)),
        "with_overhead": {
            "downloaded": _lt_total(status, "total_download"),
            "uploaded": _lt_total(status, "total_upload"),
        },
    }


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
        if match is None or pid_alive(int(match[1])) or not work.is_dir():
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


def _libtorrent_info(options: Options) -> dict[str, Any]:
    """The libtorrent version and the session settings the ``libtorrent`` scenario passes (the
    leechers'; the seed's differ only in its listen address)."""
    settings = session_settings("10.77.0.11", AGENT_PEER_PORT, options.lt_settings)
    return {
        "version": LIBTORRENT_VERSION,
        "settings": settings,
        "seed_super_seeding": options.lt_super_seed,
    }


def run(options: Options) -> Report:
    """Run the benchmark and return its :class:`Report`; everything is cleaned up on return,
    on an exception and on KeyboardInterrupt. Raises :class:`RolloutError` when it cannot run
    (no root, no namespaces, a missing program) or when a pull fails."""
    if not 1 <= options.nodes <= MAX_NODES:
        raise RolloutError(f"--nodes must be between 1 and {MAX_NODES}")
    if not options.scenario_list:
        raise RolloutError("no scenario to run")
    _preflight()
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
    _drop_stale_data(Path(options.workdir or tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{run_id}-", dir=options.workdir))
    # Every node's copy, the proxy's, the origin's and the image layout, twice over.
    warm_memory(work, int(2 * (options.nodes + 3) * options.size_mb * MB))
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
            started_at=started_at,
        )
        if "libtorrent" in options.scenario_list:
            report.libtorrent = _libtorrent_info(options)
        if bench.quotas is not None:
            report.cpu_quota = {
                "cores": bench.quotas.cores,
                "cfs_quota_us": bench.quotas.quota_us,
                "cfs_period_us": PERIOD_US,
                "cgroups": [str(path) for path in bench.quotas.groups.values()],
            }
        _say(options, f"  setup: {report.setup_seconds:.1f} s; shaping, per host:")
        for line in _shaping_lines(bench.network):
            _say(options, f"    {line}")
        for number in range(1, options.rounds + 1):
            for scenario in options.scenario_list:
                report.scenarios.append(bench.run_scenario(scenario, number))
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
