"""What every loss shares: :class:`LossOutput` ``(total, count, correct)``, the :class:`DeltaLoss` base class, the label that
marks positions out of the loss (:data:`IGNORE_INDEX`) and reading logits off a model's output.

A loss returns :class:`LossOutput` ``(total, count)``: the sum of per-item losses in the batch (differentiable,
float64) and the number of items summed (answer tokens for a language model, examples for a classifier, pairs for
DPO). The Riemann callback adds totals and counts over batches and processes and divides once at the end, so L is the
same for any batch size, split or number of processes (a float32 batch mean instead
moved by 3.5e-5 relative between runs).

A loss whose forward pass also decides which items are right (a classifier's arg-max, DPO's reward order) returns
their number as ``correct`` and sets :attr:`DeltaLoss.counts_correct`: ``DeltaEditModule`` then takes its accuracy at
t = 0 and t = 1 from the sweep's own forwards there instead of running its evaluator's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["IGNORE_INDEX", "DeltaLoss", "LossOutput", "at_least_float32", "model_logits"]

IGNORE_INDEX = -100
"""The label of positions outside the loss (prompt and padding tokens), as in PyTorch's ``cross_entropy`` and Hugging
Face's ``labels``."""


class LossOutput(NamedTuple):
    total: Tensor  # () float64, the sum of per-item losses; carries the graph
    count: Tensor  # type: ignore[assignment]  # () float64, the number of items in ``total`` (hides tuple.count)
    correct: Tensor | None = None  # () float64, the items this forward gets right (the loss's evaluator's count)


class DeltaLoss(nn.Module):
    """Base class: ``forward(model, batch) -> LossOutput``.

    :meth:`prepare` runs once per batch before the points of the Riemann sweep, for work that does not depend on
    ``t`` (the DPO reference log-probabilities); its result is the batch handed to every :meth:`forward`.
    ``counts_correct``: :meth:`forward` returns ``correct``, the count its ``evaluator`` gives for the same batch
    and weights.
    """

    counts_correct: bool = False

    def prepare(self, batch: Any) -> Any:
        return batch

    def forward(self, model: nn.Module, batch: Any) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def at_least_float32(tensor: Tensor) -> Tensor:
    """bf16 and float16 logits upcast to float32 for the softmax; float32 and float64 kept as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def model_logits(output: Any) -> Tensor:
    """The logits of a model's output: the output itself when it is a tensor, else its ``.logits`` or ``["logits"]``."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None:
        raise ValueError(f"The model returned {type(output).__name__} without `logits`; return a tensor or `.logits`.")
    return logits
