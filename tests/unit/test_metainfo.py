"""Metainfo (p2p_common.metainfo): piece length rule, deterministic build, strict parse, hashing."""

from __future__ import annotations

import array
import hashlib
import itertools
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common import bencoding, metainfo
from p2p_common.bencoding import BValue
from p2p_common.errors import ProtocolError
from p2p_common.metainfo import Metainfo, MetainfoError, PieceHasher, hash_file, piece_length_for

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
UNIT = 16 * KIB


def sha1_pieces(content: bytes, piece_length: int) -> bytes:
    return b"".join(
        hashlib.sha1(content[i : i + piece_length]).digest()
        for i in range(0, len(content), piece_length)
    )


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def name_of(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


def build(
    content: bytes,
    trackers: tuple[str, ...] = (),
    *,
    piece_length: int = UNIT,
    private: bool = True,
    name: str | None = None,
) -> Metainfo:
    return metainfo.build(
        name or name_of(content),
        len(content),
        sha1_pieces(content, piece_length),
        trackers,
        piece_length=piece_length,
        private=private,
    )


CONTENT = blob(3 * UNIT + 1000)
"""Four pieces of 16 KiB, the last one 1000 bytes."""


def good_info() -> dict[bytes, BValue]:
    return {
        b"length": len(CONTENT),
        b"name": name_of(CONTENT).encode(),
        b"piece length": UNIT,
        b"pieces": sha1_pieces(CONTENT, UNIT),
        b"private": 1,
    }


def document(info: BValue, **top: BValue) -> bytes:
    doc: dict[bytes, BValue] = {b"info": info}
    doc.update({key.replace("_", "-").encode(): value for key, value in top.items()})
    return bencoding.encode(doc)


def with_info(**changes: BValue | None) -> bytes:
    info = good_info()
    for key, value in changes.items():
        bkey = key.replace("_", " ").encode()
        if value is None:
            del info[bkey]
        else:
            info[bkey] = value
    return document(info)


# --- piece_length_for ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, 256 * KIB),
        (1, 256 * KIB),
        (1 * GIB, 256 * KIB),  # 4096 pieces
        (2 * GIB, 256 * KIB),  # exactly 8192 pieces: no doubling
        (2 * GIB + 1, 512 * KIB),
        (4 * GIB, 512 * KIB),
        (4 * GIB + 1, 1 * MIB),
        (8 * GIB, 1 * MIB),
        (8 * GIB + 1, 2 * MIB),
        (16 * GIB, 2 * MIB),
        (16 * GIB + 1, 4 * MIB),
        (32 * GIB, 4 * MIB),
        (32 * GIB + 1, 8 * MIB),
        (64 * GIB, 8 * MIB),
        (64 * GIB + 1, 16 * MIB),
        (128 * GIB, 16 * MIB),
        (128 * GIB + 1, 16 * MIB),  # more than 8192 pieces, but 16 MiB is the ceiling
        (1 << 46, 16 * MIB),
    ],
)
def test_piece_length_doubles_from_256KiB_while_over_8192_pieces(size: int, expected: int) -> None:
    assert piece_length_for(size) == expected


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=1 << 46))
def test_piece_length_is_the_smallest_doubling_with_at_most_8192_pieces(size: int) -> None:
    length = piece_length_for(size)
    doublings = math.log2(length // (256 * KIB))
    assert doublings.is_integer()
    assert 256 * KIB <= length <= 16 * MIB
    assert length == 16 * MIB or math.ceil(size / length) <= 8192
    assert length == 256 * KIB or math.ceil(size / (length // 2)) > 8192


def test_piece_length_for_a_negative_size_is_an_error() -> None:
    with pytest.raises(ValueError):
        piece_length_for(-1)


# --- build ---------------------------------------------------------------------------------------


def test_build_picks_the_piece_length_from_the_size() -> None:
    content = blob(300 * KIB)
    built = metainfo.build(name_of(content), len(content), sha1_pieces(content, 256 * KIB))
    assert built.piece_length == 256 * KIB
    assert built.num_pieces == 2


def test_info_dictionary_is_exactly_the_documented_five_keys_in_canonical_order() -> None:
    built = build(CONTENT)
    name = name_of(CONTENT).encode()
    pieces = sha1_pieces(CONTENT, UNIT)
    expected = (
        b"d6:lengthi" + str(len(CONTENT)).encode() + b"e"
        b"4:name" + str(len(name)).encode() + b":" + name
        + b"12:piece lengthi16384e"
        b"6:pieces" + str(len(pieces)).encode() + b":" + pieces
        + b"7:privatei1ee"
    )  # fmt: skip
    assert built.info_bytes == expected
    assert built.info_hash == hashlib.sha1(expected).digest()


def test_same_content_gives_the_same_infohash_whatever_the_trackers() -> None:
    a = build(CONTENT, ("http://t1/announce",))
    b = build(CONTENT, ("http://t2/announce", "http://t3/announce"))
    c = build(CONTENT)
    assert a.info_hash == b.info_hash == c.info_hash
    assert a.info_bytes == b.info_bytes
    assert a.with_trackers(["http://t9/announce"]).info_hash == a.info_hash


def test_different_content_name_or_privacy_gives_a_different_infohash() -> None:
    base = build(CONTENT)
    assert build(blob(len(CONTENT), seed=1), name=name_of(CONTENT)).info_hash != base.info_hash
    assert build(CONTENT, name="other").info_hash != base.info_hash
    assert build(CONTENT, private=False).info_hash != base.info_hash


def test_infohash_is_the_sha1_of_the_info_bytes_in_the_document() -> None:
    built = build(CONTENT, ("http://t1/announce", "http://t2/announce"))
    doc = built.to_bytes()
    start = doc.index(b"4:info") + len(b"4:info")
    info = doc[start:-1]  # "info" sorts after "announce" and "announce-list": last key
    assert hashlib.sha1(info).digest() == built.info_hash
    assert bencoding.decode(info) == bencoding.decode(built.info_bytes)


def test_trackers_are_deduplicated_in_order() -> None:
    built = build(CONTENT, ("http://b", "http://a", "http://b"))
    assert built.trackers == ("http://b", "http://a")
    doc = bencoding.decode_dict(built.to_bytes())
    assert doc[b"announce"] == b"http://b"
    assert doc[b"announce-list"] == [[b"http://b"], [b"http://a"]]


def test_a_document_without_trackers_has_no_announce_keys() -> None:
    assert set(bencoding.decode_dict(build(CONTENT).to_bytes())) == {b"info"}


@pytest.mark.parametrize("piece_length", [0, UNIT + 1, 3 * 1000])
def test_build_refuses_a_piece_length_that_is_not_a_multiple_of_16KiB(piece_length: int) -> None:
    with pytest.raises(ValueError):
        metainfo.build("x", 10, b"\x00" * 20, piece_length=piece_length)


@pytest.mark.parametrize("pieces", [b"", b"\x00" * 19, b"\x00" * 40])
def test_build_refuses_the_wrong_number_of_piece_hashes(pieces: bytes) -> None:
    with pytest.raises(ValueError):
        metainfo.build("x", UNIT, pieces, piece_length=UNIT)


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", "a\x00b", "a\\b", "x" * 256])
def test_build_refuses_names_that_are_not_plain_file_names(name: str) -> None:
    with pytest.raises(MetainfoError):
        metainfo.build(name, 1, sha1_pieces(b"x", UNIT), piece_length=UNIT)


def test_piece_geometry_with_a_short_last_piece() -> None:
    built = build(CONTENT)
    assert built.num_pieces == 4
    assert [built.piece_size(i) for i in range(4)] == [UNIT, UNIT, UNIT, 1000]
    assert built.piece_hash(3) == hashlib.sha1(CONTENT[3 * UNIT :]).digest()
    for index in (-1, 4):
        with pytest.raises(IndexError):
            built.piece_size(index)


# --- parse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "built",
    [
        build(CONTENT),
        build(CONTENT, ("http://tracker-0:6969/announce", "udp://t.example:80")),
        build(CONTENT, private=False),
        build(blob(2 * UNIT)),
        build(b""),
        build(blob(40 * KIB), piece_length=32 * KIB, name="blob"),
    ],
    ids=["plain", "trackers", "public", "exact-multiple", "empty", "32KiB-pieces"],
)
def test_parse_of_to_bytes_round_trips(built: Metainfo) -> None:
    assert metainfo.parse(built.to_bytes()) == built


def test_parse_keeps_unknown_info_keys_in_the_infohash() -> None:
    info = good_info()
    info[b"source"] = b"somewhere"
    doc = document(info)
    parsed = metainfo.parse(doc)
    start = doc.index(b"4:info") + len(b"4:info")
    assert parsed.info_hash == hashlib.sha1(doc[start:-1]).digest()
    assert parsed.info_hash != build(CONTENT).info_hash


def test_parse_reads_private_flag_and_tracker_tiers() -> None:
    doc = document(
        good_info() | {b"private": 0},
        announce=b"http://c",
        announce_list=[[b"http://a"], [b"http://b", b"http://a"]],
    )
    parsed = metainfo.parse(doc)
    assert not parsed.private
    assert parsed.trackers == ("http://a", "http://b", "http://c")


def test_exactly_64_trackers_are_accepted_and_65_refused() -> None:
    urls = [f"http://t{i}/announce".encode() for i in range(65)]
    ok = metainfo.parse(document(good_info(), announce_list=[[u] for u in urls[:64]]))
    assert len(ok.trackers) == 64
    duplicates: list[BValue] = [[u] for u in [*urls[:64], urls[0]]]
    assert len(metainfo.parse(document(good_info(), announce_list=duplicates)).trackers) == 64
    with pytest.raises(MetainfoError, match="trackers"):
        metainfo.parse(document(good_info(), announce_list=[[u] for u in urls]))


def test_the_unmodified_test_document_parses() -> None:
    # The rejection cases below each change one thing in this document.
    assert metainfo.parse(with_info()) == build(CONTENT)


def test_a_255_byte_name_is_accepted() -> None:
    assert metainfo.parse(with_info(name=b"n" * 255)).name == "n" * 255


REJECTED = {
    "garbage": b"not bencoding",
    "empty": b"",
    "top-level-list": b"le",
    "no-info": bencoding.encode({b"announce": b"http://a"}),
    "info-list": document([b"x"]),
    "info-bytes": document(b"info"),
    "info-int": document(1),
    "multi-file": with_info(files=[{b"length": 1, b"path": [b"a"]}]),
    "v2": with_info(meta_version=2),
    "hybrid": with_info(file_tree={b"a": {}}),
    "pieces-short": with_info(pieces=sha1_pieces(CONTENT, UNIT)[:-1]),
    "pieces-extra-hash": with_info(pieces=sha1_pieces(CONTENT, UNIT) + b"\x00" * 20),
    "pieces-missing": with_info(pieces=None),
    "pieces-int": with_info(pieces=5),
    "piece-length-odd": with_info(piece_length=UNIT + 1, length=UNIT + 1, pieces=b"\x00" * 20),
    "piece-length-zero": with_info(piece_length=0),
    "piece-length-negative": with_info(piece_length=-UNIT),
    "piece-length-huge": with_info(piece_length=128 * MIB, pieces=b"\x00" * 20),
    "piece-length-bytes": with_info(piece_length=b"16384"),
    "length-negative": with_info(length=-1),
    "length-huge": with_info(length=(1 << 46) + 1),
    "length-missing": with_info(length=None),
    "length-bytes": with_info(length=b"1"),
    "name-missing": with_info(name=None),
    "name-empty": with_info(name=b""),
    "name-slash": with_info(name=b"a/b"),
    "name-backslash": with_info(name=b"a\\b"),
    "name-dotdot": with_info(name=b".."),
    "name-dot": with_info(name=b"."),
    "name-nul": with_info(name=b"a\x00b"),
    "name-not-utf8": with_info(name=b"\xff\xfe"),
    "name-too-long": with_info(name=b"n" * 256),
    "name-list": with_info(name=[b"a"]),
    "private-bytes": with_info(private=b"1"),
    "announce-int": document(good_info(), announce=1),
    "announce-not-ascii": document(good_info(), announce="http://t\u00e9".encode()),
    "announce-too-long": document(good_info(), announce=b"http://" + b"a" * 2048),
    "announce-list-flat": document(good_info(), announce_list=[b"http://a"]),
    "announce-list-bytes": document(good_info(), announce_list=b"http://a"),
    "announce-list-int-url": document(good_info(), announce_list=[[1]]),
    "unsorted-keys": b"d4:infod4:name1:x6:lengthi1eee",
    "trailing-data": build(CONTENT).to_bytes() + b"x",
    "oversize": document(good_info(), comment=b"x" * (2 * MIB)),
}


@pytest.mark.parametrize("data", REJECTED.values(), ids=REJECTED.keys())
def test_parse_rejects_invalid_or_unsupported_metainfo(data: bytes) -> None:
    with pytest.raises(MetainfoError):
        metainfo.parse(data)


def test_metainfo_error_is_a_protocol_error() -> None:
    assert issubclass(MetainfoError, ProtocolError)


# --- hostile input -------------------------------------------------------------------------------

bvalues: st.SearchStrategy[BValue] = st.recursive(
    st.integers(min_value=-(2**70), max_value=2**70) | st.binary(max_size=30),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.binary(max_size=12), children, max_size=4)
    ),
    max_leaves=10,
)


