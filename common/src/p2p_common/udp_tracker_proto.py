"""The BitTorrent UDP tracker protocol (BEP 15), both sides, as pure functions.

Bytes in, values out: no sockets, no clock, no trio. The tracker service and the engine's
announcer wrap these functions in their own shells, and pass the time in where it matters.

Wire format (every integer big-endian). A request starts with a 16-byte header
``connection_id:u64 action:u32 transaction_id:u32``, an answer with an 8-byte one
``action:u32 transaction_id:u32``:

- connect (action 0): the header with ``connection_id`` = :data:`PROTOCOL_ID` (16 bytes);
  answer: header + the connection id (u64), 16 bytes.
- announce (1): header, info_hash (20), peer_id (20), downloaded u64, left u64,
  uploaded u64, event u32 (0 none, 1 completed, 2 started, 3 stopped), ip u32 (0: the
  source address), key u32, num_want i32 (-1: the tracker's default), port u16: 98 bytes;
  BEP 41 options may follow (ignored). Answer: 20 bytes, then 6 (IPv4) or 18 (IPv6)
  bytes per peer.
- scrape (2): header, then 1..:data:`MAX_SCRAPE_HASHES` infohashes of 20 bytes; answer:
  8 bytes + 12 per infohash.
- error (3, answers only): 8 bytes + a UTF-8 text.

An announce answer is ``interval u32, leechers u32, seeders u32`` after its 8-byte header,
then the peers; their family is the family of the socket the announce came over (BEP 15:
IPv4 tracker, 6-byte peers; IPv6 tracker, 18-byte peers). A scrape answer is
``seeders u32, completed u32, leechers u32`` per infohash, in the order asked.

Connection ids (server side) are stateless: :func:`connection_id` derives one from a
per-process secret, the client's IP address and the time it was issued, and
:func:`connection_id_valid` checks it, so the tracker keeps nothing per client. An id is
accepted for :data:`CONNECTION_ID_LIFETIME` (2 minutes, as BEP 15 asks of trackers); a
client uses one for at most :data:`CLIENT_CONNECTION_ID_TTL` (1 minute, BEP 15) and
caches it with :class:`ConnectionIdCache`.

Every malformed datagram raises :class:`UdpTrackerProtocolError` (a
:class:`~p2p_common.tracker_proto.TrackerProtocolError`), carrying the transaction id when
the header could be read, so that a tracker can answer with an error. An error answer
(action 3) read by a client raises :class:`~p2p_common.tracker_proto.TrackerRefusedError`.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import math
import socket
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from p2p_common.tracker_proto import (
    DEFAULT_MAX_PEERS,
    MAX_COUNTER,
    MAX_TEXT_BYTES,
    AnnounceRequest,
    AnnounceResponse,
    Event,
    Peer,
    ScrapeStats,
    TrackerProtocolError,
    TrackerRefusedError,
)

__all__ = [
    "ANNOUNCE_REQUEST_SIZE",
    "CLIENT_CONNECTION_ID_TTL",
    "CONNECTION_ID_LIFETIME",
    "CONNECT_SIZE",
    "MAX_DATAGRAM",
    "MAX_SCRAPE_HASHES",
    "PROTOCOL_ID",
    "Action",
    "ConnectionIdCache",
    "ConnectionIds",
    "UdpAnnounce",
    "UdpScrape",
    "UdpTrackerProtocolError",
    "connection_id",
    "connection_id_valid",
    "encode_announce_request",
    "encode_announce_response",
    "encode_connect_request",
    "encode_connect_response",
    "encode_error",
    "encode_scrape_request",
    "encode_scrape_response",
    "parse_announce_request",
    "parse_announce_response",
    "parse_connect_request",
    "parse_connect_response",
    "parse_header",
    "parse_scrape_request",
    "parse_scrape_response",
    "parse_udp_url",
    "transaction_of",
]

PROTOCOL_ID: Final = 0x41727101980
"""The ``connection_id`` of a connect request: it marks the protocol."""
CONNECT_SIZE: Final = 16
"""A connect request, and a connect answer."""
ANNOUNCE_REQUEST_SIZE: Final = 98
"""An announce request without BEP 41 options."""
ANNOUNCE_HEADER_SIZE: Final = 20
"""An announce answer before its peers."""
SCRAPE_HEADER_SIZE: Final = 16
ERROR_HEADER_SIZE: Final = 8
MAX_SCRAPE_HASHES: Final = 74
"""BEP 15: "up to about 74 torrents can be scraped at once" (a 1,496-byte request)."""
MAX_DATAGRAM: Final = 2048
"""Largest request a tracker reads (an announce with BEP 41 options, a full scrape); the
kernel cuts longer datagrams to this size, and the parsers then refuse them."""
MAX_ANSWER: Final = 65507
"""Largest UDP payload over IPv4: what a client reads at most."""
CONNECTION_ID_LIFETIME: Final = 120.0
"""Seconds a tracker accepts a connection id after issuing it (BEP 15: two minutes)."""
CLIENT_CONNECTION_ID_TTL: Final = 60.0
"""Seconds a client reuses a connection id after receiving it (BEP 15: one minute)."""
MAX_INTERVAL: Final = 7 * 24 * 3600
"""Largest announce ``interval`` a client accepts."""


class Action(enum.IntEnum):
    CONNECT = 0
    ANNOUNCE = 1
    SCRAPE = 2
    ERROR = 3


_HEADER = struct.Struct(">QII")  # connection_id, action, transaction_id
_REPLY_HEADER = struct.Struct(">II")  # action, transaction_id
_CONNECT_REPLY = struct.Struct(">IIQ")
_ANNOUNCE = struct.Struct(">QII20s20sQQQIIIiH")
_ANNOUNCE_REPLY = struct.Struct(">IIIII")
_SCRAPE_ENTRY = struct.Struct(">III")
_CONNECT_REQUEST = struct.Struct(">QII")

_MAX_U32 = 2**32 - 1
_MAX_I32 = 2**31 - 1

_EVENT_CODES: dict[Event, int] = {
    Event.NONE: 0,
    Event.COMPLETED: 1,
    Event.STARTED: 2,
    Event.STOPPED: 3,
    Event.PAUSED: 0,  # BEP 15 has no paused event: a regular announce
}
_EVENTS: tuple[Event, ...] = (Event.NONE, Event.COMPLETED, Event.STARTED, Event.STOPPED)


class UdpTrackerProtocolError(TrackerProtocolError):
    """A UDP tracker datagram broke BEP 15.

    :attr:`transaction_id` is the request's transaction id when its header was readable
    (a tracker can then answer with an error), else None.
    """

    def __init__(self, message: str, transaction_id: int | None = None) -> None:
        super().__init__(message)
        self.transaction_id = transaction_id


# --- connection ids (tracker side, stateless) ----------------------------------------------------

_STAMP_BITS: Final = 16
_STAMP_MOD: Final = 1 << _STAMP_BITS
_MAC_MASK: Final = (1 << 48) - 1


def _mac(secret: bytes, ip: str, issued: int) -> int:
    digest = hashlib.blake2b(
        b"%d|%s" % (issued, ip.encode("ascii", "replace")), key=secret, digest_size=6
    ).digest()
    return int.from_bytes(digest, "big")


def connection_id(secret: bytes, ip: str, now: float) -> int:
    """A connection id for a client at ``ip``, issued at ``now`` (seconds, any clock).

    The top 16 bits are the issuing second modulo 65,536, the low 48 bits a keyed BLAKE2b
    MAC of that second and the address under ``secret`` (16 to 64 bytes, one per process):
    nothing is stored, and only a client that received the id at that address can use it.
    Bound to the address only, not the port, as in opentracker: a client may announce
    from another socket than the one that connected.
    """
    issued = math.floor(now)
    return ((issued % _STAMP_MOD) << 48) | _mac(secret, ip, issued)


def connection_id_valid(
    secret: bytes, ip: str, cid: int, now: float, *, lifetime: float = CONNECTION_ID_LIFETIME
) -> bool:
    """Whether ``cid`` was issued to ``ip`` under ``secret`` at most ``lifetime`` seconds
    before ``now`` (and not after it). Ids carry whole seconds, so an id stays valid for at
    least ``lifetime`` and less than ``lifetime + 1`` seconds."""
    current = math.floor(now)
    age = (current - (cid >> 48)) % _STAMP_MOD
    if age > lifetime + 1:
        return False
    return (cid & _MAC_MASK) == _mac(secret, ip, current - age)


class ConnectionIds:
    """:func:`connection_id` and :func:`connection_id_valid` under one secret, with the keyed
    hash set up once (a tracker checks an id per announce; the ids are the same)."""

    def __init__(self, secret: bytes, *, lifetime: float = CONNECTION_ID_LIFETIME) -> None:
        self._base = hashlib.blake2b(key=secret, digest_size=6)
        self.lifetime = lifetime

    def _mac(self, ip: str, issued: int) -> int:
        hasher = self._base.copy()
        hasher.update(b"%d|%s" % (issued, ip.encode("ascii", "replace")))
        return int.from_bytes(hasher.digest(), "big")

    def issue(self, ip: str, now: float) -> int:
        """A connection id for a client at ``ip`` at ``now``."""
        issued = math.floor(now)
        return ((issued % _STAMP_MOD) << 48) | self._mac(ip, issued)

    def valid(self, ip: str, cid: int, now: float) -> bool:
        """Whether ``cid`` was issued to ``ip`` at most ``lifetime`` seconds before ``now``
        (whole seconds: at least ``lifetime``, less than ``lifetime + 1``)."""
        current = math.floor(now)
        age = (current - (cid >> 48)) % _STAMP_MOD
        return age <= self.lifetime + 1 and (cid & _MAC_MASK) == self._mac(ip, current - age)


# --- both sides: headers -------------------------------------------------------------------------


def parse_header(data: bytes) -> tuple[int, int, int]:
    """``(connection_id, action, transaction_id)`` of a request (16 bytes at least)."""
    if len(data) < CONNECT_SIZE:
        raise UdpTrackerProtocolError(f"request of {len(data)} bytes is shorter than 16")
    cid, action, tid = _HEADER.unpack_from(data)
    return cid, action, tid


# --- tracker side: requests ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpAnnounce:
    """An announce request as the tracker reads it."""

    connection_id: int
    transaction_id: int
    request: AnnounceRequest
    """The announce itself; ``key`` is the 4 bytes of the BEP 15 key (None when 0), ``ip``
    the dotted address of the ``ip`` field (None when 0)."""


@dataclass(frozen=True, slots=True)
class UdpScrape:
    """A scrape request as the tracker reads it."""

    connection_id: int
    transaction_id: int
    info_hashes: tuple[bytes, ...]


def parse_connect_request(data: bytes) -> int:
    """The transaction id of a connect request (16 bytes or more, the protocol id first)."""
    cid, action, tid = parse_header(data)
    if action != Action.CONNECT:
        raise UdpTrackerProtocolError("not a connect request", tid)
    if cid != PROTOCOL_ID:
        raise UdpTrackerProtocolError("connect request without the protocol id", tid)
    return tid


def parse_announce_request(data: bytes) -> UdpAnnounce:
    """Read an announce request (98 bytes; BEP 41 options after them are ignored).

    ``left``, ``downloaded`` and ``uploaded`` are signed 64-bit in BEP 15: negative values
    are refused, as in the HTTP parser. ``num_want`` below 0 means the tracker's default.
    """
    if len(data) < ANNOUNCE_REQUEST_SIZE:
        tid = _HEADER.unpack_from(data)[2] if len(data) >= CONNECT_SIZE else None
        raise UdpTrackerProtocolError(f"announce of {len(data)} bytes is shorter than 98", tid)
    (
        cid,
        action,
        tid,
        info_hash,
        peer_id,
        downloaded,
        left,
        uploaded,
        event_code,
        ip_field,
        key,
        numwant,
        port,
    ) = _ANNOUNCE.unpack_from(data)
    if action != Action.ANNOUNCE:
        raise UdpTrackerProtocolError("not an announce request", tid)
    if event_code > 3:
        raise UdpTrackerProtocolError("event must be 0..3", tid)
    if port == 0:
        raise UdpTrackerProtocolError("port must be 1..65535", tid)
    if downloaded > MAX_COUNTER or left > MAX_COUNTER or uploaded > MAX_COUNTER:
        raise UdpTrackerProtocolError("negative downloaded, left or uploaded", tid)
    request = AnnounceRequest(
        info_hash,
        peer_id,
        port,
        uploaded,
        downloaded,
        left,
        _EVENTS[event_code],
        None if numwant < 0 else numwant,
        True,
        False,
        key.to_bytes(4, "big") if key else None,
        socket.inet_ntoa(ip_field.to_bytes(4, "big")) if ip_field else None,
    )
    return UdpAnnounce(cid, tid, request)


def parse_scrape_request(data: bytes, *, max_hashes: int = MAX_SCRAPE_HASHES) -> UdpScrape:
    """Read a scrape request: 1..``max_hashes`` infohashes (duplicates kept, in order:
    the answer has one entry per infohash asked)."""
    cid, action, tid = parse_header(data)
    if action != Action.SCRAPE:
        raise UdpTrackerProtocolError("not a scrape request", tid)
    size = len(data) - SCRAPE_HEADER_SIZE
    if size <= 0 or size % 20:
        raise UdpTrackerProtocolError("scrape must carry whole 20-byte infohashes", tid)
    count = size // 20
    if count > max_hashes:
        raise UdpTrackerProtocolError(f"more than {max_hashes} infohashes in one scrape", tid)
    hashes = tuple(data[offset : offset + 20] for offset in range(16, len(data), 20))
    return UdpScrape(cid, tid, hashes)


# --- tracker side: answers -----------------------------------------------------------------------


def encode_connect_response(transaction_id: int, cid: int) -> bytes:
    return _CONNECT_REPLY.pack(Action.CONNECT, transaction_id, cid)


def encode_announce_response(
    transaction_id: int, *, interval: int, leechers: int, seeders: int, peers: bytes
) -> bytes:
    """An announce answer; ``peers`` is already packed, 6 or 18 bytes per peer (all one
    family: the family of the socket the announce came over). Counts are capped at 2^32-1."""
    return (
        _ANNOUNCE_REPLY.pack(
            Action.ANNOUNCE,
            transaction_id,
            min(interval, _MAX_U32),
            min(leechers, _MAX_U32),
            min(seeders, _MAX_U32),
        )
        + peers
    )


def encode_scrape_response(transaction_id: int, stats: Iterable[ScrapeStats]) -> bytes:
    """A scrape answer, one ``seeders, completed, leechers`` entry per infohash asked."""
    parts = [_REPLY_HEADER.pack(Action.SCRAPE, transaction_id)]
    parts.extend(
        _SCRAPE_ENTRY.pack(
            min(s.complete, _MAX_U32), min(s.downloaded, _MAX_U32), min(s.incomplete, _MAX_U32)
        )
        for s in stats
    )
    return b"".join(parts)


def encode_error(transaction_id: int, message: str, *, max_size: int | None = None) -> bytes:
    """An error answer; the text is cut so that the datagram is at most ``max_size`` bytes
    (a tracker passes the size of the request it answers: no amplification)."""
    text = message.encode("utf-8")[:MAX_TEXT_BYTES]
    if max_size is not None:
        text = text[: max(0, max_size - ERROR_HEADER_SIZE)]
    return _REPLY_HEADER.pack(Action.ERROR, transaction_id) + text


# --- client side: requests -----------------------------------------------------------------------


def encode_connect_request(transaction_id: int) -> bytes:
    return _CONNECT_REQUEST.pack(PROTOCOL_ID, Action.CONNECT, transaction_id)


def encode_announce_request(cid: int, transaction_id: int, request: AnnounceRequest) -> bytes:
    """An announce request (98 bytes).

    ``request.key`` goes into the 32-bit key field when it is at most 4 bytes (else its
    first 4 bytes), ``request.ip`` into the ip field when it is an IPv4 address (else 0);
    ``numwant`` None is sent as -1 (the tracker's default) and capped at 2^31-1; the
    BEP 21 ``paused`` event, which BEP 15 lacks, is sent as a regular announce.
    """
    key = 0 if request.key is None else int.from_bytes(request.key[:4], "big")
    ip_field = 0
    if request.ip is not None:
        try:
            ip_field = int(ipaddress.IPv4Address(request.ip))
        except ValueError:
            ip_field = 0
    numwant = -1 if request.numwant is None else min(request.numwant, _MAX_I32)
    return _ANNOUNCE.pack(
        cid,
        Action.ANNOUNCE,
        transaction_id,
        request.info_hash,
        request.peer_id,
        request.downloaded,
        request.left,
        request.uploaded,
        _EVENT_CODES[request.event],
        ip_field,
        key,
        numwant,
        request.port,
    )


def encode_scrape_request(cid: int, transaction_id: int, info_hashes: Sequence[bytes]) -> bytes:
    if not 0 < len(info_hashes) <= MAX_SCRAPE_HASHES:
        raise ValueError(f"a scrape names 1..{MAX_SCRAPE_HASHES} infohashes")
    for info_hash in info_hashes:
        if len(info_hash) != 20:
            raise ValueError("info_hash must be 20 bytes")
    return _HEADER.pack(cid, Action.SCRAPE, transaction_id) + b"".join(info_hashes)


# --- client side: answers ------------------------------------------------------------------------


def _reply(data: bytes, action: Action, transaction_id: int, minimum: int) -> None:
    """Check an answer's header; raise the tracker's error if it is one."""
    if len(data) < ERROR_HEADER_SIZE:
        raise UdpTrackerProtocolError(f"answer of {len(data)} bytes is shorter than 8")
    if len(data) > MAX_ANSWER:
        raise UdpTrackerProtocolError(f"answer of {len(data)} bytes is too large")
    got, tid = _REPLY_HEADER.unpack_from(data)
    if tid != transaction_id:
        raise UdpTrackerProtocolError("answer for another transaction", tid)
    if got == Action.ERROR:
        raise TrackerRefusedError(
            data[ERROR_HEADER_SIZE : ERROR_HEADER_SIZE + MAX_TEXT_BYTES].decode(
                "utf-8", errors="replace"
            )
        )
    if got != action:
        raise UdpTrackerProtocolError(f"answer has action {got}, expected {int(action)}", tid)
    if len(data) < minimum:
        raise UdpTrackerProtocolError(f"answer of {len(data)} bytes is shorter than {minimum}", tid)


def transaction_of(data: bytes) -> int | None:
    """The transaction id of an answer, or None if it is too short to have one (a client
    drops answers to other transactions, e.g. late ones to an earlier attempt)."""
    if len(data) < ERROR_HEADER_SIZE:
        return None
    tid: int = _REPLY_HEADER.unpack_from(data)[1]
    return tid


def parse_connect_response(data: bytes, transaction_id: int) -> int:
    """The connection id in a connect answer to ``transaction_id``."""
    _reply(data, Action.CONNECT, transaction_id, CONNECT_SIZE)
    cid: int = _CONNECT_REPLY.unpack_from(data)[2]
    return cid


def parse_announce_response(
    data: bytes, transaction_id: int, *, ipv6: bool = False, max_peers: int = DEFAULT_MAX_PEERS
) -> AnnounceResponse:
    """An announce answer; ``ipv6``: the announce went over IPv6, so peers are 18 bytes.

    Peers with port 0 are left out (as in compact HTTP answers).
    """
    _reply(data, Action.ANNOUNCE, transaction_id, ANNOUNCE_HEADER_SIZE)
    _, _, interval, leechers, seeders = _ANNOUNCE_REPLY.unpack_from(data)
    if interval > MAX_INTERVAL:
        raise UdpTrackerProtocolError(f"interval {interval} is too large", transaction_id)
    raw = data[ANNOUNCE_HEADER_SIZE:]
    size = 18 if ipv6 else 6
    if len(raw) % size:
        raise UdpTrackerProtocolError(
            f"peers of {len(raw)} bytes are not a multiple of {size}", transaction_id
        )
    if len(raw) // size > max_peers:
        raise UdpTrackerProtocolError(f"more than {max_peers} peers in the answer", transaction_id)
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    peers = []
    for offset in range(0, len(raw), size):
        port = int.from_bytes(raw[offset + size - 2 : offset + size], "big")
        if port:
            peers.append(Peer(socket.inet_ntop(family, raw[offset : offset + size - 2]), port))
    return AnnounceResponse(
        interval=interval, complete=seeders, incomplete=leechers, peers=tuple(peers)
    )


def parse_scrape_response(
    data: bytes, transaction_id: int, info_hashes: Sequence[bytes]
) -> dict[bytes, ScrapeStats]:
    """A scrape answer to a request for ``info_hashes``: counters per infohash."""
    _reply(data, Action.SCRAPE, transaction_id, ERROR_HEADER_SIZE)
    if len(data) != ERROR_HEADER_SIZE + 12 * len(info_hashes):
        raise UdpTrackerProtocolError(
            f"scrape answer of {len(data)} bytes for {len(info_hashes)} infohashes",
            transaction_id,
        )
    out: dict[bytes, ScrapeStats] = {}
    for index, info_hash in enumerate(info_hashes):
        seeders, completed, leechers = _SCRAPE_ENTRY.unpack_from(data, 8 + 12 * index)
        out[info_hash] = ScrapeStats(complete=seeders, downloaded=completed, incomplete=leechers)
    return out


# --- client side: URLs and the connection id cache -----------------------------------------------


def parse_udp_url(url: str) -> tuple[str, int]:
    """``(host, port)`` of a ``udp://host:port[/path]`` tracker URL (the port is required;
    an IPv6 host is written ``[addr]`` and returned without brackets)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} is not a udp://host:port URL") from None
    if parts.scheme != "udp" or not parts.hostname or not port:
        raise ValueError(f"{url!r} is not a udp://host:port URL")
    return parts.hostname, port


class ConnectionIdCache:
    """Connection ids a client got, per tracker address, each for
    :data:`CLIENT_CONNECTION_ID_TTL` seconds; at most ``size`` trackers (oldest dropped)."""

    def __init__(self, *, ttl: float = CLIENT_CONNECTION_ID_TTL, size: int = 1024) -> None:
        self.ttl = ttl
        self.size = size
        self._ids: OrderedDict[tuple[str, int], tuple[int, float]] = OrderedDict()

    def get(self, address: tuple[str, int], now: float) -> int | None:
        """The connection id for ``address`` if one is still fresh at ``now``."""
        entry = self._ids.get(address)
        if entry is None:
            return None
        if now - entry[1] >= self.ttl or now < entry[1]:
            del self._ids[address]
            return None
        return entry[0]

    def put(self, address: tuple[str, int], cid: int, now: float) -> None:
        """Remember ``cid``, received from ``address`` at ``now``."""
        self._ids[address] = (cid, now)
        self._ids.move_to_end(address)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def drop(self, address: tuple[str, int]) -> None:
        """Forget the id of ``address`` (the tracker refused it, e.g. after a restart)."""
        self._ids.pop(address, None)

    def __len__(self) -> int:
        return len(self._ids)
