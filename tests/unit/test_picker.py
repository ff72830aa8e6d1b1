"""The piece picker (p2p_common.picker): order of preference, block geometry, outcomes, endgame."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common.bitfield import Bitfield
from p2p_common.picker import UNIT, Block, PiecePicker

KIB = 1024
PIECE = 256 * KIB


def bits(size: int, indices: Iterable[int]) -> Bitfield:
    field = Bitfield(size)
    for index in indices:
        field.set(index)
    return field


def full(size: int) -> Bitfield:
    return Bitfield(size, full=True)


def as_outstanding(blocks: list[Block]) -> dict[tuple[int, int], Block]:
    """A peer's in-flight requests, as the engine keeps them."""
    return {(b.index, b.begin): b for b in blocks}


def keys(blocks: Iterable[Block]) -> list[tuple[int, int]]:
    return [(b.index, b.begin) for b in blocks]


def deliver_piece(picker: PiecePicker, blocks: list[Block]) -> list[bool]:
    return [picker.block_received(b) for b in blocks]


# --- new pieces: random first, then rarest first -------------------------------------------------


def test_first_pieces_are_random_even_when_one_piece_is_clearly_rarest() -> None:
    first_picks = set()
    for seed in range(100):
        picker = PiecePicker(8, UNIT, 8 * UNIT, rng=random.Random(seed), random_first=4)
        picker.peer_bitfield(full(8))
        for _ in range(3):
            picker.peer_bitfield(bits(8, [0, 1, 2, 4, 5, 6, 7]))  # piece 3 is the rarest
        [block] = picker.pick(full(8), UNIT, 1)
        first_picks.add(block.index)
    assert len(first_picks) >= 4


def rarest_first_picker(seed: int) -> PiecePicker:
    """Eight pieces, 0-3 held (so random-first is over); availability 6:1 4:2 7:3 5:4."""
    picker = PiecePicker(
        8, UNIT, 8 * UNIT, have=bits(8, range(4)), rng=random.Random(seed), random_first=4
    )
    picker.peer_bitfield(full(8))
    picker.peer_bitfield(bits(8, [4, 5, 7]))
    picker.peer_bitfield(bits(8, [5, 7]))
    picker.peer_bitfield(bits(8, [5]))
    return picker


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("peer", [full(8), None], ids=["full-bitfield", "seed"])
def test_after_random_first_pieces_come_rarest_first(seed: int, peer: Bitfield | None) -> None:
    picker = rarest_first_picker(seed)
    assert [picker.availability(i) for i in (6, 4, 7, 5)] == [1, 2, 3, 4]
    order = [picker.pick(peer, UNIT, 1)[0].index for _ in range(4)]
    assert order == [6, 4, 7, 5]


@pytest.mark.parametrize("seed", range(5))
def test_a_peer_with_few_pieces_gets_its_rarest_piece(seed: int) -> None:
    picker = PiecePicker(100, UNIT, 100 * UNIT, rng=random.Random(seed), random_first=0)
    sparse = bits(100, [10, 20, 30])
    picker.peer_bitfield(sparse)
    picker.peer_bitfield(bits(100, [10, 20]))
    picker.peer_bitfield(bits(100, [10, 20, 40]))
    [block] = picker.pick(sparse, UNIT, 1)
    assert block.index == 30


def test_rarest_ties_are_broken_randomly_for_a_peer_holding_every_piece() -> None:
    firsts = set()
    for seed in range(40):
        picker = PiecePicker(4, UNIT, 4 * UNIT, rng=random.Random(seed), random_first=0)
        picker.peer_bitfield(full(4))
        picker.peer_bitfield(bits(4, [0, 3]))  # 1 and 2 tie as the rarest
        firsts.add(picker.pick(full(4), UNIT, 1)[0].index)
    assert firsts == {1, 2}


def test_rarest_ties_are_broken_randomly_for_a_peer_with_few_pieces() -> None:
    firsts = set()
    for seed in range(40):
        picker = PiecePicker(100, UNIT, 100 * UNIT, rng=random.Random(seed), random_first=0)
        sparse = bits(100, [10, 20])
        picker.peer_bitfield(sparse)
        firsts.add(picker.pick(sparse, UNIT, 1)[0].index)
    assert firsts == {10, 20}


# --- priorities and partial pieces ---------------------------------------------------------------


def test_priority_pieces_come_first_and_in_reading_order() -> None:
    picker = PiecePicker(10, PIECE, 10 * PIECE, rng=random.Random(1), random_first=0)
    picker.peer_bitfield(full(10))
    picker.peer_bitfield(bits(10, [2, 7, 9]))  # the priority pieces are the most common
    picker.set_priority([7, 2, 9])
    assert keys(picker.pick(full(10), PIECE, 3)) == [(7, 0), (2, 0), (9, 0)]
    assert picker.pick(full(10), PIECE, 1)[0].index not in {2, 7, 9}


