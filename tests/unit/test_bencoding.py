"""Strict, bounded bencoding (p2p_common.bencoding): round trips, canonical form, bounds."""

from __future__ import annotations

import enum
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_common import bencoding
from p2p_common.bencoding import BencodeError, BValue
from p2p_common.errors import ProtocolError, RemoteError

# --- an independent reference encoder (BEP 3), to check the facade against ---------------------


def reference_encode(value: BValue) -> bytes:
    if isinstance(value, int):
        return b"i" + str(value).encode() + b"e"
    if isinstance(value, bytes):
        return str(len(value)).encode() + b":" + value
    if isinstance(value, list):
        return b"l" + b"".join(reference_encode(item) for item in value) + b"e"
    parts = [reference_encode(key) + reference_encode(value[key]) for key in sorted(value)]
    return b"d" + b"".join(parts) + b"e"


def nesting(value: BValue) -> int:
    """Number of nested lists/dicts: 0 for a scalar, 1 for ``[]``, 2 for ``[[]]``."""
    if isinstance(value, list):
        return 1 + max((nesting(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((nesting(item) for item in value.values()), default=0)
    return 0


scalars = (
    st.integers() | st.integers(min_value=-(2**2000), max_value=2**2000) | st.binary(max_size=40)
)
values: st.SearchStrategy[BValue] = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.binary(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)

# Byte strings built from bencoding's own alphabet hit the parser's branches far more often
# than uniformly random bytes do.
bencode_like = st.lists(
    st.sampled_from(
        [
            *(b"i", b"e", b"l", b"d", b":", b"-", b"0", b"1", b"2", b"3", b"9", b" ", b"+", b"_"),
            *(b"a", b"\x00", b"\xff", b"1:a", b"i1e", b"-6:", b"d1:a"),
        ]
    ),
    max_size=40,
).map(b"".join)


def decode_ok_or_bencode_error(data: bytes, **kwargs: object) -> BValue | None:
    try:
        return bencoding.decode(data, **kwargs)  # type: ignore[arg-type]
    except BencodeError:
        return None


# --- round trips ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(values)
def test_decode_of_encode_is_identity(value: BValue) -> None:
    encoded = bencoding.encode(value)
    assert bencoding.decode(encoded, max_depth=max(1, nesting(value))) == value


@settings(max_examples=300, deadline=None)
@given(values)
def test_encode_matches_the_reference_encoding(value: BValue) -> None:
    assert bencoding.encode(value) == reference_encode(value)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"i0e"),
        (-1, b"i-1e"),
        (2**100, b"i" + str(2**100).encode() + b"e"),
        (b"", b"0:"),
        (b"spam", b"4:spam"),
        ([], b"le"),
        ({}, b"de"),
        ([b"a", 1, [b"b"]], b"l1:ai1el1:bee"),
        ({b"b": 1, b"a": 2}, b"d1:ai2e1:bi1ee"),
    ],
)
def test_known_encodings_decode_and_encode_both_ways(value: BValue, encoded: bytes) -> None:
    assert bencoding.encode(value) == encoded
    assert bencoding.decode(encoded) == value


def test_encode_sorts_keys_bytewise_not_by_insertion_or_case() -> None:
    doc = {b"\xff": 1, b"a": 2, b"B": 3, b"": 4, b"aa": 5}
    assert bencoding.encode(doc) == b"d0:i4e1:Bi3e1:ai2e2:aai5e1:\xffi1ee"


def test_encode_accepts_str_as_utf8_and_tuples_as_lists() -> None:
    assert bencoding.encode("é") == b"2:\xc3\xa9"
    assert bencoding.encode({"k": ("x", 1)}) == b"d1:kl1:xi1eee"


def test_encode_accepts_int_subclasses_as_plain_integers() -> None:
    class Flag(enum.IntEnum):
        ON = 7

    assert bencoding.encode([Flag.ON, {b"f": Flag.ON}]) == b"li7ed1:fi7eee"


def test_decode_accepts_bytearray_and_memoryview() -> None:
    assert bencoding.decode(bytearray(b"l1:ae")) == [b"a"]
    assert bencoding.decode(memoryview(b"xxi5e")[2:]) == 5


# --- encode refuses what has no bencoding --------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [True, False, 1.5, None, [1, None], {b"k": True}, {b"k": [0.0]}, object()],
    ids=["true", "false", "float", "none", "none-in-list", "bool-value", "float-deep", "object"],
)
def test_encode_refuses_values_without_a_bencoding(value: object) -> None:
    with pytest.raises(TypeError):
        bencoding.encode(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [1, None, (b"a",), 1.0], ids=["int", "none", "tuple", "float"])
