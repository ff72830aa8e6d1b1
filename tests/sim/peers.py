"""The peer engine's shell, in virtual time: what ``p2p_common.engine`` does around the cores.

Each class mirrors one module of the trio shell and makes the same calls into the pure cores,
in the same order, at the same moments (in virtual time):

- :class:`Process` is ``engine.py``: a service's torrents by swarm id, its connection slots
  (:class:`~p2p_common.engine.shared.ConnectionSlots`), one choking round a second for all its
  torrents (``second_copies`` off while any of its torrents still ingests), and the flusher
  that holds HAVEs back :data:`~p2p_common.engine.flusher.HAVE_DELAY`.
- :class:`SimTorrent` is ``torrent.py``: the :class:`~p2p_common.swarm.SwarmCore`, the dialler
  (``max_peers``, backoff, :data:`~p2p_common.engine.torrent.RECONNECT_DELAY`), the announce
  loop (fast re-announces while the swarm is young; once it has everything, ``completed`` or
  ``started`` in the process's batches of seeds, :class:`~tests.sim.tracker.SeedBatches`), the
  verifier and
  ``chunks_added`` / ``piece_arrived``. The verifier accepts a piece by its index: no bytes
  exist (:class:`FakeBlock`), so a piece is never bad and nobody is banned.
- :class:`Connection` / :class:`Channel` are ``connection.py``: a writer per direction that
  sends the control messages the session queued and uploads one block at a time over a
  network :class:`~tests.sim.network.Flow` (control messages queued meanwhile leave behind the
  block, as on a TCP connection), and a reader that decodes those control messages with the
  real :class:`~p2p_common.wire.PeerProtocol` and feeds every event to the peer's
  :class:`~p2p_common.session.PeerSession`. Blocks are not encoded: a
  :class:`~p2p_common.wire.Piece` event of the right size is handed to the session when the
  block's last byte arrives.

Every message and block arrives ``latency`` seconds after it left (propagation; a block
leaves when its last byte went through both links).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from p2p_common import wire
from p2p_common.bitfield import Bitfield
from p2p_common.engine.announce import NUMWANT
from p2p_common.engine.engine import CHOKE_ROUND, CLIENT_NAME, DEFAULT_MAX_BLOCK
from p2p_common.engine.flusher import HAVE_DELAY
from p2p_common.engine.shared import ConnectionSlots, may_dial, quick_announce
from p2p_common.engine.torrent import RECONNECT_DELAY, _backoff
from p2p_common.errors import RemoteError
from p2p_common.session import LocalPeer, PeerSession, PieceReady, Upload, Window
from p2p_common.swarm import SwarmCore
from p2p_common.tracker_proto import Event as AnnounceEvent
from tests.sim.network import Flow, Link
from tests.sim.tracker import SeedBatches

if TYPE_CHECKING:
    from tests.sim.scenario import Simulation

PIECE_HEADER = 13
"""Bytes of a piece message before its block."""
YOUNG_DELAY = 0.5
"""First re-announce delay while a swarm is young (doubling up to 30 s), as in torrent.py."""
MAX_YOUNG_DELAY = 30.0
ZEROS = bytes(wire.MAX_P2P_BLOCK)


class FakeBlock:
    """Stands in for a whole piece's bytes: it has their length, and ``bytes()`` of it is empty.

    The simulator's verifier accepts a piece by its index, so nothing ever reads piece data;
    a block that is only part of a piece (pieces larger than the negotiated block) is a real
    view of zeros instead, because the core assembles those into a buffer."""

    __slots__ = ("length",)

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __bytes__(self) -> bytes:
        return b""


_FAKE: dict[int, FakeBlock] = {}


def block_data(length: int, whole_piece: bool) -> memoryview:
    if not whole_piece:
        return memoryview(ZEROS)[:length]
    fake = _FAKE.get(length)
    if fake is None:
        fake = _FAKE[length] = FakeBlock(length)
    return cast(memoryview, fake)


class Blob:
    """A blob's geometry and swarm id, and the decoder every connection of its swarm shares.

    One :class:`~p2p_common.wire.PeerProtocol` per blob is enough: every delivery holds whole
    messages, so the decoder's buffer is empty between deliveries."""

    def __init__(self, digest: str, length: int, piece_length: int, num_pieces: int) -> None:
        self.digest = digest
        self.length = length
        self.piece_length = piece_length
        self.num_pieces = num_pieces
        self.swarm_id = hashlib.sha1(digest.encode()).digest()
        self.decoder = self.new_decoder()

    def new_decoder(self) -> wire.PeerProtocol:
        reserved = wire.reserved_bytes()
        decoder = wire.PeerProtocol(reserved=reserved, initial_buffer=4096)
        decoder.receive_data(
            wire.encode_handshake(self.swarm_id, b"-SIM-".ljust(20, b"x"), reserved)
        )
        assert isinstance(decoder.next_event(), wire.Handshake)
        decoder.set_geometry(self.num_pieces, self.piece_length, self.length)
        return decoder

    def piece_size(self, index: int) -> int:
        return min(self.piece_length, self.length - index * self.piece_length)


