"""The proxy's HTTP API, pure parts: credentials, registry selection, query parameters.

No I/O here; :mod:`p2p_proxy.app` calls these and turns their :class:`OCIError` into
registry error responses. See docs/proxy-api.md for the API itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from p2p_common.oci import ErrorCode, OCIError, validate_digest, validate_name
from p2p_common.ranges import MAX_RANGE_HEADER, ByteRange, RangeNotSatisfiableError, parse_range
from p2p_common.registry_auth import AuthSyntaxError, Credentials, parse_basic_authorization

__all__ = [
    "METAINFO_PATH",
    "blob_digest",
    "credentials_from",
    "metainfo_query",
    "requested_range",
    "select_registry",
]

METAINFO_PATH = "/p2p/v1/metainfo"


def credentials_from(headers: Mapping[str, list[str]]) -> Credentials | None:
    """The caller's Basic credentials (``None``: anonymous). Anything else is 401."""
    values = headers.get("authorization", [])
    if not values:
        return None
    if len(values) > 1:
        raise OCIError(ErrorCode.UNAUTHORIZED, "more than one Authorization header")
    try:
        return parse_basic_authorization(values[0])
    except AuthSyntaxError as exc:
        # The message describes the syntax problem, never the credentials themselves.
        raise OCIError(ErrorCode.UNAUTHORIZED, f"unusable Authorization header: {exc}") from None


def select_registry(query: Mapping[str, list[str]], served: Sequence[str]) -> str:
    """The registry (host[:port], as in ``served``) a request is for.

    No ``ns`` parameter means the first served registry. Any ``ns`` that is not one of
    ``served`` (compared case-insensitively) is ``NAME_UNKNOWN`` 404.
    """
    values = query.get("ns")
    if values is None:
        return served[0]
    wanted = {value.strip().lower() for value in values}
    if len(wanted) == 1:
        (name,) = wanted
        for candidate in served:
            if candidate.lower() == name:
                return candidate
    raise OCIError(ErrorCode.NAME_UNKNOWN, "registry not served by this proxy")


def _single(query: Mapping[str, list[str]], key: str, code: ErrorCode) -> str:
    values = query.get(key)
    if not values or not values[0]:
        raise OCIError(code, f"the {key} query parameter is required")
    if len(values) > 1:
        raise OCIError(code, f"the {key} query parameter is given more than once")
    return values[0]


def blob_digest(digest: str) -> str:
    """A digest the proxy can cache and seed: valid, and sha256."""
    digest = validate_digest(digest)
    if not digest.startswith("sha256:"):
        raise OCIError(ErrorCode.DIGEST_INVALID, "only sha256 blobs are served by the proxy")
    return digest


def metainfo_query(query: Mapping[str, list[str]]) -> tuple[str, str]:
    """(repository, digest) of a ``/p2p/v1/metainfo`` request, validated."""
    name = validate_name(_single(query, "name", ErrorCode.NAME_INVALID))
    digest = blob_digest(_single(query, "digest", ErrorCode.DIGEST_INVALID))
    return name, digest


_OPEN_RANGE = re.compile(r"^bytes[ \t]*=[ \t]*(\d{1,19})[ \t]*-[ \t]*\Z", re.IGNORECASE | re.ASCII)


def requested_range(header: str | None, size: int) -> ByteRange | None:
    """The byte range of a blob GET; ``None`` (the whole blob) without a usable ``Range``.

    Raises ``RANGE_INVALID`` (416, with ``Content-Range: bytes */size``) for a range that
    lies outside the blob. ``p2p_common.ranges.parse_range`` ignores an open range that
    starts at or after the end (``bytes=<size>-``) instead of refusing it; refused here.
    """
    try:
        wanted = parse_range(header, size)
        if wanted is None and header is not None and len(header) <= MAX_RANGE_HEADER:
            match = _OPEN_RANGE.match(header)
            if match and int(match.group(1)) >= size:
                raise RangeNotSatisfiableError(f"range {header!r} starts beyond {size} bytes")
    except RangeNotSatisfiableError as exc:
        raise OCIError(
            ErrorCode.RANGE_INVALID, str(exc), headers={"Content-Range": f"bytes */{size}"}
        ) from None
    return wanted
