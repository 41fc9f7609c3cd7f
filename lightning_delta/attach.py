"""Attaching an edit to a model: ``E = F(ΔW) − ΔW`` built for every selected tensor by
:func:`~lightning_delta.editing.edit_one` and ``W_post + t·E`` registered, as kept tensors or made on the fly
(:class:`RecomputedE`), on one process or on the rows of a model sharded by FSDP2. :func:`attach_edit` returns the
:class:`~lightning_delta.handle.EditHandle` that drives ``t``; the targets of the Riemann sweep
(:mod:`lightning_delta.targets`) attach through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_delta.delta import DeltaMatch, Patterns, Weights, load_tensors, match_tensors
from lightning_delta.editing import Edit, edit_one, iter_edited
from lightning_delta.handle import EditHandle
from lightning_delta.parametrize import EditedModel, check_E_dtype, stored_dtype
from lightning_delta.sharded import ShardedEditedModel, local_rows, sharded_parameters
from lightning_delta.sources import TensorSource

__all__ = ["RecomputedE", "attach_edit", "edit_differences"]


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
        return {
            name: local_rows(E, sharded[name]) if name in sharded and E.shape == sharded[name].shape else E
            for name, E in edit.items()
        }
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
) -> EditHandle:
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
    differences = edit_differences(
        model, pretrained=pretrained, edit=edit, include=include, exclude=exclude, gradients=gradients, E_dtype=E_dtype
    )
    if sharded_parameters(model):
        return ShardedEditedModel(model, differences, E_dtype=E_dtype)
    return EditedModel(model, differences, E_dtype=E_dtype)


class RecomputedE:
    """``E = F(ΔW) − ΔW`` of one tensor, made when called from W_post (the parametrization's original) and W_pre
    (read from ``pre`` each time) by :func:`~lightning_delta.editing.edit_one`, the function that makes the kept
    ``E`` too: the kept ``E`` of ``E_dtype="float32"`` bit for bit, for an edit that gives the same ``F(ΔW)`` at
    every call. Has the tensor's ``shape``."""

    def __init__(
        self, match: DeltaMatch, post: TensorSource, pre: TensorSource, edit: Any, shape: torch.Size, dtype: torch.dtype
    ) -> None:
        self.match, self.post, self.pre, self.edit, self.shape, self.dtype = match, post, pre, edit, shape, dtype

    def __call__(self, w_post: Tensor) -> Tensor:
        item = edit_one(self.match, self.edit, post=self.post, pre=self.pre, w_post=w_post, keep_pre=False)
        return item.E(self.dtype)


def _attach_on_the_fly(
    model: nn.Module, pretrained: Weights, edit: Edit, include: Patterns, exclude: Patterns
) -> EditedModel:
    if isinstance(edit, Mapping):
        raise ValueError(
            "E_dtype='on_the_fly' makes E again from W_pre and the edit; ready-made E tensors are held "
            "in memory already. Use E_dtype='float32' or 'model'."
        )
    if getattr(edit, "needs_gradients", False):
        raise ValueError(
            f"E_dtype='on_the_fly' does not serve {type(edit).__name__}: it needs ∇L(W_post) of every "
            "edited tensor, a model-sized buffer kept instead of E. Use E_dtype='model'."
        )
    if sharded_parameters(model):
        raise ValueError(
            "E_dtype='on_the_fly' is not available on a model sharded by FSDP2 (each process keeps only "
            "its rows of E there). Use E_dtype='model'."
        )
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
