"""``python -m benchmarks``: speed and memory against the naive way and against peer libraries.

Items (``--only`` takes a comma-separated subset):

``riemann``    the library's Riemann pass vs the naive way, with and without recomputed weights, vs plain training
``paired``     naive and library points alternating in one process: the steadier time ratio on a busy machine
``overhead``   a C-point analysis under ``trainer.validate`` ÷ (C × plain forward+backward on the same batches)
``edits``      DARE, MagnitudePrune, LowRank vs peft, mergekit and ``torch.linalg.svd`` on the same tensors; the
               randomized LowRank vs the exact one (``--operations`` takes a subset of dare, magnitude, lowrank)
``processes``  the same sweep on 1 and 2 CPU processes (DDP): result agreement and wall time
``generation`` the GSM8K evaluator's answer tokens/s against ``model.generate`` one prompt at a time and batched
               without stopping (``benchmarks/generation.py``; also ``python -m benchmarks.generation``)
``gpu``        tokens/s, MFU and peak memory on an 8B Llama in bf16 (``--device cuda`` only)

Every variant runs in a fresh process so that peak memory never mixes; variants alternate in order between
rounds, and figures are medians. Results: a table on stdout, JSON (``--json``) and ``BENCHMARKS.md``
(``--markdown``; ``--no-markdown`` to leave it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import ROOT, available_memory_bytes, machine, median, ratio

ITEMS = ("riemann", "paired", "overhead", "edits", "processes", "gpu", "generation")
GOALS = {"riemann_time": 1.0, "riemann_memory": 0.5, "overhead": 1.15}

# ------------------------------------------------------------------------------------------------ plans
# riemann: (size, dtype, batch, seq_len, points, rounds)
RIEMANN = {
    "tiny": [("tiny", "float64", 2, 8, 3, 1)],
    "quick": [("small", "float32", 1, 64, 3, 1)],
    "full": [("small", "float32", 1, 128, 3, 2), ("medium", "float32", 1, 128, 3, 1), ("1b", "float32", 1, 32, 2, 1)],
}
# paired: (size, dtype, batch, seq_len, points, pairs)
PAIRED = {
    "tiny": [("tiny", "float64", 2, 8, 3, 2)],
    "quick": [("small", "float32", 1, 64, 3, 4)],
    "full": [("small", "float32", 1, 128, 3, 8), ("medium", "float32", 1, 128, 3, 4)],
}
# overhead: (size, dtype, batch, seq_len, num_batches, points, repeats)
OVERHEAD = {
    "tiny": ("tiny", "float64", 2, 8, 2, 3, 1),
    "quick": ("small", "float32", 2, 64, 2, 3, 2),
    "full": ("small", "float32", 2, 128, 2, 3, 2),
}
# edits: (shape, rounds, runs per process)
EDITS = {
    "tiny": [((96, 64), 1, 1)],
    "quick": [((4096, 4096), 1, 2)],
    "full": [((4096, 4096), 1, 2), ((4096, 14336), 1, 2), ((128256, 4096), 1, 1)],
}
EDIT_RANK = {"tiny": 8, "quick": 64, "full": 64}
# a full SVD (the exact LowRank and torch.linalg.svd) gets this many seconds per worker, and is skipped at a shape
# where its worker's wall time at the previous shape, scaled by m·n·min(m, n), predicts more
SVD_CAP_S = {"tiny": 60, "quick": 180, "full": 180}
# processes: (size, sequences, seq_len, batch, points, rounds)
PROCESSES = {
    "tiny": ("tiny", 12, 8, 2, 2, 1),
    "quick": ("small", 8, 32, 2, 2, 1),
    "full": ("small", 8, 32, 2, 3, 2),
}


IN_PROCESS = False  # --in-process: run workers here (tests; peaks then mix)


def run_worker(spec: dict[str, Any], timeout: float | None = None, threads: int | None = None) -> dict[str, Any]:
    if not IN_PROCESS:
        return common.run_worker(spec, timeout=timeout, threads=threads)
    from benchmarks import worker

    return worker.work(spec)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ riemann
def bench_riemann(mode: str, device: str) -> dict[str, Any]:
    from benchmarks.riemann import VARIANTS

    sizes = []
    for size, dtype, batch, seq_len, points, rounds in RIEMANN[mode]:
        note = None
        if size == "1b":
            dtype, note = _fit_1b(dtype)
        runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
        for round_index in range(rounds):
            order = VARIANTS[round_index % len(VARIANTS) :] + VARIANTS[: round_index % len(VARIANTS)]
            for variant in order:
                log(f"riemann {size} {dtype} {variant} (round {round_index + 1}/{rounds})")
                spec = {
                    "kind": "riemann",
                    "size": size,
                    "dtype": dtype,
                    "variant": variant,
                    "points": points,
                    "batch": batch,
                    "seq_len": seq_len,
                    "device": device,
                }
                runs[variant].append(run_worker(spec, timeout=1800))
        sizes.append(_summarise_riemann(size, dtype, points, runs, note))
    return {"sizes": sizes}


def _fit_1b(dtype: str) -> tuple[str, str | None]:
    """float32 when the naive variant's peak (W_post, its copy, gradients, E, float64 products) fits, else bf16."""
    from benchmarks.riemann import MODEL_SIZES

    shape = MODEL_SIZES["1b"]
    h, i, layers, vocab = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_hidden_layers"],
        shape["vocab_size"],
    )
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    parameters = 2 * vocab * h + layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    need = parameters * 4 * 4 + 3 * vocab * h * 8 + (2 << 30)  # four float32 copies, three float64 temporaries
    available = available_memory_bytes()
    if need <= available:
        return dtype, None
    return "bfloat16", (
        f"bf16 weights: the naive variant would need about {need / 2**30:.1f} GiB in float32, "
        f"{available / 2**30:.1f} GiB available"
    )


