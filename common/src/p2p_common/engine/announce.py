"""Announcing to trackers over HTTP and UDP (BEP 15), with rendezvous ranking and failover.

The metainfo lists tracker URLs: ``http://``, ``https://`` and ``udp://host:port[/path]``
(others are ignored). A URL whose host name resolves to several addresses (a headless
Service in Kubernetes) counts as one tracker per address. Each torrent ranks the resulting
trackers by rendezvous hashing of its infohash (:func:`rank_trackers`), announces to the
first that answers, and falls back to the next on failure; so all peers of one swarm meet
at the same tracker without coordinating, and a restarted or lost tracker moves only its
own swarms. A ``udp://host:port`` URL weighs exactly like ``http://host:port/announce``
(the tracker's UDP and HTTP listeners on one port number): switching a tracker list from
one protocol to the other moves no swarm, and when both are listed the UDP one goes first
and the HTTP one of the same tracker is its fallback.

Over UDP (:meth:`Announcer.announce_udp`): a connect, then the announce, each
retransmitted on BEP 15's doubling schedule scaled to a cluster's round trips
(:data:`UDP_FIRST_RETRANSMIT`, then twice as long each time) within the same
:data:`ANNOUNCE_TIMEOUT` per tracker as HTTP; the connection id is reused for a minute per
tracker address (BEP 15). A tracker whose UDP port is closed answers with an ICMP error,
which fails the attempt at once.

Announces go straight to the trackers inside the cluster: the engine's default client
(:func:`tracker_client`) ignores ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` and ``.netrc``
in the environment, which would otherwise send every infohash through a corporate proxy.

Every attempt leaves its outcome in :attr:`Announcer.log` (a :class:`TrackerLog`: per tracker
instance, counts and the last answer or error, never an infohash), which the services' status
views show. Recording costs a dictionary update per announce, not per piece or message.
"""

from __future__ import annotations

import collections
import logging
import secrets
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from p2p_common import rendezvous
from p2p_common import udp_tracker_proto as udp
from p2p_common.discovery import Resolver
from p2p_common.logs import event as log_event
from p2p_common.tracker_proto import (
    AnnounceRequest,
    AnnounceResponse,
    Event,
    TrackerProtocolError,
    TrackerRefusedError,
    announce_url,
    parse_announce_response,
)

log = logging.getLogger("p2p.announce")

ANNOUNCE_TIMEOUT = 5.0
"""Seconds one tracker gets to answer an announce (HTTP, or UDP with its retransmissions)."""
MAX_RESPONSE_BYTES = 256 * 1024
NUMWANT = 80
SCHEMES = ("http://", "https://", "udp://")
"""Tracker URLs the announcer uses; others in a metainfo are ignored."""
UDP_FIRST_RETRANSMIT = 0.5
"""Seconds before a UDP request is sent again; the wait doubles after each try (BEP 15's
schedule is 15 s doubling, made for the internet; in a cluster a round trip is well under
a millisecond, so 0.5, 1, 2 s... fit several tries into :data:`ANNOUNCE_TIMEOUT`)."""


def _rank_identity(url: str) -> str:
    """What a tracker URL weighs as: ``udp://h:p[/...]`` like ``http://h:p/announce``."""
    if not url.startswith("udp://"):
        return url
    try:
        host, port = udp.parse_udp_url(url)
    except ValueError:
        return url
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"http://{netloc}/announce"


def rank_trackers(info_hash: bytes, urls: Iterable[str]) -> list[str]:
    """Tracker URLs, most preferred for ``info_hash`` first (duplicates removed).

    Rendezvous hashing, as :func:`p2p_common.rendezvous.rank` for HTTP-only lists (the same
    order), with ``udp://h:p`` weighing like ``http://h:p/announce`` and going first on a tie.
    """
    return sorted(
        set(urls),
        key=lambda u: (rendezvous.weight(info_hash, _rank_identity(u)), u.startswith("udp://"), u),
        reverse=True,
    )


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

    def answered(self, url: str, listed: str, response: AnnounceResponse) -> None:
        record = self._record(url, listed)
        record.answers += 1
        record.last_answer_at = self.wall()
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


def tracker_client() -> httpx.AsyncClient:
    """An HTTP client for announces that takes nothing from the environment (no proxy
    variables, no ``.netrc``)."""
    return httpx.AsyncClient(trust_env=False)


