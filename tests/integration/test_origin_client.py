"""p2p_proxy.origin.OriginClient against the real distribution registry in its three auth
modes (and with TLS), plus a few origin misbehaviours no real registry produces on demand
(an in-process httpx transport plays the origin for those)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import trio

from p2p_common.oci import ErrorCode, OCIError
from p2p_proxy.origin import BlobHead, Credentials, OriginClient
from tests.realparts import images
from tests.realparts.registry import DEFAULT_USERS, Registry, free_port, run_registry

ALICE = Credentials("alice", DEFAULT_USERS["alice"])
BOB = Credentials("bob", DEFAULT_USERS["bob"])
WRONG = Credentials("alice", "not-her-password")
PRIVATE = "private/app"
PUBLIC = "public/app"


@dataclass
class Origin:
    registry: Registry
    image: images.Image
    index: images.Image


@pytest.fixture(scope="module")
def origins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Origin]]:
    """One registry per auth mode (and one with TLS), each holding the same test images."""
    base = tmp_path_factory.mktemp("origins")
    image = images.make_image(seed="origin-client", layer_sizes=[100, 200_000])
    index = images.make_image(
        seed="origin-index", tag="multi", platforms=["linux/amd64", "linux/arm64"]
    )
    images.write_oci_layout(image, base / "image")
    images.write_oci_layout(index, base / "index")
    found: dict[str, Origin] = {}
    with (
        run_registry(base / "none", auth="none") as none,
        run_registry(base / "htpasswd", auth="htpasswd") as basic,
        run_registry(base / "token", auth="token") as token,
        run_registry(base / "tls", auth="none", tls=True) as tls,
    ):
        for mode, registry in (("none", none), ("htpasswd", basic), ("token", token), ("tls", tls)):
            creds = None if mode in ("none", "tls") else ("alice", DEFAULT_USERS["alice"])
            for repository in (PRIVATE, PUBLIC):
                for built, layout in ((image, base / "image"), (index, base / "index")):
                    images.push_image(
                        layout,
                        built,
                        registry.host,
                        repository,
                        creds=creds,
                        ca_dir=registry.ca_dir,
                    )
            found[mode] = Origin(registry, image, index)
        yield found


async def collect(head: BlobHead, chunks: AsyncIterator[bytes]) -> tuple[BlobHead, bytes]:
    data = bytearray()
    async for chunk in chunks:
        data += chunk
    return head, bytes(data)


async def _expect(code: ErrorCode, call: Callable[[], Awaitable[object]]) -> OCIError:
    with pytest.raises(OCIError) as info:
        await call()
    assert info.value.code is code, info.value
    return info.value


# --- the real registry ----------------------------------------------------------------------------


@pytest.mark.realparts
@pytest.mark.parametrize(
    ("mode", "credentials"),
    [("none", None), ("htpasswd", ALICE), ("htpasswd", BOB), ("token", ALICE)],
)
async def test_pull_everything(
    origins: dict[str, Origin], mode: str, credentials: Credentials | None
) -> None:
    origin = origins[mode]
    image = origin.image
    layer = image.layers[1]
    async with OriginClient(origin.registry.url) as client:
        by_tag = await client.get_manifest(PRIVATE, "latest", credentials)
        assert by_tag.status == 200
        assert by_tag.body == image.top.data
        assert by_tag.digest == image.digest
        assert by_tag.content_type == images.OCI_MANIFEST
        assert by_tag.headers["docker-content-digest"] == image.digest
        by_digest = await client.get_manifest(PRIVATE, image.digest, credentials)
        assert by_digest.body == image.top.data
        head = await client.head_manifest(PRIVATE, "latest", credentials)
        assert (head.status, head.digest, head.size, head.body) == (
            200,
            image.digest,
            image.top.size,
            b"",
        )
        blob_head = await client.head_blob(PRIVATE, layer.digest, credentials)
        assert (blob_head.size, blob_head.digest) == (layer.size, layer.digest)
        whole_head, whole = await client.get_blob(PRIVATE, layer.digest, credentials, collect)
        assert whole == layer.data
        assert whole_head.status == 200
        assert whole_head.size == layer.size
        part_head, part = await client.get_blob(
            PRIVATE, layer.digest, credentials, collect, byte_range=(1000, 70_000)
        )
        assert part == layer.data[1000:70_001]
        assert part_head.status == 206
        assert part_head.content_range == (1000, 70_000, layer.size)
        _, tail = await client.get_blob(
            PRIVATE, layer.digest, credentials, collect, byte_range=(layer.size - 10, None)
        )
        assert tail == layer.data[-10:]


@pytest.mark.realparts
async def test_index_and_accept(origins: dict[str, Origin]) -> None:
    origin = origins["none"]
    index = origin.index
    async with OriginClient(origin.registry.url) as client:
        got = await client.get_manifest(PRIVATE, index.digest, None)
        assert got.content_type == images.OCI_INDEX
        assert got.body == index.top.data
        # Several Accept lines, as skopeo sends them, are merged and forwarded.
        merged = await client.get_manifest(
            PRIVATE, index.digest, None, accept=[images.OCI_MANIFEST, images.OCI_INDEX + ";q=0.9"]
        )
        assert merged.body == index.top.data
        platform = index.images[1].manifest
        one = await client.get_manifest(PRIVATE, platform.digest, None)
        assert (one.content_type, one.body) == (images.OCI_MANIFEST, platform.data)


@pytest.mark.realparts
async def test_not_found(origins: dict[str, Origin]) -> None:
    origin = origins["none"]
    missing = "sha256:" + "0" * 64
    layer = origin.image.layers[0]
    async with OriginClient(origin.registry.url) as client:
        await _expect(
            ErrorCode.MANIFEST_UNKNOWN, lambda: client.get_manifest(PRIVATE, "nope", None)
        )
        await _expect(
            ErrorCode.MANIFEST_UNKNOWN, lambda: client.head_manifest(PRIVATE, "nope", None)
        )
        # distribution 2.8 says MANIFEST_UNKNOWN (not NAME_UNKNOWN) for an unknown repository.
        await _expect(
            ErrorCode.MANIFEST_UNKNOWN, lambda: client.get_manifest("no/such/repo", "latest", None)
        )
        await _expect(ErrorCode.BLOB_UNKNOWN, lambda: client.head_blob(PRIVATE, missing, None))
        await _expect(
            ErrorCode.BLOB_UNKNOWN, lambda: client.get_blob(PRIVATE, missing, None, collect)
        )
        await _expect(
            ErrorCode.RANGE_INVALID,
            lambda: client.get_blob(
                PRIVATE, layer.digest, None, collect, byte_range=(layer.size + 5, None)
            ),
        )
        # Refused before anything is sent.
        await _expect(ErrorCode.NAME_INVALID, lambda: client.get_manifest("../x", "latest", None))
        await _expect(ErrorCode.DIGEST_INVALID, lambda: client.head_blob(PRIVATE, "sha256:x", None))
        await _expect(ErrorCode.TAG_INVALID, lambda: client.get_manifest(PRIVATE, "-x", None))


@pytest.mark.realparts
async def test_htpasswd_auth(origins: dict[str, Origin]) -> None:
    origin = origins["htpasswd"]
    registry = origin.registry
    async with OriginClient(registry.url) as client:
        anonymous = await _expect(
            ErrorCode.UNAUTHORIZED, lambda: client.get_manifest(PRIVATE, "latest", None)
        )
        assert anonymous.status == 401
        await _expect(ErrorCode.UNAUTHORIZED, lambda: client.get_manifest(PRIVATE, "latest", WRONG))
        before = [e for e in registry.access_log() if e.status == 401]
        for _ in range(3):
            await client.get_manifest(PRIVATE, "latest", ALICE)
        # Once the origin has asked for Basic, credentials go along at once: no more 401s.
        assert [e for e in registry.access_log() if e.status == 401 and e.query == ""] == [
            e for e in before if e.query == ""
        ]


@pytest.mark.realparts
async def test_token_auth_decisions(origins: dict[str, Origin]) -> None:
    origin = origins["token"]
    async with OriginClient(origin.registry.url) as client:
        anonymous = await _expect(
            ErrorCode.UNAUTHORIZED, lambda: client.get_manifest(PRIVATE, "latest", None)
        )
        assert anonymous.status == 401
        denied = await _expect(
            ErrorCode.DENIED, lambda: client.get_manifest(PRIVATE, "latest", BOB)
        )
        assert denied.status == 403
        await _expect(ErrorCode.DENIED, lambda: client.head_blob(PRIVATE, origin.image.digest, BOB))
        wrong = await _expect(
            ErrorCode.UNAUTHORIZED, lambda: client.get_manifest(PRIVATE, "latest", WRONG)
        )
        assert wrong.status == 401
        # Public: anonymous and bob may pull.
        assert (await client.get_manifest(PUBLIC, "latest", None)).body == origin.image.top.data
        assert (await client.get_manifest(PUBLIC, "latest", BOB)).body == origin.image.top.data
        assert (await client.get_manifest(PRIVATE, "latest", ALICE)).body == origin.image.top.data


@pytest.mark.realparts
async def test_tokens_are_reused_until_shortly_before_expiry(origins: dict[str, Origin]) -> None:
    origin = origins["token"]
    tokens = origin.registry.token_server
    assert tokens is not None
    now = [1000.0]
    layer = origin.image.layers[0]
    async with OriginClient(origin.registry.url, clock=lambda: now[0]) as client:
        start = tokens.request_count
        await client.get_manifest(PRIVATE, "latest", ALICE)
        await client.head_manifest(PRIVATE, "latest", ALICE)
        await client.head_blob(PRIVATE, layer.digest, ALICE)
        await client.get_blob(PRIVATE, layer.digest, ALICE, collect)
        assert tokens.request_count == start + 1
        # Another scope and other credentials get their own tokens.
        await client.get_manifest(PUBLIC, "latest", ALICE)
        await client.get_manifest(PUBLIC, "latest", BOB)
        await client.get_manifest(PUBLIC, "latest", None)
        assert tokens.request_count == start + 4
        await client.get_manifest(PRIVATE, "latest", ALICE)
        assert tokens.request_count == start + 4
        # Tokens live 300 s: reused at 269 s, refreshed 30 s before the end.
        now[0] += 269
        await client.get_manifest(PRIVATE, "latest", ALICE)
        assert tokens.request_count == start + 4
        now[0] += 2
        await client.get_manifest(PRIVATE, "latest", ALICE)
        assert tokens.request_count == start + 5
        requests = tokens.requests[start:]
    assert [r.account for r in requests] == ["alice", "alice", "bob", "", "alice"]
    assert all(r.scopes == (f"repository:{PRIVATE}:pull",) for r in (requests[0], requests[4]))


@pytest.mark.realparts
async def test_concurrent_requests_share_one_token_fetch(origins: dict[str, Origin]) -> None:
    origin = origins["token"]
    tokens = origin.registry.token_server
    assert tokens is not None
    async with OriginClient(origin.registry.url) as client:
        await _expect(ErrorCode.UNAUTHORIZED, lambda: client.head_manifest(PRIVATE, "x", None))
        start = tokens.request_count
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(client.get_manifest, PRIVATE, "latest", ALICE)
        assert tokens.request_count == start + 1


@pytest.mark.realparts
async def test_each_blob_get_reaches_the_origin_once(origins: dict[str, Origin]) -> None:
    origin = origins["token"]
    layer = origin.image.layers[1]
    before = origin.registry.blob_gets(PUBLIC)
    async with OriginClient(origin.registry.url) as client:
        _, data = await client.get_blob(PUBLIC, layer.digest, ALICE, collect)
    assert hashlib.sha256(data).hexdigest() == layer.digest.removeprefix("sha256:")
    assert origin.registry.blob_gets(PUBLIC) - before == {layer.digest: 1}


@pytest.mark.realparts
async def test_credentials_are_never_logged(
    origins: dict[str, Origin], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for mode in ("htpasswd", "token"):
        async with OriginClient(origins[mode].registry.url) as client:
            await client.get_manifest(PRIVATE, "latest", ALICE)
            with pytest.raises(OCIError) as info:
                await client.get_manifest(PRIVATE, "latest", WRONG)
            assert WRONG.password not in str(info.value)
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert ALICE.password not in logged
    assert WRONG.password not in logged
    assert "Authorization" not in logged
    assert "Bearer ey" not in logged


@pytest.mark.realparts
async def test_tls_is_verified(origins: dict[str, Origin]) -> None:
    origin = origins["tls"]
    registry = origin.registry
    assert registry.ca_file is not None
    async with OriginClient(registry.url, ca_file=registry.ca_file) as client:
        got = await client.get_manifest(PRIVATE, "latest", None)
        assert got.body == origin.image.top.data
    async with OriginClient(registry.url) as untrusting:
        error = await _expect(
            ErrorCode.UNKNOWN, lambda: untrusting.get_manifest(PRIVATE, "latest", None)
        )
    assert error.status == 502
    assert "certificate" in error.message.lower()
    # host:port alone means https.
    async with OriginClient(registry.host, ca_file=registry.ca_file) as client:
        assert (await client.head_manifest(PRIVATE, "latest", None)).status == 200


@pytest.mark.realparts
async def test_unreachable_origin() -> None:
    async with OriginClient(f"http://127.0.0.1:{free_port()}") as client:
        error = await _expect(ErrorCode.UNKNOWN, lambda: client.get_manifest(PRIVATE, "x", ALICE))
    assert error.status == 502
    assert "unreachable" in error.message


# --- origins that misbehave (in-process transport) ------------------------------------------------

MANIFEST = b'{"schemaVersion": 2}'
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
BLOB = bytes(range(256)) * 10
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def fake_origin(
    handler: Callable[[httpx.Request], httpx.Response], url: str = "https://origin.test"
) -> OriginClient:
    return OriginClient(url, transport=httpx.MockTransport(handler))


async def test_manifest_digest_is_verified() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(MANIFEST_DIGEST):
            return httpx.Response(200, content=MANIFEST + b" ")
        return httpx.Response(
            200, content=MANIFEST, headers={"Docker-Content-Digest": "sha256:" + "1" * 64}
        )

    async with fake_origin(handler) as client:
        error = await _expect(
            ErrorCode.UNKNOWN, lambda: client.get_manifest("a", MANIFEST_DIGEST, None)
        )
        assert "does not match" in error.message
        await _expect(ErrorCode.UNKNOWN, lambda: client.get_manifest("a", "latest", None))


async def test_manifest_size_is_bounded() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 2000)

    async with OriginClient(
        "https://origin.test", transport=httpx.MockTransport(handler), max_manifest_bytes=1000
    ) as client:
        error = await _expect(ErrorCode.UNKNOWN, lambda: client.get_manifest("a", "latest", None))
    assert "larger than 1000" in error.message


async def test_token_realm_must_be_http() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="file:///etc/passwd",service="x"'}
        )

    async with fake_origin(handler) as client:
        error = await _expect(ErrorCode.UNKNOWN, lambda: client.get_manifest("a", "latest", ALICE))
    assert "realm" in error.message
    assert seen == ["https://origin.test/v2/a/manifests/latest"]


async def test_https_origin_with_plain_http_realm_gets_no_credentials() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="http://auth.test/token"'}
        )

    async with fake_origin(handler) as client:
        await _expect(ErrorCode.UNKNOWN, lambda: client.get_manifest("a", "latest", ALICE))
    assert all("authorization" not in r.headers for r in seen)
    assert all(r.url.host == "origin.test" for r in seen)


async def test_malformed_challenge_and_origin_errors() -> None:
    answers = {
        "/v2/bad/manifests/latest": httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="unterminated'}
        ),
        "/v2/busy/manifests/latest": httpx.Response(429, headers={"Retry-After": "7"}),
        "/v2/gone/manifests/latest": httpx.Response(
            404, json={"errors": [{"code": "NAME_UNKNOWN", "message": "no such repository"}]}
        ),
        "/v2/broken/manifests/latest": httpx.Response(500),
        "/v2/forbidden/manifests/latest": httpx.Response(403),
        "/v2/moved/manifests/latest": httpx.Response(
            302, headers={"Location": "https://elsewhere.test/"}
        ),
        "/v2/strange/manifests/x": httpx.Response(401, headers={"WWW-Authenticate": "Magic"}),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return answers[request.url.path]

    async with fake_origin(handler) as client:
        await _expect(ErrorCode.UNKNOWN, lambda: client.get_manifest("bad", "latest", None))
        busy = await _expect(
            ErrorCode.TOOMANYREQUESTS, lambda: client.get_manifest("busy", "latest", None)
        )
        assert busy.headers == {"Retry-After": "7"}
        await _expect(ErrorCode.NAME_UNKNOWN, lambda: client.get_manifest("gone", "latest", None))
        broken = await _expect(
            ErrorCode.UNKNOWN, lambda: client.get_manifest("broken", "latest", None)
        )
        assert broken.status == 502
        await _expect(ErrorCode.DENIED, lambda: client.get_manifest("forbidden", "latest", ALICE))
        await _expect(ErrorCode.UNKNOWN, lambda: client.get_manifest("moved", "latest", None))
        await _expect(ErrorCode.UNAUTHORIZED, lambda: client.get_manifest("strange", "x", ALICE))


async def test_blob_redirects_are_followed_without_credentials() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "origin.test":
            if "authorization" not in request.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="o"'})
            return httpx.Response(307, headers={"Location": "https://storage.test/blob?sig=1"})
        first, last = request.headers["range"].removeprefix("bytes=").split("-")
        part = BLOB[int(first) : int(last) + 1]
        return httpx.Response(
            206,
            content=part,
            headers={"Content-Range": f"bytes {first}-{last}/{len(BLOB)}"},
        )

    async with fake_origin(handler) as client:
        head, data = await client.get_blob("a", BLOB_DIGEST, ALICE, collect, byte_range=(10, 19))
    assert data == BLOB[10:20]
    assert head.content_range == (10, 19, len(BLOB))
    storage = [r for r in seen if r.url.host == "storage.test"]
    assert len(storage) == 1
    assert "authorization" not in storage[0].headers
    assert storage[0].url.query == b"sig=1"


async def test_blob_redirect_to_plain_http_is_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "origin.test":
            return httpx.Response(302, headers={"Location": "http://storage.test/blob"})
        raise AssertionError("followed a downgrade")

    async with fake_origin(handler) as client:
        error = await _expect(
            ErrorCode.UNKNOWN, lambda: client.get_blob("a", BLOB_DIGEST, None, collect)
        )
    assert "https to http" in error.message


async def test_partial_blob_must_start_where_asked() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, content=BLOB[:10], headers={"Content-Range": "bytes 0-9/2560"})

    async with fake_origin(handler) as client:
        error = await _expect(
            ErrorCode.UNKNOWN,
            lambda: client.get_blob("a", BLOB_DIGEST, None, collect, byte_range=(5, 14)),
        )
    assert "range" in error.message


async def test_a_fresh_token_refused_as_invalid_is_the_origins_fault() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            return httpx.Response(200, json={"token": "t0k3n", "expires_in": 300})
        error = ',error="invalid_token"' if "authorization" in request.headers else ""
        challenge = f'Bearer realm="https://auth.test/token",service="s"{error}'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    async with fake_origin(handler) as client:
        error = await _expect(ErrorCode.UNKNOWN, lambda: client.get_manifest("a", "x", ALICE))
    assert error.status == 502
    assert "token" in error.message


async def test_consumer_may_stop_early() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=BLOB)

    async def first_chunk(head: BlobHead, chunks: AsyncIterator[bytes]) -> bytes:
        async for chunk in chunks:
            return chunk
        return b""

    async with fake_origin(handler) as client:
        assert BLOB.startswith(await client.get_blob("a", BLOB_DIGEST, None, first_chunk))
