"""A real ``p2p-agent`` process whose dataDir is a small real filesystem (a tmpfs): when the
filesystem fills up above ``cacheHighWatermark`` the agent evicts least recently used blobs
down to ``cacheLowWatermark`` by itself; ``p2p-agent cache`` (the real command, as an operator
runs it) shows it and removes the rest; the agent keeps serving pulls."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.cluster import run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.procs import ManagedProcess, free_port
from tests.realparts.registry import run_registry
from tests.services import service_binary, service_env

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
FS_MIB = 256
LAYERS = 8
LAYER = 8 * MiB
HIGH, LOW = 60, 50


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of FS_MIB MiB mounted for the test, unmounted after it."""
    mountpoint = tmp_path / "data"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_MIB}m,mode=0755", "tmpfs", str(mountpoint)],
        check=True,
        capture_output=True,
    )
    try:
        yield mountpoint
    finally:
        done = subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)
        if done.returncode != 0:  # something still holds a file: detach it anyway
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def used_percent(path: Path) -> float:
    disk = os.statvfs(path)
    total = disk.f_blocks * disk.f_frsize
    return 100 * (total - disk.f_bavail * disk.f_frsize) / total


def cache_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [service_binary("agent"), "cache", *args, "--config", str(config)],
        env={**service_env(), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cache_ls(config: Path) -> dict[str, Any]:
    done = cache_cli(config, "ls", "--json")
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def metric(port: int, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def poll(predicate: Any) -> Any:
    """Call ``predicate`` (in a thread: it runs commands) until it returns something truthy;
    the caller sets a generous deadline."""
    while not (found := await trio.to_thread.run_sync(predicate)):  # noqa: ASYNC110
        await trio.sleep(0.2)
    return found


async def test_a_full_filesystem_is_evicted_down_to_the_low_watermark(
    tmp_path: Path, small_fs: Path
) -> None:
    with run_registry(tmp_path / "registry", auth="none") as registry:
        image = images.build_image(
            tmp_path / "layout", seed="disk", tag="1.0", layer_sizes=(LAYER,) * LAYERS
        )
        images.push_image(tmp_path / "layout", image, registry.host, "team/app")
        digests = [layer.digest for layer in image.layers]
        async with (
            run_tracker() as announce,
            run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
        ):
            api, status = free_port(), free_port()
            config = tmp_path / "agent.yaml"
            config.write_text(
                f"listen: 127.0.0.1:{api}\nmetricsListen: 127.0.0.1:{status}\n"
                f"peerHost: 127.0.0.1\npeerPort: {free_port()}\ndataDir: {small_fs}\n"
                f"registry: {registry.url}\nproxies: [{proxy.url}]\nlogFormat: json\n"
                f"cacheHighWatermark: {HIGH}\ncacheLowWatermark: {LOW}\n"
                "cacheSweepInterval: 2s\n"
            )
            agent = ManagedProcess(
                [service_binary("agent"), "--config", str(config)],
                tmp_path / "agent.log",
                env=service_env(),
                stop_timeout=30,
            )
            with agent:
                await trio.to_thread.run_sync(lambda: agent.wait_port(api, timeout=60))
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{api}", timeout=120
                ) as http:

                    async def pull(index: int) -> None:
                        response = await http.get(f"/v2/team/app/blobs/{digests[index]}")
                        assert response.status_code == 200
                        assert response.content == image.layers[index].data

                    for index in range(LAYERS):  # oldest use first
                        await pull(index)
                    with trio.fail_after(60):
                        await poll(lambda: len(cache_ls(config)["blobs"]) == LAYERS)
                    assert used_percent(small_fs) < HIGH  # nothing to do yet
                    assert (
                        metric(status, "p2p_agent_cache_evictions_total", reason="watermark") == 0
                    )

                    # Something else fills the filesystem above the high watermark.
                    disk = os.statvfs(small_fs)
                    total = disk.f_blocks * disk.f_frsize
                    used = total - disk.f_bavail * disk.f_frsize
                    junk_size = int(total * (HIGH + 4) / 100) - used
                    with (small_fs / "junk").open("wb") as junk:
                        os.posix_fallocate(junk.fileno(), 0, junk_size)
                    assert used_percent(small_fs) > HIGH

                    # The agent notices by itself and evicts down to the low watermark.
                    with trio.fail_after(120):  # a sweep every 2 s; a loaded machine is slow
                        await poll(lambda: used_percent(small_fs) <= LOW)
                    listed = cache_ls(config)
                    left = [b["digest"] for b in listed["blobs"]]
                    # ... and no further: with the last blob evicted it was above the low mark.
                    assert used_percent(small_fs) + 100 * LAYER / total > LOW
                    # Least recently used went first: what is left is the newest, in order.
                    assert 0 < len(left) < LAYERS
                    assert left == digests[LAYERS - len(left) :]
                    assert listed["disk"]["used_percent"] <= LOW
                    assert listed["policy"]["evictions"]["watermark"] == LAYERS - len(left)
                    assert listed["policy"]["limits_unmet"] == []
                    evicted = metric(status, "p2p_agent_cache_evictions_total", reason="watermark")
                    assert evicted == LAYERS - len(left)
                    assert metric(status, "p2p_agent_cache_limit_unmet", limit="watermark") == 0

                    # An operator removes one blob, then everything not in use.
                    removed = cache_cli(config, "rm", left[0])
                    assert removed.returncode == 0, removed.stderr
                    assert [b["digest"] for b in cache_ls(config)["blobs"]] == left[1:]
                    pruned = cache_cli(config, "prune", "--all")
                    assert pruned.returncode == 0, pruned.stderr
                    assert f"evicted {len(left) - 1} blobs" in pruned.stdout
                    assert cache_ls(config)["blobs"] == []

                    # The agent keeps serving: the first (long evicted) blob comes again.
                    (small_fs / "junk").unlink()
                    await pull(0)
                    assert [b["digest"] for b in cache_ls(config)["blobs"]] == [digests[0]]
                agent.check_alive()
            log = (tmp_path / "agent.log").read_text()
            assert '"reason":"watermark"' in log
            assert '"reason":"operator"' in log
