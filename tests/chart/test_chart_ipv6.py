"""IPv6 and dual-stack: every listener the chart configures takes both families (``:port``),
the agent's registry API may sit on ::1, and containerd's hosts.toml follows it."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from p2p_agent.mirror import read_hosts_toml
from p2p_agent.settings import AgentSettings
from p2p_common.settings import ServiceSettings
from p2p_proxy.settings import ProxySettings
from p2p_tracker.settings import TrackerSettings
from tests.chart.conftest import REQUIRED, Render, Rendered, merged
from tests.chart.test_chart_mirror import MIRROR, materialise

S = TypeVar("S", bound=ServiceSettings)


def load(rendered: Rendered, settings: type[S], tmp_path: Path) -> S:
    name = settings.ENV_PREFIX.removeprefix("P2P_").removesuffix("_").lower()
    path = tmp_path / f"{name}.yaml"
    path.write_text(rendered.config_file(name))
    return settings.load(path, environ={})


def test_listeners_take_both_families(render: Render, tmp_path: Path) -> None:
    rendered = render(merged(REQUIRED, {"tracker": {"udp": True}}))
    agent = load(rendered, AgentSettings, tmp_path)
    proxy = load(rendered, ProxySettings, tmp_path)
    tracker = load(rendered, TrackerSettings, tmp_path)
    assert agent.metrics_listen == ":5014"
    assert agent.peer_host == ""
    assert agent.listen == "127.0.0.1:5004"
    assert proxy.listen == ":5005"
    assert (tracker.listen, tracker.udp_listen) == (":6969", ":6969")
    # Nothing the chart renders formats a pod address: Services and DNS names only.
    for obj in rendered.objects:
        assert "status.podIP" not in str(obj)


def test_an_ipv6_loopback_agent_and_its_mirror_entries(render: Render, tmp_path: Path) -> None:
    rendered = render(merged(MIRROR, {"agent": {"loopback": "::1"}}))
    agent = load(rendered, AgentSettings, tmp_path)
    assert agent.listen == "[::1]:5004"
    materialise(rendered, tmp_path / "mirror")
    (path, *_) = sorted((tmp_path / "mirror").glob("*/hosts.toml"))
    hosts = tomllib.loads(path.read_text())
    assert list(hosts["host"]) == ["http://[::1]:5004"]
    # The agent's status recognises the entry as its own.
    found = read_hosts_toml(tmp_path / "mirror", path.parent.name, 5004)
    assert found["state"] == "mirrored"


def test_service_ip_families(render: Render) -> None:
    plain = render(REQUIRED)
    dual = render(
        merged(REQUIRED, {"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv6", "IPv4"]})
    )
    for name in ("p2p-proxy", "p2p-proxy-headless", "p2p-tracker", "p2p-tracker-headless"):
        assert "ipFamilyPolicy" not in plain.get("Service", name)["spec"]
        spec = dual.get("Service", name)["spec"]
        assert (spec["ipFamilyPolicy"], spec["ipFamilies"]) == ("PreferDualStack", ["IPv6", "IPv4"])
