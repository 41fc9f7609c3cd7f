"""The Riemann pass against the naive way, with and without recomputed weights, and against plain training.

Each *point* ``t = c/C`` of the Riemann sum is one forward and backward on the same batch; every variant below
computes the per-tensor inner products ``⟨∇L(W_post + tE), E⟩`` (or, for ``plain``, just the weight gradients):

``naive``
    What a researcher writes without the library: ``requires_grad`` on every weight, a copy of W_post kept aside,
    ``W ← W_post + t·E`` written into the weights at each point, backward, then ``Σ grad·E`` per tensor in float64
    (``(grad.double() * E.double()).sum()``, the reference form of ``tests/support/riemann_support.brute_force``).
``library``
    :class:`lightning_delta.parametrize.EditedModel`: ``W_post + t·E`` as a parametrization with one scalar ``t``
    per tensor, under :meth:`~lightning_delta.parametrize.EditedModel.recompute_weights`.
``library_no_recompute``
    The same parametrization without ``recompute_weights`` (autograd keeps every materialised ``W(t)``).
``plain``
    A plain forward and backward of the unedited model with ``requires_grad`` on every weight (a training step
    without the optimizer): the reference for "no model-sized gradient buffers stay allocated".

All variants use the library's causal-LM loss (per-token losses summed in float64) on random token batches.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import MiB, PeakMemory

VARIANTS = ("naive", "library", "library_no_recompute", "plain")

# Llama shapes (LlamaConfig keyword arguments). "1b" is TinyLlama-1.1B's shape.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
    ),
    "medium": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}


def build_model(size: str, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> nn.Module:
    """A Llama of shape ``size`` with random weights (normal, std 0.02; norms at 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODEL_SIZES[size], tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = model.to_empty(device=device)  # no float32 copy on the way, no init work on the host
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    rotary = type(model.model.rotary_emb)(config)  # its inv_freq buffer was left empty on meta
    model.model.rotary_emb = rotary.to(device)
    return model.eval()


def build_edits(model: nn.Module, seed: int = 1, scale: float = 0.002) -> dict[str, Tensor]:
    """A random ``E`` for every parameter, float32 (float64 for a float64 model), on the model's device."""
    edits = {}
    for index, (name, parameter) in enumerate(model.named_parameters()):
        dtype = torch.float64 if parameter.dtype == torch.float64 else torch.float32
        generator = torch.Generator(device=parameter.device).manual_seed(seed * 100003 + index)
        edit = torch.empty(parameter.shape, dtype=dtype, device=parameter.device)
        edits[name] = edit.normal_(0.0, scale, generator=generator)
    return edits


def build_batches(vocab: int, batch_size: int, seq_len: int, count: int, seed: int = 2, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
        batches.append(
            {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}
        )
    return batches


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- variants
def naive_points(model: nn.Module, edits: dict[str, Tensor], batches: list, points: list[float], device: str):
    """Per point: write ``W_post + t·E`` into the weights, backward, ``Σ grad·E`` in float64 per tensor."""
    from lightning_delta.losses import CausalLMLoss

    loss_fn = CausalLMLoss()
    names = sorted(edits)
    parameters = dict(model.named_parameters())
    post = {name: parameters[name].detach().clone() for name in names}  # W_post, kept aside
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    inner, times = [], []
    for t in points:
        start = time.perf_counter()
        with torch.no_grad():
            for name in names:
                parameters[name].copy_(post[name] + t * edits[name])
        for batch in batches:
            loss_fn(model, batch).total.backward()
        row = [float((parameters[name].grad.double() * edits[name].double()).sum()) for name in names]
        for parameter in model.parameters():
            parameter.grad = None
        _sync(device)
        times.append(time.perf_counter() - start)
        inner.append(row)
    return names, inner, times


def library_points(
    model: nn.Module, edits: dict[str, Tensor], batches: list, points: list[float], device: str, recompute: bool = True
):
    """Per point: ``set_t``, forward and backward under ``recompute_weights``, ``pop_inner_products``."""
    from lightning_delta.losses import CausalLMLoss
    from lightning_delta.parametrize import EditedModel

    loss_fn = CausalLMLoss()
    edited = EditedModel(model, edits)
    inner, times = [], []
    for t in points:
        start = time.perf_counter()
        edited.set_t(t)
        with edited.recompute_weights() if recompute else contextlib.nullcontext():
            for batch in batches:
                loss_fn(model, batch).total.backward()
        row = edited.pop_inner_products().tolist()
        _sync(device)
        times.append(time.perf_counter() - start)
        inner.append(row)
    return list(edited.names), inner, times


def plain_points(model: nn.Module, batches: list, points: list[float], device: str):
    """Per point: a plain forward and backward with ``requires_grad`` on every weight (gradients then freed)."""
    from lightning_delta.losses import CausalLMLoss

    loss_fn = CausalLMLoss()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    times = []
    for _ in points:
        start = time.perf_counter()
        for batch in batches:
            loss_fn(model, batch).total.backward()
        for parameter in model.parameters():
            parameter.grad = None
        _sync(device)
        times.append(time.perf_counter() - start)
    return [], [], times


def riemann_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant at one size, in a fresh process: spec keys size, dtype, variant, points, batch, seq_len."""
    device = spec.get("device", "cpu")
    dtype = getattr(torch, spec["dtype"])
    start = time.perf_counter()
    model = build_model(spec["size"], dtype, device=device)
    variant = spec["variant"]
    edits = build_edits(model) if variant != "plain" else None
    batches = build_batches(
        MODEL_SIZES[spec["size"]]["vocab_size"],
        spec["batch"],
        spec["seq_len"],
        spec.get("num_batches", 1),
        device=device,
    )
    setup_s = time.perf_counter() - start
    num_points = spec["points"]
    points = [c / num_points for c in range(num_points)]
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    edit_bytes = sum(e.numel() * e.element_size() for e in edits.values()) if edits else 0
    with PeakMemory(device) as memory:
        if variant == "naive":
            names, inner, times = naive_points(model, edits, batches, points, device)
        elif variant in ("library", "library_no_recompute"):
            names, inner, times = library_points(model, edits, batches, points, device, variant == "library")
        elif variant == "plain":
            names, inner, times = plain_points(model, batches, points, device)
        else:
            raise ValueError(f"Unknown variant {variant!r}; known: {', '.join(VARIANTS)}.")
    return {
        "variant": variant,
        "size": spec["size"],
        "dtype": spec["dtype"],
        "device": device,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_mib": model_bytes / MiB,
        "edit_mib": edit_bytes / MiB,
        "baseline_mib": memory.baseline / MiB,
        "peak_mib": memory.peak / MiB,
        "extra_peak_mib": memory.extra / MiB,
        "point_times_s": times,
        "setup_s": setup_s,
        "names": names,
        "inner": inner,
        "tokens_per_point": spec["batch"] * spec["seq_len"] * spec.get("num_batches", 1),
    }


# --------------------------------------------------------------------------------------------- overhead
def overhead_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """A C-point ``trainer.validate`` with RiemannCallback against C plain forward+backward passes, interleaved.

    Both see the same batches; the analysis runs with ``trapezoid=False`` (C backward passes and one forward at
    t = 1 for the exact loss change), through a fresh ``Trainer`` each repeat, the edit given as ready ``E``.
    """
    import copy

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_delta.callbacks import RiemannCallback
    from lightning_delta.losses import CausalLMLoss
    from lightning_delta.module import DeltaEditModule

    dtype = getattr(torch, spec["dtype"])
    model = build_model(spec["size"], dtype)
    plain_model = copy.deepcopy(model)
    for parameter in plain_model.parameters():
        parameter.requires_grad_(True)
    edits = build_edits(model)
    rows = [
        row
        for batch in build_batches(
            MODEL_SIZES[spec["size"]]["vocab_size"], spec["batch"], spec["seq_len"], spec["num_batches"]
        )
        for row in _split_rows(batch)
    ]
    loader = DataLoader(rows, batch_size=spec["batch"], shuffle=False)
    module = DeltaEditModule(model, pretrained=None, edit=edits)
    num_points, loss_fn = spec["points"], CausalLMLoss()

    def analysis() -> float:
        callback = RiemannCallback(num_points=num_points, trapezoid=False, filename=None)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            inference_mode=False,
            callbacks=[callback],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        start = time.perf_counter()
        trainer.validate(module, dataloaders=loader, verbose=False)
        return time.perf_counter() - start

    def plain() -> float:
        start = time.perf_counter()
        for _ in range(num_points):
            for batch in loader:
                loss_fn(plain_model, batch).total.backward()
            for parameter in plain_model.parameters():
                parameter.grad = None
        return time.perf_counter() - start

    analysis_times, plain_times = [], []
    analysis()  # warm-up: attaches E once, first-touch allocations
    for repeat in range(spec["repeats"]):
        order = (analysis, plain) if repeat % 2 == 0 else (plain, analysis)
        for fn in order:
            (analysis_times if fn is analysis else plain_times).append(fn())
    result = {
        "size": spec["size"],
        "points": num_points,
        "analysis_s": analysis_times,
        "plain_s": plain_times,
        "tokens": spec["batch"] * spec["seq_len"] * spec["num_batches"],
    }
    if spec.get("profile"):
        result["profile"] = _profile_point(module, plain_model, loader, loss_fn)
    return result


def _split_rows(batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    return [{key: value[i] for key, value in batch.items()} for i in range(batch["input_ids"].shape[0])]


def _profile_point(module, plain_model: nn.Module, loader, loss_fn) -> dict[str, str]:
    """``torch.profiler`` tables (top operators by self CPU time) of one library point and one plain pass."""
    from torch.profiler import ProfilerActivity, profile

    edited = module.edited_model()
    tables = {}
    for label in ("library", "plain"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in loader:
                if label == "library":
                    edited.set_t(0.5)
                    with edited.recompute_weights():
                        loss_fn(module.model, batch).total.backward()
                    edited.pop_inner_products()
                else:
                    loss_fn(plain_model, batch).total.backward()
        if label == "plain":
            for parameter in plain_model.parameters():
                parameter.grad = None
        edited.set_t(0.0)
        tables[label] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48)
    return tables


# --------------------------------------------------------------------------------------------- GPU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def gpu_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s, MFU and ``max_memory_allocated`` of the library's Riemann pass on an 8B Llama in bf16."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine (run with --device cuda on a GPU machine)"}
    device = "cuda"
    model = build_model(spec.get("size", "8b"), torch.bfloat16, device=device)
    edits = {name: edit.to(torch.bfloat16) for name, edit in build_edits(model).items()}
    batches = build_batches(
        MODEL_SIZES[spec.get("size", "8b")]["vocab_size"], spec["batch"], spec["seq_len"], 1, device=device
    )
    num_points = spec["points"]
    points = [c / num_points for c in range(num_points)]
    with PeakMemory(device) as memory:
        _, _, times = library_points(model, edits, batches, points, device, recompute=True)
    parameters = sum(p.numel() for p in model.parameters())
    tokens = spec["batch"] * spec["seq_len"]
    point_s = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    tokens_per_s = tokens / point_s
    name = torch.cuda.get_device_name(0)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    return {
        "device": name,
        "parameters": parameters,
        "tokens_per_point": tokens,
        "point_times_s": times,
        "tokens_per_s": tokens_per_s,
        "model_flops_per_token": 6 * parameters,
        "mfu": 6 * parameters * tokens_per_s / peak if peak else None,
        "peak_bf16_flops": peak,
        "max_memory_allocated_gib": memory.peak / (1 << 30),
        "baseline_gib": memory.baseline / (1 << 30),
    }


# --------------------------------------------------------------------------------------------- paired timing
def paired_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Naive and library points alternating in one process (one model each, same weights, same batch).

    On a shared machine the load drifts between the fresh processes of :func:`riemann_worker`; alternating the two
    ways point by point exposes them to the same load, so the ratio of their medians is the steadier time figure
    (memory still comes from the separate processes).
    """
    import copy

    dtype = getattr(torch, spec["dtype"])
    model = build_model(spec["size"], dtype)
    naive_model = copy.deepcopy(model)
    edits = build_edits(model)
    batches = build_batches(MODEL_SIZES[spec["size"]]["vocab_size"], spec["batch"], spec["seq_len"], 1)
    naive_times, library_times = [], []
    from lightning_delta.parametrize import EditedModel

    edited = EditedModel(model, edits)  # built once: the per-point work is what is compared
    from lightning_delta.losses import CausalLMLoss

    loss_fn = CausalLMLoss()
    names = sorted(edits)
    parameters = dict(naive_model.named_parameters())
    post = {name: parameters[name].detach().clone() for name in names}
    for parameter in naive_model.parameters():
        parameter.requires_grad_(True)

    def naive_point(t: float) -> None:
        with torch.no_grad():
            for name in names:
                parameters[name].copy_(post[name] + t * edits[name])
        for batch in batches:
            loss_fn(naive_model, batch).total.backward()
        [float((parameters[name].grad.double() * edits[name].double()).sum()) for name in names]
        for parameter in naive_model.parameters():
            parameter.grad = None

    def library_point(t: float) -> None:
        edited.set_t(t)
        with edited.recompute_weights():
            for batch in batches:
                loss_fn(model, batch).total.backward()
        edited.pop_inner_products()

    for index in range(spec["pairs"] + 1):  # the first pair warms both up and is dropped
        t = (index % spec["points"]) / spec["points"]
        order = ((naive_point, naive_times), (library_point, library_times))
        for point, times in order if index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            point(t)
            if index > 0:
                times.append(time.perf_counter() - start)
    return {
        "size": spec["size"],
        "dtype": spec["dtype"],
        "tokens_per_point": spec["batch"] * spec["seq_len"],
        "naive_s": naive_times,
        "library_s": library_times,
    }
