"""Blobs on their way into the cache: one shared download per digest, streamed to readers.

A download asks a proxy for the blob's metainfo, joins the swarm, and lets every
reader stream verified pieces in order as they arrive. When every piece is there,
the blob's SHA-256 must equal its digest before it is published into the cache;
the torrent then keeps seeding from the cached file. If the swarm makes no
progress for ``fallbackAfter`` seconds, the missing pieces are fetched from the
proxy over HTTP (and still verified piece by piece).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from p2p_agent.metrics import AgentMetrics
from p2p_agent.proxies import ProxyClient
from p2p_common import metainfo as mi
from p2p_common.blobcache import BlobCache
from p2p_common.engine import Engine, Torrent
from p2p_common.errors import LocalError
from p2p_common.logs import event
from p2p_common.oci import ErrorCode, OCIError
from p2p_common.storage import PieceFile

log = logging.getLogger("p2p.agent.downloads")

READ_CHUNK = 1024 * 1024


@dataclass(eq=False)
class Download:
    digest: str
    size: int
    meta: mi.Metainfo
    store: PieceFile
    torrent: Torrent
    started: float
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Downloads:
    def __init__(
        self,
        *,
        cache: BlobCache,
        engine: Engine,
        proxies: ProxyClient,
        metrics: AgentMetrics,
        fallback_after: float,
    ) -> None:
        self.cache = cache
        self.engine = engine
        self.proxies = proxies
        self.metrics = metrics
        self.fallback_after = fallback_after
        self.active: dict[str, Download] = {}
        self._starting: dict[str, trio.Event] = {}
        self.info_hashes: dict[str, bytes] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the download tasks; reseed every cached blob that has its metainfo."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for digest in self.cache.digests():
                meta = self.cache.load_metainfo(digest)
                if meta is None or meta.name != digest:
                    continue
                try:
                    store = PieceFile(meta, self.cache.blob_path(digest), complete=True)
                except LocalError:
                    self.cache.remove(digest)
                    continue
                await self.engine.add_torrent(meta, store)
                self.info_hashes[digest] = meta.info_hash
            self.metrics.active_torrents.set(len(self.engine.torrents))
            task_status.started()
            await trio.sleep_forever()  # downloads run here until the agent stops

    def evicted(self, digest: str) -> None:
        """Cache callback: stop seeding an evicted blob."""
        info_hash = self.info_hashes.pop(digest, None)
        if info_hash is not None:
            self.engine.remove_torrent(info_hash)
            self.metrics.active_torrents.set(len(self.engine.torrents))

    async def get(
        self, ns: str, name: str, digest: str, size: int, *, authorization: str | None
    ) -> Download | None:
        """The running download of ``digest``, started if needed; None if already cached."""
        while True:
            if digest in self.cache:
                return None
            download = self.active.get(digest)
            if download is not None:
                return download
            starting = self._starting.get(digest)
            if starting is None:
                break
            await starting.wait()  # someone else is fetching the metainfo; then look again
        starting = self._starting[digest] = trio.Event()
        try:
            assert self._nursery is not None
            started: Download = await self._nursery.start(
                self._download, ns, name, digest, size, authorization
            )
            return started
        finally:
            del self._starting[digest]
            starting.set()

    async def _download(
        self,
        ns: str,
        name: str,
        digest: str,
        size: int,
        authorization: str | None,
        *,
        task_status: trio.TaskStatus[Download],
    ) -> None:
        meta = await self.proxies.metainfo(ns, name, digest, size, authorization=authorization)
        self.cache.pin(digest)
        try:
            with self.cache.reservation(size):
                store = await trio.to_thread.run_sync(self.cache.open_partial, meta, digest)
                torrent = await self.engine.add_torrent(meta, store)
                self.info_hashes[digest] = meta.info_hash
                download = Download(digest, size, meta, store, torrent, trio.current_time())
                self.active[digest] = download
                self.metrics.active_torrents.set(len(self.engine.torrents))
                event(log, "download.started", digest=digest, size=size, pieces=meta.num_pieces)
                task_status.started(download)
                try:
                    await self._complete(download, ns, name, authorization)
                    await trio.to_thread.run_sync(self.cache.publish, store, digest)
                except BaseException as exc:
                    download.error = exc
                    self.engine.remove_torrent(meta.info_hash)
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
        finally:
            self.cache.unpin(digest)

    async def _complete(
        self, download: Download, ns: str, name: str, authorization: str | None
    ) -> None:
        """Wait for the swarm; fall back to HTTP from the proxy when it stalls."""
        torrent = download.torrent
        while not torrent.completed.is_set():
            with trio.move_on_after(self.fallback_after / 2):
                await torrent.wait_complete()
            if torrent.completed.is_set():
                return
            if trio.current_time() - torrent.last_progress >= self.fallback_after:
                await self._fallback(download, ns, name, authorization)

    async def _fallback(
        self, download: Download, ns: str, name: str, authorization: str | None
    ) -> None:
        torrent, meta = download.torrent, download.meta
        self.metrics.fallbacks.inc()
        event(log, "download.fallback", logging.WARNING, digest=download.digest)
        for index in range(meta.num_pieces):
            if index in torrent.picker.have:
                continue
            data = await self.proxies.blob_range(
                ns,
                name,
                download.digest,
                index * meta.piece_length,
                meta.piece_size(index),
                authorization=authorization,
            )
            if not await torrent.add_piece(index, data):
                raise OCIError(
                    ErrorCode.UNKNOWN, "proxy sent data that fails verification", status=502
                )
            self.metrics.download_bytes.labels("http_fallback").inc(len(data))

    async def stream(self, download: Download, start: int, end: int) -> AsyncIterator[bytes]:
        """Verified bytes ``[start, end]`` of a download in progress, as they arrive."""
        torrent, meta = download.torrent, download.meta
        reader = object()
        fd = download.store.fileno()
        assert fd is not None
        position = start
        try:
            while position <= end:
                index = position // meta.piece_length
                torrent.set_reader(reader, index)
                if index not in torrent.picker.have:
                    await _wait_piece(download, index)
                piece_end = min((index + 1) * meta.piece_length, end + 1)
                while position < piece_end:
                    size = min(READ_CHUNK, piece_end - position)
                    data = await trio.to_thread.run_sync(os.pread, fd, size, position)
                    if len(data) != size:
                        raise LocalError(f"short read of {download.digest} at {position}")
                    position += size
                    yield data
        finally:
            torrent.set_reader(reader, None)


async def _wait_piece(download: Download, index: int) -> None:
    """Wait for a piece, or raise if the download failed meanwhile."""
    async with trio.open_nursery() as nursery:

        async def failed() -> None:
            await download.done.wait()
            if download.error is not None:
                nursery.cancel_scope.cancel()

        nursery.start_soon(failed)
        await download.torrent.wait_for_piece(index)
        nursery.cancel_scope.cancel()
    if index not in download.torrent.picker.have:
        error = download.error
        if isinstance(error, OCIError):
            raise error
        raise OCIError(ErrorCode.UNKNOWN, f"download failed: {error}", status=502)


def open_cached(cache: BlobCache, digest: str) -> tuple[int, int] | None:
    """(fd, size) of a cached blob, or None."""
    try:
        fd = os.open(cache.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    return fd, os.fstat(fd).st_size


Opener = Callable[[Path], int]
