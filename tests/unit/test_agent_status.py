"""The agent's status document and its terminal rendering (p2p_agent.status, status_cli,
mirror)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console

from p2p_agent.admin import policy_view
from p2p_agent.janitor import Janitor, PolicyInForce
from p2p_agent.mirror import MirrorStatus, RegistryUse, read_hosts_toml
from p2p_agent.status import PullLog, Rates, StatusView
from p2p_agent.status_cli import render
from p2p_common.blobcache import BlobCache
from p2p_common.cachepolicy import CachePolicy
from p2p_common.engine.tracker_log import TrackerLog
from p2p_common.tracker_proto import AnnounceResponse, Peer

DIGEST = "sha256:" + "ab" * 32


def test_a_pull_is_in_flight_then_recent_with_its_bytes_and_first_byte() -> None:
    now = [100.0]
    log = PullLog(clock=lambda: now[0], wall=lambda: 1_800_000_000.0 + now[0])
    record = log.begin("reg/team/app", DIGEST, 1000, "download")
    assert list(log.in_flight.values()) == [record]
    now[0] = 100.5
    log.add(record, 0)  # nothing yet: no first byte
    assert record.first_byte is None
    now[0] = 101.0
    log.add(record, 400)
    view = record.view(now[0])
    assert (view["bytes"], view["percent"], view["first_byte_seconds"]) == (400, 40.0, 1.0)
    now[0] = 102.0
    log.add(record, 600)
    log.end(record, "done")
    log.end(record, "failed")  # a second end changes nothing
    assert log.in_flight == {}
    (done,) = log.recent
    view = done.view(500.0)  # a finished pull's figures stay as they were
    assert view["outcome"] == "done"
    assert view["seconds"] == 2.0
    assert view["bytes_per_second"] == 500
    assert log.last_success_at == 1_800_000_102.0


def test_recent_pulls_are_bounded_and_newest_first() -> None:
    log = PullLog(keep=3)
    for n in range(5):
        log.end(log.begin("r", f"sha256:{n}", 1, "cache"), "cancelled")
    assert [r.digest for r in log.recent] == ["sha256:4", "sha256:3", "sha256:2"]
    assert log.last_success_at is None  # nothing finished


def fake_parts(tmp_path: Path) -> dict[str, Any]:
    stats = SimpleNamespace(
        pieces=10,
        have=4,
        known=10,
        peers=3,
        peers_by_role={"agent": 2, "proxy": 1},
        downloaded_by_role={"agent": 300, "proxy": 100},
        seconds_since_progress=0.25,
    )
    swarm = SimpleNamespace(size=1000, torrent=SimpleNamespace(statistics=lambda: stats))
    stream = SimpleNamespace(size=200, ingest=SimpleNamespace(written=50))
    downloads = SimpleNamespace(
        active={DIGEST: swarm, "sha256:" + "cd" * 32: stream}, info_hashes={DIGEST: b"x"}
    )
    cache = SimpleNamespace(used=1234, quota=10_000, digests=lambda: ["a", "b"])
    proxies = SimpleNamespace(
        urls=["http://p2p-proxy:5005"],
        health={"http://10.0.0.1:5005": (True, "answered 200", 1_800_000_000.0)},
    )
    return {
        "downloads": downloads,
        "cache": cache,
        "proxies": proxies,
        "data_dir": tmp_path,
    }


def test_the_document_holds_downloads_cache_rates_and_proxies(tmp_path: Path) -> None:
    view = StatusView(
        version="9.9",
        pulls=PullLog(),
        rates=Rates(100, 0, "config file"),
        **fake_parts(tmp_path),
    )
    doc = view.snapshot()
    swarm, stream = doc["downloads"]
    assert swarm["way"] == "swarm"
    assert swarm["percent"] == 40.0
    assert swarm["peers_by_role"] == {"agent": 2, "proxy": 1}
    assert swarm["bytes_by_source"] == {"agent": 300, "proxy": 100}
    assert stream["way"] == "proxy_stream"
    assert stream["percent"] == 25.0
    assert doc["cache"]["used_bytes"] == 1234
    assert doc["cache"]["blobs"] == 2
    assert doc["cache"]["seeded_blobs"] == 1
    assert doc["cache"]["disk_free_bytes"] > 0
    assert doc["rates"]["download_bytes_per_second"] == 100
    assert doc["rates"]["source"] == "config file"
    assert doc["proxies"]["instances"] == [
        {"url": "http://10.0.0.1:5005", "ok": True, "detail": "answered 200", "at": 1.8e9}
    ]


def test_the_terminal_view_shows_what_the_document_says(tmp_path: Path) -> None:
    log = PullLog()
    running = log.begin("reg/team/app", DIGEST, 1000, "download")
    log.add(running, 250)
    log.end(log.begin("reg/team/db", "sha256:" + "ef" * 32, 10, "cache"), "done")
    view = StatusView(
        version="9.9", pulls=log, rates=Rates(0, 0, "settings"), **fake_parts(tmp_path)
    )
    console = Console(record=True, width=160)
    console.print(render(view.snapshot()))
    text = console.export_text()
    for expected in (
        "p2p agent 9.9",
        "reg/team/app",
        "abababababab",  # the blob, short
        "25.0%",
        "reg/team/db",
        "done",
        "http://10.0.0.1:5005",
        "answering",
        "agent 300 B, proxy 100 B",
        "unlimited",
    ):
        assert expected in text, expected


# --- trackers and mirror mode -------------------------------------------------------------------

CHART_HOSTS_TOML = """# managed-by: p2p release kube-system/p2p
# containerd asks the p2p agent on this node first for images of registry.example.com and falls back
# to the registry itself when the agent does not answer.
server = "https://registry.example.com"

