"""Every paper config parses as written (multi-GPU DDP, bf16) and runs with its models swapped for tiny ones of the
same architecture and its data for tiny local files, on CPU with one device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from lightning_delta.cli import run
from lightning_delta.cli.parser import DeltaCLI
from lightning_delta.sweep import expand_grid
from tests.support.datamodule_fixtures import (
    write_fusionbench_repository,
    write_gsm8k,
    write_hub_cache_entry,
    write_ultrafeedback,
)
from tests.support.tiny_models import make_fake_hub_repo, make_tiny_pair

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_CONFIGS = {
    "llama3-8b-instruct-gsm8k.yaml": ("llama", 45 + 5 + 5 + 1 + 5),
    "mistral-7b-instruct-v0.3-gsm8k.yaml": ("mistral", 45 + 5 + 5 + 1 + 5),
    "qwen2-7b-instruct-gsm8k.yaml": ("qwen2", 45 + 5 + 5 + 1 + 5),
    "zephyr-7b-dpo-full-ultrafeedback-expo.yaml": ("mistral", 20),
    "clip-vit-b32-eight-tasks.yaml": ("clip", 8 * 25),
}


# Configs under ModelParallelStrategy (FSDP2): family and grid size.
SHARDED_CONFIGS = {"llama3-70b-instruct-gsm8k-fsdp.yaml": ("llama", 10 + 5)}


# The example plan config (lightning-delta plan): family and the model it plans.
PLAN_CONFIGS = {"plan-llama3-8b-instruct-gsm8k.yaml": "llama"}


def test_every_config_is_tested():
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == sorted(
        [*PAPER_CONFIGS, *SHARDED_CONFIGS, *PLAN_CONFIGS, "demo.yaml"]
    )


@pytest.mark.slow
def test_plan_config_as_written_plans_within_its_budget(tmp_path, monkeypatch):
    """The example plan config as shipped, but for its hub ids and data (tiny local ones, the same formats): it plans
    the matrices it names within the uniform 2-bit budget and writes plan.json where it says."""
    import json

    name = "plan-llama3-8b-instruct-gsm8k.yaml"
    pair = make_tiny_pair(tmp_path, PLAN_CONFIGS[name], shard=None, scale=0.05)
    config = yaml.safe_load((CONFIGS / name).read_text())
    replacements = {
        config["model"]: str(pair.post_dir),
        config["pretrained"]: str(pair.pre_dir),
        "openai/gsm8k": str(write_gsm8k(tmp_path / "gsm8k")),
    }
    config = _swap(config, replacements)
    (tmp_path / name).write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    plan = run(["plan", "--config", name])
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["settings"] == plan.settings and plan.cost <= plan.budget
    assert set(plan.settings) == {tensor for tensor in pair.post.state_dict() if tensor.endswith("_proj.weight")}
    assert set(plan.settings.values()) <= {1, 2, 3, 4}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_config_parses_with_ddp_and_bf16(name):
    cli = DeltaCLI(args=["--config", str(CONFIGS / name)], run=False, instantiate=False)
    config = cli.config
    assert config.trainer.strategy == "ddp" and config.trainer.devices == 8 and config.trainer.num_nodes == 1
    assert config.trainer.precision == "bf16-true" and config.trainer.inference_mode is False
    assert config.trainer.use_distributed_sampler is False
    assert config.model.dtype == "bfloat16"
    assert config.riemann.num_points == 5
    assert config.sweep.results.startswith("results/")
    assert len(expand_grid(config.sweep.grid)) == PAPER_CONFIGS[name][1]


def test_print_config_of_a_paper_config(capsys):
    with pytest.raises(SystemExit):
        run(["validate", "--config", str(CONFIGS / "llama3-8b-instruct-gsm8k.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["pretrained"] == "meta-llama/Meta-Llama-3-8B"
    assert printed["data"]["class_path"] == "lightning_delta.datamodules.GSM8KDataModule"


def _on_cpu(config: dict, tmp_path: Path, name: str) -> dict:
    config["trainer"].update(
        accelerator="cpu",
        devices=1,
        num_nodes=1,
        strategy="auto",
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
    )
    config["sweep"].update(results=str(tmp_path / f"{name}.jsonl"), figures=str(tmp_path / "figures"), max_points=2)
    return config


def _tiny_language_config(config: dict, tmp_path: Path, family: str) -> dict:
    pair = make_tiny_pair(tmp_path, family, shard=None, scale=0.05)
    config["model"].update(model=str(pair.post_dir), pretrained=str(pair.pre_dir))
    data = config["data"]["init_args"]
    data.update(tokenizer=str(pair.post_dir), batch_size=2, limit=2, max_length=96)
    if "evaluator" in config["model"]:
        config["model"]["evaluator"]["init_args"].update(tokenizer=str(pair.post_dir), max_new_tokens=2)
    return config


@pytest.mark.parametrize(
    "name", ["llama3-8b-instruct-gsm8k.yaml", "mistral-7b-instruct-v0.3-gsm8k.yaml", "qwen2-7b-instruct-gsm8k.yaml"]
)
@pytest.mark.slow
def test_gsm8k_config_runs_on_a_tiny_model(name, tmp_path):
    config = yaml.safe_load((CONFIGS / name).read_text())
    config = _tiny_language_config(config, tmp_path, PAPER_CONFIGS[name][0])
    config["data"]["init_args"]["data"] = str(write_gsm8k(tmp_path / "gsm8k"))
    rows = run(["sweep", "--config", _write(_on_cpu(config, tmp_path, name), tmp_path)])
    assert [(row.edit["p"], row.edit["k"]) for row in rows] == [(0.1, -1.0), (0.1, -0.5)]
    for row in rows:
        assert row.dataset == "GSM8K/test"
        assert row.result.accuracy_edit is not None
        assert abs(row.result.trapezoid - row.result.exact) < 0.1 * abs(row.result.exact) + 1e-2


@pytest.mark.slow
def test_zephyr_expo_config_runs_on_a_tiny_model(tmp_path):
    name = "zephyr-7b-dpo-full-ultrafeedback-expo.yaml"
    config = yaml.safe_load((CONFIGS / name).read_text())
    config = _tiny_language_config(config, tmp_path, "mistral")
    write_ultrafeedback(tmp_path / "ultrafeedback")
    config["data"]["init_args"]["data"] = str(tmp_path / "ultrafeedback")
    rows = run(["sweep", "--config", _write(_on_cpu(config, tmp_path, name), tmp_path)])
    assert [row.edit["alpha"] for row in rows] == [-1.0, -0.9]
    assert rows[0].result.loss_post > 0
    assert (tmp_path / "figures" / "expo_alpha.png").is_file()


@pytest.mark.slow
def test_clip_config_runs_on_a_tiny_model(tmp_path):
    name = "clip-vit-b32-eight-tasks.yaml"
    config = yaml.safe_load((CONFIGS / name).read_text())
    pair = make_tiny_pair(tmp_path, "clip", shard=None, scale=0.05)
    mnist = str(tmp_path / "mnist")
    write_fusionbench_repository(tmp_path / "mnist", "ylecun/mnist", "mnist", {"test": [[3, 1, 4, 1, 5, 9, 2]]})
    zero_shot = config["model"]["model"]["init_args"]
    zero_shot.update(clip=str(pair.pre_dir), vision_model=str(pair.post_dir), data=mnist)
    config["model"]["pretrained"] = str(pair.pre_dir)
    config["data"]["init_args"].update(data=mnist, processor=str(pair.pre_dir), batch_size=4)
    (block,) = config["sweep"]["grid"]
    (tasks,) = [key for key in block if key.startswith("data.init_args.task,")]
    block[tasks] = [["mnist", mnist, None, "mnist", mnist, None, str(pair.post_dir)]]
    rows = run(["sweep", "--config", _write(_on_cpu(config, tmp_path, name), tmp_path)])
    assert [row.dataset for row in rows] == ["Vision/mnist/test"] * 2
    assert all(name.startswith(("vision_model.", "visual_projection.")) for name in rows[0].result.term_per_tensor)


def _tiny_clip_reading_long_prompts(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny CLIP pre/post pair whose text tower reads 128 tokens, saved under ``tmp_path``: the tiny tokenizer
    splits GTSRB's longest prompt into 80 tokens (CLIP's own into fewer than its 77 positions)."""
    import torch
    from transformers import CLIPModel

    from tests.support.tiny_models import make_post_trained, save_model, tiny_config

    config = tiny_config("clip")
    config.text_config.max_position_embeddings = 128
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pre = CLIPModel(config).eval()
    post = make_post_trained(pre, scale=0.05)
    return save_model(pre, tmp_path / "clip" / "pre"), save_model(post, tmp_path / "clip" / "post")