def test_priority_skips_pieces_we_have_and_pieces_the_peer_lacks() -> None:
    picker = PiecePicker(10, PIECE, 10 * PIECE, have=bits(10, [2]), rng=random.Random(1))
    peer = bits(10, [2, 7, 8])
    picker.set_priority([2, 5, 8, 7])
    assert keys(picker.pick(peer, PIECE, 2)) == [(8, 0), (7, 0)]


def test_set_priority_replaces_the_previous_list_and_ignores_bad_indices() -> None:
    picker = PiecePicker(10, PIECE, 10 * PIECE, rng=random.Random(1))
    picker.set_priority([3])
    picker.set_priority([-1, 10, 6])
    assert picker.pick(full(10), PIECE, 1)[0].index == 6


def test_partial_pieces_are_continued_before_new_ones() -> None:
    picker = PiecePicker(10, 4 * UNIT, 40 * UNIT, rng=random.Random(3))
    [started] = picker.pick(full(10), UNIT, 1)
    blocks = picker.pick(full(10), UNIT, 3)
    assert {b.index for b in blocks} == {started.index}
    assert sorted(b.begin for b in [started, *blocks]) == [0, UNIT, 2 * UNIT, 3 * UNIT]


def test_partial_pieces_the_peer_lacks_are_left_alone() -> None:
    picker = PiecePicker(2, 4 * UNIT, 8 * UNIT, rng=random.Random(3), random_first=0)
    picker.set_priority([0])
    assert picker.pick(full(2), UNIT, 1) == [Block(0, 0, UNIT)]
    assert {b.index for b in picker.pick(bits(2, [1]), UNIT, 4)} == {1}


# --- block geometry ------------------------------------------------------------------------------


def test_standard_peers_get_16KiB_blocks_that_tile_the_piece() -> None:
    picker = PiecePicker(2, PIECE, 2 * PIECE, rng=random.Random(0))
    picker.set_priority([0])
    blocks = picker.pick(full(2), 16 * KIB, 16)
    assert blocks == [Block(0, i * 16 * KIB, 16 * KIB) for i in range(16)]


def test_a_peer_with_piece_sized_blocks_gets_whole_pieces() -> None:
    picker = PiecePicker(3, PIECE, 3 * PIECE, rng=random.Random(0))
    blocks = picker.pick(full(3), PIECE, 3)
    assert sorted(blocks, key=lambda b: b.index) == [Block(i, 0, PIECE) for i in range(3)]


@pytest.mark.parametrize("block_size", [4 * 1024 * KIB, PIECE + UNIT])
def test_blocks_larger_than_a_piece_stop_at_the_piece_end(block_size: int) -> None:
    picker = PiecePicker(3, PIECE, 3 * PIECE, rng=random.Random(0))
    blocks = picker.pick(full(3), block_size, 2)
    assert [(b.begin, b.length) for b in blocks] == [(0, PIECE), (0, PIECE)]
    assert len({b.index for b in blocks}) == 2


def test_intermediate_block_sizes_group_whole_units() -> None:
    picker = PiecePicker(2, PIECE, 2 * PIECE, rng=random.Random(0))
    picker.set_priority([1])
    assert picker.pick(full(2), 64 * KIB, 4) == [Block(1, i * 64 * KIB, 64 * KIB) for i in range(4)]


@pytest.mark.parametrize(
    ("last_size", "expected"),
    [
        (5000, [(0, 5000)]),
        (UNIT, [(0, UNIT)]),
        (40000, [(0, UNIT), (UNIT, UNIT), (2 * UNIT, 40000 - 2 * UNIT)]),
    ],
)
def test_the_last_piece_is_short(last_size: int, expected: list[tuple[int, int]]) -> None:
    total = 2 * PIECE + last_size
    picker = PiecePicker(3, PIECE, total, rng=random.Random(0))
    assert picker.piece_size(2) == last_size
    assert picker.piece_size(1) == PIECE
    picker.set_priority([2])
    assert [(b.begin, b.length) for b in picker.pick(full(3), UNIT, len(expected))] == expected
    picker2 = PiecePicker(3, PIECE, total, rng=random.Random(0))
    picker2.set_priority([2])
    assert picker2.pick(full(3), PIECE, 1) == [Block(2, 0, last_size)]


