"""A changed password stops working within ``authCacheTtl`` (plus a little), at the proxy and
through an agent: no cached bearer token, proxy decision or agent decision outlives it.

Before: the proxy kept using the bearer token fetched with the old password for as long as the
token server let it live (300 s here, up to a day), and the agent's cache added its own TTL on
top of the proxy's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.cluster import basic, push, run_agent, run_proxy
from tests.realparts import images
from tests.realparts.registry import DEFAULT_USERS, Registry, run_registry

pytestmark = pytest.mark.realparts

TTL = 1.0
SLACK = 5.0
OLD = basic("alice", DEFAULT_USERS["alice"])
NEW_PASSWORD = "alice-new-secret"
NEW = basic("alice", NEW_PASSWORD)
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    base = tmp_path_factory.mktemp("revocation")
    with run_registry(base / "token", auth="token") as registry:
        image = push(
            base / "push",
            registry,
            "private/app",
            seed="revocation",
            layer_sizes=[1000, 2 * MiB],
            creds=("alice", DEFAULT_USERS["alice"]),
        )
        yield registry, image


def change_password(registry: Registry, password: str) -> None:
    tokens = registry.token_server
    assert tokens is not None
    tokens.users["alice"] = password  # type: ignore[index]


async def refused_after(client: httpx.AsyncClient, path: str) -> float:
    """Seconds until HEAD ``path`` with the old password answers 401 (asked every 0.1 s)."""
    started = time.monotonic()
    with trio.fail_after(TTL + SLACK + 30):
        while (await client.head(path, headers=OLD)).status_code != 401:  # noqa: ASYNC110
            await trio.sleep(0.1)
    return time.monotonic() - started


async def test_the_proxy_refuses_an_old_password_within_the_ttl(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[1]
    path = f"/v2/private/app/blobs/{layer.digest}"
    tokens = registry.token_server
    assert tokens is not None
    async with run_proxy(tmp_path / "proxy", [registry.url], [], auth_cache_ttl=TTL) as proxy:
        assert (await proxy.http.head(path, headers=OLD)).status_code == 200
        assert tokens.expires_in > 10 * (TTL + SLACK)  # the token itself would live on
        change_password(registry, NEW_PASSWORD)
        try:
            assert await refused_after(proxy.http, path) <= TTL + SLACK
            assert (await proxy.http.head(path, headers=NEW)).status_code == 200
        finally:
            change_password(registry, DEFAULT_USERS["alice"])


async def test_an_agent_refuses_an_old_password_within_the_ttl_not_twice_it(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[1]
    path = f"/v2/private/app/blobs/{layer.digest}?ns={registry.host}"
    async with (
        run_proxy(tmp_path / "proxy", [registry.url], [], auth_cache_ttl=TTL) as proxy,
        run_agent(tmp_path / "agent", [registry.url], [proxy.url], auth_cache_ttl=TTL) as agent,
    ):
        assert (await agent.http.head(path, headers=OLD)).status_code == 200
        change_password(registry, NEW_PASSWORD)
        try:
            assert await refused_after(agent.http, path) <= TTL + SLACK
            assert (await agent.http.head(path, headers=NEW)).status_code == 200
        finally:
            change_password(registry, DEFAULT_USERS["alice"])
