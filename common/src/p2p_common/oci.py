"""OCI distribution helpers: names, tags, digests, media types, error bodies, Accept headers.

Pure: no I/O, no trio. Validation follows the OCI distribution specification:

- a repository name is ``/``-separated components matching
  ``[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*``, at most :data:`MAX_NAME_LENGTH` characters;
- a tag matches ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``;
- a digest is ``sha256:`` + 64 or ``sha512:`` + 128 lowercase hex digits (no other
  algorithm is accepted: we must be able to verify what we serve).

Anything else (``..``, percent-encoding, empty components, backslashes, upper case,
NUL) is refused with an :class:`OCIError` a service turns into the registry's JSON error
response: ``{"errors": [{"code", "message", "detail"}]}``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

from p2p_common.errors import P2PError

# --- media types --------------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
"""Single-platform image manifests."""
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
"""Multi-platform indexes (OCI image index, Docker manifest list)."""
ALL_MANIFEST_MEDIA_TYPES = MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES

DEFAULT_MANIFEST_ACCEPT = ", ".join(
    [OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST]
)
"""What to ask an origin for when the client sent no Accept header."""


def base_media_type(content_type: str) -> str:
    """``"Application/X+JSON; charset=utf-8"`` -> ``"application/x+json"``."""
    return content_type.split(";", 1)[0].strip().lower()


def is_manifest_media_type(content_type: str) -> bool:
    return base_media_type(content_type) in MANIFEST_MEDIA_TYPES


def is_index_media_type(content_type: str) -> bool:
    return base_media_type(content_type) in INDEX_MEDIA_TYPES


# --- errors -------------------------------------------------------------------------------------


class ErrorCode(enum.StrEnum):
    """Registry error codes: the OCI distribution spec's, plus UNKNOWN and RANGE_INVALID."""

    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    BLOB_UPLOAD_INVALID = "BLOB_UPLOAD_INVALID"
    BLOB_UPLOAD_UNKNOWN = "BLOB_UPLOAD_UNKNOWN"
    DIGEST_INVALID = "DIGEST_INVALID"
    MANIFEST_BLOB_UNKNOWN = "MANIFEST_BLOB_UNKNOWN"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    NAME_INVALID = "NAME_INVALID"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    SIZE_INVALID = "SIZE_INVALID"
    TAG_INVALID = "TAG_INVALID"
    UNAUTHORIZED = "UNAUTHORIZED"
    DENIED = "DENIED"
    UNSUPPORTED = "UNSUPPORTED"
    TOOMANYREQUESTS = "TOOMANYREQUESTS"
    RANGE_INVALID = "RANGE_INVALID"
    UNKNOWN = "UNKNOWN"

    @property
    def status(self) -> int:
        """The HTTP status this code is normally sent with."""
        return _STATUS[self]

    @property
    def default_message(self) -> str:
        return _MESSAGE[self]


_STATUS: Mapping[ErrorCode, int] = {
    ErrorCode.BLOB_UNKNOWN: 404,
    ErrorCode.BLOB_UPLOAD_INVALID: 400,
    ErrorCode.BLOB_UPLOAD_UNKNOWN: 404,
    ErrorCode.DIGEST_INVALID: 400,
    ErrorCode.MANIFEST_BLOB_UNKNOWN: 404,
    ErrorCode.MANIFEST_INVALID: 400,
    ErrorCode.MANIFEST_UNKNOWN: 404,
    ErrorCode.NAME_INVALID: 400,
    ErrorCode.NAME_UNKNOWN: 404,
    ErrorCode.SIZE_INVALID: 400,
    ErrorCode.TAG_INVALID: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.DENIED: 403,
    ErrorCode.UNSUPPORTED: 405,
    ErrorCode.TOOMANYREQUESTS: 429,
    ErrorCode.RANGE_INVALID: 416,
    ErrorCode.UNKNOWN: 500,
}

_MESSAGE: Mapping[ErrorCode, str] = {
    ErrorCode.BLOB_UNKNOWN: "blob unknown to registry",
    ErrorCode.BLOB_UPLOAD_INVALID: "blob upload invalid",
    ErrorCode.BLOB_UPLOAD_UNKNOWN: "blob upload unknown to registry",
    ErrorCode.DIGEST_INVALID: "provided digest did not match uploaded content",
    ErrorCode.MANIFEST_BLOB_UNKNOWN: "manifest references a blob unknown to registry",
    ErrorCode.MANIFEST_INVALID: "manifest invalid",
    ErrorCode.MANIFEST_UNKNOWN: "manifest unknown",
    ErrorCode.NAME_INVALID: "invalid repository name",
    ErrorCode.NAME_UNKNOWN: "repository name not known to registry",
    ErrorCode.SIZE_INVALID: "provided length did not match content length",
    ErrorCode.TAG_INVALID: "invalid tag",
    ErrorCode.UNAUTHORIZED: "authentication required",
    ErrorCode.DENIED: "requested access to the resource is denied",
    ErrorCode.UNSUPPORTED: "the operation is unsupported",
    ErrorCode.TOOMANYREQUESTS: "too many requests",
    ErrorCode.RANGE_INVALID: "invalid content range",
    ErrorCode.UNKNOWN: "unknown error",
}


