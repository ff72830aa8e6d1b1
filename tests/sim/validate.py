"""``python -m tests.sim.validate``: the emulated rollouts of docs/rollout.md, simulated too.

Each row is a scenario of ``tests.bench.bench_rollout`` on network namespaces (2-core machine,
every link shaped to R both ways, one proxy and the tracker on an infra host at R, the origin
at R) with what it measured, and the same scenario in the simulator. Ratios are to the ideal
``size / R``. ``--seeds 3`` runs every scenario with three seeds (the range is shown).

``--measure`` emulates every scenario again in this run (``bench_rollout``, root, about a
minute per 16 nodes) and compares the simulation with that instead of the recorded numbers:
the benchmark form, ``python -m tests.bench sim-validate``. ``--rows 2,3`` picks rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tests.sim.scenario import Scenario, simulate


@dataclass(frozen=True)
class Measured:
    label: str
    nodes: int
    size_mb: float
    layers: int
    rate: float
    warm: bool
    p50: float
    slowest: float
    proxy_copies: float
    note: str = ""


MEASURED = [
    # docs/rollout.md. Cold rows: the runs of 2026-12-07 14:32-14:43 after the super-seed's
    # offers were spread over every peer (means of 3, 2 and 2 runs); warm rows: the runs of
    # 2026-12-07 06:35-06:52 (commit 524d0f5 or the tree just before it).
    Measured("8 x 100 Mbit/s, 160 MB / 4, cold", 8, 160, 4, 100, False, 1.35, 1.36, 1.00, "cpu"),
    Measured("16 x 50 Mbit/s, 80 MB / 4, cold", 16, 80, 4, 50, False, 1.77, 1.78, 1.09, "cpu"),
    Measured("16 x 25 Mbit/s, 100 MB / 1, cold", 16, 100, 1, 25, False, 1.36, 1.37, 1.04),
    Measured("16 x 25 Mbit/s, 100 MB / 1, warm", 16, 100, 1, 25, True, 1.35, 1.36, 1.03),
    Measured("32 x 25 Mbit/s, 100 MB / 1, warm", 32, 100, 1, 25, True, 1.66, 1.67, 1.15, "cpu"),
]
"""``cpu``: the machine's two cores were 1.66-1.91 busy (CPU-bound, which the simulator does
not model)."""


def scenario_of(row: Measured, seed: int) -> Scenario:
    return Scenario(
        nodes=row.nodes,
        size_mb=row.size_mb,
        layers=row.layers,
        rate=row.rate,
        origin_rate=0 if row.warm else None,
        seed=seed,
    )


def emulate(row: Measured) -> Measured:
    """``row`` measured again now by the rollout benchmark (p2p only; warm: a preheated
    proxy), as a row of its own."""
    with tempfile.TemporaryDirectory(prefix="sim-validate-") as tmp:
        out = Path(tmp) / "rollout.json"
        argv = [
            sys.executable,
            "-m",
            "tests.bench.bench_rollout",
            "--nodes",
            str(row.nodes),
            "--rate",
            f"{row.rate:g}mbit",
            "--size-mb",
            f"{row.size_mb:g}",
            "--layers",
            str(row.layers),
            "--scenarios",
            "p2p-warm" if row.warm else "p2p",
            "--json",
            str(out),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"{row.label}: bench_rollout failed ({done.returncode}): {done.stdout[-2000:]}"
                f"{done.stderr[-2000:]}"
            )
        (side,) = json.loads(out.read_text())["side_by_side"]
    return replace(
        row,
        p50=side["p50_ideal"],
        slowest=side["max_ideal"],
        proxy_copies=side["seed_copies"],
        note="",
    )


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}x" if high - low < 0.005 else f"{low:.2f}-{high:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim.validate")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per scenario")
    parser.add_argument("--json", type=Path, help="write every run's summary here")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="emulate every scenario again now (bench_rollout, needs root) instead of using "
        "the recorded numbers",
    )
    parser.add_argument("--rows", help="comma-separated row numbers (from 0) to run")
    args = parser.parse_args(argv)
    rows = MEASURED
    if args.rows:
        rows = [MEASURED[int(i)] for i in args.rows.split(",")]
    header = (
        f"{'scenario':<36} {'measured p50/max':>17} {'simulated p50':>14} {'max':>11} "
        f"{'off (max)':>9} {'proxy copies meas/sim':>22} {'wall s':>7}"
    )
    print(header)
    runs: list[dict[str, Any]] = []
    for recorded in rows:
        row = emulate(recorded) if args.measure else recorded
        results = [simulate(scenario_of(row, seed)) for seed in range(1, args.seeds + 1)]
        p50 = [r["p50_ratio"] for r in results]
        top = [r["max_ratio"] for r in results]
        copies = [r["proxy_upload_copies"] for r in results]
        wall = sum(r["sim"]["wall_s"] for r in results) / len(results)
        off = sum(top) / len(top) / row.slowest - 1
        print(
            f"{row.label + (' *' if row.note else ''):<36} "
            f"{f'{row.p50:.2f}x / {row.slowest:.2f}x':>17} {_span(p50):>14} {_span(top):>11} "
            f"{off:>+9.0%} {f'{row.proxy_copies:.2f} / {_span(copies)[:-1]}':>22} {wall:>7.1f}"
        )
        runs.append(
            {
                "label": row.label,
                "measured": {"p50": row.p50, "max": row.slowest, "proxy_copies": row.proxy_copies},
                "simulated": [
                    {
                        "seed": seed,
                        "p50": r["p50_ratio"],
                        "max": r["max_ratio"],
                        "proxy_copies": r["proxy_upload_copies"],
                        "wall_s": r["sim"]["wall_s"],
                    }
                    for seed, r in enumerate(results, start=1)
                ],
            }
        )
    if args.measure:
        print("measured: emulated in this run (python -m tests.bench.bench_rollout)")
    else:
        print("* CPU-bound when measured (1.66-1.91 of the machine's 2 cores busy)")
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
