"""``p2p-proxy status`` and ``p2p-agent status`` (the real commands, as subprocesses) against
a tracker, a proxy and an agent running as processes from their config files, with the
distribution registry as origin behind a gate that stalls it mid-blob: the proxy's status shows
a preheat and its origin fetch while they run and after; the agent's shows, after a pull, the
tracker it announced to and the mirror-mode state of its registry."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import trio

from tests.demo.cluster import ProcessSet, plan_cluster
from tests.realparts import images
from tests.realparts.gate import gated_forwarder
from tests.realparts.registry import run_registry
from tests.services import service_binary, service_env

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
DEADLINE = 120.0
"""Seconds any one state may take to show up (generous: the machine may be loaded)."""


def status_cli(kind: Literal["proxy", "agent"], url: str, *args: str) -> str:
    """The command's output; fails the test on a non-zero exit."""
    done = subprocess.run(
        [service_binary(kind), "status", "--url", url, *args],
        env={**service_env(), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def wait_status(
    kind: Literal["proxy", "agent"], url: str, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first ``status --json`` document for which ``ready`` holds."""
    doc: dict[str, Any] = {}
    try:
        with trio.fail_after(DEADLINE):
            while True:
                doc = json.loads(await trio.to_thread.run_sync(status_cli, kind, url, "--json"))
                if ready(doc):
                    return doc
                await trio.sleep(0.1)
    except trio.TooSlowError:
        raise AssertionError(f"{kind} status never got there; last:\n{json.dumps(doc)}") from None


async def test_status_commands_show_a_preheat_and_a_pull(tmp_path: Path) -> None:
    with run_registry(tmp_path / "registry", auth="none") as registry:
        image = images.build_image(
            tmp_path / "layout", seed="status-procs", tag="1.0", layer_sizes=(8 * MiB,)
        )
        images.push_image(tmp_path / "layout", image, registry.host, "team/app")
        (layer,) = image.layers
        config = image.images[0].config
        async with gated_forwarder(registry.port) as gate:
            gate.hold_after = 3 * MiB  # manifest and config pass, the layer stalls
            origin = f"127.0.0.1:{gate.port}"
            certs = tmp_path / "certs.d"
            cluster = plan_cluster(
                tmp_path / "cluster",
                f"http://{origin}",
                agents=1,
                proxies=1,
                overrides={"agent": {"mirrorConfigPath": str(certs)}},
            )
            tracker, proxy, agent = cluster.services
            announce = f"{tracker.url}/announce"
            # containerd's hosts.toml for the origin, naming this agent (as the chart writes it).
            (certs / origin).mkdir(parents=True)
            (certs / origin / "hosts.toml").write_text(
                "# managed-by: p2p release kube-system/p2p\n"
                f'server = "http://{origin}"\n'
                f'[host."http://{agent.config["listen"]}"]\n'
                '  capabilities = ["pull", "resolve"]\n'
            )
            agent_status = f"http://{agent.config['metricsListen']}"
            processes = ProcessSet()
            try:
                cluster.start(processes)
                with trio.fail_after(DEADLINE):
                    await cluster.wait_ready()
                async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                    started = await http.post(
                        f"{proxy.url}/p2p/v1/preheat", json={"image": "team/app:1.0"}
                    )
                    assert started.status_code == 202, started.text
                    job_id = started.json()["id"]
                    with trio.fail_after(DEADLINE):
                        await gate.holding.wait()

                    # While the origin stalls: the fetch and the job, in flight.
                    doc = await wait_status(
                        "proxy",
                        proxy.url,
                        lambda d: any(
                            f["digest"] == layer.digest and f["bytes"] > 0 for f in d["fetches"]
                        ),
                    )
                    (fetch,) = [f for f in doc["fetches"] if f["digest"] == layer.digest]
                    assert (fetch["registry"], fetch["repository"]) == (origin, "team/app")
                    assert fetch["size"] == layer.size
                    assert 0 < fetch["percent"] < 100
                    assert fetch["outcome"] == "running"
                    assert doc["origin"]["bytes"] >= fetch["bytes"]
                    assert doc["limits"]["origin_fetches_running"] >= 1
                    (job,) = doc["preheat"]
                    assert (job["id"], job["image"], job["state"]) == (
                        job_id,
                        "team/app:1.0",
                        "fetching",
                    )
                    assert job["percent"] < 100
                    assert job["blobs"] == 2
                    table = await trio.to_thread.run_sync(status_cli, "proxy", proxy.url, "--once")
                    for shown in ("p2p proxy", "fetches from the origin", "team/app:1.0"):
                        assert shown in table, shown
                    assert layer.digest[7:19] in table

                    # Released: the job is done, the fetch is recent, the blobs are seeded.
                    gate.release.set()
                    doc = await wait_status(
                        "proxy",
                        proxy.url,
                        lambda d: (
                            d["preheat"][0]["state"] == "done"
                            and any(t["ok"] for t in d["trackers"]["instances"])
                        ),
                    )
                    (job,) = doc["preheat"]
                    assert (job["percent"], job["blobs_ready"], job["blobs_fetched"]) == (
                        100.0,
                        2,
                        2,
                    )
                    done = [f for f in doc["recent_fetches"] if f["digest"] == layer.digest]
                    assert [(f["outcome"], f["bytes"]) for f in done] == [("done", layer.size)]
                    assert doc["fetches"] == []
                    assert doc["origin"]["bytes"] == layer.size + config.size
                    assert doc["origin"]["fetches_done"] == 2
                    assert doc["cache"]["blobs"] == 2
                    assert doc["cache"]["blob_bytes"] == layer.size + config.size
                    assert doc["seeding"]["blobs"] == 2
                    assert doc["trackers"]["listed"] == [announce]
                    assert doc["trackers"]["instances"][0]["url"] == announce

                    # An agent pulls the layer (mirror mode, as containerd with hosts.toml).
                    pulled = await http.get(
                        f"{agent.url}/v2/team/app/blobs/{layer.digest}", params={"ns": origin}
                    )
                    assert pulled.content == layer.data
                    meta = await http.get(
                        f"{proxy.url}/p2p/v1/metainfo",
                        params={"name": "team/app", "digest": layer.digest},
                    )
                    info_hash = meta.headers["x-p2p-info-hash"]
                agent_doc = await wait_status(
                    "agent",
                    agent_status,
                    lambda d: (
                        any(t["ok"] for t in d["trackers"]["instances"])
                        and any(p["digest"] == layer.digest for p in d["recent"])
                    ),
                )
                assert agent_doc["trackers"]["listed"] == [announce]
                (seen,) = agent_doc["trackers"]["instances"]
                assert (seen["url"], seen["ok"], seen["failures"]) == (announce, True, 0)
                assert seen["answers"] >= 1
                (entry,) = agent_doc["mirror"]["registries"]
                assert (entry["registry"], entry["state"]) == (origin, "mirrored")
                assert entry["managed_by"] == "p2p release kube-system/p2p"
                assert entry["mirror_requests"] >= 1
                assert agent_doc["mirror"]["config_path"] == str(certs)
                table = await trio.to_thread.run_sync(status_cli, "agent", agent_status, "--once")
                for shown in ("trackers", announce, "answering", "mirrored"):
                    assert shown in table, shown

                # The proxy seeded the layer to the agent.
                doc = await wait_status(
                    "proxy",
                    proxy.url,
                    lambda d: any(s["digest"] == layer.digest for s in d["seeding"]["top"]),
                )
                assert doc["peers"]["upload_bytes"] > 0
                for text in (json.dumps(doc), json.dumps(agent_doc)):
                    assert info_hash not in text  # the swarm's capability stays hidden
                cluster.check_alive(when="after the status checks")
            finally:
                results = processes.stop_all()
    assert all(r.returncode == 0 for r in results), results
