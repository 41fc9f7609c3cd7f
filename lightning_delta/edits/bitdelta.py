"""BitDelta and its extensions: signs times a few magnitudes (paper, sections 5.1 and 5.3, Figures 4 and 5)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_delta.edits.base import (
    DeltaEdit,
    Planning,
    check_choice,
    check_int,
    check_real,
    check_seed,
    flat_chunks,
    order_statistics,
    output_dtype,
    promoted_copy,
    tensor_generator,
)

__all__ = [
    "MAGNITUDE_MODES",
    "BitDelta",
    "block_statistics",
    "check_bitdelta",
    "check_blocks",
    "check_sign_of_zero",
    "magnitude_blocks",
    "number_of_blocks",
    "paper_bits",
    "quantize_magnitudes",
]

MAGNITUDE_MODES = ("mean", "normal", "uniform")


def check_blocks(bits: int, blocks: int | None) -> int | None:
    """``blocks`` checked: ``None``, or an int ``>= 1`` given with ``bits`` left at its default 1 (one of the two)."""
    if blocks is None:
        return None
    blocks = check_int("BitDelta", "blocks", blocks, minimum=1)
    if bits != 1:
        raise ValueError(
            f"BitDelta: give `bits` (sign bit included) or `blocks` (the paper's M), not both; got bits={bits!r} and "
            f"blocks={blocks!r}. bits=b is blocks=2**(b-1)."
        )
    return blocks


def check_sign_of_zero(value: int) -> int:
    """``sign_of_zero`` checked: 0 or 1."""
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(
            f"BitDelta: `sign_of_zero` must be 0 (an exact zero of ΔW stays 0) or 1 (it counts as positive, as "
            f"BitDelta's own packing does), got sign_of_zero={value!r}."
        )
    return int(value)


def check_bitdelta(bits: int, scale: float, magnitudes: str) -> tuple[int, float, str]:
    """``(bits, scale, magnitudes)`` checked: an int ``bits >= 1``, a finite ``scale >= 0``, a known mode."""
    bits = check_int("BitDelta", "bits", bits, minimum=1)
    scale_value = check_real("BitDelta", "scale", scale)
    if scale_value < 0:
        raise ValueError(
            f"BitDelta: `scale` must be >= 0 (a negative scale would flip every sign), got scale={scale!r}."
        )
    magnitudes = check_choice("BitDelta", "magnitudes", magnitudes, MAGNITUDE_MODES)
    return bits, scale_value, magnitudes


def number_of_blocks(bits: int) -> int:
    """``M = 2^(bits − 1)``, capped at ``2^64`` (more blocks than any tensor has entries: lossless anyway)."""
    return 2 ** min(bits - 1, 64)


def magnitude_blocks(config: Mapping[str, Any]) -> int:
    """``M``, the magnitude blocks of a BitDelta config (``edit.config()``, a results row's ``edit``): ``blocks``,
    else ``2^(bits − 1)``.

    Example:
        >>> magnitude_blocks({"bits": 3}), magnitude_blocks({"bits": 1, "blocks": 16})
        (4, 16)
    """
    if config.get("blocks") is not None:
        return int(config["blocks"])
    return number_of_blocks(int(config.get("bits", 1)))


def paper_bits(blocks: int) -> float:
    """The paper's bit count of ``M`` magnitude blocks, ``log2 M`` (section 5.3), which leaves the sign bit out:
    BitDelta (``M = 1``) is 0 there and 1 here (``bits = 1 + log2 M``).

    Example:
        >>> paper_bits(16), paper_bits(1)
        (4.0, 0.0)
    """
    return math.log2(blocks)


# Up to this many thresholds (bits <= 4, the paper's range) an entry's block is a sum of comparisons in uint8,
# several times faster on CPU than the binary search of torch.bucketize; both give the same index.
FEW_THRESHOLDS = 7


def _block_index(magnitudes: Tensor, thresholds: Tensor) -> Tensor | None:
    """Block of each magnitude, the number of thresholds ``<=`` it, as uint8 or int32; None without thresholds."""
    if thresholds.numel() == 0:
        return None
    if thresholds.numel() > FEW_THRESHOLDS:
        return torch.bucketize(magnitudes, thresholds, right=True, out_int32=True)
    index = (magnitudes >= thresholds[0]).to(torch.uint8)
    for threshold in thresholds[1:]:
        index += magnitudes >= threshold
    return index


def _sum64(values: Tensor) -> Tensor:
    """The float64 sum of a 1-D tensor, in an order that does not depend on the number of threads.

    torch's CPU reductions split the sum by thread, so the last bits of the result change with
    ``torch.set_num_threads``; on CPU numpy's single-threaded pairwise sum is used instead.
    """
    if values.device.type == "cpu":
        return torch.tensor(np.add.reduce(values.numpy(), dtype=np.float64), dtype=torch.float64)
    return values.sum(dtype=torch.float64)


def block_statistics(delta: Tensor, blocks: int, with_std: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split ``|ΔW|`` into ``blocks`` equal-count blocks by ascending magnitude; per-block statistics.

    The entry of ascending magnitude rank ``r`` (0-based, ``n`` entries) belongs to block ``floor(r·blocks/n)``.
    It is computed without sorting: the thresholds are the values of ranks ``ceil(b·n/blocks)``,
    ``b = 1 … blocks − 1`` (:func:`~lightning_delta.edits.base.order_statistics`), and an entry's block is the
    number of thresholds ``<=`` its magnitude. On inputs without ties this is exactly the rank rule; equal
    magnitudes always share a block (the highest one their value reaches), so with ties a block can hold a few more
    or fewer entries than ``n/blocks`` (bf16 deltas have many ties), and every block mean is the mean of exactly the
    entries that receive it.

    Sums are accumulated in float64 in a fixed order (``torch.bincount`` on CPU is a serial loop; one block uses
    :func:`_sum64`), so the statistics are bit-identical whatever the number of threads. On CUDA ``bincount`` adds
    with atomics and the last bits of the means can vary from run to run when ``blocks > 1``.

    Shapes:
        - ``delta``: any shape with ``blocks <= numel``. Outputs: ``thresholds`` ``(blocks − 1,)`` in the promoted
          dtype; ``counts`` ``(blocks,)`` int64; ``means`` and ``stds`` ``(blocks,)`` float64 (``stds`` is the
          population standard deviation of ``|ΔW|`` within the block, 0 for empty blocks, and all zeros when
          ``with_std`` is False).

    Example:
        >>> thresholds, counts, means, stds = block_statistics(torch.tensor([-4.0, 1.0, -2.0, 3.0]), blocks=2)
        >>> thresholds.tolist(), counts.tolist(), means.tolist()
        ([3.0], [2, 2], [1.5, 3.5])
    """
    dtype = output_dtype(delta)
    flat = delta.detach().reshape(-1)
    n = flat.numel()
    boundary_ranks = [(b * n + blocks - 1) // blocks for b in range(1, blocks)]  # ceil(b·n/blocks)
    if boundary_ranks:
        thresholds = order_statistics(flat.abs().to(dtype), boundary_ranks).to(flat.device)
    else:
        thresholds = torch.empty(0, dtype=dtype, device=flat.device)
    counts = torch.zeros(blocks, dtype=torch.float64, device=flat.device)
    sums = torch.zeros_like(counts)
    squares = torch.zeros_like(counts)
    for part in flat_chunks(n):
        magnitude = flat[part].abs().to(dtype)
        index = _block_index(magnitude, thresholds)
        if index is None:  # one block
            counts += magnitude.numel()
            sums += _sum64(magnitude)
            if with_std:
                squares += _sum64(magnitude.double().square_())
            continue
        counts += torch.bincount(index, minlength=blocks)
        magnitude = magnitude.double()
        sums += torch.bincount(index, weights=magnitude, minlength=blocks)
        if with_std:
            squares += torch.bincount(index, weights=magnitude.square_(), minlength=blocks)
    safe_counts = counts.clamp_min(1.0)
    means = sums / safe_counts
    stds = (squares / safe_counts - means * means).clamp_min(0.0).sqrt()
    return thresholds, counts.to(torch.int64), means, stds


def quantize_magnitudes(
    delta: Tensor,
    bits: int = 1,
    scale: float = 1.0,
    magnitudes: str = "mean",
    generator: torch.Generator | None = None,
    blocks: int | None = None,
    sign_of_zero: int = 0,
) -> Tensor:
    r"""BitDelta (Liu et al. 2024; paper, equation 7) and the paper's extensions (section 5.3), as a pure function.

    .. math::
        F(\Delta W)_i = s \cdot m_{B(i)} \cdot \mathrm{sign}(\Delta W_i)

    ``bits`` counts the sign bit: ``M = 2^{bits − 1}`` magnitude blocks (:func:`block_statistics`: the entry of
    ascending ``|ΔW|`` rank ``r`` lies in block ``B(i) = floor(r·M/n)``). ``bits = 1`` is BitDelta,
    ``mean(|ΔW|)·sign(ΔW)`` over the whole tensor; more bits replace each magnitude by its block's mean (Figure 4,
    whose axis is the paper's bits ``log2 M = bits − 1``, :func:`paper_bits`). ``blocks`` gives ``M`` directly (the
    paper's count: its 4 bits are ``blocks=16``, ``bits=5`` here; any ``M``, not only powers of two), with ``bits``
    left at 1. ``M >= n`` is lossless: ``s·ΔW`` is returned without sampling, in every mode. ``s`` is ``scale``,
    the "degenerate" statistic of Figure 5 (``s = 1`` is BitDelta).

    ``magnitudes`` chooses ``m`` (Figure 5 samples the magnitudes around the mean):

    * ``"mean"``: ``m_i`` = the block mean ``μ_B``. Deterministic.
    * ``"uniform"``: ``m_i ~ U[0, 2 μ_B]`` i.i.d., mean ``μ_B``, never negative.
    * ``"normal"``: ``m_i = max(0, μ_B + σ_B z_i)``, ``z_i ~ N(0, 1)`` i.i.d., where ``σ_B`` is the population
      standard deviation of ``|ΔW|`` in the block. A negative draw is **clipped to 0**: a magnitude cannot be
      negative, and keeping the draw would flip that entry's sign, which BitDelta exists to keep. The clipped
      entry becomes 0 (its sign is not reversed), and the mean magnitude rises from ``μ`` to
      ``μ Φ(μ/σ) + σ φ(μ/σ)``. For a Gaussian delta at one bit (``|ΔW|`` half-normal, ``μ/σ ≈ 1.32``) about 9% of
      the draws are clipped and the mean rises by about 3.3%; folding (``|draw|``) would double that bias and
      redrawing until positive would raise it to about 14%. With more bits the blocks are narrow and clipping is
      rare except in the block nearest 0.

    The random draws are ``torch.rand`` (uniform) or ``torch.randn`` (normal) from ``generator`` in the promoted
    dtype, over the flattened tensor in chunks of :data:`~lightning_delta.edits.base.CHUNK_NUMEL` entries.
    Signs are always kept. ``sign_of_zero`` is ``sign(0)``: 0 (the default) keeps a zero delta entry at 0;
    1 is the convention of BitDelta's own packing (its sign mask is ``ΔW >= 0``), which moves it by ``+s·m`` and
    lets one bit per entry store every sign (bf16 deltas have many exact zeros: weights that did not move at bf16
    resolution). The lossless case ``M >= n`` returns ``s·ΔW`` either way.

    Shapes:
        - ``delta``: any shape. Output: same shape, dtype promoted to at least float32.

    Example:
        >>> quantize_magnitudes(torch.tensor([-4.0, 1.0, -2.0, 3.0]))
        tensor([-2.5000,  2.5000, -2.5000,  2.5000])
        >>> quantize_magnitudes(torch.tensor([-4.0, 1.0, -2.0, 3.0]), bits=2)
        tensor([-3.5000,  1.5000, -1.5000,  3.5000])
        >>> quantize_magnitudes(torch.tensor([-4.0, 1.0, -2.0, 3.0]), blocks=2)  # the paper's 1 bit: M = 2
        tensor([-3.5000,  1.5000, -1.5000,  3.5000])
    """
    bits, scale, magnitudes = check_bitdelta(bits, scale, magnitudes)
    blocks = check_blocks(bits, blocks)
    sign_of_zero = check_sign_of_zero(sign_of_zero)
    blocks = number_of_blocks(bits) if blocks is None else blocks
    n = delta.numel()
    if blocks >= n:  # one entry per block: every magnitude is its own block mean
        return promoted_copy(delta) if scale == 1.0 else delta.to(output_dtype(delta)) * scale
    if magnitudes != "mean" and generator is None:
        generator = torch.Generator(device=delta.device)
    dtype = output_dtype(delta)
    thresholds, _, means, stds = block_statistics(delta, blocks, with_std=magnitudes == "normal")
    means, stds = means.to(dtype), stds.to(dtype)
    flat = delta.detach().reshape(-1)
    out = torch.empty(n, dtype=dtype, device=delta.device)
    for part in flat_chunks(n):
        work = flat[part].to(dtype)
        index = _block_index(work.abs(), thresholds)
        if index is not None:
            index = index.to(torch.int32)
        block_mean = means[0] if index is None else means.index_select(0, index)  # one block: 0-d, broadcast
        if magnitudes == "mean":
            magnitude = block_mean
        elif magnitudes == "uniform":
            draws = torch.rand(work.shape, generator=generator, device=work.device, dtype=dtype)
            magnitude = draws.mul_(2.0 * block_mean)
        else:
            block_std = stds[0] if index is None else stds.index_select(0, index)
            draws = torch.randn(work.shape, generator=generator, device=work.device, dtype=dtype)
            magnitude = draws.mul_(block_std).add_(block_mean).clamp_min_(0.0)
        signs = torch.sign(work)
        if sign_of_zero:
            signs.masked_fill_(work == 0, 1.0)
        out[part] = signs.mul_(magnitude).mul_(scale)
    return out.view(delta.shape)


class BitDelta(DeltaEdit):
    r"""BitDelta and its extensions (paper, sections 5.1 and 5.3): each delta entry becomes its sign times one of
    ``2^{bits − 1}`` magnitudes.

    .. math::
        F(\Delta W) = s \cdot \mathrm{AVG}(|\Delta W|) \cdot \mathrm{sign}(\Delta W) \quad (\text{bits} = 1)

    **Bits.** ``bits`` counts the sign bit, as BitDelta's own paper does (1 bit per entry). With ``bits > 1``
    (Figure 4) ``|ΔW|`` is cut by ascending magnitude into ``M = 2^{bits − 1}`` equal-count blocks, the entry of
    rank ``r`` in block ``floor(r·M/n)``, and each magnitude is replaced by its block's mean; ``M >= n`` returns
    ``s·ΔW`` (lossless). The unified-view paper counts ``log2 M`` bits (section 5.3), the sign left out: its
    "4 bits" are ``M = 16``, ``BitDelta(blocks=16)`` or ``BitDelta(bits=5)`` here. ``blocks`` takes that count
    directly (any ``M >= 1``; ``bits`` then stays 1); :attr:`num_blocks` and :attr:`paper_bits` read both back. ``scale`` (``s``) multiplies the
    statistic (Figure 5, "degenerate"); ``magnitudes="normal"`` or ``"uniform"`` samples the magnitudes around
    the block means (Figure 5); negative normal draws are clipped to 0, see :func:`quantize_magnitudes` for the
    definition and the bias this causes. Statistics are per tensor.

    Random draws (``normal``/``uniform`` only) come from ``tensor_generator(seed, name, delta.device)``.

    Args:
        bits: bits per entry including the sign bit, an int ``>= 1``: ``M = 2^{bits − 1}`` blocks.
        scale: multiplier of the magnitudes, a finite real ``>= 0``; 1 is BitDelta.
        magnitudes: ``"mean"`` (BitDelta), ``"normal"`` or ``"uniform"``.
        seed: run seed, an int ``>= 0`` (unused by ``"mean"``).
        blocks: the number of magnitude blocks ``M``, the paper's count (its bits are ``log2 M``); ``None`` takes
            ``M`` from ``bits``.
        sign_of_zero: ``sign(0)``: 0 keeps an exact zero of ΔW at 0; 1 counts it as positive, as BitDelta's own
            packing does, so that a stored sign bit per entry is all the file needs (see :func:`quantize_magnitudes`).

    Raises:
        ValueError: if ``bits`` is not an int ``>= 1``, ``scale`` is negative or not finite, ``magnitudes`` is not
            one of ``"mean"``, ``"normal"``, ``"uniform"``, ``seed`` is not a non-negative int, ``blocks`` is not
            ``None`` or an int ``>= 1``, both ``blocks`` and ``bits != 1`` are given, or ``sign_of_zero`` is not 0
            or 1.

    Example:
        >>> BitDelta()({"w": torch.tensor([-4.0, 1.0, -2.0, 3.0])})["w"]
        tensor([-2.5000,  2.5000, -2.5000,  2.5000])
        >>> BitDelta(bits=2)({"w": torch.tensor([-4.0, 1.0, -2.0, 3.0])})["w"]
        tensor([-3.5000,  1.5000, -1.5000,  3.5000])
        >>> BitDelta(blocks=16).num_blocks, BitDelta(blocks=16).paper_bits, BitDelta(bits=5).num_blocks
        (16, 4.0, 16)
    """

    name = "bitdelta"
    label = "BitDelta"  # how figures and tables name the edit
    reference = "paper, sections 5.1 and 5.3"  # where the paper defines it
    shown = ("bits", "blocks", "scale", "magnitudes")  # what labels and tables show
    hidden_at = {"scale": 1.0, "magnitudes": "mean"}  # BitDelta itself: left out of labels
    planning = Planning("bits", "bits per entry (sign bit included)", (1, 2, 3, 4))

    @classmethod
    def draws_random(cls, config: Mapping[str, Any]) -> bool:
        """Only sampled magnitudes (``normal``, ``uniform``) draw."""
        return config.get("magnitudes", "mean") != "mean"

    @classmethod
    def shown_arguments(cls, config: Mapping[str, Any]) -> list[str]:
        """Given ``blocks``, ``bits`` stays 1 and says nothing."""
        shown = super().shown_arguments(config)
        return [key for key in shown if key != "bits"] if config.get("blocks") is not None else shown

    @classmethod
    def at_setting(cls, value: float, seed: int = 0) -> BitDelta:
        """BitDelta with ``value`` bits per entry, the sign bit included."""
        return cls(bits=int(value))

    def __init__(
        self,
        bits: int = 1,
        scale: float = 1.0,
        magnitudes: str = "mean",
        seed: int = 0,
        blocks: int | None = None,
        sign_of_zero: int = 0,
    ) -> None:
        self.bits, self.scale, self.magnitudes = check_bitdelta(bits, scale, magnitudes)
        self.seed = check_seed(seed, "BitDelta")
        self.blocks = check_blocks(self.bits, blocks)
        self.sign_of_zero = check_sign_of_zero(sign_of_zero)

    @property
    def num_blocks(self) -> int:
        """``M``, the number of magnitude blocks: ``blocks``, else ``2^{bits − 1}``."""
        return self.blocks if self.blocks is not None else number_of_blocks(self.bits)

    @property
    def paper_bits(self) -> float:
        """The paper's bit count, ``log2 M`` (the sign bit left out): 0 for BitDelta, 4 for ``M = 16``."""
        return paper_bits(self.num_blocks)

    @torch.no_grad()
    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        generator = None
        if self.magnitudes != "mean" and self.num_blocks < delta.numel():
            generator = tensor_generator(self.seed, name, delta.device)
        return quantize_magnitudes(
            delta, self.bits, self.scale, self.magnitudes, generator, self.blocks, self.sign_of_zero
        )
