"""The agent's cache for an operator: ``p2p-agent cache ls | rm | prune`` through the admin
socket of a running agent, and a new cache policy in the mounted ConfigMap applied live."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.cluster import AgentHandle, origin_with_image, run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.registry import Registry
from tests.services import ConfigMapVolume, service_binary, service_env

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
BIG = 24 * MiB
"""More than a paused client's socket buffers hold: the agent stays in the middle of it."""


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    with origin_with_image(
        tmp_path_factory.mktemp("cache"),
        seed="cache-cli",
        tag="1.0",
        layer_sizes=(2 * MiB, 2 * MiB, 2 * MiB, BIG),
    ) as origin:
        yield origin


def blob_path(image: images.Image, index: int) -> str:
    return f"/v2/team/app/blobs/{image.layers[index].digest}"


async def cache_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``p2p-agent cache ARGS`` as an operator runs it (a process of its own)."""
    done: subprocess.CompletedProcess[str] = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [service_binary("agent"), "cache", *args],
            env={**service_env(), "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    )
    return done


async def listing(socket: Path) -> dict[str, Any]:
    done = await cache_cli("ls", "--json", "--socket", str(socket))
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


async def pull(agent: AgentHandle, image: images.Image, index: int) -> None:
    with trio.fail_after(60):
        response = await agent.http.get(blob_path(image, index))
    assert response.status_code == 200
    assert response.content == image.layers[index].data


async def wait_for(predicate: Any) -> Any:
    """Poll ``await predicate()`` until it is truthy (the caller sets a generous deadline)."""
    while not (found := await predicate()):  # noqa: ASYNC110 - polling another process
        await trio.sleep(0.1)
    return found


async def test_ls_rm_and_prune_act_through_the_running_agent(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    small = [layer.digest for layer in image.layers[:3]]
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
        # Watermarks the shared disk does not reach (it may be above the default 85%).
        run_agent(
            tmp_path / "agent",
            [registry.url],
            [proxy.url],
            cache_high_watermark=99,
            cache_low_watermark=98,
        ) as agent,
    ):
        socket = tmp_path / "agent" / "admin.sock"
        # The admin API is a private unix socket, not on the network-facing metrics port.
        assert stat.S_ISSOCK(os.stat(socket).st_mode)
        assert stat.S_IMODE(os.stat(socket).st_mode) == 0o600
        assert (await agent.status.get("/v1/cache")).status_code == 404

        for index in range(3):
            await pull(agent, image, index)

        async def all_seeded() -> dict[str, Any] | None:
            doc = await listing(socket)
            states = {b["digest"]: b["state"] for b in doc["blobs"]}
            return doc if states == dict.fromkeys(small, "seeding") else None

        with trio.fail_after(60):  # seeding starts just after the pull
            doc = await wait_for(all_seeded)
        # Least recently used first: the next to be evicted.
        assert [b["digest"] for b in doc["blobs"]] == small
        assert [b["size"] for b in doc["blobs"]] == [layer.size for layer in image.layers[:3]]
        assert doc["used_bytes"] == sum(layer.size for layer in image.layers[:3])
        assert doc["policy"]["high_watermark_percent"] == 99
        assert doc["policy"]["low_watermark_percent"] == 98
        assert doc["disk"]["total_bytes"] > 0

        table = await cache_cli("ls", "--socket", str(socket))
        assert table.returncode == 0, table.stderr
        for expected in [d[7:19] for d in small] + ["seeding", "evict above 99% down to 98%"]:
            assert expected in table.stdout, expected

        # A client in the middle of the big blob: rm refuses it and the pull completes intact.
        await pull(agent, image, 3)
        big = image.layers[3]
        async with agent.http.stream("GET", blob_path(image, 3)) as response:
            chunks = response.aiter_bytes()
            received = bytearray(await chunks.__anext__())
            refused = await cache_cli("rm", big.digest, "--socket", str(socket))
            assert refused.returncode == 1
            assert "in use" in refused.stderr
            in_use = {b["digest"]: b for b in (await listing(socket))["blobs"]}[big.digest]
            assert in_use["state"] == "in use"
            async for chunk in chunks:
                received += chunk
        assert bytes(received) == big.data

        # rm by the short digest `ls` shows; the blob stops being seeded.
        removed = await cache_cli("rm", small[0][7:19], "--socket", str(socket))
        assert removed.returncode == 0, removed.stderr
        assert f"removed {small[0]}" in removed.stdout
        assert small[0] not in {b["digest"] for b in (await listing(socket))["blobs"]}
        assert not (tmp_path / "agent" / "blobs" / "sha256" / small[0][7:]).exists()
        assert await agent.metric("p2p_agent_cache_evictions_total", reason="operator") == 1

        unknown = await cache_cli("rm", small[0], "--socket", str(socket))
        assert unknown.returncode == 1
        assert "not in the cache" in unknown.stderr

        # prune --all: everything not in use.
        pruned = await cache_cli("prune", "--all", "--json", "--socket", str(socket))
        assert pruned.returncode == 0, pruned.stderr
        result = json.loads(pruned.stdout)
        assert {e["digest"] for e in result["evicted"]} == {small[1], small[2], big.digest}
        assert {e["reason"] for e in result["evicted"]} == {"operator"}
        assert (await listing(socket))["blobs"] == []
        status = (await agent.status.get("/status")).json()
        assert status["cache"]["blobs"] == 0
        assert status["cache"]["policy"]["evictions"] == {"operator": 4}

        # The agent still serves: the blob comes again, from the swarm or the proxy.
        await pull(agent, image, 0)
        assert [b["digest"] for b in (await listing(socket))["blobs"]] == [small[0]]


async def test_the_cli_says_when_no_agent_is_running(tmp_path: Path) -> None:
    done = await cache_cli("ls", "--socket", str(tmp_path / "admin.sock"))
    assert done.returncode == 1
    assert "not running" in done.stderr
    config = tmp_path / "agent.yaml"
    config.write_text(f"registry: registry.example.com\ndataDir: {tmp_path / 'data'}\n")
    done = await cache_cli("prune", "--config", str(config))
    assert done.returncode == 1
    assert str(tmp_path / "data" / "admin.sock") in done.stderr
    bad = await cache_cli("prune", "--unused-for", "soon", "--socket", str(tmp_path / "x"))
    assert bad.returncode == 2
    assert "--unused-for" in bad.stderr


async def test_a_new_cache_policy_in_the_mounted_configmap_applies_without_a_restart(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    small = [layer.digest for layer in image.layers[:3]]
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
    ):
        volume = ConfigMapVolume(tmp_path / "configmap", "agent.yaml")
        head = f"registry: {registry.url}\nproxies: [{proxy.url}]\n"
        # Watermarks the shared disk does not reach (it may be above the default 85%).
        base = head + "cacheHighWatermark: 99\ncacheLowWatermark: 98\n"
        volume.publish(base)
        async with run_agent(
            tmp_path / "agent", [registry.url], [proxy.url], config_file=volume.file
        ) as agent:

            async def policy() -> dict[str, Any]:
                document: dict[str, Any] = (await agent.status.get("/status")).json()["cache"]
                return document

            assert (await policy())["policy"]["source"] == "config file"
            for index in range(3):
                await pull(agent, image, index)
            await pull(agent, image, 0)  # used again: now the most recent

            # A smaller quota: the least recently used blob goes, without a restart.
            volume.publish(base + "cacheSize: 5MiB\n")

            async def quota_applied() -> bool:
                cache = await policy()
                return cache["blobs"] == 2 and cache["policy"]["quota_bytes"] == 5 * MiB

            with trio.fail_after(60):  # the file is polled every 2 s, then a sweep
                await wait_for(quota_applied)
            cache = await policy()
            assert cache["policy"]["source"] == "config file (reloaded)"
            assert cache["quota_bytes"] == 5 * MiB
            assert await agent.metric("p2p_agent_cache_quota_bytes") == 5 * MiB
            assert await agent.metric("p2p_agent_cache_evictions_total", reason="quota") == 1
            blobs = tmp_path / "agent" / "blobs" / "sha256"
            assert not (blobs / small[1][7:]).exists()
            assert (blobs / small[0][7:]).exists()

            # A file that no longer validates is refused; the policy in force stays.
            volume.publish(
                head + "cacheSize: 5MiB\ncacheHighWatermark: 99\ncacheLowWatermark: 99\n"
            )
            await trio.sleep(3)  # two config polls: nothing may change, so nothing to wait for
            assert (await policy())["policy"]["low_watermark_percent"] == 98

            # Expiry, live: both blobs were last used more than a second ago.
            volume.publish(head + "cacheSize: 5MiB\ncacheMaxUnused: 1s\ncacheHighWatermark: 0\n")

            async def expired() -> bool:
                return (await policy())["blobs"] == 0

            with trio.fail_after(60):
                await wait_for(expired)
            cache = await policy()
            assert cache["policy"]["max_unused_seconds"] == 1
            assert cache["policy"]["high_watermark_percent"] == 0
            assert await agent.metric("p2p_agent_cache_evictions_total", reason="expired") == 2
