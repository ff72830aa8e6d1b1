"""PNG plots of a simulated rollout: the completion CDF and the bytes by source over time.

    python -m tests.sim --nodes 100 --size-mb 500 --layers 5 --rate 100 --png rollout.png
    python -m tests.sim.plots results.json rollout.png    # from a saved --json

Left: the fraction of nodes holding the whole image against time, in seconds and in multiples
of the ideal ``size / R`` (the issue's ratio), with the p50 and the slowest node marked. Right:
the download rate of all nodes together, by where the bytes came from (the proxies, other
agents, the HTTP fallback, the origin straight), from the ``timeline`` the simulator samples
once a virtual second. :func:`series` computes what is drawn (tested without a display);
:func:`plot` draws it with matplotlib's Agg backend.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCES = {
    "from_proxy": "proxies",
    "from_agent": "other agents",
    "http_fallback": "HTTP fallback",
    "origin": "origin",
}


@dataclass(frozen=True)
class Series:
    completion_s: list[float]
    """Completion times, sorted."""
    fraction: list[float]
    """Fraction of nodes done at each of those times (1/n ... 1)."""
    ideal_s: float
    t: list[float]
    """Timeline sample times."""
    rates: dict[str, list[float]]
    """Bytes per second of all nodes together, by source, between consecutive samples (one
    value per sample after the first)."""


def series(results: dict[str, Any]) -> Series:
    done = sorted(float(t) for t in results["completion_s"] if t is not None)
    n = len(results["completion_s"])
    fraction = [(i + 1) / n for i in range(len(done))]
    timeline = results["timeline"]
    columns: list[str] = timeline["columns"]
    rows: list[list[float]] = timeline["rows"]
    t = [float(row[0]) for row in rows]
    rates: dict[str, list[float]] = {}
    for column in columns[1:]:
        index = columns.index(column)
        values = [float(row[index]) for row in rows]
        rates[column] = [
            (values[i] - values[i - 1]) / max(t[i] - t[i - 1], 1e-9) for i in range(1, len(rows))
        ]
    return Series(done, fraction, float(results["ideal_s"]), t, rates)


def plot(results: dict[str, Any], out: Path) -> Series:
    """Write the two plots to ``out`` (PNG); returns what was drawn."""
    import matplotlib  # noqa: PLC0415 - only the plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    data = series(results)
    scenario = results["scenario"]
    title = (
        f"{scenario['nodes']} nodes, {scenario['size_mb']:g} MB in {scenario['layers']} layers, "
        f"{scenario['rate']:g} Mbit/s, {scenario['proxies']} "
        f"prox{'y' if scenario['proxies'] == 1 else 'ies'}, "
        + ("warm" if scenario["warm"] else "cold")
    )
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    figure.suptitle(title)
    if data.completion_s:
        left.step(data.completion_s, data.fraction, where="post", color="tab:blue")
        p50 = data.completion_s[(len(data.completion_s) - 1) // 2]
        for x, label in ((p50, "p50"), (data.completion_s[-1], "slowest")):
            left.axvline(x, color="grey", linestyle=":", linewidth=1)
            left.annotate(
                f"{label} {x / data.ideal_s:.2f}x", (x, 0.45), rotation=90, fontsize=8, ha="right"
            )
    left.axvline(data.ideal_s, color="tab:green", linestyle="--", linewidth=1, label="size / R")
    left.set_xlabel("seconds from the common start")
    left.set_ylabel("fraction of nodes with the whole image")
    left.set_ylim(0, 1.02)
    left.set_xlim(left=0)
    left.legend(loc="upper left", fontsize=8)
    left.set_title("completion")
    if len(data.t) > 1:
        middle = [(a + b) / 2 for a, b in zip(data.t, data.t[1:], strict=False)]
        stacked = [
            [rate * 8 / 1e9 for rate in data.rates[column]]
            for column in SOURCES
            if column in data.rates
        ]
        labels = [SOURCES[column] for column in SOURCES if column in data.rates]
        right.stackplot(middle, *stacked, labels=labels, step="mid")
        right.legend(loc="upper right", fontsize=8)
    right.set_xlabel("seconds from the common start")
    right.set_ylabel("download rate of all nodes, Gbit/s")
    right.set_title("bytes by source")
    figure.tight_layout()
    figure.savefig(out, format="png")
    plt.close(figure)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.sim.plots", description="Plot a saved simulation (--json)."
    )
    parser.add_argument("results", type=Path, help="a file written by python -m tests.sim --json")
    parser.add_argument("out", type=Path, help="the PNG to write")
    args = parser.parse_args(argv)
    plot(json.loads(args.results.read_text()), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