def parse_or_metainfo_error(data: bytes) -> Metainfo | None:
    try:
        parsed = metainfo.parse(data)
    except MetainfoError:
        return None
    assert parsed.info_hash == hashlib.sha1(parsed.info_bytes).digest()
    assert len(parsed.pieces) == 20 * parsed.num_pieces
    return parsed


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_only_ever_raises_metainfo_error(data: bytes) -> None:
    parse_or_metainfo_error(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_byte_mutations_of_valid_metainfo_only_raise_metainfo_error(data: st.DataObject) -> None:
    doc = bytearray(build(blob(2 * UNIT + 7), ("http://t/announce",)).to_bytes())
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        position = data.draw(st.integers(min_value=0, max_value=len(doc) - 1))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.integers(min_value=0, max_value=255))
        if action == "set":
            doc[position] = byte
        elif action == "insert":
            doc.insert(position, byte)
        else:
            del doc[position]
    parse_or_metainfo_error(bytes(doc))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(
        [b"length", b"name", b"piece length", b"pieces", b"private", b"files", b"meta version"]
    ),
    st.sampled_from([b"info", b"announce", b"announce-list"]),
    bvalues,
    st.booleans(),
)
def test_structured_mutations_of_valid_metainfo_only_raise_metainfo_error(
    info_key: bytes, top_key: bytes, value: BValue, in_info: bool
) -> None:
    info = good_info()
    doc: dict[bytes, BValue] = {b"info": info, b"announce": b"http://t/announce"}
    if in_info:
        info[info_key] = value
    else:
        doc[top_key] = value
    parse_or_metainfo_error(bencoding.encode(doc))


