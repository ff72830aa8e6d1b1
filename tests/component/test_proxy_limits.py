"""The proxy's limits on origin work, in-process against the real registry: a client over its
limit of fetches in progress is refused with 429 while another client is served; a client
over its rate is refused while cache hits stay free; 20 clients joining one fetch all succeed
and pay nothing for it; ``maxOriginFetches`` holds and a fetch that cannot get a slot is 503;
one origin's large layers wait in line for each other and are all served.

Clients are told apart by source address: each test client binds its own loopback address
(127.0.0.2, 127.0.0.3, ...), and ``uncappedAddresses`` is emptied so that loopback is limited.
Origin responses are held at a gate (tests.realparts.gate) so that fetches stay in progress
for as long as a test needs; what the proxy does meanwhile is read from ``/metrics``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from p2p_proxy.fetchline import LARGE_BLOB
from tests.cluster import push
from tests.component.test_proxy_harness import (
    ACCEPT_LINES,
    Proxy,
    accept,
    chunks_of,
    run_proxy,
)
from tests.realparts import images
from tests.realparts.gate import Gate, gated_forwarder
from tests.realparts.registry import Registry, run_registry

pytestmark = pytest.mark.realparts

REPO = "library/app"
MANIFESTS = accept(*ACCEPT_LINES)


@dataclass
class Origin:
    registry: Registry
    image: images.Image

    @property
    def layers(self) -> tuple[images.Blob, ...]:
        return tuple(self.image.layers)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    base = tmp_path_factory.mktemp("limits")
    with run_registry(base / "registry", auth="none") as registry:
        # Distinct layers of a few hundred KB: each is one distinct origin fetch.
        sizes = [200_000 + 1000 * n for n in range(12)]
        yield Origin(registry, push(base, registry, REPO, seed="limits", layer_sizes=sizes))


@asynccontextmanager
async def clients(port: int, count: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``count`` HTTP clients of the proxy, each from its own address (127.0.0.2 up)."""
    async with AsyncExitStack() as stack:
        made = []
        for n in range(count):
            transport = httpx.AsyncHTTPTransport(local_address=f"127.0.0.{n + 2}")
            made.append(
                await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=f"http://127.0.0.1:{port}", transport=transport, timeout=30
                    )
                )
            )
        yield made


@asynccontextmanager
async def gated_proxy(
    tmp_path: Path, origin: Origin, **overrides: object
) -> AsyncIterator[tuple[Proxy, Gate]]:
    """A proxy whose origin answers pass through a gate (open until a test closes it)."""
    async with gated_forwarder(origin.registry.port) as gate:
        url = f"http://127.0.0.1:{gate.port}"
        async with run_proxy(tmp_path / "data", [url], **overrides) as proxy:
            yield proxy, gate


async def metainfo(client: httpx.AsyncClient, blob: images.Blob) -> httpx.Response:
    return await client.get("/p2p/v1/metainfo", params={"name": REPO, "digest": blob.digest})


async def authorize(proxy: Proxy, blobs: tuple[images.Blob, ...]) -> None:
    """Have the proxy check (and remember, ``authCacheTtl``) that anonymous callers may read
    ``blobs``, so that later requests reach the fetch without asking the origin first."""
    for blob in blobs:
        head = await proxy.http.head(f"/v2/{REPO}/blobs/{blob.digest}")
        assert head.status_code == 200


def hold(gate: Gate) -> None:
    """From now on the origin's answers wait at the gate until ``gate.release`` is set."""
    gate.hold_after = gate.sent


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait (at most 20 s) until ``check()`` holds: the proxy reached a state."""
    with trio.fail_after(20):
        while not await check():  # noqa: ASYNC110 - the state is only visible in /metrics
            await trio.sleep(0.02)


async def until_metric(proxy: Proxy, name: str, value: float, **labels: str) -> None:
    """Wait until the proxy's metric ``name`` has ``value``."""

    async def reached() -> bool:
        return await proxy.metric(name, **labels) == value

    await until(reached)


