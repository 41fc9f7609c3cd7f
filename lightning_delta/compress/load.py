"""Loading a compressed delta onto its base: ``W_pre + F(ΔW)``, one tensor at a time, and back to ``W_pre``.

:func:`load_compressed` gives the model :func:`~lightning_delta.export.save_edited` writes for the same edit, bit for
bit: each stored ``F(ΔW)`` is decoded exactly (:func:`~lightning_delta.compress.forms.decode`) and added as
:func:`~lightning_delta.export.apply_edit_` adds it, ``W_pre`` in ``F``'s dtype plus ``F``, cast to the weight's dtype.
That holds when the base's tensors are ``W_pre`` as the delta was computed from (loaded in their stored dtype).

Many fine-tunes on one base: :func:`apply_compressed_` edits a loaded base model in place and
:func:`remove_compressed_` puts ``W_pre`` back, each one pass over the edited tensors, reading ``W_pre`` from the
base's own files (memory-mapped, one tensor at a time), so no second copy of the model is ever held. A
:class:`CompressedDelta` read with ``in_memory=True`` keeps its compressed parts in memory (its size on disk), to swap
between several without reading them again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_delta.compress import forms
from lightning_delta.compress.save import FORMAT, HEADER_FILE, VERSION
from lightning_delta.delta import TensorSource, Weights, load_tensors
from lightning_delta.sources import format_names, load_model

__all__ = ["CompressedDelta", "apply_compressed_", "load_compressed", "read_header", "remove_compressed_"]


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header (``compressed.json``) of the compressed delta in directory ``path``, checked: this format, this
    version, and a record per tensor.

    Raises:
        ValueError: a missing directory or header, a header that is not JSON, another format, or another version.
    """
    path = Path(path)
    header_file = path / HEADER_FILE
    if not header_file.is_file():
        raise ValueError(
            f"{path} is not a compressed delta: it has no {HEADER_FILE}. Write one with "
            "save_compressed (command line: lightning-delta compress)."
        )
    try:
        header = json.loads(header_file.read_text())
    except ValueError as error:
        raise ValueError(f"{header_file} is not valid JSON ({error}): the file is damaged; write it again.") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"{header_file} is not a {FORMAT} header (its format is {got!r}).")
    if header.get("version") != VERSION:
        raise ValueError(
            f"{path} holds a compressed delta of format version {header.get('version')!r}; this version of "
            f"lightning_delta reads version {VERSION}. Write it again with this version's save_compressed, or load it "
            "with the version of lightning_delta that wrote it."
        )
    if not isinstance(header.get("tensors"), dict) or not isinstance(header.get("files"), list):
        raise ValueError(f"{header_file} lacks its 'tensors' or 'files' entry: the file is damaged; write it again.")
    return header


