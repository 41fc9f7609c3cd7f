"""Every figure is drawn from a results file, decodes, and is not blank."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.image import imread

from lightning_delta import plots
from lightning_delta.callbacks import RiemannResult
from lightning_delta.cli import run
from lightning_delta.edits import EDITS, Extrapolate
from lightning_delta.rows import edit_label
from lightning_delta.sweep import ResultsFile, SweepRow


def sweep_row(
    edit: dict, dataset: str, term: float, exact: float, accuracy: float | None, num_points: int = 5
) -> SweepRow:
    """A row shaped like the sweep's, with a loss curve whose integrand is linear in t."""
    losses = [1.0 + exact * (c / num_points) ** 2 for c in range(num_points + 1)]
    inner = [2 * exact * c / num_points for c in range(num_points + 1)]
    groups = {"attention": 0.5 * term, "mlp": 0.4 * term, "norms": 0.05 * term, "embeddings": 0.05 * term}
    result = RiemannResult(
        num_points=num_points,
        count=1.0,
        losses=losses,
        inner_products=inner,
        term=term,
        trapezoid=exact,
        exact=exact,
        loss_post=1.0,
        loss_edit=1.0 + exact,
        accuracy_post=None if accuracy is None else 0.8,
        accuracy_edit=accuracy,
        term_per_group=groups,
        rule="left",
        points=[c / num_points for c in range(num_points + 1)],
        weights=[1 / num_points] * num_points + [0.0],
    )
    return SweepRow(
        key=f"{edit}-{dataset}",
        index=0,
        overrides={},
        edit=edit,
        dataset=dataset,
        result=result,
        config={},
        versions={},
        started="2025-01-01T00:00:00+0000",
        seconds=0.0,
    )


def synthetic_rows() -> list[SweepRow]:
    rng = random.Random(0)
    rows = []
    for k in (-1.0, 0.0, 0.5):
        for p in (0.1, 0.5, 0.9):
            exact = p**3 * (1 + abs(k)) * 0.3 + rng.uniform(-0.005, 0.005)
            rows.append(
                sweep_row(
                    {"name": "dare", "p": p, "k": k, "rescale": True, "seed": 0},
                    "GSM8K",
                    exact * 0.9,
                    exact,
                    0.8 - exact,
                )
            )
    for p in (0.1, 0.5, 0.9):
        rows.append(
            sweep_row({"name": "dare", "p": p, "k": 0.0, "rescale": False, "seed": 0}, "GSM8K", p, 1.2 * p, 0.5)
        )
    for bits in (1, 2, 3, 4):
        rows.append(
            sweep_row(
                {"name": "bitdelta", "bits": bits, "scale": 1.0, "magnitudes": "mean", "seed": 0},
                "GSM8K",
                0.2 / bits,
                0.25 / bits,
                0.8 - 0.1 / bits,
            )
        )
    rows.append(sweep_row({"name": "lowrank", "rank": 4, "fraction": None}, "GSM8K", 0.3, 0.4, 0.6))
    rows.append(sweep_row({"name": "magnitude_prune", "p": 0.9}, "GSM8K", 0.25, 0.3, 0.65))
    for data in ("UltraFeedback", "Digits/train"):
        for alpha in (-0.5, -0.2, 0.2, 0.5, 1.0):
            term = (alpha - 0.3) ** 2 - 0.09
            rows.append(sweep_row({"name": "extrapolate", "alpha": alpha}, data, term, term * 1.1, None))
    for scale in (0.5, 1.5):  # Fig. 5: the statistic scaled, and sampled
        rows.append(
            sweep_row(
                {"name": "bitdelta", "bits": 1, "scale": scale, "magnitudes": "mean", "seed": 0, "blocks": None},
                "GSM8K",
                0.3 * abs(scale - 1) + 0.2,
                0.3 * abs(scale - 1) + 0.25,
                0.6,
            )
        )
    for seed in (0, 1):
        rows.append(
            sweep_row(
                {"name": "bitdelta", "bits": 1, "scale": 1.0, "magnitudes": "normal", "seed": seed, "blocks": None},
                "GSM8K",
                0.21 + 0.01 * seed,
                0.26 + 0.01 * seed,
                0.7,
            )
        )
    for k in (0.5, 1.5):  # Table 1
        rows.append(sweep_row({"name": "sign_biased", "p": 0.9, "k": k}, "GSM8K", 0.1 * k, 0.12 * k, 0.7))
        rows.append(sweep_row({"name": "gradient_biased", "p": 0.9, "k": k}, "GSM8K", 2 * k, 2.5 * k, 0.1))
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


