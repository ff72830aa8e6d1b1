"""A blob as a chain of chunk torrents, published one by one while the proxy fetches it.

A swarm cannot start from one torrent of the whole blob: its metainfo needs the hash of every
piece, so nobody could trade until the proxy held the last byte. Instead a blob is cut into
chunks of :func:`chunk_pieces_for` pieces (4 MiB, the last one shorter), and every chunk is a
standard single-file BitTorrent v1 torrent of its own (:class:`~p2p_common.metainfo.Metainfo`,
private, deterministic): the proxy publishes chunk ``k`` as soon as it fetched and hashed it,
and agents trade chunk ``k`` while it fetches chunk ``k + 1``.

Everything follows from the blob's digest and size: the piece length
(:func:`~p2p_common.metainfo.piece_length_for`), the chunk boundaries, each chunk's ``name``
(the digest for a blob of one chunk, which is then exactly the whole-blob torrent; else
``<digest>.<k>``), and so every chunk's infohash. Any proxy that fetches the blob publishes the
same chunks.

One swarm per blob, not per chunk. Between p2p peers a connection, a tracker announce and a
bitfield cover the whole blob: pieces are numbered across chunks, and a peer requests only
pieces whose chunk it already knows (it could not check the others). The swarm's id is the
first chunk's infohash for a one-chunk blob, otherwise :func:`swarm_id` of it; so chunks cost
neither connections nor announces. A standard client that was given one chunk's torrent joins
that chunk alone, by its own infohash, and sees its pieces numbered from 0 (a window of the
blob's swarm).

On the wire between proxy and agent (``GET /p2p/v1/chunks``, docs/proxy-api.md) the chunks
travel as *frames*: each chunk's complete ``.torrent`` document wrapped as one bencoded byte
string (``<length>:<document>``), concatenated in chunk order. The same bytes are the blob's
metainfo file in the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from p2p_common import metainfo as mi
from p2p_common.metainfo import Metainfo, MetainfoError

CHUNK_BYTES = 4 * 1024 * 1024
"""Bytes per chunk for pieces up to 256 KiB (all blobs up to 2 GiB). Part of the format: every
proxy must use the same value or the chunks' infohashes differ. Chosen by measurement
(docs/architecture.md): a chunk is what the swarm waits for before it can start, and what the
last node waits for after the proxy's last byte."""
MIN_CHUNK_PIECES = 16
"""Pieces per chunk at least (larger pieces make larger chunks), so a blob has at most
8192 / 16 = 512 chunks. With today's smallest piece, 256 KiB, every chunk has 16 pieces; the
rule in bytes is what a blob of smaller pieces (a proxy that builds them:
:func:`published_geometry`) is cut by."""
MAX_FRAME_DIGITS = 8
"""Digits of a frame's length prefix (a frame is at most MAX_METAINFO_BYTES)."""
_SWARM_TAG = b"p2p-blob-swarm\x00"


