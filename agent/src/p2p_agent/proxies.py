"""The agent's client for the p2p-proxy API (docs/proxy-api.md).

Every request goes to the proxy ranked first for its key by rendezvous hashing over
all proxy instances (a headless Service name expands to one instance per address);
when that proxy cannot be reached or answers 5xx, the next one is tried. Answers
that speak for the origin (401, 403, 404, ...) are final and come back as
:class:`~p2p_common.oci.OCIError`. The caller's ``Authorization`` header is passed
through unchanged and never stored. Every request carries the pull id of the task that sends
it (``X-P2P-Pull-Id``, :mod:`p2p_common.logs`), so the proxy's log lines name the same pull.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import trio

from p2p_common import metainfo as mi
from p2p_common.blobinfo import BlobMetainfo, FrameParser
from p2p_common.discovery import Resolver
from p2p_common.listing import MAX_LISTING_BYTES
from p2p_common.logs import PULL_ID_HEADER, current_pull_id, event
from p2p_common.oci import ErrorCode, OCIError, known_code, parse_error_body
from p2p_common.registry_auth import AUTH_MAX_AGE_HEADER

log = logging.getLogger("p2p.agent.proxies")

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_PASS_HEADERS = ("content-type", "docker-content-digest", "content-length", "etag")


def _error_from(response: httpx.Response, what: str) -> OCIError:
    """The registry error for a proxy's 4xx/5xx answer (a ``HEAD`` answer has no body).

    A refusal the agent cannot explain to its caller (a 4xx without a known code, or with
    ``UNKNOWN``) is the proxy's disagreement with the agent, not the caller's mistake: 502.
    """
    status = response.status_code
    entries = parse_error_body(response.content)
    code = known_code(entries)
    message = entries[0].message if entries else f"{what}: proxy answered {status}"
    if code is None:
        code = {
            401: ErrorCode.UNAUTHORIZED,
            403: ErrorCode.DENIED,
            404: ErrorCode.BLOB_UNKNOWN if "blob" in what else ErrorCode.MANIFEST_UNKNOWN,
            429: ErrorCode.TOOMANYREQUESTS,
        }.get(status, ErrorCode.UNKNOWN)
    if (code is ErrorCode.UNKNOWN and status < 500) or status > 599:
        return OCIError(ErrorCode.UNKNOWN, f"{what}: proxy answered {status}", status=502)
    return OCIError(code, message, status=status)


class ChunkFeed:
    """A blob's chunks arriving over an open response (the proxy publishes them while it
    fetches the blob), checked to belong to the blob and to come in order."""

    def __init__(self, blob: BlobMetainfo, body: AsyncIterator[bytes] | None) -> None:
        self.blob = blob
        self._body = body
        self._parser = FrameParser()
        self._skip = len(blob.chunks)
        """Chunks the stream will repeat first (a stream reopened after a break)."""

    async def next_chunks(self) -> int:
        """Wait for more chunks; returns how many were added (0: the stream ended)."""
        if self._body is None:
            return 0
        try:
            while True:
                try:
                    data = await self._body.__anext__()
                except StopAsyncIteration:
                    self._body = None
                    if self._parser.pending:
                        raise _bad("proxy cut a chunk frame short") from None
                    return 0
                added = 0
                for chunk in self._parser.feed(data):
                    if self._skip:
                        known = self.blob.chunks[len(self.blob.chunks) - self._skip]
                        if known.info_hash != chunk.info_hash:
                            raise _bad("proxy sent other chunks than before")
                        self._skip -= 1
                        continue
                    if not self.blob.chunks:  # announce where the proxy's chunks say
                        self.blob.trackers = chunk.trackers
                    self.blob.add_chunk(chunk)
                    added += 1
                if added:
                    return added
        except mi.MetainfoError as exc:
            raise _bad(f"proxy sent bad chunks: {exc}") from None
        except httpx.HTTPError as exc:
            raise OCIError(ErrorCode.UNKNOWN, f"chunk stream broke: {exc}", status=502) from None


class ProxiesUnreachableError(OCIError):
    """No proxy answered at all (every one refused the connection or broke it): they may be
    restarting, unlike a proxy that answers with an error."""

    def __init__(self, last: str) -> None:
        super().__init__(ErrorCode.UNKNOWN, f"no proxy could answer ({last})", status=502)


def _bad(message: str) -> OCIError:
    return OCIError(ErrorCode.UNKNOWN, message, status=502)


@dataclass(frozen=True)
class Listing:
    """A tag list or referrers index as a proxy answered it."""

    status: int
    content_type: str
    filters_applied: str | None
    links: list[str]
    body: bytes


@dataclass
class SwarmSource:
    """A blob to get from the swarm: its chunks so far (more may follow on ``feed``), and the
    proxy that seeds it (if it said)."""

    feed: ChunkFeed
    seed: tuple[str, int] | None

    @property
    def blob(self) -> BlobMetainfo:
        return self.feed.blob


def _pull_id_header() -> list[tuple[str, str]]:
    """The pull this request is for (the proxy logs it with everything it does for it)."""
    pull_id = current_pull_id()
    return [] if pull_id is None else [(PULL_ID_HEADER, pull_id)]


def _check_length(response: httpx.Response, size: int) -> None:
    """A whole-blob response must announce exactly the blob's size."""
    length = response.headers.get("content-length", "")
    if not length.isdigit() or int(length) != size:
        raise OCIError(ErrorCode.UNKNOWN, "proxy sends a blob of another size", status=502)


