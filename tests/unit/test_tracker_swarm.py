"""The pure swarm registry (p2p_tracker.swarm) with a fake clock."""

from __future__ import annotations

import contextlib
import ipaddress
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
    SEEN,
    Network,
    PeerConflictError,
    Swarm,
    SwarmFullError,
    SwarmPeer,
    Unlisted,
)

H1 = b"\x01" * 20
H2 = b"\x02" * 20
H3 = b"\x03" * 20


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


def make(*, uncapped: list[Network] | None = None, **overrides: int) -> Swarm:
    options = {
        "peer_expiry": 100,
        "max_torrents": 10,
        "max_peers_per_torrent": 50,
        "default_numwant": 5,
        "max_numwant": 20,
        # generous per-address caps: most tests put many peers behind one address
        "max_peers": 10_000,
        "max_torrents_per_address": 1_000,
        "max_peers_per_address": 1_000,
    }
    options.update(overrides)
    return Swarm(**options, uncapped=uncapped or (), rng=random.Random(7))


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


def test_every_other_peer_is_handed_out_about_equally_often() -> None:
    """A window at a random place of a randomly ordered swarm: each other peer's chance is
    numwant / others; and as the peers re-announce (each one moves to a random place), two
    peers are handed out together about as often as in uniform random subsets."""
    swarm = make(max_peers_per_torrent=200, max_numwant=200)
    for n in range(100):
        swarm.announce(req(n, left=0 if n % 4 == 0 else 100), "10.0.0.1", now=0)
    counts = dict.fromkeys(range(1, 100), 0)
    pairs: dict[tuple[int, int], int] = {}
    rounds = 4000
    for r in range(rounds):
        other = 1 + r % 99  # the others re-announce in turn, as they do every interval
        swarm.announce(req(other, left=0 if other % 4 == 0 else 100), "10.0.0.1", now=1)
        got = sorted(
            int.from_bytes(p[PEER_ID][8:], "big")
            for p in swarm.announce(req(0, numwant=20), "10.0.0.1", now=1).peers
        )
        assert len(got) == 20
        for i, a in enumerate(got):
            counts[a] += 1
            for b in got[i + 1 :]:
                pairs[a, b] = pairs.get((a, b), 0) + 1
    expected = rounds * 20 / 99  # about 808
    assert min(counts.values()) > 0.8 * expected
    assert max(counts.values()) < 1.2 * expected
    # any two together: about rounds * 20/99 * 19/98 = 157 times for uniform subsets; a
    # fixed order would hand its neighbours out together almost as often as alone (~770)
    assert max(pairs.values()) < 2.5 * rounds * 20 / 99 * 19 / 98


@settings(max_examples=100)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 12),  # peer
            st.sampled_from([0, 100]),  # left
            st.sampled_from([Event.NONE, Event.STARTED, Event.COMPLETED, Event.STOPPED]),
            st.integers(0, 3),  # address
            st.integers(0, 15),  # numwant
        ),
        max_size=80,
    )
)
def test_slots_stay_consistent(ops: list[tuple[int, int, Event, int, int]]) -> None:
    swarm = make(max_numwant=15)
    for n, left, event, address, numwant in ops:
        request = req(n, left=left, event=event, numwant=numwant, key=b"k")
        outcome = swarm.announce(request, f"10.0.0.{address}", now=0)
        assert pid(n) not in ids(outcome.peers)
        assert len(ids(outcome.peers)) == len(outcome.peers)
        torrent = swarm._torrents.get(H1)
        if torrent is None:
            continue
        others = len(torrent.peers) - (pid(n) in torrent.peers)
        pool = len(torrent.leechers) if left == 0 else others
        if event is not Event.STOPPED:
            assert len(outcome.peers) == min(numwant, pool)
        assert len(torrent.seeds) + len(torrent.leechers) == len(torrent.peers)
        assert len(torrent.seen) == len(torrent.seeds)
        for group in (torrent.seeds, torrent.leechers):
            for slot, peer in enumerate(group):
                assert peer[-1] == slot
                assert torrent.peers[peer[PEER_ID]] is peer
        assert all(p[LEFT] == 0 for p in torrent.seeds)
        assert all(p[LEFT] > 0 for p in torrent.leechers)
        for group, buffer in (
            (torrent.seeds, torrent.seeds4),
            (torrent.leechers, torrent.leechers4),
        ):
            assert buffer == b"".join(p[PACKED] if len(p[PACKED]) == 6 else bytes(6) for p in group)
        assert torrent.wide == sum(len(p[PACKED]) == 18 for p in torrent.peers.values())


