"""The registry API on 127.0.0.1:5004: what containerd and kubelet pull from.

OCI distribution pull API: ``GET /v2/``, ``GET``/``HEAD`` manifests and blobs (blobs
with ``Range``), tag lists (``n``/``last``, ``Link``) and referrers (``artifactType``), the
last two passed through a proxy as the origin answers them, for signature tools. Rewrite
mode (``localhost:5004/<repo>:<tag>``) serves the first configured registry; mirror mode
(``?ns=<registry>`` from containerd's hosts.toml) serves any configured registry and answers
404 at once for any other (before looking at anything else), so containerd falls back to the
origin. The caller's Basic credentials (its imagePullSecret for
localhost:5004) go to the origin through a proxy; they are never stored or logged.

A blob is sent only after the origin authorized this caller for this repository and
digest (the decision is reused for ``authCacheTtl`` seconds), also when it is cached.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable

import trio

from p2p_agent.downloads import BlobRequest, Downloads, open_cached
from p2p_agent.metrics import AgentMetrics
from p2p_agent.mirror import RegistryUse
from p2p_agent.proxies import ProxyClient
from p2p_agent.status import PullLog
from p2p_common.asgi import (
    Message,
    Receive,
    Request,
    Scope,
    Send,
    TrackedSend,
    lifespan,
    send_bytes,
    send_chunk,
    send_error,
    send_file_range,
    start_stream,
    until_disconnect,
)
from p2p_common.blobcache import BlobCache, CacheFullError
from p2p_common.errors import LocalError, collapse
from p2p_common.listing import ListingKind, listing_headers, listing_params
from p2p_common.logs import PULL_ID_HEADER, event, new_pull_id, pull_context
from p2p_common.oci import ApiRoute, ErrorCode, OCIError, merge_accept, parse_api_path
from p2p_common.ranges import RangeNotSatisfiableError, parse_range
from p2p_common.registry_auth import (
    AuthSyntaxError,
    basic_authorization,
    fingerprint,
    parse_basic_authorization,
)
from p2p_common.settings import registry_name
from p2p_common.ttlcache import TTLCache

log = logging.getLogger("p2p.agent.api")

CHALLENGE = 'Basic realm="p2p-agent"'
ANONYMOUS_BASIC = frozenset({"Basic", "Basic Og==", "Basic Og"})
"""Basic credentials that say nothing: an empty user and password."""
MAX_AUTH_ENTRIES = 10_000
SHA256_ONLY = "only sha256 blobs are cached and verified here; fetch this one from the origin"
"""The answer (404 UNSUPPORTED) for a valid blob digest of another algorithm (sha512): 404 so
that containerd, in mirror mode, falls back to the origin."""


class AuthCache:
    """Origin authorization decisions: (credentials, registry, repository, digest) -> size.

    In memory only, keyed by a per-process fingerprint of the credentials; entries
    expire after ``ttl`` seconds (0 disables the cache); LRU-bounded (a
    :class:`~p2p_common.ttlcache.TTLCache`). Denials are not cached, so a fixed pull secret
    works at once.
    """

    def __init__(self, ttl: float, *, max_entries: int = MAX_AUTH_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: TTLCache[tuple[str, str, str, str], int] = TTLCache(max_entries)

    def get(self, key: tuple[str, str, str, str], now: float) -> int | None:
        return self._entries.get(key, now)

    def put(
        self,
        key: tuple[str, str, str, str],
        size: int,
        now: float,
        *,
        max_age: float | None = None,
    ) -> None:
        """Remember a grant for ``ttl`` seconds, or ``max_age`` if that is shorter (what is
        left of the proxy's own grant)."""
        ttl = self.ttl if max_age is None else min(self.ttl, max_age)
        self._entries.set(key, size, expires=now + ttl, now=now)


def _answer_with_pull_id(send: Send, pull_id: str) -> Send:
    """``send`` that adds the pull id header to the response."""
    header = (PULL_ID_HEADER.lower().encode(), pull_id.encode())

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return sending


class RegistryApp:
    def __init__(
        self,
        *,
        registries: list[str],
        proxies: ProxyClient,
        downloads: Downloads,
        cache: BlobCache,
        metrics: AgentMetrics,
        auth_ttl: float,
        pulls: PullLog | None = None,
    ) -> None:
        self.namespaces = [registry_name(url) for url in registries]
        self.proxies = proxies
        self.downloads = downloads
        self.cache = cache
        self.metrics = metrics
        self.auth = AuthCache(auth_ttl)
        self.pulls = pulls or PullLog()
        """Every blob response, for the status view."""
        self.use = RegistryUse()
        """Requests per registry, mirror mode or rewrite mode (for the status view)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self.metrics.requests.inc()
        request = Request.from_scope(scope)
        head = request.method == "HEAD"
        # Every request is a pull of its own: an id of ours (never one a client sends), in
        # every log line of it, in the proxy's for it (the header) and in the answer.
        with pull_context(new_pull_id()) as pull_id:
            tracked = TrackedSend(_answer_with_pull_id(send, pull_id))
            try:
                await self._handle(request, receive, tracked)
            except OCIError as exc:
                await self._error(tracked, exc, head=head)
            except CacheFullError as exc:
                error = OCIError(ErrorCode.UNKNOWN, str(exc), status=507)
                await self._error(tracked, error, head=head)
            except LocalError as exc:
                event(log, "request.failed", logging.ERROR, path=request.path, error=str(exc))
                error = OCIError(ErrorCode.UNKNOWN, str(exc), status=500)
                await self._error(tracked, error, head=head)

    async def _error(self, send: TrackedSend, exc: OCIError, *, head: bool) -> None:
        self.metrics.errors.labels(exc.code.value, str(exc.status)).inc()
        if send.started:
            # Too late for an error response: leave the body unfinished, so the client sees
            # a broken transfer (and retries) rather than a short blob.
            event(log, "response.aborted", logging.WARNING, error=exc.message)
            return
        if exc.status == 401:
            exc = OCIError(
                exc.code, exc.message, status=401, headers={"WWW-Authenticate": CHALLENGE}
            )
        await send_error(send, exc, head=head)

    def _namespace(self, request: Request) -> str:
        ns = request.param("ns")
        if ns is None:
            self.use.seen(self.namespaces[0], mirror=False)
            return self.namespaces[0]
        if ns.lower() not in self.namespaces:
            # Fast, and before anything else is looked at: with the chart's catch-all
            # (_default/hosts.toml) containerd asks here for every registry, and falls back to
            # the registry itself on this 404.
            self.use.refuse()
            raise OCIError(ErrorCode.NAME_UNKNOWN, f"registry {ns[:255]!r} is not accelerated here")
        self.use.seen(ns.lower(), mirror=True)
        return ns.lower()

    @staticmethod
    def _authorization(request: Request) -> str | None:
        """The caller's credentials as a canonical Basic header, or None (anonymous)."""
        header = request.header("authorization")
        if header is None or header.strip() in ANONYMOUS_BASIC:
            return None  # skopeo answers a Basic challenge without credentials with ":"
        try:
            return basic_authorization(parse_basic_authorization(header))
        except AuthSyntaxError:
            raise OCIError(ErrorCode.UNAUTHORIZED, "only Basic credentials are accepted") from None

    async def _handle(self, request: Request, receive: Receive, send: Send) -> None:
        ns = self._namespace(request)
        if request.method not in ("GET", "HEAD"):
            raise OCIError(ErrorCode.UNSUPPORTED, "this registry is read-only", status=405)
        route = parse_api_path(request.path)
        authorization = self._authorization(request)
        head = request.method == "HEAD"
        if route.kind == "ping":
            # Clients that ping first (skopeo, podman, docker) decide here whether to send
            # credentials at all: challenge anonymous pings like a registry with Basic auth
            # that also serves anonymous reads. Real answers come per repository.
            if authorization is None:
                raise OCIError(ErrorCode.UNAUTHORIZED, "send credentials if you have them")
            await send_bytes(send, 200, b"{}", head=head)
        elif route.kind == "manifest":
            assert route.name is not None
            assert route.reference is not None
            accept = merge_accept(request.headers.get("accept", []))
            status, headers, body = await self.proxies.manifest(
                request.method,
                ns,
                route.name,
                route.reference,
                authorization=authorization,
                accept=accept or None,
            )
            length = int(headers.pop("content-length", len(body)) or 0)
            content_type = headers.pop("content-type", None)
            await send_bytes(
                send,
                status,
                body,
                content_type=content_type,
                headers=headers.items(),
                head=head,
                content_length=length if head else None,
            )
        elif route.kind == "blob":
            assert route.name is not None
            assert route.reference is not None
            if not route.reference.startswith("sha256:"):
                raise OCIError(ErrorCode.UNSUPPORTED, SHA256_ONLY, status=404)
            await self._blob(
                request,
                receive,
                send,
                ns=ns,
                name=route.name,
                digest=route.reference,
                authorization=authorization,
            )
        else:
            await self._listing(request, send, ns=ns, route=route, authorization=authorization)

    async def _listing(
        self,
        request: Request,
        send: Send,
        *,
        ns: str,
        route: ApiRoute,
        authorization: str | None,
    ) -> None:
        """Tag lists and referrers (OCI distribution 1.1): the origin's answer through a proxy,
        with the caller's credentials (the origin decides, as for manifests), its next-page
        ``Link`` pointing back here; nothing is cached. A 404 stays a 404 (a registry without
        the referrers API: clients then use the tag schema)."""
        kind: ListingKind = "tags" if route.kind == "tags" else "referrers"
        params = listing_params(kind, request.query)
        accept = merge_accept(request.headers.get("accept", []))
        found = await self.proxies.listing(
            ns,
            route.name,
            route.reference if kind == "referrers" else None,
            params,
            authorization=authorization,
            accept=accept or None,
        )
        headers = listing_headers(
            found.filters_applied, found.links, request.path, ns if "ns" in request.query else None
        )
        await send_bytes(
            send,
            found.status,
            found.body,
            content_type=found.content_type,
            headers=headers,
            head=request.method == "HEAD",
        )

    async def _authorize(self, ns: str, name: str, digest: str, authorization: str | None) -> int:
        credentials = parse_basic_authorization(authorization) if authorization else None
        key = (fingerprint(credentials), ns, name, digest)
        now = trio.current_time()
        size = self.auth.get(key, now)
        if size is None:
            size, max_age = await self.proxies.authorize_blob(
                ns, name, digest, authorization=authorization
            )
            self.auth.put(key, size, now, max_age=max_age)
        return size

    async def _blob(
        self,
        request: Request,
        receive: Receive,
        send: Send,
        *,
        ns: str,
        name: str,
        digest: str,
        authorization: str | None,
    ) -> None:
        size = await self._authorize(ns, name, digest, authorization)
        try:
            byte_range = parse_range(request.header("range"), size)
        except RangeNotSatisfiableError as exc:
            raise OCIError(
                ErrorCode.RANGE_INVALID,
                str(exc),
                status=416,
                headers={"Content-Range": f"bytes */{size}"},
            ) from None
        start, end = (0, size - 1) if byte_range is None else (byte_range.start, byte_range.end)
        length = end - start + 1 if size else 0
        headers = [
            ("content-type", "application/octet-stream"),
            ("docker-content-digest", digest),
            ("accept-ranges", "bytes"),
        ]
        status = 200
        if byte_range is not None:
            status = 206
            headers.append(("content-range", byte_range.content_range(size)))
        if request.method == "HEAD":
            await send_bytes(
                send,
                status,
                b"",
                content_type=None,
                headers=headers,
                head=True,
                content_length=length,
            )
            return
        started = time.monotonic()
        repository = f"{ns}/{name}"
        with self.cache.pinned(digest):
            opened = open_cached(self.cache, digest)
            if opened is None:
                download = await self.downloads.get(
                    BlobRequest(ns, name, digest, size, authorization)
                )
                if download is not None:
                    self.metrics.cache_misses.inc()
                    send = self.metrics.timed_first_byte(send, started, "download")
                    record = self.pulls.begin(repository, digest, length, "download")

                    async def stream_download() -> None:
                        assert download is not None
                        await start_stream(send, status, headers=headers, content_length=length)
                        async for chunk in download.stream(start, end):
                            await send_chunk(send, chunk)
                            self.metrics.pull_bytes.inc(len(chunk))
                            self.pulls.add(record, len(chunk))
                        await send_chunk(send, b"", more=False)

                    outcome = "failed"
                    try:
                        finished = await self._unless_gone(receive, stream_download)
                        # A client that has every byte may hang up before the body's end
                        # is sent: that pull is done, not cancelled.
                        if finished or record.sent >= length:
                            outcome = "done"
                            self._pulled(length, started, byte_range is None)
                        else:
                            outcome = "cancelled"
                    finally:
                        self.pulls.end(record, outcome)
                    return
                opened = open_cached(self.cache, digest)
                if opened is None:
                    raise OCIError(
                        ErrorCode.BLOB_UNKNOWN, "blob vanished from the cache", status=404
                    )
            fd, _ = opened
            self.downloads.ensure_seeded(BlobRequest(ns, name, digest, size, authorization))
            record = self.pulls.begin(repository, digest, length, "cache")
            finished = False
            outcome = "failed"
            try:
                self.metrics.cache_hits.inc()
                send = self.metrics.timed_first_byte(send, started, "cache")
                self.cache.touch(digest)

                async def send_cached() -> None:
                    await start_stream(send, status, headers=headers, content_length=length)
                    await send_file_range(
                        send, fd, start, length, sent=lambda n: self.pulls.add(record, n)
                    )
                    self.metrics.pull_bytes.inc(length)

                finished = await self._unless_gone(receive, send_cached) or record.sent >= length
                outcome = "done" if finished else "cancelled"
            finally:
                os.close(fd)
                self.pulls.end(record, outcome)
        if finished:
            self._pulled(length, started, byte_range is None)

    @staticmethod
    async def _unless_gone(receive: Receive, body: Callable[[], Awaitable[None]]) -> bool:
        try:
            return await until_disconnect(receive, body)
        except BaseExceptionGroup as group:
            raise collapse(group, dropping=(trio.Cancelled,)) from None

    def _pulled(self, length: int, started: float, whole: bool) -> None:
        self.metrics.pulled()
        if whole:
            elapsed = max(time.monotonic() - started, 1e-6)
            self.metrics.pull_seconds.observe(elapsed)
            self.metrics.pull_speed.set(length / elapsed)
