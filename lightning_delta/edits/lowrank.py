"""Twin-Merging's low-rank delta: the truncated SVD of each matrix (paper, section 5.2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from lightning_delta.edits.base import (
    DeltaEdit,
    Planning,
    check_choice,
    check_int,
    check_real,
    check_seed,
    output_dtype,
    promoted_copy,
    single_threaded,
    tensor_generator,
)

__all__ = [
    "METHODS",
    "LowRank",
    "factor_product",
    "low_rank_factors",
    "randomized_svd",
    "resolve_rank",
    "truncated_svd",
]

# How the truncated SVD is computed: "exact" (torch.linalg.svd, Twin-Merging's F, the default) or "randomized"
# (randomized_svd, an approximation; opt-in).
METHODS = ("exact", "randomized")

# Randomized SVD settings (Halko, Martinsson and Tropp 2011, algorithm 4.4): the sketch has
# rank + max(MIN_OVERSAMPLE, rank // 2) columns and is refined by POWER_ITERATIONS subspace iterations.
MIN_OVERSAMPLE = 10
POWER_ITERATIONS = 4


def resolve_rank(shape: tuple[int, ...], rank: int | None, fraction: float | None) -> int:
    """The number of singular values kept for a ``(d, k)`` matrix: ``rank``, or ``ceil(fraction·min(d, k))``
    (at least 1; the product is first rounded to 9 decimals so that ``0.7·10`` gives 7, not 8).

    Example:
        >>> resolve_rank((10, 20), rank=None, fraction=0.7), resolve_rank((10, 20), rank=3, fraction=None)
        (7, 3)
    """
    if rank is not None:
        return rank
    if fraction is None:
        raise ValueError("resolve_rank: give `rank` or `fraction`, got neither.")
    return max(1, math.ceil(round(fraction * min(shape), 9)))


def _sketch_width(rank: int, full: int) -> int:
    return min(full, rank + max(MIN_OVERSAMPLE, rank // 2))


def randomized_svd(matrix: Tensor, rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD ``(U, S, Vh)`` of ``matrix`` by a randomized range finder with subspace iteration.

    A Gaussian test matrix (``torch.randn`` from ``generator``, so the global RNG is untouched, unlike
    ``torch.svd_lowrank``) of ``rank + max(10, rank // 2)`` columns sketches the range of ``matrix``; four power
    iterations, each re-orthonormalised by QR, sharpen it; the exact SVD of the small projection gives the factors.

    Shapes:
        - ``matrix``: ``(d, k)`` float32 or float64. Outputs: ``U (d, rank)``, ``S (rank,)``, ``Vh (rank, k)``.
    """
    d, k = matrix.shape
    width = _sketch_width(rank, min(d, k))
    test = torch.randn(k, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ test).Q  # (d, width)
    for _ in range(POWER_ITERATIONS):
        co_basis = torch.linalg.qr(matrix.mT @ basis).Q  # (k, width)
        basis = torch.linalg.qr(matrix @ co_basis).Q  # (d, width)
    small_u, singular_values, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)  # (width, k) projected
    return (basis @ small_u)[:, :rank], singular_values[:rank], vh[:rank]


