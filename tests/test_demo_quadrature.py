"""The demo's quadrature row: the paper's left rule against Gauss at equal passes, against a Gauss reference."""

from __future__ import annotations

import pytest

from lightning_delta.demo.analysis import quadrature_findings, quadrature_grid
from lightning_delta.sweep import expand_grid
from lightning_delta.sweep.run import sweep
from tests.test_sweep import digits_config


def test_quadrature_grid_runs_every_setting_once_under_three_rules():
    grid = [
        {"edit": "lightning_delta.edits.DARE", "edit.init_args.p": [0.5, 0.9], "edit.init_args.seed": [3, 1, 2]},
        {"edit": "lightning_delta.edits.BitDelta"},
    ]
    points = expand_grid(quadrature_grid(grid, num_points=5, reference=16))
    assert len(points) == (2 + 1) * 3
    assert {point.get("edit.init_args.seed") for point in points[:6]} == {3}
    assert [(p["riemann.rule"], p["riemann.num_points"]) for p in points[:3]] == [
        ("left", 5),
        ("gauss", 5),
        ("gauss", 16),
    ]
    assert all(point["riemann.trapezoid"] is False for point in points)
    assert grid[0]["edit.init_args.seed"] == [3, 1, 2]  # the demo's grid is left as it was


@pytest.mark.slow
def test_quadrature_finding_against_errors_computed_here(tmp_path):
    grid = [
        {"edit": "lightning_delta.edits.DARE", "edit.init_args.p": 0.5, "edit.init_args.seed": [0, 1]},
        {"edit": "lightning_delta.edits.Extrapolate", "edit.init_args.alpha": [-1.0]},
    ]
    config = digits_config(tmp_path, quadrature_grid(grid, num_points=2, reference=8), tmp_path / "r.jsonl", limit=12)
    config["sweep"]["figures"] = None
    rows = sweep(config)
    assert len(rows) == 6
    (finding,) = quadrature_findings(rows)
    expected = {}
    for setting in range(2):
        left, gauss, reference = (row.result for row in rows[3 * setting : 3 * setting + 3])
        assert (left.rule, left.passes, gauss.rule, gauss.passes, reference.passes) == ("left", 2, "gauss", 2, 8)
        largest = max(abs(value) for value in reference.term_per_tensor.values())
        expected[setting] = [
            max(abs(result.term_per_tensor[name] - value) for name, value in reference.term_per_tensor.items())
            / largest
            for result in (left, gauss)
        ]
    worst_left = max(errors[0] for errors in expected.values())
    worst_gauss = max(errors[1] for errors in expected.values())
    assert f"worst {worst_left:.2g}" in finding.measured and f"worst {worst_gauss:.2g}" in finding.measured
    better = sum(errors[1] < errors[0] for errors in expected.values())
    assert f"Gauss more accurate at {better} of 2 settings" in finding.measured
    assert (finding.verdict == "holds") if better == 2 else finding.verdict.startswith("departs at")
    assert "equal passes (2)" in finding.claim and "8-node Gauss reference" in finding.claim
