"""The pull path with every service as its own process (console scripts and YAML config
files, as in a cluster): tracker, 2 proxies, 3 agents; a token-auth distribution registry
with a private image; skopeo and containerd pulling through different agents."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.demo.cluster import ProcessSet, plan_cluster
from tests.realparts import images
from tests.realparts.containerd import run_containerd
from tests.realparts.registry import DEFAULT_USERS, run_registry

pytestmark = pytest.mark.realparts

ALICE = ("alice", DEFAULT_USERS["alice"])
MiB = 1024 * 1024


async def metric_total(url: str, name: str, source: str) -> float:
    async with httpx.AsyncClient(trust_env=False) as client:
        text = (await client.get(url)).text
    for line in text.splitlines():
        if line.startswith(f'{name}{{source="{source}"}} '):
            return float(line.split()[1])
    return 0.0


async def test_skopeo_and_containerd_through_agent_processes(tmp_path: Path) -> None:
    with run_registry(tmp_path / "registry", auth="token") as registry:
        image = images.build_image(
            tmp_path / "layout", seed="procs", tag="1.0", layer_sizes=(4 * MiB, 2 * MiB + 5)
        )
        images.push_image(tmp_path / "layout", image, registry.host, "private/app", creds=ALICE)
        before = registry.blob_gets()
        cluster = plan_cluster(tmp_path / "cluster", registry.url, agents=3, proxies=2)
        processes = ProcessSet()
        try:
            cluster.start(processes)
            with trio.fail_after(60):
                await cluster.wait_ready()
            first, second, third = cluster.agents
            host = {a.name: a.config["listen"] for a in cluster.agents}
            await trio.to_thread.run_sync(
                lambda: images.pull_and_compare(
                    image, host[first.name], "private/app", tmp_path / "skopeo", creds=ALICE
                )
            )
            with run_containerd(tmp_path / "containerd") as ctr:
                await trio.to_thread.run_sync(
                    lambda: ctr.pull(f"{host[second.name]}/private/app:1.0", user=ALICE)
                )
                for digest, blob in image.blobs().items():
                    assert await trio.to_thread.run_sync(ctr.content_get, digest) == blob.data
            await trio.to_thread.run_sync(
                lambda: images.pull_and_compare(
                    image, host[third.name], "private/app", tmp_path / "skopeo-3", creds=ALICE
                )
            )
            from_agents = sum(
                [
                    await metric_total(a.metrics_url, "p2p_agent_download_bytes_total", "agent")
                    for a in cluster.agents
                ]
            )
            cluster.check_alive(when="after the pulls")
        finally:
            results = processes.stop_all()
        assert all(r.returncode == 0 for r in results), results
        after = registry.blob_gets()
    for digest in image.blobs():
        assert after[digest] - before[digest] == 1, f"{digest} left the origin more than once"
    assert from_agents > 0  # later agents were fed by earlier ones
