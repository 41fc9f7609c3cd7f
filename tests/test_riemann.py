"""RiemannCallback under trainer.validate on one process, against an independent brute-force computation."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_delta.callbacks import RiemannCallback, RiemannResult
from lightning_delta.losses import CausalLMLoss, ClassificationLoss, DeltaLoss, LossOutput
from lightning_delta.module import DeltaEditModule
from tests.support.riemann_support import (
    brute_force,
    image_dataset,
    plain_loss,
    random_edits,
    tiny_llama,
    tiny_vit,
    token_dataset,
    weights_at,
)


def run_validate(module, loader, callback, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.validate(module, loader, verbose=False)
    return trainer


def assert_matches_reference(result: RiemannResult, reference: dict, rtol: float = 1e-6) -> None:
    names = reference["names"]
    ours = torch.tensor([result.term_per_tensor[name] for name in names], dtype=torch.float64)
    theirs = torch.tensor([reference["term_per_tensor"][name] for name in names], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * theirs.abs().max().item())
    torch.testing.assert_close(
        torch.tensor(result.losses, dtype=torch.float64), reference["losses"], rtol=1e-10, atol=0
    )
    total = reference["inner"].sum(dim=1)
    assert result.term == pytest.approx(float(total[:-1].mean()), rel=rtol)
    C = result.num_points
    assert result.trapezoid == pytest.approx(float((total[0] / 2 + total[1:C].sum() + total[C] / 2) / C), rel=rtol)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embeddings"])
def test_llama_terms_equal_brute_force(tie):
    model = tiny_llama(tie=tie)
    edits = random_edits(model)  # named_parameters lists a tied tensor once: edited once
    loader = DataLoader(token_dataset(), batch_size=8)
    reference = brute_force(model, edits, CausalLMLoss(), loader, num_points=5)
    exact = plain_loss(model, edits, CausalLMLoss(), loader, 1.0) - plain_loss(
        model, edits, CausalLMLoss(), loader, 0.0
    )

    module = DeltaEditModule(model, pretrained=None, edit=edits)
    callback = RiemannCallback(num_points=5, filename=None)
    trainer = run_validate(module, loader, callback)

    result = callback.result
    assert_matches_reference(result, reference)
    assert result.exact == pytest.approx(exact, rel=1e-10)
    assert result.count == sum(int((row["labels"][1:] != -100).sum()) for row in token_dataset())
    if tie:
        head, embedding = model.lm_head.parametrizations.weight, model.model.embed_tokens.parametrizations.weight
        assert head.original is embedding.original and head[0] is embedding[0]  # one tensor, one edit
        assert "lm_head.weight" not in result.term_per_tensor
    for key in ("term", "trapezoid", "exact", "loss_post", "loss_edit"):
        assert float(trainer.callback_metrics[f"riemann/{key}"]) == pytest.approx(getattr(result, key), rel=1e-6)


def test_vit_classifier_terms_equal_brute_force():
    model = tiny_vit()
    edits = random_edits(model, scale=0.1)
    loader = DataLoader(image_dataset(), batch_size=5)
    reference = brute_force(model, edits, ClassificationLoss(), loader, num_points=5)
    module = DeltaEditModule(model, pretrained=None, edit=edits, loss="classification")
    callback = RiemannCallback(num_points=5, filename=None)
    run_validate(module, loader, callback)
    assert_matches_reference(callback.result, reference)
    groups = callback.result.term_per_group
    assert {"attention", "mlp", "norms", "embeddings", "layer.0", "layer.1"} <= set(groups)
    kinds = sum(groups[g] for g in ("attention", "mlp", "norms", "embeddings", "other") if g in groups)
    assert kinds == pytest.approx(callback.result.term, rel=1e-9)


@pytest.mark.slow
def test_loss_is_the_same_for_any_batch_size():
    model = tiny_llama()
    edits = random_edits(model, "proj")
    results = []
    for batch_size in (1, 6, 37):
        callback = RiemannCallback(num_points=3, filename=None)
        run_validate(
            DeltaEditModule(model, pretrained=None, edit=edits),
            DataLoader(token_dataset(), batch_size=batch_size),
            callback,
        )
        results.append(callback.result)
        model = tiny_llama()
    for other in results[1:]:
        assert other.term == pytest.approx(results[0].term, rel=1e-10)
        assert other.exact == pytest.approx(results[0].exact, rel=1e-10)
        assert other.losses == pytest.approx(results[0].losses, rel=1e-12)


class QuadraticLoss(DeltaLoss):
    """Σ_n ½ (w − a_n)ᵀ A (w − a_n) over the batch: ⟨∇L(w + tE), E⟩ = b + t·q is linear in t."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = matrix

    def forward(self, model, batch):
        difference = model.w - batch  # (B, D)
        per_item = 0.5 * torch.einsum("bi,ij,bj->b", difference, self.matrix, difference)
        return LossOutput(per_item.sum(dtype=torch.float64), torch.tensor(float(len(batch)), dtype=torch.float64))


