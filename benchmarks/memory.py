"""The memory estimate against measured peaks: ``python -m benchmarks.memory [--quick]``; ``--fits``: which models fit
which GPU, by the estimate.

Each case runs in a fresh process: a Llama of a benchmark shape (``benchmarks.riemann.MODEL_SIZES``, random
weights), a random ``E`` for every tensor in its stored dtype, and two Riemann points as ``RiemannCallback`` runs
them (``EditedModel`` under ``recompute_weights``, the causal-LM loss, forward and backward on one batch of
``batch × seq_len`` random tokens), after the same on the tiny model (which loads code and kernels). Measured:

- allocated: the bytes of the weights and ``E``, plus the peak of one more point under torch's profiler
  (``profile_memory``: every allocation and free of the CPU allocator, summed in time order);
- resident: the resident set's high-water mark (``VmHWM``) over the two points minus the resident set before the
  model was built, which adds what the C allocator keeps of freed memory.

Estimated: :func:`lightning_delta.estimate.estimate_memory`'s ``point`` for the same shape, on meta in this process.
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

from benchmarks.common import RESULT_MARKER, ROOT, MiB, emit, peak_rss_bytes, reset_peak_rss, rss_bytes
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


def allocation_peak(profiler: profile) -> int:
    """The largest sum of bytes allocated and not yet freed over a profile's ``[memory]`` records, in time order."""
    events = sorted(
        (event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    allocated = peak = 0
    for event in events:
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak


def random_E(model: torch.nn.Module, E_dtype: str, seed: int = 1) -> dict[str, torch.Tensor]:  # noqa: N802, N803
    """A random ``E`` per tensor (std 0.002), made in its stored dtype (no float32 copy on the way)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.empty(p.shape, dtype=stored_dtype(p.dtype, E_dtype)).normal_(0.0, 0.002, generator=generator)
        for name, p in model.named_parameters()
    }


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
    peak = allocation_peak(profiler)
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
    result = estimate_memory(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, E_dtype=E_dtype
    )
    return {"point": result.point, "estimated_held": result.weights + result.E}


def run_case(case: tuple, timeout: float = 600) -> dict[str, Any]:
    """:func:`measure` in a fresh process, and the estimate here."""
    command = [sys.executable, "-m", "benchmarks.memory", "--worker", json.dumps(case)]
    try:
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": [f"timed out after {timeout:.0f} s"]}
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if not lines:
        return {"case": case, "error": (finished.stderr or finished.stdout).strip().splitlines()[-3:]}
    measured = json.loads(lines[-1][len(RESULT_MARKER) :])
    return {"case": case, **measured, **estimate(*case)}


def row(result: dict[str, Any]) -> str:
    size, dtype, E_dtype, batch, seq_len = result["case"]
    label = f"| {size} | {dtype} | {E_dtype} | {batch}×{seq_len} |"
    if "error" in result:
        return f"{label} error: {' '.join(result['error'])} | | | | |"
    resident, allocated, point = result["resident"], result["allocated"], result["point"]
    return (
        f"{label} {point / MiB:.0f} | {allocated / MiB:.0f} | {point / allocated:.3f} | {resident / MiB:.0f} | "
        f"{point / resident:.3f} |"
    )


HEADER = (
    "| model | dtype | E | batch × tokens | estimate (MiB) | measured allocated peak (MiB) | ratio "
    "| measured resident peak (MiB) | ratio |\n|---|---|---|---|---|---|---|---|---|"
)


# Published config.json shapes (no download): (transformers config class, keyword arguments).
PUBLISHED = {
    "Llama-3.2-1B": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
        ),
    ),
    "Mistral-7B-v0.3": (
        "MistralConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32768,
        ),
    ),
    "Qwen2-7B": (
        "Qwen2Config",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            tie_word_embeddings=False,
        ),
    ),
    "Llama-3-8B": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
    ),
    "Llama-2-13B": (
        "LlamaConfig",
        dict(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            vocab_size=32000,
        ),
    ),
    "Llama-3-70B": (
        "LlamaConfig",
        dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
    ),
    "Qwen2-72B": (
        "Qwen2Config",
        dict(
            hidden_size=8192,
            intermediate_size=29568,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=152064,
            tie_word_embeddings=False,
        ),
    ),
}
GPUS_GB = (24, 40, 48, 80, 141)
USABLE = 0.9  # of a GPU's memory, the rest left to the CUDA context and the caching allocator (not measured here)
# (label, processes, sharded, E_dtype, batch): the shipped GSM8K configs' batch is 4 × 1024 tokens
LAYOUTS = [
    ("1 GPU, E fp32, 4×1024", 1, False, "float32", 4),
    ("1 GPU, E bf16, 4×1024", 1, False, "model", 4),
    ("1 GPU, E bf16, 1×1024", 1, False, "model", 1),
    ("1 GPU, E on the fly, 1×1024", 1, False, "on_the_fly", 1),
    ("FSDP 8, E fp32, 1×1024", 8, True, "float32", 1),
    ("FSDP 8, E bf16, 1×1024", 8, True, "model", 1),
    ("FSDP 16, E bf16, 1×1024", 16, True, "model", 1),
]


def fits_table(tokens: int = 1024) -> str:
    """Estimated peak per GPU for published models in bf16 with the GSM8K configs' evaluator and batch shape, and the
    smallest GPU of :data:`GPUS_GB` whose :data:`USABLE` share holds it."""
    import transformers

    lines = [
        "| model | parameters | " + " | ".join(label for label, *_ in LAYOUTS) + " |",
        "|---|---|" + "---|" * len(LAYOUTS),
    ]
    for name, (config_class, arguments) in PUBLISHED.items():
        model = meta_model(getattr(transformers, config_class)(**arguments), torch.bfloat16)
        parameters = sum(p.numel() for p in model.parameters())
        cells = []
        for _, processes, sharded, E_dtype, batch in LAYOUTS:  # noqa: N806
            ids = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
            peak = estimate_memory(
                model,
                {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
                E_dtype=E_dtype,
                processes=processes,
                sharded=sharded,
                evaluator=True,
            ).peak
            fitting = [gb for gb in GPUS_GB if peak <= USABLE * gb * 1e9]
            cells.append(f"{peak / 1e9:.0f} ({fitting[0] if fitting else 'none'})")
        lines.append(f"| {name} | {parameters / 1e9:.1f} B | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small cases")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--fits", action="store_true", help="only the estimated table of which model fits which GPU")
    arguments = parser.parse_args()
    if arguments.fits:
        print(fits_table())
        return
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
