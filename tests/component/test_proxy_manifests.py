"""Manifests through the proxy: by tag and digest, GET and HEAD, OCI and Docker media types,
several ``Accept`` lines, several registries selected with ``?ns=``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from p2p_common.registry_auth import Credentials
from tests.cluster import push
from tests.component.test_proxy_harness import (
    ACCEPT_LINES,
    accept,
    basic,
    origin_requests,
    raw_get,
    run_proxy,
)
from tests.realparts import images
from tests.realparts.registry import DEFAULT_USERS, Registry, run_registry

pytestmark = pytest.mark.realparts

ALICE = Credentials("alice", DEFAULT_USERS["alice"])


@dataclass
class Origins:
    plain: Registry
    token: Registry
    oci: images.Image
    docker: images.Image
    index: images.Image
    docker_list: images.Image
    private: images.Image


@pytest.fixture(scope="module")
def origins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origins]:
    base = tmp_path_factory.mktemp("manifests")
    with (
        run_registry(base / "plain", auth="none") as plain,
        run_registry(base / "token", auth="token") as token,
    ):
        oci = push(base, plain, "library/oci", seed="m-oci", tag="1.0")
        docker = push(base, plain, "library/docker", seed="m-docker", docker_schema2=True)
        index = push(
            base, plain, "library/multi", seed="m-index", platforms=["linux/amd64", "linux/arm64"]
        )
        docker_list = push(
            base,
            plain,
            "library/list",
            seed="m-list",
            docker_schema2=True,
            platforms=["linux/amd64", "linux/arm64"],
        )
        private = push(
            base, token, "private/app", seed="m-private", creds=("alice", DEFAULT_USERS["alice"])
        )
        yield Origins(plain, token, oci, docker, index, docker_list, private)


async def test_oci_manifest_by_tag_and_by_digest_get_and_head(
    origins: Origins, tmp_path: Path
) -> None:
    image = origins.oci
    async with run_proxy(tmp_path / "data", [origins.plain.url]) as proxy:
        for reference in ("1.0", image.digest):
            got = await proxy.http.get(
                f"/v2/library/oci/manifests/{reference}", headers=accept(*ACCEPT_LINES)
            )
            assert got.status_code == 200
            assert got.content == image.top.data
            assert got.headers["content-type"] == images.OCI_MANIFEST
            assert got.headers["docker-content-digest"] == image.digest
            assert got.headers["content-length"] == str(image.top.size)
            head = await proxy.http.head(
                f"/v2/library/oci/manifests/{reference}", headers=accept(*ACCEPT_LINES)
            )
            assert head.status_code == 200
            assert head.content == b""
            assert head.headers["content-type"] == images.OCI_MANIFEST
            assert head.headers["docker-content-digest"] == image.digest
            assert head.headers["content-length"] == str(image.top.size)
        assert await proxy.metric("p2p_proxy_manifest_requests_total") == 4


async def test_docker_schema2_manifest(origins: Origins, tmp_path: Path) -> None:
    image = origins.docker
    async with run_proxy(tmp_path / "data", [origins.plain.url]) as proxy:
        got = await proxy.http.get(
            "/v2/library/docker/manifests/latest", headers=accept(images.DOCKER_MANIFEST)
        )
        assert got.status_code == 200
        assert got.content == image.top.data
        assert got.headers["content-type"] == images.DOCKER_MANIFEST
        assert got.headers["docker-content-digest"] == image.digest
        assert hashlib.sha256(got.content).hexdigest() == image.digest.removeprefix("sha256:")


async def test_every_accept_line_reaches_the_origin(origins: Origins, tmp_path: Path) -> None:
    """distribution answers a client that does not accept manifest lists with the amd64
    manifest: the list comes back only if the second Accept line was forwarded too."""
    image = origins.docker_list
    amd64 = next(i for i in image.images if i.platform == "linux/amd64")
    async with run_proxy(tmp_path / "data", [origins.plain.url]) as proxy:
        both = await proxy.http.get(
            "/v2/library/list/manifests/latest",
            headers=accept(images.DOCKER_MANIFEST, images.DOCKER_LIST),
        )
        assert both.status_code == 200
        assert both.headers["content-type"] == images.DOCKER_LIST
        assert both.content == image.top.data
        one = await proxy.http.get(
            "/v2/library/list/manifests/latest", headers=accept(images.DOCKER_MANIFEST)
        )
        assert one.status_code == 200
        assert one.headers["content-type"] == images.DOCKER_MANIFEST
        assert one.content == amd64.manifest.data
        # A comma list inside one line works as well.
        joined = await proxy.http.get(
            "/v2/library/list/manifests/latest",
            headers={"Accept": f"{images.DOCKER_MANIFEST}, {images.DOCKER_LIST}"},
        )
        assert joined.content == image.top.data


async def test_oci_index_and_its_platform_manifests(origins: Origins, tmp_path: Path) -> None:
    image = origins.index
    async with run_proxy(tmp_path / "data", [origins.plain.url]) as proxy:
        top = await proxy.http.get(
            "/v2/library/multi/manifests/latest", headers=accept(*ACCEPT_LINES)
        )
        assert top.status_code == 200
        assert top.headers["content-type"] == images.OCI_INDEX
        assert top.content == image.top.data
        for platform_image in image.images:
            manifest = platform_image.manifest
            got = await proxy.http.get(
                f"/v2/library/multi/manifests/{manifest.digest}", headers=accept(*ACCEPT_LINES)
            )
            assert (got.status_code, got.content) == (200, manifest.data)


async def test_unknown_manifests_and_repositories(origins: Origins, tmp_path: Path) -> None:
    async with run_proxy(tmp_path / "data", [origins.plain.url]) as proxy:
        missing_tag = await proxy.http.get(
            "/v2/library/oci/manifests/nope", headers=accept(*ACCEPT_LINES)
        )
        assert missing_tag.status_code == 404
        assert missing_tag.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        missing_head = await proxy.http.head(
            "/v2/library/oci/manifests/nope", headers=accept(*ACCEPT_LINES)
        )
        assert (missing_head.status_code, missing_head.content) == (404, b"")
        missing_digest = await proxy.http.get(
            "/v2/library/oci/manifests/sha256:" + "0" * 64, headers=accept(*ACCEPT_LINES)
        )
        assert missing_digest.status_code == 404
        missing_repo = await proxy.http.get(
            "/v2/no/such/repo/manifests/latest", headers=accept(*ACCEPT_LINES)
        )
        assert missing_repo.status_code == 404
        assert missing_repo.json()["errors"][0]["code"] in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN")


async def test_invalid_references_are_refused_without_asking_the_origin(
    origins: Origins, tmp_path: Path
) -> None:
    before = len(origin_requests(origins.plain))
    async with run_proxy(tmp_path / "data", [origins.plain.url]) as proxy:
        cases = {
            "/v2/Library/oci/manifests/1.0": "NAME_INVALID",
            "/v2/library/../oci/manifests/1.0": "NAME_INVALID",
            "/v2/library%2Foci/manifests/1.0": "NAME_INVALID",
            "/v2/library/oci/manifests/-bad-tag": "TAG_INVALID",
            "/v2/library/oci/manifests/sha256:1234": "DIGEST_INVALID",
            "/v2/library/oci/manifests/md5:" + "0" * 32: "DIGEST_INVALID",
        }
        for path, code in cases.items():
            status, body = await raw_get(proxy.port, path)
            assert status == 400, path
            assert json.loads(body)["errors"][0]["code"] == code, path
    assert len(origin_requests(origins.plain)) == before


async def test_manifests_with_token_auth(origins: Origins, tmp_path: Path) -> None:
    image = origins.private
    alice = basic(ALICE.username, ALICE.password)
    async with run_proxy(tmp_path / "data", [origins.token.url]) as proxy:
        anonymous = await proxy.http.get(
            "/v2/private/app/manifests/latest", headers=accept(*ACCEPT_LINES)
        )
        assert anonymous.status_code == 401
        assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
        got = await proxy.http.get(
            "/v2/private/app/manifests/latest", headers=[*accept(*ACCEPT_LINES), *alice.items()]
        )
        assert (got.status_code, got.content) == (200, image.top.data)
        head = await proxy.http.head(
            f"/v2/private/app/manifests/{image.digest}",
            headers=[*accept(*ACCEPT_LINES), *alice.items()],
        )
        assert head.status_code == 200
        assert head.headers["docker-content-digest"] == image.digest
        bob = await proxy.http.get(
            "/v2/private/app/manifests/latest",
            headers=[*accept(*ACCEPT_LINES), *basic("bob", DEFAULT_USERS["bob"]).items()],
        )
        assert bob.status_code in (401, 403)
        wrong = await proxy.http.get(
            "/v2/private/app/manifests/latest",
            headers=[*accept(*ACCEPT_LINES), *basic("alice", "wrong").items()],
        )
        assert wrong.status_code == 401
        garbage = await proxy.http.get(
            "/v2/private/app/manifests/latest", headers={"Authorization": "Basic !!!"}
        )
        assert garbage.status_code == 401
        bearer = await proxy.http.get(
            "/v2/private/app/manifests/latest", headers={"Authorization": "Bearer abc"}
        )
        assert bearer.status_code == 401


async def test_ns_selects_a_configured_registry_and_refuses_others(
    origins: Origins, tmp_path: Path
) -> None:
    alice = basic(ALICE.username, ALICE.password)
    registries = [origins.plain.url, origins.token.url]
    async with run_proxy(tmp_path / "data", registries) as proxy:
        # No ns: the first registry.
        default = await proxy.http.get(
            "/v2/library/oci/manifests/1.0", headers=accept(*ACCEPT_LINES)
        )
        assert default.content == origins.oci.top.data
        explicit = await proxy.http.get(
            "/v2/library/oci/manifests/1.0",
            params={"ns": origins.plain.host},
            headers=accept(*ACCEPT_LINES),
        )
        assert explicit.content == origins.oci.top.data
        second = await proxy.http.get(
            "/v2/private/app/manifests/latest",
            params={"ns": origins.token.host},
            headers=[*accept(*ACCEPT_LINES), *alice.items()],
        )
        assert (second.status_code, second.content) == (200, origins.private.top.data)
        # The same repository is not in the first registry.
        wrong_registry = await proxy.http.get(
            "/v2/private/app/manifests/latest", headers=[*accept(*ACCEPT_LINES), *alice.items()]
        )
        assert wrong_registry.status_code == 404

        plain_before = len(origin_requests(origins.plain))
        token_before = len(origin_requests(origins.token))
        tokens_before = origins.token.token_server.request_count  # type: ignore[union-attr]
        for ns in ("registry.example.com", "127.0.0.1", "127.0.0.1:1", ""):
            for path in (
                "/v2/",
                "/v2/library/oci/manifests/1.0",
                f"/v2/library/oci/blobs/{origins.oci.layers[0].digest}",
            ):
                refused = await proxy.http.get(path, params={"ns": ns}, headers=alice)
                assert refused.status_code == 404, (ns, path)
                error = refused.json()["errors"][0]
                assert error["code"] == "NAME_UNKNOWN"
                assert error["message"] == "registry not served by this proxy"
            metainfo = await proxy.metainfo(
                "library/oci", origins.oci.layers[0].digest, ns=ns, headers=alice
            )
            assert metainfo.status_code == 404
        assert len(origin_requests(origins.plain)) == plain_before
        assert len(origin_requests(origins.token)) == token_before
        assert origins.token.token_server.request_count == tokens_before  # type: ignore[union-attr]


async def test_a_tls_origin_with_a_private_ca(tmp_path: Path) -> None:
    with run_registry(tmp_path / "tls", auth="none", tls=True) as registry:
        assert registry.ca_dir is not None
        layout = tmp_path / "layout"
        image = images.build_image(layout, seed="m-tls", layer_sizes=[2000])
        images.push_image(layout, image, registry.host, "library/tls", ca_dir=registry.ca_dir)
        async with run_proxy(
            tmp_path / "data", [registry.url], registry_ca_file=registry.ca_file
        ) as proxy:
            got = await proxy.http.get(
                "/v2/library/tls/manifests/latest", headers=accept(*ACCEPT_LINES)
            )
            assert (got.status_code, got.content) == (200, image.top.data)
            meta = await proxy.metainfo("library/tls", image.layers[0].digest)
            assert meta.status_code == 200
        # Without the CA the origin's certificate is not trusted: a clear 502.
        async with run_proxy(tmp_path / "untrusting", [registry.url]) as proxy:
            refused = await proxy.http.get(
                "/v2/library/tls/manifests/latest", headers=accept(*ACCEPT_LINES)
            )
            assert refused.status_code == 502
            assert "certificate" in refused.json()["errors"][0]["message"]


# --- by-digest cache -------------------------------------------------------------------------


def _manifest_requests(registry: Registry, repository: str) -> list[tuple[str, str]]:
    """(method, reference) of every manifest request the origin answered for ``repository``."""
    prefix = f"/v2/{repository}/manifests/"
    return [
        (e.method, e.path.removeprefix(prefix))
        for e in origin_requests(registry)
        if e.path.startswith(prefix)
    ]


async def test_a_tag_is_resolved_every_time_but_its_body_fetched_once(
    origins: Origins, tmp_path: Path
) -> None:
    image = origins.index
    before = len(_manifest_requests(origins.plain, "library/multi"))
    async with run_proxy(tmp_path / "data", [origins.plain.url]) as proxy:
        for _ in range(5):
            got = await proxy.http.get(
                "/v2/library/multi/manifests/latest", headers=accept(*ACCEPT_LINES)
            )
            assert (got.status_code, got.content) == (200, image.top.data)
            assert got.headers["content-type"] == images.OCI_INDEX
            assert got.headers["docker-content-digest"] == image.digest
        # What containerd asks next: the index and a platform manifest by digest.
        by_digest = await proxy.http.get(
            f"/v2/library/multi/manifests/{image.digest}", headers=accept(*ACCEPT_LINES)
        )
        assert (by_digest.status_code, by_digest.content) == (200, image.top.data)
        platform = image.images[0].manifest
        for _ in range(3):
            got = await proxy.http.get(
                f"/v2/library/multi/manifests/{platform.digest}", headers=accept(*ACCEPT_LINES)
            )
            assert (got.status_code, got.content) == (200, platform.data)
            assert got.headers["content-type"] == images.OCI_MANIFEST
        head = await proxy.http.head(
            f"/v2/library/multi/manifests/{platform.digest}", headers=accept(*ACCEPT_LINES)
        )
        assert head.status_code == 200
        assert head.headers["content-length"] == str(platform.size)
        hits = await proxy.metric("p2p_proxy_manifest_cache_hits_total")
    asked = _manifest_requests(origins.plain, "library/multi")[before:]
    # Every tag request was resolved at the origin (HEAD); each body was fetched once (GET);
    # by-digest requests were answered from memory (the tag HEAD and the GET authorized them).
    assert asked == [
        ("HEAD", "latest"),
        ("GET", "latest"),
        *[("HEAD", "latest")] * 4,
        ("GET", platform.digest),
    ]
    assert hits == 4 + 1 + 2 + 1


async def test_a_moved_tag_is_answered_with_its_new_manifest(
    origins: Origins, tmp_path: Path
) -> None:
    first = push(tmp_path, origins.plain, "library/moving", seed="mv-1", tag="1.0")
    async with run_proxy(tmp_path / "data", [origins.plain.url]) as proxy:
        got = await proxy.http.get(
            "/v2/library/moving/manifests/1.0", headers=accept(*ACCEPT_LINES)
        )
        assert (got.status_code, got.content) == (200, first.top.data)
        second = push(tmp_path, origins.plain, "library/moving", seed="mv-2", tag="1.0")
        assert second.digest != first.digest
        moved = await proxy.http.get(
            "/v2/library/moving/manifests/1.0", headers=accept(*ACCEPT_LINES)
        )
        assert (moved.status_code, moved.content) == (200, second.top.data)
        assert moved.headers["docker-content-digest"] == second.digest
        # The old manifest is still there by digest, from memory.
        old = await proxy.http.get(
            f"/v2/library/moving/manifests/{first.digest}", headers=accept(*ACCEPT_LINES)
        )
        assert (old.status_code, old.content) == (200, first.top.data)


async def test_a_cached_manifest_is_served_only_to_callers_the_origin_authorizes(
    origins: Origins, tmp_path: Path
) -> None:
    image = origins.private
    alice = basic(ALICE.username, ALICE.password)
    path = f"/v2/private/app/manifests/{image.digest}"
    async with run_proxy(tmp_path / "data", [origins.token.url]) as proxy:
        got = await proxy.http.get(path, headers=[*accept(*ACCEPT_LINES), *alice.items()])
        assert (got.status_code, got.content) == (200, image.top.data)
        before = len(_manifest_requests(origins.token, "private/app"))
        for headers, statuses in (
            ({}, (401,)),
            (basic("bob", DEFAULT_USERS["bob"]), (401, 403)),
            (basic("alice", "wrong"), (401,)),
        ):
            for method in ("GET", "HEAD"):
                refused = await proxy.http.request(
                    method, path, headers=[*accept(*ACCEPT_LINES), *headers.items()]
                )
                assert refused.status_code in statuses, (headers, method)
                assert image.top.data not in refused.content
        # Each refusal came from the origin, asked with that caller's credentials.
        asked = _manifest_requests(origins.token, "private/app")[before:]
        assert asked
        assert all(method == "HEAD" for method, _ in asked)
        again = await proxy.http.get(path, headers=[*accept(*ACCEPT_LINES), *alice.items()])
        assert (again.status_code, again.content) == (200, image.top.data)
        assert await proxy.metric("p2p_proxy_manifest_cache_hits_total") == 1


async def test_manifest_cache_size_zero_forwards_every_request(
    origins: Origins, tmp_path: Path
) -> None:
    image = origins.oci
    before = len(_manifest_requests(origins.plain, "library/oci"))
    async with run_proxy(tmp_path / "data", [origins.plain.url], manifest_cache_size=0) as proxy:
        for reference in ("1.0", "1.0", image.digest, image.digest):
            got = await proxy.http.get(
                f"/v2/library/oci/manifests/{reference}", headers=accept(*ACCEPT_LINES)
            )
            assert (got.status_code, got.content) == (200, image.top.data)
        assert await proxy.metric("p2p_proxy_manifest_cache_hits_total") == 0
    asked = _manifest_requests(origins.plain, "library/oci")[before:]
    assert asked == [("GET", "1.0")] * 2 + [("GET", image.digest)] * 2


async def test_concurrent_requests_for_a_tag_fetch_its_body_once(
    origins: Origins, tmp_path: Path
) -> None:
    image = origins.docker
    before = len(_manifest_requests(origins.plain, "library/docker"))
    bodies: list[bytes] = []
    async with run_proxy(tmp_path / "data", [origins.plain.url]) as proxy:

        async def pull(delay: float) -> None:
            await trio.sleep(delay)
            got = await proxy.http.get(
                "/v2/library/docker/manifests/latest", headers=accept(*ACCEPT_LINES)
            )
            assert got.status_code == 200
            bodies.append(got.content)

        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(pull, n * 0.002)
    assert bodies == [image.top.data] * 20
    methods = [method for method, _ in _manifest_requests(origins.plain, "library/docker")[before:]]
    assert methods.count("GET") == 1
    assert 1 <= methods.count("HEAD") <= 20