@settings(max_examples=100)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 12),  # peer
            st.sampled_from([0, 100]),  # left
            st.sampled_from([Event.NONE, Event.STARTED, Event.STOPPED]),
            st.sampled_from(["10.0.0.1", "10.0.0.2", "2001:db8::1", "2001:db8::2"]),
            st.integers(0, 15),  # numwant
            st.booleans(),  # asking over IPv6
        ),
        max_size=60,
    )
)
def test_packed_answers_are_the_compact_form_of_the_same_choice(
    ops: list[tuple[int, int, Event, str, int, bool]],
) -> None:
    plain, packed = make(max_numwant=15), make(max_numwant=15)
    for n, left, event, address, numwant, ipv6 in ops:
        request = req(n, left=left, event=event, numwant=numwant, key=b"k")
        try:
            a = plain.announce(request, address, now=0)
        except PeerConflictError:
            with pytest.raises(PeerConflictError):
                packed.announce_packed(request, address, now=0, ipv6=ipv6)
            continue
        b = packed.announce_packed(request, address, now=0, ipv6=ipv6)
        size = 18 if ipv6 else 6
        assert b.packed == b"".join(p[PACKED] for p in a.peers if len(p[PACKED]) == size)
        assert (a.complete, a.incomplete, a.unlisted) == (b.complete, b.incomplete, b.unlisted)
        assert b.peers == []


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


def test_max_torrents_refuses_only_when_nothing_can_be_evicted() -> None:
    swarm = make(max_torrents=2)
    for info_hash in (H1, H2):  # two swarms with two addresses each: no eviction candidate
        swarm.announce(req(1, info_hash=info_hash), "10.0.0.1", now=0)
        swarm.announce(req(2, info_hash=info_hash), "10.0.0.2", now=0)
    assert swarm.single_address_count == 0
    with pytest.raises(SwarmFullError, match=r"tracker is full \(2 torrents\)"):
        swarm.announce(req(1, info_hash=H3), "10.0.0.1", now=0)
    assert swarm.torrent_count == 2
    swarm.announce(req(3, info_hash=H1), "10.0.0.3", now=0)  # known torrents still work
    swarm.announce(req(1, info_hash=H2, event=Event.STOPPED), "10.0.0.1", now=0)
    # H2 is down to one address (10.0.0.2): now it can give way to a new torrent
    assert swarm.eviction_order() == [H2]
    outcome = swarm.announce(req(1, info_hash=H3), "10.0.0.1", now=1)
    assert (outcome.evicted, outcome.unlisted) == (1, None)
    assert swarm.scrape(H2) == ScrapeStats()
    assert swarm.scrape(H1).incomplete == 3  # the swarm with several addresses stays


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


# --- exhaustion: per-address caps, global peer cap, eviction (issue 8, item 8) ---------------


def ih(n: int) -> bytes:
    """An infohash per number (random-looking enough: the core does not care)."""
    return b"IH" + n.to_bytes(18, "big")


def recount(swarm: Swarm, hashes: list[bytes], addresses: list[str]) -> None:
    """Every per-address counter equals a count from scratch over the peers themselves."""
    torrents_of: dict[str, int] = {}
    single: set[bytes] = set()
    total = seeds = 0
    for info_hash in hashes:
        peers = swarm.peers_of(info_hash)
        per_address: dict[str, int] = {}
        for peer in peers:
            per_address[peer[IP]] = per_address.get(peer[IP], 0) + 1
        for ip in addresses:
            assert swarm.peers_from(info_hash, ip) == per_address.get(ip, 0)
        for ip in per_address:
            torrents_of[ip] = torrents_of.get(ip, 0) + 1
        if len(per_address) == 1:
            single.add(info_hash)
        stats = swarm.scrape(info_hash)
        assert stats.complete + stats.incomplete == len(peers)
        assert stats.complete == sum(1 for p in peers if not p[LEFT])
        total += len(peers)
        seeds += stats.complete
    for ip in addresses:
        assert swarm.torrents_of(ip) == torrents_of.get(ip, 0)
    assert swarm.address_count == len(torrents_of)
    assert set(swarm.eviction_order()) == single
    assert swarm.single_address_count == len(single)
    assert swarm.torrent_count == sum(1 for h in hashes if swarm.peers_of(h))
    assert (swarm.peer_count, swarm.seeder_count) == (total, seeds)


