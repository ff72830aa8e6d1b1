"""Virtual time: a heap of events, each a callback and its arguments.

Events at the same instant run in the order they were scheduled (a sequence number breaks
ties), and callbacks asked for "now" (:meth:`Loop.soon`) run, in order, after the current
event and before time moves on; so a run is a pure function of its inputs and its random
seed. Nothing is ever removed from the heap: callers that may want to cancel keep a version
number and ignore stale events.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable
from typing import Any


class Loop:
    __slots__ = ("_heap", "_ready", "_seq", "events", "now", "stopped")

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._ready: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._seq = 0
        self.events = 0
        """Events run so far."""
        self.stopped = False
        """Set by a callback to end :meth:`run` after the current event."""

    def at(self, when: float, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` at virtual time ``when`` (never before now)."""
        self._seq += 1
        if when < self.now:
            when = self.now
        heapq.heappush(self._heap, (when, self._seq, callback, args))

    def after(self, delay: float, callback: Callable[..., Any], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (self.now + delay, self._seq, callback, args))

    def soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """At the current instant, after the event that is running."""
        self._ready.append((callback, args))

    @property
    def pending(self) -> int:
        return len(self._heap) + len(self._ready)

    def run(self, until: float) -> None:
        """Run events in time order until ``until`` (virtual seconds), until none are left,
        or until a callback sets :attr:`stopped`."""
        heap, ready = self._heap, self._ready
        pop, popleft = heapq.heappop, ready.popleft
        count = 0
        try:
            while not self.stopped:
                if ready:
                    callback, args = popleft()
                else:
                    if not heap:
                        return
                    when = heap[0][0]
                    if when > until:
                        self.now = until
                        return
                    _, _, callback, args = pop(heap)
                    self.now = when
                count += 1
                callback(*args)
        finally:
            self.events += count
