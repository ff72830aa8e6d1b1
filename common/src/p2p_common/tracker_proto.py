"""The BitTorrent HTTP tracker protocol, both sides, as pure functions (bytes in, values out).

Covers BEP 3 (announce), BEP 23 (compact IPv4 peers), BEP 7 (``peers6``, compact IPv6 peers)
and BEP 48 (scrape). No sockets, no clock, no trio: the peer engine and the tracker service
wrap these functions in their own shells.

Client side (the peer engine):

- :class:`AnnounceRequest` and :func:`announce_url` build the announce URL (binary
  ``info_hash`` and ``peer_id`` are percent-encoded byte by byte);
- :func:`parse_announce_response` reads the bencoded answer (bounded, strict);
- :func:`scrape_url`, :func:`scrape_query` and :func:`parse_scrape_response` for scrapes.

Server side (the tracker):

- :func:`parse_announce_query` and :func:`parse_scrape_query` read the raw query string
  bytes (percent-decoding to bytes, never through UTF-8);
- :func:`encode_announce_response`, :func:`encode_compact_announce`,
  :func:`encode_scrape_response` and :func:`encode_failure` build the answers.

Every malformed input raises :class:`TrackerProtocolError`, whose message is short and fit
to be sent back to a client as ``failure reason``. A well-formed answer in which the
tracker refuses (``failure reason``) raises its subclass :class:`TrackerRefusedError`.
"""

from __future__ import annotations

import binascii
import enum
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote_from_bytes, unquote_to_bytes

from p2p_common import bencoding
from p2p_common.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_PEERS",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "MAX_QUERY_BYTES",
    "MAX_SCRAPE_HASHES",
    "AnnounceRequest",
    "AnnounceResponse",
    "Event",
    "Peer",
    "ScrapeStats",
    "TrackerRefusedError",
    "TrackerProtocolError",
    "announce_url",
    "encode_announce_response",
    "encode_compact_announce",
    "encode_failure",
    "encode_scrape_response",
    "pack_peer",
    "parse_announce_query",
    "parse_announce_response",
    "parse_scrape_query",
    "parse_scrape_response",
    "scrape_query",
    "scrape_url",
    "unpack_peers",
]

# --- bounds ----------------------------------------------------------------------------------

MAX_QUERY_BYTES = 8192
"""Longest raw query string the server-side parsers accept (a 64-hash scrape fits)."""
MAX_QUERY_PARAMS = 80
"""Most ``key=value`` pairs in one query string."""
MAX_SCRAPE_HASHES = 64
"""Most ``info_hash`` values in one scrape request."""
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
"""Largest tracker answer the client-side parsers read unless told otherwise."""
DEFAULT_MAX_PEERS = 2000
"""Most peers (``peers`` and ``peers6`` together) a parsed announce answer may hold."""
MAX_KEY_BYTES = 64
"""Longest ``key`` parameter."""
MAX_IP_PARAM_BYTES = 255
"""Longest ``ip`` parameter (BEP 3 allows a DNS name)."""
MAX_TEXT_BYTES = 1024
"""Longest ``failure reason`` or ``warning message`` kept (longer ones are cut)."""
MAX_INTERVAL = 7 * 24 * 3600
"""Largest ``interval`` or ``min interval`` accepted from a tracker, in seconds."""
MAX_COUNTER = 2**63 - 1
"""Largest ``uploaded``/``downloaded``/``left`` value (a signed 64-bit counter)."""
MAX_NUMWANT = 2**31 - 1
"""Largest ``numwant`` value in a query (the tracker caps it much lower)."""

_COMPACT4 = 6
_COMPACT6 = 18


class TrackerProtocolError(ProtocolError):
    """A tracker request or answer broke the protocol.

    The message is short and can go back to a client as ``failure reason``.
    """


