"""What the origin client hands back, and how origin answers become registry errors.

Pure helpers of :mod:`p2p_proxy.origin.client` and :mod:`p2p_proxy.origin.auth`: the
response types, header parsing, bounded body reads, and the mapping of origin statuses and
transport failures to :class:`~p2p_common.oci.OCIError`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import httpx

from p2p_common.oci import ErrorCode, OCIError, is_valid_digest, known_code, parse_error_body

T = TypeVar("T")

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""Largest manifest accepted from an origin (distribution's own limit)."""
MAX_REDIRECTS = 5
ERROR_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True)
class ManifestResponse:
    """A manifest (or index) from the origin.

    ``headers`` has lowercase names (repeated headers joined with ``, ``). ``digest`` is
    the verified digest of ``body`` for a GET, the origin's ``Docker-Content-Digest`` for
    a HEAD (``None`` if it sent none). ``body`` is empty for a HEAD.
    """

    status: int
    headers: Mapping[str, str]
    content_type: str
    digest: str | None
    size: int | None
    body: bytes


@dataclass(frozen=True)
class BlobHead:
    """The head of a blob response.

    ``status`` is 200, or 206 for a range; ``size`` is this response's Content-Length;
    ``content_range`` is ``(first, last, total)`` for a 206 (``total`` ``None`` if unknown).
    """

    status: int
    headers: Mapping[str, str]
    size: int | None
    digest: str | None
    content_type: str
    content_range: tuple[int, int, int | None] | None = None


@dataclass(frozen=True)
class ListingResponse:
    """A tag list or a referrers index from the origin (OCI distribution 1.1).

    ``links`` are the origin's ``Link`` header lines as sent (the caller rewrites the next-page
    link for its own clients); ``filters_applied`` is its ``OCI-Filters-Applied``.
    """

    status: int
    content_type: str
    links: list[str]
    filters_applied: str | None
    body: bytes


BlobConsumer = Callable[[BlobHead, AsyncIterator[bytes]], Awaitable[T]]
"""Receives the head and the body chunks of a blob GET; what it returns is returned."""


def header_dict(headers: httpx.Headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def content_length(headers: httpx.Headers) -> int | None:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() and len(value) <= 19 else None


def header_digest(headers: httpx.Headers) -> str | None:
    value = headers.get("docker-content-digest", "").strip()
    return value if is_valid_digest(value) else None


def parse_content_range(value: str) -> tuple[int, int, int | None] | None:
    """``bytes 0-99/1000`` -> ``(0, 99, 1000)``; ``None`` if malformed."""
    unit, _, spec = value.strip().partition(" ")
    span, _, total = spec.partition("/")
    first, _, last = span.partition("-")
    if unit.lower() != "bytes" or not first.isdigit() or not last.isdigit():
        return None
    if total != "*" and not total.isdigit():
        return None
    start, end = int(first), int(last)
    size = None if total == "*" else int(total)
    if end < start or (size is not None and end >= size):
        return None
    return start, end, size


async def aclose_iterator(iterator: AsyncIterator[bytes]) -> None:
    """Close an async generator we stopped early (httpx types it as a plain iterator)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def failure(message: str, status: int = 502) -> OCIError:
    return OCIError(ErrorCode.UNKNOWN, message, status=status)


def reason(exc: BaseException) -> str:
    """The most telling message in an exception's cause chain (TLS problems first)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:
        if isinstance(item, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed ({item.verify_message})"
        if isinstance(item, ssl.SSLError):
            return f"TLS failed ({item.reason or item})"
    for item in chain:
        if str(item):
            return str(item).splitlines()[0][:200]
    return type(exc).__name__


def transport_failure(exc: httpx.HTTPError, what: str) -> OCIError:
    if isinstance(exc, httpx.TimeoutException):
        return failure(f"{what} timed out", 504)
    return failure(f"{what} unreachable: {reason(exc)}")


async def read_bounded(response: httpx.Response, limit: int, what: str) -> bytes:
    parts: list[bytes] = []
    total = 0
    body = response.aiter_bytes()
    try:
        async for chunk in body:
            total += len(chunk)
            if total > limit:
                raise failure(f"origin {what} larger than {limit} bytes")
            parts.append(chunk)
    except httpx.HTTPError as exc:
        raise transport_failure(exc, f"origin (while reading a {what})") from None
    finally:
        await aclose_iterator(body)
    return b"".join(parts)


async def raise_for_status_streamed(
    response: httpx.Response, kind: Literal["manifest", "blob"]
) -> None:
    if response.status_code < 300:
        return
    body = b""
    if response.request.method != "HEAD":
        try:
            body = await read_bounded(response, ERROR_BODY_LIMIT, "error body")
        except OCIError:
            body = b""
    raise_for_status(response, kind, body)


def raise_for_status(
    response: httpx.Response, kind: Literal["manifest", "blob"], body: bytes
) -> None:
    status = response.status_code
    if status < 300:
        return
    code = known_code(parse_error_body(body))
    if status == 404:
        if code not in (
            ErrorCode.NAME_UNKNOWN,
            ErrorCode.MANIFEST_UNKNOWN,
            ErrorCode.BLOB_UNKNOWN,
        ):
            code = ErrorCode.MANIFEST_UNKNOWN if kind == "manifest" else ErrorCode.BLOB_UNKNOWN
        raise OCIError(code)
    if status == 403:
        raise OCIError(ErrorCode.DENIED)
    if status == 401:
        raise OCIError(ErrorCode.UNAUTHORIZED)
    if status == 429:
        retry_after = response.headers.get("retry-after", "")
        headers = {"Retry-After": retry_after} if retry_after.isdigit() else {}
        raise OCIError(ErrorCode.TOOMANYREQUESTS, headers=headers)
    if status == 416:
        raise OCIError(ErrorCode.RANGE_INVALID)
    if status == 405:
        raise OCIError(ErrorCode.UNSUPPORTED)
    if status == 400 and code in (
        ErrorCode.NAME_INVALID,
        ErrorCode.DIGEST_INVALID,
        ErrorCode.TAG_INVALID,
        ErrorCode.MANIFEST_INVALID,
    ):
        raise OCIError(code)
    if 300 <= status < 400:
        raise failure(f"origin redirected a {kind} request ({status})")
    raise failure(f"origin answered {status}")


def raise_for_listing(
    response: httpx.Response, kind: Literal["tags", "referrers"], body: bytes
) -> None:
    """The registry error for a listing the origin refused: its 4xx passes on with its code
    (the client must see a 404 as a 404: without the referrers API a registry answers 404, and
    clients then use the tag schema), anything else is the origin's failure."""
    status = response.status_code
    if status < 300:
        return
    code = known_code(parse_error_body(body))
    if status == 404:
        fallback = ErrorCode.NAME_UNKNOWN if kind == "tags" else ErrorCode.UNSUPPORTED
        message = None
        if kind == "referrers" and code is None:
            message = "the registry does not offer the referrers API (use the tag schema)"
        raise OCIError(code or fallback, message, status=404)
    if status in (401, 403, 429, 405):
        raise_for_status(response, "manifest", body)
    if status == 400:
        entries = parse_error_body(body)
        message = entries[0].message if entries else "the registry refused the listing request"
        raise OCIError(code or ErrorCode.UNSUPPORTED, message or None, status=400)
    raise_for_status(response, "manifest", body)
