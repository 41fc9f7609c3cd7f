"""Tests of :mod:`lightning_delta.edits`: every operation against a reference written differently (float64 loops or
numpy), the paper's identities, determinism, argument checks and the shared contract of the edits."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_delta import edits
from lightning_delta.edits import (
    DARE,
    DELLA,
    BitDelta,
    DeltaEdit,
    Extrapolate,
    GradientBiased,
    LowRank,
    MagnitudePrune,
    SignBiased,
    build,
    tensor_generator,
)
from lightning_delta.edits.base import single_threaded
from lightning_delta.edits.lowrank import truncated_svd

REPO = Path(__file__).resolve().parents[1]


def svd64(matrix: torch.Tensor) -> torch.return_types.linalg_svd:
    """The reference SVD in float64 (one thread: multi-threaded MKL SVD crawls on a busy two-core machine)."""
    with single_threaded():
        return torch.linalg.svd(matrix.double(), full_matrices=False)


def numerical_rank(matrix: torch.Tensor, rtol: float = 1e-5) -> int:
    singular_values = svd64(matrix).S
    return int((singular_values > rtol * singular_values[0]).sum())


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def uniforms(seed: int, name: str, numel: int) -> list[float]:
    """The float32 uniforms a randomised edit draws for a tensor of ``numel`` entries (one chunk)."""
    return torch.rand(numel, generator=tensor_generator(seed, name)).double().tolist()


def deltas_mapping() -> dict[str, torch.Tensor]:
    """A small state dict of deltas of several shapes, including a 0-d and an empty tensor."""
    return {
        "layers.0.attn.q_proj.weight": randn(16, 24, seed=1),
        "layers.0.attn.q_proj.bias": randn(24, seed=2),
        "embed_tokens.weight": randn(40, 16, seed=3),
        "layers.0.norm.weight": randn(1, seed=4).reshape(()),
        "empty.weight": torch.zeros(0, 5),
    }


def gradients_for(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: randn(*delta.shape, seed=100 + i) for i, (name, delta) in enumerate(deltas.items())}


# Every operation, with non-default settings where there are any.
EDIT_CASES = [
    DARE(p=0.7, seed=3),
    DARE(p=0.5, k=-0.5, seed=1),
    DARE(p=0.3, rescale=False, seed=2),
    DELLA(p=0.6, epsilon=0.4, seed=2),
    SignBiased(p=0.5, k=0.5),
    GradientBiased(p=0.5, k=1.5),
    BitDelta(),
    BitDelta(bits=3),
    BitDelta(bits=2, magnitudes="normal", seed=5),
    BitDelta(bits=1, scale=0.8, magnitudes="uniform", seed=6),
    MagnitudePrune(p=0.8),
    LowRank(rank=3),
    LowRank(fraction=0.5, method="exact"),
    LowRank(rank=2, method="randomized", seed=4),
    Extrapolate(alpha=0.3),
]
EDIT_IDS = [repr(edit) for edit in EDIT_CASES]


# ----------------------------------------------------------------------------------------------------------------
# Registry


def test_available_lists_every_edit_once():
    assert edits.available() == [
        "dare",
        "della",
        "sign_biased",
        "gradient_biased",
        "bitdelta",
        "lowrank",
        "magnitude_prune",
        "extrapolate",
    ]
    assert {type(edit).name for edit in EDIT_CASES} == set(edits.available())


@pytest.mark.parametrize("edit", EDIT_CASES, ids=EDIT_IDS)
def test_build_from_config_rebuilds_an_equal_edit(edit):
    rebuilt = build(**edit.config())
    assert type(rebuilt) is type(edit)
    assert rebuilt == edit and hash(rebuilt) == hash(edit)
    assert repr(rebuilt) == repr(edit)
    deltas = deltas_mapping()
    gradients = gradients_for(deltas)
    first, second = edit(deltas, gradients), rebuilt(deltas, gradients)
    assert all(torch.equal(first[name], second[name]) for name in deltas)


def test_edits_with_different_settings_are_not_equal():
    assert DARE(p=0.5, seed=0) != DARE(p=0.5, seed=1)
    assert DARE(p=0.5) != DELLA(p=0.5, epsilon=0.0)
    assert build("dare", p=0.5) == DARE(p=0.5)


def test_build_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"'daré'.*\['dare', 'della'.*'extrapolate'\]"):
        build("daré", p=0.5)


def test_build_unknown_argument_lists_known_arguments():
    with pytest.raises(ValueError, match=r"\['drop_rate'\].*\['p', 'k', 'rescale', 'seed'\]"):
        build("dare", drop_rate=0.5)


def test_build_missing_argument_is_a_value_error():
    with pytest.raises(ValueError, match=r"needs argument\(s\) \['alpha'\]"):
        build("extrapolate")


def test_build_checks_values_like_the_constructor():
    with pytest.raises(ValueError, match="p=1.5"):
        build("magnitude_prune", p=1.5)


# ----------------------------------------------------------------------------------------------------------------
# Bad arguments: ValueError at construction naming the value


BAD_ARGUMENTS = [
    (DARE, {"p": 1.0}, r"\[0, 1\).*p=1\.0"),
    (DARE, {"p": -0.1}, r"p=-0\.1"),
    (DARE, {"p": float("nan")}, r"p=nan"),
    (DARE, {"p": "0.5"}, r"p='0\.5'"),
    (DARE, {"p": True}, r"p=True"),
    (DARE, {"p": 0.5, "k": float("inf")}, r"k=inf"),
    (DARE, {"p": 0.5, "rescale": "no"}, r"rescale='no'"),
    (DARE, {"p": 0.5, "k": 0.5, "rescale": False}, r"k=0\.5.*rescale=True"),
    (DARE, {"p": 0.5, "seed": -1}, r"seed=-1"),
    (DARE, {"p": 0.5, "seed": 1.5}, r"seed=1\.5"),
    (DELLA, {"p": 0.5, "epsilon": 1.2}, r"epsilon=1\.2"),
    (DELLA, {"p": 0.1, "epsilon": 0.3}, r"\[0, 0\.2\].*epsilon=0\.3"),
    (DELLA, {"p": 0.5, "epsilon": -0.1}, r"epsilon=-0\.1"),
    (DELLA, {"p": 1.0, "epsilon": 0.0}, r"p=1\.0"),
    (SignBiased, {"p": 1.0, "k": 0.5}, r"p=1\.0"),
    (SignBiased, {"p": 0.5, "k": float("nan")}, r"k=nan"),
    (GradientBiased, {"p": -1, "k": 0.5}, r"p=-1"),
    (BitDelta, {"bits": 0}, r"bits=0"),
    (BitDelta, {"bits": 2.0}, r"bits=2\.0"),
    (BitDelta, {"scale": -1.0}, r"scale=-1\.0"),
    (BitDelta, {"scale": float("nan")}, r"scale=nan"),
    (BitDelta, {"magnitudes": "median"}, r"\['mean', 'normal', 'uniform'\].*magnitudes='median'"),
    (BitDelta, {"seed": -3}, r"seed=-3"),
    (MagnitudePrune, {"p": 1.0}, r"p=1\.0"),
    (MagnitudePrune, {"p": float("-inf")}, r"p=-inf"),
    (LowRank, {}, r"exactly one of `rank` and `fraction`"),
    (LowRank, {"rank": 4, "fraction": 0.5}, r"rank=4 and fraction=0\.5"),
    (LowRank, {"rank": 0}, r"rank=0"),
    (LowRank, {"rank": 2.5}, r"rank=2\.5"),
    (LowRank, {"fraction": 0.0}, r"fraction=0\.0"),
    (LowRank, {"fraction": 1.5}, r"fraction=1\.5"),
    (LowRank, {"rank": 4, "method": "svd"}, r"\['exact', 'randomized'\].*method='svd'"),
    (LowRank, {"rank": 4, "method": None}, r"\['exact', 'randomized'\].*method=None"),
    (LowRank, {"rank": 4, "method": True}, r"\['exact', 'randomized'\].*method=True"),
    (Extrapolate, {"alpha": float("nan")}, r"alpha=nan"),
    (Extrapolate, {"alpha": float("inf")}, r"alpha=inf"),
    (Extrapolate, {"alpha": None}, r"alpha=None"),
]


@pytest.mark.parametrize("cls, arguments, match", BAD_ARGUMENTS, ids=[f"{c.__name__}-{a}" for c, a, _ in BAD_ARGUMENTS])
def test_bad_arguments_raise_value_error(cls, arguments, match):
    with pytest.raises(ValueError, match=match):
        cls(**arguments)


# ----------------------------------------------------------------------------------------------------------------
# The shared contract


@pytest.mark.parametrize("edit", EDIT_CASES, ids=EDIT_IDS)
def test_inputs_untouched_and_outputs_new(edit):
    deltas = deltas_mapping()
    gradients = gradients_for(deltas)
    before = {name: delta.clone() for name, delta in deltas.items()}
    gradients_before = {name: gradient.clone() for name, gradient in gradients.items()}
    out = edit(deltas, gradients)
    assert list(out) == list(deltas)
    assert out is not deltas
    for name, delta in deltas.items():
        assert torch.equal(delta, before[name])
        assert torch.equal(gradients[name], gradients_before[name])
        assert out[name].shape == delta.shape and out[name].dtype == torch.float32
        if delta.numel():
            assert out[name].data_ptr() != delta.data_ptr()
            out[name].add_(1.0)  # writing to an output never reaches the input
            assert torch.equal(delta, before[name])


@pytest.mark.parametrize("edit", EDIT_CASES, ids=EDIT_IDS)
def test_bf16_input_gives_float32_close_to_the_float32_result(edit):
    deltas = {name: delta.to(torch.bfloat16) for name, delta in deltas_mapping().items()}
    gradients = gradients_for(deltas)
    out = edit(deltas, gradients)
    assert all(tensor.dtype == torch.float32 for tensor in out.values())
    # same as editing the bf16 values after an exact upcast to float32
    upcast = edit({name: delta.float() for name, delta in deltas.items()}, gradients)
    for name in deltas:
        torch.testing.assert_close(out[name], upcast[name], rtol=1e-5, atol=1e-6)
    float64 = edit({name: delta.double() for name, delta in deltas.items()}, gradients)
    assert all(tensor.dtype == torch.float64 for tensor in float64.values())


@pytest.mark.parametrize("edit", EDIT_CASES, ids=EDIT_IDS)
def test_edit_tensor_matches_call(edit):
    deltas = deltas_mapping()
    gradients = gradients_for(deltas)
    out = edit(deltas, gradients)
    for name, delta in deltas.items():
        assert torch.equal(edit.edit_tensor(name, delta, gradients[name]), out[name])


@pytest.mark.parametrize("edit", EDIT_CASES, ids=EDIT_IDS)
def test_deterministic_whatever_the_order_of_the_mapping(edit):
    deltas = deltas_mapping()
    gradients = gradients_for(deltas)
    forward = edit(deltas, gradients)
    backward = edit(dict(reversed(list(deltas.items()))), gradients)
    alone = {name: edit({name: delta}, {name: gradients[name]})[name] for name, delta in deltas.items()}
    for name in deltas:
        assert torch.equal(forward[name], backward[name])
        assert torch.equal(forward[name], alone[name])


@pytest.mark.parametrize("edit", EDIT_CASES, ids=EDIT_IDS)
def test_outputs_never_require_grad(edit):
    deltas = {name: delta.clone().requires_grad_() for name, delta in deltas_mapping().items()}
    gradients = gradients_for(deltas)
    out = edit(deltas, gradients)
    plain = edit({name: delta.detach() for name, delta in deltas.items()}, gradients)
    for name, delta in deltas.items():
        single = edit.edit_tensor(name, delta, gradients[name])
        assert not out[name].requires_grad and not single.requires_grad
        assert torch.equal(out[name], plain[name]) and torch.equal(single, plain[name])


def test_single_threaded_restores_the_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), single_threaded():
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_global_rng_neither_read_nor_advanced():
    deltas = deltas_mapping()
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    first = [edit(deltas, gradients_for(deltas)) for edit in EDIT_CASES]
    assert torch.equal(torch.rand(4), expected_next)
    torch.manual_seed(999)
    second = [edit(deltas, gradients_for(deltas)) for edit in EDIT_CASES]
    for a, b in zip(first, second):
        assert all(torch.equal(a[name], b[name]) for name in deltas)


def _medium_deltas() -> dict[str, torch.Tensor]:
    # Large enough for intra-op parallelism and multi-threaded BLAS to engage.
    return {"mlp.up_proj.weight": randn(384, 1536, seed=7), "mlp.up_proj.bias": randn(1536, seed=8)}


@pytest.mark.parametrize("edit", EDIT_CASES, ids=EDIT_IDS)
def test_deterministic_with_one_or_two_threads(edit):
    deltas = _medium_deltas()
    gradients = gradients_for(deltas)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = edit(deltas, gradients)
        torch.set_num_threads(2)
        two = edit(deltas, gradients)
    finally:
        torch.set_num_threads(threads)
    for name in deltas:
        assert torch.equal(one[name], two[name]), name


@pytest.mark.subprocess
def test_deterministic_in_another_process(tmp_path):
    """A fresh interpreter with another hash seed and one thread gives bit-identical results."""
    deltas = _medium_deltas()
    gradients = gradients_for(deltas)
    torch.save(
        {"deltas": deltas, "gradients": gradients, "configs": [e.config() for e in EDIT_CASES]}, tmp_path / "inputs.pt"
    )
    script = textwrap.dedent(
        """
        import sys, torch
        torch.set_num_threads(1)
        from lightning_delta.edits import build
        data = torch.load(sys.argv[1])
        out = [build(**config)(data["deltas"], data["gradients"]) for config in data["configs"]]
        torch.save(out, sys.argv[2])
        """
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        check=True,
        cwd=REPO,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    theirs = torch.load(tmp_path / "out.pt")
    for edit, other in zip(EDIT_CASES, theirs):
        ours = edit(deltas, gradients)
        for name in deltas:
            assert torch.equal(ours[name], other[name]), (edit, name)


def test_seed_and_name_change_the_random_draws():
    delta = randn(64, 64, seed=9)
    base = DARE(p=0.5, seed=0).edit_tensor("a", delta)
    assert not torch.equal(base, DARE(p=0.5, seed=1).edit_tensor("a", delta))
    assert not torch.equal(base, DARE(p=0.5, seed=0).edit_tensor("b", delta))
    assert torch.equal(base, DARE(p=0.5, seed=0).edit_tensor("a", delta))


def test_tensor_generator_is_independent_of_python_hash_and_seeds_mix():
    # Fixed value: crc32-based, so it is the same in every process and on every rank.
    seeds = {edits.base.tensor_seed(seed, "w") for seed in range(50)}
    assert len(seeds) == 50
    assert all(0 <= seed < 2**63 for seed in seeds)
    # Runs that differ only in the high bits of the seed still draw different masks.
    assert not torch.equal(
        torch.rand(8, generator=tensor_generator(0, "w")), torch.rand(8, generator=tensor_generator(2**32, "w"))
    )


# ----------------------------------------------------------------------------------------------------------------
# DARE and its extension (sections 4.1, 4.2)


def dare_reference(delta: torch.Tensor, p: float, k: float, rescale: bool, seed: int, name: str) -> torch.Tensor:
    """Entry by entry in float64: k·ΔW where dropped (u < p), (1 − kp)/(1 − p)·ΔW (or ΔW without rescale)."""
    values = delta.double().flatten().tolist()
    draws = uniforms(seed, name, len(values))
    kept_scale = (1 - k * p) / (1 - p) if rescale else 1.0
    out = [k * x if u < p else kept_scale * x for x, u in zip(values, draws)]
    return torch.tensor(out, dtype=torch.float64).reshape(delta.shape)


@pytest.mark.parametrize(
    "p, k, rescale",
    [(0.1, 0.0, True), (0.9, 0.0, True), (0.5, -1.0, True), (0.3, 0.8, True), (0.6, 1.5, True), (0.5, 0.0, False)],
)
def test_dare_matches_reference(p, k, rescale):
    delta = randn(12, 20, seed=11)
    out = DARE(p=p, k=k, rescale=rescale, seed=4).edit_tensor("w", delta)
    torch.testing.assert_close(out.double(), dare_reference(delta, p, k, rescale, 4, "w"), rtol=1e-6, atol=0)


def test_dare_k0_is_drop_and_rescale():
    delta = randn(50, 40, seed=12)
    out = DARE(p=0.7, seed=0).edit_tensor("w", delta)
    dropped = out == 0
    # kept entries are exactly ΔW / (1 − p); dropped entries are zero; about p of them are dropped
    torch.testing.assert_close(out[~dropped], delta[~dropped] / 0.3, rtol=1e-6, atol=0)
    assert abs(dropped.double().mean().item() - 0.7) < 4 * math.sqrt(0.7 * 0.3 / delta.numel())


def test_dare_without_rescale_is_drop_only():
    delta = randn(50, 40, seed=13)
    out = DARE(p=0.4, rescale=False, seed=3).edit_tensor("w", delta)
    rescaled = DARE(p=0.4, seed=3).edit_tensor("w", delta)
    kept = out != 0
    assert torch.equal(out[kept], delta[kept])
    assert torch.equal(kept, rescaled != 0)  # the same mask


def test_dare_negative_k_flips_the_dropped_entries():
    delta = randn(30, 30, seed=14)
    out = DARE(p=0.5, k=-1.0, seed=2).edit_tensor("w", delta)
    flipped = torch.sign(out) != torch.sign(delta)
    torch.testing.assert_close(out[flipped], -delta[flipped])
    torch.testing.assert_close(out[~flipped], 3.0 * delta[~flipped])  # (1 − kp)/(1 − p) = 1.5/0.5


def test_dare_no_op_settings_return_a_copy():
    delta = randn(5, 6, seed=15)
    for edit in (DARE(p=0.0), DARE(p=0.6, k=1.0)):
        out = edit.edit_tensor("w", delta)
        assert torch.equal(out, delta) and out.data_ptr() != delta.data_ptr()


def _unbiasedness_z(outputs: torch.Tensor, delta: torch.Tensor, p: float, k: float) -> float:
    """z-score of Σ_i ΔW_i (F_i − ΔW_i) summed over runs, against DARE's variance ΔW_i² (k − c)² p (1 − p)."""
    c = (1 - k * p) / (1 - p)
    statistic = ((outputs.double() - delta.double()) * delta.double()).sum().item()
    variance = outputs.shape[0] * (delta.double() ** 4).sum().item() * (k - c) ** 2 * p * (1 - p)
    return statistic / math.sqrt(variance)


