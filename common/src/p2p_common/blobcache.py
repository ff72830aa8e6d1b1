"""The on-disk blob cache shared by the agent and the proxy (``dataDir``).

Layout::

    dataDir/blobs/sha256/<hex>            complete blobs, SHA-256 verified
    dataDir/blobs/sha256/<hex>.chunks     their chunk torrents as frames (p2p_common.blobinfo;
                                          reseed after restart without rehashing)
    dataDir/partial/sha256-<hex>.*        downloads in progress: data, bitfield, chunks known
    dataDir/tmp/                          scratch files (origin fetches)

A blob enters ``blobs/`` only by an atomic rename after its digest was checked,
so a crash leaves either the old state or the new one. A quota with
least-recently-used eviction bounds the disk; blobs pinned by a reader, a seeder
or a download are never evicted. Last use survives restarts as the file's mtime.
Eviction by a policy (p2p_common.cachepolicy: watermarks, expiry, an operator's prune) goes
through :meth:`BlobCache.snapshot` and :meth:`BlobCache.evict`, which checks the pins again at
the moment of deletion. :attr:`BlobCache.evictions` counts evictions by reason.

The methods block on the file system; callers on a trio loop run the slow ones
(:meth:`BlobCache.scan`, :meth:`BlobCache.evict_for`) in a thread, and reserve quota with
:meth:`BlobCache.reserved`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from p2p_common import metainfo as mi
from p2p_common.blobinfo import BlobMetainfo, FrameParser
from p2p_common.cachepolicy import Blob, Reason
from p2p_common.errors import LocalError
from p2p_common.storage import PieceFile

_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})\Z")

PARTIAL_MAX_AGE = 7 * 24 * 3600
"""Seconds an interrupted download is kept for resuming (by the data file's last write)."""
MIN_FREE_BYTES = 64 * 1024 * 1024
"""Disk space a new blob must leave free (logs, metadata, other downloads growing)."""


class CacheFullError(LocalError):
    """The quota cannot make room: every cached blob is in use."""


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    """The index at one moment, for an eviction policy."""

    blobs: list[Blob]
    """Least recently used first."""
    pins: dict[str, int]
    """Digest -> readers, downloads and seeders holding it."""
    reserved: int
    """Bytes of quota held for downloads in progress."""


@dataclass(frozen=True, slots=True)
class PartialDownload:
    """The files of a download in progress (or left by an earlier run, to resume)."""

    digest: str
    bytes: int
    """Disk space its files take."""
    modified: float
    """Unix time of the last write."""


def _hex(digest: str) -> str:
    match = _DIGEST.match(digest)
    if not match:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return match.group(1)


class BlobCache:
    def __init__(
        self,
        root: Path,
        *,
        quota: int = 0,
        on_evict: Callable[[str], object] | None = None,
    ) -> None:
        self.root = root
        self.quota = quota
        self.on_evict = on_evict
        self.blob_dir = root / "blobs" / "sha256"
        self.partial_dir = root / "partial"
        self.tmp_dir = root / "tmp"
        for directory in (self.blob_dir, self.partial_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._used_at: dict[str, float] = {}
        self.evictions: collections.Counter[str] = collections.Counter()
        """Blobs evicted since start, by reason (``quota``, ``watermark``, ...)."""
        self._pins: collections.Counter[str] = collections.Counter()
        self._reserved = 0
        self._lock = threading.Lock()
        self.scan()

    # -- paths -----------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / _hex(digest)

    def metainfo_path(self, digest: str) -> Path:
        return self.blob_dir / (_hex(digest) + ".chunks")

    def partial_paths(self, digest: str) -> tuple[Path, Path, Path]:
        base = self.partial_dir / ("sha256-" + _hex(digest))
        return base.with_suffix(".data"), base.with_suffix(".bits"), base.with_suffix(".chunks")

    # -- index -----------------------------------------------------------------------------------

    def scan(self) -> None:
        """Rebuild the index from disk, oldest use first; drop scratch files."""
        entries = []
        for path in self.blob_dir.iterdir():
            if path.suffix == ".torrent":  # whole-blob metainfo of an earlier version
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if path.suffix or not _DIGEST.match("sha256:" + path.name):
                continue
            stat = path.stat()
            entries.append((stat.st_mtime, "sha256:" + path.name, stat.st_size))
        entries.sort()
        with self._lock:
            self._lru = collections.OrderedDict((d, size) for _, d, size in entries)
            self._used_at = {d: mtime for mtime, d, _ in entries}
        for scratch in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                scratch.unlink()
        self._clean_partials()

    def _clean_partials(self) -> None:
        """Drop what a previous run cannot resume: streamed downloads (no bitfield), pieces
        of a download left for :data:`PARTIAL_MAX_AGE` seconds, stray files of cut sets."""
        now = time.time()
        groups: dict[str, list[Path]] = collections.defaultdict(list)
        for path in self.partial_dir.iterdir():
            groups[path.stem].append(path)
        for stem, paths in groups.items():
            data = self.partial_dir / (stem + ".data")
            try:
                stale = now - data.stat().st_mtime > PARTIAL_MAX_AGE
            except FileNotFoundError:
                stale = True  # a stream, or a bitfield/metainfo without its data
            for path in paths:
                if stale or path.suffix not in (".data", ".bits", ".chunks"):
                    with contextlib.suppress(OSError):
                        path.unlink()

    @property
    def used(self) -> int:
        with self._lock:
            return sum(self._lru.values()) + self._reserved

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._lru

    def size(self, digest: str) -> int | None:
        with self._lock:
            return self._lru.get(digest)

    def digests(self) -> list[str]:
        """Cached digests, least recently used first."""
        with self._lock:
            return list(self._lru)

    def last_used(self, digest: str) -> float | None:
        """Unix time of the blob's last use (its mtime on disk)."""
        with self._lock:
            return self._used_at.get(digest)

    def touch(self, digest: str) -> None:
        """Record a use (moves the blob to the most recently used end); kept on disk as the
        file's mtime, so that it survives a restart."""
        now = time.time()
        with self._lock:
            if digest not in self._lru:
                return
            self._lru.move_to_end(digest)
            self._used_at[digest] = now
        with contextlib.suppress(OSError):
            os.utime(self.blob_path(digest), (now, now))

    # -- pins ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def pinned(self, digest: str) -> Iterator[None]:
        """Keep ``digest`` from being evicted while the block runs."""
        with self._lock:
            self._pins[digest] += 1
        try:
            yield
        finally:
            with self._lock:
                self._pins[digest] -= 1
                if self._pins[digest] <= 0:
                    del self._pins[digest]

    def pin(self, digest: str) -> None:
        with self._lock:
            self._pins[digest] += 1

    def unpin(self, digest: str) -> None:
        with self._lock:
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]

    def eviction_counts(self) -> dict[str, int]:
        """:attr:`evictions`, copied (worker threads add to it)."""
        with self._lock:
            return dict(self.evictions)

    def pins(self, digest: str) -> int:
        """How many readers, downloads or seeders hold ``digest`` now."""
        with self._lock:
            return self._pins.get(digest, 0)

    def snapshot(self) -> CacheSnapshot:
        """The blobs with their sizes and last uses, the pins and the reservations, taken
        together (for :mod:`p2p_common.cachepolicy`)."""
        with self._lock:
            blobs = [
                Blob(digest, size, self._used_at.get(digest, 0.0))
                for digest, size in self._lru.items()
            ]
            return CacheSnapshot(blobs, dict(self._pins), self._reserved)

    # -- space -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reservation(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of quota for a download in progress (evicting to make room)."""
        self.evict_for(nbytes)
        with self._lock:
            self._reserved += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= nbytes

    @contextlib.asynccontextmanager
    async def reserved(self, nbytes: int) -> AsyncIterator[None]:
        """:meth:`reservation` for a trio caller: the eviction (file deletions) runs in a
        worker thread, never on the event loop; ``on_evict`` is called back in the caller's
        thread once it is done."""
        evicted = await trio.to_thread.run_sync(self._reserve, nbytes)
        try:
            if self.on_evict is not None:
                for digest in evicted:
                    self.on_evict(digest)
            yield
        finally:
            with self._lock:
                self._reserved -= nbytes

    def _reserve(self, nbytes: int) -> list[str]:
        evicted = self.evict_for(nbytes, notify=False)
        with self._lock:
            self._reserved += nbytes
        return evicted

    def evict_for(self, nbytes: int, *, notify: bool = True) -> list[str]:
        """Evict least recently used, unpinned blobs until ``nbytes`` more fit: within the
        quota (if any) and on the disk, which must keep :data:`MIN_FREE_BYTES` free beyond them.
        Returns the evicted digests (``on_evict`` is called for each, unless not ``notify``).

        Raises :class:`CacheFullError` when that is impossible.
        """
        if self.quota and nbytes > self.quota:
            raise CacheFullError(f"a blob of {nbytes} bytes is larger than the cache quota")
        evicted: list[str] = []
        while True:
            with self._lock:
                total = sum(self._lru.values()) + self._reserved
                over_quota = bool(self.quota) and total + nbytes > self.quota
            free = self.free_bytes()
            short_of_disk = free < nbytes + MIN_FREE_BYTES
            if not over_quota and not short_of_disk:
                return evicted
            with self._lock:
                victim = next((d for d in self._lru if not self._pins.get(d)), None)
                if victim is None:
                    if over_quota:
                        raise CacheFullError(
                            f"cache quota of {self.quota} bytes is full of blobs in use"
                        )
                    raise CacheFullError(
                        f"{self.root} has {free} bytes free, a blob of {nbytes} bytes needs more"
                    )
                del self._lru[victim]
                self._used_at.pop(victim, None)
                # A full filesystem counts as the watermark's reason (the disk, not the quota).
                self.evictions["quota" if over_quota else "watermark"] += 1
            self._remove_files(victim)
            evicted.append(victim)
            if notify and self.on_evict is not None:
                self.on_evict(victim)

    def free_bytes(self) -> int:
        """Bytes free on the cache's file system (for the caller's user)."""
        return shutil.disk_usage(self.root).free

    def _remove_files(self, digest: str) -> None:
        for path in (self.blob_path(digest), self.metainfo_path(digest)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def remove(self, digest: str) -> None:
        """Drop a blob (e.g. found corrupt) regardless of the LRU order."""
        with self._lock:
            self._lru.pop(digest, None)
            self._used_at.pop(digest, None)
        self._remove_files(digest)

    def evict(self, digest: str, reason: Reason) -> bool:
        """Evict one blob for ``reason`` unless it is pinned now (checked together with its
        removal from the index, so a reader that pinned it first keeps it; one that pins it
        later finds it gone and downloads it again). Returns whether it was evicted;
        ``on_evict`` is not called (the caller notifies). Blocks on the file system."""
        with self._lock:
            if self._pins.get(digest) or digest not in self._lru:
                return False
            del self._lru[digest]
            self._used_at.pop(digest, None)
            self.evictions[reason] += 1
        self._remove_files(digest)
        return True

    # -- downloads in progress -------------------------------------------------------------------

    def partials(self) -> list[PartialDownload]:
        """The downloads that have files under ``partial/`` (in progress, or left to resume)."""
        found: dict[str, tuple[int, float]] = {}
        for path in self.partial_dir.iterdir():
            hex_digest = path.name.split(".", 1)[0].removeprefix("sha256-")
            if not _DIGEST.match("sha256:" + hex_digest):
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            size, modified = found.get(hex_digest, (0, 0.0))
            found[hex_digest] = (size + stat.st_blocks * 512, max(modified, stat.st_mtime))
        return [
            PartialDownload("sha256:" + h, size, modified)
            for h, (size, modified) in sorted(found.items())
        ]

    def remove_partial(self, digest: str) -> int:
        """Delete the files an interrupted download of ``digest`` left; returns how many, or
        -1 when ``digest`` is pinned (a download of it pins it before it opens its files, so
        holding the lock while deleting keeps one from starting underneath)."""
        prefix = "sha256-" + _hex(digest) + "."
        removed = 0
        with self._lock:
            if self._pins.get(digest):
                return -1
            for path in self.partial_dir.iterdir():
                if path.name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed += 1
        return removed

    # -- entering the cache ----------------------------------------------------------------------

    def adopt(self, source: Path, digest: str, meta: BlobMetainfo | None = None) -> Path:
        """Move an already verified file into the cache (atomic rename); returns its path."""
        target = self.blob_path(digest)
        if meta is not None:
            self.save_metainfo(digest, meta)
        os.replace(source, target)
        self._register(digest, target)
        return target

    def publish(
        self, piece_file: PieceFile, digest: str, *, known_digest: str | None = None
    ) -> Path:
        """Verify a completed download's SHA-256 and move it into the cache."""
        target = self.blob_path(digest)
        if isinstance(piece_file.metainfo, BlobMetainfo):
            self.save_metainfo(digest, piece_file.metainfo)
        piece_file.publish(target, digest, known_digest=known_digest)
        for path in self.partial_paths(digest)[1:]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._register(digest, target)
        return target

    def _register(self, digest: str, path: Path) -> None:
        size = path.stat().st_size
        now = time.time()
        with self._lock:
            self._lru[digest] = size
            self._lru.move_to_end(digest)
            self._used_at[digest] = now
        with contextlib.suppress(OSError):
            os.utime(path, (now, now))

    def save_metainfo(self, digest: str, meta: BlobMetainfo) -> None:
        """Store a blob's chunks (all of them) beside it."""
        if not meta.complete:
            raise LocalError("only the metainfo of a whole blob is stored")
        path = self.metainfo_path(digest)
        scratch = path.with_suffix(".chunks.tmp")
        scratch.write_bytes(meta.frames())
        os.replace(scratch, path)

    def load_metainfo(self, digest: str) -> BlobMetainfo | None:
        """The stored chunks of a cached blob, if present, intact and of this blob's size."""
        size = self.size(digest)
        if size is None:
            return None
        try:
            frames = self.metainfo_path(digest).read_bytes()
            return BlobMetainfo.from_frames(digest, size, frames)
        except (OSError, mi.MetainfoError):
            return None

    def described_length(self, digest: str) -> int | None:
        """The length the stored chunks of ``digest`` describe (None without readable chunks):
        a cached file of another length is damaged."""
        try:
            return sum(chunk.length for chunk in mi_frames(self.metainfo_path(digest).read_bytes()))
        except (OSError, mi.MetainfoError):
            return None

    def open_partial(self, meta: BlobMetainfo, digest: str) -> PieceFile:
        """The in-progress download of ``digest`` (resumed if a previous run left one for the
        same chunks; only pieces of chunks known now are kept)."""
        data, bits, chunks = self.partial_paths(digest)
        stored = None
        with contextlib.suppress(OSError, mi.MetainfoError):
            parsed = BlobMetainfo.for_blob(digest, meta.length)
            for chunk in mi_frames(chunks.read_bytes()):
                parsed.add_chunk(chunk)
            stored = parsed
        if stored is None or not stored.chunks or stored.info_hash != meta.info_hash:
            for path in (data, bits):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        chunks.write_bytes(meta.frames())
        return PieceFile(meta, data, bits)

    def save_partial_chunks(self, meta: BlobMetainfo, digest: str, start: int) -> None:
        """Remember the chunks ``start..`` of an in-progress download (for resuming), appended
        to those saved before (a frame cut short by a crash is ignored when read back)."""
        with self.partial_paths(digest)[2].open("ab") as handle:
            handle.write(meta.frames(start))

    def scratch_file(self, prefix: str) -> Path:
        """A fresh path under ``tmp/`` (removed at the next :meth:`scan`)."""
        return self.tmp_dir / f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"


def mi_frames(data: bytes) -> list[mi.Metainfo]:
    """The chunk torrents in a frames file (a cut-off last frame is ignored)."""
    return FrameParser().feed(data)
