"""E kept against E made on the fly: ``python -m benchmarks.on_the_fly [--size medium --dtype float32]``.

The benchmark Llama of :mod:`benchmarks.riemann` (random weights) is W_post; W_pre = W_post − ΔW (ΔW normal, std
0.002) is written once to a safetensors file. Each variant runs in a fresh process: ``attach_edit`` of DARE
(p = 0.9, seed 0) with ``E_dtype`` ``float32``, ``model`` or ``on_the_fly``, then ``--points`` Riemann points (``t``
set, ``recompute_weights``, the summed next-token loss of 4 × 256 random tokens, backward, the per-tensor inner
products read). Reported, from :class:`~lightning_delta.estimate.LiveTensorBytes` (the bytes of every tensor
torch's ops make and that is still alive; the resident set would also count W_pre's file pages and the freed blocks
the C allocator keeps): what the attached edit holds after ``attach_edit``, the peak of the points beyond the model
and the edit, the median time of a point, and the largest difference of the per-tensor inner products from the ``float32`` run (``on_the_fly`` must
give 0: the same E).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, MiB

VARIANTS = ("float32", "model", "on_the_fly")


def write_pretrained(size: str, dtype: str, path: Path) -> None:
    from safetensors.torch import save_file

    from benchmarks.riemann import build_model

    model = build_model(size, getattr(torch, dtype))
    generator = torch.Generator().manual_seed(1)
    pre = {
        name: (p.detach().float() - 0.002 * torch.randn(p.shape, generator=generator)).to(p.dtype).contiguous()
        for name, p in model.named_parameters()
    }
    save_file(pre, str(path))


def run_variant(E_dtype: str, size: str, dtype: str, pretrained: str, points: int) -> dict:  # noqa: N803
    from benchmarks.riemann import build_batches, build_model
    from lightning_delta.attach import attach_edit
    from lightning_delta.edits import DARE
    from lightning_delta.estimate import LiveTensorBytes
    from lightning_delta.losses import CausalLMLoss

    torch.set_num_threads(2)
    model = build_model(size, getattr(torch, dtype))
    batch = build_batches(model.config.vocab_size, 4, 256, 1)[0]
    existing = [*model.parameters(), *model.buffers(), *batch.values()]
    with LiveTensorBytes(existing) as attaching:
        edited = attach_edit(model, pretrained=pretrained, edit=DARE(p=0.9, seed=0), E_dtype=E_dtype)
        gc.collect()
    held = attaching.current
    loss = CausalLMLoss()
    times, inner = [], []
    with LiveTensorBytes(existing) as pointing:
        for c in range(points):
            start = time.perf_counter()
            edited.set_t((c + 1) / (points + 1))
            with edited.recompute_weights():
                loss(model, batch).total.backward()
            inner = edited.pop_inner_products().tolist()
            times.append(time.perf_counter() - start)
    return {
        "variant": E_dtype,
        "held_mib": held / MiB,
        "extra_peak_mib": pointing.peak / MiB,
        "time_s": statistics.median(times),
        "inner": inner,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--points", type=int, default=5)
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--pretrained")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.size, args.dtype, args.pretrained, args.points)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        pretrained = Path(scratch) / "pre.safetensors"
        write_pretrained(args.size, args.dtype, pretrained)
        for variant in VARIANTS:
            command = [
                sys.executable,
                "-m",
                "benchmarks.on_the_fly",
                "--variant",
                variant,
                "--size",
                args.size,
                "--dtype",
                args.dtype,
                "--points",
                str(args.points),
                "--pretrained",
                str(pretrained),
            ]
            output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            results[variant] = json.loads(output.splitlines()[-1])
    reference = results["float32"]
    print(f"{args.size} Llama, {args.dtype}, DARE p = 0.9, 4 × 256 tokens, 2 threads, median of {args.points} points")
    print(
        "| E_dtype | held by the edit (MiB) | allocation peak of a point (MiB, beyond model and edit) | time per point (s) | "
        "× float32 | max rel. diff of ⟨∇L, E⟩ from float32 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for variant, result in results.items():
        diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(result["inner"], reference["inner"]))
        print(
            f"| {variant} | {result['held_mib']:.0f} | {result['extra_peak_mib']:.0f} | {result['time_s']:.2f} | "
            f"{result['time_s'] / reference['time_s']:.2f} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
