"""Figures like the paper's, drawn from the rows of a sweep's JSONL results file.

=============================  =================================================  ==============
function                       what it shows                                      paper
=============================  =================================================  ==============
:func:`plot_dare`              Riemann term and exact ΔL against p, one line per  Fig. 1 and 3
                               k, drop only (no rescale) as the reference
:func:`plot_modules`           the term per part of the model (attention, ...)    Fig. 3
:func:`plot_alpha`             the term and ΔL against α (EXPO), trough marked    Fig. 6
:func:`plot_bits`              accuracy (or loss) of BitDelta against its         Fig. 4
                               magnitude blocks M (the paper's bits, log2 M)
:func:`plot_bitdelta_extensions`  ΔL of BitDelta's statistic scaled by s, and of  Fig. 5
                               magnitudes sampled around the mean
:func:`plot_table1`            ΔL against k: random k extension, sign-biased,     Table 1
                               gradient-biased
:func:`plot_expo_gap`          best interpolation (α < 0) against extrapolation   Fig. 7
                               (α > 0), per data set
:func:`plot_loss_curve`        L(t) at t = c/C, the integrand ⟨∇L(W_post + tE),
                               E⟩ with the left Riemann rectangles and the
                               trapezoid
:func:`plot_delta_scale`       ΔL against the delta scale s (W_pre = W_post −     (the demo's)
                               s·ΔW), log-log, with slopes 1 and 2
=============================  =================================================  ==============

Each function takes rows (:class:`~lightning_delta.sweep.SweepRow`) and a path, and returns the path, or ``None``
when no row fits the figure. :func:`plot_all` draws every figure it can (all but :func:`plot_delta_scale`, which
needs to know each pre-trained model's s).

Rows that differ only in the edit's ``seed`` are one setting: a figure draws their mean, with the sample standard
deviation as an error bar. C, the number of Riemann points, is named on every axis that shows the term.

Rows may come from several sweeps. Rows that differ in anything besides what a figure lays out (its x axis, its
lines' edit arguments, its data set panels) are never drawn as one line: they are split by :func:`row_settings`
(C, the model, the pre-trained weights, the loss, the data and trainer settings, ...) and each line's label names
the settings that tell it apart (:func:`setting_labels`), e.g. ``k=0, C=5``.

Each figure is a :class:`matplotlib.figure.Figure` of its own, saved with ``savefig``: no pyplot state, no backend
chosen for the whole process. The edits are named by their classes' ``label`` (``BitDelta.label``), and rows by
:mod:`lightning_delta.rows` (``dare p=0.5 k=0``), which also gives the mean ± std over seeds.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lightning_delta.edits import BitDelta, Extrapolate
from lightning_delta.edits.bitdelta import magnitude_blocks
from lightning_delta.rows import edit_family, edit_label, format_number, randomised, stat
from lightning_delta.sweep import DATASET_KEYS, VOLATILE_KEYS, SweepRow, drop_key

__all__ = [
    "plot_all",
    "plot_alpha",
    "plot_bitdelta_extensions",
    "plot_bits",
    "plot_dare",
    "plot_delta_scale",
    "plot_expo_gap",
    "plot_loss_curve",
    "plot_modules",
    "plot_table1",
    "row_settings",
    "setting_labels",
]

GROUP_ORDER = ("attention", "mlp", "norms", "embeddings", "other")


# ------------------------------------------------------------------------------------------------ row helpers
# Config keys that are not settings of a row: the edit (its own field), C (from the result), and the data keys that the
# data set label already names (lightning_delta.sweep.dataset_label).
_NOT_SETTINGS = (
    "edit",
    "riemann.num_points",
    "data.class_path",
    *(f"data.init_args.{key}" for key in DATASET_KEYS),
)
_SETTING_NAMES = {
    "model.model": "model",
    "model.pretrained": "pretrained",
    "model.loss": "loss",
    "seed_everything": "seed",
}
_SETTING_ORDER = ("data", "C", "model", "pretrained", "loss")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _setting_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(value, default=str)
    return format_number(value)


def row_settings(row: SweepRow, shown_edit_keys: Iterable[str] | None = None) -> dict[str, str]:
    """Everything a row was measured under besides what a figure lays out, as ``{name: value}`` strings.

    ``data`` (the data set label), ``C`` (the Riemann points), every key of the row's config (dotted, without
    ``init_args``; ``model``, ``pretrained``, ``loss`` and ``seed`` for the module's main arguments) except the edit
    and the keys that only say where or how fast it ran (:data:`lightning_delta.sweep.VOLATILE_KEYS`), and, when
    ``shown_edit_keys`` is given, the edit's arguments not among them (as ``edit.<name>``).
    """
    settings = {"data": row.dataset, "C": _setting_value(row.result.num_points)}
    if shown_edit_keys is not None:
        shown = set(shown_edit_keys)
        for key, value in row.edit.items():
            if key not in shown:
                settings[f"edit.{key}"] = _setting_value(value)
    config = json.loads(json.dumps(row.config, default=str))
    for dotted in (*VOLATILE_KEYS, *_NOT_SETTINGS):
        drop_key(config, dotted)
    for key, value in _flatten(config):
        name = ".".join(part for part in key.split(".") if part != "init_args")
        settings[_SETTING_NAMES.get(name, name)] = _setting_value(value)
    return settings


def _short_values(values: Iterable[str]) -> dict[str, str]:
    """Paths cut to their last components, as few as keep them apart (``runs/a/post``, ``runs/b/post`` -> ``a/post``,
    ``b/post``); other values as they are."""
    values = sorted(set(values))
    if len(values) < 2 or not all("/" in value for value in values):
        return {value: value for value in values}
    parts = {value: value.rstrip("/").split("/") for value in values}
    for count in range(1, max(len(split) for split in parts.values()) + 1):
        short = {value: "/".join(split[-count:]) for value, split in parts.items()}
        if len(set(short.values())) == len(values):
            return short
    return {value: value for value in values}


def setting_labels(rows: Sequence[SweepRow], shown_edit_keys: Iterable[str] | None = None) -> list[str]:
    """For each row, the :func:`row_settings` that differ between rows of the same data set, as ``C=5, model=a/post``
    (``""`` where the rows of each data set agree on all of them: the figures show the data set themselves).

    Two rows with equal labels have equal settings, so a figure may draw them on one line; a setting one row lacks
    (an argument of another edit, say) counts as different (``none``).
    """
    settings = [row_settings(row, shown_edit_keys) for row in rows]
    by_dataset: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row, setting in zip(rows, settings):
        by_dataset[row.dataset].append(setting)
    names = {name for setting in settings for name in setting}
    differing = [
        name
        for name in names
        if any(len({setting.get(name) for setting in group}) > 1 for group in by_dataset.values())
    ]
    differing.sort(
        key=lambda name: (_SETTING_ORDER.index(name) if name in _SETTING_ORDER else len(_SETTING_ORDER), name)
    )
    short = {name: _short_values(setting[name] for setting in settings if name in setting) for name in differing}
    return [
        ", ".join(f"{name}={short[name][setting[name]] if name in setting else 'none'}" for name in differing)
        for setting in settings
    ]


def _joined(*parts: str) -> str:
    return ", ".join(part for part in parts if part)


def _rows(rows: Iterable[SweepRow], *families: str) -> list[SweepRow]:
    return [row for row in rows if edit_family(row) in families]


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def _points(values: Mapping[float, list[float]]) -> tuple[list[float], list[float], list[float]]:
    """``x``, mean and std of each x's values (the seeds of one setting), x ascending."""
    xs = sorted(values)
    stats = [stat(values[x]) for x in xs]
    return xs, [item.mean for item in stats], [item.std for item in stats]