class Vector(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)


@pytest.mark.parametrize("num_points", [1, 4, 7])
def test_quadratic_left_and_trapezoid_equal_closed_forms(num_points):
    generator = torch.Generator().manual_seed(0)
    D = 6
    root = torch.randn(D, D, generator=generator, dtype=torch.float64)
    A = root @ root.T + torch.eye(D, dtype=torch.float64)
    w = torch.randn(D, generator=generator, dtype=torch.float64)
    points = torch.randn(11, D, generator=generator, dtype=torch.float64)
    E = torch.randn(D, generator=generator, dtype=torch.float64)
    a_bar = points.mean(dim=0)
    b = float((w - a_bar) @ A @ E)  # ⟨∇L(w), E⟩
    q = float(E @ A @ E)  # d/dt ⟨∇L(w + tE), E⟩
    left = b + q * (num_points - 1) / (2 * num_points)
    exact = b + q / 2  # also the trapezoid value, exact for a linear integrand

    callback = RiemannCallback(num_points=num_points, filename=None)
    module = DeltaEditModule(Vector(w.clone()), pretrained=None, edit={"w": E}, loss=QuadraticLoss(A))
    run_validate(module, DataLoader(points, batch_size=4), callback)
    assert callback.result.term == pytest.approx(left, rel=1e-12)
    assert callback.result.trapezoid == pytest.approx(exact, rel=1e-12)
    assert callback.result.exact == pytest.approx(exact, rel=1e-12)


@pytest.mark.slow
def test_large_num_points_converges_to_exact():
    model = tiny_vit()
    edits = random_edits(model, scale=0.3)
    loader = DataLoader(image_dataset(), batch_size=23)
    errors = {}
    for num_points in (2, 64):
        callback = RiemannCallback(num_points=num_points, filename=None)
        run_validate(DeltaEditModule(tiny_vit(), pretrained=None, edit=edits, loss="classification"), loader, callback)
        errors[num_points] = (
            abs(callback.result.term - callback.result.exact),
            abs(callback.result.trapezoid - callback.result.exact),
        )
    # left rule error is O(1/C), trapezoid O(1/C²)
    assert errors[64][0] < errors[2][0] / 10
    assert errors[64][1] < errors[2][1] / 100
    assert errors[64][1] < 1e-3 * abs(callback.result.exact)


