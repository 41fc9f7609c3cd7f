"""Plan an edit per tensor under a budget from the Riemann terms, then measure it (beyond the paper).

Given an edit family with one setting per tensor (BitDelta bits, DARE kept density, LowRank rank) and a budget,
the average setting ``v̄`` (the uniform edit's storage) or a size in bytes of ``F(ΔW)`` stored compactly
(:meth:`~lightning_delta.planning.family.Family.stored_bytes`), :func:`plan_edit` chooses a setting per tensor that
keeps the predicted loss change smallest, and measures what it chose:

1. **Scores, one pass.** One forward+backward pass per batch at W_post gives ``g = ∇L(W_post)`` and the diagonal
   empirical Fisher ``F̂`` (:func:`~lightning_delta.planning.scores.gradient_statistics`); every candidate of every
   tensor is then scored with no further pass: first order ``⟨g, E_k(v)⟩`` and second order
   ``⟨g, E_k(v)⟩ + ½ Σ F̂ ⊙ E_k(v)²`` (:func:`~lightning_delta.planning.scores.candidate_scores`). The first-order
   term alone is ≈ 0 in expectation for DARE (the paper's Eq. 6), so the allocation uses the second order.
2. **Allocation.** An exact multiple-choice knapsack over the tensors
   (:func:`~lightning_delta.planning.allocate.allocate`, ``O(K · V · P)``, its docstring says why not greedy).
3. **Refinement.** For the candidate settings that matter (those chosen and their neighbours, most-used first)
   a C-point Riemann sweep edits every planned tensor at that setting (``trainer.validate`` with
   :class:`~lightning_delta.callbacks.RiemannCallback`); each tensor's trapezoid share (or, with ``rule="gauss"``
   or ``"adaptive"``, that rule's per-tensor term) replaces its Taylor score at that setting (it includes the higher orders along the path, and the interactions with the other tensors at
   that setting), and the allocation is run again.
4. **Exact ΔL.** The proposals (the first-order, second-order and refined allocations, and the uniform edit at the
   budget's setting when it is a candidate) are measured exactly, ``L(W_pre + F(ΔW)) − L(W_post)`` by
   ``trainer.validate`` on a :class:`~lightning_delta.DeltaEditModule` (the uniform edit's from its sweep when one
   ran), and the smallest is the plan: on the planning data it is never worse than the uniform edit.

The plan is a :class:`~lightning_delta.edits.PerTensor` (``Plan.edit()``), usable everywhere an edit is.
It runs in one process: a process of a distributed job is refused with an error. Cost, in passes over the data:
``1`` forward+backward for the scores, ``C + 1`` per refinement sweep (``n`` and 2 forwards with
``rule="gauss"``), ``2`` forwards per distinct proposal; evaluating every candidate exactly would take ``K · V + 1`` forwards.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_delta.callbacks import RiemannCallback, RiemannResult
from lightning_delta.delta import Patterns, Weights, delta_names
from lightning_delta.edits import PerTensor
from lightning_delta.losses import DeltaLoss
from lightning_delta.module import DeltaEditModule
from lightning_delta.planning.allocate import allocate
from lightning_delta.planning.family import FAMILIES, Family, exact, family
from lightning_delta.planning.measure import (
    TRAINER_ARGUMENTS,
    ModuleWeights,
    riemann_sweep,
    sweep_passes,
    sweep_per_tensor,
    tensor_patterns,
)
from lightning_delta.planning.scores import CandidateScores, candidate_scores, gradient_statistics

__all__ = [
    "BudgetedScores",
    "Plan",
    "PlanningRun",
    "exact_change",
    "measure_proposals",
    "plan_edit",
    "propose",
    "refine_scores",
    "relevant_values",
    "run_planning",
    "score_candidates",
]


@dataclass
class Plan:
    """A chosen setting per tensor, what it costs, what was predicted and what was measured.

    ``passes`` counts passes over the data: ``forward_backward`` (scores and sweeps) and ``forward`` (exact ΔL).
    """

    family: str
    average: float | None  # the budget, as the average setting of the uniform edit (None: budget_bytes)
    seed: int
    settings: dict[str, float]  # tensor name -> its setting
    budget: float  # Σ_k v̄ · w_k, or budget_bytes
    cost: float  # Σ_k v_k · w_k (or the stored bytes when the budget is in bytes) ≤ budget
    stored_bytes: float  # Σ_k of Family.stored_bytes at the chosen settings
    predicted_first: float  # Σ_k ⟨g, E_k(v_k)⟩
    predicted_second: float  # Σ_k of the second-order scores at the chosen settings
    predicted: float  # Σ_k of the scores the final allocation used (refined where swept)
    refined: list[float] = field(default_factory=list)  # the settings swept, in order
    chosen: str = "second order"  # which proposal: "first order", "second order", "refined" or "uniform"
    measured: dict[str, float] = field(default_factory=dict)  # each proposal's exact ΔL on the planning data
    exact: float | None = None  # L(W_pre + F(ΔW)) − L(W_post) of the planned edit
    loss_post: float | None = None
    passes: dict[str, int] = field(default_factory=dict)
    budget_bytes: float | None = None  # the budget in bytes of F(ΔW) stored compactly (None: average)

    def edit(self) -> PerTensor:
        """The planned edit: each planned tensor at its setting, every other tensor left unedited."""
        return _per_tensor(FAMILIES[self.family], self.settings, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON types: the fields and the edit's config."""
        return {**asdict(self), "edit": self.edit().config()}


