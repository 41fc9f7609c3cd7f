"""Losses as sums over items, so that L is the mean over a whole evaluation set; all by name in :data:`LOSSES`.

Each loss returns :class:`LossOutput` ``(total, count)`` (see :mod:`lightning_delta.losses.base`):

- ``"causal_lm"``: :class:`CausalLMLoss`, next-token cross-entropy over answer tokens (GSM8K);
- ``"classification"``: :class:`ClassificationLoss`, cross-entropy over examples (the CLIP image tasks);
- ``"dpo"``: :class:`DPOLoss`, the DPO loss over preference pairs (UltraFeedback, EXPO).

Example:
    >>> build_loss("causal_lm")
    CausalLMLoss()
    >>> build_loss("mse")
    Traceback (most recent call last):
    ...
    ValueError: Unknown loss 'mse'; choose one of ['causal_lm', 'classification', 'dpo'] or pass a DeltaLoss instance.
"""

from __future__ import annotations

from typing import Any

from lightning_delta.losses.base import IGNORE_INDEX, DeltaLoss, LossOutput
from lightning_delta.losses.causal_lm import CausalLMLoss
from lightning_delta.losses.classification import ClassificationLoss
from lightning_delta.losses.dpo import DPOLoss

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "CausalLMLoss",
    "ClassificationLoss",
    "DPOLoss",
    "DeltaLoss",
    "LossOutput",
    "available_losses",
    "build_loss",
]

LOSSES: dict[str, type[DeltaLoss]] = {
    "causal_lm": CausalLMLoss,
    "classification": ClassificationLoss,
    "dpo": DPOLoss,
}
"""Every loss of the library by the name ``build_loss``, ``DeltaEditModule(loss=...)`` and the configs use."""


def available_losses() -> list[str]:
    """The names :func:`build_loss` knows, sorted."""
    return sorted(LOSSES)


def build_loss(name: str, **kwargs: Any) -> DeltaLoss:
    """The loss ``name`` of :data:`LOSSES`, built with ``kwargs``.

    Raises:
        ValueError: for a name that is not in :data:`LOSSES`, listing the known ones.
    """
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; choose one of {available_losses()} or pass a DeltaLoss instance.")
    return LOSSES[name](**kwargs)
