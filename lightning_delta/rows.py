"""The rows of a results file read through their edits: what each row's edit is called, whether it draws random
numbers, and the rows of one setting over seeds with their mean ± sample standard deviation.

What an edit is called, which of its arguments a label shows and whether it is randomised come from its class
(:class:`~lightning_delta.edits.DeltaEdit`: ``variant``, ``shown_arguments``, ``draws_random``), found by the row's edit
name in the registry (:data:`lightning_delta.edits.EDITS`); an edit not registered there is called by its name, shows
every argument but the seed and counts as deterministic.

* :func:`edit_family`, :func:`edit_parameters`, :func:`edit_label`, :func:`randomised`: one row's edit;
* :class:`Stat` and :func:`stat`: mean and sample standard deviation, summed in float64;
* :class:`Setting` and :func:`aggregate`: the rows that differ only in the edit's seed, as one setting.

The figures (:mod:`lightning_delta.plots`) and the demo's findings (:mod:`lightning_delta.demo.analysis`) both read
rows through this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_delta.edits import EDITS, DeltaEdit
from lightning_delta.sweep import SweepRow

__all__ = [
    "Setting",
    "Stat",
    "aggregate",
    "edit_family",
    "edit_label",
    "edit_parameters",
    "format_number",
    "randomised",
    "stat",
]


# ------------------------------------------------------------------------------------------------- one row's edit
def _edit_class(row: SweepRow) -> type[DeltaEdit]:
    """The registered class of the row's edit; :class:`DeltaEdit` itself (every argument shown, deterministic) for
    an edit not registered here."""
    name = row.edit.get("name")
    return EDITS.get(name, DeltaEdit) if isinstance(name, str) else DeltaEdit


def edit_family(row: SweepRow) -> str:
    """``dare``, ``drop_only`` (DARE without rescale), ``bitdelta``, ``lowrank``, ``magnitude_prune``,
    ``extrapolate``, ...: the edit's registry name, or its variant's (``DeltaEdit.variant``)."""
    cls = _edit_class(row)
    return cls.variant(row.edit) if cls is not DeltaEdit else row.edit.get("name", "?")


def format_number(value: Any) -> str:
    """A float as ``%g`` (``0.5``, ``1e-05``), anything else as ``str``."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def edit_parameters(row: SweepRow) -> str:
    """The arguments that tell the row's edit apart (``DeltaEdit.shown_arguments``), e.g. ``p=0.5 k=0``."""
    keys = _edit_class(row).shown_arguments(row.edit)
    return " ".join(f"{key}={format_number(row.edit[key])}" for key in keys)


def edit_label(row: SweepRow) -> str:
    """The row's edit as figures and tables name it: ``dare p=0.5 k=0``, ``drop_only p=0.1``, ``bitdelta bits=1``."""
    return f"{edit_family(row)} {edit_parameters(row)}".strip()


def randomised(row: SweepRow) -> bool:
    """Whether the row's edit draws random numbers, so that its result varies with the seed
    (``DeltaEdit.draws_random``): DARE, drop only, DELLA, BitDelta's sampled magnitudes, the randomized SVD."""
    return _edit_class(row).draws_random(row.edit)


# ------------------------------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``n − 1`` in the denominator; 0 for one value) of ``values``."""

    mean: float
    std: float
    n: int
    values: tuple[float, ...] = ()

    def __str__(self) -> str:
        if self.n == 1:
            return f"{self.mean:+.4f}"
        return f"{self.mean:+.4f} ± {self.std:.4f}"


def stat(values: Iterable[float]) -> Stat:
    """:class:`Stat` of ``values``, summed in float64 (``math.fsum``).

    Example:
        >>> str(stat([0.1, 0.3])), stat([2.0]).std
        ('+0.2000 ± 0.1414', 0.0)
    """
    values = tuple(float(value) for value in values)
    if not values:
        raise ValueError("stat() needs at least one value.")
    n = len(values)
    mean = math.fsum(values) / n
    variance = math.fsum((value - mean) ** 2 for value in values) / (n - 1) if n > 1 else 0.0
    return Stat(mean, math.sqrt(variance), n, values)


# -------------------------------------------------------------------------------------------------------- settings
def _scale_of(row: SweepRow, scales: Mapping[str, float] | None) -> float:
    pretrained = (row.config.get("model") or {}).get("pretrained")
    return 1.0 if scales is None or pretrained is None else scales.get(str(pretrained), 1.0)


@dataclass
class Setting:
    """The rows of one setting (edit, its arguments but the seed, data set, delta scale) and their statistics."""

    family: str  # edit_family of the rows: dare, drop_only, bitdelta, ...
    edit: dict[str, Any]  # the edit's arguments without the seed
    dataset: str
    scale: float  # s of W_pre = W_post − s·ΔW (1: the pair itself)
    rows: list[SweepRow] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [int(row.edit.get("seed", 0)) for row in self.rows]

    @property
    def randomised(self) -> bool:
        """Whether the edit draws random numbers (:func:`randomised`): its rows are then samples over seeds."""
        return randomised(self.rows[0])

    @property
    def exact(self) -> Stat:
        return stat(row.result.exact for row in self.rows)

    @property
    def term(self) -> Stat:
        return stat(row.result.term for row in self.rows)

    @property
    def first_order(self) -> Stat:
        """``⟨∇L(W_post), E⟩``, the c = 0 summand: ΔL to first order at W_post."""
        return stat(row.result.inner_products[0] for row in self.rows)

    @property
    def curvature(self) -> Stat:
        """``ΔL − ⟨∇L(W_post), E⟩``: what the first order at W_post misses (the curvature along the path)."""
        return stat(row.result.exact - row.result.inner_products[0] for row in self.rows)

    @property
    def accuracy(self) -> Stat | None:
        values = [row.result.accuracy_edit for row in self.rows]
        measured = [value for value in values if value is not None]
        return stat(measured) if len(measured) == len(values) else None

    def by_seed(self) -> dict[int, SweepRow]:
        return {int(row.edit.get("seed", 0)): row for row in self.rows}

    def inner_products(self) -> list[Stat]:
        """``⟨∇L(W_post + (c/C)E), E⟩`` for c = 0 … C − 1, over the rows (Eq. 1's summands)."""
        num_points = self.rows[0].result.num_points
        return [stat(row.result.inner_products[c] for row in self.rows) for c in range(num_points)]

    def label(self) -> str:
        return edit_label(self.rows[0])


def aggregate(rows: Iterable[SweepRow], scales: Mapping[str, float] | None = None) -> list[Setting]:
    """The rows grouped into settings: equal edit arguments apart from ``seed``, equal data set and delta scale;
    in order of first appearance. ``scales`` maps a pre-trained directory to its ``s`` (others count as 1)."""
    groups: dict[tuple, Setting] = {}
    for row in rows:
        edit = {key: value for key, value in row.edit.items() if key != "seed"}
        scale = _scale_of(row, scales)
        key = (edit_family(row), tuple(sorted((k, repr(v)) for k, v in edit.items())), row.dataset, scale)
        if key not in groups:
            groups[key] = Setting(edit_family(row), edit, row.dataset, scale)
        groups[key].rows.append(row)
    return list(groups.values())
