"""Chunk torrents with real BitTorrent software: every chunk of a blob is a standard v1 torrent.

Our engine seeds a blob of several chunks as one swarm (the p2p peers' view); a libtorrent or
aria2 peer that was given one chunk's ``.torrent`` connects by that chunk's infohash and sees
just that chunk, pieces numbered from 0 (see p2p_common.blobinfo). The other way round, a
libtorrent seed of one chunk that connects to our downloading engine feeds that chunk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import trio

from p2p_common.blobinfo import BlobMetainfo, ChunkBuilder, chunk_pieces_for
from p2p_common.metainfo import MIN_PIECE_LENGTH, piece_length_for
from p2p_common.storage import PieceFile
from p2p_common.tracker_proto import AnnounceRequest, Event, announce_url
from tests.engine_helpers import make_content, running_engines, wait_until
from tests.interop.test_engine_interop import TIMEOUT, digest, our_tracker, run_blocking
from tests.realparts.aria2_peer import aria2_leech
from tests.realparts.libtorrent_peer import libtorrent_leech, libtorrent_seed

pytestmark = pytest.mark.realparts

PIECE = MIN_PIECE_LENGTH  # blobs of this test are small enough for the smallest pieces
CHUNK_PIECES = chunk_pieces_for(PIECE)
CHUNK = CHUNK_PIECES * PIECE


def chunked(content: bytes, trackers: tuple[str, ...] = ()) -> BlobMetainfo:
    builder = ChunkBuilder("sha256:" + digest(content), len(content), trackers)
    step = piece_length_for(len(content))
    for start in range(0, len(content), step):
        builder.piece(hashlib.sha1(content[start : start + step]).digest())
    builder.finish()
    return builder.blob


CONTENT = make_content(2 * CHUNK + 5 * PIECE + 777, seed=31)  # three chunks, the last short


@pytest.fixture
def blob_file(tmp_path: Path) -> tuple[BlobMetainfo, Path]:
    blob = chunked(CONTENT)
    assert len(blob.chunks) == 3
    path = tmp_path / "blob"
    path.write_bytes(CONTENT)
    return blob, path


@pytest.mark.parametrize("chunk", [1, 2])
async def test_a_libtorrent_leecher_downloads_one_chunk_from_our_blob_seed(
    tmp_path: Path, blob_file: tuple[BlobMetainfo, Path], chunk: int
) -> None:
    blob, path = blob_file
    torrent = blob.chunks[chunk]
    part = CONTENT[chunk * CHUNK : (chunk + 1) * CHUNK]
    out = tmp_path / "lt-out"
    async with running_engines(1, role="proxy", super_seed=True) as (engine,):
        await engine.add_torrent(blob, PieceFile(blob, path, complete=True))
        with libtorrent_leech(tmp_path, torrent.to_bytes(), out) as leech:
            leech.connect_peer("127.0.0.1", engine.port)
            await run_blocking(leech.wait_complete, TIMEOUT)
            status = leech.status()
        uploaded = engine.upload_limiter.total
    assert (out / torrent.name).read_bytes() == part
    assert status.hash_failures == 0
    assert status.total_payload_download == len(part)
    assert uploaded == len(part)  # that chunk and nothing else


async def test_an_aria2_leecher_downloads_one_chunk_through_our_tracker(
    tmp_path: Path, blob_file: tuple[BlobMetainfo, Path]
) -> None:
    blob, path = blob_file
    torrent = blob.chunks[1]
    out = tmp_path / "aria2-out"
    async with our_tracker() as announce:
        trackers = (announce,)
        async with running_engines(1, role="proxy") as (engine,):
            await engine.add_torrent(
                blob.with_trackers(trackers), PieceFile(blob, path, complete=True)
            )
            # Our engine announces the blob's swarm, not each chunk: a standard client is
            # introduced to it under the chunk's infohash (here by the test, as an operator's
            # tool would).
            request = AnnounceRequest(
                info_hash=torrent.info_hash,
                peer_id=engine.peer_id,
                port=engine.port,
                left=0,
                event=Event.STARTED,
            )
            async with httpx.AsyncClient() as http:
                assert (await http.get(announce_url(announce, request))).status_code == 200
            chunk_torrent = torrent.with_trackers(trackers)
            with aria2_leech(tmp_path, chunk_torrent.to_bytes(), out) as leech:
                await run_blocking(leech.wait_complete, TIMEOUT)
    assert (out / torrent.name).read_bytes() == CONTENT[CHUNK : 2 * CHUNK]


async def test_a_libtorrent_seed_of_one_chunk_feeds_our_blob_download(
    tmp_path: Path, blob_file: tuple[BlobMetainfo, Path]
) -> None:
    blob, _ = blob_file
    torrent = blob.chunks[1]
    seed_dir = tmp_path / "seed-data"
    seed_dir.mkdir()
    (seed_dir / torrent.name).write_bytes(CONTENT[CHUNK : 2 * CHUNK])
    async with running_engines(1) as (engine,):
        store = PieceFile(blob, tmp_path / "ours", tmp_path / "ours.bits")
        ours = await engine.add_torrent(blob, store)
        with libtorrent_seed(tmp_path, torrent.to_bytes(), seed_dir) as seed:
            seed.connect_peer("127.0.0.1", engine.port)
            chunk_pieces = range(CHUNK_PIECES, 2 * CHUNK_PIECES)
            with trio.fail_after(TIMEOUT):
                await wait_until(lambda: all(ours.has_piece(i) for i in chunk_pieces))
        assert not ours.has_piece(0)  # nobody had the other chunks
        assert ours.downloaded_by_role == {"foreign": CHUNK}
        store.close()
    assert (tmp_path / "ours").read_bytes()[CHUNK : 2 * CHUNK] == CONTENT[CHUNK : 2 * CHUNK]
