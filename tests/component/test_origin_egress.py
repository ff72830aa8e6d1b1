"""The origin traffic of a proxy through a real egress proxy (tinyproxy), and nothing else.

A token-auth origin over TLS (its token realm over plain http), one p2p-tracker, one p2p-proxy
and one agent in this process; tinyproxy logs every request line it reads, so what went through
it, and what did not, is on record: the registry's ``CONNECT`` tunnel and the token realm's
absolute-form ``GET`` when the proxy is configured, neither for a host ``NO_PROXY`` exempts, and
nothing at all from the tracker, the agent or the peers, or when no proxy setting is on even with
``HTTPS_PROXY`` in the environment.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from p2p_common.logs import JsonFormatter
from tests.cluster import basic, metric, run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.registry import DEFAULT_USERS, Registry, run_registry
from tests.realparts.tinyproxy import TinyProxy, run_tinyproxy

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024
PROXY_USER, PROXY_PASSWORD = "egress", "proxy-pass-0d1f"
"""The egress proxy's own credentials: in originProxy, never in a log line."""
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
ALICE = basic("alice", DEFAULT_USERS["alice"])


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    workdir = tmp_path_factory.mktemp("origin")
    with run_registry(workdir / "registry", auth="token", tls=True) as registry:
        image = images.build_image(workdir / "layout", seed="egress", layer_sizes=(2 * MiB,))
        images.push_image(
            workdir / "layout",
            image,
            registry.host,
            "private/app",
            creds=("alice", DEFAULT_USERS["alice"]),
            ca_dir=registry.ca_dir,
        )
        yield registry, image


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


@pytest.fixture
def egress(tmp_path: Path, clean_environment: pytest.MonkeyPatch) -> Iterator[TinyProxy]:
    with run_tinyproxy(tmp_path / "tinyproxy", credentials=(PROXY_USER, PROXY_PASSWORD)) as proxy:
        yield proxy


def token_address(registry: Registry) -> str:
    assert registry.token_server is not None
    return urlsplit(registry.token_server.realm).netloc


async def pull(
    tmp_path: Path, origin: tuple[Registry, images.Image], **proxy_settings: object
) -> dict[str, str]:
    """One pull (manifest, then the layer) through an agent; the addresses of the p2p parts
    (which must never show up at the egress proxy)."""
    registry, image = origin
    layer = image.layers[0]
    async with (
        run_tracker() as tracker,
        run_proxy(
            tmp_path / "proxy",
            [registry.url],
            [tracker],
            registry_ca_file=registry.ca_file,
            **proxy_settings,
        ) as proxy,
        run_agent(tmp_path / "agent", [registry.url], [proxy.url]) as agent,
    ):
        with trio.fail_after(60):
            manifest = await agent.http.get(
                f"/v2/private/app/manifests/{image.tag}",
                headers={**ALICE, "Accept": image.top.media_type},
            )
            assert manifest.status_code == 200, manifest.text
            blob = await agent.http.get(f"/v2/private/app/blobs/{layer.digest}", headers=ALICE)
        assert blob.content == layer.data
        # The blob went through the swarm: the proxy and the agent announced it.
        tracker_base = tracker.removesuffix("/announce")
        async with httpx.AsyncClient(base_url=tracker_base, trust_env=False) as http:
            with trio.fail_after(20):
                while await announces(http) < 2:  # noqa: ASYNC110 - a count over HTTP
                    await trio.sleep(0.05)
        return {
            "tracker": urlsplit(tracker).netloc,
            "proxy": f"127.0.0.1:{proxy.port}",
            "agent": agent.host,
            "proxy_peer": f"127.0.0.1:{proxy.settings.peer_port}",
            "agent_peer": f"127.0.0.1:{agent.settings.peer_port}",
        }


async def announces(tracker: httpx.AsyncClient) -> float:
    """Announces the tracker answered, every event and protocol (seeds come in batches)."""
    events = ("none", "started", "completed", "stopped", "paused")
    return sum(
        [
            await metric(tracker, "p2p_tracker_announces_total", event=e, protocol=p)
            for e in events
            for p in ("http", "udp", "batch")
        ]
    )


def assert_no_p2p_traffic(egress: TinyProxy, parts: dict[str, str]) -> None:
    targets = egress.targets()
    for name, address in parts.items():
        assert address not in targets, (name, targets)


