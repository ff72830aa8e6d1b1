"""The adaptive download limit against a really slow disk: a throttled loop device.

The agent's data directory is an ext4 file system whose writes the kernel holds to 6 MB/s;
``downloadRate`` is twice that. With ``diskWriteLatencyLimit`` set, the agent's flushes
take too long, so it lowers the download rate (and says so in ``/status`` and the metrics); the
blob still arrives whole and right; once the disk has caught up, the rate goes back to
``downloadRate`` by itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.cluster import run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.registry import run_registry
from tests.realparts.slowdisk import slow_disk

pytestmark = [pytest.mark.realparts, pytest.mark.slow]

MiB = 1024 * 1024
MB = 10**6
DISK_BPS = 6 * MB
DOWNLOAD_RATE = 12 * MB


async def test_a_slow_disk_lowers_the_download_rate_until_it_catches_up(tmp_path: Path) -> None:
    with (
        slow_disk(tmp_path / "disk", size_mib=192, write_bps=DISK_BPS) as disk,
        run_registry(tmp_path / "registry", auth="none") as registry,
    ):
        image = images.build_image(
            tmp_path / "layout", seed="slowdisk", tag="1.0", layer_sizes=(48 * MiB,)
        )
        images.push_image(tmp_path / "layout", image, registry.host, "team/app")
        layer = image.layers[0]
        path = f"/v2/team/app/blobs/{layer.digest}"
        async with (
            run_tracker() as announce,
            run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
            run_agent(
                disk.mountpoint / "agent",
                [registry.url],
                [proxy.url],
                download_rate=DOWNLOAD_RATE,
                disk_write_latency_limit=0.5,
                disk_min_download_rate=MB,
            ) as agent,
        ):
            before = (await agent.status.get("/status")).json()["rates"]
            assert before["download_bytes_per_second"] == DOWNLOAD_RATE
            assert before["adaptive"]["active"] is False
            seen: list[dict[str, Any]] = []

            async def watch() -> None:
                while True:
                    seen.append((await agent.status.get("/status")).json()["rates"])
                    await trio.sleep(0.2)

            digest = hashlib.sha256()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                with trio.fail_after(240):
                    async with agent.http.stream("GET", path) as response:
                        assert response.status_code == 200
                        async for data in response.aiter_bytes():
                            digest.update(data)
                nursery.cancel_scope.cancel()
            assert "sha256:" + digest.hexdigest() == layer.digest

            lowered = [r for r in seen if r["adaptive"]["active"]]
            assert lowered, f"the adaptive limit never engaged: {seen[-3:]}"
            assert all(MB <= r["download_bytes_per_second"] < DOWNLOAD_RATE for r in lowered)
            assert lowered[0]["source"].startswith("adaptive")
            assert max(r["adaptive"]["last_flush_seconds"] for r in seen) > 0.5
            assert await agent.metric("p2p_agent_disk_flush_seconds_count") > 0

            # Nothing more to write: the disk catches up and the limit lifts by itself.
            with trio.fail_after(120):
                while True:
                    rates = (await agent.status.get("/status")).json()["rates"]
                    if not rates["adaptive"]["active"]:
                        break
                    await trio.sleep(0.25)
            assert rates["download_bytes_per_second"] == DOWNLOAD_RATE
            assert await agent.metric("p2p_agent_download_rate_adaptive") == 0
            assert await agent.metric("p2p_agent_download_rate_limit_bytes_per_second") == (
                DOWNLOAD_RATE
            )
