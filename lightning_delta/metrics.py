"""Accuracy metrics for the three tasks, as float64 counts summed across processes.

Each metric keeps ``correct`` and ``total`` with ``dist_reduce_fx="sum"`` (DESIGN.md §2.6): ``update`` adds,
``compute`` divides once. The matching *evaluators* ``(model, batch) -> (correct, total)`` plug into
:class:`~lightning_delta.module.DeltaEditModule` (``evaluator=``), which logs accuracy at ``t = 0`` and ``t = 1``.

- GSM8K: :func:`extract_final_number` and :class:`ExactMatchAccuracy` (final numbers of generated and reference
  answers); the generating evaluator is :class:`lightning_delta.datamodules.GSM8KEvaluator`.
- Preference pairs: :class:`RewardAccuracy` (the implicit DPO reward of the chosen answer beats the rejected one).
- Image classification: :class:`TopOneAccuracy` and :func:`classification_evaluator`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_delta.losses import ClassificationLoss

__all__ = [
    "CountingAccuracy",
    "ExactMatchAccuracy",
    "RewardAccuracy",
    "TopOneAccuracy",
    "classification_evaluator",
    "extract_final_number",
    "numbers_match",
]

# A number as written in GSM8K answers and model outputs: optional sign (ASCII or Unicode minus), optional "$",
# digits with thousands commas, optional decimals; or a bare decimal such as ".5".
_NUMBER = re.compile(r"[-−]?\s?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _canonical(number: str) -> str | None:
    text = number.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The final answer of a GSM8K-style solution as a canonical number string, or ``None``.

    The number after the last ``####`` is taken; without ``####``, the last number in the text. Thousands commas,
    ``$`` and trailing zeros are dropped, so ``"1,000.50"`` gives ``"1000.5"`` and ``"-3.0"`` gives ``"-3"``.

    Example:
        >>> extract_final_number("She has 48/2 = <<48/2=24>>24 clips.\\n#### 1,024")
        '1024'
        >>> extract_final_number("The loss is $-3.50, so the answer is -3.5.")
        '-3.5'
        >>> extract_final_number("no number here") is None
        True
    """
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _canonical(found[0])
    found = _NUMBER.findall(text)
    return _canonical(found[-1]) if found else None


def numbers_match(prediction: str | None, reference: str | None) -> bool:
    """Exact match of two canonical numbers (``None`` never matches)."""
    if prediction is None or reference is None:
        return False
    return Decimal(prediction) == Decimal(reference)


class CountingAccuracy(Metric):
    """``Σ correct / Σ total`` in float64, summed across processes; ``update(correct, total)`` takes counts."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: Tensor | float, total: Tensor | float) -> None:
        self.correct += torch.as_tensor(correct).to(self.correct)
        self.total += torch.as_tensor(total).to(self.total)

    def compute(self) -> Tensor:
        return self.correct / self.total


class ExactMatchAccuracy(CountingAccuracy):
    """GSM8K accuracy: the final number of each generated answer equals the reference's (:func:`extract_final_number`).

    ``update(predictions, references)`` takes two equal-length sequences of answer texts.

    Example:
        >>> metric = ExactMatchAccuracy()
        >>> metric.update(["so 3 + 4 = 7", "#### 1,000"], ["#### 7", "#### 999"])
        >>> float(metric.compute())
        0.5
    """

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:  # type: ignore[override]
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references.")
        correct = sum(numbers_match(extract_final_number(p), extract_final_number(r))
                      for p, r in zip(predictions, references))
        super().update(float(correct), float(len(references)))


class RewardAccuracy(CountingAccuracy):
    """Preference accuracy: the fraction of pairs whose chosen reward exceeds the rejected one (ties count wrong).

    Shapes: ``chosen_rewards`` and ``rejected_rewards`` (B,).
    """

    def update(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> None:  # type: ignore[override]
        super().update((chosen_rewards > rejected_rewards).sum(), float(chosen_rewards.numel()))


class TopOneAccuracy(CountingAccuracy):
    """Top-1 accuracy from logits (B, K) and integer targets (B,)."""

    def update(self, logits: Tensor, targets: Tensor) -> None:  # type: ignore[override]
        super().update((logits.argmax(dim=-1) == targets).sum(), float(targets.numel()))


classification_evaluator = ClassificationLoss.evaluator
"""``(correct, total)`` of top-1 predictions, for ``DeltaEditModule(evaluator=...)``; the default with
``loss="classification"``."""
