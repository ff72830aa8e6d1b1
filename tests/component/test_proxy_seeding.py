"""The proxy as the raw seed: one origin fetch per blob however many ask at once,
deterministic metainfo, a torrent that really downloads, eviction, and reseeding after a
restart without the origin."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from p2p_common import metainfo as mi
from p2p_common.storage import PieceFile
from tests.cluster import push
from tests.component.test_proxy_harness import (
    TRACKERS,
    chunks_of,
    expected_chunks,
    leech,
    origin_requests,
    run_proxy,
)
from tests.engine_helpers import running_engines
from tests.realparts import images
from tests.realparts.registry import Registry, run_registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


@dataclass
class Origin:
    registry: Registry
    image: images.Image


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    base = tmp_path_factory.mktemp("seeding")
    with run_registry(base / "registry", auth="none") as registry:
        image = push(
            base,
            registry,
            "library/app",
            seed="seeding",
            layer_sizes=[3 * MiB, 3 * MiB, 8 * MiB, 2 * MiB + 12345, 1 * MiB],
        )
        yield Origin(registry, image)


async def test_concurrent_requests_share_one_origin_fetch(origin: Origin, tmp_path: Path) -> None:
    blob = origin.image.layers[2]
    before = origin.registry.blob_gets()[blob.digest]
    answers: list[bytes] = []
    async with run_proxy(tmp_path / "data", [origin.registry.url]) as proxy:

        async def metainfo() -> None:
            response = await proxy.metainfo("library/app", blob.digest)
            assert response.status_code == 200
            answers.append(response.content)

        async def fallback() -> None:
            response = await proxy.http.get(f"/v2/library/app/blobs/{blob.digest}")
            assert response.status_code == 200
            assert response.content == blob.data

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(metainfo)
            for _ in range(3):
                nursery.start_soon(fallback)
        assert await proxy.metric("p2p_proxy_blobs_fetched_total") == 1
        assert await proxy.metric("p2p_proxy_origin_bytes_total") == blob.size
        assert await proxy.metric("p2p_proxy_metainfo_requests_total") == 12
        # The requests really overlapped: several found the blob missing and waited.
        assert await proxy.metric("p2p_proxy_cache_misses_total") >= 2
        assert await proxy.metric("p2p_proxy_seeding_torrents") == 1
    assert len(answers) == 12
    assert len(set(answers)) == 1
    assert origin.registry.blob_gets()[blob.digest] == before + 1


async def test_two_proxies_build_the_same_metainfo(origin: Origin, tmp_path: Path) -> None:
    for blob in (origin.image.layers[3], origin.image.layers[2]):  # one chunk, then two
        async with (
            run_proxy(tmp_path / f"one{blob.size}", [origin.registry.url]) as one,
            run_proxy(tmp_path / f"two{blob.size}", [origin.registry.url]) as two,
        ):
            first = await one.metainfo("library/app", blob.digest)
            second = await two.metainfo("library/app", blob.digest)
        assert first.content == second.content
        meta = chunks_of(first, blob)
        expected = expected_chunks(blob, TRACKERS)
        assert first.content == expected.frames()
        assert meta.info_hash == expected.info_hash
        assert first.headers["x-p2p-info-hash"] == meta.info_hash.hex()
        assert first.headers["x-p2p-chunks"] == str(meta.geometry.num_chunks)
        for chunk in meta.chunks:
            assert (chunk.private, chunk.piece_length) == (True, mi.piece_length_for(blob.size))
            assert chunk.trackers == tuple(TRACKERS)
        assert meta.trackers == tuple(TRACKERS)
    whole = meta if len(meta.chunks) == 1 else chunks_of(first, blob)
    assert whole.length == blob.size


async def test_the_torrent_is_seeded(origin: Origin, tmp_path: Path) -> None:
    blob = origin.image.layers[2]
    async with run_proxy(tmp_path / "data", [origin.registry.url], trackers=[]) as proxy:
        meta = chunks_of(await proxy.metainfo("library/app", blob.digest), blob)
        assert meta.trackers == ()
        assert len(meta.chunks) == 3  # 8 MiB and a little: 4 MiB chunks
        data = await leech(meta, proxy.peer_port, tmp_path / "leech.bin")
        assert data == blob.data
        assert await proxy.metric("p2p_proxy_peer_upload_bytes_total") >= blob.size


async def test_eviction_stops_seeding_and_removes_the_files(origin: Origin, tmp_path: Path) -> None:
    first, second = origin.image.layers[0], origin.image.layers[1]
    async with run_proxy(tmp_path / "data", [origin.registry.url], cache_size=5 * MiB) as proxy:
        first_meta = chunks_of(await proxy.metainfo("library/app", first.digest), first)
        assert await leech(first_meta, proxy.peer_port, tmp_path / "first.bin") == first.data
        blob_dir = proxy.data_dir / "blobs" / "sha256"
        hexpart = first.digest.removeprefix("sha256:")
        assert (blob_dir / hexpart).exists()
        assert (blob_dir / (hexpart + ".chunks")).exists()

        second_meta = chunks_of(await proxy.metainfo("library/app", second.digest), second)
        assert proxy.blob_files() == {second.digest}
        assert not (blob_dir / hexpart).exists()
        assert not (blob_dir / (hexpart + ".chunks")).exists()
        assert await proxy.metric("p2p_proxy_evictions_total") == 1
        assert await proxy.metric("p2p_proxy_seeding_torrents") == 1

        # The evicted torrent is gone from the proxy's peer port: no peer gets a byte.
        async with running_engines(1) as (engine,):
            store = PieceFile(first_meta, tmp_path / "again.bin", tmp_path / "again.bits")
            torrent = await engine.add_torrent(
                first_meta, store, peers=[("127.0.0.1", proxy.peer_port)]
            )
            await trio.sleep(1.5)
            assert torrent.downloaded == 0
            assert not torrent.completed.is_set()
            store.close()
        assert await leech(second_meta, proxy.peer_port, tmp_path / "second.bin") == second.data

        # Asking again fetches it again (and evicts the other one).
        again = await proxy.metainfo("library/app", first.digest)
        assert again.content == first_meta.frames()
        assert proxy.blob_files() == {first.digest}
    assert origin.registry.blob_gets()[first.digest] >= 2


async def test_a_restart_reseeds_from_the_cache_without_the_origin(
    origin: Origin, tmp_path: Path
) -> None:
    blobs = [origin.image.layers[3], origin.image.layers[4]]
    data_dir = tmp_path / "data"
    async with run_proxy(data_dir, [origin.registry.url]) as proxy:
        metas = [
            chunks_of(await proxy.metainfo("library/app", blob.digest), blob) for blob in blobs
        ]
    seen = len(origin_requests(origin.registry))
    gets = origin.registry.blob_gets()

    new_trackers = ["http://127.0.0.3:9/announce"]
    async with run_proxy(data_dir, [origin.registry.url], trackers=new_trackers) as proxy:
        assert (await proxy.http.get("/readyz")).status_code == 200
        assert await proxy.metric("p2p_proxy_seeding_torrents") == 2
        for blob, meta in zip(blobs, metas, strict=True):
            target = tmp_path / f"{blob.digest[7:19]}.bin"
            assert await leech(meta, proxy.peer_port, target) == blob.data
        assert len(origin_requests(origin.registry)) == seen

        # Asked for the metainfo again: the origin only authorizes (HEAD), the blob and its
        # piece hashes come from the cache, the trackers from the new configuration.
        again = chunks_of(await proxy.metainfo("library/app", blobs[0].digest), blobs[0])
        assert again.info_hash == metas[0].info_hash
        assert again.trackers == tuple(new_trackers)
        assert await proxy.metric("p2p_proxy_cache_hits_total") == 1
    assert origin.registry.blob_gets() == gets
    assert all(e.method == "HEAD" for e in origin_requests(origin.registry)[seen:])


async def test_a_cached_blob_without_metainfo_is_rehashed(origin: Origin, tmp_path: Path) -> None:
    blob = origin.image.layers[4]
    data_dir = tmp_path / "data"
    async with run_proxy(data_dir, [origin.registry.url]) as proxy:
        first = (await proxy.metainfo("library/app", blob.digest)).content
    torrent = data_dir / "blobs" / "sha256" / (blob.digest.removeprefix("sha256:") + ".chunks")
    torrent.unlink()
    gets = origin.registry.blob_gets()
    async with run_proxy(data_dir, [origin.registry.url]) as proxy:
        assert await proxy.metric("p2p_proxy_seeding_torrents") == 0  # nothing to reseed
        again = await proxy.metainfo("library/app", blob.digest)
        assert again.content == first
        assert torrent.exists()
        assert await proxy.metric("p2p_proxy_seeding_torrents") == 1
    assert origin.registry.blob_gets() == gets
