"""The batched announce codec (p2p_common.batch_proto): round trips, bounds, garbage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common import bencoding
from p2p_common.batch_proto import (
    MAX_BATCH_BODY,
    MAX_BATCH_HASHES,
    BatchRequest,
    batch_url,
    encode_batch_request,
    encode_batch_response,
    parse_batch_request,
    parse_batch_response,
)
from p2p_common.tracker_proto import (
    Event,
    TrackerProtocolError,
    TrackerRefusedError,
    pack_peer,
)

EVENTS = [Event.STARTED, Event.COMPLETED, Event.NONE, Event.STOPPED]
hashes = st.binary(min_size=20, max_size=20)


@st.composite
def requests(draw: st.DrawFn, max_entries: int = 60) -> BatchRequest:
    infohashes = draw(st.lists(hashes, unique=True, max_size=max_entries))
    entries = tuple((h, draw(st.sampled_from(EVENTS))) for h in infohashes)
    return BatchRequest(
        peer_id=draw(hashes),
        port=draw(st.integers(1, 65535)),
        entries=entries,
        numwant=draw(st.integers(0, 2**31 - 1)),
        key=draw(st.none() | st.binary(min_size=1, max_size=64)),
        ip=draw(st.none() | st.sampled_from(["10.0.0.1", "::1", "node-1.example"])),
    )


@given(requests())
def test_requests_round_trip(request: BatchRequest) -> None:
    parsed = parse_batch_request(encode_batch_request(request))
    # entries come back grouped by event, in order within each event
    assert sorted(parsed.entries) == sorted(request.entries)
    for event in EVENTS:
        assert [h for h, e in parsed.entries if e is event] == [
            h for h, e in request.entries if e is event
        ]
    assert (parsed.peer_id, parsed.port, parsed.numwant, parsed.key, parsed.ip) == (
        request.peer_id,
        request.port,
        request.numwant,
        request.key,
        request.ip,
    )


def test_a_full_batch_fits_the_body_bound() -> None:
    entries = tuple((i.to_bytes(20, "big"), Event.NONE) for i in range(MAX_BATCH_HASHES))
    body = encode_batch_request(BatchRequest(b"p" * 20, 6881, entries, key=b"k" * 64))
    assert len(body) < MAX_BATCH_BODY
    assert len(parse_batch_request(body).entries) == MAX_BATCH_HASHES


def test_more_than_the_bound_is_refused() -> None:
    raw = b"".join(i.to_bytes(20, "big") for i in range(MAX_BATCH_HASHES + 1))
    body = bencoding.encode({"peer id": b"p" * 20, "port": 1, "seeding": raw})
    with pytest.raises(TrackerProtocolError, match="more than 2000 infohashes"):
        parse_batch_request(body)
    split = bencoding.encode(
        {"peer id": b"p" * 20, "port": 1, "seeding": raw[:20000], "started": raw[20000:]}
    )
    with pytest.raises(TrackerProtocolError, match="more than 2000"):
        parse_batch_request(split)
    with pytest.raises(ValueError, match="at most"):
        BatchRequest(b"p" * 20, 1, tuple((i.to_bytes(20, "big"), Event.NONE) for i in range(2001)))
    with pytest.raises(TrackerProtocolError, match="exceeds"):
        parse_batch_request(b"d" + b"x" * MAX_BATCH_BODY + b"e")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"port": 1}, "'peer id' must be 20 bytes"),
        ({"peer id": b"short", "port": 1}, "'peer id' must be 20 bytes"),
        ({"peer id": b"p" * 20}, "missing 'port'"),
        ({"peer id": b"p" * 20, "port": 0}, "'port' must be an integer in 1..65535"),
        ({"peer id": b"p" * 20, "port": 70000}, "'port' must be"),
        ({"peer id": b"p" * 20, "port": b"1"}, "'port' must be"),
        ({"peer id": b"p" * 20, "port": 1, "seeding": b"x" * 21}, "20-byte infohashes"),
        ({"peer id": b"p" * 20, "port": 1, "seeding": [b"x" * 20]}, "20-byte infohashes"),
        (
            {"peer id": b"p" * 20, "port": 1, "seeding": b"x" * 40},
            "appears more than once",
        ),
        (
            {"peer id": b"p" * 20, "port": 1, "seeding": b"x" * 20, "stopped": b"x" * 20},
            "appears more than once",
        ),
        ({"peer id": b"p" * 20, "port": 1, "key": b""}, "'key' must be 1..64 bytes"),
        ({"peer id": b"p" * 20, "port": 1, "key": b"k" * 65}, "'key' must be 1..64 bytes"),
        ({"peer id": b"p" * 20, "port": 1, "numwant": -1}, "'numwant' must be"),
        ({"peer id": b"p" * 20, "port": 1, "ip": b"a b"}, "'ip' is not"),
        ({"peer id": b"p" * 20, "port": 1, "ip": b"\xff"}, "'ip' is not"),
    ],
)
def test_malformed_requests_get_a_clear_error(doc: dict[str, object], message: str) -> None:
    with pytest.raises(TrackerProtocolError, match=message):
        parse_batch_request(bencoding.encode(doc))  # type: ignore[arg-type]


def test_unknown_keys_are_ignored_and_an_empty_batch_is_a_heartbeat() -> None:
    parsed = parse_batch_request(
        bencoding.encode({"future": [1, 2], "peer id": b"p" * 20, "port": 6881})
    )
    assert parsed.entries == ()
    assert parsed.numwant == 0


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_garbage_is_refused_with_a_protocol_error(data: bytes) -> None:
    """Nothing but :class:`TrackerProtocolError` (with a message) comes out of garbage."""
    for parse in (parse_batch_request, parse_batch_response):
        try:
            parse(data)
        except TrackerProtocolError as exc:
            message = str(exc)
        else:
            message = "parsed"
        assert message


@settings(max_examples=200)
@given(requests(max_entries=5), st.data())
def test_mutated_requests_never_escape_the_error_type(
    request: BatchRequest, data: st.DataObject
) -> None:
    body = bytearray(encode_batch_request(request))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    try:
        parsed = parse_batch_request(bytes(body))
    except TrackerProtocolError:
        return
    assert len(parsed.entries) <= MAX_BATCH_HASHES
    assert len({h for h, _ in parsed.entries}) == len(parsed.entries)


peer_lists = st.dictionaries(
    hashes,
    st.lists(
        st.tuples(st.sampled_from(["10.0.0.1", "192.168.1.7", "fd00::1"]), st.integers(1, 65535)),
        min_size=1,
        max_size=5,
    ),
    max_size=8,
)


@given(
    peer_lists,
    st.dictionaries(hashes, st.text(max_size=30), max_size=4),
    st.integers(0, 10**6),
    st.none() | st.text(max_size=40),
)
def test_responses_round_trip(
    peers: dict[bytes, list[tuple[str, int]]],
    failed: dict[bytes, str],
    unlisted: int,
    warning: str | None,
) -> None:
    peers4 = {
        h: b"".join(pack_peer(ip, port) for ip, port in ps if "." in ip) for h, ps in peers.items()
    }
    peers6 = {
        h: b"".join(pack_peer(ip, port) for ip, port in ps if ":" in ip) for h, ps in peers.items()
    }
    body = encode_batch_response(
        interval=1800,
        heartbeat=300,
        instance=b"\x01" * 8,
        peers4={h: p for h, p in peers4.items() if p},
        peers6={h: p for h, p in peers6.items() if p},
        failed=failed,
        unlisted=unlisted,
        warning=warning,
    )
    bencoding.decode(body)  # canonical
    parsed = parse_batch_response(body)
    assert (parsed.interval, parsed.heartbeat, parsed.instance) == (1800, 300, b"\x01" * 8)
    assert parsed.failed == failed
    assert parsed.unlisted == unlisted
    assert parsed.warning == warning
    expected = {h: sorted(ps) for h, ps in peers.items() if ps}
    assert {h: sorted((p.ip, p.port) for p in ps) for h, ps in parsed.peers.items()} == expected


def test_a_failure_reason_is_a_refusal() -> None:
    with pytest.raises(TrackerRefusedError, match="go away"):
        parse_batch_response(bencoding.encode({"failure reason": "go away"}))
    with pytest.raises(TrackerProtocolError, match="missing 'heartbeat'"):
        parse_batch_response(bencoding.encode({"instance": b"x", "interval": 5}))
    with pytest.raises(TrackerProtocolError, match="'instance'"):
        parse_batch_response(bencoding.encode({"heartbeat": 5, "interval": 5}))
    with pytest.raises(TrackerProtocolError, match="not a 20-byte infohash"):
        parse_batch_response(
            bencoding.encode(
                {"heartbeat": 5, "instance": b"x", "interval": 5, "peers": {b"short": b""}}
            )
        )
    with pytest.raises(TrackerProtocolError, match="multiple of 6"):
        parse_batch_response(
            bencoding.encode(
                {"heartbeat": 5, "instance": b"x", "interval": 5, "peers": {b"h" * 20: b"12345"}}
            )
        )
    with pytest.raises(TrackerProtocolError, match="exceeds"):
        parse_batch_response(b"d" + b"0" * 100 + b"e", max_size=50)


def test_batch_url() -> None:
    assert batch_url("http://t:6969/announce") == "http://t:6969/p2p/v1/announce-batch"
    assert batch_url("https://t/x/announce?pk=1") == "https://t/p2p/v1/announce-batch?pk=1"
    assert batch_url("udp://t:6969") is None
    assert batch_url("http:///announce") is None