@pytest.mark.slow
@pytest.mark.parametrize("p, k", [(0.5, 0.0), (0.9, 0.0), (0.3, -0.5), (0.6, 0.5)])
def test_dare_is_unbiased_and_a_wrong_rescale_fails_the_same_bound(p, k):
    """E[F(ΔW)] = ΔW (sections 4.1, 4.2): the mean edit ⟨ΔW, F(ΔW) − ΔW⟩ over 64 seeds stays within 5σ, while
    rescales off by 2%, or without the k correction, or no rescale at all, are far outside."""
    delta = randn(256, 256, seed=16)
    runs = 64
    outputs = torch.stack([DARE(p=p, k=k, seed=seed).edit_tensor("w", delta) for seed in range(runs)])
    assert abs(_unbiasedness_z(outputs, delta, p, k)) < 5
    # per entry too: the mean over runs of F(ΔW)/ΔW is 1 within 5 standard errors everywhere on average
    ratio = (outputs.double() / delta.double()).mean(0)
    c = (1 - k * p) / (1 - p)
    standard_error = abs(k - c) * math.sqrt(p * (1 - p) / runs)
    assert abs((ratio - 1).mean().item()) < 5 * standard_error / math.sqrt(delta.numel())

    dropped = outputs == k * delta  # the masks; kept entries are c·ΔW
    wrong_outputs = {
        "2% too large": outputs * 1.02,
        "1/(1 − p) whatever k": torch.where(dropped, outputs, delta / (1 - p)),
        "no rescale": torch.where(dropped, outputs, delta.expand_as(outputs)),
    }
    for label, wrong in wrong_outputs.items():
        if label == "1/(1 − p) whatever k" and k == 0.0:
            continue  # the same as the right rescale
        assert abs(_unbiasedness_z(wrong, delta, p, k)) > 5, label


