"""Blobs on their way into the cache: one shared download per digest, streamed to readers.

A cold blob comes one of two ways, as the proxy decides (docs/proxy-api.md):

- **Swarm** (:class:`SwarmDownload`): the proxy answers with the blob's chunk torrents
  (p2p_common.blobinfo), the first one at once and the others as it fetches them from the
  origin; the agent joins the blob's swarm with the first chunk and downloads each chunk's
  pieces as soon as it knows their hashes, while every reader streams verified pieces, in
  order, as they arrive. If the swarm makes no progress for ``fallbackAfter`` seconds, the
  missing pieces whose hashes are known are fetched from the proxy over HTTP (still verified
  piece by piece).
- **Stream** (:class:`StreamDownload`): the proxy is still fetching the blob from the origin
  and has a stream slot free; it sends the blob itself as the origin delivers it, so the
  first nodes of a cold rollout get bytes at once instead of after the whole fetch. These
  bytes are the origin's, passed through before the digest check exactly as a direct pull
  would pass them (containerd checks the digest too).

- **Direct** (also :class:`StreamDownload`): a blob smaller than ``swarmMinSize`` (an image
  config, a tiny layer) is simply sent by the proxy over HTTP and never seeded.

Either way the blob's SHA-256 must equal its digest before it enters the cache, and then it
is seeded (a streamed blob as soon as the proxy's chunks are available). Every byte is
hashed once: a swarmed blob's SHA-256 is fed by each piece verified in order, by the readers
streaming it, and at the end by whatever nobody fed (:class:`~p2p_common.ingest.
OrderedHasher`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from p2p_agent.metrics import AgentMetrics
from p2p_agent.proxies import ProxiesUnreachableError, ProxyClient, SwarmSource
from p2p_common.blobcache import BlobCache, CacheFullError
from p2p_common.blobinfo import BlobMetainfo
from p2p_common.engine import Engine, Torrent, TorrentFailedError
from p2p_common.engine.torrent import RESEED_ANNOUNCE_SPREAD
from p2p_common.errors import LocalError
from p2p_common.ingest import Ingest, IngestError, OrderedHasher
from p2p_common.logs import current_pull_id, event
from p2p_common.oci import ErrorCode, OCIError
from p2p_common.sendmem import SEND_MEMORY
from p2p_common.singleflight import FlightCancelledError, FlightError, SingleFlight
from p2p_common.storage import BlobDamagedError, PieceFile

log = logging.getLogger("p2p.agent.downloads")

READ_CHUNK = 4 * 1024 * 1024
MIN_READ = 1024 * 1024
"""Bytes a streaming reader waits for before it reads (but the first read, and the last)."""
CHUNK_STREAM_RETRIES = 5
"""Times a broken chunk stream is reopened before the download fails."""
STREAM_RESUMES = 5
"""Times a broken stream of a blob is resumed (from the byte reached) before the download
fails."""
PUBLISH_SECONDS = 120.0
"""Bound on checking and moving a complete blob into the cache, also during shutdown."""


def _disk_full(error: BaseException | None) -> bool:
    """Is an out-of-space error anywhere in ``error``'s chain of causes?"""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def _start_failure(error: BaseException) -> BaseException:
    """A waiting caller's own exception for a download that failed to start, of the kind the
    registry API answered the original with (a copy of a registry error, 507 for a full cache,
    a logged 500 for a local error, 503 when the agent stops); anything else stays unexpected
    (a 500 from the server, with the original as its cause)."""
    if isinstance(error, OCIError):
        return error.copy()
    if isinstance(error, CacheFullError):
        return CacheFullError(str(error))
    if isinstance(error, LocalError):
        return LocalError(str(error))
    if isinstance(error, FlightCancelledError):
        return OCIError(ErrorCode.UNKNOWN, "the agent is stopping", status=503)
    shared = FlightError(f"the download could not start: {type(error).__name__}: {error}")
    shared.__cause__ = error
    return shared


