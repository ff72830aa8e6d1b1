"""p2p-proxy's fetch path without a real registry: single flight, authorization decisions,
and the fetcher's streaming, verification and failure handling against an in-memory origin
(an httpx transport), with a real :class:`BlobCache` in a temporary directory."""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing

from p2p_common import metainfo as mi
from p2p_common.blobcache import BlobCache
from p2p_common.blobinfo import chunk_pieces_for
from p2p_common.ingest import BATCH_BYTES, Ingest
from p2p_common.logs import MAX_PULL_IDS, pull_context
from p2p_common.metainfo import MIN_PIECE_LENGTH
from p2p_common.oci import ErrorCode, OCIError
from p2p_common.registry_auth import Credentials
from p2p_proxy.authz import Authorizer, Decision, DecisionCache
from p2p_proxy.fetch import BlobFetcher, Fetch
from p2p_proxy.flight import SingleFlight
from p2p_proxy.manifests import CachedManifest, ManifestCache, ManifestQuery, Manifests
from p2p_proxy.metrics import ProxyMetrics
from p2p_proxy.origin import ManifestResponse, OriginClient

MiB = 1024 * 1024
PIECE = MIN_PIECE_LENGTH  # the blobs here are small enough for the smallest pieces
CHUNK_PIECES = chunk_pieces_for(PIECE)
CHUNK = CHUNK_PIECES * PIECE
REPO = "team/app"


