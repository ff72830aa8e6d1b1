"""The real p2p-tracker service in-process (hypercorn on port 0), driven over HTTP with httpx."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio

from p2p_common import bencoding
from p2p_common.batch_proto import (
    BATCH_PATH,
    MAX_BATCH_BODY,
    BatchRequest,
    encode_batch_request,
    parse_batch_response,
)
from p2p_common.tracker_proto import (
    AnnounceRequest,
    Event,
    Peer,
    ScrapeStats,
    TrackerRefusedError,
    announce_url,
    parse_announce_response,
    parse_scrape_response,
    scrape_query,
)
from p2p_tracker.service import serve
from p2p_tracker.settings import TrackerSettings

H1 = bytes(range(20))
H2 = bytes(range(100, 120))


def pid(n: int) -> bytes:
    return b"-CT0001-" + bytes([n]) * 12


async def start(nursery: trio.Nursery, host: str = "127.0.0.1", **overrides: object) -> str:
    settings = TrackerSettings.load(None, environ={}, listen=f"{host}:0", **overrides)
    port: int = await nursery.start(serve, settings)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@pytest.fixture
async def base(nursery: trio.Nursery) -> str:
    return await start(nursery, announce_interval=42, min_announce_interval=7, default_numwant=10)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield http


async def announce(
    http: httpx.AsyncClient, base: str, request: AnnounceRequest
) -> tuple[int, bytes]:
    response = await http.get(announce_url(f"{base}/announce", request))
    return response.status_code, response.content


async def test_compact_announce(base: str, client: httpx.AsyncClient) -> None:
    status, body = await announce(client, base, AnnounceRequest(H1, pid(1), 6881, left=10))
    assert status == 200
    first = parse_announce_response(body)
    assert (first.interval, first.min_interval, first.peers) == (42, 7, ())
    assert (first.complete, first.incomplete) == (0, 1)

    status, body = await announce(
        client, base, AnnounceRequest(H1, pid(2), 6882, left=0, event=Event.COMPLETED)
    )
    assert status == 200
    doc = bencoding.decode_dict(body)
    assert doc[b"peers"] == b"\x7f\x00\x00\x01" + (6881).to_bytes(2, "big")  # BEP 23
    assert b"peers6" not in doc
    second = parse_announce_response(body)
    assert second.peers == (Peer("127.0.0.1", 6881),)
    assert (second.complete, second.incomplete) == (1, 1)


async def test_non_compact_announce(base: str, client: httpx.AsyncClient) -> None:
    await announce(client, base, AnnounceRequest(H1, pid(1), 6881, left=10))
    _, body = await announce(client, base, AnnounceRequest(H1, pid(2), 6882, compact=False))
    assert parse_announce_response(body).peers == (Peer("127.0.0.1", 6881, pid(1)),)
    _, body = await announce(
        client, base, AnnounceRequest(H1, pid(3), 6883, left=1, compact=False, no_peer_id=True)
    )
    peers = parse_announce_response(body).peers
    assert {p.port for p in peers} == {6881, 6882}
    assert all(p.peer_id is None for p in peers)


async def test_stopped_and_numwant(base: str, client: httpx.AsyncClient) -> None:
    for n in range(15):
        await announce(client, base, AnnounceRequest(H1, pid(n), 7000 + n, left=1))
    _, body = await announce(client, base, AnnounceRequest(H1, pid(0), 7000, left=1))
    assert len(parse_announce_response(body).peers) == 10  # defaultNumwant
    _, body = await announce(client, base, AnnounceRequest(H1, pid(0), 7000, left=1, numwant=3))
    assert len(parse_announce_response(body).peers) == 3
    stop = AnnounceRequest(H1, pid(0), 7000, left=1, event=Event.STOPPED)
    _, body = await announce(client, base, stop)
    assert parse_announce_response(body).peers == ()
    _, body = await announce(client, base, AnnounceRequest(H1, pid(1), 7001, left=1, numwant=50))
    assert 7000 not in {p.port for p in parse_announce_response(body).peers}


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        (b"", b"missing info_hash"),
        (b"info_hash=short&peer_id=xxxxxxxxxxxxxxxxxxxx&port=1", b"info_hash must be 20 bytes"),
        (b"info_hash=aaaaaaaaaaaaaaaaaaaa&peer_id=xxxxxxxxxxxxxxxxxxxx&port=x", b"port is not"),
        (b"info_hash=%GG", b"malformed percent-encoding"),
        (b"info_hash=" + b"a" * 9000, b"longer than"),
    ],
)
async def test_bad_announces_get_400_with_failure_reason(
    base: str, client: httpx.AsyncClient, query: bytes, fragment: bytes
) -> None:
    response = await client.get(f"{base}/announce?{query.decode()}")
    assert response.status_code == 400
    assert fragment in response.content
    with pytest.raises(TrackerRefusedError):
        parse_announce_response(response.content)
    assert b"Traceback" not in response.content


async def test_oversized_request_line_is_refused(base: str, client: httpx.AsyncClient) -> None:
    response = await client.get(f"{base}/announce?x={'a' * 20000}")
    assert response.status_code in (400, 413, 414, 431)


async def test_scrape(base: str, client: httpx.AsyncClient) -> None:
    await announce(client, base, AnnounceRequest(H1, pid(1), 6881, left=10))
    await announce(client, base, AnnounceRequest(H1, pid(2), 6882, left=0, event=Event.COMPLETED))
    response = await client.get(f"{base}/scrape?{scrape_query([H1, H2])}")
    assert response.status_code == 200
    assert parse_scrape_response(response.content) == {
        H1: ScrapeStats(complete=1, downloaded=1, incomplete=1),
        H2: ScrapeStats(),
    }


async def test_full_scrape_is_refused(base: str, client: httpx.AsyncClient) -> None:
    response = await client.get(f"{base}/scrape")
    assert response.status_code == 400
    with pytest.raises(TrackerRefusedError, match="full scrapes"):
        parse_scrape_response(response.content)


async def test_health_ready_metrics_and_unknown_paths(base: str, client: httpx.AsyncClient) -> None:
    assert (await client.get(f"{base}/healthz")).status_code == 200
    assert (await client.get(f"{base}/readyz")).status_code == 200
    await announce(client, base, AnnounceRequest(H1, pid(1), 6881, left=10, event=Event.STARTED))
    await announce(client, base, AnnounceRequest(H1, pid(2), 6882, left=0))
    await client.get(f"{base}/announce?garbage")
    await client.get(f"{base}/scrape?{scrape_query([H1])}")
    metrics = await client.get(f"{base}/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'p2p_tracker_announces_total{event="started",protocol="http"} 1.0' in text
    assert 'p2p_tracker_announces_total{event="none",protocol="http"} 1.0' in text
    assert 'p2p_tracker_failures_total{protocol="http",reason="bad_request"} 1.0' in text
    assert 'p2p_tracker_scrapes_total{protocol="http"} 1.0' in text
    assert "p2p_tracker_torrents 1.0" in text
    assert "p2p_tracker_peers 2.0" in text
    assert "p2p_tracker_seeders 1.0" in text
    missing = await client.get(f"{base}/nope")
    assert missing.status_code == 404
    assert (await client.post(f"{base}/announce")).status_code == 405


async def test_ip_parameter_is_ignored_by_default(base: str, client: httpx.AsyncClient) -> None:
    await announce(client, base, AnnounceRequest(H1, pid(1), 6881, left=1, ip="10.9.9.9"))
    _, body = await announce(client, base, AnnounceRequest(H1, pid(2), 6882, left=1))
    assert parse_announce_response(body).peers == (Peer("127.0.0.1", 6881),)


async def test_ip_parameter_can_be_trusted(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    base = await start(nursery, trust_ip_param=True)
    await announce(client, base, AnnounceRequest(H1, pid(1), 6881, left=1, ip="10.9.9.9"))
    await announce(client, base, AnnounceRequest(H1, pid(3), 6883, left=1, ip="not.an.ip"))
    _, body = await announce(client, base, AnnounceRequest(H1, pid(2), 6882, left=1))
    peers = set(parse_announce_response(body).peers)
    assert peers == {Peer("10.9.9.9", 6881), Peer("127.0.0.1", 6883)}
    # the same peer id from another address is refused: no hijacking without the key
    status, body = await announce(
        client, base, AnnounceRequest(H1, pid(1), 6881, left=1, ip="10.8.8.8")
    )
    assert status == 403
    with pytest.raises(TrackerRefusedError, match="another address"):
        parse_announce_response(body)


async def test_caps_answer_with_failure_or_warning(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    base = await start(nursery, max_torrents=1, max_peers_per_torrent=2)
    assert (await announce(client, base, AnnounceRequest(H1, pid(1), 6881, left=1)))[0] == 200
    async with from_address("127.0.0.2") as other:  # H1 on two addresses: never evicted
        assert (await announce(other, base, AnnounceRequest(H1, pid(2), 6882, left=1)))[0] == 200
    status, body = await announce(client, base, AnnounceRequest(H2, pid(1), 6881, left=1))
    assert status == 503
    with pytest.raises(TrackerRefusedError, match="tracker is full"):
        parse_announce_response(body)
    status, body = await announce(client, base, AnnounceRequest(H1, pid(3), 6883, left=1))
    assert status == 200
    answer = parse_announce_response(body)
    assert answer.warning is not None
    assert "not listed" in answer.warning
    assert set(answer.peers) == {Peer("127.0.0.1", 6881), Peer("127.0.0.2", 6882)}


def _second_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.3", 0))
    except OSError:
        return False
    return True


@asynccontextmanager
async def from_address(address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose announces come from ``address`` (another node, on loopback)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(transport=transport, timeout=10) as http:
        yield http


async def flood(http: httpx.AsyncClient, base: str, requests: list[AnnounceRequest]) -> list[bytes]:
    """Announce ``requests`` four at a time; every one must be answered 200. The bodies."""
    bodies: list[bytes] = []

    async def worker(part: list[AnnounceRequest]) -> None:
        for request in part:
            status, body = await announce(http, base, request)
            assert status == 200, body
            bodies.append(body)

    async with trio.open_nursery() as workers:
        for k in range(4):
            workers.start_soon(worker, requests[k::4])
    return bodies


@pytest.mark.skipif(not _second_loopback(), reason="127.0.0.2 and 127.0.0.3 are not usable here")
async def test_one_address_flooding_infohashes_does_not_stop_a_new_blob(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    """Issue 8, item 8: 127.0.0.1 floods made-up infohashes; 127.0.0.2 and 127.0.0.3 are two
    legitimate nodes. A table of 200 torrents keeps the flood of 600 quick."""
    base = await start(nursery, max_torrents=200, uncapped_addresses=[])
    rng = random.Random(8)
    async with from_address("127.0.0.2") as node2, from_address("127.0.0.3") as node3:
        # a swarm that existed before the flood, on two nodes
        await announce(node2, base, AnnounceRequest(H1, pid(2), 6882, left=0))
        await announce(node3, base, AnnounceRequest(H1, pid(3), 6883, left=1))
        bodies = await flood(
            client,
            base,
            [AnnounceRequest(rng.randbytes(20), pid(66), 6666, left=1) for _ in range(600)],
        )
        assert all(parse_announce_response(b).warning is None for b in bodies)  # all taken
        # a new blob: node 2 seeds it, node 3 joins and finds it
        status, body = await announce(node2, base, AnnounceRequest(H2, pid(2), 6882, left=0))
        assert (status, parse_announce_response(body).warning) == (200, None)
        status, body = await announce(node3, base, AnnounceRequest(H2, pid(3), 6883, left=1))
        assert status == 200
        assert parse_announce_response(body).peers == (Peer("127.0.0.2", 6882),)
        # the swarm on two addresses survived the flood
        _, body = await announce(node3, base, AnnounceRequest(H1, pid(3), 6883, left=1))
        assert parse_announce_response(body).peers == (Peer("127.0.0.2", 6882),)
    text = (await client.get(f"{base}/metrics")).text
    assert "p2p_tracker_torrents 200.0" in text
    # 600 flood torrents in the 199 places H1 left, then one more for H2
    assert "p2p_tracker_evicted_torrents_total 402.0" in text
    assert 'p2p_tracker_failures_total{protocol="http",reason="tracker_full"} 0.0' in text


@pytest.mark.skipif(not _second_loopback(), reason="127.0.0.2 and 127.0.0.3 are not usable here")
async def test_one_address_gets_only_its_share_of_a_swarm_and_of_the_tracker(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    base = await start(
        nursery, max_torrents_per_address=50, max_peers_per_address=8, uncapped_addresses=[]
    )
    async with from_address("127.0.0.2") as node2, from_address("127.0.0.3") as node3:
        await announce(node2, base, AnnounceRequest(H1, pid(2), 6882, left=0))
        # 40 made-up peers from one address in a known swarm: 8 are listed
        bodies = await flood(
            client, base, [AnnounceRequest(H1, pid(100 + n), 7000 + n, left=1) for n in range(40)]
        )
        warnings = [parse_announce_response(b).warning for b in bodies]
        assert warnings.count(None) == 8
        assert all(w is None or "too many peers from your address" in w for w in warnings)
        status, body = await announce(
            node3, base, AnnounceRequest(H1, pid(3), 6883, left=1, numwant=100)
        )
        answer = parse_announce_response(body)
        assert (status, answer.warning) == (200, None)
        assert Peer("127.0.0.2", 6882) in answer.peers
        assert (answer.complete, answer.incomplete) == (1, 8 + 1)
        # 60 made-up infohashes: 50 are taken (H1 is one), the rest answered without a listing
        bodies = await flood(
            client,
            base,
            [AnnounceRequest(bytes([n]) * 20, pid(66), 6666, left=1) for n in range(1, 61)],
        )
        warnings = [parse_announce_response(b).warning for b in bodies]
        assert warnings.count(None) == 49
        assert all(w is None or "too many torrents" in w for w in warnings)
    text = (await client.get(f"{base}/metrics")).text
    assert "p2p_tracker_torrents 50.0" in text
    assert 'p2p_tracker_unlisted_total{protocol="http",reason="address_peers"} 32.0' in text
    assert 'p2p_tracker_unlisted_total{protocol="http",reason="address_torrents"} 11.0' in text


async def test_silent_peers_are_swept(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    base = await start(nursery, peer_expiry=1)
    await announce(client, base, AnnounceRequest(H1, pid(1), 6881, left=1))
    with trio.fail_after(6):
        for _ in range(60):  # the sweep runs every second with peerExpiry 1
            if "p2p_tracker_peers 0.0" in (await client.get(f"{base}/metrics")).text:
                break
            await trio.sleep(0.1)
    text = (await client.get(f"{base}/metrics")).text
    assert "p2p_tracker_expired_peers_total 1.0" in text
    assert "p2p_tracker_torrents 0.0" in text


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_ipv6_peers_go_to_peers6(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    base = await start(nursery, host="::1")
    await announce(client, base, AnnounceRequest(H1, pid(1), 6881, left=1))
    _, body = await announce(client, base, AnnounceRequest(H1, pid(2), 6882, left=1))
    doc = bencoding.decode_dict(body)
    assert doc[b"peers"] == b""
    assert doc[b"peers6"] == b"\x00" * 15 + b"\x01" + (6881).to_bytes(2, "big")  # BEP 7
    assert parse_announce_response(body).peers == (Peer("::1", 6881),)
    _, body = await announce(client, base, AnnounceRequest(H1, pid(3), 6883, compact=False))
    assert {p.ip for p in parse_announce_response(body).peers} == {"::1"}


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_a_dual_stack_tracker_lists_each_family_where_it_belongs(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    # ":0": one socket for IPv6 and IPv4; the IPv4 client arrives as ::ffff:127.0.0.1.
    settings = TrackerSettings.load(None, environ={}, listen=":0")
    port: int = await nursery.start(serve, settings)
    four, six = f"http://127.0.0.1:{port}", f"http://[::1]:{port}"
    await announce(client, four, AnnounceRequest(H1, pid(1), 6881, left=1))
    await announce(client, six, AnnounceRequest(H1, pid(2), 6882, left=1))
    # An IPv6 announcer gets the IPv4 peer in peers (listed as 127.0.0.1, not as a mapped
    # address) and the IPv6 one in peers6 (BEP 7).
    _, body = await announce(client, six, AnnounceRequest(H1, pid(3), 6883, left=1))
    doc = bencoding.decode_dict(body)
    assert doc[b"peers"] == bytes([127, 0, 0, 1]) + (6881).to_bytes(2, "big")
    assert doc[b"peers6"] == b"\x00" * 15 + b"\x01" + (6882).to_bytes(2, "big")
    _, body = await announce(client, four, AnnounceRequest(H1, pid(4), 6884, compact=False))
    assert {(p.ip, p.port) for p in parse_announce_response(body).peers} == {
        ("127.0.0.1", 6881),
        ("::1", 6882),
        ("::1", 6883),
    }


async def test_graceful_stop_and_cancellation(client: httpx.AsyncClient) -> None:
    stop = trio.Event()
    settings = TrackerSettings.load(None, environ={}, listen="127.0.0.1:0")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve, settings, shutdown_trigger=stop.wait))
            base = f"http://127.0.0.1:{port}"
            assert (await client.get(f"{base}/readyz")).status_code == 200  # kept alive
            stop.set()
        # serve() returned by itself, idle keep-alive connection and all
    async with httpx.AsyncClient() as fresh:
        with pytest.raises(httpx.ConnectError):
            await fresh.get(f"{base}/healthz")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, settings)
            nursery.cancel_scope.cancel()


# --- batched announces of seeds (POST /p2p/v1/announce-batch) ---------------------------------


async def batch(http: httpx.AsyncClient, base: str, request: BatchRequest) -> tuple[int, bytes]:
    response = await http.post(f"{base}{BATCH_PATH}", content=encode_batch_request(request))
    return response.status_code, response.content


async def test_a_batch_lists_seeds_that_single_announces_hand_out(
    base: str, client: httpx.AsyncClient
) -> None:
    hashes = [bytes([n]) * 20 for n in range(1, 41)]
    status, body = await batch(
        client, base, BatchRequest(pid(1), 6881, tuple((h, Event.STARTED) for h in hashes))
    )
    assert status == 200
    answer = parse_batch_response(body)
    assert (answer.interval, answer.heartbeat) == (1800, 42)  # seedAnnounceInterval, interval
    assert answer.peers == {}
    # a standard client's announce for any of them gets the batched seed, unchanged BEP 3
    status, body = await announce(client, base, AnnounceRequest(hashes[7], pid(2), 7000, left=5))
    assert status == 200
    assert parse_announce_response(body).peers == (Peer("127.0.0.1", 6881),)
    # and the seed, asking for peers, gets that leecher (only where there is one)
    status, body = await batch(
        client,
        base,
        BatchRequest(pid(1), 6881, tuple((h, Event.NONE) for h in hashes), numwant=10),
    )
    again = parse_batch_response(body)
    assert again.instance == answer.instance
    assert again.peers == {hashes[7]: (Peer("127.0.0.1", 7000),)}
    scrape = await client.get(f"{base}/scrape?{scrape_query(hashes[:2])}")
    assert parse_scrape_response(scrape.content)[hashes[0]] == ScrapeStats(complete=1)
    text = (await client.get(f"{base}/metrics")).text
    assert "p2p_tracker_batches_total 2.0" in text
    assert 'p2p_tracker_announces_total{event="started",protocol="batch"} 40.0' in text
    assert 'p2p_tracker_announces_total{event="none",protocol="batch"} 40.0' in text
    assert "p2p_tracker_batch_seeds 40.0" in text
    # stopping them in a batch removes them
    status, _ = await batch(
        client, base, BatchRequest(pid(1), 6881, tuple((h, Event.STOPPED) for h in hashes))
    )
    assert status == 200
    assert "p2p_tracker_batch_seeds 0.0" in (await client.get(f"{base}/metrics")).text


async def test_bad_batches_are_refused_whole_with_a_reason(
    base: str, client: httpx.AsyncClient
) -> None:
    url = f"{base}{BATCH_PATH}"
    good = bencoding.encode({"peer id": pid(1), "port": 6881, "started": H1})
    duplicate = bencoding.encode({"peer id": pid(1), "port": 6881, "started": H1, "stopped": H1})
    for body, status, reason in [
        (b"not bencoded", 400, b"not bencoded"),
        (duplicate, 400, b"more than once"),
        (good[:-1], 400, b"not bencoded"),
        (b"d" + b"0" * (MAX_BATCH_BODY + 10) + b"e", 413, b"larger than"),
    ]:
        response = await client.post(url, content=body)
        assert response.status_code == status
        assert reason in bencoding.decode_dict(response.content)[b"failure reason"]
    # nothing of the refused batches was recorded
    text = (await client.get(f"{base}/metrics")).text
    assert "p2p_tracker_peers 0.0" in text
    assert 'p2p_tracker_failures_total{protocol="batch",reason="bad_request"} 3.0' in text
    assert (await client.get(url)).status_code == 405

    # a chunked body beyond the bound is cut off too
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"0" * 4096

    assert (await client.post(url, content=chunks())).status_code == 413


async def test_a_batch_is_held_to_the_per_address_caps_over_http(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    base = await start(
        nursery, uncapped_addresses="", max_torrents_per_address=10, max_peers_per_address=1
    )
    hashes = [bytes([n]) * 20 for n in range(1, 16)]
    status, body = await batch(
        client, base, BatchRequest(pid(1), 6881, tuple((h, Event.STARTED) for h in hashes))
    )
    answer = parse_batch_response(body)
    assert status == 200
    assert answer.unlisted == 5
    assert answer.warning is not None
    assert "too many torrents" in answer.warning
    status, body = await batch(
        client, base, BatchRequest(pid(2), 6882, ((hashes[0], Event.STARTED),))
    )
    assert parse_batch_response(body).unlisted == 1  # a second peer id of the address
    text = (await client.get(f"{base}/metrics")).text
    assert "p2p_tracker_peers 10.0" in text
    assert 'p2p_tracker_unlisted_total{protocol="batch",reason="address_torrents"} 5.0' in text
    assert 'p2p_tracker_unlisted_total{protocol="batch",reason="address_peers"} 1.0' in text
