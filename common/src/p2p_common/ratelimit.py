"""Token-bucket rate limiting: a pure bucket and the trio limiter that shares it.

One :class:`RateLimiter` per direction per process is shared by every connection,
so ``downloadRate``/``uploadRate`` bound the node as a whole. The bucket runs "in
debt": a caller may take more than is available and then waits until the debt is
paid, so a single 4 MiB block and many 16 KiB blocks are limited alike and the
long-run rate is exact. The rate can change at any time (``helm upgrade``);
waiting callers re-check at once.
"""

from __future__ import annotations

import math

import trio


class TokenBucket:
    """Pure token bucket. ``rate`` in units per second; 0 means unlimited."""

    def __init__(self, rate: float, *, now: float, burst_seconds: float = 0.25) -> None:
        self._burst_seconds = burst_seconds
        self.rate = 0.0
        self.burst = 0.0
        self._tokens = 0.0
        self._stamp = now
        self.set_rate(rate, now=now)

    def set_rate(self, rate: float, *, now: float) -> None:
        if rate < 0 or math.isnan(rate):
            raise ValueError("rate must be >= 0")
        self._refill(now)
        self.rate = float(rate)
        self.burst = max(rate * self._burst_seconds, 16384.0) if rate else 0.0
        # Forgive debt on a change: waiting callers proceed under the new rate.
        self._tokens = min(max(self._tokens, 0.0), self.burst)

    def _refill(self, now: float) -> None:
        if self.rate and now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = max(self._stamp, now)

    def consume(self, amount: float, *, now: float) -> float:
        """Take ``amount`` tokens; returns the seconds to wait before using them (0 = now)."""
        if not self.rate:
            return 0.0
        self._refill(now)
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def wait_time(self, *, now: float) -> float:
        """Seconds until the bucket is out of debt."""
        if not self.rate:
            return 0.0
        self._refill(now)
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class RateLimiter:
    """Process-wide limiter shared by every connection of one direction."""

    def __init__(self, rate: float = 0) -> None:
        self._bucket = TokenBucket(rate, now=trio.current_time())
        self._changed = trio.Event()
        self.total = 0
        """Bytes that went through this limiter."""

    @property
    def rate(self) -> float:
        return self._bucket.rate

    def set_rate(self, rate: float) -> None:
        self._bucket.set_rate(rate, now=trio.current_time())
        self._changed.set()
        self._changed = trio.Event()

    async def acquire(self, amount: int) -> None:
        """Account for ``amount`` bytes, waiting as long as the rate requires.

        Always a cancellation point; a scheduling point only when it has to wait
        (this sits on the hot path of every block).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self.total += amount
        wait = self._bucket.consume(amount, now=trio.current_time())
        while wait > 0:
            changed = self._changed
            with trio.move_on_after(wait):
                await changed.wait()
            wait = self._bucket.wait_time(now=trio.current_time())
