"""What the rollout benchmark runs (:class:`Options`), what it measures (:class:`Report`), and
how the report reads as text (:func:`render`)."""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.bench.common import default_workdir
from tests.bench.rollout.netns import QUEUE_MS, parse_rate

MB = 1e6


@dataclass(frozen=True)
class Options:
    """What to run (the command line, or a test)."""

    nodes: int = 8
    rate: str = "100mbit"
    """Per-link rate in tc syntax (``100mbit``, ``1gbit``, ``500kbit``), both directions."""
    size_mb: float = 160.0
    layers: int = 4
    rounds: int = 1
    concurrency: int = 3
    """Blobs each pull client fetches at once (containerd's default is 3)."""
    baseline: bool = True
    workdir: str | None = field(default_factory=default_workdir)
    keep: bool = False
    agent_settings: dict[str, Any] = field(default_factory=dict)
    """Extra agent configuration keys (camelCase)."""
    proxy_settings: dict[str, Any] = field(default_factory=dict)
    """Extra proxy configuration keys (camelCase)."""
    verbose: bool = True

    infra_rate: str | None = None
    """The infra host's (tracker and proxy) link rate; ``None``: the same as every link."""
    queue_ms: int = QUEUE_MS
    """tbf ``latency``: how long a packet may wait in a link's queue before it is dropped."""
    tcp_cc: str | None = None
    """TCP congestion control between the hosts (``cubic``, ``bbr``, set on the subnet's route);
    ``None``: what a new namespace inherits (the machine's ``net.ipv4.tcp_congestion_control``)."""

    @property
    def rate_bps(self) -> int:
        return parse_rate(self.rate)

    @property
    def infra_rate_bps(self) -> int:
        return parse_rate(self.infra_rate) if self.infra_rate else self.rate_bps


@dataclass
class NodeResult:
    """One node's pull in one scenario."""

    node: str
    seconds: float
    """From the common start to the last byte of the last blob."""
    first_byte: float
    """From the common start to the first byte of any layer."""
    bytes: int
    verified: bool
    problems: list[str] = field(default_factory=list)
    blobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per blob: ``bytes``, ``start``, ``first_byte``, ``end`` (seconds from the common start)."""
    traffic: dict[str, Any] | None = None
    """p2p only: the agent's bytes by source (``Traffic.to_json``)."""
    cpu_agent: float = 0.0


@dataclass
class ScenarioResult:
    """One scenario (baseline or p2p) of one round."""

    scenario: str
    round: int
    nodes: list[NodeResult]
    origin_blob_bytes: int
    origin_blob_gets: int
    origin_manifest_requests: dict[str, int]
    """Manifest requests the origin answered during the scenario, by method (GET, HEAD)."""
    wall: float
    cpu: dict[str, float]
    """CPU seconds over the scenario: by our process group, and ``machine`` (all cores, all
    processes, kernel networking included, from /proc/stat)."""
    machine_busy: float
    """Fraction of the machine's cores busy over the scenario (0..1)."""
    proxy: dict[str, float] = field(default_factory=dict)

    @property
    def slowest(self) -> float:
        return max(node.seconds for node in self.nodes)

    @property
    def median(self) -> float:
        return statistics.median(node.seconds for node in self.nodes)

    @property
    def verified(self) -> bool:
        return all(node.verified for node in self.nodes)

    def traffic_total(self, key: str) -> int:
        return sum(int((node.traffic or {}).get(key, 0)) for node in self.nodes)


@dataclass
class Report:
    """The whole run."""

    run_id: str
    options: dict[str, Any]
    rate_bps: int
    image_bytes: int
    image_blobs: int
    manifest_digest: str
    namespaces: list[str]
    commands: list[str]
    tcp_cc: str = ""
    """TCP congestion control in the namespaces."""
    scenarios: list[ScenarioResult] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    """Every process the run started (all stopped when :func:`run` returns)."""
    setup_seconds: float = 0.0
    total_seconds: float = 0.0
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)

    def of(self, scenario: str) -> list[ScenarioResult]:
        return [s for s in self.scenarios if s.scenario == scenario]

    @property
    def ideal_node(self) -> float:
        """``size / R``: one node's download link alone."""
        return self.image_bytes * 8 / self.rate_bps

    @property
    def ideal_baseline(self) -> float:
        """``N * size / R``: every copy through the origin's uplink."""
        return self.ideal_node * int(self.options["nodes"])

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ideal_node_seconds"] = self.ideal_node
        doc["ideal_baseline_seconds"] = self.ideal_baseline
        return doc


def _fmt(seconds: float) -> str:
    return f"{seconds:7.2f}" if math.isfinite(seconds) else "   fail"