def _seed_note(row: SweepRow) -> str:
    """``, seed 3`` for a row of a randomised edit (:func:`lightning_delta.rows.randomised`), else ``""``."""
    return f", seed {row.edit['seed']}" if randomised(row) and "seed" in row.edit else ""


def _num_points_label(rows: Sequence[SweepRow]) -> str:
    """``C = 5`` when every row has the same C (else ``C`` per line, in the labels)."""
    counts = {row.result.num_points for row in rows}
    return f"C = {counts.pop()}" if len(counts) == 1 else "C per line"


# -------------------------------------------------------------------------------------------------- figures
def plot_dare(rows: Sequence[SweepRow], path: str | os.PathLike) -> Path | None:
    """Fig. 1/3: the Riemann term (left) and the exact ΔL (right) against the drop rate p, one line per k; drop only
    (no rescale) dashed. Seeds of one setting: mean ± std. One row of panels per data set. Where some k has two or
    more p, a k measured at one p only (Table 1's) is left out."""
    rows = _rows(rows, "dare", "drop_only")
    if not rows:
        return None
    settings = setting_labels(rows, shown_edit_keys=("name", "p", "k", "rescale", "seed"))
    datasets = sorted({row.dataset for row in rows})
    figure = Figure(figsize=(10, 3.8 * len(datasets)))
    axes = figure.subplots(len(datasets), 2, squeeze=False)
    for panels, name in zip(axes, datasets):
        lines: dict[tuple[str, str], dict[str, dict[float, list[float]]]] = defaultdict(
            lambda: {"term": defaultdict(list), "exact": defaultdict(list)}
        )
        for row, setting in zip(rows, settings):
            if row.dataset != name:
                continue
            kind = "drop only" if edit_family(row) == "drop_only" else f"k={format_number(row.edit.get('k', 0.0))}"
            lines[(kind, setting)]["term"][float(row.edit["p"])].append(row.result.term)
            lines[(kind, setting)]["exact"][float(row.edit["p"])].append(row.result.exact)
        if any(len(line["term"]) > 1 for line in lines.values()):  # lines over p; lone points belong to Table 1
            lines = {key: line for key, line in lines.items() if len(line["term"]) > 1}
        drop_only_lines = sum(kind == "drop only" for kind, _ in lines)
        for kind, setting in sorted(lines, key=lambda line: (line[0] == "drop only", line)):
            style = {}
            if kind == "drop only":
                style = dict(linestyle="--", color="0.4") if drop_only_lines == 1 else dict(linestyle="--")
            for axis, column in zip(panels, ("term", "exact")):
                xs, means, stds = _points(lines[(kind, setting)][column])
                axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=_joined(kind, setting), **style)
        count = _num_points_label([row for row in rows if row.dataset == name])
        labels = (f"Riemann term (left rule, {count})", "exact ΔL = L(W_post + E) − L(W_post)")
        for axis, label in zip(panels, labels):
            axis.axhline(0.0, color="black", linewidth=0.6)
            axis.set_xlabel("drop rate p")
            axis.set_ylabel(label)
            axis.set_title(
                f"{label.split(' = ')[0].split(' (')[0]} against p, {name} (mean ± std over seeds)", fontsize=9
            )
            axis.legend(fontsize=7)
    return _save(figure, path)


