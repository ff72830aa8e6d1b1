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

Seeds are announced in batches (:mod:`p2p_common.batch_proto`, docs/tracker.md): while
:meth:`Announcer.run` runs, a torrent that has everything hands itself over
(:meth:`Announcer.add_seed`) and the announcer sends, per tracker instance, one
``POST /p2p/v1/announce-batch`` naming all the seeds ranked to it: new ones (``started``,
``completed``) within :data:`BATCH_DELAY`, all of them again every ``interval`` the tracker
asks for (30 minutes by default), and an empty batch every ``heartbeat`` (5 minutes) when
nothing else went there. A tracker that does not answer is marked down and its seeds are
announced at once to the tracker ranked next for each of them (and moved back when it
answers a probe again); a tracker that answers with another ``instance`` has restarted and
gets all its seeds again. A tracker without the batch endpoint (a 4xx or 501: 405 from an older
p2p-tracker, 400 from opentracker) is remembered for an hour and its seeds are announced one
by one as before, as are seeds whose first tracker is a ``udp://`` one (batching is HTTP only) --
unless the same tracker's HTTP URL is listed too: then downloads announce over UDP and
seeds in batches over HTTP.
Downloads always announce alone: they need their peers at once and a short interval.

Every attempt leaves its outcome in :attr:`Announcer.log` (a :class:`TrackerLog`: per tracker
instance, counts and the last answer or error, never an infohash), which the services' status
views show. Recording costs a dictionary update per announce, not per piece or message.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx
import trio

from p2p_common import rendezvous
from p2p_common import udp_tracker_proto as udp
from p2p_common.batch_proto import (
    BATCH_CONTENT_TYPE,
    MAX_BATCH_ANSWER,
    BatchRequest,
    batch_url,
    encode_batch_request,
    parse_batch_response,
)
from p2p_common.discovery import Resolver
from p2p_common.engine.tracker_log import TrackerLog
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
BATCH_SIZE = 1000
"""Most infohashes per batch request (the protocol allows 2,000): a batch is answered in one
go by the tracker's event loop, about 2 ms for 1,000 refreshes, so smaller batches keep the
announces of downloads waiting behind them short (docs/tracker.md)."""
BATCH_DELAY = 5.0
"""Seconds a new seed waits so that others join it in one batch: the layers of an image
that complete within a few seconds of each other go in one request (the tracker lists the
node as a leecher meanwhile, which other leechers get all the same)."""
STOP_DELAY = 0.05
"""Seconds a stopping seed waits for others stopping at the same time (a shutdown)."""
DEFAULT_SEED_INTERVAL = 1800.0
"""Seconds between batches of all seeds until a tracker says (``interval``)."""
DEFAULT_HEARTBEAT = 300.0
"""Seconds between requests to a tracker until it says (``heartbeat``)."""
HEARTBEAT_SHARE = 0.9
"""A heartbeat goes out after this share of the tracker's ``heartbeat``: a lost tracker is
noticed, and its seeds are at their next tracker, within one heartbeat even when the failed
attempt takes all of :data:`ANNOUNCE_TIMEOUT`."""
DOWN_PROBE = 30.0
"""Seconds between probes of a tracker that stopped answering (at most its heartbeat)."""
NO_BATCH_RETRY = 3600.0
"""Seconds before a tracker without the batch endpoint is asked again (it may be upgraded)."""


def _no_batch_status(status: int) -> bool:
    """Whether an answer to a batch means the tracker will not take batches: a client error
    (404 or 405 from trackers without the endpoint, 400 from opentracker, which parses no
    ``POST``; a p2p-tracker refusing our body would be our bug, and single announces still
    work) or 501."""
    return 400 <= status < 500 or status == 501


ALONE_RETRY = 60.0
"""Seconds before a seed announced alone tries again after no tracker answered."""
ALONE_CONCURRENCY = 8
"""Seeds announced alone at once."""
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


def tracker_client() -> httpx.AsyncClient:
    """An HTTP client for announces that takes nothing from the environment (no proxy
    variables, no ``.netrc``)."""
    return httpx.AsyncClient(trust_env=False)