def test_results_are_logged_and_written(tmp_path):
    model = tiny_llama()
    edits = random_edits(model, "mlp")
    callback = RiemannCallback(num_points=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        inference_mode=False,
        callbacks=[callback],
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(
        DeltaEditModule(model, pretrained=None, edit=edits), DataLoader(token_dataset(9), batch_size=4), verbose=False
    )
    written = json.loads((tmp_path / "lightning_logs" / "version_0" / "riemann.json").read_text())
    assert written["term"] == pytest.approx(callback.result.term, rel=1e-12)
    assert set(written["term_per_tensor"]) == set(edits)
    assert RiemannResult.load(tmp_path / "lightning_logs" / "version_0" / "riemann.json") == callback.result
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header, values = logged[0].split(","), logged[1].split(",")
    assert float(values[header.index("riemann/term")]) == pytest.approx(callback.result.term, rel=1e-6)
    assert float(values[header.index("riemann/exact")]) == pytest.approx(callback.result.exact, rel=1e-6)


def test_runs_without_a_logger_never_overwrite_each_others_results(tmp_path):
    """logger=False writes into default_root_dir: the second and third runs get riemann-v1.json and -v2.json."""
    model = tiny_llama()
    loader = DataLoader(token_dataset(6), batch_size=3)
    results = []
    for scale in (0.01, 0.02, 0.03):
        callback = RiemannCallback(num_points=1)
        run_validate(
            DeltaEditModule(model, pretrained=None, edit=random_edits(model, "mlp", scale=scale)),
            loader,
            callback,
            default_root_dir=tmp_path,
        )
        results.append(callback.result)
    names = ["riemann.json", "riemann-v1.json", "riemann-v2.json"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names)
    for name, result in zip(names, results):
        assert RiemannResult.load(tmp_path / name) == result
    assert len({result.term for result in results}) == 3


def test_progress_bar_shows_the_running_figures(capsys):
    model = tiny_llama()
    edits = random_edits(model, "mlp")
    callback = RiemannCallback(num_points=2, filename=None)
    trainer = pl.Trainer(
        accelerator="cpu", inference_mode=False, callbacks=[callback], logger=False, enable_model_summary=False
    )
    trainer.validate(
        DeltaEditModule(model, pretrained=None, edit=edits), DataLoader(token_dataset(9), batch_size=4), verbose=False
    )
    shown = trainer.progress_bar_metrics
    # after the last batch the running figures are the final ones (one process), in float32
    assert shown["riemann/running_term"] == pytest.approx(callback.result.term, rel=1e-6)
    assert shown["riemann/running_exact"] == pytest.approx(callback.result.exact, rel=1e-6)
    assert "Validation" in capsys.readouterr().out  # the bar itself ran


def test_without_trapezoid_skips_the_backward_at_one():
    model = tiny_llama()
    edits = random_edits(model, "proj")
    loader = DataLoader(token_dataset(9), batch_size=9)
    callback = RiemannCallback(num_points=3, trapezoid=False, filename=None)
    run_validate(DeltaEditModule(model, pretrained=None, edit=edits), loader, callback)
    assert callback.result.trapezoid is None
    assert math.isnan(callback.result.inner_products[-1])
    reference = brute_force(tiny_llama(), edits, CausalLMLoss(), loader, num_points=3)
    assert callback.result.term == pytest.approx(float(reference["inner"][:-1].sum(dim=1).mean()), rel=1e-9)


def test_inference_mode_is_refused_with_a_clear_error():
    model = tiny_llama()
    trainer = pl.Trainer(
        accelerator="cpu", callbacks=[RiemannCallback(filename=None)], logger=False, enable_progress_bar=False
    )
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        trainer.validate(
            DeltaEditModule(model, pretrained=None, edit=random_edits(model, "mlp")), DataLoader(token_dataset(4))
        )


@pytest.mark.parametrize("num_points", [0, -1, 2.5, True])
def test_bad_num_points(num_points):
    with pytest.raises(ValueError, match="num_points"):
        RiemannCallback(num_points=num_points)


def test_edit_without_pretrained_is_refused():
    with pytest.raises(ValueError, match="together"):
        RiemannCallback(edit={"w": torch.zeros(1)})


def test_repeating_distributed_sampler_is_refused():
    dataset = list(range(37))
    repeating = DataLoader(dataset, sampler=DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=False))
    plain = DataLoader(dataset)
    unrepeated = DataLoader(
        dataset, sampler=UnrepeatedDistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)
    )
    for loader in (repeating, plain):
        with pytest.raises(RuntimeError, match="use_distributed_sampler=False"):
            RiemannCallback.check_no_repeated_samples(SimpleNamespace(world_size=2, val_dataloaders=loader))
    RiemannCallback.check_no_repeated_samples(SimpleNamespace(world_size=2, val_dataloaders=[unrepeated]))
    even = list(range(36))
    even_loader = DataLoader(even, sampler=DistributedSampler(even, num_replicas=2, rank=0, shuffle=False))
    RiemannCallback.check_no_repeated_samples(SimpleNamespace(world_size=2, val_dataloaders=even_loader))


@pytest.mark.slow
def test_bf16_against_float32(capsys):
    """The same tiny pair in bf16 and float32: E and the sums stay float32/float64; the gap is bf16 rounding."""
    edits = random_edits(tiny_llama(dtype=torch.float32), scale=0.05)
    loader = DataLoader(token_dataset(), batch_size=8)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama(dtype=dtype)
        callback = RiemannCallback(num_points=5, filename=None)
        module = DeltaEditModule(model, pretrained=None, edit=edits)
        run_validate(module, loader, callback)
        assert all(p.E.dtype == torch.float32 for p in module.edited_model().parametrizations.values())
        results[dtype] = callback.result
    f32, bf16 = results[torch.float32], results[torch.bfloat16]
    gaps = {key: abs(getattr(bf16, key) - getattr(f32, key)) for key in ("term", "trapezoid", "exact", "loss_post")}
    with capsys.disabled():
        print(
            "\nbf16 vs float32:",
            {k: f"{v:.3g}" for k, v in gaps.items()},
            f"(float32 term {f32.term:.4g}, exact {f32.exact:.4g}, loss {f32.loss_post:.4g})",
        )
    assert gaps["loss_post"] < 0.02 * f32.loss_post
    assert gaps["term"] < 0.1 * abs(f32.term) + 1e-3
    assert gaps["exact"] < 0.1 * abs(f32.exact) + 1e-3


