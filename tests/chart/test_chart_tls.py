"""proxy.tls: the proxies serve their agent API over HTTPS with a Secret's certificate, the
agents verify it with the CA alone (never the key), probes and scrapes speak HTTPS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2p_agent.settings import AgentSettings
from p2p_proxy.settings import ProxySettings
from tests.chart.conftest import REQUIRED, Render, merged

TLS = merged(REQUIRED, {"proxy": {"tls": {"secretName": "p2p-proxy-tls"}}})


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1
    return found[0]


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in spec["volumes"] if v["name"] == name]
    assert len(found) == 1, f"no volume {name}"
    return found[0]


def test_the_proxy_serves_https_with_the_secret(render: Render, tmp_path: Path) -> None:
    rendered = render(TLS)
    path = tmp_path / "proxy.yaml"
    path.write_text(rendered.config_file("proxy"))
    settings = ProxySettings.load(path, environ={})
    assert str(settings.tls_cert_file) == "/etc/p2p/tls/tls.crt"
    assert str(settings.tls_key_file) == "/etc/p2p/tls/tls.key"
    spec = rendered.pod_spec("Deployment", "p2p-proxy")
    proxy = container(spec, "proxy")
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert mounts["tls"]["mountPath"] == "/etc/p2p/tls"
    assert mounts["tls"]["readOnly"] is True
    secret = volume(spec, "tls")["secret"]
    assert secret["secretName"] == "p2p-proxy-tls"
    assert {i["key"] for i in secret["items"]} == {"tls.crt", "tls.key"}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert proxy[probe]["httpGet"]["scheme"] == "HTTPS", probe
    annotations = rendered.get("Deployment", "p2p-proxy")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/scheme"] == "https"


def test_agents_verify_the_proxies_with_the_ca_only(render: Render, tmp_path: Path) -> None:
    rendered = render(TLS)
    path = tmp_path / "agent.yaml"
    path.write_text(rendered.config_file("agent"))
    settings = AgentSettings.load(path, environ={})
    assert settings.proxies == ["https://p2p-proxy-headless.kube-system.svc.cluster.local:5005"]
    assert str(settings.proxy_ca_file) == "/etc/p2p/proxy-ca/ca.crt"
    spec = rendered.pod_spec("DaemonSet", "p2p-agent")
    secret = volume(spec, "proxy-ca")["secret"]
    assert secret["secretName"] == "p2p-proxy-tls"
    assert secret["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # never tls.key
    mounts = {m["name"]: m for m in container(spec, "agent")["volumeMounts"]}
    assert mounts["proxy-ca"]["mountPath"] == "/etc/p2p/proxy-ca"
    other = render(merged(TLS, {"proxy": {"tls": {"caSecretName": "cluster-ca"}}}))
    ca = volume(other.pod_spec("DaemonSet", "p2p-agent"), "proxy-ca")["secret"]
    assert ca["secretName"] == "cluster-ca"


def test_without_a_secret_everything_stays_plain_http(render: Render, tmp_path: Path) -> None:
    rendered = render(REQUIRED)
    path = tmp_path / "agent.yaml"
    path.write_text(rendered.config_file("agent"))
    assert AgentSettings.load(path, environ={}).proxies[0].startswith("http://")
    spec = rendered.pod_spec("Deployment", "p2p-proxy")
    assert all(v["name"] != "tls" for v in spec["volumes"])
    proxy = container(spec, "proxy")
    assert proxy["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    agent_spec = rendered.pod_spec("DaemonSet", "p2p-agent")
    assert all(v["name"] != "proxy-ca" for v in agent_spec["volumes"])
    annotations = rendered.get("Deployment", "p2p-proxy")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert "prometheus.io/scheme" not in annotations
