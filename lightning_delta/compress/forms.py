"""The compact forms one edited delta tensor ``F(ΔW)`` is stored in, each a few named tensors and a JSON record.

Every form gives ``F(ΔW)`` back bit for bit (:func:`encode` checks it before anything is written). Values are
stored in ``F(ΔW)``'s own dtype, the one :func:`~lightning_delta.export.apply_edit_` adds to ``W_pre`` (at least
float32, :func:`~lightning_delta.edits.base.output_dtype`): a bf16 model's edit is computed in float32, and its values
rounded to bf16 would not give the same edited weights. ``n`` is the tensor's number of entries, ``e`` the bytes of
one value; bit arrays are packed 8 entries a byte, least significant bit first (``numpy.packbits(bitorder="little")``),
so they take ``ceil(n / 8)`` bytes.

=========  ===================================================  ================================================
form       what is stored                                       bytes
=========  ===================================================  ================================================
signs      BitDelta (``magnitudes="mean"``): the sign bits,      ``ceil(n/8) · (1 + ceil(log2 M)) + M·e``
           ``ceil(log2 M)`` bit planes of the block index, the   ``+ positions(n, zeros)``
           ``M`` block magnitudes (scale folded in), and where
           ``F`` is exactly 0, if anywhere
sparse     DARE (``k = 0``), drop only, DELLA, TIES' trim: the   ``positions(n, nnz) + nnz·e``
           positions of the nonzero entries and their values
factors    low rank ``r`` of a ``(d, k)`` matrix: ``U_r Σ_r``    ``r·(d + k)·e``
           and ``V_rᵀ``
dense      every other edit (EXPO, ...): ``F(ΔW)`` itself        ``n·e``
post       a tensor left out of the edit that differs between   ``n`` times the model dtype's bytes
           the models: ``W_post`` itself (assigned, not added)
=========  ===================================================  ================================================

``positions(n, c)`` is the smaller of a bitmap (``ceil(n/8)`` bytes) and a list of ``c`` flat indices (int32, int64
past 2³¹ entries), 0 bytes when ``c = 0``; a tie goes to the bitmap. BitDelta's exact zeros (an entry of ΔW that
is exactly 0 keeps ``F = 0`` under ``sign(0) = 0``, the default) are stored as such positions;
``BitDelta(sign_of_zero=1)`` is BitDelta's own convention, which leaves none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_delta.edits.lowrank import factor_product

__all__ = [
    "FORMS",
    "decode",
    "index_dtype",
    "pack_bits",
    "position_bytes",
    "unpack_bits",
]

FORMS = ("signs", "sparse", "factors", "dense", "post")

Parts = dict[str, Tensor]  # part name -> the tensor stored under "<tensor name>/<part name>"


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor's entries (flattened), 8 a byte, least significant bit first: ``(ceil(n/8),)`` uint8.

    Example:
        >>> pack_bits(torch.tensor([True, False, True, True, False, False, False, False, True])).tolist()
        [13, 1]
    """
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """The first ``count`` bits of ``packed`` (see :func:`pack_bits`), as a bool tensor ``(count,)``."""
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits).to(torch.bool)


def index_dtype(numel: int) -> torch.dtype:
    """The dtype of a flat index into ``numel`` entries: int32 up to 2³¹ entries, else int64."""
    return torch.int32 if numel <= 2**31 else torch.int64


def position_bytes(numel: int, count: int) -> int:
    """Bytes of ``count`` positions among ``numel`` entries: the smaller of a bitmap and a list of flat indices, 0
    for none.

    Example:
        >>> position_bytes(1000, 10), position_bytes(1000, 100), position_bytes(1000, 0)
        (40, 125, 0)
    """
    if count == 0:
        return 0
    return min(math.ceil(numel / 8), count * index_dtype(numel).itemsize)


def _encode_positions(mask: Tensor) -> tuple[str | None, Tensor | None]:
    """``(kind, tensor)`` of the True entries of a flat bool mask: ``("bitmap", packed)``, ``("indices", flat
    indices)`` or ``(None, None)`` for none, whichever :func:`position_bytes` counts."""
    numel, count = mask.numel(), int(mask.sum())
    if count == 0:
        return None, None
    if math.ceil(numel / 8) <= count * index_dtype(numel).itemsize:
        return "bitmap", pack_bits(mask)
    return "indices", mask.nonzero().squeeze(1).to(index_dtype(numel))


def _decode_positions(kind: str, stored: Tensor, numel: int) -> Tensor:
    """The positions of :func:`_encode_positions` as a bool mask (bitmap) or int64 flat indices."""
    return unpack_bits(stored, numel) if kind == "bitmap" else stored.to(torch.int64)


