"""Edit families with one per-tensor parameter, and what each setting costs to store.

A family is an edit whose class declares a per-tensor setting ``v`` (its ``planning``: BitDelta bits, DARE or
TIES-trim kept density, LowRank rank; :meth:`~lightning_delta.edits.DeltaEdit.at_setting` builds the edit at ``v``).
What ``v`` counts (its unit: bits, density or rank) gives each tensor its weight ``w_k``: the cost of tensor ``k`` at ``v`` is ``v · w_k`` (bits × entries; kept entries = density × entries;
stored numbers = rank × (rows + columns)). A budget "average ``v̄``" is ``v̄ · Σ_k w_k``, what the uniform edit at
``v̄`` costs, so a plan within the budget stores no more than the uniform edit. Costs are exact rationals
(:class:`fractions.Fraction` of the settings' decimal strings): the budget test has no rounding.

A budget can also be a size in bytes: :meth:`Family.stored_bytes` is what tensor ``k`` takes on disk when ``F(ΔW_k)``
is written by :func:`~lightning_delta.compress.save_compressed` (:mod:`lightning_delta.compress.forms`), exactly.
``n`` is the number of entries, ``e`` the bytes of one stored value: ``F(ΔW)``'s own dtype (at least float32, 4 bytes
for a bf16 model), the one that gives the edited model back bit for bit. Bit arrays take ``ceil(n/8)`` bytes;
``positions(n, c)`` is the smaller of a bitmap and ``c`` int32 indices (0 for ``c = 0``):

* BitDelta, ``b`` bits: ``b · ceil(n/8)`` (the sign bit and ``b − 1`` bits naming one of ``M = 2^(b−1)`` magnitude
  blocks, per entry) ``+ M · e`` (the magnitudes) ``+ positions(n, z)``, ``z`` the exact zeros of ``F(ΔW)`` (an entry
  of ΔW that is exactly 0 stays 0 under ``sign(0) = 0``; ``BitDelta(sign_of_zero=1)`` leaves none); ``M >= n`` is
  lossless and stored dense, ``n · e``;
* DARE and TIES' trim: ``c · e + positions(n, c)``, ``c`` the nonzero entries of ``F(ΔW)`` (the kept values, DARE's
  rescaling folded in);
* low rank ``r`` of a ``(m, k)`` matrix: ``r · (m + k) · e`` (the two factors, the singular values folded in);
  ``r >= min(m, k)`` leaves ``ΔW`` as it is, stored dense, ``n · e``.

Given the edited tensor, the counts ``z`` and ``c`` are its own (DARE's: its mask's actual kept count); without it,
the expected ``c = d · n`` and ``z = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from lightning_delta.compress.forms import index_dtype, position_bytes
from lightning_delta.edits import EDITS, DeltaEdit

__all__ = ["FAMILIES", "Family", "family"]


# What a setting can count, in the order the families are listed: the cost model of each is below.
UNITS = ("bits", "density", "rank")


@dataclass(frozen=True)
class Family:
    """One edit family: its name, what its setting means, and its default candidate settings (from its class's
    :class:`~lightning_delta.edits.base.Planning`)."""

    name: str
    setting: str  # what v is, for messages and tables
    default_candidates: tuple[float, ...]
    unit: str  # what v counts: "bits", "density" or "rank" (UNITS)
    edit_class: type[DeltaEdit]

    @classmethod
    def of(cls, edit_class: type[DeltaEdit]) -> Family:
        """The family of ``edit_class``, which declares its ``planning``."""
        planning = edit_class.planning
        if planning is None or planning.unit not in UNITS:
            raise ValueError(
                f"{edit_class.__name__} declares no per-tensor setting in {list(UNITS)}: its planning is {planning!r}."
            )
        return cls(edit_class.name, planning.setting, planning.candidates, planning.unit, edit_class)

    def edit(self, value: float, seed: int = 0) -> DeltaEdit:
        """The edit at setting ``value`` (``seed`` for a randomised edit's draws, DARE's masks)."""
        return self.edit_class.at_setting(value, seed)

    def applies(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of ``shape`` is planned: a rank plans matrices only (LowRank leaves the rest)."""
        return self.unit != "rank" or len(shape) == 2

    def weight(self, shape: Sequence[int]) -> int:
        """``w_k``: the cost of one unit of the setting on a tensor of ``shape``."""
        if self.unit == "rank":
            return int(shape[0]) + int(shape[1])
        return int(torch.Size(shape).numel())

    def cost(self, value: float, shape: Sequence[int]) -> Fraction:
        """``v · w_k`` exactly."""
        return exact(value) * self.weight(shape)

    def stored_bytes(
        self, value: float, shape: Sequence[int], element_bytes: int, edited: Tensor | None = None
    ) -> Fraction:
        """The bytes of ``F(ΔW)`` stored compactly at setting ``value`` (the module docstring gives each formula),
        exactly; ``element_bytes`` is the size of one stored value (``F(ΔW)``'s dtype, at least float32), ``edited``
        the edited tensor ``F(ΔW)`` whose own counts are then used (DARE's kept entries, BitDelta's exact zeros)."""
        entries = int(torch.Size(shape).numel())
        bitmap = math.ceil(entries / 8)
        if self.unit == "bits":
            bits = int(value)
            if 2 ** (bits - 1) >= entries:  # one entry per block: lossless, stored dense
                return Fraction(entries * element_bytes)
            zeros = 0 if edited is None else int((edited == 0).sum())
            return Fraction(bits * bitmap + 2 ** (bits - 1) * element_bytes + position_bytes(entries, zeros))
        if self.unit == "density":
            kept = exact(value) * entries if edited is None else Fraction(int(torch.count_nonzero(edited)))
            if kept == 0:
                return Fraction(0)
            return kept * element_bytes + min(Fraction(bitmap), kept * index_dtype(entries).itemsize)
        rank = int(value)
        if len(shape) != 2 or rank >= min(int(shape[0]), int(shape[1])):
            return Fraction(entries * element_bytes)
        return Fraction(rank * (int(shape[0]) + int(shape[1])) * element_bytes)

    def check_candidates(self, candidates: Sequence[float]) -> list[float]:
        """The candidates sorted, each checked by building its edit; ValueError naming a bad one."""
        if not candidates:
            raise ValueError(f"plan: give at least one candidate {self.setting} for {self.name}, got {candidates!r}.")
        for value in candidates:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"plan: candidate {self.setting} must be finite numbers, got {value!r}.")
            if self.unit != "density" and (value != int(value) or value < 1):
                raise ValueError(f"plan: {self.name} candidates ({self.setting}) must be integers >= 1, got {value!r}.")
            if self.unit == "density" and not 0.0 < value <= 1.0:
                raise ValueError(f"plan: {self.name} candidates (kept density) must be in (0, 1], got {value!r}.")
        values = sorted(set(candidates))
        return [float(value) if self.unit == "density" else int(value) for value in values]


def exact(value: float) -> Fraction:
    """``value`` as the rational its shortest decimal string names (0.1 is 1/10, not the binary float)."""
    return Fraction(repr(float(value))) if not isinstance(value, int) else Fraction(value)


# Every registered edit that declares a per-tensor setting, by unit (bits, density, rank), then in the registry's order.
FAMILIES = {
    family.name: family
    for family in sorted(
        (Family.of(edit_class) for edit_class in EDITS.values() if edit_class.planning is not None),
        key=lambda family: (UNITS.index(family.unit), list(EDITS).index(family.name)),
    )
}


def family(name: str) -> Family:
    """The family called ``name``; ValueError listing the families."""
    if name not in FAMILIES:
        raise ValueError(f"plan: unknown edit family {name!r}; choose one of {list(FAMILIES)}.")
    return FAMILIES[name]
