"""W_post + t·E as a parametrization: gradients for t, recomputed W(t), materialising and saving."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_delta.parametrize import EditedModel, EditParametrization
from tests.support.riemann_support import VOCAB, random_edits, tiny_llama


def test_t_gradient_is_the_frobenius_product_with_the_weight_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    reference = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    reference.load_state_dict(model.state_dict())
    edits = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    x = torch.randn(4, 5, dtype=torch.float64)
    edited = EditedModel(model, edits)
    for t in (0.0, 0.4, 1.0):
        edited.set_t(t)
        with edited.recompute_weights():
            model(x).square().sum().backward()
        ours = edited.pop_inner_products()
        point = {name: reference.state_dict()[name] + t * edits[name] for name in edits}
        weights = {name: w.clone().requires_grad_(True) for name, w in point.items()}
        torch.func.functional_call(reference, weights, (x,)).square().sum().backward()
        expected = torch.stack([(weights[name].grad * edits[name]).sum() for name in edited.names])
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        assert all(p.t.grad is None for p in edited.parametrizations.values())  # popped


def test_at_t_0_a_forward_without_gradients_reads_w_post_itself():
    """W_post + 0·E is W_post: without gradients the parametrization hands W_post over (no E read, made or added),
    and the output is the plain model's bit for bit; with gradients it goes through E, for ∂L/∂t."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    plain = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 5, dtype=torch.float64)
    post = {name: value.detach().clone() for name, value in model.named_parameters()}
    made = []

    def recompute(w_post: torch.Tensor) -> torch.Tensor:
        made.append(w_post.shape)
        return torch.ones_like(w_post)

    edited = EditedModel(model, {"0.weight": torch.ones(7, 5, dtype=torch.float64)})
    parametrize.register_parametrization(model[2], "weight", EditParametrization(None, recompute=recompute))
    made.clear()  # registering checks the parametrization's output once
    for t in (0.0, 0.5):
        edited.set_t(t)
        model[2].parametrizations.weight[0].t.data.fill_(t)
        with torch.no_grad(), parametrize.cached():  # each W(t) made once for the forward and the reads here
            out = model(x)
            weights = (model[0].weight, model[2].weight)
        if t == 0.0:
            assert torch.equal(out, plain(x))  # bit for bit
            assert weights[0].data_ptr() == model[0].parametrizations.weight.original.data_ptr()
            assert torch.equal(weights[1], post["2.weight"]) and made == []  # E never made at t = 0
        else:
            assert torch.equal(weights[0], post["0.weight"] + 0.5) and len(made) == 1
    edited.set_t(0.0)
    model[2].parametrizations.weight[0].t.data.fill_(0.0)
    model(x).sum().backward()  # with gradients, t = 0 goes through E: ∂L/∂t is there
    assert edited.pop_inner_products().abs().sum() > 0 and len(made) > 1


@pytest.mark.slow
def test_recompute_keeps_no_materialised_weight_alive():
    """Under recompute_weights, no W(t) survives the forward: backward rebuilds it."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    edited = EditedModel(model, {name: torch.randn_like(p) for name, p in model.named_parameters() if "weight" in name})
    x = torch.randn(8, 64)
    results = {}
    for recompute in (False, True):
        produced = []
        hook = lambda module, args, output, produced=produced: produced.append(__import__("weakref").ref(output))  # noqa: E731
        handles = [p.register_forward_hook(hook) for p in edited.parametrizations.values()]
        edited.set_t(0.5)
        context = edited.recompute_weights() if recompute else torch.enable_grad()
        with context:
            loss = model(x).sum()
            gc.collect()
            alive = sum(ref() is not None for ref in produced)
            loss.backward()
        for handle in handles:
            handle.remove()
        results[recompute] = (alive, edited.pop_inner_products())
    assert results[False][0] == 2  # the second and third Linear keep W(t) for the input gradient
    assert results[True][0] == 0
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_materialise_and_save_pretrained_round_trip(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(dtype=torch.float32, tie=tie)
    post = {k: v.clone() for k, v in model.state_dict().items()}
    edits = random_edits(model, scale=0.05)
    edited = EditedModel(model, edits)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    edited.set_t(1.0)
    with torch.no_grad():
        logits_edited = model(ids).logits
    edited.materialize(1.0)
    assert not parametrize.is_parametrized(model)
    for name, edit in edits.items():
        torch.testing.assert_close(model.state_dict()[name], post[name] + edit, rtol=0, atol=1e-7)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits_edited, rtol=1e-5, atol=1e-5)
    assert all("parametrizations" not in key for key in reloaded.state_dict())


def test_remove_gives_back_post_weights_and_requires_grad():
    model = tiny_llama(dtype=torch.float32)
    post = {k: v.clone() for k, v in model.state_dict().items()}
    model.lm_head.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    edited = EditedModel(model, random_edits(model, "proj"))
    edited.set_t(0.7)
    edited.remove()
    assert not parametrize.is_parametrized(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, post[key]), key
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


@pytest.mark.parametrize(
    "edits, match",
    [({"nope.weight": torch.zeros(1)}, "not a parameter"), ({"0.weight": torch.zeros(3, 3)}, "shape")],
)
def test_bad_edits(edits, match):
    with pytest.raises(ValueError, match=match):
        EditedModel(nn.Sequential(nn.Linear(2, 4)), edits)


def test_edit_buffer_stays_float32_for_half_models():
    model = nn.Linear(3, 3).to(torch.bfloat16)
    edited = EditedModel(model, {"weight": torch.ones(3, 3, dtype=torch.bfloat16)})
    parametrization = edited.parametrizations["weight"]
    assert isinstance(parametrization, EditParametrization)
    assert parametrization.E.dtype == torch.float32 and parametrization.t.dtype == torch.float64
    assert model.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(3,), (300, 700), (5, 1 << 16), (0, 4)])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_inner_product_against_float64(shape, grad_dtype):
    """float64 tensors: exact to 1e-12. Otherwise float32 dots of 65,536 entries summed in float64: the error is
    bounded by a few float32 roundings of Σ|grad·E| (the sum of the magnitudes, which cancellation cannot shrink)."""
    from lightning_delta.parametrize import inner_product

    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=generator, dtype=torch.float64).to(grad_dtype)
    edit = (torch.randn(shape, generator=generator, dtype=torch.float64) * 1e-3).to(
        torch.float64 if grad_dtype == torch.float64 else torch.float32
    )
    products = [float(g) * float(e) for g, e in zip(grad.double().flatten().tolist(), edit.double().flatten().tolist())]
    expected, magnitude = math.fsum(products), math.fsum(abs(x) for x in products)
    got = inner_product(grad, edit)
    assert got.dtype == torch.float64
    bound = 1e-12 * magnitude if grad_dtype == torch.float64 else 1e-6 * magnitude
    assert abs(float(got) - expected) <= bound + 1e-300
    if grad.ndim == 2 and grad.numel():  # a non-contiguous gradient (a transposed view)
        assert abs(float(inner_product(grad.t(), edit.t())) - expected) <= bound


class TokenRegressor(nn.Module):
    """``embedding(ids) @ head.Tᵀ`` with a padding index: the forward reads the padding row like any other."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding
        self.head = nn.Linear(embedding.embedding_dim, 3, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids))