def chunk_pieces_for(piece_length: int) -> int:
    """Pieces per chunk for pieces of ``piece_length`` bytes: 4 MiB of them, at least 16."""
    return max(MIN_CHUNK_PIECES, CHUNK_BYTES // piece_length)


MAX_PUBLISHED_PIECES = 65536
"""Most pieces we accept in a blob whose piece length a proxy chose (bitfields stay at 8 KiB)."""


def published_geometry(length: int, piece_length: int) -> Geometry:
    """The geometry of a blob whose chunks came with ``piece_length``: a power of two from
    16 KiB to 16 MiB, with at most :data:`MAX_PUBLISHED_PIECES` pieces (unless 16 MiB), and
    chunks as :func:`chunk_pieces_for` cuts them; else :class:`MetainfoError`."""
    if not (
        16 * 1024 <= piece_length <= mi.MAX_PIECE_LENGTH and piece_length & (piece_length - 1) == 0
    ):
        raise MetainfoError(f"piece length {piece_length} is not one a blob may have")
    pieces = mi.piece_count(length, piece_length)
    if pieces > MAX_PUBLISHED_PIECES and piece_length < mi.MAX_PIECE_LENGTH:
        raise MetainfoError(f"{pieces} pieces of {piece_length} bytes are too many for one blob")
    return Geometry(length, piece_length, chunk_pieces_for(piece_length))


def swarm_id(first_chunk: bytes) -> bytes:
    """The swarm id of a blob of several chunks, from its first chunk's infohash."""
    return hashlib.sha1(_SWARM_TAG + first_chunk).digest()


@dataclass(frozen=True, slots=True)
class Geometry:
    """How a blob of ``length`` bytes is cut: pieces, and chunks of pieces."""

    length: int
    piece_length: int
    chunk_pieces: int

    @classmethod
    def for_size(cls, length: int) -> Geometry:
        piece_length = mi.piece_length_for(length)
        return cls(length, piece_length, chunk_pieces_for(piece_length))

    @property
    def num_pieces(self) -> int:
        return mi.piece_count(self.length, self.piece_length)

    @property
    def chunk_length(self) -> int:
        return self.chunk_pieces * self.piece_length

    @property
    def num_chunks(self) -> int:
        return max(1, mi.piece_count(self.length, self.chunk_length))

    def chunk_of(self, piece: int) -> int:
        return piece // self.chunk_pieces

    def chunk_first_piece(self, chunk: int) -> int:
        return chunk * self.chunk_pieces

    def chunk_piece_count(self, chunk: int) -> int:
        return min(self.chunk_pieces, self.num_pieces - chunk * self.chunk_pieces)

    def chunk_size(self, chunk: int) -> int:
        """Bytes of chunk ``chunk``."""
        start = chunk * self.chunk_length
        return max(0, min(self.chunk_length, self.length - start))

    def chunk_name(self, digest: str, chunk: int) -> str:
        return digest if self.num_chunks == 1 else f"{digest}.{chunk}"

    def pieces_through(self, chunks: int) -> int:
        """Pieces covered by the first ``chunks`` chunks."""
        return min(self.num_pieces, chunks * self.chunk_pieces)


def build_chunk(
    digest: str,
    geometry: Geometry,
    chunk: int,
    piece_hashes: bytes,
    trackers: Sequence[str] = (),
) -> Metainfo:
    """The torrent of chunk ``chunk`` from its pieces' SHA-1 digests."""
    return mi.build(
        geometry.chunk_name(digest, chunk),
        geometry.chunk_size(chunk),
        piece_hashes,
        trackers,
        piece_length=geometry.piece_length,
    )


@dataclass(eq=False)
class BlobMetainfo:
    """A blob's chunks known so far, in order (all of them once the proxy fetched the blob).

    It is what the peer engine needs of a torrent (``info_hash``, geometry, ``piece_hash``),
    for the whole blob: the hashes of pieces in chunks not known yet are not available, and
    :attr:`known_pieces` says how far they go.
    """

    digest: str
    geometry: Geometry
    trackers: tuple[str, ...] = ()
    chunks: list[Metainfo] = field(default_factory=list)
    _frames: list[bytes] = field(default_factory=list, repr=False)

    @classmethod
    def for_blob(cls, digest: str, length: int, trackers: Sequence[str] = ()) -> BlobMetainfo:
        if not 0 <= length <= mi.MAX_LENGTH:
            raise MetainfoError(f"blob length {length} out of range")
        return cls(digest, Geometry.for_size(length), tuple(dict.fromkeys(trackers)))

    # -- what the engine needs ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.digest

    @property
    def length(self) -> int:
        return self.geometry.length

    @property
    def piece_length(self) -> int:
        return self.geometry.piece_length

    @property
    def num_pieces(self) -> int:
        return self.geometry.num_pieces

    @property
    def info_hash(self) -> bytes:
        """The swarm's id (needs the first chunk)."""
        if not self.chunks:
            raise MetainfoError("the blob's first chunk is not known yet")
        first = self.chunks[0].info_hash
        return first if self.geometry.num_chunks == 1 else swarm_id(first)

    def piece_size(self, index: int) -> int:
        if not 0 <= index < self.num_pieces:
            raise IndexError(index)
        return min(self.piece_length, self.length - index * self.piece_length)

    def piece_hash(self, index: int) -> bytes:
        chunk = self.geometry.chunk_of(index)
        if chunk >= len(self.chunks):
            raise MetainfoError(f"the hash of piece {index} is not known yet")
        return self.chunks[chunk].piece_hash(index - self.geometry.chunk_first_piece(chunk))

    # -- chunks ----------------------------------------------------------------------------------

    @property
    def known_pieces(self) -> int:
        """Pieces whose hashes are known: ``[0, known_pieces)``."""
        return self.geometry.pieces_through(len(self.chunks))

    @property
    def complete(self) -> bool:
        return len(self.chunks) == self.geometry.num_chunks

    def add_chunk(self, chunk: Metainfo) -> int:
        """Append the next chunk after checking it belongs here; returns its index.

        The first chunk may bring another piece length than ours (a proxy of another version,
        a blob cached before the smallest piece changed): the blob then takes that geometry,
        if it is one the format allows (:func:`published_geometry`), and every later chunk
        must match it."""
        index = len(self.chunks)
        if index == 0 and chunk.piece_length != self.geometry.piece_length:
            self.geometry = published_geometry(self.geometry.length, chunk.piece_length)
        geometry = self.geometry
        if index >= geometry.num_chunks:
            raise MetainfoError("more chunks than the blob has")
        if chunk.name != geometry.chunk_name(self.digest, index):
            raise MetainfoError(f"chunk {index} is named {chunk.name!r}")
        if chunk.piece_length != geometry.piece_length or chunk.length != geometry.chunk_size(
            index
        ):
            raise MetainfoError(f"chunk {index} does not have this blob's geometry")
        if not chunk.private:
            raise MetainfoError("chunks are private torrents")
        chunk = chunk.with_trackers(self.trackers)
        self.chunks.append(chunk)
        self._frames.append(frame(chunk))
        return index

    def window_of(self, info_hash: bytes) -> tuple[int, int] | None:
        """``(first piece, piece count)`` of the chunk whose infohash this is, if known."""
        for index, chunk in enumerate(self.chunks):
            if chunk.info_hash == info_hash:
                return self.geometry.chunk_first_piece(index), chunk.num_pieces
        return None

    def with_trackers(self, trackers: Sequence[str]) -> BlobMetainfo:
        blob = BlobMetainfo(self.digest, self.geometry, tuple(dict.fromkeys(trackers)))
        for chunk in self.chunks:
            blob.add_chunk(chunk)
        return blob

    # -- frames ----------------------------------------------------------------------------------

    def frames(self, start: int = 0) -> bytes:
        """Chunks ``start..`` as frames (see the module docstring)."""
        return b"".join(self._frames[start:])

    @classmethod
    def from_frames(
        cls, digest: str, length: int, data: bytes, trackers: Sequence[str] | None = None
    ) -> BlobMetainfo:
        """A blob's frames (stored, or a proxy's whole answer); they must describe the whole
        blob. Its trackers are ``trackers``, or else those of the first chunk."""
        parser = FrameParser()
        chunks = parser.feed(data)
        if trackers is None:
            trackers = chunks[0].trackers if chunks else ()
        blob = cls.for_blob(digest, length, trackers)
        for chunk in chunks:
            blob.add_chunk(chunk)
        if parser.pending or not blob.complete:
            raise MetainfoError("the frames do not describe the whole blob")
        return blob


def frame(chunk: Metainfo) -> bytes:
    document = chunk.to_bytes()
    return b"%d:%s" % (len(document), document)


class FrameParser:
    """Incremental, bounded parser of a frame stream: feed bytes, get whole chunk torrents."""

    def __init__(self, *, max_frame: int = mi.MAX_METAINFO_BYTES) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Metainfo]:
        """Every frame completed by ``data``; raises :class:`MetainfoError` on a bad one."""
        self._buffer += data
        chunks = []
        while self._buffer:
            colon = self._buffer.find(b":", 0, MAX_FRAME_DIGITS + 1)
            if colon < 0:
                if len(self._buffer) > MAX_FRAME_DIGITS or not self._buffer.isdigit():
                    raise MetainfoError("not a chunk frame")
                break
            digits = bytes(self._buffer[:colon])
            if not digits.isdigit() or (len(digits) > 1 and digits.startswith(b"0")):
                raise MetainfoError("bad chunk frame length")
            size = int(digits)
            if size > self.max_frame:
                raise MetainfoError(f"chunk frame of {size} bytes exceeds {self.max_frame}")
            end = colon + 1 + size
            if len(self._buffer) < end:
                break
            chunks.append(mi.parse(bytes(self._buffer[colon + 1 : end])))
            del self._buffer[:end]
        return chunks


