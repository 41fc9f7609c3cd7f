"""A sweep that reuses work between its points against one that does not: ``python -m benchmarks.sweep_reuse``.

Each grid runs with ``sweep.reuse`` true (the default: W_post loaded once, the accuracy at W_post measured once per
data set, :class:`lightning_delta.sweep.reuse.SweepReuse`) and false (every point loads the model and runs the evaluator
at t = 0 itself, as before), each run in a fresh process, the two alternating in order between rounds:

``demo``
    The demo's sweep as ``make demo`` runs it: the grid of ``configs/demo.yaml`` with its delta-scale block (142
    points), C = 5, the first 100 test images, one thread, on the cached demo pair (trained by ``make demo`` if
    missing).
``1b``
    10 points (DARE p = 0.9 under seeds 0-4, BitDelta, MagnitudePrune, Extrapolate α = ±0.5, DELLA p = 0.9,
    ε = 0.1) on the 1B Llama of :mod:`benchmarks.riemann` (TinyLlama-1.1B's shape, random weights written in
    float32, W_pre = W_post − ΔW with ΔW normal of std 0.002), in float32 with E in float32 (``--one-b-dtype``;
    ``bfloat16`` loads it in bf16 with E in bf16, 4.4 GB, but bf16 matrix products on this CPU made a point take more
    than 7 minutes of CPU time), C = 5, on 2 digit images of the demo's data (19 tokens each, one batch) with the
    demo's evaluator, two threads. The pair is written once under ``--cache`` (8.8 GB).

Every run's rows are compared field by field, all but ``started`` and ``seconds``, and must be equal: the script
fails otherwise. Printed: a Markdown table of the wall time of each sweep (the whole ``sweep`` call, set-up
included) and the ratios, round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULT_MARKER, ROOT, emit

ONE_B_GRID: list[dict[str, Any]] = [
    {"edit": "lightning_delta.edits.DARE", "edit.init_args.p": 0.9, "edit.init_args.seed": [0, 1, 2, 3, 4]},
    {"edit": "lightning_delta.edits.BitDelta"},
    {"edit": "lightning_delta.edits.MagnitudePrune", "edit.init_args.p": 0.9},
    {"edit": "lightning_delta.edits.Extrapolate", "edit.init_args.alpha": [-0.5, 0.5]},
    {"edit": "lightning_delta.edits.DELLA", "edit.init_args.p": 0.9, "edit.init_args.epsilon": 0.1},
]


# ------------------------------------------------------------------------------------------------ the grids
def demo_sweep_config(output: Path) -> dict[str, Any]:
    """The config ``lightning-delta demo`` sweeps, with its defaults (configs/demo.yaml)."""
    from lightning_delta.demo import demo_config, scale_blocks, scaled_pretrained, shipped_pair, sweep_config

    shipped = demo_config()
    built = shipped_pair()
    scaled = [str(scaled_pretrained(built, float(s))) for s in shipped["delta_scales"] if float(s) != 1.0]
    grid = list(shipped["grid"]) + scale_blocks(shipped["scale_grid"], scaled)
    return sweep_config(built, output, grid, shipped["num_points"], shipped["eval_limit"])


def one_b_pair(cache: Path) -> tuple[Path, Path]:
    """The 1B pair (post, pre) under ``cache``, written once: W_post random, W_pre = W_post − ΔW."""
    import torch

    from benchmarks.riemann import build_model

    post_dir, pre_dir = cache / "post", cache / "pre"
    if (post_dir / "config.json").is_file() and (pre_dir / "config.json").is_file():
        return post_dir, pre_dir
    model = build_model("1b", torch.float32, seed=0)
    model.save_pretrained(post_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sub_(torch.randn(parameter.shape, generator=generator).mul_(0.002))
    model.save_pretrained(pre_dir)
    return post_dir, pre_dir


def one_b_sweep_config(output: Path, cache: Path, dtype: str = "float32") -> dict[str, Any]:
    post_dir, pre_dir = one_b_pair(cache)
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "default_root_dir": str(output)},
        "model": {
            "model": str(post_dir),
            "pretrained": str(pre_dir),
            "loss": "causal_lm",
            "dtype": dtype,
            "E_dtype": "model",
            "evaluator": "lightning_delta.demo.digits.answer_accuracy",
        },
        "data": {
            "class_path": "lightning_delta.demo.digits.DigitsDataModule",
            "init_args": {"split": "test", "limit": 2, "batch_size": 2},
        },
        "edit": {"class_path": "lightning_delta.edits.DARE", "init_args": {"p": 0.9}},
        "riemann": {"num_points": 5, "trapezoid": False},
        "sweep": {"results": str(output / "results.jsonl"), "grid": ONE_B_GRID, "figures": None},
    }


GRIDS = {"demo": (demo_sweep_config, 1), "1b": (one_b_sweep_config, 2)}  # grid: (config, torch threads)


# ------------------------------------------------------------------------------------------------ one run
def sweep_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One sweep of ``spec["grid"]`` with ``sweep.reuse`` = ``spec["reuse"]`` into a fresh results file."""
    import torch

    from lightning_delta.sweep.run import sweep

    torch.set_num_threads(spec["threads"])
    output = Path(spec["output"])  # the same for every run: it is part of the rows' config
    (output / "results.jsonl").unlink(missing_ok=True)
    config_of, _ = GRIDS[spec["grid"]]
    config = config_of(output) if spec["grid"] == "demo" else config_of(output, Path(spec["cache"]), spec["dtype"])
    config["sweep"]["reuse"] = spec["reuse"]
    config["sweep"]["max_points"] = spec.get("max_points")
    started = time.perf_counter()
    rows = sweep(config, progress=False)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "point_seconds": [row.seconds for row in rows],
        "rows": [
            {key: value for key, value in row.to_dict().items() if key not in ("started", "seconds")} for row in rows
        ],
    }