def _summarise_riemann(size: str, dtype: str, points: int, runs: dict[str, list[dict]], note: str | None) -> dict:
    summary: dict[str, Any] = {"size": size, "dtype": dtype, "points": points, "note": note, "variants": {}}
    for variant, results in runs.items():
        good = [result for result in results if "error" not in result]
        if not good:
            summary["variants"][variant] = {"error": results[0].get("error") if results else "not run"}
            continue
        # the first point of each process pays first-touch allocation: medians over the others
        point_times = [t for result in good for t in (result["point_times_s"][1:] or result["point_times_s"])]
        summary["variants"][variant] = {
            "point_s": median(point_times),
            "point_times_s": [result["point_times_s"] for result in good],
            "extra_peak_mib": median([result["extra_peak_mib"] for result in good]),
            "baseline_mib": median([result["baseline_mib"] for result in good]),
        }
        summary.update(
            parameters=good[0]["parameters"],
            model_mib=good[0]["model_mib"],
            edit_mib=good[0]["edit_mib"] or summary.get("edit_mib", 0),
            tokens_per_point=good[0]["tokens_per_point"],
        )
        if variant in ("naive", "library", "library_no_recompute"):
            summary["variants"][variant]["inner"] = good[0]["inner"]
            summary["variants"][variant]["names"] = good[0]["names"]
    variants = summary["variants"]
    naive, library = variants.get("naive", {}), variants.get("library", {})
    if "inner" in naive and "inner" in library:
        summary["max_rel_diff_vs_naive"] = _max_rel_diff(naive["inner"], library["inner"])
    if "inner" in naive and "inner" in variants.get("library_no_recompute", {}):
        summary["max_rel_diff_no_recompute_vs_naive"] = _max_rel_diff(
            naive["inner"], variants["library_no_recompute"]["inner"]
        )

    def get(variant: str, key: str):
        return variants.get(variant, {}).get(key)

    summary["time_ratio"] = ratio(get("library", "point_s"), get("naive", "point_s"))
    summary["memory_ratio"] = ratio(get("library", "extra_peak_mib"), get("naive", "extra_peak_mib"))
    summary["no_recompute_time_ratio"] = ratio(get("library_no_recompute", "point_s"), get("library", "point_s"))
    summary["no_recompute_memory_ratio"] = ratio(
        get("library_no_recompute", "extra_peak_mib"), get("library", "extra_peak_mib")
    )
    summary["memory_vs_plain_ratio"] = ratio(get("library", "extra_peak_mib"), get("plain", "extra_peak_mib"))
    summary["time_vs_plain_ratio"] = ratio(get("library", "point_s"), get("plain", "point_s"))
    return summary


