"""TIES-Merging's trim: keep the largest delta entries, zero the rest (paper, section 5.2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_delta.edits.base import (
    DeltaEdit,
    Planning,
    check_drop_rate,
    flat_chunks,
    order_statistics,
    output_dtype,
    promoted_copy,
)

__all__ = ["MagnitudePrune", "keep_count", "keep_top_magnitudes"]


def keep_count(numel: int, p: float) -> int:
    """How many entries magnitude pruning keeps: ``round((1 − p)·n)``, halves rounded up.

    ``(1 − p)·n`` is first rounded to 6 decimals so that float noise (``(1 − 0.7)·5 = 1.5000000000000002``) does
    not decide the rounding, then ``floor(x + 1/2)``.

    Example:
        >>> keep_count(10, 0.9), keep_count(7, 0.5), keep_count(5, 0.7)
        (1, 4, 2)
    """
    return min(numel, math.floor(round((1.0 - p) * numel, 6) + 0.5))


def keep_top_magnitudes(delta: Tensor, p: float) -> Tensor:
    r"""TIES-Merging's trim (Yadav et al. 2023; paper, equation 10) as a pure function: ``F(ΔW) = M ⊙ ΔW``.

    ``M`` keeps exactly the ``K = keep_count(n, p) = round((1 − p)·n)`` entries of largest ``|ΔW|`` in the tensor
    (halves rounded up, see :func:`keep_count`) and zeroes the others. Entries tied with the ``K``-th largest
    magnitude are kept in flattened (row-major) order, lowest index first, until ``K`` entries are kept.

    The threshold is one order statistic (:func:`~lightning_delta.edits.base.order_statistics`: an in-place
    selection, no sort, no ``torch.quantile``, which refuses more than 16M entries); the mask is then built in
    chunks.

    Shapes:
        - ``delta``: any shape. Output: same shape, dtype promoted to at least float32.

    Example:
        >>> keep_top_magnitudes(torch.tensor([0.1, -3.0, 2.0, -0.5]), p=0.5)
        tensor([ 0., -3.,  2.,  0.])
        >>> keep_top_magnitudes(torch.tensor([1.0, -1.0, 1.0, 2.0]), p=0.5)  # ties: the lower index wins
        tensor([1., 0., 0., 2.])
    """
    p = check_drop_rate("MagnitudePrune", p)
    n = delta.numel()
    kept = keep_count(n, p)
    if kept >= n:
        return promoted_copy(delta)
    dtype = output_dtype(delta)
    if kept == 0:
        return torch.zeros(delta.shape, dtype=dtype, device=delta.device)
    flat = delta.detach().reshape(-1)
    magnitudes = flat.abs().to(dtype)
    threshold = order_statistics(magnitudes, [n - kept])[0].to(delta.device)  # the K-th largest magnitude
    above = sum(int((magnitudes[part] > threshold).sum()) for part in flat_chunks(n))
    del magnitudes
    ties_left = kept - above  # >= 1: the threshold itself is among the K largest
    flat = delta.reshape(-1)
    out = torch.empty(n, dtype=dtype, device=delta.device)
    for part in flat_chunks(n):
        work = flat[part].to(dtype)
        magnitude = work.abs()
        keep = magnitude > threshold
        if ties_left > 0:
            tied = magnitude == threshold
            tie_count = int(tied.sum())
            if tie_count > ties_left:
                first = tied.nonzero().squeeze(1)[:ties_left]
                tied = torch.zeros_like(tied).index_fill_(0, first, True)
                tie_count = ties_left
            keep |= tied
            ties_left -= tie_count
        out[part] = torch.where(keep, work, work.new_zeros(()))
    return out.view(delta.shape)


class MagnitudePrune(DeltaEdit):
    r"""TIES-Merging's trim step (paper, section 5.2): keep the ``(1 − p)`` fraction of largest ``|ΔW|``.

    .. math::
        F(\Delta W) = M \odot \Delta W, \qquad M_i = [\,|\Delta W_i| \text{ is among the } K \text{ largest}\,],
        \quad K = \mathrm{round}((1 - p)\,n)

    Per tensor; ``K`` rounds halves up and ties at the threshold are kept lowest flattened index first, so exactly
    ``K`` entries survive (:func:`keep_top_magnitudes`). The edit is ``−¬M ⊙ ΔW`` (equation 11). No rescale and
    no randomness.

    Args:
        p: fraction of entries to zero, in ``[0, 1)``.

    Raises:
        ValueError: if ``p`` is outside ``[0, 1)`` or not finite.

    Example:
        >>> MagnitudePrune(p=0.5)({"w": torch.tensor([0.1, -3.0, 2.0, -0.5])})["w"]
        tensor([ 0., -3.,  2.,  0.])
    """

    name = "magnitude_prune"
    label = "magnitude pruning (TIES-Merging's trim)"  # how figures and tables name the edit
    reference = "paper, section 5.2"  # where the paper defines it
    shown = ("p",)  # what labels and tables show
    planning = Planning("density", "kept density 1 − p (TIES' trim)", (0.05, 0.1, 0.2, 0.4))

    @classmethod
    def at_setting(cls, value: float, seed: int = 0) -> MagnitudePrune:
        """The trim keeping the density ``value``: ``p = 1 − value`` (no randomness: ``seed`` is not used)."""
        return cls(p=round(1.0 - float(value), 12))

    def __init__(self, p: float) -> None:
        self.p = check_drop_rate("MagnitudePrune", p)

    @torch.no_grad()
    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        return keep_top_magnitudes(delta, self.p)
