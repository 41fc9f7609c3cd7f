"""Editing operations on delta parameters ``ΔW = W_post − W_pre``: ``F(ΔW)`` for each tensor (paper, sections 4–6).

Every edit is configured and checked in its constructor and called on a mapping ``{name: ΔW}``; it returns a new
dict ``{name: F(ΔW)}`` (inputs untouched, dtype promoted to at least float32). ``edit_tensor(name, delta,
gradient=None)`` edits one tensor, which is what :func:`lightning_delta.attach.edit_differences` uses to build
``E = F(ΔW) − ΔW`` one tensor at a time.

========================  =========================  ==================================================
name (:func:`build`)      class                      paper
========================  =========================  ==================================================
``dare``                  :class:`DARE`              DARE, its k extension, drop only (sec. 4.1, 4.2)
``della``                 :class:`DELLA`             DELLA's MagPrune (sec. 4, Deep et al. 2024)
``sign_biased``           :class:`SignBiased`        Table 1 middle column (sec. 4.3)
``gradient_biased``       :class:`GradientBiased`    Table 1 right column (sec. 4.3), needs ∇L
``bitdelta``              :class:`BitDelta`          BitDelta and its extensions (sec. 5.1, 5.3)
``lowrank``               :class:`LowRank`           Twin-Merging's truncated SVD (sec. 5.2)
``magnitude_prune``       :class:`MagnitudePrune`    TIES-Merging's trim (sec. 5.2)
``extrapolate``           :class:`Extrapolate`       EXPO (sec. 6)
========================  =========================  ==================================================

:class:`PerTensor` gives each tensor the edit of the first regular expression its name matches (what
:mod:`lightning_delta.planning` writes); it is not in :func:`build`'s registry: ``PerTensor(edits={...})``.

Randomised edits draw from :func:`tensor_generator` (run seed and ``zlib.crc32`` of the tensor name): the same
seed gives the same result in any tensor order, with any number of threads, in any process.

What the rest of the package knows about an edit is declared on its class (:class:`DeltaEdit`): ``label`` and
``shown`` (figures and tables, :mod:`lightning_delta.rows`), ``randomised`` (statistics over seeds), ``planning``
(:mod:`lightning_delta.planning`'s families). A new edit is a subclass in a file of its own and one entry in
:data:`EDITS` below.
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning_delta.edits.base import DeltaEdit, tensor_generator
from lightning_delta.edits.biased import GradientBiased, SignBiased
from lightning_delta.edits.bitdelta import BitDelta
from lightning_delta.edits.dare import DARE
from lightning_delta.edits.della import DELLA
from lightning_delta.edits.extrapolate import Extrapolate
from lightning_delta.edits.lowrank import LowRank
from lightning_delta.edits.per_tensor import PerTensor
from lightning_delta.edits.prune import MagnitudePrune

__all__ = [
    "DARE",
    "DELLA",
    "BitDelta",
    "DeltaEdit",
    "Extrapolate",
    "GradientBiased",
    "LowRank",
    "MagnitudePrune",
    "PerTensor",
    "SignBiased",
    "available",
    "build",
    "edit_class",
    "tensor_generator",
]

# One registry, keyed by each class's `name`: the names `build` accepts and `config()` writes.
EDITS: dict[str, type[DeltaEdit]] = {
    cls.name: cls for cls in (DARE, DELLA, SignBiased, GradientBiased, BitDelta, LowRank, MagnitudePrune, Extrapolate)
}


def available() -> list[str]:
    """The names :func:`build` accepts, in the order of the table above.

    Example:
        >>> available()
        ['dare', 'della', 'sign_biased', 'gradient_biased', 'bitdelta', 'lowrank', 'magnitude_prune', 'extrapolate']
    """
    return list(EDITS)


def edit_class(value: str) -> type[DeltaEdit] | None:
    """The edit class that ``value`` names as the command line's ``--edit`` takes it: a class name (``"DARE"``) or
    this package's class path (``"lightning_delta.edits.DARE"``); ``None`` for anything else.

    Example:
        >>> edit_class("BitDelta").__name__, edit_class("lightning_delta.edits.DARE").__name__, edit_class("dare")
        ('BitDelta', 'DARE', None)
    """
    if "." in value and not value.startswith("lightning_delta."):
        return None
    return {cls.__name__: cls for cls in EDITS.values()}.get(value.rsplit(".", 1)[-1])


def build(name: str, **params: Any) -> DeltaEdit:
    """The edit called ``name`` (see :func:`available`) with constructor arguments ``params``.

    ``build(**edit.config())`` rebuilds an edit equal to ``edit``. The arguments are checked by the edit's
    constructor, as when it is called directly.

    Raises:
        ValueError: if ``name`` is unknown (the known names are listed), an argument is unknown or a required one
            is missing (the edit's arguments are listed), or an argument's value is invalid.

    Example:
        >>> build("dare", p=0.9, seed=1)
        DARE(p=0.9, k=0.0, rescale=True, seed=1)
        >>> edit = build("bitdelta", bits=3)
        >>> build(**edit.config()) == edit
        True
    """
    if not isinstance(name, str) or name not in EDITS:
        raise ValueError(f"Unknown edit {name!r}; the known edits are {available()}.")
    cls = EDITS[name]
    known = cls.parameter_names()
    unknown = [key for key in params if key not in known]
    if unknown:
        raise ValueError(f"{cls.__name__} ({name!r}) got unknown argument(s) {unknown}; its arguments are {known}.")
    signature = inspect.signature(cls.__init__)
    missing = [
        key for key in known if signature.parameters[key].default is inspect.Parameter.empty and key not in params
    ]
    if missing:
        raise ValueError(f"{cls.__name__} ({name!r}) needs argument(s) {missing}; its arguments are {known}.")
    return cls(**params)