def test_dare_riemann_term_is_near_zero_but_gradient_biased_is_not():
    """Section 4.3: with a gradient independent of the mask ⟨∇L, E⟩ ≈ 0 for DARE, not for the gradient-biased rule."""
    delta, gradient = randn(300, 300, seed=17), randn(300, 300, seed=18)
    p, k = 0.5, 0.5
    c = (1 - k * p) / (1 - p)
    sigma = math.sqrt(((delta.double() * gradient.double()) ** 2).sum().item() * (k - c) ** 2 * p * (1 - p))
    dare_edit = DARE(p=p, k=k, seed=1).edit_tensor("w", delta) - delta
    biased_edit = GradientBiased(p=p, k=k).edit_tensor("w", delta, gradient) - delta
    assert abs((dare_edit.double() * gradient.double()).sum().item()) < 5 * sigma
    # every negative product is scaled by k < 1, every positive one by c > 1: the term is positive and large
    assert (biased_edit.double() * gradient.double()).sum().item() > 50 * sigma


# ----------------------------------------------------------------------------------------------------------------
# DELLA


def della_reference(delta: torch.Tensor, p: float, epsilon: float, seed: int, name: str) -> torch.Tensor:
    rows = delta.double().reshape(-1, delta.shape[-1]).tolist()
    draws = uniforms(seed, name, delta.numel())
    n = len(rows[0])
    out = []
    for r, row in enumerate(rows):
        order = sorted(range(n), key=lambda j: (-abs(row[j]), j))  # descending magnitude, first index first
        rank = {j: position for position, j in enumerate(order)}
        for j, x in enumerate(row):
            p_j = p - epsilon * (n - 1) / (2 * n) + epsilon / n * rank[j]
            out.append(0.0 if draws[r * n + j] < p_j else x / (1 - p_j))
    return torch.tensor(out, dtype=torch.float64).reshape(delta.shape)


