"""``p2p-tracker --config FILE`` as a real process: YAML, environment, exit codes, signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2p_common import udp_tracker_proto as udp
from p2p_common.tracker_proto import AnnounceRequest, announce_url, parse_announce_response
from tests.services import service_binary, service_env


def _binary() -> str:
    return service_binary("tracker")


class Tracker:
    """A running p2p-tracker process whose JSON log lines are collected by a thread."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [_binary(), "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_event(self, name: str, timeout: float = 10.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith("{"):
                    doc = json.loads(line)
                    if doc.get("event") == name:
                        return dict(doc)
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {name} event; log so far:\n{''.join(self.lines)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._reader.join(5)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Tracker]]:
    started: list[Tracker] = []

    def launch(config_text: str, **env: str) -> Tracker:
        config = tmp_path / "tracker.yaml"
        config.write_text(config_text)
        tracker = Tracker(config, service_env(**env))
        started.append(tracker)
        return tracker

    yield launch
    for tracker in started:
        tracker.stop()


def _run_to_exit(tmp_path: Path, config_text: str, **env: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "tracker.yaml"
    config.write_text(config_text)
    return subprocess.run(
        [_binary(), "--config", str(config)],
        env=service_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


CONFIG = """\
listen: 127.0.0.1:0
logFormat: json
announceInterval: 30
"""


def test_yaml_env_override_and_sigterm(run: Callable[..., Tracker]) -> None:
    tracker = run(CONFIG, P2P_TRACKER_ANNOUNCE_INTERVAL="77")
    listening = tracker.wait_event("tracker.listening")
    port = listening["port"]
    assert isinstance(port, int)
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
        assert response.status == 200
    request = AnnounceRequest(b"\x01" * 20, b"-IT0001-" + b"\x02" * 12, 6881, left=1)
    with urllib.request.urlopen(announce_url(f"{base}/announce", request), timeout=5) as response:
        answer = parse_announce_response(response.read())
    assert answer.interval == 77  # the environment wins over the file (30)
    started = time.monotonic()
    tracker.proc.send_signal(signal.SIGTERM)
    assert tracker.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    tracker.wait_event("tracker.stopped", timeout=2)


def test_sigint_stops_gracefully_too(run: Callable[..., Tracker]) -> None:
    tracker = run(CONFIG)
    tracker.wait_event("tracker.listening")
    tracker.proc.send_signal(signal.SIGINT)
    assert tracker.proc.wait(10) == 0


def test_unknown_key_in_file_exits_2_naming_it(tmp_path: Path) -> None:
    done = _run_to_exit(tmp_path, CONFIG + "announceIntervall: 5\n")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "announceIntervall" in lines[0]
    assert "configuration error" in lines[0]


def test_bad_value_and_unknown_env_exit_2(tmp_path: Path) -> None:
    done = _run_to_exit(tmp_path, CONFIG + "maxTorrents: -5\n")
    assert done.returncode == 2
    assert "maxTorrents" in done.stderr
    done = _run_to_exit(tmp_path, CONFIG, P2P_TRACKER_BOGUS="1")
    assert done.returncode == 2
    assert "P2P_TRACKER_BOGUS" in done.stderr
    done = _run_to_exit(tmp_path, CONFIG, P2P_TRACKER_LISTEN="nonsense")
    assert done.returncode == 2
    assert "listen" in done.stderr


def test_port_in_use_exits_1(tmp_path: Path, run: Callable[..., Tracker]) -> None:
    first = run(CONFIG)
    port = first.wait_event("tracker.listening")["port"]
    done = _run_to_exit(tmp_path, f"listen: 127.0.0.1:{port}\nlogFormat: json\n")
    assert done.returncode == 1
    assert "listen" in done.stderr.splitlines()[-1]


def test_udp_listener_from_the_config_file(run: Callable[..., Tracker]) -> None:
    tracker = run(CONFIG + "udpListen: 127.0.0.1:0\n")
    port = tracker.wait_event("tracker.listening_udp")["port"]
    http_port = tracker.wait_event("tracker.listening")["port"]
    assert isinstance(port, int)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.send(udp.encode_connect_request(1))
        cid = udp.parse_connect_response(sock.recv(2048), 1)
        request = AnnounceRequest(b"\x03" * 20, b"-IT0001-" + b"\x04" * 12, 6881, left=1)
        sock.send(udp.encode_announce_request(cid, 2, request))
        assert udp.parse_announce_response(sock.recv(2048), 2).interval == 30
    second = AnnounceRequest(b"\x03" * 20, b"-IT0001-" + b"\x05" * 12, 6882, left=1)
    url = announce_url(f"http://127.0.0.1:{http_port}/announce", second)
    with urllib.request.urlopen(url, timeout=5) as response:  # one swarm for both
        assert [p.port for p in parse_announce_response(response.read()).peers] == [6881]
    tracker.proc.send_signal(signal.SIGTERM)
    assert tracker.proc.wait(10) == 0


def test_udp_port_in_use_exits_1_naming_the_key(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        done = _run_to_exit(tmp_path, CONFIG + f"udpListen: 127.0.0.1:{port}\n")
    assert done.returncode == 1
    assert "udpListen" in done.stderr.splitlines()[-1]


def test_bad_udp_listen_exits_2(tmp_path: Path) -> None:
    done = _run_to_exit(tmp_path, CONFIG + "udpListen: nonsense\n")
    assert done.returncode == 2
    assert "udpListen" in done.stderr
