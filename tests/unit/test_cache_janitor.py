"""The cache under a policy: BlobCache's last uses, snapshots and pin-checked eviction, and the
agent's janitor (p2p_agent.janitor) on a real directory with a simulated filesystem size."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import trio

from p2p_agent.janitor import Janitor, PolicyInForce
from p2p_common.blobcache import BlobCache
from p2p_common.cachepolicy import CachePolicy


def put(cache: BlobCache, content: bytes, *, used_at: float | None = None) -> str:
    """Put ``content`` into the cache as a verified blob; returns its digest."""
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    scratch = cache.scratch_file("test")
    scratch.write_bytes(content)
    cache.adopt(scratch, digest)
    if used_at is not None:
        os.utime(cache.blob_path(digest), (used_at, used_at))
        cache.scan()  # as after a restart
    return digest


class FakeDisk:
    """A filesystem of ``total`` bytes holding the cache's blobs and ``other`` bytes more."""

    def __init__(self, cache: BlobCache, total: int, other: int) -> None:
        self.cache = cache
        self.total = total
        self.other = other

    def __call__(self, path: os.PathLike[str] | str) -> tuple[int, int]:
        blobs = sum(p.stat().st_size for p in self.cache.blob_dir.iterdir() if not p.suffix)
        return self.total, self.total - self.other - blobs


# --- BlobCache ------------------------------------------------------------------------------------


