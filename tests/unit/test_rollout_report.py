"""The rollout benchmark's pure parts: scenario and quota parsing, the cgroup helper on a fake
controller directory, the side-by-side numbers (times against size/R, CPU per GB), the text and
JSON report, and the command line (``--swarm``, ``--cpu-quota``, exit status 2 without a quota)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.bench import bench_rollout
from tests.bench.rollout.cgroups import (
    CgroupError,
    CpuQuotas,
    parse_cpu_quota,
    quota_us,
    remove_stale_cgroups,
)
from tests.bench.rollout.netns import pid_alive
from tests.bench.rollout.results import (
    DEFAULT_SCENARIOS,
    SWARM_LIBTORRENT,
    NodeResult,
    Options,
    Report,
    ScenarioResult,
    parse_scenarios,
    render,
    summarize,
)

MB = 10**6
SIZE = 100 * MB
RATE = 25_000_000  # bits/s: size/R = 32 s


# --- parsing ------------------------------------------------------------------------------------


def test_scenarios_keep_their_order_and_ignore_case_and_spaces() -> None:
    assert parse_scenarios("p2p-warm,libtorrent") == ("p2p-warm", "libtorrent")
    assert parse_scenarios(" LIBTORRENT , baseline,") == ("libtorrent", "baseline")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one"),
        (" , ", "at least one"),
        ("p2p,bittorrent", "unknown scenario(s) bittorrent"),
        ("p2p,p2p", "given twice: p2p"),
    ],
)
def test_bad_scenarios_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_scenarios(text)


def test_no_baseline_drops_it_from_the_scenarios() -> None:
    assert Options().scenario_list == DEFAULT_SCENARIOS == ("baseline", "p2p")
    assert Options(baseline=False).scenario_list == ("p2p",)
    assert Options(baseline=False, scenarios=SWARM_LIBTORRENT).scenario_list == SWARM_LIBTORRENT


@pytest.mark.parametrize(("cores", "quota"), [(0.2, 20_000), (1, 100_000), (1.5, 150_000)])
def test_quota_is_cores_times_the_period(cores: float, quota: int) -> None:
    assert quota_us(cores) == quota
    assert parse_cpu_quota(str(cores)) == cores


@pytest.mark.parametrize("text", ["", "abc", "0", "-0.2", "0.001", "65", "nan", "inf"])
def test_bad_quotas_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="cores"):
        parse_cpu_quota(text)


# --- cgroups on a fake controller directory -----------------------------------------------------


def _fake_controller(tmp_path: Path) -> Path:
    root = tmp_path / "cpu"
    root.mkdir()
    (root / "cgroup.procs").write_text("")
    return root


def test_quotas_create_one_configured_cgroup_per_node(tmp_path: Path) -> None:
    root = _fake_controller(tmp_path)
    quotas = CpuQuotas("123-abc", 0.2, root=root)
    quotas.create(["node1", "node2"])
    for node in ("node1", "node2"):
        group = root / f"p2prb-123-abc-{node}"
        assert (group / "cpu.cfs_period_us").read_text() == "100000"
        assert (group / "cpu.cfs_quota_us").read_text() == "20000"
    quotas.add("node2", 4242)
    assert (root / "p2prb-123-abc-node2" / "cgroup.procs").read_text() == "4242"
    assert quotas.moved == {"node2": [4242]}


def test_quotas_fail_clearly_without_the_controller(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="cgroup v1 cpu controller"):
        CpuQuotas("1-a", 0.2, root=tmp_path / "missing").create(["node1"])


def test_quotas_fail_clearly_when_a_cgroup_cannot_be_made(tmp_path: Path) -> None:
    root = _fake_controller(tmp_path)
    (root / "p2prb-1-a-node1").write_text("a file where the cgroup should go")
    with pytest.raises(CgroupError, match="cannot create or configure the cgroup"):
        CpuQuotas("1-a", 0.2, root=root).create(["node1"])


def test_stale_cgroups_of_dead_runs_are_removed(tmp_path: Path) -> None:
    root = _fake_controller(tmp_path)
    dead = next(pid for pid in range(4_194_303, 4_000_000, -1) if not pid_alive(pid))
    (root / f"p2prb-{dead}-abc-node1").mkdir()
    (root / f"p2prb-{os.getpid()}-abc-node1").mkdir()
    (root / "other-group").mkdir()
    assert remove_stale_cgroups(root) == [f"p2prb-{dead}-abc-node1"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "other-group",
        f"p2prb-{os.getpid()}-abc-node1",
    ]


# --- numbers ------------------------------------------------------------------------------------


def _node(name: str, seconds: float, *, down: int = SIZE, up: int = 0, cpu: float = 0.0,
          from_seed: int = 0) -> NodeResult:  # fmt: skip
    return NodeResult(
        name,
        seconds,
        1.0,
        SIZE if math.isfinite(seconds) else 0,
        math.isfinite(seconds),
        traffic={
            "from_agents": down - from_seed,
            "from_proxies": from_seed,
            "from_http_fallback": 0,
            "downloaded": down,
            "uploaded": up,
        },
        cpu_agent=cpu,
    )


def _scenario(name: str, nodes: list[NodeResult], **seed: float) -> ScenarioResult:
    return ScenarioResult(
        scenario=name,
        round=1,
        nodes=nodes,
        origin_blob_bytes=0 if name != "p2p" else SIZE,
        origin_blob_gets=0,
        origin_manifest_requests={},
        wall=max(n.seconds for n in nodes),
        cpu={"machine": 1.0},
        machine_busy=0.5,
        seed=dict(seed),
    )


def test_summary_measures_times_against_size_over_r_and_cpu_per_gb() -> None:
    nodes = [
        _node("node1", 32.0, up=60 * MB, cpu=2.0, from_seed=40 * MB),
        _node("node2", 48.0, up=100 * MB, cpu=3.0, from_seed=30 * MB),
        _node("node3", 64.0, up=40 * MB, cpu=1.0, from_seed=30 * MB),
    ]
    summary = summarize(
        _scenario("p2p-warm", nodes, cpu=1.5, uploaded=100 * MB, downloaded=0), SIZE, RATE
    )
    assert summary.p50 == 48.0
    assert summary.max == 64.0
    assert summary.p50_ideal == pytest.approx(1.5)
    assert summary.max_ideal == pytest.approx(2.0)
    assert summary.peer_cpu == 6.0
    assert summary.peer_bytes == 3 * SIZE + 200 * MB  # down + up: 0.5 GB
    assert summary.peer_cpu_per_gb == pytest.approx(12.0)
    assert summary.seed_cpu_per_gb == pytest.approx(15.0)
    assert summary.seed_copies == pytest.approx(1.0)
    assert summary.from_peers == pytest.approx(200 / 300)
    assert summary.mb_per_s_min == pytest.approx(100 / 64)
    assert summary.mb_per_s_p50 == pytest.approx(100 / 48)
    assert summary.verified


def test_libtorrent_sources_come_from_the_seeds_exact_upload() -> None:
    # The sampled per-node split says 10 MB from the seed; the seed's own counter says 120 MB.
    nodes = [_node(f"node{i}", 40.0, from_seed=5 * MB) for i in (1, 2)]
    result = _scenario("libtorrent", nodes, cpu=1.0, uploaded=120 * MB)
    assert result.sources() == (80 * MB, 120 * MB, 0)
    assert summarize(result, SIZE, RATE).from_peers == pytest.approx(0.4)


def test_a_failed_node_leaves_the_times_empty() -> None:
    nodes = [_node("node1", 30.0), _node("node2", math.inf)]
    summary = summarize(_scenario("p2p", nodes, cpu=1.0, uploaded=SIZE), SIZE, RATE)
    assert summary.p50 is None
    assert summary.max_ideal is None
    assert summary.mb_per_s_min is None
    assert not summary.verified


def test_baseline_has_no_peer_or_seed_numbers() -> None:
    summary = summarize(_scenario("baseline", [_node("node1", 100.0)]), SIZE, RATE)
    assert summary.peer_cpu is None
    assert summary.seed_cpu is None
    assert summary.from_peers is None
    assert summary.p50_ideal == pytest.approx(100 / 32)


# --- report -------------------------------------------------------------------------------------


def _report(*scenarios: ScenarioResult, **options: object) -> Report:
    return Report(
        run_id="1-abc",
        options={"nodes": 2, "queue_ms": 50, **options},
        rate_bps=RATE,
        image_bytes=SIZE,
        image_blobs=2,
        manifest_digest="sha256:" + "0" * 64,
        namespaces=[],
        commands=[],
        tcp_cc="bbr",
        scenarios=list(scenarios),
        started_at="2026-12-07T04:00:00+00:00",
    )


def test_default_report_keeps_the_baseline_to_p2p_ratio() -> None:
    report = _report(
        _scenario("baseline", [_node("node1", 64.0), _node("node2", 60.0)]),
        _scenario("p2p", [_node("node1", 40.0, cpu=1.0), _node("node2", 32.0, cpu=1.0)],
                  cpu=1.0, uploaded=SIZE, downloaded=SIZE),
    )  # fmt: skip
    text = "\n".join(render(report))
    assert "baseline slowest / p2p slowest (median over rounds): 1.60x" in text
    assert "measured 2026-12-07T04:00:00+00:00" in text
    assert "p2p slowest vs ideal size/R: 1.25x" in text
    assert "libtorrent /" not in text
    assert "libtorrent 1" not in text
    assert "CPU quota" not in text


def test_side_by_side_report_compares_the_warm_swarms() -> None:
    warm = _scenario("p2p-warm", [_node("node1", 40.0, up=SIZE, cpu=4.0),
                                  _node("node2", 48.0, up=SIZE, cpu=4.0)],
                     cpu=1.0, uploaded=SIZE, downloaded=0)  # fmt: skip
    theirs = _scenario("libtorrent", [_node("node1", 36.0, up=SIZE, cpu=1.0),
                                      _node("node2", 36.0, up=SIZE, cpu=1.0)],
                       cpu=0.5, uploaded=SIZE)  # fmt: skip
    for node in warm.nodes + theirs.nodes:
        node.throttled = 2.5
    warm.links = {"bytes": 200 * MB, "packets": 100_000, "drops": 7}
    warm.tracker = {"started": 17.0, "completed": 1.0, "stopped": 0.0}
    report = _report(warm, theirs, lt_settings={"unchoke_slots_limit": 16})
    report.cpu_quota = {"cores": 0.2, "cfs_quota_us": 20000, "cfs_period_us": 100000}
    report.libtorrent = {
        "version": "2.1.1.0",
        "settings": {"enable_dht": False},
        "seed_super_seeding": True,
    }
    lines = render(report)
    text = "\n".join(lines)
    assert "libtorrent / p2p-warm (median over rounds; above 1: p2p sooner): slowest 0.75x" in text
    assert "CPU quota: 0.2 cores" in text
    assert "cfs_quota_us=20000" in text
    assert "libtorrent 2.1.1.0: defaults except enable_dht=False; the seed super-seeds" in text
    assert "libtorrent.unchoke_slots_limit=16" in text
    side = lines.index(next(line for line in lines if line.startswith("side by side")))
    warm_row, lt_row = lines[side + 2], lines[side + 3]
    assert warm_row.split()[:6] == ["p2p-warm", "1", "44.0", "48.0", "1.38x", "1.50x"]
    assert lt_row.split()[:6] == ["libtorrent", "1", "36.0", "36.0", "1.12x", "1.12x"]
    assert "20.00" in warm_row  # 8 CPU-s for 0.4 GB moved
    assert "MB/s" in text
    assert "uplinks sent 200 MB in 100,000 packets (2000 bytes each on average), dropped 7" in text
    assert "p2p-warm 1: the tracker answered 18 announces (1 completed, 17 started)" in text
    assert "throttled" in text
    assert any(line.split()[:1] == ["node1"] and "2.5s" in line for line in lines)


def test_json_report_has_the_side_by_side_table_and_node_speeds() -> None:
    report = _report(
        _scenario("libtorrent", [_node("node1", 50.0), _node("node2", math.inf)], uploaded=SIZE)
    )
    doc = json.loads(json.dumps(report.to_json(), default=str))
    [row] = doc["side_by_side"]
    assert row["scenario"] == "libtorrent"
    assert row["p50"] is None
    assert row["seed_copies"] == pytest.approx(1.0)
    speeds = [node["mb_per_s"] for node in doc["scenarios"][0]["nodes"]]
    assert speeds == [pytest.approx(2.0), None]


# --- command line -------------------------------------------------------------------------------


def test_swarm_libtorrent_is_the_warm_seed_comparison() -> None:
    _, options = bench_rollout._parse(["--swarm", "libtorrent", "--cpu-quota", "0.2"])
    assert options is not None
    assert options.scenario_list == ("p2p-warm", "libtorrent")
    assert options.cpu_quota == 0.2
    _, options = bench_rollout._parse(["--lt-set", "unchoke_slots_limit=16", "--lt-super-seed"])
    assert options is not None
    assert options.lt_super_seed
    assert options.scenario_list == ("baseline", "p2p")
    assert options.cpu_quota is None
    assert options.lt_settings == {"unchoke_slots_limit": 16}


@pytest.mark.parametrize(
    "argv",
    [
        ["--swarm", "libtorrent", "--scenarios", "p2p"],
        ["--swarm", "transmission"],
        ["--scenarios", "p2p,nope"],
        ["--cpu-quota", "0"],
        ["--no-baseline", "--scenarios", "baseline"],
    ],
)
def test_bad_command_lines_exit_with_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_rollout._parse(argv)
    assert exc.value.code == 2


def test_a_quota_that_cannot_be_set_exits_with_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(options: Options) -> Report:
        raise CgroupError("--cpu-quota: cannot create or configure the cgroup /x (denied)")

    monkeypatch.setattr(bench_rollout, "run", refuse)
    assert bench_rollout.main(["--cpu-quota", "0.2"]) == 2
    assert "cannot create or configure the cgroup" in capsys.readouterr().err
