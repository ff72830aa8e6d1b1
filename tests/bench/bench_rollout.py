"""A rollout on emulated nodes: N nodes pull one image at once, straight from the origin and then
through their agents; the origin's uplink is the bottleneck p2p removes.

    python -m tests.bench.bench_rollout                       # 8 nodes, 100 Mbit/s, 160 MB, 1 round
    python -m tests.bench.bench_rollout --nodes 8 --rate 100mbit --size-mb 160 --rounds 2
    python -m tests.bench.bench_rollout --nodes 3 --rate 500mbit --size-mb 10 --json out.json
    python -m tests.bench.bench_rollout --no-baseline --proxy-set progressiveStreams=0
    python -m tests.bench.bench_rollout --swarm libtorrent --nodes 16 --rate 25mbit --size-mb 100
    python -m tests.bench.bench_rollout --scenarios p2p-warm,libtorrent --cpu-quota 0.2

``--scenarios`` picks what each round runs (default ``baseline,p2p``): ``p2p-warm`` is the p2p
swarm fed by a proxy that already holds the image, ``libtorrent`` the same swarm made of
libtorrent 2.1 peers (a warm libtorrent seed on the infra host, a libtorrent leecher per node,
peers found through the p2p-tracker); ``--swarm libtorrent`` is short for ``--scenarios
p2p-warm,libtorrent``. ``--cpu-quota CORES`` holds every agent and libtorrent leecher to that
much CPU (cgroup v1 cpu controller). See :mod:`tests.bench.rollout.results` and docs/rollout.md.

``--infra-rate``, ``--queue-ms``, ``--tcp-cc``, ``--agent-set`` and ``--proxy-set`` vary one thing
at a time to find out what limits a rollout (results and findings: docs/rollout.md).

Topology (every host is a network namespace; nothing is added to the caller's namespace):

    switch ns: bridge br0, one veth end h<i> per host (egress tbf = the host's DOWNLOAD rate)
    origin ns: 10.77.0.1   CNCF distribution registry on :5000
    infra  ns: 10.77.0.2   p2p-tracker on :6969, one p2p-proxy on :5005 (BitTorrent :6882)
    node<i> ns: 10.77.0.(10+i)  p2p-agent (registry API 127.0.0.1:5004, BitTorrent :6881,
                                metrics on the node address :5014) and one pull client
    each host's eth0 egress tbf = the host's UPLOAD rate

Every link is shaped to the same rate R in both directions with two egress token buckets, one on
each end of the host's veth pair: ``tc qdisc replace dev eth0 root tbf rate R burst B latency
50ms`` inside the host's namespace (what it sends) and the same on its peer ``h<i>`` in the switch
namespace (what it receives: every packet to the host leaves the switch there). That is the same
shaping an ifb device with a mirred redirect would do on the host's ingress, with one queue fewer
and no ifb device to clean up. No delay or loss is emulated (this kernel has no netem).

Per round (``--rounds`` alternates them):

- baseline: every node's pull client fetches the manifest and then every blob (3 at a time, like
  containerd) straight from the origin, all nodes starting at the same instant;
- p2p: a fresh tracker, proxy and agents with empty caches are started and become ready; then every
  node's client pulls ``127.0.0.1:5004`` (its own agent), all at the same instant.

Measured: each node's time to the whole image (from the common start to the last byte, every blob
checked against its digest and the manifest against the pushed one); the slowest node and the
median; the bytes the origin sent (its access log); for p2p where the agents' bytes came from
(their ``/metrics``: other agents, the proxy, the HTTP fallback); the CPU used by our processes and
by the whole machine. Ideal lower bounds: ``size / R`` for one node, ``N * size / R`` for the
baseline (the origin's uplink carries every copy).

The pull clients are long-lived worker processes (``--worker``, one per node namespace) that take
commands as JSON lines on stdin, so no Python start-up lands inside a measurement. Data goes to
tmpfs (``/dev/shm``) by default: the benchmark measures the network, not this machine's disk.

The parts live in :mod:`tests.bench.rollout`: ``netns`` (the emulated network), ``image`` (the
test image), ``client`` (the pull client), ``bench`` (the scenarios), ``results`` (options, report,
rendering); this module is the command line.

Cleanup: every process is a :class:`~tests.realparts.procs.ManagedProcess`; the namespaces (and
with them every veth and the bridge) are deleted on exit, on failure and on Ctrl-C/SIGTERM.
Namespace names are ``p2prb-<pid>-<random>-<host>``; at start, namespaces of this prefix whose
owner process is gone (a crashed run) are removed, together with any process still inside them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.bench.common import default_workdir
from tests.bench.rollout.bench import run
from tests.bench.rollout.cgroups import CgroupError, parse_cpu_quota
from tests.bench.rollout.client import worker_main
from tests.bench.rollout.netns import (
    PREFIX,
    QUEUE_MS,
    RolloutError,
    leftover_namespaces,
    parse_rate,
)
from tests.bench.rollout.results import (
    DEFAULT_SCENARIOS,
    SCENARIOS,
    SWARM_LIBTORRENT,
    NodeResult,
    Options,
    Report,
    ScenarioResult,
    parse_scenarios,
    render,
)

__all__ = [
    "PREFIX",
    "NodeResult",
    "Options",
    "Report",
    "RolloutError",
    "ScenarioResult",
    "leftover_namespaces",
    "main",
    "run",
]


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Options | None]:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_rollout",
        description="N emulated nodes (network namespaces, shaped links) pull one image at once: "
        "straight from the origin, then through their p2p agents (see docs/rollout.md).",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=8, help="emulated nodes (default 8)")
    parser.add_argument(
        "--rate", default="100mbit", help="every link, both directions (tc syntax; 100mbit)"
    )
    parser.add_argument(
        "--infra-rate", help="the tracker+proxy host's link (default: --rate), e.g. 1gbit"
    )
    parser.add_argument(
        "--queue-ms", type=int, default=QUEUE_MS, help="tbf latency: queue bound per link (50)"
    )
    parser.add_argument(
        "--tcp-cc", help="TCP congestion control in every namespace (default: inherited)"
    )
    parser.add_argument("--size-mb", type=float, default=160.0, help="image size (160 MB)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the image (4)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every scenario (1)")
    parser.add_argument("--concurrency", type=int, default=3, help="blobs at once per client")
    parser.add_argument(
        "--no-baseline", action="store_true", help="leave the baseline scenario out"
    )
    parser.add_argument(
        "--scenarios",
        help="what each round runs, in order, from "
        + ", ".join(SCENARIOS)
        + f" (default {','.join(DEFAULT_SCENARIOS)})",
    )
    parser.add_argument(
        "--swarm",
        choices=["libtorrent"],
        help="libtorrent: short for --scenarios "
        + ",".join(SWARM_LIBTORRENT)
        + " (our swarm and libtorrent's, each fed by one warm seed)",
    )
    parser.add_argument(
        "--cpu-quota", metavar="CORES",
        help="hold every agent and libtorrent leecher to CORES CPUs (cgroup v1 cpu), e.g. 0.2",
    )  # fmt: skip
    parser.add_argument("--workdir", default=default_workdir(), help="where files go (tmpfs)")
    parser.add_argument("--keep", action="store_true", help="keep the logs of a good run too")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument(
        "--agent-set", action="append", default=[], metavar="KEY=VALUE",
        help="extra agent setting (YAML value), e.g. fallbackAfter=5",
    )  # fmt: skip
    parser.add_argument(
        "--proxy-set", action="append", default=[], metavar="KEY=VALUE",
        help="extra proxy setting (YAML value), e.g. progressiveStreams=0",
    )  # fmt: skip
    parser.add_argument(
        "--lt-set", action="append", default=[], metavar="KEY=VALUE",
        help="extra libtorrent session setting (YAML value), e.g. unchoke_slots_limit=16",
    )  # fmt: skip
    parser.add_argument(
        "--lt-super-seed", action="store_true",
        help="the libtorrent seed super-seeds (BEP 16) like the proxy (libtorrent: off)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.worker:
        return args, None
    try:
        parse_rate(args.rate)
        if args.infra_rate:
            parse_rate(args.infra_rate)
    except ValueError as exc:
        parser.error(str(exc))
    if not 1 <= args.queue_ms <= 1000:
        parser.error("--queue-ms must be between 1 and 1000")
    if args.size_mb <= 0 or args.layers < 1 or args.rounds < 1 or args.concurrency < 1:
        parser.error("--size-mb, --layers, --rounds and --concurrency must be positive")
    if args.swarm and args.scenarios:
        parser.error("--swarm libtorrent is short for --scenarios p2p-warm,libtorrent: give one")
    try:
        scenarios = (
            SWARM_LIBTORRENT
            if args.swarm
            else parse_scenarios(args.scenarios)
            if args.scenarios
            else DEFAULT_SCENARIOS
        )
        cpu_quota = parse_cpu_quota(args.cpu_quota) if args.cpu_quota is not None else None
    except ValueError as exc:
        parser.error(str(exc))
    if args.no_baseline and scenarios == ("baseline",):
        parser.error("--no-baseline leaves no scenario to run")

    def settings(pairs: list[str]) -> dict[str, Any]:
        found = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                parser.error(f"not KEY=VALUE: {pair!r}")
            found[key] = yaml.safe_load(value)
        return found

    options = Options(
        nodes=args.nodes,
        rate=args.rate,
        infra_rate=args.infra_rate,
        queue_ms=args.queue_ms,
        tcp_cc=args.tcp_cc,
        size_mb=args.size_mb,
        layers=args.layers,
        rounds=args.rounds,
        concurrency=args.concurrency,
        baseline=not args.no_baseline,
        workdir=args.workdir,
        keep=args.keep,
        agent_settings=settings(args.agent_set),
        proxy_settings=settings(args.proxy_set),
        scenarios=scenarios,
        cpu_quota=cpu_quota,
        lt_settings=settings(args.lt_set),
        lt_super_seed=args.lt_super_seed,
    )
    return args, options


class _Terminated(KeyboardInterrupt):
    """SIGTERM arrived (handled like Ctrl-C: everything is cleaned up)."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0 when every node got the image, 1 on a failure, 2 when the
    benchmark cannot run here, 130/143 when interrupted by SIGINT/SIGTERM."""
    args, options = _parse(argv)
    if options is None:
        return worker_main()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        report = run(options)
    except RolloutError as exc:
        print(f"bench_rollout: {exc}", file=sys.stderr)
        cannot_run = isinstance(exc, CgroupError) or any(
            text in str(exc) for text in ("cannot create network namespaces", "root")
        )
        return 2 if cannot_run else 1
    except KeyboardInterrupt as exc:
        print("bench_rollout: interrupted; everything was cleaned up", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    for line in render(report):
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2, default=str))
    failed = [
        f"{s.scenario} round {s.round} {n.node}: {'; '.join(n.problems) or 'not verified'}"
        for s in report.scenarios
        for n in s.nodes
        if not n.verified
    ]
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
