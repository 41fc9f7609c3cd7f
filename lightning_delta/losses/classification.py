"""The cross-entropy of a classifier over examples (the eight CLIP image tasks)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_delta.losses.base import DeltaLoss, LossOutput, at_least_float32, model_logits

__all__ = ["ClassificationLoss", "classification_batch"]


def classification_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` from ``(inputs, targets)`` or a mapping with ``pixel_values`` (or ``inputs``) and
    ``labels``."""
    if isinstance(batch, dict):
        return (batch["pixel_values"] if "pixel_values" in batch else batch["inputs"]), batch["labels"]
    return batch[0], batch[1]


class ClassificationLoss(DeltaLoss):
    """Cross-entropy over examples: ``L = Σ_n −log softmax(f(x_n))_{y_n} / N``.

    Batch: ``(inputs, targets)`` or a mapping with ``pixel_values`` (or ``inputs``) and ``labels``. The output's
    ``correct`` is the top-1 count of :meth:`evaluator`, from the same logits.
    """

    counts_correct = True

    def forward(self, model: nn.Module, batch: Any) -> LossOutput:
        inputs, targets = classification_batch(batch)
        logits = model_logits(model(inputs))
        per_example = F.cross_entropy(at_least_float32(logits), targets, reduction="none")
        return LossOutput(
            per_example.sum(dtype=torch.float64),
            torch.tensor(float(targets.numel()), dtype=torch.float64),
            top1_correct(logits.detach(), targets),
        )

    @staticmethod
    def evaluator(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        """Top-1 accuracy as ``(correct, total)``: ``DeltaEditModule``'s default evaluator for this loss."""
        inputs, targets = classification_batch(batch)
        correct = top1_correct(model_logits(model(inputs)), targets)
        return correct, torch.tensor(float(targets.numel()), dtype=torch.float64, device=correct.device)


def top1_correct(logits: Tensor, targets: Tensor) -> Tensor:
    """The examples whose arg-max logit is the target, as a float64 scalar."""
    return (logits.argmax(dim=-1) == targets).sum().to(torch.float64)