class TrackerRefusedError(TrackerProtocolError):
    """The tracker answered with ``failure reason``: a well-formed refusal.

    A subclass of :class:`TrackerProtocolError` so that ``except TrackerProtocolError``
    covers every unusable answer; :attr:`reason` is the tracker's text.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"tracker refused: {reason}")
        self.reason = reason


class Event(enum.Enum):
    """The ``event`` of an announce; :attr:`NONE` is a regular re-announce."""

    NONE = ""
    STARTED = "started"
    COMPLETED = "completed"
    STOPPED = "stopped"
    PAUSED = "paused"
    """BEP 21 (a partial seed pausing); a tracker treats it like :attr:`NONE`."""


_EVENTS: dict[bytes, Event] = {e.value.encode(): e for e in Event}
_EVENTS[b"empty"] = Event.NONE  # some old clients spell the regular announce this way


# --- data ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnnounceRequest:
    """One announce, as a client sends it and as the tracker reads it back."""

    info_hash: bytes
    peer_id: bytes
    port: int
    uploaded: int = 0
    downloaded: int = 0
    left: int = 0
    event: Event = Event.NONE
    numwant: int | None = None
    """Peers wanted; ``None`` leaves it to the tracker."""
    compact: bool = True
    """Ask for BEP 23/BEP 7 compact peer strings (``compact=1``)."""
    no_peer_id: bool = False
    """In a non-compact answer, leave out the peer ids."""
    key: bytes | None = None
    """An identity token that stays the same across the client's IP changes."""
    ip: str | None = None
    """The address the client claims; trackers usually ignore it (see docs/tracker.md)."""

    def __post_init__(self) -> None:
        if len(self.info_hash) != 20:
            raise ValueError("info_hash must be 20 bytes")
        if len(self.peer_id) != 20:
            raise ValueError("peer_id must be 20 bytes")
        if not 0 < self.port <= 65535:
            raise ValueError("port must be 1..65535")
        for name in ("uploaded", "downloaded", "left"):
            if not 0 <= getattr(self, name) <= MAX_COUNTER:
                raise ValueError(f"{name} must be 0..2**63-1")
        if self.numwant is not None and not 0 <= self.numwant <= MAX_NUMWANT:
            raise ValueError("numwant must be 0..2**31-1")
        if self.key is not None and not 0 < len(self.key) <= MAX_KEY_BYTES:
            raise ValueError(f"key must be 1..{MAX_KEY_BYTES} bytes")
        if self.ip is not None and (
            not 0 < len(self.ip) <= MAX_IP_PARAM_BYTES
            or not self.ip.isascii()
            or not self.ip.isprintable()
            or " " in self.ip
        ):
            raise ValueError("ip must be a short printable ASCII address or name")

    def query(self) -> str:
        """The query string (without ``?``) for this announce."""
        parts = [
            "info_hash=" + _quote(self.info_hash),
            "peer_id=" + _quote(self.peer_id),
            f"port={self.port}",
            f"uploaded={self.uploaded}",
            f"downloaded={self.downloaded}",
            f"left={self.left}",
            "compact=" + ("1" if self.compact else "0"),
        ]
        if self.no_peer_id:
            parts.append("no_peer_id=1")
        if self.event is not Event.NONE:
            parts.append("event=" + self.event.value)
        if self.numwant is not None:
            parts.append(f"numwant={self.numwant}")
        if self.key is not None:
            parts.append("key=" + _quote(self.key))
        if self.ip is not None:
            parts.append("ip=" + _quote(self.ip.encode("ascii")))
        return "&".join(parts)


@dataclass(frozen=True, slots=True)
class Peer:
    """A peer handed out by a tracker: an IP address literal, a port, maybe its peer id."""

    ip: str
    port: int
    peer_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class AnnounceResponse:
    """A successful announce answer."""

    interval: int
    min_interval: int | None = None
    complete: int | None = None
    """Seeders, when the tracker says."""
    incomplete: int | None = None
    """Leechers, when the tracker says."""
    peers: tuple[Peer, ...] = ()
    """IPv4 and IPv6 peers together, in the order the tracker sent them (``peers`` first)."""
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class ScrapeStats:
    """Swarm counters of one infohash (BEP 48)."""

    complete: int = 0
    downloaded: int = 0
    incomplete: int = 0


# --- percent-encoding ------------------------------------------------------------------------

_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _quote(raw: bytes) -> str:
    """Percent-encode every byte except RFC 3986 unreserved characters."""
    return quote_from_bytes(raw, safe="")


