"""The tracker protocol (p2p_common.tracker_proto): round trips, strictness, bounds."""

from __future__ import annotations

import contextlib
import ipaddress
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common import bencoding
from p2p_common.tracker_proto import (
    MAX_QUERY_BYTES,
    MAX_SCRAPE_HASHES,
    AnnounceRequest,
    AnnounceResponse,
    Event,
    Peer,
    ScrapeStats,
    TrackerProtocolError,
    TrackerRefusedError,
    announce_url,
    encode_announce_response,
    encode_compact_announce,
    encode_failure,
    encode_scrape_response,
    pack_peer,
    parse_announce_query,
    parse_announce_response,
    parse_scrape_query,
    parse_scrape_response,
    scrape_query,
    scrape_url,
    unpack_peers,
)

H = bytes(range(20))
P = b"-P20001-" + bytes(range(200, 212))

# --- strategies ------------------------------------------------------------------------------

ip_param = st.text(
    alphabet=string.ascii_letters + string.digits + string.punctuation, min_size=1, max_size=64
)

requests = st.builds(
    AnnounceRequest,
    info_hash=st.binary(min_size=20, max_size=20),
    peer_id=st.binary(min_size=20, max_size=20),
    port=st.integers(1, 65535),
    uploaded=st.integers(0, 2**63 - 1),
    downloaded=st.integers(0, 2**63 - 1),
    left=st.integers(0, 2**63 - 1),
    event=st.sampled_from(Event),
    numwant=st.none() | st.integers(0, 2**31 - 1),
    compact=st.booleans(),
    no_peer_id=st.booleans(),
    key=st.none() | st.binary(min_size=1, max_size=64),
    ip=st.none() | ip_param,
)

ipv4 = st.ip_addresses(v=4).map(str)


def _not_mapped(address: str) -> bool:
    return ipaddress.IPv6Address(address).ipv4_mapped is None  # a mapped address packs as IPv4


ipv6 = st.ip_addresses(v=6).map(str).filter(_not_mapped)
ports = st.integers(1, 65535)
peer_ids = st.binary(min_size=20, max_size=20)
counters = st.integers(0, 2**40)


def responses(with_peer_ids: bool) -> st.SearchStrategy[AnnounceResponse]:
    ids = peer_ids if with_peer_ids else st.none()
    return st.builds(
        AnnounceResponse,
        interval=st.integers(0, 3600),
        min_interval=st.none() | st.integers(0, 3600),
        complete=st.none() | counters,
        incomplete=st.none() | counters,
        peers=st.tuples(
            st.lists(st.builds(Peer, ipv4, ports, ids), max_size=30),
            st.lists(st.builds(Peer, ipv6, ports, ids), max_size=30),
        ).map(lambda pair: tuple(pair[0] + pair[1])),
        warning=st.none() | st.text(max_size=40),
    )


# --- client requests -------------------------------------------------------------------------


@given(requests)
def test_request_query_round_trip(request: AnnounceRequest) -> None:
    assert parse_announce_query(request.query().encode("ascii")) == request


@given(requests)
def test_announce_url_with_existing_query_round_trip(request: AnnounceRequest) -> None:
    url = announce_url("http://tracker.example:6969/announce?passkey=s3cr%2Bt", request)
    assert url.count("?") == 1
    query = url.partition("?")[2].encode("ascii")
    assert query.startswith(b"passkey=s3cr%2Bt&info_hash=")
    assert parse_announce_query(query) == request  # unknown keys are ignored


def test_announce_url_shapes() -> None:
    request = AnnounceRequest(H, P, 6881)
    assert announce_url("http://t/announce", request) == "http://t/announce?" + request.query()
    assert announce_url("http://t/a?x=1&", request) == "http://t/a?x=1&" + request.query()
    assert announce_url("http://t/a?", request) == "http://t/a?" + request.query()
    assert announce_url("http://t/a#frag", request) == f"http://t/a?{request.query()}#frag"


