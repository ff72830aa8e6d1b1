"""Preheat (issue 10, section 2): the proxy fetches every blob of an image once and seeds it
before a rollout, so the rollout costs the origin nothing; against the real registry."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.cluster import ProxyHandle, basic, origin_with_image, run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.registry import DEFAULT_USERS, Registry
from tests.services import service_binary, service_env

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
ALICE = basic("alice", DEFAULT_USERS["alice"])


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    with origin_with_image(
        tmp_path_factory.mktemp("preheat"),
        repository="private/app",
        auth="token",
        creds=("alice", "alice-secret"),
        seed="preheat",
        tag="1.0",
        layer_sizes=(3 * MiB, 2 * MiB),
        platforms=["linux/amd64", "linux/arm64"],
    ) as origin:
        yield origin


async def preheat(
    proxy: ProxyHandle, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Start a job and wait for it to end; its last view."""
    started = await proxy.http.post("/p2p/v1/preheat", json=body, headers=headers)
    assert started.status_code == 202, started.text
    job: dict[str, Any] = started.json()
    assert started.headers["location"] == f"/p2p/v1/preheat/{job['id']}"
    with trio.fail_after(60):
        while job["state"] not in ("done", "failed"):
            await trio.sleep(0.05)
            job = (await proxy.http.get(f"/p2p/v1/preheat/{job['id']}")).json()
    return job


def cached(proxy: ProxyHandle) -> set[str]:
    root = proxy.settings.data_dir / "blobs" / "sha256"
    return {"sha256:" + p.name for p in root.iterdir() if not p.suffix}


async def test_a_preheated_platform_costs_the_origin_nothing_in_the_rollout(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    arm = next(i for i in image.images if i.platform == "linux/arm64")
    amd = next(i for i in image.images if i.platform == "linux/amd64")
    wanted = {b.digest for b in (arm.config, *arm.layers)}
    before = registry.blob_gets()
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
    ):
        job = await preheat(
            proxy, {"image": "private/app:1.0", "platforms": ["linux/arm64"]}, ALICE
        )
        assert job["state"] == "done", job
        assert {b["digest"] for b in job["blobs"]} == wanted
        assert all(b["state"] == "fetched" for b in job["blobs"])
        assert job["percent"] == 100.0
        assert cached(proxy) == wanted  # only the platform asked for
        preheated = registry.blob_gets()
        for digest in wanted:
            assert preheated[digest] - before[digest] == 1
        for blob in (amd.config, *amd.layers):
            assert preheated[blob.digest] == before[blob.digest]

        # Again: nothing to fetch.
        again = await preheat(
            proxy, {"image": "private/app:1.0", "platforms": ["linux/arm64"]}, ALICE
        )
        assert [b["state"] for b in again["blobs"]] == ["cached"] * len(wanted)

        # The rollout: an agent pulls every arm64 blob; the origin sends none of them.
        async with run_agent(tmp_path / "agent", [registry.url], [proxy.url]) as agent:
            for blob in (arm.config, *arm.layers):
                response = await agent.http.get(
                    f"/v2/private/app/blobs/{blob.digest}", headers=ALICE
                )
                assert response.content == blob.data
        after = registry.blob_gets()
        for digest in wanted:
            assert after[digest] == preheated[digest]
        listed = (await proxy.http.get("/p2p/v1/preheat")).json()["jobs"]
        assert [j["id"] for j in listed] == [again["id"], job["id"]]


async def test_preheat_needs_the_origins_consent_and_a_well_formed_request(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, _ = origin
    async with run_proxy(tmp_path / "proxy", [registry.url], []) as proxy:
        anonymous = await preheat(proxy, {"image": "private/app:1.0"})
        assert anonymous["state"] == "failed"
        assert anonymous["blobs"] == []
        assert anonymous["error"]
        missing = await preheat(
            proxy, {"image": "private/app:1.0", "platforms": ["linux/s390x"]}, ALICE
        )
        assert missing["state"] == "failed"
        assert "linux/s390x" in missing["error"]
        assert cached(proxy) == set()
        for body, status in ((b"not json", 400), (b'{"image": 5}', 400), (b"{}", 400)):
            answer = await proxy.http.post("/p2p/v1/preheat", content=body)
            assert answer.status_code == status, answer.text
            assert answer.json()["errors"][0]["code"]
        assert (await proxy.http.get("/p2p/v1/preheat/999")).status_code == 404
        assert (await proxy.http.delete("/p2p/v1/preheat")).status_code == 405


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [service_binary("proxy"), "preheat", *args],
        env={**service_env(), "HOME": env.pop("HOME", "/nonexistent"), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_command_line_preheats_with_a_docker_login(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    amd = next(i for i in image.images if i.platform == "linux/amd64")
    login = base64.b64encode(f"alice:{DEFAULT_USERS['alice']}".encode()).decode()
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"auths": {registry.host: {"auth": login}}}))
    async with run_proxy(tmp_path / "proxy", [registry.url], []) as proxy:
        image_ref = f"{registry.host}/private/app:1.0"
        proxy_url = f"http://127.0.0.1:{proxy.port}"
        refused = await trio.to_thread.run_sync(
            lambda: run_cli(image_ref, "--proxy", proxy_url, "--platform", "linux/amd64")
        )
        assert refused.returncode == 1  # no login: the origin refuses
        assert "failed" in refused.stderr
        done = await trio.to_thread.run_sync(
            lambda: run_cli(
                image_ref,
                "--proxy",
                proxy_url,
                "--platform",
                "linux/amd64",
                "--docker-config",
                str(config),
            )
        )
        assert done.returncode == 0, done.stderr
        assert "done" in done.stdout.splitlines()[-1]
        assert cached(proxy) == {b.digest for b in (amd.config, *amd.layers)}
        # The same login from the environment.
        again = await trio.to_thread.run_sync(
            lambda: run_cli(
                image_ref,
                "--proxy",
                proxy_url,
                "--json",
                P2P_PREHEAT_USERNAME="alice",
                P2P_PREHEAT_PASSWORD=DEFAULT_USERS["alice"],
            )
        )
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["state"] == "done"  # both platforms now


def test_the_command_line_says_when_the_proxy_is_unreachable() -> None:
    unreachable = run_cli("team/app:1.0", "--proxy", "http://127.0.0.1:9")
    assert unreachable.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in unreachable.stderr
