"""What the points of a sweep share in one process: W_post, and the accuracy at W_post on each data set."""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_delta.callbacks import RiemannResult
from lightning_delta.cli.parser import PointInputs
from lightning_delta.losses import DeltaLoss
from lightning_delta.module import DeltaEditModule
from lightning_delta.sweep.grid import canonical_json, config_key

__all__ = ["EDIT_ONLY_KEYS", "SweepReuse", "keeps_the_model_as_given"]

# A point's config keys that change E alone: points that differ only there share W_post, the data, the loss and the
# evaluator, so they share the accuracy at t = 0 (with the DPO loss, model.pretrained is its reference: not listed).
EDIT_ONLY_KEYS = ("edit", "model.edit", "model.include", "model.exclude", "model.E_dtype", "riemann")


def keeps_the_model_as_given(strategy: Any) -> bool:
    """Whether ``strategy`` (a ``trainer.strategy`` config value) runs validation on the module as given: one device
    or DDP (not wrapped under validate). Sharded strategies (FSDP, DeepSpeed, model parallel) rewrite its parameters
    in place, so the module cannot serve another point."""
    name = strategy.get("class_path", "") if isinstance(strategy, Mapping) else str(strategy)
    name = name.rsplit(".", 1)[-1].lower()
    return name in ("auto", "single_device", "singledevicestrategy") or name.startswith("ddp")


class SweepReuse:
    """What the points of a sweep share in one process, so that each point builds little more than its own E.

    **W_post.** The post-trained model (and, with the DPO loss, its reference) is loaded at the first point and
    serves every later point with the same ``model.model``, ``model.dtype``, ``model.loss`` (with DPO also
    ``model.pretrained``) and ``trainer`` section; after each point its edit is dropped
    (:meth:`~lightning_delta.DeltaEditModule.drop_edit`), which leaves W_post as loaded. A point with another model
    lets go of the one held before loading its own. A model given as a class_path (built by the parser), or run under a
    strategy that shards it in place (:func:`keeps_the_model_as_given`), is built afresh at every point.

    **The accuracy at t = 0.** Measured at the first point of a data set (its row's ``accuracy_post``) and given to
    every later point whose config differs from it only in :data:`EDIT_ONLY_KEYS` and ``model.pretrained`` (unless
    the loss is DPO): those run their evaluator at t = 1 only
    (:class:`~lightning_delta.cli.parser.PointInputs`). At t = 0 every edited tensor reads
    ``W_post + 0·E``, which is W_post exactly for any finite E, so the accuracy there is one number.

    **The loss at t = 0** is measured at every point: it comes with the gradient at t = 0, which each point needs for
    its own E (the first Riemann point), so it costs nothing extra. Rows equal those of a sweep without reuse in
    every field but the timings ``started`` and ``seconds`` (tests/test_sweep.py, bit for bit, 1 and 2 processes).
    """

    def __init__(self) -> None:
        self._held: str | None = None  # the model key of the model held
        self._model: nn.Module | None = None
        self._loss: DeltaLoss | None = None  # the DPO loss (with its reference model) of the model held
        self._point: str | None = None  # the model key of the point being built (None: it builds its own)
        self._module: DeltaEditModule | None = None  # the point's module, whose edit is dropped when it ends
        self._accuracy_key: str | None = None
        self._accuracies: dict[str, float] = {}  # accuracy key -> accuracy at t = 0

    @staticmethod
    def model_key(config: Mapping[str, Any]) -> str | None:
        """What the W_post of a point's config depends on, as a string (``None``: not shared, see the class)."""
        model, trainer = config.get("model") or {}, config.get("trainer") or {}
        if not isinstance(model.get("model"), str) or not keeps_the_model_as_given(trainer.get("strategy", "auto")):
            return None
        dpo = model.get("loss") == "dpo"
        return canonical_json(
            {
                "model": model["model"],
                "dtype": model.get("dtype"),
                "loss": model.get("loss"),
                "reference": model.get("pretrained") if dpo else None,
                "trainer": trainer,
            }
        )

    @staticmethod
    def accuracy_key(config: Mapping[str, Any]) -> str:
        """The key of a point's config without what changes E alone: equal keys, equal accuracy at t = 0."""
        dpo = (config.get("model") or {}).get("loss") == "dpo"
        return config_key(config, EDIT_ONLY_KEYS + (() if dpo else ("model.pretrained",)))

    def begin(self, config: Mapping[str, Any]) -> PointInputs:
        """Before a point: drop the previous point's edit, let go of a model this point does not share, and return
        what the point takes from earlier ones: the model held (and a DPO loss), when it shares them, and the
        accuracy at t = 0 measured on its data before."""
        self._drop_edit()
        self._point = self.model_key(config)
        if self._point != self._held and self._model is not None:
            self._held, self._model, self._loss = None, None, None
            gc.collect()  # the model's modules hold reference cycles: free it before the next one loads
        self._accuracy_key = self.accuracy_key(config)
        accuracy_post = self._accuracies.get(self._accuracy_key)
        if self._point is None or self._point != self._held:
            return PointInputs(accuracy_post=accuracy_post)
        return PointInputs(model=self._model, loss=self._loss, accuracy_post=accuracy_post)

    def keep(self, module: DeltaEditModule, loss: Any) -> None:
        """The point's module is built: hold its model (and a DPO loss) for the points that share it."""
        self._module = module
        if self._point is not None and self._held is None:
            self._held, self._model = self._point, module.model
            self._loss = module.loss if loss == "dpo" else None

    def end(self, result: RiemannResult | None) -> None:
        """After a point: remember its accuracy at t = 0 for its data set, and drop its edit."""
        if result is not None and result.accuracy_post is not None and self._accuracy_key is not None:
            self._accuracies.setdefault(self._accuracy_key, result.accuracy_post)
        self._drop_edit()

    def _drop_edit(self) -> None:
        if self._module is not None:
            self._module.drop_edit()
            self._module = None