def truncated_svd(
    delta: Tensor,
    rank: int,
    method: str = "exact",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Twin-Merging's low-rank delta (Lu et al. 2024; paper, equation 10 and section 5.2) as a pure function.

    .. math::
        F(\Delta W) = U_r \Sigma_r V_r^\top, \qquad \Delta W = U \Sigma V^\top

    the best rank-``r`` approximation of a 2-D ``ΔW`` (Eckart–Young: ``‖ΔW − F‖_F² = Σ_{i > r} σ_i²``). Tensors
    that are not 2-D, and ``r >= min(d, k)``, return a promoted copy of ``ΔW``. Computed in float32 (float64 for
    float64 input).

    ``method="exact"`` (the default) is that formula: ``torch.linalg.svd``, truncated to ``r``.
    ``method="randomized"`` opts in to :func:`randomized_svd` (drawing from ``generator``), an *approximation* of
    ``U_r Σ_r V_rᵀ`` whose error depends on the spectrum. Measured ``‖F_randomized − F_exact‖_F / ‖F_exact‖_F``
    (float32; ``tests/test_edits.py``, ``BENCHMARKS.md``):

    * slowly decaying spectra, ``σ_i ∝ i^{-1/2}``: 2–6 % at ``r = 16``–64 (512×768 to 1024×1024), 0.1–0.3 % at
      ``r = 5``, under 10 % in every case tested; ``A·diag(i^{-1/2})·B`` at 4096×4096 and 4096×14336, ``r = 64``:
      3.8 % and 3.6 %; ``σ_i ∝ i^{-1}`` (1024×1024, ``r = 64``): about 0.1 %;
    * the real deltas of the first demo pair (26,784 parameters, 32×32 to 96×32, ``r = 1`` and 4): at most 8e-5 (the
      sketch is then a third to half of ``min(d, k)``, so this says little about large matrices);
    * a flat spectrum (Gaussian 1024×1024, ``r = 100``, and 512×512, ``r = 50``): 38–39 %; small Gaussian matrices
      (40×64 to 100×80, ``r = 1`` and 5): 2–30 % depending on the draw. The residual ``‖ΔW − F‖`` is then within
      0.5 % of the optimum, but ``F`` itself is a different matrix.

    The randomized SVD never has a smaller residual than the exact one, and is much faster on large matrices
    (one thread, ``r = 64``: 0.4 s against 12.4 s at 4096×4096, 1.4 s against 83 s at 4096×14336). When its sketch
    (``r + max(10, r // 2)`` columns) would not be smaller than ``min(d, k)`` it falls back to the exact SVD.

    On CPU the whole computation runs on one thread (:func:`~lightning_delta.edits.base.single_threaded`): MKL's SVD,
    QR and large products change in the last bits with the thread count, and one thread makes the result
    bit-identical whatever ``torch.get_num_threads()`` is (on a busy two-core machine it was also faster).

    Shapes:
        - ``delta``: ``(d, k)``, or any shape for the pass-through. Output: same shape, dtype promoted to at least
          float32.

    Raises:
        ValueError: if ``rank`` is not an int ``>= 1`` or ``method`` is not one of :data:`METHODS`.

    Example:
        >>> delta = torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0]))  # rank 1
        >>> torch.allclose(truncated_svd(delta, rank=1), delta)
        True
    """
    rank = check_int("LowRank", "rank", rank, minimum=1)
    method = check_choice("LowRank", "method", method, METHODS)
    if delta.dim() != 2 or rank >= min(delta.shape):
        return promoted_copy(delta)
    return factor_product(*low_rank_factors(delta, rank, method, generator))


def low_rank_factors(
    delta: Tensor, rank: int, method: str = "exact", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The factors ``(U_r Σ_r, V_rᵀ)`` of :func:`truncated_svd` (``F`` is their :func:`factor_product`), for a
    2-D ``delta`` and ``rank < min(d, k)``; in float32 (float64 for float64 input). ``method`` and ``generator`` as
    for :func:`truncated_svd`; the SVD runs on one thread on CPU.

    Shapes:
        - ``delta``: ``(d, k)``. Outputs: ``(d, rank)`` and ``(rank, k)``.
    """
    matrix = delta.detach().to(output_dtype(delta))
    use_randomized = method == "randomized" and _sketch_width(rank, min(matrix.shape)) < min(matrix.shape)
    # On CPU, LAPACK and large matrix products differ in the last bits between thread counts: one thread keeps the
    # result bit-identical whatever torch.get_num_threads() is (see single_threaded).
    with single_threaded() if matrix.device.type == "cpu" else nullcontext():
        if use_randomized:
            own = generator if generator is not None else torch.Generator(device=delta.device)
            u, s, vh = randomized_svd(matrix, rank, own)
        else:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        return u * s, vh.clone()  # a copy: vh is a view of the whole Vᵀ


