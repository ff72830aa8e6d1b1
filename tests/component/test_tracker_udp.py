"""BEP 15 end to end in one process: the real tracker service with ``udpListen``, driven with
raw datagrams, and the engine's announcer over ``udp://`` against it and against small fakes."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common import rendezvous
from p2p_common import udp_tracker_proto as udp
from p2p_common.engine.announce import Announcer, rank_trackers
from p2p_common.storage import MemoryPieceStore
from p2p_common.tracker_proto import (
    AnnounceRequest,
    AnnounceResponse,
    Event,
    Peer,
    TrackerRefusedError,
    announce_url,
    parse_announce_response,
)
from p2p_tracker.core import Tracker
from p2p_tracker.service import serve
from p2p_tracker.settings import TrackerSettings
from tests.engine_helpers import make_content, metainfo_for, running_engines

H1 = bytes(range(20))
H2 = bytes(range(100, 120))


def pid(n: int) -> bytes:
    return b"-UT0001-" + bytes([n]) * 12


@dataclass
class Running:
    http: str
    """``http://host:port`` of the HTTP listener."""
    udp_port: int
    host: str

    @property
    def udp_url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"udp://{shown}:{self.udp_port}"


@asynccontextmanager
async def tracker(host: str = "127.0.0.1", **overrides: object) -> AsyncIterator[Running]:
    """The tracker service with HTTP and UDP on free ports of ``host``."""
    settings = TrackerSettings.load(
        None, environ={}, listen=f"{host}:0", udpListen=f"{host}:0", **overrides
    )
    ports: list[int] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve(settings, task_status=task_status, udp_port=ports.append)
        )
        shown = f"[{host}]" if ":" in host else host
        yield Running(f"http://{shown}:{port}", ports[0], host)
        nursery.cancel_scope.cancel()


