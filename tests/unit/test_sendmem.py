"""The process-wide budget of response bytes held for clients (p2p_common.sendmem)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2p_common.sendmem import MIN_CHUNK, SendMemory

MiB = 1024 * 1024


def test_full_chunks_below_the_limit_and_small_ones_beyond() -> None:
    memory = SendMemory(16 * MiB)
    assert memory.chunk(4 * MiB) == 4 * MiB
    for _ in range(3):
        memory.hold(4 * MiB)
    assert memory.chunk(4 * MiB) == 4 * MiB  # exactly fits
    memory.hold(3 * MiB)
    assert memory.chunk(4 * MiB) == 1 * MiB  # what is left
    memory.hold(1 * MiB)
    assert memory.chunk(4 * MiB) == MIN_CHUNK  # never zero: a response only slows down
    assert memory.chunk(1000) == 1000
    memory.release(16 * MiB)
    assert memory.held == 0
    assert memory.chunk(4 * MiB) == 4 * MiB


@given(
    limit=st.integers(1, 64 * MiB),
    held=st.integers(0, 128 * MiB),
    want=st.integers(1, 8 * MiB),
)
def test_a_chunk_is_never_empty_nor_larger_than_asked(limit: int, held: int, want: int) -> None:
    memory = SendMemory(limit)
    memory.hold(held)
    size = memory.chunk(want)
    assert 1 <= size <= want
    # within the limit whenever it fits, and at most one small chunk beyond it
    assert memory.held + size <= max(limit, memory.held + MIN_CHUNK)
