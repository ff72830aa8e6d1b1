"""The proxy's ASGI application: routing and request handlers (docs/proxy-api.md).

Handlers stay thin: the origin clients talk to the registries, :class:`Authorizer` decides
who may read a blob, :class:`Manifests` resolves tags and caches manifests by digest,
:class:`BlobFetcher` gets blobs into the cache, :class:`Seeder` seeds them. Each request
carries its client's claim on origin work (:class:`OriginLimits`) down to whatever would start
origin work for it. Every failure is answered as a registry JSON error with its status.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from p2p_common.asgi import (
    Receive,
    Request,
    Scope,
    Send,
    TrackedSend,
    lifespan,
    read_body,
    send_bytes,
    send_chunk,
    send_error,
    send_file_range,
    start_stream,
    until_disconnect,
)
from p2p_common.blobcache import BlobCache
from p2p_common.errors import collapse
from p2p_common.listing import ListingKind, listing_headers, listing_params
from p2p_common.logs import PULL_ID_HEADER, event, new_pull_id, pull_context, valid_pull_id
from p2p_common.oci import ApiRoute, ErrorCode, OCIError, merge_accept, parse_api_path
from p2p_common.registry_auth import AUTH_MAX_AGE_HEADER, Credentials
from p2p_common.storage import StorageError
from p2p_proxy.api import (
    METAINFO_PATH,
    blob_digest,
    credentials_from,
    metainfo_query,
    requested_range,
    select_registry,
)
from p2p_proxy.authz import Authorizer
from p2p_proxy.fetch import BlobFetcher, Fetch, storage_error
from p2p_proxy.flight import Admission
from p2p_proxy.limits import OriginLimits
from p2p_proxy.manifests import ManifestQuery, Manifests
from p2p_proxy.metrics import ProxyMetrics
from p2p_proxy.origin import OriginClient
from p2p_proxy.preheat import ACCEPT as PREHEAT_ACCEPT
from p2p_proxy.preheat import MAX_REQUEST_BYTES as PREHEAT_REQUEST_BYTES
from p2p_proxy.preheat import Preheater, media_type_of, parse_request
from p2p_proxy.seeding import Seeder
from p2p_proxy.status import StatusView

__all__ = ["CHUNKS_CONTENT_TYPE", "ProxyApp"]

log = logging.getLogger("p2p.proxy")

PREHEAT_PATH = "/p2p/v1/preheat"
CHUNKS_CONTENT_TYPE = "application/x-p2p-chunks"
"""A blob's chunk torrents as frames (p2p_common.blobinfo)."""
BLOB_CONTENT_TYPE = "application/octet-stream"


