"""TLS between agent and proxy (issue 8, item 11): the proxy serves its agent API over HTTPS
with a certificate from a (Secret-mounted) file pair; agents verify it against a configured
CA, by the proxies' host name even though they connect to its addresses, so pull-secret
credentials never cross the network in clear."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from p2p_common.settings import ConfigError
from p2p_proxy.settings import ProxySettings
from tests.cluster import origin_with_image, run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.registry import Registry, make_tls_files

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    with origin_with_image(
        tmp_path_factory.mktemp("tls"), seed="tls", layer_sizes=[3 * MiB, 500]
    ) as origin:
        yield origin


async def test_an_agent_pulls_through_an_https_proxy_named_by_host(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    # The certificate names only "localhost": connecting to 127.0.0.1 verifies only because
    # the agent sends and checks the host name the proxy URL gave.
    ca, cert, key = make_tls_files(tmp_path / "tls", dns_names=("localhost",), ip=None)
    async with (
        run_tracker() as announce,
        run_proxy(
            tmp_path / "proxy",
            [registry.url],
            [announce],
            tls_cert_file=cert,
            tls_key_file=key,
        ) as proxy,
    ):
        https = f"https://localhost:{proxy.port}"
        # Plain HTTP gets nothing from the TLS port.
        with pytest.raises(httpx.HTTPError):
            await proxy.http.get("/healthz")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca)) as client:
            assert (await client.get(f"{https}/healthz")).status_code == 200
        async with run_agent(
            tmp_path / "agent", [registry.url], [https], proxy_ca_file=ca
        ) as agent:
            for blob in image.layers:
                path = f"/v2/team/app/blobs/{blob.digest}"
                with trio.fail_after(60):
                    response = await agent.http.get(path)
                assert response.status_code == 200, response.text
                assert response.content == blob.data


async def test_an_agent_refuses_a_proxy_it_cannot_verify(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    _, cert, key = make_tls_files(tmp_path / "tls", dns_names=("localhost",), ip=None)
    other_ca, _, _ = make_tls_files(tmp_path / "other")  # a CA that did not sign it
    layer = image.layers[0]
    async with (
        run_tracker() as announce,
        run_proxy(
            tmp_path / "proxy",
            [registry.url],
            [announce],
            tls_cert_file=cert,
            tls_key_file=key,
        ) as proxy,
        run_agent(
            tmp_path / "agent",
            [registry.url],
            [f"https://localhost:{proxy.port}"],
            proxy_ca_file=other_ca,
        ) as agent,
    ):
        with trio.fail_after(60):
            response = await agent.http.get(f"/v2/team/app/blobs/{layer.digest}")
        assert response.status_code == 502
        assert response.json()["errors"][0]["code"] == "UNKNOWN"


def test_a_certificate_without_its_key_is_a_config_error_naming_both(tmp_path: Path) -> None:
    _, cert, key = make_tls_files(tmp_path / "tls")
    with pytest.raises(ConfigError, match="tlsKeyFile"):
        ProxySettings.load(None, environ={}, registry=["r.example"], tls_cert_file=cert)
    with pytest.raises(ConfigError, match="tlsKeyFile"):
        ProxySettings.load(None, environ={}, registry=["r.example"], tls_key_file=key)
    both = ProxySettings.load(
        None, environ={}, registry=["r.example"], tls_cert_file=cert, tls_key_file=key
    )
    assert both.tls_cert_file == cert
