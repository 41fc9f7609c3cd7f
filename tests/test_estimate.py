"""The memory estimate (``lightning-delta estimate``) against what a real Riemann point allocates, its parts against
explicit sums over the weights, and the command on every shipped config with tiny local models (nothing downloaded).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from benchmarks.memory import allocation_peak
from lightning_delta.cli import run
from lightning_delta.estimate import LiveTensorBytes, MemoryEstimate, estimate_memory, meta_model
from lightning_delta.losses import CausalLMLoss
from lightning_delta.parametrize import EditedModel, stored_dtype
from tests.support.tiny_models import make_tiny_model, tiny_config
from tests.test_configs import CONFIGS, PAPER_CONFIGS, _swap, _tiny_replacements


def _tokens(batch: int, length: int, device: str = "meta", vocab: int = 128) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _allocated_peak(model: torch.nn.Module, batch: dict, E_dtype: str) -> int:  # noqa: N803
    """Bytes held (weights, E) plus the peak that torch's profiler records from the CPU allocator over one Riemann
    point as RiemannCallback runs it (EditedModel, recompute_weights, forward and backward)."""
    generator = torch.Generator().manual_seed(1)
    E = {
        name: torch.empty(p.shape, dtype=stored_dtype(p.dtype, E_dtype)).normal_(0, 0.01, generator=generator)
        for name, p in model.named_parameters()
    }
    edited = EditedModel(model, E, E_dtype=E_dtype)
    held = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])  # W_post and E (a buffer of each edit)
    loss = CausalLMLoss()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        edited.set_t(0.4)
        with edited.recompute_weights():
            loss(model, batch).total.backward()
        edited.pop_inner_products()
    edited.remove()
    return held + allocation_peak(profiler)


@pytest.mark.parametrize(
    ("family", "dtype", "E_dtype"),
    [
        ("llama", torch.float32, "float32"),
        ("llama", torch.bfloat16, "float32"),
        ("llama", torch.bfloat16, "model"),
        ("llama-tied", torch.float32, "float32"),
    ],
)
def test_estimate_bounds_what_a_real_point_allocates(family, dtype, E_dtype):
    """The meta run counts the tensors the CPU run allocates, the inner products' chunk sums, the scalars t and
    their gradients and the model's buffers included: an upper bound, at most a few scalars above (bf16: plus the
    copy of the largest weight that CPU matrix kernels make on larger models, not on this one)."""
    model = make_tiny_model(family, dtype=dtype)
    estimated = estimate_memory(meta_model(model.config, dtype), _tokens(4, 64), E_dtype=E_dtype)
    measured = _allocated_peak(model, _tokens(4, 64, "cpu"), E_dtype)
    assert measured <= estimated.point <= measured + _slack(model)
    assert estimated.peak == estimated.point  # no evaluator, no GradientBiased: the point is the peak


def _slack(model: torch.nn.Module) -> int:
    """How far above a CPU run the estimate may land: its scalars' allowance, and for half-precision weights the
    copy of the largest one that CPU matrix kernels make on larger models."""
    from lightning_delta.estimate import SCALARS

    largest = max(model.parameters(), key=torch.Tensor.numel)
    return SCALARS + 32 + (largest.nbytes if largest.element_size() == 2 else 0)


def test_estimate_with_the_default_E_dtype_bounds_what_a_real_point_allocates():
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    estimated = estimate_memory(meta_model(model.config, torch.bfloat16), _tokens(2, 96))
    measured = _allocated_peak(model, _tokens(2, 96, "cpu"), "float32")
    assert measured <= estimated.point <= measured + _slack(model)


def _allocated_peak_with_an_edit(model, pretrained: str, batch: dict, E_dtype: str) -> int:  # noqa: N803
    """As :func:`_allocated_peak`, with E from DARE on a W_pre file (made on the fly or kept)."""
    from lightning_delta.attach import attach_edit
    from lightning_delta.edits import DARE

    edited = attach_edit(model, pretrained=pretrained, edit=DARE(p=0.5, seed=1), E_dtype=E_dtype)
    held = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        edited.set_t(0.4)
        with edited.recompute_weights():
            CausalLMLoss()(model, batch).total.backward()
        edited.pop_inner_products()
    edited.remove()
    return held + allocation_peak(profiler)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimate_of_E_on_the_fly_bounds_what_a_real_point_allocates(tmp_path, dtype):
    """No E held: the point allocates E's bytes less than with kept float32 E; the estimate makes each tensor's E
    (W_pre, ΔW, F(ΔW), DARE's draws) where the point makes it: an upper bound, a few scalars above."""
    from safetensors.torch import save_file

    pre = make_tiny_model("llama", seed=3, dtype=dtype)
    save_file({name: tensor.contiguous() for name, tensor in pre.state_dict().items()}, tmp_path / "pre.safetensors")
    measured = {
        E_dtype: _allocated_peak_with_an_edit(
            make_tiny_model("llama", dtype=dtype), str(tmp_path / "pre.safetensors"), _tokens(4, 64, "cpu"), E_dtype
        )
        for E_dtype in ("float32", "on_the_fly")
    }
    model = meta_model(make_tiny_model("llama").config, dtype)
    kept, made = (estimate_memory(model, _tokens(4, 64), E_dtype=E_dtype) for E_dtype in ("float32", "on_the_fly"))
    assert made.E == 0 and kept.E > 0
    assert measured["float32"] - measured["on_the_fly"] >= 0.9 * kept.E
    slack = _slack(make_tiny_model("llama", dtype=dtype))
    assert measured["on_the_fly"] <= made.point <= measured["on_the_fly"] + slack
    assert measured["float32"] <= kept.point <= measured["float32"] + slack
    with pytest.raises(ValueError, match="not available on a sharded model"):
        estimate_memory(model, _tokens(1, 8), E_dtype="on_the_fly", processes=2, sharded=True)


def test_live_tensor_bytes_equals_the_profilers_allocation_peak():
    """On real CPU tensors the counter gives what the allocator records (the estimate's one measuring device)."""
    model = make_tiny_model("llama")
    batch = _tokens(2, 32, "cpu")
    loss = CausalLMLoss()
    with LiveTensorBytes([*model.parameters(), *model.buffers(), *batch.values()]) as live:
        loss(model, batch).total.backward()
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        loss(model, batch).total.backward()
    assert live.peak == pytest.approx(allocation_peak(profiler), rel=0.02)


def test_parts_are_the_explicit_sums_over_the_weights():
    """W, E, the sharded shares and the gathered blocks against sums over a real model's tensors."""
    config = tiny_config("llama")
    real = make_tiny_model("llama", dtype=torch.bfloat16)
    weights = {name: p.numel() for name, p in real.named_parameters()}
    total = sum(weights.values())
    attention = sum(n for name, n in weights.items() if ".self_attn." in name)
    model = meta_model(config, torch.bfloat16)
    full = estimate_memory(model, _tokens(1, 16))
    assert full.weights == 2 * total and full.E == 4 * total  # bf16 W, float32 E
    assert full.shards == 1 and full.gathered == 0 and full.reference == 0
    assert estimate_memory(model, _tokens(1, 16), E_dtype="model").E == 2 * total
    only_attention = estimate_memory(model, _tokens(1, 16), include=r"\.self_attn\.")
    assert only_attention.E == 4 * attention and only_attention.weights == 2 * total
    sharded = estimate_memory(model, _tokens(1, 16), processes=4, sharded=True)
    assert sharded.weights == math.ceil(2 * total / 4) and sharded.E == math.ceil(4 * total / 4)
    block = sum(n for name, n in weights.items() if name.startswith("model.layers.0."))
    outside = sum(n for name, n in weights.items() if not name.startswith("model.layers."))
    assert sharded.gathered == 2 * (outside + 2 * block)  # the root group and two of the 2 blocks, in bf16
    # W_post's rows, and ∇W's rows of the largest FSDP group (the root group: embeddings and head), bf16
    assert sharded.sharded_copies == math.ceil(2 * total / 4) + math.ceil(2 * max(outside, block) / 4)
    assert 0 < sharded.activations <= full.activations  # its own batch whole; W(t) is written into the shards
    unsharded = estimate_memory(model, _tokens(1, 16), processes=4)
    assert unsharded.weights == full.weights and unsharded.processes == 4


def test_gradient_biased_and_evaluator_phases():
    """GradientBiased adds float32 gradient sums of every weight and its gradient pass; an evaluator adds the cached
    W(t) of every edited tensor (model dtype) while the accuracy is measured."""
    model = meta_model(tiny_config("llama"), torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    plain = estimate_memory(model, _tokens(2, 32))
    biased = estimate_memory(model, _tokens(2, 32), gradient_sums=True)
    assert plain.gradient_sums == plain.gradient_pass == plain.gradient == 0
    assert biased.gradient_sums == 4 * total
    assert biased.gradient == biased.weights + biased.buffers + biased.gradient_sums + biased.gradient_pass
    assert biased.gradient_pass >= plain.activations - 4 * total  # every weight's gradient instead of W(t)
    evaluated = estimate_memory(model, _tokens(2, 32), evaluator=True)
    assert plain.evaluate == 0 and evaluated.evaluate > evaluated.weights + evaluated.E + 2 * total


# --------------------------------------------------------------------------------------------- the command
def _config(name: str, tmp_path: Path, **trainer) -> Path:
    config = _swap(yaml.safe_load((CONFIGS / name).read_text()), _tiny_replacements(name, tmp_path))
    config["trainer"].update(trainer)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def offline(monkeypatch):
    """Nothing may be downloaded: the hub is off, so a hub id left in a config fails instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_estimate_command_on_every_shipped_config(name, tmp_path, offline, capsys):
    """Each shipped config as written, hub ids swapped for tiny local models: 8 DDP processes holding the whole
    model, the DPO reference counted for Zephyr, the accuracy's phase, E in float32 for the bf16 models, only the
    vision tower for CLIP."""
    result = run(["estimate", "--config", str(_config(name, tmp_path))])
    assert isinstance(result, MemoryEstimate)
    assert result.processes == 8 and result.shards == 1 and result.gathered == 0
    assert (result.reference > 0) == ("dpo" in name)
    assert result.evaluate > 0  # every shipped config measures an accuracy (an evaluator, or the loss's own)
    assert result.E == 2 * result.weights  # bf16 weights, float32 E, every held tensor edited
    if "clip" in name:  # the classifier holds CLIP's vision tower and projection, not its text tower
        clip = make_tiny_model("clip")
        tower = [*clip.vision_model.parameters(), *clip.visual_projection.parameters()]
        assert result.weights == 2 * sum(p.numel() for p in tower)
    printed = capsys.readouterr().out
    assert "peak per process" in printed and "8 process(es)" in printed


def test_estimate_command_equals_the_function_on_the_configs_shapes(tmp_path, offline):
    """The LLaMA config's batch (4 × 1024 tokens), bf16 and evaluator reach :func:`estimate_memory`."""
    path = _config("llama3-8b-instruct-gsm8k.yaml", tmp_path)
    model_dir = yaml.safe_load(path.read_text())["model"]["model"]
    result = run(["estimate", "--config", str(path)])
    direct = estimate_memory(meta_model(model_dir, torch.bfloat16), _tokens(4, 1024), processes=8, evaluator=True)
    assert result == direct


@pytest.mark.slow
def test_estimate_command_with_E_on_the_fly(tmp_path, offline):
    """``model.E_dtype: on_the_fly`` in the config reaches the estimate: no E held, one tensor's E made per point."""
    path = _config("llama3-8b-instruct-gsm8k.yaml", tmp_path)
    model_dir = yaml.safe_load(path.read_text())["model"]["model"]
    result = run(["estimate", "--config", str(path), "--model.E_dtype", "on_the_fly"])
    direct = estimate_memory(
        meta_model(model_dir, torch.bfloat16), _tokens(4, 1024), processes=8, evaluator=True, E_dtype="on_the_fly"
    )
    assert result == direct and result.E == 0 and result.attach_temporaries > 0


@pytest.mark.slow
def test_estimate_command_under_fsdp_shards_the_weights(tmp_path, offline):
    path = _config("llama3-8b-instruct-gsm8k.yaml", tmp_path, strategy="fsdp", devices=4)
    sharded = run(["estimate", "--config", str(path)])
    whole = run(["estimate", "--config", str(path), "--processes", "1"])
    assert sharded.shards == 4 and whole.shards == 1
    assert sharded.weights == math.ceil(whole.weights / 4) and sharded.gathered > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trainer": {"devices": "many"}}, "trainer.devices is 'many'"),
        ({"data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"}}, "BoringDataModule"),
        ({"model": {"E_dtype": "float16"}}, "E_dtype"),
    ],
)
def test_estimate_command_bad_input_is_named(change, message, tmp_path, offline, capsys):
    """A value the estimate cannot use is named in the error (the config parser's own errors exit, as for validate)."""
    path = _config("llama3-8b-instruct-gsm8k.yaml", tmp_path)
    config = yaml.safe_load(path.read_text())
    for section, values in change.items():
        if "class_path" in values:
            config[section] = values
        else:
            config[section].update(values)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises((ValueError, SystemExit)) as error:
        run(["estimate", "--config", str(path)])
    assert message in (str(error.value) if error.type is ValueError else capsys.readouterr().err)


