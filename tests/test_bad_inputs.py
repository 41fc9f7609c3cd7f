"""Every bad input of ``docs/bad_inputs.md``, one test each: the error type and the start of its message.

The table is written from :data:`CASES` (``python -m tests.test_bad_inputs > docs/bad_inputs.md``) and
``test_the_docs_table_is_this_list`` keeps the two equal, so a row of the table is a test and a test is a row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"


class Case(NamedTuple):
    id: str
    given: str  # what the user wrote or passed
    error: type[Exception]  # or a Warning class: the input is used, with a warning
    message: str  # the start of the message, after the tmp directory is written <tmp>
    call: Callable[[Path], object]


def _edits():
    from lightning_delta import edits

    return edits


def _tiny_linear_pair():
    post = nn.Linear(3, 2)
    pre = {name: value.detach().clone() - 0.1 for name, value in post.state_dict().items()}
    return pre, post


def _tied_model():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    return model


def _compressed(tmp: Path) -> tuple[Path, nn.Module]:
    """A compressed BitDelta of a tiny linear pair in ``tmp/delta``, and the base module it applies to."""
    from lightning_delta.compress import save_compressed
    from lightning_delta.edits import BitDelta

    pre, post = _tiny_linear_pair()
    base = nn.Linear(3, 2)
    base.load_state_dict(pre)
    return save_compressed(post, pretrained=pre, edit_or_plan=BitDelta(), output_dir=tmp / "delta"), base


def _compressed_other_version(tmp: Path):
    import json

    from lightning_delta.compress import apply_compressed_

    path, base = _compressed(tmp)
    header = json.loads((path / "compressed.json").read_text())
    (path / "compressed.json").write_text(json.dumps({**header, "version": 2}))
    apply_compressed_(base, path)


def _compressed_other_base(tmp: Path):
    from lightning_delta.compress import apply_compressed_

    path, _ = _compressed(tmp)
    apply_compressed_(nn.Linear(4, 2), path)


def _compressed_truncated(tmp: Path):
    from lightning_delta.compress import apply_compressed_

    path, base = _compressed(tmp)
    shard = path / "delta-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    apply_compressed_(base, path)


def _results_locked(tmp: Path):
    from lightning_delta.sweep import ResultsLock

    path = tmp / "results.jsonl"
    first = ResultsLock(path)
    first.acquire()
    try:
        ResultsLock(path).acquire()
    finally:
        first.release()


def _gsm8k_file(tmp: Path) -> str:
    from tests.support.datamodule_fixtures import GSM8K_ROWS, write_jsonl

    return str(write_jsonl(tmp / "test.jsonl", GSM8K_ROWS))


def _gsm8k_without_answer(tmp: Path):
    from lightning_delta.datamodules import GSM8KDataModule
    from tests.support.datamodule_fixtures import write_jsonl
    from tests.support.tiny_models import make_tiny_tokenizer

    path = write_jsonl(tmp / "test.jsonl", [{"question": "What is 1 + 1?"}])
    GSM8KDataModule(make_tiny_tokenizer(), data=str(path)).setup("validate")


def _ultrafeedback_without_rejected(tmp: Path):
    from lightning_delta.datamodules import UltraFeedbackDataModule
    from tests.support.datamodule_fixtures import ULTRAFEEDBACK_ROWS, write_jsonl
    from tests.support.tiny_models import make_tiny_tokenizer

    row = {key: value for key, value in ULTRAFEEDBACK_ROWS[0].items() if key != "rejected"}
    path = write_jsonl(tmp / "test_prefs.jsonl", [row])
    UltraFeedbackDataModule(make_tiny_tokenizer(), data=str(path)).setup("validate")


def _gsm8k_broken_line(tmp: Path):
    from lightning_delta.datamodules import GSM8KDataModule
    from tests.support.tiny_models import make_tiny_tokenizer

    path = tmp / "test.jsonl"
    path.write_text('{"question": "a?", "answer": "#### 1"}\n{"question": "b?", "answer": "#### 2"\n')
    GSM8KDataModule(make_tiny_tokenizer(), data=str(path)).setup("validate")


def _tokenizer_directory_without_tokenizer(tmp: Path):
    from lightning_delta.datamodules import GSM8KDataModule
    from tests.support.tiny_models import make_tiny_model

    make_tiny_model("llama").save_pretrained(tmp / "model")
    GSM8KDataModule(str(tmp / "model"), data=_gsm8k_file(tmp)).setup("validate")


def _gsm8k_few_shot_one_file(tmp: Path):
    from lightning_delta.datamodules import GSM8KDataModule
    from tests.support.tiny_models import make_tiny_tokenizer

    GSM8KDataModule(make_tiny_tokenizer(), data=_gsm8k_file(tmp), few_shot=2).setup("validate")


def _save_edited(tmp: Path, output: Path, **kwargs):
    from lightning_delta.export import save_edited
    from tests.support.tiny_models import make_tiny_pair

    pair = make_tiny_pair(tmp, "llama", shard=None)
    save_edited(
        str(pair.post_dir), pretrained=str(pair.pre_dir), edit=_edits().DARE(p=0.5), output_dir=str(output), **kwargs
    )


def _output_not_empty(tmp: Path):
    (tmp / "out").mkdir()
    (tmp / "out" / "model.safetensors").write_bytes(b"another model")
    _save_edited(tmp, tmp / "out")


def _output_is_a_file(tmp: Path):
    (tmp / "out").write_text("a file")
    _save_edited(tmp, tmp / "out")


def _output_dangling_link(tmp: Path):
    (tmp / "out").symlink_to(tmp / "missing", target_is_directory=True)
    _save_edited(tmp, tmp / "out")


def _plan_output_exists(tmp: Path):
    (tmp / "plan.json").write_text("{}")
    _run_cli(
        tmp,
        [
            "plan",
            "--model",
            "post",
            "--pretrained",
            "pre",
            "--data",
            "lightning_delta.demo.digits.DigitsDataModule",
            "--family",
            "dare",
            "--average",
            "0.2",
            "--output",
            str(tmp / "plan.json"),
        ],
    )


def _module_batch_not_a_mapping(tmp: Path):
    from lightning_delta import DeltaEditModule

    pre, post = _tiny_linear_pair()
    DeltaEditModule(post, pretrained=pre, edit=_edits().DARE(p=0.5)).riemann_prepare(
        (torch.zeros(2, 3), torch.zeros(2))
    )


def _tied_copies(tmp: Path):
    from lightning_delta.attach import attach_edit

    model = _tied_model()
    pre = {name: value.detach().clone() for name, value in model.state_dict().items()}
    attach_edit(model, pretrained=pre, edit=_edits().DARE(p=0.5))


def _edited_model(edits: dict):
    from lightning_delta.parametrize import EditedModel

    EditedModel(nn.Linear(3, 2, bias=False), edits)


def _compute_delta(post, pre, **kwargs):
    from lightning_delta import compute_delta

    return compute_delta(post, pretrained=pre, **kwargs)


def _apply_to_parametrized(tmp: Path):
    from lightning_delta.export import apply_edit_
    from lightning_delta.parametrize import EditedModel

    pre, post = _tiny_linear_pair()
    EditedModel(post, {"weight": torch.zeros(2, 3)})
    apply_edit_(post, pretrained=pre, edit=_edits().DARE(p=0.5))


def _users_module_run(tmp: Path, reduction: str = "mean", module_name: str = "net", limit_val_batches=None):
    """A user's regression module with only a training_step, its network at ``net``, validated by the callback."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_delta.callbacks import RiemannCallback

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return nn.functional.mse_loss(self.net(inputs).squeeze(-1), targets, reduction=reduction)

    torch.manual_seed(0)
    module = Regression()
    pre = {name: value.detach() - 0.1 for name, value in module.net.state_dict().items()}
    callback = RiemannCallback(
        num_points=1, pretrained=pre, edit=_edits().Extrapolate(-0.5), module_name=module_name, filename=None
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        inference_mode=False,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=limit_val_batches,
    )
    data = TensorDataset(torch.randn(8, 3), torch.randn(8) + 3.0)
    callback.validate(trainer, module, DataLoader(data, batch_size=4), verbose=False)


