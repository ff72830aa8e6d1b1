"""The cache janitor: keeps the agent's cache within its policy (quota, filesystem watermarks,
expiry), and carries out an operator's ``rm`` and ``prune``.

A sweep takes a snapshot of the cache (blobs with sizes and last uses, pins, reservations) and
of its filesystem, asks the pure decision (:func:`p2p_common.cachepolicy.decide`) what to
evict, and deletes in a worker thread through :meth:`BlobCache.evict`, which checks the pins
again at the moment of deletion: a blob a client started reading meanwhile stays. Back on the
event loop every evicted blob is handed to ``notify`` (the downloads stop seeding it).

:meth:`Janitor.run` sweeps every ``interval`` seconds (the agent's ``cacheSweepInterval``,
:data:`SWEEP_SECONDS` by default), and soon after :meth:`Janitor.poke` (a download completed,
the policy changed). One lock serialises sweeps and operator actions.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from p2p_common.blobcache import BlobCache, CacheSnapshot
from p2p_common.cachepolicy import (
    CachePolicy,
    Decision,
    Disk,
    Eviction,
    decide,
    draining_after,
    select_operator,
)
from p2p_common.logs import event
from p2p_common.metrics import filesystem_usage

__all__ = ["SWEEP_SECONDS", "Janitor", "PolicyInForce", "Removal", "SweepResult"]

log = logging.getLogger("p2p.agent.cache")

SWEEP_SECONDS = 30.0
"""Seconds between two sweeps when nothing pokes the janitor (the default of the agent's
``cacheSweepInterval``)."""
MIN_SWEEP_GAP = 1.0
"""Seconds at least between two sweeps, however often it is poked (a burst of completed
downloads)."""
RELEASE_SECONDS = 10.0
"""Longest wait, after an eviction, for the torrents of the evicted blobs to close their files:
a deleted file's space comes back only then, and a sweep that measured the filesystem before
would evict more than it needs to."""

Usage = Callable[[os.PathLike[str] | str], tuple[int, int] | None]


@dataclass
class PolicyInForce:
    """The cache policy the janitor applies, and where it came from (for ``/status``)."""

    policy: CachePolicy
    source: str
    changed_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class SweepResult:
    evicted: list[Eviction]
    """What was deleted (blobs a reader pinned in the meantime are not in it)."""
    decision: Decision
    disk: Disk | None
    """The filesystem before the sweep."""
    at: float
    partials_removed: list[str] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.evicted)

    def view(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3),
            "evicted": [
                {"digest": e.digest, "size": e.size, "reason": e.reason} for e in self.evicted
            ],
            "freed_bytes": self.freed,
            "quota_unmet": self.decision.quota_unmet,
            "watermark_unmet": self.decision.watermark_unmet,
            "skipped_in_use": len(self.decision.evictions) - len(self.evicted),
            "partials_removed": self.partials_removed,
        }


@dataclass(frozen=True)
class Removal:
    """The outcome of an operator's ``rm``."""

    status: str
    """``removed`` (a blob), ``removed_partial`` (files of an interrupted download),
    ``in_use`` (refused) or ``unknown`` (nothing of that digest here)."""
    bytes: int = 0
    pins: int = 0


