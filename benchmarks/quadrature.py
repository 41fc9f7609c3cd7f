"""The path integral's error against the gradient passes, per quadrature rule: ``python -m benchmarks.quadrature``.

Cases (float64, deterministic): the tanh MLP 64-512-512-10 on scikit-learn's digits
(``tests.support.quadrature_support``, ‖ΔW‖/‖W_pre‖ about 8 %) under DARE p = 0.9 and 0.99, BitDelta and EXPO α = −1; the tiny Llama pair of
``tests.support.tiny_models`` (post = pre + 0.01·noise, DARE p = 0.9) on random tokens. The reference is a 16-node
Gauss–Legendre rule through the same callback (its gap to the exact ΔL is printed).

1. **Error against passes**: per rule, the total's relative error and the worst per-tensor error as a share of the
   largest per-tensor term of the reference, with the backward passes per batch in brackets.
2. **Time to a per-tensor error of 1e-3** on the digits MLP (each case): ``trainer.validate`` with Gauss n = 3, the
   adaptive rule (tolerance 1e-3) and the paper's left rule at the smallest C of 5, 10, 20, 40, 80 that reaches it,
   against the paper's left rule at C = 5 with the trapezoid, interleaved in one process, medians of ``--repeats``.
   The evaluation images are repeated ``--copies`` times so that the passes, not the Trainer's set-up, dominate.
   Beside it, the costs the ratio is made of, over the same data: F0 and F1, the forwards without gradients at t = 0
   and t = 1 (the exact ΔL's), and P, a forward and backward at a node; Gauss n = 3 does 3P + F0 + F1 where the
   baseline does 6P, so no implementation of it goes below (3P + F0 + F1) / 6P.
3. ``--llama``: the same ratio on the 44M Llama of ``benchmarks.riemann`` (float32, random weights, W_post = W_pre +
   0.002·noise, DARE p = 0.9) over 16 batches of one 32-token row, where every pass is bound by reading the weights.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader

from lightning_delta.callbacks import RiemannCallback, RiemannResult
from lightning_delta.edits import DARE
from lightning_delta.module import DeltaEditModule
from tests.support.quadrature_support import TABLE_EDITS, DigitsPair, digits_mlp_pair
from tests.support.riemann_support import token_dataset
from tests.support.tiny_models import make_post_trained, make_tiny_pair, reference_state_dict

RULES = [
    ("left", 5),
    ("left", 10),
    ("left", 20),
    ("trapezoid", 5),
    ("trapezoid", 10),
    ("gauss", 2),
    ("gauss", 3),
    ("gauss", 5),
    ("adaptive", None),
]
TRAINER = dict(
    accelerator="cpu",
    devices=1,
    inference_mode=False,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
)


def analyse(make_module: Callable[[], DeltaEditModule], loader: DataLoader, **options) -> tuple[RiemannResult, float]:
    """One analysis under ``trainer.validate`` and its wall time (the Trainer's set-up included)."""
    callback = RiemannCallback(filename=None, **options)
    module = make_module()
    start = time.perf_counter()
    pl.Trainer(callbacks=[callback], **TRAINER).validate(module, loader, verbose=False)
    return callback.result, time.perf_counter() - start


def errors(result: RiemannResult, reference: RiemannResult) -> tuple[float, float]:
    """(|term − reference| / |reference|, max_k |term_k − reference_k| / max_k |reference_k|)."""
    largest = max(abs(value) for value in reference.term_per_tensor.values())
    worst = max(abs(result.term_per_tensor[name] - value) for name, value in reference.term_per_tensor.items())
    return abs(result.term - reference.term) / abs(reference.term), worst / largest


def options(rule: str, num_points: int | None) -> dict:
    if rule == "left":
        return {"rule": "left", "num_points": num_points, "trapezoid": False}  # the paper's C passes
    return {"rule": rule, "num_points": num_points}


def label(rule: str, num_points: int | None) -> str:
    return {
        "left": f"left C = {num_points}",
        "trapezoid": f"trapezoid C = {num_points}",
        "gauss": f"Gauss n = {num_points}",
        "adaptive": "adaptive 1e-3",
    }[rule]


def pass_costs(
    make_module: Callable[[], DeltaEditModule], loader: DataLoader, repeats: int
) -> tuple[float, float, float]:
    """Medians of ``repeats`` reads of ``loader``: (F0, F1, P) in seconds, the forwards without gradients at t = 0 and
    t = 1 and the forwards and backwards at t = 0.5, run as the callback runs them (``riemann_loss`` under
    ``recompute_weights``, the inner products taken)."""
    module = make_module()
    edited = module.edited_model()

    def read(t: float, backward: bool) -> float:
        edited.set_t(t)
        start = time.perf_counter()
        for batch in loader:
            with torch.set_grad_enabled(backward), edited.recompute_weights():
                output = module.riemann_loss(module.riemann_prepare(batch))
                if backward:
                    output.total.backward()
            edited.pop_inner_products()
        return time.perf_counter() - start

    at_post = statistics.median(read(0.0, False) for _ in range(repeats))
    at_edit = statistics.median(read(1.0, False) for _ in range(repeats))
    passes = statistics.median(read(0.5, True) for _ in range(repeats))
    return at_post, at_edit, passes


def floor_cells(make_module: Callable[[], DeltaEditModule], loader: DataLoader, repeats: int) -> str:
    """The cells ``F0 / P | F1 / P | (3P + F0 + F1) / 6P`` of :func:`pass_costs`."""
    at_post, at_edit, passes = pass_costs(make_module, loader, repeats)
    return f"{at_post / passes:.3f} | {at_edit / passes:.3f} | {(3 * passes + at_post + at_edit) / (6 * passes):.3f}"


def interleaved(
    make_module: Callable[[], DeltaEditModule], loader: DataLoader, variants: dict[str, dict], repeats: int
) -> tuple[dict[str, list[float]], dict[str, RiemannResult]]:
    """Each variant's wall times over ``repeats`` rounds, the variants taking turns in each, and its last result."""
    times: dict[str, list[float]] = {key: [] for key in variants}
    results: dict[str, RiemannResult] = {}
    for _ in range(repeats):
        for key, chosen in variants.items():
            results[key], seconds = analyse(make_module, loader, **chosen)
            times[key].append(seconds)
    return times, results


def table(cases: dict[str, tuple[Callable[[], DeltaEditModule], DataLoader]]) -> None:
    print("| case | reference: term, |term − exact ΔL| | " + " | ".join(label(*rule) for rule in RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    for name, (make_module, loader) in cases.items():
        reference, _ = analyse(make_module, loader, rule="gauss", num_points=16)
        cells = []
        for rule in RULES:
            result, _ = analyse(make_module, loader, **options(*rule))
            total, per_tensor = errors(result, reference)
            cells.append(f"{total:.1e} / {per_tensor:.1e} [{result.passes}]")
        print(
            f"| {name} | {reference.term:+.4g}, {reference.completeness_gap:.1e} | " + " | ".join(cells) + " |",
            flush=True,
        )


def timing(pair: DigitsPair, copies: int, repeats: int) -> None:
    loader = DataLoader(ConcatDataset([pair.loader.dataset] * copies), batch_size=pair.loader.batch_size)
    print(
        f"\nTime to a per-tensor error <= 1e-3 ({len(loader.dataset)} images, medians of {repeats}, "
        "trainer.validate, interleaved):"
    )
    print(
        "| case | left C = 5 + trapezoid [6] | Gauss n = 3 | adaptive 1e-3 | left rule at the C reaching 1e-3 | "
        "Gauss / baseline | adaptive / baseline | F0 / P | F1 / P | (3P + F0 + F1) / 6P |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, make_edit in TABLE_EDITS.items():

        def make_module(make_edit: Callable[[], Any] = make_edit) -> DeltaEditModule:
            return DeltaEditModule(
                copy.deepcopy(pair.post), pretrained=pair.pre, edit=make_edit(), loss="classification"
            )

        reference, _ = analyse(make_module, loader, rule="gauss", num_points=16)
        reaching = None
        for C in (5, 10, 20, 40, 80):
            result, _ = analyse(make_module, loader, **options("left", C))
            if errors(result, reference)[1] <= 1e-3:
                reaching = C
                break
        variants = {
            "baseline": {"rule": "left", "num_points": 5, "trapezoid": True},
            "gauss": {"rule": "gauss", "num_points": 3},
            "adaptive": {"rule": "adaptive"},
        }
        if reaching is not None:
            variants["left"] = options("left", reaching)
        times, checks = interleaved(make_module, loader, variants, repeats)
        median = {key: statistics.median(values) for key, values in times.items()}
        gauss_error, adaptive_error = errors(checks["gauss"], reference)[1], errors(checks["adaptive"], reference)[1]
        left_cell = f"{median['left']:.2f} s (C = {reaching})" if reaching else "not reached by C = 80"
        print(
            f"| {name} | {median['baseline']:.2f} s | {median['gauss']:.2f} s (error {gauss_error:.1e}) | "
            f"{median['adaptive']:.2f} s ({checks['adaptive'].passes} passes, error {adaptive_error:.1e}) | "
            f"{left_cell} | {median['gauss'] / median['baseline']:.3f} | "
            f"{median['adaptive'] / median['baseline']:.3f} | {floor_cells(make_module, loader, repeats)} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=3, help="times the evaluation images are repeated (timing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-table", action="store_true", help="the timing alone")
    parser.add_argument("--skip-timing", action="store_true", help="the table of errors alone")
    parser.add_argument("--llama", action="store_true", help="also time the 44M Llama (about 5 minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pair = digits_mlp_pair()
    if not args.skip_table:
        error_table(pair)
    if not args.skip_timing:
        timing(pair, args.copies, args.repeats)
    if args.llama:
        timing_llama(args.repeats)


def timing_llama(repeats: int, batches: int = 16, tokens: int = 32) -> None:
    """Gauss n = 3 against the baseline on the 44M Llama, and the floor its passes set (no error: see the table)."""
    from benchmarks.riemann import build_model

    pre_model = build_model("small", torch.float32, seed=0)
    pre, post = reference_state_dict(pre_model), make_post_trained(pre_model, seed=5, scale=0.002)
    ids = torch.randint(0, post.config.vocab_size, (batches, tokens), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(1, tokens, dtype=torch.long)
    data = [{"input_ids": row[None], "attention_mask": mask, "labels": row[None]} for row in ids]
    loader = DataLoader(data, batch_size=None)

    def make_module() -> DeltaEditModule:
        return DeltaEditModule(copy.deepcopy(post), pretrained=pre, edit=DARE(p=0.9, seed=0))

    variants = {"baseline": {"rule": "left", "num_points": 5, "trapezoid": True}, "gauss": {"rule": "gauss"}}
    times, _ = interleaved(make_module, loader, variants, repeats)
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"\n44M Llama, float32, DARE p = 0.9, {batches} batches of 1×{tokens} tokens (medians of {repeats}):")
    print(
        "every run: "
        + "; ".join(f"{key} " + ", ".join(f"{value:.2f}" for value in values) for key, values in times.items())
    )
    print("| left C = 5 + trapezoid [6] | Gauss n = 3 | Gauss / baseline | F0 / P | F1 / P | (3P + F0 + F1) / 6P |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {median['baseline']:.2f} s | {median['gauss']:.2f} s | {median['gauss'] / median['baseline']:.3f} | "
        f"{floor_cells(make_module, loader, repeats)} |"
    )


def error_table(pair: DigitsPair) -> None:
    """The table of errors against passes, on the MLP's cases and the tiny Llama."""
    print(
        f"digits MLP: ‖ΔW‖/‖W_pre‖ = {100 * pair.ratio():.1f} %; cells: total's relative error / worst per-tensor "
        "error as a share of the largest per-tensor term [backward passes per batch]\n"
    )
    cases = {}
    for name, make_edit in TABLE_EDITS.items():
        cases[f"MLP, {name}"] = (
            lambda make_edit=make_edit: DeltaEditModule(
                copy.deepcopy(pair.post), pretrained=pair.pre, edit=make_edit(), loss="classification"
            ),
            pair.loader,
        )
    with tempfile.TemporaryDirectory() as directory:
        llama = make_tiny_pair(directory, "llama", shard=None, dtype=torch.float64)
        pre = reference_state_dict(llama.pre)
        tokens = DataLoader(token_dataset(64), batch_size=16)
        cases["tiny Llama, DARE p = 0.9"] = (
            lambda: DeltaEditModule(copy.deepcopy(llama.post), pretrained=pre, edit=DARE(p=0.9, seed=0)),
            tokens,
        )
        table(cases)


if __name__ == "__main__":
    main()
