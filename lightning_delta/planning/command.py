"""``lightning-delta plan``: plan an edit per tensor under a budget, measure it, write the plan (and the model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeAlias

import lightning.pytorch as pl

from lightning_delta.compress import save_compressed as write_compressed
from lightning_delta.export import save_edited
from lightning_delta.planning.family import FAMILIES
from lightning_delta.planning.plan import Plan, plan_edit

__all__ = ["plan"]

FamilyName: TypeAlias = Literal[tuple(FAMILIES)]  # type: ignore[valid-type]  # the registry's families, the CLI's choices: known at run time


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
    num_points: int | None = None,
    refine: int | None = None,
    output: str = "plan.json",
    output_dir: str | None = None,
    overwrite: bool = False,
    accelerator: str = "cpu",
    dtype: str | None = None,
    budget_bytes: float | None = None,
    save_compressed: str | None = None,
    rule: str = "trapezoid",
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
        num_points: C of the refinement sweeps, or the Gauss nodes (default: the rule's own, 5 for the
            trapezoid, 3 for gauss).
        refine: how many candidate settings to refine with a sweep (default: every relevant one; 0: none).
        output: the JSON file the plan is written to: a new file (an existing one needs overwrite).
        output_dir: if given, the edited model W_pre + F(ΔW) is written there too (as by ``lightning-delta edit``).
        overwrite: replace an existing ``output`` file, a non-empty ``output_dir`` and ``save_compressed``.
        accelerator: the trainers' accelerator (cpu, gpu, auto).
        dtype: the dtype the models are loaded in; default as stored.
        budget_bytes: the budget, as the bytes of the edited delta F(ΔW) of the planned tensors stored compactly,
            as `lightning-delta compress` writes them (values in F(ΔW)'s dtype, at least float32; bitdelta b bits
            per entry, dare and magnitude_prune the kept values and their positions, lowrank the two factors).
            Give it or average.
        save_compressed: if given, the planned delta F(ΔW) is written there in its compact form (as by
            ``lightning-delta compress``), the bytes the budget counts.
        rule: the refinement sweeps' quadrature: trapezoid (C + 1 forward+backward passes per setting), gauss (n,
            and two forwards) or adaptive (nested nodes until the per-tensor error estimate is below 1e-3).
    """
    if Path(output).exists() and not overwrite:
        raise ValueError(
            f"output {output} exists; refusing to write a plan over it. Pass --overwrite true to replace "
            "it, or choose another --output."
        )
    made = plan_edit(
        model,
        pretrained=pretrained,
        datamodule=data,
        family_name=family,
        average=average,
        candidates=candidates,
        loss=loss,
        include=include,
        exclude=exclude,
        seed=seed,
        num_points=num_points,
        refine=refine,
        accelerator=accelerator,
        dtype=dtype,
        budget_bytes=budget_bytes,
        rule=rule,
    )
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(made.to_dict(), indent=2) + "\n")
    counts: dict[float, int] = {}
    for value in made.settings.values():
        counts[value] = counts.get(value, 0) + 1
    budget = f"average {average:g}" if average is not None else f"{budget_bytes:.6g} bytes"
    print(
        f"Plan for {family} at {budget}: cost {made.cost:.6g} of budget {made.budget:.6g}, "
        f"{made.stored_bytes:.6g} bytes stored; tensors per setting {dict(sorted(counts.items()))}"
    )
    print(
        f"  predicted ΔL {made.predicted:+.6g} (first order {made.predicted_first:+.6g}), exact ΔL "
        f"{made.exact:+.6g}; {made.passes['forward_backward']} forward+backward and {made.passes['forward']} "
        f"forward passes over the data"
    )
    print(f"  written to {output}")
    if output_dir is not None:
        save_edited(
            model, pretrained=pretrained, edit=made.edit(), output_dir=output_dir, dtype=dtype, overwrite=overwrite
        )
        print(f"  edited model written to {output_dir}")
    if save_compressed is not None:
        written = write_compressed(
            model, pretrained=pretrained, edit_or_plan=made, output_dir=save_compressed, overwrite=overwrite
        )
        print(f"  compressed delta written to {written}")
    return made
