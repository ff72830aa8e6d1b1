"""The connection shell's HAVE flush: straight into the socket while the writer is parked,
through the writer (after whatever the socket did not take) otherwise."""

from __future__ import annotations

import trio
import trio.testing

from p2p_common import wire
from p2p_common.engine.connection import Connection
from p2p_common.engine.flusher import Flusher
from p2p_common.ratelimit import RateLimiter
from p2p_common.session import PieceReady
from p2p_common.storage import PieceStore
from tests.engine_helpers import make_content, metainfo_for
from tests.sessionpair import Node, Pair

PIECE = 256 * 1024


class FakeTransport:
    """Records what was written, and how: ``send_now`` takes at most ``room`` bytes."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.now: list[bytes] = []
        self.later: list[bytes] = []

    async def recv_into(self, buffer: memoryview, want: int = 1) -> int:
        await trio.sleep_forever()
        return 0  # pragma: no cover

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.later.append(bytes(data))

    def send_now(self, data: bytes) -> int:
        taken = data[: self.room]
        if taken:
            self.now.append(taken)
        return len(taken)

    async def send_block(self, header: bytes, store: PieceStore, offset: int, length: int) -> None:
        raise AssertionError("no block is due in these tests")

    async def aclose(self) -> None:
        pass


async def _verify(ready: PieceReady) -> None:
    raise AssertionError("nothing is received in these tests")


async def _parked_connection(nursery: trio.Nursery, room: int) -> tuple[Connection, FakeTransport]:
    content = make_content(4 * PIECE)
    meta = metainfo_for(content, piece_length=PIECE)
    leech = Node.make("leech", meta)
    other = Node.make("other", meta)
    pair = Pair(leech, other)
    session = pair.a
    session.take_output(0.0)  # the opening messages: not what these tests are about
    transport = FakeTransport(room)
    connection = Connection(
        session,
        transport,
        wire.PeerProtocol(),
        store=leech.store,
        verify=_verify,
        download_limiter=RateLimiter(),
        upload_limiter=RateLimiter(),
        uploaded=lambda n: None,
        flusher=Flusher(),
    )
    nursery.start_soon(connection._writer)
    await trio.testing.wait_all_tasks_blocked()
    assert connection._parked
    return connection, transport


async def test_a_parked_writer_is_not_woken_for_haves(nursery: trio.Nursery) -> None:
    connection, transport = await _parked_connection(nursery, room=1 << 20)
    session = connection.session
    session.send(wire.encode_have(1), urgent=False)
    session.send(wire.encode_have(2), urgent=False)
    connection.flush()
    # written before any checkpoint: no task switch was needed
    assert transport.now == [wire.encode_have(1) + wire.encode_have(2)]
    assert not session.has_output
    await trio.testing.wait_all_tasks_blocked()
    assert transport.later == []
    assert connection._parked


async def test_what_the_socket_does_not_take_goes_first_through_the_writer(
    nursery: trio.Nursery,
) -> None:
    connection, transport = await _parked_connection(nursery, room=5)
    session = connection.session
    session.send(wire.encode_have(1), urgent=False)
    connection.flush()
    assert transport.now == [wire.encode_have(1)[:5]]
    session.send(wire.encode_have(3), urgent=False)  # queued before the writer ran
    await trio.testing.wait_all_tasks_blocked()
    # the rest of the first HAVE left before the second: the stream is whole and in order
    assert transport.later == [wire.encode_have(1)[5:], wire.encode_have(3)]
    assert connection._parked


async def test_a_flush_before_the_woken_writer_ran_leaves_the_rest_first(
    nursery: trio.Nursery,
) -> None:
    connection, transport = await _parked_connection(nursery, room=5)
    session = connection.session
    session.send(wire.encode_have(1), urgent=False)
    connection.flush()  # partial: the writer is woken to send the rest
    session.send(wire.encode_have(3), urgent=False)
    connection.flush()  # again, before the writer ran: nothing may jump ahead of the rest
    assert transport.now == [wire.encode_have(1)[:5]]
    await trio.testing.wait_all_tasks_blocked()
    assert b"".join(transport.now + transport.later) == wire.encode_have(1) + wire.encode_have(3)


async def test_a_busy_writer_gets_the_haves(nursery: trio.Nursery) -> None:
    connection, transport = await _parked_connection(nursery, room=1 << 20)
    session = connection.session
    connection._parked = False  # as if inside a send
    session.send(wire.encode_have(2), urgent=False)
    connection.flush()
    assert transport.now == []
    connection._parked = True
    await trio.testing.wait_all_tasks_blocked()
    assert transport.later == [wire.encode_have(2)]
