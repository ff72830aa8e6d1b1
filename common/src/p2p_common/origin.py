"""The origin registry client: manifests and blobs from one registry, with its own auth.

A trio + httpx shell over :mod:`p2p_common.oci` and :mod:`p2p_common.registry_auth`.
:class:`OriginClient` talks only to the registry it was made for, to the token realm that
registry names in its ``Bearer`` challenge (http or https only), and, for blob downloads,
to where the registry redirects them (registries with object storage do; the redirect is
followed without credentials and never from https down to http).

Auth, per request, with the caller's :class:`Credentials` (or ``None``): the first
request goes out anonymously; on ``401`` the client answers the registry's challenge
with HTTP Basic or the Docker token flow (scope ``repository:<name>:pull``) and retries.
The client then remembers which scheme the registry wants and, for later requests,
authenticates up front (Basic) or reuses a cached bearer token. Tokens are cached in
memory per (credentials fingerprint, scope) until shortly before they expire.
Credentials and tokens are never logged and never written anywhere.

Every failure is an :class:`~p2p_common.oci.OCIError` a service can answer with:
401 from the origin for these credentials -> ``UNAUTHORIZED``; authenticated but not
allowed -> ``DENIED``; 404 -> ``MANIFEST_UNKNOWN``/``BLOB_UNKNOWN``/``NAME_UNKNOWN``;
429 -> ``TOOMANYREQUESTS``; unreachable, 5xx or nonsense -> ``UNKNOWN`` 502 (504 on a
timeout). Callers own time: wrap calls in trio cancel scopes; the connect and read
timeouts here are only safety nets against a silent origin.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from p2p_common.httpclient import tune_reads
from p2p_common.logs import event
from p2p_common.oci import (
    DEFAULT_MANIFEST_ACCEPT,
    ErrorCode,
    OCIError,
    compute_digest,
    is_digest_reference,
    is_valid_digest,
    known_code,
    merge_accept,
    parse_digest,
    parse_error_body,
    validate_digest,
    validate_name,
    validate_reference,
)
from p2p_common.registry_auth import (
    MAX_TOKEN_RESPONSE,
    AuthSyntaxError,
    Challenge,
    Credentials,
    TokenCache,
    TokenResponse,
    basic_authorization,
    fingerprint,
    parse_token_response,
    parse_www_authenticate,
    pick_challenge,
    pull_scope,
    token_request_url,
)
from p2p_common.settings import normalise_registry, registry_name

__all__ = [
    "BlobConsumer",
    "BlobHead",
    "Credentials",
    "ManifestResponse",
    "OriginClient",
]

log = logging.getLogger("p2p.origin")

T = TypeVar("T")

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""Largest manifest accepted from an origin (distribution's own limit)."""
MAX_REDIRECTS = 5
_ERROR_BODY_LIMIT = 64 * 1024


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


BlobConsumer = Callable[[BlobHead, AsyncIterator[bytes]], Awaitable[T]]
"""Receives the head and the body chunks of a blob GET; what it returns is returned."""


