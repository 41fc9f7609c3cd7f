"""Measured loss changes for the plan: C-point Riemann sweeps (``trainer.validate`` with a
:class:`~lightning_delta.callbacks.RiemannCallback` on a :class:`~lightning_delta.DeltaEditModule`), and the
brute-force reference that evaluates every candidate setting of every tensor exactly."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_delta.attach import edit_differences
from lightning_delta.callbacks import RiemannCallback, RiemannResult
from lightning_delta.delta import Weights
from lightning_delta.edits import DeltaEdit
from lightning_delta.losses import DeltaLoss
from lightning_delta.module import DeltaEditModule
from lightning_delta.parametrize import EditedModel

__all__ = [
    "exact_candidate_changes",
    "riemann_sweep",
    "sweep_passes",
    "sweep_per_tensor",
    "tensor_patterns",
    "trapezoid_per_tensor",
]

# W_pre as a DeltaEditModule takes it (a module, a state dict, a directory or hub id): the plan's sweeps build one.
ModuleWeights = nn.Module | Mapping[str, Tensor] | str

# What a plan's trainers share: nothing is trained, logged or checkpointed; one process.
TRAINER_ARGUMENTS: dict[str, Any] = dict(
    inference_mode=False,
    logger=False,
    enable_checkpointing=False,
    enable_model_summary=False,
    enable_progress_bar=False,
    use_distributed_sampler=False,
    devices=1,
)


def tensor_patterns(names: Sequence[str]) -> list[str]:
    """One anchored regular expression per tensor name, ``^name$`` (escaped): selects exactly those tensors."""
    return [f"^{re.escape(name)}$" for name in names]


def riemann_sweep(
    model: nn.Module,
    *,
    pretrained: ModuleWeights,
    edit: DeltaEdit,
    datamodule: pl.LightningDataModule,
    loss: str | DeltaLoss = "causal_lm",
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    num_points: int | None = None,
    accelerator: str = "cpu",
    rule: str = "trapezoid",
) -> RiemannResult:
    """One sweep of ``edit`` on the tensors selected by ``include`` / ``exclude``, run as ``lightning-delta validate``
    runs it; ``model`` is given back at W_post. ``rule="trapezoid"`` (the default) is the left rule's C points with
    the backward at t = 1: ``C + 1`` forward+backward passes over the data (the exact ΔL comes from the t = 1
    forward); ``"gauss"`` and ``"adaptive"`` run their nodes and forwards at t = 0 and 1
    (:class:`~lightning_delta.RiemannCallback`; ``num_points`` ``None``: the rule's own)."""
    module = DeltaEditModule(model, pretrained=pretrained, edit=edit, loss=loss, include=include, exclude=exclude)
    if rule == "trapezoid":  # as before the rules: the left rule's sweep with its trapezoid
        callback = RiemannCallback(num_points=num_points, trapezoid=True, filename=None)
    else:
        callback = RiemannCallback(num_points=num_points, rule=rule, filename=None)
    trainer = pl.Trainer(accelerator=accelerator, callbacks=[callback], **TRAINER_ARGUMENTS)
    try:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        module.edited_model().remove()
    assert callback.result is not None  # set at the end of validation, which the callback refuses to skip
    return callback.result


def trapezoid_per_tensor(result: RiemannResult) -> dict[str, float]:
    """Each tensor's share of the trapezoid estimate, ``(1/C)[½ g_0 + Σ_{0<c<C} g_c + ½ g_C]`` of its own inner
    products: the per-tensor terms sum to the sweep's ``trapezoid``."""
    shares = {}
    for name, values in result.inner_products_per_tensor.items():
        C = len(values) - 1  # noqa: N806 (the paper's name)
        shares[name] = (values[0] / 2 + sum(values[1:C]) + values[C] / 2) / C
    return shares


def sweep_per_tensor(result: RiemannResult) -> dict[str, float]:
    """The per-tensor terms a plan refines with: the trapezoid shares of a left-rule sweep with its backward at t = 1
    (:func:`trapezoid_per_tensor`), else the rule's own ``term_per_tensor``."""
    return trapezoid_per_tensor(result) if result.rule == "left" else dict(result.term_per_tensor)


def sweep_passes(result: RiemannResult) -> tuple[int, int]:
    """(forward+backward, forward-only) passes over the data of one sweep: forward-only at t = 0 and t = 1 where the
    rule runs no backward there."""
    backward_at_ends = sum(not math.isnan(result.inner_products[j]) for j in (0, -1))
    assert result.passes is not None  # every sweep's result has it (RiemannResult.from_sums)
    return result.passes, 2 - backward_at_ends


def _mean_loss(target: Any, model: nn.Module, loaders: Iterable[Iterable[Any]], device: torch.device) -> float:
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for loader in loaders:
            for batch_idx, batch in enumerate(loader):
                output = target.riemann_loss(target.riemann_prepare(move_data_to_device(batch, device)), batch_idx)
                total += output.total.detach().double().cpu()
                count += output.count.detach().double().cpu()
    return float(total / count)


def exact_candidate_changes(
    target: Any,
    model: nn.Module,
    *,
    pretrained: Weights,
    names: Sequence[str],
    edits: Sequence[DeltaEdit],
    loaders: Sequence[Iterable[Any]],
) -> tuple[torch.Tensor, int]:
    """The brute-force reference: ``ΔL_k(v) = L(W_post + E_k(v)) − L(W_post)``, tensor ``k`` edited alone, for every
    tensor and edit, as a ``(K, V)`` float64 tensor, and the forward passes over the data it cost (``K·V + 1``)."""
    device = next(model.parameters()).device
    base = _mean_loss(target, model, loaders, device)
    changes = torch.zeros(len(names), len(edits), dtype=torch.float64)
    for j, edit in enumerate(edits):
        differences = edit_differences(model, pretrained=pretrained, edit=edit, include=tensor_patterns(names))
        for k, name in enumerate(names):
            edited = EditedModel(model, {name: differences[name]})
            try:
                edited.set_t(1.0)
                changes[k, j] = _mean_loss(target, model, loaders, device) - base
            finally:
                edited.remove()
    return changes, len(names) * len(edits) + 1
