"""``p2p-proxy --config FILE`` as a real process against the real registry: YAML and
environment, serving, exit codes, graceful and immediate stops."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from p2p_common.blobinfo import BlobMetainfo
from tests.realparts import images
from tests.realparts.registry import Registry, free_port, run_registry
from tests.services import service_binary, service_env

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


def _binary() -> str:
    return service_binary("proxy")


class ProxyProcess:
    """A running p2p-proxy whose JSON log lines are collected by a thread."""

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

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def wait_event(self, name: str, timeout: float = 15.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for doc in self.events():
                if doc.get("event") == name:
                    return doc
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no {name} event; log so far:\n{''.join(self.lines)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._reader.join(5)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    base = tmp_path_factory.mktemp("proxy-process")
    with run_registry(base / "registry", auth="none") as registry:
        layout = base / "layout"
        image = images.build_image(layout, seed="process", layer_sizes=[1000, 32 * MiB])
        images.push_image(layout, image, registry.host, "library/app")
        yield registry, image


def config_text(registry: Registry, data_dir: Path, /, **extra: object) -> str:
    lines = {
        "listen": f"127.0.0.1:{free_port()}",
        "peerPort": free_port(),
        "dataDir": str(data_dir),
        "registry": registry.url,
        "trackers": ["http://127.0.0.1:9/announce"],
        "logFormat": "json",
        "shutdownTimeout": 30,
        **extra,
    }
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in lines.items())


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(text: str, **env: str) -> ProxyProcess:
        config = tmp_path / f"proxy-{len(started)}.yaml"
        config.write_text(text)
        process = ProxyProcess(config, service_env(**env))
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def run_to_exit(tmp_path: Path, text: str, **env: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "proxy.yaml"
    config.write_text(text)
    return subprocess.run(
        [_binary(), "--config", str(config)],
        env=service_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_serves_from_file_and_env_and_stops_on_sigterm(
    origin: tuple[Registry, images.Image], tmp_path: Path, launch: Callable[..., ProxyProcess]
) -> None:
    registry, image = origin
    port = free_port()
    # The environment wins over the file: the API listens on `port`, trackers are replaced.
    proxy = launch(
        config_text(registry, tmp_path / "data"),
        P2P_PROXY_LISTEN=f"127.0.0.1:{port}",
        P2P_PROXY_TRACKERS="http://tracker.test:6969/announce",
    )
    listening = proxy.wait_event("proxy.listening")
    assert listening["port"] == port
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    layer = image.layers[0]
    answer = httpx.get(
        f"{base}/p2p/v1/metainfo",
        params={"name": "library/app", "digest": layer.digest},
        timeout=30,
    )
    assert answer.status_code == 200
    meta = BlobMetainfo.from_frames(layer.digest, layer.size, answer.content)
    assert meta.trackers == ("http://tracker.test:6969/announce",)
    assert meta.name == layer.digest

    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(15) == 0
    assert time.monotonic() - started < 10
    proxy.wait_event("proxy.stopped", timeout=2)
    assert not any(doc.get("level") == "error" for doc in proxy.events())


def _slow_download(url: str, into: bytearray, first_bytes: threading.Event) -> None:
    with httpx.stream("GET", url, timeout=60) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes(64 * 1024):
            into += chunk
            first_bytes.set()
            time.sleep(0.004)  # about 16 MB/s: the download outlives the SIGTERM


def test_sigterm_lets_an_inflight_download_finish(
    origin: tuple[Registry, images.Image], tmp_path: Path, launch: Callable[..., ProxyProcess]
) -> None:
    registry, image = origin
    blob = image.layers[1]
    proxy = launch(config_text(registry, tmp_path / "data"))
    port = proxy.wait_event("proxy.listening")["port"]
    url = f"http://127.0.0.1:{port}/v2/library/app/blobs/{blob.digest}"
    received = bytearray()
    first_bytes = threading.Event()
    reader = threading.Thread(target=_slow_download, args=(url, received, first_bytes))
    reader.start()
    assert first_bytes.wait(30)
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_event("proxy.stopping")
    # New connections are refused while the download goes on.
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    reader.join(60)
    assert not reader.is_alive()
    assert bytes(received) == blob.data
    assert proxy.proc.wait(15) == 0


def test_a_second_signal_stops_at_once(
    origin: tuple[Registry, images.Image], tmp_path: Path, launch: Callable[..., ProxyProcess]
) -> None:
    registry, image = origin
    blob = image.layers[1]
    proxy = launch(config_text(registry, tmp_path / "data"))
    port = proxy.wait_event("proxy.listening")["port"]
    url = f"http://127.0.0.1:{port}/v2/library/app/blobs/{blob.digest}"
    received = bytearray()
    first_bytes = threading.Event()

    def download() -> None:
        with contextlib.suppress(httpx.HTTPError):  # cut off: expected
            _slow_download(url, received, first_bytes)

    reader = threading.Thread(target=download)
    reader.start()
    assert first_bytes.wait(30)
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_event("proxy.stopping")
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGINT)
    assert proxy.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    reader.join(30)
    assert len(received) < blob.size


def test_restart_reseeds_what_the_cache_holds(
    origin: tuple[Registry, images.Image], tmp_path: Path, launch: Callable[..., ProxyProcess]
) -> None:
    registry, image = origin
    text = config_text(registry, tmp_path / "data")
    first = launch(text)
    port = first.wait_event("proxy.listening")["port"]
    for layer in image.layers:
        params = {"name": "library/app", "digest": layer.digest}
        answer = httpx.get(f"http://127.0.0.1:{port}/p2p/v1/metainfo", params=params, timeout=30)
        assert answer.status_code == 200
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(15) == 0
    second = launch(text)
    assert second.wait_event("proxy.listening")["reseeded"] == len(image.layers)


def test_unknown_key_exits_2_naming_it(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, _ = origin
    done = run_to_exit(tmp_path, config_text(registry, tmp_path / "data") + "registy: x\n")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("p2p-proxy: configuration error: registy:")


@pytest.mark.parametrize(
    ("extra", "env", "named"),
    [
        ({"cacheSize": "plenty"}, {}, "cacheSize"),
        ({"peerPort": 0}, {}, "peerPort"),
        ({"registry": "ftp://registry.test"}, {}, "registry"),
        ({}, {"P2P_PROXY_NOPE": "1"}, "P2P_PROXY_NOPE"),
        ({}, {"P2P_PROXY_AUTH_CACHE_TTL": "-3"}, "authCacheTtl"),
    ],
)
def test_bad_values_exit_2_naming_the_key(
    origin: tuple[Registry, images.Image],
    tmp_path: Path,
    extra: dict[str, object],
    env: dict[str, str],
    named: str,
) -> None:
    registry, _ = origin
    done = run_to_exit(tmp_path, config_text(registry, tmp_path / "data", **extra), **env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert named in lines[0]


def test_missing_registry_and_unusable_data_dir_exit_2(tmp_path: Path) -> None:
    done = run_to_exit(tmp_path, "listen: 127.0.0.1:0\n")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("p2p-proxy: configuration error: registry:")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    text = f"listen: 127.0.0.1:0\nregistry: http://127.0.0.1:1\ndataDir: {blocker}/data\n"
    done = run_to_exit(tmp_path, text)
    assert done.returncode == 2
    assert "dataDir" in done.stderr.strip().splitlines()[-1]


def test_peer_port_in_use_exits_1(
    origin: tuple[Registry, images.Image], tmp_path: Path, launch: Callable[..., ProxyProcess]
) -> None:
    registry, _ = origin
    first = launch(config_text(registry, tmp_path / "one"))
    first.wait_event("proxy.listening")
    taken = first.events()[0]["peerPort"]
    done = run_to_exit(tmp_path, config_text(registry, tmp_path / "two", peerPort=taken))
    assert done.returncode == 1
    assert "cannot listen" in done.stderr.strip().splitlines()[-1]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _fallback_bytes(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("p2p_proxy_http_fallback_bytes_total "):
            return float(line.split()[1])
    return 0.0


def test_clients_that_never_read_pin_little_memory_and_do_not_hold_up_a_stop(
    origin: tuple[Registry, images.Image], tmp_path: Path, launch: Callable[..., ProxyProcess]
) -> None:
    """40 clients ask for a cached 32 MiB blob and never read: the proxy's memory grows by
    little (not a body chunk per client), a normal client is still served, and SIGTERM
    ends the process within ``shutdownTimeout`` plus a little whatever they do."""
    registry, image = origin
    blob = image.layers[1]
    proxy = launch(config_text(registry, tmp_path / "data", shutdownTimeout=3, sendTimeout=2))
    port = proxy.wait_event("proxy.listening")["port"]
    path = f"/v2/library/app/blobs/{blob.digest}"
    url = f"http://127.0.0.1:{port}{path}"
    assert httpx.get(url, timeout=60).content == blob.data  # cached now
    before = _rss(proxy.proc.pid)
    stalled = []
    for _ in range(40):
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
        stalled.append(client)
    try:
        # Every stalled response has started: the proxy counted its first body chunk.
        deadline = time.monotonic() + 30
        while _fallback_bytes(port) < blob.size + 40 * 64 * 1024:
            assert time.monotonic() < deadline, "the stalled responses never started"
            time.sleep(0.05)
        grown = _rss(proxy.proc.pid) - before
        # Unbounded, each held a 4 MiB chunk (130 MiB measured). Now the send budget (16 MiB)
        # and a small chunk each beyond it: 27-35 MiB measured.
        assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
        assert httpx.get(url, timeout=60).content == blob.data
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        # Hypercorn cannot cancel a blocked write; the send timeout (2 s) cuts them.
        assert proxy.proc.wait(3 + 10) == 0
        assert time.monotonic() - started < 3 + 5
    finally:
        for client in stalled:
            client.close()
