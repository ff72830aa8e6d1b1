"""The simulator's plots: what is drawn comes from the results, and the PNG is written."""

from __future__ import annotations

from pathlib import Path

from tests.sim.plots import SOURCES, plot, series
from tests.sim.scenario import Scenario, simulate


def test_a_small_rollout_is_plotted_from_its_results(tmp_path: Path) -> None:
    results = simulate(
        Scenario(nodes=6, size_mb=8, layers=1, rate=100, origin_rate=0, seed=3, max_time=600)
    )
    out = tmp_path / "rollout.png"
    drawn = plot(results, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000  # two panels, not an empty canvas
    # the CDF: every node, in time order, ending at all of them
    assert drawn.completion_s == sorted(results["completion_s"])
    assert drawn.fraction[-1] == 1.0
    assert drawn.completion_s[-1] == results["max_s"]
    # the rates integrate back to the bytes each source delivered
    t = drawn.t
    for column in SOURCES:
        delivered = sum(
            rate * (b - a) for rate, a, b in zip(drawn.rates[column], t, t[1:], strict=False)
        )
        last = results["timeline"]["rows"][-1][results["timeline"]["columns"].index(column)]
        assert abs(delivered - last) <= 1e-6 * max(last, 1)
    by_source = results["download_bytes_by_source"]
    assert sum(by_source.values()) > 0


def test_unfinished_nodes_are_left_out_of_the_cdf() -> None:
    results = {
        "completion_s": [3.0, None, 1.0, 2.0],
        "ideal_s": 1.0,
        "timeline": {"columns": ["t", "from_agent"], "rows": [[0.0, 0], [1.0, 10], [3.0, 30]]},
    }
    drawn = series(results)
    assert drawn.completion_s == [1.0, 2.0, 3.0]
    assert drawn.fraction == [0.25, 0.5, 0.75]  # a quarter never finished
    assert drawn.rates["from_agent"] == [10.0, 10.0]
