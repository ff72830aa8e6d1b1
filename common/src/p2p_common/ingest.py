"""A blob arriving in order over HTTP: written once, hashed once per algorithm, followed by readers.

The proxy fetches blobs from the origin this way, and an agent receives a blob the proxy streams
to it this way. :class:`Ingest` takes the body's chunks as they come, writes them to a file and
hashes them in the same pass: SHA-256 of the whole, and (for the proxy) SHA-1 of each piece,
reported to ``on_piece`` as soon as the piece is on disk (that is what lets the proxy publish a
chunk of the blob while it still fetches the rest). Writing and hashing run inline while the
disk keeps up, in worker threads while it does not (:class:`~p2p_common.engine.disk.
DiskRunner`), a piece or at most :data:`BATCH_BYTES` at a time.

Readers follow the file as it grows with :meth:`Ingest.follow` (the proxy's progressive streams,
the agent's readers of a streamed blob). The last byte is held back until the SHA-256 matched,
so a wrong blob never arrives complete anywhere.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable

import trio

from p2p_common.engine.disk import DiskRunner
from p2p_common.errors import LocalError, RemoteError
from p2p_common.ratelimit import RateLimiter
from p2p_common.sendmem import SEND_MEMORY

BATCH_BYTES = 1024 * 1024
"""Most bytes received before they are written and hashed (one piece, when pieces are hashed)."""
READ_CHUNK = 4 * 1024 * 1024
"""Most bytes a follower reads at once."""


class IngestError(RemoteError):
    """The sender sent more or fewer bytes than it announced, or bytes of another digest."""


class _Hashes:
    """SHA-256 of everything and SHA-1 of each piece, fed in order (blocking; any thread)."""

    def __init__(self, piece_length: int | None) -> None:
        self.whole = hashlib.sha256()
        self.piece_length = piece_length
        self._piece = hashlib.sha1()
        self._in_piece = 0
        self._index = 0

    def update(self, data: bytes | memoryview, pieces: list[tuple[int, bytes]]) -> None:
        self.whole.update(data)
        if self.piece_length is None:
            return
        view = memoryview(data)
        while view:
            take = min(len(view), self.piece_length - self._in_piece)
            self._piece.update(view[:take])
            self._in_piece += take
            view = view[take:]
            if self._in_piece == self.piece_length:
                pieces.append((self._index, self._piece.digest()))
                self._index += 1
                self._piece = hashlib.sha1()
                self._in_piece = 0

    def finish(self, pieces: list[tuple[int, bytes]]) -> None:
        """The last, short piece."""
        if self.piece_length is not None and self._in_piece:
            pieces.append((self._index, self._piece.digest()))
            self._in_piece = 0


class Ingest:
    """One blob being received into ``fd`` (opened for writing by the caller)."""

    def __init__(
        self,
        fd: int,
        length: int,
        *,
        disk: DiskRunner,
        piece_length: int | None = None,
        on_piece: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.fd = fd
        self.length = length
        self.disk = disk
        self.on_piece = on_piece
        """Called (in the event loop) with each piece's index and SHA-1 once it is on disk."""
        self._hashes = _Hashes(piece_length)
        self._batch_limit = min(BATCH_BYTES, piece_length or BATCH_BYTES)
        self.written = 0
        """Bytes at the start of the file that are on disk (readable)."""
        self.digest: str | None = None
        """``sha256:<hex>`` once every byte was received."""
        self.ended = False
        self.verified = False
        """Set by :meth:`end`: the caller checked :attr:`digest` against what it expected."""
        self._changed = trio.Event()

    async def run(self, chunks: AsyncIterator[bytes], *, limiter: RateLimiter | None = None) -> str:
        """Receive everything; returns the SHA-256 (``sha256:<hex>``) of what was received.

        Raises :class:`IngestError` when the sender sends more or less than ``length``; local
        file errors propagate as they are (``OSError``). When the sender breaks off (an error
        from ``chunks``, or too few bytes), call it again with the bytes from :attr:`written`
        on (a range request, perhaps to another sender): what was not yet written was not
        hashed either, so the blob goes on exactly where the disk stops."""
        batch: list[bytes] = []
        pending = 0
        received = self.written
        async for chunk in chunks:
            if limiter is not None:
                await limiter.acquire(len(chunk))
            received += len(chunk)
            if received > self.length:
                raise IngestError(f"the sender sent more than the {self.length} bytes announced")
            batch.append(chunk)
            pending += len(chunk)
            if pending >= self._batch_limit:
                await self._flush(batch)
                batch, pending = [], 0
        if batch:
            await self._flush(batch)
        if received != self.length:
            raise IngestError(f"the sender stopped after {received} of {self.length} bytes")
        pieces: list[tuple[int, bytes]] = []
        self._hashes.finish(pieces)
        self._report(pieces)
        self.digest = "sha256:" + self._hashes.whole.hexdigest()
        return self.digest

    async def _flush(self, batch: list[bytes]) -> None:
        pieces = await self.disk.run(self._write, batch, self.written)
        size = sum(len(chunk) for chunk in batch)
        self.written += size
        self.disk.wrote(self.fd, size)
        self._report(pieces)
        self._wake()

    def _write(self, batch: list[bytes], offset: int) -> list[tuple[int, bytes]]:
        """(Inline or worker thread.) Hash and write one batch; the pieces it completed."""
        pieces: list[tuple[int, bytes]] = []
        for chunk in batch:
            self._hashes.update(chunk, pieces)
        for chunk in batch:
            view = memoryview(chunk)
            while view:
                written = os.pwrite(self.fd, view, offset)
                offset += written
                view = view[written:]
        return pieces

    def _report(self, pieces: list[tuple[int, bytes]]) -> None:
        if self.on_piece is not None:
            for index, sha1 in pieces:
                self.on_piece(index, sha1)

    def end(self, *, verified: bool) -> None:
        """The caller is done with this blob: ``verified`` if its digest was the right one."""
        self.ended = True
        self.verified = verified
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def follow(self, fd: int, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``[start, end]`` (inclusive; ``end`` defaults to the last) read from ``fd`` as
        they reach the disk. The blob's last byte comes only once it was verified; if the
        ingest ends unverified, raises :class:`IngestError`."""
        last = self.length - 1 if end is None else end
        position = start
        while position <= last:
            changed = self._changed
            readable = min(self.written, self.length - (0 if self.verified else 1))
            if readable > position:
                size = SEND_MEMORY.chunk(min(READ_CHUNK, readable - position, last + 1 - position))
                data = await self.disk.run(os.pread, fd, size, position)
                if len(data) != size:
                    raise LocalError(f"short read of a blob being received at {position}")
                position += size
                yield data
            elif self.ended:
                raise IngestError("the blob was not received whole and correct")
            else:
                await changed.wait()


class OrderedHasher:
    """SHA-256 of a blob whose bytes pass by in any order, each byte hashed once.

    Whoever holds the bytes at the position the hash has reached feeds them (:meth:`feed`):
    the piece just verified, a reader streaming the blob to its client, or, at the end,
    :meth:`catch_up` reading what nobody fed from the file. Thread-safe: readers feed from
    worker threads.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.position = 0
        self._sha256 = hashlib.sha256()
        self._lock = threading.Lock()

    def feed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Bytes ``[offset, offset + len(data))`` of the blob; only new ones at the position
        count."""
        end = offset + len(data)
        if not offset <= self.position < end:
            return
        with self._lock:
            if offset <= self.position < end:
                self._sha256.update(memoryview(data)[self.position - offset :])
                self.position = end

    def catch_up(self, fd: int) -> str:
        """(Blocking.) Hash what nobody fed, from ``fd``; returns ``sha256:<hex>``."""
        buffer = bytearray(READ_CHUNK)
        while self.position < self.length:
            start = self.position
            size = min(READ_CHUNK, self.length - start)
            view = memoryview(buffer)[:size]
            if os.preadv(fd, [view], start) != size:
                raise LocalError(f"short read at {start} while hashing")
            self.feed(start, view)
        return "sha256:" + self._sha256.hexdigest()
