"""Attaching an edit to a model: the one place where ``E = F(ΔW) − ΔW`` is built and ``W_post + t·E`` registered.

:class:`RiemannCallback <lightning_delta.callbacks.RiemannCallback>` drives an :class:`EditTarget`: a
:class:`~lightning_delta.DeltaEditModule` is one, and :class:`ModuleTarget` makes one of any other
LightningModule (its loss is the module's ``training_step`` output). Both attach through :func:`attach_edit`, and
``GradientBiased`` gets its ∇L(W_post) from :func:`gradients_at_post` here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_delta._loading import TensorSource
from lightning_delta.delta import DeltaMatch, Patterns, Weights, load_tensors, match_tensors
from lightning_delta.editing import Edit, check_edit, edit_one, iter_edited
from lightning_delta.losses import LossOutput
from lightning_delta.padding import true_embedding_gradients
from lightning_delta.parametrize import EditedModel, check_E_dtype, stored_dtype
from lightning_delta.sharded import (
    ShardedEditedModel,
    gradient_divide_factors,
    is_sharded,
    local_rows,
    sharded_parameters,
)

__all__ = [
    "EditTarget",
    "edited_submodule",
    "ModuleTarget",
    "RecomputedE",
    "attach_edit",
    "edit_differences",
    "gradients_at_post",
    "training_step_loss",
    "warn_if_batch_sum",
]

@runtime_checkable
class EditTarget(Protocol):
    """What :class:`~lightning_delta.callbacks.RiemannCallback` sweeps: a model with ``W_post + t·E`` attached.

    ``edited_model`` attaches the edit (once) and returns the handle that sets ``t``; ``riemann_prepare`` turns a
    batch into what ``riemann_loss`` reads (once per batch, before the C + 1 points); ``riemann_loss`` is the summed
    loss and item count of a batch at the current ``t``; ``riemann_accuracy`` the task's accuracy at ``t = 0`` and
    ``t = 1`` once validation has ended (``None`` without an evaluator); ``detach_edit`` is called when validation
    ends. ``loss_measured_by_sweep`` is set while a sweep measures the loss, so that the target need not.
    """

    loss_measured_by_sweep: bool

    def edited_model(self, trainer: pl.Trainer | None = None) -> EditedModel | ShardedEditedModel: ...

    def riemann_prepare(self, batch: Any) -> Any: ...

    def riemann_loss(self, batch: Any, batch_idx: int = 0) -> LossOutput: ...

    def riemann_accuracy(self) -> tuple[float, float] | None: ...

    def detach_edit(self) -> None: ...


class ModuleTarget:
    """Any LightningModule as an :class:`EditTarget`: the edit goes on its submodule ``module_name`` (whose tensor
    names match ``pretrained``), the loss is its ``training_step`` (or ``loss_fn``), and ``detach_edit`` gives the
    module back with W_post and its ``requires_grad`` flags as they were.

    Args:
        module: the user's LightningModule.
        pretrained: W_pre (module, state dict, directory, hub id).
        edit: the editing operation F, or a mapping of ready-made ``E`` tensors.
        module_name: the submodule to edit (``""``: the module itself).
        include, exclude: regular expressions selecting the edited tensors.
        loss_fn: ``(module, batch, batch_idx) -> LossOutput``; default :func:`training_step_loss`.
        E_dtype: how ``E`` is kept, ``"float32"``, ``"model"`` or ``"on_the_fly"`` (see :func:`attach_edit`).
    """

    loss_measured_by_sweep = True

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
        self._edited: EditedModel | ShardedEditedModel | None = None
        self._mean_checked = loss_fn is not None  # a loss_fn returns sums and counts itself

    def edited_model(self, trainer: pl.Trainer | None = None) -> EditedModel | ShardedEditedModel:
        if self._edited is None:
            gradients = None
            if getattr(self.edit, "needs_gradients", False):
                gradients = gradients_at_post(_require_trainer(trainer, self.edit), self, self.model)
            self._edited = attach_edit(self.model, pretrained=self.pretrained, edit=self.edit, include=self.include,
                                       exclude=self.exclude, gradients=gradients, E_dtype=self.E_dtype)
        return self._edited

    def riemann_prepare(self, batch: Any) -> Any:
        if not self._mean_checked:  # the first batch: is training_step a batch mean, as the sweep reads it?
            self._mean_checked = True
            warn_if_batch_sum(self.module, batch)
        return batch

    def riemann_loss(self, batch: Any, batch_idx: int = 0) -> LossOutput:
        return self.loss_fn(self.module, batch, batch_idx)

    def riemann_accuracy(self) -> tuple[float, float] | None:
        return None

    def detach_edit(self) -> None:
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
            "weights (\"\" for the module itself)."
        ) from None


def _require_trainer(trainer: pl.Trainer | None, edit: Any) -> pl.Trainer:
    if trainer is None:
        raise ValueError(f"{type(edit).__name__} needs the gradients at W_post over the validation data: attach it "
                         "under trainer.validate.")
    return trainer


def edit_differences(
    model: nn.Module,
    *,
    pretrained: Weights,
    edit: Edit,
    include: Patterns = None,
    exclude: Patterns = None,
    gradients: Mapping[str, Tensor] | None = None,
    E_dtype: str = "float32",  # noqa: N803
) -> dict[str, Tensor]:
    """``E_k = F(ΔW_k) − ΔW_k`` for every selected tensor, computed one tensor at a time on the model's device.

    On a model sharded by FSDP2 each process reads only its rows of W_pre, ΔW is gathered whole from the processes'
    rows and edited exactly as on one process (an edit may need the whole tensor: BitDelta's mean, TIES's top k, a
    low-rank SVD), and only this process's rows of ``E`` are kept.

    Args:
        model: the post-trained model (W_post).
        pretrained: W_pre: a module, state dict, local directory or hub id (see :func:`~lightning_delta.compute_delta`).
        edit: an operation from :mod:`lightning_delta.edits` (anything with ``edit_tensor(name, delta, gradient)``),
            or a mapping from tensor names to ready-made edits ``E``.
        gradients: ∇L at W_post per tensor, for operations with ``needs_gradients``.
        E_dtype: ``"float32"`` or ``"model"`` (see :class:`~lightning_delta.parametrize.EditedModel`); each ``E``
            is cast as soon as it is computed, so no float32 copy of all of them is ever held.

    Raises:
        ValueError: every error of :func:`~lightning_delta.editing.iter_edited` (the generator behind this and
            :func:`~lightning_delta.export.apply_edit_`).
    """
    sharded = sharded_parameters(model)
    if isinstance(edit, Mapping):  # ready-made E: no W_pre to read; EditedModel checks the names
        return {name: local_rows(E, sharded[name]) if name in sharded and E.shape == sharded[name].shape else E
                for name, E in edit.items()}
    check_E_dtype(E_dtype)
    differences = {}
    for item in iter_edited(model, pre=pretrained, edit=edit, include=include, exclude=exclude, gradients=gradients):
        E = item.E(stored_dtype(item.w_post.dtype, E_dtype))  # noqa: N806
        differences[item.name] = local_rows(E, sharded[item.name]) if item.name in sharded else E
    return differences


def attach_edit(
    model: nn.Module,
    *,
    pretrained: Weights,
    edit: Edit,
    include: Patterns = None,
    exclude: Patterns = None,
    gradients: Mapping[str, Tensor] | None = None,
    E_dtype: str = "float32",  # noqa: N803
) -> EditedModel | ShardedEditedModel:
    """Register ``W_post + t·E`` on ``model`` (tied tensors once) and return the handle that drives ``t``: an
    :class:`~lightning_delta.parametrize.EditedModel`, or a :class:`~lightning_delta.sharded.ShardedEditedModel` when
    the model's parameters are sharded by FSDP2.

    ``E_dtype="on_the_fly"`` keeps no ``E``: each tensor's ``E`` is a :class:`RecomputedE`, made again from W_post and
    W_pre (read from its source, memory-mapped for files) wherever it is needed, three times per forward+backward
    (the forward, the rebuild of ``W(t)`` in backward, ``⟨grad, E⟩``). The model-sized ``E`` (16 GB for an 8B bf16
    model with ``E_dtype="model"``) is traded for running the edit again: cheap for DARE, drop-only, BitDelta and
    EXPO, a sort for TIES' trim and DELLA, an SVD for low rank. Every check and every ``E`` is made once here, and
    each is made a second time and compared, so an edit that does not give the same ``E`` twice is refused.
    Not for ready-made ``E`` tensors, edits that need ∇L(W_post) (GradientBiased keeps a model-sized gradient) or
    models sharded by FSDP2.
    """
    if E_dtype == "on_the_fly":
        return _attach_on_the_fly(model, pretrained, edit, include, exclude)
    differences = edit_differences(model, pretrained=pretrained, edit=edit, include=include, exclude=exclude,
                                   gradients=gradients, E_dtype=E_dtype)
    if sharded_parameters(model):
        return ShardedEditedModel(model, differences, E_dtype=E_dtype)
    return EditedModel(model, differences, E_dtype=E_dtype)


class RecomputedE:
    """``E = F(ΔW) − ΔW`` of one tensor, made when called from W_post (the parametrization's original) and W_pre
    (read from ``pre`` each time) by :func:`~lightning_delta.editing.edit_one`, the function that makes the kept
    ``E`` too: the kept ``E`` of ``E_dtype="float32"`` bit for bit, for an edit that gives the same ``F(ΔW)`` at
    every call. Has the tensor's ``shape``."""

    def __init__(self, match: DeltaMatch, post: TensorSource, pre: TensorSource, edit: Any, shape: torch.Size,
                 dtype: torch.dtype) -> None:
        self.match, self.post, self.pre, self.edit, self.shape, self.dtype = match, post, pre, edit, shape, dtype

    def __call__(self, w_post: Tensor) -> Tensor:
        item = edit_one(self.match, self.edit, post=self.post, pre=self.pre, w_post=w_post, keep_pre=False)
        return item.E(self.dtype)


def _attach_on_the_fly(model: nn.Module, pretrained: Weights, edit: Edit, include: Patterns,
                       exclude: Patterns) -> EditedModel:
    if isinstance(edit, Mapping):
        raise ValueError("E_dtype='on_the_fly' makes E again from W_pre and the edit; ready-made E tensors are held "
                         "in memory already. Use E_dtype='float32' or 'model'.")
    if getattr(edit, "needs_gradients", False):
        raise ValueError(f"E_dtype='on_the_fly' does not serve {type(edit).__name__}: it needs ∇L(W_post) of every "
                         "edited tensor, a model-sized buffer kept instead of E. Use E_dtype='model'.")
    if sharded_parameters(model):
        raise ValueError("E_dtype='on_the_fly' is not available on a model sharded by FSDP2 (each process keeps only "
                         "its rows of E there). Use E_dtype='model'.")
    source = load_tensors(pretrained) if not isinstance(pretrained, TensorSource) else pretrained
    try:
        post = load_tensors(model)
        recomputed = {}
        for match in match_tensors(post=post, pre=source, include=include, exclude=exclude):
            dtype = stored_dtype(post.dtype(match.post_name), "float32")
            recomputed[match.name] = RecomputedE(match, post, source, edit, post.shape(match.post_name), dtype)
        # every check, each E once; made again, it must be the same, as it will be each time the sweep makes it
        for item in iter_edited(model, pre=source, edit=edit, include=include, exclude=exclude):
            E = item.E(recomputed[item.name].dtype)  # noqa: N806
            if not torch.equal(recomputed[item.name](item.w_post), E):
                raise ValueError(
                    f"E_dtype='on_the_fly' needs an edit that gives the same F(ΔW) every time, but "
                    f"{type(edit).__name__} gave two different ones for {item.name}: its randomness is not seeded "
                    "per tensor. Use E_dtype='float32' or 'model'."
                )
            del E
        edited = EditedModel(model, recomputed, E_dtype="on_the_fly")
    except BaseException:
        if source is not pretrained:
            source.close()
        raise
    if source is not pretrained:
        edited.on_remove.append(source.close)
    return edited


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


class _Unsplittable(Exception):
    pass


def _split_batch(batch: Any, size: int, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch of ``size``: tensors and per-example lists are sliced along their first
    dimension, scalars kept; anything else raises :class:`_Unsplittable`."""
    if isinstance(batch, Tensor):
        if batch.ndim == 0:
            return batch
        if batch.shape[0] != size:
            raise _Unsplittable
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({key: _split_batch(value, size, start, stop) for key, value in batch.items()})
    if isinstance(batch, (list, tuple)):
        if batch and all(isinstance(item, (str, int, float, bool)) for item in batch):
            if len(batch) != size:
                raise _Unsplittable
            return type(batch)(batch[start:stop])  # one entry per example (e.g. the answers' texts)
        return type(batch)(_split_batch(item, size, start, stop) for item in batch)
    if batch is None or isinstance(batch, (str, int, float, bool)):
        return batch
    raise _Unsplittable


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
    except (_Unsplittable, RecursionError, ValueError, TypeError):
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
    return output["loss"] if isinstance(output, Mapping) else output


def gradients_at_post(
    trainer: pl.Trainer, target: EditTarget, model: nn.Module, names: list[str] | None = None
) -> dict[str, Tensor]:
    """∇L(W_post) = (1/N) Σ_batches ∇(Σ loss) over the validation data (one pass), summed over processes: what
    ``GradientBiased`` needs. The loss is ``target``'s (``riemann_prepare`` then ``riemann_loss``); ``model`` is the
    module whose parameters (all, or ``names``) get gradients.

    Each batch's gradient is added, as soon as autograd has it, into a float32 sum (float64 for float64 weights)
    and the parameter's own ``.grad`` is freed: a bf16 model's gradient is not accumulated in bf16 across batches.
    The returned tensors have that accumulation dtype. For a parameter sharded by FSDP2 the hook gets this
    process's rows of the gradient, already summed over processes by FSDP's reduce-scatter; its entry is a
    ``DTensor`` of those rows, gathered whole only when the edit reads it. An ``nn.Embedding``'s padding row gets
    its gradient like every other row (:mod:`lightning_delta.padding`).
    """
    parameters = dict(model.named_parameters())
    names = names if names is not None else list(parameters)
    flags = {name: parameter.requires_grad for name, parameter in parameters.items()}
    sums: dict[str, Tensor] = {}
    hooks = []

    def accumulate(name: str) -> Callable[[Tensor], None]:
        def hook(parameter: Tensor) -> None:  # FSDP2 calls it too, with this process's rows after reduce-scatter
            grad = parameter.grad
            sums[name].add_(grad.to_local() if is_sharded(grad) else grad)
            parameter.grad = None

        return hook

    for name, parameter in parameters.items():
        parameter.requires_grad_(name in names)
        parameter.grad = None
    sharded = [name for name in names if is_sharded(parameters[name])]
    for name in names:
        parameter = parameters[name]
        dtype = torch.float64 if parameter.dtype == torch.float64 else torch.float32
        rows = parameter.to_local() if name in sharded else parameter
        sums[name] = torch.zeros(rows.shape, dtype=dtype, device=rows.device)
        hooks.append(parameter.register_post_accumulate_grad_hook(accumulate(name)))
    loaders = trainer.val_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    device = trainer.strategy.root_device
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with torch.enable_grad(), true_embedding_gradients(model.modules()):
            for loader in loaders:
                for batch_idx, batch in enumerate(loader):
                    batch = target.riemann_prepare(trainer.strategy.batch_to_device(batch, device))
                    output = target.riemann_loss(batch, batch_idx)
                    output.total.backward()
                    count += output.count
    finally:
        for hook in hooks:
            hook.remove()
        for name, parameter in parameters.items():
            parameter.grad = None
            parameter.requires_grad_(flags[name])
    count = trainer.strategy.reduce(count, reduce_op="sum")
    factors = gradient_divide_factors(model)
    gradients = {}
    for name, total in sums.items():
        if name in sharded:  # FSDP has summed it over processes and divided by its factor
            parameter = parameters[name]
            rows = total * (factors.get(id(parameter), 1.0) / count.to(total.dtype))
            gradients[name] = DTensor.from_local(rows, parameter.device_mesh, parameter.placements,
                                                 shape=parameter.shape, stride=parameter.stride())
        else:
            gradients[name] = trainer.strategy.reduce(total, reduce_op="sum") / count.to(total.dtype)
    return gradients
