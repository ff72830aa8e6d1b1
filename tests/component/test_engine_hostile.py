"""The peer engine against hostile peers on real sockets: every attack ends the attacker's own
connection, costs bounded memory and work, and leaves the engine serving everyone else."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from p2p_common import wire
from p2p_common.bitfield import Bitfield
from p2p_common.engine.shared import MAX_PENDING_PER_ADDRESS, STRIKE_BURST
from p2p_common.session import HAVE_ALLOWANCE, MAX_AVAILABILITY_MESSAGES, MAX_REFUSED
from p2p_common.storage import MemoryPieceStore, PieceFile
from tests.engine_helpers import make_content, metainfo_for, running_engines

MiB = 1024 * 1024
FOREIGN = b"-XX0001-" + b"h" * 12


async def handshaken(
    port: int, info_hash: bytes, *, source: str = "127.0.0.1"
) -> trio.SocketStream:
    """A raw connection that has exchanged BitTorrent handshakes (no extensions: a foreign
    peer, choked until the choking round)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    await stream.send_all(
        wire.encode_handshake(info_hash, FOREIGN, wire.reserved_bytes(extensions=False))
    )
    received = b""
    with trio.fail_after(10):
        while len(received) < wire.HANDSHAKE_LENGTH:
            chunk = await stream.receive_some(wire.HANDSHAKE_LENGTH - len(received))
            assert chunk, "the engine hung up before its handshake"
            received += chunk
    return stream


async def dropped(stream: trio.SocketStream, flood: bytes, *, most: int) -> int:
    """Send ``flood`` again and again, never reading, until the engine hangs up; returns how
    many bytes went out (at most ``most``, or the test fails)."""
    sent = 0
    with trio.fail_after(30):
        try:
            while sent < most:
                await stream.send_all(flood)
                sent += len(flood)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return sent
    # The engine may have closed while our last write sat in the buffers: read to see.
    with trio.fail_after(10):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
    return sent


async def still_serves(engine_port: int, meta: object, content: bytes) -> None:
    """A well-behaved engine downloads the whole torrent from the attacked one."""
    async with running_engines(1) as (leech,):
        store = MemoryPieceStore(meta)  # type: ignore[arg-type]
        torrent = await leech.add_torrent(meta, store, peers=[("127.0.0.1", engine_port)])  # type: ignore[arg-type]
        with trio.fail_after(30):
            await torrent.wait_complete()
    assert bytes(store.data) == content


@pytest.fixture
def blob() -> tuple[bytes, object]:
    content = make_content(2 * MiB)
    return content, metainfo_for(content, piece_length=256 * 1024)


async def test_requests_while_choked_from_a_peer_that_never_reads_end_its_connection(
    blob: tuple[bytes, object],
) -> None:
    content, meta = blob
    async with running_engines(1, role="proxy") as (seed,):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))  # type: ignore[arg-type]
        stream = await handshaken(seed.port, meta.info_hash)  # type: ignore[attr-defined]
        request = wire.encode_request(0, 0, wire.BLOCK_SIZE)
        sent = await dropped(stream, request * 4096, most=60 * MiB)
        # Dropped after MAX_REFUSED refusals, long before 60 MiB (the old engine queued a
        # reject for every one of them: 58 MiB of requests grew it by 249 MiB).
        assert sent <= 4 * MAX_REFUSED * len(request) + 4 * MiB
        await stream.aclose()
        await still_serves(seed.port, meta, content)


async def test_a_peer_that_keeps_sending_bitfields_is_dropped(blob: tuple[bytes, object]) -> None:
    content, meta = blob
    async with running_engines(1, role="proxy") as (seed,):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))  # type: ignore[arg-type]
        stream = await handshaken(seed.port, meta.info_hash)  # type: ignore[attr-defined]
        bits = Bitfield(meta.num_pieces)  # type: ignore[attr-defined]
        bitfield = wire.encode_bitfield(bits)
        sent = await dropped(stream, bitfield, most=16 * MiB)
        assert sent <= (MAX_AVAILABILITY_MESSAGES + 1) * len(bitfield) + 4 * MiB
        await still_serves(seed.port, meta, content)


