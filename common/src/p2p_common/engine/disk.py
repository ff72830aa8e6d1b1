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

    @property
    def threaded(self) -> bool:
        return trio.current_time() < self.threaded_until

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)``, inline or in a worker thread (see the module docstring)."""
        if self.threaded:
            return await trio.to_thread.run_sync(function, *args, limiter=self.limiter)
        sleeps = _voluntary_switches()
        wall, cpu = time.perf_counter(), time.thread_time()
        result = function(*args)
        blocked = (time.perf_counter() - wall) - (time.thread_time() - cpu)
        if blocked > SLOW_BLOCKED and _voluntary_switches() > sleeps:
            self.slow_calls += 1
            self.threaded_until = trio.current_time() + HOLD
            event(log, "disk.slow", logging.INFO, blocked=round(blocked, 3), threads_for=HOLD)
        return result


def _voluntary_switches() -> int:
    """How often this thread went to sleep in the kernel so far."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
