"""Sweeps: grid expansion, keys, the JSONL results file (torn lines, corruption) and resuming a killed sweep."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock
from torch.nn.utils import parametrize

import lightning_delta.module
from lightning_delta import DeltaEditModule
from lightning_delta.callbacks import RiemannResult
from lightning_delta.demo.digits import answer_accuracy
from lightning_delta.edits import DARE
from lightning_delta.sweep import (
    ResultsFile,
    ResultsLockedError,
    SweepPoint,
    SweepReport,
    SweepRow,
    apply_overrides,
    config_key,
    expand_grid,
    iter_rows,
    make_points,
    run_sweep,
)
from lightning_delta.sweep.reuse import SweepReuse
from lightning_delta.sweep.run import sweep
from tests.support.tiny_models import make_tiny_pair

REPO = Path(__file__).resolve().parents[1]


def digits_config(tmp_path: Path, grid, results: Path, limit: int = 24, num_points: int = 2) -> dict:
    """A sweep config on a tiny random Llama pair (vocabulary 128 covers the digits' 96 tokens) and the digits."""
    pair = make_tiny_pair(tmp_path, "llama", shard=None, scale=0.05)
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {
            "model": str(pair.post_dir),
            "pretrained": str(pair.pre_dir),
            "loss": "causal_lm",
            "evaluator": "lightning_delta.demo.digits.answer_accuracy",
        },
        "data": {
            "class_path": "lightning_delta.demo.digits.DigitsDataModule",
            "init_args": {"split": "test", "limit": limit, "batch_size": 12},
        },
        "edit": {"class_path": "lightning_delta.edits.DARE", "init_args": {"p": 0.5}},
        "riemann": {"num_points": num_points},
        "sweep": {"results": str(results), "grid": grid},
    }


# ------------------------------------------------------------------------------------------------- the grid
def test_expand_grid_products_and_blocks():
    points = expand_grid(
        [
            {"edit": "DARE", "edit.init_args.p": [0.1, 0.5], "edit.init_args.k": [0, 1]},
            {"edit": "BitDelta", "edit.init_args.bits": [1, 2, 3]},
        ]
    )
    assert len(points) == 4 + 3
    assert points[0] == {"edit": "DARE", "edit.init_args.p": 0.1, "edit.init_args.k": 0}
    assert points[1] == {"edit": "DARE", "edit.init_args.p": 0.1, "edit.init_args.k": 1}  # last key fastest
    assert points[-1] == {"edit": "BitDelta", "edit.init_args.bits": 3}
    assert expand_grid(None) == [{}]


def test_expand_grid_zipped_keys():
    points = expand_grid({"data.task,model.task": [["mnist", "mnist"], ["svhn", "svhn"]], "p": [0.1, 0.9]})
    assert [(point["data.task"], point["model.task"], point["p"]) for point in points] == [
        ("mnist", "mnist", 0.1),
        ("mnist", "mnist", 0.9),
        ("svhn", "svhn", 0.1),
        ("svhn", "svhn", 0.9),
    ]


@pytest.mark.parametrize(
    "grid, match",
    [
        ({"a": []}, "no values"),
        ([{"a": [1]}, "b"], "must be a mapping"),
        ({"a,b": [[1, 2, 3]]}, "list of 2"),
    ],
)
def test_expand_grid_rejects_bad_grids(grid, match):
    with pytest.raises(ValueError, match=match):
        expand_grid(grid)


def test_apply_overrides_switches_class_and_keeps_input():
    base = {"edit": {"class_path": "lightning_delta.edits.DARE", "init_args": {"p": 0.1, "k": 0.5}}, "x": 1}
    same = apply_overrides(base, {"edit.init_args.p": 0.9})
    assert same["edit"]["init_args"] == {"p": 0.9, "k": 0.5}
    switched = apply_overrides(base, {"edit.init_args.bits": 2, "edit": "lightning_delta.edits.BitDelta"})
    assert switched["edit"] == {"class_path": "lightning_delta.edits.BitDelta", "init_args": {"bits": 2}}
    kept = apply_overrides(base, {"edit": "DARE"})  # the same class by its short name keeps its arguments
    assert kept["edit"]["init_args"] == {"p": 0.1, "k": 0.5}
    assert base["edit"]["init_args"] == {"p": 0.1, "k": 0.5}  # not modified


