"""DARE and its extension: random drop with rescale (paper, sections 4.1 and 4.2)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_delta.edits.base import (
    DeltaEdit,
    Planning,
    check_drop_rate,
    check_real,
    check_seed,
    flat_chunks,
    output_dtype,
    promoted_copy,
    tensor_generator,
)

__all__ = ["DARE", "check_dare", "drop_and_rescale", "drop_mask"]


def check_dare(p: float, k: float, rescale: bool) -> tuple[float, float, bool]:
    """``(p, k, rescale)`` checked: ``p`` in ``[0, 1)``, ``k`` finite, ``k = 0`` when ``rescale`` is False."""
    p_value = check_drop_rate("DARE", p)
    k_value = check_real("DARE", "k", k)
    if not isinstance(rescale, bool):
        raise ValueError(f"DARE: `rescale` must be a bool, got rescale={rescale!r}.")
    if not rescale and k_value != 0.0:
        raise ValueError(
            f"DARE: drop only (rescale=False) zeroes the dropped entries and needs k=0, got k={k!r}. "
            "Set k=0 or rescale=True."
        )
    return p_value, k_value, rescale


def _drop_mask_chunks(numel: int, p: float, generator: torch.Generator) -> Iterator[tuple[slice, Tensor]]:
    """``(slice, dropped)`` for consecutive chunks of a flattened tensor; see :func:`drop_mask`."""
    device = generator.device
    for part in flat_chunks(numel):
        draws = torch.rand(part.stop - part.start, generator=generator, device=device, dtype=torch.float32)
        yield part, draws < p


def drop_mask(numel: int, p: float, generator: torch.Generator) -> Tensor:
    """The DARE drop mask ``M ~ Bernoulli(p)`` of a flattened tensor, as a bool tensor (True = dropped).

    Entry ``i`` is dropped when ``u_i < p`` where ``u`` are float32 uniform draws ``torch.rand`` from ``generator``,
    taken in consecutive chunks of :data:`~lightning_delta.edits.base.CHUNK_NUMEL` entries (a single
    ``torch.rand(numel)`` for tensors up to that size), on the generator's device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> drop_mask(5, 0.5, g).dtype
        torch.bool
    """
    mask = torch.empty(numel, dtype=torch.bool, device=generator.device)
    for part, dropped in _drop_mask_chunks(numel, p, generator):
        mask[part] = dropped
    return mask


def drop_and_rescale(
    delta: Tensor, p: float, k: float = 0.0, rescale: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    r"""DARE (Yu et al. 2024) and the paper's extension of it (section 4.2), as a pure function.

    .. math::
        F(\Delta W) = k \cdot M \odot \Delta W + \frac{1 - k p}{1 - p} \cdot (1 - M) \odot \Delta W,
        \qquad M \sim \mathrm{Bernoulli}(p)

    ``k = 0`` is DARE (equation 2): drop with probability ``p``, rescale the rest by ``1/(1 − p)``. The extension
    keeps ``E[F(ΔW)] = ΔW`` for any ``k``; ``k < 0`` flips the sign of the dropped entries. ``rescale=False`` is the
    paper's "drop only" reference of Figure 3, ``F = (1 − M) ⊙ ΔW`` (biased: ``E[F] = (1 − p)·ΔW``).
    ``M`` is :func:`drop_mask` of the flattened tensor.

    Shapes:
        - ``delta``: any shape. Output: same shape, dtype promoted to at least float32.

    Args:
        delta: ``ΔW``; not modified.
        p: drop rate in ``[0, 1)``.
        k: factor applied to dropped entries (``0`` drops them).
        rescale: False for drop only (then ``k`` must be 0).
        generator: source of the mask, on ``delta``'s device; a fresh unseeded CPU-or-device generator if None.

    Example:
        >>> delta = torch.tensor([1.0, -2.0, 3.0, -4.0])
        >>> out = drop_and_rescale(delta, p=0.5, generator=torch.Generator().manual_seed(0))
        >>> bool(((out == 0) | (out == 2 * delta)).all())
        True
    """
    p, k, rescale = check_dare(p, k, rescale)
    if p == 0.0 or (rescale and k == 1.0):  # nothing dropped, or dropped and kept entries both scaled by 1
        return promoted_copy(delta)
    if generator is None:
        generator = torch.Generator(device=delta.device)
    dtype = output_dtype(delta)
    kept_scale = (1.0 - k * p) / (1.0 - p) if rescale else 1.0
    flat = delta.reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype, device=delta.device)
    for part, dropped in _drop_mask_chunks(flat.numel(), p, generator):  # chunks bound the temporary memory
        work, target = flat[part].to(dtype), out[part]
        torch.mul(work, kept_scale, out=target)
        if k == 0.0:
            target.masked_fill_(dropped, 0.0)
        else:
            torch.where(dropped, work * k, target, out=target)
    return out.view(delta.shape)


class DARE(DeltaEdit):
    r"""DARE and its extension (paper, sections 4.1 and 4.2): random drop of delta entries, rescale of the rest.

    .. math::
        F(\Delta W) = k \cdot M \odot \Delta W + \frac{1 - k p}{1 - p} \cdot (1 - M) \odot \Delta W,
        \qquad M \sim \mathrm{Bernoulli}(p)

    ``k = 0`` is DARE, ``F = (1 − M) ⊙ ΔW / (1 − p)`` (equation 2). ``k ≠ 0`` is the paper's extension as written
    in section 4.2 (the display defining ``W_COMP``): the dropped entries are multiplied by ``k`` and the kept ones by
    ``(1 − k·p)/(1 − p)``, the factor that keeps the expectation, ``p·k + (1 − p)·(1 − k·p)/(1 − p) = 1``. The edit
    ``F(ΔW) − ΔW = (k − 1)(M − p)/(1 − p) ⊙ ΔW`` has mean zero for every ``k``, which is why the Riemann term stays
    near 0 (section 4.2, last line of that display).
    ``rescale=False`` gives the "drop only" reference of Figure 3, ``(1 − M) ⊙ ΔW``.

    The mask of tensor ``name`` comes from ``tensor_generator(seed, name, delta.device)`` (see :func:`drop_mask`):
    the same seed gives the same mask on every rank, in any tensor order, with any number of threads.
    ``p = 0`` (and ``k = 1``) return a promoted copy without drawing.

    Args:
        p: drop rate in ``[0, 1)``.
        k: factor of the dropped entries, any finite real (the paper sweeps −1 … 1.5); 0 is DARE.
        rescale: False for drop only, which needs ``k = 0``.
        seed: run seed, an int ``>= 0``.

    Raises:
        ValueError: if ``p`` is outside ``[0, 1)`` or not finite, ``k`` is not finite, ``rescale`` is not a bool,
            ``rescale=False`` with ``k != 0``, or ``seed`` is not a non-negative int.

    Example:
        >>> edit = DARE(p=0.5, seed=0)
        >>> out = edit({"w": torch.ones(2, 3)})["w"]
        >>> sorted(set(out.flatten().tolist())) in ([0.0, 2.0], [0.0], [2.0])
        True
    """

    name = "dare"
    label = "DARE"  # how figures and tables name the edit
    reference = "paper, sections 4.1 and 4.2 (equation 2)"  # where the paper defines it
    randomised = True  # the mask
    shown = ("p", "k")  # what labels and tables show
    planning = Planning("density", "kept density 1 − p", (0.05, 0.1, 0.2, 0.4))

    @classmethod
    def variant(cls, config: Mapping[str, Any]) -> str:
        """``drop_only`` for ``rescale=False`` (Figure 3's reference), else ``dare``."""
        return "drop_only" if config.get("rescale") is False else cls.name

    @classmethod
    def shown_arguments(cls, config: Mapping[str, Any]) -> list[str]:
        """``p`` and ``k``; ``p`` alone for drop only, whose ``k`` is always 0."""
        shown = super().shown_arguments(config)
        return [key for key in shown if key != "k"] if cls.variant(config) == "drop_only" else shown

    @classmethod
    def at_setting(cls, value: float, seed: int = 0) -> DARE:
        """DARE keeping the density ``value``: ``p = 1 − value``."""
        return cls(p=round(1.0 - float(value), 12), seed=seed)

    def __init__(self, p: float, k: float = 0.0, rescale: bool = True, seed: int = 0) -> None:
        self.p, self.k, self.rescale = check_dare(p, k, rescale)
        self.seed = check_seed(seed, "DARE")

    @torch.no_grad()
    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        if self.p == 0.0 or (self.rescale and self.k == 1.0):
            return promoted_copy(delta)
        generator = tensor_generator(self.seed, name, delta.device)
        return drop_and_rescale(delta, self.p, self.k, self.rescale, generator)
