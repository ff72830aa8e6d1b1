"""What the metrics say about real pulls: time to first byte by source, the last successful
pull, requests and errors by status, upload counters, and the proxy's origin bytes against the
blob bytes it fetched (the ratio the P2POriginBytesPerPullHigh alert watches)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from tests.cluster import basic, metric, origin_with_image, run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.registry import Registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
TTFB = "p2p_agent_blob_time_to_first_byte_seconds_count"


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    with origin_with_image(
        tmp_path_factory.mktemp("origin"), seed="metrics", tag="1.0", layer_sizes=(4 * MiB,)
    ) as origin:
        yield origin


async def until(read: Callable[[str], Awaitable[float]], name: str, least: float) -> float:
    """The value of ``read(name)`` once it reaches ``least`` (within 10 s)."""
    with trio.fail_after(10):
        while (found := await read(name)) < least:  # noqa: ASYNC110 (polling metrics)
            await trio.sleep(0.05)
    return found


async def test_a_pull_shows_in_the_metrics(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[0]
    path = f"/v2/team/app/blobs/{layer.digest}"
    auth = basic("any", "one")
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce], progressive_streams=0) as proxy,
        run_agent(tmp_path / "a1", [registry.url], [proxy.url]) as first,
        run_agent(tmp_path / "a2", [registry.url], [proxy.url]) as second,
    ):
        assert await first.metric("p2p_agent_last_successful_pull_timestamp_seconds") == 0
        before = time.time()
        response = await first.http.get(path, headers=auth)
        assert response.content == layer.data
        assert await first.metric(TTFB, source="download") == 1
        assert await first.metric(TTFB, source="cache") == 0
        # Counted as the response ends, which the client may see a moment earlier.
        await until(first.metric, "p2p_agent_blob_pull_seconds_count", 1)
        assert before <= await first.metric("p2p_agent_last_successful_pull_timestamp_seconds")

        response = await first.http.get(path, headers=auth)
        assert response.content == layer.data
        assert await first.metric(TTFB, source="cache") == 1
        assert await first.metric("p2p_agent_requests_total") == 2

        unknown = "sha256:" + "0" * 64
        response = await first.http.get(f"/v2/team/app/blobs/{unknown}", headers=auth)
        assert response.status_code == 404
        code = response.json()["errors"][0]["code"]
        assert await first.metric("p2p_agent_errors_total", code=code, status="404") == 1

        # The second node's bytes come from the proxy's seed and the first node: what they
        # uploaded covers what it received over BitTorrent.
        response = await second.http.get(path, headers=auth)
        assert response.content == layer.data

        async def swarm_bytes(_: str) -> float:
            got = await second.metric("p2p_agent_download_bytes_total", source="agent")
            return got + await second.metric("p2p_agent_download_bytes_total", source="proxy")

        # Counted once the download is published, which may be just after the response.
        received = await until(swarm_bytes, "", layer.size)
        assert received == layer.size
        uploaded = await first.metric("p2p_agent_upload_bytes_total")
        uploaded += await metric(proxy.http, "p2p_proxy_peer_upload_bytes_total")
        assert uploaded >= received

        # One fetch, one read of the blob from the origin: the ratio the alert watches is 1.
        assert await metric(proxy.http, "p2p_proxy_blob_bytes_fetched_total") == layer.size
        assert await metric(proxy.http, "p2p_proxy_origin_bytes_total") == layer.size
