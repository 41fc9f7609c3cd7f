"""The benchmark suite on tiny sizes: its report's structure, and that what it times computes the right thing.

No timing is asserted: only that the naive and the library Riemann passes agree, that peers and our edits agree
where they must (same keep count, same rescale), and that the table, JSON and Markdown come out whole.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import __main__ as bench
from benchmarks.common import PeakMemory, run_worker
from benchmarks.edits import DROP_RATE, RANDOMIZED, edit_worker, unavailable_reason

pytestmark = pytest.mark.slow  # the benchmarks' own machinery: real peers and timed items, seconds each


@pytest.mark.subprocess
def test_worker_in_a_fresh_process_reports_memory():
    spec = {"kind": "edit", "operation": "dare", "implementation": "lightning_delta", "shape": [512, 512]}
    result = run_worker(spec, timeout=120, threads=1)
    assert "error" not in result, result
    assert result["extra_peak_mib"] > 0.5  # at least the 1 MiB output, seen from a fresh process


@pytest.mark.subprocess
def test_worker_failure_is_reported_not_raised():
    result = run_worker({"kind": "nonsense"}, timeout=120, threads=1)
    assert "Unknown worker kind" in result["error"]


@pytest.mark.parametrize("peer", ["peft", "mergekit"])
def test_magnitude_peers_keep_the_same_count(peer):
    if unavailable_reason(peer):
        pytest.skip(unavailable_reason(peer))
    spec = {"operation": "magnitude", "shape": [60, 50]}
    ours = edit_worker({**spec, "implementation": "lightning_delta"})
    theirs = edit_worker({**spec, "implementation": peer})
    assert ours["kept"] == round((1 - DROP_RATE) * 3000)  # 300
    # the peers keep int(density·n): int(0.1 · 3000) = int(299.99999999999994) = 299, one fewer
    assert theirs["kept"] == int((1 - DROP_RATE) * 3000) and abs(ours["kept"] - theirs["kept"]) <= 1
    assert ours["kept_scale"] == pytest.approx(1.0) and theirs["kept_scale"] == pytest.approx(1.0)


@pytest.mark.parametrize("peer", ["peft", "mergekit"])
def test_dare_peers_keep_the_same_fraction_and_rescale(peer):
    if unavailable_reason(peer):
        pytest.skip(unavailable_reason(peer))
    spec = {"operation": "dare", "shape": [200, 150]}
    n = 200 * 150
    tolerance = 5 * math.sqrt(n * DROP_RATE * (1 - DROP_RATE))  # five binomial standard deviations
    ours = edit_worker({**spec, "implementation": "lightning_delta"})
    theirs = edit_worker({**spec, "implementation": peer})
    for result in (ours, theirs):
        assert abs(result["kept"] - (1 - DROP_RATE) * n) < tolerance
    assert ours["kept_scale"] == pytest.approx(1 / (1 - DROP_RATE))
    # peft divides by the density; mergekit's DARE matches the L1 norm, the same in expectation
    assert theirs["kept_scale"] == pytest.approx(1 / (1 - DROP_RATE), rel=1e-6 if peer == "peft" else 0.1)


def test_lowrank_matches_the_full_svd():
    spec = {"operation": "lowrank", "shape": [96, 64], "rank": 8, "low_rank_input": True, "threads": 1}
    ours = edit_worker({**spec, "implementation": "lightning_delta"})  # LowRank's default: the exact SVD
    svd = edit_worker({**spec, "implementation": "torch.linalg.svd"})
    assert ours["relative_error"] == pytest.approx(svd["relative_error"], rel=1e-5)
    assert ours["threads"] == svd["threads"] == 1
    # the exact worker measures how far the randomized opt-in is, on the same decaying spectrum
    randomized = edit_worker({**spec, "implementation": RANDOMIZED})
    assert 0 < ours["randomized_f_error"] < 0.1 and ours["randomized_residual_excess"] >= -1e-6
    assert randomized["relative_error"] >= ours["relative_error"] * (1 - 1e-6)  # Eckart–Young
    assert "randomized_f_error" not in randomized and "randomized_f_error" not in svd


def test_full_svd_is_skipped_where_its_estimated_time_exceeds_the_cap(monkeypatch):
    monkeypatch.setattr(bench, "IN_PROCESS", True)
    monkeypatch.setitem(bench.EDITS, "tiny", [((96, 64), 1, 1), ((192, 128), 1, 1)])
    monkeypatch.setitem(bench.SVD_CAP_S, "tiny", 1e-9)  # any measured time predicts more at the larger shape
    edits = bench.bench_edits("tiny", ["lowrank"])
    assert edits["operations"] == ["lowrank"] and "skipped" in edits["lowrank_demo"]
    small, large = edits["cases"]
    assert all("time_s" in entry for entry in small["implementations"].values())
    for name in ("lightning_delta", "torch.linalg.svd"):
        assert "estimated" in large["implementations"][name]["skipped"]
    assert "time_s" in large["implementations"][RANDOMIZED]  # the randomized one is not a full SVD
    rows = bench.table_rows({"items": {"edits": edits}})
    assert any("F error not measured" in row[-1] for row in rows)


def test_merge_edits_replaces_only_the_measured_operations():
    def case(operation, shape, time_s):
        return {"operation": operation, "shape": shape, "implementations": {"lightning_delta": {"time_s": time_s}}}

    previous = {
        "cases": [
            case("dare", [8, 8], 1.0),
            case("lowrank", [8, 8], 1.0),
            case("dare", [16, 8], 1.0),
            case("lowrank", [16, 8], 1.0),
        ]
    }
    current = {"cases": [case("lowrank", [8, 8], 2.0)], "operations": ["lowrank"], "lowrank_demo": {"ranks": {}}}
    merged = bench.merge_edits(previous, current)
    kept = [(c["operation"], c["shape"], c["implementations"]["lightning_delta"]["time_s"]) for c in merged["cases"]]
    assert kept == [("dare", [8, 8], 1.0), ("lowrank", [8, 8], 2.0), ("dare", [16, 8], 1.0)]
    assert merged["lowrank_demo"] == {"ranks": {}} and merged["operations"] == ["dare", "lowrank"]


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as memory:
        block = torch.ones(32 << 20, dtype=torch.uint8)  # 32 MiB, touched
        del block
    assert memory.extra >= 16 << 20


def test_quick_tiny_run_writes_table_json_and_markdown(tmp_path, capsys):
    out, markdown = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    bench.main(
        [
            "--tiny",
            "--in-process",
            "--only",
            "riemann,paired,edits,gpu",
            "--json",
            str(out),
            "--markdown",
            str(markdown),
        ]
    )
    results = json.loads(out.read_text())
    assert set(results) >= {"date", "command", "mode", "machine", "goals", "items", "elapsed_s"}
    assert results["mode"] == "tiny" and results["machine"]["cores"] >= 1
    size = results["items"]["riemann"]["sizes"][0]
    assert set(size["variants"]) == {"naive", "library", "library_no_recompute", "plain"}
    # the library's inner products are the naive way's, with and without recomputed weights
    assert size["max_rel_diff_vs_naive"] < 1e-6 and size["max_rel_diff_no_recompute_vs_naive"] < 1e-6
    naive = torch.tensor(size["variants"]["naive"]["inner"])
    assert naive.shape == (3, len(size["variants"]["naive"]["names"])) and naive.abs().max() > 0
    for key in ("time_ratio", "memory_ratio", "no_recompute_time_ratio", "memory_vs_plain_ratio"):
        assert key in size
    cases = results["items"]["edits"]["cases"]
    assert {case["operation"] for case in cases} == {"dare", "magnitude", "lowrank"}
    lowrank = next(case for case in cases if case["operation"] == "lowrank")["implementations"]
    assert set(lowrank) == {"lightning_delta", "torch.linalg.svd", RANDOMIZED}
    assert {entry["threads"] for entry in lowrank.values()} == {1}  # like for like: one thread each
    assert lowrank[RANDOMIZED]["randomized_f_error"] == lowrank["lightning_delta"]["randomized_f_error"]
    assert "skipped" in results["items"]["edits"]["lowrank_demo"]  # tiny mode does not build the demo pair
    for case in cases:
        assert "time_s" in case["implementations"]["lightning_delta"]
        for name, entry in case["implementations"].items():
            assert "time_s" in entry or "skipped" in entry or "error" in entry, (name, entry)
    paired = results["items"]["paired"]["sizes"][0]
    assert len(paired["naive_s"]) == len(paired["library_s"]) == 2 and paired["time_ratio"] > 0
    assert "not run" in results["items"]["gpu"]["skipped"]
    table = capsys.readouterr().out
    assert "riemann time/point" in table and "edit magnitude" in table
    text = markdown.read_text()
    assert text.startswith("# Benchmarks") and "| item |" in text and results["command"] in text

    # a subset run with --merge keeps the other items and records itself
    bench.main(["--tiny", "--in-process", "--only", "gpu", "--merge", "--json", str(out), "--markdown", str(markdown)])
    merged = json.loads(out.read_text())
    assert set(merged["items"]) == {"riemann", "paired", "edits", "gpu"} and merged["updates"][0]["items"] == ["gpu"]
    assert "re-measured" in markdown.read_text()

    # --operations lowrank re-measures LowRank only; the other operations' cases stay
    before = [case for case in merged["items"]["edits"]["cases"] if case["operation"] != "lowrank"]
    bench.main(
        [
            "--tiny",
            "--in-process",
            "--only",
            "edits",
            "--operations",
            "lowrank",
            "--merge",
            "--json",
            str(out),
            "--markdown",
            str(markdown),
        ]
    )
    edits = json.loads(out.read_text())["items"]["edits"]
    assert [case for case in edits["cases"] if case["operation"] != "lowrank"] == before
    assert [case["operation"] for case in edits["cases"]].count("lowrank") == 1
    assert "edit lowrank 96x64 randomized" in markdown.read_text()


def test_unknown_item_is_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "riemann,warp"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "edits", "--operations", "lowrank,svd"])
    assert bench.parse_args(["--only", "edits", "--operations", "lowrank"]).operations == ["lowrank"]


def test_in_place_variant_gives_the_parametrizations_inner_products():
    """What benchmarks/inplace.py compares computes the same ⟨∇L, E⟩ per tensor in all three ways."""
    from benchmarks.inplace import VARIANTS, run_variant

    results = {variant: run_variant(variant, hidden=64, layers=1, tokens=32, repeats=1) for variant in VARIANTS}
    reference = results["parametrization"]["inner"]
    assert len(reference) == 8  # q, k, v, o, gate, up, down of the one layer and the LM head
    for result in results.values():
        assert result["inner"].keys() == reference.keys()
        for name, value in reference.items():
            assert result["inner"][name] == pytest.approx(value, rel=1e-5, abs=1e-9), name


def test_generation_item_times_the_same_tokens_in_every_variant(tmp_path):
    """benchmarks/generation.py: the naive, previous and library variants give the same answer tokens, and the
    emulated answer ends stop rows at different lengths; the suite's table and Markdown carry the rows."""
    out, markdown = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    bench.main(["--tiny", "--in-process", "--only", "generation", "--json", str(out), "--markdown", str(markdown)])
    cases = json.loads(out.read_text())["items"]["generation"]["cases"]
    assert [case["case"] for case in cases] == ["no stop", "answers end"]
    for case in cases:
        assert case["identical"] and case["answer_tokens"] == sum(case["row_lengths"])
        assert set(case["tokens_per_s"]) == {"naive", "previous", "library"}
    assert cases[0]["row_lengths"] == [16] * 8
    assert min(cases[1]["row_lengths"]) < 16 and len(cases[1]["stop_strings"]) == 1
    assert markdown.read_text().count("| generation tok/s |") == 2