@pytest.mark.parametrize("p, epsilon", [(0.5, 0.4), (0.9, 0.2), (0.2, 0.0)])
def test_della_matches_reference(p, epsilon):
    delta = randn(9, 14, seed=19)
    out = DELLA(p=p, epsilon=epsilon, seed=3).edit_tensor("w", delta)
    torch.testing.assert_close(out.double(), della_reference(delta, p, epsilon, 3, "w"), rtol=1e-6, atol=0)


def della_loop(delta: torch.Tensor, p: float, epsilon: float, generator: torch.Generator, rows_per_chunk: int):
    """DELLA's definition entry by entry in the output dtype's arithmetic (numpy scalars round every operation):
    rank by decreasing |x| (NaN first, ties by position), p_i = p_min + (ε/n)·r_i, drop when u_i < p_i, else
    x / (1 − p_i); u from float32 ``torch.rand`` per chunk of whole rows."""
    real = np.float64 if delta.dtype == torch.float64 else np.float32
    n = delta.shape[-1]
    rows = delta.reshape(-1, n).to(torch.float64 if real is np.float64 else torch.float32).numpy()
    p_min, step, one = real(p - epsilon * (n - 1) / (2 * n)), real(epsilon / n), real(1.0)
    out = np.zeros_like(rows)
    for start in range(0, rows.shape[0], rows_per_chunk):
        block = rows[start : start + rows_per_chunk]
        draws = torch.rand(block.size, generator=generator).numpy().reshape(block.shape)
        for r, row in enumerate(block):
            order = sorted(range(n), key=lambda j: (0, 0.0, j) if math.isnan(row[j]) else (1, -abs(row[j]), j))
            for rank, j in enumerate(order):
                p_j = p_min + step * real(rank)
                out[start + r, j] = 0.0 if draws[r, j] < p_j else row[j] / (one - p_j)
    return torch.from_numpy(out).reshape(delta.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunked", [False, True])
def test_della_equals_the_definition_bit_for_bit(dtype, chunked, monkeypatch):
    """Ties (±0, repeated magnitudes), ±inf and NaN included; chunked: several chunks of whole rows."""
    delta = randn(4, 5, 16, seed=23).to(dtype)
    delta[0, 0, :6] = 0.0
    delta[0, 0, 6] = -0.0
    delta[1, 2, :9] = -delta[1, 2, 9]
    delta[2, 0, 3], delta[2, 0, 7], delta[2, 0, 11] = float("nan"), -float("nan"), float("inf")
    delta[3, 4, 5] = -float("inf")
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[dtype]
    nan = torch.full((16,), float("nan"), dtype=dtype)
    delta[2, 1] = (nan.view(bits) + torch.arange(16, dtype=bits)).view(dtype)  # NaNs of 16 bit patterns
    rows_per_chunk = 3 if chunked else 20
    if chunked:
        monkeypatch.setattr("lightning_delta.edits.della.CHUNK_NUMEL", rows_per_chunk * 16)
    out = DELLA(p=0.7, epsilon=0.5, seed=4).edit_tensor("w", delta)
    expected = della_loop(delta, 0.7, 0.5, tensor_generator(4, "w"), rows_per_chunk)
    assert out.dtype == expected.dtype and out.shape == delta.shape
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert out.isnan().sum() >= 1 and (out == 0).sum() > 0  # the NaN and the drops are exercised


def test_della_with_zero_epsilon_is_dare():
    delta = randn(20, 30, seed=20)
    torch.testing.assert_close(
        DELLA(p=0.6, epsilon=0.0, seed=7).edit_tensor("w", delta), DARE(p=0.6, seed=7).edit_tensor("w", delta)
    )


def test_della_drops_small_magnitudes_more_often_and_is_unbiased():
    delta = randn(64, 32, seed=21)
    p, epsilon, runs = 0.5, 0.8, 200
    outputs = torch.stack([DELLA(p=p, epsilon=epsilon, seed=s).edit_tensor("w", delta) for s in range(runs)])
    drop_rate = (outputs == 0).double().mean(0)
    magnitudes = delta.abs()
    largest = magnitudes == magnitudes.max(dim=1, keepdim=True).values
    smallest = magnitudes == magnitudes.min(dim=1, keepdim=True).values
    # rank 0 drops with p − 0.4·31/32 ≈ 0.11, rank 31 with ≈ 0.89
    assert drop_rate[largest].mean().item() < 0.2 and drop_rate[smallest].mean().item() > 0.8
    n = delta.shape[1]
    ranks = magnitudes.argsort(dim=1, descending=True).argsort(dim=1).double()
    probabilities = p - epsilon * (n - 1) / (2 * n) + epsilon / n * ranks
    statistic = ((outputs.double() - delta.double()) * delta.double()).sum().item()
    variance = runs * (delta.double() ** 4 * probabilities / (1 - probabilities)).sum().item()
    assert abs(statistic / math.sqrt(variance)) < 5


# ----------------------------------------------------------------------------------------------------------------
# Sign- and gradient-biased rescale (section 4.3, Table 1)


@pytest.mark.parametrize("p, k", [(0.5, 0.5), (0.3, 1.5), (0.9, -1.0)])
def test_sign_biased_matches_reference(p, k):
    delta = randn(10, 11, seed=22)
    delta[0, :3] = 0.0
    c = (1 - k * p) / (1 - p)
    expected = np.array([k * x if x < 0 else c * x for x in delta.double().flatten().tolist()]).reshape(10, 11)
    out = SignBiased(p=p, k=k).edit_tensor("w", delta)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6)
    assert torch.equal(out[0, :3], torch.zeros(3))