def _per_tensor(spec: Family, settings: dict[str, float], seed: int) -> PerTensor:
    return PerTensor(
        {pattern: spec.edit(settings[name], seed) for pattern, name in zip(tensor_patterns(list(settings)), settings)},
        unmatched="keep",
    )


def relevant_values(choices: list[int], num_values: int) -> list[int]:
    """Candidate indices ordered by how many tensors have them chosen or as a neighbour of the chosen one (ties to
    the lower index): the settings a refinement sweep should measure first."""
    counts = [0] * num_values
    for j in choices:
        for neighbour in (j - 1, j, j + 1):
            if 0 <= neighbour < num_values:
                counts[neighbour] += 2 if neighbour == j else 1
    return sorted((j for j in range(num_values) if counts[j] > 0), key=lambda j: (-counts[j], j))


def exact_change(
    model: nn.Module,
    *,
    pretrained: ModuleWeights,
    edit: Any,
    datamodule: pl.LightningDataModule,
    loss: str | DeltaLoss = "causal_lm",
    accelerator: str = "cpu",
    include: str | list[str] | None = None,
) -> tuple[float, float]:
    """``(L(W_post), L(W_post + E) − L(W_post))`` by ``trainer.validate`` on a DeltaEditModule (two forwards per
    batch, float64 sums) editing the tensors ``include`` selects; ``model`` is given back at W_post."""
    module = DeltaEditModule(model, pretrained=pretrained, edit=edit, loss=loss, include=include)
    trainer = pl.Trainer(accelerator=accelerator, **TRAINER_ARGUMENTS)
    try:
        (logged,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        post, edited = float(logged["loss/post"]), float(logged["loss/edit"])
    finally:
        module.edited_model().remove()
    return post, edited - post


def plan_edit(
    model: nn.Module | str,
    *,
    pretrained: ModuleWeights,
    datamodule: pl.LightningDataModule,
    family_name: str,
    average: float | None = None,
    candidates: list[float] | None = None,
    loss: str | DeltaLoss = "causal_lm",
    include: Patterns = None,
    exclude: Patterns = None,
    seed: int = 0,
    num_points: int | None = None,
    refine: int | None = None,
    measure: bool = True,
    accelerator: str = "cpu",
    dtype: str | torch.dtype | None = None,
    budget_bytes: float | None = None,
    rule: str = "trapezoid",
) -> Plan:
    """Choose a setting per tensor of ``family_name`` within the budget: the uniform edit's at ``average``, or
    ``budget_bytes``.

    Args:
        model: W_post (a module, directory or hub id). pretrained: W_pre.
        datamodule: its ``val_dataloader`` is the data the loss is measured on (set up here).
        family_name: ``"bitdelta"`` (bits), ``"dare"`` or ``"magnitude_prune"`` (TIES' trim; kept density
            ``1 − p``) or ``"lowrank"`` (rank).
        average: the budget as an average setting: the plan stores no more than the uniform edit at ``average``.
            Give it or ``budget_bytes``.
        candidates: the settings each tensor may take (default the family's, see
            :data:`~lightning_delta.planning.family.FAMILIES`).
        loss: as for :class:`~lightning_delta.DeltaEditModule`. include, exclude: the planned tensors.
        seed: DARE's mask seed (the plan is made for those masks).
        num_points: C of the refinement sweeps, or the Gauss nodes (``None``: the rule's own, 5 for the trapezoid).
        refine: how many candidate settings to sweep (default all that are relevant, see :func:`relevant_values`);
            0 plans from the second-order scores alone.
        measure: measure the planned edit's exact ΔL at the end.
        budget_bytes: the budget as the bytes of ``F(ΔW)`` over the planned tensors stored compactly, as
            :func:`~lightning_delta.compress.save_compressed` writes them (values in ``F(ΔW)``'s dtype, at least
            float32; :meth:`~lightning_delta.planning.family.Family.stored_bytes` of the edited tensors, DARE's
            actual kept count included). The uniform edit compared with is then the largest candidate setting that
            fits.
        rule: the refinement sweeps' quadrature (:class:`~lightning_delta.RiemannCallback`): ``"trapezoid"`` (C + 1
            forward+backward passes per setting), ``"gauss"`` (n, and forwards at t = 0 and 1) or ``"adaptive"``.

    Raises:
        ValueError: an unknown family, bad candidates, neither or both of ``average`` and ``budget_bytes``,
            ``average`` below the smallest candidate, a budget below the cheapest plan, ``refine < 0``, a ``rule``
            other than trapezoid, gauss, adaptive, and every
            error of :class:`~lightning_delta.DeltaEditModule` and the scores.
    """
    return run_planning(
        model,
        pretrained=pretrained,
        datamodule=datamodule,
        family_name=family_name,
        average=average,
        candidates=candidates,
        loss=loss,
        include=include,
        exclude=exclude,
        seed=seed,
        num_points=num_points,
        refine=refine,
        measure=measure,
        accelerator=accelerator,
        dtype=dtype,
        budget_bytes=budget_bytes,
        rule=rule,
    ).plan


@dataclass
class PlanningRun:
    """What :func:`run_planning` made on the way to its plan (what benchmarks compare with the brute force)."""

    plan: Plan
    scores: CandidateScores
    used: Tensor  # the scores the final allocation used: second order, refined where a sweep ran
    sweeps: dict[float, RiemannResult]  # the refinement sweeps, by setting
    budget: Fraction
    model: nn.Module  # W_post as loaded
    proposals: dict[str, list[int]]  # a candidate index per tensor, by proposal


def run_planning(
    model: nn.Module | str,
    *,
    pretrained: ModuleWeights,
    datamodule: pl.LightningDataModule,
    family_name: str,
    average: float | None = None,
    candidates: list[float] | None = None,
    loss: str | DeltaLoss = "causal_lm",
    include: Patterns = None,
    exclude: Patterns = None,
    seed: int = 0,
    num_points: int | None = None,
    refine: int | None = None,
    measure: bool = True,
    accelerator: str = "cpu",
    dtype: str | torch.dtype | None = None,
    budget_bytes: float | None = None,
    rule: str = "trapezoid",
) -> PlanningRun:
    """:func:`plan_edit`, keeping what its four stages made (:class:`PlanningRun`): its arguments, errors and plan are
    :func:`plan_edit`'s."""
    _check_not_distributed()
    spec: Family = family(family_name)
    values = spec.check_candidates(candidates if candidates is not None else list(spec.default_candidates))
    _check_budget(spec, values, average, budget_bytes)
    if rule not in ("trapezoid", "gauss", "adaptive"):
        raise ValueError(
            f"plan: `rule` must be 'trapezoid', 'gauss' or 'adaptive' (the refinement sweeps' quadrature), "
            f"got rule={rule!r}."
        )
    RiemannCallback(num_points=num_points, rule=rule)  # its errors for a bad num_points, before any work
    if refine is not None and (isinstance(refine, bool) or not isinstance(refine, int) or refine < 0):
        raise ValueError(f"plan: `refine` must be None or an int >= 0 (settings swept), got refine={refine!r}.")
    module = DeltaEditModule(model, pretrained=pretrained, edit=spec.edit(values[0], seed), loss=loss, dtype=dtype)
    model = module.model
    datamodule.setup("validate")
    budgeted = score_candidates(
        module,
        datamodule,
        spec,
        values,
        pretrained=pretrained,
        include=include,
        exclude=exclude,
        seed=seed,
        average=average,
        budget_bytes=budget_bytes,
    )
    first_choices = allocate(budgeted.scores.second.tolist(), budgeted.costs, budgeted.budget)
    order = relevant_values(first_choices, len(values))
    swept = order if refine is None else order[:refine]
    used, sweeps = refine_scores(
        model,
        budgeted,
        spec,
        [values[j] for j in swept],
        pretrained=pretrained,
        datamodule=datamodule,
        loss=loss,
        seed=seed,
        num_points=num_points,
        accelerator=accelerator,
        rule=rule,
    )
    proposals = propose(budgeted, used, first_choices, refined=bool(swept))
    passes = {
        "forward_backward": 1 + sum(sweep_passes(result)[0] for result in sweeps.values()),
        "forward": sum(sweep_passes(result)[1] for result in sweeps.values()),
    }
    measured: dict[str, float] = {}
    loss_post = None
    if measure:
        loss_post, measured, forwards = measure_proposals(
            model,
            budgeted,
            spec,
            proposals,
            sweeps,
            pretrained=pretrained,
            datamodule=datamodule,
            loss=loss,
            seed=seed,
            accelerator=accelerator,
        )
        passes["forward"] += forwards
    label = min(measured, key=measured.__getitem__) if measured else ("refined" if swept else "second order")
    picked = proposals[label]
    scores, costs, stored = budgeted.scores, budgeted.costs, budgeted.stored
    rows = range(len(scores.names))
    plan = Plan(
        family=spec.name,
        average=None if average is None else float(average),
        seed=seed,
        settings={name: values[j] for name, j in zip(scores.names, picked)},
        budget=float(budgeted.budget),
        cost=float(sum((costs[k][j] for k, j in zip(rows, picked)), Fraction(0))),
        stored_bytes=float(sum((stored[k][j] for k, j in zip(rows, picked)), Fraction(0))),
        predicted_first=float(sum(scores.first[k, j] for k, j in zip(rows, picked))),
        predicted_second=float(sum(scores.second[k, j] for k, j in zip(rows, picked))),
        predicted=float(sum(used[k, j] for k, j in zip(rows, picked))),
        refined=[values[j] for j in swept],
        chosen=label,
        measured=measured,
        exact=measured.get(label),
        loss_post=loss_post,
        passes=passes,
        budget_bytes=None if budget_bytes is None else float(budget_bytes),
    )
    return PlanningRun(
        plan=plan, scores=scores, used=used, sweeps=sweeps, budget=budgeted.budget, model=model, proposals=proposals
    )


def _check_not_distributed() -> None:
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        raise ValueError(
            f"plan: the planner runs in one process (its scores are summed there and its trainers use one device), "
            f"but this is one of {torch.distributed.get_world_size()} processes of a distributed job. Run "
            "`lightning-delta plan` as a single process, then use its plan in the distributed job."
        )


def _check_budget(spec: Family, values: list[float], average: float | None, budget_bytes: float | None) -> None:
    if (average is None) == (budget_bytes is None):
        raise ValueError(
            f"plan: give the budget as `average` ({spec.setting}) or as `budget_bytes`, exactly one; "
            f"got average={average!r} and budget_bytes={budget_bytes!r}."
        )
    if budget_bytes is not None and (
        isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or not 0 < budget_bytes < math.inf
    ):
        raise ValueError(
            f"plan: `budget_bytes` must be a positive finite number of bytes, got budget_bytes={budget_bytes!r}."
        )
    if average is not None and (
        isinstance(average, bool) or not isinstance(average, (int, float)) or not values[0] <= average
    ):
        raise ValueError(
            f"plan: `average` ({spec.setting}) must be a number >= the smallest candidate {values[0]}, "
            f"got average={average!r}; the plan cannot be cheaper than its cheapest candidate."
        )


@dataclass
class BudgetedScores:
    """Stage 1's output: every candidate's scores, and what each costs against the budget.

    ``costs[k][j]`` counts against ``budget`` (settings × weights, or stored bytes with ``budget_bytes``);
    ``stored[k][j]`` are the bytes of tensor ``k`` at candidate ``j``; ``uniform`` is the uniform edit's setting that
    the plan is compared with (``None``: none is a candidate)."""

    scores: CandidateScores
    costs: list[list[Fraction]]
    budget: Fraction
    stored: list[list[Fraction]]
    uniform: float | None


def score_candidates(
    module: DeltaEditModule,
    datamodule: pl.LightningDataModule,
    spec: Family,
    values: list[float],
    *,
    pretrained: Weights,
    include: Patterns,
    exclude: Patterns,
    seed: int,
    average: float | None,
    budget_bytes: float | None,
) -> BudgetedScores:
    """Stage 1, **scores**: one forward+backward pass per batch at W_post gives ``g`` and ``F̂``, and every candidate of
    every planned tensor is scored from them; the budget and each candidate's cost against it."""
    model = module.model
    parameters = dict(model.named_parameters())
    names = [
        name
        for name in delta_names(model, pretrained=pretrained, include=include, exclude=exclude)
        if name in parameters
    ]
    statistics = gradient_statistics(module, model, [datamodule.val_dataloader()], names)
    scores = candidate_scores(model, pretrained, spec, values, statistics, include, exclude, seed)
    del statistics
    stored = scores.stored  # of the very edited tensors: DARE's actual kept count, BitDelta's zeros
    if budget_bytes is None:
        assert average is not None  # one of the two (_check_budget)
        budget = sum((spec.cost(average, scores.shapes[name]) for name in scores.names), Fraction(0))
        return BudgetedScores(scores, scores.costs, budget, stored, average if average in values else None)
    budget = exact(budget_bytes)
    fitting = [value for j, value in enumerate(values) if sum(row[j] for row in stored) <= budget]
    return BudgetedScores(scores, stored, budget, stored, fitting[-1] if fitting else None)


def refine_scores(
    model: nn.Module,
    budgeted: BudgetedScores,
    spec: Family,
    settings: list[float],
    *,
    pretrained: ModuleWeights,
    datamodule: pl.LightningDataModule,
    loss: str | DeltaLoss,
    seed: int,
    num_points: int | None,
    accelerator: str,
    rule: str,
) -> tuple[Tensor, dict[float, RiemannResult]]:
    """Stage 3, **refinement**: a Riemann sweep at each of ``settings`` edits every planned tensor at it; each tensor's
    share replaces its second-order score there. Returns the scores to allocate with and the sweeps by setting."""
    scores = budgeted.scores
    used = scores.second.clone()
    patterns = tensor_patterns(scores.names)
    sweeps = {}
    for value in settings:
        result = riemann_sweep(
            model,
            pretrained=pretrained,
            edit=spec.edit(value, seed),
            datamodule=datamodule,
            loss=loss,
            include=patterns,
            num_points=num_points,
            accelerator=accelerator,
            rule=rule,
        )
        shares = sweep_per_tensor(result)
        used[:, scores.values.index(value)] = torch.tensor([shares[name] for name in scores.names], dtype=torch.float64)
        sweeps[value] = result
    return used, sweeps


def propose(budgeted: BudgetedScores, used: Tensor, second_order: list[int], refined: bool) -> dict[str, list[int]]:
    """Stage 2, **allocation**: the knapsack's choice (a candidate index per tensor) under each kind of score, and the
    uniform edit; ``second_order`` is the allocation of the second-order scores, made before the refinement."""
    scores, costs, budget = budgeted.scores, budgeted.costs, budgeted.budget
    proposals = {"second order": second_order, "first order": allocate(scores.first.tolist(), costs, budget)}
    if refined:
        proposals["refined"] = allocate(used.tolist(), costs, budget)
    if budgeted.uniform is not None:  # always a proposal: the plan is never worse than it on this data
        proposals["uniform"] = [scores.values.index(budgeted.uniform)] * len(scores.names)
    return proposals


def measure_proposals(
    model: nn.Module,
    budgeted: BudgetedScores,
    spec: Family,
    proposals: dict[str, list[int]],
    sweeps: dict[float, RiemannResult],
    *,
    pretrained: ModuleWeights,
    datamodule: pl.LightningDataModule,
    loss: str | DeltaLoss,
    seed: int,
    accelerator: str,
) -> tuple[float | None, dict[str, float], int]:
    """Stage 4, **exact ΔL**: each distinct proposal measured by ``trainer.validate`` (the uniform edit's from its sweep
    when one ran). Returns ``L(W_post)``, the exact ΔL by proposal, and the forward passes it took."""
    scores = budgeted.scores
    patterns = tensor_patterns(scores.names)
    measured: dict[str, float] = {}
    loss_post, forwards = None, 0
    for label, picked in proposals.items():
        same = next((other for other in measured if proposals[other] == picked), None)
        if same is not None:
            measured[label] = measured[same]
            continue
        if label == "uniform" and budgeted.uniform in sweeps:
            measured[label] = sweeps[budgeted.uniform].exact
            continue
        settings = {name: scores.values[j] for name, j in zip(scores.names, picked)}
        loss_post, measured[label] = exact_change(
            model,
            pretrained=pretrained,
            edit=_per_tensor(spec, settings, seed),
            datamodule=datamodule,
            loss=loss,
            accelerator=accelerator,
            include=patterns,
        )
        forwards += 2
    return loss_post, measured, forwards
