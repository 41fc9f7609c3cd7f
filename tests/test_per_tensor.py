"""PerTensor: a different edit per tensor by regular expression, equal to applying each edit to its tensors."""

from __future__ import annotations

import json
import re

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from lightning_delta import DeltaEditModule, RiemannCallback, apply_edit_, save_edited
from lightning_delta.cli import run
from lightning_delta.delta import iter_delta
from lightning_delta.demo.digits import DigitsDataModule
from lightning_delta.edits import DARE, BitDelta, GradientBiased, LowRank, PerTensor
from lightning_delta.export import PER_TENSOR_FILE
from tests.support.tiny_models import make_tiny_model

PATTERNS = {
    r"q_proj": BitDelta(bits=2),
    r"mlp\.(up|down)": DARE(p=0.7, seed=3),
    r"self_attn": LowRank(rank=2),
    r".": BitDelta(bits=1),
}


def explicit(patterns, name, delta):
    """The first pattern that re.search finds in name, its edit applied to this one tensor alone."""
    for pattern, edit in patterns.items():
        if re.search(pattern, name):
            return edit({name: delta})[name]
    raise AssertionError(name)


def test_per_tensor_equals_each_edit_applied_to_its_tensors_by_an_explicit_loop(llama_pair):
    deltas = dict(iter_delta(llama_pair.post, pretrained=llama_pair.pre))
    edited = PerTensor(PATTERNS)(deltas)
    assert list(edited) == list(deltas)
    used = set()
    for name, delta in deltas.items():
        assert torch.equal(edited[name], explicit(PATTERNS, name, delta)), name
        used.add(next(pattern for pattern in PATTERNS if re.search(pattern, name)))
    assert used == set(PATTERNS)  # every pattern was exercised


def test_per_tensor_in_apply_edit_equals_the_explicit_loop(llama_pair):
    model = make_tiny_model("llama", seed=0)
    model.load_state_dict(llama_pair.post.state_dict())
    apply_edit_(model, pretrained=llama_pair.pre, edit=PerTensor(PATTERNS))
    pre = llama_pair.pre.state_dict()
    for name, delta in iter_delta(llama_pair.post, pretrained=llama_pair.pre):
        expected = pre[name].to(torch.float32) + explicit(PATTERNS, name, delta)
        assert torch.equal(model.state_dict()[name], expected.to(model.state_dict()[name].dtype)), name


def test_unmatched_tensor_is_an_error_by_default_and_kept_on_request():
    deltas = {"a": torch.tensor([-4.0, 2.0]), "b": torch.tensor([1.0, 3.0])}
    with pytest.raises(ValueError, match=r"no pattern matches tensor 'b'.*unmatched='keep'"):
        PerTensor({"^a$": BitDelta()})(deltas)
    kept = PerTensor({"^a$": BitDelta()}, unmatched="keep")(deltas)
    assert kept["a"].tolist() == [-3.0, 3.0] and torch.equal(kept["b"], deltas["b"])


def test_first_matching_pattern_wins():
    deltas = {"layer.weight": torch.tensor([-4.0, 1.0, -2.0, 3.0])}
    first = PerTensor({"weight": BitDelta(bits=2), "layer": BitDelta(bits=1)})(deltas)
    assert torch.equal(first["layer.weight"], BitDelta(bits=2)(deltas)["layer.weight"])


def test_config_round_trips_and_config_dicts_build_the_same_edits():
    edit = PerTensor({"q": {"name": "dare", "p": 0.5, "seed": 2}, ".": BitDelta(bits=3)})
    assert edit.edits["q"] == DARE(p=0.5, seed=2)
    config = json.loads(json.dumps(edit.config()))
    assert config["name"] == "per_tensor"
    assert PerTensor(**{key: value for key, value in config.items() if key != "name"}) == edit
    assert hash(edit) == hash(PerTensor(edit.edits))


def test_gradient_biased_gets_its_gradients_passed_on():
    edit = PerTensor({"^a$": GradientBiased(p=0.5, k=0.5), ".": BitDelta()})
    assert edit.needs_gradients
    deltas = {"a": torch.arange(1.0, 9.0), "b": torch.ones(3)}
    gradients = {"a": torch.linspace(-1, 1, 8), "b": torch.zeros(3)}
    out = edit(deltas, gradients)
    assert torch.equal(out["a"], GradientBiased(p=0.5, k=0.5)({"a": deltas["a"]}, {"a": gradients["a"]})["a"])
    with pytest.raises(ValueError, match="needs the gradient"):
        edit(deltas)


