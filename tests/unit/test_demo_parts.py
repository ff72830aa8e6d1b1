"""The demo's other parts: service configs against the real settings, agent metrics, the access
log, progress output, options and the process stop."""

from __future__ import annotations

import io
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from p2p_agent.metrics import AgentMetrics, Live
from p2p_agent.settings import AgentSettings
from p2p_common.settings import ServiceSettings
from p2p_proxy.settings import ProxySettings
from p2p_tracker.settings import TrackerSettings
from tests.demo.cluster import ClusterError, ProcessSet, plan_cluster
from tests.demo.main import DemoError, Interrupted, _classify, parse_args
from tests.demo.origin import BlobStats, blob_stats_from_access_log
from tests.demo.progress import Board, Lane
from tests.demo.pull import PullError
from tests.demo.report import AgentReport, Summary, Traffic, agent_traffic, parse_metrics
from tests.realparts.procs import ManagedProcess

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


# --- the cluster plan ---------------------------------------------------------------------------


def test_plan_gives_each_service_a_config_its_settings_accept(tmp_path: Path) -> None:
    cluster = plan_cluster(
        tmp_path,
        "http://127.0.0.1:5000",
        agents=3,
        proxies=2,
        overrides={"agent": {"downloadRate": "50MB"}},
    )
    assert [s.name for s in cluster.services] == [
        "tracker",
        "proxy-1",
        "proxy-2",
        "agent-1",
        "agent-2",
        "agent-3",
    ]
    ports = [
        int(str(s.config[key]).rpartition(":")[2])
        for s in cluster.services
        for key in ("listen", "metricsListen", "peerPort")
        if key in s.config
    ]
    assert len(ports) == len(set(ports)) == 1 + 2 * 2 + 3 * 3
    tracker = cluster.of("tracker")[0]
    announce = f"http://{tracker.config['listen']}/announce"
    proxies = cluster.of("proxy")
    for proxy in proxies:
        assert proxy.config["trackers"] == [announce]
        assert proxy.config["registry"] == "http://127.0.0.1:5000"
    for agent in cluster.agents:
        assert agent.config["proxies"] == [p.url for p in proxies]
        assert agent.config["downloadRate"] == "50MB"
        assert agent.config["uploadRate"] == 0
        assert agent.ready_url == f"http://{agent.config['metricsListen']}/readyz"
        assert agent.url.startswith("http://127.0.0.1:")
    assert tracker.ready_url == f"http://{tracker.config['listen']}/readyz"

    # The configs are what the services read: each one loads with its own settings class.
    settings: dict[str, type[ServiceSettings]] = {
        "tracker": TrackerSettings,
        "proxy": ProxySettings,
        "agent": AgentSettings,
    }
    for service in cluster.services:
        service.config_path.parent.mkdir(parents=True, exist_ok=True)
        service.config_path.write_text(yaml.safe_dump(service.config, sort_keys=False))
        loaded = settings[service.kind].load(service.config_path, environ={})
        assert getattr(loaded, "listen", None) == service.config["listen"]
    first = AgentSettings.load(cluster.agents[0].config_path, environ={})
    assert first.download_rate == 50_000_000
    assert first.metrics_listen == cluster.agents[0].config["metricsListen"]
    assert first.data_dir == tmp_path / "data" / "agent-1"


# --- metrics and the summary --------------------------------------------------------------------


def test_agent_metrics_names_are_what_the_demo_reads() -> None:
    metrics = AgentMetrics()
    metrics.download_bytes.labels("agent").inc(700)
    metrics.download_bytes.labels("proxy").inc(200)
    metrics.download_bytes.labels("http_fallback").inc(100)
    metrics.watch(lambda: Live(uploaded=650))
    metrics.pull_bytes.inc(1000)
    metrics.fallbacks.inc()
    traffic = agent_traffic(parse_metrics(generate_latest(metrics.registry).decode()))
    metrics.download_bytes.labels("proxy_stream").inc(50)
    metrics.download_bytes.labels("foreign").inc(0)
    traffic = agent_traffic(parse_metrics(generate_latest(metrics.registry).decode()))
    assert traffic == Traffic(
        sources={"agent": 700, "proxy": 200, "http_fallback": 100, "proxy_stream": 50},
        uploaded=650,
        pulled=1000,
        fallbacks=1,
    )
    assert traffic.from_agents == 700
    assert traffic.from_proxies == 250
    assert traffic.streamed == 50
    assert traffic.from_http_fallback == 100
    assert traffic.downloaded == 1050


