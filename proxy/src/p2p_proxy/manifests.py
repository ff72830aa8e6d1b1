"""Manifests: tags resolved at the origin on every request, bodies cached by digest.

A rollout sends the same few manifest requests from every node. Tags move, so a tag is always
resolved by the origin, with the caller's credentials (a ``HEAD``: it authorizes the caller and
names the digest the tag points at now); the body is content-addressed, so once the proxy has
fetched the bytes of a digest it serves them from memory to every caller the origin authorizes.
A rollout of N nodes then costs the origin N ``HEAD`` requests and one ``GET`` per manifest
instead of N ``GET`` requests (registries that rate-limit pulls, such as Docker Hub, count the
``GET`` requests). Concurrent identical requests (same credentials, registry, repository,
reference and ``Accept``) share one origin request. The query's ``admission`` (its client's
limits, :mod:`p2p_proxy.limits`) is asked before a request starts an origin request, never
when it joins one or is answered from memory.

A by-digest request for a cached manifest is authorized like a blob: a ``HEAD`` of the manifest
with the caller's credentials, remembered for ``authCacheTtl`` seconds (a tag resolution or a
``GET`` that succeeded counts as that check). Nothing is served to a caller the origin has not
authorized for that repository.

:class:`ManifestCache` is pure; :class:`Manifests` is the shell the handler calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from p2p_common.oci import OCIError, is_digest_reference
from p2p_common.registry_auth import Credentials, fingerprint
from p2p_common.ttlcache import TTLCache
from p2p_proxy.authz import Authorizer
from p2p_proxy.flight import Admission, SingleFlight
from p2p_proxy.metrics import ProxyMetrics
from p2p_proxy.origin import ManifestResponse, OriginClient

__all__ = ["CachedManifest", "ManifestCache", "ManifestQuery", "Manifests"]

FlightKey = tuple[str, str, str, str, str, str]
"""(method, credentials fingerprint, registry, repository, reference, Accept)."""

FINAL_HEAD_STATUSES = frozenset({401, 403, 404, 429})
"""Answers to a tag ``HEAD`` that a ``GET`` would get too; anything else falls back to ``GET``."""
_TIMELESS = 0.0
"""The time the body cache is read at: its entries never expire, so any time will do."""


@dataclass(frozen=True, slots=True)
class CachedManifest:
    content_type: str
    body: bytes


class ManifestCache:
    """Manifest bodies by digest, in memory; least recently used dropped beyond ``max_bytes``
    (a :class:`~p2p_common.ttlcache.TTLCache` weighed in bytes; a body never expires: its
    digest names its content). A body larger than the whole cache is not kept.

    The caller guarantees that ``body`` hashes to ``digest`` (the origin client verifies it).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: TTLCache[str, CachedManifest] = TTLCache(
            max_weight=max(0, max_bytes), weigh=lambda entry: len(entry.body)
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and self._entries.peek(digest, _TIMELESS) is not None

    def get(self, digest: str) -> CachedManifest | None:
        return self._entries.get(digest, _TIMELESS)

    def put(self, digest: str, content_type: str, body: bytes) -> None:
        self._entries.set(digest, CachedManifest(content_type, body))

    @property
    def bytes(self) -> int:
        """The bytes of the bodies held."""
        return self._entries.weight


def _cached_answer(
    entry: CachedManifest, digest: str, content_type: str, *, head: bool
) -> ManifestResponse:
    return ManifestResponse(
        status=200,
        headers={},
        content_type=content_type or entry.content_type,
        digest=digest,
        size=len(entry.body),
        body=b"" if head else entry.body,
    )


@dataclass(frozen=True, slots=True)
class ManifestQuery:
    """One caller's manifest request, as the origin will be asked for it."""

    origin: OriginClient
    repository: str
    reference: str
    credentials: Credentials | None
    accept: str | None
    """Every ``Accept`` line of the request, merged (:func:`~p2p_common.oci.merge_accept`)."""
    admission: Admission | None = None
    """Whether the caller may start origin requests (its client's limits)."""


class Manifests:
    """Manifest requests for the handler: see the module docstring. ``max_bytes`` 0 turns the
    cache off: every request then goes to the origin as it came (concurrent identical ones
    still share one origin request)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        metrics: ProxyMetrics,
        authorizer: Authorizer,
        *,
        max_bytes: int,
    ) -> None:
        self.cache = ManifestCache(max_bytes)
        self.metrics = metrics
        self.authorizer = authorizer
        self._flights: SingleFlight[FlightKey, ManifestResponse] = SingleFlight(
            nursery, "manifest request", on_join=metrics.origin_joins.labels(kind="manifest").inc
        )

    async def fetch(self, query: ManifestQuery, *, head: bool) -> ManifestResponse:
        """The answer for a ``GET`` (or ``HEAD``) of the query's manifest; the origin's
        refusals and failures are raised as :class:`OCIError`."""
        self.metrics.manifest_requests.inc()
        found = await self._answer(query, head=head)
        if head and found.size is None:  # an origin that does not tell the size: ask for the body
            found = await self._answer(query, head=False)
        return found

    async def _answer(self, query: ManifestQuery, *, head: bool) -> ManifestResponse:
        if self.cache.max_bytes <= 0:
            return await self._origin("HEAD" if head else "GET", query)
        if is_digest_reference(query.reference):
            return await self._by_digest(query, head=head)
        return await self._by_tag(query, head=head)

    async def _by_digest(self, query: ManifestQuery, *, head: bool) -> ManifestResponse:
        digest = query.reference
        entry = self.cache.get(digest)
        if entry is not None:
            await self.authorizer.authorize(
                query.origin, query.repository, digest, query.credentials
            )
            self.metrics.manifest_cache_hits.inc()
            return _cached_answer(entry, digest, "", head=head)
        found = await self._origin("HEAD" if head else "GET", query)
        self._learn(query, found)
        return found

    async def _by_tag(self, query: ManifestQuery, *, head: bool) -> ManifestResponse:
        if head:
            found = await self._origin("HEAD", query)
            self._learn(query, found)
            return found
        try:
            resolved: ManifestResponse | None = await self._origin("HEAD", query)
        except OCIError as exc:
            if exc.status in FINAL_HEAD_STATUSES:
                raise
            resolved = None  # an origin that cannot answer HEAD here: ask for the body
        if resolved is not None and resolved.digest is not None:
            self._learn(query, resolved)
            entry = self.cache.get(resolved.digest)
            if entry is not None:
                self.metrics.manifest_cache_hits.inc()
                return _cached_answer(entry, resolved.digest, resolved.content_type, head=False)
        found = await self._origin("GET", query)
        self._learn(query, found)
        return found

    def _learn(self, query: ManifestQuery, found: ManifestResponse) -> None:
        """Keep what a successful origin answer taught: that these credentials may read that
        digest in this repository (the body was cached by the request itself)."""
        if found.status != 200 or found.digest is None:
            return
        self.authorizer.remember_grant(
            query.origin, query.repository, found.digest, query.credentials, found.size
        )

    async def _origin(self, method: str, query: ManifestQuery) -> ManifestResponse:
        """One origin request, shared by concurrent identical callers."""
        origin, repository, reference = query.origin, query.repository, query.reference
        credentials, accept = query.credentials, query.accept
        key: FlightKey = (
            method,
            fingerprint(credentials),
            origin.name,
            repository,
            reference,
            accept or "",
        )

        async def ask() -> ManifestResponse:
            self.metrics.manifest_origin_requests.labels(method=method).inc()
            if method == "HEAD":
                return await origin.head_manifest(repository, reference, credentials, accept=accept)
            found = await origin.get_manifest(repository, reference, credentials, accept=accept)
            if found.status == 200 and found.digest is not None:
                # Cached before the flight ends: a caller arriving between the end of this
                # flight and its waiters waking up finds the body instead of asking again.
                self.cache.put(found.digest, found.content_type, found.body)
            return found

        return await self._flights.run(key, ask, admission=query.admission)