def error_body(code: ErrorCode, message: str | None = None, detail: object = None) -> bytes:
    """The JSON body of a registry error response with one error."""
    entry = {"code": str(code), "message": message or code.default_message, "detail": detail}
    return json.dumps({"errors": [entry]}, default=str, separators=(",", ":")).encode()


class OCIError(P2PError):
    """A registry error to answer a client with: code, HTTP status, message, detail, headers.

    ``status`` defaults to the code's status; ``UNKNOWN`` may carry any 5xx (502 when the
    origin failed, 504 when it timed out). ``headers`` are extra response headers (a
    ``WWW-Authenticate`` challenge, ``Retry-After``). The message must never contain
    credentials: it is sent to the client and logged.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        status: int | None = None,
        detail: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.code = code
        self.message = message or code.default_message
        self.status = code.status if status is None else status
        if not 400 <= self.status <= 599:
            raise ValueError(f"an error status must be 4xx or 5xx, not {self.status}")
        if code is ErrorCode.UNKNOWN and self.status < 500:
            raise ValueError("UNKNOWN errors are 5xx")
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(f"{code} ({self.status}): {self.message}")

    def copy(self) -> OCIError:
        """A fresh exception with the same content, for one more task to raise (one instance
        must not be raised by many tasks)."""
        return OCIError(
            self.code, self.message, status=self.status, detail=self.detail, headers=self.headers
        )

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)

    def response_headers(self) -> dict[str, str]:
        """Content-Type plus the extra headers."""
        return {"Content-Type": "application/json; charset=utf-8", **self.headers}


class ErrorEntry(NamedTuple):
    code: str
    message: str


MAX_ERROR_BODY = 64 * 1024


def parse_error_body(body: bytes) -> list[ErrorEntry]:
    """The (code, message) pairs of a registry error body; ``[]`` for anything else.

    Bounded: bodies larger than :data:`MAX_ERROR_BODY` and more than 16 entries are ignored.
    """
    if len(body) > MAX_ERROR_BODY:
        return []
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("errors"), list):
        return []
    found = []
    for item in doc["errors"][:16]:
        if isinstance(item, dict) and isinstance(item.get("code"), str):
            message = item.get("message")
            found.append(
                ErrorEntry(item["code"][:64], message[:512] if isinstance(message, str) else "")
            )
    return found


def known_code(entries: Iterable[ErrorEntry]) -> ErrorCode | None:
    """The first entry whose code is a known :class:`ErrorCode`."""
    for entry in entries:
        try:
            return ErrorCode(entry.code)
        except ValueError:
            continue
    return None


# --- names, tags, digests -----------------------------------------------------------------------

MAX_NAME_LENGTH = 255
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_HEX = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}


def is_valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _NAME_RE.fullmatch(name) is not None


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name; raise ``NAME_INVALID`` otherwise."""
    if is_valid_name(name):
        return name
    if len(name) > MAX_NAME_LENGTH:
        problem = f"longer than {MAX_NAME_LENGTH} characters"
    elif "\\" in name or "%" in name or ".." in name or name.startswith("/") or "//" in name:
        problem = "path traversal or encoded characters"
    elif name == "" or name.endswith("/"):
        problem = "empty path component"
    else:
        problem = "not lowercase alphanumeric components separated by . _ __ - or /"
    raise OCIError(ErrorCode.NAME_INVALID, f"invalid repository name: {problem}")


def is_valid_tag(tag: str) -> bool:
    return _TAG_RE.fullmatch(tag) is not None


def validate_tag(tag: str) -> str:
    if is_valid_tag(tag):
        return tag
    raise OCIError(ErrorCode.TAG_INVALID, "invalid tag")


class Digest(NamedTuple):
    """A validated content digest."""

    algorithm: Literal["sha256", "sha512"]
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def is_valid_digest(digest: str) -> bool:
    algorithm, colon, hexpart = digest.partition(":")
    pattern = _DIGEST_HEX.get(algorithm)
    return bool(colon) and pattern is not None and pattern.fullmatch(hexpart) is not None


def parse_digest(digest: str) -> Digest:
    """Parse ``sha256:<64 hex>`` or ``sha512:<128 hex>``; raise ``DIGEST_INVALID`` otherwise."""
    if not is_valid_digest(digest):
        raise OCIError(
            ErrorCode.DIGEST_INVALID,
            "invalid digest: expected sha256:<64 hex> or sha512:<128 hex>, lowercase",
        )
    algorithm, _, hexpart = digest.partition(":")
    return Digest("sha256" if algorithm == "sha256" else "sha512", hexpart)


def validate_digest(digest: str) -> str:
    return str(parse_digest(digest))