class ChunkBuilder:
    """Turns in-order piece hashes of a blob being fetched into its chunks (the proxy side).

    Every chunk but the last is published (added to :attr:`blob`) as soon as its last piece
    is hashed; the last one only by :meth:`finish`, which the fetcher calls once the whole
    blob's SHA-256 matched its digest: nobody ever holds all the chunks of a wrong blob."""

    def __init__(self, digest: str, length: int, trackers: Sequence[str] = ()) -> None:
        self.blob = BlobMetainfo.for_blob(digest, length, trackers)
        self._hashes = bytearray()
        self._last: Metainfo | None = None

    def piece(self, sha1: bytes) -> Metainfo | None:
        """The next piece's SHA-1; returns the chunk it completes and publishes, if any."""
        geometry = self.blob.geometry
        chunk = len(self.blob.chunks)
        if self._last is not None:
            raise MetainfoError("more pieces than the blob has")
        self._hashes += sha1
        if len(self._hashes) // 20 < geometry.chunk_piece_count(chunk):
            return None
        built = build_chunk(
            self.blob.digest, geometry, chunk, bytes(self._hashes), self.blob.trackers
        )
        self._hashes.clear()
        if chunk == geometry.num_chunks - 1:
            self._last = built  # held back until the blob is verified
            return None
        self.blob.add_chunk(built)
        return self.blob.chunks[-1]

    def finish(self) -> Metainfo | None:
        """After the last piece, with the blob verified: publish the last chunk (for an empty
        blob, its one empty chunk). Returns it, or None if there is nothing left to publish."""
        if self.blob.complete:
            return None
        last = self._last
        if last is None:
            if self.blob.num_pieces:
                raise MetainfoError("the blob's last pieces are missing")
            last = build_chunk(self.blob.digest, self.blob.geometry, 0, b"", self.blob.trackers)
        self._last = None
        self.blob.add_chunk(last)
        return self.blob.chunks[-1]
