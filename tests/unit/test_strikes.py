"""Addresses whose peers keep breaking the protocol are held back for a while
(p2p_common.engine.shared.Strikes)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2p_common.engine.shared import Strikes


def test_an_address_over_its_allowance_is_refused_until_it_comes_back() -> None:
    strikes = Strikes(burst=5, rate=1 / 12)
    for _ in range(5):
        strikes.strike("10.0.0.1", now=0.0)
    assert not strikes.refused("10.0.0.1", 0.0)  # five drops in a row are tolerated
    strikes.strike("10.0.0.1", now=0.0)
    assert strikes.refused("10.0.0.1", 0.0)
    assert not strikes.refused("10.0.0.2", 0.0)  # others are not affected
    assert strikes.refused("10.0.0.1", 11.9)
    assert not strikes.refused("10.0.0.1", 12.1)  # one strike's worth came back
    strikes.expire(72.1)
    assert len(strikes) == 0


def test_the_table_is_bounded_and_drops_the_least_recently_struck() -> None:
    strikes = Strikes(burst=0, max_addresses=3)
    for n in range(5):
        strikes.strike(f"10.0.0.{n}", now=0.0)
    assert len(strikes) == 3
    assert not strikes.refused("10.0.0.0", 0.0)
    assert strikes.refused("10.0.0.4", 0.0)


@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 5)), max_size=60))
def test_refusal_follows_the_leaky_bucket(events: list[tuple[int, float]]) -> None:
    strikes = Strikes(burst=2, rate=0.5)
    level = {h: 0.0 for h in range(4)}
    last = {h: 0.0 for h in range(4)}
    now = 0.0
    for host, step in events:
        now += step
        for h, value in level.items():  # the model: drain everyone to now
            level[h] = max(0.0, value - (now - last[h]) * 0.5)
            last[h] = now
        strikes.strike(f"h{host}", now)
        level[host] += 1.0
        for h, value in level.items():
            if abs(value - 2) > 1e-6:  # away from the boundary, where rounding decides
                assert strikes.refused(f"h{h}", now) == (value > 2)