def _strongest_per_family(rows: Sequence[SweepRow]) -> list[SweepRow]:
    best: dict[str, SweepRow] = {}
    for row in rows:
        family = edit_family(row)
        if family == "extrapolate" or not row.result.term_per_group:
            continue
        if family == "dare" and row.edit.get("k", 0.0) != 0.0:  # DARE itself beside drop only, as in Fig. 3
            continue
        if family not in best or abs(row.result.term) > abs(best[family].result.term):
            best[family] = row
    return list(best.values())


def plot_modules(
    rows: Sequence[SweepRow], path: str | os.PathLike, selected: Sequence[SweepRow] | None = None
) -> Path | None:
    """Fig. 3: the term per kind of tensor (attention, mlp, norms, embeddings, other), a bar per edit.

    ``selected``: the rows to show; by default, per edit family, the row with the largest ``|term|`` (DARE with
    k = 0 only, so that DARE stands beside drop only).
    """
    selected = list(selected) if selected is not None else _strongest_per_family(rows)
    if not selected:
        return None
    groups = [group for group in GROUP_ORDER if any(group in row.result.term_per_group for row in selected)]
    figure = Figure(figsize=(max(7.0, 1.6 * len(groups) + 3), 4.2))
    axis = figure.subplots()
    width = 0.8 / len(selected)
    for number, (row, setting) in enumerate(zip(selected, setting_labels(selected))):
        values = [row.result.term_per_group.get(group, 0.0) for group in groups]
        positions = [index + (number - (len(selected) - 1) / 2) * width for index in range(len(groups))]
        axis.bar(
            positions,
            values,
            width=width,
            label=f"{edit_label(row)}{_seed_note(row)} ({_joined(row.dataset, setting)})",
        )
    axis.axhline(0.0, color="black", linewidth=0.6)
    axis.set_xticks(range(len(groups)), groups)
    axis.set_xlabel("part of the model")
    axis.set_ylabel(f"Riemann term (left rule, {_num_points_label(selected)})")
    axis.set_title("Riemann term per part of the model (the strongest setting of each edit)")
    axis.legend(fontsize=7)
    return _save(figure, path)


