"""What an operator sees of an agent: ``/status`` (JSON) and ``/`` (a page) on the metrics port.

:class:`PullLog` records every blob response the registry API sends (in flight, and the last
:data:`RECENT` finished ones) with its bytes, time to first byte and outcome. :class:`StatusView`
puts that together with the downloads in progress (pieces, peers and bytes by source), the
cache and its policy, the rates in force, the proxies' and trackers' last answers and the
mirror-mode state of each registry (:mod:`p2p_agent.mirror`) into one JSON document, the same one
``p2p-agent status`` shows in a terminal. Times are seconds; ``*_at`` fields are Unix times.
Blobs are named by digest; the document holds no credentials and no infohashes.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from p2p_agent.mirror import MirrorStatus
from p2p_common.engine.tracker_log import TrackerLog
from p2p_common.logs import current_pull_id, event, new_pull_id
from p2p_common.metrics import filesystem_usage

__all__ = ["PullLog", "PullRecord", "Rates", "StatusView", "page"]

log = logging.getLogger("p2p.agent.pulls")

RECENT = 50
"""Finished pulls kept for the status view."""


@dataclass(eq=False)
class PullRecord:
    """One blob response of the registry API."""

    id: str
    """The request's pull id (in the agent's and the proxies' log lines for it)."""
    repository: str
    digest: str
    size: int
    """Bytes this response sends (the range, or the whole blob)."""
    source: str
    """``cache`` (a cache hit) or ``download`` (the blob was not here yet)."""
    started: float
    started_at: float
    sent: int = 0
    first_byte: float | None = None
    ended: float | None = None
    outcome: str = "running"
    """``running``, ``done``, ``cancelled`` (the client went away) or ``failed``."""

    def add(self, count: int, now: float) -> None:
        if self.first_byte is None and count:
            self.first_byte = now
        self.sent += count

    def view(self, now: float) -> dict[str, Any]:
        end = self.ended if self.ended is not None else now
        seconds = max(end - self.started, 1e-6)
        return {
            "id": self.id,
            "repository": self.repository,
            "digest": self.digest,
            "source": self.source,
            "bytes": self.sent,
            "size": self.size,
            "percent": round(100.0 * self.sent / self.size, 1) if self.size else 100.0,
            "seconds": round(seconds, 3),
            "bytes_per_second": round(self.sent / seconds),
            "first_byte_seconds": None
            if self.first_byte is None
            else round(self.first_byte - self.started, 3),
            "started_at": round(self.started_at, 3),
            "outcome": self.outcome,
        }


