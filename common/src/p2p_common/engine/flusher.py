"""HAVE messages held back a moment, woken by one timer for the whole process."""

from __future__ import annotations

from collections.abc import Callable

import trio

HAVE_DELAY = 0.01
"""Seconds HAVE messages may wait for company (a block takes about this long at 25 MB/s)."""


class Flusher:
    """Wakes the writers that hold back HAVEs, :data:`HAVE_DELAY` after the first was queued.

    One timer for the whole process rather than one per connection: in trio every expired
    timer is a cancellation, and per connection and batch those cost more than the HAVEs."""

    def __init__(self, delay: float = HAVE_DELAY) -> None:
        self.delay = delay
        self._pending: list[Callable[[], None]] = []
        self._queued = trio.Event()

    def later(self, flush: Callable[[], None]) -> None:
        self._pending.append(flush)
        self._queued.set()

    async def run(self) -> None:
        while True:
            await self._queued.wait()
            await trio.sleep(self.delay)
            self._queued = trio.Event()
            pending, self._pending = self._pending, []
            for flush in pending:
                flush()
