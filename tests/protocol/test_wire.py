"""The peer wire protocol state machine: framing, every message, bounds, rules."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common import wire
from p2p_common.bitfield import Bitfield
from p2p_common.errors import LocalError, ProtocolError

NUM_PIECES = 21
PIECE_LENGTH = 64 * 1024
TOTAL = 20 * PIECE_LENGTH + 5000  # last piece is short
INFO_HASH = bytes(range(20))
PEER_ID = b"-XX0001-abcdefghijkl"


def piece_size(index: int) -> int:
    return TOTAL - index * PIECE_LENGTH if index == NUM_PIECES - 1 else PIECE_LENGTH


def handshake(reserved: bytes = wire.reserved_bytes()) -> bytes:
    return wire.encode_handshake(INFO_HASH, PEER_ID, reserved)


def normalise(event: wire.Event) -> object:
    """Events as comparable values (Piece carries a memoryview)."""
    if isinstance(event, wire.Piece):
        return ("piece", event.index, event.begin, bytes(event.data))
    if isinstance(event, wire.BitfieldMessage):
        return ("bitfield", event.bits.to_bytes())
    return event


def feed(chunks: list[bytes], *, via_buffer: bool = False) -> list[object]:
    protocol = wire.PeerProtocol(max_block=128 * 1024)
    events: list[object] = []
    for chunk in chunks:
        if via_buffer:
            view = protocol.receive_buffer(max(1, len(chunk)))
            view[: len(chunk)] = chunk
            protocol.commit(len(chunk))
        else:
            protocol.receive_data(chunk)
        while (event := protocol.next_event()) is not None:
            if isinstance(event, wire.Handshake):
                protocol.set_geometry(NUM_PIECES, PIECE_LENGTH, TOTAL)
            events.append(normalise(event))
    return events


# --- strategies: (encoded bytes, expected event) for every message kind -------------------------

indices = st.integers(0, NUM_PIECES - 1)


@st.composite
def blocks(draw: st.DrawFn) -> tuple[int, int, int]:
    index = draw(indices)
    size = piece_size(index)
    begin = draw(st.integers(0, size - 1))
    length = draw(st.integers(1, min(size - begin, 128 * 1024)))
    return index, begin, length


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, object]:
    kind = draw(
        st.sampled_from(
            [
                "keepalive",
                "choke",
                "unchoke",
                "interested",
                "notinterested",
                "have",
                "request",
                "cancel",
                "reject",
                "piece",
                "port",
                "suggest",
                "allowed",
                "ext",
                "exthandshake",
            ]
        )
    )
    if kind == "keepalive":
        return wire.ENCODED_KEEP_ALIVE, wire.KEEP_ALIVE
    if kind == "choke":
        return wire.ENCODED_CHOKE, wire.CHOKE
    if kind == "unchoke":
        return wire.ENCODED_UNCHOKE, wire.UNCHOKE
    if kind == "interested":
        return wire.ENCODED_INTERESTED, wire.INTERESTED
    if kind == "notinterested":
        return wire.ENCODED_NOT_INTERESTED, wire.NOT_INTERESTED
    if kind == "have":
        i = draw(indices)
        return wire.encode_have(i), wire.Have(i)
    if kind in ("request", "cancel", "reject"):
        i, b, n = draw(blocks())
        encoder = {
            "request": wire.encode_request,
            "cancel": wire.encode_cancel,
            "reject": wire.encode_reject,
        }
        event_type = {"request": wire.Request, "cancel": wire.Cancel, "reject": wire.RejectRequest}
        return encoder[kind](i, b, n), event_type[kind](i, b, n)
    if kind == "piece":
        i, b, n = draw(blocks())
        data = draw(st.binary(min_size=n, max_size=n)) if n <= 64 else os.urandom(n)
        return wire.encode_piece(i, b, data), ("piece", i, b, data)
    if kind == "port":
        port = draw(st.integers(0, 65535))
        return wire.encode_port(port), wire.Port(port)
    if kind == "suggest":
        i = draw(indices)
        return wire.encode_suggest(i), wire.SuggestPiece(i)
    if kind == "allowed":
        i = draw(indices)
        return wire.encode_allowed_fast(i), wire.AllowedFast(i)
    if kind == "ext":
        ext_id = draw(st.integers(1, 255))
        payload = draw(st.binary(max_size=300))
        return wire.encode_extended(ext_id, payload), wire.Extended(ext_id, payload)
    block = draw(st.sampled_from([16384, 1 << 18, 1 << 20]))
    port = draw(st.integers(1, 65535))
    role = draw(st.sampled_from(["agent", "proxy"]))
    return (
        wire.encode_extension_handshake(
            client="p2p test", listen_port=port, request_queue=250, p2p_block=block, p2p_role=role
        ),
        wire.ExtensionHandshake(
            messages={},
            client="p2p test",
            listen_port=port,
            request_queue=250,
            p2p_block=block,
            p2p_role=role,
        ),
    )


@st.composite
def sessions(draw: st.DrawFn) -> tuple[bytes, list[object]]:
    """A handshake, an optional opening (bitfield / have-all / have-none), then messages."""
    stream = [handshake()]
    expected: list[object] = [wire.Handshake(INFO_HASH, PEER_ID, wire.reserved_bytes())]
    opening = draw(st.sampled_from(["none", "bitfield", "haveall", "havenone"]))
    if opening == "bitfield":
        bits = Bitfield(NUM_PIECES)
        for i in draw(st.sets(indices)):
            bits.set(i)
        stream.append(wire.encode_bitfield(bits))
        expected.append(("bitfield", bits.to_bytes()))
    elif opening == "haveall":
        stream.append(wire.ENCODED_HAVE_ALL)
        expected.append(wire.HAVE_ALL)
    elif opening == "havenone":
        stream.append(wire.ENCODED_HAVE_NONE)
        expected.append(wire.HAVE_NONE)
    for encoded, event in draw(st.lists(messages(), max_size=25)):
        stream.append(encoded)
        expected.append(event)
    return b"".join(stream), expected


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for point in [*points, len(data)]:
        chunks.append(data[last:point])
        last = point
    return chunks


@settings(max_examples=300, deadline=None)
@given(sessions(), st.lists(st.integers(0, 10**9), max_size=40), st.booleans())
def test_any_session_split_anywhere_yields_the_same_events(
    session: tuple[bytes, list[object]], cuts: list[int], via_buffer: bool
) -> None:
    data, expected = session
    assert feed(split(data, cuts), via_buffer=via_buffer) == expected


def test_every_byte_boundary_of_a_session() -> None:
    bits = Bitfield(NUM_PIECES)
    bits.set(3)
    parts = [
        handshake(),
        wire.encode_bitfield(bits),
        wire.encode_extension_handshake(client="x", p2p_block=1 << 18),
        wire.encode_request(20, 0, 5000),
        wire.encode_piece(20, 4000, b"y" * 1000),
        wire.ENCODED_KEEP_ALIVE,
        wire.encode_have(7),
    ]
    data = b"".join(parts)
    whole = feed([data])
    assert len(whole) == len(parts)
    for cut in range(len(data) + 1):
        assert feed([data[:cut], data[cut:]]) == whole
    assert feed([data[i : i + 1] for i in range(len(data))]) == whole


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_after_a_handshake_only_raises_the_protocol_error(garbage: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        feed([handshake(), garbage])


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_garbage_instead_of_a_handshake_is_refused_early(garbage: bytes) -> None:
    if wire.PSTR.startswith(garbage[: len(wire.PSTR)]):
        return  # a prefix of the real thing is just incomplete
    with pytest.raises(wire.WireError):
        feed([garbage])


def protocol_after_handshake(reserved: bytes = wire.reserved_bytes()) -> wire.PeerProtocol:
    protocol = wire.PeerProtocol(max_block=128 * 1024)
    protocol.receive_data(handshake(reserved))
    assert isinstance(protocol.next_event(), wire.Handshake)
    protocol.set_geometry(NUM_PIECES, PIECE_LENGTH, TOTAL)
    return protocol


def test_an_oversized_length_prefix_is_refused_before_its_body_arrives() -> None:
    protocol = protocol_after_handshake()
    protocol.receive_data(struct.pack(">IB", 50 * 1024 * 1024, 7))
    with pytest.raises(wire.WireError, match="exceeds"):
        protocol.next_event()
    assert protocol.buffered == 5  # nothing more was buffered or expected


def test_buffer_does_not_grow_for_a_refused_message() -> None:
    protocol = protocol_after_handshake()
    protocol.receive_data(struct.pack(">I", 2**32 - 1))
    with pytest.raises(wire.WireError):
        protocol.next_event()


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (wire.encode_have(NUM_PIECES), "out of range"),
        (wire.encode_request(0, 0, 0), "block"),
        (wire.encode_request(0, PIECE_LENGTH - 10, 11), "beyond the end"),
        (wire.encode_request(20, 0, 5001), "beyond the end"),
        (wire.encode_request(0, 0, 128 * 1024 + 16384), "block"),
        (wire.encode_piece(NUM_PIECES - 1, 4999, b"ab"), "beyond the end"),
        (struct.pack(">IBI", 2, 4, 0)[:6], "length"),
        (b"\x00\x00\x00\x02\x00\x00", "length"),
        (wire.encode_bitfield(Bitfield(NUM_PIECES + 8)), "bitfield"),
        (bytes.fromhex("00000004") + b"\x05" + bytes([0, 0, 0x07]), "spare bits"),
    ],
)
def test_malformed_messages_are_protocol_violations(message: bytes, reason: str) -> None:
    protocol = protocol_after_handshake()
    protocol.receive_data(message)
    with pytest.raises(wire.WireError, match=reason):
        protocol.next_event()


def test_a_late_bitfield_is_accepted_as_a_replacement() -> None:
    """BEP 3 wants the bitfield first; aria2 sends one after have-none. Both parse."""
    protocol = protocol_after_handshake()
    bits = Bitfield(NUM_PIECES)
    bits.set(4)
    protocol.receive_data(wire.ENCODED_HAVE_NONE + wire.ENCODED_INTERESTED)
    protocol.receive_data(wire.encode_bitfield(bits) + wire.ENCODED_HAVE_ALL)
    assert protocol.next_event() == wire.HAVE_NONE
    assert protocol.next_event() == wire.INTERESTED
    late = protocol.next_event()
    assert isinstance(late, wire.BitfieldMessage)
    assert list(late.bits) == [4]
    assert protocol.next_event() == wire.HAVE_ALL


def test_fast_extension_messages_need_the_fast_extension_on_both_sides() -> None:
    no_fast = wire.reserved_bytes(fast=False)
    for message in (
        wire.ENCODED_HAVE_ALL,
        wire.encode_reject(0, 0, 16384),
        wire.encode_suggest(1),
        wire.encode_allowed_fast(1),
    ):
        protocol = protocol_after_handshake(no_fast)
        assert not protocol.fast
        protocol.receive_data(message)
        with pytest.raises(wire.WireError, match="fast"):
            protocol.next_event()
    ours = wire.PeerProtocol(reserved=no_fast)
    ours.receive_data(handshake(wire.reserved_bytes()))
    ours.next_event()
    assert not ours.fast  # we did not offer it


def test_extended_messages_need_the_extension_protocol() -> None:
    protocol = protocol_after_handshake(wire.reserved_bytes(extensions=False))
    protocol.receive_data(wire.encode_extension_handshake(client="x"))
    with pytest.raises(wire.WireError, match="extension"):
        protocol.next_event()


def test_unknown_message_ids_are_skipped() -> None:
    protocol = protocol_after_handshake()
    protocol.receive_data(struct.pack(">IB", 4, 99) + b"abc" + wire.ENCODED_UNCHOKE)
    assert protocol.next_event() == wire.UNCHOKE


def test_events_need_geometry_after_the_handshake() -> None:
    protocol = wire.PeerProtocol()
    protocol.receive_data(handshake() + wire.ENCODED_CHOKE)
    assert isinstance(protocol.next_event(), wire.Handshake)
    with pytest.raises(LocalError):
        protocol.next_event()


def test_malformed_extension_handshake_is_tolerated_but_bad_offers_are_ignored() -> None:
    protocol = protocol_after_handshake()
    protocol.receive_data(wire.encode_extended(0, b"not bencoding"))
    assert protocol.next_event() == wire.ExtensionHandshake()
    protocol.receive_data(wire.encode_extension_handshake(client="x", p2p_block=3 * 16384))
    event = protocol.next_event()
    assert isinstance(event, wire.ExtensionHandshake)
    assert event.p2p_block is None  # not a power of two


def test_unsorted_foreign_extension_handshake_is_understood() -> None:
    protocol = protocol_after_handshake()
    payload = b"d1:v3:abc1:pi6881e1:md11:ut_metadatai3eee"  # keys out of order
    protocol.receive_data(wire.encode_extended(0, payload))
    event = protocol.next_event()
    assert isinstance(event, wire.ExtensionHandshake)
    assert (event.client, event.listen_port, event.messages) == ("abc", 6881, {"ut_metadata": 3})


def test_handshake_reserved_bits() -> None:
    event = wire.Handshake(INFO_HASH, PEER_ID, wire.reserved_bytes())
    assert event.extensions
    assert event.fast
    assert wire.reserved_bytes() == bytes([0, 0, 0, 0, 0, 0x10, 0, 0x04])
    with pytest.raises(ValueError):
        wire.encode_handshake(b"short", PEER_ID, wire.reserved_bytes())


def test_piece_data_is_a_view_until_the_next_call() -> None:
    protocol = protocol_after_handshake()
    protocol.receive_data(wire.encode_piece(2, 0, b"z" * 5000))
    event = protocol.next_event()
    assert isinstance(event, wire.Piece)
    assert isinstance(event.data, memoryview)
    assert bytes(event.data) == b"z" * 5000


def test_receive_buffer_grows_to_hold_a_large_message() -> None:
    protocol = protocol_after_handshake()
    data = os.urandom(PIECE_LENGTH)  # with the header, more than the initial buffer
    message = wire.encode_piece(1, 0, data)
    sent = 0
    while sent < len(message):
        view = protocol.receive_buffer(1)
        n = min(len(view), 7000, len(message) - sent)
        view[:n] = message[sent : sent + n]
        protocol.commit(n)
        sent += n
    event = protocol.next_event()
    assert isinstance(event, wire.Piece)
    assert bytes(event.data) == data
    with pytest.raises(LocalError):
        protocol.commit(10**9)