def _seed(base: str, response: httpx.Response) -> tuple[str, int] | None:
    """The proxy's BitTorrent address: its API host and the peer port it announced."""
    port = response.headers.get("x-p2p-peer-port", "")
    host = urllib.parse.urlsplit(base).hostname
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        return None
    return host, int(port)


class ProxyClient:
    def __init__(
        self,
        urls: Sequence[str],
        client: httpx.AsyncClient,
        *,
        resolver: Resolver | None = None,
    ) -> None:
        if not urls:
            raise ValueError("no proxies configured")
        self.urls = [u.rstrip("/") for u in urls]
        self.client = client
        self.resolver = resolver or Resolver()
        self.health: dict[str, tuple[bool, str, float]] = {}
        """Per proxy instance (address): (answered, what happened, Unix time) of the last
        request, for the status view."""

    def _note(self, base: str, ok: bool, detail: str) -> None:
        self.health[base] = (ok, detail, time.time())

    async def _send(
        self,
        method: str,
        path: str,
        *,
        key: bytes,
        params: dict[str, str] | httpx.QueryParams,
        headers: Iterable[tuple[str, str]] = (),
    ) -> httpx.Response:
        last: str = "no proxy instances"
        for base in await self.resolver.ranked(key, self.urls):
            try:
                response = await self.client.request(
                    method,
                    base + path,
                    params=params,
                    headers=[*headers, *_pull_id_header()],
                    extensions=self._tls_name(base),
                )
            except httpx.HTTPError as exc:
                last = f"{base}: {exc or type(exc).__name__}"
                event(log, "proxy.unreachable", logging.WARNING, proxy=base, error=last)
                self._note(base, False, f"unreachable: {exc or type(exc).__name__}")
                continue
            if response.status_code >= 500:
                last = f"{base}: {response.status_code}"
                event(log, "proxy.failed", logging.WARNING, proxy=base, status=response.status_code)
                self._note(base, False, f"answered {response.status_code}")
                continue
            self._note(base, True, f"answered {response.status_code}")
            return response
        raise OCIError(ErrorCode.UNKNOWN, f"no proxy could answer ({last})", status=502)

    def _tls_name(self, base: str) -> dict[str, str]:
        """For an https proxy reached at one of its addresses: the host name its certificate
        must carry (SNI and verification), not the address."""
        name = self.resolver.host_name(base)
        if name is None or not base.startswith("https://"):
            return {}
        return {"sni_hostname": name}

    @staticmethod
    def _auth(authorization: str | None) -> list[tuple[str, str]]:
        return [("authorization", authorization)] if authorization else []

    async def manifest(
        self,
        method: str,
        ns: str,
        name: str,
        reference: str,
        *,
        authorization: str | None,
        accept: str | None,
    ) -> tuple[int, dict[str, str], bytes]:
        """The origin's manifest answer: status, headers to pass on, body."""
        headers = self._auth(authorization)
        if accept:
            headers.append(("accept", accept))
        response = await self._send(
            method,
            f"/v2/{name}/manifests/{reference}",
            key=f"{ns}/{name}".encode(),
            params={"ns": ns},
            headers=headers,
        )
        if response.status_code >= 400:
            raise _error_from(response, "manifest")
        if len(response.content) > MAX_MANIFEST_BYTES:
            raise OCIError(ErrorCode.MANIFEST_INVALID, "manifest too large", status=502)
        passed = {k: v for k, v in response.headers.items() if k.lower() in _PASS_HEADERS}
        return response.status_code, passed, response.content

    async def listing(
        self,
        ns: str,
        name: str,
        digest: str | None,
        params: Sequence[tuple[str, str]],
        *,
        authorization: str | None,
        accept: str | None,
    ) -> Listing:
        """The origin's tag list of ``name`` (``digest`` None) or referrers of ``digest``, as a
        proxy passes it on (its ``Link`` lines still name the proxy's API)."""
        headers = self._auth(authorization)
        if accept:
            headers.append(("accept", accept))
        path = f"/v2/{name}/tags/list" if digest is None else f"/v2/{name}/referrers/{digest}"
        response = await self._send(
            "GET",
            path,
            key=f"{ns}/{name}".encode(),
            params=httpx.QueryParams([("ns", ns), *params]),
            headers=headers,
        )
        what = "tag list" if digest is None else "referrers"
        if response.status_code >= 400:
            raise _error_from(response, what)
        if len(response.content) > MAX_LISTING_BYTES:
            raise OCIError(
                ErrorCode.UNKNOWN, f"{what} larger than {MAX_LISTING_BYTES} bytes", status=502
            )
        return Listing(
            status=response.status_code,
            content_type=response.headers.get("content-type", "application/json"),
            filters_applied=response.headers.get("oci-filters-applied"),
            links=response.headers.get_list("link"),
            body=response.content,
        )

    async def authorize_blob(
        self, ns: str, name: str, digest: str, *, authorization: str | None
    ) -> tuple[int, float | None]:
        """Ask the origin (through a proxy) whether the caller may read this blob: its size,
        and how long the proxy's grant may still be reused (None if it did not say)."""
        response = await self._send(
            "HEAD",
            f"/v2/{name}/blobs/{digest}",
            key=digest.encode(),
            params={"ns": ns},
            headers=self._auth(authorization),
        )
        if response.status_code >= 400:
            raise _error_from(response, "blob")
        try:
            size = int(response.headers["content-length"])
        except (KeyError, ValueError):
            raise OCIError(ErrorCode.UNKNOWN, "proxy gave no blob size", status=502) from None
        return size, _max_age(response.headers.get(AUTH_MAX_AGE_HEADER))

    async def metainfo(
        self, ns: str, name: str, digest: str, size: int, *, authorization: str | None
    ) -> BlobMetainfo:
        """Every chunk of a blob (waiting for the proxy to publish them all)."""
        async with self.chunks(ns, name, digest, size, authorization=authorization) as source:
            while not source.blob.complete:
                if not await source.feed.next_chunks():
                    raise _bad("proxy ended the chunk stream early")
            return source.blob

    @asynccontextmanager
    async def chunks(
        self,
        ns: str,
        name: str,
        digest: str,
        size: int,
        *,
        authorization: str | None,
        known: BlobMetainfo | None = None,
    ) -> AsyncIterator[SwarmSource]:
        """The blob's chunks as the proxy publishes them: the first chunk (or, given
        ``known`` chunks, the next one) is there when this enters; more follow on the
        source's feed while the response stays open."""
        async with self._chunk_response(ns, name, digest, authorization, stream=False) as (
            base,
            response,
        ):
            blob = known or BlobMetainfo.for_blob(digest, size)
            feed = ChunkFeed(blob, response.aiter_bytes())
            source = SwarmSource(feed, _seed(base, response))
            await self._first_chunks(source, blob)
            yield source

    async def _first_chunks(self, source: SwarmSource, blob: BlobMetainfo) -> None:
        before = len(blob.chunks)
        while len(blob.chunks) == before and not blob.complete:
            if not await source.feed.next_chunks():
                raise _bad("proxy ended the chunk stream early")

    @asynccontextmanager
    async def _chunk_response(
        self, ns: str, name: str, digest: str, authorization: str | None, *, stream: bool
    ) -> AsyncIterator[tuple[str, httpx.Response]]:
        params = {"ns": ns, "name": name, "digest": digest}
        if stream:
            params["stream"] = "1"
        async with self._open_ranked(digest, "/p2p/v1/metainfo", params, authorization) as found:
            yield found

    @asynccontextmanager
    async def source(
        self, ns: str, name: str, digest: str, size: int, *, authorization: str | None
    ) -> AsyncIterator[SwarmSource | httpx.Response]:
        """Where a cold blob comes from: its chunks (join the swarm; more chunks follow while
        the proxy fetches the blob), or, while the proxy is still fetching it from the origin
        and has a stream slot free, an open response streaming the blob itself
        (``X-P2P-Stream: 1``)."""
        async with self._chunk_response(ns, name, digest, authorization, stream=True) as (
            base,
            response,
        ):
            if response.headers.get("x-p2p-stream") == "1":
                _check_length(response, size)
                yield response
                return
            blob = BlobMetainfo.for_blob(digest, size)
            source = SwarmSource(ChunkFeed(blob, response.aiter_bytes()), _seed(base, response))
            await self._first_chunks(source, blob)
            yield source

    @asynccontextmanager
    async def blob(
        self,
        ns: str,
        name: str,
        digest: str,
        size: int,
        *,
        authorization: str | None,
        start: int = 0,
    ) -> AsyncIterator[httpx.Response]:
        """An open response streaming the blob from byte ``start`` on, from the proxy ranked
        first for it (the next one when a proxy cannot answer)."""
        path = f"/v2/{name}/blobs/{digest}"
        extra = [("range", f"bytes={start}-")] if start else []
        async with self._open_ranked(
            digest, path, {"ns": ns}, authorization, extra_headers=extra
        ) as (_, response):
            if start:
                if (
                    response.status_code != 206
                    or response.headers.get("content-range") != f"bytes {start}-{size - 1}/{size}"
                ):
                    raise OCIError(ErrorCode.UNKNOWN, "proxy sent another range", status=502)
                _check_length(response, size - start)
            else:
                if response.status_code != 200:
                    raise OCIError(ErrorCode.UNKNOWN, "proxy sent part of a blob", status=502)
                _check_length(response, size)
            yield response

    @asynccontextmanager
    async def _open_ranked(
        self,
        digest: str,
        path: str,
        params: dict[str, str],
        authorization: str | None,
        *,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> AsyncIterator[tuple[str, httpx.Response]]:
        """(proxy, open streaming response) of the first proxy, in rendezvous order for
        ``digest``, that answers without a 5xx; its 4xx is raised as the registry error, and
        :class:`ProxiesUnreachableError` when none answered at all."""
        last = "no proxy instances"
        answered = False
        for base in await self.resolver.ranked(digest.encode(), self.urls):
            request = self.client.build_request(
                "GET",
                base + path,
                params=params,
                headers=[*self._auth(authorization), *extra_headers, *_pull_id_header()],
                extensions=self._tls_name(base),
            )
            try:
                response = await self.client.send(request, stream=True)
            except httpx.HTTPError as exc:
                last = f"{base}: {exc or type(exc).__name__}"
                event(log, "proxy.unreachable", logging.WARNING, proxy=base, error=last)
                self._note(base, False, f"unreachable: {exc or type(exc).__name__}")
                continue
            answered = True
            self._note(base, response.status_code < 500, f"answered {response.status_code}")
            try:
                if response.status_code >= 500:
                    last = f"{base}: {response.status_code}"
                    continue
                if response.status_code >= 400:
                    await response.aread()
                    raise _error_from(response, "blob")
                yield base, response
                return
            finally:
                await response.aclose()
        if not answered:
            raise ProxiesUnreachableError(last)
        raise OCIError(ErrorCode.UNKNOWN, f"no proxy could answer ({last})", status=502)

    async def blob_range(
        self, ns: str, name: str, digest: str, start: int, length: int, *, authorization: str | None
    ) -> bytes:
        """Bytes ``[start, start+length)`` of a blob over HTTP (the fallback path)."""
        headers = self._auth(authorization)
        headers.append(("range", f"bytes={start}-{start + length - 1}"))
        with trio.fail_after(120):
            response = await self._send(
                "GET",
                f"/v2/{name}/blobs/{digest}",
                key=digest.encode(),
                params={"ns": ns},
                headers=headers,
            )
        if response.status_code >= 400:
            raise _error_from(response, "blob")
        data = response.content
        if response.status_code != 206 or len(data) != length:
            raise OCIError(ErrorCode.UNKNOWN, "proxy sent a short range", status=502)
        return data


def _max_age(value: str | None) -> float | None:
    """The proxy's ``X-P2P-Auth-Max-Age``: seconds, or None when absent or unreadable (then
    the agent's own ``authCacheTtl`` applies)."""
    if value is None or len(value) > 32:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