def test_per_address_peer_cap_answers_but_does_not_list() -> None:
    swarm = make(max_peers_per_address=2)
    swarm.announce(req(1), "10.0.0.1", now=0)
    swarm.announce(req(2), "10.0.0.1", now=0)
    swarm.announce(req(9), "10.0.0.9", now=0)
    outcome = swarm.announce(req(3, numwant=10), "10.0.0.1", now=1)
    assert outcome.unlisted is Unlisted.ADDRESS_PEERS
    assert outcome.full
    assert ids(outcome.peers) == {pid(1), pid(2), pid(9)}  # it still gets peers
    assert swarm.peers_from(H1, "10.0.0.1") == 2
    assert pid(3) not in ids(swarm.peers_of(H1))
    assert swarm.announce(req(1), "10.0.0.1", now=1).unlisted is None  # known peers are fine
    # the same address may have two peers in another torrent too
    assert swarm.announce(req(3, info_hash=H2), "10.0.0.1", now=1).unlisted is None
    # a stop frees a slot at once
    swarm.announce(req(2, event=Event.STOPPED), "10.0.0.1", now=2)
    assert swarm.announce(req(3), "10.0.0.1", now=2).unlisted is None
    recount(swarm, [H1, H2], ["10.0.0.1", "10.0.0.9"])


def test_per_address_torrent_cap() -> None:
    swarm = make(max_torrents_per_address=2, max_torrents=10)
    swarm.announce(req(1, info_hash=H1), "10.0.0.1", now=0)
    swarm.announce(req(2, info_hash=H1), "10.0.0.1", now=0)  # same torrent: still one
    swarm.announce(req(1, info_hash=H2), "10.0.0.1", now=0)
    swarm.announce(req(5, info_hash=H3), "10.0.0.5", now=0)
    assert swarm.torrents_of("10.0.0.1") == 2
    new = swarm.announce(req(1, info_hash=ih(1)), "10.0.0.1", now=1)
    assert (new.unlisted, new.peers, new.complete, new.incomplete) == (
        Unlisted.ADDRESS_TORRENTS,
        [],
        0,
        0,
    )
    assert swarm.torrent_count == 3  # the new infohash was not created
    joined = swarm.announce(req(1, info_hash=H3), "10.0.0.1", now=1)
    assert joined.unlisted is Unlisted.ADDRESS_TORRENTS
    assert ids(joined.peers) == {pid(5)}  # peers of a known torrent, without being listed
    assert swarm.peers_from(H3, "10.0.0.1") == 0
    # more peers in a torrent the address is already in do not count against the cap
    assert swarm.announce(req(3, info_hash=H2), "10.0.0.1", now=1).unlisted is None
    # expiry frees the address's torrents
    assert swarm.expire(now=101.5) == 5
    assert swarm.torrents_of("10.0.0.1") == 0
    assert swarm.announce(req(1, info_hash=ih(1)), "10.0.0.1", now=102).unlisted is None


def test_uncapped_networks_are_exempt_from_the_per_address_caps() -> None:
    swarm = make(
        max_peers_per_address=2,
        max_torrents_per_address=1,
        uncapped=[ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("fd00::/8")],
    )
    for n in range(5):
        assert swarm.announce(req(n, info_hash=ih(n)), "127.0.0.1", now=0).unlisted is None
        assert swarm.announce(req(n), "::ffff:127.0.0.2", now=0).unlisted is None  # mapped
        assert swarm.announce(req(10 + n), "fd00::7", now=0).unlisted is None
    assert swarm.torrents_of("127.0.0.1") == 5
    assert swarm.peers_from(H1, "fd00::7") == 5
    swarm.announce(req(20), "10.0.0.1", now=0)
    swarm.announce(req(21), "10.0.0.1", now=0)
    assert swarm.announce(req(22), "10.0.0.1", now=0).unlisted is Unlisted.ADDRESS_PEERS
    assert swarm.announce(req(23, info_hash=H2), "10.0.0.1", now=0).unlisted is (
        Unlisted.ADDRESS_TORRENTS
    )