def _split_query(query: bytes) -> list[tuple[bytes, bytes]]:
    """Split a raw query string into percent-decoded (key, value) byte pairs, in order."""
    if len(query) > MAX_QUERY_BYTES:
        raise TrackerProtocolError(f"query string longer than {MAX_QUERY_BYTES} bytes")
    if _BAD_PERCENT.search(query):
        raise TrackerProtocolError("malformed percent-encoding in query string")
    pairs: list[tuple[bytes, bytes]] = []
    if not query:
        return pairs
    chunks = query.split(b"&")
    if len(chunks) > MAX_QUERY_PARAMS:
        raise TrackerProtocolError(f"more than {MAX_QUERY_PARAMS} query parameters")
    for chunk in chunks:
        if not chunk:
            continue
        key, _, value = chunk.partition(b"=")
        if b"%" in key or b"+" in key:
            key = _unquote(key)
        if b"%" in value or b"+" in value:
            value = _unquote(value)
        pairs.append((key, value))
    return pairs


def _unquote(raw: bytes) -> bytes:
    """Percent-decode (``+`` is a space); the ``%XX`` syntax was checked by the caller."""
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    escapes = raw.count(b"%")
    if not escapes:
        return raw
    if len(raw) == 3 * escapes:  # every byte escaped, as many clients send binary values
        return binascii.unhexlify(raw.replace(b"%", b""))
    return unquote_to_bytes(raw)


def _uint(name: str, value: bytes, maximum: int) -> int:
    if not value or len(value) > 20 or not value.isdigit():
        raise TrackerProtocolError(f"{name} is not a non-negative integer")
    number = int(value)
    if number > maximum:
        raise TrackerProtocolError(f"{name} is too large")
    return number


def _flag(name: str, value: bytes) -> bool:
    if value == b"1":
        return True
    if value == b"0":
        return False
    raise TrackerProtocolError(f"{name} must be 0 or 1")


# --- client side: requests -------------------------------------------------------------------


def announce_url(base: str, request: AnnounceRequest) -> str:
    """The announce URL for ``request`` on tracker ``base`` (which may carry a query already)."""
    base, hash_mark, fragment = base.partition("#")
    if "?" not in base:
        url = f"{base}?{request.query()}"
    elif base.endswith(("?", "&")):
        url = base + request.query()
    else:
        url = f"{base}&{request.query()}"
    return url + hash_mark + fragment if hash_mark else url


def scrape_url(announce: str) -> str | None:
    """The scrape URL that belongs to an announce URL (BEP 48), or ``None`` if it has none.

    The last path segment must start with ``announce``; that word becomes ``scrape``.
    """
    head, mark, tail = announce.partition("?")
    slash = head.rfind("/")
    if slash < 0 or "://" not in head or slash < head.index("://") + 3:
        return None
    last = head[slash + 1 :]
    if not last.startswith("announce"):
        return None
    return head[: slash + 1] + "scrape" + last[len("announce") :] + mark + tail


def scrape_query(info_hashes: Iterable[bytes]) -> str:
    """The query string for a scrape of the given infohashes (at least one)."""
    hashes = list(info_hashes)
    if not 0 < len(hashes) <= MAX_SCRAPE_HASHES:
        raise ValueError(f"a scrape names 1..{MAX_SCRAPE_HASHES} infohashes")
    for info_hash in hashes:
        if len(info_hash) != 20:
            raise ValueError("info_hash must be 20 bytes")
    return "&".join("info_hash=" + _quote(h) for h in hashes)


# --- client side: answers --------------------------------------------------------------------


def _text(value: bencoding.BValue, name: str) -> str:
    if not isinstance(value, bytes):
        raise TrackerProtocolError(f"{name} is not a string")
    return value[:MAX_TEXT_BYTES].decode("utf-8", errors="replace")


def _int_field(
    doc: Mapping[bytes, bencoding.BValue], key: bytes, maximum: int, *, required: bool = False
) -> int | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise TrackerProtocolError(f"answer lacks {key.decode()!r}")
        return None
    if not isinstance(value, int) or not 0 <= value <= maximum:
        raise TrackerProtocolError(f"{key.decode()!r} is not an integer in 0..{maximum}")
    return value


def unpack_peers(data: bytes, *, ipv6: bool = False) -> list[Peer]:
    """Decode a compact peer string: 6 bytes an IPv4 peer (BEP 23), 18 an IPv6 one (BEP 7).

    Entries with port 0 cannot be connected to and are left out.
    """
    size = _COMPACT6 if ipv6 else _COMPACT4
    if len(data) % size:
        name = "peers6" if ipv6 else "peers"
        raise TrackerProtocolError(f"compact {name} length {len(data)} is not a multiple of {size}")
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    peers: list[Peer] = []
    for offset in range(0, len(data), size):
        port = int.from_bytes(data[offset + size - 2 : offset + size], "big")
        if port:
            peers.append(Peer(socket.inet_ntop(family, data[offset : offset + size - 2]), port))
    return peers


