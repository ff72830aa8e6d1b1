"""The origin registry client (see :mod:`p2p_proxy.origin`)."""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import Literal, Self
from urllib.parse import quote, urlencode, urljoin, urlsplit

import httpx
import trio

from p2p_common.httpclient import tune_reads
from p2p_common.listing import MAX_LISTING_BYTES
from p2p_common.oci import (
    DEFAULT_MANIFEST_ACCEPT,
    OCI_INDEX,
    ErrorCode,
    OCIError,
    compute_digest,
    is_digest_reference,
    merge_accept,
    parse_digest,
    validate_digest,
    validate_name,
    validate_reference,
)
from p2p_common.registry_auth import Credentials
from p2p_common.settings import normalise_registry, registry_name
from p2p_proxy.origin.auth import OriginAuth
from p2p_proxy.origin.egress import EgressRoutes
from p2p_proxy.origin.responses import (
    ERROR_BODY_LIMIT,
    MAX_MANIFEST_BYTES,
    MAX_REDIRECTS,
    BlobConsumer,
    BlobHead,
    ListingResponse,
    ManifestResponse,
    T,
    aclose_iterator,
    content_length,
    failure,
    header_dict,
    header_digest,
    parse_content_range,
    raise_for_listing,
    raise_for_status,
    raise_for_status_streamed,
    read_bounded,
    transport_failure,
)
from p2p_proxy.origin.transport import origin_transport


