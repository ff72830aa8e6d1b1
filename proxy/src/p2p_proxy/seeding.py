"""Seeding blobs with the peer engine: while they are fetched, and once they are cached.

One torrent (one swarm) per blob. A blob being fetched is seeded from its first published
chunk on (:class:`Seeder` is the fetcher's :class:`~p2p_proxy.fetch.FetchListener`): the
torrent ingests, offering each piece the origin delivered once its chunk is published, and goes
on seeding the same file once it is verified and moved into the cache. A cached blob is seeded
read-only from the cache (:class:`PieceFile` with ``complete=True``). The cache's eviction
callback stops a blob's torrent; its file is closed once its last peer connection has ended, so
no reader ever sees the descriptor reused. At start-up :meth:`Seeder.reseed_all` seeds every
cached blob whose chunks were stored beside it, without reading the origin (or the blob: the
stored piece hashes are trusted, the blob was verified when it entered the cache).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import trio

from p2p_common.blobcache import BlobCache
from p2p_common.blobinfo import BlobMetainfo
from p2p_common.engine import Engine, Torrent
from p2p_common.engine.torrent import RESEED_ANNOUNCE_SPREAD
from p2p_common.errors import LocalError
from p2p_common.logs import event
from p2p_common.storage import PieceFile, StorageError
from p2p_proxy.fetch import Fetch

__all__ = ["Seeder"]

log = logging.getLogger("p2p.proxy")

CLOSE_WAIT = 30.0
"""Longest wait for a stopped torrent's connections to end before its file is closed."""


@dataclass
class _Seed:
    torrent: Torrent
    store: PieceFile


