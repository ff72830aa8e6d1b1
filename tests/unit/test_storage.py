"""Piece storage (p2p_common.storage): one conformance suite for PieceFile and its in-memory twin,
then PieceFile's disk behaviour (sparse creation, resume, re-verification, publish)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2p_common import metainfo
from p2p_common.bitfield import Bitfield
from p2p_common.blobcache import PARTIAL_MAX_AGE, BlobCache
from p2p_common.blobinfo import ChunkBuilder
from p2p_common.errors import LocalError, RemoteError
from p2p_common.metainfo import Metainfo
from p2p_common.storage import (
    DigestMismatchError,
    MemoryPieceStore,
    PieceFile,
    PieceStore,
    StorageError,
    verify_piece,
)

UNIT = 16 * 1024
CONTENT = random.Random(42).randbytes(5 * UNIT + 777)
"""Six pieces of 16 KiB, the last one 777 bytes."""
DIGEST = "sha256:" + hashlib.sha256(CONTENT).hexdigest()


def meta_for(content: bytes, piece_length: int = UNIT) -> Metainfo:
    pieces = b"".join(
        hashlib.sha1(content[i : i + piece_length]).digest()
        for i in range(0, len(content), piece_length)
    )
    name = "sha256:" + hashlib.sha256(content).hexdigest()
    return metainfo.build(name, len(content), pieces, piece_length=piece_length)


META = meta_for(CONTENT)


def piece(index: int) -> bytes:
    return CONTENT[index * UNIT : (index + 1) * UNIT]


def bitfield(*indices: int) -> Bitfield:
    field = Bitfield(META.num_pieces)
    for index in indices:
        field.set(index)
    return field


# --- conformance: both stores --------------------------------------------------------------------


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PieceStore]:
    made: PieceStore
    if request.param == "file":
        made = PieceFile(META, tmp_path / "blob.part", tmp_path / "blob.bits")
    else:
        made = MemoryPieceStore(META)
    yield made
    made.close()


def test_a_new_store_has_no_pieces(store: PieceStore) -> None:
    assert store.metainfo is META
    assert store.have == Bitfield(META.num_pieces)


def test_written_pieces_read_back_and_set_their_bits(store: PieceStore) -> None:
    order = [3, 0, 5, 1]
    for index in order:
        store.write_piece(index, piece(index))
    assert store.have == bitfield(*order)
    for index in order:
        assert store.read(index * UNIT, META.piece_size(index)) == piece(index)


def test_a_complete_store_reads_any_range(store: PieceStore) -> None:
    for index in range(META.num_pieces):
        store.write_piece(index, memoryview(piece(index)))
    assert store.have.complete
    assert store.read(0, len(CONTENT)) == CONTENT
    assert store.read(UNIT - 10, 20) == CONTENT[UNIT - 10 : UNIT + 10]  # across a boundary
    assert store.read(len(CONTENT) - 5, 5) == CONTENT[-5:]
    assert store.read(7, 0) == b""


def test_rewriting_a_piece_is_idempotent(store: PieceStore) -> None:
    store.write_piece(2, bytearray(piece(2)))
    store.write_piece(2, piece(2))
    assert store.have == bitfield(2)
    assert store.read(2 * UNIT, UNIT) == piece(2)


def test_reading_past_the_end_is_a_storage_error(store: PieceStore) -> None:
    for index in range(META.num_pieces):
        store.write_piece(index, piece(index))
    with pytest.raises(StorageError):
        store.read(len(CONTENT) - 5, 10)
    with pytest.raises(StorageError):
        store.read(len(CONTENT) + 1, 1)


def test_fileno_if_any_reads_the_same_bytes(store: PieceStore) -> None:
    store.write_piece(1, piece(1))
    fd = store.fileno()
    if fd is None:
        assert isinstance(store, MemoryPieceStore)
    else:
        assert os.pread(fd, UNIT, UNIT) == piece(1)


# --- the in-memory twin --------------------------------------------------------------------------


def test_memory_store_with_content_is_complete() -> None:
    store = MemoryPieceStore(META, CONTENT)
    assert store.have.complete
    assert store.read(0, len(CONTENT)) == CONTENT


def test_memory_store_refuses_content_of_the_wrong_length() -> None:
    with pytest.raises(ValueError):
        MemoryPieceStore(META, CONTENT[:-1])


# --- verify_piece --------------------------------------------------------------------------------


def test_verify_piece_checks_length_and_sha1() -> None:
    assert verify_piece(META, 0, piece(0))
    assert verify_piece(META, 5, CONTENT[5 * UNIT :])
    assert not verify_piece(META, 0, piece(1))
    assert not verify_piece(META, 5, CONTENT[5 * UNIT :] + b"\x00")
    assert not verify_piece(META, 0, piece(0)[:-1])


# --- PieceFile on disk ---------------------------------------------------------------------------


def test_piece_file_grows_as_pieces_arrive_and_never_past_the_blob(tmp_path: Path) -> None:
    big = metainfo.build("big", 64 * 1024 * 1024, b"\x00" * 20 * 4096, piece_length=UNIT)
    path = tmp_path / "big.part"
    path.write_bytes(b"x" * (64 * 1024 * 1024 + 100))  # a longer leftover is cut back
    store = PieceFile(big, path)
    try:
        assert path.stat().st_size == 64 * 1024 * 1024
        assert store.have == Bitfield(big.num_pieces)
    finally:
        store.close()
    path.unlink()
    store = PieceFile(big, path)
    try:
        assert path.stat().st_size == 0  # nothing allocated up front
        store.write_piece(10, b"\x01" * UNIT)
        status = path.stat()
        assert status.st_size == 11 * UNIT
        assert status.st_blocks * 512 < 1024 * 1024  # the pieces before it are a hole
    finally:
        store.close()


def test_bitfield_is_persisted_and_resumed_after_reopening(tmp_path: Path) -> None:
    data, bits = tmp_path / "blob.part", tmp_path / "blob.bits"
    store = PieceFile(META, data, bits)
    for index in (0, 2, 5):
        store.write_piece(index, piece(index))
    store.close()
    assert bits.read_bytes() == bitfield(0, 2, 5).to_bytes()
    again = PieceFile(META, data, bits)
    try:
        assert again.have == bitfield(0, 2, 5)
        assert again.read(2 * UNIT, UNIT) == piece(2)
    finally:
        again.close()


def test_a_piece_corrupted_on_disk_is_not_trusted_on_reopening(tmp_path: Path) -> None:
    data, bits = tmp_path / "blob.part", tmp_path / "blob.bits"
    store = PieceFile(META, data, bits)
    for index in (1, 3):
        store.write_piece(index, piece(index))
    store.close()
    with data.open("r+b") as handle:
        handle.seek(3 * UNIT + 100)
        handle.write(bytes([CONTENT[3 * UNIT + 100] ^ 0xFF]))
    again = PieceFile(META, data, bits)
    try:
        assert again.have == bitfield(1)
        assert bits.read_bytes() == bitfield(1).to_bytes()
    finally:
        again.close()


def test_a_bit_set_for_a_piece_never_written_is_dropped(tmp_path: Path) -> None:
    data, bits = tmp_path / "blob.part", tmp_path / "blob.bits"
    bits.write_bytes(bitfield(0, 4).to_bytes())  # as if the data never reached the disk
    store = PieceFile(META, data, bits)
    try:
        assert store.have == Bitfield(META.num_pieces)
    finally:
        store.close()


@pytest.mark.parametrize("raw", [b"", b"\xff", b"\x00\x00\x00", b"\xff\xff"])
def test_a_bitfield_file_of_the_wrong_length_or_with_spare_bits_is_reset(
    tmp_path: Path, raw: bytes
) -> None:
    # Six pieces: one byte whose two low bits are spare. b"\xff" has them set.
    data, bits = tmp_path / "blob.part", tmp_path / "blob.bits"
    bits.write_bytes(raw)
    store = PieceFile(META, data, bits)
    assert store.have == Bitfield(META.num_pieces)
    store.write_piece(0, piece(0))
    store.close()
    again = PieceFile(META, data, bits)
    try:
        assert again.have == bitfield(0)  # progress after the reset survives a restart
    finally:
        again.close()


def test_progress_after_resetting_a_bitfield_with_spare_bits_survives_a_restart(
    tmp_path: Path,
) -> None:
    content = random.Random(7).randbytes(10 * UNIT)  # ten pieces: two bytes, six spare bits
    meta = meta_for(content)
    data, bits = tmp_path / "blob.part", tmp_path / "blob.bits"
    bits.write_bytes(b"\x00\x01")  # a spare bit of the second byte is set
    store = PieceFile(meta, data, bits)
    assert store.have == Bitfield(10)
    store.write_piece(0, content[:UNIT])  # rewrites the first byte only
    store.close()
    again = PieceFile(meta, data, bits)
    try:
        assert list(again.have) == [0]
    finally:
        again.close()


def test_without_a_bitfield_path_nothing_is_resumed(tmp_path: Path) -> None:
    data = tmp_path / "blob.part"
    store = PieceFile(META, data)
    store.write_piece(0, piece(0))
    store.close()
    again = PieceFile(META, data)
    try:
        assert again.have == Bitfield(META.num_pieces)
        assert again.read(0, UNIT) == piece(0)  # the data is still there
    finally:
        again.close()


def write_all(store: PieceFile) -> None:
    for index in range(META.num_pieces):
        store.write_piece(index, piece(index))


def test_publish_with_the_right_digest_renames_and_drops_the_bitfield(tmp_path: Path) -> None:
    data, bits = tmp_path / "blob.part", tmp_path / "blob.bits"
    destination = tmp_path / "blobs" / "sha256" / "abc"
    store = PieceFile(META, data, bits)
    write_all(store)
    inode = os.stat(data).st_ino
    store.publish(destination, DIGEST)
    try:
        assert destination.read_bytes() == CONTENT
        assert os.stat(destination).st_ino == inode  # renamed, not copied
        assert not data.exists()
        assert not bits.exists()
        assert store.path == destination
        assert store.read(0, 10) == CONTENT[:10]  # still open for seeding
    finally:
        store.close()


def open_descriptors_of(path: Path) -> list[str]:
    """This process's descriptors that point at ``path`` (deleted or not)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.removesuffix(" (deleted)") == str(path):
                found.append(target)
    return found


