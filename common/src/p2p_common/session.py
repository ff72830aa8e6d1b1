"""One peer connection's rules as a pure state machine: wire events and ``now`` in, messages out.

A :class:`PeerSession` holds everything one connection knows: who chokes whom, who is
interested, what the peer has, the requests we sent and the ones we were sent, rates,
snubbing, the super-seeding offers and the negotiated extensions. It never touches a socket,
a clock or a thread: the shell (``engine/connection.py``) feeds it the events that
:class:`~p2p_common.wire.PeerProtocol` decodes, sends what :meth:`PeerSession.take_output`
returns, uploads the blocks :meth:`PeerSession.next_upload` names, and passes every complete
piece that :meth:`PeerSession.receive` returns to its verifier. A swarm simulator drives the
same class without any bytes at all.

The swarm it belongs to (:class:`SwarmView`, implemented by :class:`~p2p_common.swarm.
SwarmCore`) owns the picker, the choker and the pieces being assembled; the session calls
into it and never the other way round for anything but the decisions the swarm makes for all
its sessions (choking rounds, HAVE broadcasts, offers).

**Windows.** A session sees the torrent through a window of pieces: a p2p peer of a chunked
blob sees the whole blob (window ``[0, N)``), a standard client that joined one chunk's
torrent sees that chunk's pieces only, numbered from 0 on the wire. Inside the session and the
swarm every index is global; translation happens only where messages are encoded and decoded.

Every per-connection queue is bounded: messages waiting to be sent (:data:`MAX_OUTBOX_BYTES`),
requests to serve (:data:`MAX_UPLOAD_QUEUE`), requests refused while the peer is choked
(:data:`MAX_REFUSED`), unrequested block data (:data:`MAX_UNREQUESTED_BYTES`); so is the work a
peer can make us do: bitfields without news (:data:`MAX_AVAILABILITY_MESSAGES`) and HAVEs
(:data:`HAVE_ALLOWANCE` beyond two per piece). A peer that exceeds one is dropped
(:class:`~p2p_common.errors.RemoteError`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from p2p_common import wire
from p2p_common.bitfield import Bitfield
from p2p_common.errors import RemoteError
from p2p_common.picker import Block, PiecePicker

MAX_UPLOAD_QUEUE = 1024
"""Most requests we hold for one peer; more are refused."""
MAX_REFUSED = 4 * MAX_UPLOAD_QUEUE
"""Requests refused since the last unchoke before the peer counts as flooding us."""
MAX_OUTBOX_BYTES = 1024 * 1024
"""Control messages waiting for a peer that does not read them."""
MAX_UNREQUESTED_BYTES = 16 * 1024 * 1024
"""Unrequested block data we tolerate from one peer before dropping it (requests cancelled in
the endgame may still arrive: at most one queue of :data:`IN_FLIGHT_BYTES`)."""
MAX_AVAILABILITY_MESSAGES = 3
"""BITFIELD / HAVE ALL / HAVE NONE messages per connection that reveal no new piece (the first
one, aria2's have-none then bitfield). Each costs work in proportion to the torrent, so a peer
that keeps sending them without news is dropped. A later bitfield that does reveal pieces is
a batch of HAVEs (aria2 sends one instead of 20 or more HAVEs) and is charged to
:data:`HAVE_ALLOWANCE` by the pieces it adds, at least an eighth of the window."""
HAVE_ALLOWANCE = 1024
"""HAVEs a peer may send beyond two per piece of its window (redundant HAVEs included)."""
IN_FLIGHT_BYTES = 8 * 1024 * 1024
"""Bounds the requests outstanding at one p2p peer to this over the negotiated block size: 8
with the 1 MiB block, so 8 whole pieces (2 MiB of 256 KiB pieces) at most, enough for the
bandwidth-delay product of a cluster network."""
FOREIGN_IN_FLIGHT_BYTES = 2 * 1024 * 1024
QUEUE_SECONDS = 0.5
"""Seconds of a p2p peer's measured rate we keep requested from it (in requests of the
size we ask for: a whole piece, 256 KiB for blobs up to 2 GiB), plus one request."""
FOREIGN_QUEUE_SECONDS = 2.0
"""The same for a standard BitTorrent peer (16 KiB blocks)."""
MIN_QUEUE = 1
"""Requests kept outstanding at a peer that has not shown a request's worth of rate per
queue time: one at a time (docs/scale.md, finding 6)."""
SUPER_SEED_OFFERS = 8
"""The most pieces a super-seed keeps revealed to one peer (:attr:`PeerSession.offer_target`),
for pieces of 256 KiB and more; smaller pieces get as many as fill
:data:`SUPER_SEED_OFFER_BYTES`."""
SUPER_SEED_OFFER_BYTES = 2 * 1024 * 1024
FIRST_OFFERS = 2
"""Pieces revealed to a peer before its rate is measured: one to send, one requested behind it;
smaller pieces than 256 KiB get as many as fill :data:`FIRST_OFFER_BYTES`, so that the round
trip between one piece's last block and the next reveal does not idle a fast link."""
FIRST_OFFER_BYTES = 512 * 1024


