"""The adaptive download limit's core: flush latencies in, the download rate in force out."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2p_common.diskpace import (
    DECREASE,
    INCREASE,
    MAX_FLUSH_BYTES,
    MIN_FLUSH_BYTES,
    DiskPace,
)

MB = 10**6


def test_off_keeps_the_configured_rate() -> None:
    pace = DiskPace(limit=0, floor=MB, configured=50 * MB)
    result = pace.measured(latency=30.0, throughput=80 * MB)
    assert (result.rate, result.adaptive, result.changed) == (50 * MB, False, False)
    assert pace.overdue(waited=30.0, throughput=80 * MB).rate == 50 * MB


def test_a_slow_flush_cuts_below_what_was_downloaded() -> None:
    pace = DiskPace(limit=0.5, floor=MB, configured=0)
    result = pace.measured(latency=0.9, throughput=40 * MB)
    assert result.changed
    assert result.adaptive
    assert result.rate == pytest.approx(40 * MB * DECREASE)
    # a second slow flush cuts from the rate in force (nothing faster got through)
    assert pace.measured(latency=0.9, throughput=40 * MB).rate == pytest.approx(
        40 * MB * DECREASE**2
    )


def test_the_rate_grows_the_faster_the_further_below_the_limit() -> None:
    pace = DiskPace(limit=0.5, floor=MB, configured=0)
    cut = pace.measured(latency=0.9, throughput=40 * MB).rate
    near = pace.measured(latency=0.45, throughput=cut).rate
    assert near == pytest.approx(cut * (1 + (INCREASE - 1) * 0.1))
    far = pace.measured(latency=0.05, throughput=near).rate
    assert far == pytest.approx(near * (1 + (INCREASE - 1) * 0.9))
    held = pace.measured(latency=0.5, throughput=far)
    assert (held.rate, held.changed) == (far, False)


def test_the_flush_shows_the_disk_speed_the_cut_aims_at() -> None:
    # 12 MB written in a second took 2 s to flush: the disk writes about 6 MB/s, so a limit
    # of 0.5 s allows about 3 MB/s; the cut aims below that.
    pace = DiskPace(limit=0.5, floor=MB, configured=12 * MB)
    result = pace.measured(latency=2.0, throughput=12 * MB, flushed=12 * MB)
    assert result.rate == pytest.approx(3 * MB * DECREASE)


def test_recovery_lifts_the_limit_at_the_configured_rate() -> None:
    pace = DiskPace(limit=0.5, floor=MB, configured=30 * MB)
    assert pace.measured(latency=2.0, throughput=30 * MB).rate == pytest.approx(21 * MB)
    rates = [pace.measured(latency=0.0, throughput=0).rate for _ in range(3)]
    assert rates[0] == pytest.approx(21 * MB * INCREASE)
    assert rates[-1] == 30 * MB  # back to downloadRate: no adaptive limit any more
    assert pace.adaptive is None


def test_unlimited_recovers_to_unlimited_past_twice_the_first_cut() -> None:
    pace = DiskPace(limit=0.5, floor=MB, configured=0)
    pace.measured(latency=5.0, throughput=10 * MB)
    assert pace.lift_at == 20 * MB
    steps = 0
    while pace.rate:
        pace.measured(latency=0.0, throughput=0)
        steps += 1
    assert steps < 10
    assert pace.rate == 0  # unlimited again


def test_overdue_cuts_while_the_flush_still_runs_and_not_below_the_floor() -> None:
    pace = DiskPace(limit=0.5, floor=2 * MB, configured=0)
    flushed = 100 * MB
    assert not pace.overdue(waited=0.4, throughput=100 * MB, flushed=flushed).changed
    waits = [0.5 * (i + 2) for i in range(40)]
    rates = [pace.overdue(waited=w, throughput=100 * MB, flushed=flushed).rate for w in waits]
    # after 1 s the disk has written at most 100 MB/s: half a second's worth, and a margin
    assert rates[0] == pytest.approx(100 * MB * 0.5 * DECREASE)
    # later cuts follow the disk speed the flush shows (100 MB / waited), not compounding
    assert rates[2] == pytest.approx(flushed / waits[2] * 0.5 * DECREASE)
    assert all(a >= b for a, b in itertools.pairwise(rates))
    assert rates[-1] == 2 * MB
    assert pace.last_latency == pytest.approx(20.5)
    # the flush ends: its latency was accounted for while it ran, no cut once more
    cuts = pace.cuts
    pace.measured(latency=21.0, throughput=5 * MB, flushed=flushed)
    assert pace.cuts == cuts
    pace.measured(latency=1.0, throughput=5 * MB, flushed=MB)  # the next flush counts again
    assert pace.cuts == cuts + 1


def test_nothing_measured_while_unlimited_cannot_be_scaled() -> None:
    pace = DiskPace(limit=0.5, floor=MB, configured=0)
    assert not pace.measured(latency=3.0, throughput=0).changed
    assert pace.rate == 0


def test_reconfigure_off_or_lower_download_rate_ends_the_adaptive_limit() -> None:
    pace = DiskPace(limit=0.5, floor=MB, configured=0)
    pace.measured(latency=3.0, throughput=50 * MB)
    assert pace.reconfigure(limit=0, floor=MB, configured=0).rate == 0
    pace = DiskPace(limit=0.5, floor=MB, configured=0)
    pace.measured(latency=3.0, throughput=50 * MB)
    result = pace.reconfigure(limit=0.5, floor=MB, configured=20 * MB)
    assert (result.rate, result.adaptive) == (20 * MB, False)
    pace.measured(latency=3.0, throughput=50 * MB)
    assert pace.reconfigure(limit=0.5, floor=10 * MB, configured=20 * MB).rate == 14 * MB
    assert pace.reconfigure(limit=0.5, floor=16 * MB, configured=20 * MB).rate == 16 * MB


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        DiskPace(limit=-1, floor=MB, configured=0)
    with pytest.raises(ValueError):
        DiskPace(limit=1, floor=0, configured=0)


measurement = st.tuples(
    st.sampled_from(["measured", "overdue"]),
    st.floats(min_value=0, max_value=60, allow_nan=False),
    st.floats(min_value=0, max_value=10**10, allow_nan=False),
    st.integers(min_value=0, max_value=10**10),
)


@given(
    limit=st.floats(min_value=0.01, max_value=10),
    floor=st.integers(min_value=1, max_value=100 * MB),
    configured=st.integers(min_value=0, max_value=10**10),
    steps=st.lists(measurement, max_size=60),
)
def test_the_rate_stays_between_the_floor_and_download_rate(
    limit: float, floor: int, configured: int, steps: list[tuple[str, float, float, int]]
) -> None:
    pace = DiskPace(limit=limit, floor=floor, configured=configured)
    for kind, seconds, throughput, flushed in steps:
        before = pace.rate
        if kind == "measured":
            result = pace.measured(latency=seconds, throughput=throughput, flushed=flushed)
        else:
            result = pace.overdue(waited=seconds, throughput=throughput, flushed=flushed)
        assert result.rate == pace.rate
        assert result.changed == (result.rate != before)
        if configured:
            assert 0 < pace.rate <= configured
            assert pace.rate >= min(floor, configured)
        elif pace.rate:
            assert pace.rate >= floor
        if seconds > limit and before and pace.rate:
            assert pace.rate <= before  # a slow disk never speeds the download up
        if kind == "measured" and seconds <= limit and before:
            assert pace.rate == 0 or pace.rate >= before  # a fast disk never slows it down


def test_a_flush_too_quick_to_time_sets_a_bounded_early_flush() -> None:
    pace = DiskPace(limit=1.0, floor=1, configured=0)
    pace.measured(latency=1e-308, throughput=0, flushed=4 * 1024 * 1024)
    assert MIN_FLUSH_BYTES <= pace.flush_bytes <= MAX_FLUSH_BYTES
    pace.measured(latency=0.5, throughput=0, flushed=8 * 1024 * 1024)
    assert pace.flush_bytes == 16 * 1024 * 1024  # what the disk wrote in the limit's second
