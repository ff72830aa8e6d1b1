"""Shared helpers of the p2p-proxy component tests, and self-tests of the proxy's plumbing.

The proxy runs in-process (``nursery.start(serve, settings)``, API on port 0, a fresh data
directory) and is driven with httpx; the origin is the real CNCF distribution registry
(``tests.realparts.registry``). :func:`run_proxy` stops it through its graceful path (the
shutdown trigger), so every test also checks that a stop finishes.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2p_common.blobinfo import BlobMetainfo, ChunkBuilder
from p2p_common.storage import Info, PieceFile
from p2p_proxy.app import CHUNKS_CONTENT_TYPE
from p2p_proxy.service import serve
from p2p_proxy.settings import ProxySettings
from tests.cluster import push
from tests.engine_helpers import running_engines
from tests.realparts import images
from tests.realparts.registry import AccessEntry, Registry, free_port, run_registry

pytestmark = pytest.mark.realparts

ACCEPT_LINES = [images.OCI_INDEX, images.OCI_MANIFEST, images.DOCKER_LIST, images.DOCKER_MANIFEST]
"""What skopeo sends: one media type per ``Accept`` line."""
TRACKERS = ["http://127.0.0.1:9/announce", "http://127.0.0.2:9/announce"]
"""Tracker URLs that refuse connections: metainfo carries them, announcing fails fast."""


def accept(*media_types: str) -> list[tuple[str, str]]:
    """Headers with one ``Accept`` line per media type."""
    return [("Accept", media_type) for media_type in media_types]


def basic(user: str, password: str) -> dict[str, str]:
    raw = f"{user}:{password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@dataclass
class Proxy:
    settings: ProxySettings
    port: int
    http: httpx.AsyncClient

    @property
    def peer_port(self) -> int:
        return self.settings.peer_port

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    async def metainfo(
        self,
        name: str,
        digest: str,
        *,
        headers: dict[str, str] | None = None,
        ns: str | None = None,
    ) -> httpx.Response:
        params = {"name": name, "digest": digest}
        if ns is not None:
            params["ns"] = ns
        return await self.http.get("/p2p/v1/metainfo", params=params, headers=headers)

    async def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of ``/metrics`` (0 when absent)."""
        response = await self.http.get("/metrics")
        assert response.status_code == 200
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def blob_files(self) -> set[str]:
        """Digests whose blob file is in the cache directory."""
        root = self.data_dir / "blobs" / "sha256"
        return {"sha256:" + p.name for p in root.iterdir() if not p.suffix}

    def scratch_files(self) -> list[Path]:
        return list((self.data_dir / "tmp").iterdir())


@asynccontextmanager
async def run_proxy(
    data_dir: Path, registries: Sequence[str], **overrides: object
) -> AsyncIterator[Proxy]:
    """The proxy in-process on 127.0.0.1; stopped gracefully (bounded) on exit."""
    overrides.setdefault("trackers", TRACKERS)
    overrides.setdefault("shutdown_timeout", 2.0)
    settings = ProxySettings.load(
        None,
        environ={},
        listen="127.0.0.1:0",
        peer_port=free_port(),
        data_dir=data_dir,
        registry=list(registries),
        **overrides,
    )
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(partial(serve, settings, shutdown_trigger=stop.wait))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                yield Proxy(settings, port, http)
            stop.set()


async def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """(status, body) of ``GET target`` sent verbatim (httpx would normalise ``..``)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = f"GET {target} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode("latin-1"))
        received = bytearray()
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def origin_requests(registry: Registry) -> list[AccessEntry]:
    """Every request the registry answered, without the harness's own log markers."""
    return [e for e in registry.access_log() if "p2p-log-marker" not in e.query]


