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
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from lightning_delta.edits.lowrank import factor_product

__all__ = [
    "FORMS",
    "PIECE_ENTRIES",
    "PartReader",
    "decode",
    "decode_pieces",
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
        stored[levels.numel() :] = levels[-1]  # unused blocks (equal or empty ones): any value, never read
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
        _expect(
            left.shape == (shape[0], rank) and right.shape == (rank, shape[1]),
            record,
            f"factors of shapes {tuple(left.shape)} and {tuple(right.shape)}",
        )
        return factor_product(left, right)
    if form == "sparse":
        values = part("values")
        _expect(values.numel() == record["count"], record, f"{values.numel()} values")
        out = torch.zeros(numel, dtype=values.dtype)
        if record["positions"] is not None:
            positions = _decode_positions(record["positions"], part("positions"), numel)
            _expect(
                int(positions.sum()) == record["count"]
                if positions.dtype == torch.bool
                else positions.numel() == record["count"],
                record,
                "positions that do not match the values",
            )
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


# Entries of F(ΔW) decoded at a time by decode_pieces: 1 MiB of float32 values, a few MiB of workspace in all.
PIECE_ENTRIES = 2**18


class PartReader(Protocol):
    """Reads the stored parts of one tensor: whole, their shape alone, or a slice (what safetensors' ``get_slice``
    reads without the rest)."""

    def full(self, part: str) -> Tensor: ...

    def shape(self, part: str) -> tuple[int, ...]: ...

    def slice(self, part: str, index: tuple[slice, ...]) -> Tensor: ...


def _bits(reader: PartReader, part: str, start: int, stop: int, plane: int | None = None) -> Tensor:
    """Entries ``[start, stop)`` of a packed bit array (a row ``plane`` of a 2-D one), reading only their bytes."""
    low, high = start // 8, -(-stop // 8)
    index = (slice(low, high),) if plane is None else (slice(plane, plane + 1), slice(low, high))
    packed = reader.slice(part, index).reshape(-1)
    return unpack_bits(packed, (high - low) * 8)[start - 8 * low : stop - 8 * low]


class _Positions:
    """The positions of a ``bitmap`` or ``indices`` part, piece by piece: a bool mask of entries ``[start, stop)``."""

    def __init__(self, kind: str | None, reader: PartReader, part: str) -> None:
        self.kind, self.reader, self.part = kind, reader, part
        self.indices = reader.full(part).to(torch.int64) if kind == "indices" else None  # sorted flat indices

    def mask(self, start: int, stop: int) -> Tensor:
        if self.kind is None:
            return torch.zeros(stop - start, dtype=torch.bool)
        if self.kind == "bitmap":
            return _bits(self.reader, self.part, start, stop)
        assert self.indices is not None
        low, high = torch.searchsorted(self.indices, torch.tensor([start, stop])).tolist()
        mask = torch.zeros(stop - start, dtype=torch.bool)
        mask[self.indices[low:high] - start] = True
        return mask


def decode_pieces(
    record: dict[str, Any], reader: PartReader, entries: int = PIECE_ENTRIES
) -> Iterator[tuple[int, Tensor]]:
    """:func:`decode`'s ``F(ΔW)`` flattened, in consecutive pieces ``(first flat index, values)`` of whole rows and
    about ``entries`` entries, each equal bit for bit to that slice of :func:`decode`'s; only the stored parts of
    that piece are read (the factors of the low-rank form, whose product is formed whole as
    :func:`~lightning_delta.edits.lowrank.factor_product` forms it, are the one exception).

    Raises:
        ValueError: as :func:`decode`.
    """
    shape = torch.Size(record["shape"])
    numel, form = shape.numel(), record["form"]
    if form not in FORMS:
        raise ValueError(f"Unknown form {form!r} for tensor {record.get('name')!r}; the forms are {list(FORMS)}.")
    if form == "factors" or len(shape) == 0 or numel == 0:
        yield 0, decode(record, reader.full).reshape(-1)
        return
    row = numel // shape[0]
    step = max(1, entries // row) * row
    if form in ("dense", "post"):
        stored = reader.shape("values")
        _expect(tuple(stored) == tuple(shape), record, f"values of shape {tuple(stored)}")
        rows = step // row
        for first in range(0, shape[0], rows):
            yield first * row, reader.slice("values", (slice(first, first + rows),)).reshape(-1)
        return
    if form == "sparse":
        count = record["count"]
        stored = reader.shape("values")
        _expect(math.prod(stored) == count, record, f"{math.prod(stored)} values")
        positions = _Positions(record["positions"] if count else None, reader, "positions")
        dtype = reader.slice("values", (slice(0, 0),)).dtype
        offset = 0
        for start in range(0, numel, step):
            stop = min(start + step, numel)
            mask = positions.mask(start, stop)
            kept = int(mask.sum())
            piece = torch.zeros(stop - start, dtype=dtype)
            if kept:
                piece[mask] = reader.slice("values", (slice(offset, offset + kept),))
            offset += kept
            yield start, piece
        _expect(offset == count, record, "positions that do not match the values")
        return
    blocks = record["blocks"]
    magnitudes = reader.full("magnitudes")
    _expect(magnitudes.numel() == blocks, record, f"{magnitudes.numel()} magnitudes")
    planes = (blocks - 1).bit_length()
    if planes:
        stored_planes = reader.shape("index")[0]
        _expect(stored_planes == planes, record, f"{stored_planes} index bit planes")
    zeros = _Positions(record["zeros"], reader, "zeros") if record["zeros"] is not None else None
    for start in range(0, numel, step):
        stop = min(start + step, numel)
        negative = _bits(reader, "signs", start, stop)
        index = torch.zeros(stop - start, dtype=torch.int32)
        for plane in range(planes):
            index |= _bits(reader, "index", start, stop, plane).to(torch.int32) << plane
        _expect(int(index.max()) < blocks, record, "a block index past the magnitudes")
        magnitude = magnitudes.index_select(0, index)
        if zeros is not None:
            magnitude[zeros.mask(start, stop)] = 0
        yield start, torch.where(negative, -magnitude, magnitude)


def _expect(condition: bool, record: dict[str, Any], got: str) -> None:
    if not condition:
        raise ValueError(
            f"The stored parts of {record.get('name')!r} ({record['form']} form, shape {tuple(record['shape'])}) do "
            f"not match its record: {got}. The file is damaged or was not written by save_compressed; write it again."
        )


def stored_bytes(parts: Parts) -> int:
    """The bytes of the parts' data, as safetensors stores them."""
    return sum(tensor.numel() * tensor.element_size() for tensor in parts.values())