def test_eviction_takes_the_least_recently_announced_single_address_torrent() -> None:
    swarm = make(max_torrents=4)
    swarm.announce(req(1, info_hash=ih(1)), "10.0.0.1", now=0)
    swarm.announce(req(2, info_hash=ih(2)), "10.0.0.2", now=1)
    swarm.announce(req(3, info_hash=ih(3)), "10.0.0.1", now=2)
    swarm.announce(req(4, info_hash=ih(4)), "10.0.0.4", now=3)
    swarm.announce(req(5, info_hash=ih(4)), "10.0.0.5", now=3)  # ih(4): two addresses
    assert swarm.eviction_order() == [ih(1), ih(2), ih(3)]
    swarm.announce(req(1, info_hash=ih(1)), "10.0.0.1", now=4)  # refreshed: to the back
    swarm.announce(req(6, info_hash=ih(3)), "10.0.0.1", now=4)  # a new peer, same address
    assert swarm.eviction_order() == [ih(2), ih(1), ih(3)]
    outcome = swarm.announce(req(7, info_hash=ih(7)), "10.0.0.7", now=5)
    assert (outcome.evicted, outcome.unlisted) == (1, None)
    assert swarm.peers_of(ih(2)) == []
    assert swarm.torrents_of("10.0.0.2") == 0
    assert swarm.eviction_order() == [ih(1), ih(3), ih(7)]
    # an eviction takes every peer of its torrent (ih(3) has two, both from 10.0.0.1)
    swarm.announce(req(8, info_hash=ih(8)), "10.0.0.8", now=6)  # evicts ih(1)
    swarm.announce(req(9, info_hash=ih(9)), "10.0.0.9", now=6)  # evicts ih(3)
    assert swarm.torrents_of("10.0.0.1") == 0
    assert swarm.peer_count == 5
    assert swarm.evicted_torrents == 3
    recount(swarm, [ih(n) for n in range(10)], [f"10.0.0.{n}" for n in range(10)])


def test_global_peer_cap_evicts_then_leaves_new_peers_unlisted() -> None:
    swarm = make(max_peers=5)
    for n in range(3):
        swarm.announce(req(n, info_hash=H1), f"10.0.0.{n}", now=0)
    swarm.announce(req(10, info_hash=H2), "10.0.0.10", now=1)
    swarm.announce(req(11, info_hash=H2), "10.0.0.10", now=1)  # H2: one address, 2 peers
    assert swarm.peer_count == 5
    outcome = swarm.announce(req(3, info_hash=H1), "10.0.0.3", now=2)
    assert (outcome.evicted, outcome.unlisted) == (1, None)  # H2 made room
    assert swarm.peer_count == 4
    swarm.announce(req(4, info_hash=H1), "10.0.0.4", now=2)
    full = swarm.announce(req(5, info_hash=H1, numwant=10), "10.0.0.5", now=3)
    assert full.unlisted is Unlisted.TRACKER_FULL
    assert len(full.peers) == 5  # it still gets peers
    with pytest.raises(SwarmFullError, match=r"5 peers"):
        swarm.announce(req(5, info_hash=H3), "10.0.0.5", now=3)
    assert swarm.peer_count == 5


def test_global_peer_cap_never_evicts_the_torrent_being_joined() -> None:
    swarm = make(max_peers=3)
    swarm.announce(req(1, info_hash=H1), "10.0.0.1", now=0)
    swarm.announce(req(2, info_hash=H1), "10.0.0.1", now=0)  # H1: one address
    swarm.announce(req(3, info_hash=H2), "10.0.0.3", now=1)  # H2: one address, newer
    outcome = swarm.announce(req(4, info_hash=H1), "10.0.0.4", now=2)
    # H1 is the least recently announced, but it is the one being joined: H2 goes
    assert (outcome.evicted, outcome.unlisted) == (1, None)
    assert ids(swarm.peers_of(H1)) == {pid(1), pid(2), pid(4)}
    assert swarm.peers_of(H2) == []
    assert swarm.announce(req(5, info_hash=H1), "10.0.0.5", now=3).unlisted is (
        Unlisted.TRACKER_FULL
    )


