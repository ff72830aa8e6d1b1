"""One torrent in the engine: the trio shell around its :class:`~p2p_common.swarm.SwarmCore`.

The shell keeps what needs I/O or time: the connections (each a
:class:`~p2p_common.engine.connection.Connection`), the verifier (SHA-1 of every complete
piece, then the store), the connector (dials candidate peers, with backoff) and the announcer
(tracker re-announces, fast while the swarm is young). The engine calls :meth:`Torrent.tick`
once per choking round for every torrent.

What the rest of a service uses: :meth:`has_piece`, :meth:`wait_for_piece`,
:meth:`wait_complete`, :meth:`set_reader`, :meth:`add_piece` (a piece fetched outside the
swarm), :meth:`add_peers` and the :meth:`statistics` snapshot.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from p2p_common import wire
from p2p_common.engine.connection import Connection
from p2p_common.engine.shared import (
    EngineShared,
    admits_incoming,
    dials_peers,
    may_dial,
    quick_announce,
)
from p2p_common.engine.transport import PeerGoneError, Transport, make_transport
from p2p_common.errors import LocalError, RemoteError
from p2p_common.logs import event as log_event
from p2p_common.session import PeerSession, PieceReady, Window
from p2p_common.storage import PieceStore
from p2p_common.swarm import SwarmCore
from p2p_common.tracker_proto import Event as AnnounceEvent

log = logging.getLogger("p2p.torrent")

CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0
RESEED_ANNOUNCE_SPREAD = 30.0
"""Seconds over which a service spreads the first announces of the blobs it reseeds at start."""
RECONNECT_DELAY = 5.0
"""Seconds before dialling again a peer whose connection ended normally."""


class TorrentFailedError(LocalError):
    """The torrent stopped because of a local failure (disk full, ...)."""


class TorrentInfo(Protocol):
    """What the engine needs to know of a torrent (a :class:`~p2p_common.metainfo.Metainfo`
    is one; a chunked blob's metainfo is another)."""

    @property
    def info_hash(self) -> bytes:
        """The swarm's id: what handshakes and announces name."""

    @property
    def name(self) -> str: ...

    @property
    def length(self) -> int: ...

    @property
    def piece_length(self) -> int: ...

    @property
    def num_pieces(self) -> int: ...

    @property
    def trackers(self) -> tuple[str, ...]: ...

    def piece_size(self, index: int) -> int: ...

    def piece_hash(self, index: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class TorrentStatistics:
    """A snapshot for metrics and status pages."""

    pieces: int
    have: int
    known: int
    downloaded_by_role: dict[str, int]
    uploaded: int
    peers: int
    peers_by_role: dict[str, int]
    seconds_since_progress: float


def _backoff(failures: int) -> float:
    """Seconds before retrying a peer that failed ``failures`` times: 0.5, 1, 2, ... 60."""
    return float(min(60.0, 0.25 * 2.0**failures))


@dataclass(slots=True)
class _Candidate:
    failures: int = 0
    next_attempt: float = 0.0


class Torrent:
    def __init__(
        self,
        engine: EngineShared,
        info: TorrentInfo,
        store: PieceStore,
        *,
        known: int | None = None,
        published: int | None = None,
        ingest: bool = False,
        max_peers: int = 50,
        announce_delay: float = 0.0,
    ) -> None:
        self.engine = engine
        self.ingest = ingest
        """Pieces come from elsewhere (:meth:`piece_arrived`); nothing is downloaded."""
        self.info = info
        self.info_hash = info.info_hash
        self.store = store
        self.max_peers = max_peers
        self.announce_delay = announce_delay
        now = trio.current_time()
        self.core = SwarmCore(
            num_pieces=info.num_pieces,
            piece_length=info.piece_length,
            length=info.length,
            local=engine.local,
            have=store.have,
            known=0 if ingest else known,
            published=published,
            super_seed=engine.super_seed,
            now=now,
        )
        self.connections: dict[bytes, Connection] = {}
        self.windows_added = 0
        """Chunks of a chunked blob the engine routes handshakes for (Engine.chunks_added)."""
        self.candidates: dict[tuple[str, int], _Candidate] = {}
        self._connecting: set[tuple[str, int]] = set()
        self._piece_events: dict[int, trio.Event] = {}
        self.on_stored: Callable[[int, bytes | bytearray], None] | None = None
        """Called with every piece verified and stored by the swarm (in the event loop)."""
        self.completed = trio.Event()
        self.closed = trio.Event()
        """Set when the torrent has stopped, its connections ended and its store is closed."""
        self.failure: BaseException | None = None
        self._settled = trio.Event()
        """Set once the torrent is complete, failed or stopped."""
        if self.core.complete:
            self.completed.set()
            self._settled.set()
        self._nursery: trio.Nursery | None = None
        self._stopped = False

    # -- what the rest of a service uses ---------------------------------------------------------

    @property
    def metainfo(self) -> TorrentInfo:
        return self.info

    @property
    def downloaded_by_role(self) -> dict[str, int]:
        return self.core.downloaded_by_role

    @property
    def downloaded(self) -> int:
        return self.core.downloaded

    @property
    def uploaded(self) -> int:
        return self.core.uploaded

    @property
    def left(self) -> int:
        return self.core.left

    @property
    def last_progress(self) -> float:
        return self.core.last_progress

    def has_piece(self, index: int) -> bool:
        return index in self.core.picker.have

    def statistics(self) -> TorrentStatistics:
        picker = self.core.picker
        roles: dict[str, int] = {}
        for session in self.core.sessions.values():
            roles[session.role] = roles.get(session.role, 0) + 1
        return TorrentStatistics(
            pieces=picker.num_pieces,
            have=picker.have.count,
            known=picker.known,
            downloaded_by_role=dict(self.core.downloaded_by_role),
            uploaded=self.core.uploaded,
            peers=len(self.core.sessions),
            peers_by_role=roles,
            seconds_since_progress=trio.current_time() - self.core.last_progress,
        )

    def describe_sessions(self) -> list[str]:
        """One line per connection, for a log line when something is stuck."""
        return [
            f"{s!r} choked:{int(s.peer_choking)}/{int(s.am_choking)} "
            f"interested:{int(s.am_interested)}/{int(s.peer_interested)} "
            f"requests:{len(s.outstanding)}/{len(s.uploads)} has:{s.peer_bits.count} "
            f"wanted:{len(s.wanted)} offers:{len(s.offers)} snubbed:{int(s.snubbed)}"
            for s in self.core.sessions.values()
        ]

    def add_peers(self, addresses: Iterable[tuple[str, int]]) -> None:
        """Candidate peers (from a tracker, or given directly)."""
        added = False
        for address in addresses:
            if address not in self.candidates and address not in self.engine.self_addresses:
                self.candidates[address] = _Candidate()
                added = True
        if added:
            self.dial(trio.current_time())

    def set_reader(self, reader: object, next_piece: int | None) -> None:
        """A streaming reader's position (None when it is done): its next pieces come first."""
        self.core.set_reader(reader, next_piece)

    async def wait_for_piece(self, index: int) -> None:
        """Return once piece ``index`` is verified and stored; raises
        :class:`TorrentFailedError` if the torrent fails or stops first. (No task, no timer:
        a reader waits for every piece.)"""
        while index not in self.core.picker.have:
            self._raise_if_ended()
            event = self._piece_events.get(index)
            if event is None:
                event = self._piece_events[index] = trio.Event()
            await event.wait()

    async def wait_complete(self) -> None:
        """Return once every piece is stored; raises if the torrent fails or stops first."""
        await self._settled.wait()
        if not self.completed.is_set():
            self._raise_if_ended()

    def _raise_if_ended(self) -> None:
        if self.failure is not None:
            raise TorrentFailedError(str(self.failure)) from self.failure
        if self._stopped:
            raise TorrentFailedError("the torrent was stopped")

    def _wake_waiters(self) -> None:
        """The torrent completed, failed or stopped: every waiter looks again."""
        self._settled.set()
        events, self._piece_events = self._piece_events, {}
        for event in events.values():
            event.set()

    # -- running ---------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Torrent] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.info.trackers:
                    nursery.start_soon(self._announce_loop)
                task_status.started(self)
                self.dial(trio.current_time())
                await trio.sleep_forever()
        finally:
            self._stopped = True
            for conn in list(self.connections.values()):
                conn.close()
            self._close_when_idle()

    def _close_when_idle(self) -> None:
        """Once stopped and without connections, close the store and say so."""
        if self._stopped and not self.connections and not self.closed.is_set():
            self.store.close()
            self.closed.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake_waiters()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        for conn in list(self.connections.values()):
            conn.close()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            log_event(log, "torrent.failed", logging.ERROR, torrent=self.info.name, error=str(exc))
        self.stop()

    def tick(self, now: float, interval: float) -> None:
        """The choking round: the core decides; connections it gives up on are closed. The
        store records the pieces stored since the last round."""
        try:
            self.store.flush()
        except LocalError as exc:
            self.fail(exc)
            return
        if log.isEnabledFor(logging.DEBUG):
            core = self.core
            log_event(
                log,
                "torrent.round",
                logging.DEBUG,
                torrent=self.info.name,
                have=core.picker.have.count,
                known=core.picker.known,
                published=core.published,
                peers=len(core.sessions),
                requests=sum(len(s.outstanding) for s in core.sessions.values()),
                uploads=sum(len(s.uploads) for s in core.sessions.values()),
                offers=sum(len(s.offers) for s in core.sessions.values()),
                downloaded=core.downloaded,
                uploaded=core.uploaded,
            )
        for session, reason in self.core.tick(now, interval):
            conn = self.connections.get(session.peer_id)
            if conn is not None:
                log_event(log, "peer.closed", logging.DEBUG, peer=repr(session), reason=reason)
                conn.close()
        if not self.core.complete:
            self.dial(now)

    # -- connections -----------------------------------------------------------------------------

    def admits_incoming(self) -> bool:
        """Whether a peer that dialled us may have one more connection (``max_peers``, half of
        it while we dial: ``shared.admits_incoming``)."""
        connections = self.connections.values()
        return admits_incoming(
            sum(1 for conn in connections if not conn.session.outgoing),
            len(connections),
            self.max_peers,
            dials=dials_peers(self.core.complete, self.core.super_seed),
        )

    async def run_connection(
        self,
        transport: Transport,
        protocol: wire.PeerProtocol,
        handshake: wire.Handshake,
        window: Window,
        *,
        address: tuple[str, int],
        outgoing: bool,
    ) -> None:
        """Run an established connection until it ends; cleans up after it. ``window``: the
        pieces the peer sees (all of them, or one chunk's for a standard client)."""
        if self._stopped or handshake.peer_id in self.connections:
            log_event(
                log,
                "peer.refused",
                logging.DEBUG,
                peer=f"{address[0]}:{address[1]}",
                reason="torrent stopped" if self._stopped else "already connected",
            )
            return
        if self.engine.bans.is_banned(handshake.peer_id, address[0]):
            peer = f"{address[0]}:{address[1]}"
            log_event(log, "peer.refused", logging.DEBUG, peer=peer, reason="banned")
            return
        info = self.info
        end = min(info.length, (window.first + window.count) * info.piece_length)
        protocol.set_geometry(
            window.count, info.piece_length, end - window.first * info.piece_length
        )
        session = PeerSession(
            self.core,
            peer_id=handshake.peer_id,
            address=address,
            outgoing=outgoing,
            window=window,
            fast=protocol.fast,
            extensions=protocol.extensions,
            now=trio.current_time(),
        )
        conn = Connection(
            session,
            transport,
            protocol,
            store=self.store,
            verify=self.verify,
            download_limiter=self.engine.download_limiter,
            upload_limiter=self.engine.upload_limiter,
            uploaded=self._count_upload,
            flusher=self.engine.flusher,
        )
        self.connections[session.peer_id] = conn
        self.core.add_session(session)
        try:
            await conn.run()
        except PeerGoneError:
            pass
        except RemoteError as exc:
            log_event(log, "peer.dropped", logging.INFO, peer=repr(session), reason=str(exc))
            self.engine.strikes.strike(address[0], trio.current_time())
        except LocalError as exc:
            self.fail(exc)
        finally:
            self.connections.pop(session.peer_id, None)
            self.core.remove_session(session)
            self._close_when_idle()

    def _count_upload(self, count: int) -> None:
        self.core.uploaded += count

    def dial(self, now: float) -> None:
        """Start connecting to candidates that are due: up to half of ``max_peers`` connections
        that we dialled, the other half left for peers dialling us (``shared.may_dial``)."""
        if self._nursery is None or self._stopped or self.core.complete:
            return  # seeds wait for leechers to connect
        busy = {conn.session.address for conn in self.connections.values()} | self._connecting
        dialled = sum(1 for conn in self.connections.values() if conn.session.outgoing)
        for address, candidate in self.candidates.items():
            connecting = len(self._connecting)
            if not may_dial(
                dialled + connecting, len(self.connections) + connecting, self.max_peers
            ):
                break
            if (
                address in busy
                or candidate.next_attempt > now
                or self.engine.bans.is_banned(None, address[0], address[1])
            ):
                continue
            candidate.next_attempt = math.inf  # set properly when the attempt ends
            self._connecting.add(address)
            self._nursery.start_soon(self._connect_one, address)

    async def _connect_one(self, address: tuple[str, int]) -> None:
        """Dial a candidate and run the connection; schedule its next attempt afterwards."""
        engine = self.engine
        candidate = self.candidates.get(address)
        connected = False
        try:
            if not engine.slots.reserve():
                return
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await trio.open_tcp_stream(*address)
                async with stream:
                    transport = make_transport(stream)
                    await transport.send_all(engine.handshake_for(self.info_hash))
                    protocol = wire.PeerProtocol(max_block=wire.MAX_FOREIGN_REQUEST)
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        handshake = await read_handshake(transport, protocol)
                    if handshake.peer_id == engine.peer_id:
                        engine.self_addresses.add(address)
                        self.candidates.pop(address, None)
                        candidate = None
                        return
                    if handshake.info_hash != self.info_hash:
                        raise wire.WireError("peer answered for another torrent")
                    connected = True
                    # A connection now, counted in self.connections: no longer a dial in
                    # progress (counted in both, an agent dialled half its max_peers).
                    self._connecting.discard(address)
                    await self.run_connection(
                        transport,
                        protocol,
                        handshake,
                        Window(0, self.info.num_pieces),
                        address=address,
                        outgoing=True,
                    )
            except (OSError, RemoteError, trio.TooSlowError):
                pass
            except Exception:
                # A bug in one connection ends that connection, loudly, not the torrent.
                log.exception("connection.failed: a bug ended an outgoing connection")
            finally:
                engine.slots.release()
        finally:
            self._connecting.discard(address)
            if candidate is not None:
                if connected:
                    candidate.failures = 0
                    delay = RECONNECT_DELAY
                else:
                    candidate.failures += 1
                    delay = _backoff(candidate.failures)
                candidate.next_attempt = trio.current_time() + delay
                log_event(
                    log,
                    "peer.dial_ended",
                    logging.DEBUG,
                    peer=f"{address[0]}:{address[1]}",
                    connected=connected,
                    failures=candidate.failures,
                    retry_in=round(delay, 2),
                )

    # -- pieces ----------------------------------------------------------------------------------

    def _check_and_store(self, index: int, data: bytes | bytearray) -> bool:
        """(Inline or worker thread.) Check a piece's SHA-1; store it if good."""
        info = self.info
        if len(data) != info.piece_size(index) or (
            hashlib.sha1(data).digest() != info.piece_hash(index)
        ):
            return False
        self.store.write_piece(index, data)
        return True

    async def verify(self, ready: PieceReady) -> None:
        """Check and store a piece the swarm completed, then tell the swarm the outcome."""
        try:
            ok = await self.engine.disk.run(self._check_and_store, ready.index, ready.data)
        except LocalError as exc:  # the disk failed us (full, gone): this torrent stops
            self.fail(exc)
            return
        if ok:
            self._stored(ready.index, ready.data)
        else:
            self._ban(self.core.piece_failed(ready.index, ready.contributors, ready.data), ready)

    def _ban(self, peer_ids: list[bytes], ready: PieceReady | None) -> None:
        for peer_id in peer_ids:
            conn = self.connections.get(peer_id)
            address = conn.session.address if conn is not None else None
            self.engine.bans.ban(peer_id, address)
            log_event(
                log,
                "peer.banned",
                logging.WARNING,
                peer=repr(conn.session) if conn is not None else peer_id.hex(),
                piece=ready.index if ready is not None else None,
                reason="bad data",
            )
            if conn is not None:
                conn.close()

    def _stored(self, index: int, data: bytes | bytearray | None) -> None:
        """``data``: the verified piece (None when it arrived in the store another way)."""
        now = trio.current_time()
        disk = self.engine.disk
        if disk.tracking and data is not None:
            fd = self.store.fileno()
            if fd is not None:
                disk.wrote(fd, len(data))
        self._ban(self.core.piece_stored(index, now, data), None)
        if self.on_stored is not None and data is not None:
            self.on_stored(index, data)
        event = self._piece_events.pop(index, None)
        if event is not None:
            event.set()
        if self.core.complete and not self.completed.is_set():
            self.completed.set()
            self._settled.set()
            log_event(
                log,
                "torrent.complete",
                torrent=self.info.name,
                seconds=round(now - self.core.started_at, 3),
                **{f"from_{role}": n for role, n in self.core.downloaded_by_role.items()},
            )

    async def add_piece(self, index: int, data: bytes) -> bool:
        """A piece fetched outside the swarm (e.g. the proxy's HTTP fallback): check it,
        store it and announce it like a piece from a peer. False if it does not verify."""
        if index in self.core.picker.have:
            return True
        if not self.core.piece_verifying(index):
            return True  # a peer's copy is being checked right now
        try:
            ok = await self.engine.disk.run(self._check_and_store, index, data)
        except LocalError as exc:
            self.fail(exc)
            raise
        if ok:
            self._stored(index, data)
        else:
            self.core.piece_failed(index, ())
        return ok

    def chunks_added(self) -> None:
        """More of a chunked blob's hashes are known (see :meth:`Engine.chunks_added`)."""
        known = getattr(self.info, "known_pieces", self.info.num_pieces)
        if not self.ingest:
            self.core.set_known(known)
        self.core.set_published(known)

    def piece_arrived(self, index: int) -> None:
        """An ingesting torrent's store holds piece ``index`` now (fetched elsewhere, checked
        there): offer it once its chunk is published."""
        if index not in self.core.picker.have:
            self._stored(index, None)

    # -- tracker ---------------------------------------------------------------------------------

    async def _announce_loop(self) -> None:
        """Announce alone while downloading (fast while the swarm is young), then hand the
        torrent to the announcer's batches of seeds (when it runs them); ``stopped`` at the
        end either way."""
        announcer = self.engine.announcer
        event = AnnounceEvent.STARTED
        young_delay = 0.5
        was_complete = self.core.complete
        seeding = False
        await trio.sleep(self.announce_delay)
        try:
            while not (self.core.complete and announcer.batching):
                response = await announcer.announce(
                    self.info_hash, self.info.trackers, self._announce_state(event)
                )
                interval = 60.0
                if response is not None:
                    event = AnnounceEvent.NONE
                    interval = float(response.interval)
                    self.add_peers((p.ip, p.port) for p in response.peers)
                wait = interval
                regular = trio.current_time() + interval
                young = self._quick_announce(young_delay)
                if young or response is None:
                    wait = min(interval, young_delay)
                    young_delay = min(young_delay * 2, 30.0)
                with trio.move_on_after(wait):
                    await self._until_complete(was_complete)
                if young and response is not None and not self._quick_announce(young_delay):
                    # The quick re-announce of a young swarm is for the peers it lacks; it
                    # has found them meanwhile: the next announce is the regular one (in a
                    # 1,000-node rollout this halves the announces of downloads).
                    with trio.move_on_at(regular):
                        await self._until_complete(was_complete)
                if self.core.complete and not was_complete:
                    was_complete = True
                    event = AnnounceEvent.COMPLETED
            announcer.add_seed(
                self.info_hash,
                self.info.trackers,
                event,
                stats=lambda: (self.core.uploaded, self.core.downloaded),
                on_peers=self.add_peers,
            )
            seeding = True
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                if seeding:
                    await announcer.remove_seed(self.info_hash)
                else:
                    await announcer.announce(
                        self.info_hash,
                        self.info.trackers,
                        self._announce_state(AnnounceEvent.STOPPED),
                    )

    def _quick_announce(self, delay: float) -> bool:
        """``shared.quick_announce`` for this torrent: announce again after ``delay``?"""
        return quick_announce(
            delay,
            complete=self.core.complete,
            outgoing=sum(1 for conn in self.connections.values() if conn.session.outgoing),
            connections=len(self.connections),
            connecting=len(self._connecting),
            max_peers=self.max_peers,
            known=len(self.candidates),
        )

    async def _until_complete(self, was_complete: bool) -> None:
        if not was_complete:
            await self.completed.wait()
        else:
            await trio.sleep_forever()

    def _announce_state(self, event: AnnounceEvent) -> tuple[AnnounceEvent, int, int, int]:
        """(event, uploaded, downloaded, left)"""
        return event, self.core.uploaded, self.core.downloaded, self.core.left


async def read_handshake(transport: Transport, protocol: wire.PeerProtocol) -> wire.Handshake:
    """Receive until the peer's handshake is complete (anything after it stays buffered)."""
    while True:
        event = protocol.next_event()
        if isinstance(event, wire.Handshake):
            return event
        buffer = protocol.receive_buffer(wire.HANDSHAKE_LENGTH)
        received = await transport.recv_into(buffer[: wire.HANDSHAKE_LENGTH])
        if not received:
            raise PeerGoneError("connection closed during the handshake")
        protocol.commit(received)
