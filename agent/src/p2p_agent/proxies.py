"""The agent's client for the p2p-proxy API (docs/proxy-api.md).

Every request goes to the proxy ranked first for its key by rendezvous hashing over
all proxy instances (a headless Service name expands to one instance per address);
when that proxy cannot be reached or answers 5xx, the next one is tried. Answers
that speak for the origin (401, 403, 404, ...) are final and come back as
:class:`~p2p_common.oci.OCIError`. The caller's ``Authorization`` header is passed
through unchanged and never stored.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import trio

from p2p_common import metainfo as mi
from p2p_common.discovery import Resolver
from p2p_common.logs import event
from p2p_common.oci import ErrorCode, OCIError, known_code, parse_error_body

log = logging.getLogger("p2p.agent.proxies")

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_PASS_HEADERS = ("content-type", "docker-content-digest", "content-length", "etag")


def _error_from(response: httpx.Response, what: str) -> OCIError:
    entries = parse_error_body(response.content)
    code = known_code(entries)
    message = entries[0].message if entries else f"{what}: proxy answered {response.status_code}"
    if code is None:
        code = {
            401: ErrorCode.UNAUTHORIZED,
            403: ErrorCode.DENIED,
            404: ErrorCode.BLOB_UNKNOWN if "blob" in what else ErrorCode.MANIFEST_UNKNOWN,
            429: ErrorCode.TOOMANYREQUESTS,
        }.get(response.status_code, ErrorCode.UNKNOWN)
    return OCIError(code, message, status=response.status_code)


@dataclass(frozen=True)
class SwarmSource:
    """A blob to get from the swarm: its metainfo and the proxy that seeds it (if it said)."""

    meta: mi.Metainfo
    seed: tuple[str, int] | None


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

    async def _send(
        self,
        method: str,
        path: str,
        *,
        key: bytes,
        params: dict[str, str],
        headers: Iterable[tuple[str, str]] = (),
    ) -> httpx.Response:
        last: str = "no proxy instances"
        for base in await self.resolver.ranked(key, self.urls):
            try:
                response = await self.client.request(
                    method, base + path, params=params, headers=list(headers)
                )
            except httpx.HTTPError as exc:
                last = f"{base}: {exc or type(exc).__name__}"
                event(log, "proxy.unreachable", logging.WARNING, proxy=base, error=last)
                continue
            if response.status_code >= 500:
                last = f"{base}: {response.status_code}"
                event(log, "proxy.failed", logging.WARNING, proxy=base, status=response.status_code)
                continue
            return response
        raise OCIError(ErrorCode.UNKNOWN, f"no proxy could answer ({last})", status=502)

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

    async def authorize_blob(
        self, ns: str, name: str, digest: str, *, authorization: str | None
    ) -> int:
        """Ask the origin (through a proxy) whether the caller may read this blob; its size."""
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
            return int(response.headers["content-length"])
        except (KeyError, ValueError):
            raise OCIError(ErrorCode.UNKNOWN, "proxy gave no blob size", status=502) from None

    async def metainfo(
        self, ns: str, name: str, digest: str, size: int, *, authorization: str | None
    ) -> mi.Metainfo:
        response = await self._send(
            "GET",
            "/p2p/v1/metainfo",
            key=digest.encode(),
            params={"ns": ns, "name": name, "digest": digest},
            headers=self._auth(authorization),
        )
        if response.status_code >= 400:
            raise _error_from(response, "blob")
        return self._metainfo(response.content, digest, size)

    @asynccontextmanager
    async def source(
        self, ns: str, name: str, digest: str, size: int, *, authorization: str | None
    ) -> AsyncIterator[SwarmSource | httpx.Response]:
        """Where a cold blob comes from: its metainfo (join the swarm), or, while the proxy
        is still fetching it from the origin and has a stream slot free, an open response
        streaming the blob itself (``X-P2P-Stream: 1``)."""
        params = {"ns": ns, "name": name, "digest": digest, "stream": "1"}
        async with self._open_ranked(digest, "/p2p/v1/metainfo", params, authorization) as (
            base,
            response,
        ):
            if response.headers.get("x-p2p-stream") == "1":
                _check_length(response, size)
                yield response
                return
            body = await response.aread()
            yield SwarmSource(self._metainfo(body, digest, size), _seed(base, response))

    @asynccontextmanager
    async def blob(
        self, ns: str, name: str, digest: str, size: int, *, authorization: str | None
    ) -> AsyncIterator[httpx.Response]:
        """An open response streaming the whole blob from the proxy ranked first for it (the
        next one when a proxy cannot answer)."""
        path = f"/v2/{name}/blobs/{digest}"
        async with self._open_ranked(digest, path, {"ns": ns}, authorization) as (_, response):
            if response.status_code != 200:
                raise OCIError(ErrorCode.UNKNOWN, "proxy sent part of a blob", status=502)
            _check_length(response, size)
            yield response

    @asynccontextmanager
    async def _open_ranked(
        self, digest: str, path: str, params: dict[str, str], authorization: str | None
    ) -> AsyncIterator[tuple[str, httpx.Response]]:
        """(proxy, open streaming response) of the first proxy, in rendezvous order for
        ``digest``, that answers without a 5xx; its 4xx is raised as the registry error."""
        last = "no proxy instances"
        for base in await self.resolver.ranked(digest.encode(), self.urls):
            request = self.client.build_request(
                "GET", base + path, params=params, headers=self._auth(authorization)
            )
            try:
                response = await self.client.send(request, stream=True)
            except httpx.HTTPError as exc:
                last = f"{base}: {exc or type(exc).__name__}"
                event(log, "proxy.unreachable", logging.WARNING, proxy=base, error=last)
                continue
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
        raise OCIError(ErrorCode.UNKNOWN, f"no proxy could answer ({last})", status=502)

    @staticmethod
    def _metainfo(body: bytes, digest: str, size: int) -> mi.Metainfo:
        try:
            meta = mi.parse(body)
        except mi.MetainfoError as exc:
            raise OCIError(
                ErrorCode.UNKNOWN, f"proxy sent bad metainfo: {exc}", status=502
            ) from None
        if meta.name != digest or meta.length != size:
            raise OCIError(ErrorCode.UNKNOWN, "proxy sent metainfo for another blob", status=502)
        return meta

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
