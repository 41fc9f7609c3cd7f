"""DeltaEditModule: a post-trained model whose edited tensors read ``W_pre + ΔW + t·E = W_post + t·E``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_delta.attach import attach_edit
from lightning_delta.editing import Edit, check_edit
from lightning_delta.gradients import gradients_at_post
from lightning_delta.handle import EditHandle
from lightning_delta.losses import CausalLMLoss, ClassificationLoss, DeltaLoss, DPOLoss, LossOutput, build_loss
from lightning_delta.metrics import RatioOfSums
from lightning_delta.parametrize import check_E_dtype
from lightning_delta.sharded import check_strategy, shard_model, sharded_parameters
from lightning_delta.sources import SavesPretrained, load_model

__all__ = ["DeltaEditModule"]

# (model, batch) -> (correct, total); an evaluator that reads each answer in several ways (GSM8KEvaluator's lm-eval
# protocols: strict-match and flexible-extract) names them in `accuracy_names` and returns {name: (correct, total)}
Evaluator = Callable[[nn.Module, Any], tuple[Tensor, Tensor] | Mapping[str, tuple[Tensor, Tensor]]]


def check_accuracy(accuracy: Any) -> float | None:
    """``accuracy`` checked: ``None`` or a number in [0, 1] (as a float), else ValueError naming it."""
    if accuracy is None:
        return None
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0.0 <= accuracy <= 1.0:
        raise ValueError(
            f"accuracy_post must be None or the accuracy at t = 0 measured before, a number in [0, 1]; got "
            f"{accuracy!r}. Leave it out to measure it."
        )
    return float(accuracy)


def check_batch(batch: Any, loss: DeltaLoss) -> Any:
    """Refuse a batch the library's losses cannot read: they take a mapping of model inputs (``input_ids``,
    ``labels``, ``pixel_values``), classification also an ``(inputs, targets)`` pair. A loss of the user's own reads
    what it likes."""
    if isinstance(batch, Mapping) or not isinstance(loss, (CausalLMLoss, ClassificationLoss, DPOLoss)):
        return batch
    classification = isinstance(loss, ClassificationLoss)
    if classification and isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch
    pairs = " (or an (inputs, targets) pair)" if classification else ""
    raise ValueError(
        f"DeltaEditModule's {type(loss).__name__} reads each batch as a mapping of model inputs (e.g. input_ids, "
        f"attention_mask, labels){pairs}, got a {type(batch).__name__}. Give a DataLoader whose collate function "
        "returns a dict (the lightning_delta DataModules do), or use RiemannCallback(pretrained=..., edit=...) on "
        "your own LightningModule, whose training_step reads the batch."
    )


class DeltaEditModule(pl.LightningModule):
    """The post-trained model with an edit applied as the parametrization ``W_post + t·E``, ``E = F(ΔW) − ΔW``.

    ``t = 0`` is the post-trained model, ``t = 1`` the edited one ``W_pre + F(ΔW)``. The edit is built on the
    model's own device at validation start, one tensor at a time (W_pre is read memory-mapped).

    Args:
        model: the post-trained model (W_post): a module, local directory or hub id.
        pretrained: the pre-trained weights (W_pre): a module, state dict, local directory or hub id.
        edit: an operation of :mod:`lightning_delta.edits`, or a mapping from tensor names to ``E`` tensors.
        loss: ``"causal_lm"``, ``"classification"``, ``"dpo"``, or a :class:`~lightning_delta.losses.DeltaLoss`.
        include, exclude: regular expressions on tensor names choosing the edited tensors.
        evaluator: ``(model, batch) -> (correct, total)``; accuracy is logged at ``t = 0`` (``accuracy/post``) and
            ``t = 1`` (``accuracy/edit``). Default: the loss's own ``evaluator`` if it has one (top-1 for
            classification, DPO's reward accuracy); under a Riemann sweep its count then comes from the sweep's own
            forwards at t = 0 and t = 1 (``LossOutput.correct``), with no forward of its own.
        dtype: dtype for models loaded from a path.
        E_dtype: how ``E`` is kept: ``"float32"`` (default; float64 for float64 models) or ``"model"``, each
            tensor's own dtype, which halves E's memory for bf16 models (an 8B model: 16 GB instead of 32 GB) at
            the cost measured in the README's Precision section; or ``"on_the_fly"``: no ``E`` is kept, each is
            made again from W_pre (memory-mapped) and the edit wherever it is needed, the numbers of ``"float32"``
            bit for bit (:func:`~lightning_delta.attach.attach_edit` says what it costs and where it applies).
        accuracy_post: the accuracy at t = 0 when already measured on this model and data, e.g. by an earlier
            sweep point: the evaluator then runs at t = 1 only.

    Example::

        module = DeltaEditModule("meta-llama/Meta-Llama-3-8B-Instruct", pretrained="meta-llama/Meta-Llama-3-8B",
                                 edit=DARE(p=0.9))
        Trainer(inference_mode=False, callbacks=[RiemannCallback()]).validate(module, datamodule=GSM8KDataModule(...))
    """

    def __init__(
        self,
        model: nn.Module | str,
        *,
        pretrained: nn.Module | Mapping[str, Tensor] | str | None,
        edit: Edit,
        loss: str | DeltaLoss = "causal_lm",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        evaluator: Evaluator | None = None,
        dtype: str | torch.dtype | None = None,
        E_dtype: str = "float32",  # noqa: N803 (the paper's name)
        accuracy_post: float | None = None,
    ) -> None:
        super().__init__()
        check_edit(edit)
        self.E_dtype = check_E_dtype(E_dtype)
        self._accuracy_post_given = check_accuracy(accuracy_post)  # the constructor's accuracy_post, checked
        self._swept = False  # between begin_sweep and end_sweep: the sweep measures the loss
        self.model = load_model(model, dtype, "AutoModelForCausalLM")
        self._pretrained = [pretrained]  # a list keeps a module out of this module's children and checkpoint
        self.edit = edit
        self.loss = self._resolve_loss(loss, pretrained, dtype)
        self.include, self.exclude = include, exclude
        self.evaluator = evaluator if evaluator is not None else getattr(self.loss, "evaluator", None)
        self._accuracy_from_loss = evaluator is None and self.loss.counts_correct
        self.loss_post, self.loss_edit = RatioOfSums(), RatioOfSums()
        self.accuracy_post, self.accuracy_edit = RatioOfSums(), RatioOfSums()
        names = tuple(getattr(self.evaluator, "accuracy_names", ()))
        self.named_accuracies = nn.ModuleDict(
            {f"{when}:{name}": RatioOfSums() for name in names for when in ("post", "edit")}
        )
        self._edited: EditHandle | None = None

    @staticmethod
    def _resolve_loss(loss: str | DeltaLoss, pretrained: Any, dtype: Any) -> DeltaLoss:
        if isinstance(loss, DeltaLoss):
            return loss
        if loss == "dpo":
            reference = load_model(pretrained, dtype, "AutoModelForCausalLM", argument="pretrained")
            return build_loss("dpo", reference=reference)
        return build_loss(loss)

    @property
    def pretrained(self) -> Any:
        return self._pretrained[0]

    def edited_model(self, trainer: pl.Trainer | None = None) -> EditHandle:
        """Build ``E`` (once) on the model's device and register ``W_post + t·E``; return the handle."""
        if self._edited is None:
            gradients = None
            if getattr(self.edit, "needs_gradients", False):
                if trainer is None:
                    raise ValueError(f"{type(self.edit).__name__} needs gradients at W_post: attach under a Trainer.")
                gradients = gradients_at_post(trainer, self, self.model)
            self._edited = attach_edit(
                self.model,
                pretrained=self.pretrained,
                edit=self.edit,
                include=self.include,
                exclude=self.exclude,
                gradients=gradients,
                E_dtype=self.E_dtype,
            )
        return self._edited

    def set_t(self, t: float) -> None:
        self.edited_model().set_t(t)

    def riemann_prepare(self, batch: Any) -> Any:
        return self.loss.prepare(check_batch(batch, self.loss))

    def riemann_loss(self, batch: Any, batch_idx: int = 0) -> LossOutput:
        """The loss at the current ``t``; during a sweep, at t = 0 and t = 1, its ``correct`` count is also the
        accuracy there when the evaluator is the loss's own (every rule runs each batch once at both)."""
        output = self.loss(self.model, batch)
        if self._swept and self._accuracy_from_loss:
            t = self.edited_model().t
            if t == 1.0:
                self.accuracy_edit.update(self._loss_correct(output), output.count)
            elif t == 0.0 and self._accuracy_post_given is None:
                self.accuracy_post.update(self._loss_correct(output), output.count)
        return output

    def _loss_correct(self, output: LossOutput) -> Tensor:
        if output.correct is None:
            raise ValueError(
                f"{type(self.loss).__name__} sets counts_correct but its forward returned no `correct`: return "
                "LossOutput(total, count, correct), or set counts_correct = False."
            )
        return output.correct

    def setup(self, stage: str) -> None:
        """Refuse ``FSDPStrategy`` (FSDP1) with an error that names ``ModelParallelStrategy``."""
        check_strategy(self.trainer.strategy)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``: shard the model with FSDP2 over the data-parallel processes
        (:func:`~lightning_delta.sharded.shard_model`), unless it is sharded already."""
        if self.device_mesh is not None and not sharded_parameters(self.model):
            shard_model(self.model, self.device_mesh)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def on_validation_start(self) -> None:
        self.edited_model(self.trainer)

    def riemann_accuracy(self) -> tuple[float, float] | None:
        """Accuracy at t = 0 and t = 1 over the validation set (all processes), or ``None`` without an evaluator;
        at t = 0 the ``accuracy_post`` given to the constructor, if any."""
        if self.evaluator is None or not self.accuracy_edit.update_called:
            return None
        given = self._accuracy_post_given
        return float(self.accuracy_post.compute()) if given is None else given, float(self.accuracy_edit.compute())

    def begin_sweep(self) -> None:
        """A sweep measures the loss at every t until :meth:`end_sweep`: :meth:`validation_step` then measures the
        accuracy only, and nothing when the loss's own forwards at t = 0 and t = 1 count it
        (:meth:`riemann_loss`)."""
        self._swept = True

    def end_sweep(self) -> None:
        """The sweep is over: :meth:`validation_step` measures the loss at t = 0 and t = 1 again. The edit stays
        attached: it is the module's own (see :meth:`materialize`, :meth:`drop_edit`)."""
        self._swept = False

    def drop_edit(self) -> None:
        """Remove the attached edit (its E and parametrizations): the model holds W_post again, as loaded, ready
        for a module with another edit."""
        if self._edited is not None:
            self._edited.remove()
            self._edited = None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accuracy at t = 0 and t = 1, and the loss there unless a sweep measures it (:meth:`begin_sweep`)."""
        check_batch(batch, self.loss)
        edited = self.edited_model(self.trainer)
        measure_loss = not self._swept
        prepared = self.riemann_prepare(batch) if measure_loss else batch
        from_loss = self._accuracy_from_loss  # the loss's forward counts what its evaluator would
        for t, loss_metric, accuracy_metric in (
            (0.0, self.loss_post, self.accuracy_post),
            (1.0, self.loss_edit, self.accuracy_edit),
        ):
            wanted = self.evaluator is not None and (t == 1.0 or self._accuracy_post_given is None)
            evaluate = wanted and not from_loss  # else the loss's forward counts it, here or in the sweep
            if not (measure_loss or evaluate):
                continue
            edited.set_t(t)
            with torch.no_grad(), parametrize.cached():
                if measure_loss:
                    output = self.loss(self.model, prepared)
                    loss_metric.update(output.total, output.count)
                    if wanted and from_loss:
                        accuracy_metric.update(self._loss_correct(output), output.count)
                if evaluate:
                    accuracy_metric.update(*self.count_correct(batch, "post" if t == 0.0 else "edit"))
        edited.set_t(0.0)
        if measure_loss:
            self.log("loss/post", self.loss_post, batch_size=1)
            self.log("loss/edit", self.loss_edit, batch_size=1)
        if self.evaluator is not None:
            given = self._accuracy_post_given
            self.log("accuracy/post", self.accuracy_post if given is None else given, batch_size=1)
            self.log("accuracy/edit", self.accuracy_edit, batch_size=1)
            for key in self.named_accuracies:
                when, name = key.split(":", 1)
                if when == "edit" or given is None:
                    self.log(f"accuracy/{when}/{name}", self._named_accuracy(key), batch_size=1)

    def count_correct(self, batch: Any, when: str) -> tuple[Tensor, Tensor]:
        """The evaluator's ``(correct, total)`` on ``batch``; for an evaluator with ``accuracy_names``, each name's
        counts go to its own metric (logged as ``accuracy/<post|edit>/<name>``) and the first name's are returned."""
        assert self.evaluator is not None, "the accuracy is counted only with an evaluator"
        counts = self.evaluator(self.model, batch)
        if not isinstance(counts, Mapping):
            return counts
        for name, pair in counts.items():
            self._named_accuracy(f"{when}:{name}").update(*pair)
        return next(iter(counts.values()))

    def _named_accuracy(self, key: str) -> RatioOfSums:
        """The metric of ``named_accuracies[key]`` (``"<post|edit>:<name>"``)."""
        return cast(RatioOfSums, self.named_accuracies[key])  # the ModuleDict holds RatioOfSums only

    def materialize(self, t: float = 1.0) -> nn.Module:
        """The model with ``W_post + t·E`` written into plain weights (ready for ``save_pretrained``)."""
        model = self.edited_model(None).materialize(t)
        self._edited = None
        return model

    def save_pretrained(self, directory: str, t: float = 1.0, **kwargs: Any) -> None:
        """Materialise at ``t`` and save with Hugging Face's ``save_pretrained`` (safetensors)."""
        cast(SavesPretrained, self.materialize(t)).save_pretrained(directory, **kwargs)  # as from_pretrained gave it
