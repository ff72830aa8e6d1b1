"""Mirror mode with the real parts: the chart's rendered mirror.sh writes the hosts.toml files,
real containerd 1.6 pulls through them (``ctr --hosts-dir``), our tracker, proxy and agent serve
them, the CNCF distribution registry is the origin.

- A registry whose hosts.toml someone else wrote: the merged file sends containerd to the agent
  first and still names the owner's host; removal puts the owner's file back, and containerd then
  pulls from the owner's host without the agent.
- The catch-all (``mirror.allRegistries``): containerd asks the agent for an image of a registry
  that is not accelerated, gets 404 at once and pulls from that registry itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from p2p_agent.mirror_files import check_containerd
from tests.chart.mirror_node import Node, render_chart
from tests.cluster import AgentHandle, run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.containerd import run_containerd
from tests.realparts.procs import free_port
from tests.realparts.registry import Registry, run_registry

pytestmark = pytest.mark.realparts

KiB = 1024


@dataclass
class Origins:
    accelerated: Registry
    other: Registry
    app: images.Image
    two: images.Image
    elsewhere: images.Image


@pytest.fixture(scope="module")
def origins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origins]:
    base = tmp_path_factory.mktemp("mirror-origins")
    with (
        run_registry(base / "accelerated", auth="none") as accelerated,
        run_registry(base / "other", auth="none") as other,
    ):
        pushed = {}
        for key, registry, repository, seed in (
            ("app", accelerated, "lib/app", "mc-app"),
            ("two", accelerated, "lib/two", "mc-two"),
            ("elsewhere", other, "lib/elsewhere", "mc-elsewhere"),
        ):
            layout = base / f"layout-{key}"
            image = images.build_image(layout, tag="1.0", seed=seed, layer_sizes=(300 * KiB,))
            images.push_image(layout, image, registry.host, repository)
            pushed[key] = image
        yield Origins(accelerated, other, pushed["app"], pushed["two"], pushed["elsewhere"])


async def blocking(function, *args, **kwargs):  # type: ignore[no-untyped-def]
    return await trio.to_thread.run_sync(partial(function, *args, **kwargs))


@asynccontextmanager
async def one_agent(tmp_path: Path, registry: str, state: Path) -> AsyncIterator[AgentHandle]:
    """Tracker, proxy and agent for ``registry``; the agent's status reads ``state`` (the
    mirror-config container's copies), as in the chart."""
    async with AsyncExitStack() as stack:
        announce = await stack.enter_async_context(run_tracker())
        proxy = await stack.enter_async_context(
            run_proxy(tmp_path / "proxy", [registry], [announce])
        )
        yield await stack.enter_async_context(
            run_agent(tmp_path / "agent", [registry], [proxy.url], mirror_config_path=state)
        )


