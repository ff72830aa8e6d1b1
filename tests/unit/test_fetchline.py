"""The order of an origin's large fetches (p2p_proxy.fetchline): one (``width``) at a time, in
the order asked; the next starts when the one ahead is nearly done, stalls, or the next one
waited ``max_wait``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_proxy.fetchline import (
    HEAD_START_SECONDS,
    LARGE_BLOB,
    STALL_SECONDS,
    FetchLine,
    in_line,
)

MB = 1_000_000


def test_only_large_blobs_of_known_size_wait_in_line() -> None:
    assert in_line(LARGE_BLOB, 1)
    assert not in_line(LARGE_BLOB - 1, 1)
    assert not in_line(None, 1)
    assert not in_line(100 * MB, 0)  # largeFetchesPerOrigin 0: no order


def test_the_first_fetch_starts_and_the_next_waits_until_the_first_is_nearly_done() -> None:
    line = FetchLine(1)
    assert line.ask("a", 100 * MB, 0.0)
    assert not line.ask("b", 100 * MB, 0.0)
    assert (line.running, line.waiting) == (1, 1)
    # 10 MB/s: the first 99 MB take 9.9 s; 1 MB (0.1 s) left is under the head start.
    for t in range(1, 10):
        assert not line.progress("a", t * 10 * MB, float(t))
        assert not line.may_start("b", float(t))
    assert line.progress("a", 99 * MB, 9.9)
    assert line.may_start("b", 9.9)
    assert (line.running, line.waiting) == (2, 0)


def test_the_head_start_is_measured_at_the_rate_the_fetch_receives() -> None:
    line = FetchLine(1)
    line.ask("a", 100 * MB, 0.0)
    line.ask("b", 100 * MB, 0.0)
    line.progress("a", 1, 1.0)  # first byte after a second of round trips
    line.progress("a", 90 * MB, 10.0)  # 10 MB/s since: 10 MB left is a second
    assert not line.may_start("b", 10.0)
    left = 10 * MB * HEAD_START_SECONDS / 1.0
    assert line.progress("a", 100 * MB - int(left) + 1, 10.0 + 1.0 - HEAD_START_SECONDS)
    assert line.may_start("b", 10.6)


def test_fetches_start_in_the_order_asked() -> None:
    line = FetchLine(1)
    line.ask("a", 50 * MB, 0.0)
    for n, key in enumerate("bcd"):
        assert not line.ask(key, 50 * MB, 0.1 * (n + 1))
    line.leave("a")
    assert not line.may_start("c", 1.0)
    assert not line.may_start("d", 1.0)
    assert line.may_start("b", 1.0)
    assert not line.may_start("d", 1.0)
    line.leave("b")
    assert line.may_start("c", 2.0)


def test_a_wider_line_runs_that_many_at_once() -> None:
    line = FetchLine(2)
    assert line.ask("a", 50 * MB, 0.0)
    assert line.ask("b", 50 * MB, 0.0)
    assert not line.ask("c", 50 * MB, 0.0)
    line.leave("b")
    assert line.may_start("c", 0.5)


def test_a_stalled_fetch_lets_the_next_start_and_holds_again_when_it_resumes() -> None:
    line = FetchLine(1)
    line.ask("a", 50 * MB, 0.0)
    line.progress("a", 1 * MB, 1.0)
    line.ask("b", 50 * MB, 1.0)
    line.ask("c", 50 * MB, 1.0)
    assert line.next_change(1.0) == 1.0 + STALL_SECONDS
    assert not line.may_start("b", 1.0 + STALL_SECONDS - 0.01)
    assert line.may_start("b", 1.0 + STALL_SECONDS)
    # "a" comes back: it and "b" both hold the line, so "c" waits for both.
    line.progress("a", 2 * MB, 7.0)
    line.progress("b", 1 * MB, 7.0)
    assert not line.may_start("c", 7.5)
    line.leave("b")
    assert not line.may_start("c", 8.0)
    line.leave("a")
    assert line.may_start("c", 8.0)


def test_a_fetch_that_never_answers_counts_as_stalled_from_its_start() -> None:
    line = FetchLine(1)
    line.ask("a", 50 * MB, 0.0)
    line.ask("b", 50 * MB, 2.0)
    assert line.next_change(2.0) == STALL_SECONDS
    assert line.may_start("b", STALL_SECONDS)


def test_a_fetch_that_waited_max_wait_starts_whatever_the_line_holds() -> None:
    line = FetchLine(1, max_wait=30.0)
    line.ask("a", 10_000 * MB, 0.0)
    line.ask("b", 50 * MB, 0.0)
    line.ask("c", 50 * MB, 10.0)
    for t in range(1, 30):
        line.progress("a", t * MB, float(t))
    assert line.next_change(29.0) == 30.0
    assert not line.may_start("c", 29.9)
    assert line.may_start("b", 30.0)
    for t in range(30, 40):
        line.progress("a", t * MB, float(t))
        line.progress("b", (t - 29) * MB, float(t))
    assert not line.may_start("c", 39.0)
    assert line.may_start("c", 40.0)


def test_nothing_waiting_means_no_change_to_wait_for_and_a_key_is_asked_once() -> None:
    line = FetchLine(1)
    assert line.next_change(0.0) is None
    line.ask("a", 50 * MB, 0.0)
    assert line.next_change(0.0) is None
    with pytest.raises(ValueError):
        line.ask("a", 50 * MB, 1.0)
    line.leave("a")
    line.leave("a")  # leaving twice is harmless (a cancelled wait, then the block's end)
    assert len(line) == 0
    with pytest.raises(ValueError):
        FetchLine(0)


ops = st.lists(
    st.tuples(
        st.sampled_from(["ask", "progress", "leave", "look", "tick"]),
        st.integers(0, 5),
        st.floats(0.0, 40.0),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 3), steps=ops)
def test_a_fetch_starts_only_in_its_turn_and_no_fetch_waits_past_the_next_change(
    width: int, steps: list[tuple[str, int, float]]
) -> None:
    line = FetchLine(width, max_wait=60.0)
    now = 0.0
    asked: dict[int, float] = {}  # waiting, by key, in the order asked
    running: dict[int, int] = {}  # bytes received
    size = 50 * MB

    def holding() -> int:
        return sum(
            1 for key in running if line._entries[key].holds(now, line.stall, line.head_start)
        )

    def look(key: int) -> None:
        free = width - holding()
        ahead = list(asked).index(key)
        started = line.may_start(key, now)
        expired = now >= asked[key] + 60.0
        # It starts exactly when it is within the free places of the line, or waited too long.
        assert started == (expired or ahead < free)
        if started:
            del asked[key]
            running[key] = 0

    for op, key, amount in steps:
        if op == "tick":
            now += amount
        elif op == "ask" and key not in asked and key not in running:
            asked[key] = now
            if line.ask(key, size, now):
                del asked[key]
                running[key] = 0
        elif op == "progress" and key in running:
            running[key] = min(size, running[key] + int(amount * MB))
            line.progress(key, running[key], now)
        elif op == "leave" and (key in running or key in asked):
            line.leave(key)
            running.pop(key, None)
            asked.pop(key, None)
        elif op == "look" and key in asked:
            look(key)
        assert (line.running, line.waiting) == (len(running), len(asked))
        # Liveness: with nothing else happening, the first waiting one starts at one of the
        # next changes (each later than the one before; at the latest at max_wait).
        change = line.next_change(now)
        assert (change is None) == (not asked)
        if change is not None:
            first = next(iter(asked))
            probe = FetchLine(width, max_wait=60.0)
            probe._entries = {k: type(e)(**vars(e)) for k, e in line._entries.items()}
            at = now
            for _ in range(len(running) + 2):
                later = probe.next_change(at)
                assert later is not None
                assert later >= at
                at = later
                if probe.may_start(first, at):
                    break
            else:
                raise AssertionError("the first waiting fetch never starts")
            assert at <= max(now, asked[first] + 60.0)
