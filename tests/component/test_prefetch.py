"""``p2p-agent prefetch`` (issue 10, section 2): an agent pulls an image into its cache before a
rollout, with the credentials of a Docker config file, against the real token-auth registry."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2p_agent.prefetch_cli import main as prefetch
from p2p_agent.prefetch_cli import node_platform, split_reference
from tests.cluster import AgentHandle, origin_with_image, run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.registry import Registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    with origin_with_image(
        tmp_path_factory.mktemp("prefetch"),
        repository="private/app",
        auth="token",
        creds=("alice", "alice-secret"),
        seed="prefetch",
        tag="1.0",
        layer_sizes=(3 * MiB, 64 * 1024),
        platforms=["linux/amd64", "linux/arm64"],
    ) as origin:
        yield origin


def docker_config(path: Path, registry: str, user: str, password: str) -> Path:
    """What ``docker login`` (or a kubernetes.io/dockerconfigjson Secret) holds."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    return path


def cached(agent: AgentHandle) -> set[str]:
    root = agent.settings.data_dir / "blobs" / "sha256"
    return {"sha256:" + p.name for p in root.iterdir() if not p.suffix}


async def run_prefetch(*argv: str) -> int:
    return await trio.to_thread.run_sync(prefetch, list(argv))


async def test_prefetch_fills_the_agent_cache_with_the_platform_asked_for(
    origin: tuple[Registry, images.Image], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry, image = origin
    arm = next(i for i in image.images if i.platform == "linux/arm64")
    amd = next(i for i in image.images if i.platform == "linux/amd64")
    config = docker_config(tmp_path / "config.json", registry.host, "alice", "alice-secret")
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
        run_agent(tmp_path / "agent", [registry.url], [proxy.url]) as agent,
    ):
        url = f"http://{agent.host}"
        code = await run_prefetch(
            f"{registry.host}/private/app:1.0",
            "--url",
            url,
            "--platform",
            "linux/arm64",
            "--docker-config",
            str(config),
            "--json",
        )
        out = capsys.readouterr().out
        assert code == 0, out
        (outcome,) = json.loads(out)
        wanted = {b.digest for b in (arm.config, *arm.layers)}
        assert outcome["blobs"] == len(wanted)
        assert outcome["bytes"] == sum(b.size for b in (arm.config, *arm.layers))
        assert outcome["errors"] == []
        # Every blob of the platform asked for is cached: published (verified, renamed into
        # the cache) a moment after its last byte went out.
        with trio.fail_after(30):
            while not wanted <= cached(agent):  # noqa: ASYNC110 - the cache is files
                await trio.sleep(0.05)
        assert not {b.digest for b in amd.layers} & cached(agent)  # not the other platform

        # wrong credentials: the origin decides, nothing is cached, exit code 1
        bad = docker_config(tmp_path / "bad.json", registry.host, "alice", "wrong")
        code = await run_prefetch(
            f"{registry.host}/private/app:1.0",
            "--url",
            url,
            "--platform",
            "linux/amd64",
            "--docker-config",
            str(bad),
        )
        assert code == 1
        assert "UNAUTHORIZED" in capsys.readouterr().err
        assert not {b.digest for b in amd.layers} & cached(agent)


async def test_an_agent_that_never_answers_is_an_error_not_a_hang(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = await run_prefetch("team/app:1.0", "--url", "http://127.0.0.1:9", "--wait", "0")
    assert code == 1
    assert "no agent answers" in capsys.readouterr().err


def test_a_bad_credentials_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "config.json"
    broken.write_text("{not json")
    code = prefetch(
        ["registry.example.com/team/app:1.0", "--docker-config", str(broken), "--wait", "0"]
    )
    assert code == 2
    assert "not a readable Docker config file" in capsys.readouterr().err


def test_the_node_platform_is_named_as_image_indexes_name_it() -> None:
    assert node_platform("x86_64") == "linux/amd64"
    assert node_platform("aarch64") == "linux/arm64"
    assert node_platform("armv7l") == "linux/arm/v7"
    assert node_platform("mips64") == "linux/mips64"


names = st.from_regex(r"[a-z0-9]+(/[a-z0-9]+){0,3}", fullmatch=True)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True)
digests = st.from_regex(r"sha256:[a-f0-9]{64}", fullmatch=True)


@given(name=names, tag=tags)
def test_a_tag_reference_splits_back(name: str, tag: str) -> None:
    assert split_reference(f"{name}:{tag}") == (name, tag)
    assert split_reference(name) == (name, "latest")


@given(name=names, digest=digests)
def test_a_digest_reference_splits_back(name: str, digest: str) -> None:
    assert split_reference(f"{name}@{digest}") == (name, digest)
