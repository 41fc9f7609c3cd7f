"""Gradients at W_post over a data set in one pass, each batch's gradient taken as soon as autograd has it: the pass
behind ∇L(W_post) for ``GradientBiased`` (:func:`gradients_at_post`) and behind the planner's gradient and Fisher
(:func:`~lightning_delta.planning.scores.gradient_statistics`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_delta.losses import LossOutput
from lightning_delta.padding import true_embedding_gradients
from lightning_delta.sharded import gradient_divide_factors, is_sharded

__all__ = ["LossTarget", "accumulation_zeros", "gradient_pass", "gradients_at_post"]


class LossTarget(Protocol):
    """What a gradient pass reads the loss from: ``riemann_prepare`` turns a batch into what ``riemann_loss`` reads,
    ``riemann_loss`` is the batch's summed loss and item count (a :class:`~lightning_delta.DeltaEditModule` is one,
    and so is every :class:`~lightning_delta.targets.EditTarget`)."""

    def riemann_prepare(self, batch: Any) -> Any: ...

    def riemann_loss(self, batch: Any, batch_idx: int = 0) -> LossOutput: ...


def accumulation_zeros(parameter: Tensor) -> Tensor:
    """Zeros to sum ``parameter``'s gradients into: float32 (float64 for float64 weights), so that a bf16 model's
    gradient is not accumulated in bf16 across batches; this process's rows of a ``DTensor``."""
    dtype = torch.float64 if parameter.dtype == torch.float64 else torch.float32
    rows = parameter.to_local() if is_sharded(parameter) else parameter
    return torch.zeros(rows.shape, dtype=dtype, device=rows.device)


def gradient_pass(
    target: LossTarget,
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[tuple[int, Any]],
    add: Callable[[str, Tensor], object],
    before_backward: Callable[[LossOutput], None],
) -> None:
    """Forward and backward of ``target``'s summed loss on each ``(batch_idx, batch)``, with gradients for the
    parameters ``names`` of ``model`` only.

    Each parameter's gradient of each batch goes to ``add(name, gradient)`` as soon as autograd has it (a
    post-accumulate-grad hook; for a parameter sharded by FSDP2, this process's rows after FSDP's reduce-scatter),
    and its ``.grad`` is freed at once. ``before_backward`` sees each batch's loss before its backward. The
    parameters' ``requires_grad`` flags are as before afterwards, and no ``.grad`` is left. An ``nn.Embedding``'s
    padding row gets its gradient like every other row (:mod:`lightning_delta.padding`).
    """
    parameters = dict(model.named_parameters())
    flags = {name: parameter.requires_grad for name, parameter in parameters.items()}

    def hand_on(name: str) -> Callable[[Tensor], None]:
        def hook(parameter: Tensor) -> None:  # FSDP2 calls it too, with this process's rows after reduce-scatter
            grad = parameter.grad
            assert grad is not None, "autograd has just accumulated it"
            add(name, grad.to_local() if is_sharded(grad) else grad)
            parameter.grad = None

        return hook

    for name, parameter in parameters.items():
        parameter.requires_grad_(name in names)
        parameter.grad = None
    hooks = [parameters[name].register_post_accumulate_grad_hook(hand_on(name)) for name in names]
    try:
        with torch.enable_grad(), true_embedding_gradients(model.modules()):
            for batch_idx, batch in batches:
                batch = target.riemann_prepare(batch)
                output = target.riemann_loss(batch, batch_idx)
                before_backward(output)
                output.total.backward()
    finally:
        for hook in hooks:
            hook.remove()
        for name, parameter in parameters.items():
            parameter.grad = None
            parameter.requires_grad_(flags[name])


def gradients_at_post(
    trainer: pl.Trainer, target: LossTarget, model: nn.Module, names: list[str] | None = None
) -> dict[str, Tensor]:
    """∇L(W_post) = (1/N) Σ_batches ∇(Σ loss) over the validation data (one pass), summed over processes: what
    ``GradientBiased`` needs. The loss is ``target``'s (``riemann_prepare`` then ``riemann_loss``); ``model`` is the
    module whose parameters (all, or ``names``) get gradients.

    Each batch's gradient is added into a float32 sum (float64 for float64 weights; :func:`accumulation_zeros`)
    by :func:`gradient_pass`. The returned tensors have that accumulation dtype. For a parameter sharded by FSDP2
    the sum holds this process's rows of the gradient, already summed over processes by FSDP's reduce-scatter; its
    entry is a ``DTensor`` of those rows, gathered whole only when the edit reads it.
    """
    parameters = dict(model.named_parameters())
    names = names if names is not None else list(parameters)
    sums = {name: accumulation_zeros(parameters[name]) for name in names}
    loaders = trainer.val_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    device = trainer.strategy.root_device
    count = torch.zeros((), dtype=torch.float64, device=device)

    def add_count(output: LossOutput) -> None:
        nonlocal count
        count += output.count

    batches = (
        (batch_idx, trainer.strategy.batch_to_device(batch, device))
        for loader in loaders
        for batch_idx, batch in enumerate(loader)
    )
    gradient_pass(target, model, names, batches, lambda name, grad: sums[name].add_(grad), add_count)
    count = trainer.strategy.reduce(count, reduce_op="sum")
    factors = gradient_divide_factors(model)
    gradients: dict[str, Tensor] = {}
    for name, total in sums.items():
        parameter = parameters[name]
        if is_sharded(parameter):  # FSDP has summed it over processes and divided by its factor
            rows = total * (factors.get(id(parameter), 1.0) / count.to(total.dtype))
            gradients[name] = DTensor.from_local(
                rows, parameter.device_mesh, parameter.placements, shape=parameter.shape, stride=parameter.stride()
            )
        else:
            gradients[name] = trainer.strategy.reduce(total, reduce_op="sum") / count.to(total.dtype)
    return gradients
