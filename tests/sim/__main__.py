"""``python -m tests.sim``: simulate one rollout and print (and optionally save) its numbers.

    python -m tests.sim --nodes 16 --size-mb 100 --layers 1 --rate 25 --origin-rate 0
    python -m tests.sim --nodes 500 --size-mb 500 --layers 5 --rate 1000 --proxies 3 --json o.json

Sizes in MB (10^6 bytes), rates in Mbit/s (10^6 bit/s). ``--origin-rate 0``: the image is
already at the proxies (warm). The JSON holds at least ``completion_s`` (one number per node:
seconds from the common start to its whole image), ``origin_bytes`` and ``image_bytes``; see
docs/scale.md for the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.sim.scenario import Scenario, simulate


def parse(
    argv: list[str] | None = None,
) -> tuple[Scenario, Path | None, Path | None, bool]:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--size-mb", type=float, default=160.0, help="image size, MB (10^6 bytes)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0, help="each node's link, Mbit/s")
    parser.add_argument(
        "--proxy-rate", type=float, help="each proxy's link, Mbit/s (default --rate)"
    )
    parser.add_argument(
        "--origin-rate", type=float, help="the origin's uplink, Mbit/s (default --rate; 0: warm)"
    )
    parser.add_argument("--proxies", type=int, default=1)
    parser.add_argument("--trackers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=3, help="blobs a client pulls at once")
    parser.add_argument("--latency-ms", type=float, default=0.5, help="one-way delay")
    parser.add_argument("--http-ms", type=float, default=1.0, help="HTTP request overhead")
    parser.add_argument(
        "--goodput", type=float, default=0.95, help="payload fraction of a link's rate"
    )
    parser.add_argument("--wave-size", type=int, default=0, help="nodes per arrival wave")
    parser.add_argument("--wave-gap", type=float, default=0.0, help="seconds between waves")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-time", type=float, default=3600.0, help="virtual seconds")
    parser.add_argument(
        "--exact-interval",
        type=float,
        default=1.0,
        help="virtual seconds between exact max-min solves (0: local re-solves only)",
    )
    parser.add_argument(
        "--kill-tracker-at", type=float, help="virtual second at which a tracker is lost"
    )
    parser.add_argument("--kill-tracker", type=int, default=0, help="which tracker (0-based)")
    parser.add_argument(
        "--tracker-loss",
        choices=("refused", "timeout"),
        default="refused",
        help="a lost tracker refuses connections (its node is up) or lets them time out",
    )
    parser.add_argument(
        "--origin-line",
        type=int,
        default=Scenario().origin_line,
        help="large blobs a proxy fetches from the origin at once, in order (0: all at once)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--png", type=Path, help="plot the completion CDF and bytes by source here (matplotlib)"
    )
    parser.add_argument("--quiet", action="store_true", help="no summary on stdout")
    args = parser.parse_args(argv)
    try:
        scenario = Scenario(
            nodes=args.nodes,
            size_mb=args.size_mb,
            layers=args.layers,
            rate=args.rate,
            proxy_rate=args.proxy_rate,
            origin_rate=args.origin_rate,
            proxies=args.proxies,
            trackers=args.trackers,
            concurrency=args.concurrency,
            latency_ms=args.latency_ms,
            http_ms=args.http_ms,
            goodput=args.goodput,
            wave_size=args.wave_size,
            wave_gap=args.wave_gap,
            seed=args.seed,
            max_time=args.max_time,
            exact_interval=args.exact_interval,
            kill_tracker_at=args.kill_tracker_at,
            kill_tracker=args.kill_tracker,
            tracker_loss=args.tracker_loss,
            origin_line=args.origin_line,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return scenario, args.json, args.png, args.quiet


def summary(results: dict[str, object]) -> str:
    r = results
    s = r["scenario"]
    sim = r["sim"]
    tracker = r["tracker"]
    assert isinstance(s, dict)
    assert isinstance(sim, dict)
    assert isinstance(tracker, dict)
    image = float(r["image_bytes"])  # type: ignore[arg-type]
    by_source = r["download_bytes_by_source"]
    assert isinstance(by_source, dict)
    total = sum(by_source.values()) or 1
    lines = [
        f"{s['nodes']} nodes, {s['size_mb']:g} MB in {s['layers']} layers, {s['rate']:g} Mbit/s, "
        f"{s['proxies']} prox{'y' if s['proxies'] == 1 else 'ies'}, "
        + ("warm" if s["warm"] else f"cold (origin {s['origin_rate'] or s['rate']:g} Mbit/s)"),
        f"  ideal size/R {r['ideal_s']:.2f} s",
    ]
    if r["max_s"] is not None:
        lines.append(
            f"  p50 {r['p50_s']:.2f} s ({r['p50_ratio']:.2f}x)   slowest {r['max_s']:.2f} s "
            f"({r['max_ratio']:.2f}x)"
        )
    else:
        lines.append(f"  UNFINISHED: {r['unfinished']} nodes after {sim['virtual_s']:.0f} s")
    lines += [
        f"  origin sent {float(r['origin_bytes']) / image:.2f}x the image   "  # type: ignore[arg-type]
        f"proxies sent {r['proxy_upload_copies']:.2f} copies",
        "  nodes got "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in by_source.items() if v)
        + f"   fallbacks {r['fallbacks']}",
        f"  tracker: {tracker['announces']} announces ({tracker['batches']} of them batches of "
        f"seeds), peak {tracker['peak_per_second']}/s",
    ]
    failover = tracker.get("failover")
    if isinstance(failover, dict):
        worst = failover["max_s"]
        lines.append(
            f"  tracker {failover['tracker']} lost at {failover['at_s']:g} s: "
            f"{failover['swarms']} swarms on it, "
            + (
                f"every peer of them listed at their next tracker {worst:.1f} s later "
                f"(heartbeat {failover['heartbeat_s']:g} s)"
                if worst is not None
                else "NOT every peer listed again by the end"
            )
        )
    lines += [
        f"  simulated {sim['virtual_s']:.1f} s in {sim['wall_s']:.1f} s wall, "
        f"{sim['events']:,} events, peak RSS {sim['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    scenario, out, png, quiet = parse(argv)
    results = simulate(scenario)
    if out is not None:
        out.write_text(json.dumps(results, indent=1) + "\n")
    if png is not None:
        from tests.sim.plots import plot  # noqa: PLC0415 - matplotlib only when asked

        plot(results, png)
    if not quiet:
        print(summary(results))
    return 0 if results["unfinished"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
