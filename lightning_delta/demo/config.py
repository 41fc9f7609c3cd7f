"""The demo's sweep: its grid (``configs/demo.yaml``, or :data:`FAST_GRID`) and the ``lightning-delta sweep`` config
it runs on a pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lightning_delta.demo.pair import DemoPair

__all__ = ["DEMO_CONFIG", "FAST_GRID", "demo_config", "demo_grid", "scale_blocks", "sweep_config"]

_EDITS = "lightning_delta.edits."

# The demo's config, shipped inside the package beside the paper configs (``configs/`` in a clone): its grid is the
# demo's sweep, its other keys are the defaults of demo() (`lightning-delta demo --config demo` gives the same run).
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

# A few points of every family, two seeds where there is randomness: for tests and a quick look.
FAST_GRID: list[dict[str, Any]] = [
    {"edit": _EDITS + "DARE", "edit.init_args.p": [0.5, 0.9], "edit.init_args.seed": [0, 1]},
    {
        "edit": _EDITS + "DARE",
        "edit.init_args.p": [0.9],
        "edit.init_args.rescale": False,
        "edit.init_args.seed": [0, 1],
    },
    {"edit": _EDITS + "BitDelta", "edit.init_args.blocks": [1, 4]},
    {"edit": _EDITS + "MagnitudePrune", "edit.init_args.p": [0.9]},
    {"edit": _EDITS + "LowRank", "edit.init_args.rank": [1]},
    {"edit": _EDITS + "Extrapolate", "edit.init_args.alpha": [-1.0, -0.5, 0.5, 1.0]},
]


def demo_config(path: Path = DEMO_CONFIG) -> dict[str, Any]:
    """``configs/demo.yaml`` (shipped in the package) as a dict."""
    return yaml.safe_load(path.read_text())


def demo_grid(path: Path = DEMO_CONFIG) -> list[dict[str, Any]]:
    """The sweep grid of ``configs/demo.yaml``: one block per family, a Cartesian product inside each block (see
    :mod:`lightning_delta.sweep`)."""
    return demo_config(path)["grid"]


def sweep_config(
    pair: DemoPair, output_dir: Path, grid: list[dict[str, Any]], num_points: int, eval_limit: int | None
) -> dict[str, Any]:
    """The ``lightning-delta sweep`` config the demo runs (also written to ``output_dir/sweep.yaml``)."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(output_dir),
        },
        "model": {
            "model": str(pair.post_dir),
            "pretrained": str(pair.pre_dir),
            "loss": "causal_lm",
            "evaluator": "lightning_delta.demo.digits.answer_accuracy",
        },
        "data": {
            "class_path": "lightning_delta.demo.digits.DigitsDataModule",
            "init_args": {"split": "test", "limit": eval_limit, "batch_size": 100},
        },
        "edit": {"class_path": _EDITS + "DARE", "init_args": {"p": 0.5}},
        "riemann": {"num_points": num_points, "trapezoid": False},
        "sweep": {"results": str(output_dir / "results.jsonl"), "grid": grid, "figures": None},
    }


def scale_blocks(scale_grid: list[dict[str, Any]] | None, directories: list[str]) -> list[dict[str, Any]]:
    """The delta-scale blocks: each block of ``scale_grid`` once more, swept over the scaled pre-trained models."""
    if not scale_grid or not directories:
        return []
    return [{**block, "model.pretrained": list(directories)} for block in scale_grid]