async def test_a_peer_that_reconnects_after_every_drop_is_held_back(
    blob: tuple[bytes, object],
) -> None:
    """Each connection starts with a fresh budget: the address's strikes stop the cycle."""
    content, meta = blob
    async with running_engines(1, role="proxy") as (seed,):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))  # type: ignore[arg-type]
        bitfield = wire.encode_bitfield(Bitfield(meta.num_pieces))  # type: ignore[attr-defined]
        answered = 0
        refused = False
        for _ in range(int(STRIKE_BURST) + 5):
            try:
                stream = await handshaken(seed.port, meta.info_hash, source="127.0.0.3")  # type: ignore[attr-defined]
            except (AssertionError, trio.BrokenResourceError):
                refused = True  # closed unanswered
                break
            answered += 1
            await dropped(stream, bitfield, most=4 * MiB)
            await stream.aclose()
        assert refused
        assert answered == int(STRIKE_BURST) + 1  # the drop that went over the allowance
        # Another address is served as before.
        await still_serves(seed.port, meta, content)


async def test_a_have_flood_is_dropped_before_it_costs_much(blob: tuple[bytes, object]) -> None:
    content, meta = blob
    async with running_engines(1, role="proxy") as (seed,):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))  # type: ignore[arg-type]
        stream = await handshaken(seed.port, meta.info_hash)  # type: ignore[attr-defined]
        haves = b"".join(wire.encode_have(i % meta.num_pieces) for i in range(1000))  # type: ignore[attr-defined]
        started = os.times()
        sent = await dropped(stream, haves, most=20 * MiB)
        cpu = sum(os.times()[:2]) - sum(started[:2])
        allowed = 2 * meta.num_pieces + HAVE_ALLOWANCE  # type: ignore[attr-defined]
        assert sent <= (allowed + 1000) * 9 + 4 * MiB
        assert cpu < 5.0  # the flood never became a busy loop (all of this process, pytest too)
        await still_serves(seed.port, meta, content)


async def test_silent_connections_from_one_address_leave_room_for_real_peers(
    blob: tuple[bytes, object],
) -> None:
    content, meta = blob
    async with running_engines(1, role="proxy", max_connections=200) as (seed,):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))  # type: ignore[arg-type]
        silent = []
        for _ in range(300):
            silent.append(
                await trio.open_tcp_stream("127.0.0.1", seed.port, local_address="127.0.0.2")
            )
        # At most MAX_PENDING_PER_ADDRESS of them wait for a handshake; the others are closed.
        await trio.sleep(0.5)
        open_ones = 0
        for stream in silent:
            with trio.move_on_after(0.01):
                try:
                    data = await stream.receive_some(1)
                except trio.BrokenResourceError:
                    data = b""
                if data == b"":
                    continue
            open_ones += 1
        assert open_ones <= MAX_PENDING_PER_ADDRESS
        with trio.fail_after(5):  # a real peer from another address is served at once
            await still_serves(seed.port, meta, content)
        for stream in silent:
            await stream.aclose()


async def test_an_upload_that_fails_with_an_unexpected_error_ends_that_connection_only(
    blob: tuple[bytes, object], tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    content, meta = blob
    source = tmp_path / "blob"  # type: ignore[operator]
    source.write_bytes(content)
    failures = 0
    real_sendfile = os.sendfile

    def flaky_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        nonlocal failures
        if failures < 3:
            failures += 1
            raise OSError(errno.EIO, "Input/output error")  # a bad sector, say
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", flaky_sendfile)
    async with running_engines(1, role="proxy") as (seed,):
        await seed.add_torrent(meta, PieceFile(meta, source, complete=True))  # type: ignore[arg-type]
        await still_serves(seed.port, meta, content)  # reconnects after each broken connection
    assert failures == 3
