"""Rate limiting (p2p_common.ratelimit): the pure token bucket, and the trio limiter on a
mock clock."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from p2p_common.ratelimit import RateLimiter, TokenBucket

# --- TokenBucket ---------------------------------------------------------------------------------


def test_rate_zero_is_unlimited() -> None:
    bucket = TokenBucket(0, now=0.0)
    assert bucket.consume(10**12, now=0.0) == 0.0
    assert bucket.wait_time(now=0.0) == 0.0
    assert bucket.burst == 0.0


def test_a_new_bucket_starts_empty_so_the_first_take_waits_amount_over_rate() -> None:
    bucket = TokenBucket(1000, now=5.0)
    assert bucket.consume(500, now=5.0) == pytest.approx(0.5)


def test_debt_is_paid_off_at_the_rate() -> None:
    bucket = TokenBucket(1000, now=0.0)
    assert bucket.consume(3000, now=0.0) == pytest.approx(3.0)
    assert bucket.wait_time(now=1.0) == pytest.approx(2.0)
    assert bucket.wait_time(now=2.5) == pytest.approx(0.5)
    assert bucket.wait_time(now=3.0) == 0.0
    # Further takes queue behind the debt.
    assert bucket.consume(1000, now=3.0) == pytest.approx(1.0)


def test_consecutive_takes_add_up_to_total_over_rate() -> None:
    bucket = TokenBucket(16384 * 4, now=0.0)
    waits = [bucket.consume(16384, now=0.0) for _ in range(8)]
    assert waits == pytest.approx([(i + 1) * 0.25 for i in range(8)])


@pytest.mark.parametrize(("rate", "burst"), [(1_000_000.0, 250_000.0), (1000.0, 16384.0)])
def test_idle_time_earns_at_most_the_burst(rate: float, burst: float) -> None:
    bucket = TokenBucket(rate, now=0.0)
    assert bucket.burst == burst  # a quarter second of rate, at least one 16 KiB block
    assert bucket.consume(burst, now=1000.0) == 0.0
    assert bucket.consume(rate, now=1000.0) == pytest.approx(1.0)


def test_partial_refill_covers_a_take_without_waiting() -> None:
    bucket = TokenBucket(1_000_000, now=0.0)
    assert bucket.consume(100_000, now=0.2) == 0.0  # earned 200 000 in 0.2 s
    assert bucket.consume(100_000, now=0.2) == 0.0
    assert bucket.consume(100_000, now=0.2) == pytest.approx(0.1)


def test_set_rate_forgives_debt_and_applies_the_new_rate() -> None:
    bucket = TokenBucket(1000, now=0.0)
    bucket.consume(10_000, now=0.0)
    bucket.set_rate(2000, now=1.0)
    assert bucket.wait_time(now=1.0) == 0.0
    assert bucket.rate == 2000.0
    assert bucket.consume(1000, now=1.0) == pytest.approx(0.5)


def test_set_rate_caps_saved_tokens_at_the_new_burst() -> None:
    bucket = TokenBucket(1_000_000, now=0.0)
    bucket.set_rate(1000, now=100.0)  # 250 000 saved; the new burst is 16 384
    assert bucket.consume(16384, now=100.0) == 0.0
    assert bucket.consume(1000, now=100.0) == pytest.approx(1.0)


def test_set_rate_to_unlimited_and_back() -> None:
    bucket = TokenBucket(1000, now=0.0)
    bucket.consume(5000, now=0.0)
    bucket.set_rate(0, now=0.0)
    assert bucket.consume(10**9, now=0.0) == 0.0
    bucket.set_rate(1000, now=10.0)
    assert bucket.consume(1000, now=10.0) == pytest.approx(1.0)


def test_time_going_backwards_earns_nothing() -> None:
    bucket = TokenBucket(1000, now=10.0)
    bucket.consume(1000, now=10.0)
    assert bucket.wait_time(now=5.0) == pytest.approx(1.0)
    assert bucket.wait_time(now=10.5) == pytest.approx(0.5)


@pytest.mark.parametrize("rate", [-1.0, math.nan])
def test_negative_or_nan_rates_are_refused(rate: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, now=0.0)
    bucket = TokenBucket(1000, now=0.0)
    with pytest.raises(ValueError):
        bucket.set_rate(rate, now=0.0)
    assert bucket.rate == 1000.0


# --- RateLimiter on trio's mock clock ------------------------------------------------------------


async def test_sequential_acquires_take_total_over_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(100_000)
    start = trio.current_time()
    for _ in range(20):
        await limiter.acquire(50_000)
    elapsed = trio.current_time() - start
    assert elapsed == pytest.approx(20 * 50_000 / 100_000, rel=0.05)
    assert limiter.total == 1_000_000


async def test_concurrent_acquirers_share_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    rate = 64 * 1024
    limiter = RateLimiter(rate)
    start = trio.current_time()
    granted: list[float] = []  # when each 16 KiB acquire returned

    async def connection() -> None:
        for _ in range(16):
            await limiter.acquire(16 * 1024)
            granted.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(connection)
    # 4 x 16 x 16 KiB = 1 MiB at 64 KiB/s: 16 s for all of them together, not 4 s each.
    assert max(granted) == pytest.approx(16.0, rel=0.05)
    # At no moment has more gone through than the rate allows (the bucket starts empty).
    for count, when in enumerate(sorted(granted), start=1):
        assert count * 16 * 1024 <= rate * when + 1e-6
    assert limiter.total == 1024 * 1024


async def test_unlimited_limiter_never_waits(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter()
    start = trio.current_time()
    for _ in range(100):
        await limiter.acquire(1 << 30)
    assert trio.current_time() == start
    assert limiter.rate == 0.0


async def test_raising_to_unlimited_releases_waiters_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(1000)
    start = trio.current_time()
    done: list[float] = []

    async def waiter() -> None:
        await limiter.acquire(100_000)  # 100 s at 1000 B/s
        done.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(waiter)
        await trio.sleep(2.0)
        assert done == []
        limiter.set_rate(0)
    assert done == pytest.approx([2.0, 2.0])


async def test_a_new_finite_rate_applies_to_waiters_promptly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(1000)
    start = trio.current_time()
    done: list[float] = []

    async def waiter() -> None:
        await limiter.acquire(100_000)
        await limiter.acquire(100_000)
        done.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(1.0)
        limiter.set_rate(100_000)
    # The debt is forgiven at t=1, the second 100 000 bytes take 1 s at the new rate:
    # far sooner than the 200 s the old rate needed.
    assert done == pytest.approx([2.0], abs=0.05)
    assert limiter.rate == 100_000.0


async def test_acquire_in_a_cancelled_scope_raises_and_counts_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter()
    with trio.CancelScope() as scope:
        scope.cancel()
        await limiter.acquire(10)
        pytest.fail("acquire() should have been cancelled")
    assert scope.cancelled_caught
    assert limiter.total == 0


async def test_a_waiting_acquire_can_be_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1000)
    start = trio.current_time()
    with trio.move_on_after(3.0) as scope:
        await limiter.acquire(100_000)
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(3.0)
