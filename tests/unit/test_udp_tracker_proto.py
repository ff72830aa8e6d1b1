"""The UDP tracker protocol (p2p_common.udp_tracker_proto, BEP 15): layouts, round trips,
strictness, connection ids, and that no byte string crashes a parser."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from p2p_common.tracker_proto import (
    AnnounceRequest,
    Event,
    Peer,
    ScrapeStats,
    TrackerProtocolError,
    TrackerRefusedError,
    pack_peer,
)
from p2p_common.udp_tracker_proto import (
    ANNOUNCE_REQUEST_SIZE,
    CONNECTION_ID_LIFETIME,
    MAX_SCRAPE_HASHES,
    PROTOCOL_ID,
    Action,
    ConnectionIdCache,
    ConnectionIds,
    UdpTrackerProtocolError,
    connection_id,
    connection_id_valid,
    encode_announce_request,
    encode_announce_response,
    encode_connect_request,
    encode_connect_response,
    encode_error,
    encode_scrape_request,
    encode_scrape_response,
    parse_announce_request,
    parse_announce_response,
    parse_connect_request,
    parse_connect_response,
    parse_header,
    parse_scrape_request,
    parse_scrape_response,
    parse_udp_url,
    transaction_of,
)

H = bytes(range(20))
P = b"-P20001-" + bytes(range(200, 212))
SECRET = b"s" * 32

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
hashes = st.binary(min_size=20, max_size=20)

# What a BEP 15 announce can carry: 4-byte keys, IPv4 ``ip`` fields, no ``paused``,
# numwant up to 2^31-1, counters up to 2^63-1.
udp_requests = st.builds(
    AnnounceRequest,
    info_hash=hashes,
    peer_id=hashes,
    port=st.integers(1, 65535),
    uploaded=st.integers(0, 2**63 - 1),
    downloaded=st.integers(0, 2**63 - 1),
    left=st.integers(0, 2**63 - 1),
    event=st.sampled_from([Event.NONE, Event.STARTED, Event.COMPLETED, Event.STOPPED]),
    numwant=st.none() | st.integers(0, 2**31 - 1),
    key=st.none() | st.binary(min_size=4, max_size=4).filter(lambda k: k != bytes(4)),
    ip=st.none() | st.ip_addresses(v=4).map(str).filter(lambda a: a != "0.0.0.0"),
)
stats = st.builds(ScrapeStats, u32, u32, u32)


# --- layouts (BEP 15, byte for byte) ----------------------------------------------------------


def test_connect_request_layout() -> None:
    data = encode_connect_request(0x01020304)
    assert data == bytes.fromhex("00000417271019800000000001020304")
    assert parse_connect_request(data) == 0x01020304


def test_connect_response_layout() -> None:
    data = encode_connect_response(7, 0x1122334455667788)
    assert data == bytes.fromhex("00000000000000071122334455667788")
    assert parse_connect_response(data, 7) == 0x1122334455667788


def test_announce_request_layout() -> None:
    request = AnnounceRequest(
        H, P, 6881, uploaded=3, downloaded=2, left=1, event=Event.STARTED, numwant=None
    )
    data = encode_announce_request(0xAABB, 9, request)
    assert len(data) == ANNOUNCE_REQUEST_SIZE == 98
    assert data[:16] == struct.pack(">QII", 0xAABB, 1, 9)
    assert data[16:56] == H + P
    # downloaded, left, uploaded (in that order), event 2 = started, ip 0, key 0, num_want -1
    assert data[56:80] == struct.pack(">QQQ", 2, 1, 3)
    assert data[80:98] == struct.pack(">IIIiH", 2, 0, 0, -1, 6881)


def test_announce_response_layout() -> None:
    peers = pack_peer("10.0.0.1", 6881) + pack_peer("10.0.0.2", 6882)
    data = encode_announce_response(5, interval=300, leechers=4, seeders=2, peers=peers)
    assert data == struct.pack(">IIIII", 1, 5, 300, 4, 2) + peers
    answer = parse_announce_response(data, 5)
    assert answer.interval == 300
    assert (answer.complete, answer.incomplete) == (2, 4)
    assert answer.peers == (Peer("10.0.0.1", 6881), Peer("10.0.0.2", 6882))


def test_announce_response_ipv6_peers() -> None:
    peers = pack_peer("2001:db8::1", 6881)
    assert len(peers) == 18
    data = encode_announce_response(5, interval=60, leechers=1, seeders=0, peers=peers)
    assert parse_announce_response(data, 5, ipv6=True).peers == (Peer("2001:db8::1", 6881),)
    four = encode_announce_response(5, interval=60, leechers=1, seeders=0, peers=bytes(12))
    with pytest.raises(UdpTrackerProtocolError, match="multiple of 18"):
        parse_announce_response(four, 5, ipv6=True)  # 12 bytes are not whole IPv6 peers


def test_scrape_layouts() -> None:
    data = encode_scrape_request(0xAB, 3, [H, P])
    assert data == struct.pack(">QII", 0xAB, 2, 3) + H + P
    parsed = parse_scrape_request(data)
    assert (parsed.connection_id, parsed.transaction_id, parsed.info_hashes) == (0xAB, 3, (H, P))
    answer = encode_scrape_response(3, [ScrapeStats(1, 2, 3), ScrapeStats()])
    # seeders, completed, leechers per infohash
    assert answer == struct.pack(">II", 2, 3) + struct.pack(">III", 1, 2, 3) + bytes(12)
    assert parse_scrape_response(answer, 3, [H, P]) == {H: ScrapeStats(1, 2, 3), P: ScrapeStats()}


def test_error_layout_and_refusal() -> None:
    data = encode_error(4, "bad connection id")
    assert data == struct.pack(">II", 3, 4) + b"bad connection id"
    for parse in (
        lambda: parse_connect_response(data, 4),
        lambda: parse_announce_response(data, 4),
        lambda: parse_scrape_response(data, 4, [H]),
    ):
        with pytest.raises(TrackerRefusedError) as info:
            parse()
        assert info.value.reason == "bad connection id"


def test_error_is_cut_to_the_size_asked() -> None:
    data = encode_error(4, "unknown action", max_size=16)
    assert data == struct.pack(">II", 3, 4) + b"unknown "
    assert encode_error(4, "x" * 5000)[8:] == b"x" * 1024  # MAX_TEXT_BYTES


def test_announce_options_after_98_bytes_are_ignored() -> None:
    request = AnnounceRequest(H, P, 6881, left=5)
    data = encode_announce_request(1, 2, request)
    bep41 = b"\x02\x09/announce\x00"  # URLData, EndOfOptions (as libtorrent sends)
    assert parse_announce_request(data + bep41).request == request


def test_announce_fields_read_back() -> None:
    data = bytearray(encode_announce_request(1, 2, AnnounceRequest(H, P, 6881)))
    struct.pack_into(">IIIi", data, 80, 3, 0x0A000001, 0xDEADBEEF, 33)
    parsed = parse_announce_request(bytes(data))
    assert parsed.request.event is Event.STOPPED
    assert parsed.request.ip == "10.0.0.1"
    assert parsed.request.key == bytes.fromhex("deadbeef")
    assert parsed.request.numwant == 33
    struct.pack_into(">i", data, 92, -7)
    assert parse_announce_request(bytes(data)).request.numwant is None  # any negative: default


def test_paused_is_sent_as_a_regular_announce() -> None:
    data = encode_announce_request(1, 2, AnnounceRequest(H, P, 6881, event=Event.PAUSED))
    assert parse_announce_request(data).request.event is Event.NONE


# --- strictness -------------------------------------------------------------------------------


def _announce_with(offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(encode_announce_request(1, 77, AnnounceRequest(H, P, 6881)))
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_announce_with(80, ">I", 4), "event must be 0..3"),
        (_announce_with(96, ">H", 0), "port must be 1..65535"),
        (_announce_with(64, ">Q", 2**63), "negative"),  # left = -1 as int64
        (_announce_with(8, ">I", 2), "not an announce"),
        (encode_announce_request(1, 77, AnnounceRequest(H, P, 6881))[:97], "shorter than 98"),
    ],
)
def test_bad_announces_are_refused_with_their_transaction_id(data: bytes, message: str) -> None:
    with pytest.raises(UdpTrackerProtocolError, match=message) as info:
        parse_announce_request(data)
    assert info.value.transaction_id == 77


def test_short_datagrams_have_no_transaction_id() -> None:
    for parse in (parse_header, parse_connect_request, parse_announce_request):
        with pytest.raises(UdpTrackerProtocolError) as info:
            parse(b"\x00" * 15)
        assert info.value.transaction_id is None


def test_connect_needs_the_protocol_id() -> None:
    with pytest.raises(UdpTrackerProtocolError, match="protocol id"):
        parse_connect_request(struct.pack(">QII", 1234, 0, 5))


@pytest.mark.parametrize("count", [0, MAX_SCRAPE_HASHES + 1])
def test_scrape_hash_count_is_bounded(count: int) -> None:
    with pytest.raises(UdpTrackerProtocolError):
        parse_scrape_request(struct.pack(">QII", 1, 2, 3) + H * count)
    full = struct.pack(">QII", 1, 2, 3) + H * MAX_SCRAPE_HASHES
    assert len(full) == 1496
    assert len(parse_scrape_request(full).info_hashes) == MAX_SCRAPE_HASHES


def test_scrape_needs_whole_hashes() -> None:
    with pytest.raises(UdpTrackerProtocolError, match="whole 20-byte"):
        parse_scrape_request(struct.pack(">QII", 1, 2, 3) + H + b"x")


def test_answers_for_another_transaction_or_action_are_refused() -> None:
    data = encode_connect_response(7, 99)
    with pytest.raises(UdpTrackerProtocolError, match="another transaction"):
        parse_connect_response(data, 8)
    with pytest.raises(UdpTrackerProtocolError, match="action 0"):
        parse_announce_response(data, 7)
    assert transaction_of(data) == 7
    assert transaction_of(b"\x00" * 7) is None


def test_client_bounds() -> None:
    peers = pack_peer("10.0.0.1", 1) * 11
    data = encode_announce_response(1, interval=1, leechers=0, seeders=0, peers=peers)
    with pytest.raises(UdpTrackerProtocolError, match="more than 10 peers"):
        parse_announce_response(data, 1, max_peers=10)
    too_long = encode_announce_response(1, interval=10**7, leechers=0, seeders=0, peers=b"")
    with pytest.raises(UdpTrackerProtocolError, match="interval"):
        parse_announce_response(too_long, 1)
    with pytest.raises(UdpTrackerProtocolError, match="for 2 infohashes"):
        parse_scrape_response(encode_scrape_response(1, [ScrapeStats()]), 1, [H, P])


def test_port_zero_peers_are_left_out() -> None:
    peers = pack_peer("10.0.0.1", 6881) + bytes(6)
    data = encode_announce_response(1, interval=1, leechers=0, seeders=0, peers=peers)
    assert parse_announce_response(data, 1).peers == (Peer("10.0.0.1", 6881),)


def test_counts_are_capped_at_32_bits() -> None:
    data = encode_announce_response(1, interval=1, leechers=2**40, seeders=2**33, peers=b"")
    answer = parse_announce_response(data, 1)
    assert (answer.complete, answer.incomplete) == (2**32 - 1, 2**32 - 1)


# --- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("udp://tracker:6969", ("tracker", 6969)),
        ("udp://tracker:6969/announce", ("tracker", 6969)),
        ("udp://10.0.0.1:80/announce?passkey=x", ("10.0.0.1", 80)),
        ("udp://[2001:db8::1]:6969", ("2001:db8::1", 6969)),
    ],
)
def test_udp_urls(url: str, expected: tuple[str, int]) -> None:
    assert parse_udp_url(url) == expected


@pytest.mark.parametrize(
    "url", ["udp://tracker", "http://tracker:6969", "udp://:6969", "udp://t:99999", "udp://t:0"]
)
def test_bad_udp_urls(url: str) -> None:
    with pytest.raises(ValueError, match="not a udp://host:port URL"):
        parse_udp_url(url)


# --- connection ids ---------------------------------------------------------------------------


@given(st.floats(-1e9, 1e9), st.floats(0, CONNECTION_ID_LIFETIME))
@example(issued=-7.720124691180039e-283, age=120.0)  # issued in second -1, checked in second 120
def test_connection_id_valid_for_two_minutes(issued: float, age: float) -> None:
    cid = connection_id(SECRET, "10.0.0.1", issued)
    assert 0 <= cid < 2**64
    assert connection_id_valid(SECRET, "10.0.0.1", cid, issued + age)


@given(st.floats(-1e9, 1e9), st.floats(CONNECTION_ID_LIFETIME + 2, 1e6))
def test_connection_id_expires(issued: float, age: float) -> None:
    cid = connection_id(SECRET, "10.0.0.1", issued)
    assert not connection_id_valid(SECRET, "10.0.0.1", cid, issued + age)
    assert not connection_id_valid(SECRET, "10.0.0.1", cid, issued - 1.5)  # from the future


@given(st.floats(-1e9, 1e9), st.floats(0, CONNECTION_ID_LIFETIME))
def test_connection_id_is_bound_to_address_and_secret(issued: float, age: float) -> None:
    cid = connection_id(SECRET, "10.0.0.1", issued)
    assert not connection_id_valid(SECRET, "10.0.0.2", cid, issued + age)
    assert not connection_id_valid(b"t" * 32, "10.0.0.1", cid, issued + age)


@given(st.floats(-1e9, 1e9), st.floats(0, 300), st.sampled_from(["10.0.0.1", "2001:db8::7"]))
def test_connection_ids_object_agrees_with_the_functions(
    issued: float, age: float, ip: str
) -> None:
    ids = ConnectionIds(SECRET)
    cid = ids.issue(ip, issued)
    assert cid == connection_id(SECRET, ip, issued)
    assert ids.valid(ip, cid, issued + age) == connection_id_valid(SECRET, ip, cid, issued + age)


@settings(max_examples=300)
@given(u64, st.floats(0, 1e6))
def test_guessed_connection_ids_are_refused(cid: int, now: float) -> None:
    # 48 bits of MAC: a guess passes with probability 2^-48 per try
    if cid != connection_id(SECRET, "10.0.0.1", now - ((now - (cid >> 48)) % 65536)):
        assert not connection_id_valid(SECRET, "10.0.0.1", cid, now)


def test_connection_id_cache() -> None:
    cache = ConnectionIdCache(ttl=60, size=2)
    tracker = ("10.0.0.1", 6969)
    assert cache.get(tracker, 0) is None
    cache.put(tracker, 42, 100.0)
    assert cache.get(tracker, 159.9) == 42
    assert cache.get(tracker, 160.0) is None  # one minute: BEP 15's client side
    assert len(cache) == 0
    cache.put(tracker, 42, 100.0)
    cache.drop(tracker)
    assert cache.get(tracker, 100.0) is None
    for n in range(3):
        cache.put(("10.0.0.9", n), n, 100.0)
    assert len(cache) == 2
    assert cache.get(("10.0.0.9", 0), 100.0) is None  # the oldest was dropped


# --- round trips ------------------------------------------------------------------------------


@given(u64, u32, udp_requests)
def test_announce_request_round_trip(cid: int, tid: int, request: AnnounceRequest) -> None:
    parsed = parse_announce_request(encode_announce_request(cid, tid, request))
    assert (parsed.connection_id, parsed.transaction_id) == (cid, tid)
    assert parsed.request == request


@given(u32)
def test_connect_round_trip(tid: int) -> None:
    assert parse_connect_request(encode_connect_request(tid)) == tid
    assert parse_header(encode_connect_request(tid)) == (PROTOCOL_ID, Action.CONNECT, tid)


@given(u32, u64)
def test_connect_response_round_trip(tid: int, cid: int) -> None:
    assert parse_connect_response(encode_connect_response(tid, cid), tid) == cid


@given(
    u32,
    u32,
    u32,
    u32,
    st.lists(st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535)), max_size=200),
)
def test_announce_response_round_trip(
    tid: int, interval: int, leechers: int, seeders: int, peers: list[tuple[str, int]]
) -> None:
    interval %= 7 * 24 * 3600
    packed = b"".join(pack_peer(ip, port) for ip, port in peers)
    data = encode_announce_response(
        tid, interval=interval, leechers=leechers, seeders=seeders, peers=packed
    )
    answer = parse_announce_response(data, tid)
    assert (answer.interval, answer.complete, answer.incomplete) == (interval, seeders, leechers)
    assert answer.peers == tuple(Peer(ip, port) for ip, port in peers)


@given(u64, u32, st.lists(hashes, min_size=1, max_size=MAX_SCRAPE_HASHES), st.data())
def test_scrape_round_trip(cid: int, tid: int, infos: list[bytes], data: st.DataObject) -> None:
    parsed = parse_scrape_request(encode_scrape_request(cid, tid, infos))
    assert (parsed.connection_id, parsed.transaction_id) == (cid, tid)
    assert list(parsed.info_hashes) == infos
    counters = data.draw(st.lists(stats, min_size=len(infos), max_size=len(infos)))
    answer = parse_scrape_response(encode_scrape_response(tid, counters), tid, infos)
    expected: dict[bytes, ScrapeStats] = {}
    for info_hash, counter in zip(infos, counters, strict=True):
        expected[info_hash] = counter  # a repeated infohash keeps its last entry
    assert answer == expected


@given(u32, st.text(max_size=300))
def test_error_round_trip(tid: int, message: str) -> None:
    with pytest.raises(TrackerRefusedError) as info:
        parse_announce_response(encode_error(tid, message), tid)
    expected = message.encode()[:1024].decode("utf-8", errors="replace")
    assert info.value.reason == expected


# --- no byte string crashes a parser ----------------------------------------------------------

SERVER_PARSERS = (parse_header, parse_connect_request, parse_announce_request, parse_scrape_request)


def _client_parsers(tid: int) -> tuple[object, ...]:
    return (
        lambda d: parse_connect_response(d, tid),
        lambda d: parse_announce_response(d, tid),
        lambda d: parse_announce_response(d, tid, ipv6=True),
        lambda d: parse_scrape_response(d, tid, [H, P]),
    )


@settings(max_examples=1000)
@given(st.binary(max_size=2100))
def test_any_bytes_only_raise_protocol_errors_on_the_tracker_side(data: bytes) -> None:
    for parse in SERVER_PARSERS:
        with contextlib.suppress(UdpTrackerProtocolError):
            parse(data)


@settings(max_examples=1000)
@given(
    st.one_of(
        # a plausible header (so the checks beyond it run) followed by anything
        st.tuples(st.integers(0, 3), st.just(5), st.binary(max_size=600)).map(
            lambda t: struct.pack(">II", t[0], t[1]) + t[2]
        ),
        st.binary(max_size=600),
    )
)
def test_any_bytes_only_raise_protocol_errors_on_the_client_side(data: bytes) -> None:
    for parse in _client_parsers(5):
        with contextlib.suppress(TrackerProtocolError):
            parse(data)  # type: ignore[operator]


@settings(max_examples=500)
@given(
    st.tuples(st.integers(0, 4), u32, st.binary(min_size=82, max_size=200)).map(
        lambda t: struct.pack(">QII", PROTOCOL_ID, t[0], t[1]) + t[2]
    )
)
def test_announce_shaped_garbage_only_raises_protocol_errors(data: bytes) -> None:
    for parse in SERVER_PARSERS:
        with contextlib.suppress(UdpTrackerProtocolError):
            parse(data)
