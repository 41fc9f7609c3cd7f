"""The next-token loss over answer tokens (GSM8K, the demo pair)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.losses.base import IGNORE_INDEX, DeltaLoss, LossOutput, at_least_float32, model_logits

__all__ = ["CausalLMLoss"]


class CausalLMLoss(DeltaLoss):
    """Next-token cross-entropy over answer tokens: ``L = Σ_answer −log p(y_i | y_<i) / #answer tokens``.

    Batch: a mapping with ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``labels`` (B, T) where prompt and
    padding positions are ``-100``. Logits are upcast to at least float32 and the per-token losses summed in float64;
    Hugging Face's ``labels=`` loss (a float32 batch mean) is not used.
    """

    def forward(self, model: nn.Module, batch: Any) -> LossOutput:
        logits = model_logits(model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")))
        labels = batch["labels"][:, 1:]  # (B, T-1): token i is predicted from positions < i
        per_token = F.cross_entropy(
            at_least_float32(logits[:, :-1].flatten(0, 1)),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        count = (labels != IGNORE_INDEX).sum().to(torch.float64)
        return LossOutput(per_token.sum(dtype=torch.float64), count)