def _dict_peers(items: list[bencoding.BValue], limit: int) -> list[Peer]:
    if len(items) > limit:
        raise TrackerProtocolError(f"more than {limit} peers in the answer")
    peers: list[Peer] = []
    for item in items:
        if not isinstance(item, dict):
            raise TrackerProtocolError("a peer in the list is not a dictionary")
        raw_ip = item.get(b"ip")
        port = item.get(b"port")
        peer_id = item.get(b"peer id")
        if not isinstance(raw_ip, bytes) or not isinstance(port, int):
            raise TrackerProtocolError("a peer in the list lacks ip or port")
        if not 0 <= port <= 65535:
            raise TrackerProtocolError("a peer's port is out of range")
        if peer_id is not None and (not isinstance(peer_id, bytes) or len(peer_id) != 20):
            raise TrackerProtocolError("a peer's peer id is not 20 bytes")
        try:
            ip = str(ipaddress.ip_address(raw_ip.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            raise TrackerProtocolError("a peer's ip is not an IP address") from None
        if port:
            peers.append(Peer(ip, port, peer_id))
    return peers


def parse_announce_response(
    body: bytes,
    *,
    max_size: int = DEFAULT_MAX_RESPONSE_BYTES,
    max_peers: int = DEFAULT_MAX_PEERS,
) -> AnnounceResponse:
    """Parse a tracker's announce answer.

    Raises :class:`TrackerRefusedError` for a ``failure reason`` and
    :class:`TrackerProtocolError` for anything malformed or over the bounds.
    """
    doc = _decode(body, max_size)
    failure = doc.get(b"failure reason")
    if failure is not None:
        raise TrackerRefusedError(_text(failure, "failure reason"))
    interval = _int_field(doc, b"interval", MAX_INTERVAL, required=True)
    assert interval is not None
    warning = doc.get(b"warning message")
    peers: list[Peer] = []
    raw4 = doc.get(b"peers", b"")
    if isinstance(raw4, bytes):
        if len(raw4) > max_peers * _COMPACT4:
            raise TrackerProtocolError(f"more than {max_peers} peers in the answer")
        peers.extend(unpack_peers(raw4))
    elif isinstance(raw4, list):
        peers.extend(_dict_peers(raw4, max_peers))
    else:
        raise TrackerProtocolError("'peers' is neither a string nor a list")
    raw6 = doc.get(b"peers6", b"")
    if not isinstance(raw6, bytes):
        raise TrackerProtocolError("'peers6' is not a string")
    if len(raw6) > (max_peers - len(peers)) * _COMPACT6:
        raise TrackerProtocolError(f"more than {max_peers} peers in the answer")
    peers.extend(unpack_peers(raw6, ipv6=True))
    return AnnounceResponse(
        interval=interval,
        min_interval=_int_field(doc, b"min interval", MAX_INTERVAL),
        complete=_int_field(doc, b"complete", MAX_COUNTER),
        incomplete=_int_field(doc, b"incomplete", MAX_COUNTER),
        peers=tuple(peers),
        warning=None if warning is None else _text(warning, "warning message"),
    )


def parse_scrape_response(
    body: bytes, *, max_size: int = DEFAULT_MAX_RESPONSE_BYTES, max_files: int = 1000
) -> dict[bytes, ScrapeStats]:
    """Parse a scrape answer (BEP 48) into counters per 20-byte infohash."""
    doc = _decode(body, max_size)
    failure = doc.get(b"failure reason")
    if failure is not None:
        raise TrackerRefusedError(_text(failure, "failure reason"))
    files = doc.get(b"files")
    if not isinstance(files, dict):
        raise TrackerProtocolError("scrape answer lacks the 'files' dictionary")
    if len(files) > max_files:
        raise TrackerProtocolError(f"more than {max_files} files in the scrape answer")
    out: dict[bytes, ScrapeStats] = {}
    for info_hash, stats in files.items():
        if len(info_hash) != 20 or not isinstance(stats, dict):
            raise TrackerProtocolError("malformed entry in the scrape answer")
        out[info_hash] = ScrapeStats(
            complete=_int_field(stats, b"complete", MAX_COUNTER) or 0,
            downloaded=_int_field(stats, b"downloaded", MAX_COUNTER) or 0,
            incomplete=_int_field(stats, b"incomplete", MAX_COUNTER) or 0,
        )
    return out


def _decode(body: bytes, max_size: int) -> dict[bytes, bencoding.BValue]:
    if len(body) > max_size:
        raise TrackerProtocolError(f"tracker answer of {len(body)} bytes exceeds {max_size}")
    try:
        return bencoding.decode_dict(body, max_size=max_size, max_depth=6)
    except bencoding.BencodeError as exc:
        raise TrackerProtocolError(f"tracker answer is not bencoded: {exc}") from None


# --- server side: requests -------------------------------------------------------------------

_ANNOUNCE_KEYS = frozenset(
    {
        b"info_hash",
        b"peer_id",
        b"port",
        b"uploaded",
        b"downloaded",
        b"left",
        b"event",
        b"numwant",
        b"compact",
        b"no_peer_id",
        b"key",
        b"ip",
    }
)


def parse_announce_query(query: bytes) -> AnnounceRequest:
    """Read an announce from the raw query string bytes (as they came after ``?``).

    Unknown parameters are ignored; a known one given twice, missing or malformed raises
    :class:`TrackerProtocolError` with a message fit for ``failure reason``. A missing
    ``compact`` means compact (BEP 23 recommends it as the default).
    """
    fields: dict[bytes, bytes] = {}
    for key, value in _split_query(query):
        if key in _ANNOUNCE_KEYS:
            if key in fields:
                raise TrackerProtocolError(f"{key.decode()} given more than once")
            fields[key] = value
    info_hash = fields.get(b"info_hash")
    if info_hash is None:
        raise TrackerProtocolError("missing info_hash")
    if len(info_hash) != 20:
        raise TrackerProtocolError(f"info_hash must be 20 bytes, got {len(info_hash)}")
    peer_id = fields.get(b"peer_id")
    if peer_id is None:
        raise TrackerProtocolError("missing peer_id")
    if len(peer_id) != 20:
        raise TrackerProtocolError(f"peer_id must be 20 bytes, got {len(peer_id)}")
    raw_port = fields.get(b"port")
    if raw_port is None:
        raise TrackerProtocolError("missing port")
    port = _uint("port", raw_port, 65535)
    if port == 0:
        raise TrackerProtocolError("port must be 1..65535")
    counters = []
    for name in (b"uploaded", b"downloaded", b"left"):
        raw = fields.get(name)
        counters.append(0 if raw is None else _uint(name.decode(), raw, MAX_COUNTER))
    raw_event = fields.get(b"event", b"")
    event = _EVENTS.get(raw_event)
    if event is None:
        raise TrackerProtocolError("event must be started, completed, stopped or empty")
    raw_numwant = fields.get(b"numwant")
    raw_compact = fields.get(b"compact")
    raw_no_peer_id = fields.get(b"no_peer_id")
    client_key = fields.get(b"key")
    if client_key is not None and not 0 < len(client_key) <= MAX_KEY_BYTES:
        raise TrackerProtocolError(f"key must be 1..{MAX_KEY_BYTES} bytes")
    raw_ip = fields.get(b"ip")
    ip: str | None = None
    if raw_ip is not None:
        if (
            not 0 < len(raw_ip) <= MAX_IP_PARAM_BYTES
            or not raw_ip.isascii()
            or not raw_ip.decode("ascii").isprintable()
            or b" " in raw_ip
        ):
            raise TrackerProtocolError("ip is not a printable ASCII address or name")
        ip = raw_ip.decode("ascii")
    return AnnounceRequest(
        info_hash=info_hash,
        peer_id=peer_id,
        port=port,
        uploaded=counters[0],
        downloaded=counters[1],
        left=counters[2],
        event=event,
        numwant=None if raw_numwant is None else _uint("numwant", raw_numwant, MAX_NUMWANT),
        compact=True if raw_compact is None else _flag("compact", raw_compact),
        no_peer_id=False if raw_no_peer_id is None else _flag("no_peer_id", raw_no_peer_id),
        key=client_key,
        ip=ip,
    )


def parse_scrape_query(query: bytes, *, max_hashes: int = MAX_SCRAPE_HASHES) -> list[bytes]:
    """Read the ``info_hash`` values of a scrape (BEP 48), duplicates removed, in order.

    A scrape without any ``info_hash`` (a full scrape) is refused: the infohash is a
    capability and the tracker never lists them.
    """
    hashes: dict[bytes, None] = {}
    for key, value in _split_query(query):
        if key != b"info_hash":
            continue
        if len(value) != 20:
            raise TrackerProtocolError(f"info_hash must be 20 bytes, got {len(value)}")
        hashes[value] = None
        if len(hashes) > max_hashes:
            raise TrackerProtocolError(f"more than {max_hashes} info_hash values in one scrape")
    if not hashes:
        raise TrackerProtocolError("scrape needs info_hash: this tracker does not do full scrapes")
    return list(hashes)


# --- server side: answers --------------------------------------------------------------------


def pack_peer(ip: str, port: int) -> bytes:
    """The compact form of one peer: 6 bytes for IPv4, 18 for IPv6.

    An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, as a dual-stack socket reports an
    IPv4 client) packs as IPv4.
    """
    tail = port.to_bytes(2, "big")
    if ":" not in ip:
        try:
            return socket.inet_pton(socket.AF_INET, ip) + tail
        except OSError:
            raise ValueError(f"{ip!r} is not an IP address") from None
    try:
        raw = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
    except OSError:
        raise ValueError(f"{ip!r} is not an IP address") from None
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return raw[12:] + tail
    return raw + tail


def encode_failure(reason: str) -> bytes:
    """A bencoded ``failure reason`` answer."""
    return bencoding.encode({"failure reason": reason[:MAX_TEXT_BYTES]})


def _bstr(raw: bytes) -> bytes:
    return b"%d:%s" % (len(raw), raw)


def encode_compact_announce(
    *,
    interval: int,
    min_interval: int | None,
    complete: int,
    incomplete: int,
    peers4: bytes,
    peers6: bytes,
    warning: str | None = None,
) -> bytes:
    """A compact announce answer from already packed peer strings (the tracker's hot path).

    ``peers4`` is 6-byte entries (BEP 23), ``peers6`` 18-byte entries (BEP 7); ``peers6`` is
    left out when empty. Keys are written in bencoding's sorted order.
    """
    out = b"d8:completei%de10:incompletei%de8:intervali%de" % (complete, incomplete, interval)
    if min_interval is not None:
        out += b"12:min intervali%de" % min_interval
    out += b"5:peers" + _bstr(peers4)
    if peers6:
        out += b"6:peers6" + _bstr(peers6)
    if warning is not None:
        out += b"15:warning message" + _bstr(warning[:MAX_TEXT_BYTES].encode("utf-8"))
    return out + b"e"


def encode_announce_response(
    response: AnnounceResponse, *, compact: bool = True, no_peer_id: bool = False
) -> bytes:
    """Encode an announce answer.

    Compact: IPv4 peers go into ``peers`` and IPv6 peers into ``peers6``, peer ids are
    dropped. Non-compact: one list of ``{ip, port[, peer id]}`` dictionaries for both
    families (BEP 3).
    """
    doc: dict[str, bencoding.EncodableValue] = {"interval": response.interval}
    if response.min_interval is not None:
        doc["min interval"] = response.min_interval
    if response.complete is not None:
        doc["complete"] = response.complete
    if response.incomplete is not None:
        doc["incomplete"] = response.incomplete
    if response.warning is not None:
        doc["warning message"] = response.warning[:MAX_TEXT_BYTES]
    if compact:
        packed = [pack_peer(p.ip, p.port) for p in response.peers]
        doc["peers"] = b"".join(p for p in packed if len(p) == _COMPACT4)
        six = b"".join(p for p in packed if len(p) == _COMPACT6)
        if six:
            doc["peers6"] = six
    else:
        entries: list[bencoding.EncodableValue] = []
        for peer in response.peers:
            entry: dict[str, bencoding.EncodableValue] = {"ip": peer.ip, "port": peer.port}
            if peer.peer_id is not None and not no_peer_id:
                entry["peer id"] = peer.peer_id
            entries.append(entry)
        doc["peers"] = entries
    return bencoding.encode(doc)


def encode_scrape_response(files: Mapping[bytes, ScrapeStats]) -> bytes:
    """A scrape answer (BEP 48): ``files`` maps each 20-byte infohash to its counters."""
    items = files.items()
    return bencoding.encode(
        {
            "files": {
                info_hash: {
                    "complete": stats.complete,
                    "downloaded": stats.downloaded,
                    "incomplete": stats.incomplete,
                }
                for info_hash, stats in items
            }
        }
    )
