"""Blobs through the proxy: the HTTP fallback (whole, ranges, 416), HEAD, validation of names
and digests, and what an origin sending bad data or a full cache does to the cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from p2p_common.asgi import FILE_CHUNK
from tests.cluster import push
from tests.component.test_proxy_harness import (
    chunks_of,
    origin_requests,
    raw_get,
    run_proxy,
)
from tests.realparts import images
from tests.realparts.registry import Registry, run_registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


@dataclass
class Origin:
    registry: Registry
    image: images.Image
    corrupt: images.Blob
    """A layer whose bytes in the registry's storage were altered after the push."""

    @property
    def big(self) -> images.Blob:
        return self.image.layers[1]

    @property
    def huge(self) -> images.Blob:
        return self.image.layers[2]


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    base = tmp_path_factory.mktemp("blobs")
    with run_registry(base / "registry", auth="none") as registry:
        # 9 MiB: more than two write-and-hash batches of the fetcher; 48 MiB: many file-response
        # chunks (FILE_CHUNK), for the hang-up test.
        image = push(
            base, registry, "library/app", seed="blobs", layer_sizes=[5000, 9 * MiB, 48 * MiB]
        )
        bad = push(base, registry, "library/bad", seed="bad", layer_sizes=[300_000])
        corrupt = bad.layers[0]
        hexpart = corrupt.digest.removeprefix("sha256:")
        stored = registry.root / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"
        data = bytearray(stored.read_bytes())
        data[1000] ^= 0xFF
        stored.write_bytes(bytes(data))
        yield Origin(registry, image, corrupt)


async def test_http_fallback_whole_and_ranges(origin: Origin, tmp_path: Path) -> None:
    blob = origin.big
    url = f"/v2/library/app/blobs/{blob.digest}"
    async with run_proxy(tmp_path / "data", [origin.registry.url]) as proxy:
        whole = await proxy.http.get(url)
        assert whole.status_code == 200
        assert whole.content == blob.data
        assert whole.headers["content-length"] == str(blob.size)
        assert whole.headers["docker-content-digest"] == blob.digest
        assert whole.headers["accept-ranges"] == "bytes"
        assert whole.headers["content-type"] == "application/octet-stream"

        cases = {
            "bytes=10-19": (10, 19),
            "bytes=0-0": (0, 0),
            f"bytes={blob.size - 5}-": (blob.size - 5, blob.size - 1),
            "bytes=-100": (blob.size - 100, blob.size - 1),
            f"bytes=4194000-{blob.size + 1000}": (4194000, blob.size - 1),
        }
        for header, (first, last) in cases.items():
            part = await proxy.http.get(url, headers={"Range": header})
            assert part.status_code == 206, header
            assert part.headers["content-range"] == f"bytes {first}-{last}/{blob.size}"
            assert part.content == blob.data[first : last + 1], header

        for header in (f"bytes={blob.size}-", f"bytes={blob.size + 10}-{blob.size + 20}"):
            refused = await proxy.http.get(url, headers={"Range": header})
            assert refused.status_code == 416, header
            assert refused.headers["content-range"] == f"bytes */{blob.size}"
            assert refused.json()["errors"][0]["code"] == "RANGE_INVALID"

        # Several ranges or garbage: the whole blob (RFC 9110 allows ignoring the header).
        multi = await proxy.http.get(url, headers={"Range": "bytes=0-1,5-6"})
        assert (multi.status_code, multi.content) == (200, blob.data)

        head = await proxy.http.head(url)
        assert head.status_code == 200
        assert head.headers["content-length"] == str(blob.size)
        assert head.headers["docker-content-digest"] == blob.digest
        assert head.content == b""

        served = await proxy.metric("p2p_proxy_http_fallback_bytes_total")
        assert served >= 2 * blob.size
        assert await proxy.metric("p2p_proxy_blobs_fetched_total") == 1
        assert await proxy.metric("p2p_proxy_origin_bytes_total") == blob.size
        assert await proxy.metric("p2p_proxy_cache_hits_total") >= 5
        assert await proxy.metric("p2p_proxy_errors_total", code="RANGE_INVALID") == 2
    assert origin.registry.blob_gets()[blob.digest] == 1


async def test_the_small_layer_and_config_blob(origin: Origin, tmp_path: Path) -> None:
    config = origin.image.images[0].config
    small = origin.image.layers[0]
    async with run_proxy(tmp_path / "data", [origin.registry.url]) as proxy:
        for blob in (config, small):
            got = await proxy.http.get(f"/v2/library/app/blobs/{blob.digest}")
            assert (got.status_code, got.content) == (200, blob.data)
            meta = chunks_of(await proxy.metainfo("library/app", blob.digest), blob)
            assert (meta.length, meta.num_pieces, len(meta.chunks)) == (blob.size, 1, 1)