[host."http://127.0.0.1:5004"]
  capabilities = ["pull", "resolve"]
"""


def hosts_file(root: Path, registry: str, text: str) -> Path:
    path = root / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_hosts_toml_says_whether_containerd_pulls_through_the_agent(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example.com", CHART_HOSTS_TOML)
    found = read_hosts_toml(tmp_path, "registry.example.com", 5004)
    assert found["state"] == "mirrored"
    assert found["managed_by"] == "p2p release kube-system/p2p"
    assert found["path"] == str(tmp_path / "registry.example.com" / "hosts.toml")
    assert found["modified_at"] is not None
    assert "loopback port 5004" in found["detail"]
    # The same file, but the agent listens elsewhere: containerd does not reach it.
    assert read_hosts_toml(tmp_path, "registry.example.com", 5005)["state"] == "other"

    assert read_hosts_toml(tmp_path, "ghcr.example.org", 5004)["state"] == "missing"

    hosts_file(
        tmp_path,
        "foreign.example.com:5000",
        'server = "https://foreign.example.com:5000"\n[host."https://mirror.corp"]\n',
    )
    foreign = read_hosts_toml(tmp_path, "foreign.example.com:5000", 5004)
    assert (foreign["state"], foreign["managed_by"]) == ("other", None)
    assert "does not name this agent" in foreign["detail"]

    hosts_file(
        tmp_path, "push.example.com", '[host."http://localhost:5004"]\ncapabilities = ["push"]\n'
    )
    assert (
        "without the pull capability"
        in read_hosts_toml(tmp_path, "push.example.com", 5004)["detail"]
    )
    hosts_file(tmp_path, "default.example.com", '[host."http://[::1]:5004"]\n')  # all capabilities
    assert read_hosts_toml(tmp_path, "default.example.com", 5004)["state"] == "mirrored"
    hosts_file(
        tmp_path, "pull.example.com", '[host."http://127.0.0.1:5004"]\ncapabilities = ["pull"]\n'
    )
    pull_only = read_hosts_toml(tmp_path, "pull.example.com", 5004)
    assert pull_only["state"] == "mirrored"
    assert "no resolve capability" in pull_only["detail"]

    hosts_file(tmp_path, "broken.example.com", "[host.\n")
    assert read_hosts_toml(tmp_path, "broken.example.com", 5004)["state"] == "invalid"
    (tmp_path / "dir.example.com" / "hosts.toml").mkdir(parents=True)
    assert read_hosts_toml(tmp_path, "dir.example.com", 5004)["state"] == "unreadable"


def test_the_mirror_view_rereads_hosts_toml_now_and_then_and_counts_requests(
    tmp_path: Path,
) -> None:
    now = [0.0]
    use = RegistryUse(wall=lambda: 1_800_000_000.0)
    mirror = MirrorStatus(
        ["registry.example.com"],
        config_path=tmp_path,
        port=lambda: 5004,
        use=use,
        clock=lambda: now[0],
    )
    (entry,) = mirror.snapshot()["registries"]
    assert entry["state"] == "missing"
    assert (entry["mirror_requests"], entry["rewrite_requests"]) == (0, 0)
    hosts_file(tmp_path, "registry.example.com", CHART_HOSTS_TOML)
    use.seen("registry.example.com", mirror=True)
    use.seen("registry.example.com", mirror=True)
    use.seen("registry.example.com", mirror=False)
    now[0] = 1.0  # read a moment ago: not read again yet
    (entry,) = mirror.snapshot()["registries"]
    assert entry["state"] == "missing"
    assert (entry["mirror_requests"], entry["rewrite_requests"]) == (2, 1)
    assert entry["last_mirror_request_at"] == 1_800_000_000.0
    now[0] = 10.0
    assert mirror.snapshot()["registries"][0]["state"] == "mirrored"

    blind = MirrorStatus(["registry.example.com"], config_path=None, port=lambda: 5004, use=use)
    doc = blind.snapshot()
    assert doc["config_path"] is None
    assert doc["registries"][0]["state"] == "unknown"
    assert "mirrorConfigPath" in doc["registries"][0]["detail"]


def test_the_document_and_the_terminal_show_trackers_and_mirror_state(tmp_path: Path) -> None:
    trackers = TrackerLog(wall=lambda: 1_800_000_000.0)
    trackers.answered(
        "http://10.0.0.9:6969/announce",
        "http://p2p-tracker-headless:6969/announce",
        AnnounceResponse(interval=30, peers=(Peer("10.0.0.1", 6881),)),
    )
    trackers.failed(
        "http://10.0.0.8:6969/announce",
        "http://p2p-tracker-headless:6969/announce",
        OSError("no route to host"),
    )
    hosts_file(tmp_path / "certs.d", "registry.example.com", CHART_HOSTS_TOML)
    hosts_file(tmp_path / "certs.d", "_default", '[host."http://127.0.0.1:5004"]\n')
    (tmp_path / "certs.d" / "containerd.json").write_text(
        '{"state": "unset", "message": "containerd ignores hosts.toml files: add it"}'
    )
    use = RegistryUse()
    use.seen("registry.example.com", mirror=True)
    use.refuse()
    view = StatusView(
        version="9.9",
        pulls=PullLog(),
        rates=Rates(0, 0, "settings"),
        trackers=trackers,
        tracker_urls=lambda: ["http://p2p-tracker-headless:6969/announce"],
        mirror=MirrorStatus(
            ["registry.example.com", "ghcr.example.org"],
            config_path=tmp_path / "certs.d",
            port=lambda: 5004,
            use=use,
        ),
        **fake_parts(tmp_path),
    )
    doc = view.snapshot()
    for key in ("pulls", "recent", "cache", "rates", "proxies", "last_successful_pull_at"):
        assert key in doc  # the keys from before stay
    assert doc["trackers"]["listed"] == ["http://p2p-tracker-headless:6969/announce"]
    failing, answering = doc["trackers"]["instances"]
    assert (failing["ok"], failing["last_error"]) == (False, "no route to host")
    assert (answering["ok"], answering["last_peers"], answering["answers"]) == (True, 1, 1)
    mirrored, missing = doc["mirror"]["registries"]
    assert (mirrored["registry"], mirrored["state"], mirrored["mirror_requests"]) == (
        "registry.example.com",
        "mirrored",
        1,
    )
    assert (missing["registry"], missing["state"]) == ("ghcr.example.org", "missing")
    console = Console(record=True, width=220)
    console.print(render(doc))
    text = console.export_text()
    for expected in (
        "trackers",
        "http://10.0.0.9:6969/announce (http://p2p-tracker-headless:6969/announce)",
        "answering",
        "1 peers",
        "no route to host",
        "registry.example.com",
        "mirrored: containerd pulls through this agent",
        "missing: no hosts.toml",
        "1 mirror",
        "unset: containerd ignores hosts.toml files: add it",
        "(every other registry)",
        "1 answered 404",
    ):
        assert expected in text, expected


def test_the_terminal_view_reads_an_agent_without_trackers_or_mirror(tmp_path: Path) -> None:
    view = StatusView(
        version="9.9", pulls=PullLog(), rates=Rates(0, 0, "settings"), **fake_parts(tmp_path)
    )
    doc = view.snapshot()
    assert doc["trackers"] == {"listed": [], "instances": []}
    assert doc["mirror"] is None
    del doc["trackers"], doc["mirror"]  # as an older agent answers
    console = Console(record=True, width=160)
    console.print(render(doc))
    assert "p2p agent 9.9" in console.export_text()


def test_the_cache_policy_in_force_is_in_the_document_and_the_terminal_view(
    tmp_path: Path,
) -> None:
    cache = BlobCache(tmp_path / "data", quota=5000)
    janitor = Janitor(
        cache,
        tmp_path,
        PolicyInForce(CachePolicy(5000, 85, 80, 7 * 86400), "config file (reloaded)", 1.7e9),
    )
    janitor.unmet["watermark"] = True
    cache.evictions["expired"] += 2
    parts = fake_parts(tmp_path)
    view = StatusView(
        version="9.9",
        pulls=PullLog(),
        rates=Rates(0, 0, "settings"),
        cache_policy=lambda: policy_view(janitor),
        **parts,
    )
    policy = view.snapshot()["cache"]["policy"]
    assert policy["quota_bytes"] == 5000
    assert (policy["high_watermark_percent"], policy["low_watermark_percent"]) == (85, 80)
    assert policy["max_unused_seconds"] == 7 * 86400
    assert policy["source"] == "config file (reloaded)"
    assert policy["changed_at"] == 1.7e9
    assert policy["limits_unmet"] == ["watermark"]
    assert policy["evictions"] == {"expired": 2}
    console = Console(record=True, width=200)
    console.print(render(view.snapshot()))
    text = console.export_text()
    for expected in (
        "evict above 85% of the disk to 80%",
        "expire after 7d unused",
        "2 evicted since start",
        "cannot meet: watermark",
    ):
        assert expected in text, expected
