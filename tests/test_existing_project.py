"""The callback on LightningModules a user already has, and GradientBiased end to end."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from lightning_delta.callbacks import RiemannCallback
from lightning_delta.edits import Extrapolate, GradientBiased
from lightning_delta.losses import ClassificationLoss
from lightning_delta.module import DeltaEditModule
from tests.support.riemann_support import brute_force, image_dataset, tiny_vit


class UserClassifier(pl.LightningModule):
    """A user's module, written with no thought of delta editing: only a training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_vit(seed=5)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.model(images).logits, labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class UserClassifierWithValidation(UserClassifier):
    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self.model(images).logits, labels))


def pretrained_state(module: UserClassifier) -> dict[str, torch.Tensor]:
    """A 'pre-trained' model: the user's weights minus a seeded perturbation (so ΔW is known exactly)."""
    generator = torch.Generator().manual_seed(11)
    return {
        name: p.detach() - 0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for name, p in module.model.state_dict().items()
    }


def trainer_with(callback) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        inference_mode=False,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize("user_class", [UserClassifier, UserClassifierWithValidation])
def test_callback_on_a_users_module(user_class):
    module = user_class()
    post = {k: v.clone() for k, v in module.model.state_dict().items()}
    pre = pretrained_state(module)
    loader = DataLoader(image_dataset(), batch_size=6)
    alpha = -0.4
    edits = {name: alpha * (post[name] - pre[name]) for name, _ in module.model.named_parameters()}  # EXPO: E = αΔW
    reference = brute_force(copy.deepcopy(module.model), edits, ClassificationLoss(), loader, num_points=4)

    callback = RiemannCallback(
        num_points=4, pretrained=pre, edit=Extrapolate(alpha), module_name="model", filename=None
    )
    trainer = trainer_with(callback)
    if user_class is UserClassifier:
        callback.validate(trainer, module, loader, verbose=False)  # plain trainer.validate refuses this module
    else:
        trainer.validate(module, loader, verbose=False)
        assert "val_loss" in trainer.callback_metrics

    names = reference["names"]
    ours = torch.tensor([callback.result.term_per_tensor[n] for n in names], dtype=torch.float64)
    expected = torch.tensor([reference["term_per_tensor"][n] for n in names], dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    assert callback.result.exact == pytest.approx(float(reference["losses"][-1] - reference["losses"][0]), rel=1e-9)
    # the user's module comes back as it was: W_post, no parametrization, trainable
    assert not parametrize.is_parametrized(module.model)
    assert all(torch.equal(v, post[k]) for k, v in module.model.state_dict().items())
    assert all(p.requires_grad for p in module.parameters())


def test_plain_validate_without_validation_step_says_what_to_do():
    callback = RiemannCallback(pretrained={}, edit=Extrapolate(0.1), module_name="model", filename=None)
    with pytest.raises(Exception, match="validation_step"):
        trainer_with(callback).validate(UserClassifier(), DataLoader(image_dataset(4)), verbose=False)


@pytest.mark.slow
def test_gradient_biased_end_to_end():
    """One pass computes ∇L at W_post, the edit is built from its signs, and the term matches brute force."""
    user = UserClassifier()
    model = user.model
    post = {k: v.clone() for k, v in model.state_dict().items()}
    pre = pretrained_state(user)
    loader = DataLoader(image_dataset(), batch_size=6)
    p, k = 0.3, 0.5

    # independent reference: the full gradient of the mean loss at W_post, then the Table 1 (right) rule
    point = copy.deepcopy(model)
    count = 0
    for images, labels in loader:
        loss = F.cross_entropy(point(images).logits, labels, reduction="sum")
        loss.backward()
        count += len(labels)
    gradients = {name: param.grad / count for name, param in point.named_parameters()}
    names = [name for name, _ in model.named_parameters()]
    edits = {}
    for name in names:
        delta = (post[name] - pre[name]).double()
        factor = torch.where(delta * gradients[name].double() < 0, k, (1 - k * p) / (1 - p))
        edits[name] = factor * delta - delta
    reference = brute_force(copy.deepcopy(model), edits, ClassificationLoss(), loader, num_points=3)

    module = DeltaEditModule(model, pretrained=pre, edit=GradientBiased(p=p, k=k), loss="classification")
    callback = RiemannCallback(num_points=3, filename=None)
    trainer_with(callback).validate(module, loader, verbose=False)
    edited = module.edited_model()
    for name in names:
        torch.testing.assert_close(edited.E(name).double(), edits[name], rtol=1e-6, atol=1e-9)
    ours = torch.tensor([callback.result.term_per_tensor[n] for n in reference["names"]], dtype=torch.float64)
    expected = torch.tensor([reference["term_per_tensor"][n] for n in reference["names"]], dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_validate_takes_its_validation_step_away_again():
    """`riemann.validate` gives a training_step-only module a no-op validation_step for the run, then removes it."""
    module = UserClassifier()
    callback = RiemannCallback(
        num_points=2, pretrained=pretrained_state(module), edit=Extrapolate(0.1), module_name="model", filename=None
    )
    callback.validate(trainer_with(callback), module, DataLoader(image_dataset(4)), verbose=False)
    assert callback.result is not None
    assert "validation_step" not in vars(module)
    assert not pl.utilities.model_helpers.is_overridden("validation_step", module, pl.LightningModule)
    with pytest.raises(Exception, match="validation_step"):  # plain validate refuses it again, as before
        trainer_with(RiemannCallback(pretrained={}, edit=Extrapolate(0.1), filename=None)).validate(
            module, DataLoader(image_dataset(4)), verbose=False
        )


def test_validate_leaves_a_users_own_validation_step():
    module = UserClassifierWithValidation()
    callback = RiemannCallback(
        num_points=2, pretrained=pretrained_state(module), edit=Extrapolate(0.1), module_name="model", filename=None
    )
    callback.validate(trainer_with(callback), module, DataLoader(image_dataset(4)), verbose=False)
    assert type(module).validation_step is UserClassifierWithValidation.validation_step
    assert "validation_step" not in vars(module)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gradients_at_post_accumulate_in_float32_or_wider(dtype, monkeypatch):
    """GradientBiased's ∇L(W_post): float64 for float64 models; for bf16 models each batch's gradient is summed in
    float32 (a bf16 running sum over 24 batches loses about three digits)."""
    import lightning_delta.module as module_file

    captured = {}

    def capture(*args, **kwargs):
        captured.update(gradients_at_post(*args, **kwargs))
        return captured

    gradients_at_post = module_file.gradients_at_post
    monkeypatch.setattr(module_file, "gradients_at_post", capture)
    model = tiny_vit(seed=5).to(dtype)
    data = [(images.to(dtype), labels) for images, labels in image_dataset(n=48)]
    loader = DataLoader(data, batch_size=2)
    pre = {name: p.detach() - 0.05 for name, p in model.state_dict().items()}
    point = copy.deepcopy(model)
    module = DeltaEditModule(model, pretrained=pre, edit=GradientBiased(p=0.3, k=0.5), loss="classification")
    trainer_with(RiemannCallback(num_points=1, filename=None)).validate(module, loader, verbose=False)

    # independent reference: every batch's gradient from a plain copy in the model's dtype, summed in float64
    exact = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in point.named_parameters()}
    for images, labels in loader:
        point.zero_grad()
        F.cross_entropy(point(images).logits.double(), labels, reduction="sum").backward()
        for name, p in point.named_parameters():
            if p.grad is not None:  # parameters the loss never reaches (ViT's mask token) have none
                exact[name] += p.grad.double()
    assert captured.keys() == exact.keys()
    for name, gradient in captured.items():
        assert gradient.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        expected = exact[name] / len(data)
        scale = expected.abs().max().item() or 1.0
        tolerance = 1e-12 if dtype == torch.float64 else 1e-5
        assert (gradient.double() - expected).abs().max().item() <= tolerance * scale, name
    assert all(p.grad is None for p in module.parameters())


def test_an_error_mid_sweep_gives_the_users_module_back():
    """A loss that fails on the third batch: the error reaches the user, and the module is W_post again."""
    module = UserClassifier()
    post = {k: v.clone() for k, v in module.model.state_dict().items()}
    calls = []

    def failing_loss(pl_module, batch, batch_idx):
        calls.append(batch_idx)
        if batch_idx == 2:
            raise RuntimeError("loss failed on batch 2")
        from lightning_delta.targets import training_step_loss

        return training_step_loss(pl_module, batch, batch_idx)

    callback = RiemannCallback(
        num_points=2,
        pretrained=pretrained_state(module),
        edit=Extrapolate(0.3),
        module_name="model",
        filename=None,
        loss_fn=failing_loss,
    )
    with pytest.raises(RuntimeError, match="loss failed on batch 2"):
        callback.validate(trainer_with(callback), module, DataLoader(image_dataset(12), batch_size=4), verbose=False)
    assert 2 in calls
    assert not parametrize.is_parametrized(module.model)
    assert all(torch.equal(v, post[k]) for k, v in module.model.state_dict().items())
    assert all(p.requires_grad for p in module.parameters())
    assert "validation_step" not in vars(module)


# ------------------------------------------------------------------------- a training_step that sums its batch
class LibraryLossModule(pl.LightningModule):
    """A user's module whose training_step returns one of the library's losses, as a batch mean (``total / count``)
    or, the mistake, as the batch's sum (``total``)."""

    def __init__(self, model, loss, reduction: str) -> None:
        super().__init__()
        self.model, self.loss, self.reduction = model, loss, reduction

    def training_step(self, batch, batch_idx):
        output = self.loss(self.model, self.loss.prepare(batch))
        return output.total if self.reduction == "sum" else output.total / output.count


def _library_loss_case(name: str, tmp_path):
    """A tiny model, its W_pre, one of the library's losses and real batches of its data (four examples each)."""
    from lightning_delta.datamodules import GSM8KDataModule, UltraFeedbackDataModule
    from lightning_delta.losses import CausalLMLoss, DPOLoss
    from tests.support.datamodule_fixtures import GSM8K_ROWS, write_jsonl, write_ultrafeedback
    from tests.support.tiny_models import make_post_trained, make_tiny_model, make_tiny_tokenizer

    if name == "classification":
        module = UserClassifier()
        return module.model, ClassificationLoss(), pretrained_state(module), DataLoader(image_dataset(), batch_size=4)
    pre = make_tiny_model("llama")
    post = make_post_trained(pre, scale=0.05)
    pre_state = {key: value.detach().clone() for key, value in pre.state_dict().items()}
    if name == "causal_lm":
        data = GSM8KDataModule(
            make_tiny_tokenizer(), data=str(write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)), batch_size=4
        )
        return post, CausalLMLoss(), pre_state, data.val_dataloader()
    data = UltraFeedbackDataModule(make_tiny_tokenizer(), data=str(write_ultrafeedback(tmp_path)), batch_size=4)
    return post, DPOLoss(reference=pre), pre_state, data.val_dataloader()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", ["causal_lm", "classification", "dpo"])