def render(report: Report) -> list[str]:
    """The tables and ratios, as text lines."""
    size = report.image_bytes
    nodes = int(report.options["nodes"])
    lines = [
        "",
        f"image {size / MB:.1f} MB in {report.image_blobs} blobs, {nodes} nodes, "
        f"{report.rate_bps / 1e6:g} Mbit/s per link ({report.rate_bps / 8 / MB:.2f} MB/s) "
        f"both directions; tbf queue {report.options['queue_ms']} ms, TCP {report.tcp_cc}",
        f"ideal: one node size/R = {report.ideal_node:.1f} s; origin-bound baseline "
        f"N*size/R = {report.ideal_baseline:.1f} s",
    ]
    if report.options.get("infra_rate"):
        lines.append(f"the infra host (tracker, proxy) has {report.options['infra_rate']}")
    extra = {
        **{f"agent.{k}": v for k, v in report.options.get("agent_settings", {}).items()},
        **{f"proxy.{k}": v for k, v in report.options.get("proxy_settings", {}).items()},
    }
    if extra:
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    rounds = sorted({s.round for s in report.scenarios})
    for number in rounds:
        base = next((s for s in report.of("baseline") if s.round == number), None)
        p2p = next(s for s in report.of("p2p") if s.round == number)
        lines += [
            "",
            f"round {number}: seconds to the whole image (first byte), per node",
            f"  {'node':<7} {'baseline':>16} {'p2p':>16} {'from agents':>12} "
            f"{'from proxy':>11} {'fallback':>9} {'agent CPU':>9}",
        ]
        for index, node in enumerate(p2p.nodes):
            traffic = node.traffic or {}
            b = base.nodes[index] if base else None
            lines.append(
                f"  {node.node:<7} "
                + (f"{_fmt(b.seconds)} ({_fmt(b.first_byte).strip():>5})" if b else f"{'-':>16}")
                + f" {_fmt(node.seconds)} ({_fmt(node.first_byte).strip():>5})"
                + f" {traffic.get('from_agents', 0) / MB:9.1f} MB"
                + f" {traffic.get('from_proxies', 0) / MB:8.1f} MB"
                + f" {traffic.get('from_http_fallback', 0) / MB:6.1f} MB"
                + f" {node.cpu_agent:8.1f}s"
            )
    lines += ["", _summary_header()]
    for scenario in ("baseline", "p2p"):
        for result in report.of(scenario):
            lines.append(_summary_line(result, size, report.cpus))
    base_slowest = [s.slowest for s in report.of("baseline")]
    p2p_slowest = [s.slowest for s in report.of("p2p")]
    p2p_median = [s.median for s in report.of("p2p")]
    lines.append("")
    if base_slowest:
        lines.append(
            f"baseline slowest / p2p slowest (median over rounds): "
            f"{statistics.median(base_slowest) / statistics.median(p2p_slowest):.2f}x"
            f"   per round: "
            + ", ".join(f"{b / p:.2f}x" for b, p in zip(base_slowest, p2p_slowest, strict=True))
        )
    for result in report.of("baseline") + report.of("p2p"):
        asked = ", ".join(f"{n} {m}" for m, n in sorted(result.origin_manifest_requests.items()))
        lines.append(
            f"{result.scenario} {result.round}: the origin answered {asked or 'no'} manifest "
            f"requests for {nodes} nodes"
        )
    for result in report.of("p2p"):
        bt = result.proxy.get("peer_upload_bytes", 0.0)
        http = result.proxy.get("http_bytes", 0.0)
        lines.append(
            f"p2p {result.round}: the proxy uploaded {bt / MB:.0f} MB over BitTorrent + "
            f"{http / MB:.0f} MB over HTTP (progressive streams and fallback) = "
            f"{(bt + http) / size:.2f} copies of the image"
        )
    lines.append(
        f"p2p slowest vs ideal size/R: {statistics.median(p2p_slowest) / report.ideal_node:.2f}x"
        f"; p2p tail (slowest / median): "
        f"{statistics.median(p2p_slowest) / statistics.median(p2p_median):.2f}"
    )
    return lines


def _summary_header() -> str:
    return (
        f"  {'scenario':<10} {'slowest':>8} {'median':>8} {'tail':>5} {'origin sent':>13} "
        f"{'from agents':>12} {'from proxy':>11} {'fallback':>9} {'our CPU':>8} "
        f"{'machine':>8}  verified"
    )


def _summary_line(result: ScenarioResult, size: int, cpus: int) -> str:
    ours = sum(v for k, v in result.cpu.items() if k != "machine")
    pulled = sum(n.bytes for n in result.nodes) or 1
    agents = result.traffic_total("from_agents")
    proxies = result.traffic_total("from_proxies")
    fallback = result.traffic_total("from_http_fallback")
    peer_cols = (
        f"{agents / pulled:11.0%} {proxies / pulled:10.0%} {fallback / pulled:8.0%}"
        if result.scenario == "p2p"
        else f"{'-':>11} {'-':>10} {'-':>8}"
    )
    return (
        f"  {result.scenario + ' ' + str(result.round):<10} {_fmt(result.slowest):>8} "
        f"{_fmt(result.median):>8} {result.slowest / result.median:5.2f} "
        f"{result.origin_blob_bytes / MB:7.1f} MB {result.origin_blob_bytes / size:4.2f}x "
        f"{peer_cols} {ours:7.1f}s {result.machine_busy * cpus:4.2f}/{cpus}  "
        f"{'yes' if result.verified else 'NO'}"
    )
