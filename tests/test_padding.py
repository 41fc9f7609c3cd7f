"""The padding row of an nn.Embedding gets its true gradient wherever the library differentiates the loss: ∇L(W_post)
for GradientBiased and the planner, and the demo's ∇L, against a plain F.embedding lookup without padding_idx."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.demo.analysis import loss_gradient
from lightning_delta.gradients import gradients_at_post
from lightning_delta.losses import CausalLMLoss, LossOutput
from lightning_delta.padding import true_embedding_gradients
from lightning_delta.planning.scores import gradient_statistics


class EmbeddingRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(10, 4, padding_idx=0)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.embedding.weight[0].normal_()  # a trained padding row (eos used as pad) is not zero

    def forward(self, ids):
        return self.head(self.embedding(ids))


class SquaredError:
    """Σ ½‖model(ids) − y‖² over the batch; ``plain`` computes it with F.embedding and no padding_idx."""

    def __init__(self, model: nn.Module, plain: bool = False) -> None:
        self.model, self.plain = model, plain

    def riemann_prepare(self, batch):
        return batch

    def riemann_loss(self, batch, batch_idx=0):
        ids, y = batch
        if self.plain:
            hidden = F.embedding(ids, self.model.embedding.weight)
            out = F.linear(hidden, self.model.head.weight, self.model.head.bias)
        else:
            out = self.model(ids)
        return LossOutput(0.5 * ((out - y) ** 2).sum(), torch.tensor(float(ids.numel()), dtype=torch.float64))


def batches():
    generator = torch.Generator().manual_seed(1)
    ids = [torch.tensor([[0, 4, 0], [3, 0, 9]]), torch.tensor([[0, 0, 1]])]
    return [(x, torch.randn(*x.shape, 2, generator=generator, dtype=torch.float64)) for x in ids]


def reference_gradient(model: nn.Module, data) -> dict[str, torch.Tensor]:
    """(1/N) Σ_batches ∇ Σ loss with the plain lookup, by an explicit loop in float64."""
    point = copy.deepcopy(model)
    parameters = dict(point.named_parameters())
    sums = {name: torch.zeros_like(p) for name, p in parameters.items()}
    count = 0.0
    for batch in data:
        output = SquaredError(point, plain=True).riemann_loss(batch)
        for name, gradient in zip(parameters, torch.autograd.grad(output.total, list(parameters.values()))):
            sums[name] += gradient
        count += float(output.count)
    return {name: total / count for name, total in sums.items()}


def test_gradient_statistics_give_the_padding_row_its_gradient():
    model = EmbeddingRegressor().double()
    expected = reference_gradient(model, batches())
    assert expected["embedding.weight"][0].abs().max() > 1e-2
    stats = gradient_statistics(SquaredError(model), model, [batches()], ["embedding.weight", "head.weight"])
    for name in ("embedding.weight", "head.weight"):
        torch.testing.assert_close(stats.gradient[name], expected[name], rtol=1e-12, atol=1e-14)
    assert model.embedding.padding_idx == 0 and not model.embedding._forward_pre_hooks


def test_gradients_at_post_give_the_padding_row_its_gradient():
    model = EmbeddingRegressor().double()
    expected = reference_gradient(model, batches())
    one_process = SimpleNamespace(
        batch_to_device=lambda batch, device: batch,
        root_device=torch.device("cpu"),
        reduce=lambda value, reduce_op: value,
    )
    trainer = SimpleNamespace(val_dataloaders=[batches()], strategy=one_process)
    gradients = gradients_at_post(trainer, SquaredError(model), model)
    for name, value in expected.items():
        torch.testing.assert_close(gradients[name], value, rtol=1e-12, atol=1e-14)
    assert model.embedding.padding_idx == 0 and not model.embedding._forward_pre_hooks


def test_demo_loss_gradient_gives_the_padding_row_its_gradient():
    from tests.support.tiny_models import make_tiny_model

    model = make_tiny_model("llama", dtype=torch.float64)
    with torch.no_grad():
        model.model.embed_tokens.weight[0].normal_(std=0.02)
    ids = torch.tensor([[5, 0, 7, 0, 9, 11], [0, 3, 4, 0, 2, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    gradients = loss_gradient(model, batch)
    plain = copy.deepcopy(model)
    plain.model.embed_tokens.padding_idx = None  # the same lookup, PyTorch's padding rule off
    output = CausalLMLoss()(plain, batch)
    expected = torch.autograd.grad(output.total / output.count, plain.model.embed_tokens.weight)[0]
    assert expected[0].abs().max() > 1e-6
    torch.testing.assert_close(gradients["model.embed_tokens.weight"], expected, rtol=1e-10, atol=1e-14)
    assert model.model.embed_tokens.padding_idx == 0


def test_nested_contexts_and_other_modules_are_left_alone():
    embedding, linear = nn.Embedding(3, 2, padding_idx=1), nn.Linear(2, 2)
    with true_embedding_gradients([embedding, linear]), true_embedding_gradients([embedding]):
        embedding(torch.tensor([1, 1])).sum().backward()
        assert embedding.padding_idx == 1
    assert torch.equal(embedding.weight.grad[1], torch.full((2,), 2.0))
    assert not embedding._forward_pre_hooks and not embedding._forward_hooks and not linear._forward_pre_hooks
