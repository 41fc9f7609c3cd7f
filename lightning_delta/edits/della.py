"""DELLA-Merging's MagPrune: magnitude-aware random drop with rescale (Deep et al. 2024; paper, section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_delta.edits.base import (
    CHUNK_NUMEL,
    DeltaEdit,
    check_drop_rate,
    check_real,
    check_seed,
    output_dtype,
    promoted_copy,
    tensor_generator,
)

__all__ = ["DELLA", "check_della", "della_drop_probabilities", "magprune"]

_SAME_WIDTH_INTEGER = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def check_della(p: float, epsilon: float) -> tuple[float, float]:
    """``(p, epsilon)`` checked: ``p`` in ``[0, 1)`` and ``0 <= epsilon <= 2·min(p, 1 − p)``, else ValueError."""
    p = check_drop_rate("DELLA", p)
    epsilon_value = check_real("DELLA", "epsilon", epsilon)
    limit = 2.0 * min(p, 1.0 - p)
    # The relative slack accepts epsilon = 2·(1 − p) typed as a decimal (2·(1 − 0.9) = 0.19999999999999996 < 0.2);
    # the probabilities stay below 1 because they span only epsilon·(n − 1)/(2n) on each side of p.
    if not 0.0 <= epsilon_value <= limit * (1.0 + 1e-12):
        raise ValueError(
            f"DELLA: `epsilon` must be in [0, 2·min(p, 1 − p)] = [0, {limit:g}] for p={p:g}, so that every drop "
            f"probability p ± epsilon/2 stays in [0, 1); got epsilon={epsilon!r}."
        )
    return p, epsilon_value


def della_drop_probabilities(rows: Tensor, p: float, epsilon: float) -> Tensor:
    r"""MagPrune's drop probability of every entry, ranked within each row.

    .. math::
        p_i = p_{\min} + \frac{\varepsilon}{n} r_i, \qquad p_{\min} = p - \frac{\varepsilon (n - 1)}{2 n}

    where ``n`` is the row length and ``r_i ∈ {0, …, n − 1}`` the rank of ``|rows_i|`` in decreasing order (the
    largest magnitude has rank 0 and the lowest drop probability). Equal magnitudes are ranked by position, the
    first one lower; NaNs rank above every number. ``p_min`` makes the row's mean probability exactly ``p`` (DELLA's
    paper writes ``p_min = p − ε/2``, the same up to ``ε/(2n)``), so ``p_i`` spans ``p ± ε(n − 1)/(2n)``, inside
    ``[0, 1)`` whenever ``ε <= 2·min(p, 1 − p)``.

    One stable sort per row gives the order; the ladder ``p_min + (ε/n)·j`` (``j = 0 … n − 1``, in ``rows``' dtype)
    is scattered to it, so each ``p_i`` is ``p_min + (ε/n)·r_i`` rounded as if computed entry by entry.

    Shapes:
        - ``rows``: ``(R, n)``. Output: ``(R, n)`` in ``rows``' dtype.

    Example:
        >>> della_drop_probabilities(torch.tensor([[3.0, -1.0, 2.0, 0.5]]), p=0.5, epsilon=0.4)
        tensor([[0.3500, 0.5500, 0.4500, 0.6500]])
    """
    n = rows.shape[-1]
    order = torch.sort(_magnitude_keys(rows), dim=-1, descending=True, stable=True).indices  # (R, n)
    p_min = p - epsilon * (n - 1) / (2 * n)
    ladder = p_min + (epsilon / n) * torch.arange(n, device=rows.device).to(rows.dtype)  # p of rank 0, 1, …
    return torch.empty_like(rows).scatter_(-1, order, ladder.expand_as(rows))


def _magnitude_keys(rows: Tensor) -> Tensor:
    """``|rows|`` as integers of the same width that sort like the magnitudes (a float's bits, sign cleared, order
    as its value; sorting them is faster than sorting floats). Every NaN becomes one key above +inf, so NaNs tie
    as a float sort ties them."""
    magnitudes = rows.abs()
    if rows.dtype not in _SAME_WIDTH_INTEGER:
        return magnitudes
    nans = magnitudes.isnan()
    if nans.any():
        magnitudes.masked_fill_(nans, float("nan"))  # one bit pattern for every NaN
    return magnitudes.view(_SAME_WIDTH_INTEGER[rows.dtype])


def magprune(delta: Tensor, p: float, epsilon: float, generator: torch.Generator | None = None) -> Tensor:
    r"""DELLA-Merging's MagPrune (Deep et al. 2024, section 3.1) as a pure function.

    .. math::
        F(\Delta W)_i = \frac{1 - M_i}{1 - p_i} \Delta W_i, \qquad M_i \sim \mathrm{Bernoulli}(p_i)

    with ``p_i`` from :func:`della_drop_probabilities`, ranked within each row (the last dimension; a 1-D tensor is
    one row, a 0-d tensor one row of one entry). Small magnitudes are dropped more often; every kept entry is
    divided by its own keep probability, so ``E[F(ΔW)] = ΔW``. ``epsilon = 0`` is DARE's uniform drop.

    Entry ``i`` is dropped when ``u_i < p_i``, ``u`` float32 ``torch.rand`` draws from ``generator`` taken over
    the flattened tensor in chunks of whole rows (one ``torch.rand(numel)`` for tensors up to
    :data:`~lightning_delta.edits.base.CHUNK_NUMEL` entries).

    Relation to mergekit's ``della_magprune(tensor, density, epsilon_m)``: there the keep probability runs
    linearly from ``density − epsilon_m`` to ``density + epsilon_m`` with spacing ``2·epsilon_m/(n − 1)``; here
    ``density = 1 − p`` and the drop probability spans a total width ``epsilon·(n − 1)/n`` with spacing
    ``epsilon/n`` (DELLA's own formulation), so ``epsilon ≈ 2·epsilon_m``.

    Shapes:
        - ``delta``: any shape. Output: same shape, dtype promoted to at least float32.

    Example:
        >>> delta = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
        >>> out = magprune(delta, p=0.5, epsilon=0.4, generator=torch.Generator().manual_seed(0))
        >>> out.shape
        torch.Size([1, 4])
    """
    check_della(p, epsilon)
    if p == 0.0:  # epsilon <= 2p forces epsilon = 0: nothing is dropped
        return promoted_copy(delta)
    if generator is None:
        generator = torch.Generator(device=delta.device)
    dtype = output_dtype(delta)
    n = delta.shape[-1] if delta.dim() > 0 else 1
    rows = delta.reshape(-1, n)
    out = torch.empty(rows.shape, dtype=dtype, device=delta.device)
    if n == 0:
        return out.view(delta.shape)
    rows_per_chunk = max(1, CHUNK_NUMEL // n)
    for start in range(0, rows.shape[0], rows_per_chunk):
        block = rows[start : start + rows_per_chunk].to(dtype)  # (R, n)
        probability = della_drop_probabilities(block, p, epsilon)
        draws = torch.rand(block.numel(), generator=generator, device=delta.device, dtype=torch.float32)
        dropped = draws.view(block.shape) < probability
        keep_probability = probability.neg_().add_(1.0)  # 1 − p_i, in place
        chunk = torch.div(block, keep_probability, out=out[start : start + rows_per_chunk])
        chunk.masked_fill_(dropped, 0.0)
    return out.view(delta.shape)


class DELLA(DeltaEdit):
    r"""DELLA-Merging's MagPrune (Deep et al. 2024): drop small-magnitude delta entries more often, then rescale.

    .. math::
        F(\Delta W)_i = \frac{1 - M_i}{1 - p_i} \Delta W_i, \quad M_i \sim \mathrm{Bernoulli}(p_i), \quad
        p_i = p - \frac{\varepsilon (n - 1)}{2 n} + \frac{\varepsilon}{n} r_i

    ``r_i`` is the rank of ``|ΔW_i|`` in decreasing order within its row (last dimension; 1-D tensors are one row),
    so the mean drop probability of every row is ``p``. The paper (section 4) cites DELLA as DARE made
    magnitude-aware; ``E[F(ΔW)] = ΔW`` as for DARE. See :func:`magprune` for the mask definition and the relation
    to mergekit's ``epsilon``.

    Args:
        p: mean drop rate in ``[0, 1)``.
        epsilon: spread of the drop probabilities, ``0 <= epsilon <= 2·min(p, 1 − p)`` so that every ``p_i`` stays
            in ``[0, 1)`` for any row length; ``0`` is DARE.
        seed: run seed, an int ``>= 0``.

    Raises:
        ValueError: if ``p`` is outside ``[0, 1)``, ``epsilon`` is not finite, negative or makes probabilities
            leave ``[0, 1)``, or ``seed`` is not a non-negative int.

    Example:
        >>> edit = DELLA(p=0.5, epsilon=0.2, seed=0)
        >>> edit({"w": torch.randn(4, 8)})["w"].shape
        torch.Size([4, 8])
    """

    name = "della"
    label = "DELLA"  # how figures and tables name the edit
    reference = "DELLA-Merging's MagPrune (Deep et al. 2024); paper, section 4"  # where the paper defines it
    randomised = True  # the mask

    def __init__(self, p: float, epsilon: float, seed: int = 0) -> None:
        self.p, self.epsilon = check_della(p, epsilon)
        self.seed = check_seed(seed, "DELLA")

    @torch.no_grad()
    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        if self.p == 0.0:  # epsilon <= 2p forces epsilon = 0: nothing is dropped
            return promoted_copy(delta)
        generator = tensor_generator(self.seed, name, delta.device)
        return magprune(delta, self.p, self.epsilon, generator)
