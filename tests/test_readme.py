"""Every Python block of the README, run as written (tiny local models for hub ids, CPU processes for GPUs), and
each of its numbers checked against an independent computation on plain weight copies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_delta.datamodules import GSM8KDataModule
from lightning_delta.delta import compute_delta
from lightning_delta.edits import DARE, BitDelta
from tests.support.datamodule_fixtures import GSM8K_ROWS, write_gsm8k
from tests.support.readme_support import BLOCKS, block, python_blocks, substitute, with_tiny_paths
from tests.support.riemann_support import token_dataset
from tests.support.tiny_models import make_tiny_pair

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_block_of_the_readme_is_run_here():
    assert len(python_blocks()) == len(BLOCKS)
    for name in BLOCKS:
        block(name)


@pytest.fixture
def pair(tmp_path):
    return make_tiny_pair(tmp_path, "llama", scale=0.01)


def plain_mean_loss(model: torch.nn.Module, loader) -> float:
    """Σ token losses / #tokens in float64 from plain forward passes (no library code but the batch's labels)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
            labels = batch["labels"][:, 1:]
            total += float(
                F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            )
            count += int((labels != -100).sum())
    return total / count


def edited_copy(pair, edit) -> torch.nn.Module:
    """W_pre + F(ΔW) written into a plain copy of the post-trained model, F applied to float64 deltas by hand."""
    model = AutoModelForCausalLM.from_pretrained(pair.post_dir)
    pre = AutoModelForCausalLM.from_pretrained(pair.pre_dir).state_dict()
    deltas = compute_delta(model, pretrained=pre)
    with torch.no_grad():
        for name, delta in deltas.items():
            edited = edit.edit_tensor(name, delta.double())
            model.get_parameter(name).copy_(pre[name].double() + edited)
    return model


def test_python_quick_start(pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_gsm8k(tmp_path / "gsm8k")
    my_datamodule = GSM8KDataModule(str(pair.post_dir), data=str(data), batch_size=2)
    namespace = {"my_datamodule": my_datamodule}
    exec(with_tiny_paths(block("python_quick_start"), pair.pre_dir, pair.post_dir), namespace)
    riemann, trainer = namespace["riemann"], namespace["trainer"]

    my_datamodule.setup("validate")
    loader = my_datamodule.val_dataloader()
    post = AutoModelForCausalLM.from_pretrained(pair.post_dir)
    loss_post = plain_mean_loss(post, loader)
    loss_edit = plain_mean_loss(edited_copy(pair, DARE(p=0.9, k=0.0, seed=0)), loader)
    assert riemann.result.loss_post == pytest.approx(loss_post, rel=1e-6)
    assert riemann.result.exact == pytest.approx(loss_edit - loss_post, rel=1e-4)
    # the default logger's versioned directory holds the JSON, equal to the result
    written = json.loads((Path(trainer.log_dir) / "riemann.json").read_text())
    assert Path(trainer.log_dir).resolve().is_relative_to(tmp_path.resolve())
    assert written["term"] == riemann.result.term and written["exact"] == riemann.result.exact


def test_export_block(pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(imports_of_the_quick_start(), namespace)  # a reader runs the blocks in order
    exec(with_tiny_paths(block("export"), pair.pre_dir, pair.post_dir, tmp_path / "edited"), namespace)
    written = {}
    for file in sorted((tmp_path / "edited").glob("*.safetensors")):
        written.update(load_file(file))
    expected = edited_copy(pair, BitDelta(bits=3)).state_dict()
    assert written.keys() <= expected.keys() and "lm_head.weight" in written
    for name, value in written.items():
        torch.testing.assert_close(value.double(), expected[name].double(), rtol=0, atol=1e-6)


class UserLM(pl.LightningModule):
    """A user's own module around the post-trained model, written with no thought of delta editing."""

    def __init__(self, post_dir) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(post_dir)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss  # Hugging Face's own mean over answer tokens


class UserLMWithValidation(UserLM):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))


def imports_of_the_quick_start() -> str:
    return block("python_quick_start").split("module =")[0]


