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
   :class:`~lightning_delta.callbacks.RiemannCallback`); each tensor's trapezoid share replaces its Taylor score at
   that setting (it includes the higher orders along the path, and the interactions with the other tensors at
   that setting), and the allocation is run again.
4. **Exact ΔL.** The proposals (the first-order, second-order and refined allocations, and the uniform edit at the
   budget's setting when it is a candidate) are measured exactly, ``L(W_pre + F(ΔW)) − L(W_post)`` by
   ``trainer.validate`` on a :class:`~lightning_delta.DeltaEditModule` (the uniform edit's from its sweep when one
   ran), and the smallest is the plan: on the planning data it is never worse than the uniform edit.

The plan is a :class:`~lightning_delta.edits.PerTensor` (``Plan.edit()``), usable everywhere an edit is.
It runs in one process: a process of a distributed job is refused with an error. Cost, in passes over the data:
``1`` forward+backward for the scores, ``C + 1`` per refinement sweep, ``2``
forwards per distinct proposal; evaluating every candidate exactly would take ``K · V + 1`` forwards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_delta.delta import Patterns, Weights, delta_names
from lightning_delta.edits import PerTensor
from lightning_delta.export import save_edited
from lightning_delta.losses import DeltaLoss
from lightning_delta.module import DeltaEditModule
from lightning_delta.planning.allocate import allocate
from lightning_delta.planning.family import FAMILIES, Family, exact, family
from lightning_delta.planning.measure import TRAINER_ARGUMENTS, riemann_sweep, tensor_patterns, trapezoid_per_tensor
from lightning_delta.planning.scores import CandidateScores, candidate_scores, gradient_statistics

__all__ = ["Plan", "plan", "plan_edit", "relevant_values"]

FamilyName = Literal[tuple(FAMILIES)]  # "bitdelta", "dare", "lowrank"


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
    return PerTensor({pattern: spec.edit(settings[name], seed)
                      for pattern, name in zip(tensor_patterns(list(settings)), settings)}, unmatched="keep")


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
    model: nn.Module, *, pretrained: Weights, edit: Any, datamodule: pl.LightningDataModule,
    loss: str | DeltaLoss = "causal_lm", accelerator: str = "cpu", include: Patterns = None,
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
    pretrained: Weights,
    datamodule: pl.LightningDataModule,
    family_name: str,
    average: float | None = None,
    candidates: list[float] | None = None,
    loss: str | DeltaLoss = "causal_lm",
    include: Patterns = None,
    exclude: Patterns = None,
    seed: int = 0,
    num_points: int = 5,
    refine: int | None = None,
    measure: bool = True,
    accelerator: str = "cpu",
    dtype: str | torch.dtype | None = None,
    scores_out: dict[str, Any] | None = None,
    budget_bytes: float | None = None,
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
        num_points: C of the refinement sweeps.
        refine: how many candidate settings to sweep (default all that are relevant, see :func:`relevant_values`);
            0 plans from the second-order scores alone.
        measure: measure the planned edit's exact ΔL at the end.
        scores_out: if given, filled with the score matrices and sweeps (for benchmarks).
        budget_bytes: the budget as the bytes of ``F(ΔW)`` over the planned tensors stored compactly, values in
            the model's dtype (:meth:`~lightning_delta.planning.family.Family.stored_bytes`). The uniform edit
            compared with is then the largest candidate setting that fits.

    Raises:
        ValueError: an unknown family, bad candidates, neither or both of ``average`` and ``budget_bytes``,
            ``average`` below the smallest candidate, a budget below the cheapest plan, ``refine < 0``, and every
            error of :class:`~lightning_delta.DeltaEditModule` and the scores.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError(
            f"plan: the planner runs in one process (its scores are summed there and its trainers use one device), "
            f"but this is one of {torch.distributed.get_world_size()} processes of a distributed job. Run "
            "`lightning-delta plan` as a single process, then use its plan in the distributed job."
        )
    spec: Family = family(family_name)
    values = spec.check_candidates(candidates if candidates is not None else list(spec.default_candidates))
    if (average is None) == (budget_bytes is None):
        raise ValueError(f"plan: give the budget as `average` ({spec.setting}) or as `budget_bytes`, exactly one; "
                         f"got average={average!r} and budget_bytes={budget_bytes!r}.")
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float))
                                     or not 0 < budget_bytes < math.inf):
        raise ValueError(f"plan: `budget_bytes` must be a positive finite number of bytes, got "
                         f"budget_bytes={budget_bytes!r}.")
    if average is not None and (isinstance(average, bool) or not isinstance(average, (int, float))
                                or not values[0] <= average):
        raise ValueError(f"plan: `average` ({spec.setting}) must be a number >= the smallest candidate {values[0]}, "
                         f"got average={average!r}; the plan cannot be cheaper than its cheapest candidate.")
    if refine is not None and (isinstance(refine, bool) or not isinstance(refine, int) or refine < 0):
        raise ValueError(f"plan: `refine` must be None or an int >= 0 (settings swept), got refine={refine!r}.")
    module = DeltaEditModule(model, pretrained=pretrained, edit=spec.edit(values[0], seed), loss=loss, dtype=dtype)
    model = module.model
    datamodule.setup("validate")
    loaders = [datamodule.val_dataloader()]
    parameters = dict(model.named_parameters())
    names = [name for name in delta_names(model, pre=pretrained, include=include,
                                          exclude=exclude) if name in parameters]
    statistics = gradient_statistics(module, model, loaders, names)
    scores = candidate_scores(model, pretrained, spec, values, statistics, include, exclude, seed)
    del statistics
    element_bytes = {name: parameters[name].element_size() for name in scores.names}
    stored = [[spec.stored_bytes(value, scores.shapes[name], element_bytes[name]) for value in values]
              for name in scores.names]
    if budget_bytes is None:
        costs = scores.costs
        budget = sum((spec.cost(average, scores.shapes[name]) for name in scores.names), Fraction(0))
        uniform = average if average in values else None
    else:
        costs, budget = stored, exact(budget_bytes)
        fitting = [value for j, value in enumerate(values) if sum(row[j] for row in stored) <= budget]
        uniform = fitting[-1] if fitting else None
    second = scores.second
    choices = allocate(second.tolist(), costs, budget)
    used = second.clone()
    patterns = tensor_patterns(scores.names)
    order = relevant_values(choices, len(values))
    swept = order if refine is None else order[:refine]
    sweeps = {}
    for j in swept:
        result = riemann_sweep(model, pretrained=pretrained, edit=spec.edit(values[j], seed), datamodule=datamodule,
                               loss=loss, include=patterns, num_points=num_points, accelerator=accelerator)
        shares = trapezoid_per_tensor(result)
        used[:, j] = torch.tensor([shares[name] for name in scores.names], dtype=torch.float64)
        sweeps[values[j]] = result
    proposals = {"second order": choices, "first order": allocate(scores.first.tolist(), costs, budget)}
    if swept:
        proposals["refined"] = allocate(used.tolist(), costs, budget)
    if uniform is not None:  # always a proposal: the plan is never worse than it on this data
        proposals["uniform"] = [values.index(uniform)] * len(scores.names)
    passes = {"forward_backward": 1 + len(swept) * (num_points + 1), "forward": 0}
    measured: dict[str, float] = {}
    loss_post = None
    if measure:  # each distinct proposal's exact ΔL; the uniform edit's from its sweep when one ran
        for label, picked in proposals.items():
            same = next((other for other in measured if proposals[other] == picked), None)
            if same is not None:
                measured[label] = measured[same]
                continue
            if label == "uniform" and uniform in sweeps:
                measured[label] = sweeps[uniform].exact
                continue
            settings = {name: values[j] for name, j in zip(scores.names, picked)}
            loss_post, measured[label] = exact_change(
                model, pretrained=pretrained, edit=_per_tensor(spec, settings, seed), datamodule=datamodule, loss=loss,
                accelerator=accelerator, include=patterns)
            passes["forward"] += 2
    label = min(measured, key=measured.get) if measured else ("refined" if swept else "second order")
    picked = proposals[label]
    rows = range(len(scores.names))
    plan = Plan(
        family=spec.name, average=None if average is None else float(average), seed=seed,
        settings={name: values[j] for name, j in zip(scores.names, picked)},
        budget=float(budget), cost=float(sum((costs[k][j] for k, j in zip(rows, picked)), Fraction(0))),
        stored_bytes=float(sum((stored[k][j] for k, j in zip(rows, picked)), Fraction(0))),
        predicted_first=float(sum(scores.first[k, j] for k, j in zip(rows, picked))),
        predicted_second=float(sum(second[k, j] for k, j in zip(rows, picked))),
        predicted=float(sum(used[k, j] for k, j in zip(rows, picked))),
        refined=[values[j] for j in swept], chosen=label, measured=measured,
        exact=measured.get(label), loss_post=loss_post, passes=passes,
        budget_bytes=None if budget_bytes is None else float(budget_bytes),
    )
    if scores_out is not None:
        scores_out.update(scores=scores, used=used, sweeps=sweeps, budget=budget, model=model, proposals=proposals)
    return plan


