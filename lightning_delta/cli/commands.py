"""The commands ``validate``, ``edit`` and ``plot`` (``sweep`` is :func:`lightning_delta.sweep.run.sweep`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lightning_delta.cli.parser import DeltaCLI
from lightning_delta.edits import DeltaEdit
from lightning_delta.export import save_edited
from lightning_delta.plots import plot_all
from lightning_delta.sweep.results import iter_rows

__all__ = ["edit", "plot", "validate"]


def validate(args: Sequence[str]) -> DeltaCLI:
    """One Riemann analysis under trainer.validate; its config.yaml and riemann.json go to a directory of its own.

    ``args`` are the command line after ``validate`` (``--config ...``, ``--edit.p 0.9``, ``--print_config``);
    :class:`DeltaCLI` parses them, builds the trainer and runs ``trainer.validate``. Returns the DeltaCLI, whose
    ``riemann_callback().result`` holds the :class:`~lightning_delta.callbacks.RiemannResult`.
    """
    return DeltaCLI(args=["validate", *args])


def edit(
    model: str,
    *,
    pretrained: str,
    edit: DeltaEdit,
    output_dir: str,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the edited model W_pre + F(ΔW) with save_pretrained (safetensors), tokenizer files beside it.

    The model is written into a hidden sibling of ``output_dir`` and renamed into place when complete, so a failed
    run leaves no half-written model.

    Args:
        model: the post-trained model (W_post): a Hugging Face directory or hub id.
        pretrained: the pre-trained weights (W_pre): a directory, safetensors file or hub id.
        edit: the editing operation, e.g. ``--edit DARE --edit.p 0.9``.
        output_dir: where the edited model is written: a new or empty directory (a non-empty one needs
            ``--overwrite true``).
        include: regular expressions on tensor names (re.search): only the tensors that match one are edited. One
            pattern or a list.
        exclude: regular expressions on tensor names: the tensors that match one are left as they are, e.g.
            ``'^(lm_head.weight)$'``. One pattern or a list.
        dtype: dtype to load the model in (``bfloat16``, ``float32``, ...); default its stored dtype.
        overwrite: replace a non-empty ``output_dir`` whole (its old files, an old shard index included, are
            removed once the new model is complete).
    """
    path = save_edited(
        model,
        pretrained=pretrained,
        edit=edit,
        output_dir=output_dir,
        include=include,
        exclude=exclude,
        dtype=dtype,
        overwrite=overwrite,
    )
    print(f"Edited model ({edit!r}) written to {path}")
    return path


def plot(results: str | list[str], output_dir: str = "figures", extension: str = "png") -> list[str]:
    """Draw every figure the rows of the results files allow (see :mod:`lightning_delta.plots`).

    Rows of different settings (C, model, data, loss, ...) are drawn as separate lines, labelled by what differs.

    Args:
        results: the JSONL results file written by ``lightning-delta sweep`` or ``demo``, or a list of them;
            each must exist.
        output_dir: where the figures go.
        extension: image format (``png``, ``pdf``, ``svg``).
    """
    paths = [results] if isinstance(results, (str, os.PathLike)) else list(results)
    rows = list(iter_rows(paths))
    if not rows:
        raise ValueError(f"No rows in {', '.join(map(str, paths))}: run `lightning-delta sweep` first.")
    written = plot_all(rows, output_dir, extension)
    for path in written.values():
        print(f"figure: {path}")
    return [str(path) for path in written.values()]
