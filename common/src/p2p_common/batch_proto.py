"""The batched announce between p2p services: many seeding infohashes in one request.

A p2p extension beside BEP 3 (docs/tracker.md, "Batched announces"): an agent or proxy
seeds every blob in its cache, and announcing each one alone would cost the tracker one
request per blob per interval. Instead the process sends one ``POST`` to
:data:`BATCH_PATH` per tracker naming all of its seeds there, and the tracker answers with
the interval it wants for them (much longer than for downloads: a seed only needs to be
findable) and a heartbeat period. Standard clients keep announcing alone (BEP 3, BEP 15);
downloads of p2p services do too.

Request body: a bencoded dictionary (keys sorted, as bencoding requires)::

    completed  20-byte infohashes, concatenated: seeds that just finished downloading
    ip         optional: the address claimed (honoured only with trustIpParam)
    key        optional, 1-64 bytes: as in BEP 3, keeps the entries when the address changes
    numwant    optional: peers wanted per infohash (default 0: seeds wait for leechers)
    peer id    20 bytes
    port       1-65535, the BitTorrent port
    seeding    infohashes: regular re-announces
    started    infohashes: seeds that start (a restart, or a reseed after one)
    stopped    infohashes: no longer seeded

Every entry is a seed (``left`` 0): a torrent being downloaded announces alone, since it
needs its peers at once and a short interval. At most :data:`MAX_BATCH_HASHES` infohashes
in all, each at most once; unknown keys are ignored. Everything is checked before the
tracker records anything: a malformed batch is refused whole (HTTP 400, ``failure reason``).

Answer (HTTP 200, bencoded): ``interval`` (seconds until these seeds should be announced
again), ``heartbeat`` (seconds between requests, even empty ones, so that the client notices
a lost or restarted tracker), ``instance`` (random bytes that change when the tracker
restarts: its table is empty then and the client announces all its seeds there again),
and, when any, ``peers`` / ``peers6`` (infohash -> compact peers, only for swarms that
have some to give), ``failed`` (infohash -> reason, entries not recorded), ``unlisted``
(entries answered but not remembered because of a cap) with a ``warning message``.

Pure functions, bytes in and values out, like :mod:`p2p_common.tracker_proto`; every
malformed input raises :class:`~p2p_common.tracker_proto.TrackerProtocolError`.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from p2p_common import bencoding
from p2p_common.tracker_proto import (
    MAX_INTERVAL,
    MAX_IP_PARAM_BYTES,
    MAX_KEY_BYTES,
    MAX_TEXT_BYTES,
    Event,
    Peer,
    TrackerProtocolError,
    TrackerRefusedError,
    unpack_peers,
)

__all__ = [
    "BATCH_CONTENT_TYPE",
    "BATCH_PATH",
    "MAX_BATCH_BODY",
    "MAX_BATCH_HASHES",
    "MAX_BATCH_NUMWANT",
    "BatchRequest",
    "BatchResponse",
    "batch_url",
    "encode_batch_request",
    "encode_batch_response",
    "parse_batch_request",
    "parse_batch_response",
]

BATCH_PATH = "/p2p/v1/announce-batch"
"""Where a p2p-tracker takes batched announces (``POST``)."""
BATCH_CONTENT_TYPE = "application/octet-stream"
"""The content type of a request body (bencoded; the answer is ``text/plain`` like any
tracker answer)."""
MAX_BATCH_HASHES = 2000
"""Most infohashes in one batch (all lists together): 40 KB of hashes."""
MAX_BATCH_BODY = 64 * 1024
"""Largest request body a tracker reads (a full batch is about 40 KB)."""
MAX_BATCH_NUMWANT = 50
"""Most peers per infohash in a batch answer."""
MAX_BATCH_ANSWER = 1024 * 1024
"""Largest batch answer the client reads."""
MAX_INSTANCE_BYTES = 32

_LISTS: tuple[tuple[bytes, Event], ...] = (
    (b"started", Event.STARTED),
    (b"completed", Event.COMPLETED),
    (b"seeding", Event.NONE),
    (b"stopped", Event.STOPPED),
)
"""The request's lists of infohashes and the event each stands for."""
_KEY_OF = {event: key for key, event in _LISTS}


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One batched announce: who, and what it seeds (every entry has ``left`` 0)."""

    peer_id: bytes
    port: int
    entries: tuple[tuple[bytes, Event], ...]
    """(infohash, event): ``STARTED``, ``COMPLETED``, ``NONE`` (re-announce) or ``STOPPED``."""
    numwant: int = 0
    """Peers wanted per infohash (the tracker caps it at :data:`MAX_BATCH_NUMWANT`)."""
    key: bytes | None = None
    ip: str | None = None

    def __post_init__(self) -> None:
        if len(self.peer_id) != 20:
            raise ValueError("peer_id must be 20 bytes")
        if not 0 < self.port <= 65535:
            raise ValueError("port must be 1..65535")
        if len(self.entries) > MAX_BATCH_HASHES:
            raise ValueError(f"a batch holds at most {MAX_BATCH_HASHES} infohashes")
        seen: set[bytes] = set()
        for info_hash, event in self.entries:
            if len(info_hash) != 20:
                raise ValueError("info_hash must be 20 bytes")
            if event not in _KEY_OF:
                raise ValueError(f"no batch list for event {event.name}")
            if info_hash in seen:
                raise ValueError("an infohash appears twice in the batch")
            seen.add(info_hash)
        if not 0 <= self.numwant <= 2**31 - 1:
            raise ValueError("numwant must be 0..2**31-1")
        if self.key is not None and not 0 < len(self.key) <= MAX_KEY_BYTES:
            raise ValueError(f"key must be 1..{MAX_KEY_BYTES} bytes")
        if self.ip is not None and (
            not self.ip.isascii() or not _printable_address(self.ip.encode("ascii"))
        ):
            raise ValueError("ip must be a short printable ASCII address or name")


@dataclass(frozen=True, slots=True)
class BatchResponse:
    """A tracker's answer to a batch."""

    interval: int
    """Seconds until the batch's seeds should be announced again."""
    heartbeat: int
    """Seconds between requests to this tracker (an empty batch will do)."""
    instance: bytes
    """Changes when the tracker restarts (and forgets every peer)."""
    peers: dict[bytes, tuple[Peer, ...]] = field(default_factory=dict)
    """Peers per infohash, only for infohashes with some (IPv4 first, then IPv6)."""
    failed: dict[bytes, str] = field(default_factory=dict)
    """Entries the tracker refused (not recorded), with its reason."""
    unlisted: int = 0
    """Entries answered but not remembered because of a cap."""
    warning: str | None = None