def factor_product(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right``, on one thread on CPU (see :func:`~lightning_delta.edits.base.single_threaded`): how
    :func:`truncated_svd` forms ``F`` from its factors, so that a stored pair of factors gives ``F`` back bit for
    bit on the same build of torch.

    Shapes:
        - ``left``: ``(d, r)``; ``right``: ``(r, k)``. Output: ``(d, k)``.
    """
    with single_threaded() if left.device.type == "cpu" else nullcontext():
        return left @ right


class LowRank(DeltaEdit):
    r"""Twin-Merging's low-rank delta (paper, equation 10 and section 5.2): the truncated SVD of every 2-D delta.

    .. math::
        F(\Delta W) = U_r \Sigma_r V_r^\top, \qquad \Delta W = U \Sigma V^\top

    Give either ``rank`` (``r``) or ``fraction``, the fraction of ``min(d, k)`` singular values kept,
    ``r = ceil(fraction·min(d, k))``, at least 1. Tensors that are not 2-D (biases, norms) pass unchanged (a
    promoted copy), and so do matrices with ``r >= min(d, k)``.

    By default (``method="exact"``) ``F`` is computed exactly, by ``torch.linalg.svd``. ``method="randomized"``
    opts in to a randomized SVD: 30–60 times faster on large matrices, but an approximation of ``F`` (measured
    in :func:`truncated_svd`: a few % on a slowly decaying spectrum ``σ_i ∝ i^{-1/2}``, 39 % on a flat one); it
    draws from ``tensor_generator(seed, name, delta.device)``, never from the global RNG.

    Args:
        rank: singular values kept per matrix, an int ``>= 1``.
        fraction: fraction of ``min(d, k)`` kept, in ``(0, 1]``.
        method: ``"exact"`` (``torch.linalg.svd``, the default) or ``"randomized"`` (see :func:`truncated_svd`).
        seed: run seed of the randomized SVD, an int ``>= 0``; unused by the exact one.

    Raises:
        ValueError: if both or neither of ``rank`` and ``fraction`` are given, ``rank < 1`` or not an int,
            ``fraction`` is outside ``(0, 1]``, ``method`` is not ``"exact"`` or ``"randomized"``, or ``seed`` is
            not a non-negative int.

    Example:
        >>> delta = torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0]))
        >>> torch.allclose(LowRank(rank=1)({"w": delta})["w"], delta)
        True
    """

    name = "lowrank"
    label = "low rank (Twin-Merging)"  # how figures and tables name the edit
    reference = "paper, equation 10 and section 5.2"  # where the paper defines it
    shown = ("rank", "fraction")  # what labels and tables show
    planning = Planning("rank", "rank", (1, 2, 4, 8))

    @classmethod
    def draws_random(cls, config: Mapping[str, Any]) -> bool:
        """Only the randomized SVD draws."""
        return config.get("method") == "randomized"

    @classmethod
    def at_setting(cls, value: float, seed: int = 0) -> LowRank:
        """LowRank at rank ``value`` (the exact SVD: ``seed`` is not used)."""
        return cls(rank=int(value))

    def __init__(
        self, rank: int | None = None, fraction: float | None = None, method: str = "exact", seed: int = 0
    ) -> None:
        if (rank is None) == (fraction is None):
            raise ValueError(
                f"LowRank: give exactly one of `rank` and `fraction`, got rank={rank!r} and fraction={fraction!r}."
            )
        self.rank = None if rank is None else check_int("LowRank", "rank", rank, minimum=1)
        self.fraction = None
        if fraction is not None:
            self.fraction = check_real("LowRank", "fraction", fraction)
            if not 0.0 < self.fraction <= 1.0:
                raise ValueError(f"LowRank: `fraction` must be in (0, 1], got fraction={fraction!r}.")
        self.method = check_choice("LowRank", "method", method, METHODS)
        self.seed = check_seed(seed, "LowRank")

    @torch.no_grad()
    def factors(self, name: str, delta: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(U_r Σ_r, V_rᵀ)`` of tensor ``name`` (:func:`low_rank_factors`), whose :func:`factor_product` is
        ``F(ΔW)``; ``None`` where ``F(ΔW) = ΔW`` (a tensor that is not 2-D, or a rank ``>= min(d, k)``)."""
        if delta.dim() != 2:
            return None
        rank = resolve_rank(tuple(delta.shape), self.rank, self.fraction)
        if rank >= min(delta.shape):
            return None
        generator = tensor_generator(self.seed, name, delta.device) if self.method == "randomized" else None
        return low_rank_factors(delta, rank, self.method, generator)

    @torch.no_grad()
    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        factors = self.factors(name, delta)
        return promoted_copy(delta) if factors is None else factor_product(*factors)
