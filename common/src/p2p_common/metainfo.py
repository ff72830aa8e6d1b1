"""Metainfo (.torrent) for one blob: deterministic to build, strict to parse.

A blob's metainfo is a single-file BitTorrent v1 torrent whose ``info`` dictionary
holds exactly ``length``, ``name`` (the blob digest), ``piece length``, ``pieces``
(SHA-1 of every piece) and ``private = 1`` (BEP 27: the infohash is a capability,
never gossiped over DHT or PEX). Everything in ``info`` follows from the content
and the piece length, and the piece length follows from the size
(:func:`piece_length_for`), so every proxy that builds the metainfo of one blob
lands in the same swarm. Trackers live outside ``info``: they do not change the
infohash.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2p_common import bencoding
from p2p_common.bencoding import BencodeError, BValue
from p2p_common.errors import ProtocolError

MIN_PIECE_LENGTH = 256 * 1024
"""Smallest piece length we build. A piece is what a node must hold whole (and verify) before it
can pass it on, so smaller pieces cross a swarm faster, at some CPU per byte; 64 KiB was
measured and not kept (docs/scale.md, finding 11)."""
MAX_PIECE_LENGTH = 16 * 1024 * 1024
"""Largest piece length we build."""
TARGET_MAX_PIECES = 8192
"""We grow the piece length (doubling) only when a blob would otherwise have more pieces."""

MAX_METAINFO_BYTES = 2 * 1024 * 1024
"""Largest metainfo document we parse."""
MAX_PARSE_PIECE_LENGTH = 64 * 1024 * 1024
MAX_LENGTH = 1 << 46
"""Largest blob we accept (64 TiB): a sanity bound, not a product limit."""
MAX_NAME_BYTES = 255
MAX_TRACKERS = 64


class MetainfoError(ProtocolError):
    """Metainfo that is malformed, inconsistent, or uses features we do not support."""


def piece_length_for(size: int) -> int:
    """The piece length for a blob of ``size`` bytes.

    256 KiB, doubled while the blob would have more than 8192 pieces, at most
    16 MiB: a 1 GiB blob gets 4096 pieces of 256 KiB, 4 GiB gets 8192 of 512 KiB,
    64 GiB gets 8192 of 8 MiB, anything larger 16 MiB pieces. DESIGN.md explains why
    pieces stay small.
    """
    if size < 0:
        raise ValueError("size cannot be negative")
    length = MIN_PIECE_LENGTH
    while length < MAX_PIECE_LENGTH and math.ceil(size / length) > TARGET_MAX_PIECES:
        length *= 2
    return length


def piece_count(length: int, piece_length: int) -> int:
    return (length + piece_length - 1) // piece_length


@dataclass(frozen=True, slots=True)
class Metainfo:
    """A parsed or built single-file v1 metainfo."""

    info_hash: bytes
    name: str
    length: int
    piece_length: int
    pieces: bytes
    """Concatenated 20-byte SHA-1 digests, one per piece."""
    trackers: tuple[str, ...]
    """Announce URLs in announce-list order, without duplicates."""
    private: bool
    info_bytes: bytes
    """The canonical bencoding of the info dictionary (its SHA-1 is ``info_hash``)."""

    @property
    def num_pieces(self) -> int:
        return len(self.pieces) // 20

    def piece_size(self, index: int) -> int:
        """Length of piece ``index`` (the last piece may be short)."""
        if not 0 <= index < self.num_pieces:
            raise IndexError(index)
        if index == self.num_pieces - 1:
            return self.length - index * self.piece_length
        return self.piece_length

    def piece_hash(self, index: int) -> bytes:
        return self.pieces[index * 20 : index * 20 + 20]

    def to_bytes(self) -> bytes:
        """The full metainfo document (``.torrent`` file).

        Written around the stored ``info`` bytes rather than re-encoded: the keys
        ``announce`` < ``announce-list`` < ``info`` are already in canonical order."""
        head = b""
        if self.trackers:
            head = bencoding.encode(
                {
                    b"announce": self.trackers[0].encode(),
                    b"announce-list": [[t.encode()] for t in self.trackers],
                }
            )[1:-1]
        return b"d" + head + b"4:info" + self.info_bytes + b"e"

    def with_trackers(self, trackers: Sequence[str]) -> Metainfo:
        """The same torrent announced to other trackers (same infohash)."""
        return Metainfo(
            self.info_hash,
            self.name,
            self.length,
            self.piece_length,
            self.pieces,
            _unique(trackers),
            self.private,
            self.info_bytes,
        )


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def build(
    name: str,
    length: int,
    pieces: bytes,
    trackers: Sequence[str] = (),
    *,
    piece_length: int | None = None,
    private: bool = True,
) -> Metainfo:
    """Build the metainfo of a single file from its piece hashes."""
    piece_length = piece_length_for(length) if piece_length is None else piece_length
    if piece_length <= 0 or piece_length % 16384:
        raise ValueError("piece length must be a positive multiple of 16 KiB")
    if len(pieces) != 20 * piece_count(length, piece_length):
        raise ValueError("wrong number of piece hashes for this length and piece length")
    _check_name(name.encode("utf-8"))
    info: dict[bytes, BValue] = {
        b"length": length,
        b"name": name.encode("utf-8"),
        b"piece length": piece_length,
        b"pieces": pieces,
    }
    if private:
        info[b"private"] = 1
    info_bytes = bencoding.encode(info)
    return Metainfo(
        info_hash=hashlib.sha1(info_bytes).digest(),
        name=name,
        length=length,
        piece_length=piece_length,
        pieces=pieces,
        trackers=_unique(trackers),
        private=private,
        info_bytes=info_bytes,
    )


class PieceHasher:
    """Incremental hashing of a stream: SHA-1 per piece and SHA-256 of the whole.

    Feed the blob in order with :meth:`update` as it arrives (e.g. from the origin),
    then :meth:`finish`. Large updates release the GIL inside hashlib.
    """

    def __init__(self, piece_length: int, *, whole: bool = True) -> None:
        """``whole=False`` skips the SHA-256 of the whole stream (for callers that compute it
        in parallel themselves); :meth:`finish` then reports an empty digest."""
        if piece_length <= 0:
            raise ValueError("piece length must be positive")  # 0 would loop forever
        self.piece_length = piece_length
        self.length = 0
        self._sha256 = hashlib.sha256() if whole else None
        self._piece = hashlib.sha1()
        self._in_piece = 0
        self._pieces: list[bytes] = []

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._sha256 is not None:
            self._sha256.update(view)
        self.length += len(view)
        while view:
            take = min(len(view), self.piece_length - self._in_piece)
            self._piece.update(view[:take])
            self._in_piece += take
            view = view[take:]
            if self._in_piece == self.piece_length:
                self._pieces.append(self._piece.digest())
                self._piece = hashlib.sha1()
                self._in_piece = 0

    def finish(self) -> tuple[bytes, str]:
        """Return (concatenated piece hashes, ``sha256:<hex>`` of everything)."""
        pieces = list(self._pieces)
        if self._in_piece:
            pieces.append(self._piece.digest())
        whole = "sha256:" + self._sha256.hexdigest() if self._sha256 is not None else ""
        return b"".join(pieces), whole


def hash_file(path: Path, piece_length: int, *, chunk: int = 1 << 20) -> tuple[bytes, str, int]:
    """Hash a file (blocking): (piece hashes, ``sha256:<hex>``, length)."""
    hasher = PieceHasher(piece_length)
    view = memoryview(bytearray(chunk))
    with path.open("rb") as handle:
        while True:
            n = handle.readinto(view)
            if not n:
                break
            hasher.update(view[:n])
    pieces, digest = hasher.finish()
    return pieces, digest, hasher.length


# --- parsing ------------------------------------------------------------------------------------


def _check_name(name: bytes) -> str:
    if not name or len(name) > MAX_NAME_BYTES:
        raise MetainfoError("name must be 1 to 255 bytes")
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise MetainfoError("name is not UTF-8") from None
    if "/" in text or "\\" in text or "\x00" in text or text in (".", ".."):
        raise MetainfoError("name must be a plain file name")
    return text


def _int(d: dict[bytes, BValue], key: bytes, low: int, high: int) -> int:
    value = d.get(key)
    if not isinstance(value, int) or not low <= value <= high:
        raise MetainfoError(f"{key.decode()!r} must be an integer in [{low}, {high}]")
    return value


def _trackers(doc: dict[bytes, BValue]) -> tuple[str, ...]:
    urls: list[str] = []
    announce_list = doc.get(b"announce-list")
    if announce_list is not None:
        if not isinstance(announce_list, list):
            raise MetainfoError("announce-list must be a list of lists")
        for tier in announce_list:
            if not isinstance(tier, list):
                raise MetainfoError("announce-list must be a list of lists")
            for url in tier:
                if not isinstance(url, bytes):
                    raise MetainfoError("announce URLs must be strings")
                urls.append(_url(url))
    announce = doc.get(b"announce")
    if announce is not None:
        if not isinstance(announce, bytes):
            raise MetainfoError("announce must be a string")
        urls.append(_url(announce))
    unique = _unique(urls)
    if len(unique) > MAX_TRACKERS:
        raise MetainfoError(f"more than {MAX_TRACKERS} trackers")
    return unique


def _url(raw: bytes) -> str:
    try:
        url = raw.decode("ascii")
    except UnicodeDecodeError:
        raise MetainfoError("tracker URL is not ASCII") from None
    if len(url) > 2048:
        raise MetainfoError("tracker URL is too long")
    return url


def parse(data: bytes | bytearray | memoryview) -> Metainfo:
    """Parse and validate untrusted metainfo. Raises :class:`MetainfoError`."""
    try:
        doc = bencoding.decode_dict(data, max_size=MAX_METAINFO_BYTES)
    except BencodeError as exc:
        raise MetainfoError(f"metainfo: {exc}") from None
    info = doc.get(b"info")
    if not isinstance(info, dict):
        raise MetainfoError("metainfo has no info dictionary")
    if b"files" in info:
        raise MetainfoError("multi-file torrents are not supported")
    if b"meta version" in info or b"file tree" in info:
        raise MetainfoError("BitTorrent v2 and hybrid torrents are not supported")
    raw_name = info.get(b"name")
    name = _check_name(raw_name if isinstance(raw_name, bytes) else b"")
    length = _int(info, b"length", 0, MAX_LENGTH)
    piece_length = _int(info, b"piece length", 1, MAX_PARSE_PIECE_LENGTH)
    if piece_length % 16384:
        raise MetainfoError("piece length must be a multiple of 16 KiB")
    pieces = info.get(b"pieces")
    if not isinstance(pieces, bytes) or len(pieces) != 20 * piece_count(length, piece_length):
        raise MetainfoError("pieces does not hold one SHA-1 per piece")
    private_value = info.get(b"private", 0)
    if not isinstance(private_value, int):
        raise MetainfoError("private must be an integer")
    info_bytes = bencoding.encode(info)
    return Metainfo(
        info_hash=hashlib.sha1(info_bytes).digest(),
        name=name,
        length=length,
        piece_length=piece_length,
        pieces=pieces,
        trackers=_trackers(doc),
        private=private_value == 1,
        info_bytes=info_bytes,
    )
