"""The adaptive download limit: slower downloads while the node's disk cannot keep up (sans-IO).

A download can reach a node faster than its disk absorbs it. The writes then pile up in the page
cache and reach the disk later in one long burst, during which every other writer on the node
(containerd unpacking the very layers being pulled, the kubelet, etcd on a control-plane node)
waits. ``downloadRate`` caps that by a fixed number, which is either too low for a fast disk or
too high for a slow one. The adaptive limit measures instead: each second the agent flushes what
it wrote in that second (``fdatasync``) and times it, with the time any of its writes were blocked
in the kernel. That latency is the feedback :class:`DiskPace` turns into the download rate in
force:

- above ``limit`` seconds, the rate drops to :data:`DECREASE` times the lowest of: the rate in
  force, what was downloaded, and the rate at which the flush would have taken ``limit`` seconds
  (from the disk's speed the flush showed: bytes flushed over its time); a flush still running
  after the limit lowers it already, and again each further limit it runs, from that estimate
  (which only falls while it runs) rather than again from the rate in force;
- below the limit it grows, by up to :data:`INCREASE` a second, the more the further below
  (seconds without writes count as far below), until it reaches ``downloadRate`` again, or,
  with ``downloadRate`` unlimited, twice the rate the disk was first found too slow at: then
  the adaptive limit is lifted.

Flushing each second bounds what is in flight to about one second of downloading, so the latency
reads about ``rate / disk bandwidth`` seconds: a limit of 0.5 keeps the agent to about half of
what the disk can write, leaving the rest to everyone else. The shell flushes earlier once
:attr:`DiskPace.flush_bytes` are written (4 MiB before the disk's speed is known), so a fast
download meets the measurement after megabytes, not after a second of ``downloadRate``; latencies
of such shorter flushes are scaled to a second of writing before they are compared. This class
keeps no clock and does no I/O: the agent's shell (``p2p_agent.pacing``) feeds it measurements
and applies the rate.
"""

from __future__ import annotations

from dataclasses import dataclass

DECREASE = 0.7
"""Factor the rate drops by when the disk is too slow."""
MIN_FLUSH_BYTES = 4 * 1024 * 1024
"""The least written before a flush that is early (before a ``period`` is over)."""
MAX_FLUSH_BYTES = 1 << 30
"""... and the most (a fast disk: a flush a second, by the clock, long before this)."""
INCREASE = 1.25
"""Most the rate grows by in one measurement (with the flush far below the limit)."""


@dataclass(frozen=True)
class Pace:
    """The download rate in force after a measurement."""

    rate: float
    """Bytes per second; 0 = unlimited."""
    adaptive: bool
    """The adaptive limit is what holds the rate (below ``downloadRate``)."""
    changed: bool