def test_estimate_memory_refuses_bad_arguments():
    model = meta_model(tiny_config("llama"), torch.float32)
    with pytest.raises(ValueError, match="processes must be a whole number >= 1"):
        estimate_memory(model, _tokens(1, 8), processes=0)
    with pytest.raises(ValueError, match="E_dtype must be"):
        estimate_memory(model, _tokens(1, 8), E_dtype="half")
    with pytest.raises(ValueError, match="meta device"):
        estimate_memory(make_tiny_model("llama"), _tokens(1, 8))


def test_estimate_command_counts_gradient_biased_sums(tmp_path, offline):
    """An edit that needs ∇L(W_post) adds its float32 sums of every weight (twice the bf16 weights) and its pass."""
    path = _config("llama3-8b-instruct-gsm8k.yaml", tmp_path)
    config = yaml.safe_load(path.read_text())
    config["edit"] = {"class_path": "lightning_delta.edits.GradientBiased", "init_args": {"p": 0.9, "k": 1.0}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run(["estimate", "--config", str(path)])
    assert result.gradient_sums == 2 * result.weights and result.gradient_pass > 0
    assert result.gradient == result.weights + result.buffers + result.gradient_sums + result.gradient_pass


def test_estimate_command_on_the_shipped_sharded_config(tmp_path, offline):
    """The 70B config as written (ModelParallelStrategy over 8 GPUs, E in bf16, 3 × 512 tokens), its hub ids swapped
    for a tiny local Llama: 8 shards, and the same figures as :func:`estimate_memory` given those settings."""
    name = "llama3-70b-instruct-gsm8k-fsdp.yaml"
    path = _config(name, tmp_path)
    result = run(["estimate", "--config", str(path)])
    model_dir = yaml.safe_load(path.read_text())["model"]["model"]
    direct = estimate_memory(
        meta_model(model_dir, torch.bfloat16),
        _tokens(3, 512),
        E_dtype="model",
        processes=8,
        sharded=True,
        evaluator=True,
    )
    assert result == direct
    assert result.shards == 8 and result.E == result.weights and result.gathered > 0
    # every tensor edited: W_post's rows, and ∇W's rows of one FSDP group at a time
    assert result.weights < result.sharded_copies < 2 * result.weights


@pytest.mark.slow
def test_estimate_command_counts_the_rules_passes_and_keeps_the_peak(tmp_path, offline, capsys):
    """``riemann.rule`` sets the passes per batch, not the memory: gauss runs 3 backward passes and forwards alone at
    t = 0 and t = 1; the shipped config's left rule with its trapezoid runs C + 1 = 6 backward passes."""
    path = _config("llama3-8b-instruct-gsm8k.yaml", tmp_path)
    shipped = run(["estimate", "--config", str(path)])
    assert (shipped.rule, shipped.backward_passes, shipped.forward_passes) == ("left", 6, 0)
    gauss = run(
        [
            "estimate",
            "--config",
            str(path),
            "--riemann.rule",
            "gauss",
            "--riemann.trapezoid",
            "null",
            "--riemann.num_points",
            "3",
        ]
    )
    assert (gauss.rule, gauss.backward_passes, gauss.forward_passes) == ("gauss", 3, 2)
    assert gauss == shipped and gauss.peak == shipped.peak
    assert "rule 'gauss': 3 forward+backward passes and 2 forwards alone" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"trapezoid=True.*rule='gauss'"):
        run(["estimate", "--config", str(path), "--riemann.rule", "gauss"])  # the config's trapezoid: true


