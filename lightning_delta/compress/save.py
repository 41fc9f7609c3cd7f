"""Writing an edited delta ``F(ΔW)`` at the size it costs: :func:`save_compressed` (beyond the paper).

:func:`~lightning_delta.export.save_edited` writes the whole edited model ``W_pre + F(ΔW)``; this writes only
``F(ΔW)``, each tensor in its family's compact form (:mod:`lightning_delta.compress.forms`), so that a 1-bit BitDelta
or a 10 %-density DARE is shipped at the bytes the planner's budget counts
(:meth:`~lightning_delta.planning.family.Family.stored_bytes`) and loaded onto the base with
:func:`~lightning_delta.compress.load.load_compressed`.

The directory holds ``compressed.json`` (the header: the format's name and version, the edit's config, and per tensor
its form, shape, dtype, file and bytes), the tensors in safetensors files (``delta-00001.safetensors``, ...; nothing
is pickled), and, when some tensors are low rank, ``adapter/``: the same factors as a PEFT LoRA adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_delta.compress import forms
from lightning_delta.compress.adapter import write_adapter
from lightning_delta.delta import Patterns, Weights, match_tensors, open_pair, read_pair
from lightning_delta.editing import Edit, iter_edited
from lightning_delta.edits import DARE, DELLA, BitDelta, DeltaEdit, LowRank, MagnitudePrune, PerTensor
from lightning_delta.edits.lowrank import factor_product
from lightning_delta.export import _check_output_dir, _inside, _move_into_place, _new_sibling, _same_path

__all__ = ["FORMAT", "HEADER_FILE", "VERSION", "as_edit", "save_compressed"]

FORMAT = "lightning_delta.compressed"
VERSION = 1
HEADER_FILE = "compressed.json"
ADAPTER_DIR = "adapter"
SHARD_NAME = "delta-{:05d}.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3


def as_edit(edit_or_plan: Any) -> Edit:
    """The edit to store: an edit of :mod:`lightning_delta.edits`, a mapping name -> ``E``, a
    :class:`~lightning_delta.planning.plan.Plan`, or the path of a ``plan.json`` that ``lightning-delta plan`` wrote (its
    ``edit``, a :class:`~lightning_delta.edits.PerTensor`)."""
    if callable(getattr(edit_or_plan, "edit", None)) and hasattr(edit_or_plan, "settings"):  # a Plan
        return edit_or_plan.edit()
    if isinstance(edit_or_plan, (str, os.PathLike)):
        path = Path(edit_or_plan)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Cannot read the plan {path} ({error}); give the plan.json `lightning-delta plan` wrote, or an edit."
            ) from error
        edit = config.get("edit") if isinstance(config, dict) else None
        if not isinstance(edit, dict) or edit.get("name") != PerTensor.name:
            raise ValueError(f"{path} holds no plan: a plan.json has an 'edit' entry with name 'per_tensor'.")
        return PerTensor(**{key: value for key, value in edit.items() if key != "name"})
    return edit_or_plan


class _FormsEdit:
    """The edit ``F`` itself (same ``F(ΔW)``, bit for bit), remembering per tensor the edit that made it and, for low
    rank, its factors: what :func:`save_compressed` needs to choose and fill the compact form."""

    def __init__(self, edit: DeltaEdit) -> None:
        self.edit = edit
        self.needs_gradients = getattr(edit, "needs_gradients", False)
        self.used: DeltaEdit | None = None
        self.factors: tuple[Tensor, Tensor] | None = None

    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        used = self.edit.edit_for(name) if isinstance(self.edit, PerTensor) else self.edit
        self.used, self.factors = used, None
        if isinstance(used, LowRank):
            self.factors = used.factors(name, delta)
            if self.factors is not None:
                return factor_product(*self.factors)
        return self.edit.edit_tensor(name, delta, gradient)


def _form_of(edit: DeltaEdit | None, numel: int) -> str:
    """The compact form of a tensor that ``edit`` made (see :mod:`~lightning_delta.compress.forms`)."""
    if isinstance(edit, BitDelta) and edit.magnitudes == "mean" and edit.num_blocks < numel:
        return "signs"
    if isinstance(edit, DARE) and edit.k == 0.0 or isinstance(edit, (DELLA, MagnitudePrune)):
        return "sparse"
    return "dense"


def _encode(
    name: str, edited: Tensor, form: str, factors: tuple[Tensor, Tensor] | None, edit: DeltaEdit | None
) -> tuple[dict[str, Any], forms.Parts]:
    """The record and parts of one edited tensor, checked to decode to ``edited`` exactly; a tensor that does not
    fit its family's form (which the edits never give) is stored dense, with a warning."""
    if factors is not None:
        record, parts = forms.encode_factors(*factors)
    elif form == "signs":
        assert isinstance(edit, BitDelta), "the signs form is BitDelta's (_form_of)"
        encoded = forms.encode_signs(edited, edit.num_blocks)
        record, parts = encoded if encoded is not None else forms.encode_dense(edited)
    elif form == "sparse":
        record, parts = forms.encode_sparse(edited)
    else:
        record, parts = forms.encode_dense(edited)
    record = {"name": name, **record, "shape": list(edited.shape), "dtype": dtype_name(edited.dtype)}
    if record["form"] != "dense" and not torch.equal(forms.decode(record, parts.__getitem__), edited.cpu()):
        warnings.warn(
            f"save_compressed: {name} does not fit the {record['form']} form of its edit; it is stored dense.",
            stacklevel=3,
        )
        record, parts = forms.encode_dense(edited)
        record = {"name": name, **record, "shape": list(edited.shape), "dtype": dtype_name(edited.dtype)}
    return record, parts