def test_parse_metrics_handles_labels_timestamps_and_junk() -> None:
    text = (
        "# HELP x y\n"
        "# TYPE x counter\n"
        'x_total{a="1",b="q\\"uote"} 2.5e+01\n'
        "y 3 1700000000000\n"
        "broken line\n"
        "z NaNish\n"
    )
    assert parse_metrics(text) == [("x_total", {"a": "1", "b": 'q\\"uote'}, 25.0), ("y", {}, 3.0)]


def _summary(origin_bytes: int, *, verified: bool = True) -> Summary:
    traffic = Traffic(sources={"agent": 600, "proxy": 300, "proxy_stream": 100}, uploaded=650)
    agents = [
        AgentReport(f"agent-{n}", 2.0, 1000, 6, verified=verified, traffic=traffic) for n in (1, 2)
    ]
    return Summary(
        origin_kind="builtin",
        origin_description="built-in",
        origin_source="counted",
        image_reference="demo/app:1.0",
        image_bytes=1000,
        image_blobs=6,
        manifest_digest=DIGEST_A,
        origin_bytes=origin_bytes,
        origin_gets=6,
        pull_seconds=2.5,
        agents=agents,
    )


def test_summary_table_and_claims() -> None:
    summary = _summary(1000)
    assert summary.verified
    assert summary.origin_ratio == 1.0
    assert summary.pulled_bytes == 2000
    table = "\n".join(summary.table())
    assert "agent-1" in table
    assert "yes, 6 blobs" in table
    overall = "\n".join(summary.overall())
    assert "= 1.00 x the image" in overall
    assert "2.00 x" in overall
    assert "0.0 MB (60%) from other agents" in overall  # 1200 of 2000 bytes came from agents
    assert "streamed by the proxies" in overall
    doc = summary.to_json()
    assert doc["verified"] is True
    assert doc["origin_ratio"] == 1.0
    assert doc["agents"][0]["traffic"]["from_agents"] == 600
    assert doc["agents"][0]["traffic"]["from_proxies"] == 400
    assert doc["agents"][0]["traffic"]["sources"]["proxy_stream"] == 100
    assert "pipelining" in overall
    assert "did not reach" in overall
    summary.origin_done = 1.5
    summary.agents[0].first_byte = 0.4
    summary.agents[1].first_byte = 1.7
    line = summary.pipelining()
    assert "whole image from the origin by 1.50 s" in line
    assert "by 1.70 s (1 of 2 agents before the proxies had it all" in line
    assert "0.40 s" in "\n".join(summary.table())
    failed = _summary(1000, verified=False)
    assert not failed.verified
    assert "VERIFICATION FAILED" in "\n".join(failed.overall())


# --- the registry's access log ------------------------------------------------------------------


