"""The command line: validate (one Riemann analysis), sweep, edit (save_pretrained), help and print_config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_delta.cli import run
from lightning_delta.cli.parser import DeltaCLI
from lightning_delta.edits import DARE
from lightning_delta.sweep.run import sweep_points
from tests.test_plots import sweep_row
from tests.test_sweep import digits_config, without_timings


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    config = digits_config(tmp_path, None, tmp_path / "results.jsonl")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_print_config_shows_the_whole_analysis(config_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["validate", "--config", str(config_file), "--edit.p", "0.9", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["edit"] == {
        "class_path": "lightning_delta.edits.DARE",
        "init_args": {"p": 0.9, "k": 0.0, "rescale": True, "seed": 0},
    }
    assert printed["trainer"]["inference_mode"] is False
    assert printed["trainer"]["use_distributed_sampler"] is False
    assert printed["riemann"]["num_points"] == 2
    assert "model" in printed and "edit" not in printed["model"]  # linked from the top-level `edit`
    assert printed["sweep"]["results"].endswith("results.jsonl")


@pytest.mark.slow
def test_validate_runs_one_riemann_analysis(config_file, tmp_path):
    cli = run(
        [
            "validate",
            "--config",
            str(config_file),
            "--edit",
            "BitDelta",
            "--edit.bits",
            "2",
            "--riemann.filename",
            "result.json",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
        ]
    )
    assert isinstance(cli, DeltaCLI)
    metrics = cli.trainer.callback_metrics
    for key in ("riemann/term", "riemann/trapezoid", "riemann/exact", "accuracy/post", "accuracy/edit"):
        assert key in metrics
    assert cli.model.edit.bits == 2
    saved = json.loads((tmp_path / "run" / "lightning_logs" / "version_0" / "result.json").read_text())
    assert saved["num_points"] == 2 and saved["config"]["edit"]["name"] == "bitdelta"
    assert saved["term"] == pytest.approx(float(metrics["riemann/term"]))


@pytest.mark.slow
def test_validate_with_E_on_the_fly_gives_the_numbers_of_kept_E(config_file, tmp_path):
    """``--model.E_dtype on_the_fly`` through the command line, against the default (float32 E), bit for bit."""
    results = {}
    for E_dtype in ("float32", "on_the_fly"):  # noqa: N806
        cli = run(
            [
                "validate",
                "--config",
                str(config_file),
                "--model.E_dtype",
                E_dtype,
                "--riemann.filename",
                "result.json",
                f"--trainer.default_root_dir={tmp_path / E_dtype}",
            ]
        )
        assert cli.model.E_dtype == E_dtype
        results[E_dtype] = json.loads((tmp_path / E_dtype / "lightning_logs" / "version_0" / "result.json").read_text())
    for key in ("term", "exact", "loss_post", "loss_edit", "inner_products", "inner_products_per_tensor"):
        assert results["on_the_fly"][key] == results["float32"][key], key


@pytest.mark.slow
def test_validate_runs_write_into_versioned_directories(tmp_path, monkeypatch):
    """As the shipped configs: logger false, no default_root_dir. Each run gets the next lightning_logs/version_N of
    the working directory for its config.yaml and riemann.json; nothing lands in the working directory itself."""
    config = digits_config(tmp_path, None, tmp_path / "results.jsonl", limit=12)
    del config["trainer"]["default_root_dir"]
    config["trainer"]["logger"] = False
    config_path = tmp_path / "validate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    first = run(["validate", "--config", str(config_path), "--edit.p", "0.2"])
    run_0 = work / "lightning_logs" / "version_0"
    assert Path(first.trainer.log_dir) == run_0
    before = {name: (run_0 / name).read_bytes() for name in ("riemann.json", "config.yaml")}
    second = run(["validate", "--config", str(config_path), "--edit.p", "0.8"])
    run_1 = work / "lightning_logs" / "version_1"
    assert Path(second.trainer.log_dir) == run_1

    assert sorted(path.name for path in work.iterdir()) == ["lightning_logs"]
    assert sorted(path.name for path in (work / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    assert {name: (run_0 / name).read_bytes() for name in before} == before  # the first run's files are intact
    for directory, p in ((run_0, 0.2), (run_1, 0.8)):
        assert sorted(path.name for path in directory.iterdir()) == ["config.yaml", "riemann.json"]
        assert json.loads((directory / "riemann.json").read_text())["config"]["edit"]["p"] == p
        saved_config = yaml.safe_load((directory / "config.yaml").read_text())
        assert saved_config["edit"]["init_args"]["p"] == p
        assert saved_config["trainer"]["default_root_dir"] is None  # rerunning it makes a new version


@pytest.mark.slow
def test_validate_with_a_logger_writes_into_its_log_dir(config_file, tmp_path):
    logs = tmp_path / "logs"
    args = [
        "validate",
        "--config",
        str(config_file),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(logs),
        "--trainer.logger.name",
        "delta",
    ]
    for version in (0, 1):
        cli = run(args)
        directory = logs / "delta" / f"version_{version}"
        assert Path(cli.trainer.log_dir) == directory
        assert {"config.yaml", "riemann.json"} <= {path.name for path in directory.iterdir()}
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.slow
def test_validate_refuses_inference_mode(config_file):
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        run(["validate", "--config", str(config_file), "--trainer.inference_mode", "true"])


def test_bad_edit_argument_is_reported_with_the_edits(config_file):
    with pytest.raises(
        ValueError, match=r"Unknown edit 'NoSuchEdit' for --edit\. The edits are DARE, DELLA, .*Extrapolate"
    ):
        run(["validate", "--config", str(config_file), "--edit", "NoSuchEdit"])


def test_bad_edit_class_path_is_left_to_the_parser(config_file, capsys):
    with pytest.raises(SystemExit):
        run(["validate", "--config", str(config_file), "--edit", "lightning_delta.edits.NoSuchEdit"])
    assert "NoSuchEdit" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_points_are_normalised_by_the_parser(tmp_path):
    grid = [
        {"edit": "DARE", "edit.init_args.p": [0.1, 0.9]},
        {"edit": "lightning_delta.edits.DARE", "edit.init_args.p": 0.9, "edit.init_args.seed": 0},
    ]
    points, settings, _ = sweep_points(digits_config(tmp_path, grid, tmp_path / "r.jsonl"))
    assert len(points) == 2  # DARE(p=0.9) spelled with its default seed is the same point
    assert points[0].config["edit"] == {
        "class_path": "lightning_delta.edits.DARE",
        "init_args": {"p": 0.1, "k": 0.0, "rescale": True, "seed": 0},
    }
    assert points[0].config["riemann"]["filename"] is None
    assert "sweep" not in points[0].config
    assert settings["results"] == str(tmp_path / "r.jsonl")


@pytest.mark.slow
def test_sweep_command_writes_rows_and_figures(tmp_path):
    grid = [
        {"edit": "lightning_delta.edits.DARE", "edit.init_args.p": [0.2, 0.8]},
        {"edit": "lightning_delta.edits.Extrapolate", "edit.init_args.alpha": [-0.5, 0.5]},
    ]
    config = digits_config(tmp_path, grid, tmp_path / "r.jsonl", limit=12)
    config["sweep"]["figures"] = str(tmp_path / "figures")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    rows = run(["sweep", "--config", str(path), "--riemann.num_points", "3"])
    assert [row.edit["name"] for row in rows] == ["dare", "dare", "extrapolate", "extrapolate"]
    assert all(row.result.num_points == 3 for row in rows)
    assert (tmp_path / "figures" / "dare_p_k.png").is_file()
    assert (tmp_path / "figures" / "expo_alpha.png").is_file()
    again = run(["sweep", "--config", str(path), "--riemann.num_points", "3"])
    assert [row.key for row in again] == [row.key for row in rows]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_sweep_command_reuse_false_writes_the_rows_of_the_default(tmp_path):
    """--sweep.reuse false (every point loads W_post and runs the evaluator at t = 0 itself) through the command line:
    the rows of the default sweep, every field but the timings."""
    grid = {"edit": "lightning_delta.edits.DARE", "edit.init_args.p": [0.2, 0.8]}
    rows = {}
    for reuse in ([], ["--sweep.reuse", "false"]):
        results = tmp_path / f"r{len(reuse)}.jsonl"
        path = tmp_path / f"sweep{len(reuse)}.yaml"
        path.write_text(yaml.safe_dump(digits_config(tmp_path, grid, results, limit=12)))
        rows[bool(reuse)] = run(["sweep", "--config", str(path), *reuse])
    assert len(rows[False]) == 2 and rows[False][0].result.accuracy_post is not None
    assert without_timings(rows[False]) == without_timings(rows[True])


def test_sweep_command_refuses_a_results_file_another_sweep_holds(tmp_path):
    from filelock import FileLock

    results = tmp_path / "r.jsonl"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(digits_config(tmp_path, {"edit.init_args.p": [0.2, 0.8]}, results, limit=12)))
    other_sweep = FileLock(str(results) + ".lock")
    other_sweep.acquire()
    try:
        with pytest.raises(RuntimeError, match=rf"Another sweep holds {results} .*--sweep\.results"):
            run(["sweep", "--config", str(path)])
    finally:
        other_sweep.release()
    assert not results.exists()


@pytest.mark.slow
def test_edit_writes_a_model_that_from_pretrained_reads(llama_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "edited"
    run(
        [
            "edit",
            "--model",
            str(llama_pair.post_dir),
            "--pretrained",
            str(llama_pair.pre_dir),
            "--edit",
            "DARE",
            "--edit.p",
            "0.5",
            "--edit.seed",
            "3",
            "--output_dir",
            str(output),
        ]
    )
    assert any(output.glob("*.safetensors"))
    edited = AutoModelForCausalLM.from_pretrained(output)
    pre, post = llama_pair.pre.state_dict(), llama_pair.post.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    delta = post[name] - pre[name]
    expected = pre[name] + DARE(p=0.5, seed=3).edit_tensor(name, delta)
    torch.testing.assert_close(edited.state_dict()[name], expected)


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def _edit_args(pair, output: Path) -> list[str]:
    return [
        "edit",
        "--model",
        str(pair.post_dir),
        "--pretrained",
        str(pair.pre_dir),
        "--edit",
        "DARE",
        "--edit.p",
        "0.5",
        "--edit.seed",
        "3",
        "--output_dir",
        str(output),
    ]


def test_edit_refuses_a_non_empty_output_dir(llama_pair, tmp_path):
    output = tmp_path / "edited"
    shutil.copytree(llama_pair.pre_dir, output)  # another model's weights
    before = _files(output)
    with pytest.raises(ValueError, match=rf"output_dir {output} is not empty.*--overwrite true.*empty directory"):
        run(_edit_args(llama_pair, output))
    assert _files(output) == before
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".edited")] == []


def test_edit_overwrite_replaces_the_old_model_whole(llama_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "edited"
    shutil.copytree(llama_pair.post_dir, output)  # sharded: its model.safetensors.index.json must not survive
    assert (output / "model.safetensors.index.json").is_file()
    run([*_edit_args(llama_pair, output), "--overwrite", "true"])
    assert sorted(path.name for path in output.glob("*.safetensors")) == ["model.safetensors"]
    assert not (output / "model.safetensors.index.json").exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".edited")] == []
    edited = AutoModelForCausalLM.from_pretrained(output)
    pre, post = llama_pair.pre.state_dict(), llama_pair.post.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    expected = pre[name] + DARE(p=0.5, seed=3).edit_tensor(name, post[name] - pre[name])
    torch.testing.assert_close(edited.state_dict()[name], expected)


def test_edit_output_dir_that_is_a_file(llama_pair, tmp_path):
    output = tmp_path / "edited"
    output.write_text("a file")
    with pytest.raises(ValueError, match=rf"output_dir {output} exists and is not a directory"):
        run(_edit_args(llama_pair, output))
    assert output.read_text() == "a file"


@pytest.mark.slow
def test_console_entry_returns_nothing(tmp_path):
    from lightning_delta.cli import main

    row = sweep_row({"name": "dare", "p": 0.1, "k": 0.0}, "Digits/test", term=0.1, exact=0.1, accuracy=None)
    (tmp_path / "r.jsonl").write_text(json.dumps(row.to_dict()) + "\n")
    assert main(["plot", "--results", f"[{tmp_path / 'r.jsonl'}]", "--output_dir", str(tmp_path)]) is None


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        run(["--help"])
    out = capsys.readouterr().out
    for command in ("validate", "sweep", "edit", "plot", "demo"):
        assert command in out


@pytest.mark.parametrize("command, only_there", [("validate", "--ckpt_path"), ("sweep", "--sweep.grid")])
def test_validate_and_sweep_help_show_the_analysis_config(command, only_there, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run([command, "--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for argument in ("--config", "--model.model", "--edit", "--riemann.num_points", "--trainer.devices", only_there):
        assert argument in out


@pytest.mark.subprocess
@pytest.mark.parametrize("module", ["sweep", "sweep.run", "plots", "cli.parser", "cli.commands", "demo", "cli"])
def test_each_module_imports_first(module):
    """Imports point downward (sweep < plots < cli.parser < sweep.run < demo < cli): any of them can be the first one
    imported."""
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-c", f"import lightning_delta.{module}"], check=True, capture_output=True, timeout=300
    )


def test_the_model_section_has_the_module_arguments():
    """The command line's model section (delta_edit_module) takes DeltaEditModule's arguments, same defaults."""
    import inspect

    from lightning_delta.cli.parser import LossName, delta_edit_module
    from lightning_delta.losses import LOSSES
    from lightning_delta.module import DeltaEditModule

    section = inspect.signature(delta_edit_module).parameters
    module = dict(inspect.signature(DeltaEditModule).parameters)
    assert list(section) == list(module)
    assert {name: p.default for name, p in section.items()} == {name: p.default for name, p in module.items()}
    assert LossName.__args__ == tuple(LOSSES)


@pytest.mark.slow
def test_sweep_reads_the_config_validate_printed(config_file, capsys):
    """`validate --print_config > tiny.yaml` then `sweep --config tiny.yaml`: validate's own keys are ignored."""
    with pytest.raises(SystemExit):
        run(["validate", "--config", str(config_file), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {"ckpt_path", "verbose", "weights_only"} <= set(printed)
    points, _, _ = sweep_points(printed)
    alone, _, _ = sweep_points(
        {key: value for key, value in printed.items() if key not in ("ckpt_path", "verbose", "weights_only")}
    )
    assert [point.key for point in points] == [point.key for point in alone]
    assert "verbose" not in points[0].config


@pytest.mark.slow
def test_validate_prints_its_result_as_a_table(config_file, tmp_path, capsys):
    cli = run(
        ["validate", "--config", str(config_file), "--edit.p", "0.3", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    )
    result = cli.riemann_callback().result
    out = capsys.readouterr().out
    lines = out[out.index("Riemann analysis of DARE(p=0.3") :].splitlines()
    assert lines[0].startswith("Riemann analysis of DARE(p=0.3, k=0.0, rescale=True, seed=0) on Digits/test, C = 2,")
    assert lines[1].split() == ["term", "(left", "rule)", f"{result.term:+.6g}"]
    assert lines[2].split() == ["trapezoid", f"{result.trapezoid:+.6g}"]
    assert lines[3].split() == ["exact", "ΔL", f"{result.exact:+.6g}"]
    assert lines[4].split()[-3:] == [f"{result.loss_post:.6g}", "->", f"{result.loss_edit:.6g}"]
    assert lines[5].split()[-3:] == [f"{100 * result.accuracy_post:.2f}%", "->", f"{100 * result.accuracy_edit:.2f}%"]
    assert lines[6].startswith("  top 5 of ")
    modules: dict[str, float] = {}
    for tensor, value in result.term_per_tensor.items():
        modules[tensor.rsplit(".", 1)[0]] = modules.get(tensor.rsplit(".", 1)[0], 0.0) + value
    largest = sorted(modules, key=lambda name: abs(modules[name]), reverse=True)[:5]
    assert [line.split()[0] for line in lines[7:12]] == largest
    assert lines[12] == f"  written to {Path(cli.trainer.log_dir) / 'riemann.json'}"
    assert "Validate metric" not in out  # Lightning's own table only with --verbose true


@pytest.mark.slow
def test_validate_takes_a_quadrature_rule(config_file, tmp_path):
    """``--riemann.rule gauss``: the row's term is the Gauss–Legendre sum of its own inner products (weights from
    numpy, mapped to [0, 1] here), at 3 nodes without a backward at t = 0 or 1; the default stays the left rule."""
    cli = run(
        [
            "validate",
            "--config",
            str(config_file),
            "--riemann.rule",
            "gauss",
            "--riemann.num_points",
            "3",
            "--riemann.filename",
            "result.json",
            f"--trainer.default_root_dir={tmp_path / 'gauss'}",
        ]
    )
    saved = json.loads((tmp_path / "gauss" / "lightning_logs" / "version_0" / "result.json").read_text())
    nodes, weights = np.polynomial.legendre.leggauss(3)
    assert saved["rule"] == "gauss" and saved["passes"] == 3 and saved["trapezoid"] is None
    assert saved["points"][1:-1] == pytest.approx(list((nodes + 1) / 2), abs=1e-15)
    for name, values in saved["inner_products_per_tensor"].items():
        assert saved["term_per_tensor"][name] == pytest.approx(
            float(weights @ np.array(values)) / 2, rel=1e-12, abs=1e-15
        )
    assert float(cli.trainer.callback_metrics["riemann/completeness_gap"]) == pytest.approx(
        abs(saved["term"] - saved["exact"]), rel=1e-5
    )
    default = run(
        [
            "validate",
            "--config",
            str(config_file),
            "--riemann.filename",
            "result.json",
            f"--trainer.default_root_dir={tmp_path / 'left'}",
        ]
    )
    assert default.riemann_callback().result.rule == "left"
    assert default.riemann_callback().result.exact == pytest.approx(saved["exact"], rel=1e-12)


@pytest.mark.slow
def test_sweep_grid_varies_the_rule(tmp_path):
    """``riemann.rule`` (with its point count) as a grid key: one row per rule, each its own key, the same exact ΔL;
    the adaptive row carries its per-tensor error estimate."""
    grid = {
        "edit": "lightning_delta.edits.DARE",
        "edit.init_args.p": 0.5,
        "riemann.rule,riemann.num_points": [["left", 2], ["gauss", 2], ["adaptive", 7]],
    }
    config = digits_config(tmp_path, grid, tmp_path / "r.jsonl", limit=12)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    rows = run(["sweep", "--config", str(path)])
    assert [row.result.rule for row in rows] == ["left", "gauss", "adaptive"]
    assert [row.config["riemann"]["rule"] for row in rows] == ["left", "gauss", "adaptive"]
    assert len({row.key for row in rows}) == 3
    assert rows[0].result.passes == 3 and rows[1].result.passes == 2 and rows[2].result.passes in (3, 7)
    assert rows[1].result.exact == pytest.approx(rows[0].result.exact, rel=1e-12)
    assert rows[2].result.exact == pytest.approx(rows[0].result.exact, rel=1e-12)
    assert set(rows[2].result.error_per_tensor) == set(rows[2].result.term_per_tensor)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--edit.help", "DAREE"], "Unknown edit 'DAREE' for --edit.help. Did you mean DARE? The edits are DARE, "),
        (["--edit", "DAREE", "--edit.p", "0.9"], "Unknown edit 'DAREE' for --edit. Did you mean DARE? "),
        (
            ["--edit", "BitDelta", "--edit.p", "0.9"],
            "BitDelta takes no `p` (--edit.p); its arguments are bits, scale, magnitudes, seed, blocks, sign_of_zero "
            "(--edit.<argument>",
        ),
        (
            ["--edit.p", "0.9", "--edit", "DARE"],
            "--edit.p comes before --edit DARE: put --edit CLASS before its arguments, e.g. --edit DARE --edit.p 0.9.",
        ),
        (["--edit=DARE", "--edit.init_args.q=0.9"], "DARE takes no `q` (--edit.init_args.q); its arguments are p, k, "),
    ],
)
def test_a_misplaced_edit_argument_is_one_sentence_without_usage(arguments, message, config_file, capsys):
    """What ``lightning-delta validate`` prints for it: the problem and the fix in one line, no usage text and no
    "Does not validate against any of the Union subtypes"."""
    from lightning_delta.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(config_file), *arguments])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith(f"lightning-delta: error: {message}"), error
    assert len(error.splitlines()) == 2 and "usage" not in error and "Union" not in error