@dataclass(eq=False)
class _Seed:
    """A torrent that has everything, announced by the announcer (not by its torrent)."""

    info_hash: bytes
    trackers: tuple[str, ...]
    stats: Callable[[], tuple[int, int]]
    """(uploaded, downloaded) now, for announces sent alone."""
    on_peers: Callable[[Iterable[tuple[str, int]]], object]
    event: Event | None
    """What to tell the tracker at once (``STARTED``, ``COMPLETED``); None: only refresh."""
    at: str | None = None
    """The tracker instance it is listed at through batches."""
    alone: bool = False
    """Announced alone: its tracker has no batch endpoint, or is a ``udp://`` one."""
    due: float = 0.0
    """When announced alone: when next."""
    ranked: list[str] | None = None
    """Its tracker instances, most preferred first (for the expansion in ``expanded_from``)."""
    expanded_from: tuple[str, ...] = ()


@dataclass(eq=False)
class _Instance:
    """What the announcer knows of one tracker instance, for batches."""

    url: str
    listed: str
    batch: bool | None = None
    """Whether it has the batch endpoint (None: not asked yet; always False for ``udp://``)."""
    busy: bool = False
    """A request to it is under way (one at a time)."""
    no_batch_until: float = 0.0
    down: bool = False
    """It did not answer the last request."""
    instance: bytes | None = None
    interval: float = DEFAULT_SEED_INTERVAL
    heartbeat: float = DEFAULT_HEARTBEAT
    next_round: float = math.inf
    """When all its seeds are announced again."""
    last_request: float = -math.inf
    pending: dict[bytes, None] = field(default_factory=dict)
    """Seeds with an event to send (in order)."""
    pending_since: float = math.inf
    seeds: dict[bytes, None] = field(default_factory=dict)
    """Seeds listed here."""
    preferred: int = 0
    """Seeds that rank this instance first (a down instance is probed while it has any)."""


@dataclass(eq=False)
class _Stopping:
    hashes: list[bytes] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)


