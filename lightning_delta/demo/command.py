"""``lightning-delta demo``: load (or train) the pairs, sweep each, and print and write the findings."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers.utils import logging as transformers_logging

from lightning_delta.demo.analysis import (
    COMPETITIVE,
    aggregate,
    edit_sizes,
    findings,
    findings_table,
    holds,
    over_pairs_table,
    quadrature_findings,
    quadrature_grid,
    regime_table,
    revert_cost,
    settings_table,
    table1,
)
from lightning_delta.demo.config import FAST_GRID, demo_config, scale_blocks, sweep_config
from lightning_delta.demo.first_order import gradient_and_deltas, gradient_terms, sweep_agreement
from lightning_delta.demo.pair import (
    SHIPPED_SEEDS,
    DemoPair,
    PairSettings,
    build_pair,
    scaled_pretrained,
    shipped_pair,
)
from lightning_delta.plots import plot_all, plot_delta_scale
from lightning_delta.sweep import SweepRow, expand_grid
from lightning_delta.sweep.run import sweep

__all__ = ["demo"]


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
    eval_limit: int | None = 100,
    gradient_seeds: int = 20,
    quadrature_reference: int = 16,
    grid: list[dict[str, Any]] | None = None,
    delta_scales: list[float] | None = None,
    scale_grid: list[dict[str, Any]] | None = None,
    fast: bool = False,
    pair_seeds: list[int] | None = None,
    train: bool = False,
    pair: PairSettings = PairSettings(),  # noqa: B008 (frozen, so the shared default cannot change; --help shows its fields' defaults)
    resume: bool = False,
    retrain: bool = False,
    threads: int | None = 1,
    figures: bool = True,
) -> list[SweepRow]:
    """Analyse the reference pairs (or pairs trained here), sweep the edits over seeds, print the findings and their
    verdicts over the pairs, and write figures. Returns the first pair's rows.

    Args:
        output_dir: where ``results.jsonl``, ``sweep.yaml``, ``findings.md`` and the figures are written (the first
            pair's; each other pair's files under ``pairs/seed-<s>/``).
        cache_dir: where trained pairs and derived models are cached (default ``~/.cache/lightning_delta/demo``).
        num_points: C, the Riemann points (the paper's 5).
        eval_limit: test images used for the analysis (``None``: all 450).
        gradient_seeds: masks per setting for Eq. 6 from one gradient (0: skip).
        quadrature_reference: the nodes of the Gauss reference of the quadrature row, beyond the paper (0: skip): on
            the first pair, every setting of ``grid`` at its first mask seed runs again under Gauss–Legendre with
            ``num_points`` nodes and under this reference, and the row compares Gauss with the sweep's left rule.
        grid: the sweep grid (default: that of ``configs/demo.yaml``, :func:`demo_grid`).
        delta_scales: the ``s`` of the delta-scale experiment, each in (0, 1) (default: ``configs/demo.yaml``'s;
            ``[]`` skips it).
        scale_grid: the blocks run at each ``s`` (default: ``configs/demo.yaml``'s).
        fast: a few points per family (:data:`FAST_GRID`), no delta-scale experiment, for a quick check.
        pair_seeds: the pairs, by seed: the first is printed in full, and with several the verdicts over all of them
            follow (default: the shipped reference pairs 0, 1, 2; with ``train``, ``pair.seed`` alone).
        train: train the pairs on this machine from ``pair``'s recipe instead of analysing the shipped ones (reported
            as "your pair": training differs between CPUs, so its numbers are this machine's).
        pair: how a pair is trained with ``train`` (part of the cache key; the shipped pairs used the defaults).
        resume: keep the rows of an earlier run in ``output_dir`` and run only the missing points.
        retrain: with ``train``, train the pairs even if they are cached.
        threads: torch CPU threads (``None``: torch's default); small models run best on one.
        figures: draw the figures.
    """
    if (
        isinstance(quadrature_reference, bool)
        or not isinstance(quadrature_reference, int)
        or (quadrature_reference != 0 and quadrature_reference <= num_points)
    ):
        raise ValueError(
            f"quadrature_reference must be 0 (no quadrature row) or a number of Gauss nodes above num_points = "
            f"{num_points}, to be the reference of Gauss with num_points nodes (the demo uses 16); got "
            f"{quadrature_reference!r}."
        )
    if retrain and not train:
        raise ValueError(
            "retrain=True trains the pairs again, which only applies with train=True (the shipped "
            "reference pairs are never trained here): add --train true."
        )
    seeds = list(pair_seeds) if pair_seeds is not None else ([pair.seed] if train else list(SHIPPED_SEEDS))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"pair_seeds must name at least one pair, each once; got {pair_seeds!r}.")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with _quiet():
            return _run(
                Path(output_dir),
                cache_dir,
                seeds,
                train,
                pair,
                retrain,
                num_points,
                eval_limit,
                gradient_seeds,
                quadrature_reference,
                grid,
                delta_scales,
                scale_grid,
                fast,
                resume,
                figures,
            )
    finally:
        torch.set_num_threads(previous_threads)


def _load_pair(seed: int, cache_dir: str | None, train: bool, settings: PairSettings, retrain: bool) -> DemoPair:
    if train:
        return build_pair(cache_dir, dataclasses.replace(settings, seed=seed), retrain=retrain)
    return shipped_pair(seed, cache_dir)


def _print_pair(built: DemoPair, seconds: float, regime_table_too: bool = True) -> None:
    info = built.info
    regime = info["regime"]
    if built.source == "shipped":
        head = f"Loaded {built.label}, shipped with the package,"
    else:
        head = f"Trained {built.label}" if built.trained else f"Loaded {built.label} from the cache"
    print(
        f"{head} in {seconds:.1f} s ({info['parameters']:,} parameters, {built.pre_dir.parent}):\n"
        f"  W_pre : test loss {info['pre']['loss']:.4f}, accuracy {100 * info['pre']['accuracy']:.1f}% (450 images)\n"
        f"  W_post: test loss {info['post']['loss']:.4f}, accuracy {100 * info['post']['accuracy']:.1f}%\n"
        f"  ‖ΔW‖/‖W_pre‖ = {100 * regime['all']['ratio']:.2f}% over all {regime['all']['parameters']:,} parameters"
    )
    if regime_table_too:
        print("\nThe regime per kind of module (summed over layers):\n")
        print(regime_table(regime))


def _run(
    output: Path,
    cache_dir: str | None,
    seeds: list[int],
    train: bool,
    settings: PairSettings,
    retrain: bool,
    num_points: int,
    eval_limit: int | None,
    gradient_seeds: int,
    quadrature_reference: int,
    grid: list[dict[str, Any]] | None,
    delta_scales: list[float] | None,
    scale_grid: list[dict[str, Any]] | None,
    fast: bool,
    resume: bool,
    figures: bool,
) -> list[SweepRow]:
    started = time.time()
    # what is not given comes from configs/demo.yaml (fast: FAST_GRID and no delta-scale experiment)
    shipped = {} if fast or None not in (grid, delta_scales, scale_grid) else demo_config()
    grid = grid if grid is not None else (FAST_GRID if fast else shipped["grid"])
    delta_scales = delta_scales if delta_scales is not None else shipped.get("delta_scales", [])
    scale_grid = scale_grid if scale_grid is not None else shipped.get("scale_grid", [])

    labels, all_findings, reference_rows = [], [], []
    for index, seed in enumerate(seeds):
        loaded = time.time()
        built = _load_pair(seed, cache_dir, train, settings, retrain)
        if index:
            print()
        _print_pair(built, time.time() - loaded, regime_table_too=index == 0)
        directory = output if index == 0 else output / "pairs" / f"seed-{seed}"
        rows, lines, text = _analyse(
            built,
            directory,
            grid,
            delta_scales,
            scale_grid,
            num_points,
            eval_limit,
            gradient_seeds,
            quadrature_reference if index == 0 else 0,
            resume,
            figures and index == 0,
        )
        if index == 0:
            print("\n" + text)
            reference_rows = rows
        else:
            held = [holds(line.verdict) for line in lines]
            print(
                f"Findings of {built.label}: {sum(h is True for h in held)} hold, "
                f"{sum(h is False for h in held)} depart ({directory / 'findings.md'})"
            )
        labels.append(f"pair {seed}")
        all_findings.append(lines)
    if len(seeds) > 1:
        table = over_pairs_table(labels, all_findings)
        text = (
            f"The findings over the {len(seeds)} pairs (each pair's verdict over its mask seeds; the first pair's "
            "numbers are above, each other's in its findings.md):\n\n" + table
        )
        print("\n" + text)
        (output / "over_pairs.md").write_text(text + "\n")
    print(f"\nResults: {output / 'results.jsonl'} ({time.time() - started:.1f} s in all)")
    return reference_rows


def _analyse(
    built: DemoPair,
    output: Path,
    grid: list[dict[str, Any]],
    delta_scales: list[float],
    scale_grid: list[dict[str, Any]],
    num_points: int,
    eval_limit: int | None,
    gradient_seeds: int,
    quadrature_reference: int,
    resume: bool,
    figures: bool,
) -> tuple[list[SweepRow], list[Any], str]:
    """One pair's sweep and findings, written to ``output``: its rows, findings and the text of its tables."""
    output.mkdir(parents=True, exist_ok=True)
    scales = {str(built.pre_dir): 1.0}
    for s in delta_scales:
        scales[str(scaled_pretrained(built, float(s)))] = float(s)
    full_grid = list(grid) + scale_blocks(scale_grid, [path for path, s in scales.items() if s != 1.0])

    results = output / "results.jsonl"
    if not resume and results.exists():
        results.unlink()
    config = sweep_config(built, output, full_grid, num_points, eval_limit)
    (output / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = output / "sweep.log"
    print(f"\nSweeping {len(expand_grid(full_grid))} points (the progress goes to {log}) ...", flush=True)
    sweep_started = time.time()
    with log.open("w") as stream, redirect_stdout(stream):
        rows = sweep(config)
    sweep_seconds = time.time() - sweep_started

    gradients, deltas = gradient_and_deltas(built, eval_limit)
    expectation = None
    if gradient_seeds > 0:
        expectation = gradient_terms(gradients, deltas, gradient_seeds)
        expectation["check"] = sweep_agreement(expectation, rows, scales)
    main = [row for row in rows if scales.get(str(row.config.get("model", {}).get("pretrained")), 1.0) == 1.0]
    sizes = edit_sizes(deltas, main, gradients)
    shapes = {name: tuple(delta.shape) for name, delta in deltas.items()}
    lines = findings(rows, expectation, scales, shapes, sizes)
    if quadrature_reference:
        gauss = _quadrature_sweep(built, output, grid, num_points, eval_limit, quadrature_reference, resume)
        lines += quadrature_findings([*main, *gauss])
    settings = aggregate(rows, scales)
    randomised = [setting for setting in settings if setting.randomised]
    seeds = sorted({seed for setting in randomised for seed in setting.seeds})
    tested = [row for row in main if row.dataset == "Digits/test"]
    post_accuracy = tested[0].result.accuracy_post if tested else None
    revert = revert_cost(settings)
    header = (
        f"Sweep of {len(rows)} points (C = {num_points}, the first {eval_limit or 450} test images, W_post accuracy "
        f"{100 * (post_accuracy or 0):.1f}% on them; randomised edits under mask seeds "
        f"{', '.join(map(str, seeds)) or 'none'}) in {sweep_seconds:.1f} s.\n"
        f"R = L(W_pre) − L(W_post) = {'—' if revert is None else f'{revert:.4f}'} on these images, the loss change of "
        f"reverting to W_pre; competitive: mean ΔL ≤ {100 * COMPETITIVE:.0f}% of R."
    )
    text = "\n\n".join(
        [
            header,
            f"The paper's findings on {built.label} (mean ± sample std over the mask seeds; det.: an edit without "
            "randomness):",
            findings_table(lines),
            f"Table 1 in the paper's layout (accuracy in % on the {eval_limit or 450} images, mean ± std over the seeds for "
            "the random column; ΔL beside):",
            table1(rows, scales=scales),
            "Every setting (s: the delta scale, W_pre = W_post − s·ΔW):",
            settings_table(settings),
        ]
    )
    (output / "findings.md").write_text(text + "\n")
    (output / "regime.json").write_text(json.dumps(built.info["regime"], indent=1))
    if figures:
        written = plot_all(main, output / "figures")
        path = plot_delta_scale(rows, scales, output / "figures" / "delta_scale.png")
        if path is not None:
            written["delta_scale"] = path
        text += f"\n\nFigures: {', '.join(str(path) for path in written.values())}"
    return rows, lines, text


def _quadrature_sweep(
    built: DemoPair,
    output: Path,
    grid: list[dict[str, Any]],
    num_points: int,
    eval_limit: int | None,
    reference: int,
    resume: bool,
) -> list[SweepRow]:
    """Every setting of ``grid`` at its first mask seed under Gauss–Legendre with ``num_points`` nodes and a
    ``reference``-node Gauss rule (``quadrature.jsonl``; the sweep's own rows give the left rule)."""
    results = output / "quadrature.jsonl"
    if not resume and results.exists():
        results.unlink()
    blocks = quadrature_grid(grid, num_points, reference, left=False)
    config = sweep_config(built, output, blocks, num_points, eval_limit)
    config["sweep"]["results"] = str(results)
    log = output / "sweep.log"
    print(
        f"Quadrature beyond the paper: {len(expand_grid(blocks))} points (Gauss with {num_points} nodes and a "
        f"{reference}-node reference at each setting's first mask seed) ...",
        flush=True,
    )
    started = time.time()
    with log.open("a") as stream, redirect_stdout(stream):
        rows = sweep(config)
    print(f"... {len(rows)} quadrature points in {time.time() - started:.1f} s", flush=True)
    return rows
