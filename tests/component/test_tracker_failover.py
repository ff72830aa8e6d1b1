"""Losing one of three p2p-trackers in the middle of a rollout (issue 9): real trackers and
real engines in this process, over loopback, with short intervals.

The swarm's tracker (the one ranked first for its infohash) is stopped while leechers
download; its seed, announced in batches, must be listed at the tracker ranked next within
one announce interval (the batches' heartbeat), downloads go on, and a node that joins
afterwards with nothing but the tracker list finds the seed there. The same with virtual
time and many more seeds: tests/unit/test_announce_batch.py; in the simulator:
``python -m tests.sim --trackers 3 --kill-tracker-at S`` (tests/unit/test_sim.py).
"""

from __future__ import annotations

import httpx
import trio

from p2p_common.engine.announce import ANNOUNCE_TIMEOUT, rank_trackers
from p2p_common.storage import MemoryPieceStore
from p2p_common.tracker_proto import parse_scrape_response, scrape_query
from p2p_tracker.service import serve
from p2p_tracker.settings import TrackerSettings
from tests.engine_helpers import make_content, metainfo_for, running_engines

MiB = 1024 * 1024
INTERVAL = 2
"""The trackers' announceInterval: the heartbeat of batches, the interval of downloads."""


async def seeds_at(http: httpx.AsyncClient, url: str, info_hash: bytes) -> int:
    base = url.rsplit("/", 1)[0]
    try:
        response = await http.get(f"{base}/scrape?{scrape_query([info_hash])}")
    except httpx.HTTPError:
        return -1
    return parse_scrape_response(response.content)[info_hash].complete


async def test_losing_the_swarms_tracker_mid_rollout_costs_at_most_one_interval() -> None:
    content = make_content(6 * MiB)
    settings = TrackerSettings.load(
        None,
        environ={},
        listen="127.0.0.1:0",
        announce_interval=INTERVAL,
        min_announce_interval=1,
        seed_announce_interval=60,
    )
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=5) as http:
        scopes: dict[str, trio.CancelScope] = {}
        for _ in range(3):
            scope = trio.CancelScope()

            async def run(
                scope: trio.CancelScope = scope,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                with scope:
                    await serve(settings, task_status=task_status)

            port = await nursery.start(run)
            scopes[f"http://127.0.0.1:{port}/announce"] = scope
        urls = list(scopes)
        meta = metainfo_for(content, urls, piece_length=256 * 1024)
        first, second = rank_trackers(meta.info_hash, urls)[:2]

        async with (
            running_engines(1, role="proxy", upload_rate=2 * MiB) as (seed,),
            running_engines(3, upload_rate=2 * MiB) as leechers,
        ):
            await seed.add_torrent(meta, MemoryPieceStore(meta, content))
            with trio.fail_after(10):
                while await seeds_at(http, first, meta.info_hash) < 1:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            torrents = [
                await engine.add_torrent(meta, MemoryPieceStore(meta)) for engine in leechers
            ]
            await trio.sleep(1.0)  # the rollout is under way
            assert not all(t.completed.is_set() for t in torrents)
            scopes[first].cancel()
            lost_at = trio.current_time()
            with trio.fail_after(INTERVAL + ANNOUNCE_TIMEOUT):
                while await seeds_at(http, second, meta.info_hash) < 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            moved_after = trio.current_time() - lost_at
            assert moved_after <= INTERVAL + 0.5
            with trio.fail_after(60):
                for torrent in torrents:
                    await torrent.wait_complete()
            # a node joining now finds the swarm through the trackers alone
            async with running_engines(1) as (late,):
                store = MemoryPieceStore(meta)
                torrent = await late.add_torrent(meta, store)
                with trio.fail_after(30):
                    await torrent.wait_complete()
                assert bytes(store.data) == content
        nursery.cancel_scope.cancel()
