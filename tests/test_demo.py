"""The demo end to end on a reduced setting: a real (tiny) pair trained on the digits, cached, swept, tabled, plotted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import lightning_delta.demo.pair as pair_module
from lightning_delta.cli import run
from lightning_delta.demo import PairSettings, build_pair, demo_grid, findings, table
from lightning_delta.demo.digits import (
    SEQUENCE_LENGTH,
    VOCAB_SIZE,
    DigitsDataModule,
    digit_sequences,
    load_digit_splits,
)
from lightning_delta.sweep import expand_grid
from tests.test_plots import sweep_row

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a busy box

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--pair.hidden_size", "16", "--pair.intermediate_size", "32", "--pair.pretrain_steps", "30",
         "--pair.posttrain_steps", "10", "--pair.batch_size", "32"]
GRID = ("[{edit: lightning_delta.edits.DARE, edit.init_args.p: [0.1, 0.9]},"
        " {edit: lightning_delta.edits.DARE, edit.init_args.p: 0.9, edit.init_args.rescale: false},"
        " {edit: lightning_delta.edits.BitDelta, edit.init_args.bits: [1, 3]},"
        " {edit: lightning_delta.edits.Extrapolate, edit.init_args.alpha: [-0.5, 0.5]}]")


def test_digit_sequences_layout():
    images, digits = load_digit_splits()["test"]
    assert images.shape == (450, 64) and images.max() <= 16
    batch = digit_sequences(images[:3], digits[:3])
    assert batch["input_ids"].shape == (3, SEQUENCE_LENGTH)
    assert int(batch["input_ids"].max()) < VOCAB_SIZE
    assert (batch["labels"][:, :-1] == -100).all()  # the answer token only
    assert (batch["labels"][:, -1] == batch["input_ids"][:, -1]).all()
    generic = digit_sequences(images[:3], digits[:3], answer_only=False, answer_digits=(99,))
    assert (generic["labels"][:, 1:33] == generic["input_ids"][:, 1:33]).all() and (generic["labels"][:, -1] == -100).all()
    with pytest.raises(ValueError, match="split"):
        DigitsDataModule(split="validation")


@pytest.mark.timeout(240)
def test_reduced_demo_end_to_end_and_cache_reuse(tmp_path, monkeypatch, capsys):
    cache, output = tmp_path / "cache", tmp_path / "out"
    args = ["demo", "--cache_dir", str(cache), "--output_dir", str(output), "--num_points", "3",
            "--eval_limit", "40", "--grid", GRID, *SMALL]
    rows = run(args)
    first = capsys.readouterr().out
    assert "Trained pair" in first
    assert [row.edit["name"] for row in rows] == ["dare", "dare", "dare", "bitdelta", "bitdelta", "extrapolate",
                                                     "extrapolate"]
    assert "| edit | params | data | term | trapezoid | exact ΔL | accuracy |" in first
    assert "The paper's findings on this pair:" in first
    assert len((output / "results.jsonl").read_text().splitlines()) == 7
    assert (output / "table.md").is_file() and (output / "sweep.yaml").is_file()
    for name in ("dare_p_k", "per_module", "expo_alpha", "bitdelta_bits", "interpolation_extrapolation", "loss_curve"):
        assert (output / "figures" / f"{name}.png").is_file()
    (entry,) = [path for path in cache.iterdir() if path.name.startswith("digits-llama-")]
    weights = sorted(entry.rglob("*.safetensors"))
    stamps = [path.stat().st_mtime_ns for path in weights]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached pair was trained again")

    monkeypatch.setattr(pair_module, "_train", no_training)
    again = run(args)
    second = capsys.readouterr().out
    assert "Loaded cached pair" in second
    assert [path.stat().st_mtime_ns for path in weights] == stamps
    assert [row.result.exact for row in again] == pytest.approx([row.result.exact for row in rows])
    assert len((output / "results.jsonl").read_text().splitlines()) == 7  # a fresh results file, not appended


def test_cache_key_follows_the_settings(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pair_module, "_train", lambda model, *args, **kwargs: calls.append(1))
    settings = PairSettings(hidden_size=8, intermediate_size=8, num_attention_heads=2)
    first = build_pair(tmp_path, settings)
    assert first.trained and len(calls) == 2
    assert not build_pair(tmp_path, settings).trained and len(calls) == 2
    other = build_pair(tmp_path, PairSettings(hidden_size=8, intermediate_size=8, num_attention_heads=2, seed=1))
    assert other.trained and other.pre_dir != first.pre_dir
    assert build_pair(tmp_path, settings, retrain=True).trained


def test_findings_say_where_they_depart():
    def row(edit, exact, term=None, data="Digits/test"):
        return sweep_row(edit, data, term=exact if term is None else term, exact=exact, accuracy=0.5)

    rows = [row({"name": "dare", "p": 0.1, "k": 0.0, "rescale": True}, 0.001),
            row({"name": "dare", "p": 0.9, "k": 0.0, "rescale": True}, 0.5, term=0.3),
            row({"name": "dare", "p": 0.9, "k": 0.0, "rescale": False}, 0.2),
            row({"name": "bitdelta", "bits": 1}, 0.3), row({"name": "bitdelta", "bits": 2}, 0.1)]
    lines = findings(rows)
    assert any("barely changes" in line and line.endswith("holds.") for line in lines)
    assert any("sign of ΔL in 5 of 5 rows" in line for line in lines)
    assert any("Drop only is worse" in line and line.endswith("DEPARTS.") for line in lines)
    assert any("BitDelta bits" in line and line.endswith("holds.") for line in lines)
    assert "| dare | p=0.1 k=0 | Digits/test |" in table(rows)


def test_demo_yaml_is_the_demo_default(capsys):
    with pytest.raises(SystemExit):
        run(["demo", "--config", str(REPO / "configs" / "demo.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        run(["demo", "--print_config"])
    defaults = yaml.safe_load(capsys.readouterr().out)
    assert printed["grid"] == demo_grid() and printed["num_points"] == 5
    assert len(expand_grid(printed["grid"])) == 30  # the README's table
    assert {**printed, "grid": None} == defaults  # the default grid (None) is that of configs/demo.yaml


def test_demo_without_its_config_says_where_it_looked(tmp_path):
    missing = tmp_path / "demo.yaml"
    with pytest.raises(FileNotFoundError, match=rf"grid from {missing}, which is not there.*pip install -e"):
        demo_grid(missing)