def assert_refused(response: httpx.Response, status: int, code: str) -> int:
    """A registry JSON error with a ``Retry-After`` of whole seconds; returns those."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.json()["errors"][0]["code"] == code
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit()
    assert int(retry_after) >= 1
    return int(retry_after)


async def test_a_client_over_its_fetches_in_progress_gets_429_while_another_is_served(
    origin: Origin, tmp_path: Path
) -> None:
    first, second, third, fourth = origin.layers[:4]
    before = origin.registry.blob_gets()
    async with (
        gated_proxy(tmp_path, origin, uncapped_addresses=[], origin_requests_per_address=2) as (
            proxy,
            gate,
        ),
        clients(proxy.port, 2) as (greedy, other),
    ):
        await authorize(proxy, (first, second, third, fourth))
        hold(gate)
        answers: dict[str, httpx.Response] = {}

        async def ask(client: httpx.AsyncClient, blob: images.Blob) -> None:
            answers[blob.digest] = await metainfo(client, blob)

        async def running() -> float:
            return await proxy.metric("p2p_proxy_origin_fetches_running")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, greedy, first)
            nursery.start_soon(ask, greedy, second)
            await until_metric(proxy, "p2p_proxy_origin_fetches_running", 2)
            # A third distinct fetch is one too many for this client: refused at once,
            # while its two fetches are still held at the origin.
            refused = await metainfo(greedy, third)
            assert assert_refused(refused, 429, "TOOMANYREQUESTS") == 1
            assert await running() == 2
            # Another client is still served: its fetch starts.
            nursery.start_soon(ask, other, fourth)
            await until_metric(proxy, "p2p_proxy_origin_fetches_running", 3)
            assert answers == {}
            gate.release.set()
        for blob in (first, second, fourth):
            chunks_of(answers[blob.digest], blob)
        # Its fetches have ended: the client may start another.
        chunks_of(await metainfo(greedy, third), third)
        assert await proxy.metric("p2p_proxy_origin_refusals_total", reason="requests") == 1
        assert await proxy.metric("p2p_proxy_origin_refusals_total", reason="rate") == 0
        assert await proxy.metric("p2p_proxy_errors_total", code="TOOMANYREQUESTS") == 1
    fetched = origin.registry.blob_gets() - before
    assert {blob.digest: fetched[blob.digest] for blob in (first, second, third, fourth)} == {
        first.digest: 1,
        second.digest: 1,
        third.digest: 1,
        fourth.digest: 1,
    }


async def test_twenty_clients_joining_one_fetch_all_succeed_and_pay_nothing(
    origin: Origin, tmp_path: Path
) -> None:
    blob = origin.layers[4]
    before = origin.registry.blob_gets()
    # Each client may start one origin request, once (the rate refills a token in 1000 s).
    limits = {
        "uncapped_addresses": [],
        "origin_requests_per_address": 1,
        "origin_burst_per_address": 1,
        "origin_rate_per_address": 0.001,
    }
    async with (
        gated_proxy(tmp_path, origin, **limits) as (proxy, gate),
        clients(proxy.port, 20) as agents,
    ):
        await authorize(proxy, (blob,))
        hold(gate)
        answers: list[httpx.Response | None] = [None] * len(agents)

        async def ask(index: int) -> None:
            answers[index] = await metainfo(agents[index], blob)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, 0)
            await until_metric(proxy, "p2p_proxy_origin_fetches_running", 1)
            for index in range(1, len(agents)):
                nursery.start_soon(ask, index)
            await until_metric(proxy, "p2p_proxy_origin_joins_total", len(agents) - 1, kind="blob")
            assert answers == [None] * len(agents)  # all still waiting for the one fetch
            gate.release.set()
        metas = [chunks_of(answer, blob) for answer in answers if answer is not None]
        assert len(metas) == len(agents)
        assert len({meta.info_hash for meta in metas}) == 1
        assert await proxy.metric("p2p_proxy_origin_refusals_total", reason="requests") == 0
        assert await proxy.metric("p2p_proxy_origin_refusals_total", reason="rate") == 0

        # Joining cost the joiners nothing: each still starts an origin request of its own
        # (a tag resolution), while the client that started the fetch has spent its token.
        for agent in agents[1:]:
            manifest = await agent.get(f"/v2/{REPO}/manifests/latest", headers=MANIFESTS)
            assert manifest.status_code == 200, manifest.text
        refused = await agents[0].get(f"/v2/{REPO}/manifests/latest", headers=MANIFESTS)
        assert assert_refused(refused, 429, "TOOMANYREQUESTS") >= 900
        assert await proxy.metric("p2p_proxy_origin_refusals_total", reason="rate") == 1
    assert (origin.registry.blob_gets() - before)[blob.digest] == 1


async def test_a_client_over_its_rate_is_refused_and_cache_hits_stay_free(
    origin: Origin, tmp_path: Path
) -> None:
    blob = origin.layers[5]
    manifest = f"/v2/{REPO}/manifests/latest"
    limits = {
        "uncapped_addresses": [],
        "origin_burst_per_address": 3,
        "origin_rate_per_address": 0.001,
    }
    async with (
        run_proxy(tmp_path / "data", [origin.registry.url], **limits) as proxy,
        clients(proxy.port, 2) as (eager, other),
    ):
        for _ in range(3):  # the burst: three tag resolutions at the origin
            assert (await eager.get(manifest, headers=MANIFESTS)).status_code == 200
        heads = await proxy.metric("p2p_proxy_manifest_origin_requests_total", method="HEAD")
        assert heads == 3
        refused = await eager.get(manifest, headers=MANIFESTS)
        assert assert_refused(refused, 429, "TOOMANYREQUESTS") >= 900
        assert (
            await proxy.metric("p2p_proxy_manifest_origin_requests_total", method="HEAD") == heads
        )  # nothing went to the origin for it
        # Another client is served, and what it brought into the cache is free for everyone.
        assert (await other.get(manifest, headers=MANIFESTS)).status_code == 200
        chunks_of(await metainfo(other, blob), blob)
        chunks_of(await metainfo(eager, blob), blob)
        fallback = await eager.get(f"/v2/{REPO}/blobs/{blob.digest}")
        assert (fallback.status_code, fallback.content) == (200, blob.data)
        assert await proxy.metric("p2p_proxy_origin_refusals_total", reason="rate") == 1


async def test_the_global_cap_on_fetches_holds_and_a_fetch_without_a_slot_is_503(
    origin: Origin, tmp_path: Path
) -> None:
    blobs = origin.layers[6:10]
    before = origin.registry.blob_gets()
    # Loopback keeps its default exemption: one client, no per-client limit, only the cap.
    # originQueueTimeout long enough that the two waiting fetches are seen waiting before they
    # give up, however loaded the machine (a 1 s timeout lost that race under a load of 5).
    async with gated_proxy(tmp_path, origin, max_origin_fetches=2, origin_queue_timeout=5.0) as (
        proxy,
        gate,
    ):
        await authorize(proxy, blobs)
        hold(gate)
        answers: dict[str, httpx.Response] = {}

        async def ask(blob: images.Blob) -> None:
            answers[blob.digest] = await metainfo(proxy.http, blob)

        async def two_answered() -> bool:
            await trio.lowlevel.checkpoint()
            return len(answers) >= 2

        async with trio.open_nursery() as nursery:
            for blob in blobs:
                nursery.start_soon(ask, blob)
            await until_metric(proxy, "p2p_proxy_origin_fetches_running", 2)
            await until_metric(proxy, "p2p_proxy_origin_fetches_waiting", 2)
            # The two without a slot give up after originQueueTimeout, the others still held.
            await until(two_answered)
            assert await proxy.metric("p2p_proxy_origin_fetches_running") == 2
            assert await proxy.metric("p2p_proxy_origin_fetches_waiting") == 0
            busy = list(answers.values())
            assert len(busy) == 2
            for response in busy:
                assert assert_refused(response, 503, "UNKNOWN") == 5
            gate.release.set()
        served = {d for d, r in answers.items() if r.status_code == 200}
        refused = {d for d, r in answers.items() if r.status_code == 503}
        assert len(served) == len(refused) == 2
        assert await proxy.metric("p2p_proxy_origin_refusals_total", reason="busy") == 2
        fetched = origin.registry.blob_gets() - before
        # The origin saw the two fetches that had a slot, and nothing of the two that did not.
        assert {blob.digest for blob in blobs if fetched[blob.digest]} == served
        assert all(fetched[digest] == 1 for digest in served)
        # With the slots free again, a refused blob is fetched.
        retry = next(blob for blob in blobs if blob.digest in refused)
        chunks_of(await metainfo(proxy.http, retry), retry)
        assert await proxy.metric("p2p_proxy_origin_fetches_running") == 0


async def test_one_origins_large_layers_are_fetched_one_at_a_time_and_all_served(
    tmp_path: Path,
) -> None:
    """Three layers of 4.5 MB asked at once: one is fetched, two wait in line (never refused)
    while the origin holds the first; released, every one is served, each fetched once."""
    with run_registry(tmp_path / "registry", auth="none") as registry:
        image = push(tmp_path, registry, REPO, seed="line", layer_sizes=[4_500_000] * 3)
        layers = tuple(image.layers)
        assert all(blob.size >= LARGE_BLOB for blob in layers)
        big = Origin(registry, image)
        async with gated_proxy(tmp_path, big) as (proxy, gate):
            await authorize(proxy, layers)
            hold(gate)
            answers: dict[str, httpx.Response] = {}

            async def ask(blob: images.Blob) -> None:
                answers[blob.digest] = await metainfo(proxy.http, blob)

            async with trio.open_nursery() as nursery:
                for blob in layers:
                    nursery.start_soon(ask, blob)
                await until_metric(proxy, "p2p_proxy_origin_fetches_in_line", 2)
                assert sum(registry.blob_gets().values()) <= 1
                assert await proxy.metric("p2p_proxy_origin_fetches_running") == 1
                gate.release.set()
            for blob in layers:
                chunks_of(answers[blob.digest], blob)
            assert await proxy.metric("p2p_proxy_origin_fetches_in_line") == 0
            fetched = registry.blob_gets()
            assert all(fetched[blob.digest] == 1 for blob in layers)
