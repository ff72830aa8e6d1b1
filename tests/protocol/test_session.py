"""The pure peer session and swarm core, back to back with no sockets (tests/sessionpair.py)."""

from __future__ import annotations

import pytest

from p2p_common import wire
from p2p_common.bitfield import Bitfield
from p2p_common.session import (
    FIRST_OFFERS,
    MAX_AVAILABILITY_MESSAGES,
    MAX_OUTBOX_BYTES,
    MAX_REFUSED,
    QUEUE_SECONDS,
    SNUB_AFTER,
    SUPER_SEED_OFFERS,
    PeerSession,
    Window,
)
from tests.engine_helpers import make_content, metainfo_for
from tests.sessionpair import Node, Pair, pump_all

KiB = 1024
PIECE = 256 * KiB


def seed_and_leech(
    pieces: int = 8, *, seed_role: str = "proxy", **leech: object
) -> tuple[Node, Node, bytes]:
    content = make_content(pieces * PIECE - 1000)
    meta = metainfo_for(content, piece_length=PIECE)
    seed = Node.make("seed", meta, content, role=seed_role)
    leecher = Node.make("leech", meta, **leech)  # type: ignore[arg-type]
    return seed, leecher, content


def test_a_leech_gets_every_piece_from_a_seed() -> None:
    seed, leech, content = seed_and_leech()
    pair = Pair(seed, leech)
    pair.pump()
    assert bytes(leech.store.data) == content
    assert leech.core.complete
    assert leech.core.downloaded_by_role == {"proxy": len(content)}
    assert seed.core.uploaded == len(content)
    # p2p peers negotiate whole-piece requests: one request per piece, not one per 16 KiB
    assert pair.to_a.bytes_sent < 8 * 100 + 1000


def test_a_standard_peer_gets_16_kib_blocks() -> None:
    seed, leech, content = seed_and_leech(pieces=2)
    pair = Pair(seed, leech, extensions=False)
    pair.pump()
    assert not leech.core.picker.have.count  # a foreign peer waits for the choking round
    pair.tick()
    pair.pump()
    assert bytes(leech.store.data) == content
    assert not pair.a.cooperative
    assert leech.core.downloaded_by_role == {"foreign": len(content)}


def test_nothing_is_requested_before_the_unchoke_and_a_choke_rejects_queued_requests() -> None:
    seed, leech, _ = seed_and_leech()
    pair = Pair(seed, leech, extensions=False)  # foreign: no immediate cooperative unchoke
    pair.pump()
    assert pair.b.am_interested
    assert pair.b.peer_choking
    assert not pair.b.outstanding
    pair.a.unchoke()
    # deliver the unchoke and the requests, but no block yet
    pair._move(pair.to_b, uploads=0)
    pair._move(pair.to_a, uploads=0)
    assert pair.a.uploads
    pair.a.choke()
    assert not pair.a.uploads  # every queued request is answered with a reject
    pair.pump()
    assert not pair.b.outstanding  # the rejects gave every request back to the picker
    assert leech.core.picker.pick(None, PIECE, 100)  # so they can be asked again


def test_a_window_session_sees_one_chunk_numbered_from_zero() -> None:
    content = make_content(12 * PIECE)
    meta = metainfo_for(content, piece_length=PIECE)
    seed = Node.make("seed", meta, content, role="proxy")
    leech = Node.make("leech", meta)
    window = Window(4, 4)
    pair = Pair(seed, leech, window_a=window, window_b=window)
    pair.pump()
    have = leech.core.picker.have
    assert sorted(have) == [4, 5, 6, 7]  # exactly the window
    assert bytes(leech.store.data[4 * PIECE : 8 * PIECE]) == content[4 * PIECE : 8 * PIECE]
    assert not pair.b.has_wanted  # nothing else is visible through the window


