"""Finding every instance behind a service URL, and choosing among them.

A URL whose host name resolves to several addresses (a headless Service in
Kubernetes) stands for one instance per address. :class:`Resolver` expands such
URLs (cached for a short time, last good answer kept when DNS fails) and
:func:`ranked` orders the instances for a key by rendezvous hashing, so every node
picks the same proxy for a blob and the same tracker for a swarm.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Iterable

import trio

from p2p_common import rendezvous

DNS_TTL = 30.0


class Resolver:
    def __init__(self, *, ttl: float = DNS_TTL) -> None:
        self.ttl = ttl
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._names: dict[str, str] = {}

    def host_name(self, url: str) -> str | None:
        """The host name an expanded ``url`` (an address) stands for: what TLS must verify
        and send as SNI when connecting to the address. None for URLs given as they are."""
        return self._names.get(url)

    async def expand(self, url: str) -> list[str]:
        """``url`` once per address its host resolves to (IP literals stay as they are)."""
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        if not host:
            return [url]
        try:
            ipaddress.ip_address(host)
            return [url]
        except ValueError:
            pass
        now = trio.current_time()
        cached = self._cache.get(url)
        if cached is not None and cached[0] > now:
            return cached[1]
        default_port = 443 if parts.scheme == "https" else 80
        try:
            infos = await trio.socket.getaddrinfo(
                host, parts.port or default_port, type=socket.SOCK_STREAM
            )
        except OSError:
            return cached[1] if cached else [url]
        urls = []
        for family, _type, _proto, _name, sockaddr in infos:
            address = str(sockaddr[0])
            literal = f"[{address}]" if family == socket.AF_INET6 else address
            netloc = f"{literal}:{parts.port}" if parts.port else literal
            urls.append(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
        urls = list(dict.fromkeys(urls)) or [url]
        for expanded in urls:
            if expanded != url:
                self._names[expanded] = host
        self._cache[url] = (now + self.ttl, urls)
        return urls

    async def ranked(self, key: bytes, urls: Iterable[str]) -> list[str]:
        """Every instance behind ``urls``, most preferred for ``key`` first."""
        expanded: list[str] = []
        for url in urls:
            expanded.extend(await self.expand(url))
        return rendezvous.rank(key, expanded)