def test_a_peer_moving_with_its_key_moves_its_counts() -> None:
    swarm = make(max_peers_per_address=1)
    swarm.announce(req(1, key=b"k1"), "10.0.0.1", now=0)
    swarm.announce(req(2), "10.0.0.2", now=0)
    swarm.announce(req(3, info_hash=H2), "10.0.0.3", now=0)
    assert swarm.eviction_order() == [H2]
    swarm.announce(req(1, key=b"k1"), "10.0.0.11", now=1)
    assert (swarm.peers_from(H1, "10.0.0.1"), swarm.peers_from(H1, "10.0.0.11")) == (0, 1)
    assert (swarm.torrents_of("10.0.0.1"), swarm.torrents_of("10.0.0.11")) == (0, 1)
    # moving onto an address that is at its cap in this torrent: the stale entry goes
    outcome = swarm.announce(req(1, key=b"k1", numwant=10), "10.0.0.2", now=2)
    assert outcome.unlisted is Unlisted.ADDRESS_PEERS
    assert ids(swarm.peers_of(H1)) == {pid(2)}
    assert swarm.eviction_order() == [H2, H1]  # H1 is down to one address
    recount(swarm, [H1, H2], ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.11"])


def test_one_address_announcing_20000_infohashes_does_not_stop_a_new_blob() -> None:
    """The issue's goal, at the default caps and with a table smaller than the flood."""
    legit = [f"10.1.0.{n}" for n in range(1, 4)]
    for max_torrents in (100_000, 5_000):  # default table; a table the flood overfills
        swarm = make(
            max_torrents=max_torrents,
            max_peers=2_000_000,
            max_torrents_per_address=20_000,
            max_peers_per_address=8,
        )
        # a swarm that existed before the flood: peers on two nodes
        swarm.announce(req(1, info_hash=H1, left=0), legit[0], now=0)
        swarm.announce(req(2, info_hash=H1), legit[1], now=0)
        flood_rng = random.Random(max_torrents)
        unlisted = 0
        for n in range(20_000):
            outcome = swarm.announce(
                req(100, info_hash=flood_rng.randbytes(20)), "203.0.113.66", now=1 + n / 1000
            )
            unlisted += outcome.unlisted is not None
        assert unlisted == 0  # below its per-address cap, each was taken (or made room)
        assert swarm.torrents_of("203.0.113.66") == min(20_000, max_torrents - 1)
        # a new blob: the proxy seeds it, an agent on another node joins and finds it
        seeded = swarm.announce(req(1, info_hash=H2, left=0), legit[0], now=30)
        assert seeded.unlisted is None
        joined = swarm.announce(req(3, info_hash=H2), legit[2], now=31)
        assert joined.unlisted is None
        assert [(p[PEER_ID], p[IP]) for p in joined.peers] == [(pid(1), legit[0])]
        assert ids(swarm.announce(req(2, info_hash=H1), legit[1], now=31).peers) == {pid(1)}
        assert swarm.torrent_count <= max_torrents
        # the 20,001st torrent of the flooding address is not taken
        over = swarm.announce(req(100, info_hash=ih(1)), "203.0.113.66", now=32)
        expected = Unlisted.ADDRESS_TORRENTS if max_torrents > 20_000 else None
        assert over.unlisted is expected


def test_a_swarm_flooded_with_5000_fake_peers_still_lists_the_legitimate_ones() -> None:
    swarm = make(max_peers_per_torrent=5_000, max_peers_per_address=8, max_numwant=200)
    legit = {pid(n): f"10.1.0.{n}" for n in range(10)}
    for n, ip in enumerate(legit.values()):
        swarm.announce(req(n, left=0 if n < 2 else 50), ip, now=0)
    listed = 0
    for n in range(5_000):
        outcome = swarm.announce(req(1_000 + n), "203.0.113.66", now=1)
        listed += outcome.unlisted is None
        if outcome.unlisted is not None:
            assert outcome.unlisted is Unlisted.ADDRESS_PEERS
    assert listed == 8
    assert swarm.peers_from(H1, "203.0.113.66") == 8
    assert swarm.scrape(H1).incomplete == 8 + 8
    # a legitimate newcomer is listed and sees every legitimate peer
    newcomer = swarm.announce(req(50, numwant=200), "10.1.0.50", now=2)
    assert newcomer.unlisted is None
    assert set(legit) <= ids(newcomer.peers)
    assert pid(50) in ids(swarm.peers_of(H1))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 14),  # peer: three per address
            st.sampled_from([False, False, False, True]),  # from the next address instead
            st.integers(0, 4),  # infohash
            st.sampled_from([Event.NONE, Event.STARTED, Event.COMPLETED, Event.STOPPED]),
            st.integers(0, 1),  # left
            st.booleans(),  # with its key
            st.sampled_from([0] * 6 + [1, 1, 2, 5, 20, 45]),  # time step (peer expiry: 40)
        ),
        min_size=10,
        max_size=200,
    )
)
def test_per_address_counters_always_equal_a_recount(
    steps: list[tuple[int, bool, int, Event, int, bool, int]],
) -> None:
    """Announces, stops, moves, expiries and evictions in any order: every per-address
    counter equals a recount from scratch after every step, and every cap holds."""
    addresses = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "2001:db8::4", "127.0.0.1"]
    hashes = [ih(n) for n in range(5)]
    caps = {
        "max_torrents": 3,
        "max_peers": 7,
        "max_peers_per_torrent": 5,
        "max_torrents_per_address": 2,
        "max_peers_per_address": 2,
    }
    swarm = make(peer_expiry=40, uncapped=[ipaddress.ip_network("127.0.0.0/8")], **caps)
    now = 0
    for n, moved, h, event, left, keyed, step in steps:
        now += step
        swarm.expire(now)
        ip, info_hash = addresses[(n + moved) % 5], hashes[h]
        single_before = swarm.eviction_order()
        request = req(n, info_hash=info_hash, left=left, event=event, key=b"k" if keyed else None)
        try:
            outcome = swarm.announce(request, ip, now)
        except SwarmFullError:
            # refused only when no torrent could make room
            assert not single_before
            assert swarm.eviction_order() == []
        except PeerConflictError:
            pass
        else:
            mine = [p for p in swarm.peers_of(info_hash) if p[PEER_ID] == pid(n)]
            if event is Event.STOPPED or outcome.unlisted is not None:
                assert mine == []
            else:
                assert [p[IP] for p in mine] == [ip]
            if outcome.unlisted is Unlisted.TRACKER_FULL:
                assert set(single_before) <= {info_hash}
        recount(swarm, hashes, addresses)
        assert swarm.torrent_count <= caps["max_torrents"]
        assert swarm.peer_count <= caps["max_peers"]
        for capped in addresses[:4]:
            assert swarm.torrents_of(capped) <= caps["max_torrents_per_address"]
            for h2 in hashes:
                assert swarm.peers_from(h2, capped) <= caps["max_peers_per_address"]
    swarm.expire(now + 41)
    recount(swarm, hashes, addresses)
    assert (swarm.peer_count, swarm.torrent_count, swarm.address_count) == (0, 0, 0)


