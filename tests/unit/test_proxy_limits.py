"""Limits on the origin work clients start (p2p_proxy.clients, p2p_proxy.limits): the pure
per-client table (address keys, requests in progress, token buckets, bounded memory), the
``maxOriginFetches`` slots on a virtual clock, and how single flights and the blob fetcher ask
for admission: only to start work, never to join it."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from p2p_common.oci import ErrorCode, OCIError
from p2p_proxy.clients import (
    CONCURRENCY_RETRY_AFTER,
    ClientLimits,
    client_key,
    retry_after_header,
)
from p2p_proxy.fetchline import HEAD_START_SECONDS, LARGE_BLOB, STALL_SECONDS
from p2p_proxy.flight import SingleFlight
from p2p_proxy.limits import BUSY_RETRY_AFTER, OriginLimits
from p2p_proxy.metrics import ProxyMetrics
from p2p_proxy.settings import ProxySettings
from tests.unit.test_proxy_fetch import REPO, FakeOrigin, digest_of, make_fetcher, make_random

# --- client keys and Retry-After ----------------------------------------------------------------


@given(st.ip_addresses(v=4))
def test_an_ipv4_client_has_one_key_however_it_is_spelled(address: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address("::ffff:" + str(address))
    assert client_key(str(address)) == str(address)
    assert client_key(str(mapped)) == str(address)
    assert client_key(mapped.exploded) == str(address)


@given(st.ip_addresses(v=6), st.sampled_from(["", "%eth0", "%1"]))
def test_an_ipv6_client_key_is_canonical_without_zone(
    address: ipaddress.IPv6Address, zone: str
) -> None:
    key = client_key(address.exploded + zone)
    assert client_key(key) == key  # idempotent
    assert "%" not in key
    if address.ipv4_mapped is None:
        assert key == str(address)
    else:
        assert key == str(address.ipv4_mapped)


@given(st.text(max_size=40))
def test_a_key_is_a_canonical_address_or_the_text_unchanged(text: str) -> None:
    key = client_key(text)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        assert key == text
    else:
        assert ipaddress.ip_address(key) is not None


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_retry_after_is_whole_seconds_at_least_the_wait(seconds: float) -> None:
    value = retry_after_header(seconds)
    assert value.isdigit()
    assert 1 <= int(value) <= 24 * 3600
    if 1 <= seconds <= 24 * 3600:
        assert seconds <= int(value) < seconds + 1


# --- requests in progress ----------------------------------------------------------------------


def test_a_client_may_have_n_requests_in_progress_and_others_are_unaffected() -> None:
    limits = ClientLimits(concurrency=3, rate=0, burst=1)
    for _ in range(3):
        assert limits.start("10.0.0.1", 0.0) is None
    refusal = limits.start("10.0.0.1", 0.0)
    assert refusal is not None
    assert (refusal.reason, refusal.retry_after) == ("requests", CONCURRENCY_RETRY_AFTER)
    assert limits.running("10.0.0.1") == 3  # a refusal counts nothing
    assert limits.start("10.0.0.2", 0.0) is None
    limits.finish("10.0.0.1")
    assert limits.start("10.0.0.1", 0.0) is None
    for _ in range(4):
        limits.finish("10.0.0.1")
        limits.finish("10.0.0.2")
    assert (limits.running("10.0.0.1"), limits.running("10.0.0.2"), len(limits)) == (0, 0, 0)


def test_zero_means_no_limit() -> None:
    limits = ClientLimits(concurrency=0, rate=0, burst=1)
    assert all(limits.start("a", 0.0) is None for _ in range(10_000))
    assert limits.running("a") == 10_000


# --- the rate ----------------------------------------------------------------------------------


def test_a_bucket_starts_full_refuses_without_debt_and_refills() -> None:
    limits = ClientLimits(concurrency=0, rate=2.0, burst=3)
    assert [limits.start("a", 10.0) for _ in range(3)] == [None] * 3
    refusal = limits.start("a", 10.0)
    assert refusal is not None
    assert refusal.reason == "rate"
    assert refusal.retry_after == pytest.approx(0.5)
    for _ in range(100):  # hammering while empty takes nothing
        assert limits.start("a", 10.25) is not None
    assert limits.start("a", 10.5) is None
    assert limits.start("b", 10.5) is None  # another client has its own bucket
    assert limits.tokens("a", 100.0) == 3.0  # never more than the burst


def test_charge_false_counts_the_request_but_takes_no_token() -> None:
    limits = ClientLimits(concurrency=2, rate=1.0, burst=1)
    assert limits.start("a", 0.0) is None
    assert limits.start("a", 0.0) is not None  # no token left
    assert limits.start("a", 0.0, charge=False) is None
    assert limits.running("a") == 2
    refusal = limits.start("a", 0.0, charge=False)
    assert refusal is not None
    assert refusal.reason == "requests"


@given(
    st.floats(0.1, 50.0),
    st.integers(1, 20),
    st.lists(st.tuples(st.floats(0.0, 3.0), st.sampled_from("abc")), max_size=150),
)
def test_no_window_admits_more_than_burst_plus_rate_times_its_length(
    rate: float, burst: int, steps: list[tuple[float, str]]
) -> None:
    limits = ClientLimits(concurrency=0, rate=rate, burst=burst)
    now = 0.0
    admitted: dict[str, list[float]] = {}
    for gap, client in steps:
        now += gap
        refusal = limits.start(client, now)
        if refusal is None:
            admitted.setdefault(client, []).append(now)
        else:
            assert refusal.reason == "rate"
            assert refusal.retry_after > 0
            # Waiting as told is enough (nobody else takes this client's tokens).
            assert limits.tokens(client, now + refusal.retry_after) >= 1 - 1e-6
    for times in admitted.values():
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                assert j - i + 1 <= burst + rate * (times[j] - start) + 1e-6


@given(st.floats(0.01, 100.0), st.integers(1, 50), st.integers(1, 200))
def test_a_refused_client_that_waits_as_told_gets_through(
    rate: float, burst: int, extra: int
) -> None:
    limits = ClientLimits(concurrency=0, rate=rate, burst=burst)
    now = 5.0
    refusal = None
    for _ in range(burst + extra):
        refusal = limits.start("a", now)
    assert refusal is not None
    assert limits.start("a", now + refusal.retry_after) is None


# --- bounded memory ----------------------------------------------------------------------------


@given(
    st.integers(1, 30),
    st.lists(st.tuples(st.integers(0, 99), st.floats(0.0, 2.0), st.booleans()), max_size=300),
)
def test_the_table_never_holds_more_than_its_bound_plus_work_in_progress(
    max_clients: int, steps: list[tuple[int, float, bool]]
) -> None:
    limits = ClientLimits(concurrency=2, rate=1.0, burst=3, max_clients=max_clients)
    now = 0.0
    in_progress: dict[str, int] = {}
    for client_number, gap, finish in steps:
        now += gap
        client = f"10.0.0.{client_number}"
        if finish and in_progress.get(client):
            limits.finish(client)
            in_progress[client] -= 1
        elif limits.start(client, now) is None:
            in_progress[client] = in_progress.get(client, 0) + 1
        assert limits.running(client) == in_progress.get(client, 0)
        busy = sum(1 for count in in_progress.values() if count)
        assert len(limits) <= max_clients + busy
    # Long after the last request every bucket is full again: nothing is held for idle clients.
    for client, count in in_progress.items():
        for _ in range(count):
            limits.finish(client)
    limits.start("10.0.1.1", now + 1000.0)
    limits.finish("10.0.1.1")
    assert len(limits) <= 1


def test_an_evicted_bucket_comes_back_full() -> None:
    limits = ClientLimits(concurrency=0, rate=0.001, burst=1, max_clients=2)
    assert limits.start("a", 0.0) is None
    assert limits.start("a", 0.0) is not None
    assert limits.start("b", 0.0) is None
    assert limits.start("c", 0.0) is None  # "a" was used least recently: dropped
    for client in "abc":
        limits.finish(client)
    assert len(limits) == 2
    assert limits.start("a", 0.0) is None


def test_bad_parameters_are_refused() -> None:
    for kwargs in (
        {"concurrency": -1, "rate": 0.0, "burst": 1},
        {"concurrency": 0, "rate": -1.0, "burst": 1},
        {"concurrency": 0, "rate": math.nan, "burst": 1},
        {"concurrency": 0, "rate": math.inf, "burst": 1},
        {"concurrency": 0, "rate": 1.0, "burst": 0},
    ):
        with pytest.raises(ValueError):
            ClientLimits(**kwargs)  # type: ignore[arg-type]


# --- the shell: requesters and fetch slots ------------------------------------------------------


def test_settings_defaults_suit_a_large_cluster() -> None:
    settings = ProxySettings.load(None, environ={}, registry="registry.example.com")
    dumped = settings.dump()
    assert dumped["originRequestsPerAddress"] == 16
    assert dumped["originRatePerAddress"] == 5.0
    assert dumped["originBurstPerAddress"] == 100
    assert dumped["maxOriginFetches"] == 32
    assert dumped["originQueueTimeout"] == 30.0
    assert dumped["uncappedAddresses"] == ["127.0.0.0/8", "::1/128"]
    env = ProxySettings.load(
        None,
        environ={"P2P_PROXY_UNCAPPED_ADDRESSES": "10.1.0.0/16, 192.0.2.7"},
        registry="registry.example.com",
    )
    assert [str(n) for n in env.uncapped_addresses] == ["10.1.0.0/16", "192.0.2.7/32"]


async def test_a_requester_pays_one_token_per_request_and_counts_each_start() -> None:
    metrics = ProxyMetrics()
    limits = OriginLimits(
        metrics,
        requests_per_address=2,
        rate_per_address=0.001,
        burst_per_address=2,
        uncapped=[ipaddress.ip_network("127.0.0.0/8")],
    )
    first = limits.requester(("10.0.0.5", 40000))
    ends = [first.admit(), first.admit()]  # one request, two origin requests: one token
    with pytest.raises(OCIError) as info:
        first.admit()  # two in progress already
    assert (info.value.code, info.value.status) == (ErrorCode.TOOMANYREQUESTS, 429)
    assert info.value.headers["Retry-After"] == "1"
    ends[0]()
    ends[0]()  # ending twice ends once
    assert limits.clients.running("10.0.0.5") == 1
    # Another request of the same client, by its IPv4-mapped spelling: the second token.
    second = limits.requester(("::ffff:10.0.0.5", 40001))
    second.admit()
    third = limits.requester(("10.0.0.5", 40002))
    ends[1]()
    with pytest.raises(OCIError) as info:
        third.admit()  # no token left; the rate refills one in 1000 s
    assert info.value.headers["Retry-After"] == "1000"
    assert metrics.origin_refusals.labels(reason="requests")._value.get() == 1
    assert metrics.origin_refusals.labels(reason="rate")._value.get() == 1
    # Loopback is uncapped: no limit, nothing counted.
    local = limits.requester(("127.0.0.1", 1))
    for _ in range(10):
        local.admit()
    assert limits.clients.running("127.0.0.1") == 0


async def test_fetch_slots_queue_then_refuse_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = ProxyMetrics()
    limits = OriginLimits(metrics, max_fetches=2, queue_timeout=30.0)
    release = trio.Event()
    order: list[str] = []
    refused: list[tuple[str, float, OCIError]] = []

    async def fetch(name: str) -> None:
        started = trio.current_time()
        try:
            async with limits.fetch_slot():
                order.append(name)
                await release.wait()
        except OCIError as exc:
            refused.append((name, trio.current_time() - started, exc))

    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c", "d"):
            nursery.start_soon(fetch, name)
            await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b"]
        assert (limits.fetches_running, limits.fetches_waiting) == (2, 2)
        assert metrics.origin_fetches_running._value.get() == 2
        assert metrics.origin_fetches_waiting._value.get() == 2
        await trio.sleep(10.0)
        release.set()  # "c" and "d" get the slots "a" and "b" leave
    assert (order[:2], sorted(order[2:])) == (["a", "b"], ["c", "d"])
    assert refused == []
    assert (limits.fetches_running, limits.fetches_waiting) == (0, 0)

    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for name in ("e", "f", "g"):
            nursery.start_soon(fetch, name)
            await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(31.0)
        assert [(name, waited) for name, waited, _ in refused] == [("g", 30.0)]
        release.set()
    error = refused[0][2]
    assert (error.code, error.status) == (ErrorCode.UNKNOWN, 503)
    assert error.headers["Retry-After"] == str(int(BUSY_RETRY_AFTER))
    assert metrics.origin_refusals.labels(reason="busy")._value.get() == 1
    assert (metrics.origin_fetches_running._value.get(), limits.fetches_waiting) == (0, 0)


async def test_a_free_slot_is_taken_even_with_a_zero_timeout() -> None:
    limits = OriginLimits(ProxyMetrics(), max_fetches=1, queue_timeout=0.0)
    for _ in range(3):
        async with limits.fetch_slot():
            assert limits.fetches_running == 1


# --- single flight and the fetcher --------------------------------------------------------------


class Admissions:
    """An admission that records its calls and refuses once ``allow`` is used up."""

    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.admitted = 0
        self.ended = 0

    def admit(self) -> Callable[[], None]:
        if self.admitted >= self.allow:
            raise OCIError(ErrorCode.TOOMANYREQUESTS, headers={"Retry-After": "1"})
        self.admitted += 1

        def end() -> None:
            self.ended += 1

        return end


async def test_single_flight_asks_the_starter_only_and_ends_its_claim(
    nursery: trio.Nursery,
) -> None:
    flights: SingleFlight[str, int] = SingleFlight(nursery, "test")
    release = trio.Event()

    async def work() -> int:
        await release.wait()
        return 7

    starter, joiner = Admissions(allow=1), Admissions(allow=0)
    results: list[int] = []

    async def ask(admission: Admissions) -> None:
        results.append(await flights.run("k", work, admission=admission))

    async with trio.open_nursery() as inner:
        inner.start_soon(ask, starter)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(5):
            inner.start_soon(ask, joiner)  # would be refused if it were asked
        await trio.testing.wait_all_tasks_blocked()
        assert (starter.admitted, starter.ended, joiner.admitted) == (1, 0, 0)
        assert flights.joined == 5
        release.set()
    assert results == [7] * 6
    assert starter.ended == 1
    # A refused start leaves nothing running and nothing to join.
    with pytest.raises(OCIError):
        await flights.run("other", work, admission=joiner)
    assert not flights.in_flight("other")
    assert flights.started == 1


async def test_the_claim_ends_when_the_work_fails(nursery: trio.Nursery) -> None:
    flights: SingleFlight[str, int] = SingleFlight(nursery, "test")

    async def fail() -> int:
        raise OCIError(ErrorCode.BLOB_UNKNOWN)

    admission = Admissions(allow=2)
    for _ in range(2):
        with pytest.raises(OCIError):
            await flights.run("k", fail, admission=admission)
    assert (admission.admitted, admission.ended) == (2, 2)


async def test_the_fetcher_charges_the_client_that_starts_a_fetch_not_the_joiners(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = make_random(700_000)
    digest = digest_of(data)
    other = make_random(300_000)
    own = {n: make_random(100_000 + n) for n in range(2, 6)}
    origin = FakeOrigin({digest_of(b): b for b in (data, other, *own.values())})
    origin.hold_after = 0
    fetcher, cache, metrics = make_fetcher(nursery, tmp_path)
    limits = OriginLimits(metrics, requests_per_address=1, rate_per_address=0.001)
    fetcher.limits = limits
    limits_of = {f"10.0.0.{n}": limits.requester((f"10.0.0.{n}", 1)) for n in range(1, 6)}
    async with origin.client() as client:
        results: list[int] = []

        async def get(address: str) -> None:
            meta = await fetcher.ensure(
                client, REPO, digest, None, len(data), admission=limits_of[address]
            )
            results.append(meta.length)

        async with trio.open_nursery() as inner:
            for n in range(1, 6):
                inner.start_soon(get, f"10.0.0.{n}")
                await trio.testing.wait_all_tasks_blocked()
            assert limits.clients.running("10.0.0.1") == 1
            assert sum(limits.clients.running(f"10.0.0.{n}") for n in range(2, 6)) == 0
            assert metrics.origin_joins.labels(kind="blob")._value.get() == 4
            # The starter is at its limit: another blob is refused at once, for it only.
            with pytest.raises(OCIError) as info:
                await fetcher.follow(
                    client,
                    REPO,
                    digest_of(other),
                    None,
                    len(other),
                    admission=limits.requester(("10.0.0.1", 2)),
                )
            assert info.value.status == 429
            origin.release.set()
        assert results == [len(data)] * 5
        assert origin.gets == [digest]
        assert limits.clients.running("10.0.0.1") == 0
        # The joiners kept their one token: each starts a fetch of its own; the starter
        # spent its token.
        for n, blob in own.items():
            admission = limits.requester((f"10.0.0.{n}", 3))
            meta = await fetcher.ensure(
                client, REPO, digest_of(blob), None, len(blob), admission=admission
            )
            assert meta.length == len(blob)
        assert sorted(origin.gets) == sorted([digest, *(digest_of(b) for b in own.values())])
        with pytest.raises(OCIError) as info:
            await fetcher.ensure(
                client,
                REPO,
                digest_of(make_random(1000)),
                None,
                1000,
                admission=limits.requester(("10.0.0.1", 4)),
            )
        assert info.value.status == 429
    assert metrics.origin_refusals.labels(reason="requests")._value.get() == 1
    assert metrics.origin_refusals.labels(reason="rate")._value.get() == 1
    assert cache.size(digest) == len(data)


# --- the line of large fetches per origin (largeFetchesPerOrigin) -------------------------------


async def test_large_fetches_wait_in_line_until_the_one_ahead_nears_its_end_or_stalls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = ProxyMetrics()
    limits = OriginLimits(metrics, line_width=1)
    size = 100 * LARGE_BLOB
    entered: dict[str, float] = {}
    reports: dict[str, Callable[[int], None]] = {}
    done = {name: trio.Event() for name in "abcdsux"}

    async def fetch(name: str, origin: str, blob_size: int | None) -> None:
        async with limits.fetch_line(origin, name, blob_size) as progress:
            entered[name] = trio.current_time()
            reports[name] = progress
            await done[name].wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch, "a", "o", size)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(fetch, "b", "o", size)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(fetch, "s", "o", LARGE_BLOB - 1)  # small: beside the line
        nursery.start_soon(fetch, "u", "o", None)  # size unknown: beside the line
        nursery.start_soon(fetch, "x", "other", size)  # another origin's line
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(entered) == ["a", "s", "u", "x"]
        assert limits.fetches_in_line == 1
        assert metrics.origin_fetches_in_line._value.get() == 1
        # "a" receives 1% a second: "b" waits as long as it progresses...
        for second in range(1, 99):
            await trio.sleep(1.0)
            reports["a"](second * size // 100)
            await trio.testing.wait_all_tasks_blocked()
        assert "b" not in entered
        # ...and starts when what "a" has left takes less than the head start.
        await trio.sleep(1.0 - HEAD_START_SECONDS)
        reports["a"](size - size // 100 * HEAD_START_SECONDS + 1)
        await trio.testing.wait_all_tasks_blocked()
        assert entered["b"] == 98.0 + 1.0 - HEAD_START_SECONDS
        # "c" waits behind "b", which never sends a byte: "c" starts when "b" has stalled.
        nursery.start_soon(fetch, "c", "o", size)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(fetch, "d", "o", size)  # after "c" (trio starts tasks in any order)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(STALL_SECONDS + 1.0)
        assert entered["c"] == entered["b"] + STALL_SECONDS
        assert "d" not in entered
        # A fetch that ends leaves the line to the next ("a" is nearly done, "b" stalled).
        done["c"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert entered["d"] == entered["c"] + 1.0
        for event in done.values():
            event.set()
    assert limits.fetches_in_line == 0
    assert metrics.origin_fetches_in_line._value.get() == 0
    assert limits._lines == {}


@pytest.mark.parametrize("width", [1, 0])
async def test_the_fetcher_fetches_one_origins_large_blobs_one_after_the_other(
    nursery: trio.Nursery, tmp_path: Path, width: int
) -> None:
    blobs = [make_random(LARGE_BLOB + 300_000 + n) for n in range(3)]
    small = make_random(100_000)
    origin = FakeOrigin({digest_of(b): b for b in (*blobs, small)})
    origin.chunk = 64 * 1024
    fetcher, _cache, metrics = make_fetcher(nursery, tmp_path)
    fetcher.limits = OriginLimits(metrics, line_width=width)
    sending = 0
    most = 0
    handle = origin.handle
    two_sending = trio.Event()

    async def counting(request: httpx.Request) -> httpx.Response:
        response = await handle(request)
        body = response.stream

        async def stream() -> AsyncIterator[bytes]:
            nonlocal sending, most
            if len(origin.blobs[request.url.path.rsplit("/", 1)[-1]]) >= LARGE_BLOB:
                sending += 1
                most = max(most, sending)
                if sending >= 2:
                    two_sending.set()
                try:
                    if not width:
                        # Without the line a second fetch starts while this one is held;
                        # held (not timed), so a loaded machine cannot finish the first
                        # before the second starts.
                        with trio.move_on_after(30):
                            await two_sending.wait()
                    async for part in cast(AsyncIterator[bytes], body):
                        yield part
                finally:
                    sending -= 1
            else:
                async for part in cast(AsyncIterator[bytes], body):
                    yield part

        return httpx.Response(response.status_code, headers=response.headers, content=stream())

    origin.handle = counting  # type: ignore[method-assign]
    async with origin.client() as client:

        async def get(data: bytes) -> None:
            meta = await fetcher.ensure(client, REPO, digest_of(data), None, len(data))
            assert meta.length == len(data)

        async with trio.open_nursery() as inner:
            for data in (*blobs, small):
                inner.start_soon(get, data)
                await trio.testing.wait_all_tasks_blocked()
    assert sorted(origin.gets) == sorted(digest_of(b) for b in (*blobs, small))
    if width:
        assert most == 1
        large = [d for d in origin.gets if d != digest_of(small)]
        assert large == [digest_of(b) for b in blobs]  # in the order asked
    else:
        assert most >= 2  # unordered, the fetches overlap (what the line prevents)


async def test_a_waiting_fetch_that_is_cancelled_leaves_the_line_to_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = ProxyMetrics()
    limits = OriginLimits(metrics, line_width=1)
    size = 10 * LARGE_BLOB
    entered: list[str] = []
    release = trio.Event()

    async def fetch(name: str) -> None:
        async with limits.fetch_line("o", name, size) as progress:
            entered.append(name)
            while not release.is_set():
                progress(1)  # "a" keeps receiving: it holds the line
                await trio.sleep(1.0)

    waiting = trio.CancelScope()

    async def hangs_up(name: str) -> None:
        with waiting:
            await fetch(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch, "a")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hangs_up, "b")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(fetch, "c")
        await trio.testing.wait_all_tasks_blocked()
        assert limits.fetches_in_line == 2
        waiting.cancel()  # "b" hangs up while it waits
        await trio.sleep(30.0)
        assert entered == ["a"]  # "c" still waits for "a", not for the gone "b"
        assert limits.fetches_in_line == 1
        release.set()
        await trio.sleep(2.0)
        assert entered == ["a", "c"]
    assert limits._lines == {}