@pytest.mark.parametrize("p, k", [(0.5, 0.5), (0.3, 1.5), (0.9, -1.0)])
def test_gradient_biased_matches_reference(p, k):
    delta, gradient = randn(10, 11, seed=23), randn(10, 11, seed=24)
    gradient[1, :2] = 0.0
    c = (1 - k * p) / (1 - p)
    pairs = zip(delta.double().flatten().tolist(), gradient.double().flatten().tolist())
    expected = np.array([k * x if x * g < 0 else c * x for x, g in pairs]).reshape(10, 11)
    out = GradientBiased(p=p, k=k)({"w": delta}, gradients={"w": gradient})["w"]
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6)


def test_gradient_biased_counts_tiny_opposite_products_as_negative():
    delta, gradient = torch.tensor([1e-30, -1e-30]), torch.tensor([-1e-30, -1e-30])  # products underflow to 0
    out = GradientBiased(p=0.5, k=0.5).edit_tensor("w", delta, gradient)
    torch.testing.assert_close(out, torch.tensor([0.5e-30, -1.5e-30]))


def test_gradient_biased_needs_gradients():
    assert GradientBiased.needs_gradients and not any(
        cls.needs_gradients for cls in (DARE, DELLA, SignBiased, BitDelta, MagnitudePrune, LowRank, Extrapolate)
    )
    edit = GradientBiased(p=0.5, k=0.5)
    deltas = {"a": randn(3, seed=1), "b": randn(3, seed=2)}
    with pytest.raises(ValueError, match=r"missing for 2 tensor\(s\): \['a', 'b'\]"):
        edit(deltas)
    with pytest.raises(ValueError, match=r"\['b'\]"):
        edit(deltas, gradients={"a": randn(3, seed=3)})
    with pytest.raises(ValueError, match=r"'a' has shape \(4,\) but its delta has shape \(3,\)"):
        edit(deltas, gradients={"a": randn(4, seed=3), "b": randn(3, seed=4)})
    with pytest.raises(ValueError, match="gradient=None"):
        edit.edit_tensor("a", deltas["a"])


# ----------------------------------------------------------------------------------------------------------------
# BitDelta and its extensions (sections 5.1, 5.3)


def bitdelta_reference(delta: torch.Tensor, bits: int, scale: float = 1.0) -> np.ndarray:
    """numpy: sort |ΔW| (stable), block of rank r is floor(r·M/n), each magnitude → its block mean, times sign."""
    values = delta.double().numpy().ravel()
    n, blocks = values.size, 2 ** (bits - 1)
    order = np.argsort(np.abs(values), kind="stable")
    block_of_rank = (np.arange(n) * blocks) // n
    block = np.empty(n, dtype=np.int64)
    block[order] = block_of_rank
    means = np.array([np.abs(values[block == b]).mean() for b in range(blocks)])
    return (scale * means[block] * np.sign(values)).reshape(delta.shape)


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(13, 17), (221,)])
def test_bitdelta_matches_reference(bits, shape):
    delta = randn(*shape, seed=25)
    out = BitDelta(bits=bits).edit_tensor("w", delta)
    np.testing.assert_allclose(out.double().numpy(), bitdelta_reference(delta, bits), rtol=1e-6)


def test_bitdelta_one_bit_is_mean_magnitude_times_sign():
    delta = randn(40, 50, seed=26)
    out = BitDelta().edit_tensor("w", delta)
    mean = delta.double().abs().mean()
    torch.testing.assert_close(out.double(), mean * torch.sign(delta.double()), rtol=1e-6, atol=0)
    # and it is the L2-best single magnitude (section 5.3): moving it either way increases the error

    def error(magnitude: torch.Tensor) -> float:
        return ((magnitude * torch.sign(delta.double()) - delta.double()) ** 2).sum().item()

    assert error(mean) < error(mean * 1.01) and error(mean) < error(mean * 0.99)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bitdelta_keeps_signs_and_uses_at_most_2_to_the_bits_minus_1_magnitudes(bits):
    delta = randn(64, 48, seed=27)
    delta[0, :5] = 0.0
    out = BitDelta(bits=bits).edit_tensor("w", delta)
    assert torch.equal(torch.sign(out), torch.sign(delta))
    assert out.abs()[delta != 0].unique().numel() <= 2 ** (bits - 1)