def test_blob_stats_from_a_distribution_access_log() -> None:
    agent = '"" "p2p-proxy/0.1"'
    text = "\n".join(
        [
            '{"level":"info","msg":"response completed"}',
            f'127.0.0.1 - - [26/Nov/2026:13:15:44 +0000] "GET /v2/ HTTP/1.1" 200 2 {agent}',
            f'127.0.0.1 - - [26/Nov/2026:13:15:44 +0000] "GET /v2/demo/app/blobs/{DIGEST_A} '
            f'HTTP/1.1" 200 1000 {agent}',
            f'127.0.0.1 - - [26/Nov/2026:13:15:44 +0000] "GET /v2/demo/app/blobs/{DIGEST_A}?ns=x '
            f'HTTP/1.1" 206 10 {agent}',
            f'127.0.0.1 - - [26/Nov/2026:13:15:44 +0000] "HEAD /v2/demo/app/blobs/{DIGEST_B} '
            f'HTTP/1.1" 200 0 {agent}',
            f'127.0.0.1 - - [26/Nov/2026:13:15:44 +0000] "GET /v2/demo/app/blobs/{DIGEST_B} '
            f'HTTP/1.1" 404 120 {agent}',
            f'127.0.0.1 - - [26/Nov/2026:13:15:44 +0000] "GET /v2/demo/app/blobs/{DIGEST_B} '
            f'HTTP/1.1" 200 - {agent}',
            f'127.0.0.1 - - [26/Nov/2026:13:15:44 +0000] "GET /v2/demo/app/manifests/1.0 '
            f'HTTP/1.1" 200 500 {agent}',
            f'127.0.0.1 - - [26/Nov/2026:13:15:44 +0000] "HEAD /v2/demo/app/manifests/1.0 '
            f'HTTP/1.1" 200 500 {agent}',
            f'127.0.0.1 - - [26/Nov/2026:13:15:44 +0000] "GET /v2/demo/app/manifests/{DIGEST_A}'
            f'?ns=x HTTP/1.1" 200 500 {agent}',
            f'127.0.0.1 - - [26/Nov/2026:13:15:44 +0000] "GET /v2/demo/app/manifests/2.0 '
            f'HTTP/1.1" 404 80 {agent}',
        ]
    )
    stats = blob_stats_from_access_log(text, {DIGEST_B: 77})
    assert stats.manifest_gets == 2  # 200 GETs only: no HEAD, no 404
    assert stats.gets == {DIGEST_A: 2, DIGEST_B: 1}
    assert stats.bytes == {DIGEST_A: 1010, DIGEST_B: 77}
    assert stats.total_bytes == 1087
    assert stats.since(BlobStats(stats.gets.copy(), stats.bytes.copy())).total_bytes == 0


# --- progress -----------------------------------------------------------------------------------


def test_lane_rate_and_state() -> None:
    lane = Lane("agent-1")
    assert lane.state == "waiting"
    lane.begin(10.0)
    assert lane.state == "manifest"
    lane.total = 1000
    lane.sample(10.0)
    lane.add(400)
    lane.sample(11.0)
    assert lane.state == "pulling"
    assert lane.rate(11.0) == 400.0
    lane.add(600)
    lane.finish(12.0)
    assert lane.state == "done"
    assert lane.rate(99.0) == 500.0  # the average once done
    assert lane.fraction() == 1.0
    lane.failed = "boom"
    assert lane.state == "failed"


def test_board_plain_output() -> None:
    out = io.StringIO()
    board = Board(["agent-1", "agent-2"], out, interactive=False, line_interval=0.0)
    board.draw()
    assert out.getvalue() == ""  # nothing to say before the sizes are known
    for name in ("agent-1", "agent-2"):
        board.lane(name).begin()
        board.lane(name).total = 2_000_000
    board.lane("agent-1").add(2_000_000)
    board.lane("agent-1").finish()
    board.lane("agent-2").add(1_000_000)
    board.draw()
    text = out.getvalue()
    assert "\x1b" not in text
    assert "agent-1 done: 2.0 MB in" in text
    assert "3.0/4.0 MB" in text
    assert "agent-1 100% agent-2 50%" in text
    board.final()
    assert out.getvalue().count("agent-1 done") == 1


def test_board_redraws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    board = Board(["agent-1", "agent-2", "agent-3"], out, interactive=True)
    board.draw()
    first = out.getvalue()
    assert "\x1b[" not in first.replace("\x1b[2K", "")  # the first drawing moves nothing
    assert first.count("\n") == 4  # three agents and the total
    board.draw()
    second = out.getvalue()[len(first) :]
    assert second.startswith("\x1b[4F")  # back up over the four lines
    assert second.count("\x1b[2K") == 4


# --- options ------------------------------------------------------------------------------------