def test_a_training_step_summing_its_batch_is_warned_and_a_mean_is_not(loss_name, reduction, tmp_path, recwarn):
    """The check runs on the first batch (its halves and the whole, no gradient): no warning for the batch mean of
    the library's three losses (token-weighted for causal_lm), a warning for their sums."""
    model, loss, pre, loader = _library_loss_case(loss_name, tmp_path)
    module = LibraryLossModule(model, loss, reduction)
    callback = RiemannCallback(
        num_points=1, trapezoid=False, pretrained=pre, edit=Extrapolate(-0.5), module_name="model", filename=None
    )
    callback.validate(trainer_with(callback), module, loader, verbose=False)
    warned = [str(w.message) for w in recwarn if "looks like a sum over the batch" in str(w.message)]
    assert len(warned) == (1 if reduction == "sum" else 0), warned
    assert callback.result is not None
    if warned:
        assert "training_step looks like a sum over the batch, not a batch mean" in warned[0]


def test_the_batch_sum_check_splits_the_batch_by_examples():
    from lightning_delta.targets import _split_batch

    batch = {
        "ids": torch.arange(12).reshape(4, 3),
        "answers": ["a", "b", "c", "d"],
        "scale": torch.tensor(2.0),
        "pair": (torch.zeros(4), torch.ones(4, 2)),
    }
    half = _split_batch(batch, 4, 2, 4)
    assert half["ids"].tolist() == [[6, 7, 8], [9, 10, 11]] and half["answers"] == ["c", "d"]
    assert half["scale"].item() == 2.0 and half["pair"][1].shape == (2, 2)


