"""The pure swarm registry (p2p_tracker.swarm) with a fake clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common.tracker_proto import AnnounceRequest, Event, ScrapeStats
from p2p_tracker.swarm import (
    IP,
    LEFT,
    PACKED,
    PEER_ID,
    PeerConflictError,
    Swarm,
    SwarmFullError,
    SwarmPeer,
)

H1 = b"\x01" * 20
H2 = b"\x02" * 20


def pid(n: int) -> bytes:
    return b"-TS0001-" + n.to_bytes(12, "big")


def req(
    n: int,
    *,
    info_hash: bytes = H1,
    left: int = 100,
    event: Event = Event.NONE,
    numwant: int | None = None,
    key: bytes | None = None,
) -> AnnounceRequest:
    return AnnounceRequest(
        info_hash, pid(n), 10000 + n, left=left, event=event, numwant=numwant, key=key
    )


def make(**overrides: int) -> Swarm:
    options = {
        "peer_expiry": 100,
        "max_torrents": 10,
        "max_peers_per_torrent": 50,
        "default_numwant": 5,
        "max_numwant": 20,
    }
    options.update(overrides)
    return Swarm(**options, rng=random.Random(7))


def ids(peers: list[SwarmPeer]) -> set[bytes]:
    return {p[PEER_ID] for p in peers}


def test_first_peer_gets_nobody_and_second_gets_the_first() -> None:
    swarm = make()
    first = swarm.announce(req(1, event=Event.STARTED), "10.0.0.1", now=0)
    assert first.peers == []
    assert (first.complete, first.incomplete) == (0, 1)
    second = swarm.announce(req(2, left=0), "10.0.0.2", now=1)
    assert [p[PEER_ID] for p in second.peers] == [pid(1)]
    assert second.peers[0][PACKED] == b"\x0a\x00\x00\x01" + (10001).to_bytes(2, "big")
    assert (second.complete, second.incomplete) == (1, 1)
    assert swarm.torrent_count == 1
    assert swarm.peer_count == 2
    assert swarm.seeder_count == 1


def test_requester_is_never_returned() -> None:
    swarm = make()
    for n in range(30):
        swarm.announce(req(n), f"10.0.0.{n}", now=0)
    for n in range(30):
        for numwant in (1, 5, 20, 29, 40):
            outcome = swarm.announce(req(n, numwant=numwant), f"10.0.0.{n}", now=1)
            assert pid(n) not in ids(outcome.peers)
            assert len(outcome.peers) == min(numwant, 20, 29)
            assert len(ids(outcome.peers)) == len(outcome.peers)  # no duplicates


def test_numwant_default_cap_and_zero() -> None:
    swarm = make(default_numwant=5, max_numwant=8)
    for n in range(20):
        swarm.announce(req(n), "10.0.0.1", now=0)
    assert len(swarm.announce(req(0), "10.0.0.1", now=0).peers) == 5
    assert len(swarm.announce(req(0, numwant=1000), "10.0.0.1", now=0).peers) == 8
    assert swarm.announce(req(0, numwant=0), "10.0.0.1", now=0).peers == []


def test_selection_is_random() -> None:
    swarm = make(max_numwant=3)
    for n in range(20):
        swarm.announce(req(n), "10.0.0.1", now=0)
    seen: set[bytes] = set()
    for _ in range(50):
        seen |= ids(swarm.announce(req(0, numwant=3), "10.0.0.1", now=0).peers)
    assert len(seen) == 19


def test_seeds_get_only_leechers_and_leechers_get_both() -> None:
    swarm = make()
    for n in range(5):
        swarm.announce(req(n, left=0), "10.0.0.1", now=0)  # seeds 0..4
    for n in range(5, 10):
        swarm.announce(req(n), "10.0.0.1", now=0)  # leechers 5..9
    seed_view = swarm.announce(req(0, left=0, numwant=20), "10.0.0.1", now=0)
    assert ids(seed_view.peers) == {pid(n) for n in range(5, 10)}
    leech_view = swarm.announce(req(5, numwant=20), "10.0.0.1", now=0)
    assert ids(leech_view.peers) == {pid(n) for n in range(10) if n != 5}


def test_stopped_removes_and_forgets_empty_torrents() -> None:
    swarm = make()
    swarm.announce(req(1), "10.0.0.1", now=0)
    swarm.announce(req(2, left=0), "10.0.0.2", now=0)
    outcome = swarm.announce(req(1, event=Event.STOPPED), "10.0.0.1", now=1)
    assert outcome.peers == []
    assert (outcome.complete, outcome.incomplete) == (1, 0)
    assert swarm.announce(req(3), "10.0.0.3", now=1).peers[0][PEER_ID] == pid(2)
    swarm.announce(req(2, left=0, event=Event.STOPPED), "10.0.0.2", now=2)
    swarm.announce(req(3, event=Event.STOPPED), "10.0.0.3", now=2)
    assert swarm.torrent_count == 0
    assert swarm.peer_count == 0
    assert swarm.seeder_count == 0
    # stopping an unknown peer or torrent is harmless and creates nothing
    assert swarm.announce(req(9, event=Event.STOPPED), "10.0.0.9", now=3).peers == []
    assert swarm.torrent_count == 0


def test_expiry_by_now() -> None:
    swarm = make(peer_expiry=100)
    swarm.announce(req(1), "10.0.0.1", now=0)
    swarm.announce(req(2), "10.0.0.2", now=50)
    swarm.announce(req(3, info_hash=H2, left=0), "10.0.0.3", now=60)
    swarm.announce(req(1), "10.0.0.1", now=90)  # re-announce refreshes peer 1
    assert swarm.expire(now=149) == 0
    assert swarm.expire(now=151) == 1  # peer 2 (last seen 50)
    assert swarm.peer_count == 2
    assert swarm.expire(now=161) == 1  # peer 3, and its torrent with it
    assert swarm.torrent_count == 1
    assert swarm.seeder_count == 0
    assert swarm.expire(now=191) == 1
    assert swarm.torrent_count == 0
    assert swarm.expire(now=10_000) == 0


def test_expiry_in_bounded_steps() -> None:
    swarm = make(peer_expiry=10)
    for n in range(25):
        swarm.announce(req(n), "10.0.0.1", now=n)
    assert swarm.expire(now=100, limit=10) == 10
    assert swarm.expire(now=100, limit=10) == 10
    assert swarm.expire(now=100, limit=10) == 5
    assert swarm.peer_count == 0


def test_max_torrents() -> None:
    swarm = make(max_torrents=2)
    swarm.announce(req(1, info_hash=H1), "10.0.0.1", now=0)
    swarm.announce(req(1, info_hash=H2), "10.0.0.1", now=0)
    with pytest.raises(SwarmFullError):
        swarm.announce(req(1, info_hash=b"\x03" * 20), "10.0.0.1", now=0)
    swarm.announce(req(2, info_hash=H1), "10.0.0.2", now=0)  # known torrents still work
    swarm.announce(req(1, info_hash=H2, event=Event.STOPPED), "10.0.0.1", now=0)
    swarm.announce(req(1, info_hash=b"\x03" * 20), "10.0.0.1", now=0)  # room again


def test_max_peers_per_torrent_answers_but_does_not_list() -> None:
    swarm = make(max_peers_per_torrent=3)
    for n in range(3):
        assert not swarm.announce(req(n), "10.0.0.1", now=0).full
    outcome = swarm.announce(req(3, numwant=10), "10.0.0.1", now=0)
    assert outcome.full
    assert ids(outcome.peers) == {pid(0), pid(1), pid(2)}
    assert swarm.peer_count == 3
    assert not swarm.announce(req(0), "10.0.0.1", now=0).full  # known peers are fine


def test_completed_is_counted_once_and_moves_to_seeds() -> None:
    swarm = make()
    swarm.announce(req(1, event=Event.STARTED), "10.0.0.1", now=0)
    swarm.announce(req(2), "10.0.0.2", now=0)
    assert swarm.scrape(H1) == ScrapeStats(complete=0, downloaded=0, incomplete=2)
    swarm.announce(req(1, left=0, event=Event.COMPLETED), "10.0.0.1", now=1)
    swarm.announce(req(1, left=0, event=Event.COMPLETED), "10.0.0.1", now=2)  # repeated
    assert swarm.scrape(H1) == ScrapeStats(complete=1, downloaded=1, incomplete=1)
    assert swarm.seeder_count == 1
    swarm.announce(req(3, left=0, event=Event.COMPLETED), "10.0.0.3", now=2)  # new + completed
    assert swarm.scrape(H1) == ScrapeStats(complete=2, downloaded=2, incomplete=1)
    swarm.announce(req(1, left=5), "10.0.0.1", now=3)  # back to leeching (e.g. data lost)
    assert swarm.scrape(H1) == ScrapeStats(complete=1, downloaded=2, incomplete=2)
    assert swarm.scrape(H2) == ScrapeStats()


def test_peer_id_from_another_address_needs_the_key() -> None:
    swarm = make()
    swarm.announce(req(1), "10.0.0.1", now=0)
    with pytest.raises(PeerConflictError):
        swarm.announce(req(1, event=Event.STOPPED), "10.6.6.6", now=1)
    with pytest.raises(PeerConflictError):
        swarm.announce(req(1), "10.6.6.6", now=1)
    swarm.announce(req(2, key=b"k2"), "10.0.0.2", now=0)
    swarm.announce(req(2, key=b"k2"), "10.0.0.22", now=1)  # moved, same key: accepted
    peers = swarm.announce(req(3, numwant=10), "10.0.0.3", now=1).peers
    (peer,) = [p for p in peers if p[PEER_ID] == pid(2)]
    assert peer[IP] == "10.0.0.22"
    assert peer[PACKED][:4] == bytes([10, 0, 0, 22])


def test_ipv6_and_mapped_addresses() -> None:
    swarm = make()
    swarm.announce(req(1), "2001:db8::1", now=0)
    swarm.announce(req(2), "::ffff:10.0.0.2", now=0)
    peers = swarm.announce(req(3, numwant=10), "10.0.0.3", now=0).peers
    assert sorted(len(p[PACKED]) for p in peers) == [6, 18]
    with pytest.raises(ValueError):
        swarm.announce(req(4), "not-an-ip", now=0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 11),  # peer
            st.sampled_from([H1, H2]),
            st.sampled_from(list(Event)),
            st.integers(0, 2),  # left
            st.integers(0, 30),  # time step
            st.integers(0, 12),  # numwant
        ),
        max_size=120,
    )
)
def test_invariants_hold_under_any_sequence(
    steps: list[tuple[int, bytes, Event, int, int, int]],
) -> None:
    swarm = make(peer_expiry=40, max_peers_per_torrent=8, max_numwant=12)
    now = 0
    for n, info_hash, event, left, step, numwant in steps:
        now += step
        swarm.expire(now)
        outcome = swarm.announce(
            req(n, info_hash=info_hash, left=left, event=event, numwant=numwant),
            f"10.0.0.{n}",
            now,
        )
        assert pid(n) not in ids(outcome.peers)
        assert len(outcome.peers) <= numwant
        assert len(ids(outcome.peers)) == len(outcome.peers)
        if not left:
            assert all(p[LEFT] for p in outcome.peers)
    # the counters agree with the contents
    total = seeds = 0
    for info_hash in (H1, H2):
        stats = swarm.scrape(info_hash)
        assert stats.complete + stats.incomplete <= 8
        total += stats.complete + stats.incomplete
        seeds += stats.complete
    assert total == swarm.peer_count
    assert seeds == swarm.seeder_count
    swarm.expire(now + 41)
    assert (swarm.peer_count, swarm.torrent_count, swarm.seeder_count) == (0, 0, 0)
