"""The adaptive download limit's shell: flush each second's writes, time it, apply the rate.

:class:`~p2p_common.diskpace.DiskPace` decides; this runs it. While ``diskWriteLatencyLimit`` is
set, the engine's disk runner notes the files the agent writes (swarm pieces, blobs streamed by a
proxy) and the longest a write was blocked. Once a second :class:`Pacer` takes that note,
``fdatasync``\\ s those files in a worker thread (through duplicated descriptors, so a file closed
meanwhile is no concern) and hands the latency to the core; a flush still running after the limit
lowers the rate at once, and again while it runs. A flush starts a second after the previous one
started, or earlier once the core's ``flush_bytes`` are written. The rate in force goes to the
engine's download limiter, which every download path shares.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import trio

from p2p_common.diskpace import DiskPace, Pace
from p2p_common.engine import Engine
from p2p_common.logs import event

log = logging.getLogger("p2p.agent.pacing")

TICK = 1.0
"""Most seconds between flushes."""
OVERDUE_CHECK = 0.1
"""Seconds between looks at a flush that has not finished."""


class Pacer:
    def __init__(
        self,
        engine: Engine,
        *,
        limit: float,
        floor: float,
        configured: float,
        on_change: Callable[[Pace], None],
        observe: Callable[[float], None] | None = None,
    ) -> None:
        """``on_change`` gets every new rate in force (after it was applied to the engine);
        ``observe`` every flush latency measured (a histogram)."""
        self.engine = engine
        self.disk = engine.shared.disk
        self.core = DiskPace(limit=limit, floor=floor, configured=configured, period=TICK)
        self.on_change = on_change
        self.observe = observe
        self.disk.tracking = bool(limit)
        self._was_adaptive = False

    @property
    def rate(self) -> float:
        return self.core.rate

    def reconfigure(self, *, limit: float, floor: float, configured: float) -> None:
        was_on = bool(self.core.limit)
        self._apply(self.core.reconfigure(limit=limit, floor=floor, configured=configured))
        self.disk.tracking = bool(limit)
        if was_on and not limit:
            self.disk.take()  # forget what was noted while on

    def _apply(self, pace: Pace) -> None:
        if not pace.changed:
            return
        self.engine.download_limiter.set_rate(pace.rate)
        toggled = pace.adaptive != self._was_adaptive
        self._was_adaptive = pace.adaptive
        event(  # INFO when the adaptive limit starts or ends holding the rate; each step DEBUG
            log,
            "rates.adaptive",
            logging.INFO if toggled else logging.DEBUG,
            downloadRate=round(pace.rate),
            adaptive=pace.adaptive,
            latency=round(self.core.last_latency, 3),
            limit=self.core.limit,
        )
        self.on_change(pace)

    async def run(self) -> None:
        """Flush :data:`TICK` seconds after the start of the previous flush (at once after one
        that took longer), or as soon as ``flush_bytes`` are written."""
        last = trio.current_time()
        while True:
            self.disk.flush_at = self.core.flush_bytes if self.core.limit else 0
            with trio.move_on_at(last + TICK):
                await self.disk.due.wait()
            now = trio.current_time()
            interval, last = max(now - last, 1e-3), now
            if not self.core.limit:
                continue
            written, blocked = self.disk.take()
            size = sum(written.values())
            throughput = size / interval
            took = await self._flush(list(written), throughput, size, interval)
            if written and self.observe is not None:
                self.observe(max(took, blocked))
            if blocked > took:  # a write waited longer than the flush: no disk speed from it
                pace = self.core.measured(latency=blocked, throughput=throughput)
            else:
                pace = self.core.measured(
                    latency=took, throughput=throughput, flushed=size, interval=interval
                )
            self._apply(pace)

    async def _flush(self, fds: list[int], throughput: float, size: int, interval: float) -> float:
        """``fdatasync`` the files ``fds`` (in a worker thread); the seconds it took."""
        copies = []
        for fd in fds:
            with contextlib.suppress(OSError):  # closed since it was written: nothing to do
                copies.append(os.dup(fd))
        if not copies:
            return 0.0
        started = trio.current_time()
        done = trio.Event()

        async def flush() -> None:
            try:
                await trio.to_thread.run_sync(_sync_and_close, copies, abandon_on_cancel=True)
            finally:
                done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush)
            while not done.is_set():
                with trio.move_on_after(OVERDUE_CHECK):
                    await done.wait()
                if not done.is_set():
                    waited = trio.current_time() - started
                    pace = self.core.overdue(
                        waited=waited, throughput=throughput, flushed=size, interval=interval
                    )
                    self._apply(pace)
        return trio.current_time() - started


def _sync_and_close(fds: list[int]) -> None:
    """(Worker thread.) Flush each file's data to the disk, then close the descriptors."""
    for fd in fds:
        try:
            os.fdatasync(fd)
        except OSError:
            pass  # EINVAL for a descriptor reused by a socket: nothing of ours to flush
        finally:
            os.close(fd)