# ------------------------------------------------------------------------------------------------------- encoding
def encode_signs(edited: Tensor, blocks: int) -> tuple[dict[str, Any], Parts] | None:
    """``F = ±m_{B(i)}`` (BitDelta's form, ``blocks`` magnitudes): sign bits, block-index bit planes, magnitudes and
    zero positions; None if ``F`` takes more than ``blocks`` distinct nonzero magnitudes (then it is no BitDelta
    output). The sign bit is the IEEE sign bit of ``F``, so a ``−0`` (a negative entry of a zero magnitude) is
    kept."""
    flat = edited.detach().reshape(-1)
    magnitude = flat.abs()
    zeros = magnitude == 0
    levels = torch.unique(magnitude[~zeros])  # ascending
    if levels.numel() > blocks:
        return None
    planes = (blocks - 1).bit_length()  # ceil(log2 M)
    stored = torch.zeros(blocks, dtype=flat.dtype)
    stored[: levels.numel()] = levels.cpu()
    if levels.numel():
        stored[levels.numel():] = levels[-1]  # unused blocks (equal or empty ones): any value, never read
    index = torch.searchsorted(levels, magnitude).clamp_(max=max(levels.numel() - 1, 0))
    parts: Parts = {"signs": pack_bits(torch.signbit(flat)), "magnitudes": stored}
    if planes:
        parts["index"] = torch.stack([pack_bits((index >> plane) & 1) for plane in range(planes)])
    kind, positions = _encode_positions(zeros)
    if positions is not None:
        parts["zeros"] = positions
    return {"form": "signs", "blocks": blocks, "zeros": kind, "count": int(zeros.sum())}, parts


def encode_sparse(edited: Tensor) -> tuple[dict[str, Any], Parts]:
    """The nonzero entries of ``F`` and their positions."""
    flat = edited.detach().reshape(-1)
    nonzero = flat != 0
    kind, positions = _encode_positions(nonzero)
    parts: Parts = {"values": flat[nonzero].cpu()}
    if positions is not None:
        parts["positions"] = positions
    return {"form": "sparse", "positions": kind, "count": int(nonzero.sum())}, parts


def encode_factors(left: Tensor, right: Tensor) -> tuple[dict[str, Any], Parts]:
    """``F = left @ right`` (:func:`~lightning_delta.edits.lowrank.factor_product`)."""
    return {"form": "factors", "rank": int(left.shape[1])}, {"left": left.detach().cpu(), "right": right.detach().cpu()}


def encode_dense(edited: Tensor) -> tuple[dict[str, Any], Parts]:
    """``F`` itself."""
    return {"form": "dense"}, {"values": edited.detach().cpu()}


def encode_post(w_post: Tensor) -> tuple[dict[str, Any], Parts]:
    """``W_post`` itself, for a tensor left out of the edit (the edited model keeps it)."""
    return {"form": "post"}, {"values": w_post.detach().cpu().clone()}


# ------------------------------------------------------------------------------------------------------- decoding
def decode(record: dict[str, Any], part: Callable[[str], Tensor]) -> Tensor:
    """``F(ΔW)`` (or ``W_post`` for the ``post`` form) of one tensor from its JSON ``record`` (``form``, ``shape``,
    ``dtype`` and the form's fields) and ``part(name)``, which reads one stored tensor.

    Raises:
        ValueError: a stored part whose size does not fit the record (the file is not what its header says).
    """
    shape = torch.Size(record["shape"])
    numel = shape.numel()
    form = record["form"]
    if form in ("dense", "post"):
        values = part("values")
        _expect(values.shape == shape, record, f"values of shape {tuple(values.shape)}")
        return values
    if form == "factors":
        left, right = part("left"), part("right")
        rank = record["rank"]
        _expect(left.shape == (shape[0], rank) and right.shape == (rank, shape[1]), record,
                f"factors of shapes {tuple(left.shape)} and {tuple(right.shape)}")
        return factor_product(left, right)
    if form == "sparse":
        values = part("values")
        _expect(values.numel() == record["count"], record, f"{values.numel()} values")
        out = torch.zeros(numel, dtype=values.dtype)
        if record["positions"] is not None:
            positions = _decode_positions(record["positions"], part("positions"), numel)
            _expect(int(positions.sum()) == record["count"] if positions.dtype == torch.bool
                    else positions.numel() == record["count"], record, "positions that do not match the values")
            out[positions] = values
        return out.view(shape)
    if form == "signs":
        blocks = record["blocks"]
        magnitudes = part("magnitudes")
        _expect(magnitudes.numel() == blocks, record, f"{magnitudes.numel()} magnitudes")
        negative = unpack_bits(part("signs"), numel)
        planes = (blocks - 1).bit_length()
        index = torch.zeros(numel, dtype=torch.int32)
        if planes:
            stored = part("index")
            _expect(stored.shape[0] == planes, record, f"{stored.shape[0]} index bit planes")
            for plane in range(planes):
                index |= unpack_bits(stored[plane], numel).to(torch.int32) << plane
        _expect(int(index.max()) < blocks if numel else True, record, "a block index past the magnitudes")
        magnitude = magnitudes.index_select(0, index)
        if record["zeros"] is not None:
            magnitude[_decode_positions(record["zeros"], part("zeros"), numel)] = 0
        return torch.where(negative, -magnitude, magnitude).view(shape)
    raise ValueError(f"Unknown form {form!r} for tensor {record.get('name')!r}; the forms are {list(FORMS)}.")


def _expect(condition: bool, record: dict[str, Any], got: str) -> None:
    if not condition:
        raise ValueError(
            f"The stored parts of {record.get('name')!r} ({record['form']} form, shape {tuple(record['shape'])}) do "
            f"not match its record: {got}. The file is damaged or was not written by save_compressed; write it again."
        )


def stored_bytes(parts: Parts) -> int:
    """The bytes of the parts' data, as safetensors stores them."""
    return sum(tensor.numel() * tensor.element_size() for tensor in parts.values())
