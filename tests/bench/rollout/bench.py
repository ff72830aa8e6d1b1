"""One run of the rollout benchmark: the network, the origin and its image, the pull clients,
the baseline and p2p scenarios, and the cleanup of all of it."""

from __future__ import annotations

import collections
import contextlib
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

from tests.bench.common import RandomImage
from tests.bench.rollout.client import PullWorker
from tests.bench.rollout.image import REPOSITORY, TAG, build_layout
from tests.bench.rollout.netns import (
    INFRA_IP,
    ORIGIN_IP,
    Host,
    Network,
    RolloutError,
    pid_alive,
    remove_stale_namespaces,
)
from tests.bench.rollout.results import MB, NodeResult, Options, Report, ScenarioResult
from tests.demo.cluster import Kind, ProcessSet, service_command
from tests.demo.report import Traffic, agent_traffic, metric, parse_metrics
from tests.realparts.procs import ManagedProcess, ProcessFailedError, poll_until, require
from tests.realparts.registry import count_blob_gets, parse_access_log, registry_config

WORK_PREFIX = "p2p-bench-rollout-"
"""Work directories are ``p2p-bench-rollout-<pid>-<random>-…`` under ``--workdir``."""
REGISTRY_PORT, TRACKER_PORT, PROXY_PORT, PROXY_PEER_PORT = 5000, 6969, 5005, 6882
AGENT_API, AGENT_PEER_PORT, AGENT_METRICS_PORT = "127.0.0.1:5004", 6881, 5014
MAX_NODES = 200
READY_TIMEOUT = 90.0
METRICS_TIMEOUT = 20.0
START_DELAY = 0.5
"""Seconds between sending the pull commands and the common start instant."""


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

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> RandomImage:
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
            origin_manifest_requests=dict(
                collections.Counter(e.method for e in entries if "/manifests/" in e.path)
            ),
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
