"""The planning table of the README: ``python -m benchmarks.plan`` (minutes on 2 cores).

For each pair (the demo's digits Llama, built or read from its cache; a tiny random Llama pair, one per seed), each
family at its budget (BitDelta 2 bits from {1, 2, 3, 4}; DARE and TIES' trim density 0.2 from {0.05, 0.1, 0.2, 0.4};
low rank 4 from {1, 2, 4, 8}) and each seed 0–4:

* the plan is made on a planning subset of the digits' train split (``--plan-images`` images drawn by the seed,
  which is also DARE's mask seed and the tiny pair's seed), C = 3, the two most relevant settings swept;
* the planned and the uniform edit at the same budget are measured exactly on the whole test split (450 images):
  ``L(W_pre + F(ΔW)) − L(W_post)``;
* on the planning data, every candidate setting of every tensor is evaluated exactly, tensor edited alone
  (``K · V + 1`` forwards): the Spearman ρ of the first-order, second-order and sweep-refined scores against these,
  and the tensors' misordered pairs of settings before and after each refinement sweep;
* cost: the plan's passes over the data against the brute force's, and both wall times, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from lightning_delta.demo.digits import DigitsDataModule, DigitSequences, load_digit_splits
from lightning_delta.demo.pair import shipped_pair
from lightning_delta.module import DeltaEditModule
from lightning_delta.planning.family import FAMILIES
from lightning_delta.planning.measure import exact_candidate_changes
from lightning_delta.planning.plan import exact_change, run_planning
from tests.support.tiny_models import make_tiny_pair

BUDGETS = {"bitdelta": 2, "dare": 0.2, "magnitude_prune": 0.2, "lowrank": 4}
NUM_POINTS = 3


class DigitsSubset(pl.LightningDataModule):
    """``size`` images of the train split drawn without replacement by ``seed``: the planning data."""

    def __init__(self, size: int, seed: int, batch_size: int = 100) -> None:
        super().__init__()
        self.size, self.seed, self.batch_size = size, seed, batch_size

    def setup(self, stage: str | None = None) -> None:
        images, digits = load_digit_splits()["train"]
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))[: self.size].numpy()
        self.dataset = DigitSequences(images[order], digits[order])

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)


def misordered_pairs(scores: torch.Tensor, exact: torch.Tensor) -> int:
    """Pairs of settings of one tensor that ``scores`` order otherwise than ``exact`` (summed over tensors)."""
    count = 0
    for row_scores, row_exact in zip(scores, exact):
        for a in range(len(row_scores)):
            for b in range(a + 1, len(row_scores)):
                if (row_scores[a] - row_scores[b]) * (row_exact[a] - row_exact[b]) < 0:
                    count += 1
    return count


def one_run(post: str, pre: str, family: str, seed: int, plan_images: int, refine: int | None) -> dict[str, Any]:
    started = time.perf_counter()
    run = run_planning(
        post,
        pretrained=pre,
        datamodule=DigitsSubset(plan_images, seed),
        family_name=family,
        average=BUDGETS[family],
        seed=seed,
        num_points=NUM_POINTS,
        refine=refine,
    )
    plan_seconds = time.perf_counter() - started
    plan, scores, used, sweeps, model = run.plan, run.scores, run.used, run.sweeps, run.model
    spec = FAMILIES[family]
    evaluation = DigitsDataModule(split="test", batch_size=150)
    _, planned = exact_change(model, pretrained=pre, edit=plan.edit(), datamodule=evaluation)
    _, uniform = exact_change(model, pretrained=pre, edit=spec.edit(BUDGETS[family], seed), datamodule=evaluation)
    planning = DigitsSubset(plan_images, seed)
    planning.setup()
    target = DeltaEditModule(model, pretrained=pre, edit=spec.edit(scores.values[0], seed))
    started = time.perf_counter()
    exact, brute_passes = exact_candidate_changes(
        target,
        model,
        pretrained=pre,
        names=scores.names,
        edits=[spec.edit(value, seed) for value in scores.values],
        loaders=[planning.val_dataloader()],
    )
    brute_seconds = time.perf_counter() - started
    flat = exact.flatten().numpy()
    refined = scores.second.clone()
    misordered = [misordered_pairs(scores.first, exact), misordered_pairs(scores.second, exact)]
    for value in plan.refined:  # the sweeps in the order the plan ran them
        j = scores.values.index(value)
        refined[:, j] = used[:, j]
        misordered.append(misordered_pairs(refined, exact))
    return {
        "family": family,
        "seed": seed,
        "planned": planned,
        "uniform": uniform,
        "chosen": plan.chosen,
        "measured_on_planning_data": plan.measured,
        "cost": plan.cost,
        "budget": plan.budget,
        "settings": plan.settings,
        "rho_first": float(spearmanr(scores.first.flatten().numpy(), flat)[0]),
        "rho_second": float(spearmanr(scores.second.flatten().numpy(), flat)[0]),
        "rho_refined": float(spearmanr(used.flatten().numpy(), flat)[0]) if sweeps else None,
        "misordered": misordered,
        "mean_abs_first": float(scores.first.abs().mean()),
        "mean_curvature": float(scores.curvature.abs().mean()),
        "pairs": len(scores.names) * len(scores.values) * (len(scores.values) - 1) // 2,
        "plan_passes": plan.passes,
        "brute_forward_passes": brute_passes,
        "plan_seconds": plan_seconds,
        "brute_seconds": brute_seconds,
        "tensors": len(scores.names),
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.4f}"
    return f"{statistics.mean(values):+.4f} ± {statistics.stdev(values):.4f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| pair | family (budget) | uniform ΔL | planned ΔL | planned < uniform | ρ first | ρ second | "
        "ρ refined | misordered pairs: first, second, after sweeps 1… | plan passes (f+b / f) | "
        "brute force passes (f) | time plan / brute | mean ½ΣF̂E² / mean |⟨g, E⟩| |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in dict.fromkeys(row["pair"] for row in rows):
        for family in BUDGETS:
            group = [row for row in rows if row["pair"] == pair and row["family"] == family]
            if not group:
                continue
            wins = sum(row["planned"] < row["uniform"] for row in group)
            misordered = [
                statistics.mean(row["misordered"][i] for row in group)
                for i in range(min(len(row["misordered"]) for row in group))
            ]
            backward = sorted({row["plan_passes"]["forward_backward"] for row in group})
            forward = sorted({row["plan_passes"]["forward"] for row in group})
            lines.append(
                f"| {pair} | {family} ({BUDGETS[family]}) | {mean_std([r['uniform'] for r in group])} | "
                f"{mean_std([r['planned'] for r in group])} | {wins}/{len(group)} | "
                f"{statistics.mean(r['rho_first'] for r in group):.2f} | "
                f"{statistics.mean(r['rho_second'] for r in group):.2f} | "
                f"{statistics.mean(r['rho_refined'] for r in group if r['rho_refined'] is not None):.2f} | "
                f"{', '.join(f'{m:.1f}' for m in misordered)} of {group[0]['pairs']} | "
                f"{'–'.join(map(str, backward[:: max(1, len(backward) - 1)]))} / "
                f"{'–'.join(map(str, forward[:: max(1, len(forward) - 1)]))} | {group[0]['brute_forward_passes']} | "
                f"{statistics.median(r['plan_seconds'] / r['brute_seconds'] for r in group):.2f} | "
                f"{statistics.mean(r['mean_curvature'] / r['mean_abs_first'] for r in group):.1e} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--plan-images", type=int, default=400)
    parser.add_argument("--refine", type=int, default=2, help="settings swept per plan (C = 3 each)")
    parser.add_argument("--pairs", default="demo,tiny-llama")
    parser.add_argument("--families", default=",".join(BUDGETS))
    parser.add_argument("--json", default=None, help="write every run's figures to this file")
    parser.add_argument("--table", nargs="+", default=None, help="only print the table of these --json files")
    args = parser.parse_args()
    if args.table:
        print(table([row for path in args.table for row in json.loads(Path(path).read_text())]))
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for pair_name in args.pairs.split(","):
            for seed in range(args.seeds):
                if pair_name == "demo":
                    pair = shipped_pair()
                    post, pre = str(pair.post_dir), str(pair.pre_dir)
                else:
                    pair = make_tiny_pair(Path(scratch) / f"seed{seed}", "llama", seed=seed, shard=None, scale=0.05)
                    post, pre = str(pair.post_dir), str(pair.pre_dir)
                for family in args.families.split(","):
                    row = {"pair": pair_name, **one_run(post, pre, family, seed, args.plan_images, args.refine)}
                    rows.append(row)
                    print(
                        json.dumps(
                            {
                                key: row[key]
                                for key in (
                                    "pair",
                                    "family",
                                    "seed",
                                    "uniform",
                                    "planned",
                                    "chosen",
                                    "rho_first",
                                    "rho_second",
                                    "misordered",
                                )
                            }
                        ),
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
