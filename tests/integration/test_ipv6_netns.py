"""An IPv6-only cluster in network namespaces: the real services as processes, with the
settings the chart gives them (``:port`` listeners), on hosts that have IPv6 addresses only.

Five namespaces on one bridge: ``origin`` (the distribution registry), ``infra`` (p2p-tracker
and p2p-proxy), ``n1`` and ``n2`` (one p2p-agent each), ``sw`` (the bridge). The links carry
IPv6 only (``fd77::<n>/64``; loopbacks keep 127.0.0.1, as Linux nodes of IPv6-only clusters
do), so every announce, proxy request and peer connection between hosts goes over IPv6. The
second node must get the blob from the first (BitTorrent between ``fd77::3`` and ``fd77::4``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.realparts import images
from tests.realparts.procs import ManagedProcess, require
from tests.services import service_binary, service_env

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
HOSTS = {"origin": 1, "infra": 2, "n1": 3, "n2": 4}
REGISTRY_PORT, TRACKER_PORT, PROXY_PORT = 5000, 6969, 5005


def address(host: str) -> str:
    return f"fd77::{HOSTS[host]}"


def ip(*argv: str) -> None:
    subprocess.run([require("ip"), *argv], check=True, capture_output=True, timeout=20)


@dataclass
class Net:
    prefix: str

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        return [require("ip"), "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: list[str], timeout: float = 60) -> str:
        done = subprocess.run(
            self.exec_argv(host, argv),
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise AssertionError(f"{host}: {' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout


@contextmanager
def ipv6_network() -> Iterator[Net]:
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root")
    net = Net(f"p2p6-{os.getpid() % 100000}")
    tag = f"p6{os.getpid() % 100000}"  # interface names stay within 15 characters
    made: list[str] = []
    try:
        for host in ("sw", *HOSTS):
            ip("netns", "add", net.ns(host))
            made.append(net.ns(host))
            ip("-n", net.ns(host), "link", "set", "lo", "up")
        ip("-n", net.ns("sw"), "link", "add", "br0", "type", "bridge")
        ip("-n", net.ns("sw"), "link", "set", "br0", "up")
        for host, n in HOSTS.items():
            inner, outer = f"{tag}h{n}", f"{tag}s{n}"
            ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            ip("link", "set", inner, "netns", net.ns(host))
            ip("link", "set", outer, "netns", net.ns("sw"))
            ip("-n", net.ns("sw"), "link", "set", outer, "master", "br0", "up")
            ip("-n", net.ns(host), "link", "set", inner, "name", "eth0")
            ip("-n", net.ns(host), "link", "set", "eth0", "up")
            ip("-n", net.ns(host), "addr", "add", f"{address(host)}/64", "dev", "eth0", "nodad")
        yield net
    finally:
        for name in reversed(made):
            subprocess.run([require("ip"), "netns", "del", name], capture_output=True, check=False)


def write(path: Path, doc: object) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def service(
    net: Net, stack: ExitStack, host: str, name: str, config: Path, workdir: Path
) -> ManagedProcess:
    argv = net.exec_argv(host, [service_binary(name), "--config", str(config)])
    process = ManagedProcess(argv, workdir / f"{name}-{host}.log", env=service_env())
    stack.enter_context(process)
    return process


def wait_http(net: Net, host: str, url: str, process: ManagedProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        done = subprocess.run(
            net.exec_argv(
                host, [require("curl"), "-s", "-o", "/dev/null", "-w", "%{http_code}", url]
            ),
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if done.stdout.strip() in ("200", "401"):
            return
        time.sleep(0.1)
    process.fail(f"{url} did not answer within {timeout} s")


def metric(net: Net, host: str, name: str, **labels: str) -> float:
    text = net.run(host, [require("curl"), "-s", "http://127.0.0.1:5014/metrics"])
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_pull_in_an_ipv6_only_cluster(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    image = images.build_image(layout, seed="ipv6-netns", layer_sizes=(3 * MiB,))
    layer = image.layers[0]
    registry_url = f"http://[{address('origin')}]:{REGISTRY_PORT}"
    tracker_url = f"http://[{address('infra')}]:{TRACKER_PORT}/announce"
    proxy_url = f"http://[{address('infra')}]:{PROXY_PORT}"
    with ipv6_network() as net, ExitStack() as stack:
        # The origin: every address of its host (Go's ":5000"), pushed to over its loopback.
        storage = tmp_path / "registry"
        storage.mkdir()
        registry_config = tmp_path / "registry.yml"
        registry_config.write_text(
            json.dumps(
                {
                    "version": 0.1,
                    "storage": {"filesystem": {"rootdirectory": str(storage)}},
                    "http": {"addr": f":{REGISTRY_PORT}"},
                    "health": {"storagedriver": {"enabled": False}},
                }
            )
        )
        registry = ManagedProcess(
            net.exec_argv("origin", [require("docker-registry"), "serve", str(registry_config)]),
            tmp_path / "registry.log",
        )
        stack.enter_context(registry)
        wait_http(net, "origin", f"http://127.0.0.1:{REGISTRY_PORT}/v2/", registry)
        source = f"oci:{layout}:{image.tag}"
        net.run(
            "origin",
            [
                require("skopeo"),
                "copy",
                "--quiet",
                "--preserve-digests",
                "--dest-tls-verify=false",
                source,
                f"docker://127.0.0.1:{REGISTRY_PORT}/team/app:{image.tag}",
            ],
            timeout=120,
        )

        # The services with the chart's listen addresses (":port").
        tracker = service(
            net,
            stack,
            "infra",
            "tracker",
            write(tmp_path / "tracker.yaml", {"listen": f":{TRACKER_PORT}", "announceInterval": 5}),
            tmp_path,
        )
        wait_http(net, "infra", f"http://[{address('infra')}]:{TRACKER_PORT}/readyz", tracker)
        proxy_config = {
            "listen": f":{PROXY_PORT}",
            "peerPort": 6882,
            "dataDir": str(tmp_path / "proxy-data"),
            "registry": [registry_url],
            "trackers": [tracker_url],
            "uploadRate": "1MB",  # the second node should get most of the blob from the first
        }
        proxy = service(
            net, stack, "infra", "proxy", write(tmp_path / "proxy.yaml", proxy_config), tmp_path
        )
        wait_http(net, "infra", f"{proxy_url}/readyz", proxy)
        for node in ("n1", "n2"):
            agent_config = {
                "listen": "127.0.0.1:5004",
                "metricsListen": ":5014",
                "peerPort": 6881,
                "dataDir": str(tmp_path / f"{node}-data"),
                "registry": [registry_url],
                "proxies": [proxy_url],
                "cacheHighWatermark": 0,  # the shared disk may be above 85%
            }
            agent = service(
                net, stack, node, "agent", write(tmp_path / f"{node}.yaml", agent_config), tmp_path
            )
            wait_http(net, node, f"http://[{address(node)}]:5014/readyz", agent)

        # Pull the layer on n1, then on n2, as containerd would (rewrite mode).
        blob_path = f"/v2/team/app/blobs/{layer.digest}"
        for node in ("n1", "n2"):
            out = tmp_path / f"{node}.blob"
            net.run(
                node,
                [require("curl"), "-sf", "-o", str(out), f"http://127.0.0.1:5004{blob_path}"],
                timeout=120,
            )
            assert hashlib.sha256(out.read_bytes()).hexdigest() == layer.digest[7:]
            if node == "n1":  # published (and seeded whole) before the second pull
                cached = tmp_path / "n1-data" / "blobs" / "sha256" / layer.digest[7:]
                deadline = time.monotonic() + 20
                while not cached.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)

        # n2's bytes came through the swarm, from n1 over IPv6 (the only way between hosts).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            by_source = {
                s: metric(net, "n2", "p2p_agent_download_bytes_total", source=s)
                for s in ("agent", "proxy", "proxy_stream", "http_fallback")
            }
            if sum(by_source.values()) >= layer.size:
                break
            time.sleep(0.1)
        assert sum(by_source.values()) == layer.size, by_source
        assert by_source["agent"] > 0, by_source
        # One fetch from the origin, over IPv6, for both nodes.
        status = json.loads(net.run("infra", [require("curl"), "-s", f"{proxy_url}/status"]))
        assert status["origin"]["fetches_done"] == 1
