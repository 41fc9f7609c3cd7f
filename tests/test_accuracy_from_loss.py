"""A loss that counts what its evaluator would (``LossOutput.correct``): DeltaEditModule takes the accuracy at t = 0
and t = 1 from the forwards that measure the loss there, with no forward of the evaluator's own, and gets the
accuracy of plain forward passes."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_delta.callbacks import RiemannCallback
from lightning_delta.losses import ClassificationLoss, DeltaLoss, LossOutput
from lightning_delta.module import DeltaEditModule
from tests.support.riemann_support import image_dataset, random_edits, tiny_vit, weights_at

RULES = [{}, {"rule": "gauss", "num_points": 3}, {"rule": "adaptive", "tolerance": 1e-12, "num_points": 7}]


def plain_accuracy(model: nn.Module, edits: dict, loader: DataLoader, t: float) -> float:
    """Top-1 accuracy of a plain copy holding ``W_post + t·E``, counted here."""
    point = weights_at(model, edits, t)
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((point(images).logits.argmax(-1) == labels).sum())
            total += len(labels)
    return correct / total


def counted_validate(module: DeltaEditModule, loader: DataLoader, callback: RiemannCallback | None) -> pl.Trainer:
    """``trainer.validate`` with the module's model forwards counted in ``module.forwards``."""
    module.forwards = 0
    module.model.register_forward_hook(lambda *_: setattr(module, "forwards", module.forwards + 1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        callbacks=[callback] if callback is not None else [],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, loader, verbose=False)
    return trainer


@pytest.fixture(scope="module")
def case():
    model = tiny_vit()
    edits = random_edits(model, scale=1.0)
    loader = DataLoader(image_dataset(40), batch_size=8)
    expected = {t: plain_accuracy(model, edits, loader, t) for t in (0.0, 1.0)}
    assert expected[0.0] != expected[1.0]  # each number tells where it came from
    return model, edits, loader, expected


@pytest.mark.filterwarnings("ignore:rule='adaptive' stopped at its largest level")  # it reads the data 3 times
@pytest.mark.parametrize("options", RULES, ids=["left", "gauss", "adaptive"])
def test_the_sweep_counts_the_accuracy_in_its_own_forwards(case, options):
    model, edits, loader, expected = case
    results, forwards = {}, {}
    for way, evaluator in (("from the loss", None), ("evaluator's forwards", ClassificationLoss.evaluator)):
        module = DeltaEditModule(
            copy.deepcopy(model), pretrained=None, edit=edits, loss="classification", evaluator=evaluator
        )
        callback = RiemannCallback(filename=None, **options)
        trainer = counted_validate(module, loader, callback)
        results[way], forwards[way] = callback.result, module.forwards
        assert float(trainer.callback_metrics["accuracy/post"]) == pytest.approx(expected[0.0])
        assert float(trainer.callback_metrics["accuracy/edit"]) == pytest.approx(expected[1.0])
    shared, separate = results["from the loss"], results["evaluator's forwards"]
    assert (shared.accuracy_post, shared.accuracy_edit) == pytest.approx((expected[0.0], expected[1.0]), abs=1e-15)
    assert (shared.accuracy_post, shared.accuracy_edit) == (separate.accuracy_post, separate.accuracy_edit)
    assert shared.term_per_tensor == separate.term_per_tensor and shared.losses == separate.losses
    passes = {"left": 6, "gauss": 3, "adaptive": 7}  # the left rule with its default trapezoid
    assert shared.passes == passes[options.get("rule", "left")]
    assert forwards["evaluator's forwards"] - forwards["from the loss"] == 2 * len(loader)


def test_without_a_sweep_the_loss_forwards_count_it_too(case):
    model, edits, loader, expected = case
    module = DeltaEditModule(copy.deepcopy(model), pretrained=None, edit=edits, loss="classification")
    trainer = counted_validate(module, loader, None)
    assert float(trainer.callback_metrics["accuracy/post"]) == pytest.approx(expected[0.0])
    assert float(trainer.callback_metrics["accuracy/edit"]) == pytest.approx(expected[1.0])
    assert module.forwards == 2 * len(loader)  # one at t = 0 and one at t = 1 per batch, each for loss and accuracy


def test_a_given_accuracy_post_is_kept_and_the_edit_counted(case):
    model, edits, loader, expected = case
    module = DeltaEditModule(
        copy.deepcopy(model), pretrained=None, edit=edits, loss="classification", accuracy_post=0.125
    )
    callback = RiemannCallback(filename=None, rule="gauss")
    counted_validate(module, loader, callback)
    assert (callback.result.accuracy_post, callback.result.accuracy_edit) == pytest.approx((0.125, expected[1.0]))


class ForgetfulLoss(DeltaLoss):
    """Says it counts correct answers, and returns none."""

    counts_correct = True

    def forward(self, model: nn.Module, batch) -> LossOutput:
        output = ClassificationLoss()(model, batch)
        return LossOutput(output.total, output.count)

    evaluator = staticmethod(ClassificationLoss.evaluator)


def test_a_loss_that_claims_to_count_and_does_not_is_named(case):
    model, edits, loader, _ = case
    module = DeltaEditModule(copy.deepcopy(model), pretrained=None, edit=edits, loss=ForgetfulLoss())
    with pytest.raises(ValueError, match=r"ForgetfulLoss sets counts_correct but its forward returned no `correct`"):
        counted_validate(module, loader, RiemannCallback(filename=None))