def make_random(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeOrigin:
    """A registry in memory: blobs by digest, optionally lying about them."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.gets: list[str] = []
        self.heads: list[str] = []
        self.served: dict[str, bytes] = {}
        """Bytes to send instead of the real ones (a corrupt origin)."""
        self.length_override: dict[str, int] = {}
        self.chunk = 256 * 1024
        self.allowed_users: set[str] | None = None
        self.hold_after: int | None = None
        """Stop sending a body after this many bytes until :attr:`release` is set."""
        self.release = trio.Event()

    def _refuse(self, request: httpx.Request) -> httpx.Response | None:
        if self.allowed_users is None:
            return None
        auth = request.headers.get("authorization")
        if auth is None:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        name = base64.b64decode(auth.split()[1]).decode().partition(":")[0]
        if name not in self.allowed_users:
            return httpx.Response(403, json={"errors": [{"code": "DENIED"}]})
        return None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        digest = request.url.path.rsplit("/", 1)[-1]
        refused = self._refuse(request)
        if refused is not None:
            return refused
        data = self.blobs.get(digest)
        if data is None:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        body = self.served.get(digest, data)
        length = self.length_override.get(digest, len(body))
        headers = {"Content-Length": str(length), "Docker-Content-Digest": digest}
        if request.method == "HEAD":
            self.heads.append(digest)
            return httpx.Response(200, headers=headers)
        self.gets.append(digest)
        chunk = self.chunk

        async def stream() -> AsyncIterator[bytes]:
            for offset in range(0, len(body), chunk):
                if self.hold_after is not None and offset >= self.hold_after:
                    await self.release.wait()
                await trio.lowlevel.checkpoint()
                yield body[offset : offset + chunk]

        return httpx.Response(200, headers=headers, content=stream())

    def client(self) -> OriginClient:
        return OriginClient("http://origin.test", transport=httpx.MockTransport(self.handle))


# --- single flight ----------------------------------------------------------------------------


async def test_single_flight_shares_one_run_and_copies_errors(nursery: trio.Nursery) -> None:
    flights: SingleFlight[str, int] = SingleFlight(nursery, "test")
    runs = 0
    release = trio.Event()

    async def work() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return 42

    results: list[int] = []

    async def ask() -> None:
        results.append(await flights.run("k", work))

    async with trio.open_nursery() as inner:
        for _ in range(5):
            inner.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert flights.in_flight("k")
        release.set()
    assert (runs, results) == (1, [42] * 5)
    assert not flights.in_flight("k")

    async def fail() -> int:
        raise OCIError(ErrorCode.DENIED, "no")

    errors: list[OCIError] = []

    async def ask_failing() -> None:
        try:
            await flights.run("bad", fail)
        except OCIError as exc:
            errors.append(exc)

    async with trio.open_nursery() as inner:
        for _ in range(3):
            inner.start_soon(ask_failing)
    assert [e.code for e in errors] == [ErrorCode.DENIED] * 3
    assert len({id(e) for e in errors}) == 3  # one instance per waiter


async def test_single_flight_survives_a_waiter_that_leaves(nursery: trio.Nursery) -> None:
    flights: SingleFlight[str, str] = SingleFlight(nursery, "test")
    release = trio.Event()
    finished = trio.Event()

    async def work() -> str:
        await release.wait()
        finished.set()
        return "done"

    with trio.move_on_after(0.05):
        await flights.run("k", work)  # the first caller gives up
    assert flights.in_flight("k")
    release.set()
    assert await flights.run("k", work) == "done"
    assert finished.is_set()
    assert flights.started == 1


async def test_single_flight_turns_a_bug_into_a_500(nursery: trio.Nursery) -> None:
    flights: SingleFlight[str, int] = SingleFlight(nursery, "test")

    async def broken() -> int:
        raise ZeroDivisionError

    with pytest.raises(OCIError) as info:
        await flights.run("k", broken)
    assert (info.value.code, info.value.status) == (ErrorCode.UNKNOWN, 500)


async def test_single_flight_answers_503_when_the_proxy_stops() -> None:
    """The run belongs to the service's nursery: when that is cancelled (shutdown), every
    waiter gets its own 503 instead of waiting forever."""
    errors: list[OCIError] = []

    async def work() -> int:
        await trio.sleep_forever()
        raise AssertionError("not reached")

    async with trio.open_nursery() as outer:
        service = trio.CancelScope()
        flights: list[SingleFlight[str, int]] = []
        ready = trio.Event()

        async def serve() -> None:
            with service:
                async with trio.open_nursery() as nursery:
                    flights.append(SingleFlight(nursery, "test"))
                    ready.set()
                    await trio.sleep_forever()

        outer.start_soon(serve)
        await ready.wait()

        async def ask() -> None:
            try:
                await flights[0].run("k", work)
            except OCIError as exc:
                errors.append(exc)

        async with trio.open_nursery() as callers:
            for _ in range(3):
                callers.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            service.cancel()
    assert [(e.code, e.status) for e in errors] == [(ErrorCode.UNKNOWN, 503)] * 3
    assert len({id(e) for e in errors}) == 3


# --- authorization ----------------------------------------------------------------------------


def test_decision_cache() -> None:
    cache = DecisionCache(ttl=10, max_entries=2)
    key = ("fp", "reg", REPO, "sha256:" + "1" * 64)
    cache.put(key, Decision(size=5), now=0)
    assert cache.get(key, now=9.9) == Decision(size=5)
    assert cache.get(key, now=10) is None
    denied = Decision(error=OCIError(ErrorCode.DENIED))
    cache.put(key, denied, now=0)
    assert cache.get(key, now=1) is denied
    for code in (ErrorCode.BLOB_UNKNOWN, ErrorCode.UNKNOWN, ErrorCode.TOOMANYREQUESTS):
        cache.put(("x", "", "", code), Decision(error=OCIError(code, status=None)), now=0)
        assert cache.get(("x", "", "", code), now=0) is None
    for n in range(3):
        cache.put((str(n), "", "", ""), Decision(size=n), now=0)
    assert len(cache) == 2
    assert cache.get(("0", "", "", ""), now=0) is None
    off = DecisionCache(ttl=0)
    off.put(key, Decision(size=1), now=0)
    assert off.get(key, now=0) is None


async def test_authorizer_asks_once_per_key(nursery: trio.Nursery) -> None:
    data = b"a" * 1000
    digest = digest_of(data)
    origin = FakeOrigin({digest: data})
    origin.allowed_users = {"alice"}
    now = [0.0]
    authorizer = Authorizer(nursery, ProxyMetrics(), ttl=60, clock=lambda: now[0])
    alice = Credentials("alice", "pw")
    async with origin.client() as client:
        async with trio.open_nursery() as inner:
            for _ in range(5):
                inner.start_soon(authorizer.authorize, client, REPO, digest, alice)
        heads = len(origin.heads)
        assert heads == 1
        assert await authorizer.authorize(client, REPO, digest, alice) == 1000
        assert len(origin.heads) == heads
        with pytest.raises(OCIError) as info:
            await authorizer.authorize(client, REPO, digest, Credentials("bob", "pw"))
        assert info.value.code is ErrorCode.DENIED
        with pytest.raises(OCIError) as info:
            await authorizer.authorize(client, REPO, digest, None)
        assert info.value.code is ErrorCode.UNAUTHORIZED
        now[0] = 61.0
        assert await authorizer.authorize(client, REPO, digest, alice) == 1000
        assert len(origin.heads) == heads + 1
        # What is left of a grant is what an agent may keep it for: never more.
        assert await authorizer.grant(client, REPO, digest, alice) == (1000, 60.0)
        now[0] = 101.0
        assert await authorizer.grant(client, REPO, digest, alice) == (1000, 20.0)


# --- fetching ---------------------------------------------------------------------------------


def make_fetcher(
    nursery: trio.Nursery, tmp_path: Path, *, quota: int = 0
) -> tuple[BlobFetcher, BlobCache, ProxyMetrics]:
    cache = BlobCache(tmp_path / "data", quota=quota)
    metrics = ProxyMetrics()
    return BlobFetcher(cache, metrics, nursery, ["http://t/announce"]), cache, metrics


def cache_is_clean(cache: BlobCache) -> bool:
    return list(cache.tmp_dir.iterdir()) == [] and cache.used == sum(
        cache.size(d) or 0 for d in cache.digests()
    )


async def test_fetch_streams_hashes_and_adopts(nursery: trio.Nursery, tmp_path: Path) -> None:
    data = bytes(range(256)) * (9 * MiB // 256) + b"tail"
    assert len(data) > 2 * BATCH_BYTES
    digest = digest_of(data)
    origin = FakeOrigin({digest: data})
    fetcher, cache, metrics = make_fetcher(nursery, tmp_path)
    async with origin.client() as client:
        async with trio.open_nursery() as inner:
            for _ in range(4):
                inner.start_soon(fetcher.ensure, client, REPO, digest, None, len(data))
        meta = await fetcher.ensure(client, REPO, digest, None, len(data))
    assert origin.gets == [digest]
    assert cache.blob_path(digest).read_bytes() == data
    stored = cache.load_metainfo(digest)
    assert stored is not None
    assert stored.info_hash == meta.info_hash
    pieces, found, length = mi.hash_file(cache.blob_path(digest), meta.piece_length)
    assert (found, length) == (digest, len(data))
    assert pieces == b"".join(chunk.pieces for chunk in meta.chunks)
    assert meta.complete
    assert len(meta.chunks) == meta.geometry.num_chunks > 1
    assert meta.trackers == ("http://t/announce",)
    assert cache_is_clean(cache)
    assert metrics.origin_bytes._value.get() == len(data)


class Listener:
    """Records what a fetch tells its listener (as the proxy's seeder hears it)."""

    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.pieces: list[int] = []
        self.ended: list[bool] = []

    def fetch_chunk(self, fetch: Fetch) -> None:
        self.chunks.append(len(fetch.blob.chunks) - 1)

    def fetch_piece(self, fetch: Fetch, index: int) -> None:
        self.pieces.append(index)

    def fetch_ended(self, fetch: Fetch) -> None:
        self.ended.append(fetch.failed)


async def test_chunks_are_published_while_the_origin_still_sends(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = make_random(3 * CHUNK + 1000)
    digest = digest_of(data)
    origin = FakeOrigin({digest: data})
    origin.hold_after = CHUNK + 3 * PIECE  # the origin stalls inside the second chunk
    fetcher, cache, _ = make_fetcher(nursery, tmp_path)
    listener = Listener()
    fetcher.listener = listener
    async with origin.client() as client:
        fetch = await fetcher.follow(client, REPO, digest, None, len(data))
        assert fetch is not None
        with trio.fail_after(10):
            while not fetch.blob.chunks:
                await fetch.changed.wait()
        assert len(fetch.blob.chunks) == 1
        assert not fetch.ended
        assert listener.chunks == [0]
        assert listener.pieces == list(range(fetch.pieces))
        # the origin stops at the end of the send unit that crosses ``hold_after``
        assert CHUNK_PIECES <= fetch.pieces <= (origin.hold_after + origin.chunk) // PIECE
        first = fetch.blob.chunks[0]
        assert first.piece_hash(0) == hashlib.sha1(data[:PIECE]).digest()
        assert digest not in cache
        origin.release.set()
        meta = await fetcher.ensure(client, REPO, digest, None, len(data))
    assert meta is fetch.blob
    assert meta.complete
    assert len(meta.chunks) == 4
    assert listener.chunks == [0, 1, 2, 3]
    assert listener.ended == [False]
    assert origin.gets == [digest]  # followers and the ensure shared one fetch


async def test_the_last_chunk_of_a_wrong_blob_is_never_published(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = make_random(2 * CHUNK + 10)
    digest = digest_of(data)
    origin = FakeOrigin({digest: data})
    origin.served[digest] = data[:-1] + b"!"  # wrong in the last chunk's bytes
    fetcher, cache, _ = make_fetcher(nursery, tmp_path)
    listener = Listener()
    fetcher.listener = listener
    async with origin.client() as client:
        with pytest.raises(OCIError, match="digest"):
            await fetcher.ensure(client, REPO, digest, None, len(data))
    assert listener.chunks == [0, 1]  # the third (last) chunk waited for the digest check
    assert listener.ended == [True]
    assert digest not in cache
    assert cache_is_clean(cache)


@pytest.mark.parametrize(
    ("lie", "message"),
    [
        ("corrupt", "digest"),
        ("head_size", "said has"),
    ],
)
async def test_an_origin_that_lies_leaves_no_trace(
    nursery: trio.Nursery, tmp_path: Path, lie: str, message: str
) -> None:
    data = b"z" * (BATCH_BYTES + 5)
    digest = digest_of(data)
    origin = FakeOrigin({digest: data})
    size = len(data)
    if lie == "corrupt":
        origin.served[digest] = b"y" + data[1:]
    else:
        size = len(data) - 1  # what the HEAD said
    fetcher, cache, _ = make_fetcher(nursery, tmp_path)
    async with origin.client() as client:
        with pytest.raises(OCIError) as info:
            await fetcher.ensure(client, REPO, digest, None, size)
    assert (info.value.code, info.value.status) == (ErrorCode.UNKNOWN, 502)
    assert message in info.value.message
    assert digest not in cache
    assert not cache.blob_path(digest).exists()
    assert not cache.metainfo_path(digest).exists()
    assert cache_is_clean(cache)
    assert cache.used == 0


async def test_disk_full_is_507_and_the_cache_stays_consistent(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"q" * (3 * BATCH_BYTES)
    digest = digest_of(data)
    origin = FakeOrigin({digest: data})
    fetcher, cache, _ = make_fetcher(nursery, tmp_path)
    real_write: Callable[[Ingest, list[bytes], int], list[tuple[int, bytes]]] = Ingest._write
    writes = 0

    def failing_write(self: Ingest, chunks: list[bytes], offset: int) -> list[tuple[int, bytes]]:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, chunks, offset)

    monkeypatch.setattr(Ingest, "_write", failing_write)
    async with origin.client() as client:
        with pytest.raises(OCIError) as info:
            await fetcher.ensure(client, REPO, digest, None, len(data))
        assert info.value.status == 507
        assert "disk full" in info.value.message
        assert cache_is_clean(cache)
        assert cache.used == 0
        monkeypatch.setattr(Ingest, "_write", real_write)
        await fetcher.ensure(client, REPO, digest, None, len(data))
    assert cache.blob_path(digest).read_bytes() == data


async def test_quota_evicts_least_recently_used_and_refuses_what_cannot_fit(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    blobs = {digest_of(d): d for d in (b"1" * 400, b"2" * 400, b"3" * 400, b"4" * 2000)}
    first, second, third, huge = blobs
    origin = FakeOrigin(blobs)
    fetcher, cache, _ = make_fetcher(nursery, tmp_path, quota=1000)
    evicted: list[str] = []
    cache.on_evict = evicted.append
    async with origin.client() as client:
        await fetcher.ensure(client, REPO, first, None, 400)
        await fetcher.ensure(client, REPO, second, None, 400)
        await fetcher.ensure(client, REPO, first, None, 400)  # a hit: first is now recent
        with cache.pinned(first):
            await fetcher.ensure(client, REPO, third, None, 400)
        assert evicted == [second]
        assert set(cache.digests()) == {first, third}
        with pytest.raises(OCIError) as info:
            await fetcher.ensure(client, REPO, huge, None, 2000)
        assert info.value.status == 507
    assert cache_is_clean(cache)
    assert not cache.blob_path(second).exists()


# --- manifest cache ---------------------------------------------------------------------------


def test_manifest_cache_drops_the_least_recently_used_beyond_its_size() -> None:
    cache = ManifestCache(max_bytes=10)
    cache.put("a", "t/a", b"1234")
    cache.put("b", "t/b", b"1234")
    assert cache.get("a") == CachedManifest("t/a", b"1234")  # a is now the most recent
    cache.put("c", "t/c", b"1234")
    assert "b" not in cache
    assert ("a" in cache, "c" in cache, cache.bytes) == (True, True, 8)
    cache.put("a", "t/a", b"123456")  # replacing an entry accounts for the old body
    assert (cache.bytes, len(cache)) == (10, 2)
    cache.put("big", "t", b"x" * 11)  # larger than the whole cache: not kept, nothing dropped
    assert ("big" in cache, len(cache), cache.bytes) == (False, 2, 10)
    off = ManifestCache(max_bytes=0)
    off.put("a", "t", b"1")
    assert off.get("a") is None


class TimedManifestOrigin:
    """An origin whose manifest answers take the time the test says (virtual clock)."""

    name = "registry.test"

    def __init__(self, body: bytes, get_seconds: float) -> None:
        self.body = body
        self.digest = digest_of(body)
        self.get_seconds = get_seconds
        self.head_seconds: list[float] = []
        """Per HEAD, in order: how long it takes."""
        self.gets = 0
        self.heads = 0

    def _answer(self, body: bytes) -> ManifestResponse:
        return ManifestResponse(200, {}, "application/x-test", self.digest, len(self.body), body)

    async def head_manifest(self, *args: object, **kwargs: object) -> ManifestResponse:
        self.heads += 1
        await trio.sleep(self.head_seconds[self.heads - 1])
        return self._answer(b"")

    async def get_manifest(self, *args: object, **kwargs: object) -> ManifestResponse:
        self.gets += 1
        await trio.sleep(self.get_seconds)
        return self._answer(self.body)


@pytest.mark.parametrize("round_", range(12))
async def test_a_tag_resolved_as_its_body_arrives_does_not_fetch_the_body_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, round_: int
) -> None:
    """A resolves the tag (0.1 s) and fetches the body (until 1.1 s); B's resolution ends at
    the very instant A's fetch does. Whichever task trio wakes first, B must find the body."""
    metrics = ProxyMetrics()
    manifests = Manifests(
        nursery,
        metrics,
        Authorizer(nursery, metrics, ttl=60, kind="manifest"),
        max_bytes=1 << 20,
    )
    origin = TimedManifestOrigin(b'{"schemaVersion": 2}', get_seconds=1.0)
    origin.head_seconds = [0.1, 0.6]
    query = ManifestQuery(cast(OriginClient, origin), REPO, "latest", None, None)
    answers: list[ManifestResponse] = []

    async def ask(delay: float) -> None:
        await trio.sleep(delay)
        answers.append(await manifests.fetch(query, head=False))

    async with trio.open_nursery() as inner:
        inner.start_soon(ask, 0.0)
        inner.start_soon(ask, 0.5)
    assert [a.body for a in answers] == [origin.body] * 2
    assert (origin.heads, origin.gets) == (2, 1)


async def test_a_shared_fetch_lists_the_pulls_it_serves(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="p2p")
    data = make_random(2 * CHUNK)
    digest = digest_of(data)
    origin = FakeOrigin({digest: data})
    origin.hold_after = PIECE  # every pull arrives while the origin still sends
    fetcher, _, _ = make_fetcher(nursery, tmp_path)
    pulls = [f"pull-{n}" for n in range(MAX_PULL_IDS + 3)]

    async def pull(pull_id: str) -> None:
        with pull_context(pull_id):
            await fetcher.ensure(client, REPO, digest, None, len(data))

    async with origin.client() as client, trio.open_nursery() as inner:
        inner.start_soon(pull, pulls[0])
        with trio.fail_after(10):
            while not fetcher.log.in_flight:  # noqa: ASYNC110 - the fetch's own record
                await trio.sleep(0.01)
        for pull_id in pulls[1:]:
            inner.start_soon(pull, pull_id)
        await trio.testing.wait_all_tasks_blocked()
        origin.release.set()
    assert origin.gets == [digest]
    events = [(r.getMessage(), getattr(r, "p2p_fields", {})) for r in caplog.records]
    (fetched,) = [fields for name, fields in events if name == "proxy.fetched"]
    assert fetched["pull_id"] == pulls[0]  # the fetch runs as the pull that started it
    listed = fetched["pull_ids"]
    assert listed[0] == pulls[0]
    assert len(listed) == len(set(listed)) == MAX_PULL_IDS
    assert set(listed) <= set(pulls)
    assert fetched["pull_ids_more"] == 3
    joined = [fields for name, fields in events if name == "proxy.fetch_joined"]
    assert sorted(f["pull_id"] for f in joined) == sorted(pulls[1:])
    assert {f["fetch_pull_id"] for f in joined} == {pulls[0]}
    (record,) = fetcher.log.recent
    view = record.view(0.0)
    assert (view["pull_ids"], view["pulls"]) == (listed, len(pulls))
