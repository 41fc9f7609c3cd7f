"""Build ``E = F(ΔW) − ΔW`` tensor by tensor and register ``W_post + t·E`` on a model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_delta.delta import _next_delta, check_tied_targets, match_tensors, open_pair
from lightning_delta.edits import EDITS
from lightning_delta.parametrize import EditedModel

__all__ = ["attach_edit", "check_edit", "edit_differences"]


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

    Raises:
        ValueError: for an ``edit`` that is neither, an operation that needs gradients without them, two names of
            one tied tensor of ``model`` (:func:`~lightning_delta.delta.check_tied_targets`), and every error of
            :func:`~lightning_delta.delta.iter_delta`.
    """
    if isinstance(edit, Mapping):
        return dict(edit)  # EditedModel checks the names
    check_edit(edit)
    if getattr(edit, "needs_gradients", False) and gradients is None:
        raise ValueError(f"{type(edit).__name__} needs the gradients at W_post; pass `gradients=`.")
    devices = {name: tensor.device for name, tensor in model.state_dict(keep_vars=True).items()}
    differences = {}
    with open_pair(pretrained, model) as (pre, post):
        matches = match_tensors(pre, post, include, exclude)
        check_tied_targets([match.post_name for match in matches], post)
        for match in matches:
            delta = _next_delta(match, pre, post, devices[match.post_name])
            gradient = gradients.get(match.name) if gradients is not None else None
            gradient = gradient.to(delta.device) if gradient is not None else None
            differences[match.name] = edit.edit_tensor(match.name, delta, gradient) - delta
            del delta
    return differences


def check_edit(edit: Any) -> None:
    """Refuse anything but an editing operation (``edit_tensor``) or a mapping of ``E`` tensors, naming the edits."""
    if isinstance(edit, Mapping) or callable(getattr(edit, "edit_tensor", None)):
        return
    known = ", ".join(f"{cls.__name__} ({name!r})" for name, cls in EDITS.items())
    hint = ""
    if isinstance(edit, str):
        hint = (
            f" For a name, build the operation: lightning_delta.edits.build({edit!r}, ...)"
            if edit in EDITS
            else f" {edit!r} is not an edit name"
        )
    raise ValueError(
        f"edit must be an editing operation of lightning_delta.edits or a mapping from tensor names to "
        f"E = F(ΔW) − ΔW tensors; got {type(edit).__name__} {edit!r}.{hint} The operations are: {known}."
    )


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