def chunks_of(response: httpx.Response, blob: images.Blob) -> BlobMetainfo:
    """The chunked metainfo a proxy answered for ``blob`` (checked to be whole and its)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CHUNKS_CONTENT_TYPE
    return BlobMetainfo.from_frames(blob.digest, blob.size, response.content)


def expected_chunks(blob: images.Blob, trackers: Sequence[str]) -> BlobMetainfo:
    """What any proxy must publish for ``blob`` (built here from its bytes)."""
    builder = ChunkBuilder(blob.digest, blob.size, trackers)
    step = builder.blob.piece_length
    for start in range(0, blob.size, step):
        builder.piece(hashlib.sha1(blob.data[start : start + step]).digest())
    builder.finish()
    return builder.blob


async def leech(meta: Info, peer_port: int, target: Path) -> bytes:
    """Download ``meta`` with the project's engine from the proxy's peer port alone
    (at most 30 seconds)."""
    async with running_engines(1) as (engine,):
        store = PieceFile(meta, target, target.with_name(target.name + ".bits"))
        try:
            torrent = await engine.add_torrent(meta, store, peers=[("127.0.0.1", peer_port)])
            with trio.fail_after(30):
                await torrent.wait_complete()
        finally:
            store.close()
    return await trio.Path(target).read_bytes()


# --- self-tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("harness"), auth="none") as running:
        yield running


async def test_health_readiness_ping_and_metrics(registry: Registry, tmp_path: Path) -> None:
    async with run_proxy(tmp_path / "data", [registry.url]) as proxy:
        health = await proxy.http.get("/healthz")
        assert (health.status_code, health.text) == (200, "ok\n")
        ready = await proxy.http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "ready": True,
            "peerPort": proxy.peer_port,
            "registries": [registry.host],
        }
        ping = await proxy.http.get("/v2/")
        assert (ping.status_code, ping.json()) == (200, {})
        assert ping.headers["docker-distribution-api-version"] == "registry/2.0"
        metrics = await proxy.http.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        for name in (
            "p2p_proxy_origin_bytes_total",
            "p2p_proxy_blobs_fetched_total",
            "p2p_proxy_cache_hits_total",
            "p2p_proxy_cache_misses_total",
            "p2p_proxy_metainfo_requests_total",
            "p2p_proxy_peer_upload_bytes_total",
            "p2p_proxy_http_fallback_bytes_total",
            "p2p_proxy_seeding_torrents",
        ):
            assert name in metrics.text, name
        # The data directory has the cache layout.
        assert {p.name for p in proxy.data_dir.iterdir()} == {"blobs", "partial", "tmp"}


async def test_paths_and_methods_outside_the_api(registry: Registry, tmp_path: Path) -> None:
    before = len(origin_requests(registry))
    async with run_proxy(tmp_path / "data", [registry.url]) as proxy:
        unknown = await proxy.http.get("/nothing/here")
        assert unknown.status_code == 404
        assert unknown.json()["errors"][0]["code"] == "UNSUPPORTED"
        assert unknown.headers.get_list("content-type") == ["application/json; charset=utf-8"]
        push_attempt = await proxy.http.post("/v2/library/app/blobs/uploads/")
        assert push_attempt.status_code == 405
        put = await proxy.http.put(
            "/v2/library/app/manifests/latest", content=b"{}", headers={"Content-Type": "x/y"}
        )
        assert put.status_code == 405
        assert put.json()["errors"][0]["code"] == "UNSUPPORTED"
        catalog = await proxy.http.get("/v2/_catalog")  # tag lists and referrers are served
        assert catalog.status_code == 404
        post_metainfo = await proxy.http.post("/p2p/v1/metainfo")
        assert post_metainfo.status_code == 405
    assert len(origin_requests(registry)) == before


async def test_a_stop_is_graceful_and_the_port_closes(registry: Registry, tmp_path: Path) -> None:
    async with run_proxy(tmp_path / "data", [registry.url]) as proxy:
        port = proxy.port
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_a_stop_closes_every_file_and_socket(registry: Registry, tmp_path: Path) -> None:
    image = push(tmp_path, registry, "library/fds", seed="fds", layer_sizes=[1000, 300_000])

    def open_fds() -> set[str]:
        return {p.name for p in Path("/proc/self/fd").iterdir()}

    async with run_proxy(tmp_path / "warm", [registry.url]):
        pass  # first use of the libraries (thread pools, caches) outside the count
    before = open_fds()
    async with run_proxy(tmp_path / "data", [registry.url]) as proxy:
        for layer in image.layers:
            meta = chunks_of(await proxy.metainfo("library/fds", layer.digest), layer)
            assert await leech(meta, proxy.peer_port, tmp_path / layer.digest[7:]) == layer.data
    with trio.fail_after(5):
        while open_fds() - before:  # noqa: ASYNC110 - sockets close in other tasks
            await trio.sleep(0.05)
