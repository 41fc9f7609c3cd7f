"""``lightning-delta demo``: the whole path from a real pre/post pair to the paper's findings, offline, on a CPU.

1. :func:`~lightning_delta.demo.pair.build_pair`: a tiny Llama pre-trained on scikit-learn's bundled 8×8 digits
   (next-pixel prediction and a short first pass at the answers), then post-trained on the answers alone; cached,
   so a second run reuses it.
2. A sweep through the same code as ``lightning-delta sweep`` (:func:`lightning_delta.runner.sweep`:
   ``trainer.validate`` + ``RiemannCallback``, C = 5) over the grid of ``configs/demo.yaml``: DARE, drop only, the
   DARE k extension, BitDelta 1–4 bits, magnitude pruning, low rank and EXPO.
3. A table (edit, parameters, term, trapezoid, exact ΔL, accuracy), the paper's qualitative findings checked on it,
   the JSONL results file and the figures in ``output_dir``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers.utils import logging as transformers_logging

from lightning_delta.demo.pair import DemoPair, PairSettings, build_pair, default_cache_dir
from lightning_delta.plots import edit_family, edit_parameters, plot_all
from lightning_delta.runner import sweep
from lightning_delta.sweep import SweepRow

__all__ = ["DEMO_CONFIG", "FAST_GRID", "PairSettings", "build_pair", "demo", "demo_grid", "default_cache_dir",
           "findings", "table"]

_EDITS = "lightning_delta.edits."

# The demo's config, beside the paper configs in the repository's configs/: its grid is the demo's sweep, its other
# keys are the defaults of demo() (`lightning-delta demo --config configs/demo.yaml` gives the same run).
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"

# A few points of every family, for tests.
FAST_GRID: list[dict[str, Any]] = [
    {"edit": _EDITS + "DARE", "edit.init_args.p": [0.1, 0.9]},
    {"edit": _EDITS + "DARE", "edit.init_args.p": [0.9], "edit.init_args.rescale": False},
    {"edit": _EDITS + "BitDelta", "edit.init_args.bits": [1, 3]},
    {"edit": _EDITS + "MagnitudePrune", "edit.init_args.p": [0.9]},
    {"edit": _EDITS + "LowRank", "edit.init_args.rank": [1]},
    {"edit": _EDITS + "Extrapolate", "edit.init_args.alpha": [-0.5, 0.5]},
]


def demo_grid(path: Path = DEMO_CONFIG) -> list[dict[str, Any]]:
    """The sweep grid of ``configs/demo.yaml``: one block per family, a Cartesian product inside each block (see
    :mod:`lightning_delta.sweep`).

    Raises:
        FileNotFoundError: ``path`` is not there (lightning_delta installed from a wheel, not from its repository).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"The demo reads its grid from {path}, which is not there: configs/demo.yaml ships with the repository, "
            "not the package. Install lightning_delta from a clone (`pip install -e .`, as `make demo` does), or give "
            "the demo a grid (--grid, or --config with a copy of configs/demo.yaml)."
        )
    return yaml.safe_load(path.read_text())["grid"]


def sweep_config(pair: DemoPair, output_dir: Path, grid: list[dict[str, Any]], num_points: int,
                 eval_limit: int | None) -> dict[str, Any]:
    """The ``lightning-delta sweep`` config the demo runs (also written to ``output_dir/sweep.yaml``)."""
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "default_root_dir": str(output_dir)},
        "model": {
            "model": str(pair.post_dir),
            "pretrained": str(pair.pre_dir),
            "loss": "causal_lm",
            "evaluator": "lightning_delta.demo.digits.answer_accuracy",
        },
        "data": {"class_path": "lightning_delta.demo.digits.DigitsDataModule",
                 "init_args": {"split": "test", "limit": eval_limit, "batch_size": 100}},
        "edit": {"class_path": _EDITS + "DARE", "init_args": {"p": 0.5}},
        "riemann": {"num_points": num_points, "trapezoid": True},
        "sweep": {"results": str(output_dir / "results.jsonl"), "grid": grid, "figures": None},
    }


