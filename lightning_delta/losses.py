"""Losses as sums over items, so that L is the mean over a whole evaluation set.

A loss returns :class:`LossOutput` ``(total, count)``: the sum of per-item losses in the batch (differentiable,
float64) and the number of items summed (answer tokens for a language model, examples for a classifier). The
Riemann callback adds totals and counts over batches and processes and divides once at the end, so L is the same
for any batch size, split or number of processes (DESIGN.md §2.6).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LossOutput", "DeltaLoss", "CausalLMLoss", "ClassificationLoss", "build_loss", "available_losses"]

IGNORE_INDEX = -100


class LossOutput(NamedTuple):
    total: Tensor  # () float64, the sum of per-item losses; carries the graph
    count: Tensor  # () float64, the number of items in ``total``


class DeltaLoss(nn.Module):
    """Base class: ``forward(model, batch) -> LossOutput``.

    :meth:`prepare` runs once per batch before the points of the Riemann sweep, for work that does not depend on
    ``t`` (the DPO reference log-probabilities); its result is the batch handed to every :meth:`forward`.
    """

    def prepare(self, batch: Any) -> Any:
        return batch

    def forward(self, model: nn.Module, batch: Any) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def at_least_float32(tensor: Tensor) -> Tensor:
    """bf16 and float16 logits upcast to float32 for the softmax; float32 and float64 kept as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None:
        raise ValueError(f"The model returned {type(output).__name__} without `logits`; return a tensor or `.logits`.")
    return logits


class CausalLMLoss(DeltaLoss):
    """Next-token cross-entropy over answer tokens: ``L = Σ_answer −log p(y_i | y_<i) / #answer tokens``.

    Batch: a mapping with ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``labels`` (B, T) where prompt and
    padding positions are ``-100``. Logits are upcast to at least float32 and the per-token losses summed in float64;
    Hugging Face's ``labels=`` loss (a float32 batch mean) is not used.
    """

    def forward(self, model: nn.Module, batch: Any) -> LossOutput:
        logits = _logits(model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")))
        labels = batch["labels"][:, 1:]  # (B, T-1): token i is predicted from positions < i
        per_token = F.cross_entropy(
            at_least_float32(logits[:, :-1].flatten(0, 1)), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )
        count = (labels != IGNORE_INDEX).sum().to(torch.float64)
        return LossOutput(per_token.sum(dtype=torch.float64), count)


def classification_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` from ``(inputs, targets)`` or a mapping with ``pixel_values`` (or ``inputs``) and
    ``labels``."""
    if isinstance(batch, dict):
        return (batch["pixel_values"] if "pixel_values" in batch else batch["inputs"]), batch["labels"]
    return batch[0], batch[1]


class ClassificationLoss(DeltaLoss):
    """Cross-entropy over examples: ``L = Σ_n −log softmax(f(x_n))_{y_n} / N``.

    Batch: ``(inputs, targets)`` or a mapping with ``pixel_values`` (or ``inputs``) and ``labels``.
    """

    def forward(self, model: nn.Module, batch: Any) -> LossOutput:
        inputs, targets = classification_batch(batch)
        logits = _logits(model(inputs))
        per_example = F.cross_entropy(at_least_float32(logits), targets, reduction="none")
        return LossOutput(per_example.sum(dtype=torch.float64), torch.tensor(float(targets.numel()), dtype=torch.float64))

    @staticmethod
    def evaluator(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        """Top-1 accuracy as ``(correct, total)``: ``DeltaEditModule``'s default evaluator for this loss."""
        inputs, targets = classification_batch(batch)
        correct = (_logits(model(inputs)).argmax(dim=-1) == targets).sum().to(torch.float64)
        return correct, torch.tensor(float(targets.numel()), dtype=torch.float64, device=correct.device)


_LOSSES: dict[str, type[DeltaLoss]] = {"causal_lm": CausalLMLoss, "classification": ClassificationLoss}


def register_loss(name: str, cls: type[DeltaLoss]) -> None:
    _LOSSES[name] = cls


def available_losses() -> list[str]:
    import lightning_delta.losses_dpo  # noqa: F401

    return sorted(_LOSSES)


def build_loss(name: str, **kwargs: Any) -> DeltaLoss:
    """Loss by name; an unknown name raises with the known ones."""
    import lightning_delta.losses_dpo  # noqa: F401  (registers "dpo"; imported here, as it imports this module)

    if name not in _LOSSES:
        raise ValueError(f"Unknown loss {name!r}; choose one of {available_losses()} or pass a DeltaLoss instance.")
    return _LOSSES[name](**kwargs)
