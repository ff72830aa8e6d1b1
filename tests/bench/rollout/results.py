"""What the rollout benchmark runs (:class:`Options`), what it measures (:class:`Report`), and
how the report reads as text (:func:`render`).

Scenarios (:data:`SCENARIOS`), each run in every round, in the order given:

- ``baseline``: every node straight from the origin;
- ``p2p``: every node through its own agent; tracker, proxy and agents start empty (a cold proxy
  fetches every blob from the origin while the nodes wait);
- ``p2p-warm``: the same, but the proxy already holds every blob (and the manifest) before the
  clock starts: a swarm fed by one warm seed; the agents still start empty;
- ``libtorrent``: the same swarm with libtorrent 2.1: one libtorrent seed on the infra host that
  holds every blob, one libtorrent leecher per node, peers found through the p2p-tracker.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.bench.common import default_workdir
from tests.bench.rollout.netns import QUEUE_MS, parse_rate

MB = 1e6
GB = 1e9
SWARMS = ("p2p", "p2p-warm", "libtorrent")
"""The scenarios where nodes trade pieces (a peer process per node and a seed)."""
SCENARIOS = ("baseline", *SWARMS)
DEFAULT_SCENARIOS = ("baseline", "p2p")
SWARM_LIBTORRENT = ("p2p-warm", "libtorrent")
"""``--swarm libtorrent``: our swarm and libtorrent's, both fed by one warm seed."""


