"""One peer connection: a reader task and a writer task around a :class:`PeerProtocol`.

The reader turns received bytes into events and events into torrent state; the
writer sends control messages (batched into one write) and uploads blocks (via
sendfile where possible), one at a time, each paid for in the process-wide upload
bucket. Any :class:`~p2p_common.errors.RemoteError` ends the connection; the
torrent decides whether the peer is also banned.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Hashable
from typing import TYPE_CHECKING

import trio

from p2p_common import wire
from p2p_common.bitfield import Bitfield
from p2p_common.engine.transport import PeerGoneError, Transport
from p2p_common.errors import RemoteError, collapse
from p2p_common.picker import Block

if TYPE_CHECKING:
    from p2p_common.engine.torrent import Torrent

log = logging.getLogger("p2p.peer")

KEEPALIVE_INTERVAL = 60.0
MAX_UPLOAD_QUEUE = 1024
"""Most requests we hold for one peer; more are rejected (fast) or dropped."""
MAX_UNREQUESTED_BYTES = 64 * 1024 * 1024
"""Unrequested block data we tolerate from one peer before dropping it."""
IN_FLIGHT_BYTES = 8 * 1024 * 1024
"""Request bytes we keep outstanding per p2p peer (bandwidth-delay product headroom)."""
FOREIGN_IN_FLIGHT_BYTES = 2 * 1024 * 1024
QUEUE_SECONDS = 2.0
SUPER_SEED_OFFERS = 8
"""Pieces a super-seed reveals to a peer at a time."""
MIN_QUEUE = 2
RECEIVE_CHUNK = 256 * 1024


class PeerConnection:
    """State of one connection. Created after the BitTorrent handshakes were exchanged."""

    def __init__(
        self,
        torrent: Torrent,
        transport: Transport,
        protocol: wire.PeerProtocol,
        handshake: wire.Handshake,
        *,
        address: tuple[str, int],
        outgoing: bool,
    ) -> None:
        self.torrent = torrent
        self.transport = transport
        self.protocol = protocol
        self.peer_id = handshake.peer_id
        self.address = address
        self.outgoing = outgoing
        self.key: Hashable = handshake.peer_id
        # choking and interest, both directions
        self.am_choking = True
        self.am_interested = False
        self.peer_choking = True
        self.peer_interested = False
        # what the peer has: a bitfield, or "everything" after have-all
        self.peer_bits = Bitfield(torrent.metainfo.num_pieces)
        self.peer_seed = False
        self.extension: wire.ExtensionHandshake | None = None
        self.block_size = wire.BLOCK_SIZE
        self.max_queue = FOREIGN_IN_FLIGHT_BYTES // wire.BLOCK_SIZE
        self.queue_target = self.max_queue
        # requests we sent and requests we received
        self.outstanding: dict[tuple[int, int], Block] = {}
        self.offers: set[int] = set()
        """Pieces revealed to this peer while super-seeding and not yet reported by it."""
        self.uploads: collections.deque[wire.Request] = collections.deque()
        # accounting
        self.downloaded = 0
        self.uploaded = 0
        self.unrequested = 0
        self.download_rate = 0.0
        self._rate_mark = 0
        self.connected_at = trio.current_time()
        self.last_received = self.connected_at
        self.last_piece = self.connected_at
        self.snubbed = False
        self._out: list[bytes] = []
        self._wake = trio.Event()
        self._cancel_scope: trio.CancelScope | None = None
        self.closed = False

    # -- identity ------------------------------------------------------------------------------

    @property
    def cooperative(self) -> bool:
        """A p2p agent or proxy (negotiated in the extension handshake)."""
        return self.extension is not None and self.extension.p2p_block is not None

    @property
    def role(self) -> str:
        if self.extension is not None and self.extension.p2p_role:
            return self.extension.p2p_role
        return "foreign"

    def __repr__(self) -> str:
        return f"<peer {self.address[0]}:{self.address[1]} {self.role}>"

    # -- sending -------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue a control message for the writer."""
        self._out.append(data)
        self._wake.set()

    def choke(self) -> None:
        if self.am_choking:
            return
        self.am_choking = True
        self.send(wire.ENCODED_CHOKE)
        if self.protocol.fast:
            for request in self.uploads:
                self._out.append(wire.encode_reject(request.index, request.begin, request.length))
        self.uploads.clear()

    def unchoke(self) -> None:
        if self.am_choking:
            self.am_choking = False
            self.send(wire.ENCODED_UNCHOKE)

    def update_interest(self) -> None:
        """Send interested / not interested as the peer's pieces and ours change."""
        picker = self.torrent.picker
        wanted = picker.interesting(None if self.peer_seed else self.peer_bits)
        if wanted and not self.am_interested:
            self.am_interested = True
            self.send(wire.ENCODED_INTERESTED)
        elif not wanted and self.am_interested:
            self.am_interested = False
            self.send(wire.ENCODED_NOT_INTERESTED)

    def fill_requests(self) -> None:
        if self.peer_choking or not self.am_interested or self.closed:
            return
        # Refill in batches (one write for several requests) once a quarter has drained.
        in_flight = len(self.outstanding)
        if in_flight and in_flight > self.queue_target - max(1, self.queue_target // 4):
            return
        want = self.queue_target - in_flight
        blocks = self.torrent.picker.pick(
            None if self.peer_seed else self.peer_bits, self.block_size, want, self.outstanding
        )
        for block in blocks:
            self.outstanding[(block.index, block.begin)] = block
            self._out.append(wire.encode_request(block.index, block.begin, block.length))
        if blocks:
            self._wake.set()
        elif not self.outstanding and not self.torrent.picker.interesting(
            None if self.peer_seed else self.peer_bits
        ):
            self.update_interest()

    def adapt_queue(self) -> None:
        """Keep about :data:`QUEUE_SECONDS` of this peer's measured rate requested (plus two
        blocks so the rate can grow). A deep fixed queue on a slow or shared link means
        requests chosen on stale information and pieces stuck behind others at busy peers."""
        rate_blocks = int(self.download_rate * QUEUE_SECONDS / self.block_size)
        self.queue_target = max(MIN_QUEUE, min(self.max_queue, rate_blocks + 2))

    def cancel(self, block: Block) -> None:
        if self.outstanding.pop((block.index, block.begin), None) is not None:
            self.send(wire.encode_cancel(block.index, block.begin, block.length))

    def release_requests(self) -> list[Block]:
        """Give back every outstanding request (timeout, choke without fast, close)."""
        blocks = list(self.outstanding.values())
        self.outstanding.clear()
        for block in blocks:
            self.torrent.picker.block_failed(block)
        return blocks

    def have(self, index: int) -> None:
        """We completed ``index``: tell the peer unless it has it already."""
        if not self.peer_seed and index not in self.peer_bits:
            self.send(wire.encode_have(index))

    # -- running -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def run(self) -> None:
        """Exchange messages until either side ends the connection."""
        with trio.CancelScope() as scope:
            self._cancel_scope = scope
            self._send_opening()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    await self._reader()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise collapse(group) from None

    def _send_opening(self) -> None:
        torrent = self.torrent
        have = torrent.picker.have
        if torrent.super_seeding:
            # BEP 16: reveal a few pieces at a time instead of everything (see Torrent.offer).
            if self.protocol.fast:
                self._out.append(wire.ENCODED_HAVE_NONE)
            torrent.offer(self, SUPER_SEED_OFFERS)
        elif self.protocol.fast and have.complete:
            self._out.append(wire.ENCODED_HAVE_ALL)
        elif self.protocol.fast and not have.count:
            self._out.append(wire.ENCODED_HAVE_NONE)
        elif have.count:
            self._out.append(wire.encode_bitfield(have))
        if self.protocol.extensions:
            engine = torrent.engine
            self._out.append(
                wire.encode_extension_handshake(
                    client=engine.client_name,
                    listen_port=engine.port or None,
                    request_queue=MAX_UPLOAD_QUEUE,
                    p2p_block=engine.max_block,
                    p2p_role=engine.role,
                )
            )
        self._wake.set()

    async def _writer(self) -> None:
        torrent = self.torrent
        transport = self.transport
        limiter = torrent.engine.upload_limiter
        piece_length = torrent.metainfo.piece_length
        while True:
            if not self._out and (self.am_choking or not self.uploads):
                self._wake = trio.Event()
                with trio.move_on_after(KEEPALIVE_INTERVAL) as idle:
                    await self._wake.wait()
                if idle.cancelled_caught:
                    self._out.append(wire.ENCODED_KEEP_ALIVE)
            if self._out:
                data = b"".join(self._out)
                self._out.clear()
                await transport.send_all(data)
            if self.uploads and not self.am_choking:
                request = self.uploads.popleft()
                await limiter.acquire(request.length)
                await transport.send_block(
                    wire.encode_piece_header(request.index, request.begin, request.length),
                    torrent.store,
                    request.index * piece_length + request.begin,
                    request.length,
                )
                self.uploaded += request.length
                torrent.uploaded += request.length
                if (
                    request.index in self.offers
                    and request.begin + request.length == torrent.metainfo.piece_size(request.index)
                ):
                    # The last block of a revealed piece is out (peers do not tell a seed
                    # they have a piece it has): reveal the next one.
                    if self.peer_bits.set(request.index):  # it has it now, as far as we know
                        torrent.picker.peer_have(request.index)
                    torrent.offer_done(self, request.index)
                await trio.lowlevel.checkpoint()

    async def _reader(self) -> None:
        protocol = self.protocol
        transport = self.transport
        limiter = self.torrent.engine.download_limiter
        while True:
            event = protocol.next_event()
            while event is not None:
                await self._handle(event)
                event = protocol.next_event()
            buffer = protocol.receive_buffer(RECEIVE_CHUNK)
            received = await transport.recv_into(buffer[:RECEIVE_CHUNK])
            if not received:
                raise PeerGoneError("connection closed by peer")
            protocol.commit(received)
            self.last_received = trio.current_time()
            await limiter.acquire(received)

    async def _handle(self, event: wire.Event) -> None:
        torrent = self.torrent
        if isinstance(event, wire.Piece):
            block = self.outstanding.pop((event.index, event.begin), None)
            size = len(event.data)
            if block is None or block.length != size:
                self.unrequested += size
                if self.unrequested > MAX_UNREQUESTED_BYTES:
                    raise RemoteError("too much unrequested data")
                return
            self.downloaded += size
            self.last_piece = trio.current_time()
            self.snubbed = False
            await torrent.on_block(self, block, event.data)
            self.fill_requests()
        elif isinstance(event, wire.Request):
            self._on_request(event)
        elif isinstance(event, wire.Have):
            if self.offers and event.index in self.offers:
                torrent.offer_done(self, event.index)  # it has what we revealed: reveal more
            if not self.peer_seed and self.peer_bits.set(event.index):
                torrent.picker.peer_have(event.index)
                if not self.am_interested and torrent.picker.wanted(event.index):
                    self.am_interested = True
                    self.send(wire.ENCODED_INTERESTED)
                    self.fill_requests()
        elif isinstance(event, wire.Cancel):
            for request in self.uploads:
                if (request.index, request.begin, request.length) == (
                    event.index,
                    event.begin,
                    event.length,
                ):
                    self.uploads.remove(request)
                    break
        elif isinstance(event, wire.Unchoke):
            self.peer_choking = False
            self.fill_requests()
        elif isinstance(event, wire.Choke):
            self.peer_choking = True
            if not self.protocol.fast:
                self.release_requests()
        elif isinstance(event, wire.Interested):
            self.peer_interested = True
            torrent.peer_interest_changed(self)
        elif isinstance(event, wire.NotInterested):
            self.peer_interested = False
            torrent.peer_interest_changed(self)
        elif isinstance(event, wire.RejectRequest):
            block = self.outstanding.pop((event.index, event.begin), None)
            if block is not None:
                torrent.picker.block_failed(block)
                self.fill_requests()
        elif isinstance(event, wire.BitfieldMessage | wire.HaveAll | wire.HaveNone):
            # Normally the first message; a late one replaces what we knew (aria2 does this).
            self.forget_availability()
            self.peer_seed = False
            self.peer_bits = Bitfield(torrent.metainfo.num_pieces)
            if isinstance(event, wire.HaveAll) or (
                isinstance(event, wire.BitfieldMessage) and event.bits.complete
            ):
                self._become_seed()
            elif isinstance(event, wire.BitfieldMessage):
                self.peer_bits = event.bits
                torrent.picker.peer_bitfield(event.bits)
            self.update_interest()
            self.fill_requests()
        elif isinstance(event, wire.ExtensionHandshake):
            self.extension = event
            if event.p2p_block is not None:
                self.block_size = min(event.p2p_block, torrent.engine.max_block)
                self.max_queue = max(2, IN_FLIGHT_BYTES // self.block_size)
                self.queue_target = self.max_queue
            elif event.request_queue is not None:
                self.max_queue = max(1, min(self.max_queue, event.request_queue))
                self.queue_target = self.max_queue
            torrent.peer_interest_changed(self)
        # keep-alive, port, suggest, allowed-fast, other extensions: nothing to do

    def _become_seed(self) -> None:
        if self.peer_seed:
            return
        if self.peer_bits.count:  # every bit set so far was counted in the availability
            self.torrent.picker.peer_gone(self.peer_bits)
        self.peer_seed = True
        self.peer_bits = Bitfield(self.torrent.metainfo.num_pieces, full=True)
        self.torrent.picker.peer_seed()

    def forget_availability(self) -> None:
        """Remove this peer's pieces from the swarm availability (on close)."""
        if self.peer_seed:
            self.torrent.picker.peer_gone(None)
        elif self.peer_bits.count:
            self.torrent.picker.peer_gone(self.peer_bits)

    def _on_request(self, request: wire.Request) -> None:
        limit = self.torrent.engine.max_block if self.cooperative else wire.MAX_FOREIGN_REQUEST
        if request.length > limit:
            raise RemoteError(f"request of {request.length} bytes exceeds {limit}")
        if (
            self.am_choking
            or request.index not in self.torrent.picker.have
            or len(self.uploads) >= MAX_UPLOAD_QUEUE
        ):
            if self.protocol.fast:
                self.send(wire.encode_reject(request.index, request.begin, request.length))
            return
        self.uploads.append(request)
        self._wake.set()
