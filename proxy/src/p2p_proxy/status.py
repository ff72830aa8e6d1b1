"""What an operator sees of a proxy: ``GET /status`` (JSON) on its API port, and
``p2p-proxy status`` (p2p_proxy.status_cli) in a terminal.

:class:`FetchLog` records every blob fetch from an origin (in flight, and the last
:data:`RECENT` finished ones) with its bytes and outcome; the fetcher feeds it.
:class:`StatusView` puts that together with the cache, the seeded blobs, the peers, the
preheat jobs, the limits in force and the trackers' last answers into one JSON document. It only
reads the parts it is given (plain objects, no sockets), so tests build it over their own.
Times are seconds; ``*_at`` fields are Unix times.

Like the agent's status, the document names blobs by digest and repository; it never holds
credentials, tokens or infohashes (an infohash is the capability to join a swarm).
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2p_common.logs import PullIds
from p2p_common.metrics import filesystem_usage

if TYPE_CHECKING:
    from p2p_common.blobcache import BlobCache
    from p2p_common.engine import Engine
    from p2p_common.engine.torrent import Torrent, TorrentStatistics
    from p2p_proxy.limits import OriginLimits
    from p2p_proxy.origin.egress import EgressRoutes
    from p2p_proxy.preheat import Job

__all__ = ["RECENT", "FetchLog", "FetchRecord", "Limits", "StatusView"]

RECENT = 50
"""Finished fetches kept for the status view."""
PREHEAT_JOBS_SHOWN = 20
"""Preheat jobs in the document, newest first (``GET /p2p/v1/preheat`` lists them all)."""
TOP_SEEDS = 10
"""Seeded blobs listed by the bytes uploaded from them."""


@dataclass(eq=False)
class FetchRecord:
    """One blob fetch from an origin."""

    id: int
    registry: str
    repository: str
    digest: str
    size: int | None
    """The blob's length, once known (the origin's Content-Length, or the caller's)."""
    started: float
    started_at: float
    received: int = 0
    """Bytes the origin sent so far."""
    ended: float | None = None
    outcome: str = "running"
    """``running``, ``done`` (verified and cached), ``failed`` or ``cancelled`` (the proxy
    stopped)."""
    error: str | None = None
    pulls: PullIds | None = None
    """The pulls this fetch serves (the one that started it first)."""

    def view(self, now: float) -> dict[str, Any]:
        end = self.ended if self.ended is not None else now
        seconds = max(end - self.started, 1e-6)
        percent = None
        if self.size is not None:
            percent = round(100.0 * self.received / self.size, 1) if self.size else 100.0
        return {
            "id": self.id,
            "registry": self.registry,
            "repository": self.repository,
            "digest": self.digest,
            "bytes": self.received,
            "size": self.size,
            "percent": percent,
            "seconds": round(seconds, 3),
            "bytes_per_second": round(self.received / seconds),
            "started_at": round(self.started_at, 3),
            "outcome": self.outcome,
            "error": self.error,
            "pull_ids": [] if self.pulls is None else list(self.pulls.ids),
            "pulls": 0 if self.pulls is None else self.pulls.count,
        }