class DiskPace:
    """Turns flush latencies into a download rate (see the module docstring).

    ``limit`` is the latency in seconds beyond which the disk counts as overloaded (0 turns the
    adaptive limit off: :attr:`rate` is then always ``configured``); ``floor`` the lowest rate
    it sets (bytes per second, > 0); ``configured`` the ``downloadRate`` (0 = unlimited);
    ``period`` the seconds of writing one flush covers.
    """

    def __init__(
        self, *, limit: float, floor: float, configured: float, period: float = 1.0
    ) -> None:
        _check(limit, floor, configured)
        self.limit = limit
        self.floor = floor
        self.configured = configured
        self.period = period
        """Seconds of writing each flush covers."""
        self.adaptive: float | None = None
        """The adaptive limit while one holds (bytes per second), else None."""
        self.lift_at = 0.0
        """With ``configured`` unlimited: the adaptive limit is lifted once it grows past this."""
        self.last_latency = 0.0
        self.cuts = 0
        """How often the rate was lowered."""
        self._overdue = False
        """The flush being measured ran overdue (and lowered the rate while it ran)."""
        self.flush_bytes = MIN_FLUSH_BYTES
        """Flush as soon as this much is written (the disk takes about ``limit`` seconds for it,
        as far as the last flush showed), not only once a ``period``: what a download can write
        before the first measurement is bounded by this, not by a second of ``downloadRate``."""

    @property
    def rate(self) -> float:
        """The download rate in force (0 = unlimited)."""
        if self.adaptive is None:
            return self.configured
        return self.adaptive

    def reconfigure(self, *, limit: float, floor: float, configured: float) -> Pace:
        """New settings (a live reload). Turning the limit off, or a ``downloadRate`` below the
        adaptive limit, ends the adaptive limit."""
        _check(limit, floor, configured)
        before = self.rate
        self.limit, self.floor, self.configured = limit, floor, configured
        if self.adaptive is not None and (
            not limit or (configured and self.adaptive >= configured)
        ):
            self.adaptive = None
        elif self.adaptive is not None:
            self.adaptive = max(self.adaptive, floor)
        return self._pace(before)

    def measured(
        self, *, latency: float, throughput: float, flushed: int = 0, interval: float | None = None
    ) -> Pace:
        """A flush of ``flushed`` bytes, written over the last ``interval`` seconds (default:
        ``period``), took ``latency`` seconds (or a write was blocked that long);
        ``throughput`` bytes per second were written meanwhile (0 = nothing)."""
        before = self.rate
        self.last_latency = latency
        overdue, self._overdue = self._overdue, False
        if not self.limit:
            return self._pace(before)
        if flushed >= MIN_FLUSH_BYTES and latency > 0:
            worth = flushed / max(latency, 1e-6) * self.limit  # what the disk writes in ``limit``
            self.flush_bytes = int(min(MAX_FLUSH_BYTES, max(MIN_FLUSH_BYTES, worth)))
        latency = self._per_period(latency, interval)
        if latency > self.limit:
            if not overdue:  # a flush that ran overdue was accounted for while it ran
                self._cut(throughput, flushed / latency, keep_current=True)
        elif self.adaptive is not None:
            headroom = (self.limit - latency) / self.limit
            grown = self.adaptive * (1 + (INCREASE - 1) * headroom)
            ceiling = self.configured or self.lift_at
            self.adaptive = None if grown >= ceiling else max(grown, self.floor)
        return self._pace(before)

    def overdue(
        self, *, waited: float, throughput: float, flushed: int = 0, interval: float | None = None
    ) -> Pace:
        """A flush of ``flushed`` bytes (``interval`` seconds of writing) has run for ``waited``
        seconds and is not done: beyond the limit the disk is too slow already (the shell calls
        this again and again while it runs)."""
        before = self.rate
        if self.limit and self._per_period(waited, interval) > self.limit:
            self.last_latency = max(self.last_latency, waited)
            self._cut(throughput, flushed / waited, keep_current=not self._overdue)
            self._overdue = True
        return self._pace(before)

    def _per_period(self, seconds: float, interval: float | None) -> float:
        """Flush time for ``interval`` seconds of writing, scaled to ``period`` seconds."""
        if interval is None:
            return seconds
        return seconds * self.period / max(interval, self.period / 8)

    def _cut(self, throughput: float, disk_speed: float, *, keep_current: bool) -> None:
        """Lower the rate (see the module docstring). ``disk_speed``: bytes per second the
        flush reached (0 = unknown); ``keep_current``: scale from the rate in force too."""
        candidates = []
        if throughput > 0:
            candidates.append(throughput)
        if disk_speed > 0:
            candidates.append(disk_speed * self.limit / self.period)
        current = self.rate
        if keep_current and current:
            candidates.append(current)
        if not candidates:
            return  # unlimited and nothing measured: nothing to scale down from
        base = min(candidates)
        if self.adaptive is None and not self.configured:
            self.lift_at = 2 * max(throughput, base)
        lowered = max(self.floor, base * DECREASE)
        if current:
            lowered = min(lowered, current)
        self.adaptive = lowered
        self.cuts += 1

    def _pace(self, before: float) -> Pace:
        rate = self.rate
        return Pace(rate=rate, adaptive=self.adaptive is not None, changed=rate != before)


def _check(limit: float, floor: float, configured: float) -> None:
    if limit < 0 or floor <= 0 or configured < 0:
        raise ValueError("limit >= 0, floor > 0 and configured >= 0 are required")
