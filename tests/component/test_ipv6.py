"""A pull over IPv6 only: tracker, proxy and two agents on ::1 (no IPv4 listener at all), the
second agent gets the blob from the first through the swarm.

Every listener of the p2p parts is bound to ::1 alone (IPV6_V6ONLY), so any announce, proxy
request or peer connection that works went over IPv6: the tracker answers the agents with BEP 7
``peers6``, the agents ask the proxy at ``http://[::1]:port``. The origin registry stays on
127.0.0.1 (it is the outside world; the proxy reaches it like any origin).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from p2p_common import bencoding
from p2p_common.blobinfo import BlobMetainfo
from p2p_common.listen import has_ipv6
from p2p_common.tracker_proto import AnnounceRequest, announce_url, parse_announce_response
from tests.cluster import origin_with_image, run_agent, run_proxy, run_tracker
from tests.engine_helpers import wait_until
from tests.realparts import images
from tests.realparts.registry import Registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


def ipv6_loopback() -> bool:
    if not has_ipv6():
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    if not ipv6_loopback():
        pytest.fail("this test needs the IPv6 loopback (::1)")
    with origin_with_image(
        tmp_path_factory.mktemp("origin"), seed="ipv6", layer_sizes=(3 * MiB,)
    ) as origin:
        yield origin


async def test_a_pull_through_the_swarm_over_ipv6(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[0]
    path = f"/v2/team/app/blobs/{layer.digest}"
    async with run_tracker(host="::1") as tracker:
        assert tracker.startswith("http://[::1]:")
        async with (
            # The proxy seeds slowly, so the second agent takes most of the blob from the first.
            run_proxy(
                tmp_path / "proxy", [registry.url], [tracker], host="::1", upload_rate="1MB"
            ) as proxy,
            run_agent(tmp_path / "a", [registry.url], [proxy.url], host="::1") as first,
            run_agent(tmp_path / "b", [registry.url], [proxy.url], host="::1") as second,
        ):
            assert proxy.url.startswith("http://[::1]:")
            assert second.host.startswith("[::1]:")
            with trio.fail_after(60):
                assert (await first.http.get(path)).content == layer.data
            cached = first.settings.data_dir / "blobs" / "sha256" / layer.digest[7:]
            with trio.fail_after(10):
                await wait_until(cached.exists)  # published: the first agent seeds it whole
            with trio.fail_after(60):
                assert (await second.http.get(path)).content == layer.data
            published = second.settings.data_dir / "blobs" / "sha256" / layer.digest[7:]
            with trio.fail_after(10):  # a swarm download counts its bytes once published
                await wait_until(published.exists)
            from_first = await second.metric("p2p_agent_download_bytes_total", source="agent")
            from_proxy = await second.metric("p2p_agent_download_bytes_total", source="proxy")
            assert from_first > 0
            assert from_first + from_proxy == layer.size
            # The agents announced to the IPv6 tracker, which lists them in peers6 (BEP 7).
            status = (await second.status.get("/status")).json()
            (instance,) = status["trackers"]["instances"]
            assert (instance["url"], instance["ok"]) == (tracker, True)
            params = {"name": "team/app", "digest": layer.digest}
            frames = await proxy.http.get("/p2p/v1/metainfo", params=params)
            blob = BlobMetainfo.from_frames(layer.digest, layer.size, frames.content)
            async with httpx.AsyncClient(trust_env=False) as http:
                request = AnnounceRequest(blob.info_hash, b"-XX0001-" + b"6" * 12, 1, left=1)
                answer = await http.get(announce_url(tracker, request))
            doc = bencoding.decode_dict(answer.content)
            assert doc[b"peers"] == b""  # nobody announced over IPv4
            listed = {(p.ip, p.port) for p in parse_announce_response(answer.content).peers}
            ports = {first.settings.peer_port, second.settings.peer_port}
            assert {("::1", port) for port in ports} <= listed