def parse_scenarios(text: str) -> tuple[str, ...]:
    """``--scenarios``: comma-separated names from :data:`SCENARIOS`, in the order to run them."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("--scenarios needs at least one of " + ", ".join(SCENARIOS))
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise ValueError(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"scenario(s) given twice: {', '.join(repeated)}")
    return tuple(names)


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
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    """What each round runs, in order (names from :data:`SCENARIOS`); ``baseline=False`` drops
    ``baseline`` from it."""
    cpu_quota: float | None = None
    """CPU cores each node's peer process (agent or libtorrent leecher) may use, enforced with
    the cgroup v1 cpu controller; ``None``: no quota."""
    lt_settings: dict[str, Any] = field(default_factory=dict)
    """Extra libtorrent session settings for the ``libtorrent`` scenario (seed and leechers)."""
    lt_super_seed: bool = False
    """The libtorrent seed super-seeds (BEP 16) like the proxy; libtorrent's default is off."""

    @property
    def scenario_list(self) -> tuple[str, ...]:
        """The scenarios each round runs, in order."""
        return tuple(s for s in self.scenarios if self.baseline or s != "baseline")

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
    """Swarm scenarios: the peer process's bytes by source (``Traffic.to_json``; libtorrent's in
    the same keys: ``from_agents`` = other leechers, ``from_proxies`` = the seed) and
    ``downloaded``, ``uploaded`` (payload)."""
    cpu_agent: float = 0.0
    """CPU seconds of the node's peer process over the scenario: its agent (p2p, p2p-warm) or its
    libtorrent leecher (libtorrent)."""
    throttled: float = 0.0
    """With ``--cpu-quota``: seconds the node's cgroup was throttled during the scenario."""

    @property
    def delivered(self) -> int:
        """Bytes the peer process moved: payload downloaded + uploaded (0 without traffic)."""
        traffic = self.traffic or {}
        return int(traffic.get("downloaded", 0)) + int(traffic.get("uploaded", 0))

    @property
    def mb_per_s(self) -> float:
        """The node's download speed over the whole image, MB/s."""
        if not math.isfinite(self.seconds) or self.seconds <= 0:
            return math.nan
        return self.bytes / self.seconds / MB


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
    """p2p scenarios: what the proxy did during the scenario (its metrics' increase)."""
    cpu_split: dict[str, dict[str, float]] = field(default_factory=dict)
    """CPU seconds over the scenario by process group, ``user`` and ``system`` apart."""
    links: dict[str, int] = field(default_factory=dict)
    """``bytes``, ``packets`` and ``drops`` of every host's upload token bucket, together,
    over the scenario (headers included)."""
    seed: dict[str, float] = field(default_factory=dict)
    """Swarm scenarios: the seed (the proxy, or the libtorrent seed) over the scenario: ``cpu``
    seconds, ``uploaded`` bytes (BitTorrent + HTTP), ``downloaded`` bytes (from the origin)."""
    notes: list[str] = field(default_factory=list)
    tracker: dict[str, float] = field(default_factory=dict)
    """Swarm scenarios: announces the tracker answered from its start to the scenario's end
    (the seed's before the clock included), by event."""

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

    def sources(self) -> tuple[int, int, int]:
        """Bytes the nodes downloaded (together) from other nodes, from the seed, and over the
        HTTP fallback. libtorrent: every byte a leecher got that the seed did not upload came
        from another leecher (the seed's upload counter is exact; the per-node split is
        sampled and misses connections closed between samples)."""
        if self.scenario == "libtorrent":
            downloaded = self.traffic_total("downloaded")
            from_seed = min(downloaded, int(self.seed.get("uploaded", 0)))
            return downloaded - from_seed, from_seed, 0
        return (
            self.traffic_total("from_agents"),
            self.traffic_total("from_proxies"),
            self.traffic_total("from_http_fallback"),
        )


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
    libtorrent: dict[str, Any] = field(default_factory=dict)
    """With the ``libtorrent`` scenario: its version and the session settings passed."""
    cpu_quota: dict[str, Any] = field(default_factory=dict)
    """With ``--cpu-quota``: cores, ``cfs_quota_us``, ``cfs_period_us`` and the cgroups."""
    started_at: str = ""
    """When the run started (UTC, ISO 8601): the machine is shared, note when."""

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

    def summaries(self) -> list[Summary]:
        """One :class:`Summary` per scenario and round, in the order they ran."""
        return [summarize(s, self.image_bytes, self.rate_bps) for s in self.scenarios]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ideal_node_seconds"] = self.ideal_node
        doc["ideal_baseline_seconds"] = self.ideal_baseline
        for scenario, result in zip(doc["scenarios"], self.scenarios, strict=True):
            for node, node_result in zip(scenario["nodes"], result.nodes, strict=True):
                node["mb_per_s"] = _finite(node_result.mb_per_s)
        doc["side_by_side"] = [asdict(s) for s in self.summaries()]
        return doc


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _ratio(numerator: float, denominator: float) -> float | None:
    if denominator <= 0 or not math.isfinite(numerator) or not math.isfinite(denominator):
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Summary:
    """One scenario of one round, in the units the side-by-side table compares."""

    scenario: str
    round: int
    p50: float | None
    """Median seconds from the common start to a node's whole image (None if a node failed)."""
    max: float | None
    p50_ideal: float | None
    """``p50 / (size / R)``: 1.0 is one node's link saturated from the first instant."""
    max_ideal: float | None
    peer_cpu: float | None
    """CPU seconds of the nodes' peer processes together (agents or libtorrent leechers)."""
    peer_bytes: int
    """What they moved together: payload downloaded + uploaded."""
    peer_cpu_per_gb: float | None
    """``peer_cpu`` per GB (10^9 bytes) of ``peer_bytes``."""
    seed_cpu: float | None
    """CPU seconds of the seed (the proxy, or the libtorrent seed)."""
    seed_bytes: int
    """What the seed moved: uploaded (BitTorrent + HTTP) + downloaded from the origin."""
    seed_cpu_per_gb: float | None
    seed_copies: float | None
    """Copies of the image the seed uploaded."""
    from_peers: float | None
    """Share of the nodes' downloads that came from other nodes (not the seed)."""
    origin_copies: float
    """Copies of the image the origin sent during the scenario."""
    mb_per_s_min: float | None
    """The slowest node's download speed over the whole image, MB/s."""
    mb_per_s_p50: float | None
    verified: bool


