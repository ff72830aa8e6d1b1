"""The demo's built-in origin (driven with httpx), its image builder and its pull client."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.demo.image import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    DemoImage,
    build_image,
    layer_sizes,
)
from tests.demo.origin import BuiltinOrigin, parse_range, serve_builtin
from tests.demo.pull import MANIFEST_ACCEPT, PullError, pull, verify_files
from tests.realparts.procs import free_port

SIZE = 3_000_000
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture
def image(tmp_path: Path) -> DemoImage:
    return build_image(tmp_path / "layout", size=SIZE, seed="unit")


@pytest.fixture
async def served(
    nursery: trio.Nursery, image: DemoImage, tmp_path: Path
) -> AsyncIterator[tuple[BuiltinOrigin, str]]:
    origin = BuiltinOrigin(image, tmp_path / "access.log")
    port: int = await nursery.start(serve_builtin, origin)
    yield origin, f"http://127.0.0.1:{port}"
    origin.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        yield http


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the image ----------------------------------------------------------------------------------


def test_layer_sizes_add_up_biggest_first() -> None:
    sizes = layer_sizes(300_000_000)
    assert len(sizes) == 5
    assert sum(sizes) == 300_000_000
    assert sizes == sorted(sizes, reverse=True)
    assert sum(layer_sizes(1000, 3)) == 1000
    assert layer_sizes(5) == [1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="cannot fill"):
        layer_sizes(4)
    with pytest.raises(ValueError, match="at least one layer"):
        layer_sizes(10, 0)


def test_image_is_a_valid_oci_layout(image: DemoImage) -> None:
    layout = image.layout
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["digest"] == image.manifest_digest
    assert entry["mediaType"] == OCI_MANIFEST
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "1.0"
    manifest = json.loads(image.manifest)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"] == image.config.descriptor()
    assert manifest["layers"] == [layer.descriptor() for layer in image.layers]
    config = json.loads(image.config.path.read_bytes())
    assert config["config"] is not None
    assert config["rootfs"]["diff_ids"] == [layer.digest for layer in image.layers]
    assert image.config.media_type == OCI_CONFIG
    # Every blob is stored under its digest and hashes to it.
    for digest, blob in image.blobs().items():
        data = blob.path.read_bytes()
        assert blob.path == layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
        assert (_sha256(data), len(data)) == (digest, blob.size)
    assert (layout / "blobs" / "sha256" / image.manifest_digest[7:]).read_bytes() == image.manifest
    assert not list((layout / "blobs" / "sha256").glob(".*"))  # no temporary files left


def test_layers_are_tars_of_the_planned_sizes(image: DemoImage) -> None:
    payload = []
    for number, layer in enumerate(image.layers, start=1):
        assert layer.media_type == OCI_LAYER
        with tarfile.open(layer.path, mode="r:") as archive:
            (member,) = archive.getmembers()
            assert member.name == f"opt/demo/layer-{number}.bin"
            extracted = archive.extractfile(member)
            assert extracted is not None
            assert len(extracted.read()) == member.size
            payload.append(member.size)
    assert payload == layer_sizes(SIZE)
    assert image.blob_bytes == sum(blob.size for blob in image.blobs().values())
    assert image.blob_bytes > SIZE


def test_image_is_deterministic(tmp_path: Path, image: DemoImage) -> None:
    again = build_image(tmp_path / "again", size=SIZE, seed="unit")
    other = build_image(tmp_path / "other", size=SIZE, seed="another seed")
    assert again.manifest == image.manifest
    assert list(again.blobs()) == list(image.blobs())
    assert not set(other.blobs()) & {layer.digest for layer in image.layers}


# --- parse_range --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=50-500", (50, 99)),
        ("bytes = 5 - 6", (5, 6)),
        ("bytes=-500", (0, 99)),
        ("bytes=9-3", None),  # invalid: ignored
        ("bytes=0-1,5-6", None),  # several ranges: not served, whole blob
        ("items=0-1", None),
        ("bytes=-", None),
        ("garbage", None),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_parse_range_unsatisfiable(header: str) -> None:
    with pytest.raises(ValueError, match="range"):
        parse_range(header, 100)


# --- the built-in origin ------------------------------------------------------------------------


async def test_ping(served: tuple[BuiltinOrigin, str], client: httpx.AsyncClient) -> None:
    _, url = served
    for path in ("/v2/", "/v2"):
        response = await client.get(url + path)
        assert response.status_code == 200
        assert response.json() == {}
        assert response.headers["docker-distribution-api-version"] == "registry/2.0"


async def test_manifest_by_tag_and_digest(
    served: tuple[BuiltinOrigin, str], client: httpx.AsyncClient, image: DemoImage
) -> None:
    origin, url = served
    for reference in ("1.0", image.manifest_digest):
        response = await client.get(
            f"{url}/v2/demo/app/manifests/{reference}", headers={"accept": MANIFEST_ACCEPT}
        )
        assert response.status_code == 200
        assert response.content == image.manifest
        assert response.headers["content-type"] == OCI_MANIFEST
        assert response.headers["docker-content-digest"] == image.manifest_digest
        assert response.headers["content-length"] == str(len(image.manifest))
        head = await client.head(f"{url}/v2/demo/app/manifests/{reference}")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == str(len(image.manifest))
        assert head.headers["docker-content-digest"] == image.manifest_digest
    assert origin.manifest_gets == 2  # HEADs are not counted
    assert origin.stats.total_bytes == 0


async def test_manifest_accept_lines_are_merged(
    served: tuple[BuiltinOrigin, str], client: httpx.AsyncClient
) -> None:
    _, url = served
    headers = [("accept", DOCKER_MANIFEST), ("accept", f"{OCI_MANIFEST};q=0.9")]
    response = await client.get(f"{url}/v2/demo/app/manifests/1.0", headers=headers)
    assert response.status_code == 200
    refused = await client.get(
        f"{url}/v2/demo/app/manifests/1.0", headers={"accept": DOCKER_MANIFEST}
    )
    assert refused.status_code == 404
    assert refused.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert "accept header" in refused.json()["errors"][0]["message"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/demo/app/manifests/2.0", 404, "MANIFEST_UNKNOWN"),
        ("/v2/demo/app/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN"),
        ("/v2/demo/other/manifests/1.0", 404, "NAME_UNKNOWN"),
        ("/v2/demo/app/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("/v2/demo/app/tags/list", 404, "UNSUPPORTED"),
        ("/v2/Demo/app/manifests/1.0", 404, "UNSUPPORTED"),
        ("/metrics", 404, "UNSUPPORTED"),
    ],
)
async def test_errors_are_registry_json(
    served: tuple[BuiltinOrigin, str],
    client: httpx.AsyncClient,
    path: str,
    status: int,
    code: str,
) -> None:
    _, url = served
    response = await client.get(url + path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["errors"][0]["code"] == code


async def test_read_only(served: tuple[BuiltinOrigin, str], client: httpx.AsyncClient) -> None:
    _, url = served
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = await client.request(method, f"{url}/v2/demo/app/blobs/uploads/")
        assert response.status_code == 405
        assert response.json()["errors"][0]["code"] == "UNSUPPORTED"


async def test_blob_get_and_head_count_bytes(
    served: tuple[BuiltinOrigin, str], client: httpx.AsyncClient, image: DemoImage
) -> None:
    origin, url = served
    layer = image.layers[0]
    head = await client.head(f"{url}/v2/demo/app/blobs/{layer.digest}")
    assert head.status_code == 200
    assert head.headers["content-length"] == str(layer.size)
    assert head.headers["accept-ranges"] == "bytes"
    assert head.headers["docker-content-digest"] == layer.digest
    assert origin.stats.total_gets == 0
    response = await client.get(f"{url}/v2/demo/app/blobs/{layer.digest}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert _sha256(response.content) == layer.digest
    config = await client.get(f"{url}/v2/demo/app/blobs/{image.config.digest}")
    assert config.content == image.config.path.read_bytes()
    stats = await origin.blob_stats()
    assert stats.gets == {layer.digest: 1, image.config.digest: 1}
    assert stats.bytes == {layer.digest: layer.size, image.config.digest: image.config.size}
    assert stats.total_bytes == layer.size + image.config.size


async def test_blob_ranges(
    served: tuple[BuiltinOrigin, str], client: httpx.AsyncClient, image: DemoImage
) -> None:
    origin, url = served
    layer = image.layers[1]
    data = layer.path.read_bytes()
    blob_url = f"{url}/v2/demo/app/blobs/{layer.digest}"
    before = await origin.blob_stats()
    response = await client.get(blob_url, headers={"range": "bytes=1000-1999"})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes 1000-1999/{layer.size}"
    assert response.headers["content-length"] == "1000"
    assert response.content == data[1000:2000]
    tail = await client.get(blob_url, headers={"range": "bytes=-10"})
    assert tail.status_code == 206
    assert tail.content == data[-10:]
    ignored = await client.get(blob_url, headers={"range": "bytes=5-1"})
    assert ignored.status_code == 200
    assert len(ignored.content) == layer.size
    refused = await client.get(blob_url, headers={"range": f"bytes={layer.size}-"})
    assert refused.status_code == 416
    assert refused.headers["content-range"] == f"bytes */{layer.size}"
    assert refused.json()["errors"][0]["code"] == "RANGE_INVALID"
    sent = (await origin.blob_stats()).since(before)
    assert sent.gets == {layer.digest: 3}
    assert sent.total_bytes == 1000 + 10 + layer.size


async def test_access_log(
    served: tuple[BuiltinOrigin, str], client: httpx.AsyncClient, image: DemoImage, tmp_path: Path
) -> None:
    _, url = served
    await client.get(f"{url}/v2/demo/app/blobs/{image.config.digest}?ns=x")
    await client.get(f"{url}/v2/demo/app/manifests/nope")
    log = tmp_path / "access.log"
    with trio.fail_after(5):  # a line is written just after its response
        while len(lines := log.read_text().splitlines()) < 2:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert (
        f'"GET /v2/demo/app/blobs/{image.config.digest}?ns=x" 200 {image.config.size}' in (lines[0])
    )
    assert '"GET /v2/demo/app/manifests/nope" 404' in lines[1]


# --- the pull client ----------------------------------------------------------------------------


async def test_pull_and_verify(
    served: tuple[BuiltinOrigin, str], client: httpx.AsyncClient, image: DemoImage, tmp_path: Path
) -> None:
    origin, url = served
    totals: list[int] = []
    counted: list[int] = []
    result = await pull(
        client,
        url,
        "demo/app",
        "1.0",
        tmp_path / "out",
        on_total=totals.append,
        on_bytes=counted.append,
        concurrency=2,
    )
    assert totals == [image.blob_bytes]
    assert sum(counted) == image.blob_bytes
    assert result.manifest == image.manifest
    assert result.manifest_digest == image.manifest_digest
    assert [b.digest for b in result.blobs] == [image.config.digest] + [
        layer.digest for layer in image.layers
    ]
    assert result.blob_bytes == image.blob_bytes
    assert result.seconds > 0
    for blob in result.blobs:
        assert blob.path.read_bytes() == image.blobs()[blob.digest].path.read_bytes()
    assert (tmp_path / "out" / "manifest.json").read_bytes() == image.manifest
    assert (await origin.blob_stats()).total_bytes == image.blob_bytes
    expected = {digest: blob.size for digest, blob in image.blobs().items()}
    assert await verify_files(result, image.manifest, expected) == []

    # verify_files re-reads the files: a changed byte, a missing blob and a foreign one show up.
    victim = result.blobs[1].path
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    missing = dict(expected, **{"sha256:" + "1" * 64: 5})
    problems = await verify_files(result, b"other manifest", missing)
    assert len(problems) == 3
    assert "differs from the pushed one" in problems[0]
    assert "not pulled" in problems[1]
    assert f"hashes to sha256:{hashlib.sha256(data).hexdigest()}" in problems[2]


async def test_pull_refuses_bytes_that_do_not_match_the_digest(
    served: tuple[BuiltinOrigin, str], client: httpx.AsyncClient, image: DemoImage, tmp_path: Path
) -> None:
    _, url = served
    layer = image.layers[2]
    data = bytearray(layer.path.read_bytes())
    data[-2000] ^= 0x01  # inside the payload; the size stays the same
    layer.path.write_bytes(bytes(data))
    with pytest.raises(PullError, match=f"/blobs/{layer.digest}: the bytes hash to sha256:"):
        await pull(client, url, "demo/app", "1.0", tmp_path / "out")


async def test_pull_names_the_request_a_connection_failed_on(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(PullError, match=f"GET http://127.0.0.1:{port}/v2/demo/app/manifests/1.0"):
        await pull(client, f"http://127.0.0.1:{port}", "demo/app", "1.0", tmp_path / "out")


async def test_pull_reports_the_registry_error(
    served: tuple[BuiltinOrigin, str], client: httpx.AsyncClient, tmp_path: Path
) -> None:
    _, url = served
    with pytest.raises(PullError, match=r"answered 404: .*MANIFEST_UNKNOWN"):
        await pull(client, url, "demo/app", "9.9", tmp_path / "out")


async def test_a_slow_origin_paces_its_blobs(
    nursery: trio.Nursery, image: DemoImage, client: httpx.AsyncClient
) -> None:
    origin = BuiltinOrigin(image, rate=10_000_000)
    port: int = await nursery.start(serve_builtin, origin)
    layer = image.layers[0]  # about 1.1 MB: 0.1 s at 10 MB/s
    started = trio.current_time()
    async with trio.open_nursery() as both:
        for _ in range(2):
            both.start_soon(client.get, f"http://127.0.0.1:{port}/v2/demo/app/blobs/{layer.digest}")
    assert trio.current_time() - started >= 2 * layer.size / 10_000_000 * 0.9