def test_drop_bitfield_after_publish_closes_the_deleted_bitfield_file(tmp_path: Path) -> None:
    data, bits = tmp_path / "blob.part", tmp_path / "blob.bits"
    destination = tmp_path / "blobs" / "sha256" / "abc"
    store = PieceFile(META, data, bits)
    write_all(store)
    store.drop_bitfield()  # before publishing: keeps the record
    assert open_descriptors_of(bits) == [str(bits)]
    store.publish(destination, DIGEST)
    assert open_descriptors_of(bits) == [f"{bits} (deleted)"]  # what a seeded blob kept
    try:
        store.drop_bitfield()
        assert open_descriptors_of(bits) == []
        store.flush()  # the engine's next round: nothing to write, no descriptor to write to
        store.drop_bitfield()  # idempotent
        assert store.read(0, 10) == CONTENT[:10]  # still seeding
    finally:
        store.close()
    assert open_descriptors_of(destination) == []


def test_publish_trusts_a_known_digest_without_rereading(tmp_path: Path) -> None:
    data, destination = tmp_path / "blob.part", tmp_path / "blob"
    store = PieceFile(META, data)
    write_all(store)
    store.publish(destination, DIGEST, known_digest=DIGEST)
    store.close()
    assert destination.read_bytes() == CONTENT