def per_batch_mean_loss(model, loader) -> float:
    """What the callback reads from a foreign training_step: each batch's mean, weighted by its batch size."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            total += float(model(**batch).loss.double()) * len(batch["input_ids"])
            count += len(batch["input_ids"])
    return total / count


@pytest.mark.parametrize("user_class", [UserLMWithValidation, UserLM])
def test_existing_project_block(user_class, pair, tmp_path, monkeypatch):
    """The block's two calls, each on the kind of module its comment names, with the Trainer as written."""
    monkeypatch.chdir(tmp_path)
    text = with_tiny_paths(block("existing_project"), pair.pre_dir, pair.post_dir)
    other_call = (
        "riemann.validate(trainer, model, dataloaders=val_loader)"
        if user_class is UserLMWithValidation
        else "trainer.validate(model, dataloaders=val_loader)"
    )
    text = substitute(text, {other_call: "pass"})
    model = user_class(pair.post_dir)
    post = {name: value.clone() for name, value in model.model.state_dict().items()}
    val_loader = DataLoader(token_dataset(10), batch_size=4)
    namespace = {"model": model, "val_loader": val_loader}
    exec(imports_of_the_quick_start(), namespace)
    exec(text, namespace)
    riemann = namespace["riemann"]

    loss_post = per_batch_mean_loss(AutoModelForCausalLM.from_pretrained(pair.post_dir), val_loader)
    loss_edit = per_batch_mean_loss(edited_copy(pair, DARE(p=0.9)), val_loader)
    assert riemann.result.loss_post == pytest.approx(loss_post, rel=1e-6)
    assert riemann.result.exact == pytest.approx(loss_edit - loss_post, rel=1e-4)
    assert not parametrize.is_parametrized(model.model)  # back to W_post, as the README says
    assert all(torch.equal(value, post[name]) for name, value in model.model.state_dict().items())
    assert "validation_step" not in vars(model)


# ------------------------------------------------------------------------------------- multi-node, 2 processes
SCRIPT = ROOT / "tests" / "support" / "readme_multinode.py"


def run_multinode(tmp_path: Path, pair, data: Path, devices: int, strategy: str, logger: bool) -> dict:
    workdir = tmp_path / f"{strategy}-{devices}-{'logger' if logger else 'nologger'}"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [
        sys.executable,
        str(SCRIPT),
        str(workdir),
        str(pair.pre_dir),
        str(pair.post_dir),
        str(data),
        str(devices),
        strategy,
        "true" if logger else "false",
    ]
    finished = subprocess.run(command, env=env, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-4000:]
    files = sorted(workdir.rglob("riemann.json"))
    assert len(files) == 1, files
    if logger:  # Lightning's default logger: its versioned directory
        assert files[0].parent.name == "version_0" and files[0].parent.parent.name == "lightning_logs"
    return json.loads(files[0].read_text())


@pytest.fixture(scope="module")
def multinode_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    pair = make_tiny_pair(root, "llama", scale=0.01)
    rows = [GSM8K_ROWS[i % len(GSM8K_ROWS)] for i in range(7)]  # 7 rows: divisible by neither 2 nor the batch
    data = write_gsm8k(root / "gsm8k", test_rows=rows)
    single = run_multinode(root, pair, data, 1, "auto", logger=True)
    return root, pair, data, single


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
@pytest.mark.parametrize("logger", [True, False], ids=["default-logger", "logger-false"])
def test_multi_node_block_on_two_processes_equals_one(strategy, logger, multinode_setup, tmp_path):
    """The README's multi-node trainer, with its default callback arguments: no hang at the end of validation, the
    JSON written once, and the numbers of one process."""
    _, pair, data, single = multinode_setup
    result = run_multinode(tmp_path, pair, data, 2, strategy, logger)
    assert result["count"] == single["count"] > 0
    for key in ("term", "trapezoid", "exact", "loss_post", "loss_edit"):
        assert result[key] == pytest.approx(single[key], rel=1e-9, abs=1e-12), key
    for name, value in single["term_per_tensor"].items():
        assert result["term_per_tensor"][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