class CompressedDelta:
    """A compressed delta on disk (``in_memory=False``: each tensor's parts are read when it is decoded) or with all
    its parts read into memory (``in_memory=True``: its size on disk, to apply again without reading).

    Raises:
        ValueError: every error of :func:`read_header`; a safetensors file that is missing, truncated or damaged, or
            of another format version, or lacks a part its header names.
    """

    def __init__(self, path: str | os.PathLike, in_memory: bool = False) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self.header = read_header(self.path)
        self.records: dict[str, dict[str, Any]] = self.header["tensors"]
        self._handles: dict[str, Any] = {}
        self._parts: dict[str, Tensor] | None = {} if in_memory else None
        try:
            for file in self.header["files"]:
                try:
                    handle = safe_open(str(self.path / file), framework="pt", device="cpu")
                except (SafetensorError, OSError) as error:
                    raise ValueError(
                        f"Cannot read {self.path / file} ({error}): the file is missing, truncated or "
                        "damaged; write the compressed delta again."
                    ) from error
                version = (handle.metadata() or {}).get("version")
                if version != str(VERSION):
                    raise ValueError(
                        f"{self.path / file} is of format version {version!r}, its header of version "
                        f"{VERSION}: the directory mixes files of two writes; write it again."
                    )
                self._handles[file] = handle
            missing = [
                f"{name}/{part}"
                for name, record in self.records.items()
                for part in record["parts"]
                if record["file"] not in self._handles or f"{name}/{part}" not in self._handles[record["file"]].keys()
            ]
            if missing:
                raise ValueError(
                    f"{self.path} lacks the stored parts {format_names(missing)} its header names: the "
                    "directory is incomplete; write it again."
                )
            if self._parts is not None:
                for name, record in self.records.items():
                    for part in record["parts"]:
                        self._parts[f"{name}/{part}"] = self._handles[record["file"]].get_tensor(f"{name}/{part}")
                self._handles.clear()
        except BaseException:
            self._handles.clear()
            raise

    @property
    def names(self) -> list[str]:
        """The stored tensors, in the order they were written."""
        return list(self.records)

    @property
    def nbytes(self) -> int:
        """The bytes of the stored tensor data (the header not counted)."""
        return sum(record["bytes"] for record in self.records.values())

    def _part(self, name: str, part: str) -> Tensor:
        key = f"{name}/{part}"
        if self._parts is not None:
            return self._parts[key]
        return self._handles[self.records[name]["file"]].get_tensor(key)

    def tensor(self, name: str) -> Tensor:
        """``F(ΔW)`` of tensor ``name`` (``W_post`` for a tensor stored in the ``post`` form), decoded exactly."""
        record = {**self.records[name], "name": name}
        return forms.decode(record, lambda part: self._part(name, part))

    def pieces(self, name: str, entries: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """:meth:`tensor` flattened, in pieces ``(first flat index, values)`` of about ``entries`` entries (default
        :data:`~lightning_delta.compress.forms.PIECE_ENTRIES`), reading only each piece's stored parts
        (:func:`~lightning_delta.compress.forms.decode_pieces`)."""
        return forms.decode_pieces(
            {**self.records[name], "name": name},
            _TensorParts(self, name),
            forms.PIECE_ENTRIES if entries is None else entries,
        )

    def check_model(self, tensors: dict[str, Tensor], what: str) -> None:
        """Every stored tensor is in ``tensors`` with its shape; ValueError listing those that are not."""
        missing = [name for name in self.records if name not in tensors]
        shapes = [
            f"{name} (delta {tuple(record['shape'])}, {what} {tuple(tensors[name].shape)})"
            for name, record in self.records.items()
            if name in tensors and tuple(tensors[name].shape) != tuple(record["shape"])
        ]
        if missing or shapes:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensors of the delta are not in the {what}: {format_names(missing)}")
            if shapes:
                parts.append(
                    f"{len(shapes)} tensors of the delta have other shapes in the {what}: {format_names(shapes)}"
                )
            raise ValueError(
                f"The compressed delta {self.path} was not made for this {what}: "
                + "; ".join(parts)
                + ". Load it onto the base model it was computed from."
            )

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CompressedDelta:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class _TensorParts:
    """The stored parts of one tensor of a :class:`CompressedDelta`, read whole or sliced
    (:class:`~lightning_delta.compress.forms.PartReader`)."""

    def __init__(self, delta: CompressedDelta, name: str) -> None:
        self.delta, self.name = delta, name

    def _key(self, part: str) -> str:
        return f"{self.name}/{part}"

    def full(self, part: str) -> Tensor:
        return self.delta._part(self.name, part)

    def shape(self, part: str) -> tuple[int, ...]:
        if self.delta._parts is not None:
            return tuple(self.delta._parts[self._key(part)].shape)
        return tuple(self.delta._handles[self.delta.records[self.name]["file"]].get_slice(self._key(part)).get_shape())

    def slice(self, part: str, index: tuple[slice, ...]) -> Tensor:
        if self.delta._parts is not None:
            return self.delta._parts[self._key(part)][index]
        return self.delta._handles[self.delta.records[self.name]["file"]].get_slice(self._key(part))[index]


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module (the base model, edited in place), got {type(model).__name__}.")
    return {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}


def _opened(delta: CompressedDelta | str | os.PathLike) -> tuple[CompressedDelta, bool]:
    if isinstance(delta, CompressedDelta):
        return delta, False
    if isinstance(delta, (str, os.PathLike)):
        return CompressedDelta(delta), True
    raise ValueError(f"delta must be a compressed delta's directory or a CompressedDelta, got {type(delta).__name__}.")


def apply_compressed_(model: nn.Module, delta: CompressedDelta | str | os.PathLike) -> nn.Module:
    """Edit ``model`` (holding ``W_pre``) in place into ``W_pre + F(ΔW)``, one stored tensor at a time.

    Each tensor: ``W ← W.to(F.dtype) + F`` cast to ``W``'s dtype (as :func:`~lightning_delta.export.apply_edit_`);
    a tensor in the ``post`` form is assigned. Both go piece by piece (:meth:`CompressedDelta.pieces`): the
    workspace is a few MiB, whatever the tensor's size (a low-rank tensor's product is formed whole). Names and shapes are checked before any tensor is changed; a tied
    tensor is edited once (the delta holds it under one name).

    Raises:
        ValueError: every error of :class:`CompressedDelta`, and a model that lacks a stored tensor or holds it in
            another shape.
    """
    tensors = _model_tensors(model)
    delta, opened = _opened(delta)
    try:
        delta.check_model(tensors, "model")
        with torch.no_grad():
            for name in delta.names:
                weight = tensors[name]
                post = delta.records[name]["form"] == "post"
                if not weight.is_contiguous():  # no flat view of its storage: the whole tensor at once
                    stored = delta.tensor(name).to(weight.device)
                    weight.copy_(stored if post else weight.to(stored.dtype) + stored)
                    continue
                flat = weight.view(-1)  # the model's own storage, edited piece by piece
                for start, piece in delta.pieces(name):
                    weights = flat[start : start + piece.numel()]
                    piece = piece.to(weights.device)
                    weights.copy_(piece if post else weights.to(piece.dtype) + piece)
    finally:
        if opened:
            delta.close()
    return model


def remove_compressed_(model: nn.Module, delta: CompressedDelta | str | os.PathLike, base: Weights) -> nn.Module:
    """Put ``W_pre`` back into every tensor the compressed delta edited, reading it from ``base`` one tensor at a
    time: ``model`` is then the base again, bit for bit, whatever delta was applied.

    Args:
        model: a base model with the delta applied (:func:`apply_compressed_`).
        delta: the compressed delta (its directory or a :class:`CompressedDelta`): which tensors to restore.
        base: the base's weights, as the model was loaded from them (its directory, safetensors file or hub id:
            memory-mapped, so no second copy of the model is held).

    Raises:
        ValueError: ``base`` is ``model`` itself, lacks a tensor or holds it in another shape, and every error of
            :class:`CompressedDelta`.
    """
    tensors = _model_tensors(model)
    if base is model:
        raise ValueError(
            "base must be the base's weights on disk (the directory the model was loaded from), not the "
            "model itself: the model holds the edited weights."
        )
    delta, opened = _opened(delta)
    try:
        delta.check_model(tensors, "model")
        try:
            source = base if isinstance(base, TensorSource) else load_tensors(base)
        except ValueError as error:
            raise ValueError(f"Cannot load the base's weights: {error}") from error
        with source if source is not base else nullcontext():
            delta.check_model(
                {name: torch.empty(source.shape(name), device="meta") for name in delta.names if name in source}, "base"
            )
            with torch.no_grad():
                for name in delta.names:
                    tensors[name].copy_(source.get(name))
    finally:
        if opened:
            delta.close()
    return model


def load_compressed(
    base: nn.Module | str | os.PathLike, path: str | os.PathLike, dtype: torch.dtype | str | None = None
) -> nn.Module:
    """The edited model ``W_pre + F(ΔW)``: the base loaded (a directory or hub id, with the transformers class named
    in its config, in ``dtype``, default its stored dtype) or given (an ``nn.Module``, edited in place), with the
    compressed delta in ``path`` applied one tensor at a time (:func:`apply_compressed_`).

    For the same edit (and DARE's masks, from the same seed) the result equals, bit for bit, the model
    :func:`~lightning_delta.export.save_edited` writes; from a plan's file, the planned model.

    Raises:
        ValueError: every error of :func:`~lightning_delta.sources.load_model` and :func:`apply_compressed_`.
    """
    delta = CompressedDelta(path)  # checked before the base is loaded
    try:
        model = load_model(base, dtype, argument="base")
        return apply_compressed_(model, delta)
    finally:
        delta.close()
