"""The cache's eviction decision (p2p_common.cachepolicy): examples and properties."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from p2p_common.cachepolicy import (
    Blob,
    CachePolicy,
    Decision,
    Disk,
    decide,
    draining_after,
    select_operator,
)

GB = 10**9
NOW = 1_700_000_000.0


def blob(n: int, size: int, age: float) -> Blob:
    """Blob number ``n`` of ``size`` bytes, last used ``age`` seconds before NOW."""
    return Blob(f"sha256:{n:064x}", size, NOW - age)


def digests(decision: Decision, reason: str | None = None) -> list[str]:
    return [e.digest for e in decision.evictions if reason is None or e.reason == reason]


# --- examples -------------------------------------------------------------------------------------


def test_nothing_is_evicted_when_every_limit_is_off() -> None:
    blobs = [blob(i, GB, 10**6) for i in range(5)]
    decision = decide(blobs, set(), now=NOW, policy=CachePolicy(), disk=Disk(100, 99))
    assert decision == Decision()


def test_the_quota_evicts_least_recently_used_first_skipping_pinned() -> None:
    blobs = [blob(1, 4, 30), blob(2, 4, 20), blob(3, 4, 10), blob(4, 4, 0)]
    decision = decide(blobs, {blobs[0].digest}, now=NOW, policy=CachePolicy(quota=9))
    # 16 bytes, quota 9: blob 1 is pinned, so 2 and 3 go (16 - 8 = 8 <= 9).
    assert digests(decision) == [blobs[1].digest, blobs[2].digest]
    assert {e.reason for e in decision.evictions} == {"quota"}
    assert not decision.quota_unmet


def test_reserved_bytes_count_against_the_quota() -> None:
    blobs = [blob(1, 4, 30), blob(2, 4, 20)]
    assert decide(blobs, set(), now=NOW, policy=CachePolicy(quota=8)) == Decision()
    decision = decide(blobs, set(), now=NOW, policy=CachePolicy(quota=8), reserved=1)
    assert digests(decision) == [blobs[0].digest]


def test_a_quota_that_pinned_blobs_exceed_is_reported_unmet() -> None:
    blobs = [blob(1, 10, 30), blob(2, 10, 20)]
    decision = decide(blobs, {blobs[0].digest}, now=NOW, policy=CachePolicy(quota=5))
    assert digests(decision) == [blobs[1].digest]
    assert decision.quota_unmet


def test_the_watermark_evicts_from_above_high_down_to_low() -> None:
    policy = CachePolicy(high_watermark=85, low_watermark=80)
    blobs = [blob(i, 3, 100 - i) for i in range(10)]
    # 90 of 100 used: above 85, evict until at most 80, i.e. 10 bytes: 4 blobs of 3.
    decision = decide(blobs, set(), now=NOW, policy=policy, disk=Disk(100, 90))
    assert digests(decision, "watermark") == [b.digest for b in blobs[:4]]
    assert decision.freed == 12
    assert not decision.watermark_unmet


def test_between_the_watermarks_nothing_is_evicted() -> None:
    policy = CachePolicy(high_watermark=85, low_watermark=80)
    blobs = [blob(i, 3, 100 - i) for i in range(10)]
    for used in (0, 80, 83, 85):
        assert decide(blobs, set(), now=NOW, policy=policy, disk=Disk(100, used)) == Decision()


def test_while_draining_the_low_watermark_is_the_trigger() -> None:
    policy = CachePolicy(high_watermark=85, low_watermark=80)
    blobs = [blob(i, 3, 100 - i) for i in range(10)]
    # 83 of 100: between the watermarks; draining, evict to 80 (one blob of 3).
    decision = decide(blobs, set(), now=NOW, policy=policy, disk=Disk(100, 83), draining=True)
    assert digests(decision, "watermark") == [blobs[0].digest]
    assert decide(blobs, set(), now=NOW, policy=policy, disk=Disk(100, 80), draining=True) == (
        Decision()
    )
    # Draining starts above the high mark, holds above the low one, ends at it.
    assert draining_after(policy, Disk(100, 86), draining=False)
    assert not draining_after(policy, Disk(100, 83), draining=False)
    assert draining_after(policy, Disk(100, 83), draining=True)
    assert not draining_after(policy, Disk(100, 80), draining=True)
    assert not draining_after(policy, None, draining=True)
    assert not draining_after(CachePolicy(), Disk(100, 99), draining=True)


def test_a_filesystem_full_of_other_things_is_reported_unmet() -> None:
    policy = CachePolicy(high_watermark=85, low_watermark=80)
    blobs = [blob(1, 2, 30), blob(2, 2, 20)]
    decision = decide(blobs, {blobs[1].digest}, now=NOW, policy=policy, disk=Disk(100, 99))
    assert digests(decision) == [blobs[0].digest]
    assert decision.watermark_unmet


def test_an_unknown_filesystem_leaves_the_watermarks_alone() -> None:
    policy = CachePolicy(high_watermark=85, low_watermark=80)
    blobs = [blob(1, 2, 30)]
    assert decide(blobs, set(), now=NOW, policy=policy, disk=None) == Decision()
    assert decide(blobs, set(), now=NOW, policy=policy, disk=Disk(0, 0)) == Decision()


def test_expiry_is_exact_at_the_boundary() -> None:
    policy = CachePolicy(max_unused=3600)
    at = Blob("sha256:" + "a" * 64, 1, 1_000_000.0)
    assert digests(decide([at], set(), now=1_003_600.0, policy=policy)) == [at.digest]
    assert decide([at], set(), now=1_003_599.999, policy=policy) == Decision()


def test_expired_blobs_go_first_and_count_towards_the_other_limits() -> None:
    policy = CachePolicy(quota=10, high_watermark=85, low_watermark=80, max_unused=60)
    blobs = [blob(1, 6, 120), blob(2, 6, 30), blob(3, 2, 10)]
    decision = decide(blobs, set(), now=NOW, policy=policy, disk=Disk(100, 86))
    # Expiry frees 6 (14 -> 8 within quota; 86 -> 80 at the low watermark): nothing else goes.
    assert [(e.digest, e.reason) for e in decision.evictions] == [(blobs[0].digest, "expired")]


def test_pinned_blobs_never_expire() -> None:
    old = blob(1, 1, 10**6)
    assert decide([old], {old.digest}, now=NOW, policy=CachePolicy(max_unused=1)) == Decision()


def test_an_operator_prune_takes_everything_not_in_use_or_what_is_unused_that_long() -> None:
    blobs = [blob(1, 1, 10), blob(2, 1, 100), blob(3, 1, 1000)]
    everything = select_operator(blobs, {blobs[2].digest}, now=NOW)
    assert digests(everything) == [blobs[1].digest, blobs[0].digest]
    assert {e.reason for e in everything.evictions} == {"operator"}
    old = select_operator(blobs, set(), now=NOW, unused_for=100)
    assert digests(old) == [blobs[2].digest, blobs[1].digest]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quota": -1},
        {"max_unused": -1},
        {"high_watermark": 101},
        {"high_watermark": 80, "low_watermark": 80},
        {"high_watermark": 80, "low_watermark": 90},
        {"low_watermark": -1},
    ],
)
def test_a_policy_refuses_nonsense(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        CachePolicy(**kwargs)


def test_a_high_watermark_of_zero_turns_the_watermarks_off() -> None:
    policy = CachePolicy(high_watermark=0, low_watermark=90)
    blobs = [blob(1, 50, 10)]
    assert decide(blobs, set(), now=NOW, policy=policy, disk=Disk(100, 100)) == Decision()


# --- properties -----------------------------------------------------------------------------------

_BLOBS = st.lists(
    st.tuples(st.integers(0, 10**6), st.floats(0, 10**7, allow_nan=False)),
    max_size=30,
).map(lambda pairs: [blob(i, size, age) for i, (size, age) in enumerate(pairs)])


@st.composite
def situations(draw: st.DrawFn) -> tuple[list[Blob], set[str], CachePolicy, Disk, int]:
    blobs = draw(_BLOBS)
    pinned = {b.digest for b in blobs if draw(st.booleans()) and draw(st.booleans())}
    high = draw(st.integers(0, 100))
    low = draw(st.integers(0, max(0, high - 1)))
    policy = CachePolicy(
        quota=draw(st.integers(0, 3 * 10**7)),
        high_watermark=high,
        low_watermark=low,
        max_unused=draw(st.sampled_from([0.0, 1.0, 3600.0, 10**6])),
    )
    cached = sum(b.size for b in blobs)
    other = draw(st.integers(0, 10**7))
    total = draw(st.integers(max(1, cached + other), 2 * (cached + other) + 100))
    reserved = draw(st.integers(0, 10**6))
    return blobs, pinned, policy, Disk(total, cached + other), reserved


@given(situations())
def test_pinned_blobs_are_never_evicted_and_nothing_twice(
    situation: tuple[list[Blob], set[str], CachePolicy, Disk, int],
) -> None:
    blobs, pinned, policy, disk, reserved = situation
    decision = decide(blobs, pinned, now=NOW, policy=policy, disk=disk, reserved=reserved)
    chosen = digests(decision)
    assert not set(chosen) & pinned
    assert len(chosen) == len(set(chosen))
    assert set(chosen) <= {b.digest for b in blobs}


@given(situations())
def test_the_quota_is_met_unless_only_pinned_blobs_are_left(
    situation: tuple[list[Blob], set[str], CachePolicy, Disk, int],
) -> None:
    blobs, pinned, policy, disk, reserved = situation
    assume(policy.quota > 0)
    decision = decide(blobs, pinned, now=NOW, policy=policy, disk=disk, reserved=reserved)
    left = [b for b in blobs if b.digest not in set(digests(decision))]
    if decision.quota_unmet:
        assert all(b.digest in pinned for b in left)
        assert sum(b.size for b in left) + reserved > policy.quota
    else:
        assert sum(b.size for b in left) + reserved <= policy.quota


@given(situations())
def test_above_the_high_watermark_ends_at_or_below_the_low_one_when_possible(
    situation: tuple[list[Blob], set[str], CachePolicy, Disk, int],
) -> None:
    blobs, pinned, policy, disk, reserved = situation
    decision = decide(blobs, pinned, now=NOW, policy=policy, disk=disk, reserved=reserved)
    after = Disk(disk.total, disk.used - decision.freed)
    if not policy.high_watermark or not disk.above(policy.high_watermark):
        assert not digests(decision, "watermark")
        assert not decision.watermark_unmet
    elif decision.watermark_unmet:
        assert after.above(policy.low_watermark)
        assert all(b.digest in pinned for b in blobs if b.digest not in set(digests(decision)))
    else:
        assert not after.above(policy.low_watermark)
        # ... and by evicting no more than needed: without the last one it would be above.
        watermark = [e for e in decision.evictions if e.reason == "watermark"]
        if watermark:
            assert Disk(disk.total, after.used + watermark[-1].size).above(policy.low_watermark)


@given(situations())
def test_quota_and_watermark_evict_least_recently_used_first(
    situation: tuple[list[Blob], set[str], CachePolicy, Disk, int],
) -> None:
    blobs, pinned, policy, disk, reserved = situation
    decision = decide(blobs, pinned, now=NOW, policy=policy, disk=disk, reserved=reserved)
    by_digest = {b.digest: b for b in blobs}
    lru = [by_digest[d] for d in digests(decision, "quota") + digests(decision, "watermark")]
    kept = [b for b in blobs if b.digest not in pinned and b.digest not in set(digests(decision))]
    if lru and kept:
        assert max(b.last_used for b in lru) <= min(b.last_used for b in kept)


@given(situations())
def test_exactly_the_blobs_unused_for_max_unused_expire(
    situation: tuple[list[Blob], set[str], CachePolicy, Disk, int],
) -> None:
    blobs, pinned, policy, disk, reserved = situation
    decision = decide(blobs, pinned, now=NOW, policy=policy, disk=disk, reserved=reserved)
    expected = (
        {
            b.digest
            for b in blobs
            if b.digest not in pinned and NOW - b.last_used >= policy.max_unused
        }
        if policy.max_unused
        else set()
    )
    assert set(digests(decision, "expired")) == expected


@given(st.integers(0, 10**9), st.integers(1, 10**7))
def test_expiry_at_whole_seconds_is_exact(last_used: int, max_unused: int) -> None:
    b = Blob("sha256:" + "b" * 64, 1, float(last_used))
    policy = CachePolicy(max_unused=float(max_unused))
    at = float(last_used + max_unused)
    assert digests(decide([b], set(), now=at, policy=policy)) == [b.digest]
    assert decide([b], set(), now=at - 1, policy=policy) == Decision()