def test_config_key_is_canonical_and_ignores_volatile_keys():
    config = {
        "model": {"model": "post", "pretrained": "pre"},
        "edit": {"p": 0.5},
        "trainer": {"devices": 8, "strategy": "ddp", "precision": "bf16-true"},
    }
    reordered = {
        "trainer": {"precision": "bf16-true", "strategy": "auto", "devices": 1},
        "edit": {"p": 0.5},
        "model": {"pretrained": "pre", "model": "post"},
    }
    assert config_key(config) == config_key(reordered)
    assert config_key(config) != config_key({**config, "edit": {"p": 0.6}})
    assert config_key(config) != config_key({**config, "trainer": {"precision": "32-true"}})


def test_make_points_merges_equal_points():
    points = make_points({"a": 1}, [{"a": [1, 2]}, {"a": [2, 3]}])
    assert [point.config["a"] for point in points] == [1, 2, 3]


# ------------------------------------------------------------------------------------------ the results file
def test_results_file_torn_last_line_is_cut_and_corruption_raises(tmp_path):
    results = ResultsFile(tmp_path / "r.jsonl")
    assert results.read() == []
    results.append({"key": "a", "value": 1})
    results.append({"key": "b", "value": 2})
    with open(results.path, "ab") as handle:
        handle.write(b'{"key": "c", "val')  # a write cut short by a crash
    with pytest.warns(UserWarning, match="incomplete"):
        assert [row["key"] for row in results.read()] == ["a", "b"]
    results.repair()
    results.append({"key": "d"})
    assert [row["key"] for row in results.read()] == ["a", "b", "d"]
    assert results.path.read_bytes().endswith(b'{"key": "d"}\n')

    whole_file_torn = ResultsFile(tmp_path / "torn.jsonl")
    whole_file_torn.path.write_bytes(b'{"key": "x", ')
    whole_file_torn.repair()
    assert whole_file_torn.path.read_bytes() == b""

    missing_newline = ResultsFile(tmp_path / "nonl.jsonl")
    missing_newline.path.write_bytes(b'{"key": "x"}')
    missing_newline.repair()
    missing_newline.append({"key": "y"})
    assert [row["key"] for row in missing_newline.read()] == ["x", "y"]

    corrupt = ResultsFile(tmp_path / "corrupt.jsonl")
    corrupt.path.write_bytes(b'{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        corrupt.read()


def _row(point: SweepPoint, value: float = 0.0) -> SweepRow:
    """The row of a point whose result is ``value`` (as term and exact ΔL), without running anything."""
    result = RiemannResult(
        num_points=1,
        count=1.0,
        losses=[1.0, 1.0 + value],
        inner_products=[value, value],
        term=value,
        trapezoid=value,
        exact=value,
        loss_post=1.0,
        loss_edit=1.0 + value,
        rule="left",
        points=[0.0, 1.0],
        weights=[1.0, 0.0],
    )
    return SweepRow.of(point, {"name": "square"}, result, time.time())


def test_rows_read_back_equal_to_what_was_written(tmp_path):
    point = SweepPoint(
        {"edit.init_args.p": 0.5},
        {
            "edit": {"init_args": {"p": 0.5}},
            "data": {"class_path": "x.DigitsDataModule", "init_args": {"split": "test", "limit": 4}},
        },
        index=3,
    )
    row = _row(point, 0.25)
    results = ResultsFile(tmp_path / "r.jsonl")
    results.append(row.to_dict())
    (read,) = iter_rows(results.path)
    assert read == row and read.dataset == "Digits/test" and read.index == 3
    assert read.result.term == 0.25 and read.edit == {"name": "square"}


def test_a_row_with_fields_of_no_release_is_refused_by_name(tmp_path):
    """Version 0.1.0 reads only its own rows: a "metrics" copy of the result is an unknown field, named."""
    row = _row(SweepPoint({}, {"i": 0}), 0.5).to_dict()
    row["metrics"] = {"term": 0.5}
    with pytest.raises(ValueError, match=r"unknown fields \['metrics'\]"):
        SweepRow.from_dict(row)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda row: row.pop("result"), r"missing fields \['result'\]"),
        (lambda row: row.update(score=1), r"unknown fields \['score'\]"),
        (lambda row: row.update(result=[1, 2]), "a result that is no mapping"),
        (lambda row: row["result"].pop("term"), r"Not a RiemannResult: missing fields \['term'\]"),
    ],
)
def test_a_malformed_row_is_named_with_its_file_and_fields(tmp_path, mutate, match):
    good = _row(SweepPoint({}, {"i": 0}), 0.5).to_dict()
    bad = _row(SweepPoint({}, {"i": 1}), 0.5).to_dict()
    mutate(bad)
    results = ResultsFile(tmp_path / "r.jsonl")
    results.append(good)
    results.append(bad)
    with pytest.raises(ValueError, match=rf"r\.jsonl, row 2: .*{match}"):
        list(iter_rows(results.path))
    with pytest.raises(ValueError, match=match):
        SweepRow.from_dict(bad)