def plot_alpha(rows: Sequence[SweepRow], path: str | os.PathLike) -> Path | None:
    """Fig. 6: the term (solid) and exact ΔL (dotted) against α for EXPO, per data set; each term's trough is circled
    and named in the legend."""
    rows = _rows(rows, "extrapolate")
    if not rows:
        return None
    figure = Figure(figsize=(7, 4.4))
    axis = figure.subplots()
    by_dataset: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for row, setting in zip(rows, setting_labels(rows, shown_edit_keys=("name", "alpha"))):
        point = (float(row.edit["alpha"]), row.result.term, row.result.exact)
        by_dataset[_joined(row.dataset, setting)].append(point)
    for name in sorted(by_dataset):
        points = sorted(by_dataset[name])
        alphas = [point[0] for point in points]
        trough = min(points, key=lambda point: point[1])
        (line,) = axis.plot(
            alphas,
            [point[1] for point in points],
            marker="o",
            label=f"term, {name} (trough at α={trough[0]:g}: {trough[1]:+.3f})",
        )
        axis.plot(alphas, [point[2] for point in points], linestyle=":", color=line.get_color(), label=f"ΔL, {name}")
        axis.scatter([trough[0]], [trough[1]], s=140, facecolors="none", edgecolors=line.get_color(), linewidths=2)
    axis.axhline(0.0, color="black", linewidth=0.6)
    axis.set_xlabel("α (F(ΔW) = (1 + α)·ΔW; α = −1 is W_pre)")
    axis.set_ylabel(f"loss change (term: left rule, {_num_points_label(rows)}; ΔL: exact)")
    axis.set_title(f"{Extrapolate.label}: Riemann term and ΔL against α")
    axis.legend(fontsize=7)
    return _save(figure, path)


def plot_bits(rows: Sequence[SweepRow], path: str | os.PathLike) -> Path | None:
    """Fig. 4: the edited model's accuracy against BitDelta's magnitude blocks M (the loss where no accuracy was
    measured); the axis shows M, the paper's bits log2 M and the bits with the sign; the post-trained model dashed."""
    rows = [
        row
        for row in _rows(rows, "bitdelta")
        if row.edit.get("magnitudes", "mean") == "mean" and row.edit.get("scale", 1.0) == 1.0
    ]
    if not rows:
        return None
    use_accuracy = all(row.result.accuracy_edit is not None for row in rows)
    figure = Figure(figsize=(6.5, 4.2))
    axis = figure.subplots()
    by_dataset: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    shown = ("name", "bits", "blocks", "scale", "magnitudes", "seed")
    for row, setting in zip(rows, setting_labels(rows, shown_edit_keys=shown)):
        result = row.result
        if use_accuracy:
            assert result.accuracy_edit is not None and result.accuracy_post is not None  # measured at t = 0 and 1
            edited, post = 100 * result.accuracy_edit, 100 * result.accuracy_post
        else:
            edited, post = result.loss_edit, result.loss_post
        by_dataset[_joined(row.dataset, setting)].append((magnitude_blocks(row.edit), edited, post))
    for name in sorted(by_dataset):
        points = sorted(by_dataset[name])
        (line,) = axis.plot(
            [p[0] for p in points], [p[1] for p in points], marker="o", label=f"{BitDelta.label}, {name}"
        )
        axis.axhline(points[0][2], linestyle="--", color=line.get_color(), label=f"post-trained (W_post), {name}")
    blocks = sorted({p[0] for points in by_dataset.values() for p in points})
    axis.set_xscale("log", base=2)
    axis.set_xticks(blocks, [f"{m}\n{math.log2(m):g} | {1 + math.log2(m):g}" for m in blocks])
    axis.set_xlabel("magnitude blocks M  (paper's bits log2 M | bits with the sign)")
    axis.set_ylabel("accuracy of the edited model (%)" if use_accuracy else "loss of the edited model")
    axis.set_title(f"{BitDelta.label} with more magnitude blocks")
    axis.legend(fontsize=7)
    return _save(figure, path)


