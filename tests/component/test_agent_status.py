"""An operator's view of a running agent: ``/status``, the page at ``/`` and ``p2p-agent
status``, while a pull runs and after it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.cluster import origin_with_image, run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.registry import Registry
from tests.services import service_binary, service_env

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    with origin_with_image(
        tmp_path_factory.mktemp("status"),
        seed="status",
        tag="1.0",
        layer_sizes=(6 * MiB, 200 * 1024),
    ) as origin:
        yield origin


def status_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [service_binary("agent"), "status", "--url", url, *args],
        env={**service_env(), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_status_shows_a_pull_while_it_runs_and_after(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[0]
    path = f"/v2/team/app/blobs/{layer.digest}"
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
        # 2 MB/s: the 6 MiB layer takes about 3 s, long enough to be seen in flight.
        run_agent(
            tmp_path / "agent", [registry.url], [proxy.url], download_rate=2_000_000
        ) as agent,
    ):
        status_url = str(agent.status.base_url).rstrip("/")
        received = bytearray()

        async def pull() -> None:
            async with agent.http.stream("GET", path) as response:
                assert response.status_code == 200
                async for data in response.aiter_bytes():
                    received.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pull)
            with trio.fail_after(60):
                while True:
                    doc = (await agent.status.get("/status")).json()
                    running = [p for p in doc["pulls"] if p["digest"] == layer.digest]
                    if running and running[0]["bytes"] > 0 and doc["downloads"]:
                        break
                    await trio.sleep(0.05)
            (pull_now,) = running
            assert pull_now["source"] == "download"
            assert pull_now["size"] == layer.size
            assert 0 < pull_now["percent"] < 100
            assert pull_now["first_byte_seconds"] is not None
            (download,) = doc["downloads"]
            assert download["digest"] == layer.digest
            assert download["way"] == "swarm"
            assert download["peers_by_role"].get("proxy") == 1
            assert doc["rates"]["download_bytes_per_second"] == 2_000_000
            # The terminal view, while the pull runs.
            shown = await trio.to_thread.run_sync(lambda: status_cli(status_url, "--once"))
            assert shown.returncode == 0, shown.stderr
            assert "team/app" in shown.stdout
            assert layer.digest[7:19] in shown.stdout
        assert bytes(received) == layer.data

        with trio.fail_after(30):  # the server's side of the response ends just after ours
            while (doc := (await agent.status.get("/status")).json())["pulls"]:  # noqa: ASYNC110
                await trio.sleep(0.05)
        done = [p for p in doc["recent"] if p["digest"] == layer.digest]
        assert done[0]["outcome"] == "done"
        assert done[0]["bytes"] == layer.size
        assert doc["last_successful_pull_at"] is not None
        assert [i["ok"] for i in doc["proxies"]["instances"]] == [True]
        with trio.fail_after(30):  # published into the cache just after the last byte
            while (await agent.status.get("/status")).json()["cache"]["blobs"] < 1:  # noqa: ASYNC110
                await trio.sleep(0.05)

        # The tracker the proxy wrote into the metainfo, as the agent saw it answer.
        with trio.fail_after(30):
            while True:
                doc = (await agent.status.get("/status")).json()
                if any(t["ok"] for t in doc["trackers"]["instances"]):
                    break
                await trio.sleep(0.05)
        assert doc["trackers"]["listed"] == [announce]
        (tracker,) = doc["trackers"]["instances"]
        assert (tracker["url"], tracker["listed"], tracker["failures"]) == (announce, announce, 0)
        assert tracker["answers"] >= 1
        assert tracker["last_answer_at"] is not None
        # Rewrite mode so far; no mirrorConfigPath, so hosts.toml is unknown.
        (entry,) = doc["mirror"]["registries"]
        assert (entry["registry"], entry["state"]) == (registry.host, "unknown")
        assert entry["rewrite_requests"] >= 1
        assert entry["mirror_requests"] == 0
        meta = await proxy.http.get(
            "/p2p/v1/metainfo", params={"name": "team/app", "digest": layer.digest}
        )
        assert meta.headers["x-p2p-info-hash"] not in json.dumps(doc)

        # A cache hit is a pull too (here in mirror mode, as containerd asks with hosts.toml).
        assert (await agent.http.get(path, params={"ns": registry.host})).content == layer.data
        with trio.fail_after(30):
            while (doc := (await agent.status.get("/status")).json())["pulls"]:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert doc["recent"][0]["source"] == "cache"
        assert doc["recent"][0]["bytes"] == layer.size
        assert doc["mirror"]["registries"][0]["mirror_requests"] == 1
        assert doc["mirror"]["registries"][0]["last_mirror_request_at"] is not None

        printed = await trio.to_thread.run_sync(lambda: status_cli(status_url, "--json"))
        assert printed.returncode == 0, printed.stderr
        assert json.loads(printed.stdout)["recent"][0]["digest"] == layer.digest

        page = await agent.status.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert b"p2p agent" in page.content


def test_status_names_an_agent_it_cannot_reach() -> None:
    shown = status_cli("http://127.0.0.1:9")
    assert shown.returncode == 1
    assert "cannot read http://127.0.0.1:9/status" in shown.stderr
