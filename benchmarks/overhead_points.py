"""Where the analysis spends its time beyond plain training: ``python -m benchmarks.overhead_points``.

The issue's case: Llama "small" (hidden 512, 4 layers, vocab 32000), float32, 2 batches of 4×256 tokens, C = 5,
``trapezoid=False``. Reports, interleaved in one process:

- the whole analysis under ``trainer.validate`` against C plain forward+backward passes (``overhead_worker``);
- one library point (parametrization, ``recompute_weights``), the same without the rebuild, one plain
  forward+backward, and the forward alone that the exact ΔL adds at t = 1 — medians of 5.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from benchmarks.common import run_worker
from benchmarks.riemann import build_edits, build_model
from lightning_delta.losses import CausalLMLoss
from lightning_delta.parametrize import EditedModel

SPEC = {
    "kind": "overhead",
    "size": "small",
    "dtype": "float32",
    "batch": 4,
    "seq_len": 256,
    "num_batches": 2,
    "points": 5,
    "repeats": 3,
}


def per_point(repeats: int = 5) -> dict[str, float]:
    torch.set_num_threads(2)
    model = build_model("small", torch.float32)
    plain = copy.deepcopy(model)
    for parameter in plain.parameters():
        parameter.requires_grad_(True)
    edited = EditedModel(model, build_edits(model))
    ids = torch.randint(0, 32000, (4, 256), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss = CausalLMLoss()

    def library(recompute: bool) -> None:
        edited.set_t(0.4)
        with edited.recompute_weights() if recompute else torch.enable_grad():
            loss(model, batch).total.backward()
        edited.pop_inner_products()

    def plain_pass() -> None:
        loss(plain, batch).total.backward()
        for parameter in plain.parameters():
            parameter.grad = None

    def forward_at_one() -> None:
        edited.set_t(1.0)
        with torch.no_grad():
            loss(model, batch)

    variants = {
        "library point": lambda: library(True),
        "library point, W(t) saved": lambda: library(False),
        "plain forward+backward": plain_pass,
        "forward at t = 1": forward_at_one,
    }
    for fn in variants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    result = run_worker(SPEC, timeout=1800, threads=2)
    analysis, plain = statistics.median(result["analysis_s"]), statistics.median(result["plain_s"])
    points = per_point()
    base = points["plain forward+backward"]
    print(
        f"analysis under trainer.validate {analysis:.2f} s, {SPEC['points']} plain passes {plain:.2f} s: "
        f"{analysis / plain:.3f}×"
    )
    print("| per batch of 4×256 tokens | seconds | × plain forward+backward |\n|---|---:|---:|")
    for name, seconds in points.items():
        print(f"| {name} | {seconds:.3f} | {seconds / base:.3f} |")
    C = SPEC["points"]
    print(
        f"expected per batch: (C·point + forward at 1) / (C·plain) = "
        f"{(C * points['library point'] + points['forward at t = 1']) / (C * base):.3f}×"
    )


if __name__ == "__main__":
    main()
