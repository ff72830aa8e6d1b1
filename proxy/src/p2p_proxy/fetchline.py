"""The order in which one origin's large blobs are fetched (pure: every time is passed in).

A pull client asks for several layers at once (containerd: 3), and every node of a rollout
asks for the same ones. Fetched from the origin all at once, each layer gets a share of the
origin's rate: each one's chunks, and its last chunk (which waits for the whole blob's SHA-256),
arrive that many times later, and the swarm has nothing to trade meanwhile. Fetched one after
the other in the order asked, the first layer's chunks come at the origin's full rate and the
nodes trade it while the next one arrives (docs/scale.md, finding 8).

:class:`FetchLine` holds the large fetches of one origin: a fetch asks (:meth:`FetchLine.ask`)
and starts when :meth:`FetchLine.may_start` says so. At most ``width`` fetches *hold* the
line at once, in the order asked; a running fetch stops holding it, and lets the next one
start, when

- it is nearly done: what it still has to receive takes less than ``head_start`` seconds at
  the rate it has been receiving (the next request's round trips overlap its tail), or
- it stalls: nothing arrived for ``stall`` seconds (a slow or stuck origin connection never
  holds the others up for long; it holds the line again if it comes back).

A fetch that waited ``max_wait`` seconds starts whatever the line holds, so that a client
waiting for its answer (the agent waits up to 300 s for its first chunk, then asks the next
proxy) is answered before it gives up. Waiting is never refused: the fetch ahead is making
progress, or the waiting one soon starts anyway.

Small blobs (configs, small layers: below :data:`LARGE_BLOB`) and blobs of unknown size never
queue; the caller decides that (:func:`in_line`). The proxy wraps one line per origin in a trio
shell (:class:`p2p_proxy.limits.OriginLimits.fetch_line`); the simulator's proxy drives the same
class (tests.sim.scenario), so the rule measured there is the rule that runs.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

__all__ = [
    "HEAD_START_SECONDS",
    "LARGE_BLOB",
    "MAX_WAIT_SECONDS",
    "STALL_SECONDS",
    "FetchLine",
    "in_line",
    "no_progress",
]

LARGE_BLOB = 4 * 1024 * 1024
"""Blobs of at least this size (one chunk at the smallest piece length) wait in line; smaller
ones are fetched at once, beside the line."""
HEAD_START_SECONDS = 0.5
"""A running fetch lets the next one start when it has less than this left to receive."""
STALL_SECONDS = 5.0
"""A running fetch that received nothing for this long lets the next one start."""
MAX_WAIT_SECONDS = 120.0
"""A fetch that waited this long starts, whatever the line holds."""
RATE_AFTER_SECONDS = 0.25
"""A fetch's rate is measured once it has been receiving for this long."""


def in_line(size: int | None, width: int) -> bool:
    """Whether a fetch of a blob of ``size`` bytes waits in its origin's line."""
    return width > 0 and size is not None and size >= LARGE_BLOB


def no_progress(received: int) -> None:
    """The progress report of a fetch outside any line (nobody waits on it)."""


@dataclass
class _Entry:
    size: int
    asked: float
    started: float | None = None
    """When it started (None: waiting)."""
    received: int = 0
    first_byte: float | None = None
    last_byte: float = 0.0
    """When bytes last arrived (or it started)."""

    def holds(self, now: float, stall: float, head_start: float) -> bool:
        """Whether this running fetch holds its place in the line at ``now``."""
        if now >= self.last_byte + stall:  # the very sum next_change names
            return False
        left = self.size - self.received
        if left <= 0:
            return False
        if self.first_byte is None:
            return True
        elapsed = self.last_byte - self.first_byte
        if elapsed < RATE_AFTER_SECONDS:
            return True
        rate = self.received / elapsed
        return left > rate * head_start


class FetchLine:
    """The large fetches of one origin, waiting or running; see the module docstring.

    Keys are whatever names a fetch (the proxy: its single flight's key); one key is in the
    line at most once. Every method takes the current time; none keeps a clock.
    """

    def __init__(
        self,
        width: int = 1,
        *,
        head_start: float = HEAD_START_SECONDS,
        stall: float = STALL_SECONDS,
        max_wait: float = MAX_WAIT_SECONDS,
    ) -> None:
        if width < 1:
            raise ValueError("a line holds at least one fetch")
        self.width = width
        self.head_start = head_start
        self.stall = stall
        self.max_wait = max_wait
        self._entries: dict[Hashable, _Entry] = {}  # in the order asked

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def waiting(self) -> int:
        return sum(1 for entry in self._entries.values() if entry.started is None)

    @property
    def running(self) -> int:
        return sum(1 for entry in self._entries.values() if entry.started is not None)

    def ask(self, key: Hashable, size: int, now: float) -> bool:
        """A fetch of ``size`` bytes asks for its turn; True if it may start at once (it is
        then running)."""
        if key in self._entries:
            raise ValueError(f"{key!r} is in the line already")
        self._entries[key] = _Entry(size, now)
        return self.may_start(key, now)

    def may_start(self, key: Hashable, now: float) -> bool:
        """Whether waiting fetch ``key`` may start at ``now``; if so it is running from now on
        (True for one that runs already)."""
        entry = self._entries[key]
        if entry.started is not None:
            return True
        if now < entry.asked + self.max_wait:
            free = self.width - sum(
                1
                for other in self._entries.values()
                if other.started is not None and other.holds(now, self.stall, self.head_start)
            )
            ahead = 0
            for other_key, other in self._entries.items():
                if other_key == key:
                    break
                if other.started is None:
                    ahead += 1
            if ahead >= free:
                return False
        entry.started = entry.last_byte = now
        return True

    def progress(self, key: Hashable, received: int, now: float) -> bool:
        """Running fetch ``key`` has received ``received`` bytes in all at ``now``. True when
        it stopped holding the line just now (waiting fetches should look again)."""
        entry = self._entries[key]
        held = entry.holds(now, self.stall, self.head_start)
        if entry.first_byte is None:
            entry.first_byte = now
        entry.received = received
        entry.last_byte = now
        return held and not entry.holds(now, self.stall, self.head_start)

    def leave(self, key: Hashable) -> None:
        """Fetch ``key`` ended (done, failed, cancelled) or gave up waiting."""
        self._entries.pop(key, None)

    def next_change(self, now: float) -> float | None:
        """The earliest time after ``now`` at which a waiting fetch may start without any
        call in between (a running fetch stalls, a waiting one reaches ``max_wait``); None
        when nothing waits."""
        if not any(entry.started is None for entry in self._entries.values()):
            return None
        times = []
        for entry in self._entries.values():
            if entry.started is None:
                times.append(entry.asked + self.max_wait)
            elif entry.holds(now, self.stall, self.head_start):
                times.append(entry.last_byte + self.stall)
        return max(now, min(times))