class Process:
    """One service's peer engine (an agent or a proxy) on one node."""

    def __init__(
        self,
        sim: Simulation,
        *,
        name: str,
        ip: str,
        port: int,
        role: str,
        up: Link,
        down: Link,
        super_seed: bool,
        max_connections: int,
        max_peers: int,
        index: int,
    ) -> None:
        self.sim = sim
        self.name = name
        self.ip = ip
        self.port = port
        self.address = (ip, port)
        self.role = role
        code = {"agent": b"PA", "proxy": b"PP"}.get(role, b"PX")
        self.peer_id = b"-" + code + b"0100-" + b"%012d" % index
        self.local = LocalPeer(CLIENT_NAME, port, DEFAULT_MAX_BLOCK, role)
        self.up = up
        self.down = down
        self.super_seed = super_seed
        self.slots = ConnectionSlots(max_connections)
        self.max_peers = max_peers
        self.torrents: dict[bytes, SimTorrent] = {}
        self.seeds = SeedBatches(self)
        """The announcer's batches of this process's seeds."""
        self._flush: list[Channel] = []
        self._rounds = False
        self._last_round = 0.0
        self._ephemeral = 32768

    def ephemeral_port(self) -> int:
        self._ephemeral = self._ephemeral + 1 if self._ephemeral < 60999 else 32768
        return self._ephemeral

    def add_torrent(self, torrent: SimTorrent) -> None:
        self.torrents[torrent.blob.swarm_id] = torrent
        if not self._rounds:
            # The engine's round timer starts with the process: a phase of its own per node.
            self._rounds = True
            self._last_round = self.sim.loop.now
            self.sim.loop.after(self.sim.rng.random() * CHOKE_ROUND, self._round)

    # -- the engine's timers -------------------------------------------------------------------

    def flush_later(self, channel: Channel) -> None:
        """HAVEs wait up to HAVE_DELAY for company (one timer per process, flusher.py)."""
        if not self._flush:
            self.sim.loop.after(HAVE_DELAY, self._flush_now)
        self._flush.append(channel)

    def _flush_now(self) -> None:
        pending, self._flush = self._flush, []
        for channel in pending:
            channel.flush()

    def _round(self) -> None:
        """Engine._choke_rounds: one choking round for every torrent with peers."""
        now = self.sim.loop.now
        interval, self._last_round = max(now - self._last_round, 1e-3), now
        torrents = list(self.torrents.values())
        ingesting = any(t.ingest and not t.core.complete for t in torrents)
        for torrent in torrents:
            torrent.core.second_copies = not ingesting
            if torrent.conns or torrent.candidates:
                torrent.tick(now, interval)
        self.sim.loop.after(CHOKE_ROUND, self._round)


class _Candidate:
    __slots__ = ("failures", "next_attempt")

    def __init__(self) -> None:
        self.failures = 0
        self.next_attempt = 0.0


