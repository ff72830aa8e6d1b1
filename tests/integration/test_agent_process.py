"""``p2p-agent --config FILE`` as a real process: configuration contract, binding, graceful stop."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio

from tests.cluster import run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.procs import ManagedProcess, free_port
from tests.realparts.registry import run_registry
from tests.services import service_binary

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


def binary() -> str:
    return service_binary("agent")


def test_an_unknown_key_stops_the_agent_with_one_line_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("registry: registry.example.com\ndownloadRat: 10MB\n")
    done = subprocess.run(
        [binary(), "--config", str(config)], check=False, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "downloadRat" in lines[0]
    assert "not a known setting" in lines[0]


def test_a_bad_value_from_the_environment_is_named(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("registry: registry.example.com\n")
    done = subprocess.run(
        [binary(), "--config", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "P2P_AGENT_UPLOAD_RATE": "lots"},
    )
    assert done.returncode == 2
    assert "P2P_AGENT_UPLOAD_RATE" in done.stderr


async def test_sigterm_lets_a_pull_in_flight_finish_then_exits_zero(tmp_path: Path) -> None:
    with run_registry(tmp_path / "registry", auth="none") as registry:
        image = images.build_image(
            tmp_path / "layout", seed="sig", tag="1.0", layer_sizes=(6 * MiB,)
        )
        images.push_image(tmp_path / "layout", image, registry.host, "team/app")
        layer = image.layers[0]
        async with (
            run_tracker() as announce,
            run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
        ):
            api, status = free_port(), free_port()
            config = tmp_path / "agent.yaml"
            config.write_text(
                f"listen: 127.0.0.1:{api}\nmetricsListen: 127.0.0.1:{status}\n"
                f"peerHost: 127.0.0.1\npeerPort: {free_port()}\ndataDir: {tmp_path / 'data'}\n"
                f"registry: {registry.url}\nproxies: [{proxy.url}]\nlogFormat: json\n"
                "cacheHighWatermark: 0\n"  # the shared disk may be above 85%
            )
            agent = ManagedProcess(
                [binary(), "--config", str(config)],
                tmp_path / "agent.log",
                env={"PATH": "/usr/bin:/bin", "P2P_AGENT_DOWNLOAD_RATE": "3MB"},
                stop_timeout=30,
            )
            with agent:
                await trio.to_thread.run_sync(lambda: agent.wait_port(status, timeout=30))
                await trio.to_thread.run_sync(lambda: agent.wait_port(api, timeout=30))
                # The registry API is on loopback only.
                assert {a for proto, a, port in agent.listening() if port == api} == {"127.0.0.1"}
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{api}", timeout=60
                ) as http:
                    metrics = (
                        await httpx.AsyncClient().get(f"http://127.0.0.1:{status}/metrics")
                    ).text
                    assert "p2p_agent_download_rate_limit_bytes_per_second 3e+06" in metrics
                    received = bytearray()
                    signalled = None
                    async with http.stream("GET", f"/v2/team/app/blobs/{layer.digest}") as response:
                        async for chunk in response.aiter_bytes():
                            received += chunk
                            if signalled is None and len(received) > MiB:
                                agent.send_signal(signal.SIGTERM)
                                signalled = time.monotonic()
                    assert bytes(received) == layer.data
                code = await trio.to_thread.run_sync(lambda: agent.wait_exit(30))
            assert code == 0
            log = (tmp_path / "agent.log").read_text()
            assert '"event":"agent.signal"' in log
            assert '"event":"agent.stopped"' in log
            # No credentials or tokens in the log.
            assert "Authorization" not in log
