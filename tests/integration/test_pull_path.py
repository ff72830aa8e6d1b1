"""The pull path end to end with real parts: distribution registry with token auth, skopeo
and containerd as clients, our tracker, proxies and agents (in this process, through their
real serve() wiring)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.cluster import AgentHandle, ProxyHandle, basic, run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.containerd import run_containerd, write_mirror_hosts
from tests.realparts.procs import free_port
from tests.realparts.registry import DEFAULT_USERS, Registry, run_registry

pytestmark = pytest.mark.realparts

ALICE = ("alice", DEFAULT_USERS["alice"])
BOB = ("bob", DEFAULT_USERS["bob"])
MiB = 1024 * 1024


@dataclass
class Pushed:
    image: images.Image
    repository: str


@pytest.fixture(scope="module")
def origin(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, dict[str, Pushed]]]:
    """A token-auth registry holding a private OCI image, a public multi-platform index and a
    private Docker schema 2 image (alice may pull private/*, bob and anonymous only public/*)."""
    workdir = tmp_path_factory.mktemp("origin")
    with run_registry(workdir / "registry", auth="token") as registry:
        pushed = {}
        for key, repository, options in (
            ("private", "private/app", {"seed": "p", "layer_sizes": (3 * MiB, 5 * MiB + 17)}),
            (
                "index",
                "public/multi",
                {
                    "seed": "m",
                    "layer_sizes": (2 * MiB,),
                    "platforms": ["linux/amd64", "linux/arm64"],
                },
            ),
            (
                "docker",
                "private/docker",
                {"seed": "d", "layer_sizes": (MiB,), "docker_schema2": True},
            ),
        ):
            layout = workdir / f"layout-{key}"
            image = images.build_image(layout, tag="1.0", **options)  # type: ignore[arg-type]
            images.push_image(layout, image, registry.host, repository, creds=ALICE)
            pushed[key] = Pushed(image, repository)
        yield registry, pushed


@dataclass
class Cluster:
    proxies: list[ProxyHandle]
    agents: list[AgentHandle]


@asynccontextmanager
async def cluster(
    tmp_path: Path,
    registries: list[str],
    *,
    proxies: int = 2,
    agents: int = 3,
    proxy_options: dict[str, object] | None = None,
    **agent_options: object,
) -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as stack:
        announce = await stack.enter_async_context(run_tracker())
        proxy_handles = [
            await stack.enter_async_context(
                run_proxy(tmp_path / f"proxy{n}", registries, [announce], **(proxy_options or {}))
            )
            for n in range(proxies)
        ]
        urls = [p.url for p in proxy_handles]
        agent_handles = [
            await stack.enter_async_context(
                run_agent(tmp_path / f"agent{n}", registries, urls, **agent_options)
            )
            for n in range(agents)
        ]
        yield Cluster(proxy_handles, agent_handles)


def origin_requests(registry: Registry) -> int:
    """Requests the registry answered, without the harness's own log markers."""
    return sum(1 for e in registry.access_log() if "p2p-log-marker" not in e.query)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def blocking(function, *args, **kwargs):  # type: ignore[no-untyped-def]
    return await trio.to_thread.run_sync(partial(function, *args, **kwargs))


# --- rewrite mode ---------------------------------------------------------------------------------


async def test_skopeo_and_containerd_pull_a_private_image_through_different_agents(
    origin: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, pushed = origin
    private = pushed["private"]
    before = registry.blob_gets()
    # A proxy held to 4 MB/s: on loopback it would otherwise send a whole blob before the
    # agents have even met through the tracker.
    async with cluster(tmp_path, [registry.url], proxy_options={"upload_rate": 4_000_000}) as c:
        first, second, third = c.agents
        # skopeo through the first agent, with alice's credentials (its imagePullSecret).
        await blocking(
            images.pull_and_compare,
            private.image,
            first.host,
            private.repository,
            tmp_path / "skopeo-out",
            creds=ALICE,
        )
        # containerd through the second, the same credentials.
        with run_containerd(tmp_path / "containerd") as ctr:
            await blocking(ctr.pull, f"{second.host}/{private.repository}:1.0", user=ALICE)
            for digest, blob in private.image.blobs().items():
                assert await blocking(ctr.content_get, digest) == blob.data
        # and the third with skopeo again: everything by now comes from peers.
        await blocking(
            images.pull_and_compare,
            private.image,
            third.host,
            private.repository,
            tmp_path / "skopeo-out-3",
            creds=ALICE,
        )
        from_peers = sum(
            [await a.metric("p2p_agent_download_bytes_total", source="agent") for a in c.agents]
        )
        from_proxies = sum(
            [
                await a.metric("p2p_agent_download_bytes_total", source=source)
                for a in c.agents
                for source in ("proxy", "proxy_stream")
            ]
        )
    after = registry.blob_gets()
    for digest in private.image.blobs():
        assert after[digest] - before[digest] == 1, f"{digest} left the origin more than once"
    layer_bytes = sum(b.size for b in private.image.blobs().values())
    assert from_peers + from_proxies == 3 * layer_bytes
    assert from_peers > 0


async def test_anonymous_callers_get_a_basic_challenge_and_wrong_credentials_401(
    origin: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, pushed = origin
    private = pushed["private"]
    layer = private.image.layers[0].digest
    async with cluster(tmp_path, [registry.url], proxies=1, agents=1) as c:
        agent = c.agents[0]
        for path in (
            f"/v2/{private.repository}/manifests/1.0",
            f"/v2/{private.repository}/blobs/{layer}",
        ):
            anonymous = await agent.http.get(path)
            assert anonymous.status_code == 401
            assert anonymous.headers["www-authenticate"].startswith("Basic ")
            assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
            wrong = await agent.http.get(path, headers=basic("alice", "not-her-password"))
            assert wrong.status_code == 401
            assert wrong.headers["www-authenticate"].startswith("Basic ")


async def test_a_caller_without_rights_cannot_obtain_a_blob_already_cached_on_the_agent(
    origin: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, pushed = origin
    private = pushed["private"]
    layer = private.image.layers[0]
    path = f"/v2/{private.repository}/blobs/{layer.digest}"
    async with cluster(tmp_path, [registry.url], proxies=1, agents=1) as c:
        agent = c.agents[0]
        got = await agent.http.get(path, headers=basic(*ALICE))
        assert got.status_code == 200
        assert sha256(got.content) == layer.digest
        cached = agent.settings.data_dir / "blobs" / "sha256" / layer.digest[7:]
        with trio.fail_after(30):  # published (verified, renamed) a moment after the last byte
            while not cached.exists():  # noqa: ASYNC110 - a file, no event to wait for
                await trio.sleep(0.02)
        for headers in (basic(*BOB), {}):
            for method in ("GET", "HEAD"):
                refused = await agent.http.request(method, path, headers=headers)
                assert refused.status_code in (401, 403), refused.status_code
                assert layer.data[:64] not in refused.content
        # The same digest asked through a repository bob may read (where it does not exist).
        other = await agent.http.get(
            f"/v2/{pushed['index'].repository}/blobs/{layer.digest}", headers=basic(*BOB)
        )
        assert other.status_code == 404
        assert other.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


# --- mirror mode ----------------------------------------------------------------------------------


async def test_containerd_mirror_mode_pulls_through_the_agent(
    origin: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, pushed = origin
    public = pushed["index"]
    async with cluster(tmp_path, [registry.url], proxies=1, agents=1) as c:
        agent = c.agents[0]
        hosts = tmp_path / "hosts"
        write_mirror_hosts(
            hosts, registry.host, f"http://127.0.0.1:{free_port()}", f"http://{agent.host}"
        )
        with run_containerd(tmp_path / "containerd") as ctr:
            await blocking(
                ctr.pull,
                f"{registry.host}/{public.repository}:1.0",
                hosts_dir=hosts,
                platform="linux/arm64",
            )
            arm = next(i for i in public.image.images if i.platform == "linux/arm64")
            for blob in (arm.manifest, arm.config, *arm.layers):
                assert await blocking(ctr.content_get, blob.digest) == blob.data
        served = await agent.metric("p2p_agent_pull_bytes_total")
    assert served >= sum(layer.size for layer in arm.layers)


async def test_an_unconfigured_registry_gets_404_at_once_and_is_never_contacted(
    origin: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, _pushed = origin
    with run_registry(tmp_path / "other", auth="none") as other:
        before = origin_requests(other)
        async with cluster(tmp_path, [registry.url], proxies=1, agents=1) as c:
            agent = c.agents[0]
            for path in ("/v2/x/manifests/1.0", f"/v2/x/blobs/sha256:{'a' * 64}", "/v2/"):
                with trio.fail_after(2):
                    response = await agent.http.get(path, params={"ns": other.host})
                assert response.status_code == 404
                assert response.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        assert origin_requests(other) == before


# --- HTTP details ---------------------------------------------------------------------------------


async def test_range_and_head_requests_on_blobs(
    origin: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, pushed = origin
    layer = pushed["private"].image.layers[1]
    path = f"/v2/{pushed['private'].repository}/blobs/{layer.digest}"
    auth = basic(*ALICE)
    async with cluster(tmp_path, [registry.url], proxies=1, agents=2) as c:
        cold, warm = c.agents
        head = await cold.http.head(path, headers=auth)
        assert head.status_code == 200
        assert int(head.headers["content-length"]) == layer.size
        assert head.headers["docker-content-digest"] == layer.digest
        assert head.content == b""
        # A range on a blob that is not cached yet (streamed from the swarm) ...
        part = await cold.http.get(path, headers={**auth, "Range": "bytes=1000000-1999999"})
        assert part.status_code == 206
        assert part.headers["content-range"] == f"bytes 1000000-1999999/{layer.size}"
        assert part.content == layer.data[1000000:2000000]
        # ... and on a cached one; suffix ranges; an unsatisfiable one.
        await warm.http.get(path, headers=auth)
        for agent in (cold, warm):
            tail = await agent.http.get(path, headers={**auth, "Range": "bytes=-100"})
            assert (tail.status_code, tail.content) == (206, layer.data[-100:])
            beyond = await agent.http.get(path, headers={**auth, "Range": f"bytes={layer.size}-"})
            assert beyond.status_code == 416
            assert beyond.headers["content-range"] == f"bytes */{layer.size}"


async def test_manifests_index_and_docker_media_types_pass_through(
    origin: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, pushed = origin
    async with cluster(tmp_path, [registry.url], proxies=1, agents=1) as c:
        agent = c.agents[0]
        index = pushed["index"].image
        accept = [
            ("Accept", t) for t in (images.OCI_INDEX, images.OCI_MANIFEST, images.DOCKER_MANIFEST)
        ]
        got = await agent.http.get(
            f"/v2/{pushed['index'].repository}/manifests/1.0", headers=accept
        )
        assert got.status_code == 200
        assert got.headers["content-type"] == images.OCI_INDEX
        assert got.headers["docker-content-digest"] == index.digest
        assert got.content == index.top.data
        by_digest = await agent.http.head(
            f"/v2/{pushed['index'].repository}/manifests/{index.images[1].manifest.digest}",
            headers=accept,
        )
        assert by_digest.status_code == 200
        assert int(by_digest.headers["content-length"]) == index.images[1].manifest.size
        docker = pushed["docker"].image
        got = await agent.http.get(
            f"/v2/{pushed['docker'].repository}/manifests/1.0",
            headers=[("Accept", images.DOCKER_MANIFEST), *basic(*ALICE).items()],
        )
        assert got.status_code == 200
        assert got.headers["content-type"] == images.DOCKER_MANIFEST
        assert got.content == docker.top.data


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/UPPER/manifests/1.0", 400, "NAME_INVALID"),
        ("/v2/a/../b/manifests/1.0", 400, "NAME_INVALID"),
        ("/v2/a/%2e%2e/manifests/1.0", 400, "NAME_INVALID"),
        ("/v2/a/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("/v2/a/manifests/-bad-tag-", 400, "TAG_INVALID"),
        ("/etc/passwd", 404, "UNSUPPORTED"),
    ],
)
async def test_bad_input_gets_the_right_oci_error(
    origin: tuple[Registry, dict[str, Pushed]], tmp_path: Path, path: str, status: int, code: str
) -> None:
    registry, _ = origin
    async with cluster(tmp_path, [registry.url], proxies=1, agents=1) as c:
        agent = c.agents[0]
        before = origin_requests(registry)
        stream = await trio.open_tcp_stream("127.0.0.1", agent.ports.api)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            raw = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert int(head.split()[1]) == status
        assert f'"code":"{code}"'.encode() in body.replace(b" ", b"")
        assert origin_requests(registry) == before


async def test_oversized_headers_and_writes_are_refused(
    origin: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, _ = origin
    async with cluster(tmp_path, [registry.url], proxies=1, agents=1) as c:
        agent = c.agents[0]
        put = await agent.http.put("/v2/a/manifests/1.0", content=b"{}")
        assert put.status_code == 405
        stream = await trio.open_tcp_stream("127.0.0.1", agent.ports.api)
        async with stream:
            await stream.send_all(
                b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
            )
            raw = b""
            with trio.fail_after(10), trio.move_on_after(5):
                while chunk := await stream.receive_some(65536):
                    raw += chunk
        assert not raw.startswith(b"HTTP/1.1 200")


async def test_skopeo_pulls_a_public_image_anonymously(
    origin: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    """skopeo answers the agent's Basic challenge without credentials by sending ':'."""
    registry, pushed = origin
    public = pushed["index"]
    async with cluster(tmp_path, [registry.url], proxies=1, agents=1) as c:
        await blocking(
            images.pull_and_compare,
            public.image,
            c.agents[0].host,
            public.repository,
            tmp_path / "out",
            all_platforms=True,
        )
