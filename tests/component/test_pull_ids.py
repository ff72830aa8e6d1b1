"""One pull, one id: the agent's id for a client request is in its own log lines, in the
proxy's for that request and in the lines of the origin fetch the proxy starts for it; the
status views show it (JSON logs as the services write them, real registry)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2p_common.logs import JsonFormatter, valid_pull_id
from tests.cluster import origin_with_image, run_agent, run_proxy, run_tracker
from tests.engine_helpers import wait_until
from tests.realparts import images
from tests.realparts.registry import Registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    with origin_with_image(
        tmp_path_factory.mktemp("origin"), seed="pull-ids", layer_sizes=(3 * MiB,)
    ) as origin:
        yield origin


def json_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """Every captured record as the services write it with ``logFormat: json``."""
    formatter = JsonFormatter()
    return [json.loads(formatter.format(record)) for record in caplog.records]


def of_pull(lines: list[dict[str, Any]], pull_id: str, prefix: str) -> set[str]:
    """The events of loggers under ``prefix`` that name ``pull_id``."""
    return {
        line["event"]
        for line in lines
        if line["logger"].startswith(prefix)
        and (line.get("pull_id") == pull_id or pull_id in line.get("pull_ids", []))
    }


async def test_one_pull_is_followed_from_agent_to_proxy_to_origin(
    origin: tuple[Registry, images.Image], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="p2p")
    registry, image = origin
    layer = image.layers[0]
    path = f"/v2/team/app/blobs/{layer.digest}"
    async with (
        run_tracker() as tracker,
        run_proxy(tmp_path / "proxy", [registry.url], [tracker]) as proxy,
        run_agent(tmp_path / "a", [registry.url], [proxy.url]) as first,
        run_agent(tmp_path / "b", [registry.url], [proxy.url]) as second,
    ):
        with trio.fail_after(60):
            pulled = await first.http.get(path)
        assert pulled.content == layer.data
        pull_id = pulled.headers["x-p2p-pull-id"]
        assert valid_pull_id(pull_id) == pull_id
        with trio.fail_after(10):  # the pull's last lines follow its last byte
            await wait_until(
                lambda: "pull.finished" in of_pull(json_lines(caplog), pull_id, "p2p.agent")
            )
        # The same blob through the second agent: another pull, another id, no fetch.
        with trio.fail_after(60):
            again = await second.http.get(path)
        assert again.content == layer.data
        second_id = again.headers["x-p2p-pull-id"]
        assert second_id != pull_id
        manifest = await first.http.get(
            f"/v2/team/app/manifests/{image.tag}", headers={"Accept": image.top.media_type}
        )
        manifest_id = manifest.headers["x-p2p-pull-id"]
        assert len({pull_id, second_id, manifest_id}) == 3

        agent_status = (await first.status.get("/status")).json()
        proxy_status = (await proxy.http.get("/status")).json()

    lines = json_lines(caplog)
    # The agent: the request, the download it started, the pull's end.
    assert {"download.started", "download.complete", "pull.finished"} <= of_pull(
        lines, pull_id, "p2p.agent"
    )
    # The proxy: the agent's requests for it (authorization, chunks) and the origin fetch it
    # started for it, with the id in pull_id and in the fetch's list of pulls.
    proxy_events = of_pull(lines, pull_id, "p2p.proxy")
    assert {"proxy.fetching", "proxy.fetched", "proxy.seeding"} <= proxy_events, proxy_events
    (fetched,) = [line for line in lines if line["event"] == "proxy.fetched"]
    assert fetched["pull_id"] == pull_id
    assert fetched["pull_ids"] == [pull_id]
    assert fetched["digest"] == layer.digest
    # The second pull reached the proxy under its own id and started no origin work.
    assert of_pull(lines, second_id, "p2p.proxy")
    assert "proxy.fetching" not in of_pull(lines, second_id, "p2p.proxy")
    assert "pull.finished" in of_pull(lines, second_id, "p2p.agent")
    # Nothing was logged under an id that is not one of these pulls' (or the proxy's own for
    # requests without one: none here).
    named = {line["pull_id"] for line in lines if "pull_id" in line}
    assert named <= {pull_id, second_id, manifest_id}
    # The status views show the same ids.
    (shown,) = [p for p in agent_status["recent"] if p["digest"] == layer.digest]
    assert shown["id"] == pull_id
    (fetch,) = proxy_status["recent_fetches"]
    assert (fetch["pull_ids"], fetch["pulls"]) == ([pull_id], 1)
