"""What the cache evicts, and why: the pure decision behind the agent's cache janitor.

Given the cached blobs (size and last use), the blobs in use (pinned: a client reading one, a
download finishing), the filesystem's size and use, the time and the policy, :func:`decide`
returns the blobs to evict with a reason each, and which limits cannot be met because every
blob that would have to go is in use. No I/O, no clock: the caller measures and deletes.

The limits, applied in this order (a blob is evicted once, for the first reason that picks it):

``expired``
    ``max_unused`` > 0: every blob unused for at least that many seconds.
``quota``
    ``quota`` > 0: least recently used blobs while the cached bytes plus the bytes reserved for
    downloads in progress exceed it.
``watermark``
    ``high_watermark`` > 0: when the filesystem is more than ``high_watermark`` percent used,
    least recently used blobs until it is at most ``low_watermark`` percent used (counting what
    the evictions above free), like kubelet's image garbage collection. Once it crossed the high
    watermark it is *draining* (the caller keeps that state): later decisions keep evicting
    toward the low watermark until a measurement finds it there, so a measurement taken while
    something else was still filling the disk does not leave it between the two.

An operator's prune (:func:`select_operator`) evicts every unpinned blob, or those unused for
a given time, with the reason ``operator``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeGuard

__all__ = [
    "REASONS",
    "Blob",
    "CachePolicy",
    "Decision",
    "Disk",
    "Eviction",
    "Reason",
    "decide",
    "draining_after",
    "select_operator",
]

Reason = Literal["quota", "watermark", "expired", "operator"]
REASONS: tuple[Reason, ...] = ("quota", "watermark", "expired", "operator")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The limits in force (the agent's ``cacheSize``, ``cacheHighWatermark``,
    ``cacheLowWatermark`` and ``cacheMaxUnused``); 0 turns each one off."""

    quota: int = 0
    """Bytes of cached blobs (plus reservations) allowed."""
    high_watermark: int = 0
    """Percent of the filesystem used above which blobs are evicted."""
    low_watermark: int = 0
    """Percent of the filesystem used that evicting for the high watermark aims for."""
    max_unused: float = 0.0
    """Seconds a blob may go unused before it is evicted."""

    def __post_init__(self) -> None:
        if self.quota < 0:
            raise ValueError("quota cannot be negative")
        if self.max_unused < 0:
            raise ValueError("max_unused cannot be negative")
        if not 0 <= self.high_watermark <= 100 or not 0 <= self.low_watermark <= 100:
            raise ValueError("watermarks are percentages, 0 to 100")
        if self.high_watermark and self.low_watermark >= self.high_watermark:
            raise ValueError("the low watermark must be below the high one")


@dataclass(frozen=True, slots=True)
class Blob:
    digest: str
    size: int
    last_used: float
    """Unix time of the last use (served to a client, or downloaded)."""


@dataclass(frozen=True, slots=True)
class Disk:
    """The filesystem holding the cache, in bytes; ``used`` counts everything that is not
    available to the agent (as kubelet does: size minus available)."""

    total: int
    used: int

    def above(self, percent: int, freed: int = 0) -> bool:
        """Is more than ``percent`` of the filesystem used once ``freed`` bytes are gone?"""
        return (self.used - freed) * 100 > percent * self.total


@dataclass(frozen=True, slots=True)
class Eviction:
    digest: str
    size: int
    reason: Reason


@dataclass(frozen=True, slots=True)
class Decision:
    evictions: tuple[Eviction, ...] = ()
    quota_unmet: bool = False
    """The quota is still exceeded after every evictable blob: the rest is in use."""
    watermark_unmet: bool = False
    """The filesystem is above the high watermark and stays above the low one after every
    evictable blob (the rest is in use, or the space is not the cache's)."""

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.evictions)


def _least_recent_first(blobs: Iterable[Blob]) -> list[Blob]:
    # Stable: blobs used at the same moment keep the caller's (LRU) order.
    return sorted(blobs, key=lambda blob: blob.last_used)


def expired(blob: Blob, now: float, max_unused: float) -> bool:
    """Has ``blob`` been unused for at least ``max_unused`` (> 0) seconds at ``now``?"""
    return now - blob.last_used >= max_unused


def _watermarks_apply(disk: Disk | None, policy: CachePolicy) -> TypeGuard[Disk]:
    """Whether ``policy`` has watermarks and ``disk`` is known (then it is a :class:`Disk`)."""
    return policy.high_watermark > 0 and disk is not None and disk.total > 0


def decide(
    blobs: Sequence[Blob],
    pinned: Collection[str],
    *,
    now: float,
    policy: CachePolicy,
    disk: Disk | None = None,
    reserved: int = 0,
    draining: bool = False,
) -> Decision:
    """The evictions that bring the cache within ``policy`` (see the module's docstring).

    ``blobs`` are every cached blob; ``pinned`` the digests that must stay; ``disk`` the
    filesystem now (None: unknown, no watermark decision); ``reserved`` the bytes held for
    downloads in progress, which count against the quota; ``draining``: an earlier decision
    found the filesystem above the high watermark and no measurement since found it at the low
    one (:func:`draining_after`).
    """
    candidates = [b for b in _least_recent_first(blobs) if b.digest not in pinned]
    chosen: dict[str, Eviction] = {}

    def take(blob: Blob, reason: Reason) -> None:
        chosen[blob.digest] = Eviction(blob.digest, blob.size, reason)

    if policy.max_unused > 0:
        for old in candidates:
            if expired(old, now, policy.max_unused):
                take(old, "expired")

    remaining = iter([b for b in candidates if b.digest not in chosen])

    quota_unmet = False
    if policy.quota > 0:
        total = sum(b.size for b in blobs) + reserved - sum(e.size for e in chosen.values())
        while total > policy.quota:
            blob = next(remaining, None)
            if blob is None:
                quota_unmet = True
                break
            take(blob, "quota")
            total -= blob.size

    watermark_unmet = False
    if _watermarks_apply(disk, policy) and disk.above(
        policy.high_watermark if not draining else policy.low_watermark
    ):
        freed = sum(e.size for e in chosen.values())
        while disk.above(policy.low_watermark, freed):
            blob = next(remaining, None)
            if blob is None:
                watermark_unmet = True
                break
            take(blob, "watermark")
            freed += blob.size

    return Decision(tuple(chosen.values()), quota_unmet, watermark_unmet)


def draining_after(policy: CachePolicy, disk: Disk | None, draining: bool) -> bool:
    """Whether the watermark is draining after a decision that measured ``disk`` (before its
    evictions) while it was ``draining``: it starts above the high watermark and ends at a
    measurement at or below the low one."""
    return _watermarks_apply(disk, policy) and (
        disk.above(policy.high_watermark) or (draining and disk.above(policy.low_watermark))
    )


def select_operator(
    blobs: Sequence[Blob],
    pinned: Collection[str],
    *,
    now: float,
    unused_for: float | None = None,
) -> Decision:
    """An operator's prune: every unpinned blob (``unused_for`` None), or every unpinned blob
    unused for at least ``unused_for`` seconds; least recently used first."""
    return Decision(
        tuple(
            Eviction(b.digest, b.size, "operator")
            for b in _least_recent_first(blobs)
            if b.digest not in pinned and (unused_for is None or expired(b, now, unused_for))
        )
    )