def summarize(result: ScenarioResult, image_bytes: int, rate_bps: int) -> Summary:
    """The side-by-side numbers of one scenario: times against ``size / R``, CPU per GB moved."""
    ideal = image_bytes * 8 / rate_bps
    complete = all(math.isfinite(n.seconds) for n in result.nodes) and bool(result.nodes)
    p50 = result.median if complete else None
    slowest = result.slowest if complete else None
    swarm = result.scenario in SWARMS
    peer_bytes = sum(n.delivered for n in result.nodes)
    peer_cpu = sum(n.cpu_agent for n in result.nodes) if swarm else None
    seed_cpu = result.seed.get("cpu") if swarm and result.seed else None
    seed_up = int(result.seed.get("uploaded", 0)) if swarm else 0
    seed_bytes = seed_up + (int(result.seed.get("downloaded", 0)) if swarm else 0)
    from_peers, from_seed, fallback = result.sources()
    downloaded = from_peers + from_seed + fallback
    speeds = sorted(n.mb_per_s for n in result.nodes)
    return Summary(
        scenario=result.scenario,
        round=result.round,
        p50=p50,
        max=slowest,
        p50_ideal=_ratio(p50, ideal) if p50 is not None else None,
        max_ideal=_ratio(slowest, ideal) if slowest is not None else None,
        peer_cpu=peer_cpu,
        peer_bytes=peer_bytes,
        peer_cpu_per_gb=_ratio(peer_cpu, peer_bytes / GB) if peer_cpu is not None else None,
        seed_cpu=seed_cpu,
        seed_bytes=seed_bytes,
        seed_cpu_per_gb=_ratio(seed_cpu, seed_bytes / GB) if seed_cpu is not None else None,
        seed_copies=_ratio(seed_up, image_bytes) if swarm and result.seed else None,
        from_peers=_ratio(from_peers, downloaded) if swarm else None,
        origin_copies=result.origin_blob_bytes / image_bytes if image_bytes else 0.0,
        mb_per_s_min=_finite(speeds[0]) if complete else None,
        mb_per_s_p50=_finite(statistics.median(speeds)) if complete else None,
        verified=result.verified,
    )


def _fmt(seconds: float) -> str:
    return f"{seconds:7.2f}" if math.isfinite(seconds) else "   fail"


