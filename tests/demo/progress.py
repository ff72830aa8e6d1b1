"""Live progress of the pulls: a compact table redrawn in place on a terminal, lines otherwise.

:class:`Board` holds one :class:`Lane` per agent (bytes done, total, start and end, failure);
the pull tasks update it and :meth:`Board.run` draws it every ``interval`` seconds until
cancelled. On a terminal the table is redrawn in place (ANSI cursor movement); when stdout is a
file or a pipe, a short status line is printed every few seconds and a line when an agent is done.
"""

from __future__ import annotations

import collections
import shutil
import time
from dataclasses import dataclass, field
from typing import TextIO

import trio

__all__ = ["Board", "Lane", "mb", "rate_text"]

MB = 1_000_000
RATE_WINDOW = 2.0
"""Seconds of history behind the current rate."""
BAR_WIDTH = 24


def mb(count: float) -> str:
    """Bytes as MB (10^6), one decimal."""
    return f"{count / MB:.1f}"


def rate_text(rate: float) -> str:
    return f"{rate / MB:7.1f} MB/s"


@dataclass
class Lane:
    """One agent's pull."""

    name: str
    total: int = 0
    done: int = 0
    started: float | None = None
    finished: float | None = None
    failed: str | None = None
    samples: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def begin(self, now: float | None = None) -> None:
        self.started = time.monotonic() if now is None else now

    def add(self, count: int) -> None:
        self.done += count

    def finish(self, now: float | None = None) -> None:
        self.finished = time.monotonic() if now is None else now

    @property
    def state(self) -> str:
        if self.failed is not None:
            return "failed"
        if self.finished is not None:
            return "done"
        if self.started is None:
            return "waiting"
        return "pulling" if self.total else "manifest"

    def sample(self, now: float) -> None:
        """Remember ``done`` at ``now`` for the rate; forget samples older than the window."""
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()

    def elapsed(self, now: float) -> float:
        if self.started is None:
            return 0.0
        return (self.finished if self.finished is not None else now) - self.started

    def rate(self, now: float) -> float:
        """Average rate once done; otherwise over the last :data:`RATE_WINDOW` seconds."""
        if self.finished is not None and self.started is not None:
            return self.done / max(self.finished - self.started, 1e-9)
        if len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


def _bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


class Board:
    """The progress of every agent; drawn to ``out`` (see the module docstring)."""

    def __init__(
        self,
        names: list[str],
        out: TextIO,
        *,
        interactive: bool,
        interval: float = 0.5,
        line_interval: float = 2.0,
    ) -> None:
        self.lanes = {name: Lane(name) for name in names}
        self.out = out
        self.interactive = interactive
        self.interval = interval
        self.line_interval = line_interval
        self.started = time.monotonic()
        self.overall = Lane("all")
        self.overall.begin(self.started)
        self._drawn = 0
        self._last_line = 0.0
        self._reported: set[str] = set()

    def lane(self, name: str) -> Lane:
        return self.lanes[name]

    # -- text ------------------------------------------------------------------------------------

    def table(self, now: float) -> list[str]:
        """The interactive table: one line per agent and a total."""
        width = max(len(name) for name in self.lanes)
        lines = []
        for lane in self.lanes.values():
            of = mb(lane.total) if lane.total else "?"
            lines.append(
                f"  {lane.name:<{width}}  {_bar(lane.fraction())} {lane.fraction():4.0%}"
                f"  {mb(lane.done):>7} / {of:>7} MB  {rate_text(lane.rate(now))}"
                f"  {lane.elapsed(now):5.1f} s  {lane.state}"
            )
        lane = self.overall
        of = mb(lane.total) if lane.total else "?"
        lines.append(
            f"  {'all':<{width}}  {_bar(lane.fraction())} {lane.fraction():4.0%}"
            f"  {mb(lane.done):>7} / {of:>7} MB  {rate_text(lane.rate(now))}"
            f"  {lane.elapsed(now):5.1f} s"
        )
        return lines

    def status_line(self, now: float) -> str:
        """The plain-output status line: elapsed, total progress, and each agent's percentage."""
        lane = self.overall
        each = " ".join(f"{x.name} {x.fraction():.0%}" for x in self.lanes.values())
        return (
            f"  {lane.elapsed(now):5.1f} s  {mb(lane.done)}/{mb(lane.total) if lane.total else '?'}"
            f" MB  {lane.rate(now) / MB:.1f} MB/s  | {each}"
        )

    # -- drawing ---------------------------------------------------------------------------------

    def draw(self, now: float | None = None) -> None:
        """Sample the rates and draw once."""
        now = time.monotonic() if now is None else now
        lanes = list(self.lanes.values())
        overall = self.overall
        overall.done = sum(lane.done for lane in lanes)
        overall.total = sum(lane.total for lane in lanes)
        if overall.finished is None and all(lane.finished is not None for lane in lanes):
            overall.finish(max(lane.finished or now for lane in lanes))
        for lane in [*lanes, overall]:
            lane.sample(now)
        if self.interactive:
            # Lines must not wrap, or moving back up over them goes wrong.
            width = shutil.get_terminal_size().columns - 1
            lines = [line[:width] for line in self.table(now)]
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            self._drawn = len(lines)
        else:
            for lane in self.lanes.values():
                if lane.finished is not None and lane.name not in self._reported:
                    self._reported.add(lane.name)
                    self.out.write(
                        f"  {lane.name} done: {mb(lane.done)} MB in {lane.elapsed(now):.2f} s"
                        f" ({lane.rate(now) / MB:.1f} MB/s)\n"
                    )
            if self.overall.total and now - self._last_line >= self.line_interval:
                self._last_line = now
                self.out.write(self.status_line(now) + "\n")
        self.out.flush()

    def final(self) -> None:
        """The last drawing, when every pull has ended."""
        now = time.monotonic()
        if self.interactive:
            self.draw(now)
        else:
            self._last_line = 0.0
            self.draw(now)

    async def run(self) -> None:
        """Draw every ``interval`` seconds until cancelled."""
        while True:
            self.draw()
            await trio.sleep(self.interval)
