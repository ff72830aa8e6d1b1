"""A proxy SIGKILLed in the middle of a pull (issue 8, item 13): the agents hide its death from
their clients and go on from the byte they had reached (the other proxy, the swarm), and every
pull is byte-identical.

Two proxies (processes), two agents (processes), the real distribution registry behind a gate
that holds the origin's answers halfway through the layer. One agent streams the layer from
the proxy that fetches it (``progressiveStreams: 1``), the other follows its chunks in the
swarm. The fetching proxy is killed while the origin is held, then the gate opens.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
import trio

from tests.demo.cluster import ProcessSet, Service, plan_cluster
from tests.demo.pull import PullResult, pull, verify_files
from tests.realparts import images
from tests.realparts.gate import gated_forwarder
from tests.realparts.registry import run_registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
LAYER = 48 * MiB


async def metric(service: Service, name: str) -> float:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        text = (await client.get(service.metrics_url)).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def test_a_proxy_killed_mid_pull_is_hidden_from_the_clients(tmp_path: Path) -> None:
    with run_registry(tmp_path / "registry", auth="none") as registry:
        layout = tmp_path / "layout"
        image = images.build_image(layout, seed="failover", tag="1.0", layer_sizes=[LAYER])
        images.push_image(layout, image, registry.host, "team/app")
        layer = image.layers[0]
        before = registry.blob_gets()[layer.digest]
        async with gated_forwarder(registry.port) as gate:
            origin = f"http://127.0.0.1:{gate.port}"
            cluster = plan_cluster(
                tmp_path / "cluster",
                origin,
                agents=2,
                proxies=2,
                overrides={"proxy": {"progressiveStreams": 1}, "agent": {"fallbackAfter": 3}},
            )
            processes = ProcessSet()
            try:
                cluster.start(processes)
                with trio.fail_after(60):
                    await cluster.wait_ready()
                # The origin stops a little past the middle of the layer.
                gate.hold_after = gate.sent + LAYER // 2
                received = {agent.name: 0 for agent in cluster.agents}
                results: dict[str, PullResult] = {}

                async def one(agent: Service) -> None:
                    def count(size: int) -> None:
                        received[agent.name] += size

                    async with httpx.AsyncClient(
                        trust_env=False, timeout=httpx.Timeout(120.0)
                    ) as client:
                        results[agent.name] = await pull(
                            client,
                            agent.url,
                            "team/app",
                            "1.0",
                            tmp_path / "pulled" / agent.name,
                            on_bytes=count,
                        )

                async with trio.open_nursery() as nursery:
                    for agent in cluster.agents:
                        nursery.start_soon(one, agent)
                    with trio.fail_after(60):
                        await gate.holding.wait()
                        while min(received.values()) < 4 * MiB:  # noqa: ASYNC110
                            await trio.sleep(0.05)
                    # Kill the proxy that fetches the layer, while the origin is held.
                    proxies = cluster.of("proxy")
                    fetched = [await metric(p, "p2p_proxy_origin_bytes_total") for p in proxies]
                    victim = proxies[fetched.index(max(fetched))]
                    assert victim.process is not None
                    victim.process.send_signal(signal.SIGKILL)
                    with trio.fail_after(10):
                        while victim.process.running:  # noqa: ASYNC110
                            await trio.sleep(0.05)
                    gate.release.set()
                    assert all(0 < r < LAYER for r in received.values()), received
                logs = {agent.name: agent.log_path.read_text() for agent in cluster.agents}
                # The streaming agent resumed its stream from the byte it had reached; the
                # other reopened its chunk stream at the surviving proxy.
                assert any("download.resuming" in text for text in logs.values()), logs
                assert any("chunks.broken" in text for text in logs.values()), logs
                survivors = [s for s in cluster.services if s is not victim]
                cluster.check_alive(survivors, "after the pulls")
                expected = {digest: blob.size for digest, blob in image.blobs().items()}
                for name, result in results.items():
                    assert await verify_files(result, image.top.data, expected) == [], name
            finally:
                processes.kill_all()
        after = registry.blob_gets()[layer.digest]
    # The killed proxy's fetch, and at most one more by the other proxy.
    assert after - before <= 2