@pytest.mark.slow
def test_every_figure_from_a_results_file(results_file, tmp_path):
    written = run(["plot", "--results", f"[{results_file}]", "--output_dir", str(tmp_path / "figures")])
    assert sorted(Path(path).stem for path in written) == sorted(plots.FIGURES)
    for path in written:
        _check_image(Path(path))


@pytest.mark.slow
def test_figures_without_their_rows_are_skipped(tmp_path):
    only_dare = [row for row in synthetic_rows() if row.edit["name"] == "dare"]
    written = plots.plot_all(only_dare, tmp_path)
    assert set(written) == {"dare_p_k", "per_module", "loss_curve"}
    for function in plots.FIGURES.values():
        assert function([], tmp_path / "none.png") is None


def test_alpha_trough_and_gap_values():
    rows = [row for row in synthetic_rows() if row.dataset == "UltraFeedback"]
    trough = min(rows, key=lambda row: row.result.term)
    assert trough.edit["alpha"] == 0.2
    gaps = [plots.performance_gap(row) for row in rows]
    assert all(math.isclose(gap, -row.result.exact) for gap, row in zip(gaps, rows))


def test_labels():
    dare, drop, bits = synthetic_rows()[4], synthetic_rows()[9], synthetic_rows()[12]
    assert edit_label(dare) == "dare p=0.5 k=0"
    assert edit_label(drop) == "drop_only p=0.1"
    assert edit_label(bits) == "bitdelta bits=1"


@pytest.mark.slow
def test_edits_are_named_by_their_classes(tmp_path, figures):
    for cls in EDITS.values():
        assert cls.label and cls.reference.startswith(("paper", cls.label)), cls
    plots.plot_all(synthetic_rows(), tmp_path)
    assert (
        figures["expo_alpha"].axes[0].get_title()
        == f"{Extrapolate.label}: Riemann term and ΔL against α"
        == "EXPO: Riemann term and ΔL against α"
    )
    assert figures["bitdelta_bits"].axes[0].get_title() == "BitDelta with more magnitude blocks"


def test_plot_without_rows_says_what_to_do(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="No rows"):
        run(["plot", "--results", f"[{tmp_path / 'empty.jsonl'}]"])


# ------------------------------------------------------------------------------- rows of several sweeps
def _configured_row(
    p: float, term: float, num_points: int, model: str, devices: int, dataset: str = "Digits/test"
) -> SweepRow:
    """A DARE row with the config a sweep records (C in the result and in the config)."""
    row = sweep_row(
        {"name": "dare", "p": p, "k": 0.0, "rescale": True, "seed": 0},
        dataset,
        term,
        1.1 * term,
        0.7,
        num_points=num_points,
    )
    row.key = f"{p}-{num_points}-{model}"
    row.config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": devices, "precision": "32-true"},
        "model": {"model": model, "pretrained": "runs/base/pre", "loss": "causal_lm"},
        "data": {
            "class_path": "lightning_delta.demo.digits.DigitsDataModule",
            "init_args": {"split": dataset.rsplit("/", 1)[-1], "limit": 24},
        },
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
    """Every labelled line of ``axis``, error-bar lines included (their label is the container's)."""
    series = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in axis.get_lines()
        if not line.get_label().startswith("_")
    }
    for container in axis.containers:
        if isinstance(container, ErrorbarContainer):
            line = container.lines[0]
            series[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()))
    return series


def _error_bars(axis) -> dict[str, list[float]]:
    """For each error-bar line, the half-length of its bars (the std drawn), in x order."""
    bars = {}
    for container in axis.containers:
        if isinstance(container, ErrorbarContainer) and container.lines[2]:
            segments = sorted(container.lines[2][0].get_segments(), key=lambda segment: segment[0][0])
            bars[container.get_label()] = [float(segment[1][1] - segment[0][1]) / 2 for segment in segments]
    return bars


P = (0.9, 0.1, 0.5)  # written out of order: each line must still run left to right


@pytest.mark.slow
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


