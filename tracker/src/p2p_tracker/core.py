"""The tracker's request handling, pure: (method, path, raw query, client address, now) -> reply.

The HTTP shell (:mod:`p2p_tracker.service`) only moves bytes between hypercorn and
:meth:`Tracker.handle`; everything a test wants to check about answers lives here.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from p2p_common.logs import event
from p2p_common.metrics import render, service_registry
from p2p_common.tracker_proto import (
    AnnounceResponse,
    Event,
    Peer,
    ScrapeStats,
    TrackerProtocolError,
    encode_announce_response,
    encode_compact_announce,
    encode_failure,
    encode_scrape_response,
    parse_announce_query,
    parse_scrape_query,
)
from p2p_tracker import __version__
from p2p_tracker.settings import TrackerSettings
from p2p_tracker.swarm import (
    IP,
    PACKED,
    PEER_ID,
    PORT,
    PeerConflictError,
    Swarm,
    SwarmFullError,
    Unlisted,
)

__all__ = ["Reply", "Tracker"]

log = logging.getLogger("p2p.tracker")

_TEXT = b"text/plain"
_WARNINGS = {
    Unlisted.SWARM_FULL: "swarm is full: you get peers but are not listed",
    Unlisted.ADDRESS_PEERS: (
        "too many peers from your address in this swarm: you get peers but are not listed"
    ),
    Unlisted.ADDRESS_TORRENTS: (
        "your address is a peer of too many torrents: you get peers but are not listed"
    ),
    Unlisted.TRACKER_FULL: "tracker is full: you get peers but are not listed",
}
"""The ``warning message`` of an answer whose requester was not remembered, by cause."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer: status, content type and body."""

    status: int
    body: bytes
    content_type: bytes = _TEXT


_NOT_FOUND = Reply(404, encode_failure("not found: use /announce or /scrape"))
_BAD_METHOD = Reply(405, encode_failure("method not allowed"))
_OK = Reply(200, b"ok\n")
_READY = Reply(200, b"ready\n")
_NOT_READY = Reply(503, b"not ready\n")


