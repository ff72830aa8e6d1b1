"""Self-tests of the OCI real-parts harness: registry, token server, images, containerd.

All drive the real programs (they fail, never skip, when one is missing) and take a
few tenths of a second each.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509 import load_pem_x509_certificate

from tests.realparts import images
from tests.realparts.containerd import Containerd, CtrError, run_containerd, write_mirror_hosts
from tests.realparts.registry import (
    DEFAULT_USERS,
    Registry,
    count_blob_gets,
    free_port,
    parse_access_log,
    run_registry,
)
from tests.realparts.tokenserver import TokenServer, libtrust_key_id

pytestmark = pytest.mark.realparts

ALICE = ("alice", DEFAULT_USERS["alice"])
BOB = ("bob", DEFAULT_USERS["bob"])
ALL_MANIFESTS = ", ".join(
    [images.OCI_MANIFEST, images.OCI_INDEX, images.DOCKER_MANIFEST, images.DOCKER_LIST]
)


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[Registry]:
    with run_registry(tmp_path / "registry", auth="token") as registry:
        yield registry


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    with run_containerd(tmp_path / "containerd") as instance:
        yield instance


def _push(
    tmp_path: Path,
    registry: Registry,
    repository: str,
    creds: tuple[str, str] | None = ALICE,
    **options: object,
) -> images.Image:
    layout = tmp_path / f"layout-{repository.replace('/', '_')}"
    image = images.build_image(layout, **options)
    pushed = images.push_image(
        layout, image, registry.host, repository, creds=creds, ca_dir=registry.ca_dir
    )
    assert pushed.ref == f"{registry.host}/{repository}:{image.tag}"
    assert pushed.digest == image.digest
    assert pushed.blobs == {d: b.size for d, b in image.blobs().items()}
    assert set(pushed.manifests) == {image.digest, *(i.manifest.digest for i in image.images)}
    return image


# --- pure parts ---------------------------------------------------------------------------------


def test_access_log_parser_counts_served_blob_gets() -> None:
    digest = "sha256:" + "ab" * 32
    other = "sha256:" + "cd" * 32
    log = "\n".join(
        [
            '{"level":"info","msg":"not an access line"}',
            f'127.0.0.1 - - [26/Nov/2026:12:00:00 +0000] "GET /v2/team/app/blobs/{digest} HTTP/1.1"'
            ' 200 10240 "" "containerd/1.6"',
            f'127.0.0.1 - - [26/Nov/2026:12:00:00 +0000] "GET /v2/team/app/blobs/{digest}?ns=x'
            ' HTTP/1.1" 206 100 "" "agent \\"quoted\\""',
            f'127.0.0.1 - - [26/Nov/2026:12:00:00 +0000] "HEAD /v2/team/app/blobs/{digest}'
            ' HTTP/1.1" 200 10240 "" "skopeo"',
            f'127.0.0.1 - - [26/Nov/2026:12:00:00 +0000] "GET /v2/team/app/blobs/{other}'
            ' HTTP/1.1" 401 87 "" "skopeo"',
            f'127.0.0.1 - - [26/Nov/2026:12:00:00 +0000] "GET /v2/other/blobs/{other}'
            ' HTTP/1.1" 200 5 "" "skopeo"',
        ]
    )
    entries = parse_access_log(log)
    assert len(entries) == 5
    assert entries[1].query == "ns=x"
    assert entries[1].user_agent == 'agent \\"quoted\\"'
    assert count_blob_gets(entries) == {digest: 2, other: 1}
    assert count_blob_gets(entries, "team/app") == {digest: 2}
    assert count_blob_gets(entries, "team/app", statuses=None) == {digest: 2, other: 1}


def test_token_server_signs_what_distribution_expects(tmp_path: Path) -> None:
    server = TokenServer(users={"alice": "pw"}, rights={"alice": {"team/*": {"pull"}}})
    with server.running(tmp_path):
        assert server.cert_path is not None
        cert = load_pem_x509_certificate(server.cert_path.read_bytes())
        response = httpx.get(
            server.realm,
            params={"service": server.service, "scope": "repository:team/app:pull,push"},
            auth=("alice", "pw"),
        )
        wrong = httpx.get(server.realm, params={"service": server.service}, auth=("alice", "x"))
    assert response.status_code == 200
    assert wrong.status_code == 401
    body = response.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert body["issued_at"].endswith("Z")
    head, claims, signature = body["token"].split(".")

    def unb64(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    header = json.loads(unb64(head))
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    kid = libtrust_key_id(public)
    assert header == {"typ": "JWT", "alg": "ES256", "kid": kid}
    assert [len(group) for group in kid.split(":")] == [4] * 12
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert kid.replace(":", "") == base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    raw = unb64(signature)
    assert len(raw) == 64  # r || s, not DER
    public.verify(
        encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
        f"{head}.{claims}".encode(),
        ec.ECDSA(hashes.SHA256()),
    )
    decoded = json.loads(unb64(claims))
    assert decoded["iss"] == server.issuer
    assert decoded["aud"] == server.service
    assert decoded["sub"] == "alice"
    assert decoded["nbf"] <= decoded["iat"] < decoded["exp"]
    assert decoded["jti"]
    assert decoded["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    assert [(r.account, r.status) for r in server.requests] == [("alice", 200), ("", 401)]


def test_images_are_deterministic() -> None:
    first = images.make_image(seed="s", layer_sizes=[10, 20])
    again = images.make_image(seed="s", layer_sizes=[10, 20])
    other = images.make_image(seed="t", layer_sizes=[10, 20])
    assert first.digest == again.digest
    assert first.digest != other.digest
    assert len(first.layers) == 2
    manifest = json.loads(first.top.data)
    assert [layer["digest"] for layer in manifest["layers"]] == [b.digest for b in first.layers]
    assert manifest["config"]["digest"] == first.images[0].config.digest


# --- token auth, skopeo, containerd -------------------------------------------------------------


def test_token_registry_private_repository(tmp_path: Path, token_registry: Registry) -> None:
    tokens = token_registry.token_server
    assert tokens is not None
    image = _push(tmp_path, token_registry, "private/app", seed="private", layer_sizes=[100, 5000])

    images.pull_and_compare(image, token_registry.host, "private/app", tmp_path / "a", creds=ALICE)
    images.pull_and_compare(
        image, token_registry.host, "private/app", tmp_path / "d", creds=ALICE, by_digest=True
    )
    with pytest.raises(images.SkopeoError, match=r"denied|unauthorized"):
        images.pull_to_dir(token_registry.host, "private/app", "latest", tmp_path / "b", creds=BOB)
    with pytest.raises(images.SkopeoError, match=r"denied|unauthorized"):
        images.pull_to_dir(token_registry.host, "private/app", "latest", tmp_path / "c")
    with pytest.raises(images.SkopeoError, match=r"denied|unauthorized"):
        images.pull_to_dir(
            token_registry.host, "private/app", "latest", tmp_path / "e", creds=("alice", "nope")
        )
    refused = [r for r in tokens.requests if r.account == "bob"]
    assert refused
    assert all(r.granted == () for r in refused)
    assert any(r.status == 401 for r in tokens.requests)  # alice with the wrong password
    # Two skopeo pulls by alice: each blob served twice, nothing to bob or anonymous.
    assert token_registry.blob_gets("private/app") == {d: 2 for d in image.blobs()}


def test_containerd_pulls_with_user_and_blob_counter(
    tmp_path: Path, token_registry: Registry, containerd: Containerd
) -> None:
    image = _push(tmp_path, token_registry, "private/app", seed="ctr", layer_sizes=[100, 300_000])
    before = token_registry.blob_gets()
    ref = f"{token_registry.host}/private/app:latest"

    containerd.pull(ref, user=ALICE)

    assert containerd.image_target(ref) == image.digest
    for digest, blob in image.everything().items():
        assert containerd.content_get(digest) == blob.data
    assert token_registry.blob_gets() - before == {d: 1 for d in image.blobs()}
    with pytest.raises(CtrError, match=r"insufficient_scope|denied"):
        containerd.pull(f"{token_registry.host}/private/app:latest", user=BOB)
    # containerd sends credentials with the OAuth2 POST grant, not the GET flow.
    assert token_registry.token_server is not None
    alice = [r for r in token_registry.token_server.requests if r.account == "alice"]
    assert "POST" in {r.method for r in alice}


def test_containerd_mirror_mode_sends_ns(
    tmp_path: Path, token_registry: Registry, containerd: Containerd
) -> None:
    image = _push(tmp_path, token_registry, "public/app", seed="mirror")
    hosts = tmp_path / "hosts"
    dead = f"http://127.0.0.1:{free_port()}"
    write_mirror_hosts(hosts, "registry.example.test", dead, token_registry.url)

    containerd.pull("registry.example.test/public/app:latest", hosts_dir=hosts)

    for digest, blob in image.blobs().items():
        assert containerd.content_get(digest) == blob.data
    pulled = [e for e in token_registry.access_log() if "containerd" in e.user_agent]
    assert pulled
    assert all(e.query == "ns=registry.example.test" for e in pulled)
    assert {e.method for e in pulled} == {"HEAD", "GET"}
    assert token_registry.blob_gets("public/app") == {d: 1 for d in image.blobs()}


# --- other auth modes and image kinds -----------------------------------------------------------


def test_htpasswd_registry(tmp_path: Path) -> None:
    with run_registry(tmp_path / "registry", auth="htpasswd") as registry:
        with pytest.raises(images.SkopeoError):
            _push(tmp_path, registry, "team/app", creds=None, seed="anon")
        image = _push(tmp_path, registry, "team/app", seed="basic")
        images.pull_and_compare(image, registry.host, "team/app", tmp_path / "out", creds=BOB)
        with pytest.raises(images.SkopeoError, match="unauthorized"):
            images.pull_to_dir(
                registry.host, "team/app", "latest", tmp_path / "x", creds=("bob", "wrong")
            )
        anonymous = httpx.get(f"{registry.url}/v2/team/app/manifests/latest")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Basic ")


@pytest.mark.parametrize(
    ("options", "media_type"),
    [
        ({"docker_schema2": True}, images.DOCKER_MANIFEST),
        ({"platforms": ["linux/amd64", "linux/arm64"]}, images.OCI_INDEX),
        ({"platforms": ["linux/amd64", "linux/arm64"], "docker_schema2": True}, images.DOCKER_LIST),
    ],
    ids=["docker-schema2", "oci-index", "docker-list"],
)
def test_other_image_kinds_push_fine(
    tmp_path: Path, options: dict[str, object], media_type: str
) -> None:
    with run_registry(tmp_path / "registry", auth="none") as registry:
        image = _push(tmp_path, registry, "kinds/app", creds=None, seed="kinds", **options)
        response = httpx.get(
            f"{registry.url}/v2/kinds/app/manifests/latest", headers={"Accept": ALL_MANIFESTS}
        )
        assert response.headers["content-type"] == media_type
        assert response.headers["docker-content-digest"] == image.digest
        assert response.content == image.top.data
        multi = image.index is not None
        images.pull_and_compare(
            image, registry.host, "kinds/app", tmp_path / "out", all_platforms=multi
        )


def test_tls_registry(tmp_path: Path) -> None:
    with run_registry(tmp_path / "registry", auth="none", tls=True) as registry:
        assert registry.url.startswith("https://")
        image = _push(tmp_path, registry, "tls/app", creds=None, seed="tls")
        images.pull_and_compare(
            image, registry.host, "tls/app", tmp_path / "out", ca_dir=registry.ca_dir
        )
        with pytest.raises(images.SkopeoError, match="certificate"):
            images.skopeo(["inspect", "--raw", f"docker://{registry.host}/tls/app:latest"])