def plot_bitdelta_extensions(rows: Sequence[SweepRow], path: str | os.PathLike) -> Path | None:
    """Fig. 5: ΔL of one-block BitDelta with its statistic scaled by s ("degenerate", s = 1 is BitDelta), and of
    magnitudes sampled around the mean (normal, uniform; mean ± std over seeds) drawn at s = 1."""
    rows = [row for row in _rows(rows, "bitdelta") if magnitude_blocks(row.edit) == 1]
    scaled = [row for row in rows if row.edit.get("magnitudes", "mean") == "mean"]
    if len({row.edit.get("scale", 1.0) for row in scaled}) < 2:
        return None
    figure = Figure(figsize=(6.5, 4.2))
    axis = figure.subplots()
    datasets = sorted({row.dataset for row in rows})
    for name in datasets:
        line_rows = sorted((row for row in scaled if row.dataset == name), key=lambda row: row.edit.get("scale", 1.0))
        (line,) = axis.plot(
            [row.edit.get("scale", 1.0) for row in line_rows],
            [row.result.exact for row in line_rows],
            marker="o",
            label=f"statistic × s (degenerate), {name}",
        )
        for number, mode in enumerate(("normal", "uniform")):
            values = [row.result.exact for row in rows if row.dataset == name and row.edit.get("magnitudes") == mode]
            if values:
                spread = stat(values)
                axis.errorbar(
                    [1.0 + (number - 0.5) * 0.03],
                    [spread.mean],
                    yerr=[spread.std],
                    marker="sx"[number],
                    capsize=3,
                    linestyle="none",
                    color=line.get_color(),
                    label=f"{mode} magnitudes around the mean (n={len(values)}), {name}",
                )
    axis.axhline(0.0, color="black", linewidth=0.6)
    axis.axvline(1.0, color="0.6", linewidth=0.6, linestyle=":")
    axis.set_xlabel("s, the multiplier of BitDelta's mean magnitude (1 is BitDelta)")
    axis.set_ylabel("exact ΔL = L(W_post + E) − L(W_post)")
    axis.set_title(f"{BitDelta.label}'s statistic: scaled and sampled")
    axis.legend(fontsize=7)
    return _save(figure, path)


def plot_table1(rows: Sequence[SweepRow], path: str | os.PathLike) -> Path | None:
    """Table 1 as a figure: ΔL against k for the random k extension (mean ± std over seeds), the sign-biased and the
    gradient-biased rescale, at the p of the biased rows; reverting to W_pre (EXPO's α = −1) as a dashed line."""
    biased = _rows(rows, "sign_biased", "gradient_biased")
    if not biased:
        return None
    p = biased[0].edit["p"]
    dataset = biased[0].dataset
    ks = sorted({row.edit["k"] for row in biased})
    figure = Figure(figsize=(6.5, 4.4))
    axis = figure.subplots()
    columns = (
        ("random (DARE k extension)", "dare"),
        ("sign-biased (ΔW)", "sign_biased"),
        ("gradient-biased (ΔW·∇L)", "gradient_biased"),
    )
    for label, family in columns:
        values: dict[float, list[float]] = defaultdict(list)
        for row in _rows(rows, family):
            if row.dataset == dataset and row.edit.get("p") == p and row.edit.get("k") in ks:
                values[row.edit["k"]].append(row.result.exact)
        if values:
            xs, means, stds = _points(values)
            axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    revert = [
        row.result.exact
        for row in _rows(rows, "extrapolate")
        if row.dataset == dataset and row.edit.get("alpha") == -1.0
    ]
    if revert:
        axis.axhline(revert[0], color="0.3", linestyle="--", label="revert to W_pre (α = −1)")
    axis.axhline(0.0, color="black", linewidth=0.6)
    axis.set_yscale("symlog", linthresh=0.01)
    axis.set_xticks(ks)
    axis.set_xlabel("k (entries picked by the mask or the sign × k, the others × (1 − kp)/(1 − p))")
    axis.set_ylabel("exact ΔL (symmetric log scale)")
    axis.set_title(f"Table 1 at p = {p:g}, {dataset}")
    axis.legend(fontsize=7)
    return _save(figure, path)


