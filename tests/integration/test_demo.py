"""``python -m tests.demo`` end to end, as a subprocess: with the CNCF distribution registry and
skopeo, with the built-in origin, failing on a bad service setting, and interrupted by Ctrl-C.

Every run must leave no process behind: the summary JSON lists the PIDs the demo started (for the
interrupted run they are read from ``/proc`` while it runs), and each must be gone afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.realparts.procs import require

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "tests.demo"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("P2P_")}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _run(
    tmp_path: Path, *args: str, timeout: float = 180
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    summary = tmp_path / "summary.json"
    done = subprocess.run(
        [*DEMO, *args, "--summary-json", str(summary)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    doc = json.loads(summary.read_text()) if summary.exists() else {}
    leftovers = [name for name, pid in doc.get("processes", {}).items() if _alive(pid)]
    assert not leftovers, f"processes left behind: {leftovers}"
    return done, doc


def _check_success(
    done: subprocess.CompletedProcess[str], doc: dict[str, Any], agents: int
) -> dict[str, Any]:
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert doc["ok"] is True
    summary = doc["summary"]
    assert summary["verified"] is True
    assert len(summary["agents"]) == agents
    image = summary["image_bytes"]
    assert image >= 60_000_000
    for agent in summary["agents"]:
        assert agent["verified"] is True, agent
        assert agent["problems"] == []
        assert agent["bytes"] == image
        assert agent["blobs"] == 6
        # The agent's own metrics account for the image.
        assert sum(agent["traffic"]["sources"].values()) >= image, agent
        assert 0 < agent["first_byte"] <= agent["seconds"], agent
    # The proxies' counters saw the whole image arrive from the origin during the pulls.
    assert summary["origin_done"] is not None
    assert 0 < summary["origin_done"] <= summary["pull_seconds"]
    # The point of p2p: the origin sent about one image, not one per agent.
    assert 0 < summary["origin_bytes"] <= 1.1 * image
    assert summary["origin_ratio"] <= 1.1
    # Every agent asked for the manifest; the proxy fetched its body from the origin once.
    assert summary["origin_manifest_gets"] == 1
    # Every service stopped by itself on the one SIGTERM.
    assert doc["stopped"], doc
    assert all(r["graceful"] for r in doc["stopped"]), doc["stopped"]
    # The claims are on the terminal too.
    out = done.stdout
    assert "every blob byte-identical to the pushed image (sha256)" in out
    assert f"pulled byte-identical through {agents} agents" in out.splitlines()[-1]
    assert "yes, 6 blobs" in out
    assert "pipelining   the proxies had the whole image from the origin by" in out
    # It ends with an agent's status view: its pulls, all done.
    assert "agent-1 as `p2p-agent status` shows it" in out
    assert "recent pulls" in out
    assert " done " in out.split("agent-1 as `p2p-agent status` shows it")[1]
    assert not Path(doc["workdir"]).exists()  # the temporary work directory is removed
    return dict(summary)


@pytest.mark.realparts
def test_demo_with_the_distribution_registry(tmp_path: Path) -> None:
    require("docker-registry")
    require("skopeo")
    done, doc = _run(tmp_path, "--agents", "3", "--size-mb", "60", "--origin", "distribution")
    summary = _check_success(done, doc, 3)
    assert summary["origin_kind"] == "distribution"
    assert "[from its access log]" in done.stdout
    assert "CNCF distribution registry" in done.stdout
    assert "pushed with skopeo" in done.stdout
    assert set(doc["processes"]) == {
        "registry",
        "tracker",
        "proxy-1",
        "proxy-2",
        "agent-1",
        "agent-2",
        "agent-3",
    }


def test_agents_serve_layer_bytes_while_the_proxies_still_fetch(tmp_path: Path) -> None:
    """Pipelining: with an origin held to 12 MB/s, the proxies need about 5 s for the 60 MB
    image, and every agent serves its first layer bytes long before that."""
    done, doc = _run(
        tmp_path, "--agents", "3", "--size-mb", "60", "--builtin-origin", "--origin-rate", "12"
    )
    summary = _check_success(done, doc, 3)
    origin_done = summary["origin_done"]
    assert origin_done >= 60 / 12 * 0.9  # the pace held: the origin took about 5 s
    for agent in summary["agents"]:
        assert agent["first_byte"] < origin_done, agent
    assert "(3 of 3 agents before the proxies had it all" in done.stdout


def test_demo_with_the_builtin_origin(tmp_path: Path) -> None:
    done, doc = _run(tmp_path, "--agents", "3", "--size-mb", "60", "--builtin-origin")
    summary = _check_success(done, doc, 3)
    assert summary["origin_kind"] == "builtin"
    assert "the built-in read-only origin" in done.stdout
    assert "registry" not in doc["processes"]


def test_a_service_that_cannot_start_fails_the_demo_with_one_line(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    done, doc = _run(
        tmp_path,
        "--agents",
        "2",
        "--size-mb",
        "5",
        "--builtin-origin",
        "--workdir",
        str(workdir),
        "--set",
        "agent.downloadRate=12 parsecs",
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("p2p demo FAILED after ")
    assert re.search(r"agent-\d exited with status 2 during start-up", last), last
    assert "downloadRate" in last
    assert doc["ok"] is False
    assert "downloadRate" in doc["reason"]
    assert (workdir / "logs" / "agent-1.log").exists()  # the logs stay for the reader
    assert f"--- last lines of {workdir / 'logs'}/agent-" in done.stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@contextmanager
def _pulling(workdir: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """The demo with a slow origin (5 MB/s), once its pull has begun; and its children."""
    demo = subprocess.Popen(
        [
            *DEMO,
            "--size-mb",
            "100",
            "--builtin-origin",
            "--origin-rate",
            "5",
            "--workdir",
            str(workdir),
            *args,
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("[4/5]"):
                break
        assert lines, "the demo printed nothing"
        assert lines[-1].startswith("[4/5]"), "".join(lines)
        time.sleep(1.0)
        yield demo, _children(demo.pid)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    with _pulling(tmp_path / "work", "--agents", "2") as (demo, children):
        assert len(children) == 5  # tracker, 2 proxies, 2 agents
        started = time.monotonic()
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=60)
        took = time.monotonic() - started
    assert demo.returncode == 130, err
    assert err.strip().splitlines()[-1].endswith("interrupted (SIGINT)")
    assert "100%" not in out  # it was interrupted during the pull
    assert "stopping 5 processes (SIGTERM; SIGKILL after 10 s)" in out
    assert "stopped 5 processes" in out
    assert took < 30
    assert not [pid for pid in children if _alive(pid)]


def test_a_service_dying_during_the_pull_fails_the_demo(tmp_path: Path) -> None:
    with _pulling(tmp_path / "work", "--agents", "3") as (demo, children):
        victims = [
            pid for pid in children if b"agent-2.yaml" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        out, err = demo.communicate(timeout=60)
    assert demo.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert "agent-2 exited with status -9 during the pull" in last, err
    assert "agent-2 had already exited (-9)" in out
    assert not [pid for pid in children if _alive(pid)]
