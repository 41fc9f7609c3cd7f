"""Float64 means summed across processes.

:class:`RatioOfSums`: ``Σ numerator / Σ denominator`` in float64: the metric
:class:`~lightning_delta.module.DeltaEditModule` logs its losses (``Σ per-item loss / #items``) and accuracies
(``Σ correct / Σ total``, from an evaluator ``(model, batch) -> (correct, total)``) with: float64 sums reduced across
processes, divided once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["RatioOfSums"]


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