def test_della_comparison_keeps_the_same_fraction_and_dare_and_sort_is_dare():
    """benchmarks/edits.py's DELLA comparison: every implementation keeps about 1 − p of the entries; the
    "DARE + one sort" bound returns DARE's output (the sort is only timed)."""
    from benchmarks.edits import DARE_AND_SORT, DELLA_EPSILON, DELLA_IMPLEMENTATIONS

    spec = {"operation": "della", "shape": [200, 150]}
    n = 200 * 150
    tolerance = 5 * math.sqrt(n * DROP_RATE * (1 - DROP_RATE))
    results = {}
    for name in DELLA_IMPLEMENTATIONS["della"]:
        if unavailable_reason(name):
            continue
        results[name] = edit_worker({**spec, "implementation": name})
        assert abs(results[name]["kept"] - (1 - DROP_RATE) * n) < tolerance, name
    assert results[DARE_AND_SORT]["kept"] == results["DARE"]["kept"]
    assert results[DARE_AND_SORT]["kept_scale"] == results["DARE"]["kept_scale"] == pytest.approx(1 / (1 - DROP_RATE))
    # DELLA divides each kept entry by its own keep probability, 1 − p ± ε/2: the mean scale lies between
    half = DELLA_EPSILON / 2
    assert 1 / (1 - DROP_RATE + half) < results["lightning_delta"]["kept_scale"] < 1 / (1 - DROP_RATE - half)
