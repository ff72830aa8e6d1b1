"""Piece storage: a blob being assembled (or seeded) on disk, and its in-memory twin.

A :class:`PieceFile` is a file written piece by piece with ``pwrite`` (growing, with
holes, up to the blob's size) and read with ``pread`` (or ``sendfile`` from its
:meth:`~PieceFile.fileno`), plus a persisted bitfield beside it, rewritten by
:meth:`~PieceFile.flush` (once a second while pieces arrive, and on close), so a restarted
process resumes about where it stopped. Bits written before a crash are re-verified on open
(the data might not have reached the disk). :meth:`PieceFile.publish` checks the whole file's
SHA-256 and moves it into place with an atomic rename.

These calls block: shells run them in a worker thread when the disk may be slow.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Protocol

from p2p_common.bitfield import Bitfield, byte_length
from p2p_common.blobinfo import BlobMetainfo
from p2p_common.errors import LocalError, RemoteError
from p2p_common.metainfo import Metainfo

Info = Metainfo | BlobMetainfo
"""A plain torrent, or a chunked blob (whose later chunks may not be known yet)."""


class StorageError(LocalError):
    """The local disk failed us (full, gone, permissions)."""


class BlobDamagedError(StorageError):
    """A complete blob is missing or has the wrong size: it is gone, not just unreadable now."""


class DigestMismatchError(RemoteError):
    """A complete blob's SHA-256 is not its digest: the metainfo it was built from lied."""