# --- batched seeds (POST /p2p/v1/announce-batch) ----------------------------------------------


def seeds(n: int, hashes: list[bytes], event: Event = Event.NONE) -> list[tuple[bytes, Event]]:
    return [(h, event) for h in hashes]


def test_a_batched_seed_expires_after_its_own_longer_expiry() -> None:
    """Per-peer expiry: peers announcing alone after ``peer_expiry``, batched seeds after
    ``seed_expiry``, in the same torrent."""
    swarm = make(peer_expiry=100, seed_expiry=1000)
    swarm.announce(req(1), "10.0.0.1", now=0)  # a leecher, alone
    swarm.announce_seeds(pid(2), 10002, seeds(2, [H1]), "10.0.0.2", now=0)
    assert swarm.batch_seed_count == 1
    assert swarm.peer_count == 2
    assert swarm.expire(now=101) == 1  # the leecher
    assert ids(swarm.peers_of(H1)) == {pid(2)}
    assert not swarm.expiry_due(now=999)
    assert swarm.expire(now=999) == 0
    assert swarm.expiry_due(now=1001)
    assert swarm.expire(now=1001) == 1
    assert swarm.torrent_count == 0
    assert (swarm.peer_count, swarm.batch_seed_count, swarm.seeder_count) == (0, 0, 0)


def test_a_batch_refreshes_its_seeds_and_older_batches_expire_nothing_then() -> None:
    swarm = make(seed_expiry=1000)
    swarm.announce_seeds(pid(1), 10001, seeds(1, [H1, H2, H3], Event.STARTED), "10.0.0.1", now=0)
    swarm.announce_seeds(pid(1), 10001, seeds(1, [H1, H2]), "10.0.0.1", now=600)
    assert swarm.expire(now=1001) == 1  # H3, not announced since 0
    assert swarm.peers_of(H3) == []
    assert {h for h in (H1, H2) if swarm.peers_of(h)} == {H1, H2}
    assert swarm.expire(now=1601) == 2
    assert swarm.peer_count == 0


