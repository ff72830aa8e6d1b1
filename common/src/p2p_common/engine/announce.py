"""Announcing to trackers over HTTP, with rendezvous ranking and failover.

The metainfo lists tracker URLs. A URL whose host name resolves to several
addresses (a headless Service in Kubernetes) counts as one tracker per address.
Each torrent ranks the resulting trackers by rendezvous hashing of its infohash,
announces to the first that answers, and falls back to the next on failure; so all
peers of one swarm meet at the same tracker without coordinating, and a restarted
or lost tracker moves only its own swarms.

Announces go straight to the trackers inside the cluster: the engine's default client
(:func:`tracker_client`) ignores ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` and ``.netrc``
in the environment, which would otherwise send every infohash through a corporate proxy.
"""

from __future__ import annotations

import logging

import httpx
import trio

from p2p_common.discovery import Resolver
from p2p_common.logs import event as log_event
from p2p_common.tracker_proto import (
    AnnounceRequest,
    AnnounceResponse,
    Event,
    TrackerProtocolError,
    announce_url,
    parse_announce_response,
)

log = logging.getLogger("p2p.announce")

ANNOUNCE_TIMEOUT = 5.0
MAX_RESPONSE_BYTES = 256 * 1024
NUMWANT = 80


def tracker_client() -> httpx.AsyncClient:
    """An HTTP client for announces that takes nothing from the environment (no proxy
    variables, no ``.netrc``)."""
    return httpx.AsyncClient(trust_env=False)


class Announcer:
    def __init__(
        self, client: httpx.AsyncClient, *, peer_id: bytes, numwant: int = NUMWANT
    ) -> None:
        self.client = client
        self.peer_id = peer_id
        self.port = 0
        """Our BitTorrent port (set once the engine listens)."""
        self.numwant = numwant
        self.resolver = Resolver()

    async def ranked(self, info_hash: bytes, trackers: tuple[str, ...]) -> list[str]:
        urls = [u for u in trackers if u.startswith(("http://", "https://"))]
        return await self.resolver.ranked(info_hash, urls)

    async def announce(
        self,
        info_hash: bytes,
        trackers: tuple[str, ...],
        state: tuple[Event, int, int, int],
    ) -> AnnounceResponse | None:
        """Announce ``(event, uploaded, downloaded, left)`` of one swarm to the best of its
        trackers that answers; None if none did."""
        event, uploaded, downloaded, left = state
        request = AnnounceRequest(
            info_hash=info_hash,
            peer_id=self.peer_id,
            port=self.port,
            uploaded=uploaded,
            downloaded=downloaded,
            left=left,
            event=event,
            numwant=0 if event is Event.STOPPED else self.numwant,
            compact=True,
        )
        for url in await self.ranked(info_hash, trackers):
            try:
                with trio.fail_after(ANNOUNCE_TIMEOUT):
                    async with self.client.stream("GET", announce_url(url, request)) as reply:
                        body = bytearray()
                        async for chunk in reply.aiter_bytes():
                            body += chunk
                            if len(body) > MAX_RESPONSE_BYTES:
                                raise TrackerProtocolError("tracker answer too large")
                return parse_announce_response(bytes(body))
            except (httpx.HTTPError, TrackerProtocolError, trio.TooSlowError) as exc:
                log_event(
                    log,
                    "announce.failed",
                    logging.INFO,
                    tracker=url,
                    error=str(exc) or type(exc).__name__,
                )
        return None