class Announcer:
    def __init__(
        self, client: httpx.AsyncClient, *, peer_id: bytes, numwant: int = NUMWANT
    ) -> None:
        self.client = client
        self.peer_id = peer_id
        self.port = 0
        """Our BitTorrent port (set once the engine listens)."""
        self.numwant = numwant
        self.seed_numwant = 0
        """Peers asked per seed in a batch: none, since seeds wait for leechers to connect."""
        self.resolver = Resolver()
        self.udp_ids = udp.ConnectionIdCache()
        """BEP 15 connection ids per tracker address, reused for a minute."""
        self.log = TrackerLog()
        """What each tracker answered lately (for status views)."""
        self.batching = False
        """True while :meth:`run` runs: torrents that have everything hand themselves over."""
        self.key = secrets.token_bytes(8)
        """Our ``key`` in batches (keeps our entries if our address changes)."""
        self._seeds: dict[bytes, _Seed] = {}
        self._alone: dict[bytes, _Seed] = {}
        """The seeds announced alone (scanned for the due ones)."""
        self._unplaced: dict[bytes, _Seed] = {}
        """Seeds added since the last placement (placed without looking at the others)."""
        self._instances: dict[str, _Instance] = {}
        self._replan = False
        """Place every seed again (a tracker went down or came back)."""
        self._wake = trio.Event()
        self._stopping: dict[str, _Stopping] = {}
        self._rng = random.Random()
        self._alone_limiter = trio.CapacityLimiter(ALONE_CONCURRENCY)

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
                self._reached(url, True)
                return response
            except (
                httpx.HTTPError,
                TrackerProtocolError,
                trio.TooSlowError,
                OSError,
            ) as exc:
                self.log.failed(url, expanded[url], exc)
                if not isinstance(exc, TrackerProtocolError):
                    self._reached(url, False)
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

    # --- seeds, in batches ------------------------------------------------------------------

    def add_seed(
        self,
        info_hash: bytes,
        trackers: tuple[str, ...],
        event: Event,
        *,
        stats: Callable[[], tuple[int, int]],
        on_peers: Callable[[Iterable[tuple[str, int]]], object],
    ) -> None:
        """Announce a torrent that has everything from now on (``event``: ``STARTED`` or
        ``COMPLETED`` first), until :meth:`remove_seed`. Only while :meth:`run` runs."""
        seed = self._seeds.get(info_hash)
        if seed is not None:
            self._forget(seed)
        seed = self._seeds[info_hash] = _Seed(info_hash, trackers, stats, on_peers, event)
        self._unplaced[info_hash] = seed
        self._wake.set()

    async def remove_seed(self, info_hash: bytes) -> None:
        """Announce ``stopped`` for a seed and forget it; the caller bounds the time.

        Seeds stopping together (a shutdown) go out in one batch per tracker: the first
        one waits :data:`STOP_DELAY` for the others and sends them all; this works while
        :meth:`run` is being cancelled too.
        """
        seed = self._seeds.pop(info_hash, None)
        if seed is None:
            return
        self._unplaced.pop(info_hash, None)
        self._forget(seed)
        if seed.at is None:  # announced alone, or not announced by us yet
            uploaded, downloaded = seed.stats()
            await self.announce(info_hash, seed.trackers, (Event.STOPPED, uploaded, downloaded, 0))
            return
        url = seed.at
        stopping = self._stopping.get(url)
        if stopping is not None:
            stopping.hashes.append(info_hash)
            await stopping.done.wait()
            return
        stopping = self._stopping[url] = _Stopping([info_hash])
        try:
            await trio.sleep(STOP_DELAY)
            del self._stopping[url]  # later ones start their own batch
            instance = self._instances.get(url)
            if instance is not None:
                entries = [(h, Event.STOPPED) for h in stopping.hashes]
                await self._post(instance, entries, trio.current_time())
        finally:
            if self._stopping.get(url) is stopping:
                del self._stopping[url]
            stopping.done.set()

    def _forget(self, seed: _Seed) -> None:
        self._alone.pop(seed.info_hash, None)
        if seed.at is not None:
            instance = self._instances.get(seed.at)
            if instance is not None:
                instance.seeds.pop(seed.info_hash, None)
                instance.pending.pop(seed.info_hash, None)

    def _reached(self, url: str, ok: bool) -> None:
        """A request to ``url`` got an answer (``ok``) or none: a tracker that stopped
        answering moves its seeds to their next tracker, one that answers again gets back
        the seeds that rank it first."""
        instance = self._instances.get(url)
        if instance is None or instance.down == (not ok):
            return
        instance.down = not ok
        log_event(log, "announce.tracker_up" if ok else "announce.tracker_down", tracker=url)
        self._replan = True
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce the seeds handed over with :meth:`add_seed` until cancelled."""
        self.batching = True
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    self._wake = trio.Event()
                    now = trio.current_time()
                    if self._replan or any(
                        i.batch is False and now >= i.no_batch_until
                        for i in self._instances.values()
                    ):
                        await self._plan(now, everything=True)
                    elif self._unplaced:
                        await self._plan(now, everything=False)
                    self._start_sends(nursery, now)
                    wake = self._next_wake(trio.current_time())
                    if wake > 0:
                        with trio.move_on_after(wake):
                            await self._wake.wait()
                    else:
                        await trio.lowlevel.checkpoint()
        finally:
            self.batching = False

    async def _plan(self, now: float, *, everything: bool) -> None:
        """Place seeds at their tracker: the first one ranked for the infohash that is not
        down; a batch there if it has the endpoint, else the seed goes alone. ``everything``
        after a tracker went down or came back, else only the seeds added since (a reseed
        adds thousands one by one)."""
        seeds = list((self._seeds if everything else self._unplaced).values())
        self._unplaced.clear()
        expansions: dict[tuple[str, ...], dict[str, str]] = {}
        if everything:
            self._replan = False
            for instance in self._instances.values():
                instance.preferred = 0
                if instance.batch is False and now >= instance.no_batch_until:
                    instance.batch = None  # ask again: it may have been upgraded
        for seed in seeds:
            expanded = expansions.get(seed.trackers)
            if expanded is None:
                expanded = expansions[seed.trackers] = await self._expanded(seed.trackers)
            if self._seeds.get(seed.info_hash) is not seed:
                continue
            key = tuple(expanded)
            if seed.ranked is None or seed.expanded_from != key:
                seed.ranked, seed.expanded_from = rank_trackers(seed.info_hash, expanded), key
            ranked = seed.ranked
            if not ranked:
                continue
            first = _rank_identity(ranked[0])  # the HTTP twin of a udp:// one, if listed
            self._instance(first if first in expanded else ranked[0], "").preferred += 1
            chosen = ranked[0]
            for url in ranked:
                if not self._instance(url, expanded[url]).down:
                    chosen = url
                    break
            http = _rank_identity(chosen)
            if http != chosen and http in expanded:
                # udp://h:p first (downloads announce over UDP, the cheapest), but the same
                # tracker's HTTP URL is listed too: seeds go in batches there
                twin = self._instance(http, expanded[http])
                if not twin.down and twin.batch is not False:
                    chosen = http
            target = self._instances[chosen]
            if target.batch is not False:
                if seed.at != chosen:
                    self._forget(seed)
                    moved = seed.at is not None or seed.alone
                    if moved and seed.event is None:
                        seed.event = Event.STARTED  # new to that tracker
                    seed.at, seed.alone = chosen, False
                    target.seeds[seed.info_hash] = None
                    # a seed moving after a tracker loss is announced at once
                    self._pend(target, seed, now - BATCH_DELAY if moved else now)
                elif seed.event is not None:
                    self._pend(target, seed, now)
            elif not seed.alone:
                self._forget(seed)
                if seed.at is not None and seed.event is None:
                    seed.event = Event.STARTED
                seed.at, seed.alone, seed.due = None, True, now
                self._alone[seed.info_hash] = seed

    def _instance(self, url: str, listed: str) -> _Instance:
        instance = self._instances.get(url)
        if instance is None:
            instance = self._instances[url] = _Instance(url, listed or url)
            if batch_url(url) is None:
                instance.batch, instance.no_batch_until = False, math.inf
        elif listed:
            instance.listed = listed
        return instance

    def _pend(self, instance: _Instance, seed: _Seed, since: float) -> None:
        """Queue the seed's event for ``instance``; sent :data:`BATCH_DELAY` after
        ``since`` (of the first one waiting)."""
        instance.pending_since = min(instance.pending_since, since)
        instance.pending[seed.info_hash] = None

    @staticmethod
    def _due(instance: _Instance) -> float:
        """When the next request to ``instance`` is due (inf: none)."""
        if instance.batch is False or instance.busy:
            return math.inf
        if instance.down:  # probed while seeds prefer it
            if not instance.preferred:
                return math.inf
            return instance.last_request + min(instance.heartbeat, DOWN_PROBE)
        due = math.inf
        if instance.seeds:
            due = instance.next_round
        if instance.pending:
            due = min(due, instance.pending_since + BATCH_DELAY)
        elif instance.seeds:
            due = min(due, instance.last_request + HEARTBEAT_SHARE * instance.heartbeat)
        return due

    def _start_sends(self, nursery: trio.Nursery, now: float) -> None:
        """Start every request that is due: per instance one at a time (a round of all its
        seeds, new seeds, a heartbeat or a probe); the seeds that go alone, a few at a
        time."""
        for instance in list(self._instances.values()):
            if now < self._due(instance):
                continue
            entries: list[tuple[bytes, Event]]
            if instance.down:
                entries = []
            elif now >= instance.next_round and instance.seeds:
                entries = [(h, self._take_event(h)) for h in instance.seeds]
                instance.next_round = now + self._jittered(instance.interval)
            elif instance.pending:
                entries = [(h, self._take_event(h)) for h in instance.pending]
                if instance.next_round == math.inf:
                    instance.next_round = now + self._jittered(instance.interval)
            else:
                entries = []  # a heartbeat
            if entries:
                instance.pending.clear()
                instance.pending_since = math.inf
            instance.last_request = now
            instance.busy = True
            nursery.start_soon(self._send_round, instance, entries, now)
        for seed in self._alone.values():
            if seed.due <= now:
                seed.due = math.inf  # set when its announce ends
                nursery.start_soon(self._announce_alone, seed)

    def _take_event(self, info_hash: bytes) -> Event:
        seed = self._seeds[info_hash]
        event, seed.event = seed.event, None
        return Event.NONE if event is None else event

    def _jittered(self, interval: float) -> float:
        """``interval`` minus up to a tenth, so that nodes do not announce in step."""
        return interval * (1.0 - 0.1 * self._rng.random())

    def _next_wake(self, now: float) -> float:
        """Seconds until something is due (at most a minute)."""
        wake = now + 60.0
        for instance in self._instances.values():
            wake = min(wake, self._due(instance))
            if instance.batch is False:
                wake = min(wake, instance.no_batch_until)
        for seed in self._alone.values():
            wake = min(wake, seed.due)
        return 0.0 if self._replan or self._unplaced else max(0.0, wake - now)

    async def _send_round(
        self, instance: _Instance, entries: list[tuple[bytes, Event]], now: float
    ) -> None:
        """Send ``entries`` (none: a heartbeat or a probe) to ``instance`` in batches of
        :data:`BATCH_SIZE`; on a failure the seeds keep their events (they go wherever the
        seeds are placed next)."""
        try:
            for start in range(0, max(1, len(entries)), BATCH_SIZE):
                if not await self._post(instance, entries[start : start + BATCH_SIZE], now):
                    for info_hash, event in entries[start:]:
                        seed = self._seeds.get(info_hash)
                        if seed is not None and seed.event is None and event is not Event.NONE:
                            seed.event = event
                    return
        finally:
            instance.busy = False
            self._wake.set()

    async def _post(
        self, instance: _Instance, entries: list[tuple[bytes, Event]], now: float
    ) -> bool:
        """One batch request; True when the tracker took it. Updates what is known of the
        instance (endpoint, up or down, restarts, intervals) and hands peers to the seeds."""
        url = batch_url(instance.url)
        if url is None:
            return False
        request = BatchRequest(
            peer_id=self.peer_id,
            port=self.port,
            entries=tuple(entries),
            numwant=self.seed_numwant,
            key=self.key,
        )
        try:
            with trio.fail_after(ANNOUNCE_TIMEOUT):
                async with self.client.stream(
                    "POST",
                    url,
                    content=encode_batch_request(request),
                    headers={"content-type": BATCH_CONTENT_TYPE},
                ) as reply:
                    if _no_batch_status(reply.status_code):
                        self._no_batch(instance, reply.status_code)
                        return False
                    body = bytearray()
                    async for chunk in reply.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_BATCH_ANSWER:
                            raise TrackerProtocolError("tracker answer too large")
                    if reply.status_code != 200:
                        try:
                            parse_batch_response(bytes(body))
                        except TrackerRefusedError:
                            raise
                        except TrackerProtocolError:
                            pass
                        raise TrackerProtocolError(f"HTTP {reply.status_code}")
            response = parse_batch_response(bytes(body))
        except (httpx.HTTPError, TrackerProtocolError, trio.TooSlowError, OSError) as exc:
            self.log.failed(instance.url, instance.listed, exc)
            log_event(
                log,
                "announce.batch_failed",
                logging.INFO,
                tracker=instance.url,
                seeds=len(entries),
                error=str(exc) or type(exc).__name__,
            )
            self._reached(instance.url, False)
            return False
        self.log.answered(instance.url, instance.listed, response)
        instance.batch = True
        self._reached(instance.url, True)
        instance.interval = float(response.interval)
        instance.heartbeat = float(response.heartbeat)
        if instance.seeds:  # the tracker may want its seeds sooner than we assumed
            instance.next_round = min(instance.next_round, now + self._jittered(response.interval))
        if instance.instance is not None and instance.instance != response.instance:
            log_event(log, "announce.tracker_restarted", tracker=instance.url)
            instance.next_round = now  # it forgot everything: all its seeds again, now
            self._wake.set()
        instance.instance = response.instance
        for info_hash, peers in response.peers.items():
            seed = self._seeds.get(info_hash)
            if seed is not None:
                seed.on_peers((p.ip, p.port) for p in peers)
        if response.failed or response.warning:
            log_event(
                log,
                "announce.batch_partly_refused",
                logging.INFO,
                tracker=instance.url,
                refused=len(response.failed),
                unlisted=response.unlisted,
                warning=response.warning,
            )
        return True

    def _no_batch(self, instance: _Instance, status: int) -> None:
        """``instance`` has no batch endpoint: its seeds go alone for a while."""
        log_event(log, "announce.no_batch_endpoint", tracker=instance.url, status=status)
        instance.batch = False
        instance.no_batch_until = trio.current_time() + NO_BATCH_RETRY
        instance.next_round = math.inf
        for info_hash in list(instance.seeds):
            seed = self._seeds.get(info_hash)
            if seed is not None and seed.at == instance.url:
                seed.at = None
                seed.alone, seed.due = True, trio.current_time()
                self._alone[info_hash] = seed
                if seed.event is None:
                    seed.event = Event.STARTED
        instance.seeds.clear()
        instance.pending.clear()
        self._wake.set()

    async def _announce_alone(self, seed: _Seed) -> None:
        async with self._alone_limiter:
            if self._seeds.get(seed.info_hash) is not seed or not seed.alone:
                return
            uploaded, downloaded = seed.stats()
            event = Event.NONE if seed.event is None else seed.event
            response = await self.announce(
                seed.info_hash, seed.trackers, (event, uploaded, downloaded, 0)
            )
            now = trio.current_time()
            if response is None:
                seed.due = now + ALONE_RETRY
                return
            if seed.event is event:
                seed.event = None
            seed.due = now + response.interval
            seed.on_peers((p.ip, p.port) for p in response.peers)


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