def test_run_sweep_skips_finished_points_and_stops_when_asked(tmp_path):
    points = [SweepPoint({"i": i}, {"i": i}, index=i) for i in range(5)]
    calls = []

    def run_point(point):
        calls.append(point.config["i"])
        return _row(point, point.config["i"] ** 2)

    rows = run_sweep(points, tmp_path / "r.jsonl", run_point, max_points=2)
    assert calls == [0, 1] and len(rows) == 2
    rows = run_sweep(points, tmp_path / "r.jsonl", run_point)
    assert calls == [0, 1, 2, 3, 4]
    assert [row.result.term for row in rows] == [0, 1, 4, 9, 16]
    assert {"key", "config", "versions", "seconds", "started"} <= set(ResultsFile(tmp_path / "r.jsonl").read()[0])
    assert "torch" in rows[0].versions
    run_sweep(points, tmp_path / "r.jsonl", run_point)
    assert calls == [0, 1, 2, 3, 4]  # nothing left to run


def test_run_sweep_writes_nothing_on_non_writing_ranks(tmp_path):
    points = [SweepPoint({"i": 0}, {"i": 0})]
    run_sweep(points, tmp_path / "r.jsonl", _row, should_write=lambda: False)
    assert not (tmp_path / "r.jsonl").exists()


def _squares(calls: list):
    def run_point(point):
        calls.append(point.config["i"])
        return _row(point, point.config["i"] ** 2)

    return run_point


def test_a_second_sweep_on_a_locked_results_file_stops_at_once(tmp_path):
    points = [SweepPoint({"i": i}, {"i": i}, index=i) for i in range(4)]
    results = tmp_path / "r.jsonl"
    calls: list = []
    run_sweep(points, results, _squares(calls), max_points=2)
    before = results.read_bytes()

    other_sweep = FileLock(str(results) + ".lock")  # what a running sweep on the same file holds
    other_sweep.acquire()
    try:
        with pytest.raises(
            ResultsLockedError,
            match=rf"Another sweep holds {results} .*Wait for that sweep to "
            r"finish.*another results file \(--sweep\.results\)",
        ):
            run_sweep(points, results, _squares(calls))
        assert calls == [0, 1]  # nothing was run
        assert results.read_bytes() == before  # nor written
    finally:
        other_sweep.release()

    rows = run_sweep(points, results, _squares(calls))  # the lock is free again: the sweep resumes
    assert calls == [0, 1, 2, 3]
    assert [row.result.term for row in rows] == [0, 1, 4, 9]
    keys = [row["key"] for row in ResultsFile(results).read()]
    assert len(keys) == len(set(keys)) == 4
    FileLock(str(results) + ".lock", timeout=0).acquire()  # the finished sweep let go of its lock


