"""HTTP Range parsing for blobs (p2p_common.ranges)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common.errors import RemoteError
from p2p_common.ranges import MAX_RANGE_HEADER, ByteRange, RangeNotSatisfiableError, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=2-5", 10, (2, 5)),
        ("bytes=2-", 10, (2, 9)),
        ("bytes=2-100", 10, (2, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        ("BYTES = 1 - 2", 10, (1, 2)),
    ],
)
def test_single_ranges(header: str, size: int, expected: tuple[int, int]) -> None:
    got = parse_range(header, size)
    assert got is not None
    assert (got.start, got.end) == expected
    assert got.content_range(size) == f"bytes {expected[0]}-{expected[1]}/{size}"
    assert got.length == expected[1] - expected[0] + 1


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes=",
        "bytes=-",
        "items=0-1",
        "bytes=0-1,3-4",
        "bytes=5-2",
        "bytes=a-b",
        "bytes=" + "1" * 20 + "-",
        "x" * (MAX_RANGE_HEADER + 1),
    ],
)
def test_unsupported_or_malformed_headers_mean_the_whole_blob(header: str | None) -> None:
    assert parse_range(header, 10) is None


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=-5", 0), ("bytes=0-", 0)],
)
def test_ranges_outside_the_blob_are_not_satisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiableError):
        parse_range(header, size)
    assert issubclass(RangeNotSatisfiableError, RemoteError)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60), st.integers(0, 10**12))
def test_any_header_gives_a_range_inside_the_blob_none_or_the_range_error(
    header: str, size: int
) -> None:
    try:
        got = parse_range(header, size)
    except RangeNotSatisfiableError:
        return
    if got is not None:
        assert isinstance(got, ByteRange)
        assert 0 <= got.start <= got.end < size


@pytest.mark.parametrize(
    "header",
    ["bytes=\u0663-\u0665", "bytes=0-\u0665", "bytes=1-2\n", "bytes=\uff11-2"],
)
def test_only_ascii_digits_and_nothing_after_the_range(header: str) -> None:
    """Unicode digits are digits to Python's ``int`` and ``\\d``, not to HTTP."""
    assert parse_range(header, 100) is None


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(1, 10**9))
def test_well_formed_ranges_are_clamped_to_the_blob(first: int, last: int, size: int) -> None:
    header = f"bytes={first}-{last}"
    if last < first:
        assert parse_range(header, size) is None
    elif first >= size:
        with pytest.raises(RangeNotSatisfiableError):
            parse_range(header, size)
    else:
        got = parse_range(header, size)
        assert got is not None
        assert (got.start, got.end) == (first, min(last, size - 1))