def _riemann(**kwargs):
    from lightning_delta.callbacks import RiemannCallback

    return RiemannCallback(**kwargs)


def _plot_missing(tmp: Path):
    from lightning_delta.cli import plot

    plot([str(tmp / "results.jsonl")], output_dir=str(tmp / "figures"))


def _run_cli(tmp: Path, argv: list[str]):
    from lightning_delta.cli import run

    return run(argv)


def _mixed_precision_pair(tmp: Path):
    pre, post = _tiny_linear_pair()
    _compute_delta(post, {name: value.to(torch.bfloat16) for name, value in pre.items()})


def _same_weights(tmp: Path):
    from lightning_delta.export import apply_edit_

    post = nn.Linear(3, 2)
    apply_edit_(
        post, pretrained={name: value.clone() for name, value in post.state_dict().items()}, edit=_edits().DARE(p=0.5)
    )


def _integer_pre(tmp: Path):
    pre, post = _tiny_linear_pair()
    _compute_delta(post, {**pre, "weight": torch.zeros(2, 3, dtype=torch.int64)})


def _meta_pre(tmp: Path):
    with torch.device("meta"):
        pre = nn.Linear(3, 2)
    _compute_delta(nn.Linear(3, 2), pre)


def _swapped_order(tmp: Path):
    from lightning_delta import compute_delta

    pre, post = _tiny_linear_pair()
    compute_delta(pre, post)


