"""E_dtype="on_the_fly": no E kept, each made again from W_pre and the edit; the numbers of kept float32 E, bit for
bit, for the Riemann sweep and the exact ΔL, and clear errors where it cannot apply."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_delta.callbacks import RiemannCallback
from lightning_delta.edits import DARE, BitDelta, DeltaEdit, GradientBiased, MagnitudePrune
from lightning_delta.module import DeltaEditModule
from tests.support.riemann_support import random_edits, tiny_llama, token_dataset
from tests.support.tiny_models import make_tiny_pair
from tests.test_riemann import run_validate

FIELDS = ("term", "trapezoid", "exact", "loss_post", "loss_edit", "inner_products", "inner_products_per_tensor")


def sweep(pair, edit, E_dtype, **callback_arguments):  # noqa: N803
    module = DeltaEditModule(copy.deepcopy(pair.post), pretrained=str(pair.pre_dir), edit=edit, E_dtype=E_dtype)
    callback = RiemannCallback(filename=None, **callback_arguments)
    run_validate(module, DataLoader(token_dataset(12), batch_size=6), callback)
    return module, callback.result


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {family: make_tiny_pair(root / family, family, scale=0.05) for family in ("llama", "llama-tied")}


@pytest.mark.parametrize(
    "edit", [DARE(p=0.7, seed=4), BitDelta(bits=2), MagnitudePrune(p=0.8)], ids=["dare", "bitdelta", "magnitude_prune"]
)
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_on_the_fly_equals_kept_float32_E_bit_for_bit(pairs, family, edit):
    kept_module, kept = sweep(pairs[family], edit, "float32", num_points=3, trapezoid=True)
    module, made = sweep(pairs[family], edit, "on_the_fly", num_points=3, trapezoid=True)
    for field in FIELDS:
        assert getattr(made, field) == getattr(kept, field), field
    assert all(p.E is None for p in module.edited_model().parametrizations.values())  # nothing kept
    assert all(
        torch.equal(module.edited_model().E(name), kept_module.edited_model().E(name))
        for name in kept_module.edited_model().names
    )


@pytest.mark.slow
@pytest.mark.parametrize("recompute_weights", [True, False])
def test_on_the_fly_with_the_callbacks_defaults_and_with_W_kept(pairs, recompute_weights):
    arguments = {} if recompute_weights else {"recompute_weights": False}
    _, kept = sweep(pairs["llama"], DARE(p=0.5, seed=1), "float32", **arguments)
    module, made = sweep(pairs["llama"], DARE(p=0.5, seed=1), "on_the_fly", **arguments)
    for field in FIELDS:
        assert getattr(made, field) == getattr(kept, field), field
    edited = module.edited_model()
    model = edited.remove()
    assert edited.on_remove == []  # W_pre's files closed
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), pairs["llama"].post.state_dict().values())
    )


class Unseeded(DeltaEdit):
    """Draws its mask from the global RNG: a different F(ΔW) at every call."""

    name = "unseeded"

    def edit_tensor(self, name, delta, gradient=None):
        return delta * (torch.rand(delta.shape) > 0.5)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            Unseeded(),
            r"needs an edit that gives the same F\(ΔW\) every time, but Unseeded gave two different ones for ",
        ),
        (GradientBiased(p=0.5, k=0.5), r"does not serve GradientBiased: it needs ∇L\(W_post\)"),
        ("mapping", r"ready-made E tensors are held in memory already"),
    ],
)
def test_on_the_fly_refuses_what_it_cannot_make_again(pairs, edit, match):
    model = copy.deepcopy(pairs["llama"].post)
    edit = random_edits(model) if edit == "mapping" else edit
    module = DeltaEditModule(model, pretrained=str(pairs["llama"].pre_dir), edit=edit, E_dtype="on_the_fly")
    with pytest.raises(ValueError, match=match):
        run_validate(module, DataLoader(token_dataset(4), batch_size=4), RiemannCallback(num_points=1, filename=None))
    assert not any("parametrizations" in name for name, _ in model.named_parameters())


def test_unknown_E_dtype_names_on_the_fly():
    with pytest.raises(ValueError, match=r"'on_the_fly' \(E not kept"):
        DeltaEditModule(tiny_llama(), pretrained=None, edit={}, E_dtype="lazy")