def test_only_the_writing_rank_takes_the_lock(tmp_path):
    points = [SweepPoint({"i": 0}, {"i": 0})]
    results = tmp_path / "r.jsonl"
    lock = FileLock(str(results) + ".lock")
    lock.acquire()  # held by rank 0 of the same distributed sweep
    try:
        calls: list = []
        run_sweep(points, results, _squares(calls), should_write=lambda: False)  # another rank: no lock, no rows
        assert calls == [0] and not results.exists()
    finally:
        lock.release()


def test_a_writer_that_turns_out_not_to_be_rank_zero_lets_go_of_the_lock(tmp_path):
    """The rank is only sure once the first trainer has set up: a process that took the lock and then learns it is
    not rank 0 frees it after its first point, and writes nothing."""
    points = [SweepPoint({"i": i}, {"i": i}, index=i) for i in range(2)]
    results = tmp_path / "r.jsonl"
    answers = iter([True, False, False])
    held_during = []

    def run_point(point):
        probe = FileLock(str(results) + ".lock", timeout=0)
        try:
            probe.acquire()
            probe.release()
            held_during.append(False)
        except Exception:
            held_during.append(True)
        return _row(point)

    run_sweep(points, results, run_point, should_write=lambda: next(answers))
    assert held_during == [True, False]
    assert ResultsFile(results).read() == []


# ------------------------------------------------------------------------------------------------- the report
def test_the_report_prints_a_line_per_point_and_a_table_with_what_is_left(tmp_path):
    import io

    points = [
        SweepPoint({"edit": "lightning_delta.edits.DARE", "edit.init_args.p": p}, {"p": p}, index=i)
        for i, p in enumerate([0.1, 0.5, 0.9])
    ]
    results = tmp_path / "r.jsonl"
    out = io.StringIO()
    run_sweep(points[:1], results, lambda point: _row(point, 0.25))  # run earlier
    run_sweep(points, results, lambda point: _row(point, 0.5), max_points=1, report=SweepReport(out))
    lines = out.getvalue().splitlines()
    assert lines[0] == f"Sweep: 3 points, 1 already in {results}, 2 to run, 1 of them now (--sweep.max_points)."
    assert re.fullmatch(r"\[1/1\] DARE p=0\.5: term \+0\.5, exact ΔL \+0\.5, accuracy -, \d+\.\d s", lines[1])
    table = [line.split() for line in lines[3:7]]
    assert table[0] == ["#", "point", "term", "exact", "ΔL", "accuracy", "seconds", "run"]
    assert table[1][:5] + table[1][-1:] == ["1", "DARE", "p=0.1", "+0.25", "+0.25", "before"]
    assert table[2][:5] + table[2][-1:] == ["2", "DARE", "p=0.5", "+0.5", "+0.5", "now"]
    assert table[3] == ["3", "DARE", "p=0.9", "left"]
    assert lines[7] == (
        f"1 point run now, 1 before, 1 left; rows in {results}. --sweep.max_points 1 stopped the "
        "sweep: run the same command again to run the 1 left."
    )


def test_the_report_draws_a_rich_progress_bar_on_a_terminal(tmp_path):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    points = [SweepPoint({"edit.init_args.p": p}, {"p": p}, index=i) for i, p in enumerate([0.1, 0.9])]
    out = Terminal()
    report = SweepReport(out)
    assert report.bar  # a terminal, and Rich is installed

    def run_point(point):
        assert report.live  # the bar is on the terminal while a point runs
        report.batches(2)
        report.batch_done()
        report.batch_done()
        return _row(point, 0.5)

    run_sweep(points, tmp_path / "r.jsonl", run_point, report=report)
    assert not report.live
    text = out.getvalue()
    assert "\x1b[" in text and "━" in text  # Rich's bar, drawn with ANSI control sequences
    assert "[2/2] p=0.9: term +0.5, exact ΔL +0.5, accuracy -" in text
    assert "2 points run now, 0 before, 0 left" in text
    assert SweepReport(io.StringIO()).bar is False  # not a terminal: lines only