# --- PieceHasher and hash_file -------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=600),
    st.integers(min_value=1, max_value=64),
    st.lists(st.integers(min_value=0, max_value=600), max_size=10),
)
def test_piece_hasher_over_any_chunking_equals_hashing_the_whole(
    content: bytes, piece_length: int, cuts: list[int]
) -> None:
    hasher = PieceHasher(piece_length)
    bounds = sorted({0, len(content), *(c for c in cuts if c <= len(content))})
    for start, end in itertools.pairwise(bounds):
        hasher.update(content[start:end])
    hasher.update(b"")
    pieces, digest = hasher.finish()
    assert pieces == sha1_pieces(content, piece_length)
    assert digest == "sha256:" + hashlib.sha256(content).hexdigest()
    assert hasher.length == len(content)


def test_piece_hasher_on_real_piece_sizes_with_uneven_chunks() -> None:
    content = blob(5 * UNIT + 123, seed=7)
    hasher = PieceHasher(UNIT)
    rnd = random.Random(1)
    offset = 0
    while offset < len(content):
        step = rnd.randint(1, 3 * UNIT)
        hasher.update(memoryview(content)[offset : offset + step])
        offset += step
    assert hasher.finish() == (
        sha1_pieces(content, UNIT),
        "sha256:" + hashlib.sha256(content).hexdigest(),
    )


