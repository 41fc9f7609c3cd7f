"""What :class:`~lightning_delta.callbacks.RiemannCallback` sweeps: an :class:`EditTarget`.

A :class:`~lightning_delta.DeltaEditModule` is one; :class:`ModuleTarget` makes one of any other LightningModule
(its loss is the module's ``training_step`` output, read as a batch mean by :func:`training_step_loss`). Both attach
their edit through :func:`~lightning_delta.attach.attach_edit`, and ``GradientBiased`` gets its ∇L(W_post) from
:func:`~lightning_delta.gradients.gradients_at_post`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn

from lightning_delta.attach import attach_edit
from lightning_delta.delta import Patterns
from lightning_delta.editing import Edit, check_edit
from lightning_delta.gradients import LossTarget, gradients_at_post
from lightning_delta.handle import EditHandle
from lightning_delta.losses import LossOutput
from lightning_delta.parametrize import check_E_dtype

__all__ = ["EditTarget", "ModuleTarget", "edited_submodule", "training_step_loss", "warn_if_batch_sum"]


@runtime_checkable
class EditTarget(LossTarget, Protocol):
    """What :class:`~lightning_delta.callbacks.RiemannCallback` sweeps: a model with ``W_post + t·E`` attached.

    The sweep calls, in this order: ``edited_model`` attaches the edit (once) and returns the handle that sets
    ``t``; ``begin_sweep`` says that the sweep measures the loss at every ``t`` from now on, so that the target
    need not; then, per batch, ``riemann_prepare`` turns the batch into what ``riemann_loss`` reads (once, before
    the C + 1 points) and ``riemann_loss`` is the summed loss and item count of the batch at the current ``t``;
    ``riemann_accuracy`` is the task's accuracy at ``t = 0`` and ``t = 1`` once validation has ended (``None``
    without an evaluator); ``end_sweep`` ends the sweep, after an error too: the target lets go of what it held
    for the sweep alone.
    """

    def edited_model(self, trainer: pl.Trainer | None = None) -> EditHandle: ...

    def begin_sweep(self) -> None: ...

    def riemann_accuracy(self) -> tuple[float, float] | None: ...

    def end_sweep(self) -> None: ...


class ModuleTarget:
    """Any LightningModule as an :class:`EditTarget`: the edit goes on its submodule ``module_name`` (whose tensor
    names match ``pretrained``), the loss is its ``training_step`` (or ``loss_fn``), and ``end_sweep`` gives the
    module back with W_post and its ``requires_grad`` flags as they were: the edit is the sweep's alone.

    Args:
        module: the user's LightningModule.
        pretrained: W_pre (module, state dict, directory, hub id).
        edit: the editing operation F, or a mapping of ready-made ``E`` tensors.
        module_name: the submodule to edit (``""``: the module itself).
        include, exclude: regular expressions selecting the edited tensors.
        loss_fn: ``(module, batch, batch_idx) -> LossOutput``; default :func:`training_step_loss`.
        E_dtype: how ``E`` is kept, ``"float32"``, ``"model"`` or ``"on_the_fly"`` (see
            :func:`~lightning_delta.attach.attach_edit`).
    """

    def __init__(
        self,
        module: pl.LightningModule,
        *,
        pretrained: nn.Module | Mapping[str, Tensor] | str,
        edit: Edit,
        module_name: str = "",
        include: Patterns = None,
        exclude: Patterns = None,
        loss_fn: Callable[[pl.LightningModule, Any, int], LossOutput] | None = None,
        E_dtype: str = "float32",  # noqa: N803
    ) -> None:
        check_edit(edit)
        self.E_dtype = check_E_dtype(E_dtype)
        self.module, self.pretrained, self.edit = module, pretrained, edit
        self.model = edited_submodule(module, module_name)
        self.include, self.exclude = include, exclude
        self.loss_fn = loss_fn if loss_fn is not None else training_step_loss
        self._edited: EditHandle | None = None
        self._mean_checked = loss_fn is not None  # a loss_fn returns sums and counts itself

    def edited_model(self, trainer: pl.Trainer | None = None) -> EditHandle:
        if self._edited is None:
            gradients = None
            if getattr(self.edit, "needs_gradients", False):
                gradients = gradients_at_post(_require_trainer(trainer, self.edit), self, self.model)
            self._edited = attach_edit(
                self.model,
                pretrained=self.pretrained,
                edit=self.edit,
                include=self.include,
                exclude=self.exclude,
                gradients=gradients,
                E_dtype=self.E_dtype,
            )
        return self._edited

    def riemann_prepare(self, batch: Any) -> Any:
        if not self._mean_checked:  # the first batch: is training_step a batch mean, as the sweep reads it?
            self._mean_checked = True
            warn_if_batch_sum(self.module, batch)
        return batch

    def riemann_loss(self, batch: Any, batch_idx: int = 0) -> LossOutput:
        return self.loss_fn(self.module, batch, batch_idx)

    def begin_sweep(self) -> None:
        """Nothing: the module measures no loss of its own while the sweep runs."""

    def riemann_accuracy(self) -> tuple[float, float] | None:
        return None

    def end_sweep(self) -> None:
        """Remove the edit: the module holds W_post again, trainable as before."""
        if self._edited is not None:
            self._edited.remove()
            self._edited = None


def edited_submodule(module: nn.Module, module_name: str) -> nn.Module:
    """``module``'s submodule ``module_name`` (``""``: ``module`` itself); a name it lacks is refused with its
    children listed."""
    if not module_name:
        return module
    try:
        return module.get_submodule(module_name)
    except AttributeError:
        children = [name for name, _ in module.named_children()]
        raise ValueError(
            f"module_name={module_name!r}: {type(module).__name__} has no submodule {module_name!r}. Its children "
            f"are {', '.join(children) or 'none'}; give module_name the one whose tensor names match the pre-trained "
            'weights ("" for the module itself).'
        ) from None


def _require_trainer(trainer: pl.Trainer | None, edit: Any) -> pl.Trainer:
    if trainer is None:
        raise ValueError(
            f"{type(edit).__name__} needs the gradients at W_post over the validation data: attach it "
            "under trainer.validate."
        )
    return trainer


def training_step_loss(module: pl.LightningModule, batch: Any, batch_idx: int) -> LossOutput:
    """A foreign module's ``training_step`` loss (a batch mean) as a sum over the batch's examples."""
    output = module.training_step(batch, batch_idx)
    loss = output["loss"] if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ValueError(
            f"{type(module).__name__}.training_step returned {type(output).__name__}; RiemannCallback needs a "
            "scalar loss tensor (or a dict with 'loss'), or pass `loss_fn=`."
        )
    size = float(extract_batch_size(batch))
    return LossOutput(loss.to(torch.float64) * size, torch.tensor(size, dtype=torch.float64))


class _UnsplittableError(Exception):
    pass


def _split_batch(batch: Any, size: int, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch of ``size``: tensors and per-example lists are sliced along their first
    dimension, scalars kept; anything else raises :class:`_UnsplittableError`."""
    if isinstance(batch, Tensor):
        if batch.ndim == 0:
            return batch
        if batch.shape[0] != size:
            raise _UnsplittableError
        return batch[start:stop]
    if isinstance(batch, Mapping):
        split = {key: _split_batch(value, size, start, stop) for key, value in batch.items()}
        return type(batch)(split)  # type: ignore[call-arg]  # the batch's mapping class (dict, BatchEncoding)
    if isinstance(batch, (list, tuple)):
        if batch and all(isinstance(item, (str, int, float, bool)) for item in batch):
            if len(batch) != size:
                raise _UnsplittableError
            return type(batch)(batch[start:stop])  # one entry per example (e.g. the answers' texts)
        return type(batch)(_split_batch(item, size, start, stop) for item in batch)
    if batch is None or isinstance(batch, (str, int, float, bool)):
        return batch
    raise _UnsplittableError