def test_binary_fields_are_percent_encoded_byte_by_byte() -> None:
    request = AnnounceRequest(b"\x00\xff" * 10, b"A" * 20, 6881, event=Event.STARTED, numwant=5)
    query = request.query()
    assert query.startswith("info_hash=" + "%00%FF" * 10 + "&peer_id=" + "A" * 20 + "&port=6881")
    assert "event=started" in query
    assert "numwant=5" in query
    assert query.isascii()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"info_hash": b"x" * 19},
        {"peer_id": b"x" * 21},
        {"port": 0},
        {"port": 65536},
        {"left": -1},
        {"numwant": -1},
        {"key": b""},
        {"ip": "has space"},
    ],
)
def test_request_refuses_bad_values(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"info_hash": H, "peer_id": P, "port": 1}
    with pytest.raises(ValueError):
        AnnounceRequest(**(base | kwargs))  # type: ignore[arg-type]


# --- server: announce queries ----------------------------------------------------------------


def _q(**params: str) -> bytes:
    return "&".join(f"{k}={v}" for k, v in params.items()).encode()


HQ = "%00%01%02%03%04%05%06%07%08%09%0A%0B%0C%0D%0E%0F%10%11%12%13"
PQ = "-P20001-" + "".join(f"%{b:02x}" for b in range(200, 212))


def test_parse_query_decodes_to_bytes_not_utf8() -> None:
    request = parse_announce_query(_q(info_hash=HQ, peer_id=PQ, port="6881", left="5"))
    assert request.info_hash == H
    assert request.peer_id == P
    assert request.left == 5
    assert request.compact  # BEP 23: compact unless compact=0
    assert request.event is Event.NONE
    assert request.numwant is None


def test_parse_query_plus_is_space_and_raw_bytes_pass() -> None:
    raw_hash = b"abcdefghij+klmnopqr~"
    query = b"info_hash=" + raw_hash + b"&peer_id=" + PQ.encode() + b"&port=1"
    assert parse_announce_query(query).info_hash == b"abcdefghij klmnopqr~"


def test_parse_query_ignores_unknown_and_empty_parameters() -> None:
    query = b"&supportcrypto=1&" + _q(info_hash=HQ, peer_id=PQ, port="1") + b"&&corrupt=0&x"
    assert parse_announce_query(query).port == 1


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (_q(peer_id=PQ, port="1"), "missing info_hash"),
        (_q(info_hash=HQ, port="1"), "missing peer_id"),
        (_q(info_hash=HQ, peer_id=PQ), "missing port"),
        (_q(info_hash="abc", peer_id=PQ, port="1"), "info_hash must be 20 bytes, got 3"),
        (_q(info_hash=HQ, peer_id=PQ + "%00", port="1"), "peer_id must be 20 bytes"),
        (_q(info_hash=HQ, peer_id=PQ, port="0"), "port must be 1..65535"),
        (_q(info_hash=HQ, peer_id=PQ, port="65536"), "port is too large"),
        (_q(info_hash=HQ, peer_id=PQ, port="-1"), "port is not a non-negative integer"),
        (_q(info_hash=HQ, peer_id=PQ, port="1", left="1e3"), "left is not"),
        (_q(info_hash=HQ, peer_id=PQ, port="1", left="9" * 21), "left is not"),
        (_q(info_hash=HQ, peer_id=PQ, port="1", uploaded=str(2**63)), "uploaded is too large"),
        (_q(info_hash=HQ, peer_id=PQ, port="1", event="finished"), "event must be"),
        (_q(info_hash=HQ, peer_id=PQ, port="1", compact="yes"), "compact must be 0 or 1"),
        (_q(info_hash=HQ, peer_id=PQ, port="1", numwant="-5"), "numwant is not"),
        (_q(info_hash=HQ, peer_id=PQ, port="1", ip="a%20b"), "ip is not"),
        (_q(info_hash=HQ, peer_id=PQ, port="1", ip="%FF"), "ip is not"),
        (_q(info_hash=HQ, peer_id=PQ, port="1", key="k" * 65), "key must be"),
        (_q(info_hash=HQ, peer_id=PQ, port="1") + b"&port=2", "port given more than once"),
        (_q(info_hash=HQ[:-1], peer_id=PQ, port="1"), "malformed percent-encoding"),
        (_q(info_hash="%zz" + HQ, peer_id=PQ, port="1"), "malformed percent-encoding"),
        (b"info_hash=" + b"a" * MAX_QUERY_BYTES, "longer than"),
        (b"&".join([b"x=1"] * 100), "more than 80 query parameters"),
    ],
)
def test_parse_query_errors_are_fit_for_failure_reason(query: bytes, message: str) -> None:
    with pytest.raises(TrackerProtocolError) as caught:
        parse_announce_query(query)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_parse_query_accepts_event_spellings() -> None:
    base = _q(info_hash=HQ, peer_id=PQ, port="1")
    assert parse_announce_query(base + b"&event=").event is Event.NONE
    assert parse_announce_query(base + b"&event=empty").event is Event.NONE
    assert parse_announce_query(base + b"&event=paused").event is Event.PAUSED
    assert parse_announce_query(base + b"&event=stopped").event is Event.STOPPED


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_garbage_queries_only_raise_protocol_errors(garbage: bytes) -> None:
    for parse in (parse_announce_query, parse_scrape_query):
        with contextlib.suppress(TrackerProtocolError):
            parse(garbage)


