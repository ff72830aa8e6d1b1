"""The choker (p2p_common.choker): cooperative peers, tit-for-tat, optimistic and seed rotation."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from p2p_common.choker import Choker, PeerStats


def coop(key: str, rate: float = 0.0, *, interested: bool = True) -> PeerStats:
    return PeerStats(key, interested=interested, cooperative=True, download_rate=rate)


def foreign(
    key: str, rate: float = 0.0, *, interested: bool = True, snubbed: bool = False
) -> PeerStats:
    return PeerStats(
        key, interested=interested, cooperative=False, download_rate=rate, snubbed=snubbed
    )


def foreigners(count: int) -> list[PeerStats]:
    """f0 .. f{count-1}; fN uploads to us at N bytes/s."""
    return [foreign(f"f{i}", float(i)) for i in range(count)]


# --- cooperative peers ---------------------------------------------------------------------------


@pytest.mark.parametrize("seeding", [False, True])
def test_every_interested_cooperative_peer_is_unchoked_whatever_its_rate(seeding: bool) -> None:
    choker = Choker(regular_slots=2, rng=random.Random(0))
    peers = [coop(f"c{i}", rate) for i, rate in enumerate([0.0, 1e9, 5.0, 0.0, 3.0, 0.0])]
    assert choker.decide(peers, seeding=seeding, now=0.0) == {f"c{i}" for i in range(6)}


def test_uninterested_peers_are_never_unchoked() -> None:
    choker = Choker(rng=random.Random(0))
    peers = [coop("c", interested=False), foreign("f", 100.0, interested=False), coop("d")]
    assert choker.decide(peers, seeding=False, now=0.0) == {"d"}
    assert choker.decide(peers, seeding=True, now=100.0) == {"d"}


def test_cooperative_peers_are_capped_at_max_cooperative() -> None:
    choker = Choker(max_cooperative=3, rng=random.Random(0))
    unchoked = choker.decide([coop(f"c{i}") for i in range(10)], seeding=False, now=0.0)
    assert len(unchoked) == 3


def test_cooperative_peers_do_not_take_foreign_slots() -> None:
    choker = Choker(regular_slots=2, rng=random.Random(0))
    peers = [coop(f"c{i}") for i in range(5)] + foreigners(6)
    unchoked = choker.decide(peers, seeding=False, now=0.0)
    assert {f"c{i}" for i in range(5)} <= unchoked
    assert len(unchoked - {f"c{i}" for i in range(5)}) == 3  # 2 regular + 1 optimistic


# --- foreign peers: tit-for-tat ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_fastest_foreign_uploaders_get_the_regular_slots_plus_one_optimistic(seed: int) -> None:
    choker = Choker(regular_slots=4, rng=random.Random(seed))
    peers = foreigners(8)
    random.Random(seed).shuffle(peers)
    unchoked = choker.decide(peers, seeding=False, now=0.0)
    assert {"f7", "f6", "f5", "f4"} <= unchoked
    optimistic = unchoked - {"f7", "f6", "f5", "f4"}
    assert len(optimistic) == 1
    assert optimistic <= {"f0", "f1", "f2", "f3"}


def test_snubbed_peers_get_no_regular_slot() -> None:
    choker = Choker(regular_slots=1, rng=random.Random(0))
    peers = [foreign("fast", 1000.0, snubbed=True), foreign("slow", 1.0)]
    unchoked = choker.decide(peers, seeding=False, now=0.0)
    assert "slow" in unchoked  # the regular slot; "fast" can at most be the optimistic one
    assert unchoked == {"slow", "fast"}


def test_fewer_foreign_peers_than_slots_are_all_unchoked() -> None:
    choker = Choker(regular_slots=4, rng=random.Random(0))
    assert choker.decide(foreigners(3), seeding=False, now=0.0) == {"f0", "f1", "f2"}


def test_regular_slots_are_reranked_only_every_rechoke_interval() -> None:
    choker = Choker(
        regular_slots=2, rechoke_interval=10.0, optimistic_interval=1000.0, rng=random.Random(0)
    )
    before = [foreign("a", 100.0), foreign("b", 90.0), foreign("c", 1.0), foreign("d", 2.0)]
    first = choker.decide(before, seeding=False, now=0.0)
    assert {"a", "b"} <= first
    after = [foreign("a", 1.0), foreign("b", 2.0), foreign("c", 100.0), foreign("d", 90.0)]
    assert choker.decide(after, seeding=False, now=9.9) == first
    rechoked = choker.decide(after, seeding=False, now=10.0)
    assert {"c", "d"} <= rechoked
    assert len(rechoked) == 3


@pytest.mark.parametrize("seed", range(3))
def test_an_optimistic_peer_that_earns_a_regular_slot_frees_the_optimistic_slot(seed: int) -> None:
    choker = Choker(
        regular_slots=1, rechoke_interval=10.0, optimistic_interval=1000.0, rng=random.Random(seed)
    )
    peers = [foreign("a", 100.0), *(foreign(k, 0.0) for k in "bcde")]
    [lucky] = choker.decide(peers, seeding=False, now=0.0) - {"a"}
    # The optimistic peer reciprocates and becomes the fastest uploader.
    peers = [foreign(str(p.key), 1000.0 if p.key == lucky else p.download_rate) for p in peers]
    unchoked = choker.decide(peers, seeding=False, now=10.0)
    assert lucky in unchoked
    assert len(unchoked) == 2  # still one regular plus one optimistic


def test_a_regular_peer_that_leaves_loses_its_slot_at_once() -> None:
    choker = Choker(regular_slots=2, optimistic_interval=1000.0, rng=random.Random(0))
    peers = foreigners(5)
    assert {"f4", "f3"} <= choker.decide(peers, seeding=False, now=0.0)
    assert "f4" not in choker.decide(peers[:4], seeding=False, now=1.0)


@pytest.mark.parametrize("seed", range(3))
def test_optimistic_unchoke_holds_for_an_interval_then_rotates(seed: int) -> None:
    choker = Choker(
        regular_slots=1, rechoke_interval=10.0, optimistic_interval=30.0, rng=random.Random(seed)
    )
    peers = foreigners(12)

    def optimistic(now: float) -> str:
        [extra] = choker.decide(peers, seeding=False, now=now) - {"f11"}
        assert extra != "f11"
        return str(extra)

    chosen = []
    for start in range(0, 300, 30):
        first = optimistic(float(start))
        assert all(optimistic(start + dt) == first for dt in (1.0, 10.0, 29.0))
        chosen.append(first)
    assert len(set(chosen)) > 1


def test_the_optimistic_peer_is_replaced_at_once_when_it_leaves() -> None:
    choker = Choker(regular_slots=1, optimistic_interval=1000.0, rng=random.Random(0))
    peers = foreigners(6)
    [first] = choker.decide(peers, seeding=False, now=0.0) - {"f5"}
    rest = [p for p in peers if p.key != first]
    unchoked = choker.decide(rest, seeding=False, now=1.0)
    assert first not in unchoked
    assert len(unchoked) == 2


def test_forget_drops_a_peer_and_a_new_optimistic_is_chosen() -> None:
    choker = Choker(regular_slots=1, optimistic_interval=1000.0, rng=random.Random(0))
    peers = foreigners(6)
    [first] = choker.decide(peers, seeding=False, now=0.0) - {"f5"}
    choker.forget(first)
    choker.forget("never-seen")  # harmless
    rest = [p for p in peers if p.key != first]
    unchoked = choker.decide(rest, seeding=False, now=1.0)
    assert len(unchoked) == 2
    assert "f5" in unchoked


# --- seeding: round-robin slots ------------------------------------------------------------------


def test_seed_rotation_gives_every_waiting_peer_a_turn() -> None:
    choker = Choker(regular_slots=2, seed_slot_time=30.0, rng=random.Random(0))
    peers = foreigners(10)
    served: Counter[str] = Counter()
    for now in range(0, 600):
        unchoked = choker.decide(peers, seeding=True, now=float(now))
        assert len(unchoked) == 3  # regular_slots + 1
        served.update(str(k) for k in unchoked)
    assert set(served) == {f"f{i}" for i in range(10)}
    # 600 s x 3 slots shared by 10 peers: about 180 s each; no peer is starved or hogs.
    assert min(served.values()) >= 120
    assert max(served.values()) <= 240


def test_seed_slots_last_seed_slot_time_and_ignore_upload_rates() -> None:
    choker = Choker(regular_slots=0, seed_slot_time=30.0, rng=random.Random(0))
    peers = [foreign("fast", 1e9), foreign("slow", 1.0)]
    [holder] = choker.decide(peers, seeding=True, now=0.0)
    for now in (1.0, 15.0, 29.0):
        assert choker.decide(peers, seeding=True, now=now) == {holder}
    [other] = {"fast", "slow"} - {holder}
    assert choker.decide(peers, seeding=True, now=30.0) == {other}


def test_a_forgotten_peer_returning_to_a_seed_waits_like_a_newcomer() -> None:
    choker = Choker(regular_slots=0, seed_slot_time=10.0, rng=random.Random(0))
    peers = [foreign("a"), foreign("b"), foreign("c")]
    order = [str(*choker.decide(peers, seeding=True, now=t)) for t in (0.0, 10.0, 20.0)]
    assert sorted(order) == ["a", "b", "c"]
    choker.forget(order[0])
    # The forgotten peer now looks never served, so it goes before the other two.
    assert choker.decide(peers, seeding=True, now=30.0) == {order[0]}
