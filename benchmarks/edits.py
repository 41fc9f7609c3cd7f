"""Editing operations against peer libraries on the same float32 tensors: time, extra peak memory, agreement.

=========  ==========================================  ==========================================================
operation  lightning_delta                             peers
=========  ==========================================  ==========================================================
dare       ``DARE(p).edit_tensor``                     peft ``merge_utils.random_pruning(rescale=True)``;
                                                       mergekit ``sparsify.bernoulli(rescale_norm=l1)`` (its DARE)
magnitude  ``MagnitudePrune(p).edit_tensor``           peft ``merge_utils.magnitude_based_pruning``;
                                                       mergekit ``sparsify.magnitude``
lowrank    ``LowRank(rank).edit_tensor`` (exact SVD)   ``torch.linalg.svd`` (full, then truncated to the rank);
           ``LowRank(rank, method="randomized")``      compared with the exact ``LowRank``: time and F error
=========  ==========================================  ==========================================================

LowRank runs its SVD on one thread whatever the process's thread count, so every lowrank implementation runs in a
process with one thread (like for like). Its input has a slowly decaying spectrum (:func:`decaying_delta`), where the
randomized SVD's error is what a user would see on a fine-tuning delta; the exact worker also measures that error
(``randomized_f_error``, ``‖F_randomized − F_exact‖_F / ‖F_exact‖_F``). :func:`demo_worker` measures it on the real
deltas of the demo pair.

Peers are optional (the ``bench`` extra); one that cannot be imported is skipped with the reason.

``python -m benchmarks.edits`` times DELLA (:data:`DELLA_IMPLEMENTATIONS`) against DARE followed by one stable sort
of ``|ΔW|`` along the rows (what DELLA cannot do without: DARE's draws and a rank per entry) and against mergekit's
``della_magprune``, each in a fresh process, implementations alternating within every round; one line per round and
the medians, as Markdown rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import MiB, PeakMemory, machine, median, run_worker

DROP_RATE = 0.9  # p; density 1 - p = 0.1 for the peers
RANK = 64
RANDOMIZED = "lightning_delta randomized"  # LowRank(method="randomized"), timed against the exact LowRank
EXACT_SVDS = ("lightning_delta", "torch.linalg.svd")  # the lowrank implementations that run a full SVD
LOWRANK_THREADS = 1  # LowRank's SVD runs on one thread (single_threaded); the reference gets the same
SPECTRUM_DIRECTIONS = 512  # decaying_delta: σ_i ≈ i^(-1/2) over this many directions, then a noise floor
DEMO_RANKS = (1, 4)  # the demo's LowRank grid

SHAPES = {"tiny": [(64, 48), (96, 64)], "full": [(4096, 4096), (4096, 14336), (128256, 4096)]}
DELLA_EPSILON = 0.1  # DELLA's spread of drop probabilities; mergekit's epsilon is half of it (see magprune)
DARE_AND_SORT = "DARE + one sort"  # the bound DELLA should stay under


def _ours(operation: str, rank: int = RANK, method: str = "exact") -> Callable[[Tensor], Tensor]:
    try:
        from lightning_delta.edits import DARE, LowRank, MagnitudePrune
    except ImportError:  # the package's __init__ may not list them yet
        from lightning_delta.edits.dare import DARE
        from lightning_delta.edits.lowrank import LowRank
        from lightning_delta.edits.prune import MagnitudePrune
    edit = {
        "dare": lambda: DARE(p=DROP_RATE, seed=0),
        "magnitude": lambda: MagnitudePrune(p=DROP_RATE),
        "lowrank": lambda: LowRank(rank=rank, method=method),
    }[operation]()
    return lambda delta: edit.edit_tensor("model.layers.0.mlp.up_proj.weight", delta)


def _ours_randomized(operation: str, rank: int = RANK) -> Callable[[Tensor], Tensor]:
    return _ours(operation, rank, method="randomized")


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


def _della(operation: str, rank: int = RANK) -> Callable[[Tensor], Tensor]:
    from lightning_delta.edits import DELLA

    edit = DELLA(p=DROP_RATE, epsilon=DELLA_EPSILON, seed=0)
    return lambda delta: edit.edit_tensor("model.layers.0.mlp.up_proj.weight", delta)


def _dare_and_sort(operation: str, rank: int = RANK) -> Callable[[Tensor], Tensor]:
    dare = _ours("dare")

    def run(delta: Tensor) -> Tensor:
        out = dare(delta)
        torch.sort(delta.abs(), dim=-1, descending=True, stable=True)
        return out

    return run


def _mergekit_della(operation: str, rank: int = RANK) -> Callable[[Tensor], Tensor]:
    from mergekit import sparsify

    return lambda delta: sparsify.della_magprune(
        delta, 1.0 - DROP_RATE, DELLA_EPSILON / 2, rescale_norm=sparsify.RescaleNorm.l1
    )


IMPLEMENTATIONS: dict[str, dict[str, Callable[[str, int], Callable[[Tensor], Tensor]]]] = {
    "dare": {"lightning_delta": _ours, "peft": _peft, "mergekit": _mergekit},
    "magnitude": {"lightning_delta": _ours, "peft": _peft, "mergekit": _mergekit},
    "lowrank": {"lightning_delta": _ours, "torch.linalg.svd": _svd, RANDOMIZED: _ours_randomized},
}
# run by ``python -m benchmarks.edits``, not by the suite's edits item
DELLA_IMPLEMENTATIONS = {
    "della": {"lightning_delta": _della, DARE_AND_SORT: _dare_and_sort, "DARE": _ours, "mergekit": _mergekit_della}
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


def decaying_delta(shape: tuple[int, int], noise: Tensor) -> Tensor:
    """``ΔW = A·diag(σ)·B + 0.01·noise`` with Gaussian ``A (d, n)``, ``B (n, k)``, ``σ_i = i^(−1/2)`` and
    ``n = min(512, d, k)``: a slowly decaying spectrum (roughly ``i^(−1/2)`` over ``n`` directions, then the noise
    floor), like a fine-tuning delta's. ``noise`` is scaled in place and returned."""
    rows, cols = shape
    n = min(SPECTRUM_DIRECTIONS, rows, cols)
    generator = torch.Generator().manual_seed(1)
    scales = torch.arange(1, n + 1, dtype=torch.float32).pow_(-0.5)
    left = torch.randn(rows, n, generator=generator).mul_(scales)
    right = torch.randn(n, cols, generator=generator)
    return noise.mul_(0.01).addmm_(left, right)


