"""The peer engine end to end inside one process: real trio, real sockets or memory streams."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from p2p_common import wire
from p2p_common.engine import make_peer_id
from p2p_common.engine.shared import ConnectionSlots
from p2p_common.storage import MemoryPieceStore, PieceFile
from tests.cluster import run_tracker
from tests.engine_helpers import make_content, metainfo_for, running_engines, wait_until

MiB = 1024 * 1024


async def test_two_engines_exchange_a_torrent_over_memory_streams() -> None:
    content = make_content(3 * MiB + 12345)
    meta = metainfo_for(content)
    async with running_engines(2) as (seed, leech):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))
        store = MemoryPieceStore(meta)
        torrent = await leech.add_torrent(meta, store)
        left, right = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: seed.attach_stream(left, address=("memory", 1)))
            nursery.start_soon(
                lambda: leech.attach_stream(right, address=("memory", 2), info_hash=meta.info_hash)
            )
            with trio.fail_after(30):
                await torrent.wait_complete()
            nursery.cancel_scope.cancel()
    assert bytes(store.data) == content
    assert torrent.downloaded_by_role == {"agent": len(content)}


async def test_leecher_downloads_from_a_seed_over_tcp_into_a_file(tmp_path: Path) -> None:
    content = make_content(5 * MiB + 7)
    meta = metainfo_for(content)
    source = tmp_path / "seed.bin"
    source.write_bytes(content)
    async with running_engines(1, role="proxy") as (seed,), running_engines(1) as (leech,):
        await seed.add_torrent(meta, PieceFile(meta, source, complete=True))
        target = tmp_path / "leech.bin"
        store = PieceFile(meta, target, tmp_path / "leech.bits")
        torrent = await leech.add_torrent(meta, store, peers=[("127.0.0.1", seed.port)])
        with trio.fail_after(30):
            await torrent.wait_complete()
        store.publish(tmp_path / "final.bin", meta.name)
    assert (tmp_path / "final.bin").read_bytes() == content
    assert torrent.downloaded_by_role["proxy"] == len(content)


async def test_leechers_trade_pieces_with_each_other_when_the_seed_is_slow() -> None:
    content = make_content(4 * MiB)
    meta = metainfo_for(content)
    async with running_engines(1, role="proxy", upload_rate=2 * MiB) as (seed,):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))
        async with running_engines(3) as leechers:
            addresses = [("127.0.0.1", e.port) for e in (seed, *leechers)]
            stores = [MemoryPieceStore(meta) for _ in leechers]
            torrents = [
                await engine.add_torrent(meta, store, peers=addresses)
                for engine, store in zip(leechers, stores, strict=True)
            ]
            with trio.fail_after(60):
                for torrent in torrents:
                    await torrent.wait_complete()
    assert all(bytes(store.data) == content for store in stores)
    from_proxy = sum(t.downloaded_by_role["proxy"] for t in torrents)
    from_agents = sum(t.downloaded_by_role["agent"] for t in torrents)
    assert from_proxy + from_agents == 3 * len(content)
    # The seed alone could not have sent three copies at 2 MiB/s in the time taken:
    assert from_agents > len(content) // 2
    assert seed.upload_limiter.total < 3 * len(content)


async def test_a_peer_sending_bad_data_is_banned_and_the_download_still_completes() -> None:
    content = make_content(2 * MiB)
    meta = metainfo_for(content, piece_length=256 * 1024)
    corrupt = bytearray(content)
    for index in range(meta.num_pieces):
        corrupt[index * meta.piece_length + 100] ^= 0xFF
    async with (
        running_engines(1, role="proxy", upload_rate=1 * MiB) as (good,),
        running_engines(2) as (liar, leech),
    ):
        await good.add_torrent(meta, MemoryPieceStore(meta, content))
        await liar.add_torrent(meta, MemoryPieceStore(meta, bytes(corrupt)))
        store = MemoryPieceStore(meta)
        torrent = await leech.add_torrent(
            meta, store, peers=[("127.0.0.1", liar.port), ("127.0.0.1", good.port)]
        )
        with trio.fail_after(60):
            await torrent.wait_complete()
        assert leech.is_banned(liar.peer_id, "127.0.0.1")
        assert not leech.is_banned(good.peer_id, "127.0.0.1")
        assert liar.peer_id not in torrent.connections
    assert bytes(store.data) == content


async def test_download_rate_limit_bounds_the_transfer_time() -> None:
    content = make_content(3 * MiB)
    meta = metainfo_for(content)
    rate = 2 * MiB
    async with (
        running_engines(1, role="proxy") as (seed,),
        running_engines(1, download_rate=rate) as (leech,),
    ):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))
        started = time.monotonic()
        torrent = await leech.add_torrent(
            meta, MemoryPieceStore(meta), peers=[("127.0.0.1", seed.port)]
        )
        with trio.fail_after(30):
            await torrent.wait_complete()
        elapsed = time.monotonic() - started
    burst = rate * 0.25
    assert elapsed >= (len(content) - burst) / rate * 0.95


async def test_raising_the_upload_rate_at_runtime_speeds_up_a_transfer() -> None:
    content = make_content(4 * MiB)
    meta = metainfo_for(content)
    async with (
        running_engines(1, role="proxy", upload_rate=256 * 1024) as (seed,),
        running_engines(1) as (leech,),
    ):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))
        torrent = await leech.add_torrent(
            meta, MemoryPieceStore(meta), peers=[("127.0.0.1", seed.port)]
        )
        await trio.sleep(1.0)
        slow_progress = torrent.downloaded
        assert slow_progress < 1 * MiB  # 256 KiB/s plus the burst
        seed.set_rates(0, 0)
        with trio.fail_after(10):
            await torrent.wait_complete()


async def test_an_interrupted_download_resumes_from_its_bitfield(tmp_path: Path) -> None:
    content = make_content(4 * MiB)
    meta = metainfo_for(content, piece_length=256 * 1024)
    target, bits = tmp_path / "blob", tmp_path / "blob.bits"
    async with running_engines(1, role="proxy", upload_rate=2 * MiB) as (seed,):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))
        async with running_engines(1) as (leech,):
            store = PieceFile(meta, target, bits)
            torrent = await leech.add_torrent(meta, store, peers=[("127.0.0.1", seed.port)])
            with trio.fail_after(30):
                await wait_until(lambda: store.have.count >= meta.num_pieces // 3)
        store.close()
        resumed = PieceFile(meta, target, bits)
        already = resumed.have.count
        assert already >= meta.num_pieces // 3
        async with running_engines(1) as (leech,):
            torrent = await leech.add_torrent(meta, resumed, peers=[("127.0.0.1", seed.port)])
            with trio.fail_after(30):
                await torrent.wait_complete()
    assert torrent.downloaded <= len(content) - already * meta.piece_length
    assert target.read_bytes() == content


async def test_a_streaming_reader_gets_its_pieces_first() -> None:
    content = make_content(4 * MiB)
    meta = metainfo_for(content, piece_length=256 * 1024)
    last = meta.num_pieces - 1
    async with (
        running_engines(1, role="proxy", upload_rate=1 * MiB) as (seed,),
        running_engines(1) as (leech,),
    ):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))
        store = MemoryPieceStore(meta)
        torrent = await leech.add_torrent(meta, store, peers=[("127.0.0.1", seed.port)])
        reader = object()
        torrent.set_reader(reader, last - 2)
        with trio.fail_after(30):
            await torrent.wait_for_piece(last)
        assert store.have.count <= meta.num_pieces // 2
        torrent.set_reader(reader, None)
        with trio.fail_after(30):
            await torrent.wait_complete()


async def test_connecting_to_ourselves_is_detected_and_not_retried() -> None:
    content = make_content(512 * 1024)
    meta = metainfo_for(content)
    async with running_engines(1) as (engine,):
        torrent = await engine.add_torrent(
            meta, MemoryPieceStore(meta), peers=[("127.0.0.1", engine.port)]
        )
        with trio.fail_after(10):
            await wait_until(lambda: ("127.0.0.1", engine.port) in engine.self_addresses)
        assert not torrent.connections
        assert ("127.0.0.1", engine.port) not in torrent.candidates


async def test_an_unknown_infohash_gets_no_handshake_back() -> None:
    async with running_engines(1) as (engine,):
        stream = await trio.open_tcp_stream("127.0.0.1", engine.port)
        async with stream:
            await stream.send_all(
                wire.encode_handshake(b"\x01" * 20, b"-XX0001-" + b"x" * 12, wire.reserved_bytes())
            )
            with trio.fail_after(10):
                data = await stream.receive_some(100)
        assert data == b""


async def test_a_protocol_violation_drops_the_peer() -> None:
    content = make_content(512 * 1024)
    meta = metainfo_for(content)
    async with running_engines(1) as (engine,):
        await engine.add_torrent(meta, MemoryPieceStore(meta, content))
        stream = await trio.open_tcp_stream("127.0.0.1", engine.port)
        async with stream:
            await stream.send_all(
                wire.encode_handshake(
                    meta.info_hash, b"-XX0001-" + b"y" * 12, wire.reserved_bytes()
                )
            )
            await stream.send_all(wire.encode_have(10**6))  # out of range
            received = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    received += chunk
        assert received.startswith(wire.PSTR)  # it answered, then hung up on us


@pytest.mark.parametrize("limit", [1, 2, 6])
async def test_connection_limit_is_enforced(limit: int) -> None:
    content = make_content(256 * 1024)
    meta = metainfo_for(content)
    async with running_engines(1, max_connections=limit) as (engine,):
        await engine.add_torrent(meta, MemoryPieceStore(meta, content))
        streams = []
        for n in range(limit + 1):
            stream = await trio.open_tcp_stream("127.0.0.1", engine.port)
            await stream.send_all(
                wire.encode_handshake(meta.info_hash, b"-XX0001-%012d" % n, wire.reserved_bytes())
            )
            streams.append(stream)
        answers = []
        for stream in streams:
            with trio.move_on_after(2):
                answers.append(await stream.receive_some(68))
            await stream.aclose()
        # Incoming connections may not use the slots kept for the engine's own dials.
        incoming = limit - ConnectionSlots(limit).kept_for_dialling
        assert sum(1 for a in answers if a.startswith(wire.PSTR)) == incoming


async def test_a_torrent_takes_no_more_incoming_connections_than_max_peers() -> None:
    content = make_content(256 * 1024)
    meta = metainfo_for(content)
    async with running_engines(1, max_connections=50, max_peers_per_torrent=3) as (engine,):
        torrent = await engine.add_torrent(meta, MemoryPieceStore(meta, content))
        answers = []
        async with contextlib.AsyncExitStack() as open_streams:
            for n in range(5):
                stream = await trio.open_tcp_stream("127.0.0.1", engine.port)
                await open_streams.enter_async_context(stream)
                await stream.send_all(
                    wire.encode_handshake(
                        meta.info_hash, b"-XX0001-%012d" % n, wire.reserved_bytes()
                    )
                )
                with trio.fail_after(10):
                    answers.append(await stream.receive_some(68))
                    await wait_until(lambda n=n: len(torrent.connections) == min(n + 1, 3))
        assert [a.startswith(wire.PSTR) for a in answers] == [True, True, True, False, False]
        assert answers[3:] == [b"", b""]  # hung up without a handshake


def test_engine_peer_ids_say_which_service_they_are() -> None:
    assert make_peer_id("agent").startswith(b"-PA0100-")
    assert make_peer_id("proxy").startswith(b"-PP0100-")
    assert len(make_peer_id("agent")) == 20
    assert make_peer_id("agent") != make_peer_id("agent")


async def test_dead_trackers_in_the_list_are_skipped() -> None:
    """Announces go to the trackers ranked for the infohash, the next one on failure."""
    content = make_content(2 * MiB)
    async with run_tracker() as live:
        trackers = ["http://127.0.0.1:9/announce", live, "http://127.0.0.2:9/announce"]
        meta = metainfo_for(content, trackers)
        async with running_engines(1, role="proxy") as (seed,), running_engines(1) as (leech,):
            await seed.add_torrent(meta, MemoryPieceStore(meta, content))
            store = MemoryPieceStore(meta)
            torrent = await leech.add_torrent(meta, store)  # no peers given: only the trackers
            with trio.fail_after(30):
                await torrent.wait_complete()
    assert bytes(store.data) == content


async def test_a_super_seed_puts_each_piece_into_the_swarm_about_once() -> None:
    """BEP 16 style: pieces revealed a few at a time, in order across peers; the leechers
    trade the rest. Without it the seed sends the same pieces to every leecher."""
    content = make_content(4 * MiB)
    meta = metainfo_for(content, piece_length=256 * 1024)
    async with running_engines(1, role="proxy", upload_rate=3 * MiB, super_seed=True) as (seed,):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))
        async with running_engines(4) as leechers:
            addresses = [("127.0.0.1", e.port) for e in (seed, *leechers)]
            stores = [MemoryPieceStore(meta) for _ in leechers]
            torrents = [
                await engine.add_torrent(meta, store, peers=addresses)
                for engine, store in zip(leechers, stores, strict=True)
            ]
            with trio.fail_after(60):
                for torrent in torrents:
                    await torrent.wait_complete()
    assert all(bytes(store.data) == content for store in stores)
    assert seed.upload_limiter.total <= 1.5 * len(content)
    assert sum(t.downloaded_by_role["agent"] for t in torrents) >= 2.5 * len(content)


async def test_a_seed_that_vanishes_mid_transfer_leaves_its_share_to_the_others() -> None:
    content = make_content(4 * MiB)
    meta = metainfo_for(content, piece_length=256 * 1024)
    async with (
        running_engines(1, role="proxy", upload_rate=1 * MiB) as (steady,),
        running_engines(1) as (leech,),
    ):
        await steady.add_torrent(meta, MemoryPieceStore(meta, content))
        store = MemoryPieceStore(meta)
        async with running_engines(1, upload_rate=1 * MiB) as (vanishing,):
            await vanishing.add_torrent(meta, MemoryPieceStore(meta, content))
            torrent = await leech.add_torrent(
                meta, store, peers=[("127.0.0.1", steady.port), ("127.0.0.1", vanishing.port)]
            )
            with trio.fail_after(30):
                await wait_until(lambda: torrent.downloaded_by_role["agent"] >= 512 * 1024)
            assert not torrent.completed.is_set()
        # The vanishing seed's engine is gone (its sockets closed mid-transfer).
        with trio.fail_after(30):
            await torrent.wait_complete()
    assert bytes(store.data) == content
    assert vanishing.peer_id not in torrent.connections


async def test_a_peer_that_goes_silent_is_worked_around(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer that offers every piece, unchokes, then never answers a request: its requests
    go to the other seed once it is snubbed, and the download completes (virtual time)."""
    content = make_content(2 * MiB)
    meta = metainfo_for(content, piece_length=256 * 1024)
    received_requests = 0
    async with running_engines(2, role="proxy") as (seed, leech):
        await seed.add_torrent(meta, MemoryPieceStore(meta, content))
        store = MemoryPieceStore(meta)
        torrent = await leech.add_torrent(meta, store)

        async def silent_peer(stream: trio.abc.Stream) -> None:
            nonlocal received_requests
            handshake = b""
            while len(handshake) < wire.HANDSHAKE_LENGTH:
                handshake += await stream.receive_some(wire.HANDSHAKE_LENGTH - len(handshake))
            peer_id = b"-XX0001-" + b"s" * 12
            reserved = wire.reserved_bytes(extensions=False, fast=True)
            await stream.send_all(wire.encode_handshake(meta.info_hash, peer_id, reserved))
            await stream.send_all(wire.ENCODED_HAVE_ALL + wire.ENCODED_UNCHOKE)
            while data := await stream.receive_some(65536):
                received_requests += data.count(b"\x00\x00\x00\x0d\x06")  # request headers

        silent_end, leech_end = trio.testing.memory_stream_pair()
        good_end, leech_end2 = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(silent_peer, silent_end)
            nursery.start_soon(
                lambda: leech.attach_stream(
                    leech_end, address=("silent", 1), info_hash=meta.info_hash
                )
            )
            with trio.fail_after(5):
                await wait_until(lambda: received_requests > 0)
            # Only now does a working seed show up.
            nursery.start_soon(lambda: seed.attach_stream(good_end, address=("memory", 2)))
            nursery.start_soon(
                lambda: leech.attach_stream(
                    leech_end2, address=("memory", 3), info_hash=meta.info_hash
                )
            )
            with trio.fail_after(120):
                await torrent.wait_complete()
            nursery.cancel_scope.cancel()
    assert bytes(store.data) == content
    assert received_requests > 0
    assert torrent.downloaded_by_role == {"proxy": len(content)}