query_parts = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b"info_hash",
                b"peer_id",
                b"port",
                b"left",
                b"event",
                b"numwant",
                b"compact",
                b"key",
                b"ip",
                b"no_peer_id",
                b"uploaded",
                b"x",
            ]
        ),
        st.binary(max_size=30).map(lambda v: v.replace(b"&", b"%26")),
    ),
    max_size=14,
)


@settings(max_examples=300)
@given(query_parts)
def test_structured_garbage_queries_only_raise_protocol_errors(
    parts: list[tuple[bytes, bytes]],
) -> None:
    query = b"&".join(k + b"=" + v for k, v in parts)
    for parse in (parse_announce_query, parse_scrape_query):
        with contextlib.suppress(TrackerProtocolError):
            parse(query)


# --- answers ---------------------------------------------------------------------------------


def _v4_first(response: AnnounceResponse) -> AnnounceResponse:
    peers = sorted(response.peers, key=lambda p: ":" in p.ip)  # stable: v4 then v6
    return AnnounceResponse(
        interval=response.interval,
        min_interval=response.min_interval,
        complete=response.complete,
        incomplete=response.incomplete,
        peers=tuple(Peer(p.ip, p.port) for p in peers),
        warning=response.warning,
    )


@given(responses(with_peer_ids=False))
def test_compact_response_round_trip(response: AnnounceResponse) -> None:
    body = encode_announce_response(response, compact=True)
    assert parse_announce_response(body) == _v4_first(response)
    doc = bencoding.decode_dict(body)
    assert len(doc[b"peers"]) % 6 == 0  # type: ignore[arg-type]
    assert (b"peers6" in doc) == any(":" in p.ip for p in response.peers)


@given(responses(with_peer_ids=True))
def test_dict_response_round_trip(response: AnnounceResponse) -> None:
    body = encode_announce_response(response, compact=False)
    assert parse_announce_response(body) == response


@given(responses(with_peer_ids=True))
def test_no_peer_id_drops_ids(response: AnnounceResponse) -> None:
    parsed = parse_announce_response(
        encode_announce_response(response, compact=False, no_peer_id=True)
    )
    assert all(p.peer_id is None for p in parsed.peers)


@given(
    st.integers(1, 3600),
    st.none() | st.integers(1, 3600),
    counters,
    counters,
    st.lists(st.tuples(ipv4, ports), max_size=20),
    st.lists(st.tuples(ipv6, ports), max_size=20),
    st.none() | st.text(max_size=20),
)
def test_hot_path_compact_encoder_is_canonical_and_round_trips(
    interval: int,
    min_interval: int | None,
    complete: int,
    incomplete: int,
    v4: list[tuple[str, int]],
    v6: list[tuple[str, int]],
    warning: str | None,
) -> None:
    body = encode_compact_announce(
        interval=interval,
        min_interval=min_interval,
        complete=complete,
        incomplete=incomplete,
        peers4=b"".join(pack_peer(ip, port) for ip, port in v4),
        peers6=b"".join(pack_peer(ip, port) for ip, port in v6),
        warning=warning,
    )
    bencoding.decode(body)  # canonical: sorted keys, no padding
    expected = AnnounceResponse(
        interval=interval,
        min_interval=min_interval,
        complete=complete,
        incomplete=incomplete,
        peers=tuple(Peer(ip, port) for ip, port in v4 + v6),
        warning=warning,
    )
    assert parse_announce_response(body) == expected


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_garbage_answers_only_raise_protocol_errors(garbage: bytes) -> None:
    for parse in (parse_announce_response, parse_scrape_response):
        with contextlib.suppress(TrackerProtocolError):
            parse(garbage)


