"""Edit the delta parameters ΔW = W_post − W_pre of post-trained models and measure what an edit does to the loss.

An editing operation F turns the model into ``W_pre + F(ΔW) = W_post + E`` with ``E = F(ΔW) − ΔW``; the loss
change is ``∫₀¹ ⟨∇L(W_post + tE), E⟩ dt``, which :class:`~lightning_delta.callbacks.RiemannCallback` sums at
``t = c/C`` under ``trainer.validate``.

Names are imported on first use, so ``import lightning_delta.edits`` does not load Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CausalLMLoss": "lightning_delta.losses",
    "ClassificationLoss": "lightning_delta.losses",
    "DeltaLoss": "lightning_delta.losses",
    "LossOutput": "lightning_delta.losses",
    "build_loss": "lightning_delta.losses",
    "DPOLoss": "lightning_delta.losses",
    "DeltaEditModule": "lightning_delta.module",
    "EditedModel": "lightning_delta.parametrize",
    "RiemannCallback": "lightning_delta.callbacks",
    "RiemannResult": "lightning_delta.callbacks",
    "compute_delta": "lightning_delta.delta",
    "delta_names": "lightning_delta.delta",
    "iter_delta": "lightning_delta.delta",
    "apply_edit_": "lightning_delta.export",
    "save_edited": "lightning_delta.export",
    "Plan": "lightning_delta.planning.plan",
    "plan_edit": "lightning_delta.planning.plan",
}
_SUBMODULES = ("callbacks", "datamodules", "edits")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"lightning_delta.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_delta' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # the names for type checkers; `as` marks each as re-exported
    from lightning_delta import callbacks as callbacks
    from lightning_delta import datamodules as datamodules
    from lightning_delta import edits as edits
    from lightning_delta.callbacks import RiemannCallback as RiemannCallback
    from lightning_delta.callbacks import RiemannResult as RiemannResult
    from lightning_delta.delta import compute_delta as compute_delta
    from lightning_delta.delta import delta_names as delta_names
    from lightning_delta.delta import iter_delta as iter_delta
    from lightning_delta.export import apply_edit_ as apply_edit_
    from lightning_delta.export import save_edited as save_edited
    from lightning_delta.losses import CausalLMLoss as CausalLMLoss
    from lightning_delta.losses import ClassificationLoss as ClassificationLoss
    from lightning_delta.losses import DeltaLoss as DeltaLoss
    from lightning_delta.losses import DPOLoss as DPOLoss
    from lightning_delta.losses import LossOutput as LossOutput
    from lightning_delta.losses import build_loss as build_loss
    from lightning_delta.module import DeltaEditModule as DeltaEditModule
    from lightning_delta.parametrize import EditedModel as EditedModel
    from lightning_delta.planning.plan import Plan as Plan
    from lightning_delta.planning.plan import plan_edit as plan_edit