class OriginClient:
    """A client for one origin registry; use ``async with`` (or call :meth:`aclose`).

    ``registry_url`` is what :data:`~p2p_common.settings.RegistryURL` accepts
    (``host[:port]`` means https). https certificates are verified, against the system
    store or ``ca_file``; ``verify=False`` turns that off (tests only). ``egress`` routes
    requests through an outbound HTTP proxy (:mod:`p2p_proxy.origin.egress`): the registry,
    its token realm and its blob redirects alike, each unless a ``NO_PROXY`` rule exempts it.
    """

    def __init__(
        self,
        registry_url: str,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool = True,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_connections: int = 64,
        max_manifest_bytes: int = MAX_MANIFEST_BYTES,
        user_agent: str = "p2p-origin-client/0.1",
        clock: Callable[[], float] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        token_max_age: float = math.inf,
        token_realm_hosts: Iterable[str] = (),
        egress: EgressRoutes | None = None,
    ) -> None:
        tune_reads()
        self.registry_url = normalise_registry(registry_url)
        self.name = registry_name(self.registry_url)
        self.max_manifest_bytes = max_manifest_bytes
        self._clock = clock or trio.current_time
        tls: ssl.SSLContext | bool
        if not verify:
            tls = False
        elif ca_file is not None:
            tls = ssl.create_default_context(cafile=os.fspath(ca_file))
        else:
            tls = ssl.create_default_context()
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self.egress = egress
        """The egress proxy routes (None: every request goes direct)."""
        if transport is None:
            transport = origin_transport(tls, limits, egress)
        self._http = httpx.AsyncClient(
            # The environment is never read here: an egress proxy comes only from ``egress``.
            trust_env=False,  # no proxy variables, no .netrc credentials
            follow_redirects=False,
            # No pool timeout: waiting for a free connection is bounded by the caller's
            # cancel scope; connect and read timeouts guard against a silent origin.
            timeout=httpx.Timeout(
                connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None
            ),
            # identity: digests are over the stored bytes, never a re-encoding of them.
            headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
            transport=transport,
        )
        self._auth = OriginAuth(
            self.registry_url,
            self._send,
            self._clock,
            token_max_age=token_max_age,
            realm_hosts=token_realm_hosts,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- public API -------------------------------------------------------------------------

    async def get_manifest(
        self,
        repository: str,
        reference: str,
        credentials: Credentials | None,
        *,
        accept: str | Iterable[str] | None = None,
    ) -> ManifestResponse:
        """GET a manifest by tag or digest; the body is bounded and its digest verified."""
        return await self._manifest("GET", repository, reference, credentials, accept)

    async def head_manifest(
        self,
        repository: str,
        reference: str,
        credentials: Credentials | None,
        *,
        accept: str | Iterable[str] | None = None,
    ) -> ManifestResponse:
        """HEAD a manifest: status, Content-Type, Docker-Content-Digest, size; no body."""
        return await self._manifest("HEAD", repository, reference, credentials, accept)

    async def head_blob(
        self, repository: str, digest: str, credentials: Credentials | None
    ) -> BlobHead:
        """HEAD a blob: whether these credentials may read it, and its size."""
        path = self._blob_path(repository, digest)
        response = await self._authorized("HEAD", path, repository, credentials, {})
        try:
            response = await self._follow_blob_redirects("HEAD", response, {})
            raise_for_status(response, "blob", b"")
            return BlobHead(
                status=response.status_code,
                headers=header_dict(response.headers),
                size=content_length(response.headers),
                digest=header_digest(response.headers),
                content_type=response.headers.get("content-type", ""),
            )
        finally:
            await response.aclose()

    async def get_blob(
        self,
        repository: str,
        digest: str,
        credentials: Credentials | None,
        consume: BlobConsumer[T],
        *,
        byte_range: tuple[int, int | None] | None = None,
    ) -> T:
        """GET a blob and stream it into ``consume(head, chunks)``; returns what it returns.

        ``byte_range`` is ``(first, last)`` inclusive, or ``(first, None)`` to the end. A
        206 must start at ``first``; an origin that ignores the range answers 200 with the
        whole blob (``head.status`` tells). The bytes are not verified here: the caller
        hashes what it keeps. Connection failures while streaming raise ``UNKNOWN`` 502.
        """
        path = self._blob_path(repository, digest)
        headers: dict[str, str] = {}
        if byte_range is not None:
            first, last = byte_range
            if first < 0 or (last is not None and last < first):
                raise OCIError(ErrorCode.RANGE_INVALID, "invalid byte range")
            headers["Range"] = f"bytes={first}-{'' if last is None else last}"
        response = await self._authorized(
            "GET", path, repository, credentials, headers, stream=True
        )
        try:
            response = await self._follow_blob_redirects("GET", response, headers)
            await raise_for_status_streamed(response, "blob")
            content_range = None
            if response.status_code == 206:
                content_range = parse_content_range(response.headers.get("content-range", ""))
                if content_range is None or byte_range is None:
                    raise failure("origin sent a partial blob without a valid Content-Range")
                if content_range[0] != byte_range[0]:
                    raise failure("origin sent a different byte range than asked for")
            elif response.status_code != 200:
                raise failure(f"origin answered a blob GET with {response.status_code}")
            head = BlobHead(
                status=response.status_code,
                headers=header_dict(response.headers),
                size=content_length(response.headers),
                digest=header_digest(response.headers),
                content_type=response.headers.get("content-type", ""),
                content_range=content_range,
            )
            async with aclosing(self._chunks(response)) as chunks:
                return await consume(head, chunks)
        finally:
            await response.aclose()

    async def get_listing(
        self,
        repository: str,
        digest: str | None,
        credentials: Credentials | None,
        params: Sequence[tuple[str, str]] = (),
        *,
        accept: str | None = None,
    ) -> ListingResponse:
        """GET the tag list of ``repository`` (``digest`` None) or the referrers of ``digest``
        (OCI distribution 1.1), with the query parameters ``params``; the body is bounded.
        Refusals raise :class:`OCIError` (a 404 stays a 404: see
        :func:`~p2p_proxy.origin.responses.raise_for_listing`)."""
        name = validate_name(repository)
        if digest is None:
            kind: Literal["tags", "referrers"] = "tags"
            path = f"/v2/{name}/tags/list"
        else:
            kind = "referrers"
            path = f"/v2/{name}/referrers/{validate_digest(digest)}"
        if params:
            path += "?" + urlencode(list(params), quote_via=quote)
        default = "application/json" if kind == "tags" else OCI_INDEX
        headers = {"Accept": accept or default}
        response = await self._authorized(
            "GET", path, repository, credentials, headers, stream=True
        )
        try:
            if response.status_code >= 300:
                try:
                    body = await read_bounded(response, ERROR_BODY_LIMIT, "error body")
                except OCIError:
                    body = b""
                raise_for_listing(response, kind, body)
            if response.status_code != 200:
                raise failure(f"origin answered a {kind} listing with {response.status_code}")
            return ListingResponse(
                status=200,
                content_type=response.headers.get("content-type", ""),
                links=response.headers.get_list("link"),
                filters_applied=response.headers.get("oci-filters-applied"),
                body=await read_bounded(response, MAX_LISTING_BYTES, f"{kind} listing"),
            )
        finally:
            await response.aclose()

    # --- requests ---------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.registry_url + path

    @staticmethod
    def _blob_path(repository: str, digest: str) -> str:
        return f"/v2/{validate_name(repository)}/blobs/{validate_digest(digest)}"

    async def _manifest(
        self,
        method: Literal["GET", "HEAD"],
        repository: str,
        reference: str,
        credentials: Credentials | None,
        accept: str | Iterable[str] | None,
    ) -> ManifestResponse:
        path = f"/v2/{validate_name(repository)}/manifests/{validate_reference(reference)}"
        if accept is None:
            accept_value = DEFAULT_MANIFEST_ACCEPT
        else:
            accept_value = merge_accept([accept] if isinstance(accept, str) else accept)
        headers = {"Accept": accept_value or DEFAULT_MANIFEST_ACCEPT}
        response = await self._authorized(
            method, path, repository, credentials, headers, stream=True
        )
        try:
            await raise_for_status_streamed(response, "manifest")
            if response.status_code != 200:
                raise failure(f"origin answered a manifest {method} with {response.status_code}")
            size = content_length(response.headers)
            if size is not None and size > self.max_manifest_bytes:
                raise failure(f"origin manifest larger than {self.max_manifest_bytes} bytes")
            origin_digest = header_digest(response.headers)
            body = b""
            digest = origin_digest
            if method == "GET":
                body = await read_bounded(response, self.max_manifest_bytes, "manifest")
                digest = self._verified_manifest_digest(reference, origin_digest, body)
                size = len(body)
            elif is_digest_reference(reference) and origin_digest not in (None, reference):
                raise failure("origin's Docker-Content-Digest differs from the digest asked for")
            return ManifestResponse(
                status=response.status_code,
                headers=header_dict(response.headers),
                content_type=response.headers.get("content-type", ""),
                digest=digest,
                size=size,
                body=body,
            )
        finally:
            await response.aclose()

    @staticmethod
    def _verified_manifest_digest(reference: str, origin_digest: str | None, body: bytes) -> str:
        if is_digest_reference(reference):
            expected = parse_digest(reference)
            if compute_digest(body, expected.algorithm) != reference:
                raise failure("origin sent a manifest that does not match the digest asked for")
            return reference
        if origin_digest is not None:
            algorithm = parse_digest(origin_digest).algorithm
            if compute_digest(body, algorithm) != origin_digest:
                raise failure("origin's Docker-Content-Digest does not match the manifest")
            return origin_digest
        return compute_digest(body)

    async def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        authorization: str | None,
        *,
        stream: bool,
        what: str = "origin",
    ) -> httpx.Response:
        all_headers = dict(headers)
        if authorization is not None:
            all_headers["Authorization"] = authorization
        request = self._http.build_request(method, url, headers=all_headers)
        try:
            return await self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise transport_failure(exc, what) from None

    async def _authorized(
        self,
        method: str,
        path: str,
        repository: str,
        credentials: Credentials | None,
        headers: Mapping[str, str],
        *,
        stream: bool = False,
    ) -> httpx.Response:
        """Send, answering the origin's challenge; returns any response but a 401."""
        return await self._auth.authorized(
            method, self._url(path), repository, credentials, headers, stream=stream
        )

    # --- responses --------------------------------------------------------------------------

    async def _chunks(self, response: httpx.Response) -> AsyncGenerator[bytes, None]:
        body = response.aiter_bytes()
        try:
            async for chunk in body:
                yield chunk
        except httpx.HTTPError as exc:
            raise transport_failure(exc, "origin (while streaming a blob)") from None
        finally:
            await aclose_iterator(body)

    async def _follow_blob_redirects(
        self, method: str, response: httpx.Response, headers: Mapping[str, str]
    ) -> httpx.Response:
        """Follow the origin's redirects of a blob request, without credentials."""
        for _ in range(MAX_REDIRECTS):
            if response.status_code not in (301, 302, 303, 307, 308):
                return response
            location = response.headers.get("location", "")
            await response.aclose()
            target = urljoin(str(response.url), location)
            scheme = urlsplit(target).scheme
            if not location or scheme not in ("http", "https"):
                raise failure("origin redirected a blob to an unusable location")
            if response.url.scheme == "https" and scheme == "http":
                raise failure("origin redirected a blob from https to http")
            # Credentials stay with the registry: the redirect target gets none.
            forwarded = {k: v for k, v in headers.items() if k.lower() == "range"}
            response = await self._send(
                method, target, forwarded, None, stream=True, what="blob storage"
            )
        await response.aclose()
        raise failure("origin redirected a blob too many times")
