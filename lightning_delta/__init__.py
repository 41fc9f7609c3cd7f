"""Edit the delta parameters ΔW = W_post − W_pre of post-trained models and measure what an edit does to the loss.

An editing operation F turns the model into ``W_pre + F(ΔW) = W_post + E`` with ``E = F(ΔW) − ΔW``; the loss
change is ``∫₀¹ ⟨∇L(W_post + tE), E⟩ dt``, which :class:`~lightning_delta.callbacks.RiemannCallback` sums at
``t = c/C`` under ``trainer.validate``.
"""

__version__ = "0.1.0"

from lightning_delta import edits, losses_dpo  # noqa: F401  (losses_dpo registers the "dpo" loss)
from lightning_delta.callbacks import RiemannCallback, RiemannResult
from lightning_delta.delta import compute_delta, delta_names, iter_delta
from lightning_delta.export import apply_edit_, save_edited
from lightning_delta.losses import CausalLMLoss, ClassificationLoss, DeltaLoss, LossOutput, build_loss
from lightning_delta.module import DeltaEditModule
from lightning_delta.parametrize import EditedModel

__all__ = [
    "CausalLMLoss",
    "ClassificationLoss",
    "DeltaEditModule",
    "DeltaLoss",
    "EditedModel",
    "LossOutput",
    "RiemannCallback",
    "RiemannResult",
    "apply_edit_",
    "build_loss",
    "compute_delta",
    "delta_names",
    "edits",
    "iter_delta",
    "save_edited",
]
