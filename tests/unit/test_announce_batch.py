"""The announcer's batches of seeds (p2p_common.engine.announce) against in-process trackers,
in virtual time: grouping per tracker, rounds and heartbeats, failover, restarts, stopping,
and the fallback to single announces where there is no batch endpoint."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import trio
import trio.testing

from p2p_common.engine import announce as announce_module
from p2p_common.engine.announce import Announcer, rank_trackers
from p2p_common.tracker_proto import Event
from tests.inproc_trackers import InProcessTrackers

HEARTBEAT = 300
SEED_INTERVAL = 1800
SETTLE = announce_module.BATCH_DELAY + 2
"""Seconds after which new seeds have been announced."""


def ih(n: int) -> bytes:
    return hashlib.sha1(b"seed-%d" % n).digest()


def trackers(count: int = 3, **settings: object) -> InProcessTrackers:
    settings.setdefault("announce_interval", HEARTBEAT)
    settings.setdefault("seed_announce_interval", SEED_INTERVAL)
    settings.setdefault("seed_expiry", 3 * SEED_INTERVAL)
    return InProcessTrackers(count, **settings)


@asynccontextmanager
async def running(announcer: Announcer) -> AsyncIterator[Announcer]:
    async with trio.open_nursery() as nursery:
        await nursery.start(announcer.run)
        yield announcer
        nursery.cancel_scope.cancel()


def add_seeds(
    announcer: Announcer,
    hashes: Iterable[bytes],
    urls: list[str],
    event: Event = Event.STARTED,
    peers: list[tuple[str, int]] | None = None,
) -> None:
    for info_hash in hashes:
        announcer.add_seed(
            info_hash,
            tuple(urls),
            event,
            stats=lambda: (0, 0),
            on_peers=peers.extend if peers is not None else (lambda _: None),
        )


def first_tracker(info_hash: bytes, urls: list[str]) -> int:
    return urls.index(rank_trackers(info_hash, urls)[0])


async def test_seeds_go_in_one_batch_per_tracker(autojump_clock: trio.testing.MockClock) -> None:
    cluster = trackers()
    hashes = [ih(n) for n in range(60)]
    async with running(cluster.announcer(0)) as announcer:
        add_seeds(announcer, hashes, cluster.urls)
        await trio.sleep(SETTLE)
        # one request per tracker, each with exactly the seeds ranked first there
        assert sum(cluster.requests.batches.values()) == 3
        assert cluster.requests.singles == {}
        for index in range(3):
            mine = [h for h in hashes if first_tracker(h, cluster.urls) == index]
            assert cluster.requests.batch_entries[cluster.hosts[index]] == len(mine)
            for h in mine:
                assert cluster.seeds_at(index, h) == {announcer.peer_id}
        assert cluster.core(0).swarm.batch_seed_count > 0


async def test_a_round_every_interval_and_a_heartbeat_in_between(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = trackers(1)
    async with running(cluster.announcer(0)) as announcer:
        add_seeds(announcer, [ih(n) for n in range(2500)], cluster.urls)
        await trio.sleep(SETTLE)
        host = cluster.hosts[0]
        # 2,500 seeds: three requests of at most BATCH_SIZE
        assert cluster.requests.batches[host] == 3
        assert cluster.requests.batch_entries[host] == 2500
        cluster.requests.log.clear()
        await trio.sleep(2 * SEED_INTERVAL)
    log = [(round(t), kind, n) for t, _, kind, n in cluster.requests.log]
    rounds = [t for t, _, n in log if n]
    heartbeats = [t for t, _, n in log if not n]
    # two rounds of all seeds (three requests each), jittered up to a tenth early
    assert len(rounds) == 6
    assert sum(n for _, _, n in log) == 2 * 2500
    assert 0.9 * SEED_INTERVAL <= rounds[3] - rounds[0] <= SEED_INTERVAL + 1
    # heartbeats fill the gaps: never more than HEARTBEAT without a request
    times = sorted(rounds + heartbeats)
    assert all(b - a <= HEARTBEAT + 1 for a, b in itertools.pairwise(times))
    assert len(heartbeats) >= 2 * (SEED_INTERVAL // HEARTBEAT - 1) - 1
    # the seeds never expired meanwhile
    assert cluster.core(0).swarm.batch_seed_count == 2500


async def test_new_seeds_wait_a_moment_to_go_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = trackers(1)
    async with running(cluster.announcer(0)) as announcer:
        for n in range(10):
            add_seeds(announcer, [ih(n)], cluster.urls, Event.COMPLETED)
            await trio.sleep(0.2)
        await trio.sleep(announce_module.BATCH_DELAY + 1)
        assert cluster.requests.batches[cluster.hosts[0]] == 1
    stats = [cluster.core(0).swarm.scrape(ih(n)) for n in range(10)]
    assert all(s.downloaded == 1 and s.complete == 1 for s in stats)


async def test_stopping_seeds_go_in_one_batch(autojump_clock: trio.testing.MockClock) -> None:
    cluster = trackers(1)
    hashes = [ih(n) for n in range(50)]
    async with running(cluster.announcer(0)) as announcer:
        add_seeds(announcer, hashes, cluster.urls)
        await trio.sleep(SETTLE)
        before = cluster.requests.batches[cluster.hosts[0]]
        async with trio.open_nursery() as nursery:
            for h in hashes:
                nursery.start_soon(announcer.remove_seed, h)
        assert cluster.requests.batches[cluster.hosts[0]] == before + 1
        assert cluster.core(0).swarm.peer_count == 0
        # nothing is announced for them any more
        await trio.sleep(2 * SEED_INTERVAL)
        assert cluster.core(0).swarm.peer_count == 0


async def test_a_stop_during_cancellation_still_goes_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At shutdown the announcer's task is cancelled together with the torrents, whose
    shielded ``finally`` stops them: the stop batch needs no running announcer."""
    cluster = trackers(1)
    announcer = cluster.announcer(0)
    async with running(announcer):
        add_seeds(announcer, [ih(1), ih(2)], cluster.urls)
        await trio.sleep(SETTLE)
    assert not announcer.batching
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(announcer.remove_seed, ih(1))
            nursery.start_soon(announcer.remove_seed, ih(2))
    assert cluster.core(0).swarm.peer_count == 0