class PullLog:
    """Pulls in flight and the last :data:`RECENT` finished ones."""

    def __init__(
        self,
        *,
        keep: int = RECENT,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.wall = wall
        self.in_flight: dict[int, PullRecord] = {}
        """By a sequence number of their own (two responses may share a pull id)."""
        self.recent: collections.deque[PullRecord] = collections.deque(maxlen=keep)
        self.last_success_at: float | None = None
        self._ids = itertools.count(1)

    def begin(
        self, repository: str, digest: str, size: int, source: str, *, pull_id: str | None = None
    ) -> PullRecord:
        """A blob response starts; its id is ``pull_id``, or the current pull's."""
        pid = pull_id or current_pull_id() or new_pull_id()
        record = PullRecord(pid, repository, digest, size, source, self.clock(), self.wall())
        self.in_flight[next(self._ids)] = record
        return record

    def add(self, record: PullRecord, count: int) -> None:
        record.add(count, self.clock())

    def end(self, record: PullRecord, outcome: str) -> None:
        if record.ended is not None:
            return
        record.ended = self.clock()
        record.outcome = outcome
        for key, found in list(self.in_flight.items()):
            if found is record:
                del self.in_flight[key]
        self.recent.appendleft(record)
        if outcome == "done":
            self.last_success_at = self.wall()
        event(
            log,
            "pull.finished",
            logging.WARNING if outcome == "failed" else logging.INFO,
            pull_id=record.id,
            repository=record.repository,
            digest=record.digest,
            source=record.source,
            bytes=record.sent,
            size=record.size,
            seconds=round(record.ended - record.started, 3),
            outcome=outcome,
        )


@dataclass
class Rates:
    """The rates in force and where they came from."""

    download: int
    upload: int
    source: str
    changed_at: float = field(default_factory=time.time)
    adaptive: Callable[[], dict[str, Any] | None] | None = None
    """The state of the adaptive download limit (``diskWriteLatencyLimit``), None when off."""


class StatusView:
    """Builds the status document from the agent's parts (given as callables and objects with
    the few attributes read here, so that tests can hand in their own)."""

    def __init__(
        self,
        *,
        version: str,
        pulls: PullLog,
        downloads: Any,
        cache: Any,
        proxies: Any,
        rates: Rates,
        data_dir: os.PathLike[str] | str,
        trackers: TrackerLog | None = None,
        tracker_urls: Callable[[], Iterable[str]] = tuple,
        mirror: MirrorStatus | None = None,
        started_at: float | None = None,
        cache_policy: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.version = version
        self.pulls = pulls
        self.downloads = downloads
        self.cache = cache
        self.proxies = proxies
        self.rates = rates
        self.data_dir = data_dir
        self.trackers = trackers or TrackerLog()
        """The engine's announce outcomes."""
        self.tracker_urls = tracker_urls
        """The tracker URLs of the torrents the agent holds (they come with the metainfo)."""
        self.mirror = mirror
        self.cache_policy = cache_policy
        """The cache policy in force (limits, where they came from, evictions)."""
        self.started_at = time.time() if started_at is None else started_at

    def snapshot(self) -> dict[str, Any]:
        now = self.pulls.clock()
        return {
            "version": self.version,
            "started_at": round(self.started_at, 3),
            "now": round(time.time(), 3),
            "pulls": [r.view(now) for r in self.pulls.in_flight.values()],
            "recent": [r.view(now) for r in self.pulls.recent],
            "last_successful_pull_at": self.pulls.last_success_at,
            "downloads": self._downloads(),
            "cache": self._cache(),
            "rates": {
                "download_bytes_per_second": self.rates.download,
                "upload_bytes_per_second": self.rates.upload,
                "source": self.rates.source,
                "changed_at": round(self.rates.changed_at, 3),
                "adaptive": None if self.rates.adaptive is None else self.rates.adaptive(),
            },
            "proxies": self._proxies(),
            "trackers": self.trackers.snapshot(self.tracker_urls()),
            "mirror": None if self.mirror is None else self.mirror.snapshot(),
        }

    def _downloads(self) -> list[dict[str, Any]]:
        found = []
        for digest, download in list(self.downloads.active.items()):
            entry: dict[str, Any] = {"digest": digest, "size": download.size}
            torrent = getattr(download, "torrent", None)
            if torrent is not None:
                stats = torrent.statistics()
                entry.update(
                    way="swarm",
                    pieces=stats.pieces,
                    have=stats.have,
                    known=stats.known,
                    percent=round(100.0 * stats.have / stats.pieces, 1) if stats.pieces else 0.0,
                    peers=stats.peers,
                    peers_by_role=stats.peers_by_role,
                    bytes_by_source=stats.downloaded_by_role,
                    seconds_since_progress=round(stats.seconds_since_progress, 1),
                )
            else:
                ingest = getattr(download, "ingest", None)
                written = 0 if ingest is None else ingest.written
                entry.update(
                    way="proxy_stream",
                    bytes=written,
                    percent=round(100.0 * written / download.size, 1) if download.size else 0.0,
                )
            found.append(entry)
        return found

    def _cache(self) -> dict[str, Any]:
        usage = filesystem_usage(self.data_dir)
        total, free = usage if usage is not None else (None, None)
        seeded = len(getattr(self.downloads, "info_hashes", {}))
        found = {
            "used_bytes": self.cache.used,
            "quota_bytes": self.cache.quota,
            "blobs": len(self.cache.digests()),
            "seeded_blobs": seeded,
            "disk_free_bytes": free,
            "disk_total_bytes": total,
        }
        if self.cache_policy is not None:
            found["policy"] = self.cache_policy()
        return found

    def _proxies(self) -> dict[str, Any]:
        """The configured proxy URLs, and every instance (address) behind them that was
        asked, with the outcome of the last request."""
        health = getattr(self.proxies, "health", {})
        return {
            "configured": list(self.proxies.urls),
            "instances": [
                {"url": base, "ok": ok, "detail": detail, "at": round(at, 3)}
                for base, (ok, detail, at) in sorted(health.items())
            ],
        }


def page() -> bytes:
    """The self-contained status page (HTML, CSS and a script that polls ``/status``)."""
    return resources.files("p2p_agent").joinpath("status.html").read_bytes()