class SimTorrent:
    """One torrent of one process (torrent.py's ``Torrent`` around its ``SwarmCore``)."""

    def __init__(
        self,
        proc: Process,
        blob: Blob,
        *,
        have: Bitfield | None = None,
        known: int | None = None,
        published: int | None = None,
        ingest: bool = False,
    ) -> None:
        self.proc = proc
        self.sim = proc.sim
        self.blob = blob
        self.ingest = ingest
        now = self.sim.loop.now
        self.core = SwarmCore(
            num_pieces=blob.num_pieces,
            piece_length=blob.piece_length,
            length=blob.length,
            local=proc.local,
            have=have,
            known=0 if ingest else known,
            published=published,
            super_seed=proc.super_seed,
            now=now,
            rng=random.Random(self.sim.rng.getrandbits(64)),
        )
        self.conns: dict[bytes, Connection] = {}
        self.candidates: dict[tuple[str, int], _Candidate] = {}
        self.connecting: dict[tuple[str, int], None] = {}
        self.started_at = now
        self.completed_at: float | None = now if self.core.complete else None
        self.first_piece_at: float | None = None
        """When piece 0 was stored (a streaming reader's first byte)."""
        self.on_complete: list[Callable[[SimTorrent], object]] = []
        self._reader: int | None = None
        self._reader_key = object()
        # announce loop state
        self._event = AnnounceEvent.STARTED
        self._young_delay = YOUNG_DELAY
        self._was_complete = self.core.complete
        self._waiting = False
        self._wait_version = 0
        self._young_wait = False
        self._regular_at = 0.0
        proc.add_torrent(self)

    # -- what a service uses ---------------------------------------------------------------------

    def add_peers(self, addresses: list[tuple[str, int]]) -> None:
        added = False
        for address in addresses:
            if address not in self.candidates and address != self.proc.address:
                self.candidates[address] = _Candidate()
                added = True
        if added:
            self.dial(self.sim.loop.now)

    def start_reader(self) -> None:
        """A streaming reader from byte 0 (SwarmDownload.stream): its next pieces come first."""
        self._reader = 0
        self._advance_reader()

    def _advance_reader(self) -> None:
        position = self._reader
        if position is None:
            return
        have = self.core.picker.have
        while position < self.blob.num_pieces and position in have:
            position += 1
        if position >= self.blob.num_pieces:
            self._reader = None
            self.core.set_reader(self._reader_key, None)
        else:
            self._reader = position
            self.core.set_reader(self._reader_key, position)

    def chunks_added(self, known: int) -> None:
        """More of the blob's hashes are known (Torrent.chunks_added)."""
        if not self.ingest:
            self.core.set_known(known)
        self.core.set_published(known)

    def piece_arrived(self, index: int) -> None:
        """An ingesting torrent's store holds piece ``index`` (fetched from the origin)."""
        if index not in self.core.picker.have:
            self._stored(index)

    def add_piece(self, index: int) -> bool:
        """A piece fetched outside the swarm (HTTP fallback), like Torrent.add_piece; False if
        it was not needed after all."""
        if index in self.core.picker.have or not self.core.piece_verifying(index):
            return False
        self._stored(index)
        return True

    # -- pieces ----------------------------------------------------------------------------------

    def verify(self, ready: PieceReady) -> None:
        """The verifier: every piece is good here (no bytes exist to check)."""
        self._stored(ready.index)

    def _stored(self, index: int) -> None:
        now = self.sim.loop.now
        self.core.piece_stored(index, now, None)
        if index == 0 and self.first_piece_at is None:
            self.first_piece_at = now
        if self._reader == index:
            self._advance_reader()
        if self.core.complete and self.completed_at is None:
            self.completed_at = now
            if self._waiting and not self._was_complete:
                # The announce loop waits on `completed`: it announces at once.
                self._wait_version += 1
                self._wait_over(self._wait_version)
            for callback in self.on_complete:
                callback(self)

    # -- connections -----------------------------------------------------------------------------

    def tick(self, now: float, interval: float) -> None:
        for session, reason in self.core.tick(now, interval):
            conn = self.conns.get(session.peer_id)
            if conn is not None:
                conn.close(reason)
        if not self.core.complete:
            self.dial(now)

    def dial(self, now: float) -> None:
        """Connect to candidates that are due, up to ``max_peers`` connections."""
        if self.core.complete:
            return  # seeds wait for leechers to connect
        # As in torrent.py: a dial counts in `connecting` until its connection is established
        # (Scenario._establish), then in `conns`; engine.shared.may_dial decides.
        limit = self.proc.max_peers
        dialled = sum(1 for conn in self.conns.values() if conn.dialer is self)
        busy = {conn.session_of(self).address for conn in self.conns.values()}
        for address, candidate in self.candidates.items():
            connecting = len(self.connecting)
            if not may_dial(dialled + connecting, len(self.conns) + connecting, limit):
                break
            if address in busy or address in self.connecting or candidate.next_attempt > now:
                continue
            candidate.next_attempt = float("inf")  # set properly when the attempt ends
            self.connecting[address] = None
            self.sim.connect(self, address)

    def attempt_ended(self, address: tuple[str, int], *, connected: bool) -> None:
        """The dialling task ended: it failed, or its connection ran and closed."""
        self.connecting.pop(address, None)
        candidate = self.candidates.get(address)
        if candidate is None:
            return
        if connected:
            candidate.failures = 0
            delay = RECONNECT_DELAY
        else:
            candidate.failures += 1
            delay = _backoff(candidate.failures)
        candidate.next_attempt = self.sim.loop.now + delay

    # -- announces -------------------------------------------------------------------------------

    def start_announcing(self, delay: float = 0.0) -> None:
        self.sim.loop.after(delay, self._announce)

    def _announce(self) -> None:
        if self.core.complete:  # announced in the process's batches from now on
            self.proc.seeds.add(self, self._event)
            return
        self.sim.tracker.announce(self, self._event, NUMWANT, self._announced)

    def _announced(self, response: tuple[float, list[tuple[str, int]]] | None) -> None:
        """Torrent._announce_loop after each answer."""
        interval = 60.0
        if response is not None:
            self._event = AnnounceEvent.NONE
            interval = response[0]
            self.add_peers(response[1])
        wait = interval
        self._regular_at = self.sim.loop.now + interval
        young = self._quick_announce(self._young_delay)
        self._young_wait = young and response is not None
        if young or response is None:
            wait = min(interval, self._young_delay)
            self._young_delay = min(self._young_delay * 2, MAX_YOUNG_DELAY)
        if self.core.complete and not self._was_complete:
            wait = 0.0  # completed.wait() returns at once
        self._waiting = True
        self._wait_version += 1
        self.sim.loop.after(wait, self._wait_over, self._wait_version)

    def _wait_over(self, version: int) -> None:
        if version != self._wait_version or not self._waiting:
            return
        self._waiting = False
        if self.core.complete and not self._was_complete:
            self._was_complete = True
            self._event = AnnounceEvent.COMPLETED
        elif self._young_wait and not self._quick_announce(self._young_delay):
            # Torrent._announce_loop: the swarm found its peers during the quick wait, so
            # the next announce is the regular one.
            self._young_wait = False
            self._waiting = True
            self._wait_version += 1
            self.sim.loop.at(self._regular_at, self._wait_over, self._wait_version)
            return
        self._announce()

    def _quick_announce(self, delay: float) -> bool:
        """Torrent._quick_announce."""
        return quick_announce(
            delay,
            complete=self.core.complete,
            outgoing=sum(1 for conn in self.conns.values() if conn.dialer is self),
            connections=len(self.conns),
            connecting=len(self.connecting),
            max_peers=self.proc.max_peers,
            known=len(self.candidates),
        )


