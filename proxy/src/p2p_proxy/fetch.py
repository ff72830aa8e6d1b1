"""Getting blobs into the cache: each fetched from the origin once, verified, published in chunks.

:meth:`BlobFetcher.ensure` returns the chunked metainfo of a cached blob
(:class:`~p2p_common.blobinfo.BlobMetainfo`), fetching it first if needed;
:meth:`BlobFetcher.follow` returns the fetch in flight, whose chunks are published while it
runs. Concurrent requests for one (registry, digest) share one fetch (a
:class:`~p2p_proxy.flight.SingleFlight`), which runs in the service's nursery so that it
outlives a caller that hangs up. The caller that starts a fetch is admitted by the
:class:`~p2p_proxy.flight.Admission` it brings (its client's limits, :mod:`p2p_proxy.limits`);
callers that join a running fetch are not. A large blob's fetch first waits for its turn at its
origin (``largeFetchesPerOrigin`` at once, in the order asked: :mod:`p2p_proxy.fetchline`),
then holds one of the proxy's ``maxOriginFetches`` slots while it talks to the origin, waiting a
bounded time for one.

A fetch reserves the blob's size in the cache quota (evicting least recently used blobs) and
streams the origin's body into a scratch file with :class:`~p2p_common.ingest.Ingest`: every
byte written once, hashed once by SHA-1 (per piece) and SHA-256 (the whole). Each piece's SHA-1
goes to a :class:`~p2p_common.blobinfo.ChunkBuilder`; every completed chunk is published at once
(to the :class:`FetchListener`, which seeds it, and to the agents following the fetch), so the
swarm trades the first chunks while the origin still sends the last. The SHA-256 is checked
against the digest before the file enters the cache by an atomic rename, together with its
chunks. On any failure the scratch file is deleted, the listener is told (the blob stops being
seeded) and the caller gets a registry error: 502 for an origin that sent wrong or short data,
507 when the disk or the quota is full. Every fetch from an origin is recorded in the fetcher's
:class:`~p2p_proxy.status.FetchLog` (bytes received, outcome) for the status view.

A fetch runs with the pull id of the request that started it (its lines carry it as
``pull_id``); requests that join it log ``proxy.fetch_joined`` naming that id, and the fetch's
own ``proxy.fetched`` (or ``proxy.fetch_failed``) and its status record list every pull it
served (the first 16 ids, and how many more: :class:`~p2p_common.logs.PullIds`).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, nullcontext
from pathlib import Path
from typing import Protocol

import trio

from p2p_common import metainfo as mi
from p2p_common.blobcache import BlobCache, CacheFullError
from p2p_common.blobinfo import BlobMetainfo, ChunkBuilder
from p2p_common.engine.disk import DiskRunner
from p2p_common.ingest import Ingest, IngestError
from p2p_common.logs import PullIds, current_pull_id, event
from p2p_common.oci import ErrorCode, OCIError
from p2p_common.registry_auth import Credentials
from p2p_proxy.fetchline import no_progress
from p2p_proxy.flight import Admission, SingleFlight, registry_error
from p2p_proxy.limits import OriginLimits
from p2p_proxy.metrics import ProxyMetrics
from p2p_proxy.origin import BlobHead, OriginClient
from p2p_proxy.status import FetchLog, FetchRecord

__all__ = ["BlobFetcher", "Fetch", "FetchListener", "storage_error"]

log = logging.getLogger("p2p.proxy")

MAX_KNOWN_METAINFO = 4096
"""Metainfo of cached blobs kept in memory (each is 20 bytes per piece plus a little)."""


def storage_error(exc: BaseException, what: str) -> OCIError:
    """The registry error for a local storage failure (507 when out of space)."""
    if isinstance(exc, CacheFullError):
        return OCIError(ErrorCode.UNKNOWN, f"proxy cache full: {exc}", status=507)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OCIError(ErrorCode.UNKNOWN, f"proxy disk full while {what}", status=507)
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return OCIError(ErrorCode.UNKNOWN, f"proxy storage failed while {what}: {reason}", status=500)


def _origin_error(message: str) -> OCIError:
    return OCIError(ErrorCode.UNKNOWN, message, status=502)


class Fetch:
    """A fetch in flight, as its followers see it (all in the trio thread).

    ``blob`` holds the chunks published so far; ``ingest`` the bytes on disk (progressive
    streams follow it). ``changed`` fires on every new chunk and when the fetch ends. Bytes and
    chunks are the origin's until the SHA-256 is checked at the end (``failed`` then tells),
    exactly as for a client reading from the origin.
    """

    def __init__(self, digest: str, path: Path, blob: BlobMetainfo, ingest: Ingest) -> None:
        self.digest = digest
        self.path = path
        self.blob = blob
        self.ingest = ingest
        self.pieces = 0
        """Pieces on disk (in order)."""
        self.ended = False
        self.failed = False
        self.error: OCIError | None = None
        """Why it failed, when it did."""
        self.changed = trio.Event()

    @property
    def length(self) -> int:
        return self.ingest.length

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_ended(self) -> None:
        while not self.ended:
            await self.changed.wait()

    def end(self, *, failed: bool) -> None:
        self.ended = True
        self.failed = failed
        self.ingest.end(verified=not failed)
        self._wake()


class FetchListener(Protocol):
    """Who is told about a fetch's progress (the proxy's seeder)."""

    def fetch_chunk(self, fetch: Fetch) -> None:
        """A chunk was published (``fetch.blob.chunks[-1]``)."""

    def fetch_piece(self, fetch: Fetch, index: int) -> None:
        """Piece ``index`` is on disk (pieces arrive in order)."""

    def fetch_ended(self, fetch: Fetch) -> None:
        """The fetch ended: the blob is cached (``fetch.failed`` is False) or gone."""


class BlobFetcher:
    def __init__(
        self,
        cache: BlobCache,
        metrics: ProxyMetrics,
        nursery: trio.Nursery,
        trackers: Sequence[str],
        *,
        disk: DiskRunner | None = None,
        listener: FetchListener | None = None,
        limits: OriginLimits | None = None,
        log: FetchLog | None = None,
    ) -> None:
        self.cache = cache
        self.log = log or FetchLog()
        """Fetches from the origins, running and recent (for the status view)."""
        self.limits = limits
        """Whose ``fetch_slot`` bounds the fetches running at once (None: no bound)."""
        self.metrics = metrics
        self.trackers = tuple(trackers)
        self.disk = disk or DiskRunner()
        self.listener = listener
        self._fetches: SingleFlight[tuple[str, str], BlobMetainfo] = SingleFlight(
            nursery, "fetch", on_join=metrics.origin_joins.labels(kind="blob").inc
        )
        self._rebuilds: SingleFlight[str, BlobMetainfo | None] = SingleFlight(nursery, "rehash")
        # Metainfo is a pure function of the content (and the trackers): what was built or
        # loaded once stays right for as long as the digest is cached, or cached again.
        self._known: collections.OrderedDict[str, BlobMetainfo] = collections.OrderedDict()
        self._pulls: dict[tuple[str, str], PullIds] = {}
        """The pulls each fetch in flight serves (the one that started it first)."""
        self.in_flight: dict[str, Fetch] = {}
        """Fetches whose bytes are arriving, by digest (for chunk and progressive streams)."""
        self._in_flight_changed = trio.Event()

    async def ensure(
        self,
        origin: OriginClient,
        repository: str,
        digest: str,
        credentials: Credentials | None,
        size: int | None,
        *,
        admission: Admission | None = None,
    ) -> BlobMetainfo:
        """The chunks of cached blob ``digest``, fetched from ``origin`` first if needed
        (``admission`` decides whether this caller may start that fetch).

        The caller must already be authorized for it (and should pin the digest while it
        uses the result, so that eviction cannot remove it underneath).
        """
        if digest in self.cache:
            meta = await self._cached_metainfo(digest)
            if meta is not None:
                self.metrics.cache_hits.inc()
                self.cache.touch(digest)
                return meta
        self.metrics.cache_misses.inc()
        key = (origin.name, digest)
        with self._joining(key):
            flight = self._fetches.start(
                key, self._work(origin, repository, digest, credentials, size), admission=admission
            )
        return await self._fetches.wait(flight)

    async def cached(self, digest: str) -> BlobMetainfo | None:
        """The chunks of ``digest`` if it is cached (rebuilt from the file if need be)."""
        if digest not in self.cache:
            return None
        meta = await self._cached_metainfo(digest)
        if meta is not None:
            self.metrics.cache_hits.inc()
            self.cache.touch(digest)
        return meta

    def _work(
        self,
        origin: OriginClient,
        repository: str,
        digest: str,
        credentials: Credentials | None,
        size: int | None,
    ) -> Callable[[], Awaitable[BlobMetainfo]]:
        """The single-flight work that gets ``digest`` into the cache."""

        key = (origin.name, digest)

        async def fetch() -> BlobMetainfo:
            pulls = self._pulls.get(key) or PullIds(current_pull_id())
            try:
                meta = await self._present(digest)  # fetched meanwhile (another registry's)
                if meta is not None:
                    return meta
                async with self._line(origin.name, key, size) as progress, self._slot():
                    meta = await self._present(digest)  # fetched while this one waited
                    if meta is None:
                        meta = await self._fetch(
                            origin,
                            repository,
                            digest,
                            credentials,
                            size,
                            pulls=pulls,
                            progress=progress,
                        )
                        self._remember(digest, meta)
                return meta
            finally:
                if self._pulls.get(key) is pulls:
                    del self._pulls[key]
                self._wake_in_flight_waiters()

        return fetch

    def _slot(self) -> AbstractAsyncContextManager[None]:
        return nullcontext() if self.limits is None else self.limits.fetch_slot()

    def _line(
        self, origin: str, key: tuple[str, str], size: int | None
    ) -> AbstractAsyncContextManager[Callable[[int], None]]:
        if self.limits is None:
            return nullcontext(no_progress)
        return self.limits.fetch_line(origin, key, size)

    async def _present(self, digest: str) -> BlobMetainfo | None:
        if digest not in self.cache:
            return None
        return await self._cached_metainfo(digest)

    async def follow(
        self,
        origin: OriginClient,
        repository: str,
        digest: str,
        credentials: Credentials | None,
        size: int | None,
        *,
        admission: Admission | None = None,
    ) -> Fetch | None:
        """The fetch of ``digest`` while its bytes arrive, started if needed (``admission``
        decides whether this caller may start it); None when there is none to follow (the
        blob is cached already, or the fetch ended without error). A fetch that failed
        before its bytes arrived raises its error."""
        key = (origin.name, digest)
        flight = None
        if digest not in self.cache:
            work = self._work(origin, repository, digest, credentials, size)
            with self._joining(key):
                flight = self._fetches.start(key, work, admission=admission)
        while True:
            fetch = self.in_flight.get(digest)
            if fetch is not None:
                return fetch
            if flight is not None and flight.done.is_set() and flight.error is not None:
                raise registry_error(flight.error)
            if digest in self.cache or not self._fetches.in_flight(key):
                return None
            await self._in_flight_changed.wait()

    @contextmanager
    def _joining(self, key: tuple[str, str]) -> Iterator[None]:
        """Record the current pull as one the fetch for ``key`` serves (the one that starts it,
        or one more joining it), around the single flight's ``start``."""
        pull_id = current_pull_id()
        joins = self._fetches.in_flight(key)
        pulls = self._pulls.get(key)
        if joins:
            if pulls is not None:
                pulls.add(pull_id)
                event(
                    log,
                    "proxy.fetch_joined",
                    logging.DEBUG,
                    registry=key[0],
                    digest=key[1],
                    fetch_pull_id=pulls.first,
                )
            yield
            return
        pulls = self._pulls[key] = PullIds(pull_id)
        try:
            yield
        except BaseException:  # refused: no fetch starts for it
            if self._pulls.get(key) is pulls:
                del self._pulls[key]
            raise

    def _wake_in_flight_waiters(self) -> None:
        self._in_flight_changed.set()
        self._in_flight_changed = trio.Event()

    def _remember(self, digest: str, meta: BlobMetainfo) -> None:
        self._known[digest] = meta
        self._known.move_to_end(digest)
        while len(self._known) > MAX_KNOWN_METAINFO:
            self._known.popitem(last=False)

    # --- cached blobs -----------------------------------------------------------------------

    async def _cached_metainfo(self, digest: str) -> BlobMetainfo | None:
        """The stored chunks, else rebuilt from the file (``None`` if the file is bad)."""
        known = self._known.get(digest)
        if known is not None and known.length == self.cache.size(digest):
            self._known.move_to_end(digest)
            return known
        meta = await trio.to_thread.run_sync(self.cache.load_metainfo, digest)
        if meta is not None:
            meta = meta.with_trackers(self.trackers)
        else:
            meta = await self._rebuilds.run(digest, lambda: self._rehash(digest))
        if meta is not None:
            self._remember(digest, meta)
        return meta

    async def _rehash(self, digest: str) -> BlobMetainfo | None:
        path = self.cache.blob_path(digest)
        size = self.cache.size(digest)
        if size is None:
            return None
        try:
            meta, found = await trio.to_thread.run_sync(
                _chunks_of_file, path, digest, size, self.trackers
            )
        except FileNotFoundError:
            self.cache.remove(digest)
            return None
        except OSError as exc:
            raise storage_error(exc, "reading a cached blob") from None
        if found != digest or meta is None:
            event(log, "proxy.cache_corrupt", logging.WARNING, digest=digest, found=found)
            self.cache.remove(digest)
            return None
        try:
            await trio.to_thread.run_sync(self.cache.save_metainfo, digest, meta)
        except OSError as exc:
            raise storage_error(exc, "storing metainfo") from None
        return meta

    # --- fetching ---------------------------------------------------------------------------

    async def _fetch(
        self,
        origin: OriginClient,
        repository: str,
        digest: str,
        credentials: Credentials | None,
        size: int | None,
        *,
        pulls: PullIds,
        progress: Callable[[int], None],
    ) -> BlobMetainfo:
        started = trio.current_time()
        record = self.log.begin(origin.name, repository, digest, size, pulls=pulls)
        event(log, "proxy.fetching", registry=origin.name, repository=repository, digest=digest)

        async def consume(head: BlobHead, chunks: AsyncIterator[bytes]) -> BlobMetainfo:
            length = head.size if head.size is not None else size
            if length is None:
                raise _origin_error("origin sent a blob without a Content-Length")
            if size is not None and length != size:
                raise _origin_error(
                    f"origin sent {length} bytes for a blob it said has {size} bytes"
                )
            record.size = length
            counted = self._counted(chunks, record, progress)
            if size is not None:  # reserved before the request
                return await self._store(digest, length, counted, key=(origin.name, digest))
            async with self._reserved(length):
                return await self._store(digest, length, counted, key=(origin.name, digest))

        async def get() -> BlobMetainfo:
            return await origin.get_blob(repository, digest, credentials, consume)

        outcome, error = "cancelled", None
        try:
            if size is None:
                meta = await get()
            else:
                async with self._reserved(size):
                    meta = await get()
            outcome = "done"
        except OCIError as exc:
            outcome, error = "failed", exc.message
            self.metrics.fetch_failures.labels(code=str(exc.code)).inc()
            event(
                log,
                "proxy.fetch_failed",
                logging.WARNING,
                registry=origin.name,
                repository=repository,
                digest=digest,
                status=exc.status,
                error=exc.message,
                **pulls.fields(),
            )
            raise
        except Exception:
            outcome, error = "failed", "internal error"
            raise
        finally:
            self.log.end(record, outcome, error)
        self.metrics.blobs_fetched.inc()
        self.metrics.blob_bytes_fetched.inc(meta.length)
        event(
            log,
            "proxy.fetched",
            registry=origin.name,
            repository=repository,
            digest=digest,
            size=meta.length,
            chunks=len(meta.chunks),
            seconds=round(trio.current_time() - started, 3),
            **pulls.fields(),
        )
        return meta

    @asynccontextmanager
    async def _reserved(self, length: int) -> AsyncIterator[None]:
        """Hold ``length`` bytes of the quota (evicting least recently used blobs)."""
        if length > mi.MAX_LENGTH:
            raise _origin_error("origin blob is larger than the proxy accepts")
        try:
            async with self.cache.reserved(length):
                yield
        except (CacheFullError, OSError) as exc:
            raise storage_error(exc, "making room in the cache") from None

    async def _store(
        self, digest: str, length: int, chunks: AsyncIterator[bytes], *, key: tuple[str, str]
    ) -> BlobMetainfo:
        """Write and hash ``chunks`` into a scratch file, publishing each chunk as it is
        complete; verify the whole; adopt it into the cache with its chunks. A failed fetch
        leaves the single flight (``key``) before its followers hear of it, so a request
        that comes after their error starts a fetch of its own instead of joining this one."""
        scratch = self.cache.scratch_file("fetch")
        try:
            fd = await trio.to_thread.run_sync(
                os.open, scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640
            )
        except OSError as exc:
            raise storage_error(exc, "creating a scratch file") from None
        builder = ChunkBuilder(digest, length, self.trackers)
        ingest = Ingest(fd, length, disk=self.disk, piece_length=builder.blob.piece_length)
        fetch = Fetch(digest, scratch, builder.blob, ingest)

        def on_piece(index: int, sha1: bytes) -> None:
            fetch.pieces = index + 1
            chunk = builder.piece(sha1)
            if self.listener is not None:
                if chunk is not None:
                    self.listener.fetch_chunk(fetch)
                self.listener.fetch_piece(fetch, index)
            if chunk is not None:
                fetch._wake()

        ingest.on_piece = on_piece
        self.in_flight[digest] = fetch
        self._wake_in_flight_waiters()
        adopted = False
        try:
            try:
                found = await ingest.run(chunks)
            except IngestError as exc:
                raise _origin_error(f"origin {exc}") from None
            if found != digest:
                raise _origin_error(f"origin sent a blob whose digest is {found}, not {digest}")
            if builder.finish() is not None:  # the last chunk waited for the digest check
                if self.listener is not None:
                    self.listener.fetch_chunk(fetch)
                fetch._wake()
            await trio.to_thread.run_sync(os.fsync, fd)
            await trio.to_thread.run_sync(self.cache.adopt, scratch, digest, builder.blob)
            adopted = True
            return builder.blob
        except OSError as exc:
            fetch.error = storage_error(exc, "writing a blob")
            raise fetch.error from None
        except OCIError as exc:
            fetch.error = exc
            raise
        finally:
            if not adopted:
                self._fetches.forget(key)
            fetch.end(failed=not adopted)
            if self.in_flight.get(digest) is fetch:
                del self.in_flight[digest]
            if self.listener is not None:
                self.listener.fetch_ended(fetch)
            os.close(fd)  # the seeder and the streams read through descriptors of their own
            if not adopted:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_unlink, scratch)

    async def _counted(
        self, chunks: AsyncIterator[bytes], record: FetchRecord, progress: Callable[[int], None]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.metrics.origin_bytes.inc(len(chunk))
            record.received += len(chunk)
            progress(record.received)
            yield chunk


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _chunks_of_file(
    path: Path, digest: str, size: int, trackers: tuple[str, ...]
) -> tuple[BlobMetainfo | None, str]:
    """(Blocking.) Rebuild a cached blob's chunks from its file: (chunks, its sha256)."""
    builder = ChunkBuilder(digest, size, trackers)
    pieces, found, length = mi.hash_file(path, builder.blob.piece_length)
    if length != size:
        return None, found
    for index in range(len(pieces) // 20):
        builder.piece(pieces[index * 20 : index * 20 + 20])
    builder.finish()
    return builder.blob, found
