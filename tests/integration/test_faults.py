"""Faults while pulls run (issue 8, items 14 and 15): real service processes, killed for real.

- The tracker is SIGKILLed in the middle of a rollout through four agents and restarted on the
  same port: the pulls in flight finish byte-identical, the restarted tracker refills from the
  re-announces, and an agent started afterwards pulls the image, partly from the other agents.
- An agent is SIGKILLed after part of a large layer arrived and restarted on the same dataDir
  (with one of its recorded pieces damaged meanwhile): the next pull is byte-identical, fetches
  only what was missing (plus the damaged piece), and no byte it ever served is wrong.

Every wait is for an event (a file in a data dir, a log line, a metric); the agents' download
rate is limited so that the faults land in the middle of the pulls.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2p_common.bitfield import Bitfield
from p2p_common.metainfo import piece_count, piece_length_for
from tests.demo.cluster import Cluster, ProcessSet, Service, plan_cluster, service_command
from tests.realparts import images
from tests.realparts.procs import ManagedProcess
from tests.realparts.registry import run_registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
REPO = "team/app"
POLL = 0.05
DEADLINE = 90.0
"""Seconds any one awaited event may take (generous: a loaded 2-core machine)."""


# --- helpers ----------------------------------------------------------------------------------


async def metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` (with ``labels``) that a ``/metrics`` page shows."""
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        response = await client.get(url)
    response.raise_for_status()
    total = 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += float(sample.value)
    return total


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], what: str, *, alive: Cluster | None = None
) -> Any:
    """Poll ``predicate`` until it returns something truthy, for at most :data:`DEADLINE`
    seconds (failing early if a service of ``alive`` exits)."""
    with trio.move_on_after(DEADLINE):
        while True:
            if alive is not None:
                alive.check_alive(when=f"while waiting for {what}")
            result = await predicate()
            if result:
                return result
            await trio.sleep(POLL)
    raise AssertionError(f"timed out after {DEADLINE:g} s waiting for {what}")


def start(service: Service, processes: ProcessSet) -> None:
    """(Re)start one planned service from its config file, logging to the same file."""
    process = ManagedProcess(
        [*service_command(service.kind), "--config", str(service.config_path)],
        service.log_path,
        name=service.name,
        stop_timeout=10.0,
    )
    process.env = {k: v for k, v in process.env.items() if not k.startswith("P2P_")}
    service.process = process
    process.start()
    processes.add(service.name, process)


def sigkill(service: Service) -> None:
    process = service.process
    assert process is not None
    assert process.running, f"{service.name} is not running"
    process.kill()
    assert process.returncode == -9, process.returncode


def log_events(service: Service, since: int = 0) -> list[dict[str, Any]]:
    """The JSON events of a service's log from byte ``since`` on."""
    with open(service.log_path, "rb") as file:
        file.seek(since)
        text = file.read().decode(errors="replace")
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue  # a line being written
    return found


def partial_paths(agent: Service, digest: str) -> tuple[Path, Path]:
    """The data and bitfield files of an agent's download in progress (see
    p2p_common.blobcache: ``dataDir/partial/sha256-<hex>.{data,bits}``)."""
    assert agent.data_dir is not None
    base = agent.data_dir / "partial" / ("sha256-" + digest.removeprefix("sha256:"))
    return base.with_suffix(".data"), base.with_suffix(".bits")


def bitfield_on_disk(agent: Service, digest: str, size: int) -> Bitfield | None:
    """The pieces an agent's persisted bitfield records for a download in progress."""
    pieces = piece_count(size, piece_length_for(size))
    try:
        raw = partial_paths(agent, digest)[1].read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) != (pieces + 7) // 8:
        return None
    return Bitfield.from_bytes(raw, pieces)


def flip_byte(path: Path, offset: int) -> None:
    """Damage one byte of a file in place."""
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def cached(agent: Service, digest: str) -> Path:
    assert agent.data_dir is not None
    return agent.data_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")


# --- item 14: the tracker dies and comes back during a rollout --------------------------------

ROLLOUT_LAYERS = (14 * MiB, 10 * MiB, 6 * MiB)
ROLLOUT_RATE = 4_000_000
"""Bytes per second each rollout agent may download: about 8 s for the image, so the tracker
is killed while every pull is still running."""