@pytest.mark.parametrize(
    ("edits", "match"),
    [
        ({}, "non-empty mapping"),
        (["q", BitDelta()], "non-empty mapping"),
        ({"(": BitDelta()}, r"pattern '\(' is not a valid regular expression"),
        ({1: BitDelta()}, "every pattern must be a str"),
        ({"q": {"name": "nope"}}, r"names no edit.*'bitdelta'"),
        ({"q": {"name": "dare", "q": 1}}, "unexpected keyword"),
        ({"q": {"name": "dare", "p": 1.5}}, r"`p` must be in \[0, 1\)"),
        ({"q": "bitdelta"}, "must be an edit of lightning_delta.edits"),
        ({"q": PerTensor({".": BitDelta()})}, "not a PerTensor"),
    ],
)
def test_bad_per_tensor_arguments_are_refused_naming_the_value(edits, match):
    with pytest.raises(ValueError, match=match):
        PerTensor(edits)


def test_bad_unmatched_is_refused():
    with pytest.raises(ValueError, match=r"`unmatched` must be one of \['error', 'keep'\], got unmatched='drop'"):
        PerTensor({".": BitDelta()}, unmatched="drop")


def test_per_tensor_under_riemann_callback_equals_its_ready_made_E(llama_pair):
    """DeltaEditModule + RiemannCallback with PerTensor give the same term and exact ΔL as the same E given as a
    mapping computed by the explicit loop."""
    E = {
        name: explicit(PATTERNS, name, delta) - delta
        for name, delta in iter_delta(llama_pair.post, pretrained=llama_pair.pre)
    }
    results = []
    for edit in (PerTensor(PATTERNS), E):
        callback = RiemannCallback(num_points=2, filename=None)
        module = DeltaEditModule(make_tiny_model("llama", seed=0), pretrained=llama_pair.pre, edit=edit)
        module.model.load_state_dict(llama_pair.post.state_dict())
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            inference_mode=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
        )
        trainer.validate(module, datamodule=DigitsDataModule(limit=8, batch_size=4), verbose=False)
        results.append(callback.result)
    assert results[0].exact == pytest.approx(results[1].exact, rel=1e-12, abs=1e-12)
    assert results[0].term == pytest.approx(results[1].term, rel=1e-9, abs=1e-12)


def test_save_edited_writes_the_per_tensor_settings_beside_the_weights(llama_pair, tmp_path):
    edit = PerTensor(PATTERNS)
    path = save_edited(
        str(llama_pair.post_dir), pretrained=str(llama_pair.pre_dir), edit=edit, output_dir=tmp_path / "out"
    )
    assert json.loads((path / PER_TENSOR_FILE).read_text()) == edit.config()
    weights = load_file(path / "model.safetensors")
    pre = llama_pair.pre.state_dict()
    for name, delta in iter_delta(llama_pair.post, pretrained=llama_pair.pre):
        assert torch.equal(weights[name], pre[name] + explicit(PATTERNS, name, delta)), name


def test_save_edited_with_a_uniform_edit_writes_no_per_tensor_file(llama_pair, tmp_path):
    path = save_edited(
        str(llama_pair.post_dir), pretrained=str(llama_pair.pre_dir), edit=BitDelta(), output_dir=tmp_path / "out"
    )
    assert not (path / PER_TENSOR_FILE).exists()


def test_edit_command_takes_a_per_tensor_edit_of_config_dicts(llama_pair, tmp_path):
    edits = {"q_proj": {"name": "bitdelta", "bits": 2}, ".": {"name": "dare", "p": 0.5, "seed": 1}}
    run(
        [
            "edit",
            "--model",
            str(llama_pair.post_dir),
            "--pretrained",
            str(llama_pair.pre_dir),
            "--output_dir",
            str(tmp_path / "out"),
            "--edit",
            "lightning_delta.edits.PerTensor",
            "--edit.edits",
            json.dumps(edits),
        ]
    )
    expected = PerTensor(edits)
    assert json.loads((tmp_path / "out" / PER_TENSOR_FILE).read_text()) == expected.config()
    weights = load_file(tmp_path / "out" / "model.safetensors")
    pre = llama_pair.pre.state_dict()
    for name, delta in iter_delta(llama_pair.post, pretrained=llama_pair.pre):
        assert torch.equal(weights[name], pre[name] + explicit(expected.edits, name, delta)), name