def performance_gap(row: SweepRow) -> float:
    """The edited model against the post-trained one: accuracy difference (a fraction), else ``−ΔL`` (higher is
    better)."""
    accuracy_edit, accuracy_post = row.result.accuracy_edit, row.result.accuracy_post
    if accuracy_edit is not None and accuracy_post is not None:
        return accuracy_edit - accuracy_post
    return -row.result.exact


def plot_expo_gap(rows: Sequence[SweepRow], path: str | os.PathLike) -> Path | None:
    """Fig. 7: per data set, the best gap to the post-trained model over α < 0 (interpolation) and over α > 0
    (extrapolation): accuracy in percentage points, or the loss decrease −ΔL where no accuracy was measured."""
    rows = _rows(rows, "extrapolate")
    uses_accuracy = all(row.result.accuracy_edit is not None and row.result.accuracy_post is not None for row in rows)
    best: dict[str, dict[str, float]] = defaultdict(dict)
    for row, setting in zip(rows, setting_labels(rows, shown_edit_keys=("name", "alpha"))):
        alpha = float(row.edit["alpha"])
        gap = 100 * performance_gap(row) if uses_accuracy else -row.result.exact
        if alpha == 0.0:
            continue
        side = "interpolation (α < 0)" if alpha < 0 else "extrapolation (α > 0)"
        name = "\n".join(part for part in (row.dataset, setting) if part)
        best[name][side] = max(gap, best[name].get(side, -math.inf))
    if not best:
        return None
    names = sorted(best)
    sides = ("interpolation (α < 0)", "extrapolation (α > 0)")
    figure = Figure(figsize=(max(5.5, 1.8 * len(names) + 2), 4.2))
    axis = figure.subplots()
    for number, side in enumerate(sides):
        values = [best[name].get(side, math.nan) for name in names]
        axis.bar([index + (number - 0.5) * 0.38 for index in range(len(names))], values, width=0.38, label=side)
    axis.axhline(0.0, color="black", linewidth=0.6)
    axis.set_xticks(range(len(names)), names)
    axis.set_xlabel("data set")
    axis.set_ylabel("best accuracy gap, edited − W_post (points)" if uses_accuracy else "best loss decrease −ΔL")
    axis.set_title("Interpolation against extrapolation: the best α of each side")
    axis.legend(fontsize=7)
    return _save(figure, path)


def plot_loss_curve(
    rows: Sequence[SweepRow], path: str | os.PathLike, selected: Sequence[SweepRow] | None = None
) -> Path | None:
    """L(t) measured at t = c/C beside the left-rule prediction ``L(0) + (1/C) Σ_{j<c} g_j`` (left panel), and the
    integrand ``g(t) = ⟨∇L(W_post + tE), E⟩`` with the left Riemann rectangles, whose area is the term (right panel).
    A row of another rule (``result.rule``) shows L and g at its own points, without the left rule's prediction.

    ``selected``: rows to draw (one line of panels each); by default up to three rows with the largest ``|ΔL|``.
    """
    usable = [row for row in rows if row.result.losses]
    if selected is None:
        selected = sorted(usable, key=lambda row: -abs(row.result.exact))[:3]
    selected = list(selected)
    if not selected:
        return None
    figure = Figure(figsize=(10, 3.6 * len(selected)))
    axes = figure.subplots(len(selected), 2, squeeze=False)
    for (left, right), row, setting in zip(axes, selected, setting_labels(selected)):
        result = row.result
        num_points = result.num_points
        losses, inner = result.losses, result.inner_products
        ts = result.points
        paper = result.rule == "left"
        left.plot(ts, losses, marker="o", label="L(t) measured")
        if paper:
            predicted = [losses[0]]
            for c in range(num_points):
                predicted.append(predicted[-1] + inner[c] / num_points)
            left.plot(ts, predicted, marker="s", linestyle="--", label=f"L(0) + left Riemann sum (C = {num_points})")
        left.set_xlabel("t  (W_post + t·E)")
        left.set_ylabel("loss L(t)")
        left.set_title(f"{edit_label(row)}{_seed_note(row)} ({_joined(row.dataset, setting)})", fontsize=9)
        left.legend(fontsize=7)
        if paper:
            right.bar(
                ts[:-1],
                inner[:num_points],
                width=1 / num_points,
                align="edge",
                alpha=0.35,
                edgecolor="black",
                label=f"left rectangles (C = {num_points}): term = {result.term:.4g}",
            )
        else:
            right.plot([], [], " ", label=f"{result.rule} rule, {result.passes} nodes: term = {result.term:.4g}")
        finite = [(t, g) for t, g in zip(ts, inner) if g is not None and not math.isnan(g)]
        right.plot([t for t, _ in finite], [g for _, g in finite], marker="o", color="C3", label="⟨∇L(t), E⟩")
        trapezoid = result.trapezoid
        right.axhline(0.0, color="black", linewidth=0.6)
        right.set_xlabel("t")
        right.set_ylabel("integrand ⟨∇L(W_post + t·E), E⟩")
        right.set_title(
            f"exact ΔL = {result.exact:.4g}" + (f", trapezoid = {trapezoid:.4g}" if trapezoid is not None else ""),
            fontsize=9,
        )
        right.legend(fontsize=7)
    return _save(figure, path)