class Client:
    """A raw BEP 15 client on one connected socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.tid = 1000

    @classmethod
    @asynccontextmanager
    async def to(cls, host: str, port: int, *, source: str | None = None) -> AsyncIterator[Client]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            if source is not None:
                await sock.bind((source, 0))
            await sock.connect((host, port))
            yield cls(sock)

    async def ask(self, payload: bytes, *, within: float = 5.0) -> bytes:
        await self.sock.send(payload)
        with trio.fail_after(within):
            return await self.sock.recv(65536)

    async def silent(self, payload: bytes) -> bool:
        """True if the tracker does not answer ``payload`` within 0.3 s."""
        await self.sock.send(payload)
        with trio.move_on_after(0.3):
            await self.sock.recv(65536)
            return False
        return True

    def next_tid(self) -> int:
        self.tid += 1
        return self.tid

    async def connect(self) -> int:
        tid = self.next_tid()
        return udp.parse_connect_response(await self.ask(udp.encode_connect_request(tid)), tid)

    async def announce(
        self, cid: int, request: AnnounceRequest, *, ipv6: bool = False
    ) -> AnnounceResponse:
        tid = self.next_tid()
        answer = await self.ask(udp.encode_announce_request(cid, tid, request))
        return udp.parse_announce_response(answer, tid, ipv6=ipv6)


async def metrics(base: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.get(f"{base}/metrics")).text


# --- the tracker over UDP -------------------------------------------------------------------------


async def test_connect_announce_scrape() -> None:
    async with tracker(announce_interval=42) as t, Client.to("127.0.0.1", t.udp_port) as c:
        connect = udp.encode_connect_request(7)
        answer = await c.ask(connect)
        assert len(answer) == 16 == len(connect)  # connect: no amplification
        cid = udp.parse_connect_response(answer, 7)

        first = await c.announce(cid, AnnounceRequest(H1, pid(1), 6881, left=10))
        assert (first.interval, first.complete, first.incomplete, first.peers) == (42, 0, 1, ())
        second = await c.announce(
            cid, AnnounceRequest(H1, pid(2), 6882, left=0, event=Event.COMPLETED)
        )
        assert second.peers == (Peer("127.0.0.1", 6881),)
        assert (second.complete, second.incomplete) == (1, 1)

        tid = c.next_tid()
        raw = await c.ask(udp.encode_scrape_request(cid, tid, [H1, H2]))
        assert len(raw) == 8 + 2 * 12
        scraped = udp.parse_scrape_response(raw, tid, [H1, H2])
        assert (scraped[H1].complete, scraped[H1].downloaded, scraped[H1].incomplete) == (1, 1, 1)
        assert (scraped[H2].complete, scraped[H2].incomplete) == (0, 0)

        stopped = await c.announce(cid, AnnounceRequest(H1, pid(2), 6882, event=Event.STOPPED))
        assert (stopped.complete, stopped.incomplete) == (0, 1)

        text = await metrics(t.http)
    assert "p2p_tracker_udp_connects_total 1.0" in text
    assert 'p2p_tracker_announces_total{event="started",protocol="udp"} 0.0' in text
    assert 'p2p_tracker_announces_total{event="none",protocol="udp"} 1.0' in text
    assert 'p2p_tracker_announces_total{event="completed",protocol="udp"} 1.0' in text
    assert 'p2p_tracker_announces_total{event="stopped",protocol="udp"} 1.0' in text
    assert 'p2p_tracker_scrapes_total{protocol="udp"} 1.0' in text
    assert 'p2p_tracker_announces_total{event="none",protocol="http"} 0.0' in text


async def test_a_bad_connection_id_gets_a_small_error() -> None:
    async with tracker() as t, Client.to("127.0.0.1", t.udp_port) as c:
        cid = await c.connect()
        request = udp.encode_announce_request(cid ^ 1, 55, AnnounceRequest(H1, pid(1), 6881))
        answer = await c.ask(request)
        assert len(answer) <= len(request)
        with pytest.raises(TrackerRefusedError, match="bad connection id"):
            udp.parse_announce_response(answer, 55)
        scrape = udp.encode_scrape_request(0, 56, [H1])
        answer = await c.ask(scrape)
        assert len(answer) <= len(scrape)
        assert answer.startswith(struct.pack(">II", 3, 56))
        # the tracker kept nothing of it
        assert (await c.announce(cid, AnnounceRequest(H1, pid(2), 6882))).peers == ()
        text = await metrics(t.http)
    assert 'p2p_tracker_failures_total{protocol="udp",reason="bad_connection_id"} 2.0' in text


async def test_an_id_from_another_address_is_refused() -> None:
    async with (
        tracker() as t,
        Client.to("127.0.0.1", t.udp_port, source="127.0.0.2") as a,
        Client.to("127.0.0.1", t.udp_port, source="127.0.0.3") as b,
    ):
        cid = await a.connect()
        assert (await a.announce(cid, AnnounceRequest(H1, pid(1), 6881, left=1))).interval > 0
        with pytest.raises(TrackerRefusedError, match="bad connection id"):
            await b.announce(cid, AnnounceRequest(H1, pid(2), 6882))
        # an id is bound to the address, not to the socket: a second socket may use it
        async with Client.to("127.0.0.1", t.udp_port, source="127.0.0.2") as again:
            peers = (await again.announce(cid, AnnounceRequest(H1, pid(3), 6883, left=1))).peers
        assert peers == (Peer("127.0.0.2", 6881),)


async def test_garbage_gets_no_answer_or_a_small_one() -> None:
    async with tracker() as t, Client.to("127.0.0.1", t.udp_port) as c:
        assert await c.silent(b"")
        assert await c.silent(b"\x00" * 15)  # shorter than a header
        assert await c.silent(struct.pack(">QII", 1234, 0, 1))  # connect without protocol id
        unknown = struct.pack(">QII", udp.PROTOCOL_ID, 9, 77)
        answer = await c.ask(unknown)
        assert len(answer) <= len(unknown)
        assert answer.startswith(struct.pack(">II", 3, 77))
        cid = await c.connect()
        short = udp.encode_announce_request(cid, 78, AnnounceRequest(H1, pid(1), 6881))[:60]
        with pytest.raises(TrackerRefusedError, match="shorter than 98"):
            udp.parse_announce_response(await c.ask(short), 78)
        bad_port = bytearray(udp.encode_announce_request(cid, 79, AnnounceRequest(H1, pid(1), 1)))
        bad_port[96:98] = b"\x00\x00"
        with pytest.raises(TrackerRefusedError, match="port"):
            udp.parse_announce_response(await c.ask(bytes(bad_port)), 79)
        text = await metrics(t.http)
    assert 'p2p_tracker_udp_dropped_total{reason="malformed"} 3.0' in text
    assert 'p2p_tracker_failures_total{protocol="udp",reason="bad_request"} 3.0' in text


async def test_http_and_udp_share_one_swarm_and_its_caps() -> None:
    async with (
        tracker(default_numwant=3, max_numwant=5) as t,
        httpx.AsyncClient(timeout=10) as http,
        Client.to("127.0.0.1", t.udp_port) as c,
    ):
        for n in range(4):
            request = AnnounceRequest(H1, pid(n), 7000 + n, left=1)
            assert (await http.get(announce_url(f"{t.http}/announce", request))).status_code == 200
        cid = await c.connect()
        udp_peers = (await c.announce(cid, AnnounceRequest(H1, pid(10), 7010, left=1))).peers
        assert len(udp_peers) == 3  # defaultNumwant
        assert {p.port for p in udp_peers} <= {7000, 7001, 7002, 7003}
        many = AnnounceRequest(H1, pid(11), 7011, left=1, numwant=1000)
        assert len((await c.announce(cid, many)).peers) == 5  # maxNumwant, as over HTTP
        # and the UDP peers are handed out over HTTP
        request = AnnounceRequest(H1, pid(20), 7020, left=1, numwant=50)
        answer = parse_announce_response(
            (await http.get(announce_url(f"{t.http}/announce", request))).content
        )
        ports = {p.port for p in answer.peers}
        assert len(ports) == 5  # of the 6 others (maxNumwant): one of the UDP peers at least
        assert ports & {7010, 7011}


async def test_a_peer_id_owned_by_another_address_is_a_conflict_over_udp() -> None:
    async with (
        tracker() as t,
        httpx.AsyncClient(timeout=10) as http,
        Client.to("127.0.0.1", t.udp_port, source="127.0.0.9") as c,
    ):
        request = AnnounceRequest(H1, pid(1), 7000, left=1)
        assert (await http.get(announce_url(f"{t.http}/announce", request))).status_code == 200
        cid = await c.connect()
        with pytest.raises(TrackerRefusedError, match="another address"):
            await c.announce(cid, AnnounceRequest(H1, pid(1), 7000, event=Event.STOPPED))


async def test_ipv6_clients_get_ipv6_peers_and_ipv4_clients_ipv4_peers() -> None:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 (loopback ::1 is needed)")
    async with (
        tracker("::") as t,
        Client.to("::1", t.udp_port) as six,
        Client.to("127.0.0.1", t.udp_port) as four,
    ):
        cid6, cid4 = await six.connect(), await four.connect()
        await six.announce(cid6, AnnounceRequest(H1, pid(1), 6001, left=1), ipv6=True)
        await four.announce(cid4, AnnounceRequest(H1, pid(2), 6002, left=1))
        got6 = await six.announce(cid6, AnnounceRequest(H1, pid(3), 6003, left=1), ipv6=True)
        got4 = await four.announce(cid4, AnnounceRequest(H1, pid(4), 6004, left=1))
    assert set(got6.peers) == {Peer("::1", 6001)}
    # the IPv4 client came in as ::ffff:127.0.0.1 and is listed, and served, as IPv4
    assert set(got4.peers) == {Peer("127.0.0.1", 6002)}


def test_the_udp_core_answers_from_the_pure_tracker() -> None:
    """No sockets: :meth:`Tracker.datagram` with the time passed in, ids expiring."""
    core = Tracker(TrackerSettings.load(None, environ={}), secret=b"k" * 32)
    answer = core.datagram(udp.encode_connect_request(1), "10.0.0.1", now=1000.0)
    assert answer is not None
    cid = udp.parse_connect_response(answer, 1)
    announce = udp.encode_announce_request(cid, 2, AnnounceRequest(H1, pid(1), 6881))
    ok = core.datagram(announce, "10.0.0.1", now=1119.0)
    assert ok is not None
    assert udp.parse_announce_response(ok, 2).interval == 300
    late = core.datagram(announce, "10.0.0.1", now=1122.0)  # two minutes and then some
    assert late is not None
    with pytest.raises(TrackerRefusedError, match="bad connection id"):
        udp.parse_announce_response(late, 2)
    mapped = core.datagram(announce, "::ffff:10.0.0.1", now=1001.0)  # a dual-stack socket
    assert mapped is not None
    assert udp.parse_announce_response(mapped, 2).interval == 300


CORE = Tracker(TrackerSettings.load(None, environ={}, maxNumwant=200), secret=b"f" * 32)
VALID = udp.parse_connect_response(
    CORE.datagram(udp.encode_connect_request(1), "10.0.0.1", 5000.0) or b"", 1
)


@settings(max_examples=1000)
@given(
    st.one_of(
        st.binary(max_size=2048),
        # a valid connection id and a known action, then anything
        st.tuples(st.integers(0, 4), st.binary(max_size=200)).map(
            lambda t: struct.pack(">QII", VALID, t[0], 9) + t[1]
        ),
    ),
    st.sampled_from(["10.0.0.1", "10.0.0.2", "::ffff:10.0.0.1", "2001:db8::1"]),
)
def test_any_datagram_gets_at_most_one_bounded_answer(data: bytes, client: str) -> None:
    """The tracker's UDP core never raises, and answers a client that has not proved its
    address with no more bytes than it sent."""
    answer = CORE.datagram(data, client, 5001.0)
    proven = client in ("10.0.0.1", "::ffff:10.0.0.1") and data[:8] == VALID.to_bytes(8, "big")
    if answer is not None and not proven:
        assert len(answer) <= len(data)
    if answer is not None:
        assert len(answer) <= 20 + 18 * 200


async def test_graceful_stop_closes_the_udp_socket() -> None:
    settings = TrackerSettings.load(None, environ={}, listen="127.0.0.1:0", udpListen="127.0.0.1:0")
    stop = trio.Event()
    ports: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve(
                settings, task_status=task_status, shutdown_trigger=stop.wait, udp_port=ports.append
            )
        )
        async with Client.to("127.0.0.1", ports[0]) as c:
            await c.connect()
            stop.set()
            await trio.sleep(0.2)
            with pytest.raises(OSError):  # ICMP port unreachable: nobody listens
                await c.ask(udp.encode_connect_request(5), within=1)


async def test_off_by_default() -> None:
    assert TrackerSettings.load(None, environ={}).udp_listen == ""
    settings = TrackerSettings.load(None, environ={}, listen="127.0.0.1:0")
    ports: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve(settings, task_status=task_status, udp_port=ports.append)
        )
        nursery.cancel_scope.cancel()
    assert ports == []


# --- the engine's announcer over udp:// ----------------------------------------------------------


async def test_engines_find_each_other_over_udp() -> None:
    content = make_content(2 * 1024 * 1024)
    async with tracker(announce_interval=5, min_announce_interval=1) as t:
        meta = metainfo_for(content, [t.udp_url])
        async with running_engines(1, role="proxy") as (seed,), running_engines(1) as (leech,):
            await seed.add_torrent(meta, MemoryPieceStore(meta, content))
            store = MemoryPieceStore(meta)
            torrent = await leech.add_torrent(meta, store)  # no peers given: the tracker only
            with trio.fail_after(30):
                await torrent.wait_complete()
        text = await metrics(t.http)
    assert bytes(store.data) == content
    assert 'p2p_tracker_announces_total{event="started",protocol="udp"} 2.0' in text
    assert 'p2p_tracker_announces_total{event="started",protocol="http"} 0.0' in text


@dataclass
class FakeUdpTracker:
    """A BEP 15 tracker on a socket, answering through a real core, that can misbehave."""

    sock: trio.socket.SocketType
    core: Tracker
    drop: Callable[[int, bytes], bool] = lambda _n, _d: False
    """Drop the n-th datagram (counted from 0) when this says so."""
    received: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"udp://127.0.0.1:{self.sock.getsockname()[1]}/announce"

    def actions(self) -> list[int]:
        return [udp.parse_header(d)[1] for d in self.received]

    async def run(self) -> None:
        while True:
            data, source = await self.sock.recvfrom(2048)
            index = len(self.received)
            self.received.append(data)
            if self.drop(index, data):
                continue
            answer = self.core.datagram(data, source[0], trio.current_time())
            if answer is not None:
                await self.sock.sendto(answer, source)


@asynccontextmanager
async def fake_tracker(nursery: trio.Nursery, **kwargs: object) -> AsyncIterator[FakeUdpTracker]:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        fake = FakeUdpTracker(sock, Tracker(TrackerSettings.load(None, environ={})), **kwargs)  # type: ignore[arg-type]
        nursery.start_soon(fake.run)
        yield fake


def announcer() -> Announcer:
    return Announcer(httpx.AsyncClient(trust_env=False), peer_id=pid(99))


STATE = (Event.STARTED, 0, 0, 100)


async def test_the_announcer_reuses_its_connection_id_for_a_minute(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake_tracker(nursery) as fake:
        a = announcer()
        a.port = 6881
        for _ in range(4):  # at 0, 25, 50 and 75 s
            assert await a.announce(H1, (fake.url,), STATE) is not None
            await trio.sleep(25)
        assert fake.actions() == [0, 1, 1, 1, 0, 1]  # connect again after 60 s


async def test_the_announcer_retransmits_lost_datagrams(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake_tracker(nursery, drop=lambda n, _d: n in (0, 2, 3)) as fake:
        a = announcer()
        a.port = 6881
        started = trio.current_time()
        answer = await a.announce(H1, (fake.url,), STATE)
        assert answer is not None
        # connect lost once (0.5 s), announce lost twice (0.5 s, then 1 s)
        assert fake.actions() == [0, 0, 1, 1, 1]
        assert trio.current_time() - started == pytest.approx(2.0, abs=0.05)


async def test_the_announcer_gives_up_on_a_silent_tracker_within_its_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake_tracker(nursery, drop=lambda _n, _d: True) as fake:
        a = announcer()
        a.port = 6881
        started = trio.current_time()
        assert await a.announce(H1, (fake.url,), STATE) is None
        assert trio.current_time() - started == pytest.approx(5.0, abs=0.05)  # ANNOUNCE_TIMEOUT
        assert fake.actions() == [0, 0, 0, 0]  # sent at 0, 0.5, 1.5 and 3.5 s


async def test_the_announcer_connects_again_when_its_id_is_refused(nursery: trio.Nursery) -> None:
    async with fake_tracker(nursery) as fake:
        a = announcer()
        a.port = 6881
        assert await a.announce(H1, (fake.url,), STATE) is not None
        fake.core._ids = udp.ConnectionIds(b"restarted")  # a restart: old ids are refused
        assert await a.announce(H1, (fake.url,), STATE) is not None
        assert fake.actions() == [0, 1, 1, 0, 1]


async def test_a_closed_udp_port_fails_over_at_once_to_the_next_tracker() -> None:
    async with tracker() as t:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            await probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        dead = f"udp://127.0.0.1:{closed}"
        a = announcer()
        a.port = 6881
        # an infohash that ranks the dead tracker first
        key = next(
            bytes([n]) * 20
            for n in range(256)
            if rank_trackers(bytes([n]) * 20, [dead, t.udp_url])[0] == dead
        )
        with trio.fail_after(1):  # no retransmission schedule: ICMP says nobody listens
            answer = await a.announce(key, (dead, t.udp_url), STATE)
        assert answer is not None


def test_udp_and_http_urls_of_one_tracker_rank_together() -> None:
    http = [f"http://10.0.0.{n}:6969/announce" for n in range(1, 6)]
    udps = [f"udp://10.0.0.{n}:6969" for n in range(1, 6)]
    for n in range(50):
        key = bytes([n]) * 20
        http_only = rank_trackers(key, http)
        assert http_only == rendezvous.rank(key, http)  # unchanged for HTTP-only lists
        udp_only = rank_trackers(key, udps)
        assert [u.replace("udp://", "http://") + "/announce" for u in udp_only] == http_only
        both = rank_trackers(key, http + udps)
        # the UDP URL of the best tracker first, its HTTP URL second, then the next tracker
        assert both[:3] == [udp_only[0], http_only[0], udp_only[1]]


async def test_trackers_of_other_schemes_are_ignored() -> None:
    a = announcer()
    ranked = await a.ranked(H1, ("wss://t/announce", "udp://127.0.0.1:1", "ftp://x"))
    assert ranked == ["udp://127.0.0.1:1"]