def paired_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The grid's points in one process, each run twice in a row, once reusing (one :class:`SweepReuse` across the
    points, as a sweep holds it) and once from scratch, alternating which goes first: both see the same machine
    load, so the ratio of their sums is steadier on a busy machine than that of two whole sweeps."""
    import torch

    from lightning_delta.sweep.reuse import SweepReuse
    from lightning_delta.sweep.run import run_point, sweep_points

    torch.set_num_threads(spec["threads"])
    output = Path(spec["output"])
    config_of, _ = GRIDS[spec["grid"]]
    config = config_of(output) if spec["grid"] == "demo" else config_of(output, Path(spec["cache"]), spec["dtype"])
    points, _, cli = sweep_points(config)
    points = points[: spec.get("max_points") or len(points)]
    reuse = SweepReuse()
    seconds: dict[str, list[float]] = {"reuse": [], "alone": []}
    for number, point in enumerate(points):
        rows = {}
        for way in ("reuse", "alone") if number % 2 == 0 else ("alone", "reuse"):
            started = time.perf_counter()
            rows[way] = run_point(cli, point, reuse=reuse if way == "reuse" else None)
            seconds[way].append(time.perf_counter() - started)
        reused, alone = (  # JSON: floats by their exact repr, NaN (the t = 1 product without trapezoid) included
            json.dumps(
                {key: value for key, value in row.to_dict().items() if key not in ("started", "seconds")},
                sort_keys=True,
            )
            for row in (rows["reuse"], rows["alone"])
        )
        if reused != alone:
            raise AssertionError(f"Point {number} ({point.overrides}): the reusing row differs from the one alone.")
    return {"point_seconds": seconds, "points": len(points)}


def run(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """:func:`sweep_worker` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "benchmarks.sweep_reuse", "--worker", json.dumps(spec)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise RuntimeError(
        f"The {spec['grid']} sweep (reuse {spec.get('reuse', 'paired')}) failed with exit code "
        f"{completed.returncode}:\n{completed.stderr[-3000:]}"
    )