def test_bitdelta_with_enough_bits_gives_the_delta_back():
    delta = randn(8, 16, seed=28)  # 128 entries: 2^(8 − 1) blocks of one entry
    assert torch.equal(BitDelta(bits=8).edit_tensor("w", delta), delta)
    assert torch.equal(BitDelta(bits=40, magnitudes="normal").edit_tensor("w", delta), delta)
    # and the error shrinks as bits grow
    errors = [(BitDelta(bits=b).edit_tensor("w", delta) - delta).norm().item() for b in range(1, 9)]
    assert all(a > b for a, b in itertools.pairwise(errors)) and errors[-1] == 0.0


def test_bitdelta_scale_multiplies_the_statistic():
    delta = randn(20, 20, seed=29)
    for bits in (1, 3):
        torch.testing.assert_close(
            BitDelta(bits=bits, scale=1.3).edit_tensor("w", delta), 1.3 * BitDelta(bits=bits).edit_tensor("w", delta)
        )
    assert torch.equal(BitDelta(scale=0.0).edit_tensor("w", delta), torch.zeros(20, 20))


def test_bitdelta_ties_share_a_block():
    delta = torch.tensor([1.0, -1.0, 1.0, 1.0, 3.0, -5.0])
    out = BitDelta(bits=2).edit_tensor("w", delta)
    # thresholds at the value of rank 3 (= 1.0): every ±1 is in the upper block with 3 and 5
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 2.0, 2.0, 2.0, -2.0]))


def test_bitdelta_uniform_magnitudes_have_the_block_mean():
    delta = randn(200, 200, seed=30)
    mean = delta.abs().double().mean().item()
    out = BitDelta(magnitudes="uniform", seed=1).edit_tensor("w", delta)
    assert torch.equal(torch.sign(out), torch.sign(delta))
    magnitudes = out.abs().double()
    assert magnitudes.max().item() <= 2 * mean * (1 + 1e-6)
    standard_error = 2 * mean / math.sqrt(12 * delta.numel())  # U[0, 2μ] has std 2μ/√12
    assert abs(magnitudes.mean().item() - mean) < 5 * standard_error
    assert magnitudes.unique().numel() > 1000  # sampled, not one value


def test_bitdelta_normal_magnitudes_follow_the_clipped_normal():
    delta = randn(200, 200, seed=31)
    magnitudes_in = delta.abs().double()
    mu, sigma = magnitudes_in.mean().item(), magnitudes_in.std(unbiased=False).item()
    out = BitDelta(magnitudes="normal", seed=2).edit_tensor("w", delta)
    signs_out, signs_in = torch.sign(out), torch.sign(delta)
    assert bool(((signs_out == signs_in) | (signs_out == 0)).all())  # never flipped; clipped draws give 0
    z = mu / sigma
    pdf, cdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(z / math.sqrt(2)))
    clipped_mean = mu * cdf + sigma * pdf  # E[max(0, μ + σZ)]
    assert abs(out.abs().double().mean().item() - clipped_mean) < 5 * sigma / math.sqrt(delta.numel())
    assert abs((out == 0).double().mean().item() - (1 - cdf)) < 0.01


# ----------------------------------------------------------------------------------------------------------------
# TIES trim (MagnitudePrune)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(31, 29), (1000,)])
def test_magnitude_prune_keeps_exactly_the_largest_entries(p, shape):
    delta = randn(*shape, seed=32)
    values = delta.numpy().ravel()
    kept = math.floor((1 - p) * values.size + 0.5 + 1e-9)
    expected = np.zeros_like(values)
    top = np.argsort(-np.abs(values), kind="stable")[:kept]
    expected[top] = values[top]
    out = MagnitudePrune(p=p).edit_tensor("w", delta)
    np.testing.assert_array_equal(out.numpy().ravel(), expected)
    assert int((out != 0).sum()) == kept


def test_magnitude_prune_ties_keep_the_lowest_index():
    delta = torch.tensor([[1.0, -2.0, 2.0], [-2.0, 0.5, 2.0]])
    out = MagnitudePrune(p=0.5).edit_tensor("w", delta)  # keep 3 of 6; four entries tie at |2|
    assert torch.equal(out, torch.tensor([[0.0, -2.0, 2.0], [-2.0, 0.0, 0.0]]))