def plot_delta_scale(rows: Sequence[SweepRow], scales: Mapping[str, float], path: str | os.PathLike) -> Path | None:
    """ΔL against the delta scale s, log-log: each edit that ran at two or more s (rows whose pre-trained model is a
    key of ``scales``, its value the s of ``W_pre = W_post − s·ΔW``), mean ± std over seeds, with guides of slope 1
    and 2 through the first line's s = 1 point. Reverting (EXPO's α = −1) is ``R(s)``."""
    values: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        pretrained = str((row.config.get("model") or {}).get("pretrained"))
        if pretrained not in scales or row.result.exact <= 0:
            continue
        family = edit_family(row)
        label = (
            "revert to W_pre (α = −1)"
            if family == "extrapolate" and row.edit.get("alpha") == -1.0
            else f"{edit_label(row)}"
        )
        values[label][scales[pretrained]].append(row.result.exact)
    lines = {label: line for label, line in values.items() if len(line) >= 2}
    if not lines:
        return None
    figure = Figure(figsize=(6.5, 4.4))
    axis = figure.subplots()
    anchor = None
    for label in sorted(lines):
        xs, means, stds = _points(lines[label])
        axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
        if anchor is None and 1.0 in lines[label]:
            anchor = (1.0, means[xs.index(1.0)], min(xs))
    if anchor is not None:
        s_max, y, s_min = anchor
        for power, style in ((1, ":"), (2, "--")):
            axis.plot(
                [s_min, s_max], [y * (s_min / s_max) ** power, y], color="0.5", linestyle=style, label=f"∝ s^{power}"
            )
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("delta scale s  (W_pre = W_post − s·ΔW; s = 1 is the pair)")
    axis.set_ylabel("exact ΔL (log scale)")
    axis.set_title("Loss change against the size of the delta (mean ± std over seeds)")
    axis.legend(fontsize=7)
    return _save(figure, path)


FIGURES = {
    "dare_p_k": plot_dare,
    "per_module": plot_modules,
    "expo_alpha": plot_alpha,
    "bitdelta_bits": plot_bits,
    "bitdelta_extensions": plot_bitdelta_extensions,
    "table1": plot_table1,
    "interpolation_extrapolation": plot_expo_gap,
    "loss_curve": plot_loss_curve,
}


def plot_all(rows: Sequence[SweepRow], output_dir: str | os.PathLike, extension: str = "png") -> dict[str, Path]:
    """Every figure of :data:`FIGURES` that the rows allow, as ``<output_dir>/<name>.<extension>``."""
    rows = list(rows)
    written = {}
    for name, function in FIGURES.items():
        path = function(rows, Path(output_dir) / f"{name}.{extension}")
        if path is not None:
            written[name] = path
    return written