class Connection:
    """An established connection: two sessions, one channel each way."""

    __slots__ = ("acceptor", "address", "back", "closed", "dialer", "out", "sim")

    def __init__(
        self, sim: Simulation, dialer: SimTorrent, acceptor: SimTorrent, address: tuple[str, int]
    ) -> None:
        self.sim = sim
        self.dialer = dialer
        self.acceptor = acceptor
        self.address = address
        self.closed = False
        now = sim.loop.now
        window = Window(0, dialer.blob.num_pieces)
        outgoing = PeerSession(
            dialer.core,
            peer_id=acceptor.proc.peer_id,
            address=address,
            outgoing=True,
            window=window,
            fast=True,
            extensions=True,
            now=now,
        )
        incoming = PeerSession(
            acceptor.core,
            peer_id=dialer.proc.peer_id,
            address=(dialer.proc.ip, dialer.proc.ephemeral_port()),
            outgoing=False,
            window=window,
            fast=True,
            extensions=True,
            now=now,
        )
        self.out = Channel(self, dialer, acceptor, outgoing, incoming)
        self.back = Channel(self, acceptor, dialer, incoming, outgoing)
        dialer.conns[acceptor.proc.peer_id] = self
        acceptor.conns[dialer.proc.peer_id] = self
        dialer.core.add_session(outgoing)
        acceptor.core.add_session(incoming)

    def session_of(self, torrent: SimTorrent) -> PeerSession:
        return self.out.session if torrent is self.dialer else self.back.session

    def close(self, reason: str) -> None:
        """Either side ends it (an error, an idle timeout): both sides clean up."""
        if self.closed:
            return
        self.closed = True
        self.sim.stats.closed[reason] = self.sim.stats.closed.get(reason, 0) + 1
        for channel in (self.out, self.back):
            channel.closed = True
            self.sim.net.cancel(channel.flow)
            torrent = channel.src
            if torrent.conns.get(channel.dst.proc.peer_id) is self:
                del torrent.conns[channel.dst.proc.peer_id]
            torrent.core.remove_session(channel.session)
            torrent.proc.slots.release()
        self.dialer.attempt_ended(self.address, connected=True)