@pytest.mark.slow
def test_sweep_prints_its_report_unless_told_not_to(tmp_path, capsys):
    config = digits_config(tmp_path, {"edit.init_args.p": [0.2, 0.8]}, tmp_path / "r.jsonl", limit=12)
    sweep(config, progress=False)  # what the demo can ask for: its own output only
    assert "[1/2]" not in capsys.readouterr().out
    config["sweep"]["grid"]["edit.init_args.p"].append(0.5)
    sweep(config)
    out = capsys.readouterr().out
    assert "[1/1] p=0.5: term " in out and "1 point run now, 2 before, 0 left" in out


# ------------------------------------------------------------------------------------------ reusing work
EVALUATOR_CALLS: list[int] = []


def counting_accuracy(model, batch):
    """The demo's digit accuracy, counting its calls (the test reads them)."""
    EVALUATOR_CALLS.append(len(batch["input_ids"]))
    return answer_accuracy(model, batch)


def reuse_grid(other) -> list[dict]:
    """Points that share W_post and the data (edits, W_pre, E_dtype, include, GradientBiased's gradient pass), points
    on the training images, and points of another model and back."""
    edits = "lightning_delta.edits."
    return [
        {"edit": edits + "DARE", "edit.init_args.p": [0.3, 0.9], "data.init_args.split": ["test", "train"]},
        {"edit": edits + "GradientBiased", "edit.init_args.p": 0.5, "edit.init_args.k": 1.0},
        {"edit": edits + "Extrapolate", "edit.init_args.alpha": 0.5, "model.pretrained": str(other.pre_dir)},
        {"edit": edits + "DARE", "edit.init_args.p": 0.5, "model.E_dtype": "model", "model.include": "mlp"},
        {
            "edit": edits + "DARE",
            "edit.init_args.p": 0.5,
            "model.model": str(other.post_dir),
            "model.pretrained": str(other.pre_dir),
        },
        {"edit": edits + "BitDelta", "riemann.num_points": 3},
    ]


def without_timings(rows: list[SweepRow]) -> list[str]:
    """Every field of the rows but ``started`` and ``seconds`` (when and how long), as JSON: floats by their exact
    repr, so that equal strings are equal bits (NaN, the t = 1 product without the trapezoid, included)."""
    return [
        json.dumps(
            {key: value for key, value in row.to_dict().items() if key not in ("started", "seconds")}, sort_keys=True
        )
        for row in rows
    ]


@pytest.mark.slow
def test_a_reusing_sweep_writes_the_rows_of_one_that_does_not(tmp_path, monkeypatch):
    """The default sweep loads W_post once per model and runs the evaluator at t = 0 once per data set; its rows equal,
    bit for bit, those of a sweep where every point loads and measures everything itself (--sweep.reuse false)."""
    other = make_tiny_pair(tmp_path / "other", "llama", seed=3, shard=None, scale=0.05)
    loads: list[str] = []
    load_model = lightning_delta.module.load_model

    def counting_load(source, *args, **kwargs):
        if isinstance(source, str):
            loads.append(source)
        return load_model(source, *args, **kwargs)

    monkeypatch.setattr(lightning_delta.module, "load_model", counting_load)
    runs = {}
    for reuse in (True, False):
        loads.clear()
        EVALUATOR_CALLS.clear()
        config = digits_config(tmp_path, reuse_grid(other), tmp_path / f"reuse-{reuse}.jsonl")
        config["model"]["evaluator"] = "tests.test_sweep.counting_accuracy"
        if not reuse:
            config["sweep"]["reuse"] = False
        rows = sweep(config, progress=False)
        runs[reuse] = (rows, list(loads), len(EVALUATOR_CALLS))

    (rows, loads_reusing, calls_reusing), (rows_alone, loads_alone, calls_alone) = runs[True], runs[False]
    assert len(rows) == 9
    assert without_timings(rows) == without_timings(rows_alone)
    accuracies = [row.result.accuracy_post for row in rows]
    assert accuracies[0] == accuracies[2] == accuracies[4] == accuracies[5] == accuracies[6] == accuracies[8]
    # W_post loaded for the first model, the other one, and the first again (one model is held at a time)
    post = str(Path(rows[0].config["model"]["model"]))
    assert loads_reusing == [post, str(other.post_dir), post]
    assert loads_alone == [post] * 7 + [str(other.post_dir), post]
    # 2 batches a point; the evaluator runs at t = 0 and t = 1 at the first point of each of the 3 data sets and
    # model, at t = 1 only at the 6 others
    assert calls_alone == 9 * 2 * 2
    assert calls_reusing == 3 * 2 * 2 + 6 * 2