@pytest.mark.parametrize("known", [None, "sha256:" + "0" * 64])
def test_publish_with_a_wrong_digest_removes_the_files(tmp_path: Path, known: str | None) -> None:
    data, bits, destination = tmp_path / "blob.part", tmp_path / "blob.bits", tmp_path / "blob"
    store = PieceFile(META, data, bits)
    write_all(store)
    with pytest.raises(DigestMismatchError):
        store.publish(destination, "sha256:" + "1" * 64, known_digest=known)
    assert not data.exists()
    assert not bits.exists()
    assert not destination.exists()
    assert issubclass(DigestMismatchError, RemoteError)


def test_publish_before_every_piece_is_present_is_a_local_error(tmp_path: Path) -> None:
    data, destination = tmp_path / "blob.part", tmp_path / "blob"
    store = PieceFile(META, data)
    store.write_piece(0, piece(0))
    try:
        with pytest.raises(LocalError):
            store.publish(destination, DIGEST)
        assert data.exists()
        assert not destination.exists()
    finally:
        store.close()


def test_opening_a_complete_blob_for_seeding(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(CONTENT)
    store = PieceFile(META, path, complete=True)
    try:
        assert store.have.complete
        assert store.read(4 * UNIT, UNIT) == piece(4)
        with pytest.raises(StorageError):
            store.write_piece(0, piece(0))  # read-only
    finally:
        store.close()


@pytest.mark.parametrize("size", [len(CONTENT) - 1, len(CONTENT) + 1, 0])
def test_opening_a_complete_blob_of_the_wrong_size_is_a_storage_error(
    tmp_path: Path, size: int
) -> None:
    path = tmp_path / "blob"
    path.write_bytes((CONTENT * 2)[:size])
    with pytest.raises(StorageError):
        PieceFile(META, path, complete=True)


def test_opening_a_missing_complete_blob_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        PieceFile(META, tmp_path / "missing", complete=True)


def test_discard_removes_both_files_and_close_twice_is_harmless(tmp_path: Path) -> None:
    data, bits = tmp_path / "blob.part", tmp_path / "blob.bits"
    store = PieceFile(META, data, bits)
    store.write_piece(0, piece(0))
    store.discard()
    store.close()
    assert not data.exists()
    assert not bits.exists()


def test_the_cache_scan_drops_what_cannot_be_resumed(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    partial = tmp_path / "partial"
    keep = [partial / f"sha256-{'a' * 64}{suffix}" for suffix in (".data", ".bits", ".chunks")]
    old = [partial / f"sha256-{'b' * 64}{suffix}" for suffix in (".data", ".bits", ".chunks")]
    stream = partial / f"sha256-{'c' * 64}.stream"
    orphan = partial / f"sha256-{'d' * 64}.bits"
    for path in (*keep, *old, stream, orphan):
        path.write_bytes(b"x")
    ancient = time.time() - PARTIAL_MAX_AGE - 60
    os.utime(old[0], (ancient, ancient))
    cache.scan()
    assert sorted(partial.iterdir()) == sorted(keep)


def test_stored_chunks_keep_their_trackers(tmp_path: Path) -> None:
    """An agent reseeds its cache from the stored chunks: they must still say where to
    announce (the proxy's trackers when the blob came), or nobody finds the agent's copy."""
    content = bytes(range(256)) * 5000
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    builder = ChunkBuilder(digest, len(content), ["http://t1/announce", "http://t2/announce"])
    piece = builder.blob.piece_length
    for start in range(0, len(content), piece):
        builder.piece(hashlib.sha1(content[start : start + piece]).digest())
    builder.finish()
    cache = BlobCache(tmp_path / "data")
    source = tmp_path / "blob"
    source.write_bytes(content)
    cache.adopt(source, digest, builder.blob)
    loaded = cache.load_metainfo(digest)
    assert loaded is not None
    assert loaded.trackers == ("http://t1/announce", "http://t2/announce")
    assert loaded.info_hash == builder.blob.info_hash