class FetchLog:
    """Fetches in flight and the last :data:`RECENT` finished ones, and the origin bytes of
    all of them."""

    def __init__(
        self,
        *,
        keep: int = RECENT,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.wall = wall
        self.in_flight: dict[int, FetchRecord] = {}
        self.recent: collections.deque[FetchRecord] = collections.deque(maxlen=keep)
        self.finished_bytes = 0
        """Origin bytes of the fetches that ended."""
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.last_done_at: float | None = None
        self._ids = itertools.count(1)

    def begin(
        self,
        registry: str,
        repository: str,
        digest: str,
        size: int | None,
        *,
        pulls: PullIds | None = None,
    ) -> FetchRecord:
        record = FetchRecord(
            next(self._ids), registry, repository, digest, size, self.clock(), self.wall()
        )
        record.pulls = pulls
        self.in_flight[record.id] = record
        return record

    def end(self, record: FetchRecord, outcome: str, error: str | None = None) -> None:
        if record.ended is not None:
            return
        record.ended = self.clock()
        record.outcome, record.error = outcome, error
        self.in_flight.pop(record.id, None)
        self.recent.appendleft(record)
        self.finished_bytes += record.received
        self.outcomes[outcome] += 1
        if outcome == "done":
            self.last_done_at = self.wall()

    @property
    def origin_bytes(self) -> int:
        """Blob bytes received from the origins since the proxy started."""
        return self.finished_bytes + sum(r.received for r in self.in_flight.values())


@dataclass
class Limits:
    """The settings in force that bound the proxy (besides :class:`OriginLimits`)."""

    upload_rate: int
    max_connections: int
    progressive_streams: int
    auth_cache_ttl: float


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class StatusView:
    """Builds the status document from the proxy's parts (see the module docstring)."""

    def __init__(
        self,
        *,
        version: str,
        registries: Iterable[str],
        fetches: FetchLog,
        cache: BlobCache,
        seeds: Callable[[], Mapping[str, Torrent]],
        engine: Engine,
        jobs: Callable[[], Iterable[Job]],
        origin_limits: OriginLimits | None,
        limits: Limits,
        trackers: Iterable[str],
        data_dir: os.PathLike[str] | str,
        ready: Callable[[], bool] = lambda: True,
        started_at: float | None = None,
        egress: EgressRoutes | None = None,
    ) -> None:
        self.version = version
        self.registries = list(registries)
        self.fetches = fetches
        self.cache = cache
        self.seeds = seeds
        self.engine = engine
        self.jobs = jobs
        self.origin_limits = origin_limits
        self.limits = limits
        self.trackers = list(trackers)
        self.data_dir = data_dir
        self.ready = ready
        self.egress = egress
        self.started_at = time.time() if started_at is None else started_at

    def snapshot(self) -> dict[str, Any]:
        now = self.fetches.clock()
        # One pass over the swarms: a proxy may seed thousands of blobs.
        stats = {
            info_hash: torrent.statistics()
            for info_hash, torrent in list(self.engine.torrents.items())
        }
        return {
            "version": self.version,
            "started_at": round(self.started_at, 3),
            "now": round(time.time(), 3),
            "ready": self.ready(),
            "registries": self.registries,
            "fetches": [r.view(now) for r in self.fetches.in_flight.values()],
            "recent_fetches": [r.view(now) for r in self.fetches.recent],
            "origin": {
                "bytes": self.fetches.origin_bytes,
                "fetches_done": self.fetches.outcomes["done"],
                "fetches_failed": self.fetches.outcomes["failed"],
                "last_fetch_done_at": _round(self.fetches.last_done_at),
                "egress_proxy": None if self.egress is None else self.egress.describe(),
            },
            "cache": self._cache(),
            "seeding": self._seeds(stats),
            "peers": self._peers(stats),
            "preheat": self._preheat(),
            "limits": self._limits(),
            "trackers": self.engine.shared.announcer.log.snapshot(self.trackers),
        }

    def _cache(self) -> dict[str, Any]:
        usage = filesystem_usage(self.data_dir)
        total, free = usage if usage is not None else (None, None)
        digests = self.cache.digests()
        return {
            "used_bytes": self.cache.used,
            "quota_bytes": self.cache.quota,
            "blobs": len(digests),
            "blob_bytes": sum(self.cache.size(d) or 0 for d in digests),
            "disk_free_bytes": free,
            "disk_total_bytes": total,
        }

    def _seeds(self, stats: Mapping[bytes, TorrentStatistics]) -> dict[str, Any]:
        entries = []
        for digest, torrent in self.seeds().items():
            found = stats.get(torrent.info_hash) or torrent.statistics()
            entries.append((found.uploaded, digest, torrent.info.length, found.peers))
        entries.sort(reverse=True)
        return {
            "blobs": len(entries),
            "bytes": sum(length for _, _, length, _ in entries),
            "top": [
                {"digest": digest, "size": length, "uploaded_bytes": uploaded, "peers": peers}
                for uploaded, digest, length, peers in entries[:TOP_SEEDS]
                if uploaded or peers
            ],
        }

    def _peers(self, stats: Mapping[bytes, TorrentStatistics]) -> dict[str, Any]:
        roles: collections.Counter[str] = collections.Counter()
        for found in stats.values():
            roles.update(found.peers_by_role)
        return {
            "connections": self.engine.connection_count,
            "by_role": dict(sorted(roles.items())),
            "upload_bytes": self.engine.upload_limiter.total,
        }

    def _preheat(self) -> list[dict[str, Any]]:
        shown = []
        for job in itertools.islice(self.jobs(), PREHEAT_JOBS_SHOWN):
            view = job.view()
            blobs = view.pop("blobs")
            view["blobs"] = len(blobs)
            view["blobs_ready"] = sum(1 for b in blobs if b["state"] in ("cached", "fetched"))
            view["blobs_fetched"] = sum(1 for b in blobs if b["state"] == "fetched")
            shown.append(view)
        return shown

    def _limits(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "upload_bytes_per_second": self.limits.upload_rate,
            "max_connections": self.limits.max_connections,
            "progressive_streams": self.limits.progressive_streams,
            "auth_cache_ttl": self.limits.auth_cache_ttl,
        }
        origin = self.origin_limits
        if origin is not None:
            found.update(
                max_origin_fetches=origin.max_fetches,
                origin_fetches_running=origin.fetches_running,
                origin_fetches_waiting=origin.fetches_waiting,
                origin_queue_timeout=origin.queue_timeout,
                large_fetches_per_origin=origin.line_width,
                origin_fetches_in_line=origin.fetches_in_line,
                origin_requests_per_address=origin.clients.concurrency,
                origin_rate_per_address=origin.clients.rate,
                origin_burst_per_address=int(origin.clients.burst),
                uncapped_addresses=[str(network) for network in origin.uncapped],
                clients_tracked=len(origin.clients),
            )
        return found