def _max_rel_diff(reference: list[list[float]], other: list[list[float]]) -> float:
    import torch

    a, b = torch.tensor(reference, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def bench_paired(mode: str) -> dict[str, Any]:
    sizes = []
    for size, dtype, batch, seq_len, points, pairs in PAIRED[mode]:
        log(f"paired {size} {dtype} ({pairs} pairs)")
        result = run_worker(
            {
                "kind": "paired",
                "size": size,
                "dtype": dtype,
                "batch": batch,
                "seq_len": seq_len,
                "points": points,
                "pairs": pairs,
            },
            timeout=1800,
        )
        if "error" not in result:
            result["naive_median_s"] = median(result["naive_s"])
            result["library_median_s"] = median(result["library_s"])
            result["time_ratio"] = ratio(result["library_median_s"], result["naive_median_s"])
            result["paired_ratios"] = [a / b for a, b in zip(result["library_s"], result["naive_s"])]
            result["median_paired_ratio"] = median(result["paired_ratios"])
        sizes.append(result)
    return {"sizes": sizes}


# ------------------------------------------------------------------------------------------------ overhead
def bench_overhead(mode: str, profile: bool) -> dict[str, Any]:
    size, dtype, batch, seq_len, num_batches, points, repeats = OVERHEAD[mode]
    log(f"overhead {size} C={points}")
    result = run_worker(
        {
            "kind": "overhead",
            "size": size,
            "dtype": dtype,
            "batch": batch,
            "seq_len": seq_len,
            "num_batches": num_batches,
            "points": points,
            "repeats": repeats,
            "profile": profile,
        },
        timeout=3600,
    )
    if "error" in result:
        return result
    result["analysis_median_s"] = median(result["analysis_s"])
    result["plain_median_s"] = median(result["plain_s"])
    result["ratio"] = ratio(result["analysis_median_s"], result["plain_median_s"])
    result["dtype"], result["batch"], result["seq_len"], result["num_batches"] = dtype, batch, seq_len, num_batches
    return result


# ------------------------------------------------------------------------------------------------ edits
def _svd_work(shape: tuple[int, int] | list[int]) -> float:
    return shape[0] * shape[1] * min(shape)


def bench_edits(mode: str, operations: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.edits import EXACT_SVDS, IMPLEMENTATIONS, LOWRANK_THREADS, unavailable_reason

    operations = list(operations or IMPLEMENTATIONS)
    cases, skipped = [], {}
    cap = SVD_CAP_S[mode]
    measured: dict[str, tuple[tuple[int, int], float]] = {}  # a full SVD's last (shape, worker time)
    for shape, rounds, runs in EDITS[mode]:
        for operation, implementations in IMPLEMENTATIONS.items():
            if operation not in operations:
                continue
            names = list(implementations)
            results: dict[str, list[dict]] = {name: [] for name in names}
            for round_index in range(rounds):
                for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                    full_svd = operation == "lowrank" and name in EXACT_SVDS
                    reason = unavailable_reason(name) or skipped.get((operation, name))
                    if not reason and full_svd and name in measured:
                        (rows, cols), seconds = measured[name]
                        estimate = seconds * _svd_work(shape) / _svd_work((rows, cols))
                        if estimate > cap:
                            reason = (
                                f"skipped: estimated {estimate:.0f} s ({seconds:.0f} s at {rows}x{cols} × "
                                f"m·n·min(m, n)), over the {cap} s cap"
                            )
                    if reason:
                        results[name] = [{"skipped": reason}]
                        continue
                    log(f"edits {operation} {name} {shape[0]}x{shape[1]} (round {round_index + 1}/{rounds})")
                    spec = {
                        "kind": "edit",
                        "operation": operation,
                        "implementation": name,
                        "shape": list(shape),
                        "runs": 1 if full_svd else runs,
                        "low_rank_input": operation == "lowrank",
                        "rank": EDIT_RANK[mode],
                    }
                    if operation == "lowrank":
                        spec["threads"] = LOWRANK_THREADS
                    started = time.perf_counter()
                    result = run_worker(
                        spec,
                        timeout=cap if full_svd else 1200,
                        threads=LOWRANK_THREADS if operation == "lowrank" else None,
                    )
                    results[name].append(result)
                    if full_svd and "times_s" in result:
                        measured[name] = (shape, time.perf_counter() - started)
                    if result.get("timed_out"):  # a larger shape would only take longer
                        skipped[(operation, name)] = (
                            f"skipped: took over {cap} s at {shape[0]}x{shape[1]} "
                            "(the cap per case); its time grows with m·n·min(m, n)"
                        )
                        break
            cases.append(_summarise_edit(operation, shape, results))
    edits: dict[str, Any] = {"cases": cases, "operations": operations}
    if "lowrank" in operations:
        edits["lowrank_demo"] = bench_lowrank_demo(mode)
    return edits


def bench_lowrank_demo(mode: str) -> dict[str, Any]:
    """The randomized LowRank's error against the exact one on the real deltas of the demo pair."""
    if mode == "tiny":
        return {"skipped": "not run in tiny mode (building the demo pair takes minutes)"}
    from benchmarks.edits import LOWRANK_THREADS

    log("edits lowrank on the demo pair's deltas")
    return run_worker({"kind": "lowrank_demo", "threads": LOWRANK_THREADS}, timeout=1800, threads=LOWRANK_THREADS)


def merge_edits(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``previous`` with the cases of ``current``'s operations replaced (a ``--operations`` subset run)."""
    operations = set(current.get("operations", []))
    fresh = {(case["operation"], tuple(case["shape"])): case for case in current["cases"]}
    cases = []
    for case in previous.get("cases", []):
        key = (case["operation"], tuple(case["shape"]))
        if case["operation"] not in operations:
            cases.append(case)
        elif key in fresh:
            cases.append(fresh.pop(key))
    merged = {**previous, **{key: value for key, value in current.items() if key != "cases"}}
    merged["cases"] = cases + list(fresh.values())
    merged["operations"] = sorted(
        set(previous.get("operations", [])) | operations | {case["operation"] for case in cases},
        key=["dare", "magnitude", "lowrank"].index,
    )
    return merged


def _summarise_edit(operation: str, shape: tuple[int, int], results: dict[str, list[dict]]) -> dict[str, Any]:
    from benchmarks.edits import RANDOMIZED

    case: dict[str, Any] = {"operation": operation, "shape": list(shape), "implementations": {}}
    for name, runs in results.items():
        good = [run for run in runs if "error" not in run and "skipped" not in run]
        if not good:
            first = runs[0] if runs else {"skipped": "not run"}
            entry = {key: first[key] for key in ("error", "skipped", "timeout_s") if key in first}
            case["implementations"][name] = entry
            continue
        entry = {key: value for key, value in good[0].items() if key not in ("times_s", "extra_peak_mib")}
        entry["time_s"] = median([t for run in good for t in run["times_s"]])
        entry["extra_peak_mib"] = median([run["extra_peak_mib"] for run in good])
        case["implementations"][name] = entry
    ours = case["implementations"].get("lightning_delta", {})
    for name, entry in case["implementations"].items():
        if name == "lightning_delta":
            continue
        if name == RANDOMIZED:  # the opt-in against the exact default: randomized ÷ exact, and its F error
            if "time_s" in entry:
                entry["time_vs_exact"] = ratio(entry["time_s"], ours.get("time_s"))
                entry["memory_vs_exact"] = ratio(entry["extra_peak_mib"], ours.get("extra_peak_mib"))
            for key in ("randomized_f_error", "randomized_residual_excess"):
                if key in ours:
                    entry[key] = ours[key]
        elif "time_s" in entry:
            entry["time_ratio"] = ratio(ours.get("time_s"), entry["time_s"])
            entry["memory_ratio"] = ratio(ours.get("extra_peak_mib"), entry["extra_peak_mib"])
        elif "timeout_s" in entry and "time_s" in ours:
            entry["time_ratio_at_most"] = ours["time_s"] / entry["timeout_s"]
    return case


# ------------------------------------------------------------------------------------------------ processes
def bench_processes(mode: str) -> dict[str, Any]:
    from benchmarks import processes

    size, sequences, seq_len, batch, points, rounds = PROCESSES[mode]
    records: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as directory:
        for round_index in range(rounds):
            for devices in (1, 2) if round_index % 2 == 0 else (2, 1):
                log(f"processes {devices} (round {round_index + 1}/{rounds})")
                out = str(Path(directory) / f"result{devices}.json")
                records[devices].append(processes.run(out, devices, size, sequences, seq_len, batch, points, 1800))
    summary: dict[str, Any] = {
        "size": size,
        "sequences": sequences,
        "seq_len": seq_len,
        "batch": batch,
        "points": points,
    }
    for devices, runs in records.items():
        good = [run for run in runs if "error" not in run]
        if not good:
            summary[f"{devices}_process"] = {"error": runs[0].get("error") if runs else "not run"}
            continue
        summary[f"{devices}_process"] = {
            "validate_s": median([run["validate_s"] for run in good]),
            "wall_s": median([run["wall_s"] for run in good]),
            "sweep_s": median([run["sweep_s"] for run in good]),
            "threads": good[0]["threads"],
            "term": good[0]["term"],
            "exact": good[0]["exact"],
            "per_tensor": good[0]["per_tensor"],
        }
    one, two = summary.get("1_process", {}), summary.get("2_process", {})
    if "per_tensor" in one and "per_tensor" in two:
        reference = max(abs(value) for value in one["per_tensor"].values())
        summary["max_rel_diff_per_tensor"] = (
            max(abs(one["per_tensor"][name] - two["per_tensor"][name]) for name in one["per_tensor"]) / reference
        )
        summary["rel_diff_term"] = abs(one["term"] - two["term"]) / abs(one["term"])
        summary["rel_diff_exact"] = abs(one["exact"] - two["exact"]) / max(abs(one["exact"]), 1e-300)
        summary["speedup_validate"] = ratio(one["validate_s"], two["validate_s"])
        summary["speedup_sweep"] = ratio(one["sweep_s"], two["sweep_s"])
        summary["speedup_wall"] = ratio(one["wall_s"], two["wall_s"])
    for key in ("1_process", "2_process"):
        summary.get(key, {}).pop("per_tensor", None)
    return summary


# ------------------------------------------------------------------------------------------------ gpu
def bench_gpu(device: str, mode: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {"skipped": "not run: CPU run (use --device cuda on a GPU machine)"}
    spec = {
        "kind": "gpu",
        "size": "tiny" if mode == "tiny" else "8b",
        "batch": 1,
        "seq_len": 64 if mode == "tiny" else 2048,
        "points": 3 if mode != "full" else 5,
    }
    log(f"gpu {spec['size']}")
    return run_worker(spec, timeout=1800)


# ------------------------------------------------------------------------------------------------ report
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _goal(value: float | None, goal: float) -> str:
    if value is None:
        return "not measured"
    return f"{'met' if value <= goal else 'MISSED'} (goal ≤ {goal})"


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per figure: item, case, measured, baseline, ratio, goal."""
    from benchmarks.edits import RANDOMIZED

    rows = []
    items = results["items"]
    for size in items.get("riemann", {}).get("sizes", []):
        v = size["variants"]
        case = f"{size['size']} ({_fmt(size.get('parameters', 0) / 1e6)}M, {size['dtype']}, {size.get('tokens_per_point')} tok)"

        def cell(variant: str, key: str, unit: str, v: dict = v) -> str:
            entry = v.get(variant, {})
            return entry["error"][:40] if "error" in entry else f"{_fmt(entry.get(key))} {unit}"

        rows.append(
            [
                "riemann time/point",
                case,
                cell("library", "point_s", "s"),
                "naive " + cell("naive", "point_s", "s"),
                _fmt(size.get("time_ratio")),
                _goal(size.get("time_ratio"), GOALS["riemann_time"]),
            ]
        )
        rows.append(
            [
                "riemann extra peak",
                case,
                cell("library", "extra_peak_mib", "MiB"),
                "naive " + cell("naive", "extra_peak_mib", "MiB"),
                _fmt(size.get("memory_ratio")),
                _goal(size.get("memory_ratio"), GOALS["riemann_memory"]),
            ]
        )
        rows.append(
            [
                "no recompute / recompute",
                case,
                cell("library_no_recompute", "point_s", "s")
                + ", "
                + cell("library_no_recompute", "extra_peak_mib", "MiB"),
                "recompute (above)",
                f"time {_fmt(size.get('no_recompute_time_ratio'))}, mem {_fmt(size.get('no_recompute_memory_ratio'))}",
                "",
            ]
        )
        rows.append(
            [
                "riemann vs plain fwd+bwd",
                case,
                "library (above)",
                "plain " + cell("plain", "point_s", "s") + ", " + cell("plain", "extra_peak_mib", "MiB"),
                f"time {_fmt(size.get('time_vs_plain_ratio'))}, mem {_fmt(size.get('memory_vs_plain_ratio'))}",
                f"max rel diff vs naive {_fmt(size.get('max_rel_diff_vs_naive'), 2)}",
            ]
        )
    for paired in items.get("paired", {}).get("sizes", []):
        if "error" in paired:
            rows.append(["riemann time, paired", "", paired["error"][:60], "", "", ""])
            continue
        rows.append(
            [
                "riemann time/point, paired",
                f"{paired['size']} ({paired['dtype']}, {paired['tokens_per_point']} tok, "
                f"{len(paired['naive_s'])} pairs)",
                f"{_fmt(paired['library_median_s'])} s",
                f"naive {_fmt(paired['naive_median_s'])} s",
                _fmt(paired["time_ratio"]),
                _goal(paired["time_ratio"], GOALS["riemann_time"])
                + f"; median of pair ratios {_fmt(paired['median_paired_ratio'])}",
            ]
        )
    overhead = items.get("overhead")
    if overhead:
        if "error" in overhead:
            rows.append(["overhead", "", overhead["error"][:60], "", "", ""])
        else:
            rows.append(
                [
                    "overhead C-point analysis",
                    f"{overhead['size']} C={overhead['points']}, {overhead['tokens']} tok",
                    f"{_fmt(overhead['analysis_median_s'])} s",
                    f"C×plain {_fmt(overhead['plain_median_s'])} s",
                    _fmt(overhead["ratio"]),
                    _goal(overhead["ratio"], GOALS["overhead"]),
                ]
            )
    for case in items.get("edits", {}).get("cases", []):
        ours = case["implementations"].get("lightning_delta", {})
        label = f"{case['operation']} {case['shape'][0]}x{case['shape'][1]}"
        ours_cell = (
            f"{_fmt(ours.get('time_s'))} s, {_fmt(ours.get('extra_peak_mib'))} MiB{_threads(ours)}"
            if "time_s" in ours
            else ours.get("error", ours.get("skipped", ""))[:100]
        )
        if case["operation"] == "lowrank":
            ours_cell = "exact: " + ours_cell
        for name, entry in case["implementations"].items():
            if name == "lightning_delta":
                continue
            if name == RANDOMIZED:
                rows.append(_randomized_row(label, ours, entry))
                continue
            if "time_s" in entry:
                peer = f"{name} {_fmt(entry['time_s'])} s, {_fmt(entry['extra_peak_mib'])} MiB{_threads(entry)}"
                ratios = f"time {_fmt(entry.get('time_ratio'))}, mem {_fmt(entry.get('memory_ratio'))}"
            elif "time_ratio_at_most" in entry:
                peer = f"{name} > {entry['timeout_s']:.0f} s (cap)"
                ratios = f"time < {_fmt(entry['time_ratio_at_most'])}"
            else:
                peer = f"{name}: {(entry.get('skipped') or entry.get('error') or '')[:100]}"
                ratios = "–"
            rows.append(["edit " + label, "", ours_cell, peer, ratios, _agreement(case["operation"], ours, entry)])
    demo = items.get("edits", {}).get("lowrank_demo")
    if demo:
        if "ranks" in demo:
            for rank, entry in demo["ranks"].items():
                shapes = ", ".join(f"{rows_}x{cols}" for rows_, cols in entry["shapes"])
                rows.append(
                    [
                        "edit lowrank randomized, demo pair",
                        f"r={rank}, {entry['matrices']} real deltas ({shapes})",
                        f"F error vs exact: median {_fmt(entry['f_error_median'], 2)}, "
                        f"max {_fmt(entry['f_error_max'], 2)}",
                        "exact LowRank",
                        "–",
                        f"residual excess max {_fmt(entry['residual_excess_max'], 2)}",
                    ]
                )
        else:
            rows.append(
                [
                    "edit lowrank randomized, demo pair",
                    "",
                    (demo.get("skipped") or demo.get("error", ""))[:100],
                    "",
                    "",
                    "",
                ]
            )
    processes = items.get("processes")
    if processes:
        one, two = processes.get("1_process", {}), processes.get("2_process", {})
        rows.append(
            [
                "processes 1 vs 2 (DDP)",
                f"{processes['size']}, {processes['sequences']} seq",
                f"2 proc: sweep {_fmt(two.get('sweep_s'))} s, validate {_fmt(two.get('validate_s'))} s, "
                f"wall {_fmt(two.get('wall_s'))} s",
                f"1 proc: sweep {_fmt(one.get('sweep_s'))} s, validate {_fmt(one.get('validate_s'))} s, "
                f"wall {_fmt(one.get('wall_s'))} s",
                f"speedup sweep {_fmt(processes.get('speedup_sweep'))}, wall {_fmt(processes.get('speedup_wall'))}",
                f"max rel diff {_fmt(processes.get('max_rel_diff_per_tensor'), 2)}",
            ]
        )
    gpu = items.get("gpu")
    if gpu:
        if "skipped" in gpu or "error" in gpu:
            rows.append(["gpu 8B bf16", "", gpu.get("skipped") or gpu.get("error"), "", "", ""])
        else:
            rows.append(
                [
                    "gpu 8B bf16",
                    gpu["device"],
                    f"{_fmt(gpu['tokens_per_s'])} tok/s",
                    f"MFU {_fmt(gpu['mfu'])}",
                    f"max alloc {_fmt(gpu['max_memory_allocated_gib'])} GiB",
                    "",
                ]
            )
    if "generation" in items:
        from benchmarks import generation

        rows += generation.table_rows(items["generation"])
    return rows


def _threads(entry: dict) -> str:
    threads = entry.get("threads")
    return "" if threads is None else f" ({threads} thread{'s' if threads != 1 else ''})"


def _randomized_row(label: str, exact: dict, entry: dict) -> list[str]:
    """The randomized LowRank against the exact one: time, memory, and how far its F is."""
    if "time_s" not in entry:
        return [
            "edit " + label + " randomized",
            "",
            (entry.get("skipped") or entry.get("error") or "")[:100],
            "",
            "–",
            "",
        ]
    cell = f"randomized: {_fmt(entry['time_s'])} s, {_fmt(entry['extra_peak_mib'])} MiB{_threads(entry)}"
    if "time_s" in exact:
        baseline = f"exact LowRank {_fmt(exact['time_s'])} s, {_fmt(exact['extra_peak_mib'])} MiB{_threads(exact)}"
        ratios = f"time {_fmt(entry.get('time_vs_exact'))}, mem {_fmt(entry.get('memory_vs_exact'))}"
    else:
        baseline, ratios = "exact LowRank: " + (exact.get("skipped") or exact.get("error") or "not run")[:100], "–"
    if "randomized_f_error" in entry:
        check = (
            f"F error vs exact {_fmt(entry['randomized_f_error'], 2)}, residual "
            f"+{_fmt(entry['randomized_residual_excess'], 2)}"
        )
    else:
        check = f"F error not measured (no exact F); rel. residual {_fmt(entry.get('relative_error'), 4)}"
    return ["edit " + label + " randomized", "", cell, baseline, ratios, check]


def _agreement(operation: str, ours: dict, peer: dict) -> str:
    if operation == "lowrank":
        if "relative_error" in ours:
            return f"rel. error ours {_fmt(ours['relative_error'], 4)}" + (
                f", peer {_fmt(peer['relative_error'], 4)}" if "relative_error" in peer else ""
            )
        return ""
    if "kept" not in ours:
        return ""
    text = f"kept {ours['kept']} ×{_fmt(ours['kept_scale'], 4)}"
    if "kept" in peer:
        text += f" / {peer['kept']} ×{_fmt(peer['kept_scale'], 4)}"
    return text


def render_table(rows: list[list[str]], markdown: bool = False) -> str:
    header = ["item", "case", "lightning_delta", "baseline", "ratio", "goal / check"]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    out = [
        "# Benchmarks",
        "",
        f"Measured {results['date']} with `{results['command']}` ({results['mode']} mode, {results['elapsed_s']:.0f} s).",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"{info['memory_gib']} GiB; Python {info['python']}, torch {info['torch']}, lightning {info['lightning']}, "
        f"transformers {info['transformers']}, peft {info['peft']}, mergekit {info['mergekit']}; GPU: {info['gpu']}.",
        "The machine was shared with other work while measuring: variants alternate in order between rounds and "
        "every figure is a median, but absolute times are noisy; the ratios are the figures to read.",
        "",
        "Ratios are lightning_delta ÷ baseline (below 1: lightning_delta is faster or uses less memory). "
        "Memory is the extra peak resident set over the loaded-model baseline (model and E in memory), each variant "
        "in a fresh process.",
        "",
        render_table(table_rows(results), markdown=True),
        "",
        *[
            f"Items {', '.join(update['items'])} re-measured {update['date']} with `{update['command']}` "
            f"({update['elapsed_s']:.0f} s)."
            for update in results.get("updates", [])
        ],
        "",
        "## What is measured",
        "",
        "- **riemann**: one point of the Riemann sum (forward and backward on one batch, inner products per tensor). "
        "`naive`: `requires_grad` on every weight, a copy of W_post kept aside, `W ← W_post + t·E` written into the "
        "weights, backward, `(grad.double() * E.double()).sum()` per tensor. `library`: `EditedModel` under "
        "`recompute_weights()`; `library_no_recompute`: the parametrization alone; `plain`: forward and backward of "
        "the unedited model with weight gradients. The time is the median over points after the first of each "
        "process (which pays first-touch allocation); every tensor of the model is edited with a random E.",
        "- **paired**: naive and library points alternating in one process on one batch (two models, same "
        "weights); the first pair is a warm-up. Both ways see the same machine load, so this is the steadier time "
        "ratio; memory comes from the separate processes above.",
        "- **overhead**: `trainer.validate` with `RiemannCallback(num_points=C, trapezoid=False)` on a "
        "`DeltaEditModule` (C backward passes plus the forward at t = 1 for the exact ΔL, new Trainer each time) "
        "÷ C plain forward+backward passes over the same batches, interleaved.",
        "- **edits**: each implementation in a fresh process on the same random float32 tensor (p = 0.9, i.e. "
        "density 0.1); time is the median over runs, memory the first run's extra peak. LowRank: rank 64 of "
        "A·diag(i^-1/2)·B + noise (a slowly decaying spectrum over 512 directions), every implementation on one "
        "thread (LowRank's SVD always runs on one thread), one run for a full SVD, capped at "
        f"{SVD_CAP_S.get(results['mode'], 180)} s per worker and skipped where the previous shape's time × "
        'm·n·min(m, n) predicts more. The randomized row is `LowRank(method="randomized")` against the exact '
        "default: time ratio randomized ÷ exact, F error ‖F_rand − F_exact‖/‖F_exact‖ and residual excess "
        "‖ΔW − F_rand‖/‖ΔW − F_exact‖ − 1; the demo-pair rows measure the same on its real deltas.",
        "- **processes**: the same sweep (`RiemannCallback`, DeltaEditModule, UnrepeatedDistributedSampler) on 1 "
        "process and on 2 DDP processes sharing the cores.",
        "",
    ]
    details = _details_markdown(results)
    if details:
        out += ["## Details", "", *details, ""]
    return "\n".join(out)


def _details_markdown(results: dict[str, Any]) -> list[str]:
    lines = []
    for size in results["items"].get("riemann", {}).get("sizes", []):
        if size.get("note"):
            lines.append(f"- riemann {size['size']}: {size['note']}.")
        lines.append(
            f"- riemann {size['size']}: model {_fmt(size.get('model_mib'))} MiB, E {_fmt(size.get('edit_mib'))} "
            f"MiB; "
            + "; ".join(
                f"{name} baseline {_fmt(entry.get('baseline_mib'))} MiB, extra {_fmt(entry.get('extra_peak_mib'))} "
                f"MiB, {_fmt(entry.get('point_s'))} s/point"
                for name, entry in size["variants"].items()
                if "error" not in entry
            )
            + "."
        )
    processes = results["items"].get("processes")
    if processes and "rel_diff_term" in processes:
        lines.append(
            f"- processes: term rel. diff {_fmt(processes['rel_diff_term'], 2)}, exact ΔL rel. diff "
            f"{_fmt(processes['rel_diff_exact'], 2)}; threads per process "
            f"{processes['1_process']['threads']} / {processes['2_process']['threads']}."
        )
    overhead = results["items"].get("overhead")
    if overhead and "profile" in overhead:
        for label, table in overhead["profile"].items():
            lines += [
                f"- profile of one {label} point (top operators by self CPU time):",
                "",
                "```",
                *table.strip().splitlines()[:16],
                "```",
                "",
            ]
    return lines


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(ITEMS), help=f"comma-separated subset of {', '.join(ITEMS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: minutes instead of half an hour")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and tensors (tests: seconds, figures meaningless)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU item")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"), help="where to write the results")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="the Markdown report to rewrite")
    parser.add_argument("--no-markdown", action="store_true", help="leave the Markdown report alone")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="put this run's items into the existing --json results (same mode) and render the Markdown from the union",
    )
    parser.add_argument(
        "--operations",
        default=None,
        help="comma-separated subset of the edits item's operations "
        "(dare, magnitude, lowrank); with --merge the other operations' cases are kept",
    )
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler table to the overhead item")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every worker in this process (for tests: fast, but peaks mix and nothing is isolated)",
    )
    args = parser.parse_args(argv)
    items = [item.strip() for item in args.only.split(",") if item.strip()]
    unknown = [item for item in items if item not in ITEMS]
    if unknown:
        parser.error(f"unknown item(s) {', '.join(unknown)}; known: {', '.join(ITEMS)}")
    args.items = items
    if args.operations is not None:
        from benchmarks.edits import IMPLEMENTATIONS

        args.operations = [operation.strip() for operation in args.operations.split(",") if operation.strip()]
        unknown = [operation for operation in args.operations if operation not in IMPLEMENTATIONS]
        if unknown or not args.operations:
            parser.error(
                f"unknown operation(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(IMPLEMENTATIONS)}"
            )
    args.mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global IN_PROCESS
    args = parse_args(argv)
    IN_PROCESS = args.in_process
    start = time.perf_counter()
    command = "python -m benchmarks" + (
        "" if argv is None and len(sys.argv) == 1 else " " + shlex.join(argv if argv is not None else sys.argv[1:])
    )
    results: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "mode": args.mode,
        "machine": machine(),
        "goals": GOALS,
        "items": {},
    }
    for item in args.items:
        if item == "riemann":
            results["items"]["riemann"] = bench_riemann(args.mode, args.device)
        elif item == "paired":
            results["items"]["paired"] = bench_paired(args.mode)
        elif item == "overhead":
            results["items"]["overhead"] = bench_overhead(args.mode, args.profile)
        elif item == "edits":
            results["items"]["edits"] = bench_edits(args.mode, args.operations)
        elif item == "processes":
            results["items"]["processes"] = bench_processes(args.mode)
        elif item == "gpu":
            results["items"]["gpu"] = bench_gpu(args.device, args.mode)
        elif item == "generation":
            from benchmarks import generation

            results["items"]["generation"] = generation.run(args.mode)
    results["elapsed_s"] = elapsed = time.perf_counter() - start
    print(render_table(table_rows(results)))
    previous_path = Path(args.json)
    if args.merge and previous_path.exists():  # a subset run updates its items in the earlier full results
        previous = json.loads(previous_path.read_text())
        if previous.get("mode") == results["mode"]:
            if args.operations and "edits" in results["items"] and "edits" in previous["items"]:
                results["items"]["edits"] = merge_edits(previous["items"]["edits"], results["items"]["edits"])
            previous["items"].update(results["items"])
            previous.setdefault("updates", []).append(
                {key: results[key] for key in ("date", "command", "elapsed_s")} | {"items": list(results["items"])}
            )
            results = previous
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.no_markdown:
        Path(args.markdown).write_text(render_markdown(results))
    log(f"done in {elapsed:.0f} s; results in {args.json}")
    return results


if __name__ == "__main__":
    main()
