"""``collapse``: one verdict for a nursery's group of p2p errors, cancellations left out."""

from __future__ import annotations

import pytest
import trio

from p2p_common.engine.transport import PeerGoneError
from p2p_common.errors import LocalError, ProtocolError, collapse


async def failing_while_cancelled(error: BaseException) -> BaseExceptionGroup[BaseException]:
    """The group a connection's nursery raises when we close it (cancel its scope) while its
    reader fails on its own: one task cancelled, the other with ``error``."""
    with trio.CancelScope() as scope:
        try:
            async with trio.open_nursery() as nursery:

                async def writer() -> None:
                    await trio.sleep_forever()

                async def reader() -> None:
                    await trio.lowlevel.checkpoint()
                    scope.cancel()  # close() from elsewhere ...
                    raise error  # ... as the peer hangs up

                nursery.start_soon(writer)
                nursery.start_soon(reader)
        except BaseExceptionGroup as group:
            return group
    raise AssertionError("no group")


async def test_a_peer_gone_while_we_close_is_the_verdict_not_a_group() -> None:
    group = await failing_while_cancelled(PeerGoneError("connection closed by peer"))
    assert any(isinstance(e, trio.Cancelled) for e in group.exceptions)
    # Left in, the group is returned unchanged: no `except RemoteError` would catch it.
    assert collapse(group) is group
    verdict = collapse(group, dropping=(trio.Cancelled,))
    assert isinstance(verdict, PeerGoneError)


def test_only_dropped_leaves_stay_a_group_for_the_cancel_scope_to_handle() -> None:
    class Stop(BaseException):
        pass

    group = BaseExceptionGroup("x", [Stop(), Stop()])
    assert collapse(group, dropping=(Stop,)) is group


async def test_a_bug_beside_a_cancellation_is_never_hidden() -> None:
    group = await failing_while_cancelled(KeyError("bug"))
    result = collapse(group, dropping=(trio.Cancelled,))
    assert isinstance(result, BaseExceptionGroup)


def test_local_beats_protocol_beats_gone() -> None:
    group = BaseExceptionGroup(
        "x", [PeerGoneError("gone"), ProtocolError("bad"), LocalError("disk")]
    )
    assert isinstance(collapse(group), LocalError)
    group = BaseExceptionGroup("x", [PeerGoneError("gone"), ProtocolError("bad")])
    assert isinstance(collapse(group), ProtocolError)


@pytest.mark.parametrize("leaf", [PeerGoneError("gone"), ProtocolError("bad")])
def test_a_single_leaf_is_itself(leaf: Exception) -> None:
    assert collapse(BaseExceptionGroup("x", [leaf])) is leaf