def test_magnitude_prune_can_keep_nothing():
    assert torch.equal(MagnitudePrune(p=0.9).edit_tensor("w", torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.zeros(4))


# ----------------------------------------------------------------------------------------------------------------
# Twin-Merging's low rank (LowRank)


def test_low_rank_full_rank_gives_the_delta_back():
    delta = randn(12, 20, seed=33, dtype=torch.float64)
    for edit in (LowRank(rank=12), LowRank(rank=50), LowRank(fraction=1.0), LowRank(rank=12, method="randomized")):
        assert torch.equal(edit.edit_tensor("w", delta), delta)
    # rank = min(d, k) − 1 computed by SVD, then the last singular direction added back is ΔW
    u, s, vh = svd64(delta)
    for method in ({}, {"method": "exact"}, {"method": "randomized"}):  # randomized: the sketch would not be smaller
        out = LowRank(rank=11, **method).edit_tensor("w", delta)
        torch.testing.assert_close(out + s[-1] * torch.outer(u[:, -1], vh[-1]), delta)


@pytest.mark.parametrize(
    "rank, method", [(1, None), (5, None), (9, None), (5, "exact"), (3, "randomized"), (6, "randomized")]
)
def test_low_rank_error_is_the_discarded_singular_values(rank, method):
    delta = randn(40, 64, seed=34)
    out = LowRank(rank=rank, seed=1, **({} if method is None else {"method": method})).edit_tensor("w", delta)
    singular_values = svd64(delta).S
    optimal = singular_values[rank:].pow(2).sum().sqrt().item()
    error = (out.double() - delta.double()).norm().item()
    assert numerical_rank(out) == rank
    if method == "randomized":  # never better than Eckart–Young, close on this size
        assert optimal * (1 - 1e-6) <= error <= optimal * 1.02
    else:
        assert error == pytest.approx(optimal, rel=1e-5)


def test_low_rank_matches_the_float64_truncated_svd():
    # a spectrum with clear gaps, so that the truncated SVD is unique
    with single_threaded():
        u, _ = torch.linalg.qr(randn(30, 30, seed=35, dtype=torch.float64))
        v, _ = torch.linalg.qr(randn(50, 30, seed=36, dtype=torch.float64))
    singular_values = torch.tensor([2.0**-i for i in range(30)], dtype=torch.float64)
    delta = (u * singular_values) @ v.T
    expected = (u[:, :4] * singular_values[:4]) @ v[:, :4].T
    for method in ({}, {"method": "exact"}, {"method": "randomized"}):
        out = LowRank(rank=4, **method).edit_tensor("w", delta.float())
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


# The documented error of method="randomized" (lowrank.truncated_svd): ‖F_randomized − F_exact‖ / ‖F_exact‖ under
# 10 % on a slowly decaying spectrum σ_i ∝ i^(-1/2); far off (tens of %) on a flat one.
RANDOMIZED_DECAYING_BOUND = 0.10
# float32 SVD against the float64 one, relative, on the flat spectra below (measured up to 1.4e-5)
EXACT_RTOL = 5e-5


def truncated64(matrix: torch.Tensor, rank: int) -> np.ndarray:
    """The reference: float64 ``numpy.linalg.svd``, truncated to ``rank`` and multiplied back."""
    u, s, vt = np.linalg.svd(matrix.double().numpy(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def relative_to(out: torch.Tensor, reference: np.ndarray) -> float:
    return float(np.linalg.norm(out.double().numpy() - reference) / np.linalg.norm(reference))


def decaying_spectrum(rows: int, cols: int, power: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``U diag(σ) Vᵀ`` with ``σ_i = i^(−power)`` and random orthonormal ``U``, ``V``, in float32; and ``σ``."""
    n = min(rows, cols)
    with single_threaded():
        u, _ = torch.linalg.qr(randn(rows, n, seed=seed, dtype=torch.float64))
        v, _ = torch.linalg.qr(randn(cols, n, seed=seed + 1, dtype=torch.float64))
    singular_values = torch.arange(1, n + 1, dtype=torch.float64).pow(-power)
    return ((u * singular_values) @ v.T).float(), singular_values.numpy()


# Gaussian matrices: a flat spectrum, where the randomized SVD that main chose by default was 5–39 % off in F
FLAT_CASES = [
    ((512, 512), 50, 50),
    ((64, 64), 1, 51),
    ((64, 64), 5, 51),
    ((100, 80), 1, 52),
    ((100, 80), 5, 52),
    ((40, 64), 1, 53),
    ((40, 64), 5, 53),
]


@pytest.mark.parametrize("shape, rank, seed", FLAT_CASES, ids=[f"{s[0]}x{s[1]}-r{r}" for s, r, _ in FLAT_CASES])
def test_low_rank_default_is_the_exact_truncated_svd_on_a_flat_spectrum(shape, rank, seed):
    delta = randn(*shape, seed=seed)
    expected = truncated64(delta, rank)
    assert relative_to(LowRank(rank=rank).edit_tensor("w", delta), expected) < EXACT_RTOL
    assert relative_to(LowRank(rank=rank, method="exact").edit_tensor("w", delta), expected) < EXACT_RTOL
    assert relative_to(truncated_svd(delta, rank), expected) < EXACT_RTOL


def test_low_rank_randomized_is_far_off_on_a_flat_spectrum():
    # what the docstring warns about: F is a different matrix, although its residual is nearly optimal
    delta = randn(512, 512, seed=50)
    expected = truncated64(delta, 50)
    randomized = LowRank(rank=50, method="randomized").edit_tensor("w", delta)
    assert relative_to(randomized, expected) > 0.2
    optimal = float(np.linalg.norm(delta.double().numpy() - expected))
    assert optimal <= (randomized - delta).double().norm().item() <= 1.01 * optimal
    assert relative_to(LowRank(rank=50).edit_tensor("w", delta), expected) < EXACT_RTOL


DECAYING_CASES = [((1024, 1024), 64), ((1024, 1024), 16), ((512, 768), 50), ((512, 768), 5), ((768, 512), 1)]


@pytest.mark.slow
@pytest.mark.parametrize("shape, rank", DECAYING_CASES, ids=[f"{s[0]}x{s[1]}-r{r}" for s, r in DECAYING_CASES])
def test_low_rank_randomized_error_on_a_slowly_decaying_spectrum(shape, rank):
    delta, singular_values = decaying_spectrum(*shape, power=0.5, seed=60)
    expected = truncated64(delta, rank)
    errors = [
        relative_to(LowRank(rank=rank, method="randomized", seed=seed).edit_tensor("w", delta), expected)
        for seed in range(3)
    ]
    assert max(errors) < RANDOMIZED_DECAYING_BOUND, errors
    assert relative_to(LowRank(rank=rank).edit_tensor("w", delta), expected) < EXACT_RTOL


def test_low_rank_default_is_exact_and_randomized_is_opt_in():
    delta = (randn(300, 8, seed=37) @ randn(8, 500, seed=38)) + 1e-3 * randn(300, 500, seed=39)
    default = LowRank(rank=8).edit_tensor("w", delta)
    assert torch.equal(default, LowRank(rank=8, method="exact").edit_tensor("w", delta))
    assert torch.equal(default, truncated_svd(delta, 8))
    randomized = LowRank(rank=8, method="randomized").edit_tensor("w", delta)
    assert not torch.equal(default, randomized)
    assert torch.equal(randomized, LowRank(rank=8, method="randomized", seed=0).edit_tensor("w", delta))
    assert not torch.equal(randomized, LowRank(rank=8, method="randomized", seed=1).edit_tensor("w", delta))
    assert LowRank(rank=8).config()["method"] == "exact"
    singular_values = svd64(delta).S
    optimal = singular_values[8:].pow(2).sum().sqrt().item()
    assert (default.double() - delta.double()).norm().item() == pytest.approx(optimal, rel=1e-4)
    assert (randomized.double() - delta.double()).norm().item() <= optimal * 1.001


@pytest.mark.parametrize("method", ["Exact", "svd", "", None, False])
def test_truncated_svd_refuses_an_unknown_method(method):
    with pytest.raises(ValueError, match=r"`method` must be one of \['exact', 'randomized'\], got method="):
        truncated_svd(randn(6, 5, seed=1), 2, method)


def test_low_rank_fraction_and_non_matrices():
    delta = randn(10, 30, seed=40)
    for method in ({}, {"method": "exact"}, {"method": "randomized"}):
        assert numerical_rank(LowRank(fraction=0.3, **method).edit_tensor("w", delta)) == 3
    assert numerical_rank(LowRank(fraction=0.01).edit_tensor("w", delta)) == 1  # at least 1
    for shape in [(7,), (4, 5, 6), ()]:
        other = randn(*shape, seed=41)
        assert torch.equal(LowRank(rank=1).edit_tensor("b", other), other)


# ----------------------------------------------------------------------------------------------------------------
# EXPO (Extrapolate)


@pytest.mark.parametrize("alpha", [-1.0, -0.3, 0.0, 0.5, 1.0, 2.0])
def test_extrapolate_matches_reference(alpha):
    delta = randn(6, 7, seed=42)
    expected = np.array([(1 + alpha) * x for x in delta.double().flatten().tolist()]).reshape(6, 7)
    out = Extrapolate(alpha=alpha)({"w": delta})["w"]
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6)


def test_extrapolate_identities():
    delta = randn(6, 7, seed=43)
    assert torch.equal(Extrapolate(0)({"w": delta})["w"], delta)  # α = 0: W_post
    assert torch.equal(Extrapolate(-1.0)({"w": delta})["w"], torch.zeros(6, 7))  # α = −1: W_pre
    edit_term = Extrapolate(0.4).edit_tensor("w", delta) - delta
    torch.testing.assert_close(edit_term, 0.4 * delta)  # the edit is αΔW (equation 14)


def test_delta_edit_subclass_contract():
    class Halve(DeltaEdit):
        name = "halve"

        def __init__(self, factor: float = 0.5) -> None:
            self.factor = factor

        def edit_tensor(self, name, delta, gradient=None):
            return delta * self.factor

    edit = Halve()
    assert edit.config() == {"name": "halve", "factor": 0.5} and repr(edit) == "Halve(factor=0.5)"
    assert torch.equal(edit({"w": torch.ones(2)})["w"], torch.full((2,), 0.5))


# ----------------------------------------------------------------------------------------------------------------
# BitDelta counted as the paper counts (blocks = M, the paper's bits log2 M)


def blocks_reference(delta: torch.Tensor, blocks: int) -> np.ndarray:
    """numpy, any M: the entries sorted by |ΔW| (stable) cut into M runs by rank, floor(r·M/n), each run's magnitudes
    replaced by the run's mean, times the sign."""
    values = delta.double().numpy().ravel()
    ranks = np.empty(values.size, dtype=np.int64)
    ranks[np.argsort(np.abs(values), kind="stable")] = np.arange(values.size)
    out = np.empty_like(values)
    for block in range(blocks):
        members = (ranks * blocks) // values.size == block
        out[members] = np.abs(values[members]).mean() * np.sign(values[members])
    return out.reshape(delta.shape)


@pytest.mark.parametrize("blocks", [1, 3, 16, 100])
def test_bitdelta_blocks_is_the_papers_m_for_any_count(blocks):
    delta = randn(23, 19, seed=32)
    out = BitDelta(blocks=blocks).edit_tensor("w", delta)
    np.testing.assert_allclose(out.double().numpy(), blocks_reference(delta, blocks), rtol=1e-6)
    assert out.abs().unique().numel() == blocks  # M magnitudes: log2 M bits beside the sign


@pytest.mark.parametrize("paper_bits", [0, 1, 2, 3, 4])
def test_bitdelta_papers_bits_are_ours_minus_the_sign_bit(paper_bits):
    delta = randn(31, 29, seed=33)
    edit = BitDelta(blocks=2**paper_bits)
    assert edit.paper_bits == paper_bits and edit.num_blocks == 2**paper_bits
    assert BitDelta(bits=paper_bits + 1).num_blocks == edit.num_blocks
    assert torch.equal(edit.edit_tensor("w", delta), BitDelta(bits=paper_bits + 1).edit_tensor("w", delta))
    assert math.isclose(edit.paper_bits, math.log2(edit.edit_tensor("w", delta).abs().unique().numel()))


def test_bitdelta_blocks_with_sampled_magnitudes_and_scale():
    delta = randn(40, 40, seed=34)
    blocks = BitDelta(blocks=4, magnitudes="uniform", scale=0.5, seed=3).edit_tensor("w", delta)
    bits = BitDelta(bits=3, magnitudes="uniform", scale=0.5, seed=3).edit_tensor("w", delta)
    assert torch.equal(blocks, bits)  # the same M, the same draws
    assert build(**BitDelta(blocks=16).config()) == BitDelta(blocks=16)


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"blocks": 0}, r"blocks=0"),
        ({"blocks": 2.0}, r"blocks=2\.0"),
        ({"blocks": True}, r"blocks=True"),
        ({"bits": 3, "blocks": 4}, r"not both.*bits=3 and blocks=4"),
    ],
)
def test_bitdelta_bad_blocks(arguments, match):
    with pytest.raises(ValueError, match=match):
        BitDelta(**arguments)