def test_what_a_sweep_reuses_between_points_follows_its_config(tmp_path):
    """W_post is shared between configs that differ in the edit, W_pre, E and C, not in model, dtype, loss or trainer,
    nor under a sharding strategy; the accuracy at t = 0 between configs that differ in the edit alone."""
    base = digits_config(tmp_path, None, tmp_path / "r.jsonl")
    del base["sweep"]

    def changed(**overrides):
        return apply_overrides(base, overrides)

    model_key, accuracy_key = SweepReuse.model_key, SweepReuse.accuracy_key
    for same in (
        changed(edit={"class_path": "BitDelta"}),
        changed(**{"model.pretrained": "elsewhere"}),
        changed(**{"model.E_dtype": "model", "model.include": "mlp", "riemann.num_points": 7}),
    ):
        assert model_key(same) == model_key(base) is not None
        assert accuracy_key(same) == accuracy_key(base)
    for other_data in (
        changed(**{"data.init_args.split": "train"}),
        changed(**{"model.evaluator": None}),
        changed(**{"trainer.precision": "bf16-mixed"}),
        changed(**{"seed_everything": 1}),
    ):
        assert accuracy_key(other_data) != accuracy_key(base)
    for other_model in (
        changed(**{"model.model": "elsewhere"}),
        changed(**{"model.dtype": "bfloat16"}),
        changed(**{"trainer.precision": "bf16-true"}),
        changed(**{"model.loss": "dpo"}),
    ):
        assert model_key(other_model) != model_key(base)
        assert accuracy_key(other_model) != accuracy_key(base)
    dpo = changed(**{"model.loss": "dpo"})  # W_pre is the DPO loss's reference: part of both keys
    assert model_key(apply_overrides(dpo, {"model.pretrained": "elsewhere"})) != model_key(dpo)
    assert accuracy_key(apply_overrides(dpo, {"model.pretrained": "elsewhere"})) != accuracy_key(dpo)
    for sharded in ("fsdp", {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}, "deepspeed"):
        assert model_key(changed(**{"trainer.strategy": sharded})) is None
    for kept in ("ddp", "ddp_spawn", {"class_path": "lightning.pytorch.strategies.DDPStrategy"}):
        assert model_key(changed(**{"trainer.strategy": kept})) is not None
    assert model_key(changed(**{"model.model": {"class_path": "torch.nn.Linear"}})) is None