def plan(
    model: str,
    *,
    pretrained: str,
    data: pl.LightningDataModule,
    family: FamilyName,
    average: float | None = None,
    candidates: list[float] | None = None,
    loss: str = "causal_lm",
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    seed: int = 0,
    num_points: int = 5,
    refine: int | None = None,
    output: str = "plan.json",
    output_dir: str | None = None,
    overwrite: bool = False,
    accelerator: str = "cpu",
    dtype: str | None = None,
    budget_bytes: float | None = None,
) -> Plan:
    """Plan an edit per tensor under a budget (the uniform edit's storage), measure its exact ΔL, write the plan.

    Args:
        model: the post-trained model (W_post): a Hugging Face directory or hub id.
        pretrained: the pre-trained weights (W_pre): a directory, safetensors file or hub id.
        data: a LightningDataModule; its validation data is what the loss is measured on.
        family: the edit family: bitdelta (bits per entry), dare or magnitude_prune (TIES' trim; kept density
            1 - p) or lowrank (rank).
        average: the budget, as the average setting: the plan stores no more than the uniform edit at it. Give
            it or budget_bytes.
        candidates: the settings a tensor may take; default bitdelta 1-4 bits, dare and magnitude_prune
            0.05/0.1/0.2/0.4, lowrank 1/2/4/8.
        loss: causal_lm, classification or dpo.
        include: regular expressions on tensor names (re.search): only the tensors that match one are planned.
        exclude: regular expressions on tensor names: the tensors that match one are left as they are.
        seed: DARE's mask seed.
        num_points: C of the refinement sweeps.
        refine: how many candidate settings to refine with a sweep (default: every relevant one; 0: none).
        output: the JSON file the plan is written to: a new file (an existing one needs overwrite).
        output_dir: if given, the edited model W_pre + F(ΔW) is written there too (as by ``lightning-delta edit``).
        overwrite: replace an existing ``output`` file and a non-empty ``output_dir``.
        accelerator: the trainers' accelerator (cpu, gpu, auto).
        dtype: the dtype the models are loaded in; default as stored.
        budget_bytes: the budget, as the bytes of the edited delta F(ΔW) of the planned tensors stored compactly
            (values in the model's dtype; bitdelta b/8 bytes per entry, dare and magnitude_prune the kept values
            and a bitmap, lowrank the two factors). Give it or average.
    """
    if Path(output).exists() and not overwrite:
        raise ValueError(f"output {output} exists; refusing to write a plan over it. Pass --overwrite true to replace "
                         "it, or choose another --output.")
    made = plan_edit(model, pretrained=pretrained, datamodule=data, family_name=family, average=average,
                     candidates=candidates, loss=loss, include=include, exclude=exclude, seed=seed,
                     num_points=num_points, refine=refine, accelerator=accelerator, dtype=dtype,
                     budget_bytes=budget_bytes)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(made.to_dict(), indent=2) + "\n")
    counts: dict[float, int] = {}
    for value in made.settings.values():
        counts[value] = counts.get(value, 0) + 1
    budget = f"average {average:g}" if average is not None else f"{budget_bytes:.6g} bytes"
    print(f"Plan for {family} at {budget}: cost {made.cost:.6g} of budget {made.budget:.6g}, "
          f"{made.stored_bytes:.6g} bytes stored; tensors per setting {dict(sorted(counts.items()))}")
    print(f"  predicted ΔL {made.predicted:+.6g} (first order {made.predicted_first:+.6g}), exact ΔL "
          f"{made.exact:+.6g}; {made.passes['forward_backward']} forward+backward and {made.passes['forward']} "
          f"forward passes over the data")
    print(f"  written to {output}")
    if output_dir is not None:
        save_edited(model, pretrained=pretrained, edit=made.edit(), output_dir=output_dir, dtype=dtype,
                    overwrite=overwrite)
        print(f"  edited model written to {output_dir}")
    return made
