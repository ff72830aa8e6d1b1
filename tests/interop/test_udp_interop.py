"""BEP 15 against real software: libtorrent and aria2 announce to our tracker over ``udp://``
and find our engine's seed (which announced over UDP too); our engine announces over UDP to
opentracker.

aria2 speaks UDP trackers only with its DHT switched on (``--enable-dht=true``; it sends
tracker datagrams from the DHT's UDP socket; without it the announce fails and the leecher
never finds a peer). The DHT gets no entry point, its own port and routing-table file, and
the torrents are private (BEP 27, as in production), for which aria2 keeps the DHT out of
the download: nothing is sent anywhere but to our tracker and our seed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from p2p_common import metainfo as mi
from p2p_common.storage import PieceFile
from p2p_tracker.service import serve as serve_tracker
from p2p_tracker.settings import TrackerSettings
from tests.engine_helpers import make_content, metainfo_for, running_engines
from tests.realparts.aria2_peer import aria2_leech
from tests.realparts.libtorrent_peer import libtorrent_leech
from tests.realparts.opentracker import opentracker, wait_for_peer
from tests.realparts.procs import free_port

pytestmark = pytest.mark.realparts

SIZE = 6 * 1024 * 1024 + 4321
TIMEOUT = 60.0


@dataclass
class OurTracker:
    http_port: int
    udp_port: int

    @property
    def http_announce(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/announce"

    @property
    def udp_announce(self) -> str:
        return f"udp://127.0.0.1:{self.udp_port}/announce"

    async def udp_counters(self) -> dict[str, float]:
        """``p2p_tracker_announces_total`` over UDP by event, and the connects."""
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            text = (await http.get(f"http://127.0.0.1:{self.http_port}/metrics")).text
        found = {
            match.group(1): float(match.group(2))
            for match in re.finditer(
                r'^p2p_tracker_announces_total\{event="(\w+)",protocol="udp"\} (\S+)$', text, re.M
            )
        }
        connects = re.search(r"^p2p_tracker_udp_connects_total (\S+)$", text, re.M)
        found["connects"] = float(connects.group(1)) if connects else 0.0
        return found


@asynccontextmanager
async def our_tracker() -> AsyncIterator[OurTracker]:
    """Our tracker in this process, HTTP and UDP (BEP 15) on free ports of 127.0.0.1."""
    settings = TrackerSettings.load(
        None, environ={}, listen="127.0.0.1:0", udpListen="127.0.0.1:0", announceInterval=2
    )
    ports: list[int] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_tracker(
                settings, task_status=task_status, udp_port=ports.append
            )
        )
        yield OurTracker(port, ports[0])
        nursery.cancel_scope.cancel()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def our_udp_seed(tracker: OurTracker, engine_port: int, meta: mi.Metainfo) -> None:
    """Wait until our engine's seed (announcing over UDP) is in the swarm."""
    await trio.to_thread.run_sync(
        lambda: wait_for_peer(tracker.http_announce, meta.info_hash, engine_port, timeout=TIMEOUT)
    )
    assert (await tracker.udp_counters())["started"] >= 1  # it came over UDP


async def test_a_libtorrent_leecher_finds_our_seed_through_our_udp_tracker(
    tmp_path: Path,
) -> None:
    content = make_content(SIZE, seed=31)
    source = tmp_path / "blob"
    source.write_bytes(content)
    out = tmp_path / "lt-out"
    async with our_tracker() as tracker:
        meta = metainfo_for(content, [tracker.udp_announce])
        async with running_engines(1, role="proxy") as (engine,):
            await engine.add_torrent(meta, PieceFile(meta, source, complete=True))
            await our_udp_seed(tracker, engine.port, meta)
            before = await tracker.udp_counters()
            with libtorrent_leech(tmp_path, meta.to_bytes(), out, use_trackers=True) as leech:
                await trio.to_thread.run_sync(leech.wait_complete, TIMEOUT)
                status = leech.status()
            after = await tracker.udp_counters()
    assert digest((out / meta.name).read_bytes()) == digest(content)
    assert status.hash_failures == 0
    assert after["started"] >= before["started"] + 1  # libtorrent announced over UDP
    assert after["connects"] >= before["connects"] + 1


async def test_an_aria2_leecher_finds_our_seed_through_our_udp_tracker(tmp_path: Path) -> None:
    content = make_content(SIZE, seed=32)
    source = tmp_path / "blob"
    source.write_bytes(content)
    out = tmp_path / "aria2-out"
    async with our_tracker() as tracker:
        meta = metainfo_for(content, [tracker.udp_announce])
        assert meta.private
        async with running_engines(1, role="proxy") as (engine,):
            await engine.add_torrent(meta, PieceFile(meta, source, complete=True))
            await our_udp_seed(tracker, engine.port, meta)
            before = await tracker.udp_counters()
            dht = [
                "--enable-dht=true",  # aria2's UDP tracker client lives on the DHT socket
                f"--dht-listen-port={free_port()}",
                f"--dht-file-path={tmp_path / 'aria2-dht.dat'}",
            ]
            with aria2_leech(tmp_path, meta.to_bytes(), out, extra_args=dht) as leech:
                await trio.to_thread.run_sync(leech.wait_complete, TIMEOUT)
            after = await tracker.udp_counters()
    assert digest((out / meta.name).read_bytes()) == digest(content)
    assert after["started"] >= before["started"] + 1  # aria2 announced over UDP
    assert after["connects"] >= before["connects"] + 1


async def test_our_engines_find_each_other_through_opentracker_over_udp(tmp_path: Path) -> None:
    content = make_content(SIZE, seed=33)
    source = tmp_path / "blob"
    source.write_bytes(content)
    with opentracker(tmp_path / "opentracker", udp=True) as tracker:
        meta = metainfo_for(content, [tracker.udp_announce_url])
        await trio.to_thread.run_sync(tracker.allow, meta.info_hash)
        async with running_engines(1, role="proxy") as (seed,), running_engines(1) as (leech,):
            await seed.add_torrent(meta, PieceFile(meta, source, complete=True))
            await trio.to_thread.run_sync(
                lambda: tracker.wait_peers(meta.info_hash, seeders=1, timeout=TIMEOUT)
            )
            store = PieceFile(meta, tmp_path / "ours.bin", tmp_path / "ours.bits")
            torrent = await leech.add_torrent(meta, store)
            with trio.fail_after(TIMEOUT):
                await torrent.wait_complete()
    assert (tmp_path / "ours.bin").read_bytes() == content
    assert torrent.downloaded_by_role["proxy"] == len(content)
