"""What every announce answered, per tracker instance: the services' status views show it.

Bounded (:data:`MAX_TRACKERS_LOGGED` instances, least recently used forgotten) and free of
secrets: no infohash, URLs without user information or query. Recording costs a dictionary
update per announce, not per piece or message.
"""

from __future__ import annotations

import collections
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from p2p_common.batch_proto import BatchResponse
from p2p_common.tracker_proto import AnnounceResponse

__all__ = ["TrackerLog", "TrackerRecord", "redact_url"]

MAX_TRACKERS_LOGGED = 64
"""Tracker instances :class:`TrackerLog` remembers (a headless Service's addresses change as
its pods are replaced; the least recently used beyond this are forgotten)."""
MAX_ERROR_CHARS = 200


def redact_url(url: str) -> str:
    """``url`` without user information or query (a private tracker's passkey), for display."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = "..." if parts.query else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "info_hash" in text or "peer_id" in text:  # an error quoting the announce URL
        return type(exc).__name__
    return text[:MAX_ERROR_CHARS]


@dataclass
class TrackerRecord:
    """What one tracker instance answered lately."""

    url: str
    """The instance announced to (an address, when the listed URL named a host)."""
    listed: str
    """The URL in the metainfo it stands for."""
    answers: int = 0
    failures: int = 0
    last_answer_at: float | None = None
    last_failure_at: float | None = None
    last_error: str | None = None
    last_peers: int | None = None
    """Peers in the last answer."""
    interval: int | None = None
    """Seconds between announces the tracker asked for in its last answer."""
    warning: str | None = None

    def view(self) -> dict[str, Any]:
        ok = self.last_answer_at is not None and (
            self.last_failure_at is None or self.last_answer_at >= self.last_failure_at
        )
        return {
            "url": redact_url(self.url),
            "listed": redact_url(self.listed),
            "ok": ok,
            "answers": self.answers,
            "failures": self.failures,
            "last_answer_at": _rounded(self.last_answer_at),
            "last_failure_at": _rounded(self.last_failure_at),
            "last_error": self.last_error,
            "last_peers": self.last_peers,
            "interval": self.interval,
            "warning": self.warning,
        }


def _rounded(at: float | None) -> float | None:
    return None if at is None else round(at, 3)


class TrackerLog:
    """The outcome of every announce, per tracker instance (bounded; see the module
    docstring). Swarms are not told apart: nothing here names an infohash."""

    def __init__(
        self, *, keep: int = MAX_TRACKERS_LOGGED, wall: Callable[[], float] = time.time
    ) -> None:
        self.keep = keep
        self.wall = wall
        self.records: collections.OrderedDict[str, TrackerRecord] = collections.OrderedDict()

    def _record(self, url: str, listed: str) -> TrackerRecord:
        record = self.records.get(url)
        if record is None:
            record = self.records[url] = TrackerRecord(url, listed)
            while len(self.records) > self.keep:
                self.records.popitem(last=False)
        else:
            record.listed = listed
            self.records.move_to_end(url)
        return record

    def answered(self, url: str, listed: str, response: AnnounceResponse | BatchResponse) -> None:
        record = self._record(url, listed)
        record.answers += 1
        record.last_answer_at = self.wall()
        if isinstance(response, BatchResponse):
            record.last_peers = sum(len(peers) for peers in response.peers.values())
        else:
            record.last_peers = len(response.peers)
        record.interval = response.interval
        record.warning = None if response.warning is None else response.warning[:MAX_ERROR_CHARS]

    def failed(self, url: str, listed: str, exc: BaseException) -> None:
        record = self._record(url, listed)
        record.failures += 1
        record.last_failure_at = self.wall()
        record.last_error = _describe(exc)

    def snapshot(self, listed: Iterable[str] = ()) -> dict[str, Any]:
        """``listed``: the tracker URLs the service knows of (configured, or found in its
        torrents' metainfo); ``instances``: every instance announced to, latest first."""
        return {
            "listed": sorted({redact_url(url) for url in listed}),
            "instances": [r.view() for r in reversed(self.records.values())],
        }