class _ShardWriter:
    """Parts written into safetensors files of at most ``limit`` bytes each (a tensor larger than that gets its own
    file), each file written as soon as it is full."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory, self.limit = directory, limit
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.files: list[str] = []

    def add(self, name: str, parts: forms.Parts) -> str:
        size = forms.stored_bytes(parts)
        if self.pending and self.pending_bytes + size > self.limit:
            self.flush()
        self.pending.update({f"{name}/{part}": tensor.contiguous() for part, tensor in parts.items()})
        self.pending_bytes += size
        return SHARD_NAME.format(len(self.files) + 1)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        file = SHARD_NAME.format(len(self.files) + 1)
        save_file(self.pending, str(self.directory / file), metadata={"format": FORMAT, "version": str(VERSION)})
        self.files.append(file)
        self.pending, self.pending_bytes = {}, 0


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``: how the header names a dtype."""
    return str(dtype).removeprefix("torch.")


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same dtype, shape and bytes (``-0.0`` differs from ``0.0``, as in a file)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _left_out(post: Any, pre: Any, selected: set[str]) -> list[tuple[str, Tensor]]:
    """``(name, W_post)`` of every floating-point tensor the edit leaves out that differs between the models (the
    edited model keeps ``W_post`` there), read one pair at a time."""
    try:
        matches = match_tensors(post=post, pre=pre)
    except ValueError as error:
        raise ValueError(
            "save_compressed stores each tensor left out of the edit (include= / exclude=) that differs between the "
            f"models as W_post, so both must hold the same tensors with the same shapes: {error}"
        ) from error
    changed = []
    for match in matches:
        if match.name in selected:
            continue
        w_post, w_pre = read_pair(match, post, pre)
        if not same_bits(w_pre, w_post):
            changed.append((match.name, w_post))
    return changed