def test_encode_refuses_keys_that_are_not_bytes_or_str(key: object) -> None:
    with pytest.raises(TypeError):
        bencoding.encode({key: 1})  # type: ignore[arg-type]


def test_encode_refuses_a_str_key_and_bytes_key_that_collide() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        bencoding.encode({"a": 1, b"a": 2})  # type: ignore[arg-type]


# --- canonical form ------------------------------------------------------------------------------

NON_CANONICAL = {
    "leading-zero-int": b"i03e",
    "double-zero": b"i00e",
    "negative-zero": b"i-0e",
    "negative-leading-zero": b"i-01e",
    "plus-sign": b"i+1e",
    "space-before-int": b"i 1e",
    "space-after-int": b"i1 e",
    "underscore-int": b"i1_0e",
    "empty-int": b"ie",
    "lone-minus": b"i-e",
    "float": b"i1.5e",
    "leading-zero-length": b"03:abc",
    "plus-length": b"+1:a",
    "space-in-length": b"1 :a",
    "underscore-length": b"1_0:aaaaaaaaaa",
    "negative-length": b"-1:a",
    "unsorted-keys": b"d1:bi1e1:ai2ee",
    "unsorted-long-key-first": b"d2:abi1e1:ai2ee",
    "duplicate-keys": b"d1:ai1e1:ai2ee",
    "integer-key": b"di1ei2ee",
    "list-key": b"dlei2ee",
    "trailing-data": b"i1ei2e",
    "trailing-newline": b"i1e\n",
    "empty": b"",
    "unknown-type": b"x",
    "unicode-digit": "i\u0661e".encode(),
}


@pytest.mark.parametrize("data", NON_CANONICAL.values(), ids=NON_CANONICAL.keys())
def test_non_canonical_or_malformed_input_is_rejected(data: bytes) -> None:
    with pytest.raises(BencodeError):
        bencoding.decode(data)


@pytest.mark.parametrize(
    "data",
    [b"i1", b"l", b"d", b"3:ab", b"l3:ab", b"li1e", b"d1:a", b"d1:ai1e", b"4:"],
    ids=["int", "list", "dict", "string", "string-in-list", "list", "key", "dict", "empty-string"],
)
def test_truncated_input_is_rejected(data: bytes) -> None:
    with pytest.raises(BencodeError):
        bencoding.decode(data)


@settings(max_examples=100, deadline=None)
@given(values, st.data())
def test_every_strict_prefix_of_an_encoding_is_rejected(value: BValue, data: st.DataObject) -> None:
    encoded = bencoding.encode(value)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(BencodeError):
        bencoding.decode(encoded[:cut], max_depth=64)


@settings(max_examples=100, deadline=None)
@given(values, st.binary(min_size=1, max_size=10))
def test_anything_after_the_value_is_rejected(value: BValue, suffix: bytes) -> None:
    with pytest.raises(BencodeError):
        bencoding.decode(bencoding.encode(value) + suffix, max_depth=64)


def test_bencode_error_is_a_remote_protocol_error() -> None:
    assert issubclass(BencodeError, ProtocolError)
    assert issubclass(BencodeError, RemoteError)


# --- canonical=False -----------------------------------------------------------------------------


def test_non_canonical_mode_tolerates_unsorted_keys() -> None:
    assert bencoding.decode(b"d1:bi1e1:ai2ee", canonical=False) == {b"a": 2, b"b": 1}


def test_non_canonical_mode_keeps_the_last_of_duplicate_keys() -> None:
    assert bencoding.decode(b"d1:ai1e1:ai2ee", canonical=False) == {b"a": 2}


@pytest.mark.parametrize(
    "data",
    [b"i+1e", b"i 1e", b"i1_0e", b"i03e", b"i-0e", b"d1 :ai1ee", b"li1ei2e", b"i1ex", b""],
)
def test_non_canonical_mode_still_rejects_malformed_input(data: bytes) -> None:
    with pytest.raises(BencodeError):
        bencoding.decode(data, canonical=False)


