"""proxy.egressProxy: the proxies reach the origins through an outbound HTTP proxy; credentials
come from a Secret, never the ConfigMap; nothing else of the chart is touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import pytest

from p2p_proxy.settings import ProxySettings
from tests.chart.conftest import REQUIRED, Render, merged


def egress(**values: Any) -> dict[str, Any]:
    return merged(REQUIRED, {"proxy": {"egressProxy": values}})


def proxy_env(rendered: Any) -> list[dict[str, Any]]:
    (proxy,) = [c for c in rendered.pod_spec("Deployment", "p2p-proxy")["containers"]]
    env: list[dict[str, Any]] = proxy.get("env", [])
    return env


def settings(rendered: Any, tmp_path: Path, environ: dict[str, str]) -> ProxySettings:
    path = tmp_path / "proxy.yaml"
    path.write_text(rendered.config_file("proxy"))
    return ProxySettings.load(path, environ=environ)


def test_off_by_default(render: Render, tmp_path: Path) -> None:
    rendered = render(REQUIRED)
    loaded = settings(rendered, tmp_path, {})
    assert loaded.origin_proxy is None
    assert not loaded.origin_proxy_from_env
    assert loaded.egress_routes({"HTTPS_PROXY": "http://ignored:1"}) is None
    assert proxy_env(rendered) == []


def test_a_url_and_exceptions_reach_the_proxy_config(render: Render, tmp_path: Path) -> None:
    rendered = render(egress(url="http://proxy.corp:3128", noProxy=[".corp", "10.0.0.0/8"]))
    loaded = settings(rendered, tmp_path, {})
    routes = loaded.egress_routes({})
    assert routes is not None
    assert routes.proxy_for("https", "registry-1.docker.io") == "http://proxy.corp:3128"
    assert routes.proxy_for("https", "registry.corp") is None
    assert routes.proxy_for("https", "10.1.2.3") is None
    # Nothing else goes through it: the agents' and trackers' configs know no proxy.
    for name in ("agent", "tracker"):
        assert "proxy.corp" not in rendered.config_file(name)


def test_credentials_come_from_the_secret(render: Render, tmp_path: Path) -> None:
    rendered = render(egress(secretName="egress-proxy", secretKey="proxy-url"))
    assert "originProxy" not in rendered.config_file("proxy")
    assert proxy_env(rendered) == [
        {
            "name": "P2P_PROXY_ORIGIN_PROXY",
            "valueFrom": {"secretKeyRef": {"name": "egress-proxy", "key": "proxy-url"}},
        }
    ]
    loaded = settings(rendered, tmp_path, {"P2P_PROXY_ORIGIN_PROXY": "http://u:pw9@proxy:3128"})
    assert loaded.dump()["originProxy"] == "http://***@proxy:3128"
    with_extra = render(
        merged(
            egress(secretName="egress-proxy"),
            {"proxy": {"extraEnv": [{"name": "TZ", "value": "UTC"}]}},
        )
    )
    assert [e["name"] for e in proxy_env(with_extra)] == ["P2P_PROXY_ORIGIN_PROXY", "TZ"]


def test_from_the_environment(render: Render, tmp_path: Path) -> None:
    rendered = render(egress(fromEnvironment=True, noProxy=["registry.internal"]))
    loaded = settings(rendered, tmp_path, {})
    routes = loaded.egress_routes({"HTTPS_PROXY": "http://proxy.corp:3128"})
    assert routes is not None
    assert routes.source == "environment"
    assert routes.proxy_for("https", "registry.internal") is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"url": "http://u:pw@proxy:3128"}, "proxy.egressProxy"),
        ({"url": "http://proxy:3128", "secretName": "s"}, "not both"),
        ({"fromEnvironment": True, "secretName": "s"}, "fromEnvironment"),
        ({"url": "ftp://proxy:21"}, "/proxy/egressProxy/url"),
        ({"noProxy": "a,b"}, "/proxy/egressProxy/noProxy"),
        ({"noProxy": ["a, b"]}, "/proxy/egressProxy/noProxy/0"),
        ({"urll": "http://proxy:3128"}, "urll"),
    ],
)
def test_bad_values_are_refused(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises((helm_python.HelmValuesError, helm_python.HelmRenderError), match=message):
        chart.render(egress(**values), name="p2p", namespace="kube-system", is_install=True)