bvalues = st.recursive(
    st.integers(-(2**70), 2**70) | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    b"peers",
                    b"peers6",
                    b"interval",
                    b"ip",
                    b"port",
                    b"peer id",
                    b"files",
                    b"complete",
                    b"failure reason",
                    b"warning message",
                    b"min interval",
                    b"x",
                ]
            )
            | st.binary(min_size=20, max_size=20),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=500)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                b"peers",
                b"peers6",
                b"interval",
                b"min interval",
                b"complete",
                b"incomplete",
                b"warning message",
                b"failure reason",
                b"files",
            ]
        ),
        bvalues,
        max_size=6,
    )
)
def test_structured_garbage_answers_only_raise_protocol_errors(
    doc: dict[bytes, bencoding.BValue],
) -> None:
    body = bencoding.encode(doc)
    for parse in (parse_announce_response, parse_scrape_response):
        with contextlib.suppress(TrackerProtocolError):
            parse(body)


def test_failure_reason_raises_refused_with_the_text() -> None:
    with pytest.raises(TrackerRefusedError) as caught:
        parse_announce_response(encode_failure("not authorized"))
    assert caught.value.reason == "not authorized"
    assert isinstance(caught.value, TrackerProtocolError)


def test_warning_and_counts_are_read() -> None:
    body = bencoding.encode(
        {
            "interval": 30,
            "min interval": 10,
            "complete": 2,
            "incomplete": 3,
            "warning message": "slow down",
            "peers": b"\x7f\x00\x00\x01\x1a\xe1",
        }
    )
    parsed = parse_announce_response(body)
    assert parsed == AnnounceResponse(30, 10, 2, 3, (Peer("127.0.0.1", 6881),), "slow down")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"peers": b""}, "lacks 'interval'"),
        ({"interval": -1, "peers": b""}, "'interval' is not"),
        ({"interval": 10, "peers": b"12345"}, "not a multiple of 6"),
        ({"interval": 10, "peers": b"", "peers6": b"1" * 17}, "not a multiple of 18"),
        ({"interval": 10, "peers": 5}, "neither a string nor a list"),
        ({"interval": 10, "peers": [{"ip": "example.com", "port": 1}]}, "not an IP address"),
        ({"interval": 10, "peers": [{"ip": "1.2.3.4", "port": 70000}]}, "out of range"),
        ({"interval": 10, "peers": [{"ip": "1.2.3.4"}]}, "lacks ip or port"),
        ({"interval": 10, "peers": [{"ip": "1.2.3.4", "port": 1, "peer id": "x"}]}, "20 bytes"),
        ({"interval": 10, "peers": [5]}, "not a dictionary"),
        ({"interval": 10, "peers6": 5}, "'peers6' is not a string"),
    ],
)
def test_malformed_answers(doc: dict[str, bencoding.EncodableValue], message: str) -> None:
    with pytest.raises(TrackerProtocolError, match=message):
        parse_announce_response(bencoding.encode(doc))


def test_answer_bounds() -> None:
    body = bencoding.encode({"interval": 1, "peers": b"\x01\x02\x03\x04\x00\x01" * 11})
    assert len(parse_announce_response(body, max_peers=11).peers) == 11
    with pytest.raises(TrackerProtocolError, match="more than 10 peers"):
        parse_announce_response(body, max_peers=10)
    six = bencoding.encode({"interval": 1, "peers": b"", "peers6": b"\x01" * 18 * 3})
    with pytest.raises(TrackerProtocolError, match="more than 2 peers"):
        parse_announce_response(six, max_peers=2)
    listed = bencoding.encode({"interval": 1, "peers": [{"ip": "1.1.1.1", "port": 1}] * 3})
    with pytest.raises(TrackerProtocolError, match="more than 2 peers"):
        parse_announce_response(listed, max_peers=2)
    with pytest.raises(TrackerProtocolError, match="exceeds"):
        parse_announce_response(body, max_size=len(body) - 1)
    with pytest.raises(TrackerProtocolError, match="not bencoded"):
        parse_announce_response(b"d8:intervali1e5:peers0:")  # truncated