def test_piece_length_must_be_a_multiple_of_16KiB() -> None:
    with pytest.raises(ValueError):
        PiecePicker(1, UNIT + 1, UNIT + 1)


def test_nothing_is_picked_for_a_zero_count_or_when_complete() -> None:
    picker = PiecePicker(2, UNIT, 2 * UNIT, rng=random.Random(0))
    assert picker.pick(full(2), UNIT, 0) == []
    done = PiecePicker(2, UNIT, 2 * UNIT, have=full(2))
    assert done.complete
    assert done.pick(None, UNIT, 5) == []


def test_pieces_we_have_are_never_picked() -> None:
    have = bits(6, [0, 2, 4])
    picker = PiecePicker(6, UNIT, 6 * UNIT, have=have, rng=random.Random(0))
    assert sorted(b.index for b in picker.pick(full(6), UNIT, 3)) == [1, 3, 5]
    assert picker.pick(bits(6, [0, 2, 4]), UNIT, 3) == []


# --- outcomes ------------------------------------------------------------------------------------


def test_block_failed_makes_exactly_its_units_available_again() -> None:
    picker = PiecePicker(1, PIECE, PIECE, rng=random.Random(0))
    first = picker.pick(full(1), UNIT, 4)
    picker.block_failed(first[1])
    assert picker.pick(full(1), UNIT, 1) == [first[1]]
    assert picker.pick(full(1), UNIT, 1) == [Block(0, 4 * UNIT, UNIT)]


def test_block_failed_on_an_untouched_piece_makes_it_new_again() -> None:
    picker = PiecePicker(2, PIECE, 2 * PIECE, rng=random.Random(0))
    [whole] = picker.pick(bits(2, [0]), PIECE, 1)
    assert picker.pick(bits(2, [0]), PIECE, 1) == []  # piece 1 is new: no endgame yet
    picker.block_failed(whole)
    assert picker.wanted(0)
    assert picker.pick(bits(2, [0]), PIECE, 1) == [whole]


def test_a_piece_is_ready_to_verify_once_every_unit_arrived() -> None:
    picker = PiecePicker(1, 4 * UNIT, 4 * UNIT, rng=random.Random(0))
    blocks = picker.pick(full(1), UNIT, 4)
    assert deliver_piece(picker, blocks[:3]) == [False, False, False]
    assert picker.block_received(blocks[0]) is False  # a duplicate is not progress
    assert picker.wanted(0)
    assert picker.block_received(blocks[3]) is True
    assert not picker.wanted(0)
    assert not picker.interesting(full(1))
    assert picker.pick(full(1), UNIT, 4) == []
    picker.piece_verified(0)
    assert picker.complete


def test_piece_failed_makes_the_whole_piece_wanted_again() -> None:
    picker = PiecePicker(3, 4 * UNIT, 12 * UNIT, have=bits(3, [0, 2]), rng=random.Random(0))
    blocks = picker.pick(full(3), UNIT, 4)
    assert deliver_piece(picker, blocks)[-1] is True
    assert picker.pick(full(3), UNIT, 4) == []
    picker.piece_failed(1)
    assert picker.wanted(1)
    again = picker.pick(full(3), UNIT, 4)
    assert sorted(again, key=lambda b: b.begin) == sorted(blocks, key=lambda b: b.begin)


def test_a_block_for_a_piece_nobody_requested_is_ignored() -> None:
    picker = PiecePicker(2, UNIT, 2 * UNIT, rng=random.Random(0))
    assert picker.block_received(Block(1, 0, UNIT)) is False
    picker.block_failed(Block(1, 0, UNIT))
    assert picker.wanted(1)


# --- endgame -------------------------------------------------------------------------------------


def test_endgame_gives_another_peer_the_requested_blocks_but_not_the_received_ones() -> None:
    picker = PiecePicker(1, 4 * UNIT, 4 * UNIT, rng=random.Random(0))
    mine = picker.pick(full(1), UNIT, 4)
    picker.block_received(mine[0])
    other = picker.pick(full(1), UNIT, 10)
    assert sorted(keys(other)) == sorted(keys(mine[1:]))


def test_endgame_duplicates_go_only_to_idle_peers_and_only_once() -> None:
    picker = PiecePicker(1, 4 * UNIT, 4 * UNIT, rng=random.Random(0))
    mine = picker.pick(full(1), UNIT, 4)
    # A peer still busy with its own requests gets no duplicates, whatever it lacks.
    assert picker.pick(full(1), UNIT, 4, outstanding=as_outstanding(mine)) == []
    assert picker.pick(full(1), UNIT, 4, outstanding=as_outstanding(mine[:2])) == []
    # An idle peer may duplicate every block that is in flight once ...
    duplicates = picker.pick(full(1), UNIT, 4, outstanding={})
    assert sorted(keys(duplicates)) == sorted(keys(mine))
    # ... and no third peer is asked for the same bytes.
    assert picker.pick(full(1), UNIT, 4, outstanding={}) == []