@pytest.mark.slow
def test_clip_config_runs_all_eight_tasks_by_hub_id_offline_from_the_hub_cache(tmp_path, offline_hub):
    """The shipped CLIP config as written (hub ids of the models and of FusionBench's data sets), with a hub
    download cache holding a tiny CLIP, its fine-tuned towers and tiny copies of the eight data sets in their hub
    layout, under HF_HUB_OFFLINE=1: one DARE point per task."""
    name = "clip-vit-b32-eight-tasks.yaml"
    config = yaml.safe_load((CONFIGS / name).read_text())
    (block,) = config["sweep"]["grid"]
    (tasks,) = [key for key in block if key.startswith("data.init_args.task,")]
    pre, post = _tiny_clip_reading_long_prompts(tmp_path)
    make_fake_hub_repo(offline_hub, config["model"]["pretrained"], pre)
    labels = {}
    for task, repo_id, _, _, _, _, tower in block[tasks]:
        make_fake_hub_repo(offline_hub, tower, post)
        size = {"sun397": 397, "stanford_cars": 196, "gtsrb": 43, "dtd": 47, "resisc45": 45}.get(task, 10)
        labels[task] = [[size - 1, 0, 1], [size // 2, 2]]
        write_fusionbench_repository(tmp_path / "data" / task, repo_id, task, {"test": labels[task]})
        write_hub_cache_entry(offline_hub, repo_id, tmp_path / "data" / task)
    block.update({"edit.init_args.p": [0.5], "edit.init_args.k": [0.0]})
    config["trainer"].update(
        accelerator="cpu",
        devices=1,
        num_nodes=1,
        strategy="auto",
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
    )
    config["sweep"].update(results=str(tmp_path / "results.jsonl"), figures=str(tmp_path / "figures"))
    rows = run(["sweep", "--config", _write(config, tmp_path)])
    assert [row.dataset for row in rows] == [f"Vision/{row[0]}/test" for row in block[tasks]]
    for row, (_, repo_id, data_config, *_) in zip(rows, block[tasks]):
        assert (
            row.config["data"]["init_args"]["data"] == repo_id
            and row.config["data"]["init_args"]["config"] == data_config
        )
        assert row.result.count == 5  # both files of the test split
        assert row.result.accuracy_post is not None
        assert all(name.startswith(("vision_model.", "visual_projection.")) for name in row.result.term_per_tensor)
    assert all(row.result.loss_post > 0 for row in rows)


def _write(config: dict, tmp_path: Path) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


# ------------------------------------------------------------------ the shipped configs as written
def _swap(value, replacements: dict[str, str]):
    """``value`` with every string that is a key of ``replacements`` swapped, at any depth; nothing else changes."""
    if isinstance(value, dict):
        return {key: _swap(item, replacements) for key, item in value.items()}
    if isinstance(value, list):
        return [_swap(item, replacements) for item in value]
    return replacements.get(value, value) if isinstance(value, str) else value


def _tiny_replacements(name: str, tmp_path: Path) -> dict[str, str]:
    """The hub ids and data locations of ``configs/<name>`` -> tiny local models and data in the same formats."""
    family = {**PAPER_CONFIGS, **SHARDED_CONFIGS}[name][0]
    pair = make_tiny_pair(tmp_path, family, shard=None, scale=0.05)
    if family == "clip":
        write_fusionbench_repository(tmp_path / "mnist", "ylecun/mnist", "mnist", {"test": [[3, 1, 4, 1, 5, 9, 2]]})
        return {
            "openai/clip-vit-base-patch32": str(pair.pre_dir),
            "tanganke/clip-vit-base-patch32_mnist": str(pair.post_dir),
            "ylecun/mnist": str(tmp_path / "mnist"),
        }
    config = yaml.safe_load((CONFIGS / name).read_text())
    replacements = {config["model"]["model"]: str(pair.post_dir), config["model"]["pretrained"]: str(pair.pre_dir)}
    if "ultrafeedback" in name:
        write_ultrafeedback(tmp_path / "ultrafeedback")
        replacements["HuggingFaceH4/ultrafeedback_binarized"] = str(tmp_path / "ultrafeedback")
    else:
        replacements["openai/gsm8k"] = str(write_gsm8k(tmp_path / "gsm8k"))
    return replacements


def _as_written_on_cpu(name: str, tmp_path: Path, devices: int) -> Path:
    """``configs/<name>`` with only its hub ids and data locations swapped for tiny local ones, and GPUs for CPU
    processes (one node; a sharded strategy over those processes): strategy, precision, logger, callback and data
    arguments stay as shipped."""
    config = _swap(yaml.safe_load((CONFIGS / name).read_text()), _tiny_replacements(name, tmp_path))
    config["trainer"].update(accelerator="cpu", devices=devices, num_nodes=1)
    strategy = config["trainer"]["strategy"]
    if isinstance(strategy, dict) and "data_parallel_size" in strategy.get("init_args", {}):
        strategy["init_args"]["data_parallel_size"] = devices
    path = tmp_path / f"{devices}" / name
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _validate_in_subprocess(config: Path) -> dict:
    import json
    import os
    import shutil
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1")
    command = [
        shutil.which("lightning-delta") or str(Path(sys.executable).with_name("lightning-delta")),
        "validate",
        "--config",
        str(config),
    ]
    finished = subprocess.run(command, cwd=config.parent, env=env, timeout=400, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-4000:]
    (written,) = config.parent.glob("lightning_logs/version_*/riemann.json")
    assert (written.parent / "config.yaml").is_file()
    assert not (config.parent / "riemann.json").exists()
    return json.loads(written.read_text())


@pytest.mark.distributed
def test_llama_config_as_written_on_two_processes_equals_one(tmp_path):
    """The shipped LLaMA config (DDP, bf16, logger off, the callback's defaults) through the console script on 2 CPU
    processes: it ends (no hang at the end of validation) and gives the numbers of one process."""
    name = "llama3-8b-instruct-gsm8k.yaml"
    single = _validate_in_subprocess(_as_written_on_cpu(name, tmp_path, devices=1))
    double = _validate_in_subprocess(_as_written_on_cpu(name, tmp_path, devices=2))
    assert double["count"] == single["count"] > 0
    # bf16 as shipped: the two processes batch other rows together (other padding), which moves bf16 rounding by
    # ~0.2 % of the term; in float64 two processes equal one to 1e-15 (tests/test_distributed.py)
    for key in ("term", "trapezoid", "exact", "loss_post", "loss_edit"):
        assert double[key] == pytest.approx(single[key], rel=1e-2), key


@pytest.mark.subprocess
@pytest.mark.parametrize("name", sorted(set(PAPER_CONFIGS) - {"llama3-8b-instruct-gsm8k.yaml"}))
def test_config_as_written_validates_through_the_console_script(name, tmp_path):
    """Each other shipped config, as written but for its hub ids, data locations and CPU, through `lightning-delta
    validate`: it runs, writes its result into a run directory of its own, and the trapezoid estimate is close to the
    exact ΔL (C = 5 on a tiny pair)."""
    result = _validate_in_subprocess(_as_written_on_cpu(name, tmp_path, devices=1))
    assert result["count"] > 0
    assert abs(result["trapezoid"] - result["exact"]) <= 0.1 * abs(result["exact"]) + 1e-3


def test_sharded_config_parses_with_model_parallel_strategy_and_bf16():
    name = "llama3-70b-instruct-gsm8k-fsdp.yaml"
    cli = DeltaCLI(args=["--config", str(CONFIGS / name)], run=False, instantiate=False)
    config = cli.config
    assert config.trainer.strategy.class_path == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert config.trainer.strategy.init_args.data_parallel_size == config.trainer.devices * config.trainer.num_nodes
    assert config.trainer.strategy.init_args.tensor_parallel_size == 1
    assert config.trainer.precision == "bf16-true" and config.model.E_dtype == "model"
    assert len(expand_grid(config.sweep.grid)) == SHARDED_CONFIGS[name][1]


@pytest.mark.distributed
def test_sharded_70b_config_as_written_on_two_processes_equals_one(tmp_path):
    """The shipped 70B config (ModelParallelStrategy, FSDP2, bf16, E in bf16, the GSM8K evaluator) with a tiny Llama
    through the console script: 2 CPU processes sharding the model give the numbers of 1 process."""
    name = "llama3-70b-instruct-gsm8k-fsdp.yaml"
    single = _validate_in_subprocess(_as_written_on_cpu(name, tmp_path, devices=1))
    double = _validate_in_subprocess(_as_written_on_cpu(name, tmp_path, devices=2))
    assert double["count"] == single["count"] > 0
    assert double["accuracy_post"] == single["accuracy_post"] and double["accuracy_edit"] == single["accuracy_edit"]
    # bf16 as shipped: the processes batch other rows together (as for the DDP config above)
    for key in ("term", "trapezoid", "exact", "loss_post", "loss_edit"):
        assert double[key] == pytest.approx(single[key], rel=1e-2), key
