"""The BitTorrent peer wire protocol as a pure state machine: bytes in, events out.

Covers BEP 3 (handshake and every message), BEP 6 (fast extension: have-all,
have-none, reject, suggest, allowed-fast) and BEP 10 (extension protocol handshake).
No sockets, no trio, no clock: a shell feeds received bytes in with
:meth:`PeerProtocol.receive_data` (or :meth:`receive_buffer` + :meth:`commit` to
receive straight into the protocol's buffer), pulls events out with
:meth:`PeerProtocol.next_event`, and sends what the ``encode_*`` functions return.

Block size negotiation: two p2p peers announce ``p2p_block`` (the largest request
they serve, a power of two up to 4 MiB) in their BEP 10 handshakes and then request
whole pieces at once; standard clients never see anything but 16 KiB requests.

Everything is bounded: a message longer than the largest legal message of its kind
is refused from its length prefix, before its body is buffered. Any violation raises
:class:`WireError`, a remote error: the peer is dropped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from p2p_common import bencoding
from p2p_common.bencoding import BencodeError, BValue
from p2p_common.bitfield import Bitfield, byte_length
from p2p_common.errors import LocalError, ProtocolError

PSTR: Final = b"\x13BitTorrent protocol"
HANDSHAKE_LENGTH: Final = 68
BLOCK_SIZE: Final = 16 * 1024
"""The standard request size every client understands."""
MAX_P2P_BLOCK: Final = 4 * 1024 * 1024
"""Largest block two p2p peers may agree on."""
MAX_FOREIGN_REQUEST: Final = 128 * 1024
"""Largest request we serve to a peer that did not negotiate larger blocks."""
MAX_EXTENDED_MESSAGE: Final = 64 * 1024
"""Largest BEP 10 message body we accept (we use only the extension handshake)."""
MAX_EXTENSION_HANDSHAKE: Final = 64 * 1024

_HEADER = struct.Struct(">IB")
_U32 = struct.Struct(">I")
_U32X3 = struct.Struct(">III")
_PIECE_HEADER = struct.Struct(">IBII")
_INDEX_MSG = struct.Struct(">IBI")
_REQUEST_MSG = struct.Struct(">IBIII")


class WireError(ProtocolError):
    """The peer broke the wire protocol."""


class MessageId(IntEnum):
    CHOKE = 0
    UNCHOKE = 1
    INTERESTED = 2
    NOT_INTERESTED = 3
    HAVE = 4
    BITFIELD = 5
    REQUEST = 6
    PIECE = 7
    CANCEL = 8
    PORT = 9
    SUGGEST_PIECE = 0x0D
    HAVE_ALL = 0x0E
    HAVE_NONE = 0x0F
    REJECT_REQUEST = 0x10
    ALLOWED_FAST = 0x11
    EXTENDED = 20


# --- reserved bits ------------------------------------------------------------------------------


def reserved_bytes(*, extensions: bool = True, fast: bool = True) -> bytes:
    """The 8 reserved handshake bytes advertising BEP 10 and BEP 6 support."""
    reserved = bytearray(8)
    if extensions:
        reserved[5] |= 0x10
    if fast:
        reserved[7] |= 0x04
    return bytes(reserved)


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handshake:
    info_hash: bytes
    peer_id: bytes
    reserved: bytes

    @property
    def extensions(self) -> bool:
        return bool(self.reserved[5] & 0x10)

    @property
    def fast(self) -> bool:
        return bool(self.reserved[7] & 0x04)


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class Choke:
    pass


@dataclass(frozen=True, slots=True)
class Unchoke:
    pass


@dataclass(frozen=True, slots=True)
class Interested:
    pass


@dataclass(frozen=True, slots=True)
class NotInterested:
    pass


@dataclass(frozen=True, slots=True)
class Have:
    index: int


@dataclass(frozen=True, slots=True)
class BitfieldMessage:
    bits: Bitfield


@dataclass(frozen=True, slots=True)
class HaveAll:
    pass


@dataclass(frozen=True, slots=True)
class HaveNone:
    pass


@dataclass(frozen=True, slots=True)
class Request:
    index: int
    begin: int
    length: int


@dataclass(frozen=True, slots=True)
class Cancel:
    index: int
    begin: int
    length: int


@dataclass(frozen=True, slots=True)
class RejectRequest:
    index: int
    begin: int
    length: int


@dataclass(frozen=True, slots=True, eq=False)
class Piece:
    """A block of data. ``data`` is a view into the protocol's receive buffer: it is
    valid only until the next call into the :class:`PeerProtocol` that produced it.
    Copy it (``bytes(event.data)``) to keep it longer."""

    index: int
    begin: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class Port:
    port: int


@dataclass(frozen=True, slots=True)
class SuggestPiece:
    index: int


@dataclass(frozen=True, slots=True)
class AllowedFast:
    index: int


@dataclass(frozen=True, slots=True)
class ExtensionHandshake:
    """A BEP 10 handshake. Unknown or malformed fields are ignored, not fatal."""

    messages: dict[str, int] = field(default_factory=dict)
    client: str = ""
    listen_port: int | None = None
    request_queue: int | None = None
    p2p_block: int | None = None
    """Largest request the peer serves, if it is a p2p peer that negotiates blocks."""
    p2p_role: str | None = None
    """``agent`` or ``proxy`` for p2p peers (for accounting bytes by source)."""


@dataclass(frozen=True, slots=True)
class Extended:
    """A BEP 10 message other than the handshake (we support none; shells ignore it)."""

    extension_id: int
    payload: bytes


Event = (
    Handshake
    | KeepAlive
    | Choke
    | Unchoke
    | Interested
    | NotInterested
    | Have
    | BitfieldMessage
    | HaveAll
    | HaveNone
    | Request
    | Cancel
    | RejectRequest
    | Piece
    | Port
    | SuggestPiece
    | AllowedFast
    | ExtensionHandshake
    | Extended
)

KEEP_ALIVE: Final = KeepAlive()
CHOKE: Final = Choke()
UNCHOKE: Final = Unchoke()
INTERESTED: Final = Interested()
NOT_INTERESTED: Final = NotInterested()
HAVE_ALL: Final = HaveAll()
HAVE_NONE: Final = HaveNone()
_SIMPLE = {
    MessageId.CHOKE: CHOKE,
    MessageId.UNCHOKE: UNCHOKE,
    MessageId.INTERESTED: INTERESTED,
    MessageId.NOT_INTERESTED: NOT_INTERESTED,
}


# --- encoding (what we send) --------------------------------------------------------------------


def encode_handshake(info_hash: bytes, peer_id: bytes, reserved: bytes) -> bytes:
    if len(info_hash) != 20 or len(peer_id) != 20 or len(reserved) != 8:
        raise ValueError("handshake needs a 20-byte info hash, 20-byte peer id, 8 reserved bytes")
    return PSTR + reserved + info_hash + peer_id


ENCODED_KEEP_ALIVE: Final = b"\x00\x00\x00\x00"
ENCODED_CHOKE: Final = b"\x00\x00\x00\x01\x00"
ENCODED_UNCHOKE: Final = b"\x00\x00\x00\x01\x01"
ENCODED_INTERESTED: Final = b"\x00\x00\x00\x01\x02"
ENCODED_NOT_INTERESTED: Final = b"\x00\x00\x00\x01\x03"
ENCODED_HAVE_ALL: Final = b"\x00\x00\x00\x01\x0e"
ENCODED_HAVE_NONE: Final = b"\x00\x00\x00\x01\x0f"


def encode_have(index: int) -> bytes:
    return _INDEX_MSG.pack(5, MessageId.HAVE, index)


def encode_bitfield(bits: Bitfield) -> bytes:
    payload = bits.to_bytes()
    return _HEADER.pack(1 + len(payload), MessageId.BITFIELD) + payload


def encode_request(index: int, begin: int, length: int) -> bytes:
    return _REQUEST_MSG.pack(13, MessageId.REQUEST, index, begin, length)


def encode_cancel(index: int, begin: int, length: int) -> bytes:
    return _REQUEST_MSG.pack(13, MessageId.CANCEL, index, begin, length)


def encode_reject(index: int, begin: int, length: int) -> bytes:
    return _REQUEST_MSG.pack(13, MessageId.REJECT_REQUEST, index, begin, length)


def encode_piece_header(index: int, begin: int, length: int) -> bytes:
    """The 13 bytes that precede ``length`` bytes of block data (sent with sendfile)."""
    return _PIECE_HEADER.pack(9 + length, MessageId.PIECE, index, begin)


def encode_piece(index: int, begin: int, data: bytes | memoryview) -> bytes:
    return encode_piece_header(index, begin, len(data)) + bytes(data)


def encode_port(port: int) -> bytes:
    return struct.pack(">IBH", 3, MessageId.PORT, port)


def encode_suggest(index: int) -> bytes:
    return _INDEX_MSG.pack(5, MessageId.SUGGEST_PIECE, index)


def encode_allowed_fast(index: int) -> bytes:
    return _INDEX_MSG.pack(5, MessageId.ALLOWED_FAST, index)


def encode_extended(extension_id: int, payload: bytes) -> bytes:
    return _HEADER.pack(2 + len(payload), MessageId.EXTENDED) + bytes([extension_id]) + payload


def encode_extension_handshake(
    *,
    client: str,
    listen_port: int | None = None,
    request_queue: int | None = None,
    p2p_block: int | None = None,
    p2p_role: str | None = None,
) -> bytes:
    fields: dict[str, bencoding.EncodableValue] = {"m": {}, "v": client}
    if p2p_role is not None:
        fields["p2p_role"] = p2p_role
    if listen_port is not None:
        fields["p"] = listen_port
    if request_queue is not None:
        fields["reqq"] = request_queue
    if p2p_block is not None:
        fields["p2p_block"] = p2p_block
    return encode_extended(0, bencoding.encode(fields))


# --- decoding (what we receive) -----------------------------------------------------------------


def _parse_extension_handshake(payload: memoryview) -> ExtensionHandshake:
    if len(payload) > MAX_EXTENSION_HANDSHAKE:
        raise WireError("extension handshake too large")
    try:
        doc = bencoding.decode_dict(payload, max_size=MAX_EXTENSION_HANDSHAKE, canonical=False)
    except BencodeError:
        return ExtensionHandshake()  # tolerated: the handshake is advisory
    messages: dict[str, int] = {}
    raw_m = doc.get(b"m")
    if isinstance(raw_m, dict):
        for key, value in list(raw_m.items())[:64]:
            if isinstance(value, int) and 0 <= value <= 255:
                messages[key.decode("utf-8", "replace")] = value

    def small_int(key: bytes, low: int, high: int) -> int | None:
        value: BValue | None = doc.get(key)
        return value if isinstance(value, int) and low <= value <= high else None

    raw_v = doc.get(b"v")
    client = raw_v[:64].decode("utf-8", "replace") if isinstance(raw_v, bytes) else ""
    block = small_int(b"p2p_block", BLOCK_SIZE, MAX_P2P_BLOCK)
    if block is not None and block & (block - 1):
        block = None  # not a power of two: ignore the offer
    raw_role = doc.get(b"p2p_role")
    role = raw_role.decode("ascii", "replace") if isinstance(raw_role, bytes) else None
    if role not in ("agent", "proxy"):
        role = None
    return ExtensionHandshake(
        messages=messages,
        client=client,
        listen_port=small_int(b"p", 1, 65535),
        request_queue=small_int(b"reqq", 1, 100_000),
        p2p_block=block,
        p2p_role=role,
    )


class PeerProtocol:
    """Receive side of one peer connection.

    ``reserved`` is what we send in our handshake; an extension is in use only when
    both sides advertise it (known after the peer's :class:`Handshake`).
    Call :meth:`set_geometry` once the torrent is known (right after the handshake),
    before asking for further events.
    """

    def __init__(
        self,
        *,
        reserved: bytes = reserved_bytes(),
        max_block: int = MAX_P2P_BLOCK,
        initial_buffer: int = 64 * 1024,
    ) -> None:
        self.our_reserved = reserved
        self.max_block = max_block
        self.handshake: Handshake | None = None
        self.fast = False
        self.extensions = False
        self._num_pieces: int | None = None
        self._piece_length = 0
        self._total_length = 0
        self._max_message = 0
        self._buf = bytearray(max(initial_buffer, HANDSHAKE_LENGTH))
        self._start = 0
        self._end = 0

    # -- geometry ------------------------------------------------------------------------------

    def set_geometry(self, num_pieces: int, piece_length: int, total_length: int) -> None:
        self._num_pieces = num_pieces
        self._piece_length = piece_length
        self._total_length = total_length
        self._max_message = max(
            9 + self.max_block, 1 + byte_length(num_pieces), 2 + MAX_EXTENDED_MESSAGE, 13
        )

    def set_max_block(self, max_block: int) -> None:
        """The largest block this peer may send or ask for: a connection's receive buffer grows
        only as far as that (16 KiB until a p2p peer negotiates larger blocks)."""
        self.max_block = max_block
        if self._num_pieces is not None:
            self.set_geometry(self._num_pieces, self._piece_length, self._total_length)

    def _piece_size(self, index: int) -> int:
        if index == (self._num_pieces or 0) - 1:
            return self._total_length - index * self._piece_length
        return self._piece_length

    # -- input ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (copies them)."""
        n = len(data)
        if n:
            self.receive_buffer(n)[:n] = data
            self._end += n

    def receive_buffer(self, min_free: int = 1) -> memoryview:
        """Free space at the end of the buffer (at least ``min_free`` bytes) to receive into.

        Invalidates the data of the last :class:`Piece` event. Follow with :meth:`commit`.
        """
        free = len(self._buf) - self._end
        if free >= min_free and free >= 4096:
            return memoryview(self._buf)[self._end :]
        pending = self._end - self._start
        need = pending + max(min_free, self._wanted_more())
        if need <= len(self._buf) and self._start:
            self._buf[:pending] = self._buf[self._start : self._end]
        elif need > len(self._buf) or not self._start:
            size = max(need, len(self._buf))
            if size > len(self._buf):
                size = 1 << (size - 1).bit_length()
            fresh = bytearray(size)
            fresh[:pending] = self._buf[self._start : self._end]
            self._buf = fresh
        self._start, self._end = 0, pending
        return memoryview(self._buf)[self._end :]

    def _wanted_more(self) -> int:
        """Bytes still missing for the message at the head of the buffer (at least 4 KiB)."""
        pending = self._end - self._start
        if self.handshake is None:
            return max(HANDSHAKE_LENGTH - pending, 4096)
        if pending >= 4:
            length: int = _U32.unpack_from(self._buf, self._start)[0]
            if length <= self._max_message:
                return max(4 + length - pending, 4096)
        return 4096

    def needed(self) -> int:
        """Bytes that must still arrive before the next event is complete (at least 1)."""
        pending = self._end - self._start
        if self.handshake is None:
            return max(1, HANDSHAKE_LENGTH - pending)
        if pending < 4:
            return 4 - pending
        length: int = _U32.unpack_from(self._buf, self._start)[0]
        if length > self._max_message:
            return 1  # next_event() raises for it
        return max(1, 4 + length - pending)

    def commit(self, n: int) -> None:
        """Record that ``n`` bytes were written into the last :meth:`receive_buffer`."""
        if n < 0 or self._end + n > len(self._buf):
            raise LocalError("commit beyond the receive buffer")
        self._end += n

    @property
    def buffered(self) -> int:
        return self._end - self._start

    # -- events --------------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next complete event, or None when more data is needed."""
        while True:
            event = self._next()
            if event is not _SKIP:
                return event  # type: ignore[return-value]

    def _next(self) -> Event | object | None:
        buf = self._buf
        start = self._start
        avail = self._end - start
        if self.handshake is None:
            return self._next_handshake(buf, start, avail)
        if self._num_pieces is None:
            raise LocalError("set_geometry() must be called after the handshake")
        if avail < 4:
            return None
        (length,) = _U32.unpack_from(buf, start)
        if length == 0:
            self._start = start + 4
            return KEEP_ALIVE
        if length > self._max_message:
            raise WireError(f"message of {length} bytes exceeds the limit of {self._max_message}")
        if avail < 4 + length:
            return None
        msg_id = buf[start + 4]
        body = start + 5
        end = start + 4 + length
        self._start = end
        if msg_id == MessageId.PIECE:
            if length < 9:
                raise WireError("piece message too short")
            index, begin = struct.unpack_from(">II", buf, body)
            size = length - 9
            self._check_block(index, begin, size, allow_empty=False, limit=self.max_block)
            return Piece(index, begin, memoryview(buf)[body + 8 : end])
        if msg_id in _SIMPLE:
            self._expect(length, 1, msg_id)
            return _SIMPLE[MessageId(msg_id)]
        if msg_id == MessageId.HAVE:
            self._expect(length, 5, msg_id)
            return Have(self._index(_U32.unpack_from(buf, body)[0]))
        if msg_id in (MessageId.REQUEST, MessageId.CANCEL, MessageId.REJECT_REQUEST):
            self._expect(length, 13, msg_id)
            if msg_id == MessageId.REJECT_REQUEST and not self.fast:
                raise WireError("reject-request without the fast extension")
            index, begin, size = _U32X3.unpack_from(buf, body)
            self._check_block(index, begin, size, allow_empty=False, limit=self.max_block)
            if msg_id == MessageId.REQUEST:
                return Request(index, begin, size)
            if msg_id == MessageId.CANCEL:
                return Cancel(index, begin, size)
            return RejectRequest(index, begin, size)
        if msg_id == MessageId.BITFIELD:
            # BEP 3 wants it first, but aria2 sends one after have-none once it has a
            # piece: a late bitfield replaces what we knew of the peer's pieces.
            try:
                bits = Bitfield.from_bytes(memoryview(buf)[body:end], self._num_pieces)
            except ProtocolError as exc:
                raise WireError(str(exc)) from None
            return BitfieldMessage(bits)
        if msg_id in (MessageId.HAVE_ALL, MessageId.HAVE_NONE):
            if not self.fast:
                raise WireError("have-all/have-none without the fast extension")
            self._expect(length, 1, msg_id)
            return HAVE_ALL if msg_id == MessageId.HAVE_ALL else HAVE_NONE
        if msg_id in (MessageId.SUGGEST_PIECE, MessageId.ALLOWED_FAST):
            if not self.fast:
                raise WireError("fast-extension message without the fast extension")
            self._expect(length, 5, msg_id)
            index = self._index(_U32.unpack_from(buf, body)[0])
            return SuggestPiece(index) if msg_id == MessageId.SUGGEST_PIECE else AllowedFast(index)
        if msg_id == MessageId.PORT:
            self._expect(length, 3, msg_id)
            return Port(struct.unpack_from(">H", buf, body)[0])
        if msg_id == MessageId.EXTENDED:
            if not self.extensions:
                raise WireError("extended message without the extension protocol")
            if length < 2:
                raise WireError("extended message too short")
            ext_id = buf[body]
            payload = memoryview(buf)[body + 1 : end]
            if ext_id == 0:
                return _parse_extension_handshake(payload)
            return Extended(ext_id, bytes(payload))
        # BEP 3: unknown messages are ignored (their length is already bounded).
        return _SKIP

    def _next_handshake(self, buf: bytearray, start: int, avail: int) -> Handshake | None:
        prefix = min(avail, len(PSTR))
        if buf[start : start + prefix] != PSTR[:prefix]:
            raise WireError("not a BitTorrent handshake")
        if avail < HANDSHAKE_LENGTH:
            return None
        reserved = bytes(buf[start + 20 : start + 28])
        info_hash = bytes(buf[start + 28 : start + 48])
        peer_id = bytes(buf[start + 48 : start + 68])
        self._start = start + HANDSHAKE_LENGTH
        handshake = Handshake(info_hash, peer_id, reserved)
        self.handshake = handshake
        ours = Handshake(b"", b"", self.our_reserved)
        self.fast = ours.fast and handshake.fast
        self.extensions = ours.extensions and handshake.extensions
        return handshake

    def _expect(self, length: int, wanted: int, msg_id: int) -> None:
        if length != wanted:
            raise WireError(f"message {msg_id} has length {length}, expected {wanted}")

    def _index(self, index: int) -> int:
        if index >= (self._num_pieces or 0):
            raise WireError(f"piece index {index} out of range")
        return index

    def _check_block(
        self, index: int, begin: int, size: int, *, allow_empty: bool, limit: int
    ) -> None:
        self._index(index)
        if size > limit or (size == 0 and not allow_empty):
            raise WireError(f"block of {size} bytes outside (0, {limit}]")
        if begin + size > self._piece_size(index):
            raise WireError(f"block {index}:{begin}+{size} beyond the end of the piece")


_SKIP: Final = object()
