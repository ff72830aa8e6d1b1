"""One torrent's swarm as a pure state machine: its sessions, picker, choker and offers.

:class:`SwarmCore` is what the engine's ``Torrent`` shell and a swarm simulator both drive.
It never touches a socket, a clock, a disk or a thread: time comes in as ``now``; pieces to
verify go out as :class:`~p2p_common.session.PieceReady` (returned by
:meth:`PeerSession.receive`); outcomes come back in through :meth:`SwarmCore.piece_stored`
and :meth:`SwarmCore.piece_failed`; the choking round is :meth:`SwarmCore.tick`, whose answer
says which connections to close.

Pieces and hashes. Pieces ``[0, picker.known)`` have known hashes and may be downloaded; a
chunked blob learns its hashes a chunk at a time (:meth:`SwarmCore.set_known`). A torrent that
gets its pieces from elsewhere (the proxy's origin fetch) downloads nothing (``known = 0``) and
only offers what it stored and published (:meth:`SwarmCore.set_published`).

Super-seeding (BEP 16, proxies): a seed reveals pieces to each peer a few at a time, each
piece to one peer before any piece goes to a second, so the seed's upload puts every piece
into the swarm once instead of the same pieces into every peer; the peers trade the rest.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterable

from p2p_common.bitfield import Bitfield
from p2p_common.choker import Choker, PeerStats
from p2p_common.picker import Block, PiecePicker
from p2p_common.session import (
    Contribution,
    LocalPeer,
    PeerSession,
    PieceReady,
)

READER_WINDOW = 4
"""Pieces ahead of each streaming reader that the picker fetches first (for pieces of 256 KiB
and more; smaller pieces get :data:`READER_WINDOW_BYTES` of them). Small on purpose: a whole
rollout reads in the same order, and everyone wanting the same pieces first is the opposite
of what a swarm needs (tests/bench/bench_rollout.py)."""
READER_WINDOW_BYTES = 1024 * 1024
MAX_SUSPECT_PIECES = 32
"""Failed pieces of several contributors kept for finding the liar (a piece each)."""
ENDGAME_PIECES = 8
"""With fewer missing pieces than this, a verified piece cancels its duplicate requests."""
OFFER_SCAN = 256
"""Pieces one super-seeding offer looks at past the first pass (bounded work per HAVE)."""


class SwarmCore:
    def __init__(
        self,
        *,
        num_pieces: int,
        piece_length: int,
        length: int,
        local: LocalPeer,
        have: Bitfield | None = None,
        known: int | None = None,
        published: int | None = None,
        super_seed: bool = False,
        now: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.local = local
        self.piece_length = piece_length
        self.length = length
        self.picker = PiecePicker(num_pieces, piece_length, length, have=have, known=known, rng=rng)
        self.choker = Choker(rng=rng)
        self.super_seed = super_seed
        """Seed BEP 16 style whenever we download nothing (complete, or fed from elsewhere)."""
        self.second_copies = True
        """May a super-seed reveal pieces peers already hold? The shell turns this off while
        any torrent of the process is still being fed from elsewhere (an origin fetch)."""
        self.published = num_pieces if published is None else published
        """Pieces ``[0, published)`` may be offered while super-seeding (their hashes are out)."""
        self.sessions: dict[bytes, PeerSession] = {}
        self._buffers: dict[int, bytearray] = {}
        self._contributors: dict[int, list[Contribution]] = {}
        self._suspects: collections.OrderedDict[int, tuple[bytes, list[Contribution]]] = (
            collections.OrderedDict()
        )
        """Failed pieces of several contributors: the bad copy and who sent which part, kept
        until a good copy shows who lied (at most :data:`MAX_SUSPECT_PIECES`)."""
        self._readers: dict[object, int] = {}
        self._first_pass = 0
        self._offer_cursor = 0
        self._spread_turn = 0
        self._offered_now = [0] * num_pieces
        """Per piece: to how many peers it is revealed and not yet delivered."""
        self._in_flight: set[int] = set()
        """Pieces revealed to some peer and not yet delivered (offered_now > 0)."""
        self.downloaded_by_role: collections.Counter[str] = collections.Counter()
        self.uploaded = 0
        self.started_at = now
        self.last_progress = now
        """When the last piece was stored (for no-progress fallbacks)."""

    # -- geometry and state ------------------------------------------------------------------------

    @property
    def num_pieces(self) -> int:
        return self.picker.num_pieces

    @property
    def complete(self) -> bool:
        return self.picker.have.complete

    @property
    def super_seeding(self) -> bool:
        return self.super_seed and (self.picker.complete or self.picker.known == 0)

    @property
    def downloaded(self) -> int:
        return sum(self.downloaded_by_role.values())

    @property
    def left(self) -> int:
        """Bytes we do not have (for announces)."""
        have = self.picker.have
        if have.complete:
            return 0
        missing = self.num_pieces - have.count
        left = missing * self.piece_length
        last = self.num_pieces - 1
        if last not in have:
            left -= self.piece_length - self.picker.piece_size(last)
        return left

    # -- sessions ----------------------------------------------------------------------------------

    def add_session(self, session: PeerSession) -> None:
        """An established connection joins; its opening messages are queued."""
        self.sessions[session.peer_id] = session
        session.start()

    def remove_session(self, session: PeerSession) -> None:
        """A connection ended (for whatever reason): give back what it held."""
        session.closed = True
        if self.sessions.get(session.peer_id) is session:
            del self.sessions[session.peer_id]
        session.release_requests()
        self.picker.release(session.peer_id)
        for index in session.offers:
            self._offered_now[index] -= 1
            if not self._offered_now[index]:
                self._in_flight.discard(index)
        session.offers.clear()
        session.forget_availability()
        self.choker.forget(session.peer_id)

    def interest_changed(self, session: PeerSession) -> None:
        """Cooperative peers are unchoked at once rather than at the next round."""
        if session.cooperative and session.peer_interested and session.am_choking:
            unchoked = sum(1 for s in self.sessions.values() if s.cooperative and not s.am_choking)
            if unchoked < self.choker.max_cooperative:
                session.unchoke()

    # -- pieces ------------------------------------------------------------------------------------

    def on_block(self, session: PeerSession, block: Block, data: memoryview) -> PieceReady | None:
        index = block.index
        picker = self.picker
        if block.begin == 0 and block.length == picker.piece_size(index):
            if not picker.block_received(block):
                return None
            self.downloaded_by_role[session.role] += block.length
            return PieceReady(index, bytes(data), ((0, block.length, session.peer_id),))
        if not picker.wanted(index):
            return None  # a late duplicate (endgame)
        buffer = self._buffers.get(index)
        if buffer is None:
            buffer = self._buffers[index] = bytearray(picker.piece_size(index))
        buffer[block.begin : block.begin + block.length] = data
        self._contributors.setdefault(index, []).append(
            (block.begin, block.length, session.peer_id)
        )
        self.downloaded_by_role[session.role] += block.length
        if not picker.block_received(block):
            return None
        del self._buffers[index]
        contributors = self._contributors.pop(index, [])
        return PieceReady(index, buffer, tuple(contributors))

    def piece_verifying(self, index: int) -> bool:
        """A piece fetched outside the swarm (HTTP fallback) is about to be checked; False if
        we have it already or a peer's copy is being checked."""
        if not self.picker.wanted(index):
            return False
        self.picker.piece_verifying(index)
        return True

    def piece_stored(
        self, index: int, now: float, data: bytes | bytearray | None = None
    ) -> list[bytes]:
        """Piece ``index`` is verified and stored: tell every peer, cancel duplicates, and (when
        super-seeding from a growing store) offer it. Returns the peers to ban: those whose
        blocks of an earlier, failed copy of this piece differ from ``data`` (smart ban)."""
        picker = self.picker
        picker.piece_verified(index)
        self.last_progress = now
        if self._readers:
            self._update_priority()
        endgame = picker.known - picker.have.count < ENDGAME_PIECES
        super_seeding = self.super_seeding
        sessions = list(self.sessions.values())
        if super_seeding and index < self.published:
            self._spread_offers()
        for session in sessions:
            if not (super_seeding and session.full_window):
                session.we_have(index)
            if endgame:
                for key, block in list(session.outstanding.items()):
                    if key[0] == index:
                        session.cancel(block)
                        picker.block_failed(block)
        suspect = self._suspects.pop(index, None)
        if suspect is None or data is None:
            return []
        bad, contributions = suspect
        return sorted(
            {
                peer_id
                for begin, length, peer_id in contributions
                if bad[begin : begin + length] != data[begin : begin + length]
            }
        )

    def piece_failed(
        self,
        index: int,
        contributions: Iterable[Contribution],
        data: bytes | bytearray | None = None,
    ) -> list[bytes]:
        """Piece ``index`` did not match its hash: it is wanted again. Returns the peers to ban.

        A piece from one peer convicts that peer. A piece from several is not held against any
        of them yet (one liar must not get an honest seed banned): its copy and who sent which
        block are kept, the next copy is asked of one peer alone, and the good copy, once it
        comes, shows whose blocks were wrong (:meth:`piece_stored`); a bad copy from one peer
        convicts that peer."""
        contributions = list(contributions)
        senders = {peer_id for _, _, peer_id in contributions}
        self.picker.piece_failed(index, single_source=len(senders) > 1)
        guilty: list[bytes] = []
        if len(senders) == 1:
            guilty = list(senders)
        elif senders and data is not None:
            self._suspects[index] = (bytes(data), contributions)
            self._suspects.move_to_end(index)
            while len(self._suspects) > MAX_SUSPECT_PIECES:
                self._suspects.popitem(last=False)
        for session in self.sessions.values():
            session.fill_requests()
        return guilty

    def set_known(self, known: int) -> None:
        """The hashes of pieces ``[0, known)`` are known now (a chunk was published)."""
        picker = self.picker
        old = picker.known
        if known <= old:
            return
        picker.set_known(known)
        for session in list(self.sessions.values()):
            session.known_grew(old, picker.known)

    def set_published(self, published: int) -> None:
        """Pieces ``[0, published)`` may be offered now (super-seeding a growing store)."""
        if published <= self.published:
            return
        self.published = min(published, self.num_pieces)
        if self.super_seeding:
            self._spread_offers()

    # -- readers -----------------------------------------------------------------------------------

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
        window = max(READER_WINDOW, READER_WINDOW_BYTES // self.piece_length)
        for start in sorted(self._readers.values()):
            index = start
            taken = 0
            while index < self.num_pieces and taken < window:
                if index not in have:
                    wanted.append(index)
                    taken += 1
                index += 1
        self.picker.set_priority(dict.fromkeys(wanted))

    # -- super-seeding -----------------------------------------------------------------------------

    def offer(self, session: PeerSession, count: int) -> None:
        """Reveal up to ``count`` more pieces to ``session`` (super-seeding).

        First every piece once, in index order across peers (which spreads first copies and
        keeps streaming readers supplied roughly in reading order). After that, pieces the
        peer lacks that no other peer is known to have and nobody is being sent, then (once
        the seed holds the whole blob) any piece it lacks that nobody is being sent. A piece
        revealed to one peer is not revealed to a second while the first still has it in
        flight, so the seed's upload adds new pieces to the swarm instead of copies; the
        peers trade the rest.
        """
        if not session.full_window:
            return
        have = self.picker.have
        limit = self.published
        while count > 0 and self._first_pass < limit and self._first_pass in have:
            index = self._first_pass
            self._first_pass += 1
            if index not in session.peer_bits:
                self._reveal(session, index)
                count -= 1
        passed = self._first_pass
        if count <= 0 or not passed:
            return
        fallback: list[int] = []
        cursor = self._offer_cursor % passed
        for step in range(min(passed, OFFER_SCAN)):
            index = (cursor + step) % passed
            if index in session.peer_bits or index in session.offers or self._offered_now[index]:
                continue
            if self.picker.holders(index):
                if len(fallback) < count:
                    fallback.append(index)
                continue
            self._reveal(session, index)
            count -= 1
            if count <= 0:
                self._offer_cursor = index + 1
                return
        self._offer_cursor = cursor + min(passed, OFFER_SCAN)
        if not self.picker.complete or not self.second_copies or self._first_copies_pending():
            # Still fed from elsewhere (the origin), another torrent of this seed is, or first
            # copies are still on their way: the uplink is for pieces nobody has yet. A second
            # copy now would queue in front of them, and the peers that hold the first copy
            # trade it anyway.
            return
        for index in fallback[:count]:
            self._reveal(session, index)

    def _spread_offers(self) -> None:
        """Reveal what may be revealed now (pieces just stored or published), one piece per
        peer in turn: the peers with the fewest pieces revealed and not yet delivered first,
        ties in an order that rotates from call to call.

        Handing a peer all the free offers it has room for, in connection order, gave the
        first copies of an origin fetch to the first few peers connected: new pieces arrive a
        few at a time, and those peers always had room (docs/scale.md, finding 4). Spread
        over every peer, each first copy leaves through a different uplink.
        """
        sessions = [
            session
            for session in self.sessions.values()
            if session.full_window and len(session.offers) < session.offer_target
        ]
        if len(sessions) > 1:
            start = self._spread_turn % len(sessions)
            self._spread_turn += 1
            sessions = sessions[start:] + sessions[:start]
            sessions.sort(key=lambda session: len(session.offers))
        while sessions:
            still = []
            for session in sessions:
                before = len(session.offers)
                self.offer(session, 1)
                if before < len(session.offers) < session.offer_target:
                    still.append(session)
            sessions = still

    def _reveal(self, session: PeerSession, index: int) -> None:
        self._offered_now[index] += 1
        self._in_flight.add(index)
        session.reveal(index)

    def _first_copies_pending(self) -> bool:
        """Is a revealed piece that no peer holds yet still on its way?"""
        holders = self.picker.holders
        return any(not holders(index) for index in self._in_flight)

    def offer_done(self, session: PeerSession, index: int) -> None:
        """A revealed piece reached ``session``: reveal another one."""
        if index in session.offers:
            session.offers.discard(index)
            self._offered_now[index] -= 1
            if not self._offered_now[index]:
                self._in_flight.discard(index)
        if not session.closed:
            self.offer(session, session.offer_target - len(session.offers))

    # -- time --------------------------------------------------------------------------------------

    def tick(self, now: float, interval: float) -> list[tuple[PeerSession, str]]:
        """The choking round (about once a second): every session's rates and timers, then who
        is unchoked, then fresh requests. Returns the sessions to close, with the reason."""
        closing: list[tuple[PeerSession, str]] = []
        stats = []
        super_seeding = self.super_seeding
        complete = self.picker.have.complete
        for session in list(self.sessions.values()):
            reason = session.tick(now, interval)
            if reason is None and complete and session.peer_bits.complete:
                # Two seeds have nothing to trade, ever: the connection would only hold a
                # slot of each (of the process's maxConnections) that a swarm still
                # downloading needs (docs/scale.md, finding 1). Neither side redials: a
                # complete torrent dials nobody.
                reason = "both seeds"
            if super_seeding and not session.peer_bits.complete:
                # Fewer revealed than the peer's target (nothing was free to reveal then, or
                # the target grew with its rate): reveal more. Interest is no condition: a
                # peer shown nothing it lacks has no reason to be interested.
                room = session.offer_target - len(session.offers)
                if room > 0:
                    self.offer(session, room)
            if reason is not None:
                closing.append((session, reason))
                continue
            stats.append(
                PeerStats(
                    key=session.peer_id,
                    interested=session.peer_interested,
                    cooperative=session.cooperative,
                    download_rate=session.download_rate,
                    snubbed=session.snubbed,
                )
            )
        unchoke = self.choker.decide(stats, seeding=self.picker.complete, now=now)
        dropped = {session.peer_id for session, _ in closing}
        for session in list(self.sessions.values()):
            if session.peer_id in dropped:
                continue
            if session.peer_id in unchoke:
                session.unchoke()
            else:
                session.choke()
            session.fill_requests()
        return closing
