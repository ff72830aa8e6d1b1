"""Tag lists and referrers (OCI distribution spec 1.1) as the agent and the proxy pass them on.

- ``GET /v2/<name>/tags/list[?n=<count>&last=<tag>]``: ``{"name", "tags"}``, paginated: a
  registry that has more says where the next page is with ``Link: <url>; rel="next"``.
- ``GET /v2/<name>/referrers/<digest>[?artifactType=<media type>]``: an OCI image index of the
  manifests whose ``subject`` is the digest (signatures, SBOMs); ``OCI-Filters-Applied:
  artifactType`` when the registry applied the filter; it may paginate with ``Link`` too. A
  registry without the referrers API answers 404, and clients (cosign, notation, oras) then use
  the tag schema (``<alg>-<hex>`` tags) instead: that 404 must reach them as a 404.

Pure: no I/O. :func:`listing_params` validates the query parameters passed on (``ns`` is the
service's own and is left out); :func:`parse_link_header` parses RFC 8288 ``Link`` values, bounded;
:func:`next_link` turns the next-page link of the service asked into one for the same listing on
this service (its path, the next page's parameters, this service's ``ns``), so that the client's
next request comes back here for the same registry, never to another host.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from p2p_common.oci import ErrorCode, OCIError

__all__ = [
    "ALLOWED_RESPONSE_HEADERS",
    "MAX_LISTING_BYTES",
    "Link",
    "ListingKind",
    "listing_headers",
    "listing_params",
    "next_link",
    "parse_link_header",
]

ListingKind = Literal["tags", "referrers"]

MAX_LISTING_BYTES = 4 * 1024 * 1024
"""Largest tag list or referrers index passed on (a registry that has more should paginate)."""
MAX_LINK_LENGTH = 8192
MAX_LINKS = 16
MAX_PARAMS = 16
MAX_PARAM_VALUE = 1024
MAX_COUNT = 100_000
"""Largest ``n`` passed on."""
ALLOWED_RESPONSE_HEADERS = ("content-type", "docker-content-digest", "oci-filters-applied")
"""Headers of a listing answer passed on as they are (``Link`` is rewritten, see
:func:`next_link`)."""

_PARAM_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+\-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+\-]{0,126}"
)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _printable(value: str) -> bool:
    return all(0x20 <= ord(c) < 0x7F for c in value)


def listing_params(kind: ListingKind, query: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """The query parameters of a listing request to pass on, without ``ns``, in order.

    Known ones are checked (``n``: a count up to :data:`MAX_COUNT`; ``last``: printable, at most
    256 characters; ``artifactType``: a media type); other ones (a registry's own pagination
    cursor, as its ``Link`` named it) pass if their names are tokens and their values printable
    and short. At most :data:`MAX_PARAMS`. Anything else is ``400``.
    """
    params: list[tuple[str, str]] = []
    for name, values in query.items():
        if name == "ns":
            continue
        for value in values:
            if not _PARAM_NAME.fullmatch(name):
                raise OCIError(ErrorCode.UNSUPPORTED, "invalid query parameter name", status=400)
            if len(value) > MAX_PARAM_VALUE or not _printable(value):
                raise OCIError(
                    ErrorCode.UNSUPPORTED, f"invalid value of query parameter {name}", status=400
                )
            params.append((name, value))
    if len(params) > MAX_PARAMS:
        raise OCIError(ErrorCode.UNSUPPORTED, "too many query parameters", status=400)
    for name, value in params:
        if name == "n" and (not value.isdigit() or len(value) > 6 or int(value) > MAX_COUNT):
            raise OCIError(
                ErrorCode.UNSUPPORTED, f"n must be a whole number up to {MAX_COUNT}", status=400
            )
        if name == "last" and len(value) > 256:
            raise OCIError(ErrorCode.UNSUPPORTED, "last is too long", status=400)
        if name == "artifactType" and (kind != "referrers" or not _MEDIA_TYPE.fullmatch(value)):
            raise OCIError(ErrorCode.UNSUPPORTED, "artifactType must be a media type", status=400)
    return params


# --- Link headers (RFC 8288) --------------------------------------------------------------------


class Link:
    """One link of a ``Link`` header: its target (as written, unresolved) and parameters
    (names lower-case; ``rel`` values are space-separated, compared case-insensitively)."""

    __slots__ = ("params", "target")

    def __init__(self, target: str, params: dict[str, str]) -> None:
        self.target = target
        self.params = params

    @property
    def rels(self) -> set[str]:
        return {r.lower() for r in self.params.get("rel", "").split()}

    def __repr__(self) -> str:
        return f"Link({self.target!r}, {self.params!r})"


def _quoted(value: str, start: int) -> tuple[str, int]:
    """A quoted-string starting at ``value[start] == '"'``: (its content, index after it)."""
    out: list[str] = []
    i = start + 1
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise ValueError("unterminated quoted string")


def parse_link_header(values: Iterable[str]) -> list[Link]:
    """Every link of the ``Link`` header lines ``values`` (RFC 8288 syntax: ``<target>`` then
    ``; name=value`` or ``; name="quoted"`` parameters, links separated by commas). Raises
    :class:`ValueError` for malformed input or more than :data:`MAX_LINK_LENGTH` characters or
    :data:`MAX_LINKS` links in all."""
    text = ", ".join(values)
    if len(text) > MAX_LINK_LENGTH:
        raise ValueError("Link header too long")
    links: list[Link] = []
    i, end = 0, len(text)

    def skip_space(at: int) -> int:
        while at < end and text[at] in " \t":
            at += 1
        return at

    while True:
        i = skip_space(i)
        while i < end and text[i] == ",":  # empty list elements are allowed
            i = skip_space(i + 1)
        if i >= end:
            return links
        if text[i] != "<":
            raise ValueError("a link must start with <")
        close = text.find(">", i + 1)
        if close < 0:
            raise ValueError("unterminated link target")
        target = text[i + 1 : close]
        if not _printable(target) or " " in target:
            raise ValueError("invalid characters in a link target")
        params: dict[str, str] = {}
        i = skip_space(close + 1)
        while i < end and text[i] == ";":
            i = skip_space(i + 1)
            match = _TOKEN.match(text, i)
            if match is None:
                raise ValueError("invalid link parameter name")
            name = match.group().lower()
            i = skip_space(match.end())
            value = ""
            if i < end and text[i] == "=":
                i = skip_space(i + 1)
                if i < end and text[i] == '"':
                    value, i = _quoted(text, i)
                else:
                    token = _TOKEN.match(text, i)
                    if token is None:
                        raise ValueError("invalid link parameter value")
                    value, i = token.group(), token.end()
            params.setdefault(name, value)  # RFC 8288: the first occurrence counts
            i = skip_space(i)
        if i < end and text[i] != ",":
            raise ValueError("junk after a link")
        links.append(Link(target, params))
        if len(links) > MAX_LINKS:
            raise ValueError("too many links")
        i += 1


def listing_headers(
    filters_applied: str | None, links: Iterable[str], path: str, ns: str | None
) -> list[tuple[str, str]]:
    """The headers a tag list or referrers answer passes on: the origin's
    ``OCI-Filters-Applied`` (at most 256 characters) and a next-page ``Link`` back to ``path``
    (:func:`next_link`)."""
    headers = []
    if filters_applied:
        headers.append(("oci-filters-applied", filters_applied[:256]))
    link = next_link(links, path, ns)
    if link is not None:
        headers.append(("link", link))
    return headers


def next_link(values: Iterable[str], path: str, ns: str | None) -> str | None:
    """The ``Link`` header to send for the next page, given the ``Link`` lines of the answer
    being passed on: ``<path?params>; rel="next"``, with the next page's query parameters
    (without any ``ns``) and ``ns`` when the request carried one. ``None`` when there is no
    usable next link (none, malformed, too many parameters, or one that points at another
    listing than ``path``: the client then sees the last page)."""
    try:
        links = parse_link_header(values)
    except ValueError:
        return None
    target = next((link.target for link in links if "next" in link.rels), None)
    if target is None:
        return None
    parts = urllib.parse.urlsplit(target)
    if parts.path and not urllib.parse.unquote(parts.path).endswith(path):
        return None
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query: dict[str, list[str]] = {}
    for name, value in pairs:
        query.setdefault(name, []).append(value)
    kind: ListingKind = "tags" if path.endswith("/tags/list") else "referrers"
    try:
        params = listing_params(kind, query)
    except OCIError:
        return None
    if ns is not None:
        params.append(("ns", ns))
    encoded = urllib.parse.urlencode(params, safe=":", quote_via=urllib.parse.quote)
    return f'<{path}{"?" + encoded if encoded else ""}>; rel="next"'
