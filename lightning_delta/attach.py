"""Build ``E = F(ΔW) − ΔW`` tensor by tensor and register ``W_post + t·E`` on a model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_delta.parametrize import EditedModel

__all__ = ["attach_edit", "edit_differences"]


def edit_differences(
    model: nn.Module,
    pretrained: Any,
    edit: Any,
    include: Any = None,
    exclude: Any = None,
    gradients: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``E_k = F(ΔW_k) − ΔW_k`` for every selected tensor, computed one tensor at a time on the model's device.

    Args:
        model: the post-trained model (W_post).
        pretrained: W_pre: a module, state dict, local directory or hub id (see :func:`~lightning_delta.compute_delta`).
        edit: an operation from :mod:`lightning_delta.edits` (anything with ``edit_tensor(name, delta, gradient)``),
            or a mapping from tensor names to ready-made edits ``E``.
        gradients: ∇L at W_post per tensor, for operations with ``needs_gradients``.
    """
    if isinstance(edit, Mapping):
        return dict(edit)
    if getattr(edit, "needs_gradients", False) and gradients is None:
        raise ValueError(f"{type(edit).__name__} needs the gradients at W_post; pass `gradients=`.")
    from lightning_delta.delta import iter_delta

    devices = {name: tensor.device for name, tensor in model.state_dict(keep_vars=True).items()}
    differences = {}
    for name, delta in iter_delta(pretrained, model, include=include, exclude=exclude):
        delta = delta.to(devices[name])
        gradient = gradients[name].to(delta.device) if gradients is not None and name in gradients else None
        differences[name] = edit.edit_tensor(name, delta, gradient) - delta
        del delta
    return differences


def attach_edit(
    model: nn.Module,
    pretrained: Any,
    edit: Any,
    include: Any = None,
    exclude: Any = None,
    gradients: Mapping[str, Tensor] | None = None,
) -> EditedModel:
    """Register ``W_post + t·E`` on ``model`` (tied tensors once) and return the handle that drives ``t``."""
    differences = edit_differences(model, pretrained, edit, include, exclude, gradients)
    return EditedModel(model, differences)