def compute_digest(data: bytes, algorithm: Literal["sha256", "sha512"] = "sha256") -> str:
    """The digest of ``data`` (for small things such as manifests)."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def is_digest_reference(reference: str) -> bool:
    """Whether a manifest reference is meant as a digest (tags never contain ``:``)."""
    return ":" in reference


def validate_reference(reference: str) -> str:
    """A manifest reference: a valid tag or a valid digest."""
    if is_digest_reference(reference):
        return validate_digest(reference)
    return validate_tag(reference)


# --- request paths ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiRoute:
    """A parsed ``/v2/...`` request path.

    ``kind`` is ``ping`` (``/v2/``), ``manifest`` (``/v2/<name>/manifests/<reference>``),
    ``blob`` (``/v2/<name>/blobs/<digest>``), ``tags`` (``/v2/<name>/tags/list``) or
    ``referrers`` (``/v2/<name>/referrers/<digest>``, OCI distribution 1.1).
    """

    kind: Literal["ping", "manifest", "blob", "tags", "referrers"]
    name: str = ""
    reference: str = ""


MAX_PATH_LENGTH = 1024


def parse_api_path(path: str) -> ApiRoute:
    """Parse a raw (still percent-encoded) request path, without its query string.

    Refuses, before any routing, what a valid path never contains: percent-encoding,
    backslashes, ``..`` and ``.`` segments, empty segments, control characters. Raises
    :class:`OCIError` (``NAME_INVALID``, ``DIGEST_INVALID``, ``TAG_INVALID``, or
    ``UNSUPPORTED`` for a path that is not part of the pull API).
    """
    if path in ("/v2", "/v2/"):
        return ApiRoute("ping")
    if len(path) > MAX_PATH_LENGTH or not path.startswith("/v2/"):
        raise OCIError(ErrorCode.UNSUPPORTED, "not a registry API path", status=404)
    rest = path[len("/v2/") :]
    if any(c in rest for c in "%\\?#") or any(ord(c) < 0x21 or ord(c) > 0x7E for c in rest):
        raise OCIError(ErrorCode.NAME_INVALID, "invalid characters in the request path")
    segments = rest.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise OCIError(ErrorCode.NAME_INVALID, "empty, . or .. segment in the request path")
    if len(segments) >= 3 and segments[-2:] == ["tags", "list"]:
        return ApiRoute("tags", validate_name("/".join(segments[:-2])))
    if len(segments) >= 3 and segments[-2] == "manifests":
        name = validate_name("/".join(segments[:-2]))
        return ApiRoute("manifest", name, validate_reference(segments[-1]))
    if len(segments) >= 3 and segments[-2] == "blobs":
        name = validate_name("/".join(segments[:-2]))
        return ApiRoute("blob", name, validate_digest(segments[-1]))
    if len(segments) >= 3 and segments[-2] == "referrers":
        name = validate_name("/".join(segments[:-2]))
        return ApiRoute("referrers", name, validate_digest(segments[-1]))
    raise OCIError(ErrorCode.UNSUPPORTED, "not a pull API path", status=404)


# --- Accept headers -----------------------------------------------------------------------------

MAX_ACCEPT_ITEMS = 64
MAX_ACCEPT_LENGTH = 8192


def _split_commas(value: str) -> list[str]:
    """Split a header value on commas that are not inside a quoted string."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _normalise_item(item: str) -> str:
    """``" application/x ;q=0.5 "`` -> ``"application/x; q=0.5"``; ``""`` if unusable."""
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in item):
        return ""
    pieces = [p.strip() for p in item.split(";")]
    if not pieces[0] or any(not p for p in pieces[1:]):
        return ""
    return "; ".join([pieces[0], *pieces[1:]])


def merge_accept(values: Iterable[str]) -> str:
    """Merge several ``Accept`` header lines into one value for forwarding.

    Every line may be a comma list; items keep their parameters (``q=``) and their first
    position; exact duplicates (ignoring case and blanks) are dropped; items with control
    characters are dropped. Bounded: at most :data:`MAX_ACCEPT_ITEMS` items and
    :data:`MAX_ACCEPT_LENGTH` characters (what does not fit is left out).
    """
    merged: list[str] = []
    seen: set[str] = set()
    length = 0
    for value in values:
        for raw in _split_commas(value[: MAX_ACCEPT_LENGTH * 2]):
            item = _normalise_item(raw)
            key = item.lower().replace(" ", "")
            if not item or key in seen:
                continue
            added = len(item) + (2 if merged else 0)
            if len(merged) >= MAX_ACCEPT_ITEMS or length + added > MAX_ACCEPT_LENGTH:
                return ", ".join(merged)
            seen.add(key)
            merged.append(item)
            length += added
    return ", ".join(merged)


def accept_media_types(values: Iterable[str]) -> list[str]:
    """The media types (lowercase, without parameters) of merged Accept values, in order."""
    merged = merge_accept(values)
    if not merged:
        return []
    types: list[str] = []
    for item in _split_commas(merged):
        media_type = base_media_type(item)
        if media_type not in types:
            types.append(media_type)
    return types