async def test_tracker_killed_and_restarted_mid_rollout(tmp_path: Path) -> None:
    with run_registry(tmp_path / "registry", auth="none") as registry:
        image = images.build_image(
            tmp_path / "layout", seed="tracker-kill", tag="1.0", layer_sizes=ROLLOUT_LAYERS
        )
        images.push_image(tmp_path / "layout", image, registry.host, REPO)
        swarmed = len(image.layers)  # every layer is above swarmMinSize; the config is not
        before = registry.blob_gets()
        plan = plan_cluster(
            tmp_path / "cluster",
            registry.url,
            agents=5,
            proxies=1,
            overrides={
                "tracker": {"logFormat": "json"},
                "proxy": {"logFormat": "json"},
                "agent": {"logFormat": "json", "downloadRate": ROLLOUT_RATE},
            },
        )
        tracker = plan.of("tracker")[0]
        *rollout, late = plan.agents
        late.config["downloadRate"] = 0
        cluster = Cluster([s for s in plan.services if s is not late])
        processes = ProcessSet()
        try:
            cluster.start(processes)
            with trio.fail_after(DEADLINE):
                await cluster.wait_ready()

            done: dict[str, bool] = {}
            (tmp_path / "pulled").mkdir()

            async def pull(agent: Service) -> None:
                await trio.to_thread.run_sync(
                    lambda: images.pull_and_compare(
                        image, agent.config["listen"], REPO, tmp_path / "pulled" / agent.name
                    )
                )
                done[agent.name] = True

            async with trio.open_nursery() as nursery:
                for agent in rollout:
                    nursery.start_soon(pull, agent)

                # Every agent has begun receiving layer data and the tracker has met the swarm.
                def receiving(agent: Service) -> bool:
                    assert agent.data_dir is not None
                    return any(
                        p.stat().st_size > 0 for p in (agent.data_dir / "partial").glob("*.data")
                    )

                async def swarm_underway() -> bool:
                    if not all(receiving(a) for a in rollout):
                        return False
                    peers = await metric_sum(tracker.metrics_url, "p2p_tracker_peers")
                    return peers >= len(rollout)

                await wait_for(swarm_underway, "every agent to receive data", alive=cluster)
                offsets = {a.name: a.log_path.stat().st_size for a in rollout}
                sigkill(tracker)
                in_flight_at_kill = sorted(a.name for a in rollout if not done.get(a.name))

                # Every agent noticed: one of its announces failed against the dead tracker.
                async def announces_failed() -> bool:
                    return all(
                        any(e["event"] == "announce.failed" for e in log_events(a, offsets[a.name]))
                        for a in rollout
                    )

                await wait_for(announces_failed, "every agent's announces to fail")
                start(tracker, processes)  # same config, same port
                with trio.fail_after(DEADLINE):
                    await Cluster([tracker]).wait_ready()
                # The pulls in flight finish (pull_and_compare: byte-identical).
                with trio.fail_after(2 * DEADLINE):
                    while len(done) < len(rollout):
                        cluster.check_alive(when="during the rollout")
                        await trio.sleep(POLL)

            # The restarted tracker refills from the agents' re-announces (and their
            # "completed" announces) until it lists them as seeders again.
            async def refilled() -> bool:
                seeders = await metric_sum(tracker.metrics_url, "p2p_tracker_seeders")
                return seeders >= len(rollout) * swarmed

            await wait_for(refilled, "the restarted tracker to list the agents", alive=cluster)

            # A new pull after the restart: a fresh agent, fed partly by the others.
            late_cluster = Cluster([late])
            late_cluster.start(processes)
            cluster.services.append(late)
            with trio.fail_after(DEADLINE):
                await late_cluster.wait_ready()
            with trio.fail_after(2 * DEADLINE):
                await pull(late)

            async def late_complete() -> bool:
                return (
                    sum(e["event"] == "download.complete" for e in log_events(late)) >= swarmed
                    and await metric_sum(late.metrics_url, "p2p_agent_download_bytes_total") > 0
                )

            await wait_for(late_complete, "the late agent's downloads to complete", alive=cluster)
            late_from_agents = await metric_sum(
                late.metrics_url, "p2p_agent_download_bytes_total", source="agent"
            )
            cluster.check_alive(when="after the pulls")
        finally:
            results = processes.stop_all()
        assert all(r.returncode == 0 for r in results), results
        after = registry.blob_gets()

    assert in_flight_at_kill == sorted(a.name for a in rollout), (
        f"only {in_flight_at_kill} were pulling when the tracker was killed"
    )
    assert sorted(done) == sorted(a.name for a in plan.agents)
    for digest in image.blobs():
        assert after[digest] - before[digest] == 1, f"{digest} left the origin more than once"
    assert late_from_agents > 0, "the late agent got nothing from the other agents"


# --- item 15: an agent dies mid-pull and resumes on the same dataDir --------------------------

RESUME_LAYER = 32 * MiB
RESUME_RATE = 4_000_000
"""Bytes per second the agent may download: a quarter of the layer takes about 2 s, the
whole about 8 s, so the kill lands in the middle."""


