"""The proxy's status document (p2p_proxy.status) over the proxy's real parts: a fetcher
fetching from an in-memory origin, the blob cache, the peer engine and its seeder, the
preheater, the origin limits and the announcer; and its terminal rendering (status_cli)."""

from __future__ import annotations

import hashlib
import json
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from rich.console import Console

from p2p_common.bencoding import encode
from p2p_common.blobcache import BlobCache
from p2p_common.engine import Engine
from p2p_common.oci import OCI_MANIFEST, ErrorCode, OCIError
from p2p_common.registry_auth import Credentials
from p2p_common.tracker_proto import Event
from p2p_proxy.fetch import BlobFetcher
from p2p_proxy.limits import OriginLimits
from p2p_proxy.metrics import ProxyMetrics
from p2p_proxy.origin.egress import EgressRoutes
from p2p_proxy.preheat import Preheater
from p2p_proxy.seeding import Seeder
from p2p_proxy.status import FetchLog, Limits, StatusView
from p2p_proxy.status_cli import render
from tests.unit.test_proxy_fetch import FakeOrigin, digest_of, make_random

MiB = 1024 * 1024
REPO = "team/app"
TRACKER = "http://127.0.0.1:6969/announce"
"""The tracker in every metainfo (answered by :func:`tracker_answers`, no socket)."""
SECRET = Credentials("alice", "s3cret-password")


def tracker_answers(request: httpx.Request) -> httpx.Response:
    """127.0.0.1 answers with one peer; any other tracker address refuses connections."""
    if request.url.host != "127.0.0.1":
        raise httpx.ConnectError("connection refused", request=request)
    return httpx.Response(
        200, content=encode({b"interval": 30, b"peers": b"\x0a\x00\x00\x07\x1a\xe1"})
    )


class Proxy:
    """The parts of a proxy that the status view reads, wired as p2p_proxy.service does."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path) -> None:
        self.http = httpx.AsyncClient(transport=httpx.MockTransport(tracker_answers))
        """The announcer's client (closed by the engine when it serves, else by the test)."""
        self.cache = BlobCache(tmp_path / "data", quota=10**9)
        self.metrics = ProxyMetrics()
        self.engine = Engine(host="127.0.0.1", role="proxy", http_client=self.http)
        self.seeder = Seeder(self.engine, self.cache, nursery, [TRACKER])
        self.limits = OriginLimits(
            self.metrics,
            requests_per_address=16,
            rate_per_address=5.0,
            burst_per_address=100,
            uncapped=[ip_network("127.0.0.0/8")],
            max_fetches=4,
            queue_timeout=30.0,
        )
        self.fetcher = BlobFetcher(
            self.cache,
            self.metrics,
            nursery,
            [TRACKER],
            listener=self.seeder,
            limits=self.limits,
        )
        self.preheater = Preheater(nursery)
        self.view = StatusView(
            version="9.9",
            registries=["origin.test"],
            fetches=self.fetcher.log,
            cache=self.cache,
            seeds=self.seeder.torrents,
            engine=self.engine,
            jobs=lambda: reversed(list(self.preheater.jobs.values())),
            origin_limits=self.limits,
            limits=Limits(
                upload_rate=50_000_000,
                max_connections=1000,
                progressive_streams=0,
                auth_cache_ttl=60,
            ),
            trackers=[TRACKER],
            data_dir=tmp_path / "data",
        )

    def document(self) -> dict[str, Any]:
        """The snapshot, through JSON as ``/status`` sends it."""
        doc: dict[str, Any] = json.loads(json.dumps(self.view.snapshot()))
        return doc


def test_the_fetch_log_is_bounded_and_counts_every_origin_byte() -> None:
    now = [10.0]
    log = FetchLog(keep=2, clock=lambda: now[0], wall=lambda: 1_800_000_000.0 + now[0])
    records = [log.begin("origin.test", REPO, f"sha256:{n}", 100) for n in range(3)]
    for n, record in enumerate(records):
        record.received = 10 * (n + 1)
    assert log.origin_bytes == 60
    now[0] = 12.0
    log.end(records[0], "done")
    log.end(records[1], "failed", "origin sent 5 bytes")
    log.end(records[1], "done")  # a second end changes nothing
    log.end(records[2], "cancelled")
    assert log.in_flight == {}
    assert [r.digest for r in log.recent] == ["sha256:2", "sha256:1"]  # newest first, bounded
    assert log.origin_bytes == 60  # the dropped record's bytes still count
    assert (log.outcomes["done"], log.outcomes["failed"], log.outcomes["cancelled"]) == (1, 1, 1)
    assert log.last_done_at == 1_800_000_012.0
    failed = log.recent[1].view(100.0)
    assert (failed["outcome"], failed["error"], failed["seconds"]) == (
        "failed",
        "origin sent 5 bytes",
        2.0,
    )
    assert failed["bytes_per_second"] == 10
    unknown = log.begin("origin.test", REPO, "sha256:x", None).view(12.0)
    assert unknown["percent"] is None