def table(rows: list[SweepRow]) -> str:
    """The rows as a Markdown table: edit, parameters, data, term, trapezoid, exact ΔL, accuracy."""

    def number(value: float | None, digits: int = 4) -> str:
        return "—" if value is None else f"{value:+.{digits}f}"

    header = "| edit | params | data | term | trapezoid | exact ΔL | accuracy |"
    lines = [header, "|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        result = row.result
        accuracy = "—" if result.accuracy_edit is None else f"{100 * result.accuracy_edit:.1f}%"
        lines.append(
            f"| {edit_family(row)} | {edit_parameters(row)} | {row.dataset} | {number(result.term)} | "
            f"{number(result.trapezoid)} | {number(result.exact)} | {accuracy} |"
        )
    return "\n".join(lines)


def _select(rows: list[SweepRow], family: str, data: str = "Digits/test", **params: Any) -> list[SweepRow]:
    return [row for row in rows if edit_family(row) == family and row.dataset == data
            and all(row.edit.get(key) == value for key, value in params.items())]


def findings(rows: list[SweepRow]) -> list[str]:
    """The paper's qualitative claims, checked on the rows: one line each, saying whether it holds here."""

    def exact(row: SweepRow) -> float:
        return row.result.exact

    def term(row: SweepRow) -> float:
        return row.result.term

    lines = []
    dare = sorted(_select(rows, "dare", k=0.0, rescale=True), key=lambda row: row.edit["p"])
    if len(dare) >= 2:
        small, large = dare[0], dare[-1]
        loss_post = small.result.loss_post
        holds = abs(exact(small)) < 0.05 * loss_post
        lines.append(
            f"DARE at p={small.edit['p']:g} barely changes the loss (|ΔL| below 5% of L_post): ΔL = "
            f"{exact(small):+.4f}, {100 * abs(exact(small)) / loss_post:.1f}% of L_post = {loss_post:.4f}: "
            f"{'holds' if holds else 'DEPARTS'}."
        )
        rising = exact(large) > exact(small)
        lines.append(
            f"DARE's loss rises at large p (ΔL {exact(small):+.4f} at p={small.edit['p']:g} → "
            f"{exact(large):+.4f} at p={large.edit['p']:g}): {'holds' if rising else 'DEPARTS'}."
        )
    pairs = []
    for drop in _select(rows, "drop_only"):
        match = [row for row in dare if row.edit["p"] == drop.edit["p"]]
        if match:
            pairs.append((drop.edit["p"], exact(match[0]), exact(drop)))
    if pairs:
        verdicts = [f"p={p:g}: {rescaled:+.4f} vs {drop:+.4f} {'holds' if drop > rescaled else 'DEPARTS'}"
                    for p, rescaled, drop in sorted(pairs)]
        lines.append(f"Drop only is worse than DARE (ΔL DARE vs drop only): {'; '.join(verdicts)}.")
    bits = sorted(_select(rows, "bitdelta"), key=lambda row: row.edit["bits"])
    if len(bits) >= 2:
        changes = [abs(exact(row)) for row in bits]
        closer = all(later <= earlier for earlier, later in zip(changes, changes[1:]))
        detail = ", ".join(f"{row.edit['bits']} bits: {exact(row):+.4f}" for row in bits)
        lines.append(f"More BitDelta bits come closer to W_post ({detail}): {'holds' if closer else 'DEPARTS'}.")
    if rows:
        same_sign = sum((term(row) > 0) == (exact(row) > 0) for row in rows)
        small = [row for row in rows if abs(exact(row)) < 0.1 * row.result.loss_post]
        line = f"The term has the sign of ΔL in {same_sign} of {len(rows)} rows"
        if small:
            gaps = sorted(abs(term(row) - exact(row)) / max(abs(exact(row)), 1e-12) for row in small)
            line += (f"; for the {len(small)} edits with |ΔL| < 10% of L_post the left term (C points) is off by "
                     f"{100 * gaps[len(gaps) // 2]:.0f}% of ΔL at the median, {100 * gaps[-1]:.0f}% at worst")
        trapezoid = [abs(row.result.trapezoid - exact(row)) / max(abs(exact(row)), 1e-12) for row in rows
                     if row.result.trapezoid is not None]
        if trapezoid:
            line += f"; the trapezoid rule is off by {100 * max(trapezoid):.1f}% at worst"
        lines.append(line + ".")
    for data in sorted({row.dataset for row in rows if row.edit.get("name") == "extrapolate"}):
        expo = sorted(_select(rows, "extrapolate", data=data), key=lambda row: row.edit["alpha"])
        if len(expo) >= 2:
            trough = min(expo, key=term)
            alpha = trough.edit["alpha"]
            where = f"α={alpha:g} (term {term(trough):+.4f}, ΔL {exact(trough):+.4f})"
            if term(trough) < 0:
                side = "extrapolation" if alpha > 0 else "interpolation"
                lines.append(f"EXPO on {data}: the term's trough is below zero at {where}: {side} lowers the loss.")
            else:
                lines.append(f"EXPO on {data}: no α tried lowers the loss; the trough is at {where}.")
    return lines


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep the demo's output to its own lines (no per-point Lightning banners or loading bars); restored after."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    bars = transformers_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        transformers_logging.disable_progress_bar()
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            if bars:
                transformers_logging.enable_progress_bar()


def demo(
    output_dir: str = "demo_output",
    cache_dir: str | None = None,
    num_points: int = 5,
    eval_limit: int | None = 200,
    grid: list[dict[str, Any]] | None = None,
    fast: bool = False,
    pair: PairSettings = PairSettings(),
    resume: bool = False,
    retrain: bool = False,
    threads: int | None = 1,
    figures: bool = True,
) -> list[SweepRow]:
    """Build (or load) a real pre/post pair on the bundled digits, sweep the edits, print the table and findings.

    Args:
        output_dir: where ``results.jsonl``, ``sweep.yaml``, ``table.md`` and the figures are written.
        cache_dir: where the trained pair is cached (default ``~/.cache/lightning_delta/demo``).
        num_points: C, the Riemann points (the paper's 5).
        eval_limit: test images used for the analysis (``None``: all 450).
        grid: the sweep grid (default: that of ``configs/demo.yaml``, :func:`demo_grid`).
        fast: a few points per family (:data:`FAST_GRID`), for a quick check.
        pair: how the pair is trained (part of the cache key).
        resume: keep the rows of an earlier run in ``output_dir`` and run only the missing points.
        retrain: train the pair even if it is cached.
        threads: torch CPU threads (``None``: torch's default); tiny models run best on one.
        figures: draw the figures.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with _quiet():
            return _run(output_dir, cache_dir, num_points, eval_limit, grid, fast, pair, resume, retrain, figures)
    finally:
        torch.set_num_threads(previous_threads)


def _run(output_dir: str, cache_dir: str | None, num_points: int, eval_limit: int | None,
         grid: list[dict[str, Any]] | None, fast: bool, pair: PairSettings, resume: bool, retrain: bool,
         figures: bool) -> list[SweepRow]:
    started = time.time()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    built = build_pair(cache_dir, pair, retrain=retrain)
    info = built.info
    print(
        f"{'Trained' if built.trained else 'Loaded cached'} pair in {time.time() - started:.1f} s "
        f"({info['parameters']} parameters, {built.pre_dir.parent}):\n"
        f"  W_pre : test loss {info['pre']['loss']:.4f}, accuracy {100 * info['pre']['accuracy']:.1f}%\n"
        f"  W_post: test loss {info['post']['loss']:.4f}, accuracy {100 * info['post']['accuracy']:.1f}%"
    )
    results = output / "results.jsonl"
    if not resume and results.exists():
        results.unlink()
    config = sweep_config(built, output, grid or (FAST_GRID if fast else demo_grid()), num_points, eval_limit)
    (output / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    sweep_started = time.time()
    rows = sweep(config)
    text = table(rows)
    checks = findings(rows)
    print(f"\nSweep of {len(rows)} points, C = {num_points}, in {time.time() - sweep_started:.1f} s "
          f"(W_post accuracy {100 * (rows[0].result.accuracy_post or 0):.1f}% on the analysed images):\n")
    print(text)
    print("\nThe paper's findings on this pair:")
    for line in checks:
        print(f"- {line}")
    (output / "table.md").write_text(text + "\n\n" + "\n".join(f"- {line}" for line in checks) + "\n")
    if figures:
        written = plot_all(rows, output / "figures")
        print(f"\nFigures: {', '.join(str(path) for path in written.values())}")
    print(f"Results: {results} ({time.time() - started:.1f} s in all)")
    return rows