async def test_invalid_names_and_digests_are_400(origin: Origin, tmp_path: Path) -> None:
    good = origin.big.digest
    before = len(origin_requests(origin.registry))
    async with run_proxy(tmp_path / "data", [origin.registry.url]) as proxy:
        paths = {
            f"/v2/Library/app/blobs/{good}": "NAME_INVALID",
            f"/v2/library/./app/blobs/{good}": "NAME_INVALID",
            f"/v2/library/..%2Fapp/blobs/{good}": "NAME_INVALID",
            "/v2/library/app/blobs/sha256:abc": "DIGEST_INVALID",
            f"/v2/library/app/blobs/{good.upper()}": "DIGEST_INVALID",
            "/v2/library/app/blobs/md5:" + "0" * 32: "DIGEST_INVALID",
            # Valid OCI, but the proxy caches and seeds sha256 blobs only.
            "/v2/library/app/blobs/sha512:" + "0" * 128: "DIGEST_INVALID",
        }
        for path, code in paths.items():
            status, body = await raw_get(proxy.port, path)
            assert status == 400, path
            assert json.loads(body)["errors"][0]["code"] == code, path
        queries = [
            ({"digest": good}, "NAME_INVALID"),
            ({"name": "library/app"}, "DIGEST_INVALID"),
            ({"name": "Library/App", "digest": good}, "NAME_INVALID"),
            ({"name": "library/app", "digest": "sha256:xyz"}, "DIGEST_INVALID"),
            ({"name": "library/app", "digest": "sha512:" + "0" * 128}, "DIGEST_INVALID"),
            ({"name": "a//b", "digest": good}, "NAME_INVALID"),
        ]
        for params, code in queries:
            response = await proxy.http.get("/p2p/v1/metainfo", params=params)
            assert response.status_code == 400, params
            assert response.json()["errors"][0]["code"] == code, params
        twice = await proxy.http.get(
            "/p2p/v1/metainfo?name=library/app&name=other/app&digest=" + good
        )
        assert twice.status_code == 400
    assert len(origin_requests(origin.registry)) == before


async def test_unknown_blob_is_404(origin: Origin, tmp_path: Path) -> None:
    missing = "sha256:" + "ab" * 32
    async with run_proxy(tmp_path / "data", [origin.registry.url]) as proxy:
        meta = await proxy.metainfo("library/app", missing)
        assert meta.status_code == 404
        assert meta.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        get = await proxy.http.get(f"/v2/library/app/blobs/{missing}")
        assert get.status_code == 404
        head = await proxy.http.head(f"/v2/library/app/blobs/{missing}")
        assert (head.status_code, head.content) == (404, b"")
        no_repo = await proxy.metainfo("no/such-repo", origin.big.digest)
        assert no_repo.status_code == 404


async def test_an_origin_sending_the_wrong_bytes_leaves_nothing_behind(
    origin: Origin, tmp_path: Path
) -> None:
    blob = origin.corrupt
    async with run_proxy(tmp_path / "data", [origin.registry.url]) as proxy:
        for attempt in range(2):  # not remembered: a second request fetches again
            answer = await proxy.metainfo("library/bad", blob.digest)
            assert answer.status_code == 502, attempt
            error = answer.json()["errors"][0]
            assert error["code"] == "UNKNOWN"
            assert "digest" in error["message"]
            fallback = await proxy.http.get(f"/v2/library/bad/blobs/{blob.digest}")
            assert fallback.status_code == 502
        assert proxy.blob_files() == set()
        assert proxy.scratch_files() == []
        assert list((proxy.data_dir / "blobs" / "sha256").iterdir()) == []
        assert await proxy.metric("p2p_proxy_fetch_failures_total", code="UNKNOWN") == 4
        assert await proxy.metric("p2p_proxy_seeding_torrents") == 0


async def test_a_blob_larger_than_the_quota_is_507_and_the_cache_stays_consistent(
    origin: Origin, tmp_path: Path
) -> None:
    small = origin.image.layers[0]
    async with run_proxy(tmp_path / "data", [origin.registry.url], cache_size=1 * MiB) as proxy:
        assert (await proxy.metainfo("library/app", small.digest)).status_code == 200
        too_big = await proxy.metainfo("library/app", origin.big.digest)
        assert too_big.status_code == 507
        error = too_big.json()["errors"][0]
        assert error["code"] == "UNKNOWN"
        assert "cache" in error["message"]
        fallback = await proxy.http.get(f"/v2/library/app/blobs/{origin.big.digest}")
        assert fallback.status_code == 507
        assert proxy.blob_files() == {small.digest}
        with trio.fail_after(30):  # the refused fetch's scratch file goes after the answer
            while proxy.scratch_files():  # noqa: ASYNC110 - files, no event to wait for
                await trio.sleep(0.02)
        # The small blob is still served and seeded.
        again = await proxy.http.get(f"/v2/library/app/blobs/{small.digest}")
        assert (again.status_code, again.content) == (200, small.data)
        assert await proxy.metric("p2p_proxy_seeding_torrents") == 1
        assert await proxy.metric("p2p_proxy_cache_used_bytes") == small.size


async def test_a_client_hanging_up_mid_download_is_harmless(
    origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blob = origin.huge
    url = f"/v2/library/app/blobs/{blob.digest}"
    async with run_proxy(tmp_path / "data", [origin.registry.url]) as proxy:
        assert (await proxy.http.head(url)).status_code == 200
        for _ in range(3):
            async with proxy.http.stream("GET", url) as response:
                assert response.status_code == 200
                async for _chunk in response.aiter_raw(64 * 1024):
                    break  # leave after the first bytes
        await trio.sleep(0.5)  # let the proxy notice
        # The hang-ups stopped the reading: a few chunks each (what the sockets absorbed
        # before the disconnect was seen), far less than the blob.
        hung_up = await proxy.metric("p2p_proxy_http_fallback_bytes_total")
        assert hung_up <= 3 * 3 * FILE_CHUNK
        assert hung_up < blob.size
        whole = await proxy.http.get(url)
        assert whole.content == blob.data
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
