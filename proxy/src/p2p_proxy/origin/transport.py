"""The origin client's HTTP transport: direct, or through the egress proxy per request.

:func:`origin_transport` builds what :class:`~p2p_proxy.origin.OriginClient` sends with: one
httpx transport when no egress proxy is configured, else an :class:`EgressTransport` that
picks, for every request, the direct transport or the one through the proxy that
:class:`~p2p_proxy.origin.egress.EgressRoutes` names for its scheme, host and port (https
targets through ``CONNECT``, so the proxy sees only host and port; http targets as
absolute-form requests, which the proxy sees whole). Nothing here reads the environment:
``trust_env`` stays off, the routes are decided once by the service.
"""

from __future__ import annotations

import ssl

import httpx

from p2p_proxy.origin.egress import EgressRoutes

__all__ = ["EgressTransport", "origin_transport"]


class EgressTransport(httpx.AsyncBaseTransport):
    """Sends each request direct or through the proxy its target is routed to."""

    def __init__(
        self,
        routes: EgressRoutes,
        direct: httpx.AsyncBaseTransport,
        proxied: dict[str, httpx.AsyncBaseTransport],
    ) -> None:
        self.routes = routes
        self._direct = direct
        self._proxied = proxied

    def route(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        proxy = self.routes.proxy_for(url.scheme, url.host, url.port)
        return self._direct if proxy is None else self._proxied[proxy]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.route(request.url).handle_async_request(request)

    async def aclose(self) -> None:
        for transport in (self._direct, *self._proxied.values()):
            await transport.aclose()


def origin_transport(
    tls: ssl.SSLContext | bool,
    limits: httpx.Limits,
    routes: EgressRoutes | None,
) -> httpx.AsyncBaseTransport:
    """The transport for one origin client: ``tls`` verifies the origins (and an https
    proxy); ``limits`` bound each way's connection pool."""
    direct = httpx.AsyncHTTPTransport(verify=tls, limits=limits, trust_env=False)
    if routes is None or not routes.active:
        return direct
    proxied: dict[str, httpx.AsyncBaseTransport] = {}
    for url in {routes.https, routes.http} - {None}:
        assert url is not None
        # TLS to an https proxy is verified like the origins (system store or registryCaFile).
        proxy_tls = tls if isinstance(tls, ssl.SSLContext) and url.startswith("https:") else None
        proxied[url] = httpx.AsyncHTTPTransport(
            verify=tls,
            limits=limits,
            trust_env=False,
            proxy=httpx.Proxy(url, ssl_context=proxy_tls),
        )
    return EgressTransport(routes, direct, proxied)