def _relative(difference: Tensor, reference: Tensor) -> float:
    return float(torch.linalg.norm(difference, dtype=torch.float64) / torch.linalg.norm(reference, dtype=torch.float64))


def randomized_error(delta: Tensor, exact: Tensor, rank: int) -> dict[str, float]:
    """How far ``LowRank(rank, method="randomized")`` is from the exact ``F`` computed by ``LowRank(rank)``:
    ``‖F_randomized − F_exact‖ / ‖F_exact‖`` and the excess of its residual, ``‖ΔW − F_randomized‖ / ‖ΔW − F_exact‖
    − 1``."""
    randomized = _ours_randomized("lowrank", rank)(delta)
    f_error = _relative(randomized - exact, exact)
    randomized.sub_(delta)  # −(ΔW − F_randomized), in place: the residuals are full-size
    residual_randomized = float(torch.linalg.norm(randomized, dtype=torch.float64))
    residual_exact = float(torch.linalg.norm(delta - exact, dtype=torch.float64))
    return {"randomized_f_error": f_error, "randomized_residual_excess": residual_randomized / residual_exact - 1}


def agreement(operation: str, delta: Tensor, out: Tensor) -> dict[str, float]:
    """What must agree between implementations: kept count and scale, or the low-rank error."""
    if operation == "lowrank":
        return {"relative_error": float(torch.linalg.matrix_norm(delta - out) / torch.linalg.matrix_norm(delta))}
    kept = out != 0
    count = int(kept.sum())
    scale = float((out[kept].double() / delta[kept].double()).mean()) if count else 0.0
    return {"kept": count, "kept_fraction": count / delta.numel(), "kept_scale": scale}


