"""What the services log about a pull never names a swarm by its infohash.

The infohash of a private blob is a capability for its swarm: whoever holds it can announce
for it and connect to its peers. Logs go to places (node log collectors, support tickets)
that credentials and capabilities must not, so an event names a blob by its digest.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from p2p_common.blobinfo import BlobMetainfo
from tests.cluster import basic, origin_with_image, run_agent, run_proxy, run_tracker
from tests.engine_helpers import wait_until
from tests.realparts import images
from tests.realparts.procs import free_port
from tests.realparts.registry import Registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
QUIET = ("httpx", "httpcore", "hypercorn.access")
"""Loggers every service sets to WARNING (p2p_common.logs.setup): below it they log request
URLs and response headers, announces included."""


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    with origin_with_image(
        tmp_path_factory.mktemp("origin"), seed="logs", layer_sizes=(6 * MiB,)
    ) as origin:
        yield origin


@pytest.fixture
def quiet_libraries() -> Iterator[None]:
    """The library loggers at WARNING, as in the services."""
    loggers = [logging.getLogger(name) for name in QUIET]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def spellings(info_hash: bytes) -> list[str]:
    """How an infohash could show up in a log line."""
    return [
        info_hash.hex(),
        info_hash.hex().upper(),
        urllib.parse.quote_from_bytes(info_hash, safe=""),
        urllib.parse.quote_from_bytes(info_hash),
        repr(info_hash)[2:-1],
    ]


async def test_a_pull_through_two_agents_logs_no_infohash(
    origin: tuple[Registry, images.Image],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    quiet_libraries: None,
) -> None:
    caplog.set_level(logging.DEBUG)
    registry, image = origin
    layer = image.layers[0]
    path = f"/v2/team/app/blobs/{layer.digest}"
    dead = f"http://127.0.0.1:{free_port()}/announce"  # failed announces are logged too
    trackers = [dead]
    async with run_tracker() as tracker:
        trackers.append(tracker)
        async with (
            run_proxy(tmp_path / "proxy", [registry.url], trackers, progressive_streams=0) as proxy,
            run_agent(tmp_path / "a", [registry.url], [proxy.url]) as first,
            run_agent(tmp_path / "b", [registry.url], [proxy.url]) as second,
        ):
            for agent in (first, second):
                with trio.fail_after(60):
                    response = await agent.http.get(path, headers=basic("any", "one"))
                assert response.content == layer.data
                cached = agent.settings.data_dir / "blobs" / "sha256" / layer.digest[7:]
                with trio.fail_after(10):  # published (and logged) just after the last byte
                    await wait_until(cached.exists)
        # Restarted, both reseed what they cached; the proxy answers for it from its cache.
        async with (
            run_proxy(tmp_path / "proxy", [registry.url], trackers) as proxy,
            run_agent(tmp_path / "a", [registry.url], [proxy.url]) as first,
        ):
            params = {"name": "team/app", "digest": layer.digest}
            answer = await proxy.http.get("/p2p/v1/metainfo", params=params)
            blob = BlobMetainfo.from_frames(layer.digest, layer.size, answer.content)
            assert (await first.http.get(path)).content == layer.data
    info_hashes = [blob.info_hash, *(chunk.info_hash for chunk in blob.chunks)]
    assert len(set(info_hashes)) == 3  # the swarm id and two chunks

    records = caplog.records
    events = {record.getMessage() for record in records}
    # The capture sees the events that used to carry an infohash, and the pull's own.
    assert {"proxy.seeding", "proxy.metainfo", "proxy.fetched", "download.complete"} <= events
    assert any(  # a seed from the cache (not while fetching)
        r.getMessage() == "proxy.seeding" and "while_fetching" not in getattr(r, "p2p_fields", {})
        for r in records
    )
    for record in records:
        text = " ".join(
            [
                record.getMessage(),
                repr(getattr(record, "p2p_fields", {})),
                repr(record.args),
                logging.Formatter().formatException(record.exc_info) if record.exc_info else "",
            ]
        )
        for info_hash in info_hashes:
            assert not any(s in text for s in spellings(info_hash)), (record.name, text)
