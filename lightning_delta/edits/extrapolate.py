"""EXPO: extrapolate (or interpolate) the delta along itself (paper, section 6)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_delta.edits.base import DeltaEdit, check_real, output_dtype, promoted_copy

__all__ = ["Extrapolate", "extrapolate"]


def extrapolate(delta: Tensor, alpha: float) -> Tensor:
    r"""EXPO (Zheng et al. 2024; paper, equation 13) as a pure function: ``F(ΔW) = (1 + α)·ΔW``.

    The edit is ``αΔW`` (equation 14), so the Riemann term is ``α`` times ``⟨∇L, ΔW⟩`` averaged over the points
    (equation 15). ``α > 0`` extrapolates past ``W_post``; ``−1 < α < 0`` interpolates toward ``W_pre``
    (section 6.2, Figure 7); ``α = −1`` gives ``W_pre`` back.

    Shapes:
        - ``delta``: any shape. Output: same shape, dtype promoted to at least float32.

    Example:
        >>> extrapolate(torch.tensor([1.0, -2.0]), alpha=0.5)
        tensor([ 1.5000, -3.0000])
    """
    alpha = check_real("Extrapolate", "alpha", alpha)
    if alpha == 0.0:
        return promoted_copy(delta)
    return delta.to(output_dtype(delta)) * (1.0 + alpha)


class Extrapolate(DeltaEdit):
    r"""EXPO's extrapolation of the delta (paper, section 6, equations 13–15), and interpolation for ``α < 0``.

    .. math::
        F(\Delta W) = (1 + \alpha)\,\Delta W, \qquad W_{\mathrm{EXPO}} = W_{\mathrm{POST}} + \alpha\,\Delta W

    The paper sweeps ``α`` from −1 to 1 in steps of 0.1 (Figure 7): whether extrapolating (``α > 0``) or
    interpolating (``α < 0``) helps depends on the sign of ``⟨∇L, ΔW⟩`` on the task's data. ``α = 0`` is the
    identity, ``α = −1`` gives ``W_pre``. Deterministic; every tensor is scaled, whatever its shape.

    Args:
        alpha: the extrapolation length ``α``, any finite real.

    Raises:
        ValueError: if ``alpha`` is not a finite real number (NaN, inf, a bool, a string).

    Example:
        >>> Extrapolate(alpha=-0.5)({"w": torch.tensor([2.0, -4.0])})["w"]
        tensor([ 1., -2.])
    """

    name = "extrapolate"
    label = "EXPO"  # how figures and tables name the edit
    reference = "paper, section 6, equations 13–15"  # where the paper defines it
    shown = ("alpha",)  # what labels and tables show

    def __init__(self, alpha: float) -> None:
        self.alpha = check_real("Extrapolate", "alpha", alpha)

    @torch.no_grad()
    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        return extrapolate(delta, self.alpha)
