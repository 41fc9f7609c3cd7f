"""Writing the edited model W_pre + F(ΔW) out, for serving or evaluating elsewhere.

Paper (Tang et al. 2024), section 3.1: an editing operation F replaces the delta ΔW = W_post − W_pre by F(ΔW), and
the edited model is ``W_pre + F(ΔW)``. :func:`apply_edit_` writes it into a model in place, one tensor at a time;
:func:`save_edited` loads a post-trained model, edits it and saves it in Hugging Face format (safetensors), with its
tokenizer and processor files, so that plain ``transformers`` ``from_pretrained`` reads it back.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_delta.delta import Patterns, Weights
from lightning_delta.editing import Edit, iter_edited
from lightning_delta.edits import PerTensor
from lightning_delta.sources import SavesPretrained, check_dtype, format_names, load_model, model_directory

__all__ = ["apply_edit_", "save_edited"]

# Files copied from the post-trained model's directory next to the edited weights, when present.
TOKENIZER_AND_PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)

# Written beside the weights when the edit is a PerTensor: its settings per tensor (its config()).
PER_TENSOR_FILE = "per_tensor_edit.json"

# What is fetched for a hub id given as the post-trained model, besides its weights and JSON files.
_HUB_EXTRA_PATTERNS = ["*.model", "*.txt", "*.jinja"]


def _check_not_parametrized(model: nn.Module) -> None:
    from torch.nn.utils import parametrize

    parametrized = [
        name or type(model).__name__ for name, module in model.named_modules() if parametrize.is_parametrized(module)
    ]
    if parametrized:
        raise ValueError(
            f"The model has parametrizations on {format_names(parametrized)}; its state dict then holds "
            "'parametrizations.*.original' tensors that from_pretrained ignores. Materialise them first with "
            "torch.nn.utils.parametrize.remove_parametrizations(module, name, leave_parametrized=True)."
        )


def apply_edit_(
    model: nn.Module,
    *,
    pretrained: Weights,
    edit: Edit,
    include: Patterns = None,
    exclude: Patterns = None,
    gradients: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """Replace, in place, every selected tensor W_post of ``model`` by ``W_pre + F(ΔW)``.

    One tensor at a time: ΔW = W_post − W_pre is computed in :func:`~lightning_delta.delta.delta_dtype` (at least
    float32), F(ΔW) is added to W_pre in that dtype, and the sum is cast back to the tensor's own dtype. Tied
    tensors are edited once and stay tied.

    Args:
        model: the post-trained model; its weights are overwritten.
        pretrained: the pre-trained weights (module, state dict, directory, file, hub id or TensorSource).
        edit: an object with ``edit_tensor(name, delta, gradient=None) -> F(ΔW)`` (the edits of
            :mod:`lightning_delta.edits`), or a mapping name -> ``E = F(ΔW) − ΔW``, which edits exactly its own
            names. A mapping means ``E`` everywhere in the library (``DeltaEditModule``, ``RiemannCallback``).
        include: regular expressions on tensor names; only matching tensors are edited.
        exclude: regular expressions on tensor names; matching tensors are left as they are.
        gradients: name -> ∇L at W_post, passed to ``edit_tensor`` for gradient-aware edits.

    Returns:
        ``model``, edited.

    Raises:
        ValueError: for a model that is not an ``nn.Module`` or is parametrized, an invalid ``edit``, names or shapes
            of a mapping ``edit`` that do not match the selected tensors, an edit that needs gradients without them,
            an F(ΔW) of the wrong shape or with NaN / inf, a tensor tied in ``model`` whose names have different
            pre-trained values, and every error of :func:`~lightning_delta.delta.iter_delta`. Errors found while
            editing (NaN / inf in a weight, a bad F(ΔW)) leave the tensors edited before them edited.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model must be an nn.Module (the post-trained model to edit in place), got {type(model).__name__}."
        )
    _check_not_parametrized(model)
    for item in iter_edited(model, pre=pretrained, edit=edit, include=include, exclude=exclude, gradients=gradients):
        # W_pre + F(ΔW) in the delta's dtype (at least float32); copy_ casts to the weight's own dtype. On a model
        # sharded by FSDP2, w_pre and w_post are this process's rows, written in place.
        edited = item.edited if item.rows is None else item.edited[item.rows[0] : item.rows[1]]
        assert item.w_pre is not None, "iter_edited keeps W_pre"
        item.w_post.copy_(item.w_pre.to(item.delta.dtype) + edited.to(item.delta))
    return model


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def save_edited(
    model: nn.Module | str | os.PathLike,
    *,
    pretrained: Weights,
    edit: Edit,
    output_dir: str | os.PathLike,
    include: Patterns = None,
    exclude: Patterns = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    **save_kwargs: Any,
) -> Path:
    """Write the edited model ``W_pre + F(ΔW)`` to ``output_dir`` in Hugging Face format (safetensors).

    The model is written into a new hidden sibling directory (``.<name>.tmp-<random>``, same parent) that is renamed
    to ``output_dir`` only once everything is written, so an error or a crash never leaves half a model at
    ``output_dir`` (a crash may leave the hidden sibling, which holds nothing else).

    Args:
        model: the post-trained model (W_post): a directory or hub id (loaded with the transformers class named in its
            config), or a ``PreTrainedModel`` (edited in place, as by :func:`apply_edit_`).
        pretrained: the pre-trained weights (module, state dict, directory, file, hub id or TensorSource).
        edit: ``edit_tensor(name, delta, gradient=None)`` object or mapping name -> E = F(ΔW) − ΔW (see :func:`apply_edit_`).
        output_dir: where the model is saved: a new or empty directory (or, with ``overwrite``, one to replace);
            must differ from, and not contain, the directories read. A symbolic link is written through, as ``cp``
            and ``save_pretrained`` do: the model goes where it points, and the link stays a link.
        include: regular expressions on tensor names; only matching tensors are edited.
        exclude: regular expressions on tensor names; matching tensors are left as they are.
        dtype: dtype to load (or, for a module, cast) the post-trained model in; default its stored dtype.
        overwrite: replace a non-empty ``output_dir`` whole (none of its old files remain, a stale
            ``model.safetensors.index.json`` or shard included); without it such a directory is refused.
        save_kwargs: passed to ``save_pretrained`` (e.g. ``max_shard_size``).

    Returns:
        ``output_dir`` as a ``Path``. Tokenizer and processor files of the post-trained directory are copied there;
        for a :class:`~lightning_delta.edits.PerTensor` edit (a plan), its config goes to ``per_tensor_edit.json``.

    Raises:
        ValueError: for a ``model`` that is neither a model with ``save_pretrained`` nor a model directory / hub id,
            ``safe_serialization=False``, an ``output_dir`` that is one of the inputs, or with ``overwrite`` holds
            one, is an existing file, or is a non-empty directory without ``overwrite``, and every error of
            :func:`apply_edit_`.
    """
    if not save_kwargs.pop("safe_serialization", True):
        raise ValueError("save_edited writes safetensors only; drop safe_serialization=False.")
    output_dir = Path(output_dir)
    dtype = check_dtype(dtype)
    if isinstance(model, nn.Module):
        if not callable(getattr(model, "save_pretrained", None)):
            raise ValueError(
                f"model is a {type(model).__name__} without save_pretrained; use apply_edit_ and save it yourself, "
                "or pass a transformers model or a model directory."
            )
        loaded: nn.Module | None = model
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        name_or_path = getattr(model, "name_or_path", "") or ""
        source_dir = Path(name_or_path) if name_or_path and Path(name_or_path).is_dir() else None
    elif isinstance(model, (str, os.PathLike)):
        source_dir = model_directory(model, extra_patterns=_HUB_EXTRA_PATTERNS)
        loaded = None
    else:
        raise ValueError(
            f"model must be a transformers model, a model directory or a hub id, got {type(model).__name__}."
        )

    inputs = [source_dir] if source_dir is not None else []
    if isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).exists():
        inputs.append(Path(pretrained) if Path(pretrained).is_dir() else Path(pretrained).parent)
    for directory in inputs:
        if _same_path(directory, output_dir):
            raise ValueError(
                f"output_dir {output_dir} is a directory the models are read from; choose a new directory."
            )
        if overwrite and _inside(directory, output_dir):
            raise ValueError(
                f"output_dir {output_dir} holds {directory}, which the models are read from; overwrite=True would "
                "delete it. Choose another directory."
            )
    # A link is written through: the directory it points to is the one written (or replaced), never the link.
    target = Path(os.path.realpath(output_dir)) if output_dir.is_symlink() else output_dir
    if target is not output_dir and not target.exists():
        raise ValueError(
            f"output_dir {output_dir} is a symbolic link to {target}, which does not exist; create that "
            "directory, or choose another output_dir."
        )
    _check_output_dir(target, overwrite)

    if loaded is None:
        loaded = load_model(source_dir, dtype)
    apply_edit_(loaded, pretrained=pretrained, edit=edit, include=include, exclude=exclude)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling(target, "tmp")
    try:
        cast(SavesPretrained, loaded).save_pretrained(staging, **save_kwargs)  # checked above, or from_pretrained's
        if isinstance(edit, PerTensor):
            (staging / PER_TENSOR_FILE).write_text(json.dumps(edit.config(), indent=2) + "\n")
        if source_dir is not None:
            for name in TOKENIZER_AND_PROCESSOR_FILES:
                if (source_dir / name).is_file():
                    shutil.copyfile(source_dir / name, staging / name)
        _move_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _inside(path: Path, directory: Path) -> bool:
    try:
        return path.resolve().is_relative_to(directory.resolve())
    except OSError:
        return False


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """``output_dir`` is missing, an empty directory, or (with ``overwrite``) a directory; never a file."""
    if output_dir.is_dir():
        if not overwrite and any(output_dir.iterdir()):
            raise ValueError(
                f"output_dir {output_dir} is not empty; refusing to write a model over its files. Pass "
                "overwrite=True (command line: --overwrite true) to replace the whole directory, or choose a new or "
                "empty directory."
            )
    elif output_dir.exists() or output_dir.is_symlink():
        raise ValueError(f"output_dir {output_dir} exists and is not a directory; choose a directory path.")


def _new_sibling(path: Path, kind: str) -> Path:
    """A new, empty hidden directory ``.<name>.<kind>-<random>`` beside ``path`` (same file system, so a rename
    moves it into place at once)."""
    while True:
        sibling = path.parent / f".{path.name}.{kind}-{secrets.token_hex(4)}"
        try:
            sibling.mkdir()
            return sibling
        except FileExistsError:
            continue


def _move_into_place(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``staging`` directory to ``output_dir``; an old ``output_dir`` is checked again (it may
    have changed while the model was written) and, with ``overwrite``, replaced whole."""
    _check_output_dir(output_dir, overwrite)
    if not output_dir.is_dir():
        os.rename(staging, output_dir)
        return
    # Moved aside first: a directory cannot be renamed over a non-empty one. Restored if the rename fails.
    old = output_dir.parent / f".{output_dir.name}.old-{secrets.token_hex(4)}"
    os.rename(output_dir, old)
    try:
        os.rename(staging, output_dir)
    except BaseException:
        os.rename(old, output_dir)
        raise
    shutil.rmtree(old)