@dataclass
class ProxyApp:
    origins: Mapping[str, OriginClient]
    """Origin clients by registry host[:port], the default first."""
    cache: BlobCache
    authorizer: Authorizer
    manifests: Manifests
    fetcher: BlobFetcher
    seeder: Seeder
    metrics: ProxyMetrics
    peer_port: Callable[[], int]
    progressive_streams: int = 1
    limits: OriginLimits | None = None
    """Limits on the origin work clients start (None: none)."""
    preheater: Preheater | None = None
    """Runs ``/p2p/v1/preheat`` jobs (None: preheat is not offered)."""
    status: StatusView | None = None
    """Builds ``/status`` (None: not offered)."""
    ready: bool = False

    def __post_init__(self) -> None:
        self._served = list(self.origins)
        self._streams: collections.Counter[str] = collections.Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request.from_scope(scope)
        # The agent's pull id (a well-formed one), else one of our own: in every log line of
        # this request and of the origin work it starts.
        pull_id = valid_pull_id(request.header(PULL_ID_HEADER)) or new_pull_id()
        with pull_context(pull_id):
            tracked = TrackedSend(send)
            try:
                await self._route(request, receive, tracked)
            except OCIError as exc:
                await self._fail(request, tracked, exc)
            except StorageError as exc:
                await self._fail(request, tracked, storage_error(exc, "opening a cached blob"))
            except Exception as exc:
                log.error("proxy.request_crashed path=%s", request.path, exc_info=exc)
                await self._fail(request, tracked, OCIError(ErrorCode.UNKNOWN, "internal error"))

    async def _fail(self, request: Request, send: TrackedSend, error: OCIError) -> None:
        self.metrics.errors.labels(code=str(error.code)).inc()
        level = logging.WARNING if error.status >= 500 else logging.DEBUG
        event(
            log,
            "proxy.request_failed",
            level,
            method=request.method,
            path=request.path,
            status=error.status,
            code=str(error.code),
            error=error.message,
        )
        if not send.started:
            await send_error(send, error, head=request.method == "HEAD")

    # --- routing ----------------------------------------------------------------------------

    async def _route(self, request: Request, receive: Receive, send: Send) -> None:
        path, method = request.path, request.method
        if path in ("/healthz", "/readyz", "/metrics", "/status", METAINFO_PATH):
            if method not in ("GET", "HEAD"):
                raise OCIError(ErrorCode.UNSUPPORTED, f"{method} is not supported here")
            if path == "/healthz":
                await send_bytes(
                    send, 200, b"ok\n", content_type="text/plain", head=method == "HEAD"
                )
            elif path == "/readyz":
                await self._readyz(send, head=method == "HEAD")
            elif path == "/metrics":
                body, content_type = self.metrics.render(
                    ", ".join(request.headers.get("accept", []))
                )
                await send_bytes(send, 200, body, content_type=content_type, head=method == "HEAD")
            elif path == "/status":
                if self.status is None:
                    raise OCIError(ErrorCode.UNSUPPORTED, "no status here", status=404)
                body = json.dumps(self.status.snapshot(), separators=(",", ":")).encode()
                await send_bytes(send, 200, body, head=method == "HEAD")
            else:
                await self._metainfo(request, receive, send)
            return
        if path == PREHEAT_PATH or path.startswith(PREHEAT_PATH + "/"):
            await self._preheat(request, receive, send)
            return
        if method not in ("GET", "HEAD") and (path == "/v2" or path.startswith("/v2/")):
            raise OCIError(ErrorCode.UNSUPPORTED, "this proxy serves pulls only (GET and HEAD)")
        route = parse_api_path(path)  # 404 UNSUPPORTED for anything outside /v2/
        registry = select_registry(request.query, self._served)
        origin = self.origins[registry]
        if route.kind == "ping":
            await send_bytes(send, 200, b"{}", head=method == "HEAD")
        elif route.kind == "manifest":
            await self._manifest(request, send, origin, route)
        elif route.kind == "blob" and method == "HEAD":
            await self._blob_head(request, send, origin, route)
        elif route.kind == "blob":
            await self._blob_get(request, receive, send, origin, route)
        else:
            await self._listing(request, send, origin, route)

    # --- preheat ----------------------------------------------------------------------------

    async def _preheat(self, request: Request, receive: Receive, send: Send) -> None:
        """``POST /p2p/v1/preheat`` starts a job (202); ``GET`` lists the jobs, or shows one."""
        if self.preheater is None:
            raise OCIError(ErrorCode.UNSUPPORTED, "preheat is not offered here", status=404)
        preheater = self.preheater
        rest = request.path[len(PREHEAT_PATH) :].strip("/")
        if request.method == "GET":
            if not rest:
                views = [job.view() for job in reversed(preheater.jobs.values())]
                await send_bytes(send, 200, json.dumps({"jobs": views}).encode())
                return
            job = preheater.jobs.get(int(rest)) if rest.isdigit() else None
            if job is None:
                raise OCIError(ErrorCode.UNSUPPORTED, "no such preheat job", status=404)
            await send_bytes(send, 200, json.dumps(job.view()).encode())
            return
        if request.method != "POST" or rest:
            raise OCIError(ErrorCode.UNSUPPORTED, f"{request.method} is not supported here")
        repository, reference, platforms = parse_request(
            await read_body(receive, PREHEAT_REQUEST_BYTES)
        )
        registry = select_registry(request.query, self._served)
        origin = self.origins[registry]
        admission = self._admission(request)

        async def get_manifest(
            repo: str, ref: str, credentials: Credentials | None
        ) -> tuple[str, bytes]:
            found = await origin.get_manifest(repo, ref, credentials, accept=PREHEAT_ACCEPT)
            return media_type_of(found.content_type, found.body), found.body

        async def ensure_blob(
            repo: str, digest: str, size: int, credentials: Credentials | None
        ) -> bool:
            await self.authorizer.authorize(origin, repo, digest, credentials)
            fetched = digest not in self.cache
            with self.cache.pinned(digest):
                meta = await self.fetcher.ensure(
                    origin, repo, digest, credentials, size, admission=admission
                )
                await self.seeder.seed(digest, meta)
            return fetched

        job = preheater.start(
            registry=registry,
            repository=repository,
            reference=reference,
            platforms=platforms,
            credentials=credentials_from(request.headers),
            get_manifest=get_manifest,
            ensure_blob=ensure_blob,
        )
        await send_bytes(
            send,
            202,
            json.dumps(job.view()).encode(),
            headers=[("Location", f"{PREHEAT_PATH}/{job.id}")],
        )

    def _admission(self, request: Request) -> Admission | None:
        """The request's claim on origin work: its client's limits."""
        return None if self.limits is None else self.limits.requester(request.client)

    async def _readyz(self, send: Send, *, head: bool) -> None:
        body = {"ready": self.ready, "peerPort": self.peer_port(), "registries": self._served}
        await send_bytes(send, 200 if self.ready else 503, json.dumps(body).encode(), head=head)

    # --- manifests --------------------------------------------------------------------------

    async def _manifest(
        self, request: Request, send: Send, origin: OriginClient, route: ApiRoute
    ) -> None:
        head = request.method == "HEAD"
        accept = request.headers.get("accept")  # every Accept line, merged below
        query = ManifestQuery(
            origin,
            route.name,
            route.reference,
            credentials_from(request.headers),
            merge_accept(accept) if accept else None,
            self._admission(request),
        )
        found = await self.manifests.fetch(query, head=head)
        headers = [] if found.digest is None else [("Docker-Content-Digest", found.digest)]
        await send_bytes(
            send,
            found.status,
            found.body,
            content_type=found.content_type or None,
            headers=headers,
            head=head,
            content_length=found.size if head else None,
        )

    # --- tag lists and referrers ------------------------------------------------------------

    async def _listing(
        self, request: Request, send: Send, origin: OriginClient, route: ApiRoute
    ) -> None:
        """``GET /v2/<name>/tags/list`` and ``/v2/<name>/referrers/<digest>``: the origin's
        answer for the caller's credentials (the origin decides, as for manifests), passed on
        with its next-page ``Link`` rewritten to this API; never cached."""
        kind: ListingKind = "tags" if route.kind == "tags" else "referrers"
        params = listing_params(kind, request.query)
        credentials = credentials_from(request.headers)
        accept = request.headers.get("accept")
        admission = self._admission(request)
        ended = None if admission is None else admission.admit()
        try:
            self.metrics.listing_requests.labels(kind=kind).inc()
            found = await origin.get_listing(
                route.name,
                route.reference if kind == "referrers" else None,
                credentials,
                params,
                accept=merge_accept(accept) if accept else None,
            )
        finally:
            if ended is not None:
                ended()
        ns = origin.name if "ns" in request.query else None
        headers = listing_headers(found.filters_applied, found.links, request.path, ns)
        await send_bytes(
            send,
            found.status,
            found.body,
            content_type=found.content_type or "application/json",
            headers=headers,
            head=request.method == "HEAD",
        )

    # --- blobs ------------------------------------------------------------------------------

    async def _authorize(
        self, request: Request, origin: OriginClient, name: str, digest: str
    ) -> tuple[Credentials | None, int | None]:
        credentials = credentials_from(request.headers)
        size = await self.authorizer.authorize(origin, name, digest, credentials)
        return credentials, size

    async def _blob_head(
        self, request: Request, send: Send, origin: OriginClient, route: ApiRoute
    ) -> None:
        size, max_age = await self.authorizer.grant(
            origin, route.name, route.reference, credentials_from(request.headers)
        )
        if size is None and route.reference.startswith("sha256:"):
            size = self.cache.size(route.reference)
        headers = [
            ("Docker-Content-Digest", route.reference),
            ("Accept-Ranges", "bytes"),
            (AUTH_MAX_AGE_HEADER, f"{max_age:.3f}"),
        ]
        if size is not None:
            await send_bytes(
                send,
                200,
                b"",
                content_type=BLOB_CONTENT_TYPE,
                headers=headers,
                head=True,
                content_length=size,
            )
            return
        # The origin granted access without telling the size: answer without a length.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", BLOB_CONTENT_TYPE.encode()),
                    *((k.lower().encode(), v.encode()) for k, v in headers),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def _blob_get(
        self,
        request: Request,
        receive: Receive,
        send: Send,
        origin: OriginClient,
        route: ApiRoute,
    ) -> None:
        digest = blob_digest(route.reference)
        credentials, size = await self._authorize(request, origin, route.name, digest)
        with self.cache.pinned(digest):
            meta = await self.fetcher.ensure(
                origin, route.name, digest, credentials, size, admission=self._admission(request)
            )
            await self.seeder.seed(digest, meta)
            total = meta.length
            wanted = requested_range(request.header("range"), total)
            headers = [
                ("Content-Type", BLOB_CONTENT_TYPE),
                ("Docker-Content-Digest", digest),
                ("Accept-Ranges", "bytes"),
            ]
            status, offset, length = 200, 0, total
            if wanted is not None:
                status, offset, length = 206, wanted.start, wanted.length
                headers.append(("Content-Range", wanted.content_range(total)))
            path = self.cache.blob_path(digest)
            try:
                fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise storage_error(exc, "opening a cached blob") from None
            try:
                await start_stream(send, status, headers=headers, content_length=length)
                await self._send_file(receive, send, fd, offset, length)
            finally:
                os.close(fd)

    async def _send_file(
        self, receive: Receive, send: Send, fd: int, offset: int, length: int
    ) -> None:
        """Body bytes from ``fd``, a bounded chunk at a time; stops if the client hangs up."""

        async def body() -> None:
            await send_file_range(send, fd, offset, length, sent=self.metrics.fallback_bytes.inc)

        try:
            await until_disconnect(receive, body)
        except BaseExceptionGroup as group:
            raise collapse(group, dropping=(trio.Cancelled,)) from None

    # --- metainfo ---------------------------------------------------------------------------

    async def _stream_progress(
        self, receive: Receive, send: Send, digest: str, fetch: Fetch
    ) -> None:
        """The blob itself while its fetch is still running: bytes as the origin sends them.

        For the first ``progressiveStreams`` agents asking for a blob nobody has yet: they get
        their first bytes at once, straight from the fetch, and seed it afterwards.
        """
        try:
            fd = await trio.to_thread.run_sync(os.open, fetch.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise OCIError(
                ErrorCode.UNKNOWN, "the fetch ended meanwhile; ask again", status=503
            ) from None
        self.metrics.progressive_streams.inc()
        try:
            await start_stream(
                send,
                200,
                headers=[
                    ("Content-Type", BLOB_CONTENT_TYPE),
                    ("Docker-Content-Digest", digest),
                    ("X-P2P-Stream", "1"),
                ],
                content_length=fetch.length,
            )

            async def body() -> None:
                sent = 0
                # The last byte waits for the digest check: a wrong blob never arrives complete.
                async for data in fetch.ingest.follow(fd):
                    sent += len(data)
                    self.metrics.stream_bytes.inc(len(data))  # before: the send may be cut short
                    await send_chunk(send, data, more=sent < fetch.length)
                if fetch.length == 0:
                    await send_chunk(send, b"", more=False)

            try:
                await until_disconnect(receive, body)
            except BaseExceptionGroup as group:
                raise collapse(group, dropping=(trio.Cancelled,)) from None
        finally:
            os.close(fd)

    async def _stream_chunks(self, receive: Receive, send: Send, fetch: Fetch) -> None:
        """The chunks of a blob being fetched, each as soon as it is published (the last one
        once the blob is verified). A fetch that fails before the first chunk is an error
        answer; one that fails later cuts the response off unfinished, so the agent cannot
        take it for a whole answer."""
        while not fetch.blob.chunks and not fetch.ended:
            await fetch.changed.wait()
        if not fetch.blob.chunks:
            if fetch.error is not None:
                raise fetch.error.copy()
            raise OCIError(ErrorCode.UNKNOWN, "the origin fetch failed", status=502)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CHUNKS_CONTENT_TYPE.encode()),
                    (b"docker-content-digest", fetch.digest.encode()),
                    (b"x-p2p-chunks", str(fetch.blob.geometry.num_chunks).encode()),
                    (b"x-p2p-info-hash", fetch.blob.info_hash.hex().encode()),
                    (b"x-p2p-peer-port", str(self.peer_port()).encode()),
                    (b"docker-distribution-api-version", b"registry/2.0"),
                ],
            }
        )

        async def body() -> None:
            sent = 0
            while True:
                changed = fetch.changed
                if len(fetch.blob.chunks) > sent:
                    frames = fetch.blob.frames(sent)
                    sent = len(fetch.blob.chunks)
                    await send_chunk(send, frames)
                elif fetch.ended:
                    if fetch.failed:
                        raise OCIError(ErrorCode.UNKNOWN, "the origin fetch failed", status=502)
                    await send_chunk(send, b"", more=False)
                    return
                else:
                    await changed.wait()

        try:
            await until_disconnect(receive, body)
        except BaseExceptionGroup as group:
            raise collapse(group, dropping=(trio.Cancelled,)) from None

    async def _metainfo(self, request: Request, receive: Receive, send: Send) -> None:
        if request.method != "GET":
            raise OCIError(ErrorCode.UNSUPPORTED, "metainfo is fetched with GET")
        name, digest = metainfo_query(request.query)
        registry = select_registry(request.query, self._served)
        origin = self.origins[registry]
        credentials, size = await self._authorize(request, origin, name, digest)
        admission = self._admission(request)
        if (
            request.param("stream") == "1"
            and digest not in self.cache
            and self._streams[digest] < self.progressive_streams
        ):
            self._streams[digest] += 1  # hold the slot while the fetch gets going
            try:
                fetch = await self.fetcher.follow(
                    origin, name, digest, credentials, size, admission=admission
                )
                if fetch is not None:
                    await self._stream_progress(receive, send, digest, fetch)
                    return
            finally:
                self._streams[digest] -= 1
                if self._streams[digest] <= 0:
                    del self._streams[digest]
        self.metrics.metainfo_requests.inc()
        with self.cache.pinned(digest):
            blob = await self.fetcher.cached(digest)
            if blob is None:
                fetch = await self.fetcher.follow(
                    origin, name, digest, credentials, size, admission=admission
                )
                if fetch is not None:
                    self.metrics.cache_misses.inc()
                    event(log, "proxy.chunks", logging.DEBUG, digest=digest, following=True)
                    await self._stream_chunks(receive, send, fetch)
                    return
                blob = await self.fetcher.ensure(
                    origin, name, digest, credentials, size, admission=admission
                )
            await self.seeder.seed(digest, blob)
        event(
            log,
            "proxy.metainfo",
            logging.DEBUG,
            registry=registry,
            repository=name,
            digest=digest,
            chunks=len(blob.chunks),
        )
        await send_bytes(
            send,
            200,
            blob.frames(),
            content_type=CHUNKS_CONTENT_TYPE,
            headers=[
                ("Docker-Content-Digest", digest),
                ("X-P2P-Chunks", str(blob.geometry.num_chunks)),
                ("X-P2P-Info-Hash", blob.info_hash.hex()),
                # Where this proxy seeds it: agents connect at once, tracker or not.
                ("X-P2P-Peer-Port", str(self.peer_port())),
            ],
        )