def _sweep_grid(tmp: Path, grid: dict):
    from lightning_delta.sweep.run import sweep_points
    from tests.test_sweep import digits_config

    sweep_points(digits_config(tmp, grid, tmp / "results.jsonl"))


def _gradient_biased_without_gradients(tmp: Path):
    from lightning_delta.attach import edit_differences

    pre, post = _tiny_linear_pair()
    edit_differences(post, pretrained=pre, edit=_edits().GradientBiased(p=0.5, k=0.5))


CASES = [
    # ------------------------------------------------------------------------------------------ edits
    Case(
        "dare-p-above-1", "`DARE(p=1.5)`", ValueError, "DARE: `p` must be in [0, 1)", lambda tmp: _edits().DARE(p=1.5)
    ),
    Case(
        "dare-p-1",
        "`DARE(p=1.0)` (every entry dropped, rescale 1/(1−p) undefined)",
        ValueError,
        "DARE: `p` must be in [0, 1)",
        lambda tmp: _edits().DARE(p=1.0),
    ),
    Case(
        "dare-p-string",
        '`DARE(p="0.9")`',
        ValueError,
        "DARE: `p` must be a finite real number, got p='0.9'",
        lambda tmp: _edits().DARE(p="0.9"),
    ),
    Case(
        "bitdelta-bits-0",
        "`BitDelta(bits=0)`",
        ValueError,
        "BitDelta: `bits` must be",
        lambda tmp: _edits().BitDelta(bits=0),
    ),
    Case(
        "lowrank-both",
        "`LowRank(rank=4, fraction=0.1)`",
        ValueError,
        "LowRank: give exactly one of `rank` and `fraction`",
        lambda tmp: _edits().LowRank(rank=4, fraction=0.1),
    ),
    Case(
        "lowrank-method",
        '`LowRank(rank=4, method="fast")`',
        ValueError,
        "LowRank: `method` must be",
        lambda tmp: _edits().LowRank(rank=4, method="fast"),
    ),
    Case(
        "prune-p",
        "`MagnitudePrune(p=2)`",
        ValueError,
        "MagnitudePrune: `p` must be in",
        lambda tmp: _edits().MagnitudePrune(p=2),
    ),
    Case(
        "build-unknown",
        '`edits.build("dropout")`',
        ValueError,
        "Unknown edit 'dropout'; the known edits are",
        lambda tmp: _edits().build("dropout"),
    ),
    Case(
        "build-unknown-argument",
        '`edits.build("dare", q=0.5)`',
        ValueError,
        "DARE ('dare') got unknown argument(s) ['q']",
        lambda tmp: _edits().build("dare", q=0.5),
    ),
    Case(
        "gradient-biased-no-gradients",
        "GradientBiased without ∇L at W_post",
        ValueError,
        "GradientBiased needs the gradient of the loss at W_post for every edited tensor; missing for 2 tensors",
        _gradient_biased_without_gradients,
    ),
    # --------------------------------------------------------------------------------- module and callback
    Case(
        "module-edit-name",
        '`DeltaEditModule(post, pretrained=pre, edit="dare")`',
        ValueError,
        "edit must be an editing operation of lightning_delta.edits",
        lambda tmp: __import__("lightning_delta").DeltaEditModule(nn.Linear(2, 2), pretrained={}, edit="dare"),
    ),
    Case(
        "module-model-type",
        "`DeltaEditModule(model=3, ...)`",
        ValueError,
        "`model` must be an nn.Module",
        lambda tmp: __import__("lightning_delta").DeltaEditModule(3, pretrained={}, edit=_edits().DARE(p=0.5)),
    ),
    Case(
        "module-batch-tuple",
        "a `(inputs, labels)` batch for the causal-LM loss",
        ValueError,
        "DeltaEditModule's CausalLMLoss reads each batch as a mapping",
        _module_batch_not_a_mapping,
    ),
    Case(
        "loss-unknown",
        '`DeltaEditModule(..., loss="mse")`',
        ValueError,
        "Unknown loss 'mse'",
        lambda tmp: __import__("lightning_delta").DeltaEditModule(nn.Linear(2, 2), pretrained={}, edit={}, loss="mse"),
    ),
    Case(
        "riemann-num-points",
        "`RiemannCallback(num_points=0)`",
        ValueError,
        "`num_points` must be an integer >= 1",
        lambda tmp: _riemann(num_points=0),
    ),
    Case(
        "riemann-edit-alone",
        "`RiemannCallback(edit=DARE(p=0.9))` without `pretrained`",
        ValueError,
        "Pass `pretrained` and `edit` together",
        lambda tmp: _riemann(edit=_edits().DARE(p=0.9)),
    ),
    Case(
        "riemann-recompute",
        '`RiemannCallback(recompute_weights="yes")`',
        ValueError,
        "`recompute_weights` must be True, False or None",
        lambda tmp: _riemann(recompute_weights="yes"),
    ),
    Case(
        "riemann-no-batch",
        "`--trainer.limit_val_batches 0`, or an empty validation DataLoader",
        ValueError,
        "RiemannCallback evaluated no validation batch, so there is no term, trapezoid or ΔL",
        lambda tmp: _users_module_run(tmp, limit_val_batches=0),
    ),
    Case(
        "riemann-module-name",
        '`RiemannCallback(module_name="model")` where the network is at `net`',
        ValueError,
        "module_name='model': Regression has no submodule 'model'. Its children are net",
        lambda tmp: _users_module_run(tmp, module_name="model"),
    ),
    Case(
        "training-step-batch-sum",
        "a `training_step` returning the batch's sum instead of its mean",
        UserWarning,
        "Regression.training_step looks like a sum over the batch, not a batch mean",
        lambda tmp: _users_module_run(tmp, reduction="sum"),
    ),
    Case(
        "tied-copies",
        "W_pre as a state dict of copies for a model with tied embeddings",
        ValueError,
        "1.weight and 0.weight are one tied tensor in the model but two tensors",
        _tied_copies,
    ),
    Case(
        "edited-model-name",
        "an `E` for a name the model does not have",
        ValueError,
        "Edited tensor 'bias' is not a parameter or buffer of Linear",
        lambda tmp: _edited_model({"bias": torch.zeros(2)}),
    ),
    Case(
        "edited-model-shape",
        "an `E` of the wrong shape",
        ValueError,
        "E for 'weight' has shape (3, 2)",
        lambda tmp: _edited_model({"weight": torch.zeros(3, 2)}),
    ),
    # ----------------------------------------------------------------------------------- weights and ΔW
    Case(
        "path-missing",
        "a W_pre path that does not exist",
        ValueError,
        "Cannot load the pre-trained weights: The path",
        lambda tmp: _compute_delta({"w": torch.zeros(1)}, str(tmp / "missing")),
    ),
    Case(
        "missing-tensor",
        "W_pre without a tensor that W_post has",
        ValueError,
        "The pre- and post-trained weights do not hold the same tensors",
        lambda tmp: _compute_delta({"a": torch.ones(2), "b": torch.ones(2)}, {"a": torch.zeros(2)}),
    ),
    Case(
        "shape-mismatch",
        "a resized vocabulary (shapes differ)",
        ValueError,
        "Shapes differ between pre and post",
        lambda tmp: _compute_delta({"emb": torch.zeros(5, 2)}, {"emb": torch.zeros(4, 2)}),
    ),
    Case(
        "nan-weights",
        "NaN in W_post",
        ValueError,
        "The post-trained tensor 'w'",
        lambda tmp: _compute_delta({"w": torch.tensor([0.0, float("nan")])}, {"w": torch.zeros(2)}),
    ),
    Case(
        "bad-regex",
        '`include="("`',
        ValueError,
        "The include pattern '(' is not a valid regular expression",
        lambda tmp: _compute_delta({"w": torch.ones(2)}, {"w": torch.zeros(2)}, include="("),
    ),
    Case(
        "empty-selection",
        "`include` that matches nothing",
        ValueError,
        "include='nothing', exclude=None select no floating-point tensor present in both pre",
        lambda tmp: _compute_delta({"w": torch.ones(2)}, {"w": torch.zeros(2)}, include="nothing"),
    ),
    Case(
        "state-dict-values",
        "a state dict holding a non-tensor",
        ValueError,
        "Cannot load the pre-trained weights: A state dict must map names to tensors",
        lambda tmp: _compute_delta({"w": torch.ones(2)}, {"w": [0.0, 1.0]}),
    ),
    Case(
        "mixed-precision-pair",
        "W_pre in bf16 with W_post in float32 (a bf16 pre directory or state dict)",
        UserWarning,
        "W_pre is stored in torch.bfloat16 and W_post in torch.float32 for 2 of the 2 selected tensors: "
        "ΔW = W_post − W_pre then holds W_pre's rounding to torch.bfloat16",
        _mixed_precision_pair,
    ),
    Case(
        "same-weights",
        "the post-trained weights given as W_pre too (`--model.pretrained` naming the post directory)",
        ValueError,
        "ΔW = W_post − W_pre is zero in every one of the 2 selected tensors",
        _same_weights,
    ),
    Case(
        "integer-pre",
        "an int64 W_pre tensor where W_post's is float (a quantized checkpoint)",
        ValueError,
        "Floating point on one side and integer on the other for 1 tensor: weight (pre torch.int64, post "
        "torch.float32)",
        _integer_pre,
    ),
    Case(
        "meta-pre",
        "W_pre on the meta device",
        ValueError,
        "W_pre must hold real weights, but 'weight' of the pre-trained weights (module Linear) is on the meta device",
        _meta_pre,
    ),
    Case(
        "swapped-order",
        "`compute_delta(pre, post)` (W_pre passed by position)",
        TypeError,
        "compute_delta() takes 1 positional argument but 2 were given",
        _swapped_order,
    ),
    # ----------------------------------------------------------------------------------------- export
    Case(
        "output-not-empty",
        "`save_edited(..., output_dir)` on a directory holding another model",
        ValueError,
        "output_dir <tmp>/out is not empty; refusing to write a model over its files. Pass overwrite=True",
        _output_not_empty,
    ),
    Case(
        "output-is-file",
        "`save_edited(..., output_dir)` where a file is",
        ValueError,
        "output_dir <tmp>/out exists and is not a directory",
        _output_is_a_file,
    ),
    Case(
        "output-dangling-link",
        "`save_edited(..., output_dir)` on a symbolic link to a missing directory",
        ValueError,
        "output_dir <tmp>/out is a symbolic link to <tmp>/missing, which does not exist",
        _output_dangling_link,
    ),
    Case(
        "plan-output-exists",
        "a second `lightning-delta plan` into the same `--output`",
        ValueError,
        "output <tmp>/plan.json exists; refusing to write a plan over it. Pass --overwrite true",
        _plan_output_exists,
    ),
    Case(
        "apply-parametrized",
        "`apply_edit_` on a model that still has the analysis attached",
        ValueError,
        "The model has parametrizations on",
        _apply_to_parametrized,
    ),
    # ----------------------------------------------------------------------------- per-tensor edits and plans
    Case(
        "per-tensor-bad-pattern",
        '`PerTensor({"(": BitDelta()})`',
        ValueError,
        "PerTensor: pattern '(' is not a valid regular expression",
        lambda tmp: _edits().PerTensor({"(": _edits().BitDelta()}),
    ),
    Case(
        "per-tensor-unknown-edit",
        '`PerTensor({"q": {"name": "ties"}})`',
        ValueError,
        "PerTensor: the edit of pattern 'q' names no edit",
        lambda tmp: _edits().PerTensor({"q": {"name": "ties"}}),
    ),
    Case(
        "per-tensor-unmatched",
        "a tensor that no pattern of a `PerTensor` matches",
        ValueError,
        "PerTensor: no pattern matches tensor 'b'",
        lambda tmp: _edits().PerTensor({"^a$": _edits().BitDelta()})({"b": torch.ones(2)}),
    ),
    Case(
        "plan-unknown-family",
        '`plan_edit(..., family_name="ties", ...)`',
        ValueError,
        "plan: unknown edit family 'ties'",
        lambda tmp: __import__("lightning_delta.planning.plan", fromlist=["x"]).plan_edit(
            None, pretrained=None, datamodule=None, family_name="ties", average=0.2
        ),
    ),
    Case(
        "plan-average-below-candidates",
        '`plan_edit(..., "bitdelta", average=0.5)`',
        ValueError,
        "plan: `average` (bits per entry (sign bit included)) must be a number >= the smallest candidate 1",
        lambda tmp: __import__("lightning_delta.planning.plan", fromlist=["x"]).plan_edit(
            None, pretrained=None, datamodule=None, family_name="bitdelta", average=0.5
        ),
    ),
    Case(
        "plan-dare-density",
        '`plan_edit(..., "dare", 0.5, candidates=[0.5, 1.5])`',
        ValueError,
        "plan: dare candidates (kept density) must be in (0, 1], got 1.5",
        lambda tmp: __import__("lightning_delta.planning.plan", fromlist=["x"]).plan_edit(
            None, pretrained=None, datamodule=None, family_name="dare", average=0.5, candidates=[0.5, 1.5]
        ),
    ),
    Case(
        "plan-two-budgets",
        '`plan_edit(..., "bitdelta", 2, budget_bytes=1e6)`',
        ValueError,
        "plan: give the budget as `average` (bits per entry (sign bit included)) or as `budget_bytes`, exactly one",
        lambda tmp: __import__("lightning_delta.planning.plan", fromlist=["x"]).plan_edit(
            None, pretrained=None, datamodule=None, family_name="bitdelta", average=2, budget_bytes=1e6
        ),
    ),
    Case(
        "on-the-fly-ready-made-E",
        '`DeltaEditModule(model, pretrained=None, edit={name: E}, E_dtype="on_the_fly")` attached',
        ValueError,
        "E_dtype='on_the_fly' makes E again from W_pre and the edit; ready-made E tensors are held",
        lambda tmp: __import__("lightning_delta.attach", fromlist=["x"]).attach_edit(
            torch.nn.Linear(2, 2), pretrained=None, edit={"weight": torch.ones(2, 2)}, E_dtype="on_the_fly"
        ),
    ),
    Case(
        "fsdp1-strategy",
        "a Trainer with `FSDPStrategy` (FSDP1) running a `RiemannCallback`",
        ValueError,
        "lightning_delta runs sharded models under ModelParallelStrategy (FSDP2's fully_shard), not FSDPStrategy",
        lambda tmp: __import__("lightning_delta.sharded", fromlist=["x"]).check_strategy(
            __import__("lightning.pytorch.strategies", fromlist=["x"]).FSDPStrategy()
        ),
    ),
    Case(
        "compressed-other-version",
        "a compressed delta whose `compressed.json` has another format version",
        ValueError,
        "<tmp>/delta holds a compressed delta of format version 2; this version of lightning_delta reads version 1",
        _compressed_other_version,
    ),
    Case(
        "compressed-other-base",
        "`apply_compressed_(model, path)` on a model of other shapes",
        ValueError,
        "The compressed delta <tmp>/delta was not made for this model: 1 tensors of the delta have other shapes in the "
        "model: weight (delta (2, 3), model (2, 4))",
        _compressed_other_base,
    ),
    Case(
        "compressed-truncated",
        "a compressed delta whose safetensors file was cut short",
        ValueError,
        "Cannot read <tmp>/delta/delta-00001.safetensors (",
        _compressed_truncated,
    ),
    Case(
        "compress-edit-and-plan",
        "`lightning-delta compress` with neither `--edit` nor `--plan`",
        ValueError,
        "compress: give the edit (--edit CLASS ...) or the plan (--plan plan.json), exactly one",
        lambda tmp: _run_cli(
            tmp, ["compress", "--model", "post", "--pretrained", "pre", "--output_dir", str(tmp / "out")]
        ),
    ),
    Case(
        "demo-quadrature-reference",
        "`lightning-delta demo --quadrature_reference 5` (no more nodes than the sweep's C = 5)",
        ValueError,
        "quadrature_reference must be 0 (no quadrature row) or a number of Gauss nodes above num_points = 5",
        lambda tmp: _run_cli(tmp, ["demo", "--quadrature_reference", "5", "--output_dir", str(tmp / "out")]),
    ),
    # --------------------------------------------------------------------------------------------- data
    Case(
        "gsm8k-few-shot-one-file",
        '`GSM8KDataModule(data="test.jsonl", few_shot=2)`',
        ValueError,
        "`few_shot=2` needs worked examples apart from the evaluated ones",
        _gsm8k_few_shot_one_file,
    ),
    Case(
        "gsm8k-row-fields",
        "a GSM8K row without `answer`",
        ValueError,
        "GSM8K row 0 (counting from 0) of <tmp>/test.jsonl lacks the field 'answer'",
        _gsm8k_without_answer,
    ),
    Case(
        "ultrafeedback-row-fields",
        "an UltraFeedback row without `rejected`",
        ValueError,
        "UltraFeedback row 0 (counting from 0) of <tmp>/test_prefs.jsonl lacks the field 'rejected'",
        _ultrafeedback_without_rejected,
    ),
    Case(
        "jsonl-broken-line",
        "a data `.jsonl` file with a broken line",
        ValueError,
        "Line 2 of <tmp>/test.jsonl is not valid JSON (Expecting ',' delimiter at column 38)",
        _gsm8k_broken_line,
    ),
    Case(
        "tokenizer-directory-empty",
        "`--data.tokenizer` naming a model directory without tokenizer files",
        ValueError,
        "The tokenizer directory <tmp>/model has no tokenizer: none of tokenizer.json",
        _tokenizer_directory_without_tokenizer,
    ),
    Case(
        "gsm8k-batch-size",
        "`GSM8KDataModule(batch_size=0)`",
        ValueError,
        "`batch_size` must be",
        lambda tmp: __import__("lightning_delta.datamodules", fromlist=["x"]).GSM8KDataModule("tok", batch_size=0),
    ),
    # ------------------------------------------------------------------------------------ sweep and plot
    Case(
        "grid-block",
        "a sweep grid block that is not a mapping",
        ValueError,
        "Each block of the sweep grid must be a mapping of dotted keys",
        lambda tmp: __import__("lightning_delta.sweep", fromlist=["x"]).expand_grid([["edit.p", 0.1]]),
    ),
    Case(
        "results-locked",
        "a second sweep on a results file another sweep is writing",
        RuntimeError,
        "Another sweep holds <tmp>/results.jsonl",
        _results_locked,
    ),
    Case(
        "cli-edit-unknown",
        "`lightning-delta edit ... --edit Dropout`",
        ValueError,
        "Unknown edit 'Dropout' for --edit. The edits are DARE, DELLA, SignBiased",
        lambda tmp: _run_cli(
            tmp,
            ["edit", "--model", "post", "--pretrained", "pre", "--edit", "Dropout", "--output_dir", str(tmp / "out")],
        ),
    ),
    Case(
        "cli-edit-registry-name",
        "`lightning-delta validate --edit dare` (the registry name)",
        ValueError,
        "Unknown edit 'dare' for --edit. Did you mean DARE?",
        lambda tmp: _run_cli(tmp, ["validate", "--edit=dare"]),
    ),
    Case(
        "cli-edit-help-typo",
        "`lightning-delta validate --edit.help DAREE`",
        ValueError,
        "Unknown edit 'DAREE' for --edit.help. Did you mean DARE?",
        lambda tmp: _run_cli(tmp, ["validate", "--edit.help", "DAREE"]),
    ),
    Case(
        "cli-edit-argument-of-another-edit",
        "`lightning-delta validate --edit BitDelta --edit.p 0.9`",
        ValueError,
        "BitDelta takes no `p` (--edit.p); its arguments are bits, scale, magnitudes, seed, blocks",
        lambda tmp: _run_cli(tmp, ["validate", "--edit", "BitDelta", "--edit.p", "0.9"]),
    ),
    Case(
        "cli-edit-argument-first",
        "`lightning-delta validate --edit.p 0.9 --edit DARE`",
        ValueError,
        "--edit.p comes before --edit DARE: put --edit CLASS before its arguments",
        lambda tmp: _run_cli(tmp, ["validate", "--edit.p", "0.9", "--edit", "DARE"]),
    ),
    Case(
        "grid-key-typo",
        "a sweep grid key that the edit does not take (`edit.init_args.q`)",
        ValueError,
        "The sweep grid key 'edit.init_args.q': DARE takes no `q`; its arguments are p, k, rescale, seed",
        lambda tmp: _sweep_grid(tmp, {"edit.init_args.q": [0.1, 0.5]}),
    ),
    Case(
        "grid-invalid-value",
        "DARE p = 1.0 among valid values of a sweep grid",
        ValueError,
        "The sweep grid point {'edit.init_args.p': 1.0} has an invalid edit: DARE: `p` must be in [0, 1)",
        lambda tmp: _sweep_grid(tmp, {"edit.init_args.p": [0.5, 1.0, 0.9]}),
    ),
    Case(
        "plot-missing-file",
        "`lightning-delta plot --results missing.jsonl`",
        FileNotFoundError,
        "No results file at <tmp>/results.jsonl",
        _plot_missing,
    ),
]