@pytest.mark.slow
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
    lines = {label.split(" (trough")[0]: line for label, line in _series(axis).items()}
    assert sorted(lines) == [
        "term, Digits/test, model=a/post",
        "term, Digits/test, model=b/post",
        "ΔL, Digits/test, model=a/post",
        "ΔL, Digits/test, model=b/post",
    ]
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


# ------------------------------------------------------------------------------------- seeds, labels, units
def _seeded_dare_rows() -> tuple[list[SweepRow], dict[tuple[float, float], list[float]]]:
    values = {
        (0.5, 0.0): [0.01, 0.03, 0.02],
        (0.9, 0.0): [0.1, 0.16, 0.13],
        (0.5, -1.0): [0.05, 0.02, 0.08],
        (0.9, -1.0): [0.4, 0.3, 0.35],
    }
    rows = [
        sweep_row(
            {"name": "dare", "p": p, "k": k, "rescale": True, "seed": seed}, "Digits/test", 0.9 * value, value, 0.7
        )
        for (p, k), seeds in values.items()
        for seed, value in enumerate(seeds)
    ]
    return rows, values


def test_dare_lines_are_seed_means_with_std_bars(tmp_path, figures):
    rows, values = _seeded_dare_rows()
    rows.append(
        sweep_row({"name": "dare", "p": 0.9, "k": 1.5, "rescale": True, "seed": 0}, "Digits/test", 0.1, 0.1, 0.7)
    )  # a k at one p only (Table 1's): left out where other k span p
    plots.plot_dare(rows, tmp_path / "dare.png")
    term_axis, exact_axis = figures["dare"].axes
    lines, bars = _series(exact_axis), _error_bars(exact_axis)
    assert sorted(lines) == ["k=-1", "k=0"]
    for k in (0.0, -1.0):
        label = f"k={k:g}"
        assert lines[label][0] == [0.5, 0.9]
        assert lines[label][1] == pytest.approx([np.mean(values[(p, k)]) for p in (0.5, 0.9)])
        assert bars[label] == pytest.approx([np.std(values[(p, k)], ddof=1) for p in (0.5, 0.9)])
        assert _series(term_axis)[label][1] == pytest.approx([0.9 * np.mean(values[(p, k)]) for p in (0.5, 0.9)])
    assert term_axis.get_ylabel() == "Riemann term (left rule, C = 5)"  # C named
    assert exact_axis.get_ylabel().startswith("exact ΔL")


@pytest.mark.slow
def test_every_figure_labels_its_axes_and_has_a_legend(tmp_path, figures):
    plots.plot_all(synthetic_rows(), tmp_path)
    assert set(figures) == set(plots.FIGURES)
    for name, figure in figures.items():
        for axis in figure.axes:
            assert axis.get_xlabel() and axis.get_ylabel(), (name, axis.get_title())
            assert axis.get_legend() is not None and axis.get_legend().get_texts(), name
            assert not axis.texts, name  # no free-floating annotations to overprint


def test_alpha_troughs_are_named_in_the_legend(tmp_path, figures):
    plots.plot_alpha(synthetic_rows(), tmp_path / "alpha.png")
    labels = [text.get_text() for text in figures["alpha"].axes[0].get_legend().get_texts()]
    for data in ("Digits/train", "UltraFeedback"):
        rows = [row for row in synthetic_rows() if row.dataset == data]
        trough = min(rows, key=lambda row: row.result.term)
        assert f"term, {data} (trough at α={trough.edit['alpha']:g}: {trough.result.term:+.3f})" in labels


def test_expo_gap_is_in_accuracy_points(tmp_path, figures):
    rows = []
    for alpha, accuracy in ((-0.5, 0.78), (-0.2, 0.81), (0.2, 0.83), (0.5, 0.79)):
        row = sweep_row({"name": "extrapolate", "alpha": alpha}, "Digits/test", 0.0, 0.0, accuracy)
        rows.append(row)  # accuracy_post is 0.8
    plots.plot_expo_gap(rows, tmp_path / "gap.png")
    axis = figures["gap"].axes[0]
    heights = [patch.get_height() for patch in axis.patches]
    assert heights == pytest.approx([100 * (0.81 - 0.8), 100 * (0.83 - 0.8)])  # points, not a fraction
    assert "points" in axis.get_ylabel()