def test_expiring_batches_works_in_bounded_steps() -> None:
    swarm = make(seed_expiry=10, max_torrents=100, max_torrents_per_address=100)
    hashes = [ih(n) for n in range(25)]
    swarm.announce_seeds(pid(1), 10001, seeds(1, hashes), "10.0.0.1", now=0)
    swarm.announce_seeds(pid(1), 10001, seeds(1, hashes[:10]), "10.0.0.1", now=5)
    # the first batch: 25 entries to look at, 15 of them expired
    assert swarm.expire(now=11, limit=10) == 0  # looked at the 10 refreshed ones
    assert swarm.expiry_due(now=11)
    assert swarm.expire(now=11, limit=10) == 10
    assert swarm.expire(now=11, limit=10) == 5
    assert not swarm.expiry_due(now=11)
    assert swarm.peer_count == 10
    assert swarm.expire(now=16) == 10


def test_seeds_move_between_announcing_alone_and_in_batches() -> None:
    swarm = make(peer_expiry=100, seed_expiry=1000)
    swarm.announce(req(1, left=100, event=Event.STARTED), "10.0.0.1", now=0)  # downloading
    outcome = swarm.announce_seeds(pid(1), 10001, seeds(1, [H1], Event.COMPLETED), "10.0.0.1", 50)
    assert outcome.events == {Event.COMPLETED: 1}
    assert swarm.scrape(H1) == ScrapeStats(complete=1, downloaded=1, incomplete=0)
    assert swarm.batch_seed_count == 1
    assert swarm.expire(now=500) == 0  # beyond peer_expiry: it is a batched seed now
    # it announces alone again (a restart without batches): peer_expiry again
    swarm.announce(req(1, left=0), "10.0.0.1", now=600)
    assert swarm.batch_seed_count == 0
    assert swarm.peer_count == 1
    swarm.announce(req(1, left=0), "10.0.0.1", now=1000)
    assert swarm.expire(now=1060) == 0  # the batch of 50 expired; the peer is not batched
    assert swarm.expire(now=1101) == 1


def test_a_leecher_gets_the_batched_seeds_and_a_batch_gets_leechers_only() -> None:
    swarm = make()
    for n in range(5):
        swarm.announce_seeds(pid(n), 10000 + n, seeds(n, [H1, H2]), f"10.0.0.{n}", now=0)
    leecher = swarm.announce(req(10, numwant=20), "10.0.1.10", now=1)
    assert ids(leecher.peers) == {pid(n) for n in range(5)}
    # a seed asking for peers gets the leecher of H1, nothing for H2 (nobody downloads it)
    out = swarm.announce_seeds(pid(0), 10000, seeds(0, [H1, H2]), "10.0.0.0", now=2, numwant=5)
    assert out.peers4 == {H1: b"\x0a\x00\x01\x0a" + (10010).to_bytes(2, "big")}
    assert out.peers6 == {}
    none = swarm.announce_seeds(pid(0), 10000, seeds(0, [H1]), "10.0.0.0", now=3)
    assert none.peers4 == {}  # numwant 0: seeds wait for leechers


def test_a_batch_is_held_to_the_per_address_caps() -> None:
    swarm = make(max_torrents_per_address=3, max_peers_per_address=2, max_torrents=50)
    hashes = [ih(n) for n in range(5)]
    out = swarm.announce_seeds(pid(1), 10001, seeds(1, hashes), "10.0.0.1", now=0)
    assert out.unlisted == {Unlisted.ADDRESS_TORRENTS: 2}
    assert swarm.torrents_of("10.0.0.1") == 3
    # more peer ids from the same address in one swarm: two at most
    for n in (2, 3):
        out = swarm.announce_seeds(pid(n), 10000 + n, seeds(n, hashes[:1]), "10.0.0.1", now=0)
    assert out.unlisted == {Unlisted.ADDRESS_PEERS: 1}
    assert swarm.peers_from(hashes[0], "10.0.0.1") == 2
    recount(swarm, hashes, ["10.0.0.1"])


def test_a_batch_entry_refused_costs_only_itself() -> None:
    swarm = make(max_torrents=2, max_batch_seeds=100)
    for h in (H1, H2):  # two swarms of two addresses: nothing to evict
        swarm.announce(req(8, info_hash=h), "10.0.0.8", now=0)
        swarm.announce(req(9, info_hash=h), "10.0.0.9", now=0)
    swarm.announce(req(1, info_hash=H1, key=b"k"), "10.0.0.1", now=0)
    out = swarm.announce_seeds(pid(1), 10001, seeds(1, [H1, H2, H3]), "10.0.0.2", now=1)
    assert out.failed[H1][0] == "conflict"  # pid(1) is 10.0.0.1's, and no key
    assert out.failed[H3][0] == "tracker_full"
    assert H2 not in out.failed
    assert pid(1) in ids(swarm.peers_of(H2))
    # with the key, the entry moves to the new address
    out = swarm.announce_seeds(pid(1), 10001, seeds(1, [H1]), "10.0.0.2", now=2, key=b"k")
    assert out.failed == {}
    assert [p[IP] for p in swarm.peers_of(H1) if p[PEER_ID] == pid(1)] == ["10.0.0.2"]