def most_offers(piece_length: int) -> int:
    """:data:`SUPER_SEED_OFFERS`, or more for pieces under 256 KiB (2 MiB of them)."""
    return max(SUPER_SEED_OFFERS, SUPER_SEED_OFFER_BYTES // piece_length)


def first_offers(piece_length: int) -> int:
    """:data:`FIRST_OFFERS`, or more for pieces under 256 KiB (512 KiB of them)."""
    return max(FIRST_OFFERS, FIRST_OFFER_BYTES // piece_length)


SNUB_AFTER = 20.0
"""Seconds without a block while requests are outstanding before a peer counts as snubbing."""
IDLE_TIMEOUT = 180.0
"""Seconds without any message before a connection is closed."""
KEEPALIVE_INTERVAL = 60.0
"""Seconds without sending anything before we send a keep-alive."""


def _queue_depth(rate: float, seconds: float, unit: int, *, least: int, most: int) -> int:
    """About ``seconds`` of ``rate`` (bytes per second) in units of ``unit`` bytes, plus one
    so the rate can grow, within ``least`` .. ``most``."""
    return max(least, min(most, int(rate * seconds / unit) + 1))


def _noop() -> None:
    pass


@dataclass(frozen=True, slots=True)
class LocalPeer:
    """What we say about ourselves in every extension handshake."""

    client: str
    listen_port: int
    max_block: int
    role: str
    """``agent`` or ``proxy``."""


@dataclass(frozen=True, slots=True)
class Window:
    """The pieces ``[first, first + count)`` of a torrent, numbered from 0 on the wire."""

    first: int
    count: int


Contribution = tuple[int, int, bytes]
"""(begin, length, peer id): who sent which block of a piece."""


@dataclass(frozen=True, slots=True, eq=False)
class PieceReady:
    """Every block of a piece arrived: check it against its hash and store it."""

    index: int
    data: bytes | bytearray
    contributors: tuple[Contribution, ...]
    """Who sent which block (to find the liar if it fails the check)."""


@dataclass(frozen=True, slots=True)
class Upload:
    """A block to send: the wire header, then ``length`` bytes of the store at ``offset``."""

    request: wire.Request
    """As the peer asked (window-relative index)."""
    header: bytes
    offset: int
    length: int


class SwarmView(Protocol):
    """What a session needs from the torrent it belongs to (see :class:`SwarmCore`)."""

    picker: PiecePicker
    local: LocalPeer
    piece_length: int

    @property
    def super_seeding(self) -> bool: ...

    def on_block(self, session: PeerSession, block: Block, data: memoryview) -> PieceReady | None:
        """A requested block arrived (``data`` is only valid during the call)."""

    def offer(self, session: PeerSession, count: int) -> None:
        """Reveal up to ``count`` more pieces to a session (super-seeding)."""

    def offer_done(self, session: PeerSession, index: int) -> None:
        """A revealed piece reached the session (or it reported having it)."""

    def interest_changed(self, session: PeerSession) -> None:
        """The peer became interested or not, or told what it is (extension handshake)."""


class PeerSession:
    """The state of one established connection (both handshakes exchanged)."""

    def __init__(
        self,
        swarm: SwarmView,
        *,
        peer_id: bytes,
        address: tuple[str, int],
        outgoing: bool,
        window: Window,
        fast: bool,
        extensions: bool,
        now: float,
        notify: Callable[[], None] = _noop,
        notify_later: Callable[[], None] = _noop,
    ) -> None:
        self.swarm = swarm
        self.peer_id = peer_id
        self.address = address
        self.outgoing = outgoing
        self.window = window
        self.full_window = window.first == 0 and window.count == swarm.picker.num_pieces
        self.fast = fast
        self.extensions = extensions
        self.notify = notify
        """Called when something must be sent now (the shell wakes its writer)."""
        self.notify_later = notify_later
        """Called when messages that may wait were queued (the shell wakes its writer soon)."""
        # choking and interest, both directions
        self.am_choking = True
        self.am_interested = False
        self.peer_choking = True
        self.peer_interested = False
        # what the peer has (global indices), or everything after have-all
        self.peer_bits = Bitfield(swarm.picker.num_pieces)
        self.peer_seed = False
        self.wanted: set[int] = set()
        """Pieces the peer has, whose hash we know, and that we do not have (kept for every
        peer but a seed: the picker looks among them first)."""
        self.extension: wire.ExtensionHandshake | None = None
        self.block_size = wire.BLOCK_SIZE
        self.max_queue = FOREIGN_IN_FLIGHT_BYTES // wire.BLOCK_SIZE
        self.queue_target = self.max_queue
        self.outstanding: dict[tuple[int, int], Block] = {}
        """Requests we sent and that are not answered yet, by (global index, begin)."""
        self.offers: set[int] = set()
        """Pieces revealed to this peer while super-seeding and not yet delivered."""
        self.offer_target = first_offers(swarm.piece_length)
        """How many pieces a super-seed keeps revealed to this peer: about a queue time of
        what we upload to it, in pieces, plus one (:meth:`tick`)."""
        self.uploads: collections.deque[wire.Request] = collections.deque()
        """Requests the peer sent that we will serve (window-relative)."""
        self.refused = 0
        self._availability_messages = 0
        self._haves = 0
        # accounting
        self.downloaded = 0
        self.uploaded = 0
        self.unrequested = 0
        self.download_rate = 0.0
        self.upload_rate = 0.0
        self._rate_marks = (0, 0)
        self.connected_at = now
        self.last_received = now
        self.last_sent = now
        self.last_piece = now
        self.snubbed = False
        self.closed = False
        self.error: str | None = None
        """Why the connection must end, when the session found out outside :meth:`receive`."""
        self.urgent = False
        """Something queued should leave at once (anything but HAVE and keep-alive)."""
        self._out: list[bytes] = []
        self._out_bytes = 0

    # -- identity ------------------------------------------------------------------------------

    @property
    def cooperative(self) -> bool:
        """A p2p agent or proxy (negotiated in the extension handshake)."""
        return self.extension is not None and self.extension.p2p_block is not None

    @property
    def block_limit(self) -> int:
        """The largest block the peer may send us or ask of us: what we negotiated with a p2p
        peer, :data:`~p2p_common.wire.MAX_FOREIGN_REQUEST` for anyone else."""
        return self.block_size if self.cooperative else wire.MAX_FOREIGN_REQUEST

    @property
    def role(self) -> str:
        if self.extension is not None and self.extension.p2p_role:
            return self.extension.p2p_role
        return "foreign"

    def __repr__(self) -> str:
        return f"<peer {self.address[0]}:{self.address[1]} {self.role}>"

    # -- output --------------------------------------------------------------------------------

    def send(self, message: bytes, *, urgent: bool = True) -> None:
        """Queue a control message. Bounded: past :data:`MAX_OUTBOX_BYTES` the session is
        marked broken (:attr:`error`) and the shell ends the connection; this never raises,
        so a broadcast to every session cannot be cut short by one of them.

        An ``urgent`` message (anything but HAVE and keep-alive) calls :attr:`notify`; the first
        message that is not urgent calls :attr:`notify_later` instead: the shell lets HAVEs
        wait a moment for company, or for the next urgent message or block."""
        if self.error is not None:
            return
        if urgent:
            if not self.urgent:
                self.notify()
            self.urgent = True
        elif not self._out:
            self.notify_later()
        self._out.append(message)
        self._out_bytes += len(message)
        if self._out_bytes > MAX_OUTBOX_BYTES:
            self._out.clear()
            self._out_bytes = 0
            self.error = "the peer does not read what we send"
            self.notify()

    @property
    def wants_write(self) -> bool:
        """Is there something to send now (not counting messages that may wait)?"""
        return self.urgent or (bool(self.uploads) and not self.am_choking) or self.error is not None

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def take_output(self, now: float) -> bytes:
        """Every queued control message, joined into one write (b"" if none)."""
        if not self._out:
            return b""
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        self._out_bytes = 0
        self.urgent = False
        self.last_sent = now
        return data

    def next_upload(self) -> Upload | None:
        """The next block to send, if we are not choking the peer."""
        if self.am_choking or not self.uploads:
            return None
        request = self.uploads.popleft()
        index = self.window.first + request.index
        return Upload(
            request,
            wire.encode_piece_header(request.index, request.begin, request.length),
            index * self.swarm.piece_length + request.begin,
            request.length,
        )

    def block_sent(self, upload: Upload, now: float) -> None:
        """A block went out: account for it, and reveal the next piece to a super-seed's peer."""
        self.uploaded += upload.length
        self.last_sent = now
        request = upload.request
        index = self.window.first + request.index
        if index in self.offers and request.begin + request.length == self.swarm.picker.piece_size(
            index
        ):
            # The last block of a revealed piece is out (peers do not tell a seed they have a
            # piece it has): count it as theirs and reveal the next one.
            self._peer_has(index)
            self.swarm.offer_done(self, index)

    # -- opening -------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue the opening messages: what we have, then our extension handshake."""
        swarm = self.swarm
        have = swarm.picker.have
        if swarm.super_seeding and self.full_window:
            # BEP 16: reveal a few pieces at a time instead of everything (SwarmCore.offer).
            if self.fast:
                self.send(wire.ENCODED_HAVE_NONE)
            swarm.offer(self, self.offer_target)
        else:
            bits = have if self.full_window else self._window_bits(have)
            if self.fast and bits.complete:
                self.send(wire.ENCODED_HAVE_ALL)
            elif self.fast and not bits.count:
                self.send(wire.ENCODED_HAVE_NONE)
            elif bits.count:
                self.send(wire.encode_bitfield(bits))
        if self.extensions:
            local = swarm.local
            self.send(
                wire.encode_extension_handshake(
                    client=local.client,
                    listen_port=local.listen_port or None,
                    request_queue=MAX_UPLOAD_QUEUE,
                    p2p_block=local.max_block,
                    p2p_role=local.role,
                )
            )

    def _window_bits(self, have: Bitfield) -> Bitfield:
        first, count = self.window.first, self.window.count
        bits = Bitfield(count)
        for local in range(count):
            if first + local in have:
                bits.set(local)
        return bits

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, event: wire.Event, now: float) -> PieceReady | None:
        """Apply one event from the peer. Returns a piece to verify when one is complete.

        Raises :class:`~p2p_common.errors.RemoteError` when the peer misbehaves."""
        self.last_received = now
        kind = type(event)
        if kind is wire.Piece:
            return self._on_piece(event, now)  # type: ignore[arg-type]
        if kind is wire.Request:
            self._on_request(event)  # type: ignore[arg-type]
        elif kind is wire.Have:
            self._on_have(self.window.first + event.index)  # type: ignore[union-attr]
        elif kind is wire.Cancel:
            self._on_cancel(event)  # type: ignore[arg-type]
        elif kind is wire.Unchoke:
            self.peer_choking = False
            self.fill_requests()
        elif kind is wire.Choke:
            self.peer_choking = True
            if not self.fast:  # without the fast extension a choke drops our requests
                self.release_requests()
        elif kind is wire.Interested:
            self.peer_interested = True
            self.swarm.interest_changed(self)
        elif kind is wire.NotInterested:
            self.peer_interested = False
            self.swarm.interest_changed(self)
        elif kind is wire.RejectRequest:
            key = (self.window.first + event.index, event.begin)  # type: ignore[union-attr]
            block = self.outstanding.pop(key, None)
            if block is not None:
                self.swarm.picker.block_failed(block)
                self.fill_requests()
        elif kind in (wire.BitfieldMessage, wire.HaveAll, wire.HaveNone):
            self._on_availability(event)
        elif kind is wire.ExtensionHandshake:
            self._on_extension(event)  # type: ignore[arg-type]
        # keep-alive, port, suggest, allowed-fast, other extensions: nothing to do
        return None

    def _on_piece(self, event: wire.Piece, now: float) -> PieceReady | None:
        index = self.window.first + event.index
        block = self.outstanding.pop((index, event.begin), None)
        size = len(event.data)
        if block is None or block.length != size:
            self.unrequested += size
            if self.unrequested > MAX_UNREQUESTED_BYTES:
                raise RemoteError("too much unrequested data")
            return None
        self.downloaded += size
        self.last_piece = now
        self.snubbed = False
        ready = self.swarm.on_block(self, block, event.data)
        self.fill_requests()
        return ready

    def _on_request(self, request: wire.Request) -> None:
        limit = self.swarm.local.max_block if self.cooperative else wire.MAX_FOREIGN_REQUEST
        if request.length > limit:
            raise RemoteError(f"request of {request.length} bytes exceeds {limit}")
        index = self.window.first + request.index
        if (
            self.am_choking
            or index not in self.swarm.picker.have
            or len(self.uploads) >= MAX_UPLOAD_QUEUE
        ):
            self.refused += 1
            if self.refused > MAX_REFUSED:
                raise RemoteError("keeps requesting what we refuse")
            if self.fast:
                self.send(wire.encode_reject(request.index, request.begin, request.length))
            return
        if not self.uploads:
            self.notify()
        self.uploads.append(request)

    def _on_cancel(self, cancel: wire.Cancel) -> None:
        for request in self.uploads:
            if (request.index, request.begin, request.length) == (
                cancel.index,
                cancel.begin,
                cancel.length,
            ):
                self.uploads.remove(request)
                return

    def _on_have(self, index: int) -> None:
        self._haves += 1
        if self._haves > 2 * self.window.count + HAVE_ALLOWANCE:
            raise RemoteError("floods us with HAVE messages")
        news = self._peer_has(index)  # first: what it has is never revealed to it again
        if index in self.offers:
            self.swarm.offer_done(self, index)  # it has what we revealed: reveal more
        if news and not self.am_interested and self.wanted:
            self._set_interest(True)
            self.fill_requests()

    def _peer_has(self, index: int) -> bool:
        """Record that the peer has ``index``; True if that is news."""
        if self.peer_seed or not self.peer_bits.set(index):
            return False
        picker = self.swarm.picker
        picker.peer_have(index)
        if index < picker.known and index not in picker.have:
            self.wanted.add(index)
        return True

    def _on_availability(self, event: wire.Event) -> None:
        # Normally the first message; a late one replaces what we knew (aria2 does this).
        before = self.peer_bits.count
        picker = self.swarm.picker
        self.forget_availability()
        self.peer_seed = False
        self.peer_bits = Bitfield(picker.num_pieces)
        self.wanted = set()
        if isinstance(event, wire.HaveNone):
            pass
        elif self.full_window and (
            isinstance(event, wire.HaveAll)
            or (isinstance(event, wire.BitfieldMessage) and event.bits.complete)
        ):
            self.peer_seed = True
            self.peer_bits = Bitfield(picker.num_pieces, full=True)
            picker.peer_seed()
        elif self.full_window and isinstance(event, wire.BitfieldMessage):
            self.peer_bits = event.bits
            picker.peer_bitfield(event.bits)
            known, have = picker.known, picker.have
            self.wanted = {i for i in event.bits if i < known and i not in have}
        else:  # a window of the torrent (one chunk): translate to global indices
            first, count = self.window.first, self.window.count
            local = range(count) if isinstance(event, wire.HaveAll) else event.bits  # type: ignore[union-attr]
            for index in local:
                self._peer_has(first + index)
        news = self.peer_bits.count - before
        if news > 0:
            # A batch of HAVEs, but each costs work in proportion to the window: charged as
            # at least an eighth of it, so a peer revealing one piece per bitfield runs out
            # after a few dozen bitfields, not thousands.
            if self._availability_messages or before:
                self._haves += max(news, self.window.count // 8)
            else:
                self._haves += news  # the opening bitfield
        else:
            self._availability_messages += 1
        if (
            self._availability_messages > MAX_AVAILABILITY_MESSAGES
            or self._haves > 2 * self.window.count + HAVE_ALLOWANCE
        ):
            raise RemoteError("keeps sending its bitfield")
        self.update_interest()
        self.fill_requests()

    def _on_extension(self, event: wire.ExtensionHandshake) -> None:
        self.extension = event
        if event.p2p_block is not None:
            self.block_size = min(event.p2p_block, self.swarm.local.max_block)
            self.max_queue = max(2, IN_FLIGHT_BYTES // self.block_size)
        elif event.request_queue is not None:
            self.max_queue = max(1, min(self.max_queue, event.request_queue))
        self.queue_target = self.max_queue
        self.swarm.interest_changed(self)

    # -- what we want from the peer --------------------------------------------------------------

    @property
    def has_wanted(self) -> bool:
        """Does the peer have a piece whose hash we know and that we do not have?"""
        if self.peer_seed:
            picker = self.swarm.picker
            return picker.have.count < picker.known
        return bool(self.wanted)

    def _set_interest(self, interested: bool) -> None:
        if interested != self.am_interested:
            self.am_interested = interested
            self.send(wire.ENCODED_INTERESTED if interested else wire.ENCODED_NOT_INTERESTED)

    def update_interest(self) -> None:
        """Send interested / not interested as the peer's pieces and ours change."""
        self._set_interest(self.has_wanted)

    def we_have(self, index: int) -> None:
        """We completed ``index``: tell the peer unless it has it, and update our interest.

        A proxy hears it even when it has the piece: a super-seed reveals its next piece
        when the last one reached us, and this is how it learns that one did by way of
        another peer (libtorrent's ``send_redundant_have`` does the same for everyone)."""
        first = self.window.first
        if index in self.peer_bits:
            self.wanted.discard(index)
            if self.am_interested and not self.outstanding and not self.has_wanted:
                self._set_interest(False)
            if self.role != "proxy":
                return
        if first <= index < first + self.window.count:
            self.send(wire.encode_have(index - first), urgent=False)

    def known_grew(self, old: int, new: int) -> None:
        """The hashes of pieces ``[old, new)`` became known."""
        if not self.peer_seed:
            have = self.swarm.picker.have
            for index in range(old, new):
                if index in self.peer_bits and index not in have:
                    self.wanted.add(index)
        self.update_interest()
        self.fill_requests()

    def fill_requests(self) -> None:
        if self.peer_choking or not self.am_interested or self.closed:
            return
        target = 1 if self.snubbed else self.queue_target
        in_flight = len(self.outstanding)
        # Refill in batches (one write for several requests) once a quarter has drained.
        if in_flight and in_flight > target - max(1, target // 4):
            return
        picker = self.swarm.picker
        bits = None if self.peer_seed else self.peer_bits
        blocks = picker.pick(
            bits,
            self.block_size,
            target - in_flight,
            self.outstanding,
            None if self.peer_seed else self.wanted,
            who=self.peer_id,
        )
        if blocks:
            first = self.window.first
            for block in blocks:
                self.outstanding[(block.index, block.begin)] = block
                self.send(wire.encode_request(block.index - first, block.begin, block.length))
        elif not self.outstanding and not self.has_wanted:
            self._set_interest(False)

    def cancel(self, block: Block) -> None:
        """Withdraw one request (another peer delivered the piece first)."""
        if self.outstanding.pop((block.index, block.begin), None) is not None:
            self.send(
                wire.encode_cancel(block.index - self.window.first, block.begin, block.length)
            )

    def release_requests(self) -> list[Block]:
        """Give every outstanding request back to the picker (timeout, choke, close)."""
        blocks = list(self.outstanding.values())
        self.outstanding.clear()
        for block in blocks:
            self.swarm.picker.block_failed(block)
        return blocks

    # -- what the peer gets from us --------------------------------------------------------------

    def choke(self) -> None:
        if self.am_choking:
            return
        self.am_choking = True
        self.send(wire.ENCODED_CHOKE)
        if self.fast:
            for request in self.uploads:
                self.send(wire.encode_reject(request.index, request.begin, request.length))
        self.uploads.clear()

    def unchoke(self) -> None:
        if self.am_choking:
            self.am_choking = False
            self.refused = 0
            self.send(wire.ENCODED_UNCHOKE)

    def reveal(self, index: int) -> None:
        """Super-seeding: tell the peer we have ``index`` (a full-window session only)."""
        self.offers.add(index)
        self.send(wire.encode_have(index))

    # -- time ----------------------------------------------------------------------------------

    def tick(self, now: float, interval: float) -> str | None:
        """Once per choking round: rates, request queue depth, snubbing, idleness,
        keep-alives. Returns why the connection should be closed, or None."""
        if now - self.last_received > IDLE_TIMEOUT:
            return "idle"
        down, up = self._rate_marks
        self.download_rate = 0.7 * self.download_rate + 0.3 * (self.downloaded - down) / interval
        self.upload_rate = 0.7 * self.upload_rate + 0.3 * (self.uploaded - up) / interval
        self._rate_marks = (self.downloaded, self.uploaded)
        if self.swarm.super_seeding:
            # As deep as the request queue a peer keeps at us, and for the same reason: a
            # piece revealed to a peer whose share of our uplink is slow waits behind the
            # others revealed to it, while nobody else may fetch it from us (it is revealed
            # once); at the end of a rollout that queue is what everyone waits for. A fast
            # peer gets more, so the round trip between one piece and the next reveal does
            # not idle it (docs/rollout.md, "One offer at a time").
            self.offer_target = _queue_depth(
                self.upload_rate,
                QUEUE_SECONDS,
                self.swarm.piece_length,
                least=1,
                most=most_offers(self.swarm.piece_length),
            )
        if self.outstanding:
            # Keep about a queue time of this peer's measured rate requested (plus one request
            # so the rate can grow): a deep queue on a slow or shared link means requests
            # chosen on stale information and pieces stuck behind others at busy peers. A
            # peer slower than that gets one request at a time: a second one would wait
            # behind the first at its busy uplink while another peer that has the piece
            # idles (docs/scale.md, finding 6).
            request = min(self.block_size, self.swarm.piece_length)
            seconds = QUEUE_SECONDS if self.cooperative else FOREIGN_QUEUE_SECONDS
            self.queue_target = _queue_depth(
                self.download_rate, seconds, request, least=MIN_QUEUE, most=self.max_queue
            )
            if now - self.last_piece > SNUB_AFTER:
                # Asked and not answered for long: its requests go to other peers; it keeps
                # one at a time, so it can prove itself again.
                self.snubbed = True
                for block in self.release_requests():
                    self.send(
                        wire.encode_cancel(
                            block.index - self.window.first, block.begin, block.length
                        )
                    )
                self.last_piece = now
        if now - self.last_sent > KEEPALIVE_INTERVAL and not self._out:
            self.send(wire.ENCODED_KEEP_ALIVE, urgent=False)
        return self.error

    def forget_availability(self) -> None:
        """Remove this peer's pieces from the swarm's availability counts."""
        picker = self.swarm.picker
        if self.peer_seed:
            picker.peer_gone(None)
        elif self.peer_bits.count:
            picker.peer_gone(self.peer_bits)
