"""Which blocks to request from which peer: a pure policy (no I/O, no clock).

Order of preference for a peer:

1. pieces a reader is waiting on (:meth:`PiecePicker.set_priority`), in reading order
   (from a seed only those no other peer has);
2. pieces already started, so partial pieces complete and can be shared;
3. new pieces: random while we hold fewer than ``random_first`` pieces (something
   to trade quickly), then rarest first (ties broken randomly); from a seed, pieces no
   other peer has come first, so the seed's upload brings new pieces into the swarm;
4. endgame: when every missing block is already requested and this peer has nothing
   else in flight, blocks requested from one other peer (never more), so one slow peer
   cannot hold the last piece hostage. The caller cancels the duplicates when a block
   arrives.

Accounting is in 16 KiB units; a block is a run of consecutive units up to the
peer's block size, so standard peers (16 KiB requests) and p2p peers (whole
pieces) share the same pieces. Availability counts every peer's pieces; seeds are
counted once for all pieces, not piece by piece.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from p2p_common.bitfield import Bitfield

UNIT = 16 * 1024
SEED_LOOKAHEAD = 64
"""How far past the rarest-first cursor a pick from a seed looks for a piece nobody has."""
SCAN_LIMIT = 256
"""How far past the cursor a pick looks for a piece the peer has before it looks at the peer's
pieces instead (bounded work per pick whatever the peer has)."""
SMALL_WANTED = 64
"""A peer with at most this many pieces we want: pick among those directly."""
REBUILD_PICKS = 64
"""Picks between rebuilds of the rarest-first order while availability keeps changing."""
ENDGAME_REQUESTS = 2
"""In endgame a unit is asked from at most this many peers at once (one duplicate)."""


@dataclass(frozen=True, slots=True)
class Block:
    index: int
    begin: int
    length: int


class _Partial:
    """A piece with some units requested or received."""

    __slots__ = ("free", "received", "received_count", "requests", "size", "units")

    def __init__(self, size: int) -> None:
        self.size = size
        self.units = (size + UNIT - 1) // UNIT
        self.requests = bytearray(self.units)
        self.received = bytearray(self.units)
        self.received_count = 0
        self.free = self.units

    def unit_length(self, unit: int) -> int:
        return min(UNIT, self.size - unit * UNIT)


class PiecePicker:
    def __init__(
        self,
        num_pieces: int,
        piece_length: int,
        total_length: int,
        *,
        have: Bitfield | None = None,
        known: int | None = None,
        rng: random.Random | None = None,
        random_first: int = 4,
    ) -> None:
        if piece_length % UNIT:
            raise ValueError("piece length must be a multiple of 16 KiB")
        self.num_pieces = num_pieces
        self.piece_length = piece_length
        self.total_length = total_length
        self.have = have.copy() if have is not None else Bitfield(num_pieces)
        self.known = num_pieces if known is None else max(0, min(known, num_pieces))
        """Pieces ``[0, known)`` have known hashes (a blob whose chunks are still being
        published knows a prefix); only those are ever wanted."""
        self._rng = rng or random.Random()
        self._random_first = random_first
        self._avail = [0] * num_pieces
        self._seeds = 0
        self._partials: dict[int, _Partial] = {}
        self._verifying: set[int] = set()
        self._single_source: dict[int, Hashable] = {}
        """Pieces to be sent whole by one peer, and by whom once taken (None: not yet)."""
        self._free: set[int] = {i for i in range(self.known) if i not in self.have}
        """Pieces to start: known, not had, not being received or checked."""
        self._priority: list[int] = []
        self._order: list[int] = []
        self._cursor = 0
        self._dirty = True
        self._picks_since_rebuild = 0

    # -- geometry ------------------------------------------------------------------------------

    def piece_size(self, index: int) -> int:
        if index == self.num_pieces - 1:
            return self.total_length - index * self.piece_length
        return self.piece_length

    @property
    def complete(self) -> bool:
        return self.have.complete

    def wanted(self, index: int) -> bool:
        """True while piece ``index`` is known, neither verified nor fully received."""
        return index < self.known and index not in self.have and index not in self._verifying

    def set_known(self, known: int) -> None:
        """More piece hashes became known (pieces ``[0, known)``)."""
        known = min(known, self.num_pieces)
        if known > self.known:
            have = self.have
            self._free.update(i for i in range(self.known, known) if i not in have)
            self.known = known
            self._dirty = True
            self._cursor = len(self._order)  # rebuild: the new pieces are candidates now

    # -- what the swarm has ----------------------------------------------------------------------

    def peer_bitfield(self, bits: Bitfield) -> None:
        avail = self._avail
        for index in bits:
            avail[index] += 1
        self._dirty = True

    def peer_have(self, index: int) -> None:
        self._avail[index] += 1
        self._dirty = True

    def peer_seed(self) -> None:
        self._seeds += 1

    def peer_gone(self, bits: Bitfield | None) -> None:
        """A peer left; ``bits`` is what it had, None for a seed counted by :meth:`peer_seed`."""
        if bits is None:
            self._seeds -= 1
            return
        avail = self._avail
        for index in bits:
            avail[index] -= 1
        self._dirty = True

    def availability(self, index: int) -> int:
        return self._avail[index] + self._seeds

    def holders(self, index: int) -> int:
        """Peers other than seeds known to have piece ``index``."""
        return self._avail[index]

    # -- what readers want ---------------------------------------------------------------------

    def set_priority(self, indices: Iterable[int]) -> None:
        """Pieces readers are waiting for, most urgent first (replaces the previous list)."""
        self._priority = [i for i in indices if 0 <= i < self.num_pieces]

    # -- picking -------------------------------------------------------------------------------

    def interesting(self, peer: Bitfield | None) -> bool:
        """Does the peer (None = seed) have a piece we still want?"""
        if peer is None:
            return self.have.count < self.known
        return any(self.wanted(i) for i in peer)

    def pick(
        self,
        peer: Bitfield | None,
        block_size: int,
        count: int,
        outstanding: Mapping[tuple[int, int], Block] | None = None,
        wanted: AbstractSet[int] | None = None,
        *,
        who: Hashable = None,
    ) -> list[Block]:
        """Up to ``count`` blocks to request from ``peer`` (None = a seed).

        Blocks are at most ``max(block_size, 16 KiB)`` bytes. ``outstanding`` holds the
        requests this peer already has in flight (keyed by (index, begin)), so endgame
        never asks one peer twice for any byte. ``wanted``, if the caller keeps it, is the
        set of known pieces the peer has and we do not (it makes picks from a peer with few
        such pieces cheap). ``who`` names the peer: a piece that failed its hash with blocks from
        several peers is asked next of one peer alone (:meth:`piece_failed`)."""
        blocks: list[Block] = []
        if count <= 0 or self.have.complete:
            return blocks
        units_per_block = max(1, block_size // UNIT)

        def has(index: int) -> bool:
            return peer is None or index in peer

        for index in self._priority:
            if len(blocks) >= count:
                return blocks
            if peer is None and self._avail[index]:
                # A seed (the proxy, usually) is asked for a reader's next pieces only when
                # no other peer has them: when a whole rollout reads in the same order, the
                # seed's uplink would otherwise send every one of those pieces to every node.
                continue
            if self.wanted(index) and has(index):
                self._take(index, units_per_block, count, blocks, who)
        for index in list(self._partials):
            if len(blocks) >= count:
                return blocks
            if has(index):
                self._take(index, units_per_block, count, blocks, who)
        while len(blocks) < count:
            fresh = self._new_piece(peer, wanted)
            if fresh is None:
                break
            self._take(fresh, units_per_block, count, blocks, who)
        if not blocks and not outstanding and self._in_endgame():
            # Duplicates only for a peer with nothing else to do: with deep queues of
            # whole-piece requests the endgame starts early, and duplicating everything then
            # costs a fifth of the swarm's upload (measured in the demo).
            self._endgame(peer, units_per_block, count, {}, blocks, who=who)
        return blocks

    def _take(
        self, index: int, units_per_block: int, count: int, out: list[Block], who: Hashable
    ) -> None:
        single = index in self._single_source
        if single:
            owner = self._single_source[index]
            if owner is not None and owner != who:
                return  # another peer is sending this piece, whole
            self._single_source[index] = who
            count = len(out) + self._units_of(index)  # the whole piece, from this peer
        partial = self._partials.get(index)
        if partial is None:
            partial = self._partials[index] = _Partial(self.piece_size(index))
            self._free.discard(index)
        if not partial.free:
            return
        requests, received = partial.requests, partial.received
        unit = 0
        while unit < partial.units and len(out) < count:
            if requests[unit] or received[unit]:
                unit += 1
                continue
            first = unit
            length = 0
            while (
                unit < partial.units
                and unit - first < units_per_block
                and not requests[unit]
                and not received[unit]
            ):
                requests[unit] = 1
                length += partial.unit_length(unit)
                unit += 1
            partial.free -= unit - first
            out.append(Block(index, first * UNIT, length))

    def release(self, who: Hashable) -> None:
        """Peer ``who`` is gone: the pieces it was to send whole may go to another peer."""
        for index, owner in self._single_source.items():
            if owner == who:
                self._single_source[index] = None

    def _units_of(self, index: int) -> int:
        return (self.piece_size(index) + UNIT - 1) // UNIT

    def _eligible(self, index: int) -> bool:
        return index in self._free

    def _rarest(self, indices: Iterable[int]) -> int | None:
        """The eligible piece of ``indices`` with the lowest availability (ties at random)."""
        best: int | None = None
        best_avail = 0
        ties = 0
        free, avail = self._free, self._avail
        for index in indices:
            if index in free:
                count = avail[index]
                if best is None or count < best_avail:
                    best, best_avail, ties = index, count, 1
                elif count == best_avail:
                    ties += 1
                    if self._rng.randrange(ties) == 0:
                        best = index
        return best

    def _new_piece(self, peer: Bitfield | None, wanted: AbstractSet[int] | None) -> int | None:
        free = self._free
        if not free:
            return None
        if self.have.count < self._random_first:
            if peer is None:
                candidates = list(free)
                unseen = [i for i in candidates if not self._avail[i]]
                candidates = unseen or candidates  # from a seed, pieces no other peer has first
            else:
                source = wanted if wanted is not None else peer
                candidates = [i for i in source if i in free]
            return self._rng.choice(candidates) if candidates else None
        if peer is not None and wanted is not None and len(wanted) <= SMALL_WANTED:
            return self._rarest(wanted)
        if self._cursor >= len(self._order) or (
            self._dirty and self._picks_since_rebuild >= REBUILD_PICKS
        ):
            self._rebuild()
        self._picks_since_rebuild += 1
        order = self._order
        while self._cursor < len(order) and order[self._cursor] not in free:
            self._cursor += 1
        if peer is None:
            # The order may be a few picks stale: look a little ahead for a piece that no peer
            # has (live availability), so that a seed's upload adds a new piece to the swarm.
            for position in range(self._cursor, min(len(order), self._cursor + SEED_LOOKAHEAD)):
                index = order[position]
                if not self._avail[index] and index in free:
                    return index
            return order[self._cursor] if self._cursor < len(order) else None
        for position in range(self._cursor, min(len(order), self._cursor + SCAN_LIMIT)):
            index = order[position]
            if index in peer and index in free:
                return index
        return self._rarest(wanted if wanted is not None else peer)

    def _rebuild(self) -> None:
        avail = self._avail
        rnd = self._rng.random
        keys = {i: (avail[i], rnd()) for i in self._free}
        self._order = sorted(keys, key=keys.__getitem__)
        self._cursor = 0
        self._dirty = False
        self._picks_since_rebuild = 0

    def _in_endgame(self) -> bool:
        if any(p.free for p in self._partials.values()):
            return False
        missing = self.known - self.have.count - len(self._verifying)
        return missing == len(self._partials)

    def _endgame(
        self,
        peer: Bitfield | None,
        units_per_block: int,
        count: int,
        outstanding: Mapping[tuple[int, int], Block],
        out: list[Block],
        *,
        who: Hashable = None,
    ) -> None:
        # Units this peer is already asked for, by this call or by earlier requests.
        busy = {(b.index, unit) for b in (*outstanding.values(), *out) for unit in self._units(b)}
        for index, partial in self._partials.items():
            if peer is not None and index not in peer:
                continue
            if self._single_source.get(index, who) != who:
                continue  # one peer sends this piece whole: no duplicates to mix in
            unit = 0
            while unit < partial.units and len(out) < count:
                if (
                    partial.received[unit]
                    or (index, unit) in busy
                    or partial.requests[unit] >= ENDGAME_REQUESTS
                ):
                    unit += 1
                    continue
                first = unit
                length = 0
                while (
                    unit < partial.units
                    and unit - first < units_per_block
                    and not partial.received[unit]
                    and (index, unit) not in busy
                    and partial.requests[unit] < ENDGAME_REQUESTS
                ):
                    if partial.requests[unit] < 255:
                        partial.requests[unit] += 1
                    length += partial.unit_length(unit)
                    unit += 1
                out.append(Block(index, first * UNIT, length))
            if len(out) >= count:
                return

    # -- outcomes ------------------------------------------------------------------------------

    def _units(self, block: Block) -> range:
        first = block.begin // UNIT
        return range(first, first + (block.length + UNIT - 1) // UNIT)

    def block_received(self, block: Block) -> bool:
        """Record a block's arrival. True when the piece now has every unit (verify it)."""
        partial = self._partials.get(block.index)
        if partial is None:
            return False
        newly = False
        for unit in self._units(block):
            if unit < partial.units and not partial.received[unit]:
                partial.received[unit] = 1
                partial.received_count += 1
                if not partial.requests[unit]:
                    partial.free -= 1
                newly = True
        if newly and partial.received_count == partial.units:
            del self._partials[block.index]
            self._verifying.add(block.index)
            return True
        return False

    def block_failed(self, block: Block) -> None:
        """A request will not be answered (rejected, cancelled, timed out, peer gone)."""
        partial = self._partials.get(block.index)
        if partial is None:
            return
        for unit in self._units(block):
            if unit < partial.units and partial.requests[unit]:
                partial.requests[unit] -= 1
                if not partial.requests[unit] and not partial.received[unit]:
                    partial.free += 1
        if not partial.received_count and partial.free == partial.units:
            del self._partials[block.index]
            if block.index in self._single_source:
                self._single_source[block.index] = None  # another peer may take it now
            if self.wanted(block.index):
                self._free.add(block.index)
            self._dirty = True

    def piece_verifying(self, index: int) -> None:
        """The whole piece arrived by other means and is being checked."""
        self._partials.pop(index, None)
        self._free.discard(index)
        self._verifying.add(index)

    def piece_verified(self, index: int) -> None:
        self._single_source.pop(index, None)
        self._verifying.discard(index)
        self._partials.pop(index, None)
        self._free.discard(index)
        self.have.set(index)

    def piece_failed(self, index: int, *, single_source: bool = False) -> None:
        """The piece's hash did not match: every unit is wanted again; ``single_source``: from
        one peer alone next time (the copy mixed blocks of several peers)."""
        if single_source or index in self._single_source:
            self._single_source[index] = None  # whoever sent this copy, the next is anyone's
        self._verifying.discard(index)
        self._partials.pop(index, None)
        if self.wanted(index):
            self._free.add(index)
        self._dirty = True
        self._cursor = len(self._order)  # force a rebuild so the piece is picked again
