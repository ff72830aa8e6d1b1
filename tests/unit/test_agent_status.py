"""The agent's status document and its terminal rendering (p2p_agent.status, status_cli)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console

from p2p_agent.admin import policy_view
from p2p_agent.janitor import Janitor, PolicyInForce
from p2p_agent.status import PullLog, Rates, StatusView
from p2p_agent.status_cli import render
from p2p_common.blobcache import BlobCache
from p2p_common.cachepolicy import CachePolicy

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