def _untied_copy_of(model: nn.Module, shift: float = 0.02) -> dict[str, torch.Tensor]:
    """W_pre as users often pass it: a state dict of copies, in which a tied tensor's names are separate tensors."""
    return {name: value.detach().clone() - shift for name, value in model.state_dict().items()}


class TiedLM(pl.LightningModule):
    """A user's module around a tied Llama, validated through the callback's own `pretrained`/`edit`."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(tie=True)

    def training_step(self, batch, batch_idx):
        output = CausalLMLoss()(self.model, batch)
        return output.total / output.count

    def validation_step(self, batch, batch_idx):
        return None


def _assert_untouched(model: nn.Module, post: dict[str, torch.Tensor]) -> None:
    assert not any(nn.utils.parametrize.is_parametrized(module) for module in model.modules())
    assert all(torch.equal(value, post[name]) for name, value in model.state_dict().items())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_tensor_with_separate_pretrained_copies_is_refused_by_the_module():
    """Separate W_pre copies of a tied tensor would edit it twice (lm_head reading W + tE + tE): a clear error."""
    from lightning_delta.edits import DARE

    model = tiny_llama(tie=True)
    post = {name: value.clone() for name, value in model.state_dict().items()}
    module = DeltaEditModule(model, pretrained=_untied_copy_of(model), edit=DARE(p=0.5, seed=0))
    callback = RiemannCallback(num_points=2, filename=None)
    with pytest.raises(
        ValueError,
        match=r"lm_head\.weight and model\.embed_tokens\.weight are one tied tensor.*without "
        r"'lm_head\.weight'",
    ):
        run_validate(module, DataLoader(token_dataset(8), batch_size=4), callback)
    _assert_untouched(model, post)


def test_tied_tensor_with_separate_pretrained_copies_is_refused_by_the_callback():
    from lightning_delta.edits import DARE

    module = TiedLM()
    post = {name: value.clone() for name, value in module.model.state_dict().items()}
    callback = RiemannCallback(
        num_points=2,
        pretrained=_untied_copy_of(module.model),
        edit=DARE(p=0.5, seed=0),
        module_name="model",
        filename=None,
    )
    with pytest.raises(ValueError, match=r"one tied tensor"):
        run_validate(module, DataLoader(token_dataset(8), batch_size=4), callback)
    _assert_untouched(module.model, post)


def test_tied_tensor_mapping_naming_both_is_refused():
    model = tiny_llama(tie=True)
    edits = {
        "lm_head.weight": torch.ones(64, 32, dtype=torch.float64),
        "model.embed_tokens.weight": torch.ones(64, 32, dtype=torch.float64),
    }
    with pytest.raises(ValueError, match="one tied tensor"):
        run_validate(
            DeltaEditModule(model, pretrained=None, edit=edits),
            DataLoader(token_dataset(8), batch_size=4),
            RiemannCallback(num_points=2, filename=None),
        )
    assert not any(nn.utils.parametrize.is_parametrized(module) for module in model.modules())


@pytest.mark.slow
def test_tied_tensor_with_one_pretrained_name_equals_brute_force():
    """The error's advice works: W_pre without the lm_head copy edits the tied tensor once, as a brute force says."""
    from lightning_delta.edits import Extrapolate

    model = tiny_llama(tie=True)
    pre = _untied_copy_of(model)
    loader = DataLoader(token_dataset(), batch_size=8)
    post = dict(model.named_parameters())  # a tied tensor once, under its first name
    edits = {name: 0.5 * (post[name].detach() - pre[name]) for name in post}  # Extrapolate(0.5): E = 0.5·ΔW
    reference = brute_force(model, edits, CausalLMLoss(), loader, num_points=3)

    del pre["lm_head.weight"]
    module = DeltaEditModule(model, pretrained=pre, edit=Extrapolate(alpha=0.5))
    callback = RiemannCallback(num_points=3, filename=None)
    run_validate(module, loader, callback)
    assert_matches_reference(callback.result, reference)
    assert "lm_head.weight" not in callback.result.term_per_tensor


