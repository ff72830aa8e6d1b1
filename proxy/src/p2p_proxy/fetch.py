"""Getting blobs into the cache: each fetched from the origin once, verified, with metainfo.

:meth:`BlobFetcher.ensure` returns the metainfo of a cached blob, fetching it first if
needed. Concurrent requests for one (registry, digest) share one fetch (a
:class:`~p2p_proxy.flight.SingleFlight`), which runs in the service's nursery so that it
outlives a caller that hangs up.

A fetch reserves the blob's size in the cache quota (evicting least recently used blobs),
streams the origin's body into a scratch file while hashing it (SHA-1 per piece and
SHA-256, :class:`~p2p_common.metainfo.PieceHasher`), and checks the SHA-256 against the
digest before the file enters the cache by an atomic rename, together with its metainfo.
Writing and hashing run in a worker thread, a batch (:data:`BATCH_BYTES`) at a time, while
the trio loop keeps receiving the next batch: the bytes held in memory stay bounded. On any
failure the scratch file is deleted and the caller gets a registry error: 502 for an origin
that sent wrong or short data, 507 when the disk or the quota is full.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import trio

from p2p_common import metainfo as mi
from p2p_common.blobcache import BlobCache, CacheFullError
from p2p_common.logs import event
from p2p_common.oci import ErrorCode, OCIError
from p2p_common.origin import BlobHead, OriginClient
from p2p_common.registry_auth import Credentials
from p2p_proxy.flight import SingleFlight
from p2p_proxy.metrics import ProxyMetrics
from p2p_proxy.seeding import usable_metainfo

__all__ = ["BATCH_BYTES", "BlobFetcher", "Progress", "storage_error"]

log = logging.getLogger("p2p.proxy")

BATCH_BYTES = 4 * 1024 * 1024
"""Bytes received before they are written and hashed in one worker-thread call."""
QUEUED_BATCHES = 2
"""Batches that may wait for the writer (memory bound: about (2 + 2) x BATCH_BYTES)."""
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


class _Sink:
    """The scratch file and the hashes; every method blocks (worker threads only).

    SHA-256 of the whole blob and SHA-1 of each piece are computed in two threads at once
    (hashlib releases the GIL), the SHA-1 side also writing the file.
    """

    def __init__(self, path: Path, piece_length: int) -> None:
        self.path = path
        self.pieces = mi.PieceHasher(piece_length, whole=False)
        self.whole = hashlib.sha256()
        self.handle: BinaryIO = path.open("xb")

    def write(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.pieces.update(chunk)
            self.handle.write(chunk)
        self.handle.flush()  # progressive streams read the file through their own descriptor

    def hash_whole(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.whole.update(chunk)

    def digests(self) -> tuple[bytes, str]:
        """(piece hashes, ``sha256:<hex>``) once everything was written and hashed."""
        return self.pieces.finish()[0], "sha256:" + self.whole.hexdigest()

    def finish(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()

    def discard(self) -> None:
        self.handle.close()
        self.path.unlink(missing_ok=True)


class Progress:
    """A fetch in flight, as seen by streams that follow it (all in the trio thread).

    ``written`` bytes at the start of ``path`` are on disk; ``changed`` fires whenever that
    grows or the fetch ends. A stream must not trust the bytes: the digest is only checked
    at the end (``failed`` then tells), exactly as for a client reading from the origin.
    """

    def __init__(self, path: Path, length: int) -> None:
        self.path = path
        self.length = length
        self.written = 0
        self.ended = False
        self.failed = False
        self.changed = trio.Event()

    def advance(self, count: int) -> None:
        self.written += count
        self._wake()

    def end(self, *, failed: bool) -> None:
        self.ended = True
        self.failed = failed
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


async def _write_and_hash(sink: _Sink, batch: list[bytes]) -> None:
    """Write (with piece hashes) and hash the whole in two worker threads at once."""
    try:
        async with trio.open_nursery() as both:
            both.start_soon(trio.to_thread.run_sync, sink.hash_whole, batch)
            await trio.to_thread.run_sync(sink.write, batch)
    except BaseExceptionGroup as group:
        failures = group.exceptions
        if all(isinstance(exc, OSError) for exc in failures):
            raise failures[0] from None  # a disk error: the caller turns it into a 507
        raise


class BlobFetcher:
    def __init__(
        self,
        cache: BlobCache,
        metrics: ProxyMetrics,
        nursery: trio.Nursery,
        trackers: Sequence[str],
    ) -> None:
        self.cache = cache
        self.metrics = metrics
        self.trackers = tuple(trackers)
        self._fetches: SingleFlight[tuple[str, str], mi.Metainfo] = SingleFlight(nursery, "fetch")
        self._rebuilds: SingleFlight[str, mi.Metainfo | None] = SingleFlight(nursery, "rehash")
        # Metainfo is a pure function of the content (and the trackers): what was built or
        # loaded once stays right for as long as the digest is cached, or cached again.
        self._known: collections.OrderedDict[str, mi.Metainfo] = collections.OrderedDict()
        self.progress: dict[str, Progress] = {}
        """Fetches whose bytes are arriving, by digest (for progressive streams)."""
        self._progress_changed = trio.Event()

    async def ensure(
        self,
        origin: OriginClient,
        repository: str,
        digest: str,
        credentials: Credentials | None,
        size: int | None,
    ) -> mi.Metainfo:
        """The metainfo of cached blob ``digest``, fetched from ``origin`` first if needed.

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
        return await self._fetches.run(
            (origin.name, digest), self._work(origin, repository, digest, credentials, size)
        )

    def _work(
        self,
        origin: OriginClient,
        repository: str,
        digest: str,
        credentials: Credentials | None,
        size: int | None,
    ) -> Callable[[], Awaitable[mi.Metainfo]]:
        """The single-flight work that gets ``digest`` into the cache."""

        async def fetch() -> mi.Metainfo:
            try:
                if digest in self.cache:  # fetched meanwhile (another registry's flight)
                    meta = await self._cached_metainfo(digest)
                    if meta is not None:
                        return meta
                meta = await self._fetch(origin, repository, digest, credentials, size)
                self._remember(digest, meta)
                return meta
            finally:
                self._wake_progress_waiters()

        return fetch

    async def follow(
        self,
        origin: OriginClient,
        repository: str,
        digest: str,
        credentials: Credentials | None,
        size: int | None,
    ) -> Progress | None:
        """The fetch of ``digest`` while its bytes arrive, started if needed; None when
        there is none to follow (the blob is cached already, or the fetch ended)."""
        key = (origin.name, digest)
        if digest not in self.cache:
            self._fetches.start(key, self._work(origin, repository, digest, credentials, size))
        while True:
            progress = self.progress.get(digest)
            if progress is not None:
                return progress
            if digest in self.cache or not self._fetches.in_flight(key):
                return None
            await self._progress_changed.wait()

    def _wake_progress_waiters(self) -> None:
        self._progress_changed.set()
        self._progress_changed = trio.Event()

    def _remember(self, digest: str, meta: mi.Metainfo) -> None:
        self._known[digest] = meta
        self._known.move_to_end(digest)
        while len(self._known) > MAX_KNOWN_METAINFO:
            self._known.popitem(last=False)

    # --- cached blobs -----------------------------------------------------------------------

    async def _cached_metainfo(self, digest: str) -> mi.Metainfo | None:
        """The stored metainfo, else rebuilt from the file (``None`` if the file is bad)."""
        known = self._known.get(digest)
        if known is not None and known.length == self.cache.size(digest):
            self._known.move_to_end(digest)
            return known
        meta = await trio.to_thread.run_sync(self.cache.load_metainfo, digest)
        if usable_metainfo(meta, digest, self.cache.size(digest)):
            assert meta is not None
            meta = meta.with_trackers(self.trackers)
        else:
            meta = await self._rebuilds.run(digest, lambda: self._rehash(digest))
        if meta is not None:
            self._remember(digest, meta)
        return meta

    async def _rehash(self, digest: str) -> mi.Metainfo | None:
        path = self.cache.blob_path(digest)
        size = self.cache.size(digest)
        if size is None:
            return None
        piece_length = mi.piece_length_for(size)
        try:
            pieces, found, length = await trio.to_thread.run_sync(mi.hash_file, path, piece_length)
        except FileNotFoundError:
            self.cache.remove(digest)
            return None
        except OSError as exc:
            raise storage_error(exc, "reading a cached blob") from None
        if found != digest or length != size:
            event(log, "proxy.cache_corrupt", logging.WARNING, digest=digest, found=found)
            self.cache.remove(digest)
            return None
        meta = mi.build(digest, length, pieces, self.trackers, piece_length=piece_length)
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
    ) -> mi.Metainfo:
        started = trio.current_time()

        async def consume(head: BlobHead, chunks: AsyncIterator[bytes]) -> mi.Metainfo:
            length = head.size if head.size is not None else size
            if length is None:
                raise _origin_error("origin sent a blob without a Content-Length")
            if size is not None and length != size:
                raise _origin_error(
                    f"origin sent {length} bytes for a blob it said has {size} bytes"
                )
            if size is not None:  # reserved before the request
                return await self._store(digest, length, chunks)
            async with self._reserved(length):
                return await self._store(digest, length, chunks)

        async def get() -> mi.Metainfo:
            return await origin.get_blob(repository, digest, credentials, consume)

        try:
            if size is None:
                meta = await get()
            else:
                async with self._reserved(size):
                    meta = await get()
        except OCIError as exc:
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
            )
            raise
        self.metrics.blobs_fetched.inc()
        event(
            log,
            "proxy.fetched",
            registry=origin.name,
            repository=repository,
            digest=digest,
            size=meta.length,
            seconds=round(trio.current_time() - started, 3),
        )
        return meta

    @asynccontextmanager
    async def _reserved(self, length: int) -> AsyncIterator[None]:
        """Hold ``length`` bytes of the quota (evicting least recently used blobs)."""
        if length > mi.MAX_LENGTH:
            raise _origin_error("origin blob is larger than the proxy accepts")
        reservation = self.cache.reservation(length)
        try:
            await trio.to_thread.run_sync(reservation.__enter__)  # may evict: blocking I/O
        except (CacheFullError, OSError) as exc:
            raise storage_error(exc, "making room in the cache") from None
        try:
            yield
        finally:
            reservation.__exit__(None, None, None)

    async def _store(self, digest: str, length: int, chunks: AsyncIterator[bytes]) -> mi.Metainfo:
        """Write and hash ``chunks`` into a scratch file, verify, adopt into the cache."""
        piece_length = mi.piece_length_for(length)
        scratch = self.cache.scratch_file("fetch")
        try:
            sink = await trio.to_thread.run_sync(_Sink, scratch, piece_length)
        except OSError as exc:
            raise storage_error(exc, "creating a scratch file") from None
        adopted = False
        progress = self.progress[digest] = Progress(scratch, length)
        self._wake_progress_waiters()
        try:
            received = await self._pump(sink, length, chunks, progress)
            if received != length:
                raise _origin_error(f"origin closed the blob after {received} of {length} bytes")
            await trio.to_thread.run_sync(sink.finish)
            pieces, found = sink.digests()
            if found != digest:
                raise _origin_error(f"origin sent a blob whose digest is {found}, not {digest}")
            meta = mi.build(digest, length, pieces, self.trackers, piece_length=piece_length)
            await trio.to_thread.run_sync(self.cache.adopt, scratch, digest, meta)
            adopted = True
            return meta
        except OSError as exc:
            raise storage_error(exc, "writing a blob") from None
        finally:
            progress.end(failed=not adopted)
            if self.progress.get(digest) is progress:
                del self.progress[digest]
            if not adopted:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(sink.discard)

    async def _pump(
        self, sink: _Sink, length: int, chunks: AsyncIterator[bytes], progress: Progress
    ) -> int:
        """Receive into batches while a writer task writes and hashes the previous ones.

        Returns the byte count received; raises the first failure (origin or disk) as is.
        """
        send, receive = trio.open_memory_channel[list[bytes]](QUEUED_BATCHES)
        received = 0
        failure: OCIError | OSError | None = None

        async with trio.open_nursery() as nursery:

            async def writer() -> None:
                nonlocal failure
                async with receive:
                    async for batch in receive:
                        try:
                            await _write_and_hash(sink, batch)
                        except OSError as exc:
                            failure = exc
                            nursery.cancel_scope.cancel()
                            return
                        progress.advance(sum(len(chunk) for chunk in batch))

            nursery.start_soon(writer)
            async with send:
                batch: list[bytes] = []
                pending = 0
                try:
                    async for chunk in chunks:
                        received += len(chunk)
                        if received > length:
                            raise _origin_error(
                                f"origin sent more than the {length} bytes it announced"
                            )
                        self.metrics.origin_bytes.inc(len(chunk))
                        batch.append(chunk)
                        pending += len(chunk)
                        if pending >= BATCH_BYTES:
                            await send.send(batch)
                            batch, pending = [], 0
                    if batch:
                        await send.send(batch)
                except OCIError as exc:
                    failure = exc
                    nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return received
