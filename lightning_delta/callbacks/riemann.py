"""RiemannCallback: the paper's approximation term ⟨∇L(W_post + tE), E⟩ integrated over t under ``trainer.validate``.

For every batch, and for each point t_j of the rule (t = c/C, c = 0 … C, for the paper's left rule), the callback puts
every edited tensor at ``W_post + t_j·E``, runs forward and, at the rule's nodes, backward, and adds
``∂(Σ loss)/∂t_k = ⟨∇_{W_k} Σ loss, E_k⟩`` per tensor into float64 sums (the data is read once; the adaptive rule
reads it again for each level it adds). At the end the sums are reduced across processes (torchmetrics) and divided
by the global number of items:

    term      = (1/C) Σ_{c=0}^{C−1} ⟨∇L(W_post + (c/C)E), E⟩          (paper eq. 1, left rule; the default)
    term      = Σ_i w_i ⟨∇L(W_post + t_i E), E⟩                        (rule="gauss": Gauss–Legendre on [0, 1])
    trapezoid = (1/C) [½ g_0 + Σ_{c=1}^{C−1} g_c + ½ g_C]
    exact     = L(W_post + E) − L(W_post)

The rules, their points and weights: :mod:`lightning_delta.callbacks.quadrature`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sized
from pathlib import Path
from types import MethodType
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler
from typing_extensions import override

from lightning_delta.callbacks.quadrature import Schedule, adaptive_levels, check_rule, patterson_chain, schedule
from lightning_delta.callbacks.result import RiemannResult, RiemannSums
from lightning_delta.editing import Edit
from lightning_delta.edits import DeltaEdit
from lightning_delta.handle import EditHandle
from lightning_delta.losses import LossOutput
from lightning_delta.parametrize import check_E_dtype
from lightning_delta.sharded import check_strategy, sharded_parameters
from lightning_delta.targets import EditTarget, ModuleTarget, edited_submodule

__all__ = ["RiemannCallback"]


class RiemannCallback(Callback):
    r"""Sweeps t over [0, 1] (``t = c/C`` by default) and reports the Riemann term beside the exact loss change.

    Works on a :class:`~lightning_delta.DeltaEditModule`, or on any LightningModule given ``pretrained`` and
    ``edit``: the loss is then the module's ``training_step`` output (a batch mean, weighted by the batch size).

    Results go to ``trainer.callback_metrics`` (``riemann/term``, ``riemann/trapezoid``, ``riemann/exact``,
    ``riemann/loss_post``, ``riemann/loss_edit``, ``riemann/group/<group>``), to :attr:`result` on every rank,
    to the trainer's loggers and to ``<log_dir>/<filename>`` (JSON, per-tensor terms included).

    Args:
        num_points: C, the number of subdivisions of [0, 1] (the paper uses 5), or n, the Gauss nodes; ``None``:
            the rule's own (5; 3 for ``"gauss"``; 31, the most it may use, for ``"adaptive"``: one of 3, 7, 15, 31).
        trapezoid: with the left rule, also run backward at t = 1 for the trapezoid estimate (one more backward per
            batch); ``None``: true for the left rule (the default, as before the rules), the rule's own otherwise.
            ``rule="trapezoid"`` takes the trapezoid as its term; ``"gauss"`` and ``"adaptive"`` refuse ``True``.
        rule: the quadrature of ∫₀¹ ⟨∇L(W_post + tE), E⟩ dt: ``"left"`` (the paper's, eq. 1: C backward passes),
            ``"trapezoid"`` (C + 1), ``"gauss"`` (Gauss–Legendre, n passes, exact for polynomials of degree
            2n − 1), ``"adaptive"`` (nested Gauss–Kronrod–Patterson rules of 3, 7, 15, 31 nodes until the per-tensor
            error estimate is below ``tolerance`` × the largest |per-tensor term|; it reads the data once per level).
            Every rule also runs forwards at t = 0 and t = 1 for the exact ΔL; only nodes at t = 1 add a backward
            there. ``python -m benchmarks.quadrature`` measures the error against the passes.
        tolerance: the adaptive rule's target, relative to the largest |per-tensor term|.
        pretrained: W_pre, for a module that is not a ``DeltaEditModule`` (module, state dict, directory, hub id).
        edit: the editing operation (or a mapping of ready-made ``E`` tensors), with ``pretrained``.
        module_name: the submodule of the LightningModule whose tensor names match ``pretrained`` (``""``: the
            LightningModule itself).
        include: regular expressions selecting the edited tensors; ``exclude``: the ones to leave alone.
        E_dtype: with ``pretrained`` and ``edit``: how ``E`` is kept, ``"float32"``, ``"model"`` (each tensor's
            own dtype; see :class:`~lightning_delta.parametrize.EditedModel`) or ``"on_the_fly"`` (not kept: made
            again from W_pre and the edit wherever needed; see :func:`~lightning_delta.attach.attach_edit`). A
            DeltaEditModule has its own.
        recompute_weights: rebuild each ``W(t)`` in backward (default) instead of keeping it from the forward pass,
            which holds one more copy of the edited weights through backward. ``None`` keeps ``W(t)`` when the
            device's free memory at validation start exceeds twice the edited weights' size. Keeping it did not
            save time measurably (``python -m benchmarks.overhead_points``: a point 1.093× against 1.118× plain
            in one run, 1.152× against 1.108× in another).
        filename: the JSON file written in the trainer's log directory (``None``: none); without a logger, in its
            ``default_root_dir``, as ``<stem>-v1.json``, ``-v2``, … when the name is taken (nothing is overwritten).

    Raises:
        ValueError: ``num_points`` < 1, an unknown ``rule``, ``trapezoid`` that contradicts it, ``tolerance`` <= 0,
            ``edit`` without ``pretrained`` or the reverse.
        RuntimeError: in ``setup``, when the trainer runs validation under inference mode, and at validation start
            when a distributed sampler would repeat samples.

    Example::

        trainer = Trainer(inference_mode=False, callbacks=[RiemannCallback(num_points=5)])
        trainer.validate(DeltaEditModule(post, pretrained=pre, edit=DARE(p=0.9)), datamodule=dm)
        trainer.callback_metrics["riemann/term"]

        RiemannCallback(rule="gauss", num_points=3)  # 3 backward passes, per-tensor terms to about 1e-3
    """

    def __init__(
        self,
        num_points: int | None = None,
        trapezoid: bool | None = None,
        rule: str = "left",
        tolerance: float = 1e-3,
        pretrained: nn.Module | Mapping[str, Tensor] | str | None = None,
        edit: Edit | None = None,
        module_name: str = "",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        filename: str | None = "riemann.json",
        loss_fn: Callable[[pl.LightningModule, Any, int], LossOutput] | None = None,
        E_dtype: str = "float32",  # noqa: N803 (the paper's name)
        recompute_weights: bool | None = True,
    ) -> None:
        num_points, trapezoid = check_rule(rule, num_points, trapezoid, tolerance)
        if (pretrained is None) != (edit is None):
            raise ValueError("Pass `pretrained` and `edit` together (or neither, with a DeltaEditModule).")
        self.num_points = num_points
        self.trapezoid = trapezoid
        self.rule = rule
        self.tolerance = tolerance
        self.schedule: Schedule = schedule(rule, num_points, trapezoid)
        self.pretrained = pretrained
        self.edit = edit
        self.module_name = module_name
        self.include = include
        self.exclude = exclude
        self.filename = filename
        self.loss_fn = loss_fn
        self.E_dtype = check_E_dtype(E_dtype)
        if recompute_weights not in (None, True, False):
            raise ValueError(
                f"`recompute_weights` must be True, False or None (decide from free memory), got {recompute_weights!r}."
            )
        self.recompute_weights = recompute_weights
        self._recompute = True
        self.result: RiemannResult | None = None
        self._target: EditTarget | None = None
        self._edited: EditHandle | None = None
        self._sums: RiemannSums | None = None
        self._evaluated = True  # set False in setup and True once validation starts

    # ----------------------------------------------------------------------------------------------- checks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        loop = trainer.validate_loop if stage == "validate" else trainer.fit_loop.epoch_loop.val_loop
        if stage in ("validate", "fit") and loop.inference_mode:
            raise RuntimeError(
                "RiemannCallback needs gradients during validation, but the Trainer runs it under "
                "torch.inference_mode. Create the Trainer with `Trainer(inference_mode=False, ...)`."
            )
        if self.edit is None:
            own_target(pl_module)
        else:
            edited_submodule(pl_module, self.module_name)  # a module_name it does not have is named now
        self._evaluated = False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a validation that evaluated no batch (an empty DataLoader, ``limit_val_batches=0``): Lightning
        then skips every validation hook, and there would be no result at all."""
        if stage == "validate" and not self._evaluated:
            raise ValueError(
                "RiemannCallback evaluated no validation batch, so there is no term, trapezoid or ΔL: the validation "
                "DataLoader is empty, or the Trainer's limit_val_batches is 0. Give validation data with at least "
                "one batch (and limit_val_batches > 0)."
            )

    @staticmethod
    def check_no_repeated_samples(trainer: pl.Trainer) -> None:
        """Raise if a validation sampler pads by repeating samples across processes (Lightning's
        default DistributedSampler pads: 37 samples on 2 processes moved the term by 7 %)."""
        if trainer.world_size <= 1:
            return
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders] if loaders is not None else []
        for loader in loaders:
            if not isinstance(loader, DataLoader):
                continue
            if isinstance(loader.dataset, IterableDataset):
                rank_zero_warn("RiemannCallback cannot check an IterableDataset for repeated samples across ranks.")
                continue
            sampler = loader.sampler
            if isinstance(sampler, UnrepeatedDistributedSampler):
                continue
            size = len(cast(Sized, loader.dataset))  # a map-style data set: its samplers take its length too
            repeats = not isinstance(sampler, DistributedSampler) or sampler.total_size != size
            if repeats:
                raise RuntimeError(
                    f"The validation sampler ({type(sampler).__name__}) would give some of the {size} "
                    f"samples to more than one of the {trainer.world_size} processes, which biases the loss. Create "
                    "the Trainer with `use_distributed_sampler=False` and give the DataLoader "
                    "`sampler=lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler(dataset, "
                    "shuffle=False)` (the lightning_delta DataModules do this)."
                )

    @staticmethod
    def check_equal_batch_counts(trainer: pl.Trainer) -> None:
        """Under a sharded strategy, raise unless every process has the same number of validation batches.

        FSDP gathers each block's weights on all processes together, so a process with one batch more would wait
        for the others forever. The error says which batch sizes would give every process the same count.
        """
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders] if loaders is not None else []
        loaders = [loader for loader in loaders if isinstance(loader, DataLoader)]
        local = torch.tensor(
            [[len(loader), len(loader.sampler)] for loader in loaders],
            dtype=torch.long,
            device=trainer.strategy.root_device,
        )
        gathered = trainer.strategy.all_gather(local).reshape(trainer.world_size, -1, 2).cpu()
        for index in range(gathered.shape[1]):
            batches, rows = gathered[:, index, 0].tolist(), gathered[:, index, 1].tolist()
            if len(set(batches)) == 1:
                continue
            size = loaders[index].batch_size or 1
            fitting = [b for b in range(1, 4 * size + 1) if len({-(-r // b) for r in rows}) == 1]
            closest = sorted(fitting, key=lambda b: (abs(b - size), b))[:3]
            raise RuntimeError(
                f"Under a sharded strategy every process must run the same number of validation batches (FSDP gathers "
                f"the weights of each forward pass on all processes together), but the {len(rows)} processes hold "
                f"{rows} rows of validation dataloader {index}, that is {batches} batches of {size}. Use a batch size "
                f"that gives every process the same count ({', '.join(map(str, closest)) or 'none up to 4x'} would), "
                "or a data set whose rows divide evenly."
            )

    def validate(self, trainer: pl.Trainer, model: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
        """``trainer.validate(model, ...)`` for any module, also one with only a ``training_step``.

        Lightning refuses ``validate`` on a module without ``validation_step`` before any callback runs; this gives
        such a module (this instance only) a ``validation_step`` that does nothing, so the sweep is all there is.
        """
        if self not in trainer.callbacks:  # type: ignore[attr-defined]  # Lightning sets it without declaring it
            raise ValueError("Add this RiemannCallback to the Trainer's `callbacks` before calling its `validate`.")
        added = ensure_validation_step(model)
        try:
            return trainer.validate(model, *args, **kwargs)
        finally:
            if added:
                del model.validation_step  # the instance reads its class's methods again

    # ------------------------------------------------------------------------------------------ the sweep
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluated = True
        self.check_no_repeated_samples(trainer)
        self._target = target = self.target(pl_module)
        if sharded_parameters(pl_module):
            self.check_equal_batch_counts(trainer)
        self._edited = edited = target.edited_model(trainer)
        target.begin_sweep()
        recompute = self.recompute_weights
        if recompute is None:
            recompute = free_memory_bytes(pl_module.device) < 2 * edited.weights_bytes()
        self._recompute = recompute
        if self.rule == "adaptive":
            self.check_repeatable(trainer)
        self._rows = self._all_points()
        self._work = self._first_work()
        self._sums = RiemannSums(len(self._rows) - 1, len(edited), sync_on_compute=True).to(pl_module.device)
        self._sums.reset()  # states may be shared with the parent under ddp_spawn
        self.result = None

    def _sweep(self) -> tuple[EditTarget, EditHandle, RiemannSums]:
        """The target, edited model and sums of the sweep under way (from ``on_validation_start`` on)."""
        target, edited, sums = self._target, self._edited, self._sums
        if target is None or edited is None or sums is None:
            raise RuntimeError("RiemannCallback has no sweep under way: its validation has not started.")
        return target, edited, sums

    def _all_points(self) -> dict[float, int]:
        """Row of the sums for each t the sweep may run: the rule's points; for the adaptive rule, those of its
        largest level (0, every node of the nested rules up to ``num_points``, 1)."""
        if self.rule != "adaptive":
            return {t: j for j, t in enumerate(self.schedule.points)}
        largest = schedule("adaptive", self.num_points, level=adaptive_levels(self.num_points))
        return {t: j for j, t in enumerate(largest.points)}

    def _first_work(self) -> list[tuple[int, float, bool]]:
        """(row, t, backward) of each point the first pass over the data runs: every point of the rule (the adaptive
        rule: its 3-node level, with t = 0 and t = 1)."""
        first = self.schedule if self.rule != "adaptive" else schedule("adaptive", self.num_points, level=1)
        return [(self._rows[t], t, gradient) for t, gradient in zip(first.points, first.gradient)]

    @staticmethod
    def check_repeatable(trainer: pl.Trainer) -> None:
        """Raise if a validation loader shuffles: the adaptive rule reads the data again for each level it adds and
        must see the same batches."""
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders] if loaders is not None else []
        for index, loader in enumerate(loaders):
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, RandomSampler) or (isinstance(sampler, DistributedSampler) and sampler.shuffle):
                raise RuntimeError(
                    f"rule='adaptive' reads the validation data again for each level of nodes it adds, but validation "
                    f"dataloader {index} shuffles ({type(sampler).__name__}): give it `shuffle=False`, or use "
                    "rule='gauss'."
                )

    def target(self, pl_module: pl.LightningModule) -> EditTarget:
        """What the sweep drives: ``pl_module`` itself (a DeltaEditModule), or, given ``pretrained`` and ``edit``,
        a :class:`~lightning_delta.targets.ModuleTarget` around it."""
        if self.edit is None:
            return own_target(pl_module)
        assert self.pretrained is not None  # given together with edit (__init__)
        return ModuleTarget(
            pl_module,
            pretrained=self.pretrained,
            edit=self.edit,
            module_name=self.module_name,
            include=self.include,
            exclude=self.exclude,
            loss_fn=self.loss_fn,
            E_dtype=self.E_dtype,
        )

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._accumulate(pl_module, batch, batch_idx, self._work, count_items=True)
        self._show_progress(pl_module)

    def _accumulate(
        self,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        work: list[tuple[int, float, bool]],
        count_items: bool,
    ) -> None:
        """Run ``work``'s points on one batch and add the losses and inner products to the sums (and the items to
        the count with ``count_items``: the first pass over the data)."""
        target, edited, sums = self._sweep()
        batch = target.riemann_prepare(batch)
        inner = torch.zeros(len(self._rows), len(edited), dtype=torch.float64, device=pl_module.device)
        losses = torch.zeros(len(self._rows), dtype=torch.float64, device=pl_module.device)
        count: Tensor | float = 0.0
        for row, t, with_gradient in work:
            edited.set_t(t)
            recompute = edited.recompute_weights() if self._recompute else contextlib.nullcontext()
            with torch.set_grad_enabled(with_gradient), recompute:
                output = target.riemann_loss(batch, batch_idx)
                if with_gradient:
                    output.total.backward()
            inner[row] = edited.pop_inner_products().to(inner.device)
            losses[row] = output.total.detach()
            count = output.count
        edited.set_t(0.0)
        sums.update(inner, losses, count if count_items else 0.0)

    def _sweep_again(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, work: list[tuple[int, float, bool]]
    ) -> None:
        """Read the validation batches once more (the same ones, as the loop did) and run ``work``'s points."""
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        for index, loader in enumerate(loaders):
            limit = trainer.num_val_batches[index]
            for batch_idx, batch in enumerate(loader):
                if batch_idx >= limit:
                    break
                batch = trainer.strategy.batch_to_device(batch, dataloader_idx=index)
                self._accumulate(pl_module, batch, batch_idx, work, count_items=False)

    def _show_progress(self, pl_module: pl.LightningModule) -> None:
        """This process's running term and ΔL so far, beside Lightning's validation progress bar (not logged)."""
        _, _, sums = self._sweep()
        count = sums.count.clamp_min(1.0)
        first = self.schedule if self.rule != "adaptive" else schedule("adaptive", self.num_points, level=1)
        weights = torch.zeros(len(self._rows), dtype=torch.float64, device=sums.inner.device)
        for t, weight in zip(first.points, first.weights):
            weights[self._rows[t]] = weight
        running = {
            "term": (weights @ sums.inner).sum() / count,
            "exact": (sums.loss[-1] - sums.loss[0]) / count,
        }
        for name, value in running.items():
            pl_module.log(
                f"riemann/running_{name}",
                value.float(),
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = {"num_points": self.num_points, "trapezoid": self.trapezoid, "rule": self.rule}
        if self.rule == "adaptive":
            config["tolerance"] = self.tolerance
        edit = self.edit if self.edit is not None else getattr(pl_module, "edit", None)
        if isinstance(edit, DeltaEdit):  # a mapping of ready-made E has no configuration
            config["edit"] = edit.config()
        target, edited, sums = self._sweep()
        accuracy = target.riemann_accuracy()
        if self.rule == "adaptive":
            result = self._adaptive_result(trainer, pl_module, config, accuracy)
        else:
            totals = sums.compute()
            result = RiemannResult.from_sums(
                edited.names,
                totals["inner"],
                totals["loss"],
                totals["count"],
                self.trapezoid,
                config,
                accuracy,
                self.schedule,
            )
        self.result = result
        for name, value in result.metrics().items():  # equal on every rank: the mean over ranks is a no-op
            pl_module.log(name, value, sync_dist=True)
        if self.filename:
            directory = trainer.log_dir or trainer.default_root_dir  # a collective: read on every rank (§2.13)
            if trainer.is_global_zero:
                result.save(unused_path(Path(directory) / self.filename))

    def _level_result(
        self,
        sums: dict[str, Tensor],
        level: int,
        config: dict[str, Any],
        accuracy: tuple[float, float] | None,
        error: Tensor | None = None,
    ) -> RiemannResult:
        points = schedule("adaptive", self.num_points, level=level)
        rows = [self._rows[t] for t in points.points]
        _, edited, _ = self._sweep()
        return RiemannResult.from_sums(
            edited.names, sums["inner"][rows], sums["loss"][rows], sums["count"], False, config, accuracy, points, error
        )

    def _adaptive_result(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        config: dict[str, Any],
        accuracy: tuple[float, float] | None,
    ) -> RiemannResult:
        """Add the next level's nodes (one more pass over the data each) until every per-tensor error estimate
        ``|Q_level − Q_level−1|`` is below ``tolerance`` × the largest |per-tensor term|, or the levels run out."""
        _, edited, running = self._sweep()
        names, last = edited.names, adaptive_levels(self.num_points)
        level = 1
        while True:
            sums = {key: value.clone() for key, value in running.compute().items()}
            terms = [self._level_result(sums, lower, config, accuracy).term_per_tensor for lower in (level - 1, level)]
            error = torch.tensor([abs(terms[1][name] - terms[0][name]) for name in names], dtype=torch.float64)
            largest = max((abs(value) for value in terms[1].values()), default=0.0)
            worst = max(error.tolist(), default=0.0)
            if worst <= self.tolerance * largest or level == last:
                break
            level += 1
            added = patterson_chain()[level][0]
            self._sweep_again(trainer, pl_module, [(self._rows[float(t)], float(t), True) for t in added])
        result = self._level_result(sums, level, config, accuracy, error)
        if worst > self.tolerance * largest:
            rank_zero_warn(
                f"rule='adaptive' stopped at its largest level ({result.passes} nodes) with a per-tensor error estimate "
                f"of {worst:.3g}, above tolerance × the largest |term| = {self.tolerance * largest:.3g}: "
                "result.error_per_tensor says which tensors; allow more nodes (num_points=31) or a larger tolerance."
            )
        return result

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._evaluated = True  # the exception is the error to report, not an empty validation
        self._release()  # an error or an interrupt mid-sweep still gives a user's module back as it was

    def _release(self) -> None:
        if self._target is not None:
            self._target.end_sweep()  # a user's module goes back to W_post, trainable as before
            self._target, self._edited = None, None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"result": self.result.to_dict() if self.result is not None else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        result = state_dict.get("result")
        self.result = RiemannResult(**result) if result is not None else None


def own_target(pl_module: pl.LightningModule) -> EditTarget:
    """``pl_module`` as the sweep's target: a DeltaEditModule, or any module with the
    :class:`~lightning_delta.targets.EditTarget` methods."""
    if not isinstance(pl_module, EditTarget):
        raise ValueError(
            f"{type(pl_module).__name__} is not a DeltaEditModule: give the callback `pretrained=` and `edit=`."
        )
    return pl_module


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of ``/proc/meminfo`` on the
    host (0 where it cannot be read, so that the sweep then rebuilds ``W(t)``)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def unused_path(path: Path) -> Path:
    """``path``, or ``<stem>-v1<suffix>``, ``-v2``, … when it exists (as ModelCheckpoint names its files): a run
    without a logger writes into ``default_root_dir`` and must not overwrite the previous run's result."""
    version = 0
    candidate = path
    while candidate.exists():
        version += 1
        candidate = path.with_name(f"{path.stem}-v{version}{path.suffix}")
    return candidate


def ensure_validation_step(module: pl.LightningModule) -> bool:
    """Give ``module`` a no-op ``validation_step`` if its class has none (Lightning requires one to validate);
    return whether one was added (``del module.validation_step`` takes it away again)."""
    if is_overridden("validation_step", module, pl.LightningModule) or "validation_step" in vars(module):
        return False
    module.validation_step = MethodType(_no_validation_step, module)  # type: ignore[method-assign]  # this instance only
    return True


def _no_validation_step(self: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
    return None