@pytest.mark.parametrize("edit", ["dare", "not_an_edit", 0.9, None])
def test_edit_that_is_not_an_operation_names_the_operations(edit):
    with pytest.raises(ValueError, match=r"edit must be an editing operation.*DARE \('dare'\)"):
        DeltaEditModule(tiny_llama(), pretrained={}, edit=edit)


def test_edit_given_by_name_says_how_to_build_it():
    with pytest.raises(ValueError, match=r"lightning_delta\.edits\.build\('dare', \.\.\.\)"):
        DeltaEditModule(tiny_llama(), pretrained={}, edit="dare")


@pytest.mark.parametrize("batch_kind", ["tuple", "tensor"])
def test_batches_that_are_not_mappings_get_a_clear_error(batch_kind):
    rows = token_dataset(4)
    data = (
        [(row["input_ids"], row["labels"]) for row in rows]
        if batch_kind == "tuple"
        else [row["input_ids"] for row in rows]
    )
    module = DeltaEditModule(tiny_llama(), pretrained=None, edit=random_edits(tiny_llama()))
    with pytest.raises(ValueError, match=r"CausalLMLoss reads each batch as a mapping.*got a (list|Tensor)"):
        run_validate(module, DataLoader(data, batch_size=2), RiemannCallback(num_points=1, filename=None))


def test_classification_batches_may_be_pairs():
    model = tiny_vit()
    edits = random_edits(model)
    loader = DataLoader(image_dataset(), batch_size=6)  # (image, label) pairs
    exact = plain_loss(model, edits, ClassificationLoss(), loader, 1.0) - plain_loss(
        model, edits, ClassificationLoss(), loader, 0.0
    )
    module = DeltaEditModule(model, pretrained=None, edit=edits, loss="classification")
    callback = RiemannCallback(num_points=1, filename=None)
    run_validate(module, loader, callback)
    assert callback.result.exact == pytest.approx(exact, rel=1e-10)


@pytest.mark.slow
def test_E_in_the_models_dtype_equals_E_rounded_to_it_beforehand():
    """E_dtype="model" on a bf16 model computes exactly what float32 E already rounded to bf16 computes (an
    independent route to the same numbers), and differs from float32 E only by that rounding."""
    model = tiny_llama(dtype=torch.bfloat16)
    edits = random_edits(model, scale=0.05)  # bf16 tensors
    rounded = {name: value.to(torch.bfloat16).float() for name, value in edits.items()}
    loader = DataLoader(token_dataset(12), batch_size=6)
    results = {}
    for label, E, E_dtype in (("model", edits, "model"), ("rounded", rounded, "float32")):
        callback = RiemannCallback(num_points=2, filename=None)
        run_validate(DeltaEditModule(copy.deepcopy(model), pretrained=None, edit=E, E_dtype=E_dtype), loader, callback)
        results[label] = callback.result
    for key in ("term", "exact", "loss_post", "loss_edit"):
        assert getattr(results["model"], key) == pytest.approx(getattr(results["rounded"], key), rel=1e-5), key


def test_E_dtype_model_keeps_E_in_bf16():
    model = tiny_llama(dtype=torch.bfloat16)
    edits = random_edits(model)
    module = DeltaEditModule(model, pretrained=None, edit=edits, E_dtype="model")
    run_validate(module, DataLoader(token_dataset(4), batch_size=4), RiemannCallback(num_points=1, filename=None))
    assert {p.E.dtype for p in module.edited_model().parametrizations.values()} == {torch.bfloat16}
    default = DeltaEditModule(tiny_llama(dtype=torch.bfloat16), pretrained=None, edit=edits)
    run_validate(default, DataLoader(token_dataset(4), batch_size=4), RiemannCallback(num_points=1, filename=None))
    assert {p.E.dtype for p in default.edited_model().parametrizations.values()} == {torch.float32}


def test_unknown_E_dtype_is_refused():
    with pytest.raises(ValueError, match=r"E_dtype must be 'float32' .*, 'model' .* or 'on_the_fly' .*got 'bfloat16'"):
        RiemannCallback(E_dtype="bfloat16")