def test_hashes_published_later_are_fetched_then() -> None:
    seed, leech, content = seed_and_leech(pieces=8, known=0)
    pair = Pair(seed, leech)
    pair.pump()
    assert leech.core.picker.have.count == 0
    assert not pair.b.am_interested
    leech.core.set_known(4)
    pair.pump()
    assert sorted(leech.core.picker.have) == [0, 1, 2, 3]
    leech.core.set_known(8)
    pair.pump()
    assert bytes(leech.store.data) == content


def test_a_super_seed_reveals_a_few_pieces_at_a_time_and_each_once_first() -> None:
    content = make_content(64 * PIECE)
    meta = metainfo_for(content, piece_length=PIECE)
    seed = Node.make("seed", meta, content, role="proxy", super_seed=True)
    leeches = [Node.make(f"l{i}", meta) for i in range(3)]
    pairs = [Pair(seed, leech) for leech in leeches]
    for pair in pairs:
        pair._move(pair.to_b, uploads=0)  # the opening messages only
    revealed = [set(pair.b.peer_bits) for pair in pairs]
    assert all(len(r) == FIRST_OFFERS for r in revealed)  # no rate measured yet
    assert not (revealed[0] & revealed[1])
    assert not (revealed[1] & revealed[2])
    pairs[0].pump(uploads_per_round=1)
    # The first leech got the pieces revealed to it, then one more for every piece delivered:
    # the first pass goes on in index order, so it never got what the others were shown.
    first = set(leeches[0].core.picker.have)
    assert revealed[0] <= first
    assert not (first & (revealed[1] | revealed[2]))
    for _ in range(5):  # a choking round re-offers to peers left with nothing revealed
        for pair in pairs:
            pair.pump()
        pairs[0].tick()
    assert all(leech.core.complete for leech in leeches)  # they cannot trade: all from the seed


def test_a_growing_seed_offers_only_published_pieces() -> None:
    content = make_content(16 * PIECE)
    meta = metainfo_for(content, piece_length=PIECE)
    # The proxy while it fetches: nothing yet, downloads nothing itself (known = 0).
    seed = Node.make("seed", meta, role="proxy", super_seed=True, known=0, published=0)
    leech = Node.make("leech", meta, known=0)
    pair = Pair(seed, leech)
    pair.pump()
    for index in range(8):  # the origin delivers the first half
        seed.store.write_piece(index, content[index * PIECE : (index + 1) * PIECE])
        seed.core.piece_stored(index, 0.0)
    pair.pump()
    assert not pair.b.peer_bits.count  # stored, but its hashes are not published yet
    seed.core.set_published(8)
    leech.core.set_known(8)
    for _ in range(20):
        pair.pump()
        pair.tick()
    assert sorted(leech.core.picker.have) == list(range(8))
    assert not seed.core.picker.wanted(0)  # the proxy never asks peers for anything


def test_a_growing_seed_spreads_new_pieces_over_every_peer_in_turn() -> None:
    """Pieces arriving from the origin a few at a time go one per peer, the peers with the
    fewest undelivered offers first, not all to the peers connected first (which concentrated
    an origin fetch's first copies on two or three agents: docs/scale.md, finding 4)."""
    content = make_content(40 * PIECE)
    meta = metainfo_for(content, piece_length=PIECE)
    seed = Node.make("seed", meta, role="proxy", super_seed=True, known=0, published=0)
    leeches = [Node.make(f"l{i}", meta, known=0) for i in range(5)]
    pairs = [Pair(seed, leech) for leech in leeches]
    for pair in pairs:
        pair.pump()
        pair.a.offer_target = SUPER_SEED_OFFERS  # fast peers: room for eight offers each
    seed.core.second_copies = False  # still fed by its origin fetch
    for index in range(40):  # one piece stored and published at a time, nothing delivered
        seed.store.write_piece(index, content[index * PIECE : (index + 1) * PIECE])
        seed.core.piece_stored(index, 0.0)
        seed.core.set_published(index + 1)
        offers = sorted(len(pair.a.offers) for pair in pairs)
        assert offers[-1] - offers[0] <= 1, (index, offers)  # in turn
    revealed = [pair.a.offers for pair in pairs]
    assert all(len(r) == SUPER_SEED_OFFERS for r in revealed)  # 40 pieces, 5 x 8 offers
    assert len(set().union(*revealed)) == 40  # each piece to one peer
    # A chunk published at once (8 pieces) goes round the peers too.
    seed2 = Node.make("seed2", meta, content, role="proxy", super_seed=True, published=0)
    others = [Pair(seed2, Node.make(f"m{i}", meta, known=0)) for i in range(4)]
    for pair in others:
        pair.pump()
    seed2.core.set_published(8)
    assert [len(pair.a.offers) for pair in others] == [FIRST_OFFERS] * 4
    assert len(set().union(*(pair.a.offers for pair in others))) == 4 * FIRST_OFFERS