class ScaledEmbedding(nn.Embedding):
    """A subclass whose forward goes through ``nn.Embedding.forward`` (as transformers' scaled word embeddings)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 1.5


def _padded_regressor(embedding_class: type[nn.Embedding]) -> TokenRegressor:
    torch.manual_seed(0)
    model = TokenRegressor(embedding_class(10, 4, padding_idx=0)).double()
    with torch.no_grad():
        model.embedding.weight[0].normal_()  # a trained padding row (e.g. eos used as pad) is not zero
    return model


def _reference_loss(model: TokenRegressor, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The regressor's loss written with a plain ``F.embedding`` (no padding index): the true gradient."""
    scale = 1.5 if isinstance(model.embedding, ScaledEmbedding) else 1.0
    hidden = torch.nn.functional.embedding(ids, weights["embedding.weight"]) * scale
    return torch.tanh(torch.nn.functional.linear(hidden, weights["head.weight"])).square().sum()


@pytest.mark.parametrize("embedding_class", [nn.Embedding, ScaledEmbedding], ids=["embedding", "subclass"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
def test_padding_row_counts_in_the_inner_product(embedding_class, recompute):
    """The padding token also occurs as an input: ⟨∇_W L, E⟩ of the embedding includes the padding row's share,
    equal to the inner product with the gradient of a plain F.embedding lookup (which ``padding_idx`` would zero)."""
    model = _padded_regressor(embedding_class)
    post = {name: value.clone() for name, value in model.state_dict().items()}
    ids = torch.tensor([[0, 3, 0, 7], [2, 0, 9, 0]])
    generator = torch.Generator().manual_seed(1)
    edits = {
        name: torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.1
        for name, p in model.named_parameters()
    }
    edited = EditedModel(model, edits)
    for t in (0.0, 0.3, 1.0):
        edited.set_t(t)
        with edited.recompute_weights() if recompute else torch.enable_grad():
            torch.tanh(model(ids)).square().sum().backward()
        ours = edited.pop_inner_products()
        weights = {name: (post[name] + t * edits[name]).requires_grad_(True) for name in edited.names}
        gradients = torch.autograd.grad(_reference_loss(model, weights, ids), [weights[n] for n in edited.names])
        expected = torch.stack([(g * edits[name]).sum() for g, name in zip(gradients, edited.names)])
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        padding_share = float(
            (gradients[edited.names.index("embedding.weight")][0] * edits["embedding.weight"][0]).sum()
        )
        assert abs(padding_share) > 1e-3 * float(expected.abs().max())  # the row that padding_idx would drop counts
        assert model.embedding.padding_idx == 0  # outside the embedding's own forward it reads as before
    edited.remove()
    assert model.embedding.padding_idx == 0 and not model.embedding._forward_hooks
    assert not model.embedding._forward_pre_hooks
    assert all(torch.equal(value, post[name]) for name, value in model.state_dict().items())
    assert model.state_dict().keys() == post.keys()


def test_padding_idx_is_kept_by_materialise_and_restored_after_an_error_in_forward():
    model = _padded_regressor(nn.Embedding)
    post = {name: value.clone() for name, value in model.state_dict().items()}
    edit = torch.full((10, 4), 0.25, dtype=torch.float64)
    edited = EditedModel(model, {"embedding.weight": edit})
    with pytest.raises(IndexError):
        model(torch.tensor([0, 10]))  # out of range: the forward raises after padding_idx was cleared
    assert model.embedding.padding_idx == 0
    edited.materialize(1.0)
    assert model.embedding.padding_idx == 0 and not model.embedding._forward_pre_hooks
    torch.testing.assert_close(model.embedding.weight, post["embedding.weight"] + edit, rtol=0, atol=0)
    model.embedding.weight.requires_grad_(True)
    model(torch.tensor([0, 1])).sum().backward()
    assert torch.equal(model.embedding.weight.grad[0], torch.zeros(4, dtype=torch.float64))  # PyTorch's rule again