def test_dropping_the_edit_gives_back_w_post_as_loaded_for_the_next_edit(tmp_path):
    """What a reusing sweep does between two points: drop_edit leaves the model's tensors equal, bit for bit, to a
    fresh load of W_post, without parametrizations or gradients, and a module with another edit on that model builds
    the E of a fresh one."""
    pair = make_tiny_pair(tmp_path, "llama", shard=None, scale=0.05)
    first = DeltaEditModule(str(pair.post_dir), pretrained=str(pair.pre_dir), edit=DARE(p=0.5, seed=1))
    first.edited_model().set_t(1.0)
    first.drop_edit()
    loaded = DeltaEditModule(str(pair.post_dir), pretrained=str(pair.pre_dir), edit=DARE(p=0.9, seed=2))
    state, fresh = first.model.state_dict(), loaded.model.state_dict()
    assert state.keys() == fresh.keys()
    assert all(torch.equal(state[name], fresh[name]) for name in fresh)
    assert not any(parametrize.is_parametrized(module) for module in first.model.modules())
    assert [p.requires_grad for p in first.model.parameters()] == [p.requires_grad for p in loaded.model.parameters()]
    second = DeltaEditModule(first.model, pretrained=str(pair.pre_dir), edit=DARE(p=0.9, seed=2))
    reused, new = second.edited_model(), loaded.edited_model()
    assert reused.names == new.names and reused.names
    assert all(torch.equal(reused.E(name), new.E(name)) for name in new.names)


SWEEP_ON_TWO_PROCESSES = """
import json, sys
import torch
torch.set_num_threads(1)
from lightning_delta.sweep.run import sweep
config = json.loads(sys.argv[1])
sweep(config, progress=False)
"""


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_a_reusing_sweep_on_two_processes_writes_the_rows_of_one_that_does_not(tmp_path):
    """DDP on 2 CPU processes (each holds its own W_post and accuracies; the accuracy at t = 0 is the one reduced
    over both): the rows of the default sweep equal, bit for bit, those of --sweep.reuse false."""
    other = make_tiny_pair(tmp_path / "other", "llama", seed=3, shard=None, scale=0.05)
    script = tmp_path / "sweep_script.py"
    script.write_text(SWEEP_ON_TWO_PROCESSES)
    grid = [reuse_grid(other)[0], reuse_grid(other)[4]]
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    rows = {}
    for reuse in (True, False):
        results = tmp_path / f"reuse-{reuse}.jsonl"
        config = digits_config(tmp_path, grid, results)
        config["trainer"].update(devices=2, strategy="ddp")
        config["sweep"]["reuse"] = reuse
        finished = subprocess.run(
            [sys.executable, str(script), json.dumps(config)],
            cwd=tmp_path,
            env=env,
            timeout=300,
            capture_output=True,
            text=True,
        )
        assert finished.returncode == 0, finished.stderr[-4000:]
        assert "Starting with 2 processes" in finished.stderr
        rows[reuse] = ResultsFile(results).rows()
    assert len(rows[True]) == 5
    assert all(row.result.count > 0 and row.result.accuracy_post is not None for row in rows[True])
    assert without_timings(rows[True]) == without_timings(rows[False])


# ------------------------------------------------------------------------------------- a real killed sweep
@pytest.mark.subprocess
@pytest.mark.timeout(240)
def test_killed_sweep_resumes_without_losing_or_repeating_rows(tmp_path):
    results = tmp_path / "results.jsonl"
    grid = {"edit": "lightning_delta.edits.DARE", "edit.init_args.p": [0.1, 0.3, 0.5, 0.7, 0.9]}
    config_path = tmp_path / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(digits_config(tmp_path, grid, results)))
    command = [sys.executable, "-m", "lightning_delta.cli", "sweep", "--config", str(config_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and process.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
        assert process.poll() is None, f"the sweep ended before it could be killed: {process.stderr.read()[-2000:]}"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    before = results.read_bytes()
    killed_rows = ResultsFile(results).read()
    assert 1 <= len(killed_rows) < 5

    rows = sweep(["--config", str(config_path)])
    assert results.read_bytes().startswith(before.rpartition(b"\n")[0])  # what was written stays as it was
    keys = [row["key"] for row in ResultsFile(results).read()]
    assert len(keys) == len(set(keys)) == 5
    assert [row.edit["p"] for row in rows] == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert [row.key for row in rows[: len(killed_rows)]] == [row["key"] for row in killed_rows]
    for row in rows:
        assert None not in (row.result.term, row.result.trapezoid, row.result.exact, row.result.accuracy_edit)
        assert row.config["edit"]["init_args"]["p"] == row.edit["p"]
        assert row.dataset == "Digits/test"