def logged_text(caplog: pytest.LogCaptureFixture) -> str:
    formatter = JsonFormatter()
    return "\n".join(formatter.format(record) for record in caplog.records)


async def test_origin_requests_go_through_the_configured_proxy_and_nothing_else(
    tmp_path: Path,
    origin: tuple[Registry, images.Image],
    egress: TinyProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="p2p")
    registry, _ = origin
    assert registry.token_server is not None
    tokens_before = registry.token_server.request_count
    parts = await pull(tmp_path, origin, origin_proxy=egress.url)
    requests = egress.requests()
    # The https registry and its https token realm: CONNECT tunnels.
    assert {method for method, _ in requests} == {"CONNECT"}, requests
    assert registry.token_server.request_count > tokens_before
    assert set(egress.targets()) == {registry.host, token_address(registry)}
    assert_no_p2p_traffic(egress, parts)
    # The proxy's password is used (tinyproxy asks for it) but never logged.
    text = logged_text(caplog)
    assert '"event":"proxy.origin_egress"' in text
    assert f"http://***@{egress.address}" in text
    assert PROXY_PASSWORD not in text


async def test_no_proxy_hosts_bypass_it(
    tmp_path: Path, origin: tuple[Registry, images.Image], egress: TinyProxy
) -> None:
    registry, _ = origin
    token = token_address(registry)
    await pull(tmp_path / "explicit", origin, origin_proxy=egress.url, origin_no_proxy=[token])
    assert set(egress.targets()) == {registry.host}  # the token realm went direct
    seen = len(egress.requests())
    # Everything exempt: nothing goes through it.
    await pull(
        tmp_path / "all", origin, origin_proxy=egress.url, origin_no_proxy=["localhost,127.0.0.1"]
    )
    assert len(egress.requests()) == seen


async def test_the_environment_is_read_only_when_asked_to(
    tmp_path: Path,
    origin: tuple[Registry, images.Image],
    egress: TinyProxy,
    clean_environment: pytest.MonkeyPatch,
) -> None:
    registry, _ = origin
    token = token_address(registry)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        clean_environment.setenv(name, egress.url)
        clean_environment.setenv(name.lower(), egress.url)
    # The environment is effective: a client that trusts it goes through tinyproxy.
    assert registry.ca_file is not None
    tls = ssl.create_default_context(cafile=registry.ca_file)
    async with httpx.AsyncClient(trust_env=True, verify=tls, timeout=10) as trusting:
        await trusting.get(f"https://{token}/")
    assert egress.targets() == [token]
    # (c) Without a proxy setting nothing goes through it.
    parts = await pull(tmp_path / "off", origin)
    assert egress.targets() == [token]
    # With originProxyFromEnv: HTTPS_PROXY for the https registry, HTTP_PROXY for the token
    # realm, unless NO_PROXY (here with a port) exempts it; still nothing of p2p's own.
    clean_environment.setenv("NO_PROXY", token)
    parts = await pull(tmp_path / "env", origin, origin_proxy_from_env=True)
    assert egress.targets()[1:]
    assert set(egress.targets()[1:]) == {registry.host}
    assert_no_p2p_traffic(egress, parts)
    clean_environment.delenv("NO_PROXY")
    await pull(tmp_path / "env-all", origin, origin_proxy_from_env=True)
    assert token in egress.targets()[1:]


async def test_a_plain_http_origin_goes_through_it_as_absolute_form_requests(
    tmp_path: Path, egress: TinyProxy
) -> None:
    with run_registry(tmp_path / "plain", auth="htpasswd") as registry:
        image = images.build_image(tmp_path / "layout", seed="egress-plain", layer_sizes=(4096,))
        creds = ("alice", DEFAULT_USERS["alice"])
        images.push_image(tmp_path / "layout", image, registry.host, "team/app", creds=creds)
        async with run_proxy(tmp_path / "proxy", [registry.url], [], origin_proxy=egress.url) as p:
            got = await p.http.get(
                f"/v2/team/app/manifests/{image.tag}",
                headers={**ALICE, "Accept": image.top.media_type},
            )
            assert (got.status_code, got.content) == (200, image.top.data)
    requests = egress.requests()
    assert requests
    assert all(method in ("GET", "HEAD") for method, _ in requests), requests
    assert all(t.startswith(f"http://{registry.host}/v2/team/app/") for _, t in requests)