class Announcer:
    def __init__(
        self, client: httpx.AsyncClient, *, peer_id: bytes, numwant: int = NUMWANT
    ) -> None:
        self.client = client
        self.peer_id = peer_id
        self.port = 0
        """Our BitTorrent port (set once the engine listens)."""
        self.numwant = numwant
        self.resolver = Resolver()
        self.udp_ids = udp.ConnectionIdCache()
        """BEP 15 connection ids per tracker address, reused for a minute."""
        self.log = TrackerLog()
        """What each tracker answered lately (for status views)."""

    async def _expanded(self, trackers: Iterable[str]) -> dict[str, str]:
        """Every instance behind ``trackers`` -> the listed URL it came from."""
        expanded: dict[str, str] = {}
        for url in trackers:
            if url.startswith(SCHEMES):
                for instance in await self.resolver.expand(url):
                    expanded.setdefault(instance, url)
        return expanded

    async def ranked(self, info_hash: bytes, trackers: tuple[str, ...]) -> list[str]:
        return rank_trackers(info_hash, await self._expanded(trackers))

    async def announce(
        self,
        info_hash: bytes,
        trackers: tuple[str, ...],
        state: tuple[Event, int, int, int],
    ) -> AnnounceResponse | None:
        """Announce ``(event, uploaded, downloaded, left)`` of one swarm to the best of its
        trackers that answers; None if none did."""
        event, uploaded, downloaded, left = state
        request = AnnounceRequest(
            info_hash=info_hash,
            peer_id=self.peer_id,
            port=self.port,
            uploaded=uploaded,
            downloaded=downloaded,
            left=left,
            event=event,
            numwant=0 if event is Event.STOPPED else self.numwant,
            compact=True,
        )
        expanded = await self._expanded(trackers)
        for url in rank_trackers(info_hash, expanded):
            try:
                with trio.fail_after(ANNOUNCE_TIMEOUT):
                    if url.startswith("udp://"):
                        response = await self.announce_udp(url, request)
                    else:
                        async with self.client.stream("GET", announce_url(url, request)) as reply:
                            body = bytearray()
                            async for chunk in reply.aiter_bytes():
                                body += chunk
                                if len(body) > MAX_RESPONSE_BYTES:
                                    raise TrackerProtocolError("tracker answer too large")
                        response = parse_announce_response(bytes(body))
                self.log.answered(url, expanded[url], response)
                return response
            except (
                httpx.HTTPError,
                TrackerProtocolError,
                trio.TooSlowError,
                OSError,
            ) as exc:
                self.log.failed(url, expanded[url], exc)
                log_event(
                    log,
                    "announce.failed",
                    logging.INFO,
                    tracker=url,
                    error=str(exc) or type(exc).__name__,
                )
        return None

    async def announce_udp(self, url: str, request: AnnounceRequest) -> AnnounceResponse:
        """One announce to a ``udp://`` tracker (BEP 15); the caller bounds the time.

        Raises :class:`TrackerProtocolError` (:class:`TrackerRefusedError` for the
        tracker's error answer; also for a URL without a port) or ``OSError`` (no such
        host, no route, ICMP port unreachable).
        """
        try:
            host, port = udp.parse_udp_url(url)
        except ValueError as exc:
            raise TrackerProtocolError(str(exc)) from None
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _type, _proto, _name, sockaddr = infos[0]
        address = (str(sockaddr[0]), int(sockaddr[1]))
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            await sock.connect(sockaddr)  # answers from anybody else are not ours
            cid = self.udp_ids.get(address, trio.current_time())
            reused = cid is not None
            while True:
                if cid is None:
                    tid = secrets.randbits(32)
                    answer = await _exchange(sock, udp.encode_connect_request(tid), tid)
                    cid = udp.parse_connect_response(answer, tid)
                    self.udp_ids.put(address, cid, trio.current_time())
                tid = secrets.randbits(32)
                answer = await _exchange(sock, udp.encode_announce_request(cid, tid, request), tid)
                try:
                    return udp.parse_announce_response(answer, tid, ipv6=family == socket.AF_INET6)
                except TrackerRefusedError:
                    self.udp_ids.drop(address)
                    if not reused:
                        raise
                    # An id from before the tracker restarted (its key changed): connect
                    # again, once.
                    reused, cid = False, None


async def _exchange(sock: trio.socket.SocketType, payload: bytes, tid: int) -> bytes:
    """Send ``payload`` until an answer to transaction ``tid`` arrives (waits double)."""
    wait = UDP_FIRST_RETRANSMIT
    while True:
        await sock.send(payload)
        with trio.move_on_after(wait):
            while True:
                answer = await sock.recv(udp.MAX_ANSWER)
                if udp.transaction_of(answer) == tid:
                    return answer
                # a late answer to an earlier request, or garbage: keep waiting
        wait *= 2