def _header_dict(headers: httpx.Headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _content_length(headers: httpx.Headers) -> int | None:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() and len(value) <= 19 else None


def _header_digest(headers: httpx.Headers) -> str | None:
    value = headers.get("docker-content-digest", "").strip()
    return value if is_valid_digest(value) else None


def _parse_content_range(value: str) -> tuple[int, int, int | None] | None:
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


async def _aclose(iterator: AsyncIterator[bytes]) -> None:
    """Close an async generator we stopped early (httpx types it as a plain iterator)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _failure(message: str, status: int = 502) -> OCIError:
    return OCIError(ErrorCode.UNKNOWN, message, status=status)


def _reason(exc: BaseException) -> str:
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


def _transport_failure(exc: httpx.HTTPError, what: str) -> OCIError:
    if isinstance(exc, httpx.TimeoutException):
        return _failure(f"{what} timed out", 504)
    return _failure(f"{what} unreachable: {_reason(exc)}")


class OriginClient:
    """A client for one origin registry; use ``async with`` (or call :meth:`aclose`).

    ``registry_url`` is what :data:`~p2p_common.settings.RegistryURL` accepts
    (``host[:port]`` means https). https certificates are verified, against the system
    store or ``ca_file``; ``verify=False`` turns that off (tests only).
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
        self._http = httpx.AsyncClient(
            verify=tls,
            trust_env=False,  # no proxy variables, no .netrc credentials
            follow_redirects=False,
            # No pool timeout: waiting for a free connection is bounded by the caller's
            # cancel scope; connect and read timeouts guard against a silent origin.
            timeout=httpx.Timeout(
                connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None
            ),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            # identity: digests are over the stored bytes, never a re-encoding of them.
            headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
            transport=transport,
        )
        self._tokens = TokenCache()
        self._token_locks: dict[tuple[str, ...], trio.Lock] = {}
        self._challenge: Challenge | None = None

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
            self._raise_for_status(response, "blob", b"")
            return BlobHead(
                status=response.status_code,
                headers=_header_dict(response.headers),
                size=_content_length(response.headers),
                digest=_header_digest(response.headers),
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
            await self._raise_for_status_streamed(response, "blob")
            content_range = None
            if response.status_code == 206:
                content_range = _parse_content_range(response.headers.get("content-range", ""))
                if content_range is None or byte_range is None:
                    raise _failure("origin sent a partial blob without a valid Content-Range")
                if content_range[0] != byte_range[0]:
                    raise _failure("origin sent a different byte range than asked for")
            elif response.status_code != 200:
                raise _failure(f"origin answered a blob GET with {response.status_code}")
            head = BlobHead(
                status=response.status_code,
                headers=_header_dict(response.headers),
                size=_content_length(response.headers),
                digest=_header_digest(response.headers),
                content_type=response.headers.get("content-type", ""),
                content_range=content_range,
            )
            async with aclosing(self._chunks(response)) as chunks:
                return await consume(head, chunks)
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
            await self._raise_for_status_streamed(response, "manifest")
            if response.status_code != 200:
                raise _failure(f"origin answered a manifest {method} with {response.status_code}")
            size = _content_length(response.headers)
            if size is not None and size > self.max_manifest_bytes:
                raise _failure(f"origin manifest larger than {self.max_manifest_bytes} bytes")
            header_digest = _header_digest(response.headers)
            body = b""
            digest = header_digest
            if method == "GET":
                body = await self._read_bounded(response, self.max_manifest_bytes, "manifest")
                digest = self._verified_manifest_digest(reference, header_digest, body)
                size = len(body)
            elif is_digest_reference(reference) and header_digest not in (None, reference):
                raise _failure("origin's Docker-Content-Digest differs from the digest asked for")
            return ManifestResponse(
                status=response.status_code,
                headers=_header_dict(response.headers),
                content_type=response.headers.get("content-type", ""),
                digest=digest,
                size=size,
                body=body,
            )
        finally:
            await response.aclose()

    @staticmethod
    def _verified_manifest_digest(reference: str, header_digest: str | None, body: bytes) -> str:
        if is_digest_reference(reference):
            expected = parse_digest(reference)
            if compute_digest(body, expected.algorithm) != reference:
                raise _failure("origin sent a manifest that does not match the digest asked for")
            return reference
        if header_digest is not None:
            algorithm = parse_digest(header_digest).algorithm
            if compute_digest(body, algorithm) != header_digest:
                raise _failure("origin's Docker-Content-Digest does not match the manifest")
            return header_digest
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
            raise _transport_failure(exc, what) from None

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
        scope = pull_scope(repository)
        key = (fingerprint(credentials), scope)
        authorization, token, fetched = await self._preemptive(credentials, scope, key)
        sent_basic = authorization is not None and token is None
        url = self._url(path)
        while True:
            response = await self._send(method, url, headers, authorization, stream=stream)
            if response.status_code != 401:
                return response
            challenge_lines = response.headers.get_list("www-authenticate")
            await response.aclose()
            try:
                challenge = pick_challenge(parse_www_authenticate(challenge_lines))
            except AuthSyntaxError:
                raise _failure("origin sent a malformed WWW-Authenticate challenge") from None
            if challenge is None:
                raise self._refused(credentials, "origin asks for an unsupported auth scheme")
            self._challenge = challenge
            if challenge.scheme == "basic":
                if credentials is None or sent_basic:
                    raise self._refused(credentials, "origin refused these credentials")
                authorization = self._basic(credentials)
                sent_basic = True
                continue
            if fetched:
                # A token fetched just now for exactly this scope, and still 401.
                if challenge.error == "invalid_token":
                    raise _failure("origin rejected the token its own token server issued")
                # The token server knows these credentials but did not grant the pull.
                raise self._refused(credentials, "origin refused access", authenticated=True)
            token, fetched = await self._token(challenge, credentials, scope, key, rejected=token)
            authorization = f"Bearer {token}"

    async def _preemptive(
        self, credentials: Credentials | None, scope: str, key: tuple[str, ...]
    ) -> tuple[str | None, str | None, bool]:
        """(Authorization, bearer token, token fetched just now) to send up front.

        Nothing before the origin has challenged us; then Basic, or a bearer token.
        """
        known = self._challenge
        if known is None:
            return None, None, False
        if known.scheme == "basic":
            return (None if credentials is None else self._basic(credentials)), None, False
        token, fetched = await self._token(known, credentials, scope, key, rejected=None)
        return f"Bearer {token}", token, fetched

    @staticmethod
    def _basic(credentials: Credentials) -> str:
        try:
            return basic_authorization(credentials)
        except AuthSyntaxError:
            raise OCIError(ErrorCode.UNAUTHORIZED, "credentials cannot be sent") from None

    @staticmethod
    def _refused(
        credentials: Credentials | None, message: str, *, authenticated: bool = False
    ) -> OCIError:
        """DENIED when known credentials were not enough; UNAUTHORIZED otherwise."""
        if credentials is None:
            return OCIError(ErrorCode.UNAUTHORIZED, "origin requires authentication")
        if authenticated:
            return OCIError(ErrorCode.DENIED, message)
        return OCIError(ErrorCode.UNAUTHORIZED, message)

    # --- the token flow ---------------------------------------------------------------------

    async def _token(
        self,
        challenge: Challenge,
        credentials: Credentials | None,
        scope: str,
        key: tuple[str, ...],
        *,
        rejected: str | None,
    ) -> tuple[str, bool]:
        """(bearer token, fetched just now) for ``key``: the cached one unless it was
        ``rejected``; concurrent callers share one fetch."""
        lock = self._token_locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                cached = self._tokens.get(key, self._clock())
                if cached is not None and cached != rejected:
                    return cached, False
                self._tokens.discard(key)
                answer = await self._fetch_token(challenge, credentials, scope)
                self._tokens.put(key, answer, self._clock())
                return answer.token, True
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._token_locks.pop(key, None)

    async def _fetch_token(
        self, challenge: Challenge, credentials: Credentials | None, scope: str
    ) -> TokenResponse:
        """GET the token realm (with Basic credentials when we have them)."""
        realm = challenge.realm or ""
        try:
            url = token_request_url(
                realm,
                service=challenge.service,
                scopes=[scope],
                account=None if credentials is None else credentials.username,
            )
        except AuthSyntaxError:
            raise _failure("origin names an unusable token realm (only http(s) URLs)") from None
        if (
            credentials is not None
            and self.registry_url.startswith("https://")
            and not url.startswith("https://")
        ):
            raise _failure("origin names a plain-http token realm for an https registry")
        authorization = None if credentials is None else self._basic(credentials)
        response = await self._send(
            "GET", url, {}, authorization, stream=True, what="origin token server"
        )
        try:
            status = response.status_code
            event(
                log,
                "origin.token",
                logging.DEBUG,
                realm=urlsplit(url).hostname,
                scope=scope,
                status=status,
                anonymous=credentials is None,
            )
            if status == 200:
                body = await self._read_bounded(response, MAX_TOKEN_RESPONSE, "token response")
                try:
                    return parse_token_response(body)
                except AuthSyntaxError:
                    raise _failure("origin token server sent a malformed answer") from None
            if status == 401:
                raise OCIError(
                    ErrorCode.UNAUTHORIZED, "origin token server refused these credentials"
                )
            if status == 403:
                raise OCIError(ErrorCode.DENIED, "origin token server denied access")
            if status == 429:
                raise OCIError(ErrorCode.TOOMANYREQUESTS)
            raise _failure(f"origin token server answered {status}")
        finally:
            await response.aclose()

    # --- responses --------------------------------------------------------------------------

    async def _chunks(self, response: httpx.Response) -> AsyncGenerator[bytes, None]:
        body = response.aiter_bytes()
        try:
            async for chunk in body:
                yield chunk
        except httpx.HTTPError as exc:
            raise _transport_failure(exc, "origin (while streaming a blob)") from None
        finally:
            await _aclose(body)

    @staticmethod
    async def _read_bounded(response: httpx.Response, limit: int, what: str) -> bytes:
        parts: list[bytes] = []
        total = 0
        body = response.aiter_bytes()
        try:
            async for chunk in body:
                total += len(chunk)
                if total > limit:
                    raise _failure(f"origin {what} larger than {limit} bytes")
                parts.append(chunk)
        except httpx.HTTPError as exc:
            raise _transport_failure(exc, f"origin (while reading a {what})") from None
        finally:
            await _aclose(body)
        return b"".join(parts)

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
                raise _failure("origin redirected a blob to an unusable location")
            if response.url.scheme == "https" and scheme == "http":
                raise _failure("origin redirected a blob from https to http")
            # Credentials stay with the registry: the redirect target gets none.
            forwarded = {k: v for k, v in headers.items() if k.lower() == "range"}
            response = await self._send(
                method, target, forwarded, None, stream=True, what="blob storage"
            )
        await response.aclose()
        raise _failure("origin redirected a blob too many times")

    async def _raise_for_status_streamed(
        self, response: httpx.Response, kind: Literal["manifest", "blob"]
    ) -> None:
        if response.status_code < 300:
            return
        body = b""
        if response.request.method != "HEAD":
            try:
                body = await self._read_bounded(response, _ERROR_BODY_LIMIT, "error body")
            except OCIError:
                body = b""
        self._raise_for_status(response, kind, body)

    @staticmethod
    def _raise_for_status(
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
            raise _failure(f"origin redirected a {kind} request ({status})")
        raise _failure(f"origin answered {status}")
