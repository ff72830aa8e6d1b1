"""The peer engine of one process: listener, torrents, limits, identity.

Wire it once per service::

    engine = Engine(port=6881, role="agent", download_rate=..., upload_rate=...)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.serve)
        torrent = await engine.add_torrent(metainfo, store)

The download and upload :class:`~p2p_common.ratelimit.RateLimiter` are shared by
every connection of the process; change them at runtime with :meth:`Engine.set_rates`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import httpx
import trio

from p2p_common import wire
from p2p_common.engine.announce import Announcer
from p2p_common.engine.torrent import HANDSHAKE_TIMEOUT, Torrent, read_handshake
from p2p_common.engine.transport import make_transport
from p2p_common.errors import LocalError, RemoteError
from p2p_common.logs import event as log_event
from p2p_common.metainfo import Metainfo
from p2p_common.ratelimit import RateLimiter
from p2p_common.storage import PieceStore

log = logging.getLogger("p2p.engine")

DEFAULT_MAX_BLOCK = 1024 * 1024
CLIENT_NAME = "p2p/0.1.0"


class EngineStoppedError(LocalError):
    """A torrent was added to an engine that is not (or no longer) running."""


def make_peer_id(role: str) -> bytes:
    """Azureus-style peer id: ``-PA0100-`` (agent) / ``-PP0100-`` (proxy) + 12 random bytes."""
    code = {"agent": b"PA", "proxy": b"PP"}.get(role, b"PX")
    return b"-" + code + b"0100-" + os.urandom(12)


class Engine:
    def __init__(
        self,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        role: str = "agent",
        peer_id: bytes | None = None,
        download_rate: float = 0,
        upload_rate: float = 0,
        max_connections: int = 200,
        max_peers_per_torrent: int = 50,
        max_block: int = DEFAULT_MAX_BLOCK,
        ban_by_address: bool = True,
        super_seed: bool = False,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.role = role
        self.peer_id = peer_id or make_peer_id(role)
        self.client_name = CLIENT_NAME
        self.max_connections = max_connections
        self.max_peers_per_torrent = max_peers_per_torrent
        self.max_block = max_block
        self.ban_by_address = ban_by_address
        self.super_seed = super_seed
        """Seed complete torrents BEP 16 style (proxies: see Torrent.offer)."""
        self.download_limiter = RateLimiter(download_rate)
        self.upload_limiter = RateLimiter(upload_rate)
        self.disk_threads = trio.CapacityLimiter(4)
        self.torrents: dict[bytes, Torrent] = {}
        self.self_addresses: set[tuple[str, int]] = set()
        self.connection_count = 0
        self._banned_ids: set[bytes] = set()
        self._banned_addresses: set[str] = set()
        self._banned_endpoints: set[tuple[str, int]] = set()
        self._http_client = http_client
        self.announcer: Announcer = Announcer(http_client or httpx.AsyncClient())
        self._nursery: trio.Nursery | None = None
        self._reserved = wire.reserved_bytes()

    # -- lifecycle -------------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host or None)
        self.port = listeners[0].socket.getsockname()[1]
        try:
            async with self.announcer.client, trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(trio.serve_listeners, self._handle_incoming, listeners)
                log_event(log, "engine.listening", port=self.port, role=self.role)
                task_status.started(self)
        finally:
            for listener in listeners:
                await listener.aclose()

    def set_rates(self, download_rate: float, upload_rate: float) -> None:
        self.download_limiter.set_rate(download_rate)
        self.upload_limiter.set_rate(upload_rate)

    async def add_torrent(
        self,
        metainfo: Metainfo,
        store: PieceStore,
        *,
        peers: Iterable[tuple[str, int]] = (),
        announce_delay: float = 0.0,
    ) -> Torrent:
        """Start sharing (and, if incomplete, downloading) a torrent.

        ``announce_delay`` postpones the first announce: a service that reseeds its whole
        cache at start-up spreads those announces out instead of sending them all at once
        (a DaemonSet rollout restarts many agents together)."""
        if self._nursery is None:
            raise EngineStoppedError("Engine.serve() is not running")
        existing = self.torrents.get(metainfo.info_hash)
        if existing is not None:
            existing.add_peers(peers)
            return existing
        torrent = Torrent(
            self,
            metainfo,
            store,
            max_peers=self.max_peers_per_torrent,
            announce_delay=announce_delay,
        )
        self.torrents[metainfo.info_hash] = torrent
        torrent.add_peers(peers)

        async def run(task_status: trio.TaskStatus[Torrent] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await torrent.run(task_status=task_status)
            finally:
                if self.torrents.get(metainfo.info_hash) is torrent:
                    del self.torrents[metainfo.info_hash]

        try:
            await self._nursery.start(run)
        except RuntimeError:  # the engine's nursery closed: it is stopping
            self.torrents.pop(metainfo.info_hash, None)
            raise EngineStoppedError("the peer engine has stopped") from None
        return torrent

    def remove_torrent(self, info_hash: bytes) -> None:
        """Stop a torrent (its announce loop sends ``stopped``)."""
        torrent = self.torrents.pop(info_hash, None)
        if torrent is not None:
            torrent.stop()

    # -- connections -----------------------------------------------------------------------------

    def handshake_for(self, info_hash: bytes) -> bytes:
        return wire.encode_handshake(info_hash, self.peer_id, self._reserved)

    def reserve_connection(self) -> bool:
        if self.connection_count >= self.max_connections:
            return False
        self.connection_count += 1
        return True

    def release_connection(self) -> None:
        self.connection_count -= 1

    async def _handle_incoming(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
        except OSError:
            await stream.aclose()
            return
        await self.attach_stream(stream, address=(str(host), int(port)))

    async def attach_stream(
        self,
        stream: trio.abc.Stream,
        *,
        address: tuple[str, int],
        info_hash: bytes | None = None,
    ) -> None:
        """Run a peer connection over an already connected ``stream`` until it ends.

        With ``info_hash`` we initiate (send our handshake first); without, we wait for
        the peer's handshake and answer only for a torrent we have. Used for incoming
        TCP connections and, in tests, for in-memory streams.
        """
        if not self.reserve_connection():
            await stream.aclose()
            return
        try:
            async with stream:
                if self.is_banned(None, address[0]):
                    return
                transport = make_transport(stream)
                protocol = wire.PeerProtocol(max_block=self.max_block)
                try:
                    if info_hash is not None:
                        await transport.send_all(self.handshake_for(info_hash))
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        handshake = await read_handshake(transport, protocol)
                    torrent = self.torrents.get(handshake.info_hash)
                    if torrent is None:
                        return  # unknown infohash: the infohash is a capability
                    if handshake.peer_id == self.peer_id:
                        if info_hash is None:  # let our own outgoing side see who answered
                            await transport.send_all(self.handshake_for(handshake.info_hash))
                        return
                    if info_hash is None:
                        await transport.send_all(self.handshake_for(handshake.info_hash))
                    elif handshake.info_hash != info_hash:
                        return
                    await torrent.run_connection(
                        transport,
                        protocol,
                        handshake,
                        address=address,
                        outgoing=info_hash is not None,
                    )
                except (RemoteError, trio.TooSlowError):
                    return
        finally:
            self.release_connection()

    # -- bans ------------------------------------------------------------------------------------

    def ban(self, peer_id: bytes, address: tuple[str, int]) -> None:
        """Refuse this peer from now on: its id, its endpoint, and (by default) its address."""
        self._banned_ids.add(peer_id)
        self._banned_endpoints.add(address)
        if self.ban_by_address:
            self._banned_addresses.add(address[0])

    def is_banned(self, peer_id: bytes | None, host: str, port: int | None = None) -> bool:
        return (
            (peer_id is not None and peer_id in self._banned_ids)
            or host in self._banned_addresses
            or (port is not None and (host, port) in self._banned_endpoints)
        )