def batch_url(announce: str) -> str | None:
    """The batch endpoint of the tracker behind an ``http(s)://`` announce URL (the path
    replaced by :data:`BATCH_PATH`, a query kept), or None for other schemes."""
    parts = urllib.parse.urlsplit(announce)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return urllib.parse.urlunsplit(parts._replace(path=BATCH_PATH, fragment=""))


def _printable_address(raw: bytes) -> bool:
    return (
        0 < len(raw) <= MAX_IP_PARAM_BYTES
        and raw.isascii()
        and raw.decode("ascii").isprintable()
        and b" " not in raw
    )


# --- client side -----------------------------------------------------------------------------


def encode_batch_request(request: BatchRequest) -> bytes:
    """The request body for ``request``."""
    lists: dict[Event, list[bytes]] = {event: [] for _, event in _LISTS}
    for info_hash, event in request.entries:
        lists[event].append(info_hash)
    doc: dict[bytes, bencoding.EncodableValue] = {
        b"peer id": request.peer_id,
        b"port": request.port,
    }
    for key, event in _LISTS:
        if lists[event]:
            doc[key] = b"".join(lists[event])
    if request.numwant:
        doc[b"numwant"] = request.numwant
    if request.key is not None:
        doc[b"key"] = request.key
    if request.ip is not None:
        doc[b"ip"] = request.ip.encode("ascii")
    return bencoding.encode(doc)


def parse_batch_response(body: bytes, *, max_size: int = MAX_BATCH_ANSWER) -> BatchResponse:
    """Read a tracker's answer to a batch (bounded, strict).

    Raises :class:`TrackerRefusedError` for a ``failure reason`` and
    :class:`TrackerProtocolError` for anything malformed.
    """
    doc = _decode(body, max_size, "batch answer")
    failure = doc.get(b"failure reason")
    if failure is not None:
        raise TrackerRefusedError(_text(failure, "failure reason"))
    interval = _int(doc, b"interval", 1, MAX_INTERVAL, required=True)
    heartbeat = _int(doc, b"heartbeat", 1, MAX_INTERVAL, required=True)
    assert interval is not None
    assert heartbeat is not None
    instance = doc.get(b"instance")
    if not isinstance(instance, bytes) or not 0 < len(instance) <= MAX_INSTANCE_BYTES:
        raise TrackerProtocolError(f"'instance' must be 1..{MAX_INSTANCE_BYTES} bytes")
    peers: dict[bytes, list[Peer]] = {}
    for name, ipv6 in ((b"peers", False), (b"peers6", True)):
        for info_hash, packed in _hash_dict(doc, name).items():
            if not isinstance(packed, bytes):
                raise TrackerProtocolError(f"a value of {name.decode()!r} is not a string")
            peers.setdefault(info_hash, []).extend(unpack_peers(packed, ipv6=ipv6))
    failed = {
        info_hash: _text(reason, "a failure reason")
        for info_hash, reason in _hash_dict(doc, b"failed").items()
    }
    warning = doc.get(b"warning message")
    return BatchResponse(
        interval=interval,
        heartbeat=heartbeat,
        instance=instance,
        peers={h: tuple(p) for h, p in peers.items()},
        failed=failed,
        unlisted=_int(doc, b"unlisted", 0, 2**63 - 1) or 0,
        warning=None if warning is None else _text(warning, "warning message"),
    )


# --- server side -----------------------------------------------------------------------------


