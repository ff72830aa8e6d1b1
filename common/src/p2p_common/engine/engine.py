"""The peer engine of one process: listener, torrents, limits, identity.

Wire it once per service::

    engine = Engine(port=6881, role="agent", download_rate=..., upload_rate=...)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.serve)
        torrent = await engine.add_torrent(metainfo, store)

The download and upload :class:`~p2p_common.ratelimit.RateLimiter` are shared by
every connection of the process; change them at runtime with :meth:`Engine.set_rates`.

One task runs the choking round of every torrent once a second (:data:`CHOKE_ROUND`): an idle
torrent costs a dictionary lookup per round, not a task that wakes up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import httpx
import trio

from p2p_common import wire
from p2p_common.blobinfo import BlobMetainfo
from p2p_common.engine.announce import Announcer, tracker_client
from p2p_common.engine.disk import DiskRunner
from p2p_common.engine.shared import Bans, ConnectionSlots, EngineShared, PendingHandshakes
from p2p_common.engine.torrent import HANDSHAKE_TIMEOUT, Torrent, TorrentInfo, read_handshake
from p2p_common.engine.transport import make_transport
from p2p_common.errors import LocalError, RemoteError
from p2p_common.listen import trio_listeners
from p2p_common.logs import detached
from p2p_common.logs import event as log_event
from p2p_common.ratelimit import RateLimiter
from p2p_common.session import LocalPeer, Window
from p2p_common.settings import join_host_port, unmapped
from p2p_common.storage import PieceStore

log = logging.getLogger("p2p.engine")

DEFAULT_MAX_BLOCK = 1024 * 1024
CLIENT_NAME = "p2p/0.1.0"
INCOMING_HANDSHAKE_TIMEOUT = 5.0
"""Seconds an incoming connection has to send its handshake."""
CHOKE_ROUND = 1.0
"""Seconds between choking rounds (cooperative peers are re-evaluated about once a second)."""


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
        host: str = "",
        port: int = 0,
        role: str = "agent",
        peer_id: bytes | None = None,
        download_rate: float = 0,
        upload_rate: float = 0,
        max_connections: int = 200,
        max_peers_per_torrent: int = 50,
        max_block: int = DEFAULT_MAX_BLOCK,
        super_seed: bool = False,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.role = role
        self.peer_id = peer_id or make_peer_id(role)
        self.client_name = CLIENT_NAME
        self.max_peers_per_torrent = max_peers_per_torrent
        self.max_block = max_block
        self.super_seed = super_seed
        """Seed complete torrents BEP 16 style (proxies: see SwarmCore.offer)."""
        self.shared = EngineShared(
            peer_id=self.peer_id,
            local=LocalPeer(CLIENT_NAME, port, max_block, role),
            reserved=wire.reserved_bytes(),
            download_limiter=RateLimiter(download_rate),
            upload_limiter=RateLimiter(upload_rate),
            disk=DiskRunner(),
            announcer=Announcer(http_client or tracker_client(), peer_id=self.peer_id),
            bans=Bans(),
            slots=ConnectionSlots(max_connections),
            super_seed=super_seed,
        )
        self.torrents: dict[bytes, Torrent] = {}
        """By swarm id."""
        self._windows: dict[bytes, tuple[Torrent, Window]] = {}
        self._pending = PendingHandshakes()
        """Chunks of chunked blobs, by the chunk torrent's own infohash."""
        self._nursery: trio.Nursery | None = None

    @property
    def download_limiter(self) -> RateLimiter:
        return self.shared.download_limiter

    @property
    def upload_limiter(self) -> RateLimiter:
        return self.shared.upload_limiter

    @property
    def self_addresses(self) -> set[tuple[str, int]]:
        return self.shared.self_addresses

    @property
    def connection_count(self) -> int:
        return self.shared.slots.used

    def is_banned(self, peer_id: bytes | None, host: str, port: int | None = None) -> bool:
        return self.shared.bans.is_banned(peer_id, host, port)

    def ban(self, peer_id: bytes, address: tuple[str, int] | None) -> None:
        """Refuse this peer for a while (its id, and its endpoint if given)."""
        self.shared.bans.ban(peer_id, address)

    # -- lifecycle -------------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = trio_listeners(
            join_host_port(self.host, self.port) if self.host else f":{self.port}"
        )
        self.port = listeners[0].socket.getsockname()[1]
        self.shared.local = LocalPeer(self.client_name, self.port, self.max_block, self.role)
        self.shared.announcer.port = self.port
        try:
            async with self.shared.announcer.client, trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.shared.announcer.run)
                nursery.start_soon(trio.serve_listeners, self._handle_incoming, listeners)
                nursery.start_soon(self._choke_rounds)
                nursery.start_soon(self.shared.flusher.run)
                log_event(log, "engine.listening", port=self.port, role=self.role)
                task_status.started(self)
        finally:
            for listener in listeners:
                await listener.aclose()

    async def _choke_rounds(self) -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(CHOKE_ROUND)
            now = trio.current_time()
            interval, last = max(now - last, 1e-3), now
            torrents = list(self.torrents.values())
            # A seed's uplink serves first copies first: while any blob is still coming in
            # from the origin, no torrent hands out second copies (SwarmCore.offer).
            ingesting = any(t.ingest and not t.core.complete for t in torrents)
            self.shared.bans.expire()
            self.shared.strikes.expire(now)
            for torrent in torrents:
                torrent.core.second_copies = not ingesting
                if torrent.connections or torrent.candidates:
                    torrent.tick(now, interval)

    def set_rates(self, download_rate: float, upload_rate: float) -> None:
        self.shared.download_limiter.set_rate(download_rate)
        self.shared.upload_limiter.set_rate(upload_rate)

    async def add_torrent(
        self,
        metainfo: TorrentInfo,
        store: PieceStore,
        *,
        peers: Iterable[tuple[str, int]] = (),
        announce_delay: float = 0.0,
        ingest: bool = False,
    ) -> Torrent:
        """Start sharing (and, if incomplete, downloading) a torrent.

        ``metainfo`` is a plain torrent or a chunked blob
        (:class:`~p2p_common.blobinfo.BlobMetainfo`), whose later chunks are added with
        :meth:`chunks_added`. ``ingest``: the pieces come from elsewhere (the proxy's
        origin fetch, reported with :meth:`Torrent.piece_arrived`): download nothing, offer
        what arrived once its chunk is published.

        ``announce_delay`` postpones the first announce: a service that reseeds its whole
        cache at start-up spreads those announces out instead of sending them all at once
        (a DaemonSet rollout restarts many agents together)."""
        if self._nursery is None:
            raise EngineStoppedError("Engine.serve() is not running")
        info_hash = metainfo.info_hash
        existing = self.torrents.get(info_hash)
        if existing is not None:
            existing.add_peers(peers)
            return existing
        known = published = None
        if isinstance(metainfo, BlobMetainfo):
            known = published = metainfo.known_pieces
        torrent = Torrent(
            self.shared,
            metainfo,
            store,
            known=known,
            published=published,
            ingest=ingest,
            max_peers=self.max_peers_per_torrent,
            announce_delay=announce_delay,
        )
        self.torrents[info_hash] = torrent
        self._add_windows(torrent)
        torrent.add_peers(peers)

        async def run(task_status: trio.TaskStatus[Torrent] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await torrent.run(task_status=task_status)
            finally:
                self._forget(torrent)

        try:
            with detached():  # the torrent outlives the pull that added it: it serves all
                await self._nursery.start(run)
        except RuntimeError:  # the engine's nursery closed: it is stopping
            self._forget(torrent)
            raise EngineStoppedError("the peer engine has stopped") from None
        return torrent

    def chunks_added(self, torrent: Torrent) -> None:
        """A chunked blob's metainfo gained chunks: download (or offer) their pieces, and let
        standard clients that hold one chunk's torrent connect for it."""
        self._add_windows(torrent)
        torrent.chunks_added()

    def _add_windows(self, torrent: Torrent) -> None:
        info = torrent.info
        if not isinstance(info, BlobMetainfo) or info.geometry.num_chunks == 1:
            return
        geometry = info.geometry
        for index in range(torrent.windows_added, len(info.chunks)):
            chunk = info.chunks[index]
            window = Window(geometry.chunk_first_piece(index), chunk.num_pieces)
            self._windows.setdefault(chunk.info_hash, (torrent, window))
        torrent.windows_added = len(info.chunks)

    def _forget(self, torrent: Torrent) -> None:
        if self.torrents.get(torrent.info_hash) is torrent:
            del self.torrents[torrent.info_hash]
        info = torrent.info
        if isinstance(info, BlobMetainfo):
            for chunk in info.chunks:
                if self._windows.get(chunk.info_hash, (None,))[0] is torrent:
                    del self._windows[chunk.info_hash]

    def lookup(self, info_hash: bytes) -> tuple[Torrent, Window] | None:
        """The torrent a handshake naming ``info_hash`` is for, and what it sees of it."""
        torrent = self.torrents.get(info_hash)
        if torrent is not None:
            return torrent, Window(0, torrent.info.num_pieces)
        return self._windows.get(info_hash)

    def remove_torrent(self, info_hash: bytes) -> None:
        """Stop a torrent (its announce loop sends ``stopped``)."""
        torrent = self.torrents.get(info_hash)
        if torrent is not None:
            self._forget(torrent)
            torrent.stop()

    # -- connections -----------------------------------------------------------------------------

    async def _handle_incoming(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
        except OSError:
            await stream.aclose()
            return
        # An IPv4 peer of the dual-stack listener as its IPv4 address (bans compare addresses).
        try:
            await self.attach_stream(stream, address=(unmapped(str(host)), int(port)))
        except Exception:
            # A bug in one connection ends that connection, loudly, never the listener (and
            # with it every other connection and torrent of the process).
            log.exception("connection.failed: a bug ended an incoming connection")

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

        A connection that has not handshaken yet holds no connection slot: it waits in a small
        pre-handshake budget (per address and in all) for at most
        :data:`INCOMING_HANDSHAKE_TIMEOUT` seconds. Only a handshake for a torrent we have
        takes a slot, and incoming connections never take the slots kept for our own dials.
        """
        outgoing = info_hash is not None
        slots = self.shared.slots
        async with stream:
            transport = make_transport(stream)
            protocol = wire.PeerProtocol(max_block=wire.MAX_FOREIGN_REQUEST)
            try:
                if info_hash is not None:
                    if not slots.reserve(outgoing=True):
                        return
                    try:
                        await transport.send_all(self.shared.handshake_for(info_hash))
                        with trio.fail_after(HANDSHAKE_TIMEOUT):
                            handshake = await read_handshake(transport, protocol)
                    except BaseException:
                        slots.release()
                        raise
                else:
                    if self.shared.strikes.refused(address[0], trio.current_time()):
                        return
                    if not self._pending.admit(address[0]):
                        return
                    try:
                        with trio.fail_after(INCOMING_HANDSHAKE_TIMEOUT):
                            handshake = await read_handshake(transport, protocol)
                    finally:
                        self._pending.leave(address[0])
                    if not slots.reserve(outgoing=False):
                        return
            except RemoteError:
                self.shared.strikes.strike(address[0], trio.current_time())  # bad handshake
                return
            except trio.TooSlowError:
                return
            try:
                found = self.lookup(handshake.info_hash)
                if found is None:
                    return  # unknown infohash: the infohash is a capability
                torrent, window = found
                if handshake.peer_id == self.peer_id:
                    if not outgoing:  # let our own outgoing side see who answered
                        await transport.send_all(self.shared.handshake_for(handshake.info_hash))
                    return
                if not outgoing:
                    if not torrent.admits_incoming():
                        return  # no handshake back: the dialler tries elsewhere, later
                    await transport.send_all(self.shared.handshake_for(handshake.info_hash))
                elif handshake.info_hash != info_hash:
                    return
                await torrent.run_connection(
                    transport, protocol, handshake, window, address=address, outgoing=outgoing
                )
            except (RemoteError, trio.TooSlowError):
                return
            finally:
                slots.release()