async def test_a_tracker_without_the_endpoint_gets_single_announces(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An older tracker or opentracker answers 404: remembered, seeds announced alone."""
    cluster = trackers(1)
    host = cluster.hosts[0]
    cluster.batchless.add(host)
    hashes = [ih(n) for n in range(20)]
    async with running(cluster.announcer(0)) as announcer:
        add_seeds(announcer, hashes, cluster.urls)
        await trio.sleep(SETTLE)
        assert cluster.requests.singles[host] == 20
        for h in hashes:
            assert cluster.seeds_at(0, h) == {announcer.peer_id}
        await trio.sleep(3 * HEARTBEAT + 10)  # the tracker's interval for singles
        # re-announced alone every interval; the batch endpoint is not asked again
        assert cluster.requests.singles[host] == 20 * 4
        assert cluster.requests.batches[host] == 0  # (404s are not counted as batches)
        async with trio.open_nursery() as nursery:
            for h in hashes[:5]:
                nursery.start_soon(announcer.remove_seed, h)
        assert cluster.core(0).swarm.peer_count == 15


async def test_the_endpoint_is_asked_again_after_an_hour(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = trackers(1)
    host = cluster.hosts[0]
    cluster.batchless.add(host)
    async with running(cluster.announcer(0)) as announcer:
        add_seeds(announcer, [ih(n) for n in range(5)], cluster.urls)
        await trio.sleep(SETTLE)
        cluster.batchless.clear()  # the tracker was upgraded
        await trio.sleep(announce_module.NO_BATCH_RETRY + 2 * HEARTBEAT)
        singles = cluster.requests.singles[host]
        assert cluster.requests.batch_entries[host] == 5
        await trio.sleep(2 * HEARTBEAT)
        assert cluster.requests.singles[host] == singles  # batched from then on


async def test_udp_trackers_get_single_announces(autojump_clock: trio.testing.MockClock) -> None:
    announcer = trackers(1).announcer(0)
    calls: list[tuple[bytes, Event]] = []

    async def fake_announce(
        info_hash: bytes, trackers: tuple[str, ...], state: tuple[Event, int, int, int]
    ) -> None:
        calls.append((info_hash, state[0]))

    announcer.announce = fake_announce  # type: ignore[method-assign]
    async with running(announcer):
        add_seeds(announcer, [ih(1)], ["udp://10.0.9.1:6969"])
        await trio.sleep(SETTLE)
    assert calls == [(ih(1), Event.STARTED)]


async def test_a_lost_tracker_moves_its_seeds_within_a_heartbeat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = trackers(3)
    hashes = [ih(n) for n in range(90)]
    lost = [h for h in hashes if first_tracker(h, cluster.urls) == 0]
    async with running(cluster.announcer(0)) as announcer:
        add_seeds(announcer, hashes, cluster.urls)
        await trio.sleep(SETTLE)
        cluster.kill(0)
        killed_at = trio.current_time()
        with trio.fail_after(HEARTBEAT + announce_module.ANNOUNCE_TIMEOUT + 5):
            while not all(  # noqa: ASYNC110 - polling the trackers' tables
                announcer.peer_id in cluster.seeds_at(1, h) | cluster.seeds_at(2, h) for h in lost
            ):
                await trio.sleep(1)
        moved_after = trio.current_time() - killed_at
        # each to the tracker ranked second for it
        for h in lost:
            second = cluster.urls.index(rank_trackers(h, cluster.urls)[1])
            assert cluster.seeds_at(second, h) == {announcer.peer_id}
        assert moved_after <= HEARTBEAT + announce_module.ANNOUNCE_TIMEOUT + 2
        # the tracker comes back (same table): probed, and the seeds go back to it
        cluster.revive(0)
        await trio.sleep(announce_module.DOWN_PROBE + 5)
        sent = cluster.requests.batch_entries[cluster.hosts[0]]
        assert sent >= 2 * len(lost)  # the first time, and again on its return


async def test_a_failing_single_announce_moves_the_seeds_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A download's announce that finds its tracker gone tells the batches too."""
    cluster = trackers(2)
    hashes = [ih(n) for n in range(40)]
    lost = [h for h in hashes if first_tracker(h, cluster.urls) == 0]
    async with running(cluster.announcer(0)) as announcer:
        add_seeds(announcer, hashes, cluster.urls)
        await trio.sleep(SETTLE)
        cluster.kill(0)
        download = next(
            h for h in (ih(n) for n in range(100, 200)) if first_tracker(h, cluster.urls) == 0
        )
        await announcer.announce(download, tuple(cluster.urls), (Event.STARTED, 0, 0, 100))
        await trio.sleep(announce_module.BATCH_DELAY + 2)
        assert all(cluster.seeds_at(1, h) == {announcer.peer_id} for h in lost)


async def test_a_restarted_tracker_gets_every_seed_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = trackers(1)
    hashes = [ih(n) for n in range(100)]
    async with running(cluster.announcer(0)) as announcer:
        add_seeds(announcer, hashes, cluster.urls)
        await trio.sleep(SETTLE)
        cluster.restart(0)
        assert cluster.core(0).swarm.peer_count == 0
        await trio.sleep(HEARTBEAT + 5)
        assert cluster.core(0).swarm.batch_seed_count == 100


async def test_the_tracker_keeps_batched_seeds_for_their_own_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A seed announced in batches outlives ``peerExpiry`` (its interval is longer); one
    that stops announcing is forgotten after ``seedExpiry``."""
    cluster = trackers(1, peer_expiry=900)
    async with running(cluster.announcer(0)) as announcer:
        add_seeds(announcer, [ih(1)], cluster.urls)
        await trio.sleep(SETTLE)
        for _ in range(4):
            await trio.sleep(SEED_INTERVAL / 2)
            cluster.core(0).expire(trio.current_time())
        assert cluster.core(0).swarm.batch_seed_count == 1
    # the announcer is gone without a stop: the seed expires seedExpiry after its last batch
    gone_at = trio.current_time()
    cluster.core(0).expire(gone_at + 3 * SEED_INTERVAL - SEED_INTERVAL)
    assert cluster.core(0).swarm.batch_seed_count == 1
    cluster.core(0).expire(gone_at + 3 * SEED_INTERVAL + 1)
    assert cluster.core(0).swarm.batch_seed_count == 0


async def test_seeds_use_the_http_twin_of_a_udp_tracker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """udp://h:p and http://h:p/announce both listed: UDP ranks first (downloads use it),
    seeds go in batches to the same tracker over HTTP."""
    cluster = trackers(1)
    announcer = cluster.announcer(0)
    singles: list[bytes] = []

    async def no_singles(
        info_hash: bytes, trackers: tuple[str, ...], state: tuple[Event, int, int, int]
    ) -> None:
        singles.append(info_hash)

    announcer.announce = no_singles  # type: ignore[method-assign]
    urls = ["udp://10.0.9.1:6969", cluster.urls[0]]
    assert rank_trackers(ih(1), urls)[0].startswith("udp://")
    async with running(announcer):
        add_seeds(announcer, [ih(n) for n in range(5)], urls)
        await trio.sleep(announce_module.BATCH_DELAY + 1)
    assert singles == []
    assert cluster.requests.batch_entries[cluster.hosts[0]] == 5


async def test_opentracker_s_400_to_a_post_means_no_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """opentracker parses no POST: it answers 400 with an HTML page."""
    cluster = trackers(1)
    host = cluster.hosts[0]
    cluster.batchless.add(host)
    cluster.batchless_status = 400
    async with running(cluster.announcer(0)) as announcer:
        add_seeds(announcer, [ih(n) for n in range(3)], cluster.urls)
        await trio.sleep(SETTLE)
        assert cluster.requests.singles[host] == 3
        assert cluster.seeds_at(0, ih(1)) == {announcer.peer_id}