def test_bits_axis_shows_the_blocks_and_both_bit_counts(tmp_path, figures):
    rows = [
        sweep_row(
            {"name": "bitdelta", "bits": 1, "blocks": blocks, "scale": 1.0, "magnitudes": "mean", "seed": 0},
            "GSM8K",
            0.1 / blocks,
            0.1 / blocks,
            0.7 + 0.01 * blocks,
        )
        for blocks in (1, 2, 16)
    ]
    plots.plot_bits(rows, tmp_path / "bits.png")
    axis = figures["bits"].axes[0]
    (line,) = [line for line in axis.get_lines() if line.get_label().startswith("BitDelta")]
    assert list(line.get_xdata()) == [1, 2, 16]
    assert list(line.get_ydata()) == pytest.approx([71.0, 72.0, 86.0])  # accuracy in %
    assert [tick.get_text() for tick in axis.get_xticklabels()] == ["1\n0 | 1", "2\n1 | 2", "16\n4 | 5"]
    assert edit_label(rows[2]) == "bitdelta blocks=16"


def test_delta_scale_figure_reads_s_from_the_pretrained_model(tmp_path, figures):
    rows = []
    for pretrained, s in (("pre", 1.0), ("pre-half", 0.5), ("pre-quarter", 0.25)):
        for seed, noise in enumerate((0.9, 1.1)):
            row = sweep_row(
                {"name": "dare", "p": 0.99, "k": 0.0, "rescale": True, "seed": seed},
                "Digits/test",
                0.0,
                0.2 * s * s * noise,
                0.7,
            )
            row.config = {"model": {"pretrained": pretrained}}
            rows.append(row)
        revert = sweep_row({"name": "extrapolate", "alpha": -1.0}, "Digits/test", 0.0, 0.5 * s, 0.5)
        revert.config = {"model": {"pretrained": pretrained}}
        rows.append(revert)
    scales = {"pre": 1.0, "pre-half": 0.5, "pre-quarter": 0.25}
    plots.plot_delta_scale(rows, scales, tmp_path / "scale.png")
    axis = figures["scale"].axes[0]
    lines = _series(axis)
    assert lines["dare p=0.99 k=0"][0] == [0.25, 0.5, 1.0]
    assert lines["dare p=0.99 k=0"][1] == pytest.approx([0.2 * s * s for s in (0.25, 0.5, 1.0)])
    assert lines["revert to W_pre (α = −1)"][1] == pytest.approx([0.5 * s for s in (0.25, 0.5, 1.0)])
    for power in (1, 2):  # the guides through DARE's s = 1 point have slopes 1 and 2
        xs, ys = lines[f"∝ s^{power}"]
        assert math.log(ys[1] / ys[0]) / math.log(xs[1] / xs[0]) == pytest.approx(power)
    assert axis.get_xscale() == "log" and axis.get_yscale() == "log" and "delta scale s" in axis.get_xlabel()


def test_loss_curve_of_a_gauss_row_draws_its_own_points(tmp_path, figures):
    """A row of rule="gauss" shows L and the integrand at its nodes (t = 0, the nodes, t = 1), no left rectangles."""
    nodes = [0.0, 0.1127016653792583, 0.5, 0.8872983346207417, 1.0]
    losses = [1.0 + 0.2 * t**2 for t in nodes]
    inner = [math.nan, 0.0450806661517033, 0.2, 0.3549193338482967, math.nan]
    result = RiemannResult(
        num_points=3,
        count=1.0,
        losses=losses,
        inner_products=inner,
        term=0.2,
        trapezoid=None,
        exact=0.2,
        loss_post=1.0,
        loss_edit=1.2,
        rule="gauss",
        points=nodes,
        weights=[0.0, 5 / 18, 8 / 18, 5 / 18, 0.0],
        passes=3,
    )
    row = SweepRow(
        key="gauss",
        index=0,
        overrides={},
        edit={"name": "dare", "p": 0.9, "seed": 0},
        dataset="GSM8K",
        result=result,
        config={},
        versions={},
        started="2025-01-01T00:00:00+0000",
        seconds=0.0,
    )
    plots.plot_loss_curve([row], tmp_path / "curve.png")
    left, right = figures["curve"].axes
    assert _series(left)["L(t) measured"] == (nodes, losses)
    assert not right.patches  # no rectangles
    measured = _series(right)["⟨∇L(t), E⟩"]
    assert measured == (nodes[1:4], inner[1:4])
    assert any("gauss rule, 3 nodes" in text.get_text() for text in right.get_legend().get_texts())