# ----------------------------------------------------------------------------------- nothing to evaluate
@pytest.mark.parametrize("empty", ["limit_val_batches=0", "an empty DataLoader"])
def test_a_validation_without_batches_is_an_error(empty):
    """Lightning skips every validation hook then; the callback refuses it at teardown instead of leaving
    ``result`` None with no word."""
    module = UserClassifier()
    callback = RiemannCallback(
        num_points=2, pretrained=pretrained_state(module), edit=Extrapolate(-0.5), module_name="model", filename=None
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        inference_mode=False,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0 if empty.startswith("limit") else None,
    )
    data = image_dataset() if empty.startswith("limit") else []
    with pytest.raises(ValueError, match=r"RiemannCallback evaluated no validation batch.*limit_val_batches is 0"):
        callback.validate(trainer, module, DataLoader(data, batch_size=6), verbose=False)
    assert callback.result is None and not parametrize.is_parametrized(module.model)


def test_a_module_name_the_module_lacks_lists_its_children():
    module = UserClassifier()
    callback = RiemannCallback(
        num_points=2, pretrained=pretrained_state(module), edit=Extrapolate(-0.5), module_name="net", filename=None
    )
    with pytest.raises(
        ValueError,
        match=r"module_name='net': UserClassifier has no submodule 'net'\. Its children "
        r"are model;",
    ):
        callback.validate(trainer_with(callback), module, DataLoader(image_dataset(), batch_size=6), verbose=False)
