"""One torrent in the engine: its peers, its pieces, its readers, its announces.

Tasks (children of :meth:`Torrent.run`): the choke round (every second), the
connector (keeps up to ``max_peers`` connections from known candidates), and the
announcer (tracker re-announces, fast while the swarm is young). Connections run
as children of the torrent's nursery (outgoing) or of the engine's listener
(incoming) and are closed with the torrent.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from p2p_common import wire
from p2p_common.choker import Choker, PeerStats
from p2p_common.engine.peer import SUPER_SEED_OFFERS, PeerConnection
from p2p_common.engine.transport import PeerGoneError, Transport, make_transport
from p2p_common.errors import LocalError, RemoteError
from p2p_common.logs import event as log_event
from p2p_common.metainfo import Metainfo
from p2p_common.picker import Block, PiecePicker
from p2p_common.storage import PieceStore, verify_piece
from p2p_common.tracker_proto import Event as AnnounceEvent

if TYPE_CHECKING:
    from p2p_common.engine.engine import Engine

log = logging.getLogger("p2p.torrent")

CHOKE_ROUND = 1.0
SNUB_AFTER = 20.0
IDLE_TIMEOUT = 180.0
CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0
READER_WINDOW = 4
"""Pieces ahead of each streaming reader that the picker fetches first. Small on purpose: a
whole rollout reads in the same order, and everyone wanting the same pieces first is the
opposite of what a swarm needs (tests/bench/bench_rollout.py)."""
BAN_STRIKES = 2
RESEED_ANNOUNCE_SPREAD = 30.0
"""Seconds over which a service spreads the first announces of the blobs it reseeds at start."""
RECONNECT_DELAY = 5.0
"""Seconds before dialling again a peer whose connection ended normally."""
VERIFY_QUEUE_BYTES = 8 * 1024 * 1024
"""Received pieces that may wait for their hash check and write (per torrent)."""
VERIFIERS = 2
VERIFY_BATCH = 8
"""Most queued pieces one worker-thread call checks and writes."""
"""Pieces checked and written at once per torrent (hashlib releases the GIL)."""


class TorrentFailedError(LocalError):
    """The torrent stopped because of a local failure (disk full, ...)."""


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
        engine: Engine,
        metainfo: Metainfo,
        store: PieceStore,
        *,
        max_peers: int = 50,
        announce_delay: float = 0.0,
    ) -> None:
        self.engine = engine
        self.announce_delay = announce_delay
        self.metainfo = metainfo
        self.store = store
        self.info_hash = metainfo.info_hash
        self.max_peers = max_peers
        self.picker = PiecePicker(
            metainfo.num_pieces, metainfo.piece_length, metainfo.length, have=store.have
        )
        self.choker = Choker()
        self.connections: dict[bytes, PeerConnection] = {}
        self.candidates: dict[tuple[str, int], _Candidate] = {}
        self._connecting: set[tuple[str, int]] = set()
        self._strikes: collections.Counter[bytes] = collections.Counter()
        self._buffers: dict[int, bytearray] = {}
        self._contributors: dict[int, set[PeerConnection]] = {}
        self._piece_events: dict[int, trio.Event] = {}
        self._readers: dict[object, int] = {}
        self._candidates_changed = trio.Event()
        self.super_seeding = engine.super_seed and self.picker.complete
        """BEP 16: reveal pieces to each peer a few at a time, each piece to one peer before
        any piece goes to a second, so a seed's upload puts every piece into the swarm once
        instead of the same pieces into every peer (tests/bench/bench_rollout.py)."""
        self._offer_cursor = 0
        self._first_pass = 0
        self._offered_now = [0] * metainfo.num_pieces
        """Per piece: to how many peers it is revealed and not yet delivered."""
        self.completed = trio.Event()
        self.closed = trio.Event()
        """Set when the torrent has stopped, its connections ended and its store is closed."""
        if self.picker.complete:
            self.completed.set()
        self.failure: BaseException | None = None
        self._failed = trio.Event()
        self.downloaded_by_role: collections.Counter[str] = collections.Counter()
        self.uploaded = 0
        self.started_at = trio.current_time()
        self.last_progress = self.started_at
        """When the last piece was verified (for no-progress fallbacks)."""
        # Received pieces wait here for their hash check and disk write, which run in
        # worker threads while the connections keep receiving (bounded: backpressure).
        depth = max(2, VERIFY_QUEUE_BYTES // metainfo.piece_length)
        self._verify_send, self._verify_receive = trio.open_memory_channel[
            tuple[int, bytes | bytearray, set[PeerConnection]]
        ](depth)
        self._nursery: trio.Nursery | None = None
        self._stopped = False

    # -- public API ------------------------------------------------------------------------------

    @property
    def downloaded(self) -> int:
        return sum(self.downloaded_by_role.values())

    @property
    def left(self) -> int:
        have = self.picker.have
        if have.complete:
            return 0
        missing = self.metainfo.num_pieces - have.count
        left = missing * self.metainfo.piece_length
        last = self.metainfo.num_pieces - 1
        if last not in have:
            left -= self.metainfo.piece_length - self.metainfo.piece_size(last)
        return left

    def add_peers(self, addresses: Iterable[tuple[str, int]]) -> None:
        """Candidate peers (from a tracker, or given directly)."""
        added = False
        for address in addresses:
            if address not in self.candidates and address not in self.engine.self_addresses:
                self.candidates[address] = _Candidate()
                added = True
        if added:
            self._candidates_changed.set()

    async def wait_for_piece(self, index: int) -> None:
        """Return once piece ``index`` is verified and stored (raises if the torrent failed)."""
        while index not in self.picker.have:
            if self.failure is not None:
                raise TorrentFailedError(str(self.failure)) from self.failure
            event = self._piece_events.get(index)
            if event is None:
                event = self._piece_events[index] = trio.Event()
            async with trio.open_nursery() as nursery:

                async def failed(scope: trio.CancelScope = nursery.cancel_scope) -> None:
                    await self._failed.wait()
                    scope.cancel()

                nursery.start_soon(failed)
                await event.wait()
                nursery.cancel_scope.cancel()

    async def wait_complete(self) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def failed() -> None:
                    await self._failed.wait()
                    scope.cancel()

                nursery.start_soon(failed)
                await self.completed.wait()
                nursery.cancel_scope.cancel()
        if self.failure is not None and not self.completed.is_set():
            raise TorrentFailedError(str(self.failure)) from self.failure

    def set_reader(self, reader: object, next_piece: int | None) -> None:
        """A streaming reader's position (None when it is done): its next pieces come first."""
        if next_piece is None:
            self._readers.pop(reader, None)
        else:
            self._readers[reader] = next_piece
        self._update_priority()

    def _update_priority(self) -> None:
        have = self.picker.have
        wanted: list[int] = []
        for start in sorted(self._readers.values()):
            index = start
            taken = 0
            while index < self.metainfo.num_pieces and taken < READER_WINDOW:
                if index not in have:
                    wanted.append(index)
                    taken += 1
                index += 1
        self.picker.set_priority(dict.fromkeys(wanted))

    # -- running ---------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Torrent] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._choke_loop)
                nursery.start_soon(self._connect_loop)
                if not self.picker.complete:
                    for _ in range(VERIFIERS):
                        nursery.start_soon(self._verifier)
                if self.metainfo.trackers:
                    nursery.start_soon(self._announce_loop)
                task_status.started(self)
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
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        for conn in list(self.connections.values()):
            conn.close()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            log_event(
                log, "torrent.failed", logging.ERROR, torrent=self.metainfo.name, error=str(exc)
            )
            self._failed.set()
        self.stop()

    # -- connections -----------------------------------------------------------------------------

    async def run_connection(
        self,
        transport: Transport,
        protocol: wire.PeerProtocol,
        handshake: wire.Handshake,
        *,
        address: tuple[str, int],
        outgoing: bool,
    ) -> None:
        """Run an established connection until it ends; cleans up after it."""
        if self._stopped or handshake.peer_id in self.connections:
            return
        if self.engine.is_banned(handshake.peer_id, address[0]):
            return
        protocol.set_geometry(
            self.metainfo.num_pieces, self.metainfo.piece_length, self.metainfo.length
        )
        conn = PeerConnection(
            self, transport, protocol, handshake, address=address, outgoing=outgoing
        )
        self.connections[conn.peer_id] = conn
        try:
            await conn.run()
        except PeerGoneError:
            pass
        except RemoteError as exc:
            log_event(log, "peer.dropped", logging.INFO, peer=repr(conn), reason=str(exc))
        except LocalError as exc:
            self.fail(exc)
        finally:
            conn.closed = True
            self.connections.pop(conn.peer_id, None)
            self._close_when_idle()
            conn.release_requests()
            for index in conn.offers:
                self._offered_now[index] -= 1
            conn.offers.clear()
            conn.forget_availability()
            self.choker.forget(conn.key)
            for contributors in self._contributors.values():
                contributors.discard(conn)

    async def _connect_one(self, address: tuple[str, int]) -> None:
        """Dial a candidate and run the connection; schedule its next attempt afterwards."""
        engine = self.engine
        self._connecting.add(address)
        candidate = self.candidates.get(address)
        connected = False
        try:
            if not engine.reserve_connection():
                return
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await trio.open_tcp_stream(*address)
                async with stream:
                    transport = make_transport(stream)
                    await transport.send_all(engine.handshake_for(self.info_hash))
                    protocol = wire.PeerProtocol(max_block=engine.max_block)
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
                    await self.run_connection(
                        transport, protocol, handshake, address=address, outgoing=True
                    )
            except (OSError, RemoteError, trio.TooSlowError):
                pass
            finally:
                engine.release_connection()
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

    async def _connect_loop(self) -> None:
        assert self._nursery is not None
        while True:
            with trio.move_on_after(1.0):
                await self._candidates_changed.wait()
            self._candidates_changed = trio.Event()
            if self.picker.complete:
                continue  # seeds wait for leechers to connect
            now = trio.current_time()
            connected = {c.address for c in self.connections.values()}
            for address, candidate in list(self.candidates.items()):
                if len(self.connections) + len(self._connecting) >= self.max_peers:
                    break
                if (
                    address in connected
                    or address in self._connecting
                    or candidate.next_attempt > now
                    or self.engine.is_banned(None, address[0], address[1])
                ):
                    continue
                candidate.next_attempt = math.inf  # set properly when the attempt ends
                self._nursery.start_soon(self._connect_one, address)

    # -- pieces ----------------------------------------------------------------------------------

    async def on_block(self, conn: PeerConnection, block: Block, data: memoryview) -> None:
        index = block.index
        piece_size = self.metainfo.piece_size(index)
        if block.begin == 0 and block.length == piece_size:
            if not self.picker.block_received(block):
                return
            self.downloaded_by_role[conn.role] += block.length
            # ``data`` points into the connection's receive buffer: copy it out.
            await self._verify_send.send((index, bytes(data), {conn}))
            return
        if not self.picker.wanted(index):
            return
        buffer = self._buffers.get(index)
        if buffer is None:
            buffer = self._buffers[index] = bytearray(piece_size)
        buffer[block.begin : block.begin + block.length] = data
        self._contributors.setdefault(index, set()).add(conn)
        self.downloaded_by_role[conn.role] += block.length
        if self.picker.block_received(block):
            del self._buffers[index]
            await self._verify_send.send((index, buffer, self._contributors.pop(index, {conn})))

    async def add_piece(self, index: int, data: bytes) -> bool:
        """A piece fetched outside the swarm (e.g. the proxy's HTTP fallback): check it,
        store it and announce it like a piece from a peer. False if it does not verify."""
        if index in self.picker.have:
            return True
        if not self.picker.wanted(index):
            return True  # a peer's copy is being checked right now
        self.picker.piece_verifying(index)
        pieces: list[tuple[int, bytes | bytearray]] = [(index, data)]
        [ok] = await trio.to_thread.run_sync(
            self._verify_and_store, pieces, limiter=self.engine.disk_threads
        )
        self._piece_checked(index, ok, set())
        return ok

    async def _verifier(self) -> None:
        """Check and store queued pieces, several per worker-thread call."""
        receive = self._verify_receive
        while True:
            try:
                batch = [await receive.receive()]
            except trio.EndOfChannel:
                return
            while len(batch) < VERIFY_BATCH:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                results = await trio.to_thread.run_sync(
                    self._verify_and_store,
                    [(index, data) for index, data, _ in batch],
                    limiter=self.engine.disk_threads,
                )
            except LocalError as exc:  # the disk failed us (full, gone): this torrent stops
                self.fail(exc)
                return
            for (index, _data, contributors), ok in zip(batch, results, strict=True):
                self._piece_checked(index, ok, contributors)

    def _piece_checked(self, index: int, ok: bool, contributors: set[PeerConnection]) -> None:
        if not ok:
            self.picker.piece_failed(index)
            self._punish(contributors, index)
            return
        self.picker.piece_verified(index)
        self.last_progress = trio.current_time()
        event = self._piece_events.pop(index, None)
        if event is not None:
            event.set()
        if self._readers:
            self._update_priority()
        endgame = self.metainfo.num_pieces - self.picker.have.count < 8
        for conn in self.connections.values():
            conn.have(index)
            if endgame:
                for key, block in list(conn.outstanding.items()):
                    if key[0] == index:
                        conn.cancel(block)
                        self.picker.block_failed(block)
            if conn.am_interested and not conn.outstanding:
                conn.update_interest()
        if self.picker.complete:
            self.completed.set()
            log_event(
                log,
                "torrent.complete",
                torrent=self.metainfo.name,
                seconds=round(trio.current_time() - self.started_at, 3),
                **{f"from_{role}": n for role, n in self.downloaded_by_role.items()},
            )

    def _verify_and_store(self, pieces: list[tuple[int, bytes | bytearray]]) -> list[bool]:
        """(Worker thread.) Check each piece's SHA-1; store the good ones."""
        results = []
        for index, data in pieces:
            ok = verify_piece(self.metainfo, index, data)
            if ok:
                self.store.write_piece(index, data)
            results.append(ok)
        return results

    def _punish(self, contributors: set[PeerConnection], index: int) -> None:
        for conn in contributors:
            self._strikes[conn.peer_id] += 1
            if len(contributors) == 1 or self._strikes[conn.peer_id] >= BAN_STRIKES:
                self.engine.ban(conn.peer_id, conn.address)
                log_event(
                    log,
                    "peer.banned",
                    logging.WARNING,
                    peer=repr(conn),
                    piece=index,
                    reason="bad data",
                )
                conn.close()

    # -- choking ---------------------------------------------------------------------------------

    def offer(self, conn: PeerConnection, count: int) -> None:
        """Reveal up to ``count`` more pieces to ``conn`` (super-seeding).

        First every piece once, in index order across peers (which spreads first copies and
        keeps streaming readers supplied roughly in reading order). After that, pieces the
        peer lacks that no other peer is known to have and nobody is being sent, then any
        piece it lacks that nobody is being sent. A piece revealed to one peer is not revealed
        to a second while the first still has it in flight, so the seed's upload adds new
        pieces to the swarm instead of copies; the peers trade the rest.
        """
        num = self.metainfo.num_pieces
        while count > 0 and self._first_pass < num:
            index = self._first_pass
            self._first_pass += 1
            if index not in conn.peer_bits:
                self._reveal(conn, index)
                count -= 1
        if count <= 0:
            return
        fallback: list[int] = []
        for step in range(num):
            index = (self._offer_cursor + step) % num
            if index in conn.peer_bits or index in conn.offers or self._offered_now[index]:
                continue
            if self.picker.holders(index):
                if len(fallback) < count:
                    fallback.append(index)
                continue
            self._reveal(conn, index)
            count -= 1
            if count <= 0:
                self._offer_cursor = (index + 1) % num
                return
        for index in fallback[:count]:
            self._reveal(conn, index)

    def _reveal(self, conn: PeerConnection, index: int) -> None:
        conn.offers.add(index)
        self._offered_now[index] += 1
        conn.send(wire.encode_have(index))

    def offer_done(self, conn: PeerConnection, index: int) -> None:
        """A revealed piece reached ``conn`` (or ``conn`` left): reveal another one."""
        if index in conn.offers:
            conn.offers.discard(index)
            self._offered_now[index] -= 1
        if not conn.closed:
            self.offer(conn, 1)

    def peer_interest_changed(self, conn: PeerConnection) -> None:
        """Cooperative peers are unchoked at once rather than at the next round."""
        if conn.cooperative and conn.peer_interested and conn.am_choking:
            unchoked = sum(
                1 for c in self.connections.values() if c.cooperative and not c.am_choking
            )
            if unchoked < self.choker.max_cooperative:
                conn.unchoke()

    async def _choke_loop(self) -> None:
        while True:
            await trio.sleep(CHOKE_ROUND)
            now = trio.current_time()
            stats = []
            for conn in list(self.connections.values()):
                delta = conn.downloaded - conn._rate_mark
                conn._rate_mark = conn.downloaded
                conn.download_rate = 0.7 * conn.download_rate + 0.3 * delta / CHOKE_ROUND
                if conn.outstanding:  # only a peer we are asking tells its rate
                    conn.adapt_queue()
                if self.super_seeding and not conn.offers and conn.peer_interested:
                    self.offer(conn, SUPER_SEED_OFFERS)  # nothing revealed: try again
                if now - conn.last_received > IDLE_TIMEOUT:
                    conn.close()
                    continue
                if conn.outstanding and now - conn.last_piece > SNUB_AFTER:
                    conn.snubbed = True
                    for block in conn.release_requests():
                        conn.send(wire.encode_cancel(block.index, block.begin, block.length))
                    conn.last_piece = now
                stats.append(
                    PeerStats(
                        key=conn.key,
                        interested=conn.peer_interested,
                        cooperative=conn.cooperative,
                        download_rate=conn.download_rate,
                        snubbed=conn.snubbed,
                    )
                )
            unchoke = self.choker.decide(stats, seeding=self.picker.complete, now=now)
            for conn in list(self.connections.values()):
                if conn.key in unchoke:
                    conn.unchoke()
                else:
                    conn.choke()
                conn.fill_requests()

    # -- tracker ---------------------------------------------------------------------------------

    async def _announce_loop(self) -> None:
        announcer = self.engine.announcer
        event = AnnounceEvent.STARTED
        young_delay = 0.5
        was_complete = self.picker.complete
        await trio.sleep(self.announce_delay)
        try:
            while True:
                response = await announcer.announce(self, event)
                interval = 60.0
                if response is not None:
                    event = AnnounceEvent.NONE
                    interval = float(response.interval)
                    self.add_peers((p.ip, p.port) for p in response.peers)
                wait = interval
                young = len(self.connections) < min(self.max_peers, 8) and not self.picker.complete
                if young or response is None:
                    wait = min(interval, young_delay)
                    young_delay = min(young_delay * 2, 30.0)
                with trio.move_on_after(wait):
                    if not was_complete:
                        await self.completed.wait()
                    else:
                        await trio.sleep_forever()
                if self.picker.complete and not was_complete:
                    was_complete = True
                    event = AnnounceEvent.COMPLETED
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await announcer.announce(self, AnnounceEvent.STOPPED)


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
