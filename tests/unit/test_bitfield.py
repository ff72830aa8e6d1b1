"""Bitfield (p2p_common.bitfield) against a Python set model, and its wire form."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common.bitfield import Bitfield, byte_length
from p2p_common.errors import ProtocolError


def wire_bytes(size: int, members: set[int]) -> bytes:
    """BitTorrent order, built independently: piece 0 is the most significant bit."""
    nbytes = (size + 7) // 8
    bits = "".join("1" if i in members else "0" for i in range(nbytes * 8))
    return int(bits, 2).to_bytes(nbytes, "big") if nbytes else b""


def assert_matches(field: Bitfield, size: int, model: set[int]) -> None:
    assert len(field) == field.size == size
    assert field.count == len(model)
    assert field.complete == (len(model) == size)
    assert list(field) == sorted(model)
    assert list(field.missing()) == sorted(set(range(size)) - model)
    assert field.to_bytes() == wire_bytes(size, model)
    for index in range(size):
        assert field[index] == (index in model)
        assert (index in field) == (index in model)


@st.composite
def sizes_and_operations(draw: st.DrawFn) -> tuple[int, list[tuple[str, int]]]:
    size = draw(st.integers(min_value=0, max_value=70))
    if size == 0:
        return size, [("set_all", 0)] * draw(st.integers(min_value=0, max_value=1))
    operation = st.tuples(
        st.sampled_from(["set", "clear", "set", "set_all", "copy"]),
        st.integers(min_value=0, max_value=size - 1),
    )
    return size, draw(st.lists(operation, max_size=60))


@settings(max_examples=300, deadline=None)
@given(sizes_and_operations())
def test_operations_match_a_set_model(case: tuple[int, list[tuple[str, int]]]) -> None:
    size, operations = case
    field = Bitfield(size)
    model: set[int] = set()
    for action, index in operations:
        if action == "set":
            assert field.set(index) == (index not in model)
            model.add(index)
        elif action == "clear":
            assert field.clear(index) == (index in model)
            model.discard(index)
        elif action == "set_all":
            field.set_all()
            model = set(range(size))
        else:  # a copy behaves identically and is independent of the original
            twin = field.copy()
            assert twin == field
            if size:
                if index in model:
                    twin.clear(index)
                else:
                    twin.set(index)
                assert twin != field
        assert_matches(field, size, model)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=80), st.data())
def test_wire_form_round_trips(size: int, data: st.DataObject) -> None:
    members = (
        data.draw(st.sets(st.integers(min_value=0, max_value=max(0, size - 1)))) if size else set()
    )
    raw = wire_bytes(size, members)
    field = Bitfield.from_bytes(raw, size)
    assert_matches(field, size, members)
    assert Bitfield.from_bytes(memoryview(bytearray(raw)), size) == field


def test_piece_zero_is_the_high_bit_of_byte_zero() -> None:
    field = Bitfield(16)
    field.set(0)
    assert field.to_bytes() == b"\x80\x00"
    field.set(7)
    field.set(9)
    assert field.to_bytes() == b"\x81\x40"
    assert list(Bitfield.from_bytes(b"\x01\x80", 16)) == [7, 8]


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 15, 16, 17, 1000])
def test_full_bitfield_has_every_bit_and_clear_spare_bits(size: int) -> None:
    field = Bitfield(size, full=True)
    assert_matches(field, size, set(range(size)))
    assert Bitfield.from_bytes(field.to_bytes(), size) == field


@pytest.mark.parametrize(("size", "nbytes"), [(0, 0), (1, 1), (8, 1), (9, 2), (16, 2), (17, 3)])
def test_byte_length_rounds_up_to_whole_bytes(size: int, nbytes: int) -> None:
    assert byte_length(size) == nbytes
    assert len(Bitfield(size).to_bytes()) == nbytes


@pytest.mark.parametrize(("size", "raw"), [(8, b""), (8, b"\x00\x00"), (9, b"\x00"), (0, b"\x00")])
def test_from_bytes_refuses_the_wrong_length(size: int, raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        Bitfield.from_bytes(raw, size)


@pytest.mark.parametrize(
    ("size", "raw"),
    [(1, b"\x40"), (1, b"\x01"), (7, b"\x01"), (9, b"\x00\x40"), (12, b"\xff\xf1")],
)
def test_from_bytes_refuses_spare_bits_that_are_set(size: int, raw: bytes) -> None:
    with pytest.raises(ProtocolError, match="spare"):
        Bitfield.from_bytes(raw, size)


def test_from_bytes_accepts_all_ones_when_there_are_no_spare_bits() -> None:
    assert Bitfield.from_bytes(b"\xff\xff", 16).complete
    assert Bitfield.from_bytes(b"\xff\xf0", 12).complete


@pytest.mark.parametrize("index", [-1, 10, 11, 100])
def test_out_of_range_indices_raise_index_error_and_are_not_members(index: int) -> None:
    field = Bitfield(10, full=True)
    assert index not in field
    with pytest.raises(IndexError):
        field[index]
    with pytest.raises(IndexError):
        field.set(index)
    with pytest.raises(IndexError):
        field.clear(index)
    assert field.count == 10


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError):
        Bitfield(-1)


def test_empty_bitfield_is_complete() -> None:
    field = Bitfield(0)
    assert field.complete
    assert list(field) == []
    assert list(field.missing()) == []


def test_equality_needs_the_same_size_and_bits() -> None:
    assert Bitfield(8) == Bitfield(8)
    assert Bitfield(8) != Bitfield(9)
    assert Bitfield(8) != Bitfield(8, full=True)
    assert Bitfield(8) != b"\x00"


def test_bitfield_is_unhashable() -> None:
    with pytest.raises(TypeError):
        hash(Bitfield(8))
