"""Edit families with one per-tensor parameter, and what each setting costs to store.

A family maps a setting ``v`` (BitDelta bits, DARE or TIES-trim kept density, LowRank rank) to an edit, and a
tensor to its weight ``w_k``: the cost of tensor ``k`` at ``v`` is ``v · w_k`` (bits × entries; kept entries = density × entries;
stored numbers = rank × (rows + columns)). A budget "average ``v̄``" is ``v̄ · Σ_k w_k``, what the uniform edit at
``v̄`` costs, so a plan within the budget stores no more than the uniform edit. Costs are exact rationals
(:class:`fractions.Fraction` of the settings' decimal strings): the budget test has no rounding.

A budget can also be a size in bytes: :meth:`Family.stored_bytes` is what tensor ``k`` takes when ``F(ΔW_k)`` is
stored compactly, its values in the model's dtype (``e`` bytes each) and ``n`` its entries:

* BitDelta, ``b`` bits: ``b · n / 8`` (the sign bit and ``b − 1`` bits naming one of ``M = 2^(b−1)`` magnitude
  blocks, per entry) ``+ M · e`` (the magnitudes);
* DARE and TIES' trim, kept density ``d``: ``d · n · e`` (the kept values, DARE's rescaling folded in) ``+ n / 8``
  (a bitmap of the kept positions);
* low rank ``r`` of a ``(m, k)`` matrix: ``r · (m + k) · e`` (the two factors, the singular values folded in).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from lightning_delta.edits import DARE, BitDelta, DeltaEdit, LowRank, MagnitudePrune

__all__ = ["FAMILIES", "Family", "family"]


@dataclass(frozen=True)
class Family:
    """One edit family: its name, what its setting means, and its default candidate settings."""

    name: str
    setting: str  # what v is, for messages and tables
    default_candidates: tuple[float, ...]

    def edit(self, value: float, seed: int = 0) -> DeltaEdit:
        """The edit at setting ``value`` (``seed`` for DARE's masks)."""
        if self.name == "bitdelta":
            return BitDelta(bits=int(value))
        if self.name == "dare":
            return DARE(p=round(1.0 - float(value), 12), seed=seed)
        if self.name == "magnitude_prune":
            return MagnitudePrune(p=round(1.0 - float(value), 12))
        return LowRank(rank=int(value))

    def applies(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of ``shape`` is planned: low rank plans matrices only (LowRank leaves the rest)."""
        return self.name != "lowrank" or len(shape) == 2

    def weight(self, shape: Sequence[int]) -> int:
        """``w_k``: the cost of one unit of the setting on a tensor of ``shape``."""
        if self.name == "lowrank":
            return int(shape[0]) + int(shape[1])
        return int(torch.Size(shape).numel())

    def cost(self, value: float, shape: Sequence[int]) -> Fraction:
        """``v · w_k`` exactly."""
        return exact(value) * self.weight(shape)

    def stored_bytes(self, value: float, shape: Sequence[int], element_bytes: int) -> Fraction:
        """The bytes of ``F(ΔW)`` stored compactly at setting ``value`` (the module docstring gives each formula),
        exactly; ``element_bytes`` is the size of one value in the model's dtype."""
        entries = int(torch.Size(shape).numel())
        if self.name == "bitdelta":
            return Fraction(int(value) * entries, 8) + 2 ** (int(value) - 1) * element_bytes
        if self.name in DENSITY_FAMILIES:
            return exact(value) * entries * element_bytes + Fraction(entries, 8)
        return int(value) * (int(shape[0]) + int(shape[1])) * element_bytes

    def check_candidates(self, candidates: Sequence[float]) -> list[float]:
        """The candidates sorted, each checked by building its edit; ValueError naming a bad one."""
        if not candidates:
            raise ValueError(f"plan: give at least one candidate {self.setting} for {self.name}, got {candidates!r}.")
        for value in candidates:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"plan: candidate {self.setting} must be finite numbers, got {value!r}.")
            if self.name in ("bitdelta", "lowrank") and (value != int(value) or value < 1):
                raise ValueError(f"plan: {self.name} candidates ({self.setting}) must be integers >= 1, got {value!r}.")
            if self.name in DENSITY_FAMILIES and not 0.0 < value <= 1.0:
                raise ValueError(f"plan: {self.name} candidates (kept density) must be in (0, 1], got {value!r}.")
        values = sorted(set(candidates))
        return [float(value) if self.name in DENSITY_FAMILIES else int(value) for value in values]


def exact(value: float) -> Fraction:
    """``value`` as the rational its shortest decimal string names (0.1 is 1/10, not the binary float)."""
    return Fraction(repr(float(value))) if not isinstance(value, int) else Fraction(value)


DENSITY_FAMILIES = ("dare", "magnitude_prune")

FAMILIES = {
    "bitdelta": Family("bitdelta", "bits per entry (sign bit included)", (1, 2, 3, 4)),
    "dare": Family("dare", "kept density 1 − p", (0.05, 0.1, 0.2, 0.4)),
    "magnitude_prune": Family("magnitude_prune", "kept density 1 − p (TIES' trim)", (0.05, 0.1, 0.2, 0.4)),
    "lowrank": Family("lowrank", "rank", (1, 2, 4, 8)),
}


def family(name: str) -> Family:
    """The family called ``name``; ValueError listing the families."""
    if name not in FAMILIES:
        raise ValueError(f"plan: unknown edit family {name!r}; choose one of {list(FAMILIES)}.")
    return FAMILIES[name]