def test_a_piece_that_fails_its_hash_blames_its_only_contributor() -> None:
    seed, leech, _content = seed_and_leech(pieces=2, seed_role="agent")
    pair = Pair(seed, leech)
    pair.to_b.corrupt = True
    pair.pump()
    assert leech.failed_pieces
    assert pair.banned == [seed.peer_id]  # the liar, convicted by the leech
    assert not leech.core.picker.have.count


def test_a_liar_mixing_blocks_with_an_honest_seed_cannot_frame_it() -> None:
    """Smart ban: a piece built from two peers' blocks that fails its hash convicts nobody;
    it is fetched again from one peer alone, and the copy that passes shows whose blocks
    differed. Only the liar is banned, and the download completes from the honest seed."""
    content = make_content(8 * PIECE - 1000)
    meta = metainfo_for(content, piece_length=PIECE)
    small = 16 * KiB  # many blocks per piece, so pieces mix both seeds' blocks
    honest = Node.make("honest", meta, content, role="agent", max_block=small)
    liar = Node.make("liar", meta, content, role="agent", max_block=small)
    leech = Node.make("leech", meta, max_block=small)
    to_honest = Pair(honest, leech)
    to_liar = Pair(liar, leech)
    to_liar.to_b.corrupt = True
    banned = pump_all([to_honest, to_liar])
    assert leech.failed_pieces  # some pieces really were mixed and failed
    assert banned == [liar.peer_id]
    assert to_liar.closed
    assert not to_honest.closed
    assert bytes(leech.store.data) == content


def test_a_peer_that_stops_answering_is_snubbed_and_keeps_one_request() -> None:
    seed, leech, _ = seed_and_leech()
    pair = Pair(seed, leech)
    pair.to_b.silent = True
    pair.pump()
    assert len(pair.b.outstanding) > 1
    pair.tick(SNUB_AFTER + 1)
    assert pair.b.snubbed
    pair._move(pair.to_a, uploads=0)  # the cancels
    pair.tick()
    assert len(pair.b.outstanding) == 1


def test_requests_while_choked_are_refused_and_a_flood_ends_the_session() -> None:
    seed, leech, _ = seed_and_leech()
    pair = Pair(seed, leech, extensions=False)
    pair.pump()
    session = pair.a  # the seed's view of the leech, which it chokes
    for _ in range(MAX_REFUSED):
        session.receive(wire.Request(0, 0, wire.BLOCK_SIZE), 0.0)
    assert session.refused == MAX_REFUSED
    with pytest.raises(Exception, match="refuse"):
        session.receive(wire.Request(0, 0, wire.BLOCK_SIZE), 0.0)