def test_endgame_waits_until_every_missing_unit_is_requested() -> None:
    picker = PiecePicker(2, 4 * UNIT, 8 * UNIT, rng=random.Random(0))
    picker.set_priority([0])
    first = picker.pick(full(2), UNIT, 4)
    assert {b.index for b in first} == {0}
    # Piece 1 is untouched: a second peer gets it, not duplicates of piece 0.
    assert {b.index for b in picker.pick(full(2), UNIT, 4)} == {1}
    # Now everything missing is requested, so duplicates are handed out.
    assert {b.index for b in picker.pick(full(2), UNIT, 8)} == {0, 1}


def test_endgame_gives_nothing_to_a_peer_without_the_missing_pieces() -> None:
    picker = PiecePicker(2, 4 * UNIT, 8 * UNIT, have=bits(2, [1]), rng=random.Random(0))
    picker.pick(full(2), UNIT, 4)
    assert picker.pick(bits(2, [1]), UNIT, 4) == []


def test_one_pick_never_returns_the_same_block_twice() -> None:
    picker = PiecePicker(1, PIECE, PIECE, rng=random.Random(0))
    blocks = picker.pick(full(1), UNIT, 20)
    assert len(set(keys(blocks))) == len(blocks)


def test_endgame_never_overlaps_a_larger_block_the_peer_already_requested() -> None:
    picker = PiecePicker(1, PIECE, PIECE, rng=random.Random(0))
    [whole] = picker.pick(full(1), PIECE, 1)
    assert picker.pick(full(1), PIECE, 4, outstanding=as_outstanding([whole])) == []


# --- what the swarm has --------------------------------------------------------------------------


def test_availability_counts_bitfields_haves_and_seeds() -> None:
    picker = PiecePicker(4, UNIT, 4 * UNIT)
    a, b = bits(4, [0, 1]), bits(4, [1, 2])
    picker.peer_bitfield(a)
    picker.peer_bitfield(b)
    picker.peer_have(3)
    picker.peer_seed()
    picker.peer_seed()
    assert [picker.availability(i) for i in range(4)] == [3, 4, 3, 3]
    picker.peer_gone(a)
    picker.peer_gone(None)
    assert [picker.availability(i) for i in range(4)] == [1, 2, 2, 2]
    picker.peer_gone(b)
    picker.peer_gone(None)
    assert [picker.availability(i) for i in range(4)] == [0, 0, 0, 1]


def test_interesting_means_the_peer_has_a_piece_we_still_want() -> None:
    picker = PiecePicker(4, UNIT, 4 * UNIT, have=bits(4, [0, 1]))
    assert not picker.interesting(bits(4, [0, 1]))
    assert picker.interesting(bits(4, [1, 3]))
    assert picker.interesting(None)
    assert not PiecePicker(4, UNIT, 4 * UNIT, have=full(4)).interesting(None)


# --- a simulated swarm ---------------------------------------------------------------------------


@dataclass
class SimPeer:
    bits: Bitfield
    block_size: int
    outstanding: dict[tuple[int, int], Block] = field(default_factory=dict)


@st.composite
def swarms(draw: st.DrawFn) -> tuple[int, int, int, int, list[tuple[set[int], int]]]:
    piece_length = UNIT * draw(st.sampled_from([1, 2, 4, 16]))
    num_pieces = draw(st.integers(min_value=1, max_value=12))
    total = (num_pieces - 1) * piece_length + draw(st.integers(min_value=1, max_value=piece_length))
    random_first = draw(st.integers(min_value=0, max_value=5))
    block_sizes = st.sampled_from([UNIT, 2 * UNIT, piece_length, 4 * 1024 * KIB])
    partial = st.sets(st.integers(min_value=0, max_value=num_pieces - 1))
    peers = [(set(range(num_pieces)), draw(block_sizes))]
    peers += draw(st.lists(st.tuples(partial, block_sizes), max_size=3))
    return piece_length, num_pieces, total, random_first, peers


