"""p2p-agent behaviour that needs no client program: sharing, fallback, cache, reload."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from p2p_agent import downloads
from p2p_common.blobcache import BlobCache
from p2p_common.storage import PieceFile, StorageError
from tests.cluster import (
    AgentHandle,
    basic,
    metric,
    origin_with_image,
    run_agent,
    run_proxy,
    run_tracker,
)
from tests.engine_helpers import wait_until
from tests.realparts import images
from tests.realparts.registry import Registry
from tests.services import ConfigMapVolume

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    with origin_with_image(
        tmp_path_factory.mktemp("origin"),
        seed="agent",
        tag="1.0",
        layer_sizes=(6 * MiB, 3 * MiB, 1 * MiB),
    ) as origin:
        yield origin


def blob_path(image: images.Image, index: int) -> str:
    return f"/v2/team/app/blobs/{image.layers[index].digest}"


async def pull_concurrently(agent: AgentHandle, path: str, count: int) -> list[bytes]:
    """``count`` GETs of ``path`` at once (with some credentials); their bodies."""
    bodies: list[bytes] = []

    async def pull() -> None:
        response = await agent.http.get(path, headers=basic("any", "one"))
        assert response.status_code == 200
        bodies.append(response.content)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(pull)
    return bodies


async def test_concurrent_requests_for_one_blob_share_one_download(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[0]
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce], progressive_streams=1) as proxy,
        run_agent(tmp_path / "agent", [registry.url], [proxy.url]) as agent,
    ):
        bodies = await pull_concurrently(agent, blob_path(image, 0), 5)
        assert bodies == [layer.data] * 5
        # Cold at the proxy too: the proxy streamed the blob while fetching it, once.
        assert await metric(proxy.http, "p2p_proxy_progressive_streams_total") == 1
        assert await agent.metric("p2p_agent_download_bytes_total", source="proxy_stream") == (
            layer.size
        )
        assert registry.blob_gets()[layer.digest] == 1


async def test_concurrent_requests_share_one_swarm_download(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[0]
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce], progressive_streams=0) as proxy,
        run_agent(tmp_path / "agent", [registry.url], [proxy.url]) as agent,
    ):
        bodies = await pull_concurrently(agent, blob_path(image, 0), 5)
        assert bodies == [layer.data] * 5
        assert await metric(proxy.http, "p2p_proxy_metainfo_requests_total") == 1
        assert await metric(proxy.http, "p2p_proxy_progressive_streams_total") == 0
        assert await agent.metric("p2p_agent_download_bytes_total", source="proxy") == layer.size


async def test_a_stalled_swarm_falls_back_to_the_proxy_over_http(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[1]
    async with (
        run_tracker() as announce,
        # The proxy seeds at 2 KB/s: no piece can complete over BitTorrent in time.
        run_proxy(
            tmp_path / "proxy", [registry.url], [announce], upload_rate=2000, progressive_streams=0
        ) as proxy,
        run_agent(tmp_path / "agent", [registry.url], [proxy.url], fallback_after=1.0) as agent,
    ):
        with trio.fail_after(30):
            response = await agent.http.get(blob_path(image, 1))
        assert response.content == layer.data
        assert await agent.metric("p2p_agent_http_fallbacks_total") == 1
        via_http = await agent.metric("p2p_agent_download_bytes_total", source="http_fallback")
        assert via_http > layer.size // 2
        cached = agent.settings.data_dir / "blobs" / "sha256" / layer.digest[7:]
        with trio.fail_after(10):  # published once its SHA-256 is checked, just after streaming
            await wait_until(cached.exists)
        assert cached.read_bytes() == layer.data


async def test_a_restarted_agent_serves_and_seeds_its_cache_without_the_origin(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[2]
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
    ):
        async with run_agent(tmp_path / "agent", [registry.url], [proxy.url]) as agent:
            assert (await agent.http.get(blob_path(image, 2))).content == layer.data
            cached = agent.settings.data_dir / "blobs" / "sha256" / layer.digest[7:]
            with trio.fail_after(10):
                await wait_until(cached.exists)
        gets = registry.blob_gets()[layer.digest]
        async with run_agent(tmp_path / "agent", [registry.url], [proxy.url]) as again:
            response = await again.http.get(blob_path(image, 2))
            assert response.content == layer.data
            assert await again.metric("p2p_agent_cache_hits_total") == 1
            with trio.fail_after(10):  # seeding resumes (metainfo from the proxy if need be)
                while await again.metric("p2p_agent_active_torrents") < 1:  # noqa: ASYNC110
                    await trio.sleep(0.1)
    assert registry.blob_gets()[layer.digest] == gets


async def test_the_cache_quota_evicts_the_least_recently_used_blob(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    big, middle, small = image.layers
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
        run_agent(
            tmp_path / "agent",
            [registry.url],
            [proxy.url],
            cache_size=big.size + middle.size + small.size // 2,
        ) as agent,
    ):
        blobs = agent.settings.data_dir / "blobs" / "sha256"
        for index in (1, 0):
            assert (await agent.http.get(blob_path(image, index))).status_code == 200
        with trio.fail_after(10):  # each is published once its digest is checked
            await wait_until(
                lambda: {middle.digest[7:], big.digest[7:]} <= {p.name for p in blobs.iterdir()}
            )
        # Use the middle one again, then pull the small one: the big one is now the
        # least recently used and must go.
        assert (await agent.http.get(blob_path(image, 1))).status_code == 200
        assert (await agent.http.get(blob_path(image, 2))).content == small.data
        with trio.fail_after(10):
            await wait_until(
                lambda: (
                    {p.name for p in blobs.iterdir() if not p.suffix}
                    == {middle.digest[7:], small.digest[7:]}
                )
            )


async def test_new_rates_in_the_mounted_configmap_apply_without_a_restart(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[0]
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
    ):
        volume = ConfigMapVolume(tmp_path / "configmap", "agent.yaml")
        base = f"registry: {registry.url}\nproxies: [{proxy.url}]\ncacheHighWatermark: 0\n"
        volume.publish(base + "downloadRate: 1MB\nuploadRate: 2MB\n")
        async with run_agent(
            tmp_path / "agent", [registry.url], [proxy.url], config_file=volume.file
        ) as agent:
            assert await agent.metric("p2p_agent_download_rate_limit_bytes_per_second") == 1_000_000
            # A pull under the old limit (~6 s for this layer) is in progress while the
            # rates change; it goes on, faster, and completes intact.
            received = bytearray()
            changed_at = None
            async with agent.http.stream("GET", blob_path(image, 0)) as response:
                async for chunk in response.aiter_bytes():
                    received += chunk
                    if changed_at is None and len(received) >= 1_000_000:
                        volume.publish(base + "downloadRate: 0\nuploadRate: 300MB\n")
                        changed_at = trio.current_time()
                        with trio.fail_after(10):
                            await wait_until_rate(agent, 0)
            assert changed_at is not None
            assert bytes(received) == layer.data
            # The remaining ~5 MB would take 5 s at the old 1 MB/s limit.
            assert trio.current_time() - changed_at < 4.5
            assert await agent.metric("p2p_agent_upload_rate_limit_bytes_per_second") == 300_000_000
            # A broken update is refused; the running rates stay.
            volume.publish(base + "downloadRate: fast\n")
            await trio.sleep(3)
            assert await agent.metric("p2p_agent_upload_rate_limit_bytes_per_second") == 300_000_000
            assert await agent.metric("p2p_agent_download_rate_limit_bytes_per_second") == 0


async def wait_until_rate(agent: AgentHandle, rate: float) -> None:
    while await agent.metric("p2p_agent_download_rate_limit_bytes_per_second") != rate:  # noqa: ASYNC110
        await trio.sleep(0.1)


async def test_an_unreachable_proxy_is_skipped_for_the_next_one(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[2]
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
        run_agent(tmp_path / "agent", [registry.url], [dead, proxy.url]) as agent,
    ):
        for path in (blob_path(image, 2), "/v2/team/app/manifests/1.0"):
            with trio.fail_after(30):
                response = await agent.http.get(path, headers={"Accept": images.OCI_MANIFEST})
            assert response.status_code == 200, path
        assert (await agent.http.get(blob_path(image, 2))).content == layer.data


async def test_no_reachable_proxy_is_a_clean_502(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    async with run_agent(tmp_path / "agent", [registry.url], ["http://127.0.0.1:9"]) as agent:
        response = await agent.http.get(blob_path(image, 0))
        assert response.status_code == 502
        assert response.json()["errors"][0]["code"] == "UNKNOWN"
        assert not any((agent.settings.data_dir / "blobs" / "sha256").iterdir())


async def test_a_blob_larger_than_the_cache_quota_is_a_507_and_changes_nothing(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    big = image.layers[0]
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
        run_agent(
            tmp_path / "agent", [registry.url], [proxy.url], cache_size=big.size // 2
        ) as agent,
    ):
        response = await agent.http.get(blob_path(image, 0))
        assert response.status_code == 507
        assert response.json()["errors"][0]["code"] == "UNKNOWN"
        data = agent.settings.data_dir
        assert not any((data / "blobs" / "sha256").iterdir())
        assert not any((data / "partial").iterdir())
        # Smaller blobs still work.
        assert (await agent.http.get(blob_path(image, 2))).content == image.layers[2].data


async def test_too_little_disk_is_a_507_before_anything_is_written(
    origin: tuple[Registry, images.Image], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, image = origin
    monkeypatch.setattr(BlobCache, "free_bytes", lambda self: 10 * MiB)  # a nearly full disk
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
        run_agent(tmp_path / "agent", [registry.url], [proxy.url], cache_size=0) as agent,
    ):
        response = await agent.http.get(blob_path(image, 1))
        assert response.status_code == 507
        assert "free" in response.json()["errors"][0]["message"]
        assert not any((agent.settings.data_dir / "partial").iterdir())


async def test_a_disk_that_fills_up_mid_download_fails_that_pull_not_the_agent(
    origin: tuple[Registry, images.Image], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, image = origin
    layer = image.layers[1]
    real_write = PieceFile.write_piece
    full = True

    def write_piece(self: PieceFile, index: int, data: bytes) -> None:
        if full and index >= 3:
            raise StorageError("disk full") from OSError(errno.ENOSPC, "No space left on device")
        real_write(self, index, data)

    monkeypatch.setattr(PieceFile, "write_piece", write_piece)
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce], progressive_streams=0) as proxy,
        run_agent(tmp_path / "agent", [registry.url], [proxy.url]) as agent,
    ):
        received = bytearray()

        async def pull() -> None:
            async with agent.http.stream("GET", blob_path(image, 1)) as response:
                async for chunk in response.aiter_bytes():
                    received.extend(chunk)

        with pytest.raises(httpx.HTTPError):
            await pull()
        assert len(received) < layer.size
        assert (await agent.status.get("/healthz")).status_code == 200  # the agent lives on
        full = False  # space was freed
        again = await agent.http.get(blob_path(image, 1))
        assert again.content == layer.data


async def test_the_swarm_works_without_a_tracker_from_the_proxys_seed(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    """The proxy says where it seeds; the agent connects at once, even with no tracker."""
    registry, image = origin
    layer = image.layers[1]
    async with (
        run_proxy(
            tmp_path / "proxy",
            [registry.url],
            ["http://127.0.0.1:9/announce"],  # a tracker that is down
            progressive_streams=0,
        ) as proxy,
        run_agent(tmp_path / "agent", [registry.url], [proxy.url], fallback_after=60) as agent,
    ):
        with trio.fail_after(20):
            response = await agent.http.get(blob_path(image, 1))
        assert response.content == layer.data
        assert await agent.metric("p2p_agent_http_fallbacks_total") == 0
        with trio.fail_after(10):  # counted once the download is published
            while await agent.metric("p2p_agent_download_bytes_total", source="proxy") == 0:  # noqa: ASYNC110
                await trio.sleep(0.1)


@pytest.mark.parametrize("swarm_min_size", [1_000_000, 0])
async def test_blobs_below_swarm_min_size_come_over_http_and_are_not_seeded(
    origin: tuple[Registry, images.Image], tmp_path: Path, swarm_min_size: int
) -> None:
    registry, image = origin
    config = image.images[0].config
    assert config.size < 1_000_000
    path = f"/v2/team/app/blobs/{config.digest}"
    swarms = swarm_min_size == 0
    gets_before = registry.blob_gets().get(config.digest, 0)  # the origin is shared by tests
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
    ):
        settings = {"swarm_min_size": swarm_min_size}
        async with run_agent(tmp_path / "agent", [registry.url], [proxy.url], **settings) as agent:
            assert (await agent.http.get(path)).content == config.data
            cached = agent.settings.data_dir / "blobs" / "sha256" / config.digest[7:]
            with trio.fail_after(10):
                await wait_until(cached.exists)
            await trio.sleep(0.5)  # time to start seeding, if it were going to
            assert await agent.metric("p2p_agent_active_torrents") == (1 if swarms else 0)
        async with run_agent(tmp_path / "agent", [registry.url], [proxy.url], **settings) as again:
            assert (await again.http.get(path)).content == config.data
            assert await again.metric("p2p_agent_cache_hits_total") == 1
            await trio.sleep(0.5)
            assert await again.metric("p2p_agent_active_torrents") == (1 if swarms else 0)
        # Only a swarmed blob needed its metainfo.
        asked = await metric(proxy.http, "p2p_proxy_metainfo_requests_total")
        assert (asked >= 1) if swarms else (asked == 0)
    assert registry.blob_gets()[config.digest] == gets_before + 1


async def test_a_cached_blob_that_cannot_be_opened_now_is_kept(
    origin: tuple[Registry, images.Image], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE, EIO or EACCES while reseeding is a passing local trouble, not a lost blob: the
    blob stays cached (and is served); only a missing or truncated one leaves the cache."""
    registry, image = origin
    layer = image.layers[2]
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
    ):
        async with run_agent(tmp_path / "agent", [registry.url], [proxy.url]) as agent:
            assert (await agent.http.get(blob_path(image, 2))).content == layer.data
            cached = agent.settings.data_dir / "blobs" / "sha256" / layer.digest[7:]
            with trio.fail_after(10):
                await wait_until(cached.exists)

        real = downloads.PieceFile

        def cannot_open(*args: object, **kwargs: object) -> object:
            if kwargs.get("complete"):
                raise StorageError(f"{cached}: Too many open files")
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(downloads, "PieceFile", cannot_open)
        async with run_agent(tmp_path / "agent", [registry.url], [proxy.url]) as again:
            assert cached.exists()
            assert await again.metric("p2p_agent_active_torrents") == 0
            assert (await again.http.get(blob_path(image, 2))).content == layer.data
            assert await again.metric("p2p_agent_cache_hits_total") == 1
        monkeypatch.setattr(downloads, "PieceFile", real)
        cached.write_bytes(layer.data[:100])  # truncated: that one goes
        async with run_agent(tmp_path / "agent", [registry.url], [proxy.url]):
            assert not cached.exists()