def test_piece_hasher_accepts_buffers_with_wide_items() -> None:
    words = array.array("H", range(5000))
    hasher = PieceHasher(UNIT)
    hasher.update(memoryview(words))
    assert hasher.finish()[0] == sha1_pieces(words.tobytes(), UNIT)
    assert hasher.length == len(words.tobytes())


def test_piece_hasher_of_nothing_has_no_pieces() -> None:
    assert PieceHasher(UNIT).finish() == (b"", "sha256:" + hashlib.sha256(b"").hexdigest())


@pytest.mark.parametrize("piece_length", [0, -1])
def test_piece_hasher_refuses_a_piece_length_that_is_not_positive(piece_length: int) -> None:
    with pytest.raises(ValueError):
        PieceHasher(piece_length)


@pytest.mark.parametrize("size", [0, 1, UNIT, 3 * UNIT + 5])
@pytest.mark.parametrize("chunk", [1000, UNIT, 1 << 20])
def test_hash_file_equals_piece_hasher(tmp_path: Path, size: int, chunk: int) -> None:
    content = blob(size, seed=size)
    path = tmp_path / "blob"
    path.write_bytes(content)
    hasher = PieceHasher(UNIT)
    hasher.update(content)
    pieces, digest = hasher.finish()
    assert hash_file(path, UNIT, chunk=chunk) == (pieces, digest, size)
    assert pieces == sha1_pieces(content, UNIT)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["http://a/announce", "udp://b:1/x", "http://c/"]), max_size=3))
def test_the_document_is_the_canonical_encoding_around_the_info_bytes(trackers: list[str]) -> None:
    meta = build(CONTENT, tuple(trackers))
    doc: dict[bytes, BValue] = {b"info": bencoding.decode(meta.info_bytes)}
    if meta.trackers:
        doc[b"announce"] = meta.trackers[0].encode()
        doc[b"announce-list"] = [[t.encode()] for t in meta.trackers]
    assert meta.to_bytes() == bencoding.encode(doc)
    assert metainfo.parse(meta.to_bytes()).info_hash == meta.info_hash