def _message(error: BaseException, tmp: Path) -> str:
    return str(error).replace(str(tmp.resolve()), "<tmp>").replace(str(tmp), "<tmp>")


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_a_clear_error(case: Case, tmp_path):
    if issubclass(case.error, Warning):
        with pytest.warns(case.error) as record:
            case.call(tmp_path)
        messages = [_message(warning.message, tmp_path) for warning in record if warning.category is case.error]
        assert any(message.startswith(case.message) for message in messages), messages
        return
    with pytest.raises(case.error) as info:
        case.call(tmp_path)
    assert _message(info.value, tmp_path).startswith(case.message), _message(info.value, tmp_path)


def render() -> str:
    lines = [
        "# Bad inputs and what they say",
        "",
        "Each row is a test of `tests/test_bad_inputs.py` (its id in the last column): the input, the error raised",
        "(or, for an input that is used as given, the warning) and the start of its message. Written by",
        "`python -m tests.test_bad_inputs > docs/bad_inputs.md`.",
        "",
        "| input | error | message (start) | test |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        message = case.message.replace("|", "\\|")
        lines.append(f"| {case.given} | `{case.error.__name__}` | {message} | `{case.id}` |")
    return "\n".join(lines) + "\n"


def test_the_docs_table_is_this_list():
    assert len(CASES) >= 30 and len({case.id for case in CASES}) == len(CASES)
    assert DOC.read_text() == render(), "regenerate with: python -m tests.test_bad_inputs > docs/bad_inputs.md"


if __name__ == "__main__":
    print(render(), end="")
