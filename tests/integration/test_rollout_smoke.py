"""The rollout benchmark's harness, small: 3 emulated nodes (network namespaces on a bridge, every
link shaped with tbf), a 10 MB image, a generous rate. Every node must get the image
byte-identical through its own agent, the origin must send about one copy in the p2p scenario,
the run must take well under a minute, and nothing of it may be left afterwards: no namespace
(the veths and the bridge live only inside them), no link here, no process.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.bench.bench_rollout import Options, leftover_namespaces, run
from tests.realparts.procs import require

pytestmark = [pytest.mark.realparts, pytest.mark.slow]

OUR_LINK = re.compile(r"^(h\d+|br0|eth0)$")
"""The names the harness gives links (inside its namespaces only)."""


def _links() -> set[str]:
    """Names of the links in this (the test's) network namespace."""
    out = subprocess.run(
        [require("ip"), "-o", "link", "show"], check=True, capture_output=True, text=True
    ).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_three_nodes_pull_through_agents_with_one_origin_copy(tmp_path: Path) -> None:
    links_before = _links()
    started = time.monotonic()
    report = run(
        Options(nodes=3, rate="400mbit", size_mb=10, rounds=1, workdir=str(tmp_path), verbose=False)
    )
    elapsed = time.monotonic() - started

    [scenario] = report.of("p2p")
    assert [node.node for node in scenario.nodes] == ["node1", "node2", "node3"]
    for node in scenario.nodes:
        # Byte-identical: the manifest is the pushed one, every blob has its size and digest.
        assert node.verified, f"{node.node}: {node.problems}"
        assert node.bytes == report.image_bytes
        # Through its agent: the agent downloaded the whole image (peers, proxy or fallback).
        traffic = node.traffic or {}
        assert traffic.get("downloaded", 0) >= report.image_bytes, (node.node, traffic)
    assert scenario.origin_blob_bytes <= 1.2 * report.image_bytes, (
        f"the origin sent {scenario.origin_blob_bytes} bytes for a {report.image_bytes}-byte image"
    )
    [baseline] = report.of("baseline")
    assert baseline.verified
    assert baseline.origin_blob_bytes >= 3 * report.image_bytes

    assert elapsed < 60, f"the smoke run took {elapsed:.1f} s"
    assert leftover_namespaces(report.run_id) == [], "namespaces of the run were left behind"
    assert not any(Path("/run/netns", name).exists() for name in report.namespaces)
    new_links = {name for name in _links() - links_before if OUR_LINK.match(name)}
    assert not new_links, f"links left behind here: {new_links}"
    assert report.pids, "the report lists the processes it started"
    assert not [pid for pid in report.pids if _alive(pid)], "processes left behind"


def test_a_preheated_rollout_costs_the_origin_nothing(tmp_path: Path) -> None:
    """p2p-warm preheats with ``POST /p2p/v1/preheat`` before the clock (issue 10, section 2):
    during the rollout the origin sends no blob byte."""
    report = run(
        Options(
            nodes=3,
            rate="400mbit",
            size_mb=10,
            rounds=1,
            workdir=str(tmp_path),
            verbose=False,
            scenarios=("p2p-warm",),
        )
    )
    [scenario] = report.of("p2p-warm")
    assert all(node.verified for node in scenario.nodes)
    assert scenario.origin_blob_bytes == 0
    assert scenario.proxy["preheat_origin_bytes"] >= report.image_bytes
    assert any("POST /p2p/v1/preheat" in note for note in scenario.notes)
