"""Blocking file work for the engine: inline while the disk keeps up, in threads while it does not.

Checking a 256 KiB piece (SHA-1) and writing it into the page cache take a fraction of a
millisecond; handing each piece to a worker thread costs more than that in wake-ups and GIL
transfers between the event loop and the thread (tens of thousands of futex calls per GiB,
docs/benchmarks.md). So the work runs inline on the event loop. A disk that cannot keep up
makes ``pwrite`` block (the kernel throttles writers once too much is dirty), and inline that
would stall every connection of the process: when a call spends more than :data:`SLOW_BLOCKED`
seconds asleep in the kernel (wall time beyond its CPU time, with a voluntary context switch:
being preempted on a busy machine does not count), the runner moves the work to worker threads
for the next :data:`HOLD` seconds, where only the writers wait.

For the adaptive download limit (:mod:`p2p_common.diskpace`) the runner also notes, while
:attr:`DiskRunner.tracking` is on, which files were written since the last :meth:`DiskRunner.take`
(callers report them with :meth:`DiskRunner.wrote`) and the longest any call was blocked.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from typing import TypeVar

import trio

from p2p_common.logs import event

T = TypeVar("T")
log = logging.getLogger("p2p.disk")

SLOW_BLOCKED = 0.05
"""Seconds a call may spend blocked (not running) before file work moves to threads."""
HOLD = 30.0
"""Seconds file work stays in threads after a slow call."""


class DiskRunner:
    def __init__(self, *, threads: int = 4) -> None:
        self.limiter = trio.CapacityLimiter(threads)
        self.threaded_until = float("-inf")
        self.slow_calls = 0
        self.tracking = False
        """Note written files and blocked time for :meth:`take` (the adaptive limit is on)."""
        self._written: dict[int, int] = {}
        self.pending_bytes = 0
        """Bytes written since the last :meth:`take`."""
        self.flush_at = 0
        """:attr:`due` is set once :attr:`pending_bytes` reach this (0: never)."""
        self.due = trio.Event()
        self._worst_blocked = 0.0

    @property
    def threaded(self) -> bool:
        return trio.current_time() < self.threaded_until

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)``, inline or in a worker thread (see the module docstring)."""
        if self.threaded:
            if self.tracking:
                return await trio.to_thread.run_sync(
                    self._timed, function, args, limiter=self.limiter
                )
            return await trio.to_thread.run_sync(function, *args, limiter=self.limiter)
        sleeps = _voluntary_switches()
        wall, cpu = time.perf_counter(), time.thread_time()
        result = function(*args)
        blocked = (time.perf_counter() - wall) - (time.thread_time() - cpu)
        self._worst_blocked = max(self._worst_blocked, blocked)
        if blocked > SLOW_BLOCKED and _voluntary_switches() > sleeps:
            self.slow_calls += 1
            self.threaded_until = trio.current_time() + HOLD
            event(log, "disk.slow", logging.INFO, blocked=round(blocked, 3), threads_for=HOLD)
        return result

    def _timed(self, function: Callable[..., T], args: tuple[object, ...]) -> T:
        """(Worker thread.) ``function(*args)``, noting how long it was blocked."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return function(*args)
        finally:
            blocked = (time.perf_counter() - wall) - (time.thread_time() - cpu)
            self._worst_blocked = max(self._worst_blocked, blocked)  # a race loses one sample

    def wrote(self, fd: int, nbytes: int) -> None:
        """``nbytes`` were written to ``fd`` (call on the event loop, after the write)."""
        if self.tracking:
            self._written[fd] = self._written.get(fd, 0) + nbytes
            self.pending_bytes += nbytes
            if self.flush_at and self.pending_bytes >= self.flush_at:
                self.due.set()

    def take(self) -> tuple[dict[int, int], float]:
        """The files written since the last call (descriptor: bytes) and the longest time a
        call was blocked meanwhile; starts counting afresh."""
        written, self._written = self._written, {}
        self.pending_bytes = 0
        if self.due.is_set():
            self.due = trio.Event()
        blocked, self._worst_blocked = self._worst_blocked, 0.0
        return written, blocked


def _voluntary_switches() -> int:
    """How often this thread went to sleep in the kernel so far."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
