"""Our engine and tracker against real BitTorrent software, byte for byte.

(a) libtorrent and aria2 announce to our tracker and exchange a file through it;
(b) our engine downloads from a libtorrent seed and from an aria2 seed;
(c) libtorrent and aria2 leechers download from our engine as seed;
(d) our engine uses opentracker as its tracker.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from p2p_common.engine import Engine
from p2p_common.metainfo import Metainfo
from p2p_common.storage import PieceFile
from p2p_tracker.service import serve as serve_tracker
from p2p_tracker.settings import TrackerSettings
from tests.engine_helpers import make_content, metainfo_for, running_engines
from tests.realparts.aria2_peer import aria2_leech, aria2_seed
from tests.realparts.libtorrent_peer import libtorrent_leech, libtorrent_seed
from tests.realparts.opentracker import opentracker, wait_for_peer

pytestmark = pytest.mark.realparts

SIZE = 6 * 1024 * 1024 + 4321  # several pieces, the last one short
TIMEOUT = 60.0


@asynccontextmanager
async def our_tracker() -> AsyncIterator[str]:
    """Our tracker in this process; yields its announce URL."""
    settings = TrackerSettings.load(environ={}, listen="127.0.0.1:0", announceInterval=2)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_tracker, settings)
        yield f"http://127.0.0.1:{port}/announce"
        nursery.cancel_scope.cancel()


def seed_dir(tmp_path: Path, meta: Metainfo, content: bytes) -> Path:
    """A directory holding the blob under its torrent name (how libtorrent/aria2 find it)."""
    directory = tmp_path / "seed-data"
    directory.mkdir(exist_ok=True)
    (directory / meta.name).write_bytes(content)
    return directory


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def run_blocking(function, *args):  # type: ignore[no-untyped-def]
    return await trio.to_thread.run_sync(function, *args)


async def our_leech(engine: Engine, meta: Metainfo, tmp_path: Path, peers=()):  # type: ignore[no-untyped-def]
    store = PieceFile(meta, tmp_path / "ours.bin", tmp_path / "ours.bits")
    torrent = await engine.add_torrent(meta, store, peers=peers)
    with trio.fail_after(TIMEOUT):
        await torrent.wait_complete()
    return torrent, (tmp_path / "ours.bin").read_bytes()


# --- (b) our engine downloads from real seeds ---------------------------------------------------


async def test_our_engine_downloads_from_a_libtorrent_seed(tmp_path: Path) -> None:
    content = make_content(SIZE, seed=11)
    meta = metainfo_for(content)
    with libtorrent_seed(tmp_path, meta.to_bytes(), seed_dir(tmp_path, meta, content)) as seed:
        async with running_engines(1) as (engine,):
            torrent, received = await our_leech(
                engine, meta, tmp_path, peers=[("127.0.0.1", seed.listen_port)]
            )
        uploaded = seed.status().total_payload_upload
    assert received == content
    assert torrent.downloaded_by_role == {"foreign": len(content)}
    assert uploaded >= len(content)


async def test_our_engine_downloads_from_an_aria2_seed_through_our_tracker(tmp_path: Path) -> None:
    content = make_content(SIZE, seed=12)
    async with our_tracker() as announce:
        meta = metainfo_for(content, [announce])
        with aria2_seed(tmp_path, meta.to_bytes(), seed_dir(tmp_path, meta, content)) as seed:
            await run_blocking(
                lambda: wait_for_peer(announce, meta.info_hash, seed.listen_port, timeout=TIMEOUT)
            )
            async with running_engines(1) as (engine,):
                torrent, received = await our_leech(engine, meta, tmp_path)
    assert received == content
    assert torrent.downloaded_by_role["foreign"] == len(content)


# --- (c) real leechers download from our engine --------------------------------------------------


async def test_a_libtorrent_leecher_downloads_from_our_seed(tmp_path: Path) -> None:
    content = make_content(SIZE, seed=13)
    meta = metainfo_for(content)
    source = tmp_path / "blob"
    source.write_bytes(content)
    out = tmp_path / "lt-out"
    async with running_engines(1, role="proxy") as (engine,):
        await engine.add_torrent(meta, PieceFile(meta, source, complete=True))
        with libtorrent_leech(tmp_path, meta.to_bytes(), out) as leech:
            leech.connect_peer("127.0.0.1", engine.port)
            await run_blocking(leech.wait_complete, TIMEOUT)
            status = leech.status()
        uploaded = engine.upload_limiter.total
    assert digest((out / meta.name).read_bytes()) == digest(content)
    assert status.hash_failures == 0
    assert status.total_payload_download == len(content)
    assert uploaded >= len(content)


async def test_an_aria2_leecher_downloads_from_our_seed_through_our_tracker(tmp_path: Path) -> None:
    content = make_content(SIZE, seed=14)
    source = tmp_path / "blob"
    source.write_bytes(content)
    out = tmp_path / "aria2-out"
    async with our_tracker() as announce:
        meta = metainfo_for(content, [announce])
        async with running_engines(1, role="proxy") as (engine,):
            await engine.add_torrent(meta, PieceFile(meta, source, complete=True))
            await run_blocking(
                lambda: wait_for_peer(announce, meta.info_hash, engine.port, timeout=TIMEOUT)
            )
            with aria2_leech(tmp_path, meta.to_bytes(), out) as leech:
                await run_blocking(leech.wait_complete, TIMEOUT)
    assert digest((out / meta.name).read_bytes()) == digest(content)


# --- (a) real clients exchange a file through our tracker ----------------------------------------


async def test_libtorrent_seeds_to_aria2_through_our_tracker(tmp_path: Path) -> None:
    content = make_content(SIZE, seed=15)
    out = tmp_path / "aria2-out"
    async with our_tracker() as announce:
        meta = metainfo_for(content, [announce])
        with libtorrent_seed(
            tmp_path, meta.to_bytes(), seed_dir(tmp_path, meta, content), use_trackers=True
        ) as seed:
            await run_blocking(
                lambda: wait_for_peer(announce, meta.info_hash, seed.listen_port, timeout=TIMEOUT)
            )
            with aria2_leech(tmp_path, meta.to_bytes(), out) as leech:
                await run_blocking(leech.wait_complete, TIMEOUT)
    assert digest((out / meta.name).read_bytes()) == digest(content)


async def test_aria2_seeds_to_libtorrent_through_our_tracker(tmp_path: Path) -> None:
    content = make_content(SIZE, seed=16)
    out = tmp_path / "lt-out"
    async with our_tracker() as announce:
        meta = metainfo_for(content, [announce])
        with aria2_seed(tmp_path, meta.to_bytes(), seed_dir(tmp_path, meta, content)) as seed:
            await run_blocking(
                lambda: wait_for_peer(announce, meta.info_hash, seed.listen_port, timeout=TIMEOUT)
            )
            with libtorrent_leech(tmp_path, meta.to_bytes(), out, use_trackers=True) as leech:
                await run_blocking(leech.wait_complete, TIMEOUT)
                status = leech.status()
    assert digest((out / meta.name).read_bytes()) == digest(content)
    assert status.hash_failures == 0


# --- (d) our engine with opentracker ------------------------------------------------------------


async def test_our_engines_find_each_other_through_opentracker(tmp_path: Path) -> None:
    content = make_content(SIZE, seed=17)
    source = tmp_path / "blob"
    source.write_bytes(content)
    with opentracker(tmp_path / "opentracker") as tracker:
        meta = metainfo_for(content, [tracker.announce_url])
        await run_blocking(tracker.allow, meta.info_hash)
        async with running_engines(1, role="proxy") as (seed,), running_engines(1) as (leech,):
            await seed.add_torrent(meta, PieceFile(meta, source, complete=True))
            await run_blocking(
                lambda: tracker.wait_peers(meta.info_hash, seeders=1, timeout=TIMEOUT)
            )
            torrent, received = await our_leech(leech, meta, tmp_path)
    assert received == content
    assert torrent.downloaded_by_role["proxy"] == len(content)


async def test_our_engine_and_libtorrent_share_a_swarm_on_opentracker(tmp_path: Path) -> None:
    content = make_content(SIZE, seed=18)
    with opentracker(tmp_path / "opentracker") as tracker:
        meta = metainfo_for(content, [tracker.announce_url])
        await run_blocking(tracker.allow, meta.info_hash)
        with libtorrent_seed(
            tmp_path, meta.to_bytes(), seed_dir(tmp_path, meta, content), use_trackers=True
        ):
            await run_blocking(
                lambda: tracker.wait_peers(meta.info_hash, seeders=1, timeout=TIMEOUT)
            )
            async with running_engines(1) as (leech,):
                torrent, received = await our_leech(leech, meta, tmp_path)
    assert received == content
    assert torrent.downloaded_by_role["foreign"] == len(content)