async def test_agent_killed_mid_pull_resumes_from_verified_pieces(tmp_path: Path) -> None:
    with run_registry(tmp_path / "registry", auth="none") as registry:
        image = images.build_image(
            tmp_path / "layout", seed="agent-kill", tag="1.0", layer_sizes=(RESUME_LAYER,)
        )
        images.push_image(tmp_path / "layout", image, registry.host, REPO)
        [layer] = image.layers
        config_blob = image.images[0].config
        piece_length = piece_length_for(layer.size)
        pieces = piece_count(layer.size, piece_length)
        cluster = plan_cluster(
            tmp_path / "cluster",
            registry.url,
            agents=1,
            proxies=1,
            overrides={
                "proxy": {"logFormat": "json"},
                "agent": {"logFormat": "json", "downloadRate": RESUME_RATE},
            },
        )
        [agent] = cluster.agents
        [proxy] = cluster.of("proxy")
        data_path, _ = partial_paths(agent, layer.digest)
        processes = ProcessSet()
        try:
            cluster.start(processes)
            with trio.fail_after(DEADLINE):
                await cluster.wait_ready()

            # First pull: stream the layer, SIGKILL the agent once a quarter of its pieces
            # are recorded on disk.
            received = bytearray()
            broken: list[BaseException] = []
            finished = trio.Event()

            async def first_pull() -> None:
                try:
                    async with (
                        httpx.AsyncClient(
                            base_url=agent.url, timeout=DEADLINE, trust_env=False
                        ) as http,
                        http.stream("GET", f"/v2/{REPO}/blobs/{layer.digest}") as response,
                    ):
                        assert response.status_code == 200, response.status_code
                        async for chunk in response.aiter_bytes():
                            received.extend(chunk)
                except httpx.TransportError as exc:
                    broken.append(exc)
                finally:
                    finished.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first_pull)

                async def quarter_recorded() -> Bitfield | None:
                    bits = bitfield_on_disk(agent, layer.digest, layer.size)
                    return bits if bits is not None and bits.count >= pieces // 4 else None

                await wait_for(quarter_recorded, "a quarter of the pieces on disk", alive=cluster)
                sigkill(agent)
                with trio.fail_after(DEADLINE):
                    await finished.wait()

            assert broken, "the pull was not cut by the kill"
            assert 0 < len(received) < layer.size
            assert received == layer.data[: len(received)], "a wrong byte was served"
            assert not cached(agent, layer.digest).exists()

            # What the killed agent left: the pieces it recorded, all of them intact.
            recorded = bitfield_on_disk(agent, layer.digest, layer.size)
            assert recorded is not None
            assert pieces // 4 <= recorded.count < pieces
            on_disk = data_path.read_bytes()
            for index in recorded:
                start_at = index * piece_length
                piece = on_disk[start_at : start_at + piece_length]
                assert piece == layer.data[start_at : start_at + piece_length], index
            # A torn write: one recorded piece is damaged before the restart. It must be
            # checked, dropped and fetched again, never served.
            damaged = next(iter(recorded))
            flip_byte(data_path, damaged * piece_length + 1000)
            resumable = (recorded.count - 1) * piece_length

            # Restart on the same dataDir (same config); pull the whole image with skopeo.
            proxy_sent_before = await metric_sum(
                proxy.metrics_url, "p2p_proxy_peer_upload_bytes_total"
            ) + await metric_sum(proxy.metrics_url, "p2p_proxy_http_fallback_bytes_total")
            restart_offset = agent.log_path.stat().st_size
            start(agent, processes)
            with trio.fail_after(DEADLINE):
                await cluster.wait_ready()
            with trio.fail_after(2 * DEADLINE):
                await trio.to_thread.run_sync(
                    lambda: images.pull_and_compare(
                        image, agent.config["listen"], REPO, tmp_path / "pulled"
                    )
                )

            async def layer_complete() -> bool:
                return (
                    any(
                        e["event"] == "download.complete" and e.get("digest") == layer.digest
                        for e in log_events(agent, restart_offset)
                    )
                    and await metric_sum(agent.metrics_url, "p2p_agent_download_bytes_total") > 0
                )

            await wait_for(layer_complete, "the resumed download to complete", alive=cluster)
            fetched = await metric_sum(agent.metrics_url, "p2p_agent_download_bytes_total")
            proxy_sent = (
                await metric_sum(proxy.metrics_url, "p2p_proxy_peer_upload_bytes_total")
                + await metric_sum(proxy.metrics_url, "p2p_proxy_http_fallback_bytes_total")
                - proxy_sent_before
            )

            # Served again from the cache: still the layer, every byte.
            async with httpx.AsyncClient(
                base_url=agent.url, timeout=DEADLINE, trust_env=False
            ) as http:
                again = await http.get(f"/v2/{REPO}/blobs/{layer.digest}")
            assert again.status_code == 200
            assert hashlib.sha256(again.content).hexdigest() == layer.digest.removeprefix("sha256:")
            cluster.check_alive(when="after the pulls")
        finally:
            results = processes.stop_all()
        assert all(r.returncode == 0 for r in results), results

    assert cached(agent, layer.digest).read_bytes() == layer.data
    assert not data_path.exists()
    # Resumed: the second run fetched what was missing, the damaged piece included, and
    # not the verified pieces it already had (the config blob, a few hundred bytes, too).
    missing = layer.size - resumable
    assert fetched < layer.size, (fetched, layer.size)
    assert missing <= fetched - config_blob.size <= missing + 4 * piece_length, (fetched, missing)
    assert proxy_sent < layer.size, (proxy_sent, layer.size)