def test_a_peer_that_never_reads_breaks_its_session_not_the_swarm() -> None:
    content = make_content(4 * PIECE)
    meta = metainfo_for(content, piece_length=PIECE)
    seed = Node.make("seed", meta, content, role="proxy")
    others = [Node.make(f"l{i}", meta) for i in range(2)]
    deaf, fine = (Pair(seed, other) for other in others)
    deaf.pump()
    fine.pump()
    woken = []
    deaf.a.notify = lambda: woken.append(True)
    for _ in range(MAX_OUTBOX_BYTES // 9 + 1):
        deaf.a.send(wire.encode_have(0))
    assert deaf.a.error is not None
    assert deaf.a.wants_write
    assert woken
    # a broadcast still reaches every other session
    fine.b.receive(wire.NotInterested(), 0.0)
    seed.core.tick(1.0, 1.0)
    assert fine.a.error is None


def test_idle_peers_are_closed_by_the_tick() -> None:
    seed, leech, _ = seed_and_leech()
    pair = Pair(seed, leech)  # and nothing ever arrives on it
    closing = pair.tick(200.0)
    assert {session.peer_id for session, _ in closing} == {leech.peer_id, seed.peer_id}
    assert all(reason == "idle" for _, reason in closing)


def test_two_seeds_close_their_connection_at_the_next_round() -> None:
    seed, leech, _ = seed_and_leech()
    pair = Pair(seed, leech)
    pair.pump()
    assert leech.core.complete
    closing = pair.tick(1.0)
    assert {session.peer_id for session, _ in closing} == {leech.peer_id, seed.peer_id}
    assert all(reason == "both seeds" for _, reason in closing)


def test_a_seed_keeps_a_leech_that_still_downloads() -> None:
    seed, leech, _ = seed_and_leech()
    pair = Pair(seed, leech)
    for _ in range(4):
        pair.step()
    assert not leech.core.complete
    assert pair.tick(1.0) == []


def test_a_late_bitfield_replaces_what_was_known() -> None:
    seed, leech, _ = seed_and_leech(pieces=8)
    pair = Pair(seed, leech, extensions=False)
    pair.pump()
    session: PeerSession = pair.b
    assert session.peer_seed
    bits = Bitfield(8)
    bits.set(3)
    session.receive(wire.BitfieldMessage(bits), 0.0)
    assert not session.peer_seed
    assert list(session.peer_bits) == [3]
    assert leech.core.picker.availability(3) == 1
    assert leech.core.picker.availability(4) == 0


def test_bitfields_that_grow_are_batched_haves_and_repeats_without_news_end_the_session() -> None:
    """aria2 sends a whole bitfield instead of 20 or more HAVEs, many times per torrent; only
    a bitfield that tells nothing new is a strike."""
    seed, leech, _ = seed_and_leech(pieces=64)
    pair = Pair(seed, leech, extensions=False)
    pair.pump()
    session: PeerSession = pair.a  # the seed's view of the leech
    bits = Bitfield(64)
    for index in range(64):
        bits.set(index)
        session.receive(wire.BitfieldMessage(bits.copy()), 0.0)  # one new piece each time
    assert session.error is None
    assert session.peer_bits.count == 64
    # the leech's opening (empty) bitfield told nothing either: that was the first
    for _ in range(MAX_AVAILABILITY_MESSAGES - 1):
        session.receive(wire.BitfieldMessage(bits.copy()), 0.0)
    with pytest.raises(Exception, match="bitfield"):
        session.receive(wire.BitfieldMessage(bits.copy()), 0.0)


def test_a_piece_the_peer_reports_is_never_revealed_to_it_again() -> None:
    """A super-seed's offer ends when the peer says it has the piece (it may have got it from
    another peer); revealing that same piece again would hold the offer slot for ever."""
    seed, leech, _ = seed_and_leech(pieces=SUPER_SEED_OFFERS)
    seed.core.super_seed = True
    pair = Pair(seed, leech)
    session = pair.a
    session.offer_target = SUPER_SEED_OFFERS  # a fast peer
    seed.core.offer(session, SUPER_SEED_OFFERS - len(session.offers))
    pair._move(pair.to_b, uploads=0)  # the opening: every piece revealed once
    assert session.offers == set(range(SUPER_SEED_OFFERS))
    for index in (3, 5):
        session.receive(wire.Have(index), 0.0)
    assert not session.offers & set(session.peer_bits)
    assert session.offers == set(range(SUPER_SEED_OFFERS)) - {3, 5}


def test_a_super_seed_reveals_about_a_queue_time_of_what_it_sends_a_peer() -> None:
    """A peer that takes our pieces fast gets several revealed at once (so the round trip
    between a piece and the next reveal does not idle it); a peer that gets less than a piece
    per queue time, one (a second would wait behind the first while nobody else may fetch
    it from us: docs/rollout.md, "One offer at a time")."""
    seed, leech, _ = seed_and_leech(pieces=64)
    seed.core.super_seed = True
    pair = Pair(seed, leech)
    session = pair.a
    pair._move(pair.to_b, uploads=0)
    assert len(session.offers) == FIRST_OFFERS
    for _ in range(8):  # pieces go out as fast as they are asked for
        pair.step()
    sent = session.uploaded
    assert sent >= 4 * PIECE
    pair.tick(0.05)
    expected = min(SUPER_SEED_OFFERS, int(0.3 * sent / 0.05 * QUEUE_SECONDS / PIECE) + 1)
    assert expected == SUPER_SEED_OFFERS
    assert session.offer_target == expected
    pair._move(pair.to_b, uploads=0)
    assert len(session.offers) == SUPER_SEED_OFFERS  # topped up by the round, not later
    assert set(pair.b.peer_bits) >= session.offers

    # A peer it sent nothing to for a second: one piece at a time.
    seed, slow, _ = seed_and_leech(pieces=64)
    seed.core.super_seed = True
    slow_pair = Pair(seed, slow)
    slow_pair._move(slow_pair.to_b, uploads=0)
    assert len(slow_pair.a.offers) == FIRST_OFFERS
    slow_pair.tick(1.0)  # nothing sent to it in that second
    assert slow_pair.a.offer_target == 1
    most = 0
    while slow_pair.step():  # it fetches what it was shown; a delivery reveals the next
        if slow.core.picker.have.count >= FIRST_OFFERS:
            most = max(most, len(slow_pair.a.offers))
    assert slow.core.complete
    assert most == 1


def test_a_peer_slower_than_a_block_per_queue_time_gets_one_request_at_a_time() -> None:
    seed, leech, _ = seed_and_leech(pieces=64, seed_role="agent")
    pair = Pair(seed, leech)
    pair.to_b.silent = True
    pair.pump()
    assert len(pair.b.outstanding) > 2  # before any rate is known: the whole in-flight budget
    pair.tick()
    assert pair.b.download_rate == 0
    assert pair.b.queue_target == 1
    pair.to_b.silent = False
    for _ in range(200):  # one block at a time until the early requests are answered
        pair._move(pair.to_b, uploads=1)
        pair._move(pair.to_a, uploads=0)
        if len(pair.b.outstanding) <= 1:
            break
    pair._move(pair.to_b, uploads=1)
    pair._move(pair.to_a, uploads=0)
    assert len(pair.b.outstanding) == 1  # refilled to one, not two
    assert not leech.core.complete


def test_a_peer_that_delivers_gets_its_rate_worth_of_whole_piece_requests() -> None:
    seed, leech, _ = seed_and_leech(pieces=64, seed_role="agent")
    pair = Pair(seed, leech)
    pair.to_b.silent = True
    pair.pump()
    pair.to_b.silent = False
    pair._move(pair.to_b, uploads=8)  # 8 blocks in the first second
    pair.tick()
    expected = int(pair.b.download_rate * QUEUE_SECONDS / PIECE) + 1  # whole-piece requests
    assert expected >= 2
    assert pair.b.queue_target == expected
