"""The DPO loss for preference pairs (EXPO, paper §6), ``"dpo"`` in :data:`lightning_delta.losses.LOSSES`.

For a prompt x with chosen answer y_w and rejected answer y_l, with π the edited model and π_ref the reference:

    ℓ(x, y_w, y_l) = −log σ(β [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

summed over the pairs of a batch (``count`` = pairs). log π(y|x) is the sum of the answer tokens' log-probabilities.
The reference log-probabilities do not depend on t: :meth:`DPOLoss.prepare` computes them once per batch under
``no_grad`` and the Riemann points reuse them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_delta.losses.base import IGNORE_INDEX, DeltaLoss, LossOutput, at_least_float32, model_logits
from lightning_delta.sources import load_model

__all__ = ["DPOLoss", "sequence_log_probs"]

REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


def sequence_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
    """Σ_i log p(y_i | y_<i) over the positions where ``labels != -100``, per row, as float64 (B,).

    Log-softmax runs in float32 (float64 for a float64 model); the per-token values are summed in float64.

    Shapes: ``input_ids``, ``attention_mask``, ``labels`` (B, T).
    """
    logits = at_least_float32(
        model_logits(model(input_ids=input_ids, attention_mask=attention_mask))[:, :-1]
    )  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    picked = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked.to(torch.float64) * mask).sum(dim=-1)


class DPOLoss(DeltaLoss):
    """Direct Preference Optimization loss, summed over pairs.

    Batch: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_attention_mask``, ``rejected_labels``, all (B, T) with prompt and padding labels ``-100`` (what
    :class:`~lightning_delta.datamodules.UltraFeedbackDataModule` gives). Chosen and rejected go through the model in
    one forward pass of 2B rows.

    Args:
        reference: the reference policy π_ref (the SFT model for Zephyr): a module, or a local directory or hub id
            loaded as ``AutoModelForCausalLM`` (:func:`~lightning_delta.sources.load_model`). It is frozen and kept
            in eval mode.
        beta: the DPO temperature β > 0.
        dtype: dtype for a reference loaded from a path.

    Raises:
        ValueError: ``beta`` <= 0, a ``reference`` that is not a module, directory or hub id, or a batch without the
            chosen/rejected keys.
    """

    def __init__(self, reference: Any, beta: float = 0.1, dtype: Any = None) -> None:
        super().__init__()
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or beta <= 0:
            raise ValueError(f"`beta` must be a positive number (DPO uses 0.1), got {beta!r}.")
        reference = load_model(reference, dtype, "AutoModelForCausalLM", argument="reference")
        self.reference = reference.eval().requires_grad_(False)
        self.beta = float(beta)
        self._cache: tuple[Tensor, Tensor] | None = None  # (the batch's chosen_input_ids, reference log-probs)

    def train(self, mode: bool = True) -> DPOLoss:
        super().train(mode)
        self.reference.eval()  # the reference never drops out
        return self

    @staticmethod
    def _pair(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        try:
            chosen = [batch[f"chosen_{key}"] for key in ("input_ids", "attention_mask", "labels")]
            rejected = [batch[f"rejected_{key}"] for key in ("input_ids", "attention_mask", "labels")]
        except (KeyError, TypeError):
            keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(
                "DPOLoss needs chosen_/rejected_ input_ids, attention_mask and labels in the batch (as "
                f"UltraFeedbackDataModule gives); got {keys}."
            ) from None
        length = max(chosen[0].shape[1], rejected[0].shape[1])
        fills = (0, 0, IGNORE_INDEX)
        stacked = [
            torch.cat([F.pad(c, (0, length - c.shape[1]), value=fill), F.pad(r, (0, length - r.shape[1]), value=fill)])
            for c, r, fill in zip(chosen, rejected, fills)
        ]
        return stacked[0], stacked[1], stacked[2]  # each (2B, T): chosen rows first

    def policy_log_probs(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        """``(log π(y_w|x), log π(y_l|x))``, each (B,) float64, from one forward pass."""
        logps = sequence_log_probs(model, *self._pair(batch))
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]

    def reference_log_probs(self, batch: Any) -> Tensor:
        """(2, B) float64 reference log-probabilities, chosen then rejected, computed once per batch."""
        if isinstance(batch, dict) and REFERENCE_KEYS[0] in batch:
            return torch.stack([batch[REFERENCE_KEYS[0]], batch[REFERENCE_KEYS[1]]])
        key = batch.get("chosen_input_ids") if isinstance(batch, dict) else None
        if self._cache is not None and key is not None and self._cache[0] is key:
            return self._cache[1]  # the evaluator already computed them for this batch
        with torch.no_grad():
            chosen, rejected = self.policy_log_probs(self.reference, batch)
        result = torch.stack([chosen, rejected])
        self._cache = (key, result) if key is not None else None
        return result

    def prepare(self, batch: Any) -> Any:
        """The batch with ``reference_chosen_logps`` and ``reference_rejected_logps`` (B,) added."""
        reference = self.reference_log_probs(batch)
        return {**batch, REFERENCE_KEYS[0]: reference[0], REFERENCE_KEYS[1]: reference[1]}

    def rewards(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        """Implicit rewards ``β (log π(y|x) − log π_ref(y|x))`` of chosen and rejected answers, each (B,)."""
        reference = self.reference_log_probs(batch)
        chosen, rejected = self.policy_log_probs(model, batch)
        return self.beta * (chosen - reference[0]), self.beta * (rejected - reference[1])

    counts_correct = True  # forward's ``correct``: the pairs :meth:`evaluator` counts, from the same rewards

    def forward(self, model: nn.Module, batch: Any) -> LossOutput:
        chosen, rejected = self.rewards(model, batch)
        per_pair = -F.logsigmoid(chosen - rejected)  # (B,) float64
        return LossOutput(
            per_pair.sum(),
            torch.tensor(float(per_pair.numel()), dtype=torch.float64, device=per_pair.device),
            (chosen.detach() > rejected.detach()).sum().to(torch.float64),
        )

    def evaluator(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        """Reward accuracy as ``(correct, total)``: pairs whose chosen reward beats the rejected one.

        For ``DeltaEditModule(evaluator=loss.evaluator)``; the reference log-probabilities are shared with
        :meth:`prepare` for the same batch, so the reference still runs once per batch.
        """
        with torch.no_grad():
            chosen, rejected = self.rewards(model, batch)
        correct = (chosen > rejected).sum().to(torch.float64)
        return correct, torch.tensor(float(chosen.numel()), dtype=torch.float64, device=correct.device)