async def test_a_running_connection_is_not_also_counted_as_a_dial() -> None:
    """A dialled peer counts once: with two connections running, a third peer learnt later is
    still dialled under a dial limit of three (``max_peers`` 6; the simulator found that an
    agent dialled only half its limit: a running outgoing connection counted as a dial as
    well)."""
    content = make_content(4 * MiB)
    meta = metainfo_for(content)
    async with (
        running_engines(3, role="proxy", upload_rate=64 * 1024) as seeds,
        running_engines(1, max_peers_per_torrent=6) as (leech,),
    ):
        for seed in seeds:
            await seed.add_torrent(meta, MemoryPieceStore(meta, content))
        first, second, third = (("127.0.0.1", seed.port) for seed in seeds)
        torrent = await leech.add_torrent(meta, MemoryPieceStore(meta), peers=[first, second])
        with trio.fail_after(30):
            await wait_until(lambda: len(torrent.connections) == 2)
        torrent.add_peers([third])
        with trio.fail_after(30):
            await wait_until(lambda: len(torrent.connections) == 3)
        assert not torrent.core.complete  # all three while the download still runs


async def test_a_torrent_dials_half_its_max_peers_and_keeps_the_rest_for_peers_dialling_it() -> (
    None
):
    content = make_content(4 * MiB)
    meta = metainfo_for(content)
    async with (
        running_engines(4, role="proxy", upload_rate=64 * 1024) as seeds,
        running_engines(1, max_peers_per_torrent=4) as (leech,),
    ):
        for seed in seeds:
            await seed.add_torrent(meta, MemoryPieceStore(meta, content))
        torrent = await leech.add_torrent(
            meta, MemoryPieceStore(meta), peers=[("127.0.0.1", seed.port) for seed in seeds]
        )
        with trio.fail_after(30):
            await wait_until(lambda: len(torrent.connections) == 2)
        for _ in range(20):  # a few dialling rounds: no third dial
            await trio.sleep(0.05)
            assert len(torrent.connections) + len(torrent._connecting) == 2
        # ... and peers that dial us still get in, up to max_peers
        async with contextlib.AsyncExitStack() as open_streams:
            for n in range(2):
                stream = await trio.open_tcp_stream("127.0.0.1", leech.port)
                await open_streams.enter_async_context(stream)
                await stream.send_all(
                    wire.encode_handshake(
                        meta.info_hash, b"-XX0001-%012d" % n, wire.reserved_bytes()
                    )
                )
                with trio.fail_after(10):
                    assert (await stream.receive_some(68)).startswith(wire.PSTR)
                    await wait_until(lambda n=n: len(torrent.connections) == 3 + n)
            assert not torrent.core.complete