class PieceStore(Protocol):
    """What the peer engine needs from storage."""

    have: Bitfield

    def fileno(self) -> int | None:
        """A file descriptor to ``sendfile`` from, or None."""

    def read(self, offset: int, length: int) -> bytes: ...

    def write_piece(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Store a verified piece and record it (:meth:`flush` makes the record durable
        enough to resume)."""

    def flush(self) -> None:
        """Persist what :meth:`write_piece` recorded since the last call (cheap if nothing)."""

    def close(self) -> None: ...


def verify_piece(metainfo: Info, index: int, data: bytes | bytearray | memoryview) -> bool:
    return len(data) == metainfo.piece_size(index) and (
        hashlib.sha1(data).digest() == metainfo.piece_hash(index)
    )


class PieceFile:
    """A single-file blob on disk with a persisted bitfield of verified pieces."""

    def __init__(
        self,
        metainfo: Info,
        data_path: Path,
        bitfield_path: Path | None = None,
        *,
        complete: bool = False,
        create: bool = True,
    ) -> None:
        """Open (creating if needed, unless ``create=False``) ``data_path``.

        ``complete=True`` opens an existing, already verified blob read-only for seeding.
        Otherwise the file is created empty (it grows as pieces arrive: on this kind of
        machine, writing into a range made sparse by ``ftruncate`` costs about eight times
        the system time of writing past the end, on ext4 and tmpfs alike; see
        docs/benchmarks.md) and the bitfield loaded
        from ``bitfield_path``, keeping only pieces that still verify (of a chunked blob, only
        pieces whose hashes are known: the rest is fetched again).
        """
        self.metainfo = metainfo
        self.path = data_path
        self.bitfield_path = bitfield_path
        self._bits_fd: int | None = None
        self._bits_dirty = False
        try:
            if complete:
                try:
                    self._fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise BlobDamagedError(f"{data_path}: missing") from None
                size = os.fstat(self._fd).st_size
                if size != metainfo.length:
                    os.close(self._fd)
                    raise BlobDamagedError(f"{data_path}: {size} bytes, expected {metainfo.length}")
                self.have = Bitfield(metainfo.num_pieces, full=True)
                return
            flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
            self._fd = os.open(data_path, flags, 0o640)
            if os.fstat(self._fd).st_size > metainfo.length:
                os.ftruncate(self._fd, metainfo.length)  # never longer than the blob
            self.have = Bitfield(metainfo.num_pieces)
            if bitfield_path is not None:
                self._bits_fd = os.open(bitfield_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
                self._load_bitfield()
        except OSError as exc:
            raise StorageError(f"{data_path}: {exc.strerror or exc}") from exc

    def _load_bitfield(self) -> None:
        assert self._bits_fd is not None
        size = byte_length(self.metainfo.num_pieces)
        raw = os.pread(self._bits_fd, size + 1, 0)
        if len(raw) != size:
            os.ftruncate(self._bits_fd, 0)
            os.pwrite(self._bits_fd, bytes(size), 0)
            return
        try:
            stored = Bitfield.from_bytes(raw, self.metainfo.num_pieces)
        except Exception:
            # Reset the file too: bytes no later write touches would fail this check again.
            stored = Bitfield(self.metainfo.num_pieces)
            os.pwrite(self._bits_fd, stored.to_bytes(), 0)
        known = getattr(self.metainfo, "known_pieces", self.metainfo.num_pieces)
        for index in stored:
            if index >= known:
                break
            data = os.pread(
                self._fd, self.metainfo.piece_size(index), index * self.metainfo.piece_length
            )
            if verify_piece(self.metainfo, index, data):
                self.have.set(index)
        if self.have != stored:
            os.pwrite(self._bits_fd, self.have.to_bytes(), 0)

    def fileno(self) -> int | None:
        return self._fd

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise StorageError(f"{self.path}: read failed: {exc.strerror or exc}") from exc
        if len(data) != length:
            raise StorageError(f"{self.path}: short read at {offset}")
        return data

    def write_piece(self, index: int, data: bytes | bytearray | memoryview) -> None:
        offset = index * self.metainfo.piece_length
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                offset += written
                view = view[written:]
            self.have.set(index)
        except OSError as exc:
            raise StorageError(f"{self.path}: write failed: {exc.strerror or exc}") from exc
        self._bits_dirty = True

    def flush(self) -> None:
        """Write the bitfield file (the engine calls this once a second and at the end: a
        crash loses at most that second's record, and those pieces are fetched again)."""
        if not self._bits_dirty or self._bits_fd is None:
            return
        self._bits_dirty = False
        try:
            os.pwrite(self._bits_fd, self.have.to_bytes(), 0)
        except OSError as exc:
            raise StorageError(
                f"{self.path}: bitfield write failed: {exc.strerror or exc}"
            ) from exc

    def sha256(self) -> str:
        """``sha256:<hex>`` of the whole file (blocking; ~1.7 GB/s)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self._sha256(fd)
        finally:
            os.close(fd)

    def _sha256(self, fd: int) -> str:
        digest = hashlib.sha256()
        view = memoryview(bytearray(1 << 20))
        offset = 0
        while offset < self.metainfo.length:
            n = os.preadv(fd, [view], offset)
            if n <= 0:
                raise StorageError(f"{self.path}: short read at {offset}")
            digest.update(view[:n])
            offset += n
        return "sha256:" + digest.hexdigest()

    def publish(
        self, destination: Path, expected_digest: str, *, known_digest: str | None = None
    ) -> None:
        """Verify the complete blob's SHA-256 and atomically rename it to ``destination``.

        Works through its own descriptor, so it completes even if the torrent that filled
        the file has already closed this store (a shutdown racing a finished download).
        ``known_digest`` skips re-reading the file when the caller already hashed every
        byte in order. On a mismatch the data and bitfield files are removed and
        :class:`DigestMismatchError` is raised.
        """
        if not self.have.complete:
            raise LocalError("publish() before every piece is present")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"{self.path}: {exc.strerror or exc}") from exc
        try:
            digest = known_digest or self._sha256(fd)
            if digest != expected_digest:
                self.discard()
                raise DigestMismatchError(f"blob hashes to {digest}, expected {expected_digest}")
            os.fsync(fd)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, destination)
            self.path = destination
            if self.bitfield_path is not None:
                self.bitfield_path.unlink(missing_ok=True)
                self.bitfield_path = None
        except OSError as exc:
            raise StorageError(f"publishing {destination}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)

    def drop_bitfield(self) -> None:
        """Close the bitfield file of a published blob (:meth:`publish` deleted it: a complete
        blob needs no record, and a seeded blob would otherwise keep one descriptor of a
        deleted file for as long as it is seeded). Call it on the thread that flushes (the
        event loop), not in :meth:`publish`'s worker thread, so that no flush can write to
        the descriptor while it is closed and its number reused."""
        if self.bitfield_path is not None or self._bits_fd is None:
            return  # not published, or no bitfield file
        fd, self._bits_fd = self._bits_fd, None
        self._bits_dirty = False
        os.close(fd)

    def discard(self) -> None:
        """Close and delete the data and bitfield files."""
        self.close()
        self.path.unlink(missing_ok=True)
        if self.bitfield_path is not None:
            self.bitfield_path.unlink(missing_ok=True)

    def close(self) -> None:
        with contextlib.suppress(StorageError):
            self.flush()
        for fd in (self._fd, self._bits_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = -1
        self._bits_fd = None


class MemoryPieceStore:
    """In-memory twin of :class:`PieceFile` for fast tests."""

    def __init__(self, metainfo: Info, content: bytes | None = None) -> None:
        self.metainfo = metainfo
        self.data = bytearray(content if content is not None else bytes(metainfo.length))
        if len(self.data) != metainfo.length:
            raise ValueError("content length does not match the metainfo")
        self.have = Bitfield(metainfo.num_pieces, full=content is not None)

    def fileno(self) -> int | None:
        return None

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > len(self.data):
            raise StorageError(f"memory: short read at {offset}")  # as PieceFile does
        return bytes(self.data[offset : offset + length])

    def write_piece(self, index: int, data: bytes | bytearray | memoryview) -> None:
        offset = index * self.metainfo.piece_length
        self.data[offset : offset + len(data)] = data
        self.have.set(index)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
