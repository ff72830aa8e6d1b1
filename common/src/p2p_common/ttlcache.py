"""A small bounded cache whose entries expire: the one behind every in-memory cache of
credential decisions, bearer tokens and manifest bodies.

Each entry has its own absolute deadline (a grant for what is left of another grant's life, a
token until shortly before it expires, a body never); an entry is never returned at or after its
deadline. The cache is bounded by a number of entries, a total weight (bytes), or both; beyond
a bound the least recently used entries are dropped (a ``get`` counts as a use, a ``peek``
does not). An entry heavier than the whole weight bound is not kept, and nothing is dropped for it.

Pure, like the protocol cores: no clock (``now`` is passed in, in the caller's time: trio's
``current_time()`` in the services, a plain number in tests), no trio, no threads. It is not
thread-safe: each cache belongs to one trio thread.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["TTLCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """Values by key until their deadline; least recently used dropped beyond the bounds.

    ``max_entries`` bounds the number of entries, ``max_weight`` the sum of ``weigh(value)``
    (a non-negative int, taken once when the value is set); at least one bound is required.
    Values must not be ``None`` (:meth:`get` answers ``None`` for "not here").
    """

    def __init__(
        self,
        max_entries: int | None = None,
        *,
        max_weight: int | None = None,
        weigh: Callable[[V], int] | None = None,
    ) -> None:
        if max_entries is None and max_weight is None:
            raise ValueError("a TTLCache needs a bound: max_entries, max_weight or both")
        if (max_weight is None) != (weigh is None):
            raise ValueError("max_weight and weigh go together")
        if (max_entries is not None and max_entries < 0) or (
            max_weight is not None and max_weight < 0
        ):
            raise ValueError("cache bounds cannot be negative")
        self.max_entries = max_entries
        self.max_weight = max_weight
        self._weigh = weigh
        self.weight = 0
        """The sum of the weights of the entries held (0 without ``weigh``)."""
        self._entries: OrderedDict[K, tuple[V, float, int]] = OrderedDict()

    def __len__(self) -> int:
        """Entries held, counting expired ones not yet dropped (they go when read or evicted)."""
        return len(self._entries)

    def entry(self, key: K, now: float) -> tuple[V, float] | None:
        """(value, deadline) for ``key`` if it is here and ``now`` is before its deadline; a use."""
        found = self._live(key, now)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0], found[1]

    def get(self, key: K, now: float) -> V | None:
        """The value for ``key`` if it is here and ``now`` is before its deadline; a use."""
        found = self.entry(key, now)
        return None if found is None else found[0]

    def peek(self, key: K, now: float) -> V | None:
        """Like :meth:`get`, but not a use (the entry keeps its place in the eviction order)."""
        found = self._live(key, now)
        return None if found is None else found[0]

    def set(self, key: K, value: V, *, expires: float = math.inf, now: float = -math.inf) -> bool:
        """Keep ``value`` for ``key`` until ``expires`` (an absolute time, ``inf``: never),
        replacing what ``key`` had, as its most recent use; drop the least recently used
        entries beyond the bounds. Whether it was kept: not when ``expires`` is not after
        ``now`` or the value is heavier than ``max_weight`` (``key`` then has no entry)."""
        self.pop(key)
        weight = 0 if self._weigh is None else self._weigh(value)
        if weight < 0:
            raise ValueError("a weight cannot be negative")
        if expires <= now or (self.max_weight is not None and weight > self.max_weight):
            return False
        self._entries[key] = (value, expires, weight)
        self.weight += weight
        while self._entries and self._over():
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self.weight -= dropped
        return key in self._entries

    def pop(self, key: K) -> V | None:
        """Remove ``key``'s entry; its value (expired or not), or ``None``."""
        found = self._entries.pop(key, None)
        if found is None:
            return None
        self.weight -= found[2]
        return found[0]

    def clear(self) -> None:
        self._entries.clear()
        self.weight = 0

    def _live(self, key: K, now: float) -> tuple[V, float, int] | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if now >= found[1]:
            self.pop(key)
            return None
        return found

    def _over(self) -> bool:
        return (self.max_entries is not None and len(self._entries) > self.max_entries) or (
            self.max_weight is not None and self.weight > self.max_weight
        )
