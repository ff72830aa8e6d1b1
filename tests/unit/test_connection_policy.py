"""How a torrent shares ``max_peers`` between the peers it dials and the peers that dial it
(``p2p_common.engine.shared``; docs/scale.md, findings 1 and 10)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2p_common.engine.shared import admits_incoming, may_dial, short_of_peers


def test_a_download_dials_half_and_takes_the_other_half_from_peers_dialling_it() -> None:
    assert may_dial(24, 24, 50)
    assert not may_dial(25, 25, 50)
    assert admits_incoming(24, 24, 50)
    assert not admits_incoming(25, 25, 50)
    # the halves add up to max_peers: 25 dialled + 25 incoming
    assert admits_incoming(24, 49, 50)
    assert not admits_incoming(25, 50, 50)


def test_the_first_nodes_of_a_rollout_keep_room_for_the_peers_they_learn_of_later() -> None:
    """A node that announced first knew nobody to dial, and every later node dials it: it
    stops taking them at half, so it can still dial the nodes that announced after it."""
    assert not admits_incoming(25, 25, 50)
    assert may_dial(0, 25, 50)
    assert short_of_peers(0, 25, 50, known=3)


def test_a_seed_takes_up_to_max_peers_from_peers_dialling_it() -> None:
    assert admits_incoming(49, 49, 50, dials=False)
    assert not admits_incoming(50, 50, 50, dials=False)


def test_a_torrent_limited_to_one_peer_still_takes_one() -> None:
    assert admits_incoming(0, 0, 1)
    assert not admits_incoming(1, 1, 1)
    assert may_dial(0, 0, 1)


def test_a_download_with_its_half_dialled_or_enough_peers_known_is_not_short_of_peers() -> None:
    assert not short_of_peers(25, 30, 50, known=10)
    assert not short_of_peers(10, 50, 50, known=10)  # full
    assert short_of_peers(24, 30, 50, known=49)
    # it heard of max_peers peers: it has enough to dial, the tracker is spared the announces
    assert not short_of_peers(10, 30, 50, known=50)


@given(
    max_peers=st.integers(1, 500),
    events=st.lists(st.sampled_from(["dial", "incoming"]), max_size=1200),
    dials=st.booleans(),
)
def test_the_two_halves_never_exceed_max_peers(
    max_peers: int, events: list[str], dials: bool
) -> None:
    """Whatever the order in which dials and incoming connections come, a torrent never holds
    more than ``max_peers``; a download never more than half-and-half; and with both sides
    saturated, every slot is used."""
    outgoing = incoming = 0
    for kind in events:
        if kind == "dial" and dials and may_dial(outgoing, outgoing + incoming, max_peers):
            outgoing += 1
        elif kind == "incoming" and admits_incoming(
            incoming, outgoing + incoming, max_peers, dials=dials
        ):
            incoming += 1
        assert outgoing + incoming <= max_peers
        if dials:
            assert outgoing <= max(1, max_peers // 2)
            assert incoming <= max(1, max_peers - max_peers // 2)
    if dials and events.count("dial") >= max_peers and events.count("incoming") >= max_peers:
        assert outgoing + incoming == max_peers
