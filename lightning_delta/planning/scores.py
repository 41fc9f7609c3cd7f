"""Scores of every candidate setting of every tensor from one pass of gradients at W_post.

For tensor ``k`` at setting ``v`` with ``E_k(v) = F_v(ΔW_k) − ΔW_k``, a Taylor expansion of the loss around W_post
that edits tensor ``k`` alone gives

    ΔL_k(v) ≈ ⟨∇L(W_post), E_k(v)⟩ + ½ E_k(v)ᵀ H_kk E_k(v),

the first term the paper's t = 0 term (its Eq. 6 is that term's expectation, ≈ 0 for DARE), the second the
curvature, which is what separates DARE densities. ``H_kk`` is replaced by the diagonal of the empirical Fisher.
Both come from the same forward+backward pass, one per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_delta.delta import Patterns, Weights, iter_delta
from lightning_delta.gradients import LossTarget, accumulation_zeros, gradient_pass
from lightning_delta.losses import LossOutput
from lightning_delta.parametrize import inner_product
from lightning_delta.planning.family import Family

__all__ = ["CandidateScores", "GradientStatistics", "candidate_scores", "gradient_statistics"]


@dataclass
class GradientStatistics:
    """``gradient[k] = ∇L(W_post)`` and ``fisher[k]`` (see :func:`gradient_statistics`), float32 (float64 for
    float64 weights); ``count`` items; ``batches`` forward+backward passes spent."""

    gradient: dict[str, Tensor]
    fisher: dict[str, Tensor]
    count: float
    batches: int


def gradient_statistics(
    target: LossTarget,
    model: nn.Module,
    loaders: Iterable[Iterable[Any]],
    names: Sequence[str],
    device: torch.device | str | None = None,
) -> GradientStatistics:
    r"""∇L(W_post) and the diagonal of the per-item empirical Fisher of the tensors ``names``, in one pass.

    With ``L = (1/N) Σ_i ℓ_i`` the mean over the ``N`` items (tokens or examples), ``G_b = ∇ Σ_{i∈b} ℓ_i`` the
    gradient of batch ``b``'s summed loss (``target.riemann_loss(...).total``, as the Riemann sweep uses) and
    ``n_b`` its items:

    .. math::
        g = \frac{1}{N} \sum_b G_b, \qquad
        \hat F_{jj} = \frac{1}{N} \sum_b \left((G_b)_j - n_b\, g_j\right)^2 + g_j^2 .

    The per-item empirical Fisher is ``(1/N) Σ_i (∂ℓ_i/∂w_j)² = σ_j² + g_j²`` (``σ²`` the items' variance);
    ``F̂`` estimates ``σ²`` from the spread of the batch sums around ``n_b g``, which for independent items has
    expectation ``n_b σ²``. It is exactly the per-item empirical Fisher when every batch holds one item (tested);
    with larger batches it is an estimate (items within a batch are assumed independent), at one backward per
    batch where per-item gradients would cost one per item. Squaring the batch sums without centring would add
    ``(1/N) Σ_b n_b (n_b − 1) g²``, which dominates at batch sizes of hundreds of tokens.

    Three float32 sums per tensor (float64 for float64 weights), ``Σ G_b``, ``Σ G_b²`` and ``Σ n_b G_b``, are
    accumulated as autograd produces each batch's gradient (:func:`~lightning_delta.gradients.gradient_pass`, which
    frees the parameter's ``.grad`` at once): ``F̂ = (Σ G_b² − 2 g ⊙ Σ n_b G_b + g² Σ n_b²) / N + g²``. One
    process: nothing is reduced across processes. An ``nn.Embedding``'s padding row gets its gradient like every
    other row (:mod:`lightning_delta.padding`).

    Args:
        target: has ``riemann_prepare(batch)`` and ``riemann_loss(batch, batch_idx) -> LossOutput`` (a
            :class:`~lightning_delta.DeltaEditModule` is one).
        model: the module whose parameters ``names`` are differentiated.
        loaders: the batches (a list of DataLoaders).
        device: where batches are moved; default the first parameter's device.
    """
    parameters = dict(model.named_parameters())
    missing = [name for name in names if name not in parameters]
    if missing:
        raise ValueError(f"plan: tensors {missing} are not parameters of {type(model).__name__}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sums = {name: accumulation_zeros(parameters[name]) for name in names}
    squares = {name: accumulation_zeros(parameters[name]) for name in names}
    weighted = {name: accumulation_zeros(parameters[name]) for name in names}
    count, count_squares, batches, batch_items = 0.0, 0.0, 0, 0.0  # batch_items: n_b of the batch in backward

    def add(name: str, grad: Tensor) -> None:
        grad = grad.to(sums[name].dtype)
        sums[name].add_(grad)
        squares[name].addcmul_(grad, grad)
        weighted[name].add_(grad, alpha=batch_items)

    def count_items(output: LossOutput) -> None:
        nonlocal count, count_squares, batches, batch_items
        batch_items = float(output.count)
        count += batch_items
        count_squares += batch_items**2
        batches += 1

    moved = (
        (batch_idx, move_data_to_device(batch, device)) for loader in loaders for batch_idx, batch in enumerate(loader)
    )
    gradient_pass(target, model, names, moved, add, count_items)
    if count <= 0:
        raise ValueError("plan: the data had no items (tokens or examples) to average the loss over.")
    fisher = {}
    for name, total in sums.items():
        gradient = total.div_(count)
        spread = squares.pop(name).addcmul_(gradient, weighted.pop(name), value=-2.0)
        spread.addcmul_(gradient, gradient, value=count_squares)
        fisher[name] = spread.div_(count).addcmul_(gradient, gradient)
    return GradientStatistics(sums, fisher, count, batches)


@dataclass
class CandidateScores:
    """Per tensor (rows, order of ``names``) and candidate setting (columns, order of ``values``): the first-order
    score ``⟨g, E⟩``, the second-order part ``½ Σ F̂ E²``, the cost ``v · w_k`` and the bytes ``F(ΔW)`` takes stored
    compactly (:meth:`~lightning_delta.planning.family.Family.stored_bytes` of the very edited tensor)."""

    names: list[str]
    values: list[float]
    first: Tensor  # (K, V) float64
    curvature: Tensor  # (K, V) float64
    costs: list[list[Fraction]]
    shapes: dict[str, tuple[int, ...]]
    stored: list[list[Fraction]]

    @property
    def second(self) -> Tensor:
        """The second-order score ``⟨g, E⟩ + ½ Σ F̂ E²`` (K, V)."""
        return self.first + self.curvature


def candidate_scores(
    post: Weights,
    pre: Weights,
    family: Family,
    values: Sequence[float],
    statistics: GradientStatistics,
    include: Patterns = None,
    exclude: Patterns = None,
    seed: int = 0,
) -> CandidateScores:
    """Score every candidate setting of every selected tensor the family applies to, one tensor at a time.

    ``E_k(v)`` is computed by the very edit the plan will apply (``family.edit(v, seed).edit_tensor``), so the
    scores are those of the planned edit (DARE's masks included), and so are the stored bytes (DARE's actual kept
    count, BitDelta's exact zeros). No forward pass is run.
    """
    names, rows_first, rows_curvature, costs, stored, shapes = [], [], [], [], [], {}
    edits = [family.edit(value, seed) for value in values]
    for name, delta in iter_delta(post, pretrained=pre, include=include, exclude=exclude):
        if not family.applies(delta.shape) or name not in statistics.gradient:
            continue
        gradient, fisher = statistics.gradient[name].to(delta.device), statistics.fisher[name].to(delta.device)
        first, curvature, sizes = [], [], []
        for value, edit in zip(values, edits):
            edited = edit.edit_tensor(name, delta)
            sizes.append(family.stored_bytes(value, delta.shape, edited.element_size(), edited))
            E = edited.sub_(delta)  # noqa: N806 (the paper's name)
            first.append(inner_product(gradient, E))
            curvature.append(0.5 * inner_product(fisher, E * E))
            del E, edited
        names.append(name)
        shapes[name] = tuple(delta.shape)
        rows_first.append(torch.stack(first).cpu())
        rows_curvature.append(torch.stack(curvature).cpu())
        costs.append([family.cost(value, delta.shape) for value in values])
        stored.append(sizes)
    if not names:
        raise ValueError(
            f"plan: no selected tensor can take a {family.name} setting (low rank plans 2-D tensors); "
            "check include= / exclude=."
        )
    return CandidateScores(
        names, list(values), torch.stack(rows_first), torch.stack(rows_curvature), costs, shapes, stored
    )