def test_max_batch_seeds_evicts_then_leaves_seeds_unlisted() -> None:
    swarm = make(max_batch_seeds=3, max_torrents=10)
    swarm.announce_seeds(pid(1), 10001, seeds(1, [ih(1), ih(2)]), "10.0.0.1", now=0)
    # a two-address swarm that cannot be evicted
    swarm.announce_seeds(pid(2), 10002, seeds(2, [ih(3)]), "10.0.0.2", now=1)
    swarm.announce(req(3, info_hash=ih(3)), "10.0.0.3", now=1)
    out = swarm.announce_seeds(pid(4), 10004, seeds(4, [ih(3), ih(4)]), "10.0.0.4", now=2)
    assert out.evicted == 2  # ih(1), then ih(2): single-address torrents, oldest first
    assert swarm.batch_seed_count == 3
    assert swarm.peers_of(ih(1)) == []
    out = swarm.announce_seeds(pid(5), 10005, seeds(5, [ih(3)]), "10.0.0.5", now=3)
    assert out.unlisted == {Unlisted.TRACKER_FULL: 1} or out.evicted == 1
    assert swarm.batch_seed_count <= 3


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 8),  # peer: three per address
            st.booleans(),  # in a batch (else alone)
            st.lists(st.integers(0, 4), min_size=1, max_size=4, unique=True),  # infohashes
            st.sampled_from([Event.NONE, Event.STARTED, Event.COMPLETED, Event.STOPPED]),
            st.integers(0, 1),  # left (alone only)
            st.sampled_from([0] * 4 + [1, 5, 20, 45, 150]),  # time step
        ),
        min_size=5,
        max_size=120,
    )
)
def test_batches_and_single_announces_keep_every_counter_exact(
    steps: list[tuple[int, bool, list[int], Event, int, int]],
) -> None:
    """Batches, single announces, stops, mode changes and both expiries in any order: the
    counters equal a recount after every step, batched seeds outlive ``peer_expiry`` and
    every peer is gone after both expiries."""
    addresses = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    hashes = [ih(n) for n in range(5)]
    swarm = make(
        peer_expiry=40,
        seed_expiry=200,
        max_torrents=4,
        max_peers=9,
        max_batch_seeds=8,
        max_peers_per_torrent=5,
        max_torrents_per_address=4,
        max_peers_per_address=2,
    )
    now = 0
    for n, batched, which, event, left, step in steps:
        now += step
        swarm.expire(now, limit=3)
        while swarm.expiry_due(now):
            swarm.expire(now, limit=3)
        ip = addresses[n % 3]
        if batched:
            out = swarm.announce_seeds(
                pid(n), 10000 + n, [(hashes[h], event) for h in which], ip, now
            )
            for h in which:
                mine = [p for p in swarm.peers_of(hashes[h]) if p[PEER_ID] == pid(n)]
                if event is Event.STOPPED or hashes[h] in out.failed:
                    assert mine == [] or hashes[h] in out.failed
                elif mine:  # a peer that announced alone stays so at the cap
                    if Unlisted.TRACKER_FULL not in out.unlisted:
                        assert swarm.seen_of(hashes[h], pid(n)) == now
                    assert mine[0][LEFT] == 0
        else:
            with contextlib.suppress(SwarmFullError, PeerConflictError):
                swarm.announce(req(n, info_hash=hashes[which[0]], left=left, event=event), ip, now)
        recount(swarm, hashes, addresses)
        for torrent in swarm._torrents.values():
            assert len(torrent.seen) == len(torrent.seeds)
        batched_now = sum(1 for h in hashes for p in swarm.peers_of(h) if p[SEEN] is not None)
        assert swarm.batch_seed_count == batched_now <= 8
        assert swarm.peer_count - batched_now <= 9
        assert swarm.torrent_count <= 4
    swarm.expire(now + 41)
    assert swarm.batch_seed_count == swarm.peer_count  # only batched seeds outlive peerExpiry
    swarm.expire(now + 201)
    recount(swarm, hashes, addresses)
    assert (swarm.peer_count, swarm.torrent_count, swarm.address_count) == (0, 0, 0)