def test_compact_peers_with_port_zero_are_dropped() -> None:
    assert unpack_peers(b"\x01\x02\x03\x04\x00\x00\x01\x02\x03\x04\x00\x50") == [
        Peer("1.2.3.4", 80)
    ]


def test_pack_peer() -> None:
    assert pack_peer("10.0.0.1", 6881) == b"\x0a\x00\x00\x01\x1a\xe1"
    assert pack_peer("::ffff:10.0.0.1", 6881) == b"\x0a\x00\x00\x01\x1a\xe1"
    assert pack_peer("::1", 1) == b"\x00" * 15 + b"\x01\x00\x01"
    assert pack_peer("fe80::1%eth0", 1)[:2] == b"\xfe\x80"
    for bad in ("example.com", "1.2.3", "::g"):
        with pytest.raises(ValueError):
            pack_peer(bad, 1)


# --- scrape ----------------------------------------------------------------------------------


@given(st.lists(st.binary(min_size=20, max_size=20), min_size=1, max_size=MAX_SCRAPE_HASHES))
def test_scrape_query_round_trip(hashes: list[bytes]) -> None:
    assert parse_scrape_query(scrape_query(hashes).encode()) == list(dict.fromkeys(hashes))


@given(
    st.dictionaries(
        st.binary(min_size=20, max_size=20),
        st.builds(ScrapeStats, counters, counters, counters),
        max_size=20,
    )
)
def test_scrape_response_round_trip(files: dict[bytes, ScrapeStats]) -> None:
    assert parse_scrape_response(encode_scrape_response(files)) == files


def test_scrape_query_rules() -> None:
    with pytest.raises(TrackerProtocolError, match="does not do full scrapes"):
        parse_scrape_query(b"")
    with pytest.raises(TrackerProtocolError, match="does not do full scrapes"):
        parse_scrape_query(b"foo=bar")
    with pytest.raises(TrackerProtocolError, match="20 bytes"):
        parse_scrape_query(b"info_hash=abc")
    many = scrape_query([i.to_bytes(20, "big") for i in range(MAX_SCRAPE_HASHES)])
    with pytest.raises(TrackerProtocolError, match="more than"):
        parse_scrape_query(many.encode() + b"&info_hash=" + b"z" * 20)
    with pytest.raises(ValueError):
        scrape_query([])


def test_scrape_answer_errors() -> None:
    with pytest.raises(TrackerRefusedError):
        parse_scrape_response(encode_failure("no"))
    with pytest.raises(TrackerProtocolError, match="lacks the 'files'"):
        parse_scrape_response(b"de")
    with pytest.raises(TrackerProtocolError, match="malformed entry"):
        parse_scrape_response(bencoding.encode({"files": {b"short": {}}}))
    files = {i.to_bytes(20, "big"): ScrapeStats() for i in range(3)}
    with pytest.raises(TrackerProtocolError, match="more than 2 files"):
        parse_scrape_response(encode_scrape_response(files), max_files=2)


@pytest.mark.parametrize(
    ("announce", "scrape"),
    [
        ("http://example.com/announce", "http://example.com/scrape"),
        ("http://example.com/x/announce", "http://example.com/x/scrape"),
        ("http://example.com/announce.php", "http://example.com/scrape.php"),
        ("http://example.com/announce?x2%0644", "http://example.com/scrape?x2%0644"),
        ("http://example.com/a", None),
        ("http://example.com/announce?x=2/4", "http://example.com/scrape?x=2/4"),
        ("http://example.com/x%064announce", None),
        ("http://announce", None),
    ],
)
def test_scrape_url(announce: str, scrape: str | None) -> None:
    assert scrape_url(announce) == scrape


def test_ip_addresses_in_dict_answers_are_normalised() -> None:
    body = bencoding.encode({"interval": 1, "peers": [{"ip": "2001:DB8::1", "port": 5}]})
    (peer,) = parse_announce_response(body).peers
    assert peer == Peer(str(ipaddress.ip_address("2001:db8::1")), 5)