class Tracker:
    """The swarm registry behind the HTTP endpoints, with its metrics."""

    def __init__(self, settings: TrackerSettings, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.swarm = Swarm(
            peer_expiry=settings.peer_expiry,
            max_torrents=settings.max_torrents,
            max_peers_per_torrent=settings.max_peers_per_torrent,
            max_peers=settings.max_peers,
            max_torrents_per_address=settings.max_torrents_per_address,
            max_peers_per_address=settings.max_peers_per_address,
            uncapped=settings.uncapped_addresses,
            default_numwant=settings.default_numwant,
            max_numwant=settings.max_numwant,
            rng=rng,
        )
        self.ready = False
        """Set by the shell once it listens, cleared when it starts to stop."""
        self._interval = settings.announce_interval
        self._min_interval = min(settings.min_announce_interval, settings.announce_interval)
        self._trust_ip = settings.trust_ip_param

        self.registry = service_registry("tracker", __version__)
        announces = Counter(
            "p2p_tracker_announces",
            "Announces answered, by event",
            ["event"],
            registry=self.registry,
        )
        self._announces = {e: announces.labels(e.name.lower()) for e in Event}
        failures = Counter(
            "p2p_tracker_failures",
            "Requests answered with a failure reason, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._failures = {
            reason: failures.labels(reason)
            for reason in ("bad_request", "tracker_full", "conflict", "not_found")
        }
        unlisted = Counter(
            "p2p_tracker_unlisted",
            "Announces answered with peers but not remembered, by the cap that stopped them",
            ["reason"],
            registry=self.registry,
        )
        self._unlisted = {reason: unlisted.labels(reason.value) for reason in Unlisted}
        self._evicted = Counter(
            "p2p_tracker_evicted_torrents",
            "Single-address torrents forgotten to make room for new ones",
            registry=self.registry,
        )
        self._scrapes = Counter(
            "p2p_tracker_scrapes", "Scrape requests answered", registry=self.registry
        )
        self._expired = Counter(
            "p2p_tracker_expired_peers",
            "Peers forgotten because they stopped announcing",
            registry=self.registry,
        )
        swarm = self.swarm
        Gauge("p2p_tracker_torrents", "Infohashes tracked", registry=self.registry).set_function(
            lambda: swarm.torrent_count
        )
        Gauge("p2p_tracker_peers", "Peers tracked", registry=self.registry).set_function(
            lambda: swarm.peer_count
        )
        Gauge(
            "p2p_tracker_seeders", "Peers with nothing left", registry=self.registry
        ).set_function(lambda: swarm.seeder_count)
        Gauge(
            "p2p_tracker_addresses", "Addresses with at least one peer", registry=self.registry
        ).set_function(lambda: swarm.address_count)
        Gauge(
            "p2p_tracker_single_address_torrents",
            "Torrents whose peers all share one address (the eviction candidates)",
            registry=self.registry,
        ).set_function(lambda: swarm.single_address_count)

    # --- dispatch ----------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        query: bytes,
        client: str | None,
        now: float,
        *,
        accept: str | None = None,
    ) -> Reply:
        """Answer one request. ``client`` is the TCP source address (None if unknown);
        ``accept`` is the ``Accept`` header (it chooses the format of ``/metrics``)."""
        if path == "/announce":
            if method != "GET":
                return _BAD_METHOD
            return self.announce(query, client, now)
        if path == "/scrape":
            if method != "GET":
                return _BAD_METHOD
            return self.scrape(query)
        if method not in ("GET", "HEAD"):
            return _BAD_METHOD
        if path == "/healthz":
            return _OK
        if path == "/readyz":
            return _READY if self.ready else _NOT_READY
        if path == "/metrics":
            body, content_type = render(self.registry, accept)
            return Reply(200, body, content_type.encode())
        self._failures["not_found"].inc()
        return _NOT_FOUND

    def _fail(self, status: int, reason: str, message: str) -> Reply:
        self._failures[reason].inc()
        event(log, "tracker.refused", logging.DEBUG, reason=reason, message=message)
        return Reply(status, encode_failure(message))

    # --- endpoints ---------------------------------------------------------------------------

    def announce(self, query: bytes, client: str | None, now: float) -> Reply:
        """``GET /announce``: register the peer, answer with other peers."""
        try:
            request = parse_announce_query(query)
        except TrackerProtocolError as exc:
            return self._fail(400, "bad_request", str(exc))
        ip = client
        if self._trust_ip and request.ip is not None and _is_ip(request.ip):
            ip = request.ip
        if ip is None:
            return self._fail(400, "bad_request", "cannot tell the peer's address")
        try:
            outcome = self.swarm.announce(request, ip, now)
        except SwarmFullError as exc:
            return self._fail(503, "tracker_full", str(exc))
        except PeerConflictError as exc:
            return self._fail(403, "conflict", str(exc))
        except ValueError:
            return self._fail(400, "bad_request", "the peer's address is not an IP address")
        self._announces[request.event].inc()
        if outcome.evicted:
            self._evicted.inc(outcome.evicted)
        warning = None
        if outcome.unlisted is not None:
            self._unlisted[outcome.unlisted].inc()
            warning = _WARNINGS[outcome.unlisted]
        peers = outcome.peers
        if request.compact:
            peers4 = b"".join([p[PACKED] for p in peers if len(p[PACKED]) == 6])
            peers6 = b"".join([p[PACKED] for p in peers if len(p[PACKED]) == 18])
            body = encode_compact_announce(
                interval=self._interval,
                min_interval=self._min_interval,
                complete=outcome.complete,
                incomplete=outcome.incomplete,
                peers4=peers4,
                peers6=peers6,
                warning=warning,
            )
        else:
            body = encode_announce_response(
                AnnounceResponse(
                    interval=self._interval,
                    min_interval=self._min_interval,
                    complete=outcome.complete,
                    incomplete=outcome.incomplete,
                    peers=tuple(Peer(p[IP], p[PORT], p[PEER_ID]) for p in peers),
                    warning=warning,
                ),
                compact=False,
                no_peer_id=request.no_peer_id,
            )
        return Reply(200, body)

    def scrape(self, query: bytes) -> Reply:
        """``GET /scrape?info_hash=...``: counters for the named infohashes only."""
        try:
            hashes = parse_scrape_query(query)
        except TrackerProtocolError as exc:
            return self._fail(400, "bad_request", str(exc))
        self._scrapes.inc()
        files: dict[bytes, ScrapeStats] = {h: self.swarm.scrape(h) for h in hashes}
        return Reply(200, encode_scrape_response(files))

    def expire(self, now: float, *, limit: int | None = None) -> int:
        """Forget silent peers, at most ``limit`` (the shell calls this periodically)."""
        removed = self.swarm.expire(now, limit=limit)
        if removed:
            self._expired.inc(removed)
        return removed


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