@pytest.mark.parametrize(
    ("recompute_weights", "free_bytes", "recomputes"),
    [
        ("default", 1 << 50, True),
        (False, 0, False),
        (None, 1 << 50, False),
        (None, 0, True),
    ],
    ids=["default-rebuilds", "keep", "auto-with-memory", "auto-without-memory"],
)
@pytest.mark.slow
def test_rebuilding_or_keeping_W_equal_brute_force(recompute_weights, free_bytes, recomputes, monkeypatch):
    """W(t) kept from the forward or rebuilt in backward gives the same numbers; the default rebuilds it, None keeps
    it only when free memory exceeds twice the edited weights."""
    monkeypatch.setattr("lightning_delta.callbacks.riemann.free_memory_bytes", lambda device: free_bytes)
    model = tiny_llama()
    edits = random_edits(model)
    loader = DataLoader(token_dataset(), batch_size=8)
    reference = brute_force(model, edits, CausalLMLoss(), loader, num_points=3)
    decided = []

    class Decision(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            decided.append(callback._recompute)

    options = {} if recompute_weights == "default" else {"recompute_weights": recompute_weights}
    callback = RiemannCallback(num_points=3, filename=None, **options)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        callbacks=[callback, Decision()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(DeltaEditModule(model, pretrained=None, edit=edits), loader, verbose=False)
    assert set(decided) == {recomputes}
    assert_matches_reference(callback.result, reference)


def test_bad_recompute_weights_is_refused():
    with pytest.raises(ValueError, match="recompute_weights.*'yes'"):
        RiemannCallback(recompute_weights="yes")


class NextTokenAccuracy:
    """An evaluator: the share of labelled positions whose next token is the argmax; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted, labels = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        labelled = labels != -100
        return (predicted == labels)[labelled].sum(), labelled.sum()


def plain_accuracy(model: nn.Module, edits: dict, loader: DataLoader, t: float) -> float:
    """The accuracy of ``W_post + t·E`` from plain forward passes, summed over the batches."""
    point, evaluate = weights_at(model, edits, t), NextTokenAccuracy()
    correct, total = zip(*(evaluate(point, batch) for batch in loader))
    return int(sum(correct)) / int(sum(total))


def test_a_given_accuracy_post_runs_the_evaluator_at_t_1_only():
    model = tiny_llama()
    edits = random_edits(model, "mlp", scale=0.5)
    loader = DataLoader(token_dataset(9), batch_size=4)
    measured, given = NextTokenAccuracy(), NextTokenAccuracy()
    swept = RiemannCallback(num_points=2, filename=None)
    run_validate(DeltaEditModule(copy.deepcopy(model), pretrained=None, edit=edits, evaluator=measured), loader, swept)
    reused = RiemannCallback(num_points=2, filename=None)
    module = DeltaEditModule(copy.deepcopy(model), pretrained=None, edit=edits, evaluator=given, accuracy_post=0.125)
    trainer = run_validate(module, loader, reused)

    reference = {t: plain_accuracy(model, edits, loader, t) for t in (0.0, 1.0)}
    assert reference[0.0] != reference[1.0] and reference[0.0] != 0.125  # each number tells where it came from
    assert (swept.result.accuracy_post, swept.result.accuracy_edit) == pytest.approx((reference[0.0], reference[1.0]))
    assert (reused.result.accuracy_post, reused.result.accuracy_edit) == pytest.approx((0.125, reference[1.0]))
    assert (measured.calls, given.calls) == (2 * len(loader), len(loader))
    assert float(trainer.callback_metrics["accuracy/post"]) == 0.125
    assert reused.result.term == swept.result.term  # the sweep itself is the same


@pytest.mark.parametrize("accuracy", [1.5, -0.25, float("nan"), "0.5", True])
def test_a_bad_accuracy_post_is_refused(accuracy):
    with pytest.raises(ValueError, match=r"accuracy_post must be None or the accuracy at t = 0 measured before"):
        DeltaEditModule(tiny_llama(), pretrained=None, edit={}, accuracy_post=accuracy)


def test_the_module_measures_the_loss_itself_outside_a_sweep_and_not_during_one():
    """begin_sweep / end_sweep: validation_step leaves the loss to a sweep while one runs, and measures it at t = 0
    and t = 1 again once the sweep has ended, on the same module with its edit still attached."""
    model = tiny_llama()
    edits = random_edits(model, "mlp")
    loader = DataLoader(token_dataset(9), batch_size=4)
    module = DeltaEditModule(copy.deepcopy(model), pretrained=None, edit=edits)
    swept = run_validate(module, loader, RiemannCallback(num_points=2, filename=None))
    assert "loss/post" not in swept.callback_metrics and "loss/edit" not in swept.callback_metrics
    alone = pl.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    alone.validate(module, loader, verbose=False)
    for key, t in (("loss/post", 0.0), ("loss/edit", 1.0)):
        assert float(alone.callback_metrics[key]) == pytest.approx(
            plain_loss(model, edits, CausalLMLoss(), loader, t), rel=1e-6
        )
