"""Editing operations against peer libraries on the same float32 tensors: time, extra peak memory, agreement.

=========  ==========================================  ==========================================================
operation  lightning_delta                             peers
=========  ==========================================  ==========================================================
dare       ``DARE(p).edit_tensor``                     peft ``merge_utils.random_pruning(rescale=True)``;
                                                       mergekit ``sparsify.bernoulli(rescale_norm=l1)`` (its DARE)
magnitude  ``MagnitudePrune(p).edit_tensor``           peft ``merge_utils.magnitude_based_pruning``;
                                                       mergekit ``sparsify.magnitude``
lowrank    ``LowRank(rank).edit_tensor``               ``torch.linalg.svd`` (full, then truncated to the rank)
=========  ==========================================  ==========================================================

Peers are optional (the ``bench`` extra); one that cannot be imported is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import MiB, PeakMemory

DROP_RATE = 0.9  # p; density 1 - p = 0.1 for the peers
RANK = 64

SHAPES = {"tiny": [(64, 48), (96, 64)], "full": [(4096, 4096), (4096, 14336), (128256, 4096)]}


def _ours(operation: str, rank: int = RANK) -> Callable[[Tensor], Tensor]:
    try:
        from lightning_delta.edits import DARE, LowRank, MagnitudePrune
    except ImportError:  # the package's __init__ may not list them yet
        from lightning_delta.edits.dare import DARE
        from lightning_delta.edits.lowrank import LowRank
        from lightning_delta.edits.prune import MagnitudePrune
    edit = {"dare": lambda: DARE(p=DROP_RATE, seed=0), "magnitude": lambda: MagnitudePrune(p=DROP_RATE),
            "lowrank": lambda: LowRank(rank=rank)}[operation]()
    return lambda delta: edit.edit_tensor("model.layers.0.mlp.up_proj.weight", delta)


def peft_merge_utils():
    """``peft.utils.merge_utils``, loaded from its file: the same functions without importing all of peft (which
    pulls in transformers and accelerate, seconds per fresh process). Falls back to the ordinary import."""
    spec = importlib.util.find_spec("peft")
    if spec is None or spec.origin is None:
        raise ImportError("No module named 'peft'")
    path = Path(spec.origin).parent / "utils" / "merge_utils.py"
    if not path.exists():
        from peft.utils import merge_utils

        return merge_utils
    module_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _peft(operation: str, rank: int = RANK) -> Callable[[Tensor], Tensor]:
    merge_utils = peft_merge_utils()

    if operation == "dare":
        return lambda delta: merge_utils.random_pruning(delta, 1.0 - DROP_RATE, rescale=True)
    return lambda delta: merge_utils.magnitude_based_pruning(delta, 1.0 - DROP_RATE)


def _mergekit(operation: str, rank: int = RANK) -> Callable[[Tensor], Tensor]:
    from mergekit import sparsify

    if operation == "dare":
        return lambda delta: sparsify.bernoulli(delta, 1.0 - DROP_RATE, rescale_norm=sparsify.RescaleNorm.l1)
    return lambda delta: sparsify.magnitude(delta, 1.0 - DROP_RATE)


def _svd(operation: str, rank: int = RANK) -> Callable[[Tensor], Tensor]:
    def truncated(delta: Tensor) -> Tensor:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]

    return truncated


IMPLEMENTATIONS: dict[str, dict[str, Callable[[str, int], Callable[[Tensor], Tensor]]]] = {
    "dare": {"lightning_delta": _ours, "peft": _peft, "mergekit": _mergekit},
    "magnitude": {"lightning_delta": _ours, "peft": _peft, "mergekit": _mergekit},
    "lowrank": {"lightning_delta": _ours, "torch.linalg.svd": _svd},
}


def unavailable_reason(implementation: str) -> str | None:
    """Why a peer cannot run here (None when it can)."""
    if implementation not in ("peft", "mergekit"):
        return None
    try:
        if implementation == "peft":
            peft_merge_utils()
        else:
            import mergekit.sparsify  # noqa: F401
    except Exception as error:  # ImportError, or a peer that fails on import with this torch
        return f"{implementation} is not importable ({type(error).__name__}: {error}); pip install '.[bench]'"
    return None


def agreement(operation: str, delta: Tensor, out: Tensor) -> dict[str, float]:
    """What must agree between implementations: kept count and scale, or the low-rank error."""
    if operation == "lowrank":
        return {"relative_error": float(torch.linalg.matrix_norm(delta - out) / torch.linalg.matrix_norm(delta))}
    kept = out != 0
    count = int(kept.sum())
    scale = float((out[kept].double() / delta[kept].double()).mean()) if count else 0.0
    return {"kept": count, "kept_fraction": count / delta.numel(), "kept_scale": scale}


def edit_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One implementation of one operation on one random float32 tensor, ``runs`` times in a fresh process."""
    operation, implementation = spec["operation"], spec["implementation"]
    reason = unavailable_reason(implementation)
    if reason:
        return {"skipped": reason}
    # the peers draw their masks from the global generator: seeded apart from the input's stream, which a shared
    # seed would correlate with the mask (same uniform draws under the Box-Muller normals)
    torch.manual_seed(spec.get("seed", 0) + 1_000_003)
    fn = IMPLEMENTATIONS[operation][implementation](operation, spec.get("rank", RANK))
    delta = torch.randn(*spec["shape"], generator=torch.Generator().manual_seed(spec.get("seed", 0)))
    if spec.get("low_rank_input"):  # a decaying spectrum, like a real delta: ΔW = A·B plus noise
        rows, cols = spec["shape"]
        generator = torch.Generator().manual_seed(1)
        factors = torch.randn(rows, 32, generator=generator), torch.randn(32, cols, generator=generator)
        delta = delta.mul_(0.01).addmm_(*factors)
        del factors
    times, memory = [], None
    for run in range(spec.get("runs", 1)):
        with PeakMemory("cpu") as probe:
            start = time.perf_counter()
            out = fn(delta)
            times.append(time.perf_counter() - start)
        memory = memory or probe  # the first run's peak: the cold one, as a user sees it
        if run + 1 < spec.get("runs", 1):
            del out
    result = {"times_s": times, "extra_peak_mib": memory.extra / MiB, "input_mib": delta.numel() * 4 / MiB}
    result.update(agreement(operation, delta, out))
    return result
