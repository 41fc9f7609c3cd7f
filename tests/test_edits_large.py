"""The main edits on one 4096×14336 float32 delta (an 8B model's MLP matrix): results checked with vectorised
identities, and the peak memory above the input bounded to a few tensor-sized temporaries."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from lightning_delta.edits import DARE, BitDelta, LowRank, MagnitudePrune

pytestmark = pytest.mark.slow

SHAPE = (4096, 14336)
NUMEL = SHAPE[0] * SHAPE[1]
TENSOR_MIB = NUMEL * 4 / 2**20  # 224 MiB


def _peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:  # "5" resets VmHWM to the current RSS (Linux)
            clear_refs.write("5")
        return True
    except OSError:
        return False


def run_measured(function: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float | None]:
    """``function()`` and the peak resident memory it added, in tensors of SHAPE (None where not measurable)."""
    if not _reset_peak_rss():
        return function(), None
    before = _peak_rss_mib()
    out = function()
    return out, (_peak_rss_mib() - before) / TENSOR_MIB


@pytest.fixture(scope="module")
def delta() -> torch.Tensor:
    return 0.01 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def test_dare_large(delta):
    out, peak = run_measured(lambda: DARE(p=0.9, seed=0).edit_tensor("mlp.up_proj.weight", delta))
    kept = out != 0
    fraction_kept = kept.double().mean().item()
    assert abs(fraction_kept - 0.1) < 5 * math.sqrt(0.09 / NUMEL)
    assert torch.equal(out[kept], delta[kept] * (1 / 0.1))
    if peak is not None:
        assert peak < 2.5, f"DARE used {peak:.2f} tensors of temporary memory"


def test_magnitude_prune_large(delta):
    out, peak = run_measured(lambda: MagnitudePrune(p=0.9).edit_tensor("mlp.up_proj.weight", delta))
    kept = out != 0
    assert int(kept.sum()) == round(0.1 * NUMEL)
    assert torch.equal(out[kept], delta[kept])
    assert delta.abs()[kept].min() >= delta.abs()[~kept].max()
    if peak is not None:
        assert peak < 2.5, f"MagnitudePrune used {peak:.2f} tensors of temporary memory"


def test_bitdelta_large(delta):
    out, peak = run_measured(lambda: BitDelta(bits=3).edit_tensor("mlp.up_proj.weight", delta))
    assert torch.equal(torch.sign(out), torch.sign(delta))
    magnitudes = out.abs().reshape(-1)
    levels = magnitudes[:100_000].unique()
    levels = levels[levels > 0]  # randn draws a few exact zeros, whose sign 0 is kept
    assert levels.numel() == 4
    counts = torch.stack([(magnitudes == level).sum() for level in levels]).double()
    assert counts.sum().item() == (delta != 0).sum().item()  # every nonzero entry takes one of the 4 levels
    assert bool(((counts - NUMEL / 4).abs() < 1e-4 * NUMEL).all())  # equal-count blocks (float ties aside)
    # block means keep the total magnitude
    assert magnitudes.double().sum().item() == pytest.approx(delta.abs().double().sum().item(), rel=1e-6)
    if peak is not None:
        assert peak < 3.0, f"BitDelta used {peak:.2f} tensors of temporary memory"


def low_rank_delta(shape: tuple[int, int]) -> tuple[torch.Tensor, float]:
    """A rank-16 matrix plus 1e-3 noise, and the noise's norm (which bounds the best rank-16 error)."""
    generator = torch.Generator().manual_seed(1)
    low_rank = torch.randn(shape[0], 16, generator=generator) @ torch.randn(16, shape[1], generator=generator)
    noise = 1e-3 * torch.randn(shape, generator=generator)
    return low_rank.add_(noise), noise.norm().item()


def test_low_rank_large():
    # the randomized opt-in on the full 8B MLP matrix: a few passes over ΔW, under 2 tensors of temporaries
    delta, noise_norm = low_rank_delta(SHAPE)
    edit = LowRank(rank=16, method="randomized")
    out, peak = run_measured(lambda: edit.edit_tensor("mlp.up_proj.weight", delta))
    # Eckart–Young: the best rank-16 error is at most ‖noise‖; the randomized SVD gets within 1% of it
    assert (out - delta).norm().item() <= 1.01 * noise_norm
    if peak is not None:
        assert peak < 2.0, f"LowRank(method='randomized') used {peak:.2f} tensors of temporary memory"


def test_low_rank_exact_large():
    # the exact default: a full torch.linalg.svd, about 100 s on one thread at 4096×14336, so a quarter of it
    # (2048×7168, same aspect ratio, about 8 s); peak in tensors of that size
    shape = (SHAPE[0] // 2, SHAPE[1] // 2)
    delta, noise_norm = low_rank_delta(shape)
    if _reset_peak_rss():
        before = _peak_rss_mib()
        out = LowRank(rank=16).edit_tensor("mlp.up_proj.weight", delta)
        peak = (_peak_rss_mib() - before) / (TENSOR_MIB / 4)
    else:
        out, peak = LowRank(rank=16).edit_tensor("mlp.up_proj.weight", delta), None
    error = (out - delta).norm().item()
    assert error <= noise_norm  # Eckart–Young
    # with a clear gap after σ_16 the randomized opt-in finds the same F
    randomized = LowRank(rank=16, method="randomized").edit_tensor("mlp.up_proj.weight", delta).double()
    assert (randomized - out.double()).norm().item() < 1e-4 * out.double().norm().item()
    if peak is not None:
        assert peak < 4.0, f"LowRank used {peak:.2f} tensors of temporary memory"