@pytest.mark.slow
def test_estimate_reads_the_config_a_validate_run_writes_and_its_print_config(tmp_path, monkeypatch, offline, capsys):
    """``lightning_logs/version_0/config.yaml`` of a real validate run (with ``ckpt_path``, ``verbose``,
    ``weights_only`` and ``devices: auto``) and ``--print_config`` of it are estimates' configs too: one CPU process
    (what ``devices: auto`` gives there), the run's batch of 2 × 64 tokens."""
    from tests.support.datamodule_fixtures import GSM8K_ROWS, write_jsonl
    from tests.support.tiny_models import make_tiny_pair

    pair = make_tiny_pair(tmp_path, "llama", shard=None, scale=0.05)
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    monkeypatch.chdir(tmp_path)
    run(
        [
            "validate",
            "--model.model",
            str(pair.post_dir),
            "--model.pretrained",
            str(pair.pre_dir),
            "--edit",
            "DARE",
            "--edit.p",
            "0.9",
            "--data",
            "GSM8KDataModule",
            "--data.tokenizer",
            str(pair.post_dir),
            "--data.data",
            str(data),
            "--data.batch_size",
            "2",
            "--data.max_length",
            "64",
            "--trainer.accelerator",
            "cpu",
            "--riemann.num_points",
            "1",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    written = tmp_path / "lightning_logs" / "version_0" / "config.yaml"
    assert {"ckpt_path", "verbose", "weights_only"} <= set(yaml.safe_load(written.read_text()))
    assert yaml.safe_load(written.read_text())["trainer"]["devices"] == "auto"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(["validate", "--config", str(written), "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    expected = estimate_memory(meta_model(pair.post_dir, torch.float32), _tokens(2, 64), processes=1)
    for path in (written, printed):
        assert run(["estimate", "--config", str(path)]) == expected
    assert "trainer.devices 'auto': 1 process(es) per node" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("numel", "grad_dtype", "E_dtype"),
    [
        (1000, torch.float32, torch.float32),
        (200_000, torch.float32, torch.float32),
        (200_000, torch.bfloat16, torch.float32),
        (70_000, torch.bfloat16, torch.bfloat16),
        (5_000_000, torch.float32, torch.float32),
        (300, torch.float64, torch.float64),
    ],
)
def test_inner_product_bytes_bound_what_the_inner_product_allocates(numel, grad_dtype, E_dtype):  # noqa: N803
    """Against the allocator's record of :func:`~lightning_delta.parametrize.inner_product` on the CPU: a bound
    (the accelerator's chunking may need more), equal where the CPU's chunking needs the most."""
    from lightning_delta.estimate import inner_product_bytes
    from lightning_delta.parametrize import inner_product

    grad, E = torch.randn(numel).to(grad_dtype), torch.randn(numel).to(E_dtype)  # noqa: N806
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        inner_product(grad, E)
    measured = allocation_peak(profiler)
    assert measured <= inner_product_bytes(numel, grad_dtype, E_dtype)
    if grad_dtype == E_dtype == torch.float32 and numel > 4_194_304:  # the float64 chunk sums are the most
        assert inner_product_bytes(numel, grad_dtype, E_dtype) <= measured + 8
