"""Every figure is drawn from a results file, decodes, and is not blank."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from lightning_delta import plots
from lightning_delta.callbacks import RiemannResult
from lightning_delta.cli import run
from lightning_delta.edits import EDITS, Extrapolate
from lightning_delta.sweep import ResultsFile, SweepRow


def sweep_row(edit: dict, dataset: str, term: float, exact: float, accuracy: float | None,
              num_points: int = 5) -> SweepRow:
    """A row shaped like the sweep's, with a loss curve whose integrand is linear in t."""
    losses = [1.0 + exact * (c / num_points) ** 2 for c in range(num_points + 1)]
    inner = [2 * exact * c / num_points for c in range(num_points + 1)]
    groups = {"attention": 0.5 * term, "mlp": 0.4 * term, "norms": 0.05 * term, "embeddings": 0.05 * term}
    result = RiemannResult(num_points=num_points, count=1.0, losses=losses, inner_products=inner, term=term,
                           trapezoid=exact, exact=exact, loss_post=1.0, loss_edit=1.0 + exact,
                           accuracy_post=None if accuracy is None else 0.8, accuracy_edit=accuracy,
                           term_per_group=groups)
    return SweepRow(key=f"{edit}-{dataset}", index=0, overrides={}, edit=edit, dataset=dataset, result=result,
                    config={}, versions={}, started="2025-01-01T00:00:00+0000", seconds=0.0)



def synthetic_rows() -> list[SweepRow]:
    rng = random.Random(0)
    rows = []
    for k in (-1.0, 0.0, 0.5):
        for p in (0.1, 0.5, 0.9):
            exact = p ** 3 * (1 + abs(k)) * 0.3 + rng.uniform(-0.005, 0.005)
            rows.append(sweep_row({"name": "dare", "p": p, "k": k, "rescale": True, "seed": 0}, "GSM8K",
                                  exact * 0.9, exact, 0.8 - exact))
    for p in (0.1, 0.5, 0.9):
        rows.append(sweep_row({"name": "dare", "p": p, "k": 0.0, "rescale": False, "seed": 0}, "GSM8K",
                              p, 1.2 * p, 0.5))
    for bits in (1, 2, 3, 4):
        rows.append(sweep_row({"name": "bitdelta", "bits": bits, "scale": 1.0, "magnitudes": "mean", "seed": 0},
                              "GSM8K", 0.2 / bits, 0.25 / bits, 0.8 - 0.1 / bits))
    rows.append(sweep_row({"name": "lowrank", "rank": 4, "fraction": None}, "GSM8K", 0.3, 0.4, 0.6))
    rows.append(sweep_row({"name": "magnitude_prune", "p": 0.9}, "GSM8K", 0.25, 0.3, 0.65))
    for data in ("UltraFeedback", "Digits/train"):
        for alpha in (-0.5, -0.2, 0.2, 0.5, 1.0):
            term = (alpha - 0.3) ** 2 - 0.09
            rows.append(sweep_row({"name": "extrapolate", "alpha": alpha}, data, term, term * 1.1, None))
    return rows


@pytest.fixture
def results_file(tmp_path: Path) -> Path:
    results = ResultsFile(tmp_path / "results.jsonl")
    for row in synthetic_rows():
        results.append(row.to_dict())
    return results.path


def _check_image(path: Path) -> None:
    image = imread(path)  # (H, W, 3 or 4) floats in [0, 1]
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    rgb = image[..., :3]
    assert rgb.std() > 0.01
    background = np.all(rgb > 0.98, axis=-1)
    assert background.mean() < 0.995  # something other than white was drawn
    colored = np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).max(axis=-1) > 0.1
    assert colored.any()  # the lines and bars are in color, not only the black axes


def test_every_figure_from_a_results_file(results_file, tmp_path):
    written = run(["plot", "--results", f"[{results_file}]", "--output_dir", str(tmp_path / "figures")])
    assert sorted(Path(path).stem for path in written) == sorted(plots.FIGURES)
    for path in written:
        _check_image(Path(path))


def test_figures_without_their_rows_are_skipped(tmp_path):
    only_dare = [row for row in synthetic_rows() if row.edit["name"] == "dare"]
    written = plots.plot_all(only_dare, tmp_path)
    assert set(written) == {"dare_p_k", "per_module", "loss_curve"}
    for name, function in plots.FIGURES.items():
        assert function([], tmp_path / "none.png") is None


def test_alpha_trough_and_gap_values():
    rows = [row for row in synthetic_rows() if row.dataset == "UltraFeedback"]
    trough = min(rows, key=lambda row: row.result.term)
    assert trough.edit["alpha"] == 0.2
    gaps = [plots.performance_gap(row) for row in rows]
    assert all(math.isclose(gap, -row.result.exact) for gap, row in zip(gaps, rows))


def test_labels():
    dare, drop, bits = synthetic_rows()[4], synthetic_rows()[9], synthetic_rows()[12]
    assert plots.edit_label(dare) == "dare p=0.5 k=0"
    assert plots.edit_label(drop) == "drop_only p=0.1"
    assert plots.edit_label(bits) == "bitdelta bits=1"


def test_edits_are_named_by_their_classes(tmp_path, figures):
    for cls in EDITS.values():
        assert cls.label and cls.reference.startswith(("paper", cls.label)), cls
    plots.plot_all(synthetic_rows(), tmp_path)
    assert figures["expo_alpha"].axes[0].get_title() == f"{Extrapolate.label}: Riemann term against α" == \
        "EXPO: Riemann term against α"
    assert figures["bitdelta_bits"].axes[0].get_title() == "BitDelta with more bits"


