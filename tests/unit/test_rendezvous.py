"""Rendezvous hashing (p2p_common.rendezvous): agreement, minimal disruption, balance."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common.rendezvous import rank

PROXIES = [f"http://proxy-{i}.p2p.svc:5000" for i in range(6)]
KEYS = [hashlib.sha256(str(i).encode()).digest() for i in range(3000)]


def test_rank_is_deterministic_and_ignores_input_order_and_duplicates() -> None:
    shuffled = PROXIES[::-1] + PROXIES[:2]
    random.Random(0).shuffle(shuffled)
    for key in KEYS[:200]:
        expected = rank(key, PROXIES)
        assert sorted(expected) == sorted(PROXIES)
        assert rank(key, iter(shuffled)) == expected
        assert rank(key, PROXIES) == expected


def test_rank_of_no_candidates_is_empty() -> None:
    assert rank(b"key", []) == []


def test_another_process_with_another_hash_seed_ranks_the_same() -> None:
    keys = [k.hex() for k in KEYS[:50]]
    script = (
        "import json, sys\n"
        "from p2p_common.rendezvous import rank\n"
        "keys, candidates = json.load(sys.stdin)\n"
        "print(json.dumps([rank(bytes.fromhex(k), candidates) for k in keys]))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([keys, PROXIES]),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    assert json.loads(result.stdout) == [rank(bytes.fromhex(k), PROXIES) for k in keys]


def test_removing_a_candidate_moves_only_the_keys_it_ranked_first() -> None:
    gone = PROXIES[2]
    rest = [p for p in PROXIES if p != gone]
    moved = 0
    for key in KEYS:
        before = rank(key, PROXIES)
        after = rank(key, rest)
        assert after == [p for p in before if p != gone]  # nobody else changes places
        if before[0] == gone:
            moved += 1
            assert after[0] == before[1]
        else:
            assert after[0] == before[0]
    assert 0 < moved < len(KEYS) // 3


def test_adding_a_candidate_takes_only_the_keys_it_now_ranks_first() -> None:
    newcomer = "http://proxy-new.p2p.svc:5000"
    for key in KEYS[:1000]:
        before = rank(key, PROXIES)
        after = rank(key, [*PROXIES, newcomer])
        assert [p for p in after if p != newcomer] == before
        assert after[0] in (before[0], newcomer)


def test_keys_spread_roughly_evenly_over_candidates() -> None:
    firsts = Counter(rank(key, PROXIES)[0] for key in KEYS)
    expected = len(KEYS) / len(PROXIES)  # 500; the standard deviation is about 20
    assert set(firsts) == set(PROXIES)
    assert all(0.75 * expected <= n <= 1.25 * expected for n in firsts.values())


def test_two_candidates_with_similar_names_split_the_keys_about_evenly() -> None:
    names = ["tracker-a", "tracker-b"]
    wins = Counter(rank(key, names)[0] for key in KEYS)
    assert 0.4 * len(KEYS) <= wins["tracker-a"] <= 0.6 * len(KEYS)


@settings(max_examples=100, deadline=None)
@given(
    st.binary(max_size=40),
    st.lists(st.text(max_size=12), min_size=1, max_size=8, unique=True),
    st.data(),
)
def test_any_removal_keeps_the_relative_order_of_the_others(
    key: bytes, candidates: list[str], data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(candidates))
    before = rank(key, candidates)
    assert rank(key, [c for c in candidates if c != gone]) == [c for c in before if c != gone]