@dataclass(frozen=True)
class BlobRequest:
    """The blob a download is for, and whose credentials it is fetched with.

    Its repr (in tracebacks, debuggers, test output) never shows the credentials.
    """

    ns: str
    name: str
    digest: str
    size: int
    authorization: str | None = field(repr=False)

    def __repr__(self) -> str:
        credentials = "None" if self.authorization is None else "<redacted>"
        return (
            f"BlobRequest(ns={self.ns!r}, name={self.name!r}, digest={self.digest!r}, "
            f"size={self.size!r}, authorization={credentials})"
        )


@dataclass(eq=False)
class Download:
    """What readers of a blob in progress see, whichever way it comes."""

    digest: str
    size: int
    started: float
    done: trio.Event = field(default_factory=trio.Event, init=False)
    pull_id: str | None = field(default_factory=current_pull_id, init=False)
    """The pull that started it (its log lines and proxy requests carry this id)."""
    error: BaseException | None = field(default=None, init=False)

    def failure(self) -> OCIError:
        """The registry error readers get: the download's own, 507 for a full disk, 502 else."""
        if isinstance(self.error, OCIError):
            return self.error
        if _disk_full(self.error):
            return OCIError(ErrorCode.UNKNOWN, f"agent disk full: {self.error}", status=507)
        reason = f": {self.error}" if self.error is not None else ""
        return OCIError(ErrorCode.UNKNOWN, f"download failed{reason}", status=502)

    def stream(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``[start, end]`` as they become available."""
        raise NotImplementedError


@dataclass(eq=False)
class SwarmDownload(Download):
    meta: BlobMetainfo
    store: PieceFile
    torrent: Torrent
    hasher: OrderedHasher

    def _read(self, fd: int, size: int, position: int) -> bytes:
        """(Worker thread.) Read for a reader, and feed the blob's SHA-256 on the way."""
        data = os.pread(fd, size, position)
        if len(data) != size:
            raise LocalError(f"short read of {self.digest} at {position}")
        self.hasher.feed(position, data)
        return data

    async def stream(self, start: int, end: int) -> AsyncIterator[bytes]:
        torrent, meta = self.torrent, self.meta
        reader = object()
        fd = self.store.fileno()
        assert fd is not None
        position = start
        least = 1  # the first read goes out as soon as its piece is here
        try:
            while position <= end:
                # Read as far as the pieces are there, up to READ_CHUNK; after the first read,
                # wait until MIN_READ bytes are there (or the range's end): every read is a
                # thread hand-off and a send, and small pieces arrive a few at a time.
                limit = min(end + 1, position + READ_CHUNK)
                want = min(limit, position + least)
                reach = position - position % meta.piece_length
                torrent.set_reader(reader, reach // meta.piece_length)
                while True:
                    while reach < limit and torrent.has_piece(reach // meta.piece_length):
                        reach += meta.piece_length
                    if reach >= want:
                        break
                    await self._wait_piece(reach // meta.piece_length)
                least = MIN_READ
                size = SEND_MEMORY.chunk(min(reach, limit) - position)
                data = await trio.to_thread.run_sync(self._read, fd, size, position)
                position += size
                yield data
        finally:
            torrent.set_reader(reader, None)

    async def _wait_piece(self, index: int) -> None:
        """Wait for a piece, or raise if the download failed meanwhile (a failed download
        stops its torrent, which wakes every waiter)."""
        try:
            await self.torrent.wait_for_piece(index)
        except TorrentFailedError:
            raise self.failure() from None


@dataclass(eq=False)
class StreamDownload(Download):
    ingest: Ingest
    """The blob arriving (readers follow it; see :meth:`stream`)."""
    path: Path
    cached: Path
    """Where the file goes once verified (readers that open it late look there)."""

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # verified and moved into the cache meanwhile
            return os.open(self.cached, os.O_RDONLY | os.O_CLOEXEC)

    async def stream(self, start: int, end: int) -> AsyncIterator[bytes]:
        try:
            fd = await trio.to_thread.run_sync(self._open)
        except FileNotFoundError:
            raise self.failure() from None
        try:
            # The last byte waits for the digest check (as on the proxy's streams).
            async for data in self.ingest.follow(fd, start, end):
                yield data
        except IngestError:
            raise self.failure() from None
        finally:
            os.close(fd)


class Downloads:
    def __init__(
        self,
        *,
        cache: BlobCache,
        engine: Engine,
        proxies: ProxyClient,
        metrics: AgentMetrics,
        fallback_after: float,
        swarm_min_size: int = 0,
    ) -> None:
        self.cache = cache
        self.engine = engine
        self.proxies = proxies
        self.metrics = metrics
        self.fallback_after = fallback_after
        self.swarm_min_size = swarm_min_size
        self.active: dict[str, Download] = {}
        self._starts: SingleFlight[str, Download] | None = None
        """Downloads being started, by digest (once :meth:`run` has begun)."""
        self.info_hashes: dict[str, bytes] = {}
        self._seeding: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self.on_complete: Callable[[str], None] | None = None
        """Called with the digest of every blob that entered the cache (the janitor sweeps)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the download tasks; reseed every cached blob that has its metainfo."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._starts = SingleFlight(nursery, share=_start_failure)
            for digest in self.cache.digests():
                meta = self.cache.load_metainfo(digest)
                if meta is not None and self.swarms(meta.length):
                    await self._seed(digest, meta, spread=True)
                elif meta is None and self.cache.described_length(digest) not in (
                    None,
                    self.cache.size(digest),
                ):  # its own chunks say it should be longer: cut short (a crash, a bad disk)
                    event(log, "seed.damaged", logging.WARNING, digest=digest)
                    self.cache.remove(digest)
            self.metrics.active_torrents.set(len(self.engine.torrents))
            task_status.started()
            await trio.sleep_forever()  # downloads run here until the agent stops

    async def _seed(self, digest: str, meta: BlobMetainfo, *, spread: bool = False) -> None:
        """Seed a cached blob (``spread``: at start-up, first announce at a random moment)."""
        try:
            store = PieceFile(meta, self.cache.blob_path(digest), complete=True)
        except BlobDamagedError as exc:  # gone or truncated: drop it from the cache
            event(log, "seed.damaged", logging.WARNING, digest=digest, error=str(exc))
            self.cache.remove(digest)
            return
        except LocalError as exc:  # cannot open it now (EMFILE, EIO, EACCES): keep it
            event(log, "seed.failed", logging.WARNING, digest=digest, error=str(exc))
            return
        delay = random.uniform(0, RESEED_ANNOUNCE_SPREAD) if spread else 0.0
        await self.engine.add_torrent(meta, store, announce_delay=delay)
        self.info_hashes[digest] = meta.info_hash
        self.metrics.active_torrents.set(len(self.engine.torrents))

    def swarms(self, size: int) -> bool:
        """Does a blob of ``size`` bytes go through the swarm (and get seeded)?"""
        return size >= self.swarm_min_size

    def ensure_seeded(self, request: BlobRequest) -> None:
        """A cached blob that is not being seeded (its metainfo was never stored, e.g. the
        agent stopped right after a streamed download): get the metainfo from a proxy, in
        the background, and seed it. Blobs below ``swarm_min_size`` are never seeded."""
        digest = request.digest
        if digest in self.info_hashes or digest in self._seeding or self._nursery is None:
            return
        if not self.swarms(request.size):
            return
        self._seeding.add(digest)
        self._nursery.start_soon(self._seed_later, request)

    async def _seed_later(self, request: BlobRequest) -> None:
        digest = request.digest
        try:
            meta = await self.proxies.metainfo(
                request.ns, request.name, digest, request.size, authorization=request.authorization
            )
            if digest in self.cache and digest not in self.info_hashes:
                await trio.to_thread.run_sync(self.cache.save_metainfo, digest, meta)
                await self._seed(digest, meta)
        except (OCIError, OSError, LocalError) as exc:
            event(log, "seed.unavailable", logging.WARNING, digest=digest, error=str(exc))
        finally:
            self._seeding.discard(digest)

    def _completed(self, digest: str) -> None:
        if self.on_complete is not None:
            self.on_complete(digest)

    def evicted(self, digest: str) -> trio.Event | None:
        """Cache callback: stop seeding an evicted blob. Returns an event that is set once its
        torrent has closed the file (the deleted file's space is free only then), or None when
        it was not seeded."""
        info_hash = self.info_hashes.pop(digest, None)
        if info_hash is None:
            return None
        torrent = self.engine.torrents.get(info_hash)
        self.engine.remove_torrent(info_hash)
        self.metrics.active_torrents.set(len(self.engine.torrents))
        return None if torrent is None else torrent.closed

    async def get(self, request: BlobRequest) -> Download | None:
        """The running download of a blob, started if needed; None if already cached.

        Concurrent callers for one blob share one start (a single flight in the downloads'
        nursery, so a caller that hangs up does not cancel it): each gets the download, or
        its own copy of the error that kept it from starting."""
        digest = request.digest
        if digest in self.cache:
            return None
        download = self.active.get(digest)
        if download is not None:
            # This pull's lines lead to the download's through started_by.
            event(log, "download.joined", digest=digest, started_by=download.pull_id)
            return download
        assert self._starts is not None, "Downloads.run() has not started"
        assert self._nursery is not None
        nursery = self._nursery

        async def start() -> Download:
            started: Download = await nursery.start(self._download, request)
            return started

        return await self._starts.run(digest, start)

    async def _download(
        self, request: BlobRequest, *, task_status: trio.TaskStatus[Download]
    ) -> None:
        digest = request.digest
        self.cache.pin(digest)
        try:
            async with self.cache.reserved(request.size):
                if not self.swarms(request.size):
                    async with self.proxies.blob(
                        request.ns,
                        request.name,
                        digest,
                        request.size,
                        authorization=request.authorization,
                    ) as response:
                        await self._stream(response, request, task_status, seed=False)
                    return
                async with self.proxies.source(
                    request.ns,
                    request.name,
                    digest,
                    request.size,
                    authorization=request.authorization,
                ) as source:
                    if isinstance(source, SwarmSource):
                        await self._swarm(source, request, task_status)
                    else:
                        await self._stream(source, request, task_status)
        finally:
            self.cache.unpin(digest)

    # --- from the swarm ---------------------------------------------------------------------

    async def _swarm(
        self, source: SwarmSource, request: BlobRequest, task_status: trio.TaskStatus[Download]
    ) -> None:
        meta = source.blob
        digest, size = meta.digest, meta.length
        store = await trio.to_thread.run_sync(self.cache.open_partial, meta, digest)
        seeds = [source.seed] if source.seed is not None else []
        torrent = await self.engine.add_torrent(meta, store, peers=seeds)
        self.info_hashes[digest] = torrent.info_hash
        hasher = OrderedHasher(size)
        torrent.on_stored = lambda index, data: hasher.feed(index * meta.piece_length, data)
        download = SwarmDownload(digest, size, trio.current_time(), meta, store, torrent, hasher)
        self.active[digest] = download
        self.metrics.active_torrents.set(len(self.engine.torrents))
        event(log, "download.started", digest=digest, size=size, chunks=len(meta.chunks))
        task_status.started(download)
        try:
            async with trio.open_nursery() as nursery:
                if not meta.complete:
                    nursery.start_soon(self._follow_chunks, source, request, torrent)
                await self._complete(download, request)
                nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True), trio.fail_after(PUBLISH_SECONDS):
                # Every piece is here: finish publishing even if the agent is stopping.
                fd = store.fileno()
                assert fd is not None
                found = await trio.to_thread.run_sync(hasher.catch_up, fd)
                await trio.to_thread.run_sync(
                    lambda: self.cache.publish(store, digest, known_digest=found)
                )
                store.drop_bitfield()  # here, on the thread that flushes it
        except BaseException as exc:
            download.error = exc
            self.engine.remove_torrent(torrent.info_hash)
            self.info_hashes.pop(digest, None)
            with contextlib.suppress(Exception):
                store.discard()
            if not isinstance(exc, Exception):
                raise
            event(log, "download.failed", logging.ERROR, digest=digest, error=str(exc))
            return
        finally:
            self.active.pop(digest, None)
            download.done.set()
        by_role = dict(torrent.downloaded_by_role)
        for role, count in by_role.items():
            self.metrics.download_bytes.labels(role).inc(count)
        self.metrics.disk_write_bytes.inc(size)
        event(
            log,
            "download.complete",
            digest=digest,
            seconds=round(trio.current_time() - download.started, 3),
            **{f"from_{role}": count for role, count in by_role.items()},
        )
        self._completed(digest)

    async def _follow_chunks(
        self, source: SwarmSource, request: BlobRequest, torrent: Torrent
    ) -> None:
        """Add the blob's chunks as the proxy publishes them; reopen the stream (at another
        proxy, if need be) when it breaks before the last chunk."""
        blob, feed = source.blob, source.feed
        failures = 0
        saved = len(blob.chunks)  # open_partial stored those
        async with contextlib.AsyncExitStack() as reopened:
            while not blob.complete:
                try:
                    if await feed.next_chunks():
                        self.engine.chunks_added(torrent)
                        await self.engine.shared.disk.run(
                            self.cache.save_partial_chunks, blob, blob.digest, saved
                        )
                        saved = len(blob.chunks)
                        continue
                except OCIError as exc:
                    event(log, "chunks.broken", logging.WARNING, digest=blob.digest, error=str(exc))
                failures += 1
                if failures > CHUNK_STREAM_RETRIES:
                    raise OCIError(
                        ErrorCode.UNKNOWN, "no proxy could send the blob's chunks", status=502
                    )
                await trio.sleep(min(5.0, 0.25 * 2**failures))
                try:
                    again = await reopened.enter_async_context(
                        self.proxies.chunks(
                            request.ns,
                            request.name,
                            request.digest,
                            request.size,
                            authorization=request.authorization,
                            known=blob,
                        )
                    )
                except OCIError as exc:
                    event(log, "chunks.broken", logging.WARNING, digest=blob.digest, error=str(exc))
                    continue
                feed = again.feed
                if again.seed is not None:  # the proxy that took over seeds the blob too
                    torrent.add_peers([again.seed])
                self.engine.chunks_added(torrent)

    async def _complete(self, download: SwarmDownload, request: BlobRequest) -> None:
        """Wait for the swarm; fall back to HTTP from the proxy when it stalls."""
        torrent = download.torrent
        while not torrent.completed.is_set():
            with trio.move_on_after(self.fallback_after / 2):
                await torrent.wait_complete()
            if torrent.completed.is_set():
                return
            if trio.current_time() - torrent.last_progress >= self.fallback_after:
                await self._fallback(download, request)

    async def _fallback(self, download: SwarmDownload, request: BlobRequest) -> None:
        torrent, meta = download.torrent, download.meta
        self.metrics.fallbacks.inc()
        stats = torrent.statistics()
        event(
            log,
            "download.fallback",
            logging.WARNING,
            digest=download.digest,
            have=stats.have,
            known=stats.known,
            pieces=stats.pieces,
            peers=stats.peers_by_role,
            sessions=torrent.describe_sessions(),
        )
        for index in range(meta.num_pieces):
            if torrent.has_piece(index):
                continue
            data = await self.proxies.blob_range(
                request.ns,
                request.name,
                download.digest,
                index * meta.piece_length,
                meta.piece_size(index),
                authorization=request.authorization,
            )
            await self.engine.download_limiter.acquire(len(data))
            if not await torrent.add_piece(index, data):
                raise OCIError(
                    ErrorCode.UNKNOWN, "proxy sent data that fails verification", status=502
                )
            self.metrics.download_bytes.labels("http_fallback").inc(len(data))

    # --- streamed by the proxy --------------------------------------------------------------

    async def _receive(self, ingest: Ingest, response: httpx.Response, request: BlobRequest) -> str:
        """Every byte of a streamed blob into ``ingest``; its SHA-256. When the stream breaks
        (the proxy died or restarted), the rest is asked for from the byte reached, at the
        next proxy in rendezvous order if that one is gone: the client never notices. The
        agent cannot tell a proxy's death from a proxy that cut a stream on purpose (its fetch
        from the origin failed the digest check): the resumption then costs that proxy one
        more origin fetch, whose failure it answers with an error, which ends the download."""
        chunks: AsyncIterator[bytes] | None = response.aiter_bytes()
        failures = 0
        async with contextlib.AsyncExitStack() as resumed:
            while True:
                try:
                    if chunks is None:
                        again = await resumed.enter_async_context(
                            self.proxies.blob(
                                request.ns,
                                request.name,
                                request.digest,
                                request.size,
                                authorization=request.authorization,
                                start=ingest.written,
                            )
                        )
                        chunks = again.aiter_bytes()
                    # downloadRate covers every way bytes arrive
                    return await ingest.run(chunks, limiter=self.engine.download_limiter)
                except (httpx.HTTPError, IngestError, ProxiesUnreachableError) as exc:
                    # The stream broke, or no proxy answers (restarting?): go on from the
                    # byte reached. A proxy that answers the resumption with an error (it
                    # could not fetch the blob again, the origin refused) ends the download.
                    failures += 1
                    if failures > STREAM_RESUMES:
                        raise OCIError(
                            ErrorCode.UNKNOWN, f"proxy stream broke: {exc}", status=502
                        ) from None
                    event(
                        log,
                        "download.resuming",
                        logging.WARNING,
                        digest=request.digest,
                        at=ingest.written,
                        error=str(exc) or type(exc).__name__,
                    )
                await trio.sleep(min(5.0, 0.25 * 2**failures))
                await resumed.aclose()
                chunks = None

    async def _stream(
        self,
        response: httpx.Response,
        request: BlobRequest,
        task_status: trio.TaskStatus[Download],
        *,
        seed: bool = True,
    ) -> None:
        """Receive a whole blob the proxy sends over HTTP (a progressive stream, or a blob
        below ``swarm_min_size``), check it, cache it; then seed it if ``seed``."""
        digest, size = request.digest, request.size
        path = self.cache.partial_paths(digest)[0].with_suffix(".stream")
        fd = await trio.to_thread.run_sync(
            os.open, path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640
        )
        ingest = Ingest(fd, size, disk=self.engine.shared.disk)
        download = StreamDownload(
            digest, size, trio.current_time(), ingest, path, self.cache.blob_path(digest)
        )
        self.active[digest] = download
        event(log, "download.streaming", digest=digest, size=size)
        task_status.started(download)
        adopted = False
        try:
            found = await self._receive(ingest, response, request)
            if found != digest:
                raise OCIError(ErrorCode.UNKNOWN, f"streamed blob hashes to {found}", status=502)
            with trio.CancelScope(shield=True), trio.fail_after(PUBLISH_SECONDS):
                # Every byte is here and checked: finish even if the agent is stopping.
                await trio.to_thread.run_sync(os.fsync, fd)
                await trio.to_thread.run_sync(self.cache.adopt, path, digest)
            adopted = True
        except BaseException as exc:
            download.error = exc
            if not isinstance(exc, Exception):
                raise
            event(log, "download.failed", logging.ERROR, digest=digest, error=str(exc))
            return
        finally:
            ingest.end(verified=adopted)
            download.done.set()
            self.active.pop(digest, None)
            if not adopted:
                with contextlib.suppress(OSError):
                    path.unlink()
            os.close(fd)
        self.metrics.download_bytes.labels("proxy_stream").inc(size)
        self.metrics.disk_write_bytes.inc(size)
        event(
            log,
            "download.complete",
            digest=digest,
            seconds=round(trio.current_time() - download.started, 3),
            from_proxy_stream=size,
        )
        self._completed(digest)
        if seed:
            # The proxy has the whole blob now: seed it for the nodes that come next.
            self.ensure_seeded(request)


def open_cached(cache: BlobCache, digest: str) -> tuple[int, int] | None:
    """(fd, size) of a cached blob, or None."""
    try:
        fd = os.open(cache.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    return fd, os.fstat(fd).st_size