@pytest.mark.parametrize("canonical", [True, False])
@pytest.mark.parametrize("data", [b"d1:ai1e-6:", b"d1:ai1e-3:i1e", b"d-4:e"])
def test_negative_string_length_is_rejected_without_looping(data: bytes, canonical: bool) -> None:
    # A negative length used to move the parser backwards: d1:ai1e-6: looped forever.
    outcome: list[object] = []

    def run() -> None:
        try:
            bencoding.decode(data, canonical=canonical)
        except BencodeError as exc:
            outcome.append(exc)
        else:
            outcome.append("decoded")

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "decode() did not return"
    assert len(outcome) == 1
    assert isinstance(outcome[0], BencodeError)


# --- bounds --------------------------------------------------------------------------------------


def test_max_size_admits_a_document_of_exactly_that_size_and_not_one_byte_more() -> None:
    doc = b"10:" + b"x" * 10  # 13 bytes
    assert bencoding.decode(doc, max_size=13) == b"x" * 10
    with pytest.raises(BencodeError, match="exceeds"):
        bencoding.decode(doc, max_size=12)


def test_default_max_size_is_enforced() -> None:
    payload = bencoding.DEFAULT_MAX_SIZE - 8
    doc = str(payload).encode() + b":" + b"x" * payload
    assert len(doc) == bencoding.DEFAULT_MAX_SIZE
    assert bencoding.decode(doc) == b"x" * payload
    with pytest.raises(BencodeError, match="exceeds"):
        bencoding.decode(doc + b"x")


def nested_lists(depth: int) -> bytes:
    return b"l" * depth + b"e" * depth


def nested_dicts(depth: int) -> bytes:
    return b"d1:k" * depth + b"i0e" + b"e" * depth if depth else b"i0e"


@pytest.mark.parametrize("limit", [1, 2, 5])
@pytest.mark.parametrize("nest", [nested_lists, nested_dicts], ids=["lists", "dicts"])
def test_max_depth_admits_exactly_that_many_nested_containers(limit: int, nest: object) -> None:
    assert callable(nest)
    assert bencoding.decode(nest(limit), max_depth=limit) is not None
    with pytest.raises(BencodeError, match="depth"):
        bencoding.decode(nest(limit + 1), max_depth=limit)


def test_default_max_depth_is_enforced_in_both_modes() -> None:
    limit = bencoding.DEFAULT_MAX_DEPTH
    assert nesting(bencoding.decode(nested_lists(limit))) == limit
    for canonical in (True, False):
        with pytest.raises(BencodeError):
            bencoding.decode(nested_lists(limit + 1), canonical=canonical)


def test_deep_nesting_far_beyond_the_recursion_limit_is_a_bencode_error() -> None:
    with pytest.raises(BencodeError):
        bencoding.decode(nested_lists(100_000), max_depth=1_000_000)


def test_max_depth_zero_admits_only_scalars() -> None:
    assert bencoding.decode(b"i1e", max_depth=0) == 1
    with pytest.raises(BencodeError):
        bencoding.decode(b"le", max_depth=0)


# --- decode_dict ---------------------------------------------------------------------------------


def test_decode_dict_returns_a_dictionary() -> None:
    assert bencoding.decode_dict(b"d1:ai1ee") == {b"a": 1}


@pytest.mark.parametrize("data", [b"le", b"i1e", b"0:"])
def test_decode_dict_refuses_other_top_level_values(data: bytes) -> None:
    with pytest.raises(BencodeError, match="dictionary"):
        bencoding.decode_dict(data)


# --- hostile input -------------------------------------------------------------------------------


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.binary(max_size=200) | bencode_like, st.booleans())
def test_arbitrary_bytes_only_ever_raise_bencode_error(data: bytes, canonical: bool) -> None:
    decoded = decode_ok_or_bencode_error(data, canonical=canonical)
    if decoded is not None and canonical:
        # Whatever is accepted as canonical re-encodes to exactly the same bytes.
        assert bencoding.encode(decoded) == data


@settings(max_examples=300, deadline=None)
@given(values, st.data())
def test_mutated_encodings_only_ever_raise_bencode_error(
    value: BValue, data: st.DataObject
) -> None:
    encoded = bytearray(bencoding.encode(value))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        position = data.draw(st.integers(min_value=0, max_value=len(encoded)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        byte = data.draw(st.sampled_from(b"ield:-0123456789 +x\x00\xff"))
        if action == "insert":
            encoded.insert(position, byte)
        elif position < len(encoded):
            if action == "flip":
                encoded[position] = byte
            else:
                del encoded[position]
    decoded = decode_ok_or_bencode_error(bytes(encoded), max_depth=64)
    if decoded is not None:
        assert bencoding.encode(decoded) == bytes(encoded)