class Seeder:
    def __init__(
        self,
        engine: Engine,
        cache: BlobCache,
        nursery: trio.Nursery,
        trackers: Sequence[str],
    ) -> None:
        self.engine = engine
        self.cache = cache
        self.trackers = tuple(trackers)
        self._nursery = nursery
        self._seeds: dict[str, _Seed] = {}
        self._closing: list[_Seed] = []
        self._locks: dict[str, trio.Lock] = {}
        self._starting: set[str] = set()

    def torrents(self) -> dict[str, Torrent]:
        """The torrent of every blob being seeded (cached, or while it is fetched), by digest."""
        return {digest: seed.torrent for digest, seed in self._seeds.items() if self._alive(seed)}

    def _alive(self, seed: _Seed) -> bool:
        return self.engine.torrents.get(seed.torrent.info_hash) is seed.torrent

    # -- blobs being fetched (FetchListener) ------------------------------------------------------

    def fetch_chunk(self, fetch: Fetch) -> None:
        seed = self._seeds.get(fetch.digest)
        if seed is not None and seed.torrent.info is fetch.blob:
            self.engine.chunks_added(seed.torrent)
        elif len(fetch.blob.chunks) == 1 and fetch.digest not in self._starting:
            self._starting.add(fetch.digest)
            self._nursery.start_soon(self._start_ingest, fetch)

    def fetch_piece(self, fetch: Fetch, index: int) -> None:
        seed = self._seeds.get(fetch.digest)
        if seed is not None and seed.torrent.info is fetch.blob:
            seed.torrent.piece_arrived(index)

    def fetch_ended(self, fetch: Fetch) -> None:
        if fetch.failed:
            seed = self._seeds.get(fetch.digest)
            if seed is not None and seed.torrent.info is fetch.blob:
                self._stop(fetch.digest)

    async def _start_ingest(self, fetch: Fetch) -> None:
        """Seed a blob from its first published chunk on, while the rest is fetched.

        The fetch may end while this task waits (for the lock, for the file, for the engine):
        the scratch file is opened without creating it (opening the path after the rename once
        created an empty file there and seeded its zeros as the blob), so the descriptor is the
        fetch's own file (renamed into the cache once verified) or none; a fetch that ended by
        then is seeded from the cache instead, a failed one not at all.
        """
        digest = fetch.digest
        try:
            lock = self._locks.setdefault(digest, trio.Lock())
            async with lock:
                if digest in self._seeds:
                    return
                store = None
                if not fetch.ended:
                    try:
                        store = await trio.to_thread.run_sync(
                            partial(PieceFile, fetch.blob, fetch.path, create=False)
                        )
                    except StorageError as exc:
                        # Renamed into the cache before its fetch has ended (the rename's
                        # thread may report after ours), or not to be opened now.
                        event(
                            log, "proxy.seed_deferred", logging.DEBUG, digest=digest, error=str(exc)
                        )
                if store is None:
                    # The fetch ended before this task ran, or its file is not there: seed the
                    # blob from the cache once the fetch has ended, unless it failed.
                    await fetch.wait_ended()
                    if not fetch.failed:
                        await self._seed_cached(digest, fetch.blob)
                    return
                try:
                    torrent = await self.engine.add_torrent(fetch.blob, store, ingest=True)
                except BaseException:
                    store.close()
                    raise
                self._seeds[digest] = _Seed(torrent, store)
                if fetch.failed:  # its fetch_ended came before the torrent was known
                    self._stop(digest)
                    return
                for index in range(fetch.pieces):
                    torrent.piece_arrived(index)
                self.engine.chunks_added(torrent)
                event(log, "proxy.seeding", logging.DEBUG, digest=digest, while_fetching=True)
        except (LocalError, OSError) as exc:
            event(log, "proxy.seed_failed", logging.WARNING, digest=digest, error=str(exc))
        finally:
            self._starting.discard(digest)
            self._drop_lock(digest)

    # -- cached blobs ------------------------------------------------------------------------------

    async def seed(self, digest: str, meta: BlobMetainfo, *, announce_delay: float = 0.0) -> None:
        """Make sure ``digest`` (cached, described by ``meta``) is being seeded."""
        lock = self._locks.setdefault(digest, trio.Lock())
        try:
            async with lock:
                await self._seed_cached(digest, meta, announce_delay=announce_delay)
        finally:
            self._drop_lock(digest)

    async def _seed_cached(
        self, digest: str, meta: BlobMetainfo, *, announce_delay: float = 0.0
    ) -> None:
        """:meth:`seed`, with ``digest``'s lock held."""
        seed = self._seeds.get(digest)
        if seed is not None:
            if self._alive(seed) and seed.torrent.info_hash == meta.info_hash:
                return
            self._stop(digest)  # failed, or built from other metainfo
        path = self.cache.blob_path(digest)
        info = meta.with_trackers(self.trackers)
        store = await trio.to_thread.run_sync(lambda: PieceFile(info, path, complete=True))
        try:
            torrent = await self.engine.add_torrent(info, store, announce_delay=announce_delay)
        except BaseException:
            store.close()
            raise
        self._seeds[digest] = _Seed(torrent, store)
        # By digest: the infohash is a capability for the swarm, never logged.
        event(log, "proxy.seeding", logging.DEBUG, digest=digest, chunks=len(meta.chunks))

    def _drop_lock(self, digest: str) -> None:
        lock = self._locks.get(digest)
        if lock is not None and not lock.locked() and lock.statistics().tasks_waiting == 0:
            del self._locks[digest]

    def on_evict(self, digest: str) -> None:
        """The cache's eviction callback (in the event loop: see BlobCache.reserved)."""
        self._stop(digest)

    def _stop(self, digest: str) -> None:
        seed = self._seeds.pop(digest, None)
        if seed is None:
            return
        self.engine.remove_torrent(seed.torrent.info_hash)
        self._closing.append(seed)
        self._nursery.start_soon(self._close_when_idle, seed)
        event(log, "proxy.unseeded", logging.DEBUG, digest=digest)

    async def _close_when_idle(self, seed: _Seed) -> None:
        with trio.move_on_after(CLOSE_WAIT):
            while seed.torrent.connections:  # noqa: ASYNC110 - owned by the engine's tasks
                await trio.sleep(0.1)
        seed.store.close()
        self._closing.remove(seed)

    async def reseed_all(self) -> int:
        """Seed every cached blob with stored, usable chunks; returns how many."""
        count = 0
        for digest in self.cache.digests():
            meta = await trio.to_thread.run_sync(self.cache.load_metainfo, digest)
            if meta is None:
                continue
            try:
                # Spread the first announces: a restarted proxy reseeds its whole cache.
                await self.seed(
                    digest, meta, announce_delay=random.uniform(0, RESEED_ANNOUNCE_SPREAD)
                )
            except StorageError as exc:
                event(log, "proxy.reseed_failed", logging.WARNING, digest=digest, error=str(exc))
                continue
            count += 1
        return count

    def close(self) -> None:
        """Close every file (once the engine has stopped: nothing reads them any more)."""
        for seed in [*self._seeds.values(), *self._closing]:
            seed.store.close()
        self._seeds.clear()
        self._closing.clear()
