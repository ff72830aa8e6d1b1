"""What the chart renders is what the services run: the three ConfigMaps' files start the real
services, an image is pulled through them, and a ``helm upgrade`` of the rates reaches the
running agent through its ConfigMap volume without a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chart.conftest import Render
from tests.realparts import images
from tests.realparts.procs import ManagedProcess, free_port, poll_until
from tests.realparts.registry import run_registry
from tests.services import ConfigMapVolume, service_binary

pytestmark = pytest.mark.realparts


def metric(port: int, name: str) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_rendered_configmaps_run_the_services_and_a_helm_upgrade_changes_rates_live(
    render: Render, tmp_path: Path
) -> None:
    with run_registry(tmp_path / "registry", auth="none") as registry:
        image = images.build_image(
            tmp_path / "layout", seed="chart", tag="1.0", layer_sizes=(4 * 1024 * 1024, 1000)
        )
        images.push_image(tmp_path / "layout", image, registry.host, "team/app")

        values: dict[str, Any] = {
            "registry": registry.url,
            "downloadRate": "20MB",
            "uploadRate": "30MB",
        }
        installed = render(values)
        volumes = {}
        for name in ("tracker", "proxy", "agent"):
            volumes[name] = ConfigMapVolume(tmp_path / f"configmap-{name}", f"{name}.yaml")
            volumes[name].publish(installed.config_file(name))

        # The cluster names (Service DNS, node ports, hostPath dirs) are overridden for a local
        # run through the environment, as the issue allows; everything else is the chart's.
        tracker_port, proxy_port, agent_port, metrics_port = (free_port() for _ in range(4))
        env = {
            "tracker": {"P2P_TRACKER_LISTEN": f"127.0.0.1:{tracker_port}"},
            "proxy": {
                "P2P_PROXY_LISTEN": f"127.0.0.1:{proxy_port}",
                "P2P_PROXY_PEER_PORT": str(free_port()),
                "P2P_PROXY_DATA_DIR": str(tmp_path / "proxy-data"),
                "P2P_PROXY_TRACKERS": f"http://127.0.0.1:{tracker_port}/announce",
            },
            "agent": {
                "P2P_AGENT_LISTEN": f"127.0.0.1:{agent_port}",
                "P2P_AGENT_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
                "P2P_AGENT_PEER_HOST": "127.0.0.1",
                "P2P_AGENT_PEER_PORT": str(free_port()),
                "P2P_AGENT_DATA_DIR": str(tmp_path / "agent-data"),
                "P2P_AGENT_PROXIES": f"http://127.0.0.1:{proxy_port}",
            },
        }
        ports = {"tracker": tracker_port, "proxy": proxy_port, "agent": agent_port}
        processes = []
        try:
            for name in ("tracker", "proxy", "agent"):
                process = ManagedProcess(
                    [service_binary(name), "--config", str(volumes[name].file)],
                    tmp_path / f"{name}.log",
                    env={"PATH": "/usr/bin:/bin", **env[name]},
                ).start()
                processes.append(process)
                process.wait_port(ports[name], timeout=60)
            agent = processes[-1]

            images.pull_and_compare(
                image, f"127.0.0.1:{agent_port}", "team/app", tmp_path / "pulled"
            )
            assert (
                metric(metrics_port, "p2p_agent_download_rate_limit_bytes_per_second") == 20_000_000
            )
            assert (
                metric(metrics_port, "p2p_agent_upload_rate_limit_bytes_per_second") == 30_000_000
            )

            upgraded = render({**values, "downloadRate": "50MB", "uploadRate": "0"})
            # Only the rates differ, so the DaemonSet (and its pods) stay as they are ...
            assert upgraded.get("DaemonSet", "p2p-agent") == installed.get("DaemonSet", "p2p-agent")
            # ... and the new ConfigMap reaches the running agent through its volume.
            volumes["agent"].publish(upgraded.config_file("agent"))
            poll_until(
                lambda: (
                    metric(metrics_port, "p2p_agent_download_rate_limit_bytes_per_second")
                    == 50_000_000
                ),
                15,
                "the agent to apply the new downloadRate",
            )
            assert metric(metrics_port, "p2p_agent_upload_rate_limit_bytes_per_second") == 0
            agent.check_alive()
            time.sleep(0.1)
            assert "rates.applied" in agent.log_tail()
        finally:
            for process in reversed(processes):
                process.stop()
