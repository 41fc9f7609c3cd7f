"""The memory estimate against measured peaks: ``python -m benchmarks.memory [--quick]``.

Each case runs in a fresh process: a Llama of a benchmark shape (``benchmarks.riemann.MODEL_SIZES``, random
weights), a random ``E`` for every tensor in its stored dtype, and two Riemann points as ``RiemannCallback`` runs
them (``EditedModel`` under ``recompute_weights``, the causal-LM loss, forward and backward on one batch of
``batch × seq_len`` random tokens). Measured: the resident set's high-water mark (``VmHWM``) minus the resident set
before the model was built (after the imports), so weights, ``E`` and every transient are in it. Estimated:
:func:`lightning_delta.estimate.estimate_memory`'s ``point`` for the same shape, built on meta in this process.
Printed per case: measured, estimated, their ratio, and the same for the part beyond ``W + E`` (what the estimate
computes rather than counts).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig

from benchmarks.common import MiB, ROOT, RESULT_MARKER, emit, peak_rss_bytes, reset_peak_rss, rss_bytes
from benchmarks.riemann import MODEL_SIZES, build_batches, build_model
from lightning_delta.estimate import estimate_memory, meta_model
from lightning_delta.losses import CausalLMLoss
from lightning_delta.parametrize import EditedModel, stored_dtype

# (size, dtype, E_dtype, batch, seq_len)
CASES = {
    "quick": [("small", "float32", "float32", 1, 128), ("small", "bfloat16", "float32", 2, 256)],
    "full": [
        ("small", "float32", "float32", 1, 128),
        ("small", "float32", "float32", 4, 512),
        ("small", "bfloat16", "float32", 2, 256),
        ("small", "bfloat16", "model", 2, 256),
        ("medium", "float32", "float32", 1, 128),
        ("medium", "bfloat16", "float32", 4, 256),
        ("1b", "bfloat16", "float32", 1, 128),
    ],
}
POINTS = 2


def random_E(model: torch.nn.Module, E_dtype: str, seed: int = 1) -> dict[str, torch.Tensor]:  # noqa: N802, N803
    """A random ``E`` per tensor (std 0.002), made in its stored dtype (no float32 copy on the way)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.empty(p.shape, dtype=stored_dtype(p.dtype, E_dtype)).normal_(0.0, 0.002, generator=generator)
            for name, p in model.named_parameters()}


def measure(size: str, dtype: str, E_dtype: str, batch: int, seq_len: int) -> dict[str, Any]:  # noqa: N803
    """Peak resident memory of :data:`POINTS` Riemann points over the resident set before the model existed; then
    one more point under torch's profiler, whose allocation records give the peak of the bytes allocated."""
    torch.set_num_threads(2)
    Setup(*SMALLEST).points()  # loads the code and kernels the points run: not the model's memory
    reset_peak_rss()
    before = rss_bytes()
    setup = Setup(size, dtype, E_dtype, batch, seq_len)
    seconds = setup.points()
    resident = peak_rss_bytes() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        setup.points(1)
    events = sorted((event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
                    key=lambda event: event.start_ns())
    allocated = peak = 0
    for event in events:
        allocated += event.nbytes()
        peak = max(peak, allocated)
    held = sum(tensor.nbytes for tensor in [*setup.model.parameters(), *setup.model.buffers()])
    return {"resident": resident, "allocated": held + peak, "held": held, "seconds": seconds}


SMALLEST = ("tiny", "float32", "float32", 2, 8)


class Setup:
    """A model of ``size`` with a random ``E`` on every tensor and one batch."""

    def __init__(self, size: str, dtype: str, E_dtype: str, batch: int, seq_len: int) -> None:  # noqa: N803
        self.model = build_model(size, getattr(torch, dtype))
        self.edited = EditedModel(self.model, random_E(self.model, E_dtype), E_dtype=E_dtype)
        (self.tokens,) = build_batches(MODEL_SIZES[size]["vocab_size"], batch, seq_len, 1)
        self.loss = CausalLMLoss()

    def points(self, count: int = POINTS) -> float:
        """``count`` Riemann points as RiemannCallback runs them; their time."""
        start = time.perf_counter()
        for c in range(count):
            self.edited.set_t(c / count)
            with self.edited.recompute_weights():
                self.loss(self.model, self.tokens).total.backward()
            self.edited.pop_inner_products()
        return time.perf_counter() - start


def estimate(size: str, dtype: str, E_dtype: str, batch: int, seq_len: int) -> dict[str, int]:  # noqa: N803
    config = LlamaConfig(**MODEL_SIZES[size], tie_word_embeddings=False)
    model = meta_model(config, getattr(torch, dtype))
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    result = estimate_memory(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
                             E_dtype=E_dtype)
    return {"point": result.point, "estimated_held": result.weights + result.E}


def run_case(case: tuple, timeout: float = 600) -> dict[str, Any]:
    """:func:`measure` in a fresh process, and the estimate here."""
    command = [sys.executable, "-m", "benchmarks.memory", "--worker", json.dumps(case)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if not lines:
        return {"case": case, "error": (finished.stderr or finished.stdout).strip().splitlines()[-3:]}
    measured = json.loads(lines[-1][len(RESULT_MARKER):])
    return {"case": case, **measured, **estimate(*case)}


def row(result: dict[str, Any]) -> str:
    size, dtype, E_dtype, batch, seq_len = result["case"]
    label = f"| {size} | {dtype} | {E_dtype} | {batch}×{seq_len} |"
    if "error" in result:
        return f"{label} error: {' '.join(result['error'])} | | | | |"
    resident, allocated, point = result["resident"], result["allocated"], result["point"]
    return (f"{label} {point / MiB:.0f} | {allocated / MiB:.0f} | {point / allocated:.3f} | {resident / MiB:.0f} | "
            f"{point / resident:.3f} |")


HEADER = ("| model | dtype | E | batch × tokens | estimate (MiB) | measured allocated peak (MiB) | ratio "
          "| measured resident peak (MiB) | ratio |\n|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small cases")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    arguments = parser.parse_args()
    if arguments.worker:
        emit(measure(*json.loads(arguments.worker)))
        return
    results = []
    print(HEADER, flush=True)
    for case in CASES["quick" if arguments.quick else "full"]:
        results.append(run_case(tuple(case)))
        print(row(results[-1]), flush=True)
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