def test_plot_without_rows_says_what_to_do(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="No rows"):
        run(["plot", "--results", f"[{tmp_path / 'empty.jsonl'}]"])


# ------------------------------------------------------------------------------- rows of several sweeps
def _configured_row(p: float, term: float, num_points: int, model: str, devices: int,
               dataset: str = "Digits/test") -> SweepRow:
    """A DARE row with the config a sweep records (C in the result and in the config)."""
    row = sweep_row({"name": "dare", "p": p, "k": 0.0, "rescale": True, "seed": 0}, dataset, term, 1.1 * term, 0.7,
               num_points=num_points)
    row.key = f"{p}-{num_points}-{model}"
    row.config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": devices, "precision": "32-true"},
        "model": {"model": model, "pretrained": "runs/base/pre", "loss": "causal_lm"},
        "data": {"class_path": "lightning_delta.demo.digits.DigitsDataModule",
                 "init_args": {"split": dataset.rsplit("/", 1)[-1], "limit": 24}},
        "edit": {"class_path": "lightning_delta.edits.DARE", "init_args": {"p": p, "k": 0.0}},
        "riemann": {"num_points": num_points, "filename": None},
    }
    return row


def _write_rows(path: Path, rows: list[SweepRow]) -> Path:
    results = ResultsFile(path)
    for row in rows:
        results.append(row.to_dict())
    return path


@pytest.fixture
def figures(monkeypatch) -> dict[str, object]:
    """The matplotlib Figures that plots save, by file stem (saved as usual)."""
    drawn = {}
    save = plots._save

    def keep(figure, path):
        drawn[Path(path).stem] = figure
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    return drawn


def _series(axis) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()
            if not line.get_label().startswith("_")}


P = (0.9, 0.1, 0.5)  # written out of order: each line must still run left to right


def test_rows_with_different_C_are_separate_lines(tmp_path, figures):
    terms = {2: {0.1: 0.01, 0.5: 0.08, 0.9: 0.5}, 5: {0.1: 0.02, 0.5: 0.1, 0.9: 0.6}}
    # the two sweeps ran on different numbers of devices: that does not change the numbers, so it is no setting
    coarse = _write_rows(tmp_path / "c2.jsonl", [_configured_row(p, terms[2][p], 2, "runs/a/post", 8) for p in P])
    fine = _write_rows(tmp_path / "c5.jsonl", [_configured_row(p, terms[5][p], 5, "runs/a/post", 1) for p in P])
    run(["plot", "--results", f"[{coarse}, {fine}]", "--output_dir", str(tmp_path / "figures")])

    term_axis, exact_axis = figures["dare_p_k"].axes[:2]
    lines = _series(term_axis)
    assert sorted(lines) == ["k=0, C=2", "k=0, C=5"]
    for num_points in (2, 5):
        xs, ys = lines[f"k=0, C={num_points}"]
        assert xs == [0.1, 0.5, 0.9]
        assert ys == pytest.approx([terms[num_points][p] for p in xs])
    assert sorted(_series(exact_axis)) == ["k=0, C=2", "k=0, C=5"]
    assert sorted(text.get_text() for text in term_axis.get_legend().get_texts()) == ["k=0, C=2", "k=0, C=5"]


def test_rows_of_different_models_are_labelled_by_the_part_that_differs(tmp_path, figures):
    rows = [_configured_row(p, 0.1 * p, 5, model, 1) for model in ("runs/a/post", "runs/b/post") for p in P]
    for row in rows:
        row.edit = {"name": "extrapolate", "alpha": row.edit["p"] - 0.5}
    only_one = {"data", "C", "pretrained", "loss", "seed", "trainer.precision", "data.limit"}
    assert plots.setting_labels(rows[:3]) == ["", "", ""]  # one sweep: nothing to tell apart
    assert only_one <= set(plots.row_settings(rows[0]))
    path = _write_rows(tmp_path / "r.jsonl", rows)
    run(["plot", "--results", f"[{path}]", "--output_dir", str(tmp_path / "figures")])

    (axis,) = figures["expo_alpha"].axes
    lines = _series(axis)
    assert sorted(lines) == ["term, Digits/test, model=a/post", "term, Digits/test, model=b/post",
                             "ΔL, Digits/test, model=a/post", "ΔL, Digits/test, model=b/post"]
    for label, (xs, _) in lines.items():
        assert xs == sorted(xs) and len(xs) == 3, label


def test_rows_that_differ_only_where_they_ran_are_one_line(tmp_path, figures):
    rows = [_configured_row(p, 0.1 * p, 5, "runs/a/post", devices) for devices, p in zip((1, 8, 2), P)]
    plots.plot_dare(rows, tmp_path / "dare.png")
    lines = _series(figures["dare"].axes[0])
    assert list(lines) == ["k=0"] and lines["k=0"][0] == [0.1, 0.5, 0.9]


def test_plot_of_a_missing_file_names_it(tmp_path):
    missing = tmp_path / "no-such-results.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"No results file at {missing}") as error:
        run(["plot", "--results", f"[{missing}]", "--output_dir", str(tmp_path / "figures")])
    assert "No rows" not in str(error.value)


def test_plot_with_one_missing_file_among_several_names_it_and_draws_nothing(results_file, tmp_path):
    missing = tmp_path / "typo.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"No results file at {missing}:"):
        run(["plot", "--results", f"[{results_file}, {missing}]", "--output_dir", str(tmp_path / "figures")])
    assert not (tmp_path / "figures").exists()