def mirror_node(root: Path, agent: AgentHandle, registries: list[str], **mirror: Any) -> Node:
    rendered = render_chart(
        {
            "registry": registries,
            "agent": {"ports": {"registry": agent.ports.api}},
            "mirror": {"enabled": True, **mirror},
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    return Node(root, rendered, state=True)


async def mirror_status(agent: AgentHandle) -> dict[str, Any]:
    response = await agent.status.get("/status")
    response.raise_for_status()
    doc: dict[str, Any] = response.json()["mirror"]
    return doc


def blob_gets_by(registry: Registry, agent_prefix: str) -> int:
    """Blob GETs the registry served to clients whose User-Agent starts with the prefix."""
    return sum(
        1
        for e in registry.access_log()
        if e.method == "GET" and "/blobs/" in e.path and e.user_agent.startswith(agent_prefix)
    )


async def test_containerd_pulls_through_a_merged_hosts_toml_agent_first(
    origins: Origins, tmp_path: Path
) -> None:
    registry = origins.accelerated
    state = tmp_path / "node" / "mirror-state"
    async with one_agent(tmp_path, registry.url, state) as agent:
        node = mirror_node(tmp_path / "node", agent, [registry.url])
        # The owner's file: their own host (here the registry itself) before a dead server.
        owners = (
            "# written by the node's owner\n"
            f'server = "http://127.0.0.1:{free_port()}"\n\n'
            f'[host."http://{registry.host}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        target = node.certs / registry.host / "hosts.toml"
        target.parent.mkdir(parents=True)
        target.write_text(owners)
        assert "merged the p2p agent" in await blocking(node.run, "sync")
        with run_containerd(tmp_path / "containerd") as ctr:
            start = time.monotonic()
            await blocking(ctr.pull, f"{registry.host}/lib/app:1.0", hosts_dir=node.certs)
            pulled_in = time.monotonic() - start
            for blob in origins.app.everything().values():
                assert await blocking(ctr.content_get, blob.digest) == blob.data
            # The agent served it (its proxy fetched it from the origin): containerd itself
            # fetched no blob from the owner's host.
            assert await agent.metric("p2p_agent_pull_bytes_total") >= origins.app.layers[0].size
            assert blob_gets_by(registry, "containerd") == 0
            status = await mirror_status(agent)
            (entry,) = status["registries"]
            assert (entry["state"], entry["merged"]) == ("mirrored", True)
            assert entry["hosts"] == [
                f"http://127.0.0.1:{agent.ports.api}",
                f"http://{registry.host}",
            ]
            assert entry["mirror_requests"] > 0
            # Removal puts the owner's file back; containerd then uses the owner's host only.
            await blocking(node.run, "remove")
            assert target.read_text() == owners
            before = entry["mirror_requests"]
            await blocking(ctr.pull, f"{registry.host}/lib/two:1.0", hosts_dir=node.certs)
            assert blob_gets_by(registry, "containerd") >= 1
            assert (await mirror_status(agent))["registries"][0]["mirror_requests"] == before
        print(f"pull through the merged hosts.toml: {pulled_in:.2f} s")


async def test_the_catch_all_sends_other_registries_back_to_themselves_at_once(
    origins: Origins, tmp_path: Path
) -> None:
    state = tmp_path / "node" / "mirror-state"
    async with one_agent(tmp_path, origins.accelerated.url, state) as agent:
        node = mirror_node(tmp_path / "node", agent, [origins.accelerated.url], allRegistries=True)
        await blocking(node.run, "sync")
        assert (node.certs / "_default" / "hosts.toml").exists()
        assert not (node.certs / origins.other.host).exists()
        with run_containerd(tmp_path / "containerd") as ctr:
            start = time.monotonic()
            await blocking(
                ctr.pull, f"{origins.other.host}/lib/elsewhere:1.0", hosts_dir=node.certs
            )
            elapsed = time.monotonic() - start
            for blob in origins.elsewhere.everything().values():
                assert await blocking(ctr.content_get, blob.digest) == blob.data
        # containerd asked the agent first (404 NAME_UNKNOWN, counted), then the registry.
        refused = await agent.metric("p2p_agent_errors_total", code="NAME_UNKNOWN", status="404")
        assert refused >= 1
        status = await mirror_status(agent)
        assert status["catch_all"]["state"] == "mirrored"
        assert status["catch_all"]["refused_requests"] >= 1
        assert blob_gets_by(origins.other, "containerd") >= 1
        assert await agent.metric("p2p_agent_pull_bytes_total") == 0
        print(f"pull of an unaccelerated registry through the catch-all: {elapsed:.2f} s")


def test_the_check_reads_the_config_of_the_real_containerd(tmp_path: Path) -> None:
    """The config file the running containerd was started with (version 2, CRI registry
    config_path) is read as containerd reads it."""
    with run_containerd(tmp_path / "containerd") as ctr:
        config = ctr.config_file
        verdict = check_containerd(config, str(config), str(ctr.config_path))
        assert verdict.state == "matches", verdict.message
        other = check_containerd(config, str(config), "/etc/containerd/certs.d")
        assert other.state == "other"
        assert f"mirror.configPath={ctr.config_path}" in other.message
        print(json.dumps(verdict.view()))
