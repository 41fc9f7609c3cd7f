"""What ships inside the package: the configs, found by name from any directory, and the demo's reference pairs; and
the wheel built from the repository carries both."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lightning_delta.cli import run
from lightning_delta.demo.pair import SHIPPED_DIR, SHIPPED_SEEDS
from lightning_delta.shipped import CONFIGS_DIR, resolve_config_argument, shipped_config, shipped_config_names

REPO = Path(__file__).resolve().parents[1]


def test_the_clone_s_configs_folder_is_the_shipped_one():
    assert (REPO / "configs").resolve() == CONFIGS_DIR
    assert shipped_config_names() == sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))


def test_a_shipped_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run(["validate", "--config", "llama3-8b-instruct-gsm8k", "--print_config"])
    by_name = yaml.safe_load(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        run(["validate", "--config", str(CONFIGS_DIR / "llama3-8b-instruct-gsm8k.yaml"), "--print_config"])
    assert by_name == yaml.safe_load(capsys.readouterr().out)
    assert by_name["model"]["model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    with pytest.raises(SystemExit):
        run(["demo", "--config=demo.yaml", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["grid"] == yaml.safe_load(shipped_config("demo").read_text())["grid"]


def test_a_file_of_the_user_wins_over_a_shipped_name_and_an_unknown_name_lists_the_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text("num_points: 3\n")
    assert resolve_config_argument(["--config", "demo.yaml"]) == ["--config", "demo.yaml"]
    assert resolve_config_argument(["-c", "demo"]) == ["-c", str(CONFIGS_DIR / "demo.yaml")]
    assert resolve_config_argument(["--config", "mine/missing.yaml"]) == ["--config", "mine/missing.yaml"]
    with pytest.raises(
        FileNotFoundError,
        match="'llama3-8b' is neither a config file here nor a shipped config; "
        "the shipped configs are clip-vit-b32-eight-tasks, demo, ",
    ):
        run(["validate", "--config", "llama3-8b"])


@pytest.mark.subprocess
def test_the_wheel_carries_the_configs_and_the_reference_pairs(tmp_path):
    """The wheel built from the repository holds every shipped config and each reference pair's weights, config and
    record (the installed wheel's demo and ``--config NAME`` are run by ``.ci/wheel_check``)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("lightning_delta-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in shipped_config_names():
        assert f"lightning_delta/configs/{name}.yaml" in names, name
    for seed in SHIPPED_SEEDS:
        for file in (
            "pair.json",
            "pre/config.json",
            "pre/model.safetensors",
            "post/config.json",
            "post/model.safetensors",
        ):
            assert f"lightning_delta/demo/pairs/seed-{seed}/{file}" in names, (seed, file)
    assert sorted(path.name for path in SHIPPED_DIR.iterdir()) == [f"seed-{seed}" for seed in SHIPPED_SEEDS]