def save_compressed(
    model: nn.Module | str | os.PathLike,
    *,
    pretrained: Weights,
    edit_or_plan: Any,
    output_dir: str | os.PathLike,
    include: Patterns = None,
    exclude: Patterns = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write ``F(ΔW)`` of every selected tensor in its family's compact form (see
    :mod:`lightning_delta.compress.forms`), so that :func:`~lightning_delta.compress.load.load_compressed` gives the
    model :func:`~lightning_delta.export.save_edited` writes, bit for bit.

    ``F(ΔW)`` is computed exactly as :func:`~lightning_delta.export.save_edited` computes it (the same
    :func:`~lightning_delta.editing.iter_edited`, one tensor at a time); tensors the edit leaves out (``include`` /
    ``exclude``) that differ between the models are stored as ``W_post`` itself. The tensor data on disk is, per
    tensor, exactly :meth:`~lightning_delta.planning.family.Family.stored_bytes` of its ``F(ΔW)``; the header
    records it. Every stored tensor is decoded before it is written and must give ``F(ΔW)`` back exactly; the
    low-rank factors do where their product is formed as the edit formed it (on CPU, one thread, the same build of
    torch), and a tensor that does not is stored dense, with a warning. Written into a hidden sibling directory that
    is renamed to ``output_dir`` once complete, as :func:`~lightning_delta.export.save_edited` does: a crash leaves no half-written ``output_dir``.

    Args:
        model: W_post: a model, a directory, a safetensors file or a hub id.
        pretrained: W_pre (the base the delta is loaded onto), in any form :func:`~lightning_delta.delta.load_tensors`
            reads.
        edit_or_plan: an edit of :mod:`lightning_delta.edits` (or a :class:`~lightning_delta.edits.PerTensor`), a
            mapping name -> ``E``, a :class:`~lightning_delta.planning.plan.Plan`, or the path of a ``plan.json``.
        output_dir: a new or empty directory (or, with ``overwrite``, one to replace).
        include, exclude: regular expressions on tensor names selecting the edited tensors.
        overwrite: replace a non-empty ``output_dir`` whole.
        max_shard_bytes: the largest safetensors file written (a larger tensor gets a file of its own).

    Returns:
        ``output_dir`` as a ``Path``.

    Raises:
        ValueError: an invalid edit or plan, an ``output_dir`` that is an input, a file, or non-empty without
            ``overwrite``, and every error of :func:`~lightning_delta.editing.iter_edited`.
    """
    edit = as_edit(edit_or_plan)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be an int >= 1, got {max_shard_bytes!r}.")
    output_dir = Path(output_dir)
    for source in (model, pretrained):
        if isinstance(source, (str, os.PathLike)) and Path(source).exists():
            directory = Path(source) if Path(source).is_dir() else Path(source).parent
            if _same_path(directory, output_dir) or (overwrite and _inside(directory, output_dir)):
                raise ValueError(
                    f"output_dir {output_dir} holds or is {directory}, which the models are read from; "
                    "choose a new directory."
                )
    _check_output_dir(output_dir, overwrite)
    recording = _FormsEdit(edit) if isinstance(edit, DeltaEdit) else None
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling(output_dir, "tmp")
    try:
        writer = _ShardWriter(staging, max_shard_bytes)
        records: dict[str, dict[str, Any]] = {}
        low_rank: dict[str, tuple[Tensor, Tensor]] = {}
        with open_pair(post=model, pre=pretrained) as (post_source, pre_source):
            for item in iter_edited(
                post_source,
                pre=pre_source,
                edit=recording if recording is not None else edit,
                include=include,
                exclude=exclude,
            ):
                used = recording.used if recording is not None else None
                factors = recording.factors if recording is not None else None
                record, parts = _encode(item.name, item.edited, _form_of(used, item.edited.numel()), factors, used)
                if factors is not None and record["form"] == "factors":
                    low_rank[item.name] = factors
                records[item.name] = _finish(record, parts, writer)
            if include is not None or exclude is not None:
                selected = set(records)
                for name, w_post in _left_out(post_source, pre_source, selected):
                    record, parts = forms.encode_post(w_post)
                    record = {"name": name, **record, "shape": list(w_post.shape), "dtype": dtype_name(w_post.dtype)}
                    records[name] = _finish(record, parts, writer)
            writer.flush()
            adapter = write_adapter(staging / ADAPTER_DIR, model, low_rank) if low_rank else None
        header = {
            "format": FORMAT,
            "version": VERSION,
            "edit": edit.config() if isinstance(edit, DeltaEdit) else "mapping of E tensors",
            "tensor_bytes": sum(record["bytes"] for record in records.values()),
            "files": writer.files,
            "adapter": adapter,
            "tensors": records,
        }
        (staging / HEADER_FILE).write_text(json.dumps(header, indent=1) + "\n")
        _move_into_place(staging, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _finish(record: dict[str, Any], parts: forms.Parts, writer: _ShardWriter) -> dict[str, Any]:
    record = {**record, "bytes": forms.stored_bytes(parts), "parts": sorted(parts)}
    record["file"] = writer.add(record.pop("name"), parts)
    return record


def describe(header: Mapping[str, Any]) -> str:
    """One line per form: how many tensors and bytes (for messages)."""
    totals: dict[str, list[int]] = {}
    for record in header["tensors"].values():
        count = totals.setdefault(record["form"], [0, 0])
        count[0] += 1
        count[1] += record["bytes"]
    return ", ".join(f"{form} {count} tensors {size:,} B" for form, (count, size) in sorted(totals.items()))