class Janitor:
    def __init__(
        self,
        cache: BlobCache,
        data_dir: os.PathLike[str] | str,
        policy: PolicyInForce,
        *,
        notify: Callable[[str], object] = lambda digest: None,
        downloading: Callable[[], set[str]] = set,
        clock: Callable[[], float] = time.time,
        usage: Usage = filesystem_usage,
        interval: float = SWEEP_SECONDS,
    ) -> None:
        self.cache = cache
        self.data_dir = data_dir
        self.in_force = policy
        self.notify = notify
        """Called on the event loop with every evicted digest; may return a :class:`trio.Event`
        that is set once the blob's file is closed (it was being seeded)."""
        self.interval = interval
        """Seconds between sweeps (applies from the next one)."""
        self.downloading = downloading
        """Digests whose downloads run now (their partial files are never removed)."""
        self.clock = clock
        self.usage = usage
        self.last: SweepResult | None = None
        """The last policy sweep."""
        self.unmet = {"quota": False, "watermark": False}
        """Which limits the last sweep could not meet (everything left is in use)."""
        self.draining = False
        """The filesystem crossed the high watermark and no sweep has found it at the low one
        since: sweeps keep evicting toward the low one (cachepolicy.draining_after)."""
        self._lock = trio.Lock()
        self._wake = trio.Event()
        cache.quota = policy.policy.quota

    # -- the policy ------------------------------------------------------------------------------

    def set_policy(self, policy: CachePolicy, source: str) -> bool:
        """Apply a new policy (a reloaded config file) from the next sweep on, which comes
        soon; returns whether it differs from the one in force."""
        if policy == self.in_force.policy:
            return False
        self.in_force = PolicyInForce(policy, source, self.clock())
        self.cache.quota = policy.quota
        self.poke()
        return True

    def poke(self) -> None:
        """Sweep soon (a download completed, the policy changed)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            try:
                await self.sweep()
            except OSError as exc:  # the data dir unreadable now: try again next time
                event(log, "cache.sweep_failed", logging.ERROR, error=str(exc))
            await trio.sleep(MIN_SWEEP_GAP)
            with trio.move_on_after(max(0.0, self.interval - MIN_SWEEP_GAP)):
                await self._wake.wait()

    def disk(self) -> Disk | None:
        """The cache's filesystem now (blocks: call it in a worker thread)."""
        usage = self.usage(self.data_dir)
        if usage is None:
            return None
        total, available = usage
        return Disk(total, total - available)

    async def sweep(self) -> SweepResult:
        """Apply the policy in force now."""
        policy = self.in_force.policy
        draining = self.draining

        def choose(snapshot: CacheSnapshot, disk: Disk | None, now: float) -> Decision:
            return decide(
                snapshot.blobs,
                {d for d, n in snapshot.pins.items() if n > 0},
                now=now,
                policy=policy,
                disk=disk,
                reserved=snapshot.reserved,
                draining=draining,
            )

        result = await self._apply(choose)
        self.draining = draining_after(policy, result.disk, draining)
        self.last = result
        self._report(result)
        return result

    # -- an operator's requests ------------------------------------------------------------------

    async def prune(
        self, *, everything: bool = False, unused_for: float | None = None
    ) -> SweepResult:
        """``prune``: the policy now; ``everything``: every blob not in use, and the files of
        interrupted downloads; ``unused_for``: every blob not in use and unused that long."""
        if not everything and unused_for is None:
            return await self.sweep()

        def choose(snapshot: CacheSnapshot, disk: Disk | None, now: float) -> Decision:
            pinned = {d for d, n in snapshot.pins.items() if n > 0}
            return select_operator(
                snapshot.blobs, pinned, now=now, unused_for=None if everything else unused_for
            )

        return await self._apply(choose, partials=everything)

    async def remove(self, digest: str) -> Removal:
        """``rm DIGEST``: one blob, unless a client is reading it or it is being downloaded
        (deleting a file under a reader would cut its pull); or the files an interrupted
        download of it left."""
        async with self._lock:
            active = digest in self.downloading()

            def work() -> Removal:
                size = self.cache.size(digest)
                if size is not None:
                    if self.cache.evict(digest, "operator"):
                        return Removal("removed", size)
                    if digest in self.cache:
                        return Removal("in_use", size, self.cache.pins(digest))
                partial = {p.digest: p.bytes for p in self.cache.partials()}.get(digest)
                if partial is None:
                    return Removal("unknown")
                if active or self.cache.remove_partial(digest) < 0:
                    return Removal("in_use", partial, max(1, self.cache.pins(digest)))
                return Removal("removed_partial", partial)

            removal = await trio.to_thread.run_sync(work)
            if removal.status == "removed":
                event(log, "cache.evicted", digest=digest, size=removal.bytes, reason="operator")
                await self._released([digest])
            elif removal.status == "removed_partial":
                event(log, "cache.partial_removed", digest=digest, size=removal.bytes)
        return removal

    # -- the shell -------------------------------------------------------------------------------

    async def _apply(
        self,
        choose: Callable[[CacheSnapshot, Disk | None, float], Decision],
        *,
        partials: bool = False,
    ) -> SweepResult:
        async with self._lock:
            active = self.downloading()

            def work() -> SweepResult:
                now = self.clock()
                snapshot = self.cache.snapshot()
                disk = self.disk()
                decision = choose(snapshot, disk, now)
                evicted = [e for e in decision.evictions if self.cache.evict(e.digest, e.reason)]
                removed = []
                if partials:
                    for partial in self.cache.partials():
                        if (
                            partial.digest not in active
                            and self.cache.remove_partial(partial.digest) >= 0
                        ):
                            removed.append(partial.digest)
                return SweepResult(evicted, decision, disk, now, removed)

            result = await trio.to_thread.run_sync(work)
            for eviction in result.evicted:
                event(
                    log,
                    "cache.evicted",
                    digest=eviction.digest,
                    size=eviction.size,
                    reason=eviction.reason,
                )
            for digest in result.partials_removed:
                event(log, "cache.partial_removed", digest=digest)
            await self._released([e.digest for e in result.evicted])
        return result

    async def _released(self, digests: list[str]) -> None:
        """Tell ``notify`` about evicted blobs, and wait (bounded, holding the lock: the next
        sweep must measure the filesystem without them) until their files are closed."""
        closing = [self.notify(digest) for digest in digests]
        with trio.move_on_after(RELEASE_SECONDS):
            for closed in closing:
                if isinstance(closed, trio.Event):
                    await closed.wait()

    def _report(self, result: SweepResult) -> None:
        """Log a limit the cache cannot meet when that starts, and when it ends."""
        disk = result.disk
        used = None if disk is None or not disk.total else round(100 * disk.used / disk.total, 1)
        policy = self.in_force.policy
        for limit, unmet in (
            ("quota", result.decision.quota_unmet),
            ("watermark", result.decision.watermark_unmet),
        ):
            if unmet and not self.unmet[limit]:
                event(
                    log,
                    "cache.limit_unmet",
                    logging.WARNING,
                    limit=limit,
                    used_bytes=self.cache.used,
                    quota=policy.quota,
                    disk_used_percent=used,
                    high_watermark=policy.high_watermark,
                    detail="every blob left is in use"
                    if limit == "quota"
                    else "nothing evictable is left; the rest of the filesystem is in use or "
                    "not the cache's",
                )
            elif not unmet and self.unmet[limit]:
                event(log, "cache.limit_met", limit=limit, disk_used_percent=used)
            self.unmet[limit] = unmet
