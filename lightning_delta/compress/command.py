"""``lightning-delta compress``: write an edit's or a plan's ``F(ΔW)`` at the size it costs."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_delta.compress.save import HEADER_FILE, describe, save_compressed
from lightning_delta.edits import DeltaEdit

__all__ = ["compress"]


def compress(
    model: str,
    pretrained: str,
    output_dir: str,
    edit: DeltaEdit | None = None,
    plan: str | None = None,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the edited delta F(ΔW) in its family's compact form (safetensors), to load onto the base model.

    BitDelta as sign bits and magnitudes, DARE, DELLA and TIES' trim as their kept entries, low rank as its two
    factors (and a PEFT LoRA adapter in adapter/), every other edit as the dense F(ΔW). Loading it onto the base
    (lightning_delta.compress.load_compressed) gives the model `lightning-delta edit` writes, bit for bit. The
    directory is written under a hidden name and renamed into place when complete.

    Args:
        model: the post-trained model (W_post): a Hugging Face directory or hub id.
        pretrained: the pre-trained weights (W_pre), the base the delta is loaded onto: a directory, safetensors
            file or hub id.
        output_dir: where the compressed delta is written: a new or empty directory (a non-empty one needs
            ``--overwrite true``).
        edit: the editing operation, e.g. ``--edit BitDelta --edit.bits 2``. Give it or plan.
        plan: the plan.json that ``lightning-delta plan`` wrote: its edit per tensor. Give it or edit.
        include: regular expressions on tensor names (re.search): only the tensors that match one are edited; the
            others that differ between the models are stored as W_post. One pattern or a list.
        exclude: regular expressions on tensor names: the tensors that match one are left out of the edit (stored
            as W_post where they differ). One pattern or a list.
        overwrite: replace a non-empty ``output_dir`` whole.
    """
    if (edit is None) == (plan is None):
        raise ValueError(
            f"compress: give the edit (--edit CLASS ...) or the plan (--plan plan.json), exactly one; got "
            f"edit={edit!r} and plan={plan!r}."
        )
    path = save_compressed(
        model,
        pretrained=pretrained,
        edit_or_plan=edit if edit is not None else plan,
        output_dir=output_dir,
        include=include,
        exclude=exclude,
        overwrite=overwrite,
    )
    header = json.loads((path / HEADER_FILE).read_text())
    source = repr(edit) if edit is not None else f"the plan {plan}"
    print(
        f"Compressed delta of {source} written to {path}: {header['tensor_bytes']:,} bytes of tensors "
        f"({describe(header)})"
    )
    return path