def _num(value: float | None, spec: str, width: int, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` and ``suffix``, right-aligned in ``width``; ``-`` when
    there is none."""
    if value is None or not math.isfinite(value):
        return f"{'-':>{width}}"
    return f"{format(value, spec) + suffix:>{width}}"


SEED_NAME = {"p2p": "proxy", "p2p-warm": "proxy", "libtorrent": "seed"}
PEER_NAME = {"p2p": "agent", "p2p-warm": "agent", "libtorrent": "leecher"}


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
    if report.started_at:
        lines.append(f"measured {report.started_at} on {report.cpus} cores")
    if report.options.get("infra_rate"):
        lines.append(f"the infra host (tracker, proxy) has {report.options['infra_rate']}")
    extra = {
        **{f"agent.{k}": v for k, v in report.options.get("agent_settings", {}).items()},
        **{f"proxy.{k}": v for k, v in report.options.get("proxy_settings", {}).items()},
        **{f"libtorrent.{k}": v for k, v in report.options.get("lt_settings", {}).items()},
    }
    if extra:
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    if report.cpu_quota:
        quota = report.cpu_quota
        lines.append(
            f"CPU quota: {quota['cores']:g} cores for each agent and libtorrent leecher "
            f"(cgroup v1 cpu: cfs_quota_us={quota['cfs_quota_us']} per "
            f"cfs_period_us={quota['cfs_period_us']}); the proxy and the seed are not limited"
        )
    if report.libtorrent:
        settings = report.libtorrent.get("settings", {})
        lines.append(
            f"libtorrent {report.libtorrent.get('version', '?')}: defaults except "
            + ", ".join(f"{k}={v}" for k, v in settings.items())
            + ("; the seed super-seeds" if report.libtorrent.get("seed_super_seeding") else "")
        )
    rounds = sorted({s.round for s in report.scenarios})
    for number in rounds:
        lines += _round_lines(report, number)
    lines += ["", _summary_header()]
    for scenario in SCENARIOS:
        for result in report.of(scenario):
            lines.append(_summary_line(result, size, report.cpus))
    lines += _side_by_side(report)
    lines += _ratio_lines(report)
    return lines


def _round_lines(report: Report, number: int) -> list[str]:
    results = [s for s in report.scenarios if s.round == number]
    first = results[0]
    lines = [
        "",
        f"round {number}: seconds to the whole image (first byte), per node",
        "  " + f"{'node':<7}" + "".join(f" {s.scenario:>17}" for s in results),
    ]
    for index, node in enumerate(first.nodes):
        cells = []
        for result in results:
            n = result.nodes[index]
            cells.append(f" {_fmt(n.seconds)} ({_fmt(n.first_byte).strip():>6})")
        lines.append(f"  {node.node:<7}" + "".join(cells))
    quota = bool(report.cpu_quota)
    for result in results:
        if result.scenario not in SWARMS:
            continue
        seed, peer = SEED_NAME[result.scenario], PEER_NAME[result.scenario]
        lines += [
            "",
            f"round {number} {result.scenario}: each node's MB from other nodes, from the {seed}"
            + (" (sampled every 0.2 s: a lower bound)" if result.scenario == "libtorrent" else "")
            + f", over HTTP fallback; MB it uploaded; CPU of its {peer}"
            + ("; MB/s (whole image) and seconds throttled under the quota" if quota else ""),
            f"  {'node':<7} {'from nodes':>10} {f'from {seed}':>10} {'fallback':>9} "
            f"{'uploaded':>9} {peer + ' CPU':>12}"
            + (f" {'MB/s':>7} {'throttled':>9}" if quota else ""),
        ]
        for node in result.nodes:
            traffic = node.traffic or {}
            lines.append(
                f"  {node.node:<7} {traffic.get('from_agents', 0) / MB:10.1f} "
                f"{traffic.get('from_proxies', 0) / MB:10.1f} "
                f"{traffic.get('from_http_fallback', 0) / MB:9.1f} "
                f"{traffic.get('uploaded', 0) / MB:9.1f} {node.cpu_agent:11.2f}s"
                + (f" {_num(node.mb_per_s, '.2f', 7)} {node.throttled:8.1f}s" if quota else "")
            )
    return lines


def _side_by_side(report: Report) -> list[str]:
    lines = [
        "",
        f"side by side: node times as multiples of size/R = {report.ideal_node:.1f} s; CPU "
        "seconds per GB moved (down + up) by the nodes' peer processes (agents or libtorrent "
        "leechers) and by the seed (proxy or libtorrent seed)",
        f"  {'scenario':<13} {'p50':>7} {'max':>7} {'p50/ideal':>9} {'max/ideal':>9} "
        f"{'peers CPU':>9} {'s/GB':>6} {'seed CPU':>8} {'s/GB':>6} {'seed sent':>9} "
        f"{'from nodes':>10} {'MB/s p50':>8} {'min':>6}",
    ]
    for s in report.summaries():
        lines.append(
            f"  {s.scenario + ' ' + str(s.round):<13} {_num(s.p50, '.1f', 7)} "
            f"{_num(s.max, '.1f', 7)} {_num(s.p50_ideal, '.2f', 9, 'x')} "
            f"{_num(s.max_ideal, '.2f', 9, 'x')} {_num(s.peer_cpu, '.1f', 9, 's')} "
            f"{_num(s.peer_cpu_per_gb, '.2f', 6)} {_num(s.seed_cpu, '.1f', 8, 's')} "
            f"{_num(s.seed_cpu_per_gb, '.2f', 6)} {_num(s.seed_copies, '.2f', 9, 'x')} "
            f"{_num(s.from_peers * 100 if s.from_peers is not None else None, '.0f', 10, '%')} "
            f"{_num(s.mb_per_s_p50, '.2f', 8)} {_num(s.mb_per_s_min, '.2f', 6)}"
        )
    return lines


def _median_of(report: Report, scenario: str, what: str) -> float | None:
    values = [getattr(s, what) for s in report.of(scenario)]
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite and len(finite) == len(values) else None


def _ratio_lines(report: Report) -> list[str]:
    size = report.image_bytes
    nodes = int(report.options["nodes"])
    lines = [""]
    base_slowest = [s.slowest for s in report.of("baseline")]
    p2p_slowest = [s.slowest for s in report.of("p2p")]
    if base_slowest and p2p_slowest:
        lines.append(
            f"baseline slowest / p2p slowest (median over rounds): "
            f"{statistics.median(base_slowest) / statistics.median(p2p_slowest):.2f}x"
            f"   per round: "
            + ", ".join(f"{b / p:.2f}x" for b, p in zip(base_slowest, p2p_slowest, strict=True))
        )
    warm = _median_of(report, "p2p-warm", "slowest")
    theirs = _median_of(report, "libtorrent", "slowest")
    warm_p50 = _median_of(report, "p2p-warm", "median")
    theirs_p50 = _median_of(report, "libtorrent", "median")
    if warm and theirs and warm_p50 and theirs_p50:
        lines.append(
            f"libtorrent / p2p-warm (median over rounds; above 1: p2p sooner): slowest "
            f"{theirs / warm:.2f}x, p50 {theirs_p50 / warm_p50:.2f}x"
        )
    for result in report.scenarios:
        if result.scenario == "libtorrent":
            continue
        asked = ", ".join(f"{n} {m}" for m, n in sorted(result.origin_manifest_requests.items()))
        lines.append(
            f"{result.scenario} {result.round}: the origin answered {asked or 'no'} manifest "
            f"requests for {nodes} nodes"
        )
    for result in report.scenarios:
        if result.scenario in ("p2p", "p2p-warm"):
            bt = result.proxy.get("peer_upload_bytes", 0.0)
            http = result.proxy.get("http_bytes", 0.0)
            lines.append(
                f"{result.scenario} {result.round}: the proxy uploaded {bt / MB:.0f} MB over "
                f"BitTorrent + {http / MB:.0f} MB over HTTP (progressive streams and fallback) = "
                f"{(bt + http) / size:.2f} copies of the image"
            )
        elif result.scenario == "libtorrent":
            up = result.seed.get("uploaded", 0.0)
            lines.append(
                f"libtorrent {result.round}: the seed uploaded {up / MB:.0f} MB = "
                f"{up / size:.2f} copies of the image"
            )
        lines += [f"{result.scenario} {result.round}: {note}" for note in result.notes]
        peer_group = {"p2p": "agent", "p2p-warm": "agent", "libtorrent": "ltpeer"}.get(
            result.scenario
        )
        split = result.cpu_split.get(peer_group or "")
        if split:
            lines.append(
                f"{result.scenario} {result.round}: the {PEER_NAME[result.scenario]}s' CPU: "
                f"{split['user']:.2f} s user + {split['system']:.2f} s system"
            )
        if result.tracker:
            counts = ", ".join(f"{int(n)} {e}" for e, n in sorted(result.tracker.items()) if n)
            lines.append(
                f"{result.scenario} {result.round}: the tracker answered "
                f"{int(sum(result.tracker.values()))} announces ({counts or 'none'})"
            )
        if result.links.get("packets"):
            links = result.links
            lines.append(
                f"{result.scenario} {result.round}: the hosts' uplinks sent "
                f"{links['bytes'] / MB:.0f} MB in {links['packets']:,} packets "
                f"({links['bytes'] / links['packets']:.0f} "
                f"bytes each on average), dropped {links.get('drops', 0):,}"
            )
    for scenario in SWARMS:
        slowest = _median_of(report, scenario, "slowest")
        median = _median_of(report, scenario, "median")
        if slowest and median:
            lines.append(
                f"{scenario} slowest vs ideal size/R: {slowest / report.ideal_node:.2f}x; "
                f"{scenario} tail (slowest / median): {slowest / median:.2f}"
            )
    return lines


def _summary_header() -> str:
    return (
        f"  {'scenario':<13} {'slowest':>8} {'median':>8} {'tail':>5} {'origin sent':>13} "
        f"{'from nodes':>11} {'from seed':>10} {'fallback':>9} {'our CPU':>8} "
        f"{'machine':>8}  verified"
    )


def _summary_line(result: ScenarioResult, size: int, cpus: int) -> str:
    ours = sum(v for k, v in result.cpu.items() if k != "machine")
    agents, proxies, fallback = result.sources()
    pulled = agents + proxies + fallback or 1
    peer_cols = (
        f"{agents / pulled:11.0%} {proxies / pulled:10.0%} {fallback / pulled:8.0%}"
        if result.scenario in SWARMS
        else f"{'-':>11} {'-':>10} {'-':>8}"
    )
    tail = result.slowest / result.median if math.isfinite(result.slowest) else math.nan
    return (
        f"  {result.scenario + ' ' + str(result.round):<13} {_fmt(result.slowest):>8} "
        f"{_fmt(result.median):>8} {_num(tail, '.2f', 5)} "
        f"{result.origin_blob_bytes / MB:7.1f} MB {result.origin_blob_bytes / size:4.2f}x "
        f"{peer_cols} {ours:7.1f}s {result.machine_busy * cpus:4.2f}/{cpus}  "
        f"{'yes' if result.verified else 'NO'}"
    )