def test_edit_arguments_in_their_place_pass_the_check(config_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["validate", "--config", str(config_file), "--edit", "BitDelta", "--edit.bits", "2", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["edit"]["init_args"]["bits"] == 2


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (
            {"edit.init_args.p": [0.5, 1.0, 0.9]},
            r"The sweep grid point \{'edit.init_args.p': 1.0\} has an invalid edit: DARE: `p` must be in \[0, 1\)",
        ),
        (
            {"edit.init_args.q": [0.5, 0.9]},
            r"The sweep grid key 'edit.init_args.q': DARE takes no `q`; its arguments are p, k, rescale, seed\.",
        ),
        (
            {"riemann.num_point": [2, 3]},
            r"The sweep grid point \{'riemann.num_point': 2\} is not a valid config: .*num_point",
        ),
        (
            {"riemann.num_points": [2, 0]},
            r"The sweep grid point \{'riemann.num_points': 0\} has an invalid riemann: "
            r"`num_points` must be an integer >= 1",
        ),
    ],
)
@pytest.mark.slow
def test_every_grid_point_is_checked_before_the_first_one_runs(grid, message, tmp_path):
    """A value an edit refuses, or a key the config does not have, among valid points: no point runs (the valid
    points before it would otherwise run, and those after it never)."""
    config = digits_config(tmp_path, grid, tmp_path / "results.jsonl")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=message + r".* No point was run"):
        run(["sweep", "--config", str(tmp_path / "sweep.yaml")])
    assert not (tmp_path / "results.jsonl").exists() or not (tmp_path / "results.jsonl").read_text().strip()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--trainer.limit_val_batches", "0"], "RiemannCallback evaluated no validation batch"),
        (["--model.pretrained", "POST"], "ΔW = W_post − W_pre is zero in every one of the"),
    ],
)
@pytest.mark.slow
def test_validate_that_would_measure_nothing_exits_with_its_reason(change, message, config_file, tmp_path, capsys):
    """No batch evaluated, or W_pre naming the post-trained model: once exit status 0 with nothing written or every
    number +0; now status 1, the reason in one line, and no riemann.json."""
    from lightning_delta.cli import main

    config = yaml.safe_load(config_file.read_text())
    change = [config["model"]["model"] if value == "POST" else value for value in change]
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(config_file), *change])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.splitlines()[-2:]  # after transformers' loading bar
    assert error[0].startswith(f"lightning-delta: error: {message}"), error
    assert not list(tmp_path.rglob("riemann*.json"))
