"""The bounded TTL cache (p2p_common.ttlcache): examples, and a hypothesis state machine that
drives it against a plain list model (bounds never exceeded, an expired entry never returned,
the most recently used entries survive eviction)."""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from p2p_common.ttlcache import TTLCache


def test_an_entry_lives_until_its_own_deadline() -> None:
    cache: TTLCache[str, int] = TTLCache(10)
    assert cache.set("a", 1, expires=10.0, now=0.0)
    assert cache.set("b", 2, expires=5.0, now=0.0)
    assert cache.get("a", 9.999) == 1
    assert cache.entry("b", 4.0) == (2, 5.0)
    assert cache.get("b", 5.0) is None  # at the deadline: gone
    assert len(cache) == 1  # and dropped
    assert cache.get("a", 10.0) is None
    assert cache.set("c", 3)  # no deadline: never expires
    assert cache.get("c", 1e300) == 3
    assert cache.get("c", math.inf) is None  # ... but the end of time


def test_a_deadline_already_past_keeps_nothing_and_forgets_the_old_value() -> None:
    cache: TTLCache[str, int] = TTLCache(10)
    cache.set("a", 1, expires=100.0, now=0.0)
    assert not cache.set("a", 2, expires=50.0, now=50.0)
    assert cache.get("a", 51.0) is None
    assert len(cache) == 0


def test_the_least_recently_used_goes_first() -> None:
    cache: TTLCache[str, int] = TTLCache(2)
    cache.set("a", 1, now=0.0)
    cache.set("b", 2, now=0.0)
    assert cache.get("a", 0.0) == 1  # a is now the most recent
    cache.set("c", 3, now=0.0)
    assert (cache.get("a", 0.0), cache.get("b", 0.0), cache.get("c", 0.0)) == (1, None, 3)
    assert cache.peek("a", 0.0) == 1  # a peek is not a use: a stays the older
    cache.set("d", 4, now=0.0)
    assert (cache.peek("a", 0.0), cache.peek("c", 0.0), cache.peek("d", 0.0)) == (None, 3, 4)


def test_weights_bound_the_total_and_a_heavy_value_is_not_kept() -> None:
    cache: TTLCache[str, bytes] = TTLCache(max_weight=10, weigh=len)
    cache.set("a", b"1234")
    cache.set("b", b"1234")
    cache.get("a", 0.0)
    cache.set("c", b"1234")  # 12 > 10: b goes
    assert (cache.peek("b", 0.0), cache.weight, len(cache)) == (None, 8, 2)
    cache.set("a", b"123456")  # replacing accounts for the old value
    assert (cache.weight, len(cache)) == (10, 2)
    assert not cache.set("big", b"x" * 11)  # heavier than the whole: nothing dropped for it
    assert (cache.weight, len(cache)) == (10, 2)
    assert cache.pop("a") == b"123456"
    assert (cache.weight, cache.pop("a")) == (4, None)
    cache.clear()
    assert (cache.weight, len(cache)) == (0, 0)


def test_a_cache_needs_a_bound_and_sane_arguments() -> None:
    with pytest.raises(ValueError, match="bound"):
        TTLCache()
    with pytest.raises(ValueError, match="together"):
        TTLCache(max_weight=10)
    with pytest.raises(ValueError, match="negative"):
        TTLCache(-1)
    cache: TTLCache[str, int] = TTLCache(max_weight=10, weigh=lambda value: value)
    with pytest.raises(ValueError, match="negative"):
        cache.set("a", -1)
    off: TTLCache[str, int] = TTLCache(0)
    assert not off.set("a", 1)
    assert len(off) == 0


KEYS = st.sampled_from("abcdef")


class TTLCacheMachine(RuleBasedStateMachine):
    """The cache against a model: a list of [key, value, deadline, weight], oldest use first."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.model: list[tuple[str, int, float, int]] = []
        self.last_set: dict[str, tuple[int, float]] = {}
        """Each key's last value and deadline, whatever eviction did since."""
        self.serial = 0

    @initialize(
        max_entries=st.none() | st.integers(0, 4), max_weight=st.none() | st.integers(0, 12)
    )
    def make(self, max_entries: int | None, max_weight: int | None) -> None:
        if max_entries is None and max_weight is None:
            max_entries = 3
        self.max_entries, self.max_weight = max_entries, max_weight
        self.cache: TTLCache[str, tuple[int, int]] = TTLCache(
            max_entries,
            max_weight=max_weight,
            weigh=None if max_weight is None else (lambda value: value[1]),
        )

    def _find(self, key: str) -> int | None:
        return next((i for i, entry in enumerate(self.model) if entry[0] == key), None)

    def _over(self) -> bool:
        weight = sum(entry[3] for entry in self.model)
        return (self.max_entries is not None and len(self.model) > self.max_entries) or (
            self.max_weight is not None and weight > self.max_weight
        )

    @rule(
        key=KEYS,
        ttl=st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0, math.inf]),
        weight=st.integers(0, 6),
    )
    def set(self, key: str, ttl: float, weight: int) -> None:
        self.serial += 1
        value = (self.serial, weight if self.max_weight is not None else 0)
        expires = self.now + ttl
        most_recent = self.model[-1] if self.model else None
        kept = self.cache.set(key, value, expires=expires, now=self.now)
        found = self._find(key)
        if found is not None:
            del self.model[found]
        self.last_set[key] = (self.serial, expires)
        heavy = self.max_weight is not None and value[1] > self.max_weight
        if expires > self.now and not heavy:
            self.model.append((key, self.serial, expires, value[1]))
            while self.model and self._over():
                del self.model[0]
        assert kept == (self._find(key) is not None)
        if kept:  # what was just set is there, and so is the use before it if both fit
            assert self.cache.peek(key, self.now) == value
            if most_recent is not None and most_recent[0] != key:
                fits = (self.max_entries is None or self.max_entries >= 2) and (
                    self.max_weight is None or most_recent[3] + value[1] <= self.max_weight
                )
                alive = self.now < most_recent[2]
                if fits and alive:
                    assert self.cache.peek(most_recent[0], self.now) is not None

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        got = self.cache.get(key, self.now)
        found = self._find(key)
        expected = None
        if found is not None:
            entry = self.model.pop(found)
            if self.now < entry[2]:
                self.model.append(entry)
                expected = entry[1]
        assert (None if got is None else got[0]) == expected
        if got is not None:  # never expired, and always the last value set
            assert self.last_set[key] == (got[0], self.last_set[key][1])
            assert self.now < self.last_set[key][1]

    @rule(key=KEYS)
    def peek(self, key: str) -> None:
        got = self.cache.peek(key, self.now)
        found = self._find(key)
        expected = None
        if found is not None:
            if self.now < self.model[found][2]:
                expected = self.model[found][1]
            else:
                del self.model[found]
        assert (None if got is None else got[0]) == expected

    @rule(key=KEYS)
    def pop(self, key: str) -> None:
        got = self.cache.pop(key)
        found = self._find(key)
        expected = None if found is None else self.model.pop(found)[1]
        assert (None if got is None else got[0]) == expected

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    def wait(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.model.clear()

    @invariant()
    def bounded_and_accounted(self) -> None:
        if not hasattr(self, "cache"):
            return
        assert len(self.cache) == len(self.model)
        assert self.cache.weight == sum(entry[3] for entry in self.model)
        if self.max_entries is not None:
            assert len(self.cache) <= self.max_entries
        if self.max_weight is not None:
            assert self.cache.weight <= self.max_weight


TTLCacheMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40)
test_ttl_cache_against_a_model = TTLCacheMachine.TestCase