class Channel:
    """One direction of a connection: the sender's writer and the receiver's reader."""

    __slots__ = (
        "closed",
        "conn",
        "dst",
        "due",
        "flow",
        "peer",
        "pending",
        "session",
        "sim",
        "src",
        "upload",
    )

    def __init__(
        self,
        conn: Connection,
        src: SimTorrent,
        dst: SimTorrent,
        session: PeerSession,
        peer: PeerSession,
    ) -> None:
        self.conn = conn
        self.sim = conn.sim
        self.src = src
        self.dst = dst
        self.session = session
        """The sender's session (what it queues goes this way)."""
        self.peer = peer
        """The receiver's session (what arrives is fed to it)."""
        self.flow: Flow = self.sim.net.flow(src.proc.up, dst.proc.down, self._block_done)
        self.upload: Upload | None = None
        self.due = False
        self.pending = False
        self.closed = False
        session.notify = self.wake
        session.notify_later = self._later

    # -- writer ----------------------------------------------------------------------------------

    def wake(self) -> None:
        if not self.pending and not self.closed:
            self.pending = True
            self.sim.loop.soon(self.pump)

    def _later(self) -> None:
        self.src.proc.flush_later(self)

    def flush(self) -> None:
        """The flusher's call: send what is queued, HAVEs included."""
        if self.session.has_output:
            self.due = True
            self.wake()

    def pump(self) -> None:
        """Connection._writer, one turn: control messages now, then the next block."""
        self.pending = False
        if self.closed or self.upload is not None:
            return  # a block is on its way; the writer goes on when it is out
        session = self.session
        if not (session.wants_write or self.due):
            return
        if session.error is not None:
            self.conn.close(session.error)
            return
        self.due = False
        loop = self.sim.loop
        upload = session.next_upload()
        data = session.take_output(loop.now)
        if data:
            self.sim.stats.control_bytes += len(data)
            loop.after(self.sim.latency, self._deliver, data)
        if upload is not None:
            self.upload = upload
            self.sim.net.send(self.flow, upload.length + PIECE_HEADER)

    def _block_done(self, _flow: Flow) -> None:
        upload = self.upload
        self.upload = None
        if self.closed or upload is None:
            return
        loop = self.sim.loop
        self.session.block_sent(upload, loop.now)
        self.src.core.uploaded += upload.length
        request = upload.request
        loop.after(
            self.sim.latency, self._deliver_block, request.index, request.begin, upload.length
        )
        self.pump()

    # -- reader ----------------------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        if self.closed:
            return
        blob = self.dst.blob
        decoder = blob.decoder
        events = []
        try:
            decoder.receive_data(data)
            while (event := decoder.next_event()) is not None:
                events.append(event)
        except RemoteError as exc:
            blob.decoder = blob.new_decoder()
            self.conn.close(f"wire: {exc}")
            return
        now = self.sim.loop.now
        peer = self.peer
        for event in events:
            try:
                ready = peer.receive(event, now)
            except RemoteError as exc:
                self.conn.close(str(exc))
                return
            if ready is not None:
                self.dst.verify(ready)
            if self.conn.closed:
                return

    def _deliver_block(self, index: int, begin: int, length: int) -> None:
        if self.closed:
            return
        whole = begin == 0 and length == self.dst.blob.piece_size(index)
        event = wire.Piece(index, begin, block_data(length, whole))
        try:
            ready = self.peer.receive(event, self.sim.loop.now)
        except RemoteError as exc:
            self.conn.close(str(exc))
            return
        if ready is not None:
            self.dst.verify(ready)
