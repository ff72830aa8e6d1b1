"""Two pure swarms wired back to back through the wire protocol: no sockets, no trio, no clock.

Like h11's ConnectionPair: every byte one :class:`~p2p_common.session.PeerSession` queues is
fed to the other side's :class:`~p2p_common.wire.PeerProtocol`, whose events go to the other
session; complete pieces are checked (SHA-1) and stored by the test, exactly as the engine's
shell does. Time is a number the test moves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from p2p_common import wire
from p2p_common.metainfo import Metainfo
from p2p_common.session import LocalPeer, PeerSession, PieceReady, Window
from p2p_common.storage import MemoryPieceStore
from p2p_common.swarm import SwarmCore


@dataclass
class Node:
    """One side: a store and the pure swarm of one torrent."""

    name: str
    meta: Metainfo
    store: MemoryPieceStore
    core: SwarmCore
    peer_id: bytes
    failed_pieces: list[int] = field(default_factory=list)

    @classmethod
    def make(
        cls,
        name: str,
        meta: Metainfo,
        content: bytes | None = None,
        *,
        role: str = "agent",
        max_block: int = 1024 * 1024,
        super_seed: bool = False,
        known: int | None = None,
        published: int | None = None,
        now: float = 0.0,
    ) -> Node:
        store = MemoryPieceStore(meta, content)
        core = SwarmCore(
            num_pieces=meta.num_pieces,
            piece_length=meta.piece_length,
            length=meta.length,
            local=LocalPeer("test/1", 6881, max_block, role),
            have=store.have,
            known=known,
            published=published,
            super_seed=super_seed,
            now=now,
        )
        peer_id = (b"-T%s-" % name.encode()[:5]).ljust(20, b"x")
        return cls(name, meta, store, core, peer_id)

    def verify(self, ready: PieceReady, now: float) -> list[bytes]:
        """What the engine's verifier does: check, store, report. Returns peer ids to ban."""
        good = hashlib.sha1(ready.data).digest() == self.meta.piece_hash(ready.index)
        if good:
            self.store.write_piece(ready.index, ready.data)
            return self.core.piece_stored(ready.index, now, ready.data)
        self.failed_pieces.append(ready.index)
        return self.core.piece_failed(ready.index, ready.contributors, ready.data)


@dataclass
class Link:
    """One direction of a connection: ``sender``'s session, ``receiver``'s protocol."""

    sender: PeerSession
    sender_node: Node
    receiver: PeerSession
    receiver_node: Node
    protocol: wire.PeerProtocol
    corrupt: bool = False
    """Flip a byte of every block this side uploads (a lying peer)."""
    silent: bool = False
    """Never send block data (a peer that unchokes and then ignores requests)."""
    bytes_sent: int = 0


class Pair:
    """A connection between two nodes, both sessions established."""

    def __init__(
        self,
        a: Node,
        b: Node,
        *,
        now: float = 0.0,
        window_a: Window | None = None,
        window_b: Window | None = None,
        fast: bool = True,
        extensions: bool = True,
    ) -> None:
        reserved = wire.reserved_bytes(extensions=extensions, fast=fast)
        self.now = now
        sessions = []
        protocols = []
        for me, other, given in ((a, b, window_a), (b, a, window_b)):
            window = given or Window(0, me.meta.num_pieces)
            protocol = wire.PeerProtocol(reserved=reserved)
            protocol.receive_data(wire.encode_handshake(me.meta.info_hash, other.peer_id, reserved))
            handshake = protocol.next_event()
            assert isinstance(handshake, wire.Handshake)
            end = min(me.meta.length, (window.first + window.count) * me.meta.piece_length)
            protocol.set_geometry(
                window.count, me.meta.piece_length, end - window.first * me.meta.piece_length
            )
            session = PeerSession(
                me.core,
                peer_id=other.peer_id,
                address=(other.name, 6881),
                outgoing=me is a,
                window=window,
                fast=protocol.fast,
                extensions=protocol.extensions,
                now=now,
            )
            sessions.append(session)
            protocols.append(protocol)
        self.a, self.b = sessions
        self.to_b = Link(self.a, a, self.b, b, protocols[1])
        self.to_a = Link(self.b, b, self.a, a, protocols[0])
        a.core.add_session(self.a)
        b.core.add_session(self.b)
        self.banned: list[bytes] = []

    def pump(self, *, max_rounds: int = 100_000, uploads_per_round: int = 1) -> int:
        """Move bytes both ways until neither side has anything to send; returns the rounds."""
        for rounds in range(max_rounds):
            moved = self._move(self.to_b, uploads_per_round)
            moved |= self._move(self.to_a, uploads_per_round)
            if not moved:
                return rounds
        raise AssertionError("the sessions kept talking")

    def close(self) -> None:
        """End the connection on both sides (what the shell does on a ban or an error)."""
        for link in (self.to_b, self.to_a):
            link.sender_node.core.remove_session(link.sender)

    def _move(self, link: Link, uploads: int) -> bool:
        sender = link.sender
        if sender.closed or link.receiver.closed:
            return False
        data = sender.take_output(self.now)
        moved = bool(data)
        for _ in range(uploads):
            upload = None if link.silent else sender.next_upload()
            if upload is None:
                break
            block = bytearray(link.sender_node.store.read(upload.offset, upload.length))
            if link.corrupt:
                block[0] ^= 0xFF
            data += upload.header + block
            sender.block_sent(upload, self.now)
            link.sender_node.core.uploaded += upload.length
            moved = True
        if data:
            link.bytes_sent += len(data)
            link.protocol.receive_data(data)
            while (event := link.protocol.next_event()) is not None:
                ready = link.receiver.receive(event, self.now)
                if ready is not None:
                    banned = link.receiver_node.verify(ready, self.now)
                    if banned:
                        self.banned += banned
                        if link.sender_node.peer_id in banned:
                            self.close()
                            return True
        return moved

    def step(self) -> bool:
        """One upload each way; False once neither side had anything to send."""
        return self._move(self.to_b, 1) | self._move(self.to_a, 1)

    @property
    def closed(self) -> bool:
        return self.a.closed or self.b.closed

    def tick(self, seconds: float = 1.0) -> list[tuple[PeerSession, str]]:
        """Advance time and run both choking rounds; returns what they want closed."""
        self.now += seconds
        closing = self.to_b.sender_node.core.tick(self.now, seconds)
        closing += self.to_a.sender_node.core.tick(self.now, seconds)
        return closing


def pump_all(pairs: list[Pair], *, max_rounds: int = 100_000) -> list[bytes]:
    """Move bytes on several connections in turn, as one node with several peers sees it.

    A peer banned by a verdict on any connection has its own connection closed (the engine's
    ban is per peer, not per connection). Returns the banned peer ids."""
    banned: list[bytes] = []
    for _ in range(max_rounds):
        moved = False
        for pair in pairs:
            if not pair.closed:
                moved |= pair.step()
            banned += [peer for peer in pair.banned if peer not in banned]
        for pair in pairs:
            nodes = (pair.to_b.sender_node, pair.to_a.sender_node)
            if not pair.closed and any(node.peer_id in banned for node in nodes):
                pair.close()
        if not moved:
            return banned
    raise AssertionError("the sessions kept talking")
