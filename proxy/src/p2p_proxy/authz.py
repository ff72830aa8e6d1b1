"""Authorization: may these credentials read this blob (or manifest) in this repository of this
registry?

The origin decides (a HEAD of the blob, or of the manifest by digest, with the caller's
credentials); one :class:`Authorizer` per kind, so a decision about a blob never answers for a
manifest. Decisions are kept
in memory only, per (credentials fingerprint, registry, repository, digest), for
``authCacheTtl`` seconds: grants, and refusals (``UNAUTHORIZED``, ``DENIED``). Anything
else (the blob is unknown, the origin failed) is not remembered, so a retry asks again.
Concurrent checks of one key share one origin request.

:class:`DecisionCache` is pure (the time is passed in); :class:`Authorizer` is the shell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import trio

from p2p_common.oci import ErrorCode, OCIError
from p2p_common.registry_auth import Credentials, fingerprint
from p2p_common.ttlcache import TTLCache
from p2p_proxy.flight import SingleFlight
from p2p_proxy.metrics import ProxyMetrics
from p2p_proxy.origin import OriginClient

__all__ = ["AuthKey", "Authorizer", "Decision", "DecisionCache"]

AuthKey = tuple[str, str, str, str]
"""(credentials fingerprint, registry host[:port], repository, digest)."""

REMEMBERED_REFUSALS = frozenset({ErrorCode.UNAUTHORIZED, ErrorCode.DENIED})
MAX_DECISIONS = 16384


@dataclass(frozen=True, slots=True)
class Decision:
    """A grant (``error`` is None; ``size`` as the origin reported it) or a refusal."""

    size: int | None = None
    error: OCIError | None = None

    @property
    def allowed(self) -> bool:
        return self.error is None


class DecisionCache:
    """Decisions by key until ``ttl`` seconds after they were made; LRU-bounded
    (a :class:`~p2p_common.ttlcache.TTLCache`)."""

    def __init__(self, ttl: float, max_entries: int = MAX_DECISIONS) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: TTLCache[AuthKey, Decision] = TTLCache(max_entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: AuthKey, now: float) -> Decision | None:
        return self._entries.get(key, now)

    def entry(self, key: AuthKey, now: float) -> tuple[float, Decision] | None:
        """(when it expires, the decision), if one is remembered for ``key``."""
        found = self._entries.entry(key, now)
        return None if found is None else (found[1], found[0])

    def put(self, key: AuthKey, decision: Decision, now: float) -> None:
        """Remember ``decision`` (a no-op with ``ttl`` 0 or for a refusal not worth keeping)."""
        if self.ttl <= 0:
            return
        if decision.error is not None and decision.error.code not in REMEMBERED_REFUSALS:
            return
        self._entries.set(key, decision, expires=now + self.ttl, now=now)

    def clear(self) -> None:
        self._entries.clear()


class Authorizer:
    """Asks the origin (or the cache of its recent answers) whether a caller may read a blob
    (``kind="blob"``) or a manifest by digest (``kind="manifest"``)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        metrics: ProxyMetrics,
        *,
        ttl: float,
        kind: Literal["blob", "manifest"] = "blob",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.cache = DecisionCache(ttl)
        self.metrics = metrics
        self.kind = kind
        self._clock = clock or trio.current_time
        self._flights: SingleFlight[AuthKey, Decision] = SingleFlight(
            nursery, f"{kind} authorization"
        )

    def remember_grant(
        self,
        origin: OriginClient,
        repository: str,
        digest: str,
        credentials: Credentials | None,
        size: int | None,
    ) -> None:
        """Record that the origin just served ``digest`` to ``credentials`` (a GET or HEAD that
        succeeded counts as the same check a HEAD would make)."""
        key: AuthKey = (fingerprint(credentials), origin.name, repository, digest)
        self.cache.put(key, Decision(size=size), self._clock())

    async def authorize(
        self,
        origin: OriginClient,
        repository: str,
        digest: str,
        credentials: Credentials | None,
    ) -> int | None:
        """The size if the origin lets ``credentials`` read ``digest``; raises its refusal."""
        return (await self.grant(origin, repository, digest, credentials))[0]

    async def grant(
        self,
        origin: OriginClient,
        repository: str,
        digest: str,
        credentials: Credentials | None,
    ) -> tuple[int | None, float]:
        """(the size, seconds the grant may still be reused) if the origin lets
        ``credentials`` read ``digest``; raises its refusal. An agent that asked keeps the
        grant no longer than that, so the agent's cache never adds to the proxy's."""
        key: AuthKey = (fingerprint(credentials), origin.name, repository, digest)
        now = self._clock()
        entry = self.cache.entry(key, now)
        if entry is not None:
            self.metrics.auth_checks.labels(source="cache").inc()
            expires, decision = entry
            max_age = expires - now
        else:
            max_age = self.cache.ttl

            async def ask() -> Decision:
                self.metrics.auth_checks.labels(source="origin").inc()
                try:
                    if self.kind == "blob":
                        size = (await origin.head_blob(repository, digest, credentials)).size
                    else:
                        size = (await origin.head_manifest(repository, digest, credentials)).size
                    found = Decision(size=size)
                except OCIError as exc:
                    found = Decision(error=exc)
                self.cache.put(key, found, self._clock())
                return found

            decision = await self._flights.run(key, ask)
        if decision.error is not None:
            if decision.error.code in REMEMBERED_REFUSALS:
                self.metrics.auth_denials.labels(code=str(decision.error.code)).inc()
            raise decision.error.copy()
        return decision.size, max(0.0, max_age)
