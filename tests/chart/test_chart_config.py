"""The ConfigMaps hold exactly the files the services load, and the services accept them.

Each rendered file is written to disk and loaded by the service's own settings class, with an
empty environment: a file the service would refuse at start-up fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2p_agent.settings import AgentSettings
from p2p_common.settings import (
    ConfigError,
    join_host_port,
    normalise_registry,
    parse_duration,
    parse_size,
)
from p2p_proxy.settings import ProxySettings
from p2p_tracker.settings import TrackerSettings
from tests.chart.conftest import REQUIRED, VALUE_SETS, Render, Rendered, merged

SETTINGS = {"agent": AgentSettings, "proxy": ProxySettings, "tracker": TrackerSettings}


def load(rendered: Rendered, name: str, tmp_path: Path) -> Any:
    path = tmp_path / f"{name}.yaml"
    path.write_text(rendered.config_file(name))
    return SETTINGS[name].load(path, environ={})


def registries(values: dict[str, Any]) -> list[str]:
    given = values["registry"]
    return [given] if isinstance(given, str) else list(given)


@pytest.mark.parametrize("name", ["agent", "proxy", "tracker"])
def test_every_configmap_file_loads_with_the_services_settings(
    render: Render, value_set: tuple, name: str, tmp_path: Path
) -> None:
    load(render(value_set[1]), name, tmp_path)


def test_agent_config_carries_the_values(render: Render, value_set: tuple, tmp_path: Path) -> None:
    label, values = value_set
    namespace = values.get("namespaceOverride") or "kube-system"
    domain = values.get("clusterDomain", "cluster.local")
    agent = values.get("agent", {})
    ports = {"registry": 5004, "peer": 6881, "metrics": 5014, **agent.get("ports", {})}
    proxy_port = values.get("proxy", {}).get("ports", {}).get("http", 5005)

    settings = load(render(values), "agent", tmp_path)

    assert settings.registry == [normalise_registry(r) for r in registries(values)], label
    assert settings.download_rate == parse_size(values.get("downloadRate", "100MB"))
    assert settings.upload_rate == parse_size(values.get("uploadRate", "100MB"))
    assert settings.listen == join_host_port(agent.get("loopback", "127.0.0.1"), ports["registry"])
    assert settings.metrics_listen == f":{ports['metrics']}"
    assert settings.peer_port == ports["peer"]
    assert str(settings.data_dir) == agent.get("dataDir", "/p2p_agent_data")
    assert settings.cache_size == parse_size(agent.get("cacheSize", "20GB"))
    assert settings.cache_high_watermark == agent.get("cacheHighWatermark", 85)
    assert settings.cache_low_watermark == agent.get("cacheLowWatermark", 80)
    assert settings.cache_max_unused == parse_duration(agent.get("cacheMaxUnused", 0))
    assert settings.proxies == [f"http://p2p-proxy-headless.{namespace}.svc.{domain}:{proxy_port}"]
    assert settings.log_level == values.get("logLevel", "info")
    assert settings.log_format == values.get("logFormat", "json")


def test_proxy_config_carries_the_values(render: Render, value_set: tuple, tmp_path: Path) -> None:
    _, values = value_set
    namespace = values.get("namespaceOverride") or "kube-system"
    domain = values.get("clusterDomain", "cluster.local")
    proxy = values.get("proxy", {})
    ports = {"http": 5005, "peer": 6882, **proxy.get("ports", {})}
    tracker_port = values.get("tracker", {}).get("ports", {}).get("http", 6969)

    settings = load(render(values), "proxy", tmp_path)

    assert settings.registry == [normalise_registry(r) for r in registries(values)]
    host = f"p2p-tracker-headless.{namespace}.svc.{domain}:{tracker_port}"
    udp = [f"udp://{host}"] if values.get("tracker", {}).get("udp", True) else []
    assert settings.trackers == [*udp, f"http://{host}/announce"]
    assert settings.listen == f":{ports['http']}"
    assert settings.peer_port == ports["peer"]
    assert str(settings.data_dir) == proxy.get("dataDir", "/p2p_proxy_data")
    assert settings.cache_size == parse_size(proxy.get("cacheSize", "50GB"))
    assert settings.upload_rate == parse_size(proxy.get("uploadRate", 0))
    assert settings.log_level == values.get("logLevel", "info")
    assert settings.log_format == values.get("logFormat", "json")
    egress = proxy.get("egressProxy", {})
    routes = settings.egress_routes({})
    assert (routes and routes.https) == egress.get("url")
    assert settings.origin_no_proxy == egress.get("noProxy", [])


def test_tracker_config_carries_the_values(
    render: Render, value_set: tuple, tmp_path: Path
) -> None:
    _, values = value_set
    port = values.get("tracker", {}).get("ports", {}).get("http", 6969)
    settings = load(render(values), "tracker", tmp_path)
    assert settings.listen == f":{port}"
    assert settings.log_format == values.get("logFormat", "json")


def test_the_namespace_reaches_the_headless_names(render: Render, tmp_path: Path) -> None:
    rendered = render(REQUIRED, namespace="p2p-system")
    agent = load(rendered, "agent", tmp_path)
    proxy = load(rendered, "proxy", tmp_path)
    assert agent.proxies == ["http://p2p-proxy-headless.p2p-system.svc.cluster.local:5005"]
    assert proxy.trackers == [
        "udp://p2p-tracker-headless.p2p-system.svc.cluster.local:6969",
        "http://p2p-tracker-headless.p2p-system.svc.cluster.local:6969/announce",
    ]


def test_several_registries_reach_the_agent_in_order_without_duplicates(
    render: Render, tmp_path: Path
) -> None:
    values = merged(
        REQUIRED,
        {
            "registry": [
                "b.example.com",
                "a.example.com:5000",
                "https://b.example.com/",
                "B.example.com",
            ]
        },
    )
    settings = load(render(values), "agent", tmp_path)
    assert settings.registry == ["https://b.example.com", "https://a.example.com:5000"]


def test_extra_settings_pass_through(render: Render, tmp_path: Path) -> None:
    rendered = render(VALUE_SETS["everything-changed"])
    agent = load(rendered, "agent", tmp_path)
    proxy = load(rendered, "proxy", tmp_path)
    tracker = load(rendered, "tracker", tmp_path)
    assert (agent.fallback_after, agent.max_connections) == (5.0, 50)
    assert proxy.auth_cache_ttl == 30.0
    assert (tracker.announce_interval, tracker.peer_expiry) == (30, 90)


def test_a_setting_the_service_does_not_know_is_refused_by_the_service(
    render: Render, tmp_path: Path
) -> None:
    # The chart cannot know every service setting; the service names the unknown key at start-up.
    rendered = render(merged(REQUIRED, {"agent": {"config": {"noSuchSetting": 1}}}))
    with pytest.raises(ConfigError, match="noSuchSetting"):
        load(rendered, "agent", tmp_path)


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        ("100MB", 100_000_000),
        ("20MB/s", 20_000_000),
        ("64MiB", 64 * 2**20),
        (0, 0),
        (12_500_000, 12_500_000),
    ],
)
def test_rates_in_every_accepted_spelling(
    render: Render, tmp_path: Path, rate: str | int, expected: int
) -> None:
    settings = load(
        render(merged(REQUIRED, {"downloadRate": rate, "uploadRate": rate})), "agent", tmp_path
    )
    assert settings.download_rate == settings.upload_rate == expected


def test_watermarks_the_wrong_way_round_are_refused_by_the_agent_naming_the_key(
    render: Render, tmp_path: Path
) -> None:
    # The schema checks each value; only the agent can compare the two.
    rendered = render(merged(REQUIRED, {"agent": {"cacheHighWatermark": 70}}))
    with pytest.raises(ConfigError, match=r"^cacheLowWatermark: must be below cacheHighWatermark"):
        load(rendered, "agent", tmp_path)
    off = load(render(merged(REQUIRED, {"agent": {"cacheHighWatermark": 0}})), "agent", tmp_path)
    assert off.cache_policy().high_watermark == 0
