"""Who may read what: the origin decides, per credentials, repository and digest, and a blob
already cached for one caller never reaches a caller the origin refuses."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import push
from tests.component.test_proxy_harness import (
    basic,
    chunks_of,
    origin_requests,
    run_proxy,
)
from tests.realparts import images
from tests.realparts.registry import DEFAULT_USERS, Registry, run_registry

pytestmark = pytest.mark.realparts

ALICE = basic("alice", DEFAULT_USERS["alice"])
BOB = basic("bob", DEFAULT_USERS["bob"])
WRONG = basic("alice", "not-her-password")
MiB = 1024 * 1024


@dataclass
class Origins:
    token: Registry
    basic: Registry
    image: images.Image
    """Pushed to private/app and public/app of both registries (same digests)."""

    @property
    def layer(self) -> images.Blob:
        return self.image.layers[1]


@pytest.fixture(scope="module")
def origins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origins]:
    base = tmp_path_factory.mktemp("auth")
    creds = ("alice", DEFAULT_USERS["alice"])
    with (
        run_registry(base / "token", auth="token") as token,
        run_registry(base / "basic", auth="htpasswd") as htpasswd,
    ):
        image = None
        for registry in (token, htpasswd):
            for repository in ("private/app", "public/app"):
                image = push(
                    base / registry.auth,
                    registry,
                    repository,
                    seed="auth",
                    layer_sizes=[1000, 2 * MiB],
                    creds=creds,
                )
        assert image is not None
        yield Origins(token, htpasswd, image)


def head_count(registry: Registry, digest: str, status: int = 200) -> int:
    """HEADs of ``digest`` the origin answered with ``status``."""
    return sum(
        1
        for e in origin_requests(registry)
        if e.method == "HEAD" and e.path.endswith(digest) and e.status == status
    )


async def test_token_auth_no_leak_of_a_cached_blob(origins: Origins, tmp_path: Path) -> None:
    layer = origins.layer
    registry = origins.token
    gets_before = registry.blob_gets()[layer.digest]
    async with run_proxy(tmp_path / "data", [registry.url]) as proxy:
        anonymous = await proxy.metainfo("private/app", layer.digest)
        assert anonymous.status_code == 401
        assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"

        allowed = await proxy.metainfo("private/app", layer.digest, headers=ALICE)
        assert chunks_of(allowed, layer).digest == layer.digest
        assert layer.digest in proxy.blob_files()

        # bob may not pull private/*: nothing of the cached blob reaches him.
        denied = await proxy.metainfo("private/app", layer.digest, headers=BOB)
        assert denied.status_code == 403
        assert denied.json()["errors"][0]["code"] == "DENIED"
        assert b"announce" not in denied.content
        blob = await proxy.http.get(f"/v2/private/app/blobs/{layer.digest}", headers=BOB)
        assert blob.status_code == 403
        assert layer.data[:64] not in blob.content
        ranged = await proxy.http.get(
            f"/v2/private/app/blobs/{layer.digest}", headers={**BOB, "Range": "bytes=0-99"}
        )
        assert ranged.status_code == 403
        head = await proxy.http.head(f"/v2/private/app/blobs/{layer.digest}", headers=BOB)
        assert head.status_code == 403
        anonymous_blob = await proxy.http.get(f"/v2/private/app/blobs/{layer.digest}")
        assert anonymous_blob.status_code == 401
        wrong = await proxy.metainfo("private/app", layer.digest, headers=WRONG)
        assert wrong.status_code == 401

        # The same bytes in a repository bob may read: served (from the cache).
        public = await proxy.http.get(f"/v2/public/app/blobs/{layer.digest}", headers=BOB)
        assert (public.status_code, public.content) == (200, layer.data)
        public_meta = await proxy.metainfo("public/app", layer.digest, headers=BOB)
        assert public_meta.content == allowed.content

        # alice's HEAD: size and digest.
        alice_head = await proxy.http.head(f"/v2/private/app/blobs/{layer.digest}", headers=ALICE)
        assert alice_head.status_code == 200
        assert alice_head.headers["content-length"] == str(layer.size)
        assert alice_head.headers["docker-content-digest"] == layer.digest

        assert await proxy.metric("p2p_proxy_authorization_denials_total", code="DENIED") >= 1
        assert await proxy.metric("p2p_proxy_authorization_denials_total", code="UNAUTHORIZED") >= 1
        assert await proxy.metric("p2p_proxy_blobs_fetched_total") == 1
    assert registry.blob_gets()[layer.digest] == gets_before + 1


async def test_basic_auth(origins: Origins, tmp_path: Path) -> None:
    layer = origins.layer
    async with run_proxy(tmp_path / "data", [origins.basic.url]) as proxy:
        anonymous = await proxy.metainfo("private/app", layer.digest)
        assert anonymous.status_code == 401
        assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
        wrong = await proxy.metainfo("private/app", layer.digest, headers=WRONG)
        assert wrong.status_code == 401
        alice = await proxy.metainfo("private/app", layer.digest, headers=ALICE)
        assert alice.status_code == 200
        # htpasswd has no per-repository rights: every valid user may pull.
        bob = await proxy.http.get(f"/v2/private/app/blobs/{layer.digest}", headers=BOB)
        assert (bob.status_code, bob.content) == (200, layer.data)
        anonymous_head = await proxy.http.head(f"/v2/private/app/blobs/{layer.digest}")
        assert anonymous_head.status_code == 401


async def test_decisions_are_cached_per_credentials(origins: Origins, tmp_path: Path) -> None:
    layer = origins.image.layers[0]
    registry = origins.basic
    before = head_count(registry, layer.digest)
    async with run_proxy(tmp_path / "data", [registry.url], auth_cache_ttl=60) as proxy:
        for _ in range(3):
            assert (await proxy.metainfo("private/app", layer.digest, headers=ALICE)).is_success
        assert head_count(registry, layer.digest) == before + 1
        # Other credentials, another repository: asked again.
        assert (await proxy.metainfo("private/app", layer.digest, headers=BOB)).is_success
        assert (await proxy.metainfo("public/app", layer.digest, headers=BOB)).is_success
        assert head_count(registry, layer.digest) == before + 3
        # Refusals are remembered as well.
        refused = head_count(registry, layer.digest, 401)
        for _ in range(3):
            answer = await proxy.metainfo("private/app", layer.digest, headers=WRONG)
            assert answer.status_code == 401
        assert head_count(registry, layer.digest, 401) == refused + 1
        assert await proxy.metric("p2p_proxy_authorization_checks_total", source="cache") >= 3
    middle = head_count(registry, layer.digest)
    async with run_proxy(tmp_path / "data", [registry.url], auth_cache_ttl=0) as proxy:
        for _ in range(3):
            assert (await proxy.metainfo("private/app", layer.digest, headers=ALICE)).is_success
    assert head_count(registry, layer.digest) == middle + 3


async def test_credentials_are_not_logged_or_stored(
    origins: Origins, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    layer = origins.layer
    async with run_proxy(tmp_path / "data", [origins.token.url]) as proxy:
        for headers in (ALICE, BOB, WRONG):
            await proxy.metainfo("private/app", layer.digest, headers=headers)
            await proxy.http.get(f"/v2/private/app/blobs/{layer.digest}", headers=headers)
            await proxy.http.get("/v2/private/app/manifests/latest", headers=headers)
    secrets = [DEFAULT_USERS["alice"], DEFAULT_USERS["bob"], "not-her-password"]
    secrets += [h["Authorization"].split()[1] for h in (ALICE, BOB, WRONG)]
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for secret in secrets:
        assert secret not in text
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(secret.encode() in data for secret in secrets), path