async def _dial_with_handshake(
    stack: contextlib.AsyncExitStack, port: int, info_hash: bytes, n: int
) -> bool:
    """Dial ``port`` as a foreign peer; whether the torrent answered the handshake."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stack.enter_async_context(stream)
    await stream.send_all(
        wire.encode_handshake(info_hash, b"-XX0001-%012d" % n, wire.reserved_bytes())
    )
    with trio.move_on_after(2):
        try:
            return (await stream.receive_some(68)).startswith(wire.PSTR)
        except trio.BrokenResourceError:
            return False
    return False


@pytest.mark.parametrize("seeding", [False, True])
async def test_a_download_takes_half_its_max_peers_from_peers_dialling_it_a_seed_all(
    seeding: bool,
) -> None:
    """A download that knows nobody to dial yet (it announced first) still keeps half of
    ``max_peers`` for the peers it will dial: the rollout's first nodes would otherwise fill
    up with every later node's dials and the last nodes hold only what they dialled
    (docs/scale.md, finding 10). A seed dials nobody and takes ``max_peers``."""
    content = make_content(4 * MiB)
    meta = metainfo_for(content)
    async with running_engines(1, max_peers_per_torrent=4) as (engine,):
        store = MemoryPieceStore(meta, content) if seeding else MemoryPieceStore(meta)
        torrent = await engine.add_torrent(meta, store)
        async with contextlib.AsyncExitStack() as stack:
            answered = [
                await _dial_with_handshake(stack, engine.port, meta.info_hash, n) for n in range(5)
            ]
            expected = 4 if seeding else 2
            assert answered == [True] * expected + [False] * (5 - expected)
            with trio.fail_after(10):
                await wait_until(lambda: len(torrent.connections) == expected)
            assert torrent.core.complete == seeding


async def test_a_download_short_of_peers_it_dialled_announces_again_soon() -> None:
    """The first node of a rollout announces to an empty swarm and is then dialled by others
    (here 8 foreign peers, so it is no longer a young swarm); it still dials nobody itself.
    It announces again within seconds, not at the tracker's interval, and dials a seed that
    joined after it (docs/scale.md, finding 10)."""
    content = make_content(2 * MiB)
    async with run_tracker(announce_interval=300) as live:
        meta = metainfo_for(content, [live])
        async with running_engines(1, max_peers_per_torrent=20) as (leech,):
            store = MemoryPieceStore(meta)
            torrent = await leech.add_torrent(meta, store)  # the swarm is empty
            async with contextlib.AsyncExitStack() as stack:
                for n in range(8):
                    assert await _dial_with_handshake(stack, leech.port, meta.info_hash, n)
                with trio.fail_after(10):
                    await wait_until(lambda: len(torrent.connections) == 8)
                async with running_engines(1, role="proxy") as (seed,):
                    await seed.add_torrent(meta, MemoryPieceStore(meta, content))
                    with trio.fail_after(60):  # the tracker's interval is 300 s
                        await torrent.wait_complete()
    assert bytes(store.data) == content


async def test_a_bug_in_one_incoming_connection_ends_only_that_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    content = make_content(256 * 1024)
    meta = metainfo_for(content)
    async with running_engines(1) as (engine,):
        torrent = await engine.add_torrent(meta, MemoryPieceStore(meta, content))
        real = torrent.run_connection
        calls = 0

        async def buggy(*args: object, **kwargs: object) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise KeyError("a bug")
            await real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(torrent, "run_connection", buggy)
        for n in range(2):
            stream = await trio.open_tcp_stream("127.0.0.1", engine.port)
            async with stream:
                await stream.send_all(
                    wire.encode_handshake(
                        meta.info_hash, b"-XX0001-%012d" % n, wire.reserved_bytes()
                    )
                )
                with trio.fail_after(10):
                    assert (await stream.receive_some(68)).startswith(wire.PSTR)
                    if n == 1:  # the engine still serves: this one is a real connection
                        await wait_until(lambda: len(torrent.connections) == 1)
        assert calls == 2
        assert "connection.failed" in caplog.text
        assert "KeyError" in caplog.text


async def test_a_seed_whose_file_lost_its_bytes_says_so_and_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A seed's file cut short under it (a local fault) ends the connection that asked for a
    missing piece with a warning: nothing is sent that is not in the file, the engine lives
    on."""
    content = make_content(4 * MiB)
    meta = metainfo_for(content)
    source = tmp_path / "seed.bin"
    source.write_bytes(content)
    async with running_engines(1, role="proxy") as (seed,), running_engines(1) as (leech,):
        store = PieceFile(meta, source, complete=True)
        await seed.add_torrent(meta, store)
        os.truncate(source, 0)
        torrent = await leech.add_torrent(
            meta, MemoryPieceStore(meta), peers=[("127.0.0.1", seed.port)]
        )
        with trio.fail_after(20):
            while "upload.short_file" not in caplog.text:  # noqa: ASYNC110 - log from the seed
                await trio.sleep(0.02)
        assert torrent.core.picker.have.count == 0
        assert seed.port is not None  # the listener still serves
        stream = await trio.open_tcp_stream("127.0.0.1", seed.port)
        await stream.aclose()
        store.close()
