"""Several engine processes and the tracker process: one seed, five leechers, 200 MB."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from tests.engine_helpers import make_content, metainfo_for
from tests.realparts.procs import ManagedProcess, free_port

SIZE = 200 * 1000 * 1000
LEECHERS = 5


def _events(process: ManagedProcess) -> list[dict[str, object]]:
    events = []
    for line in process.log_tail(10_000).splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


@pytest.mark.slow
def test_one_seed_five_leechers_and_our_tracker_as_processes(tmp_path: Path) -> None:
    content = make_content(SIZE, seed=99)
    expected = hashlib.sha256(content).hexdigest()
    tracker_port = free_port()
    (tmp_path / "tracker.yaml").write_text(
        f"listen: 127.0.0.1:{tracker_port}\nannounceInterval: 5\nminAnnounceInterval: 1\n"
    )
    meta = metainfo_for(content, [f"http://127.0.0.1:{tracker_port}/announce"])
    torrent = tmp_path / "blob.torrent"
    torrent.write_bytes(meta.to_bytes())
    source = tmp_path / "seed.bin"
    source.write_bytes(content)
    del content
    peer = [sys.executable, "-m", "tests.bench.engine_peer"]
    with ManagedProcess(
        [sys.executable, "-m", "p2p_tracker", "--config", str(tmp_path / "tracker.yaml")],
        tmp_path / "tracker.log",
    ) as tracker:
        tracker.wait_port(tracker_port, timeout=20)
        with ManagedProcess(
            [*peer, "seed", "--torrent", str(torrent), "--data", str(source)],
            tmp_path / "seed.log",
        ) as seed:
            seed.wait_until(lambda: "listening" in seed.log_tail(), 20, "the seed to listen")
            leechers = [
                ManagedProcess(
                    [
                        *peer,
                        "leech",
                        "--torrent",
                        str(torrent),
                        "--data",
                        str(tmp_path / f"leech{n}.bin"),
                        "--keep-seeding",
                    ],
                    tmp_path / f"leech{n}.log",
                ).start()
                for n in range(LEECHERS)
            ]
            try:
                for leecher in leechers:
                    leecher.wait_until(
                        lambda leecher=leecher: '"complete"' in leecher.log_tail(),
                        180,
                        "the download to complete",
                    )
                results = [
                    next(e for e in _events(leecher) if e.get("event") == "complete")
                    for leecher in leechers
                ]
            finally:
                for leecher in leechers:
                    leecher.stop()
    for n in range(LEECHERS):
        data = (tmp_path / f"leech{n}.bin").read_bytes()
        assert len(data) == SIZE
        assert hashlib.sha256(data).hexdigest() == expected
    from_agents = sum(int(r["by_role"].get("agent", 0)) for r in results)  # type: ignore[union-attr]
    from_seed = sum(int(r["by_role"].get("proxy", 0)) for r in results)  # type: ignore[union-attr]
    assert from_agents + from_seed == LEECHERS * SIZE
    # The leechers found each other through the tracker and traded pieces.
    assert from_agents > 0
