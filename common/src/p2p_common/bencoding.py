"""Strict, bounded bencoding (BEP 3) behind a small facade over bencode.py.

Decoding accepts only the canonical encoding: integers without leading zeros or
signs other than a single ``-``, strings with plain decimal lengths, dictionaries
with byte-string keys in strictly ascending order and no duplicates, nothing
after the value. Canonical input re-encodes to exactly the same bytes, so an
infohash computed from the re-encoded ``info`` dictionary equals the SHA-1 of the
bytes on the wire. Input is bounded in size and nesting depth before it reaches
the parser. Every failure raises :class:`BencodeError`, a remote error: the
bytes came from somebody else.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import TypeAlias

import bencodepy

from p2p_common.errors import ProtocolError

BValue: TypeAlias = "int | bytes | list[BValue] | dict[bytes, BValue]"
"""A decoded value: integers, byte strings, lists and dictionaries with byte keys."""

DEFAULT_MAX_SIZE = 4 * 1024 * 1024
"""Largest document :func:`decode` accepts unless told otherwise (4 MiB)."""

DEFAULT_MAX_DEPTH = 16
"""Deepest nesting :func:`decode` accepts unless told otherwise."""


class BencodeError(ProtocolError):
    """Malformed, non-canonical or oversized bencoded data."""


_INTEGER = re.compile(rb"-?[1-9][0-9]*|0")
_LENGTH = re.compile(rb"[1-9][0-9]*|0")


class _StrictDecoder(bencodepy.BencodeDecoder):  # type: ignore[misc]
    """bencode.py reads integers and string lengths with ``int()``, which accepts spaces,
    ``+`` and ``_``, and a negative string length moves it backwards (``d1:ai1e-6:``
    loops forever). Only plain decimal digits are accepted here."""

    def decode_int(self, x: bytes, f: int, **kwargs: object) -> tuple[int, int]:
        end = x.index(b"e", f + 1)
        if not _INTEGER.fullmatch(x, f + 1, end):
            raise ValueError("not a canonical integer")
        return int(x[f + 1 : end]), end + 1

    def decode_string(self, x: bytes, f: int, **kwargs: object) -> tuple[bytes, int]:
        colon = x.index(b":", f)
        if not _LENGTH.fullmatch(x, f, colon):
            raise ValueError("not a canonical string length")
        start = colon + 1
        end = start + int(x[f:colon])
        return x[start:end], end


@functools.lru_cache(maxsize=8)
def _decoder(max_depth: int) -> bencodepy.BencodeDecoder:
    # bencode.py counts the outermost container as depth 0.
    return _StrictDecoder(max_depth=max_depth - 1)


_ENCODER = bencodepy.BencodeEncoder()


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
    canonical: bool = True,
) -> BValue:
    """Decode one bencoded value that spans all of ``data``.

    With ``canonical=False`` the value must still be well formed and bounded, but
    dictionary key order and duplicate keys are tolerated (last one wins). Use it only
    for documents from foreign software whose exact bytes are never hashed, such as
    another client's extension handshake.
    """
    raw = bytes(data)
    if len(raw) > max_size:
        raise BencodeError(f"bencoded document of {len(raw)} bytes exceeds the limit of {max_size}")
    if not raw:
        raise BencodeError("empty bencoded document")
    try:
        value = _decoder(max_depth).decode(raw)
    except bencodepy.BencodeDecodeError as exc:
        raise BencodeError(f"invalid bencoding: {exc}") from None
    except Exception as exc:  # the parser's own failure modes are not part of its API
        raise BencodeError(f"invalid bencoding: {type(exc).__name__}") from None
    if not canonical:
        return value  # type: ignore[no-any-return]
    try:
        reencoded = _ENCODER.encode(value)
    except Exception as exc:  # pragma: no cover - whatever decodes must re-encode
        raise BencodeError(f"invalid bencoding: {type(exc).__name__}") from None
    if reencoded != raw:
        raise BencodeError(
            "bencoding is not canonical (unsorted or duplicate keys, or padded numbers)"
        )
    return value  # type: ignore[no-any-return]


def decode_dict(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
    canonical: bool = True,
) -> dict[bytes, BValue]:
    """Decode a document whose top-level value must be a dictionary."""
    value = decode(data, max_size=max_size, max_depth=max_depth, canonical=canonical)
    if not isinstance(value, dict):
        raise BencodeError(f"expected a bencoded dictionary, got {type(value).__name__}")
    return value


EncodableValue: TypeAlias = (
    "int | bytes | str | Sequence[EncodableValue]"
    " | Mapping[bytes, EncodableValue] | Mapping[str, EncodableValue]"
)


def _normalise(value: EncodableValue, depth: int) -> BValue:
    if depth > DEFAULT_MAX_DEPTH * 4:
        raise ValueError("value nests too deeply to encode")
    if isinstance(value, bool):
        raise TypeError("booleans have no bencoding; use 0 or 1")
    if isinstance(value, int):
        return int(value)  # bencode.py dispatches on the exact type: no IntEnum
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, Mapping):
        out: dict[bytes, BValue] = {}
        for key, item in value.items():
            bkey = key.encode("utf-8") if isinstance(key, str) else key
            if not isinstance(bkey, bytes):
                raise TypeError(f"dictionary keys must be bytes or str, not {type(key).__name__}")
            if bkey in out:
                raise ValueError(f"duplicate dictionary key {bkey!r}")
            out[bkey] = _normalise(item, depth + 1)
        return out
    if isinstance(value, Sequence):
        return [_normalise(item, depth + 1) for item in value]
    raise TypeError(f"cannot bencode a {type(value).__name__}")


def encode(value: EncodableValue) -> bytes:
    """Encode ``value`` canonically (dictionary keys sorted bytewise).

    ``str`` is encoded as UTF-8; booleans, floats and None are refused.
    """
    return bytes(_ENCODER.encode(_normalise(value, 0)))
