"""Chunked blobs (p2p_common.blobinfo): geometry, chunk torrents, swarm ids, the frame stream."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common import metainfo
from p2p_common.blobinfo import (
    BlobMetainfo,
    ChunkBuilder,
    FrameParser,
    Geometry,
    build_chunk,
    chunk_pieces_for,
    frame,
    published_geometry,
    swarm_id,
)
from p2p_common.metainfo import MIN_PIECE_LENGTH, Metainfo, MetainfoError, piece_length_for

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
PIECE = MIN_PIECE_LENGTH  # the blobs here are small enough for the smallest pieces
CHUNK_PIECES = chunk_pieces_for(PIECE)
CHUNK = CHUNK_PIECES * PIECE


def content_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def digest_of(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


def chunked(content: bytes, trackers: tuple[str, ...] = ()) -> BlobMetainfo:
    """What a proxy publishes while it fetches ``content``, piece by piece."""
    builder = ChunkBuilder(digest_of(content), len(content), trackers)
    step = piece_length_for(len(content))
    for start in range(0, len(content), step):
        builder.piece(hashlib.sha1(content[start : start + step]).digest())
    builder.finish()
    return builder.blob


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=256 * GIB))
def test_chunks_tile_the_blob_exactly(length: int) -> None:
    geometry = Geometry.for_size(length)
    assert geometry.piece_length == piece_length_for(length)
    sizes = [geometry.chunk_size(k) for k in range(geometry.num_chunks)]
    assert sum(sizes) == length
    assert all(size % geometry.piece_length == 0 for size in sizes[:-1])
    pieces = [geometry.chunk_piece_count(k) for k in range(geometry.num_chunks)]
    assert sum(pieces) == geometry.num_pieces
    assert geometry.num_chunks == max(1, -(-geometry.num_pieces // geometry.chunk_pieces))
    if geometry.num_pieces:
        last = geometry.num_pieces - 1
        assert geometry.chunk_first_piece(geometry.chunk_of(last)) <= last


def test_a_blob_of_one_chunk_is_exactly_the_whole_blob_torrent() -> None:
    content = content_of(3 * PIECE + 17)
    blob = chunked(content, ("http://t/announce",))
    whole = metainfo.build(
        digest_of(content),
        len(content),
        b"".join(
            hashlib.sha1(content[i : i + PIECE]).digest() for i in range(0, len(content), PIECE)
        ),
        ("http://t/announce",),
    )
    assert blob.complete
    assert len(blob.chunks) == 1
    assert blob.chunks[0].info_bytes == whole.info_bytes
    assert blob.info_hash == whole.info_hash  # the swarm id is the torrent's own infohash


def test_chunks_are_standard_torrents_of_their_part_of_the_blob() -> None:
    content = content_of(2 * CHUNK + 3 * PIECE + 5)
    blob = chunked(content)
    assert len(blob.chunks) == 3
    assert blob.complete
    for k, chunk in enumerate(blob.chunks):
        part = content[k * CHUNK : (k + 1) * CHUNK]
        assert chunk.name == f"{blob.digest}.{k}"
        assert chunk.length == len(part)
        again = metainfo.parse(chunk.to_bytes())
        assert again.info_hash == chunk.info_hash
        assert again.private
        for local in range(chunk.num_pieces):
            piece = part[local * PIECE : (local + 1) * PIECE]
            assert hashlib.sha1(piece).digest() == chunk.piece_hash(local)
    # the blob's piece i is chunk i // 16's piece i % 16
    for index in range(blob.num_pieces):
        piece = content[index * PIECE : (index + 1) * PIECE]
        assert blob.piece_hash(index) == hashlib.sha1(piece).digest()
        assert blob.piece_size(index) == len(piece)
    assert blob.info_hash == swarm_id(blob.chunks[0].info_hash) != blob.chunks[0].info_hash
    assert blob.window_of(blob.chunks[2].info_hash) == (2 * CHUNK_PIECES, 4)
    assert blob.window_of(b"x" * 20) is None


def test_the_chunks_follow_from_the_content_alone() -> None:
    content = content_of(CHUNK + 1)
    one, two = chunked(content, ("http://a/announce",)), chunked(content, ("http://b/x",))
    assert [c.info_hash for c in one.chunks] == [c.info_hash for c in two.chunks]
    assert one.info_hash == two.info_hash
    assert chunked(content_of(CHUNK + 1, seed=1)).info_hash != one.info_hash


def test_hashes_of_chunks_not_published_yet_are_not_available() -> None:
    content = content_of(2 * CHUNK)
    builder = ChunkBuilder(digest_of(content), len(content))
    for index in range(CHUNK_PIECES):
        published = builder.piece(
            hashlib.sha1(content[index * PIECE : (index + 1) * PIECE]).digest()
        )
        assert (published is not None) == (index == CHUNK_PIECES - 1)
    blob = builder.blob
    assert blob.known_pieces == CHUNK_PIECES
    assert not blob.complete
    assert blob.piece_hash(CHUNK_PIECES - 1)
    with pytest.raises(MetainfoError):
        blob.piece_hash(CHUNK_PIECES)


def test_an_empty_blob_has_one_empty_chunk() -> None:
    blob = chunked(b"")
    assert blob.complete
    assert blob.num_pieces == 0
    assert blob.chunks[0].length == 0


def test_a_chunk_that_does_not_belong_is_refused() -> None:
    content = content_of(2 * CHUNK)
    good = chunked(content)
    blob = BlobMetainfo.for_blob(good.digest, len(content))
    with pytest.raises(MetainfoError, match="named"):
        blob.add_chunk(good.chunks[1])  # out of order
    other = chunked(content_of(2 * CHUNK, seed=3))
    with pytest.raises(MetainfoError, match="named"):
        blob.add_chunk(other.chunks[0])  # another blob's
    short = build_chunk(good.digest, Geometry(len(content), PIECE, 8), 0, b"\0" * 160)
    with pytest.raises(MetainfoError, match="geometry"):
        blob.add_chunk(short)
    public = metainfo.build(
        good.chunks[0].name,
        good.chunks[0].length,
        good.chunks[0].pieces,
        piece_length=PIECE,
        private=False,
    )
    with pytest.raises(MetainfoError, match="private"):
        blob.add_chunk(public)
    blob.add_chunk(good.chunks[0])
    blob.add_chunk(good.chunks[1])
    with pytest.raises(MetainfoError, match="more chunks"):
        blob.add_chunk(good.chunks[1])


def chunks_of(content: bytes, piece_length: int) -> list[Metainfo]:
    """The chunks of ``content`` cut into pieces of ``piece_length`` (what a proxy whose
    smallest piece differs from ours would publish)."""
    digest = digest_of(content)
    geometry = Geometry(len(content), piece_length, chunk_pieces_for(piece_length))
    chunks = []
    for k in range(geometry.num_chunks):
        first = geometry.chunk_first_piece(k)
        hashes = b"".join(
            hashlib.sha1(content[i * piece_length : (i + 1) * piece_length]).digest()
            for i in range(first, first + geometry.chunk_piece_count(k))
        )
        chunks.append(build_chunk(digest, geometry, k, hashes))
    return chunks


@pytest.mark.parametrize(
    ("piece_length", "chunks", "chunk_pieces"), [(64 * KIB, 3, 64), (MIB, 1, 16)]
)
def test_chunks_of_another_piece_length_are_taken_with_their_geometry(
    piece_length: int, chunks: int, chunk_pieces: int
) -> None:
    """A proxy of another version (64 KiB pieces were tried, docs/scale.md finding 11), or a
    blob cached by one: the first chunk sets the geometry, and the pieces verify against it."""
    content = content_of(9 * MIB + 5)
    published = chunks_of(content, piece_length)
    assert len(published) == chunks
    blob = BlobMetainfo.for_blob(digest_of(content), len(content))
    assert blob.piece_length == piece_length_for(len(content))  # ours, until a chunk says
    for chunk in published:
        blob.add_chunk(chunk)
    assert blob.complete
    assert (blob.piece_length, blob.geometry.chunk_pieces) == (piece_length, chunk_pieces)
    last = blob.num_pieces - 1
    assert blob.piece_hash(last) == hashlib.sha1(content[last * piece_length :]).digest()


def test_a_later_chunk_cannot_change_the_geometry() -> None:
    content = content_of(2 * CHUNK)
    good = chunked(content)
    blob = BlobMetainfo.for_blob(good.digest, len(content))
    blob.add_chunk(good.chunks[0])
    other_second = chunks_of(content, 64 * KIB)[1]
    with pytest.raises(MetainfoError, match="geometry"):
        blob.add_chunk(other_second)


@pytest.mark.parametrize(
    ("length", "piece_length", "problem"),
    [
        (MIB, 48 * KIB, "not one a blob may have"),
        (MIB, 8 * KIB, "not one a blob may have"),
        (MIB, 32 * MIB, "not one a blob may have"),
        (2 * GIB, 16 * KIB, "too many"),
    ],
)
def test_a_first_chunk_with_a_piece_length_the_format_forbids_is_refused(
    length: int, piece_length: int, problem: str
) -> None:
    with pytest.raises(MetainfoError, match=problem):
        published_geometry(length, piece_length)


def test_frames_round_trip_and_stored_frames_must_be_whole() -> None:
    content = content_of(3 * CHUNK - 1)
    blob = chunked(content, ("http://t/announce",))
    again = BlobMetainfo.from_frames(blob.digest, blob.length, blob.frames(), blob.trackers)
    assert [c.info_bytes for c in again.chunks] == [c.info_bytes for c in blob.chunks]
    with pytest.raises(MetainfoError):
        BlobMetainfo.from_frames(blob.digest, blob.length, blob.frames()[:-1])
    with pytest.raises(MetainfoError):
        BlobMetainfo.from_frames(blob.digest, blob.length, frame(blob.chunks[0]))
    assert blob.frames(2) == frame(blob.chunks[2])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_frames_parse_the_same_however_the_stream_is_split(data: st.DataObject) -> None:
    blob = chunked(content_of(2 * CHUNK + PIECE, seed=7))
    stream = blob.frames()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = FrameParser()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += parser.feed(stream[start:end])
    assert [c.info_hash for c in got] == [c.info_hash for c in blob.chunks]
    assert parser.pending == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_frames_are_refused_or_wait_for_more_never_crash(junk: bytes) -> None:
    parser = FrameParser(max_frame=4096)
    try:
        parser.feed(junk)
    except MetainfoError:
        return
    assert parser.pending <= len(junk)


@pytest.mark.parametrize(
    ("stream", "problem"),
    [
        (b"x", "not a chunk frame"),
        (b"123456789:", "not a chunk frame"),
        (b"05:hello", "bad chunk frame length"),
        (b"99999999:", "exceeds"),
        (b"5:hello", "metainfo"),
    ],
)
def test_bad_frames_say_what_is_wrong(stream: bytes, problem: str) -> None:
    with pytest.raises(MetainfoError, match=problem):
        FrameParser().feed(stream)


def test_chunk_counts_stay_bounded_for_large_blobs() -> None:
    for size in (GIB, 4 * GIB, 64 * GIB, 1 << 46):
        geometry = Geometry.for_size(size)
        assert geometry.num_chunks <= max(512, -(-size // (16 * MIB * 16)))
        assert geometry.chunk_length >= 4 * MIB


@given(st.integers(min_value=0, max_value=64 * GIB))
def test_chunks_hold_4MiB_while_pieces_are_small_and_16_pieces_beyond(size: int) -> None:
    geometry = Geometry.for_size(size)
    if geometry.piece_length <= 256 * KIB:
        assert geometry.chunk_length == 4 * MIB
    else:
        assert geometry.chunk_pieces == 16
    assert geometry.num_chunks <= 512
