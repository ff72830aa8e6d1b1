"""The tracker's request handling, pure: (method, path, raw query, client address, now) -> reply.

The HTTP shell (:mod:`p2p_tracker.service`) only moves bytes between hypercorn and
:meth:`Tracker.handle`, and its UDP shell between a datagram socket and
:meth:`Tracker.datagram` (BEP 15); everything a test wants to check about answers lives
here. Both protocols, and the batched announces of p2p services
(``POST /p2p/v1/announce-batch``, :mod:`p2p_common.batch_proto`), share one swarm table,
one set of caps and one set of metrics (with a ``protocol`` label).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import secrets
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from p2p_common import udp_tracker_proto as udp
from p2p_common.batch_proto import (
    BATCH_PATH,
    MAX_BATCH_NUMWANT,
    encode_batch_response,
    parse_batch_request,
)
from p2p_common.logs import event
from p2p_common.metrics import render, service_registry
from p2p_common.settings import unmapped
from p2p_common.tracker_proto import (
    AnnounceRequest,
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
    AnnounceOutcome,
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
_BATCH_METHOD = Reply(405, encode_failure("method not allowed: POST a batch"))
_BAD_METHOD = Reply(405, encode_failure("method not allowed"))
_OK = Reply(200, b"ok\n")
_READY = Reply(200, b"ready\n")
_NOT_READY = Reply(503, b"not ready\n")


PROTOCOLS = ("http", "udp")
"""Values of the ``protocol`` label of the scrape metrics."""
ANNOUNCE_PROTOCOLS = ("http", "udp", "batch")
"""Values of the ``protocol`` label of the announce metrics (``batch``: per infohash of a
batched announce)."""

_STATUS = {"bad_request": 400, "conflict": 403, "not_found": 404, "tracker_full": 503}
"""The HTTP status of each failure reason."""


class _RefusedError(Exception):
    """An announce the tracker answers with a failure (reason: metric label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Tracker:
    """The swarm registry behind the HTTP and UDP endpoints, with its metrics.

    ``secret`` keys the stateless BEP 15 connection ids (random per process by default:
    a restarted tracker refuses the old ids and clients connect again). ``instance`` is
    what batch answers name this tracker process by (random by default: a restarted
    tracker has another, and p2p services announce all their seeds to it again).
    """

    def __init__(
        self,
        settings: TrackerSettings,
        *,
        rng: random.Random | None = None,
        secret: bytes | None = None,
        instance: bytes | None = None,
    ) -> None:
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
            seed_expiry=settings.seed_expiry,
            max_batch_seeds=settings.max_batch_seeds,
        )
        self.ready = False
        """Set by the shell once it listens, cleared when it starts to stop."""
        self._interval = settings.announce_interval
        self._min_interval = min(settings.min_announce_interval, settings.announce_interval)
        self._trust_ip = settings.trust_ip_param
        self._ids = udp.ConnectionIds(secret if secret is not None else secrets.token_bytes(32))
        self.instance = instance if instance is not None else secrets.token_bytes(8)
        self._seed_interval = settings.seed_announce_interval

        self.registry = service_registry("tracker", __version__)
        announces = Counter(
            "p2p_tracker_announces",
            "Announces answered, by event and protocol",
            ["event", "protocol"],
            registry=self.registry,
        )
        self._announces = {
            proto: {e: announces.labels(e.name.lower(), proto) for e in Event}
            for proto in ANNOUNCE_PROTOCOLS
        }
        failures = Counter(
            "p2p_tracker_failures",
            "Requests answered with a failure reason (HTTP) or an error (UDP), by reason",
            ["reason", "protocol"],
            registry=self.registry,
        )
        reasons = {
            "http": ("bad_request", "tracker_full", "conflict", "not_found"),
            "udp": ("bad_request", "tracker_full", "conflict", "bad_connection_id"),
            "batch": ("bad_request", "tracker_full", "conflict"),
        }
        self._failures = {
            proto: {reason: failures.labels(reason, proto) for reason in reasons[proto]}
            for proto in ANNOUNCE_PROTOCOLS
        }
        unlisted = Counter(
            "p2p_tracker_unlisted",
            "Announces answered with peers but not remembered, by the cap that stopped them",
            ["reason", "protocol"],
            registry=self.registry,
        )
        self._unlisted = {
            proto: {reason: unlisted.labels(reason.value, proto) for reason in Unlisted}
            for proto in ANNOUNCE_PROTOCOLS
        }
        self._batches = Counter(
            "p2p_tracker_batches",
            "Batched announces (POST /p2p/v1/announce-batch) answered, empty ones included",
            registry=self.registry,
        )
        self._evicted = Counter(
            "p2p_tracker_evicted_torrents",
            "Single-address torrents forgotten to make room for new ones",
            registry=self.registry,
        )
        scrapes = Counter(
            "p2p_tracker_scrapes",
            "Scrape requests answered, by protocol",
            ["protocol"],
            registry=self.registry,
        )
        self._scrapes = {proto: scrapes.labels(proto) for proto in PROTOCOLS}
        self._connects = Counter(
            "p2p_tracker_udp_connects",
            "BEP 15 connect requests answered (each hands out a connection id)",
            registry=self.registry,
        )
        self._udp_dropped = Counter(
            "p2p_tracker_udp_dropped",
            "Datagrams dropped without an answer: shorter than a BEP 15 header, a connect "
            "without the protocol id, or an answer the socket could not send",
            ["reason"],
            registry=self.registry,
        )
        self._dropped_malformed = self._udp_dropped.labels("malformed")
        self.udp_send_failed = self._udp_dropped.labels("send_failed")
        """Counted by the UDP shell when the kernel refuses an answer (full buffer)."""
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
            "p2p_tracker_batch_seeds",
            "Peers listed by batched announces (expiring after seedExpiry)",
            registry=self.registry,
        ).set_function(lambda: swarm.batch_seed_count)
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
        body: bytes = b"",
    ) -> Reply:
        """Answer one request. ``client`` is the TCP source address (None if unknown);
        ``accept`` is the ``Accept`` header (it chooses the format of ``/metrics``);
        ``body`` the request body (read by the shell, at most ``MAX_BATCH_BODY``)."""
        if path == BATCH_PATH:
            if method != "POST":
                return _BATCH_METHOD
            return self.announce_batch(body, client, now)
        if path == "/announce":
            if method != "GET":
                return _BAD_METHOD
            # An IPv4 client of a dual-stack listener is listed (and capped) as its IPv4 address.
            return self.announce(query, None if client is None else unmapped(client), now)
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
        self._failures["http"]["not_found"].inc()
        return _NOT_FOUND

    def _refused(self, protocol: str, reason: str, message: str) -> None:
        self._failures[protocol][reason].inc()
        event(
            log, "tracker.refused", logging.DEBUG, reason=reason, message=message, protocol=protocol
        )

    def _fail(self, reason: str, message: str) -> Reply:
        self._refused("http", reason, message)
        return Reply(_STATUS[reason], encode_failure(message))

    # --- both protocols ----------------------------------------------------------------------

    def _register(
        self,
        request: AnnounceRequest,
        client: str | None,
        now: float,
        protocol: str,
        *,
        packed: int = 0,
    ) -> AnnounceOutcome:
        """Record an announce in the swarm table and count it; raise :class:`_RefusedError`.

        ``packed`` 6 or 18: the peers in compact form, of that size only
        (:meth:`Swarm.announce_packed`).
        """
        ip = client
        if self._trust_ip and request.ip is not None and _is_ip(request.ip):
            ip = request.ip
        if ip is None:
            raise _RefusedError("bad_request", "cannot tell the peer's address")
        try:
            if packed:
                outcome = self.swarm.announce_packed(request, ip, now, ipv6=packed == 18)
            else:
                outcome = self.swarm.announce(request, ip, now)
        except SwarmFullError as exc:
            raise _RefusedError("tracker_full", str(exc)) from None
        except PeerConflictError as exc:
            raise _RefusedError("conflict", str(exc)) from None
        except ValueError:
            raise _RefusedError("bad_request", "the peer's address is not an IP address") from None
        self._announces[protocol][request.event].inc()
        if outcome.evicted:
            self._evicted.inc(outcome.evicted)
        if outcome.unlisted is not None:
            self._unlisted[protocol][outcome.unlisted].inc()
        return outcome

    # --- HTTP endpoints ----------------------------------------------------------------------

    def announce(self, query: bytes, client: str | None, now: float) -> Reply:
        """``GET /announce``: register the peer, answer with other peers."""
        try:
            request = parse_announce_query(query)
            outcome = self._register(request, client, now, "http")
        except TrackerProtocolError as exc:
            return self._fail("bad_request", str(exc))
        except _RefusedError as refused:
            return self._fail(refused.reason, refused.message)
        warning = None if outcome.unlisted is None else _WARNINGS[outcome.unlisted]
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

    def announce_batch(self, body: bytes, client: str | None, now: float) -> Reply:
        """``POST /p2p/v1/announce-batch``: record a process's seeds, answer with the
        seed interval, the heartbeat, this tracker's instance and the leechers of swarms
        that have some (when asked for).

        A malformed body is refused whole (400) before anything is recorded; an entry the
        swarm table refuses (full, another address's peer id) is reported in ``failed``
        and costs only itself. The per-address, per-torrent and global caps apply to
        each entry as to an announce of its own.
        """
        try:
            request = parse_batch_request(body)
        except TrackerProtocolError as exc:
            self._refused("batch", "bad_request", str(exc))
            return Reply(400, encode_failure(str(exc)))
        ip = client
        if self._trust_ip and request.ip is not None and _is_ip(request.ip):
            ip = request.ip
        if ip is None:
            self._refused("batch", "bad_request", "cannot tell the peer's address")
            return Reply(400, encode_failure("cannot tell the peer's address"))
        try:
            outcome = self.swarm.announce_seeds(
                request.peer_id,
                request.port,
                request.entries,
                ip,
                now,
                key=request.key,
                numwant=min(request.numwant, MAX_BATCH_NUMWANT),
            )
        except ValueError:
            message = "the peer's address is not an IP address"
            self._refused("batch", "bad_request", message)
            return Reply(400, encode_failure(message))
        self._batches.inc()
        counters = self._announces["batch"]
        for announce_event, count in outcome.events.items():
            counters[announce_event].inc(count)
        if outcome.evicted:
            self._evicted.inc(outcome.evicted)
        failed: dict[bytes, str] = {}
        for info_hash, (reason, message) in outcome.failed.items():
            self._failures["batch"][reason].inc()
            failed[info_hash] = message
        if failed:
            event(log, "tracker.batch_refused", logging.DEBUG, entries=len(failed))
        unlisted = 0
        warning = None
        for cap, count in outcome.unlisted.items():
            self._unlisted["batch"][cap].inc(count)
            unlisted += count
            warning = _WARNINGS[cap]
        return Reply(
            200,
            encode_batch_response(
                interval=self._seed_interval,
                heartbeat=self._interval,
                instance=self.instance,
                peers4=outcome.peers4,
                peers6=outcome.peers6,
                failed=failed,
                unlisted=unlisted,
                warning=warning,
            ),
        )

    def scrape(self, query: bytes) -> Reply:
        """``GET /scrape?info_hash=...``: counters for the named infohashes only."""
        try:
            hashes = parse_scrape_query(query)
        except TrackerProtocolError as exc:
            return self._fail("bad_request", str(exc))
        self._scrapes["http"].inc()
        files: dict[bytes, ScrapeStats] = {h: self.swarm.scrape(h) for h in hashes}
        return Reply(200, encode_scrape_response(files))

    # --- UDP (BEP 15) ------------------------------------------------------------------------

    def datagram(self, data: bytes, client: str, now: float) -> bytes | None:
        """Answer one BEP 15 datagram from IP address ``client``: the answer, or None.

        At most one answer per datagram. Before the client has proved its address with a
        valid connection id, an answer is never larger than the datagram it answers (a
        connect answer is 16 bytes for 16): a forged source address gains an attacker no
        amplification. Datagrams shorter than a header and connects without the protocol id
        get no answer at all. An announce answer holds peers of the client's own address
        family only (an IPv4-mapped IPv6 client counts as IPv4), at most ``maxNumwant``.
        """
        client = unmapped(client)  # a dual-stack socket's IPv4 client
        try:
            cid, action, tid = udp.parse_header(data)
        except udp.UdpTrackerProtocolError:
            self._dropped_malformed.inc()
            return None
        if action == udp.Action.CONNECT:
            if cid != udp.PROTOCOL_ID:
                self._dropped_malformed.inc()
                return None
            self._connects.inc()
            return udp.encode_connect_response(tid, self._ids.issue(client, now))
        if action not in (udp.Action.ANNOUNCE, udp.Action.SCRAPE):
            return self._udp_error("bad_request", tid, "unknown action", len(data))
        if not self._ids.valid(client, cid, now):
            return self._udp_error("bad_connection_id", tid, "bad connection id", len(data))
        try:
            if action == udp.Action.ANNOUNCE:
                return self._udp_announce(data, client, now)
            return self._udp_scrape(data)
        except udp.UdpTrackerProtocolError as exc:
            return self._udp_error("bad_request", tid, str(exc), None)
        except _RefusedError as refused:
            return self._udp_error(refused.reason, tid, refused.message, None)

    def _udp_error(self, reason: str, tid: int, message: str, limit: int | None) -> bytes:
        self._refused("udp", reason, message)
        return udp.encode_error(tid, message, max_size=limit)

    def _udp_announce(self, data: bytes, client: str, now: float) -> bytes:
        parsed = udp.parse_announce_request(data)
        outcome = self._register(
            parsed.request, client, now, "udp", packed=18 if ":" in client else 6
        )
        return udp.encode_announce_response(
            parsed.transaction_id,
            interval=self._interval,
            leechers=outcome.incomplete,
            seeders=outcome.complete,
            peers=outcome.packed,
        )

    def _udp_scrape(self, data: bytes) -> bytes:
        parsed = udp.parse_scrape_request(data)
        self._scrapes["udp"].inc()
        scrape = self.swarm.scrape
        return udp.encode_scrape_response(
            parsed.transaction_id, [scrape(h) for h in parsed.info_hashes]
        )

    # --- housekeeping ------------------------------------------------------------------------

    def expire(self, now: float, *, limit: int | None = None) -> int:
        """Forget silent peers, with at most ``limit`` steps of work (the shell calls this
        periodically, and again at once while :meth:`expiry_due`)."""
        removed = self.swarm.expire(now, limit=limit)
        if removed:
            self._expired.inc(removed)
        return removed

    def expiry_due(self, now: float) -> bool:
        """Whether :meth:`expire` has more to do at ``now``."""
        return self.swarm.expiry_due(now)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
