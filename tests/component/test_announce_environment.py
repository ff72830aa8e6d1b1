"""Announces reach the cluster's trackers directly, whatever proxy the environment names."""

from __future__ import annotations

import httpx
import pytest
import trio

from p2p_common.storage import MemoryPieceStore
from tests.cluster import run_tracker
from tests.engine_helpers import make_content, metainfo_for, running_engines
from tests.realparts.procs import free_port

MiB = 1024 * 1024
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture
def unreachable_proxy_in_environment(monkeypatch: pytest.MonkeyPatch) -> str:
    """Every proxy variable names a port nobody listens on; nothing is exempt."""
    proxy = f"http://127.0.0.1:{free_port()}"
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, proxy)
        monkeypatch.setenv(name.lower(), proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return proxy


async def test_announces_ignore_proxy_variables(unreachable_proxy_in_environment: str) -> None:
    content = make_content(2 * MiB)
    async with run_tracker() as tracker:
        # The environment is effective: a client that trusts it cannot reach the tracker.
        async with httpx.AsyncClient() as trusting:
            with pytest.raises(httpx.TransportError):
                await trusting.get(tracker.replace("/announce", "/healthz"))
        meta = metainfo_for(content, [tracker])
        # Engines as the agent and the proxy build them: with their default HTTP client.
        async with running_engines(1, role="proxy") as (seed,), running_engines(1) as (leech,):
            await seed.add_torrent(meta, MemoryPieceStore(meta, content))
            store = MemoryPieceStore(meta)
            torrent = await leech.add_torrent(meta, store)  # the tracker is its only way to peers
            with trio.fail_after(30):
                await torrent.wait_complete()
    assert bytes(store.data) == content