async def wait_for(proxy: Proxy, ready: Any) -> dict[str, Any]:
    """The first document for which ``ready(doc)`` holds (10 s at most)."""
    with trio.fail_after(10):
        # The document is read like /status is: polled (it has no event to wait for).
        while not ready(doc := proxy.document()):  # noqa: ASYNC110
            await trio.sleep(0.01)
    return doc


async def test_a_fetch_in_flight_then_done_with_the_cache_and_the_seed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = make_random(3 * MiB + 123)
    digest = digest_of(data)
    origin = FakeOrigin({digest: data})
    origin.hold_after = MiB  # the origin stalls after 1 MiB
    proxy = Proxy(nursery, tmp_path)
    async with trio.open_nursery() as engine:
        await engine.start(proxy.engine.serve)
        async with origin.client() as client:
            done = trio.Event()

            async def pull() -> None:
                await proxy.fetcher.ensure(client, REPO, digest, SECRET, len(data))
                done.set()

            nursery.start_soon(pull)
            doc = await wait_for(proxy, lambda d: d["fetches"] and d["fetches"][0]["bytes"] >= MiB)
            (fetch,) = doc["fetches"]
            assert fetch["registry"] == client.name
            assert (fetch["repository"], fetch["digest"]) == (REPO, digest)
            assert (fetch["bytes"], fetch["size"]) == (MiB, len(data))
            assert fetch["percent"] == round(100.0 * MiB / len(data), 1)
            assert fetch["outcome"] == "running"
            assert doc["origin"]["bytes"] == MiB
            assert doc["origin"]["fetches_done"] == 0
            assert doc["recent_fetches"] == []
            assert doc["limits"]["origin_fetches_running"] == 1
            assert doc["limits"]["max_origin_fetches"] == 4
            assert doc["cache"]["used_bytes"] >= len(data)  # reserved for the fetch
            assert doc["cache"]["blobs"] == 0
            shown = Console(record=True, width=200)
            shown.print(render(doc))
            text = shown.export_text()
            assert "fetches from the origin" in text
            assert digest[7:19] in text
            assert f"{fetch['percent']:5.1f}%" in text

            origin.release.set()
            with trio.fail_after(10):
                await done.wait()
        doc = await wait_for(proxy, lambda d: d["seeding"]["blobs"] == 1)
        engine.cancel_scope.cancel()
    proxy.seeder.close()
    assert doc["fetches"] == []
    (finished,) = doc["recent_fetches"]
    assert (finished["outcome"], finished["bytes"], finished["percent"]) == ("done", len(data), 100)
    assert finished["error"] is None
    assert doc["origin"]["bytes"] == len(data)
    assert doc["origin"]["fetches_done"] == 1
    assert doc["origin"]["last_fetch_done_at"] is not None
    assert doc["cache"] | {"disk_free_bytes": 0, "disk_total_bytes": 0} == {
        "used_bytes": len(data),
        "quota_bytes": 10**9,
        "blobs": 1,
        "blob_bytes": len(data),
        "disk_free_bytes": 0,
        "disk_total_bytes": 0,
    }
    assert doc["cache"]["disk_free_bytes"] > 0
    assert doc["seeding"]["bytes"] == len(data)
    assert doc["peers"] == {"connections": 0, "by_role": {}, "upload_bytes": 0}
    assert doc["limits"]["origin_fetches_running"] == 0
    assert doc["limits"]["uncapped_addresses"] == ["127.0.0.0/8"]
    assert doc["limits"]["upload_bytes_per_second"] == 50_000_000
    text = json.dumps(doc)
    assert SECRET.password not in text
    assert SECRET.username not in text
    for torrent in proxy.seeder.torrents().values():  # the swarm's capability stays hidden
        assert torrent.info_hash.hex() not in text


