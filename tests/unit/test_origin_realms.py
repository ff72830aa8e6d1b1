"""Where the proxy may send a caller's password: the token realm pinned to the registry's host
(or its parent domain, or an allow-list); and a remembered challenge that the registry no
longer issues is forgotten rather than taken for a refusal."""

from __future__ import annotations

import base64

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2p_common.oci import OCIError
from p2p_common.registry_auth import Credentials, realm_allowed
from p2p_proxy.origin import OriginClient

DIGEST = "sha256:" + "ab" * 32
ALICE = Credentials("alice", "secret")


@pytest.mark.parametrize(
    ("realm", "registry", "allowed", "ok"),
    [
        ("https://registry.example.com/token", "registry.example.com", (), True),
        ("https://REGISTRY.example.com.:8443/token", "registry.example.com", (), True),
        ("https://auth.docker.io/token", "registry-1.docker.io", (), True),
        ("https://docker.io/token", "registry-1.docker.io", (), True),
        ("https://evil.io/token", "registry-1.docker.io", (), False),
        ("https://auth.example.org/token", "registry.example.com", (), False),
        ("https://auth.example.org/token", "registry.example.com", ("auth.example.org",), True),
        ("https://other.io/token", "docker.io", (), False),  # no parent of a two-label name
        ("http://127.0.0.1:5001/token", "127.0.0.1", (), True),
        ("http://127.0.0.2/token", "127.0.0.1", (), False),
        ("https://0.0.1/token", "127.0.0.1", (), False),  # an address has no parent domain
        ("not a url", "registry.example.com", (), False),
    ],
)
def test_realms(realm: str, registry: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert realm_allowed(realm, registry, allowed) is ok


LABEL = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)


@given(
    registry=st.lists(LABEL, min_size=1, max_size=4).map(".".join),
    host=st.lists(LABEL, min_size=1, max_size=4).map(".".join),
)
def test_a_realm_is_allowed_only_on_the_registry_or_within_its_parent_domain(
    registry: str, host: str
) -> None:
    allowed = realm_allowed(f"https://{host}/token", registry)
    labels = registry.split(".")
    parent = ".".join(labels[1:]) if len(labels) >= 3 else None
    within = parent is not None and (host == parent or host.endswith("." + parent))
    assert allowed == (host == registry or within)
    assert realm_allowed(f"https://{host}/token", registry, [host])


class Registry:
    """A registry whose token server moves from realm A to realm B while the client runs."""

    def __init__(self, realm: str = "https://origin.test/a") -> None:
        self.realm = realm
        self.token_requests: list[str] = []

    def challenge(self) -> httpx.Response:
        header = f'Bearer realm="{self.realm}",service="origin.test",scope="repository:app:pull"'
        return httpx.Response(401, headers={"www-authenticate": header})

    def handle(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url.startswith(("https://origin.test/a", "https://origin.test/b", "https://far.test")):
            self.token_requests.append(url.split("?", maxsplit=1)[0])
            basic = base64.b64encode(b"alice:secret").decode()
            assert request.headers.get("authorization") == f"Basic {basic}"
            return httpx.Response(200, json={"token": "tok-" + url.split("?", maxsplit=1)[0][-1]})
        expected = "Bearer tok-" + self.realm[-1]
        if request.headers.get("authorization") != expected:
            return self.challenge()
        return httpx.Response(200, headers={"content-length": "5", "docker-content-digest": DIGEST})


async def test_a_remembered_challenge_that_the_registry_replaced_is_forgotten() -> None:
    registry = Registry()
    async with OriginClient(
        "https://origin.test", transport=httpx.MockTransport(registry.handle)
    ) as client:
        assert (await client.head_blob("app", DIGEST, ALICE)).size == 5
        registry.realm = "https://origin.test/b"  # a new token server
        # Another repository: a new token, fetched pre-emptively from realm a, is refused
        # with the new challenge. That is answered (realm b), not taken for a refusal.
        assert (await client.head_blob("other", DIGEST, ALICE)).size == 5
    assert registry.token_requests[-1] == "https://origin.test/b"


async def test_credentials_never_go_to_a_realm_on_another_host() -> None:
    registry = Registry(realm="https://far.test/token")
    async with OriginClient(
        "https://origin.test", transport=httpx.MockTransport(registry.handle)
    ) as client:
        with pytest.raises(OCIError, match="tokenRealmHosts"):
            await client.head_blob("app", DIGEST, ALICE)
        assert registry.token_requests == []
    async with OriginClient(
        "https://origin.test",
        transport=httpx.MockTransport(registry.handle),
        token_realm_hosts=["far.test"],
    ) as client:
        assert (await client.head_blob("app", DIGEST, ALICE)).size == 5
    assert registry.token_requests == ["https://far.test/token"]