def test_options() -> None:
    options = parse_args([])
    assert (options.agents, options.proxies, options.size_mb, options.origin) == (
        6,
        2,
        300,
        "auto",
    )
    options = parse_args(
        [
            "--agents",
            "3",
            "--size-mb",
            "60",
            "--builtin-origin",
            "--set",
            "agent.downloadRate=50MB",
            "--set",
            "tracker.announceInterval=2",
            "--keep",
            "--origin-rate",
            "2.5",
        ]
    )
    assert options.origin_rate_mb == 2.5
    assert (options.agents, options.size_mb, options.origin, options.keep) == (
        3,
        60,
        "builtin",
        True,
    )
    assert options.overrides == {
        "agent": {"downloadRate": "50MB"},
        "tracker": {"announceInterval": 2},
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["--agents", "0"],
        ["--size-mb", "x"],
        ["--set", "nothing"],
        ["--set", "registry.a=1"],
        ["--timeout", "0"],
        ["--origin-rate", "5"],
        ["--builtin-origin", "--origin-rate", "-1"],
    ],
)
def test_bad_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert "error: " in capsys.readouterr().err


# --- stopping -----------------------------------------------------------------------------------


def _sleeper(tmp_path: Path, name: str, ignore_term: bool) -> ManagedProcess:
    code = (
        "import signal, sys, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
        + "print('sleeper' + ' is up', flush=True)\n"  # not in the logged command line
        + "time.sleep(60)\n"
    )
    process = ManagedProcess([sys.executable, "-c", code], tmp_path / f"{name}.log", name=name)
    process.start()
    process.wait_until(lambda: "sleeper is up" in process.log_tail(), 10, "the sleeper")
    return process


def test_stop_all_terms_once_then_kills(tmp_path: Path) -> None:
    processes = ProcessSet()
    polite = _sleeper(tmp_path, "polite", ignore_term=False)
    stubborn = _sleeper(tmp_path, "stubborn", ignore_term=True)
    gone = ManagedProcess([sys.executable, "-c", "pass"], tmp_path / "gone.log", name="gone")
    gone.start()
    gone.wait_exit(10)
    for process in (polite, stubborn, gone):
        processes.add(process.name, process)
    started = time.monotonic()
    results = {r.name: r for r in processes.stop_all(timeout=1.0)}
    assert time.monotonic() - started < 5
    assert results["polite"].stopped
    assert results["polite"].returncode == -signal.SIGTERM  # Python's default SIGTERM action
    assert not results["polite"].graceful  # graceful means exit 0
    assert results["stubborn"].returncode == -signal.SIGKILL
    assert not results["stubborn"].graceful
    assert not results["gone"].stopped
    assert results["gone"].returncode == 0
    assert not any(p.running for p in (polite, stubborn, gone))
    assert set(processes.pids()) == {"polite", "stubborn", "gone"}


# --- failures -----------------------------------------------------------------------------------


def test_failures_are_one_line_and_the_most_telling_wins(tmp_path: Path) -> None:
    log = tmp_path / "agent-2.log"
    died = ClusterError("agent-2 exited with status -9 during the pull", log=log)
    pulled = DemoError("agent-2: GET …: peer closed\nconnection", log=tmp_path / "x")
    group = ExceptionGroup("nursery", [pulled, ExceptionGroup("inner", [died])])
    assert _classify(group, tmp_path) == (1, died.args[0], log)
    assert _classify(pulled, tmp_path) == (1, "agent-2: GET …: peer closed connection", pulled.log)
    assert _classify(PullError("bad"), tmp_path) == (1, "bad", None)
    interrupted = BaseExceptionGroup("nursery", [pulled, Interrupted(signal.SIGTERM)])
    assert _classify(interrupted, tmp_path) == (143, "interrupted (SIGTERM)", None)
    assert _classify(KeyboardInterrupt(), tmp_path)[:2] == (130, "interrupted (SIGINT)")
    status, reason, _ = _classify(ZeroDivisionError("oops"), tmp_path)
    assert status == 1
    assert reason.startswith("internal error: ZeroDivisionError('oops') (traceback in ")
    assert "ZeroDivisionError" in (tmp_path / "logs" / "demo-traceback.txt").read_text()