def parse_batch_request(body: bytes) -> BatchRequest:
    """Read a batch request body; :class:`TrackerProtocolError` (fit for a ``failure
    reason``) for anything malformed or beyond the bounds. Nothing of a refused body may
    be used."""
    doc = _decode(body, MAX_BATCH_BODY, "batch request")
    peer_id = doc.get(b"peer id")
    if not isinstance(peer_id, bytes) or len(peer_id) != 20:
        raise TrackerProtocolError("'peer id' must be 20 bytes")
    port = _int(doc, b"port", 1, 65535, required=True)
    assert port is not None
    numwant = _int(doc, b"numwant", 0, 2**31 - 1) or 0
    key = doc.get(b"key")
    if key is not None and (not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES):
        raise TrackerProtocolError(f"'key' must be 1..{MAX_KEY_BYTES} bytes")
    raw_ip = doc.get(b"ip")
    ip = None
    if raw_ip is not None:
        if not isinstance(raw_ip, bytes) or not _printable_address(raw_ip):
            raise TrackerProtocolError("'ip' is not a printable ASCII address or name")
        ip = raw_ip.decode("ascii")
    entries: list[tuple[bytes, Event]] = []
    total = 0
    for name, event in _LISTS:
        raw = doc.get(name)
        if raw is None:
            continue
        if not isinstance(raw, bytes) or len(raw) % 20:
            raise TrackerProtocolError(f"'{name.decode()}' is not a string of 20-byte infohashes")
        total += len(raw) // 20
        if total > MAX_BATCH_HASHES:
            raise TrackerProtocolError(f"more than {MAX_BATCH_HASHES} infohashes in one batch")
        entries.extend((raw[at : at + 20], event) for at in range(0, len(raw), 20))
    if len({info_hash for info_hash, _ in entries}) != len(entries):
        raise TrackerProtocolError("an infohash appears more than once in the batch")
    return BatchRequest(
        peer_id=peer_id, port=port, entries=tuple(entries), numwant=numwant, key=key, ip=ip
    )


def _bstr(raw: bytes) -> bytes:
    return b"%d:%s" % (len(raw), raw)


def _hash_table(table: Mapping[bytes, bytes]) -> bytes:
    return b"d" + b"".join(_bstr(h) + _bstr(table[h]) for h in sorted(table)) + b"e"


def encode_batch_response(
    *,
    interval: int,
    heartbeat: int,
    instance: bytes,
    peers4: Mapping[bytes, bytes] | None = None,
    peers6: Mapping[bytes, bytes] | None = None,
    failed: Mapping[bytes, str] | None = None,
    unlisted: int = 0,
    warning: str | None = None,
) -> bytes:
    """A batch answer from compact peer strings per infohash (6 bytes per IPv4 peer,
    18 per IPv6 peer); empty tables are left out. Keys in bencoding's sorted order."""
    out = [b"d"]
    if failed:
        out.append(
            b"6:failed"
            + _hash_table({h: r[:MAX_TEXT_BYTES].encode("utf-8") for h, r in failed.items()})
        )
    out.append(
        b"9:heartbeati%de8:instance%s8:intervali%de" % (heartbeat, _bstr(instance), interval)
    )
    if peers4:
        out.append(b"5:peers" + _hash_table(peers4))
    if peers6:
        out.append(b"6:peers6" + _hash_table(peers6))
    if unlisted:
        out.append(b"8:unlistedi%de" % unlisted)
    if warning is not None:
        out.append(b"15:warning message" + _bstr(warning[:MAX_TEXT_BYTES].encode("utf-8")))
    out.append(b"e")
    return b"".join(out)


# --- helpers ---------------------------------------------------------------------------------


def _decode(body: bytes, max_size: int, what: str) -> dict[bytes, bencoding.BValue]:
    if len(body) > max_size:
        raise TrackerProtocolError(f"{what} of {len(body)} bytes exceeds {max_size}")
    try:
        return bencoding.decode_dict(body, max_size=max_size, max_depth=3)
    except bencoding.BencodeError as exc:
        raise TrackerProtocolError(f"{what} is not bencoded: {exc}") from None


def _int(
    doc: Mapping[bytes, bencoding.BValue],
    key: bytes,
    low: int,
    high: int,
    *,
    required: bool = False,
) -> int | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise TrackerProtocolError(f"missing '{key.decode()}'")
        return None
    if not isinstance(value, int) or not low <= value <= high:
        raise TrackerProtocolError(f"'{key.decode()}' must be an integer in {low}..{high}")
    return value


def _hash_dict(doc: Mapping[bytes, bencoding.BValue], key: bytes) -> dict[bytes, bencoding.BValue]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise TrackerProtocolError(f"'{key.decode()}' is not a dictionary")
    if len(value) > MAX_BATCH_HASHES:
        raise TrackerProtocolError(f"more than {MAX_BATCH_HASHES} entries in '{key.decode()}'")
    for info_hash in value:
        if len(info_hash) != 20:
            raise TrackerProtocolError(f"a key of '{key.decode()}' is not a 20-byte infohash")
    return value


def _text(value: bencoding.BValue, name: str) -> str:
    if not isinstance(value, bytes):
        raise TrackerProtocolError(f"{name} is not a string")
    return value[:MAX_TEXT_BYTES].decode("utf-8", errors="replace")
