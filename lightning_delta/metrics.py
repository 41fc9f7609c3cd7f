"""Float64 means summed across processes, and the final numbers of GSM8K answers.

- :class:`RatioOfSums`: ``Σ numerator / Σ denominator`` in float64: the metric
  :class:`~lightning_delta.module.DeltaEditModule` logs its losses (``Σ per-item loss / #items``) and accuracies
  (``Σ correct / Σ total``, from an evaluator ``(model, batch) -> (correct, total)``) with: float64 sums
  reduced across processes, divided once.
- GSM8K: :func:`extract_final_number` and :func:`numbers_match` (final numbers of generated and reference answers),
  used by :class:`lightning_delta.datamodules.GSM8KEvaluator`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["RatioOfSums", "extract_final_number", "numbers_match"]

# A number as written in GSM8K answers and model outputs: optional sign (ASCII or Unicode minus), optional "$",
# digits with thousands commas, optional decimals; or a bare decimal such as ".5".
_NUMBER = re.compile(r"[-−]?\s?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
# "the answer is 12", "The final answer is: $42", "answer: 7": the stated answer, before any later number
_STATED = re.compile(r"\banswer\s*(?:is|:)\s*:?\s*(?:\*\*)?\s*(" + _NUMBER.pattern + ")", re.IGNORECASE)


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

    The number after the last ``####`` is taken; without ``####``, the number of the last "the answer is n" (or
    "answer: n"), so that "The answer is 12 (3 x 4)." gives 12; without either, the last number. Thousands commas,
    ``$`` and trailing zeros are dropped, so ``"1,000.50"`` gives ``"1000.5"`` and ``"-3.0"`` gives ``"-3"``.

    Example:
        >>> extract_final_number("She has 48/2 = <<48/2=24>>24 clips.\\n#### 1,024")
        '1024'
        >>> extract_final_number("The loss is $-3.50, so the answer is -3.5.")
        '-3.5'
        >>> extract_final_number("The final answer is 42. It took 2 steps.")
        '42'
        >>> extract_final_number("no number here") is None
        True
    """
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _canonical(found[0])
    stated = _STATED.findall(text)
    if stated:
        return _canonical(stated[-1])
    found = _NUMBER.findall(text)
    return _canonical(found[-1]) if found else None


def numbers_match(prediction: str | None, reference: str | None) -> bool:
    """Exact match of two canonical numbers (``None`` never matches)."""
    if prediction is None or reference is None:
        return False
    return Decimal(prediction) == Decimal(reference)


class RatioOfSums(Metric):
    """``Σ numerator / Σ denominator`` over every update, as float64 sums added across processes.

    The loss over an evaluation set is ``Σ per-item loss / #items`` (``update(total, count)`` with a
    :class:`~lightning_delta.losses.LossOutput`); an accuracy is ``Σ correct / Σ total``. Both states are declared
    with ``dist_reduce_fx="sum"``, so processes add their sums and ``compute`` divides once: the result does not
    depend on the batch size, the split or the number of processes.

    torchmetrics' ``MeanMetric`` (``set_dtype(torch.float64)``) also keeps float64 sums, but takes ``(value, weight)``:
    passing ``numerator / denominator`` weighted by ``denominator`` rounds (``(n / d) * d != n`` for about 8 in 100
    random float64 pairs), and a batch with nothing to count (``d = 0``) is a NaN that it drops with a warning.

    Shapes: ``numerator`` and ``denominator`` are scalars, tensors () or numbers.

    Example:
        >>> metric = RatioOfSums()
        >>> metric.update(torch.tensor(2.5, dtype=torch.float64), torch.tensor(2.0))  # loss 2.5 summed over 2 tokens
        >>> metric.update(0.5, 3)
        >>> metric.compute()
        tensor(0.6000, dtype=torch.float64)
        >>> float(metric.numerator), float(metric.denominator)
        (3.0, 5.0)
    """

    full_state_update = False
    numerator: Tensor
    denominator: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("numerator", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, numerator: Tensor | float, denominator: Tensor | float) -> None:
        self.numerator += torch.as_tensor(numerator).to(self.numerator)
        self.denominator += torch.as_tensor(denominator).to(self.denominator)

    def compute(self) -> Tensor:
        return self.numerator / self.denominator
