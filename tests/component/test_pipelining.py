"""The swarm starts with the origin's first bytes: agents get a blob's first chunks, and trade
them, while the proxy is still fetching the rest from the origin.

The origin (the real CNCF registry) sits behind a gate that stops its answers in the middle of
the blob until the test releases it (tests/realparts/gate.py): whatever the agents' clients
received by then came through the swarm while the origin was still sending.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from p2p_common.blobinfo import CHUNK_BYTES
from tests.cluster import metric, origin_with_image, run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.gate import gated_forwarder
from tests.realparts.registry import Registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
CHUNK = CHUNK_BYTES


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    with origin_with_image(
        tmp_path_factory.mktemp("pipelining"),
        repository="team/big",
        seed="pipe",
        layer_sizes=[24 * MiB],
    ) as origin:
        yield origin


async def test_agents_stream_and_trade_the_first_chunks_while_the_origin_still_sends(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[0]
    assert layer.size > 4 * CHUNK
    path = f"/v2/team/big/blobs/{layer.digest}"
    async with gated_forwarder(registry.port) as gate:
        url = f"http://127.0.0.1:{gate.port}"
        async with (
            run_tracker() as announce,
            # No progressive stream: every agent takes the chunks and the swarm.
            run_proxy(tmp_path / "proxy", [url], [announce], progressive_streams=0) as proxy,
            run_agent(tmp_path / "a", [url], [proxy.url]) as first,
            run_agent(tmp_path / "b", [url], [proxy.url]) as second,
        ):
            # The origin stops a little past the middle of the blob.
            gate.hold_after = gate.sent + layer.size // 2 + 64 * 1024
            received = {"a": bytearray(), "b": bytearray()}
            both_started = trio.Event()

            async def pull(name: str, agent_http: object) -> None:
                async with agent_http.stream("GET", path) as response:  # type: ignore[attr-defined]
                    assert response.status_code == 200
                    async for data in response.aiter_bytes():
                        received[name] += data
                        if all(len(r) >= 2 * CHUNK for r in received.values()):
                            both_started.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pull, "a", first.http)
                nursery.start_soon(pull, "b", second.http)
                with trio.fail_after(60):
                    await both_started.wait()
                    await gate.holding.wait()
                # Both clients have the first two chunks while the origin is stalled halfway.
                assert not gate.release.is_set()
                assert gate.sent < gate.hold_after + 1
                assert await metric(proxy.http, "p2p_proxy_blobs_fetched_total") == 0
                gate.release.set()
            assert bytes(received["a"]) == layer.data
            assert bytes(received["b"]) == layer.data
            agents = (first, second)

            async def counted(source: str) -> float:
                return sum(
                    [
                        await a.metric("p2p_agent_download_bytes_total", source=source)
                        for a in agents
                    ]
                )

            with trio.fail_after(10):  # counted once each download is published
                while await counted("agent") + await counted("proxy") < 2 * layer.size:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            from_peers, from_proxy = await counted("agent"), await counted("proxy")
            assert from_peers + from_proxy == 2 * layer.size
            assert from_peers > 0  # the agents traded pieces, not only took them from the proxy
            assert await metric(proxy.http, "p2p_proxy_peer_upload_bytes_total") < 2 * layer.size
    assert registry.blob_gets()[layer.digest] == 1