def test_last_use_survives_a_restart(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest = put(cache, b"a" * 100, used_at=1_000_000.0)
    assert BlobCache(tmp_path).last_used(digest) == 1_000_000.0
    before = time.time()
    cache.touch(digest)
    assert cache.last_used(digest) >= before
    again = BlobCache(tmp_path)  # a restart reads the mtime
    assert again.last_used(digest) == pytest.approx(cache.last_used(digest), abs=0.01)
    assert [b.digest for b in again.snapshot().blobs] == [digest]


def test_a_download_counts_as_a_use(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    before = time.time()
    digest = put(cache, b"fresh")
    assert cache.last_used(digest) >= before


def test_evict_checks_the_pins_at_the_moment_of_deletion(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest = put(cache, b"b" * 10)
    with cache.pinned(digest):
        assert not cache.evict(digest, "operator")
        assert cache.blob_path(digest).exists()
        assert cache.pins(digest) == 1
    assert cache.evict(digest, "operator")
    assert not cache.blob_path(digest).exists()
    assert digest not in cache
    assert not cache.evict(digest, "operator")  # gone already
    assert cache.eviction_counts() == {"operator": 1}


def test_quota_evictions_for_a_download_are_counted(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, quota=25)
    first = put(cache, b"1" * 10)
    put(cache, b"2" * 10)
    assert cache.evict_for(10) == [first]
    assert cache.eviction_counts() == {"quota": 1}


def test_partial_downloads_are_listed_and_removed_unless_running(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest = "sha256:" + "c" * 64
    data, bits, chunks = cache.partial_paths(digest)
    for path in (data, bits, chunks):
        path.write_bytes(b"x" * 5000)
    (listed,) = cache.partials()
    assert listed.digest == digest
    assert listed.bytes >= 15000
    cache.pin(digest)  # a download of it runs
    assert cache.remove_partial(digest) == -1
    assert data.exists()
    cache.unpin(digest)
    assert cache.remove_partial(digest) == 3
    assert cache.partials() == []


# --- the janitor ----------------------------------------------------------------------------------


def janitor_for(
    cache: BlobCache, disk: FakeDisk | None = None, **policy: float
) -> tuple[Janitor, list[str]]:
    notified: list[str] = []
    janitor = Janitor(
        cache,
        cache.root,
        PolicyInForce(CachePolicy(**policy), "test"),  # type: ignore[arg-type]
        notify=notified.append,
        usage=disk or (lambda path: None),
    )
    return janitor, notified


async def test_a_sweep_evicts_down_to_the_low_watermark_and_notifies(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    now = time.time()
    digests = [put(cache, bytes([i]) * 1000, used_at=now - 100 + i) for i in range(10)]
    disk = FakeDisk(cache, total=20_000, other=8_000)  # 18,000 used: 90%
    janitor, notified = janitor_for(cache, disk, high_watermark=85, low_watermark=70)
    with cache.pinned(digests[0]):
        result = await janitor.sweep()
    # Down to 70% = 14,000: four blobs of 1,000, least recently used first, the pinned one kept.
    assert [e.digest for e in result.evicted] == digests[1:5]
    assert {e.reason for e in result.evicted} == {"watermark"}
    assert notified == digests[1:5]
    assert cache.blob_path(digests[0]).exists()
    total, free = disk(cache.root)
    assert (total - free) * 100 <= 70 * total
    assert cache.eviction_counts() == {"watermark": 4}
    assert janitor.unmet == {"quota": False, "watermark": False}
    assert (await janitor.sweep()).evicted == []  # between the watermarks now


async def test_when_nothing_evictable_is_left_the_limit_is_reported_unmet(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest = put(cache, b"z" * 1000)
    disk = FakeDisk(cache, total=10_000, other=9_500)
    janitor, _ = janitor_for(cache, disk, high_watermark=85, low_watermark=80)
    result = await janitor.sweep()
    assert [e.digest for e in result.evicted] == [digest]
    assert result.decision.watermark_unmet
    assert janitor.unmet["watermark"]


async def test_a_sweep_expires_blobs_unused_too_long(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    now = time.time()
    old = put(cache, b"old", used_at=now - 7200)
    recent = put(cache, b"recent", used_at=now - 60)
    janitor, notified = janitor_for(cache, max_unused=3600)
    result = await janitor.sweep()
    assert [(e.digest, e.reason) for e in result.evicted] == [(old, "expired")]
    assert notified == [old]
    assert recent in cache


async def test_a_new_policy_applies_soon_without_a_restart(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    now = time.time()
    digests = [put(cache, bytes([i]) * 100, used_at=now - 10 + i) for i in range(4)]
    janitor, notified = janitor_for(cache)
    async with trio.open_nursery() as nursery:
        await nursery.start(janitor.run)
        assert janitor.set_policy(CachePolicy(quota=250), "reloaded")
        assert not janitor.set_policy(CachePolicy(quota=250), "reloaded again")
        assert cache.quota == 250
        with trio.fail_after(30):
            while len(notified) < 2:  # noqa: ASYNC110 - polling the janitor's effect
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert notified == digests[:2]
    assert janitor.in_force.source == "reloaded"
    assert cache.eviction_counts() == {"quota": 2}


async def test_rm_refuses_a_blob_in_use_and_removes_it_after(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest = put(cache, b"in use")
    janitor, notified = janitor_for(cache)
    with cache.pinned(digest):
        refused = await janitor.remove(digest)
    assert (refused.status, refused.pins) == ("in_use", 1)
    assert cache.blob_path(digest).exists()
    removed = await janitor.remove(digest)
    assert (removed.status, removed.bytes) == ("removed", 6)
    assert notified == [digest]
    assert (await janitor.remove(digest)).status == "unknown"


async def test_rm_and_prune_all_leave_a_running_download_alone(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    running, left = "sha256:" + "d" * 64, "sha256:" + "e" * 64
    for digest in (running, left):
        cache.partial_paths(digest)[0].write_bytes(b"p" * 100)
    cached = put(cache, b"cached")
    janitor, notified = janitor_for(cache)
    janitor.downloading = lambda: {running}
    assert (await janitor.remove(running)).status == "in_use"
    result = await janitor.prune(everything=True)
    assert [e.digest for e in result.evicted] == [cached]
    assert result.partials_removed == [left]
    assert [p.digest for p in cache.partials()] == [running]
    assert notified == [cached]


async def test_prune_unused_for_takes_only_blobs_unused_that_long(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    now = time.time()
    old = put(cache, b"old", used_at=now - 3 * 86400)
    put(cache, b"new", used_at=now - 3600)
    janitor, _ = janitor_for(cache)
    result = await janitor.prune(unused_for=2 * 86400)
    assert [(e.digest, e.reason) for e in result.evicted] == [(old, "operator")]


async def test_once_above_the_high_watermark_sweeps_drain_to_the_low_one(tmp_path: Path) -> None:
    """A sweep that measured the disk while something else was still filling it freed too
    little; the next sweeps keep evicting until one measures the low watermark, and only
    then does the filesystem have to cross the high watermark again."""
    cache = BlobCache(tmp_path)
    now = time.time()
    digests = [put(cache, bytes([i]) * 1000, used_at=now - 100 + i) for i in range(10)]
    disk = FakeDisk(cache, total=20_000, other=7_200)  # 17,200 used: 86%, still growing
    janitor, _ = janitor_for(cache, disk, high_watermark=85, low_watermark=70)
    first = await janitor.sweep()
    assert [e.digest for e in first.evicted] == digests[:4]  # to 13,200 = 66% of that view
    assert janitor.draining
    disk.other = 9_000  # the other writer finished: 15,000 used, 75%, below the high mark
    second = await janitor.sweep()
    assert [e.digest for e in second.evicted] == digests[4:5]  # 14,000 = 70%
    assert janitor.draining  # measured 75% (before its eviction): not at the low mark yet
    third = await janitor.sweep()
    assert third.evicted == []
    assert not janitor.draining  # measured 70%
    disk.other = 11_000  # 80%: between the watermarks, and no longer draining
    assert (await janitor.sweep()).evicted == []
    assert not janitor.draining