def warn_if_batch_sum(module: pl.LightningModule, batch: Any, batch_idx: int = 0) -> bool:
    """Warn (and return True) when ``module.training_step`` looks like a sum over the batch, not the batch mean that
    :func:`training_step_loss` reads: every number would then come out batch-size times too large.

    The batch is split into halves A and B, and ``training_step`` runs on A, B and the whole (no gradient, three
    forwards, once per validation). A mean, weighted by examples or tokens, lies between its halves' means:
    ``L(A ∪ B) ≤ max(L(A), L(B))``. A sum is ``L(A) + L(B)``. The warning needs both: ``L(A ∪ B)`` within 5 % of
    ``L(A) + L(B)`` and above 1.2 ``max(L(A), L(B))``, all three positive. A batch of one example, or one that cannot
    be split by examples, is not checked.
    """
    try:
        size = int(extract_batch_size(batch))
        halves = [_split_batch(batch, size, 0, size // 2), _split_batch(batch, size, size // 2, size)]
    except (_UnsplittableError, RecursionError, ValueError, TypeError):
        return False
    if size < 2:
        return False
    with torch.no_grad():
        try:
            whole, first, second = (float(_step_loss(module, part, batch_idx)) for part in (batch, *halves))
        except Exception:  # noqa: BLE001 - a training_step that cannot run on half a batch is not checked here
            return False
    summed = abs(whole - first - second) <= 0.05 * whole and whole > 1.2 * max(first, second)
    if min(whole, first, second) <= 0 or not summed:
        return False
    rank_zero_warn(
        f"{type(module).__name__}.training_step looks like a sum over the batch, not a batch mean: on the first "
        f"validation batch its loss is {whole:.6g}, and {first:.6g} + {second:.6g} on the two halves. RiemannCallback "
        "reads training_step as a batch mean (and weights it by the batch size), so every number would come out "
        f"about {size}x too large. Return the mean (e.g. reduction='mean'), or pass loss_fn= returning sums and counts."
    )
    return True


def _step_loss(module: pl.LightningModule, batch: Any, batch_idx: int) -> Tensor:
    output = module.training_step(batch, batch_idx)
    loss = output["loss"] if isinstance(output, Mapping) else output
    if loss is None:
        raise TypeError(f"{type(module).__name__}.training_step returned no loss.")
    return loss