def with_threads(worker: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Run ``worker`` with ``torch.set_num_threads(spec["threads"])`` when the spec names a thread count (also
    in-process, where the caller's count is restored afterwards)."""

    def run(spec: dict[str, Any]) -> dict[str, Any]:
        threads = spec.get("threads")
        if threads is None:
            return worker(spec)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return worker(spec)
        finally:
            torch.set_num_threads(previous)

    run.__doc__, run.__name__ = worker.__doc__, worker.__name__
    return run


@with_threads
def edit_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One implementation of one operation on one random float32 tensor, ``runs`` times in a fresh process."""
    operation, implementation = spec["operation"], spec["implementation"]
    reason = unavailable_reason(implementation)
    if reason:
        return {"skipped": reason}
    # the peers draw their masks from the global generator: seeded apart from the input's stream, which a shared
    # seed would correlate with the mask (same uniform draws under the Box-Muller normals)
    torch.manual_seed(spec.get("seed", 0) + 1_000_003)
    fn = {**IMPLEMENTATIONS, **DELLA_IMPLEMENTATIONS}[operation][implementation](
        "dare" if implementation == "DARE" else operation, spec.get("rank", RANK)
    )
    delta = torch.randn(*spec["shape"], generator=torch.Generator().manual_seed(spec.get("seed", 0)))
    if spec.get("low_rank_input"):  # a slowly decaying spectrum, like a real delta
        delta = decaying_delta(tuple(spec["shape"]), delta)
    times, memory = [], None
    for run in range(spec.get("runs", 1)):
        with PeakMemory("cpu") as probe:
            start = time.perf_counter()
            out = fn(delta)
            times.append(time.perf_counter() - start)
        memory = memory or probe  # the first run's peak: the cold one, as a user sees it
        if run + 1 < spec.get("runs", 1):
            del out
    result = {
        "times_s": times,
        "extra_peak_mib": memory.extra / MiB,
        "input_mib": delta.numel() * 4 / MiB,
        "threads": torch.get_num_threads(),
    }
    result.update(agreement(operation, delta, out))
    if operation == "lowrank" and implementation == "lightning_delta" and spec.get("compare_randomized", True):
        result.update(randomized_error(delta, out, spec.get("rank", RANK)))  # after the timing: not timed
    return result


@with_threads
def demo_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """``randomized_error`` on every 2-D delta of the demo pair (built and cached by ``lightning_delta.demo`` when
    missing, minutes), for the demo's ranks: median and max over the matrices."""
    from lightning_delta.delta import compute_delta
    from lightning_delta.demo.pair import shipped_pair

    pair = shipped_pair()
    deltas = compute_delta(str(pair.post_dir), pretrained=str(pair.pre_dir))
    result: dict[str, Any] = {"pair": str(pair.post_dir.parent.name), "threads": torch.get_num_threads(), "ranks": {}}
    for rank in spec.get("ranks", DEMO_RANKS):
        errors, excesses, shapes = [], [], set()
        for delta in deltas.values():
            if delta.dim() != 2 or rank >= min(delta.shape):
                continue
            exact = _ours("lowrank", rank)(delta)
            measured = randomized_error(delta, exact, rank)
            errors.append(measured["randomized_f_error"])
            excesses.append(measured["randomized_residual_excess"])
            shapes.add(tuple(delta.shape))
        result["ranks"][str(rank)] = {
            "matrices": len(errors),
            "shapes": sorted(list(shape) for shape in shapes),
            "f_error_median": statistics.median(errors) if errors else None,
            "f_error_max": max(errors, default=None),
            "residual_excess_max": max(excesses, default=None),
        }
    return result


def della_rounds(shapes: list[tuple[int, int]], rounds: int, runs: int) -> list[dict[str, Any]]:
    """Every implementation of :data:`DELLA_IMPLEMENTATIONS` on each shape, ``rounds`` times in alternating order,
    each run in a fresh process; per shape the time of every round and the medians over rounds."""
    names = list(DELLA_IMPLEMENTATIONS["della"])
    cases = []
    for shape in shapes:
        times: dict[str, list[float]] = {name: [] for name in names}
        memory: dict[str, list[float]] = {name: [] for name in names}
        notes: dict[str, Any] = {}
        for round_index in range(rounds):
            for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                reason = unavailable_reason(name)
                if reason:
                    notes[name] = reason
                    continue
                spec = {
                    "kind": "edit",
                    "operation": "della",
                    "implementation": name,
                    "shape": list(shape),
                    "runs": runs,
                }
                result = run_worker(spec, timeout=1200)
                if "times_s" not in result:
                    notes[name] = result.get("error", result.get("skipped", "no result"))[:200]
                    continue
                times[name].append(median(result["times_s"]))
                memory[name].append(result["extra_peak_mib"])
                notes.setdefault(name, {"kept_fraction": result["kept_fraction"], "kept_scale": result["kept_scale"]})
            print(
                f"{shape[0]}x{shape[1]} round {round_index + 1}: "
                + ", ".join(f"{name} {times[name][-1]:.3g} s" for name in names if len(times[name]) > round_index),
                flush=True,
            )
        cases.append({"shape": list(shape), "times_s": times, "extra_peak_mib": memory, "notes": notes})
    return cases


def della_markdown(cases: list[dict[str, Any]]) -> str:
    """Rows: shape, DELLA's time and peak, then each other implementation's, and DELLA ÷ it per round."""
    lines = [
        "| shape | implementation | time (s), median | extra peak (MiB) | DELLA ÷ this, per round | kept |",
        "|---|---|---:|---:|---|---|",
    ]
    for case in cases:
        ours = case["times_s"]["lightning_delta"]
        for name, times in case["times_s"].items():
            note = case["notes"].get(name)
            if not times:
                lines.append(f"| {case['shape'][0]}x{case['shape'][1]} | {name} | – | – | {note} | |")
                continue
            ratios = "" if name == "lightning_delta" else ", ".join(f"{a / b:.2f}" for a, b in zip(ours, times))
            kept = f"{note['kept_fraction']:.4f} ×{note['kept_scale']:.3g}" if isinstance(note, dict) else ""
            lines.append(
                f"| {case['shape'][0]}x{case['shape'][1]} | {name} | {median(times):.3g} | "
                f"{median(case['extra_peak_mib'][name]):.0f} | {ratios} | {kept} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.edits", description="DELLA against DARE + one sort and mergekit's della_magprune"
    )
    parser.add_argument("--shapes", default="4096x14336", help="comma-separated ROWSxCOLS (default 4096x14336)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the order of implementations rotates")
    parser.add_argument("--runs", type=int, default=2, help="runs per process (their median is the round's time)")
    args = parser.parse_args(argv)
    shapes = [tuple(int(side) for side in shape.split("x")) for shape in args.shapes.split(",")]
    info = machine()
    print(
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, mergekit {info['mergekit']}; p = "
        f"{DROP_RATE}, DELLA epsilon = {DELLA_EPSILON}, float32"
    )
    cases = della_rounds(shapes, args.rounds, args.runs)
    print(della_markdown(cases))
    return cases


if __name__ == "__main__":
    main()