async def test_a_failed_fetch_is_recent_with_its_reason(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = make_random(MiB)
    digest = digest_of(data)
    origin = FakeOrigin({digest: data})
    origin.served[digest] = data[:-1] + b"!"  # the origin sends a wrong blob
    proxy = Proxy(nursery, tmp_path)
    async with proxy.http:
        async with origin.client() as client:
            with pytest.raises(OCIError):
                await proxy.fetcher.ensure(client, REPO, digest, None, len(data))
        doc = proxy.document()
    (failed,) = doc["recent_fetches"]
    assert failed["outcome"] == "failed"
    assert "digest" in failed["error"]
    assert failed["bytes"] == len(data)  # received, then refused
    assert doc["origin"] == {
        "bytes": len(data),
        "fetches_done": 0,
        "fetches_failed": 1,
        "last_fetch_done_at": None,
        "egress_proxy": None,
    }
    assert doc["cache"]["blobs"] == 0
    assert doc["seeding"] == {"blobs": 0, "bytes": 0, "top": []}


def blob(name: str) -> tuple[str, int]:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest(), len(name) * 1000


async def test_preheat_jobs_show_their_progress_and_result(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config, first, second = blob("config"), blob("first layer"), blob("second layer")
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": config[0], "size": config[1]},
            "layers": [{"digest": d, "size": s} for d, s in (first, second)],
        }
    ).encode()
    release = trio.Event()

    async def get_manifest(repo: str, ref: str, creds: Credentials | None) -> tuple[str, bytes]:
        if ref == "missing":
            raise OCIError(ErrorCode.MANIFEST_UNKNOWN, "manifest unknown", status=404)
        return OCI_MANIFEST, manifest

    async def ensure_blob(repo: str, digest: str, size: int, creds: Credentials | None) -> bool:
        if digest == second[0]:
            await release.wait()
        return digest != config[0]  # the config was cached already

    proxy = Proxy(nursery, tmp_path)
    async with proxy.http:
        job = proxy.preheater.start(
            registry="origin.test",
            repository=REPO,
            reference="1.0",
            platforms=["linux/amd64"],
            credentials=SECRET,
            get_manifest=get_manifest,
            ensure_blob=ensure_blob,
        )
        doc = await wait_for(proxy, lambda d: d["preheat"][0]["blobs_ready"] == 2)
        (shown,) = doc["preheat"]
        assert shown["id"] == job.id
        assert (shown["image"], shown["registry"], shown["state"]) == (
            "team/app:1.0",
            "origin.test",
            "fetching",
        )
        assert shown["platforms"] == ["linux/amd64"]
        assert (shown["blobs"], shown["blobs_ready"], shown["blobs_fetched"]) == (3, 2, 1)
        assert shown["bytes"] == config[1] + first[1] + second[1]
        assert shown["ready_bytes"] == config[1] + first[1]
        assert 0 < shown["percent"] < 100
        release.set()
        missing = proxy.preheater.start(
            registry="origin.test",
            repository=REPO,
            reference="missing",
            platforms=[],
            credentials=None,
            get_manifest=get_manifest,
            ensure_blob=ensure_blob,
        )
        with trio.fail_after(10):
            await job.done_event.wait()
            await missing.done_event.wait()
        doc = proxy.document()
    failed, shown = doc["preheat"]  # the newest first
    assert (failed["image"], failed["state"], failed["error"]) == (
        "team/app:missing",
        "failed",
        "manifest unknown",
    )
    assert (failed["blobs"], failed["percent"]) == (0, 0.0)
    assert (shown["state"], shown["percent"], shown["error"]) == ("done", 100.0, None)
    assert (shown["blobs_ready"], shown["blobs_fetched"]) == (3, 2)
    assert shown["finished_at"] is not None
    assert SECRET.password not in json.dumps(doc)
    console = Console(record=True, width=200)
    console.print(render(doc))
    text = console.export_text()
    assert "team/app:1.0" in text
    assert "3/3 ready (2 fetched)" in text


async def test_trackers_show_their_last_answers_without_secrets(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    info_hash = bytes(range(20))
    proxy = Proxy(nursery, tmp_path)
    async with proxy.http:
        announcer = proxy.engine.shared.announcer
        announcer.port = 6881  # as if the engine listened
        assert proxy.document()["trackers"] == {"listed": [TRACKER], "instances": []}
        state = (Event.STARTED, 0, 0, 100)
        assert (
            await announcer.announce(info_hash, ("http://127.0.0.2:6969/announce",), state) is None
        )
        answer = await announcer.announce(
            info_hash, ("http://user:pw@127.0.0.1:6969/announce?passkey=k3y",), state
        )
        assert answer is not None
        doc = proxy.document()
    answering, failing = doc["trackers"]["instances"]  # the latest first
    assert answering["url"] == "http://127.0.0.1:6969/announce?..."
    assert answering["ok"] is True
    assert (answering["answers"], answering["failures"]) == (1, 0)
    assert (answering["last_peers"], answering["interval"]) == (1, 30)
    assert answering["last_answer_at"] is not None
    assert failing["url"] == "http://127.0.0.2:6969/announce"
    assert failing["ok"] is False
    assert (failing["answers"], failing["failures"]) == (0, 1)
    assert failing["last_error"] == "connection refused"
    text = json.dumps(doc)
    for secret in ("k3y", "user:pw", info_hash.hex()):
        assert secret not in text
    console = Console(record=True, width=200)
    console.print(render(doc))
    shown = console.export_text()
    assert "answering" in shown
    assert "failing" in shown
    assert "connection refused" in shown


async def test_the_egress_proxy_shows_without_its_credentials(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    proxy = Proxy(nursery, tmp_path)
    async with proxy.http:
        proxy.view.egress = EgressRoutes.explicit(
            "http://p2p:hunter2-egress@proxy.corp:3128", ["registry.internal", "10.0.0.0/8"]
        )
        doc = proxy.document()
    assert doc["origin"]["egress_proxy"] == {
        "source": "originProxy",
        "https_proxy": "http://***@proxy.corp:3128",
        "http_proxy": "http://***@proxy.corp:3128",
        "no_proxy": ["registry.internal", "10.0.0.0/8"],
    }
    console = Console(record=True, width=200)
    console.print(render(doc))
    text = console.export_text()
    assert "origin through http://***@proxy.corp:3128 (originProxy)" in text
    assert "hunter2" not in text + json.dumps(doc)