@settings(max_examples=120, deadline=None)
@given(swarms(), st.integers(min_value=0, max_value=2**32))
def test_simulated_swarm_picks_valid_blocks_and_always_completes(
    swarm: tuple[int, int, int, int, list[tuple[set[int], int]]], seed: int
) -> None:
    rnd = random.Random(seed)
    piece_length, num_pieces, total, random_first, peer_specs = swarm
    picker = PiecePicker(
        num_pieces, piece_length, total, rng=random.Random(rnd.random()), random_first=random_first
    )
    peers = [SimPeer(bits(num_pieces, have), size) for have, size in peer_specs]
    for peer in peers:
        picker.peer_bitfield(peer.bits)

    def piece_end(index: int) -> int:
        return min(piece_length, total - index * piece_length)

    for _ in range(20_000):
        if picker.complete:
            break
        peer = rnd.choice(peers)
        action = rnd.random()
        if action < 0.45:
            before = dict(peer.outstanding)
            for block in picker.pick(peer.bits, peer.block_size, rnd.randint(1, 8), before):
                assert block.index in peer.bits
                assert block.index not in picker.have
                assert block.begin % UNIT == 0
                assert 0 < block.length <= max(UNIT, peer.block_size)
                assert block.begin + block.length <= piece_end(block.index)
                assert (block.index, block.begin) not in before
                peer.outstanding[(block.index, block.begin)] = block
        elif action < 0.8 and peer.outstanding:
            key = rnd.choice(list(peer.outstanding))
            block = peer.outstanding.pop(key)
            ready = picker.block_received(block)
            for other in peers:  # the caller cancels duplicates when a block arrives
                if ready:
                    for stale in [k for k in other.outstanding if k[0] == block.index]:
                        del other.outstanding[stale]
                elif key in other.outstanding:
                    picker.block_failed(other.outstanding.pop(key))
            if ready:
                if rnd.random() < 0.15:
                    picker.piece_failed(block.index)
                else:
                    picker.piece_verified(block.index)
        elif action < 0.95 and peer.outstanding:
            picker.block_failed(peer.outstanding.pop(rnd.choice(list(peer.outstanding))))
        else:
            index = rnd.randrange(num_pieces)
            if peer.bits.set(index):
                picker.peer_have(index)
    assert picker.complete
    assert picker.have == full(num_pieces)


def test_a_seed_is_asked_for_priority_pieces_only_when_no_other_peer_has_them() -> None:
    picker = PiecePicker(10, PIECE, 10 * PIECE, rng=random.Random(1), random_first=0)
    picker.peer_seed()  # the proxy
    picker.peer_bitfield(bits(10, [0, 1]))  # another agent has the first two pieces
    picker.set_priority([0, 1, 2])
    from_seed = keys(picker.pick(None, PIECE, 1))
    assert from_seed == [(2, 0)]  # not 0 or 1: the other agent has those
    from_agent = keys(picker.pick(bits(10, [0, 1]), PIECE, 2))
    assert from_agent == [(0, 0), (1, 0)]


# --- smart ban: a piece mixed from several peers is asked of one peer alone ----------------------


def test_a_mixed_failed_piece_goes_whole_to_one_peer_and_is_anyones_again_after() -> None:
    picker = PiecePicker(1, PIECE, PIECE, rng=random.Random(1), random_first=0)
    a_blocks = picker.pick(full(1), 16 * KIB, 2, who="a")
    b_blocks = picker.pick(full(1), 16 * KIB, 100, who="b")
    assert a_blocks
    assert b_blocks  # without the rule, two peers share the piece's blocks
    for block in a_blocks + b_blocks:
        picker.block_received(block)
    picker.piece_verifying(0)
    picker.piece_failed(0, single_source=True)
    whole = picker.pick(full(1), 16 * KIB, 2, who="a")
    assert sum(b.length for b in whole) == PIECE  # the whole piece, past the count asked for
    assert picker.pick(full(1), 16 * KIB, 100, who="b") == []  # b may not add blocks to it
    for block in whole:
        picker.block_received(block)
    picker.piece_verifying(0)
    picker.piece_failed(0)  # a's copy alone was bad too: a is banned; the piece is anyone's
    assert sum(b.length for b in picker.pick(full(1), 16 * KIB, 100, who="b")) == PIECE


def test_a_gone_peer_releases_the_piece_it_was_to_send_whole() -> None:
    picker = PiecePicker(1, PIECE, PIECE, rng=random.Random(1), random_first=0)
    picker.piece_failed(0, single_source=True)
    taken = picker.pick(full(1), 16 * KIB, 2, who="a")
    picker.block_received(taken[0])  # a sent one block, then went away
    assert picker.pick(full(1), 16 * KIB, 100, who="b") == []
    for block in taken[1:]:
        picker.block_failed(block)
    picker.release("a")
    rest = picker.pick(full(1), 16 * KIB, 100, who="b")
    assert sum(b.length for b in rest) == PIECE - taken[0].length
