"""PerTensor: a different edit for different tensors, chosen by regular expressions on the tensor names.

What :mod:`lightning_delta.planning` writes: ``PerTensor({"^model.layers.0.mlp.up_proj.weight$": BitDelta(bits=3), ...})``
gives each tensor the first edit whose pattern it matches (``re.search``, in the mapping's order).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_delta.edits.base import DeltaEdit, promoted_copy

__all__ = ["PerTensor"]

UNMATCHED = ("error", "keep")


class PerTensor(DeltaEdit):
    r"""Per-tensor settings: tensor ``name`` gets ``F_j(ΔW)`` for the first pattern ``j`` that ``re.search`` finds in
    ``name``.

    .. math::
        F(\Delta W_k) = F_{j(k)}(\Delta W_k), \qquad j(k) = \min\{j : \text{pattern}_j \text{ matches } k\}

    Each edit keeps its own seeding: a randomised edit draws from ``tensor_generator(its seed, name)``, so a tensor
    edited through ``PerTensor`` is bit-identical to the same edit applied to that tensor alone.

    Args:
        edits: ``{pattern: edit}`` in priority order; an edit is a :class:`DeltaEdit` or its ``config()`` dict
            (``{"name": "bitdelta", "bits": 3}``, as :func:`lightning_delta.edits.build` takes it).
        unmatched: what a tensor that no pattern matches gets: ``"error"`` (the default: a ValueError naming it,
            so that a plan never silently leaves a tensor out) or ``"keep"`` (left unedited, ``F(ΔW) = ΔW``).

    Raises:
        ValueError: ``edits`` is not a non-empty mapping, a pattern is not a str or not a valid regular
            expression, an edit is a PerTensor or neither a DeltaEdit nor a valid config dict, ``unmatched`` is
            unknown; when called, a tensor matched by no pattern under ``unmatched="error"``.

    Example:
        >>> import torch
        >>> from lightning_delta.edits import BitDelta
        >>> edit = PerTensor({"^a$": BitDelta(bits=1), ".": {"name": "dare", "p": 0.0}})
        >>> out = edit({"a": torch.tensor([-4.0, 2.0]), "b": torch.tensor([1.0, 3.0])})
        >>> out["a"].tolist(), out["b"].tolist()
        ([-3.0, 3.0], [1.0, 3.0])
    """

    name = "per_tensor"
    label = "per tensor"  # how figures and tables name the edit
    reference = "lightning_delta.planning (beyond the paper)"

    def __init__(self, edits: Mapping[str, DeltaEdit | dict[str, Any]], unmatched: str = "error") -> None:
        if not isinstance(edits, Mapping) or not edits:
            raise ValueError(
                f"PerTensor: `edits` must be a non-empty mapping {{regular expression: edit}}, got {edits!r}."
            )
        if unmatched not in UNMATCHED:
            raise ValueError(f"PerTensor: `unmatched` must be one of {list(UNMATCHED)}, got unmatched={unmatched!r}.")
        self.unmatched = unmatched
        self.edits: dict[str, DeltaEdit] = {}
        self._patterns: list[tuple[re.Pattern[str], DeltaEdit]] = []
        for pattern, edit in edits.items():
            if not isinstance(pattern, str):
                raise ValueError(f"PerTensor: every pattern must be a str, got {pattern!r}.")
            try:
                compiled = re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"PerTensor: pattern {pattern!r} is not a valid regular expression: {error}."
                ) from None
            edit = _as_edit(pattern, edit)
            self.edits[pattern] = edit
            self._patterns.append((compiled, edit))
        # gradient-aware edits (GradientBiased) get ∇L(W_post) of their tensors passed on
        self.needs_gradients = any(edit.needs_gradients for edit in self.edits.values())

    def edit_for(self, name: str) -> DeltaEdit | None:
        """The edit of tensor ``name``: the first whose pattern matches; ``None`` (left unedited) under
        ``unmatched="keep"``."""
        for pattern, edit in self._patterns:
            if pattern.search(name):
                return edit
        if self.unmatched == "keep":
            return None
        raise ValueError(
            f"PerTensor: no pattern matches tensor {name!r}; the patterns are {list(self.edits)}. Add a pattern for "
            "it (e.g. '.' last, for every other tensor), exclude it, or pass unmatched='keep' to leave it unedited."
        )

    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        edit = self.edit_for(name)
        return promoted_copy(delta) if edit is None else edit.edit_tensor(name, delta, gradient)

    def config(self) -> dict[str, Any]:
        """``{"name": "per_tensor", "edits": {pattern: edit.config()}, "unmatched": ...}``: JSON, and
        ``PerTensor(**{k: v for k, v in config.items() if k != "name"})`` rebuilds an equal edit."""
        return {
            "name": self.name,
            "edits": {key: edit.config() for key, edit in self.edits.items()},
            "unmatched": self.unmatched,
        }

    def __hash__(self) -> int:
        return hash((type(self), repr(self.config())))


def _edit_classes() -> dict[str, type[DeltaEdit]]:
    """Every defined edit class by its ``name`` (PerTensor left out): what a config dict's ``name`` may be."""
    found: dict[str, type[DeltaEdit]] = {}
    pending = list(DeltaEdit.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not PerTensor and isinstance(getattr(cls, "name", None), str):
            found.setdefault(cls.name, cls)
    return found


def _as_edit(pattern: str, edit: Any) -> DeltaEdit:
    """``edit`` as a DeltaEdit: a config dict ``{"name": ..., **arguments}`` is built by its class."""
    if isinstance(edit, Mapping):
        params = dict(edit)
        classes = _edit_classes()
        name = params.pop("name", None)
        if name not in classes:
            raise ValueError(
                f"PerTensor: the edit of pattern {pattern!r} names no edit: {edit!r}; its 'name' must be one of "
                f"{sorted(classes)}."
            )
        try:
            edit = classes[name](**params)
        except TypeError as error:
            raise ValueError(f"PerTensor: the edit of pattern {pattern!r}, {dict(edit)!r}: {error}.") from None
    if not isinstance(edit, DeltaEdit) or isinstance(edit, PerTensor):
        raise ValueError(
            f"PerTensor: the edit of pattern {pattern!r} must be an edit of lightning_delta.edits (or its config "
            f"dict, e.g. {{'name': 'bitdelta', 'bits': 3}}), not a PerTensor, got {edit!r}."
        )
    return edit