# ------------------------------------------------------------------------------------ what the classes declare
# At least one configuration of every registered edit, and each configuration that changes what its class declares.
DECLARED = [
    {"name": "dare", "p": 0.5},
    {"name": "dare", "p": 0.5, "k": -1.0},
    {"name": "dare", "p": 0.5, "rescale": False},
    {"name": "della", "p": 0.5, "epsilon": 0.2},
    {"name": "sign_biased", "p": 0.5, "k": 0.5},
    {"name": "gradient_biased", "p": 0.5, "k": 0.5},
    {"name": "bitdelta"},
    {"name": "bitdelta", "bits": 2},
    {"name": "bitdelta", "magnitudes": "normal"},
    {"name": "bitdelta", "magnitudes": "uniform"},
    {"name": "lowrank", "rank": 2},
    {"name": "lowrank", "rank": 2, "method": "randomized"},
    {"name": "magnitude_prune", "p": 0.5},
    {"name": "extrapolate", "alpha": 0.5},
]


def test_every_registered_edit_declares_what_it_shows_and_draws():
    assert {config["name"] for config in DECLARED} == set(edits.EDITS)
    for cls in edits.EDITS.values():
        arguments = cls.parameter_names()
        assert set(cls.shown or ()) <= set(arguments) and set(cls.hidden_at) <= set(cls.shown or arguments), cls
        assert not cls.randomised or "seed" in arguments, cls
        if cls.planning is not None:
            for value in cls.planning.candidates:
                assert type(cls.at_setting(value)) is cls


@pytest.mark.parametrize("config", DECLARED, ids=lambda config: "-".join(map(str, config.values())))
def test_an_edit_draws_random_numbers_exactly_when_its_class_says_so(config):
    """``draws_random`` against what the edit does: another seed gives another F(ΔW) exactly when it says so."""
    cls = edits.EDITS[config["name"]]
    delta, gradient = randn(64, 48, seed=40), randn(64, 48, seed=41)
    if "seed" not in cls.parameter_names():
        assert not cls.draws_random(config)
        return
    first, second = (build(**config, seed=seed).edit_tensor("w", delta, gradient) for seed in (0, 1))
    assert (not torch.equal(first, second)) == cls.draws_random(config)
