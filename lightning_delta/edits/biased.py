"""Deterministic, biased versions of DARE's extension (paper, section 4.3 and Table 1).

DARE's extension multiplies a random fraction ``p`` of the delta entries by ``k`` and the rest by
``(1 − k·p)/(1 − p)``. Section 4.3 replaces the random choice by a sign rule to test what the randomness is
needed for: choosing by the sign of ``ΔW`` keeps the model (Table 1, middle column), choosing by the sign of
``ΔW ⊙ ∇L`` ruins it (right column), because then the edit is correlated with the gradient and the Riemann term
``⟨∇L, F(ΔW) − ΔW⟩`` no longer averages out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_delta.edits.base import (
    DeltaEdit,
    check_drop_rate,
    check_real,
    flat_chunks,
    output_dtype,
    promoted_copy,
)

__all__ = ["GradientBiased", "SignBiased", "gradient_biased_rescale", "sign_biased_rescale"]


def _scale_selected(delta: Tensor, p: float, k: float, select: Callable[[Tensor, slice], Tensor]) -> Tensor:
    """``k·ΔW`` where ``select(chunk, part)`` is True, ``(1 − k·p)/(1 − p)·ΔW`` elsewhere, in the promoted dtype.

    Works over the flattened delta in chunks of :data:`~lightning_delta.edits.base.CHUNK_NUMEL` entries, so the
    temporaries stay small next to the output.
    """
    dtype = output_dtype(delta)
    other_scale = (1.0 - k * p) / (1.0 - p)
    flat = delta.detach().reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype, device=delta.device)
    for part in flat_chunks(flat.numel()):
        work = flat[part].to(dtype)
        out[part] = torch.where(select(work, part), work * k, work * other_scale)
    return out.view(delta.shape)


def sign_biased_rescale(delta: Tensor, p: float, k: float) -> Tensor:
    r"""Scale the negative delta entries by ``k``, the others by ``(1 − k p)/(1 − p)`` (paper, Table 1 middle).

    .. math::
        F(\Delta W)_i = \begin{cases} k \, \Delta W_i & \Delta W_i < 0 \\
        \frac{1 - k p}{1 - p} \Delta W_i & \text{otherwise} \end{cases}

    Zeros stay zero. Deterministic: no random draw.

    Shapes:
        - ``delta``: any shape. Output: same shape, dtype promoted to at least float32.

    Example:
        >>> sign_biased_rescale(torch.tensor([-1.0, 2.0, 0.0]), p=0.5, k=0.5)
        tensor([-0.5000,  3.0000,  0.0000])
    """
    p = check_drop_rate("SignBiased", p)
    k = check_real("SignBiased", "k", k)
    return _scale_selected(delta, p, k, lambda work, part: work < 0)


def gradient_biased_rescale(delta: Tensor, gradient: Tensor, p: float, k: float, name: str = "delta") -> Tensor:
    r"""Scale the entries where ``ΔW·∇L < 0`` by ``k``, the others by ``(1 − k p)/(1 − p)`` (Table 1 right).

    .. math::
        F(\Delta W)_i = \begin{cases} k \, \Delta W_i & \Delta W_i \nabla L_i < 0 \\
        \frac{1 - k p}{1 - p} \Delta W_i & \text{otherwise} \end{cases}

    The product's sign is taken as ``sign(ΔW)·sign(∇L)``, so products too small for float32 still count as
    negative. ``gradient`` is moved to ``delta``'s device.

    Shapes:
        - ``delta``: any shape; ``gradient``: the same shape. Output: same shape, dtype promoted to at least float32.

    Raises:
        ValueError: if ``gradient``'s shape differs from ``delta``'s (the message names ``name``).

    Example:
        >>> gradient_biased_rescale(torch.tensor([-1.0, 2.0]), torch.tensor([1.0, 1.0]), p=0.5, k=0.5)
        tensor([-0.5000,  3.0000])
    """
    p = check_drop_rate("GradientBiased", p)
    k = check_real("GradientBiased", "k", k)
    if not isinstance(gradient, Tensor):
        raise ValueError(f"GradientBiased: the gradient of {name!r} must be a Tensor, got {type(gradient).__name__}.")
    if gradient.shape != delta.shape:
        raise ValueError(
            f"GradientBiased: the gradient of {name!r} has shape {tuple(gradient.shape)} but its delta has shape "
            f"{tuple(delta.shape)}; pass the gradient of the loss with respect to this very tensor."
        )
    gradient = gradient.detach().to(delta.device).reshape(-1)

    def opposite(work: Tensor, part: slice) -> Tensor:
        return torch.sign(work) * torch.sign(gradient[part]) < 0

    return _scale_selected(delta, p, k, opposite)


class SignBiased(DeltaEdit):
    r"""Sign-biased rescale (paper, section 4.3, Table 1 middle column): DARE's extension with the random mask
    replaced by the sign of ``ΔW``.

    .. math::
        F(\Delta W) = k \cdot [\Delta W < 0] \odot \Delta W + \frac{1 - k p}{1 - p} \cdot [\Delta W \ge 0] \odot \Delta W

    The paper finds this keeps GSM8K accuracy (74–76 for ``k`` from 0.5 to 1.5 at LLaMA-3-8B-Instruct): random
    dropping is sufficient but not necessary.

    Args:
        p: the rate used in the rescale factor, in ``[0, 1)``.
        k: factor of the negative entries, any finite real.

    Raises:
        ValueError: if ``p`` is outside ``[0, 1)`` or ``p``/``k`` is not finite.

    Example:
        >>> SignBiased(p=0.5, k=0.5)({"w": torch.tensor([-2.0, 2.0])})["w"]
        tensor([-1.,  3.])
    """

    name = "sign_biased"
    label = "sign-biased rescale"  # how figures and tables name the edit
    reference = "paper, section 4.3, Table 1 middle column"  # where the paper defines it

    def __init__(self, p: float, k: float) -> None:
        self.p = check_drop_rate("SignBiased", p)
        self.k = check_real("SignBiased", "k", k)

    @torch.no_grad()
    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        if self.k == 1.0:  # both factors are 1
            return promoted_copy(delta)
        return sign_biased_rescale(delta, self.p, self.k)


class GradientBiased(DeltaEdit):
    r"""Gradient-biased rescale (paper, section 4.3, Table 1 right column): DARE's extension with the random mask
    replaced by the sign of ``ΔW ⊙ ∇L``.

    .. math::
        F(\Delta W) = k \cdot [\Delta W \odot \nabla L < 0] \odot \Delta W
        + \frac{1 - k p}{1 - p} \cdot [\Delta W \odot \nabla L \ge 0] \odot \Delta W

    ``∇L`` is the gradient of the task loss at ``W_post``; pass it per tensor in ``gradients``. The paper finds this
    destroys the model (GSM8K accuracy near 0): the mask must be random with respect to ``ΔW ⊙ ∇L``.

    Args:
        p: the rate used in the rescale factor, in ``[0, 1)``.
        k: factor of the entries with ``ΔW·∇L < 0``, any finite real.

    Raises:
        ValueError: if ``p`` is outside ``[0, 1)`` or ``p``/``k`` is not finite; when called, if a gradient is
            missing or has the wrong shape (the message names the tensor).

    Example:
        >>> edit = GradientBiased(p=0.5, k=0.5)
        >>> edit({"w": torch.tensor([-2.0, 2.0])}, gradients={"w": torch.tensor([1.0, 1.0])})["w"]
        tensor([-1.,  3.])
    """

    name = "gradient_biased"
    label = "gradient-biased rescale"  # how figures and tables name the edit
    reference = "paper, section 4.3, Table 1 right column"  # where the paper defines it
    needs_gradients = True

    def __init__(self, p: float, k: float) -> None:
        self.p = check_drop_rate("GradientBiased", p)
        self.k = check_real("GradientBiased", "k", k)

    @torch.no_grad()
    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        if gradient is None:
            raise ValueError(
                f"GradientBiased needs the gradient of the loss at W_post for {name!r}; got gradient=None."
            )
        return gradient_biased_rescale(delta, gradient, self.p, self.k, name=name)