def bench(
    grid: str, rounds: int, cache: Path, timeout: float, max_points: int | None = None, dtype: str = "float32"
) -> dict[str, Any]:
    """``rounds`` rounds of the grid with and without reuse, alternating which runs first; rows checked equal."""
    threads = GRIDS[grid][1]
    output = cache / f"{grid}-sweep"
    if grid == "1b":
        one_b_pair(cache)  # written before anything is timed
    times: dict[bool, list[float]] = {True: [], False: []}
    point_seconds: dict[bool, list[float]] = {True: [], False: []}
    reference = None
    for number in range(rounds):
        for reuse in (False, True) if number % 2 == 0 else (True, False):
            print(f"{grid}: round {number + 1}/{rounds}, reuse {reuse} ...", file=sys.stderr, flush=True)
            spec = {
                "grid": grid,
                "reuse": reuse,
                "threads": threads,
                "cache": str(cache),
                "output": str(output),
                "max_points": max_points,
                "dtype": dtype,
            }
            result = run(spec, timeout)
            points = ", ".join(f"{seconds:.1f}" for seconds in result["point_seconds"])
            print(
                f"{grid}: round {number + 1}, reuse {reuse}: {result['seconds']:.1f} s; points {points}",
                file=sys.stderr,
                flush=True,
            )
            point_seconds[reuse].extend(result["point_seconds"][1:])  # the first point of a run loads everything
            if reference is None:
                reference = result["rows"]
            elif result["rows"] != reference:
                raise AssertionError(
                    f"The {grid} rows with reuse {reuse} (round {number + 1}) differ from the first "
                    "run's: a reusing sweep must write the rows of one that does not."
                )
            times[reuse].append(result["seconds"])
    return {
        "grid": grid,
        "points": len(reference),
        "threads": threads,
        "seconds": times,
        "ratios": [on / off for on, off in zip(times[True], times[False])],
        "later_point_s": {reuse: statistics.median(values) for reuse, values in point_seconds.items() if values},
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| grid | points | round | reuse false (s) | reuse true (s) | true ÷ false |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for number, (off, on) in enumerate(zip(result["seconds"][False], result["seconds"][True]), start=1):
            lines.append(
                f"| {result['grid']} | {result['points']} | {number} | {off:.1f} | {on:.1f} | {on / off:.3f} |"
            )
        later = result["later_point_s"]
        lines.append(f"| {result['grid']} | | median | | | **{statistics.median(result['ratios']):.3f}** |")
        if later.get(True) and later.get(False):
            lines.append(
                f"| {result['grid']}, a point after the first (median) | | | {later[False]:.2f} | "
                f"{later[True]:.2f} | {later[True] / later[False]:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep_reuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", default="demo,1b", help="comma-separated subset of demo, 1b")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per grid (each runs both ways)")
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "lightning-delta-1b-pair"),
        help="where the 1B pair is written once",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per sweep")
    parser.add_argument(
        "--max-points",
        type=int,
        default=None,
        help="run only the first N points of each grid (sweep.max_points; a machine too busy for the whole grid)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="one process per grid, each point run reusing and alone in turn (steadier on a busy machine)",
    )
    parser.add_argument(
        "--one-b-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="the dtype of the 1b grid's model and E",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        emit(paired_worker(spec) if spec.get("paired") else sweep_worker(spec))
        return
    if args.paired:
        lines = [
            "| grid | points | point reusing (s, sum) | point alone (s, sum) | reusing ÷ alone | after the first "
            "point |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for grid in [name.strip() for name in args.grids.split(",") if name.strip()]:
            cache = Path(args.cache)
            if grid == "1b":
                one_b_pair(cache)
            spec = {
                "grid": grid,
                "paired": True,
                "threads": GRIDS[grid][1],
                "cache": str(cache),
                "output": str(cache / f"{grid}-paired"),
                "max_points": args.max_points,
                "dtype": args.one_b_dtype,
            }
            result = run(spec, args.timeout)
            reusing, alone = result["point_seconds"]["reuse"], result["point_seconds"]["alone"]
            print(
                f"{grid}: reusing {', '.join(f'{s:.1f}' for s in reusing)}; alone "
                f"{', '.join(f'{s:.1f}' for s in alone)}",
                file=sys.stderr,
                flush=True,
            )
            lines.append(
                f"| {grid} | {result['points']} | {sum(reusing):.1f} | {sum(alone):.1f} | "
                f"{sum(reusing) / sum(alone):.3f} | {sum(reusing[1:]) / max(sum(alone[1:]), 1e-9):.3f} |"
            )
        print("\n".join(lines))
        print("Rows: equal point by point, in every field but started and seconds.")
        return
    results = []
    for grid in [name.strip() for name in args.grids.split(",") if name.strip()]:
        if grid not in GRIDS:
            parser.error(f"unknown grid {grid!r}; the grids are {', '.join(GRIDS)}")
        results.append(bench(grid, args.rounds, Path(args.cache), args.timeout, args.max_points, args.one_b_dtype))
    print(markdown(results))
    print("Rows: equal in every field but started and seconds, in every run of each grid.")


if __name__ == "__main__":
    main()
