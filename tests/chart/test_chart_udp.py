"""tracker.udp: the trackers also answer BEP 15 over UDP, and the proxies list udp:// first."""

from __future__ import annotations

from pathlib import Path

from p2p_proxy.settings import ProxySettings
from p2p_tracker.settings import TrackerSettings
from tests.chart.conftest import REQUIRED, Render, merged

UDP = merged(REQUIRED, {"tracker": {"udp": True}})
NO_UDP = merged(REQUIRED, {"tracker": {"udp": False}})
HOST = "p2p-tracker-headless.kube-system.svc.cluster.local"


def load(render: Render, values: dict[str, object], name: str, tmp_path: Path) -> object:
    path = tmp_path / f"{name}.yaml"
    path.write_text(render(values).config_file(name))
    settings = {"proxy": ProxySettings, "tracker": TrackerSettings}[name]
    return settings.load(path, environ={})


def test_udp_on_reaches_the_tracker_the_services_and_the_metainfo(
    render: Render, tmp_path: Path
) -> None:
    tracker = load(render, UDP, "tracker", tmp_path)
    assert tracker.udp_listen == ":6969"  # type: ignore[attr-defined]
    proxy = load(render, UDP, "proxy", tmp_path)
    assert proxy.trackers == [f"udp://{HOST}:6969", f"http://{HOST}:6969/announce"]  # type: ignore[attr-defined]
    rendered = render(UDP)
    (container,) = rendered.pod_spec("Deployment", "p2p-tracker")["containers"]
    assert {"name": "udp", "containerPort": 6969, "protocol": "UDP"} in container["ports"]
    for name in ("p2p-tracker", "p2p-tracker-headless"):
        ports = rendered.get("Service", name)["spec"]["ports"]
        assert {"name": "udp", "port": 6969, "targetPort": "udp", "protocol": "UDP"} in ports


def test_udp_is_on_by_default(render: Render) -> None:
    # What a rollout's announce latency needs at the chart's defaults (docs/tracker.md).
    default, udp = render(REQUIRED), render(UDP)
    for name in ("tracker", "proxy"):
        assert default.config_file(name) == udp.config_file(name), name


def test_udp_off_leaves_http_alone(render: Render, tmp_path: Path) -> None:
    tracker = load(render, NO_UDP, "tracker", tmp_path)
    assert not tracker.udp_listen  # type: ignore[attr-defined]
    proxy = load(render, NO_UDP, "proxy", tmp_path)
    assert proxy.trackers == [f"http://{HOST}:6969/announce"]  # type: ignore[attr-defined]
    rendered = render(NO_UDP)
    for name in ("p2p-tracker", "p2p-tracker-headless"):
        ports = rendered.get("Service", name)["spec"]["ports"]
        assert all(port["protocol"] == "TCP" for port in ports)
