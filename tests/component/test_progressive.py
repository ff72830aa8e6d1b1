"""Progressive streams: the first agents asking for a blob the proxy is still fetching get
its bytes as the origin sends them, the others wait and use the swarm; broken fetches never
end up cached anywhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from p2p_common.blobinfo import BlobMetainfo
from tests.cluster import metric, run_agent, run_proxy, run_tracker
from tests.engine_helpers import wait_until
from tests.realparts import images
from tests.realparts.registry import Registry, run_registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
STREAMS = {"progressive_streams": 1}
"""Progressive streams are off by default (docs/rollout.md); these tests are about them."""


@dataclass
class Origin:
    registry: Registry
    good: images.Blob
    corrupt: images.Blob


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    base = tmp_path_factory.mktemp("progressive")
    with run_registry(base / "registry", auth="none") as registry:
        good = images.build_image(base / "good", seed="good", tag="1.0", layer_sizes=(12 * MiB,))
        images.push_image(base / "good", good, registry.host, "team/good")
        bad = images.build_image(base / "bad", seed="bad", tag="1.0", layer_sizes=(3 * MiB,))
        images.push_image(base / "bad", bad, registry.host, "team/bad")
        corrupt = bad.layers[0]
        hexpart = corrupt.digest.removeprefix("sha256:")
        stored = registry.root / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"
        data = bytearray(stored.read_bytes())
        data[len(data) - 10] ^= 0xFF  # wrong only near the end: noticed after streaming
        stored.write_bytes(bytes(data))
        yield Origin(registry, good.layers[0], corrupt)


async def test_first_callers_stream_the_rest_get_metainfo(origin: Origin, tmp_path: Path) -> None:
    blob = origin.good
    params = {"name": "team/good", "digest": blob.digest, "stream": "1"}
    async with run_proxy(
        tmp_path / "proxy",
        [origin.registry.url],
        ["http://127.0.0.1:9/announce"],
        progressive_streams=2,
    ) as proxy:
        results: dict[str, httpx.Response] = {}

        async def ask(key: str) -> None:
            results[key] = await proxy.http.get("/p2p/v1/metainfo", params=params)

        async with trio.open_nursery() as nursery:
            for n in range(5):  # all at once: the slots must not be over-committed
                nursery.start_soon(ask, f"caller{n}")
        streamed = [r for r in results.values() if r.headers.get("x-p2p-stream") == "1"]
        meta = [r for r in results.values() if r.headers.get("x-p2p-stream") != "1"]
        assert len(streamed) == 2
        assert all(r.content == blob.data for r in streamed)
        assert streamed[0].headers["docker-content-digest"] == blob.digest
        assert len(meta) == 3
        assert len({r.content for r in meta}) == 1
        parsed = BlobMetainfo.from_frames(blob.digest, blob.size, meta[0].content)
        assert (parsed.name, parsed.length) == (blob.digest, blob.size)
        # Once cached, nobody streams any more: everyone gets the metainfo.
        again = await proxy.http.get("/p2p/v1/metainfo", params=params)
        assert again.headers.get("x-p2p-stream") is None
        assert (
            BlobMetainfo.from_frames(blob.digest, blob.size, again.content).info_hash
            == parsed.info_hash
        )
        assert await metric(proxy.http, "p2p_proxy_progressive_streams_total") == 2
        assert await metric(proxy.http, "p2p_proxy_stream_bytes_total") == 2 * blob.size
        assert await metric(proxy.http, "p2p_proxy_http_fallback_bytes_total") == 0
    assert origin.registry.blob_gets()[blob.digest] == 1


async def test_a_stream_of_a_corrupt_origin_blob_breaks_and_is_cached_nowhere(
    origin: Origin, tmp_path: Path
) -> None:
    blob = origin.corrupt
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [origin.registry.url], [announce], **STREAMS) as proxy,
        run_agent(tmp_path / "agent", [origin.registry.url], [proxy.url]) as agent,
    ):
        received = bytearray()

        async def pull() -> None:
            async with agent.http.stream("GET", f"/v2/team/bad/blobs/{blob.digest}") as response:
                assert response.status_code == 200
                async for chunk in response.aiter_bytes():
                    received.extend(chunk)

        with pytest.raises(httpx.HTTPError):
            await pull()
        assert len(received) < blob.size  # never a complete wrong blob
        partial = agent.settings.data_dir / "partial"
        with trio.fail_after(10):  # the failed download cleans up after itself
            await wait_until(lambda: not list(partial.glob("*.stream")))
        assert not (agent.settings.data_dir / "blobs" / "sha256" / blob.digest[7:]).exists()
        assert not (proxy.settings.data_dir / "blobs" / "sha256" / blob.digest[7:]).exists()
        # Asking again tries the origin again (it may have been repaired): same outcome.
        received.clear()
        with pytest.raises(httpx.HTTPError):
            await pull()
        assert len(received) < blob.size
        # Each pull: the stream, then the agent's resumption from the byte reached (it cannot
        # tell a stream cut on purpose from a proxy's death), which the proxy answers with an
        # error after one more fetch; no further retries.
        assert origin.registry.blob_gets()[blob.digest] == 4


async def test_a_corrupt_origin_blob_through_the_swarm_never_arrives_whole(
    origin: Origin, tmp_path: Path
) -> None:
    """Without a stream, the blob comes as chunks: its last chunk is published only after the
    proxy checked the whole blob's digest, so the agent's client gets an error, never the
    wrong blob, and nothing is cached anywhere."""
    blob = origin.corrupt
    gets = origin.registry.blob_gets()[blob.digest]
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [origin.registry.url], [announce]) as proxy,
        run_agent(tmp_path / "agent", [origin.registry.url], [proxy.url]) as agent,
    ):
        received = bytearray()
        status = 0
        with contextlib.suppress(httpx.HTTPError):
            async with agent.http.stream("GET", f"/v2/team/bad/blobs/{blob.digest}") as response:
                status = response.status_code
                async for chunk in response.aiter_bytes():
                    received.extend(chunk)
        assert len(received) < blob.size
        if status == 200:  # the client saw a broken transfer rather than an error status
            assert received != blob.data
        else:
            assert status == 502
        assert not (agent.settings.data_dir / "blobs" / "sha256" / blob.digest[7:]).exists()
        assert not (proxy.settings.data_dir / "blobs" / "sha256" / blob.digest[7:]).exists()
        assert await metric(proxy.http, "p2p_proxy_progressive_streams_total") == 0
    assert origin.registry.blob_gets()[blob.digest] == gets + 1


async def test_download_rate_limits_proxy_streams_too(origin: Origin, tmp_path: Path) -> None:
    blob = origin.good
    rate = 4 * MiB
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [origin.registry.url], [announce], **STREAMS) as proxy,
        run_agent(
            tmp_path / "agent", [origin.registry.url], [proxy.url], download_rate=rate
        ) as agent,
    ):
        started = trio.current_time()
        response = await agent.http.get(f"/v2/team/good/blobs/{blob.digest}")
        elapsed = trio.current_time() - started
        assert response.content == blob.data
        assert await agent.metric("p2p_agent_download_bytes_total", source="proxy_stream") > 0
    burst = rate * 0.25
    assert elapsed >= (blob.size - burst) / rate * 0.9


async def test_a_client_that_hangs_up_does_not_hold_the_agent(
    origin: Origin, tmp_path: Path
) -> None:
    """The response to a client that went away is cancelled, so a graceful stop (which waits
    for requests in flight) is quick, while the download itself goes on for the cache."""
    blob = origin.good
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [origin.registry.url], [announce], **STREAMS) as proxy,
    ):
        stopped_at = None
        async with run_agent(
            tmp_path / "agent", [origin.registry.url], [proxy.url], download_rate=1 * MiB
        ) as agent:
            async with agent.http.stream("GET", f"/v2/team/good/blobs/{blob.digest}") as response:
                async for _chunk in response.aiter_bytes():
                    break  # read a little, then hang up
            await trio.sleep(0.5)
            stopped_at = trio.current_time()
        assert trio.current_time() - stopped_at < 5  # not the ~12 s the whole blob needs
