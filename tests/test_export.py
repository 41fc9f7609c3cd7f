"""Tests of :mod:`lightning_delta.export`: ``W_pre + F(ΔW)`` written into a model and saved with ``save_pretrained``;
plain ``transformers`` ``from_pretrained`` of the saved directory gives the logits of the edited model, checked
against a float64 reference built without the library."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from torch.nn.utils import parametrize

from lightning_delta.delta import compute_delta
from lightning_delta.export import apply_edit_, save_edited
from tests.support.tiny_models import (
    IMAGE_SIZE,
    VOCAB_SIZE,
    make_fake_hub_repo,
    make_post_trained,
    make_tiny_model,
    reference_state_dict,
    save_model,
)


def sign_scale(delta: torch.Tensor) -> torch.Tensor:
    """A deterministic F: positive entries × 1.5, the others × 0.25 (in the delta's dtype)."""
    return torch.where(delta > 0, 1.5 * delta, 0.25 * delta)


class SignScale:
    def edit_tensor(self, name, delta, gradient=None):
        return sign_scale(delta)


class GradientMask:
    """A gradient-aware F: keeps ΔW where ΔW·∇L < 0."""

    needs_gradients = True

    def edit_tensor(self, name, delta, gradient=None):
        return torch.where(delta * gradient < 0, delta, torch.zeros_like(delta))


def reference_edited_state(pre, post, function, names=None) -> dict[str, torch.Tensor]:
    """``W_pre + F(W_post − W_pre)`` in float64 from the modules' state dicts, cast to the post dtype."""
    pre_state, post_state = reference_state_dict(pre), reference_state_dict(post)
    edited = {}
    for name, w_post in post_state.items():
        if names is not None and name not in names:
            edited[name] = w_post
            continue
        w_pre = pre_state[name].double()
        edited[name] = (w_pre + function(w_post.double() - w_pre)).to(w_post.dtype)
    return edited


def model_with(state: dict[str, torch.Tensor], like: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(like)
    model.load_state_dict(state, strict=False)  # tied copies are absent from the reference state
    return model.eval()


def outputs(model: torch.nn.Module) -> torch.Tensor:
    """Logits (language models) or the pooled image embedding (vision towers) on a fixed input."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if model.config.model_type == "clip_vision_model":
            pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            return model(pixel_values=pixels).pooler_output.float()
        ids = torch.randint(4, VOCAB_SIZE, (2, 12), generator=generator)
        return model(input_ids=ids).logits.float()


def saved_names(directory) -> set[str]:
    names = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


LOADERS = {
    "llama": transformers.AutoModelForCausalLM,
    "llama-tied": transformers.AutoModelForCausalLM,
    "qwen2": transformers.AutoModelForCausalLM,
    "clip-vision": transformers.CLIPVisionModel,
}


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen2", "clip-vision"])
def test_save_edited_round_trip(tiny_pair, tmp_path, family):
    pair = tiny_pair(family, shard="post", scale=0.05)
    out = save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=tmp_path / "edited")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    loaded = LOADERS[family].from_pretrained(out).eval()

    # the same edit in memory, on a copy of the post-trained module
    in_memory = apply_edit_(copy.deepcopy(pair.post), pretrained=pair.pre, edit=SignScale())
    assert torch.equal(outputs(loaded), outputs(in_memory))
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    # against W_pre + F(ΔW) computed in float64 without the library
    reference = model_with(reference_edited_state(pair.pre, pair.post, sign_scale), pair.post)
    torch.testing.assert_close(outputs(loaded), outputs(reference), rtol=0, atol=1e-5)
    assert not torch.allclose(outputs(loaded), outputs(pair.post), atol=1e-4)  # the edit changed the model

    if family == "llama-tied":
        assert "lm_head.weight" not in saved_names(out)
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert in_memory.lm_head.weight.data_ptr() == in_memory.model.embed_tokens.weight.data_ptr()
    if family == "llama":
        assert "lm_head.weight" in saved_names(out)
        assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


def test_save_edited_copies_tokenizer_and_config(tiny_pair, tmp_path):
    pair = tiny_pair("mistral", shard=None)
    out = save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=tmp_path / "edited")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|user|>")


def test_save_edited_from_a_loaded_model_edits_it_in_place(tiny_pair, tmp_path):
    pair = tiny_pair("llama-tied", shard="pre")
    post = transformers.AutoModelForCausalLM.from_pretrained(pair.post_dir).eval()
    out = save_edited(post, pretrained=pair.pre_dir, edit=SignScale(), output_dir=tmp_path / "edited", exclude=r"norm")
    reference = reference_edited_state(
        pair.pre, pair.post, sign_scale, names={n for n in reference_state_dict(pair.post) if "norm" not in n}
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, expected in reference.items():
        torch.testing.assert_close(loaded.state_dict()[name], expected, rtol=0, atol=2e-7, msg=name)
        assert torch.equal(post.state_dict()[name], loaded.state_dict()[name]), name  # post was edited in place
    assert torch.equal(loaded.model.norm.weight, pair.post.model.norm.weight)  # excluded: still W_post
    assert (out / "tokenizer.json").is_file()  # copied from post.name_or_path


def test_save_edited_from_offline_hub_cache(tiny_pair, tmp_path, offline_hub):
    pair = tiny_pair("qwen2", shard="both")
    make_fake_hub_repo(offline_hub, "tiny-org/qwen2-base", pair.pre_dir)
    make_fake_hub_repo(offline_hub, "tiny-org/qwen2-instruct", pair.post_dir)
    out = save_edited(
        "tiny-org/qwen2-instruct", pretrained="tiny-org/qwen2-base", edit=SignScale(), output_dir=tmp_path / "edited"
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    reference = model_with(reference_edited_state(pair.pre, pair.post, sign_scale), pair.post)
    torch.testing.assert_close(outputs(loaded), outputs(reference), rtol=0, atol=1e-5)
    assert (out / "tokenizer.json").is_file()


def test_mapping_edit_matches_the_edit_object(tiny_pair):
    pair = tiny_pair("llama", shard="post")
    edit = _dare_or_sign_scale()
    deltas = compute_delta(pair.post_dir, pretrained=pair.pre_dir, include=r"\.mlp\.")
    differences = {name: edit.edit_tensor(name, delta) - delta for name, delta in deltas.items()}  # E = F(ΔW) − ΔW
    from_mapping = apply_edit_(copy.deepcopy(pair.post), pretrained=pair.pre_dir, edit=differences)
    from_object = apply_edit_(copy.deepcopy(pair.post), pretrained=pair.pre_dir, edit=edit, include=r"\.mlp\.")
    for name, tensor in from_object.state_dict().items():
        # W_pre + (ΔW + E) against W_pre + F(ΔW): equal up to float32 rounding of the extra addition
        torch.testing.assert_close(from_mapping.state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
        if ".mlp." not in name:
            assert torch.equal(tensor, pair.post.state_dict()[name]), name  # not selected: untouched


def _dare_or_sign_scale():
    try:
        from lightning_delta.edits import DARE
    except ImportError:
        return SignScale()
    return DARE(p=0.5, seed=3)


def test_bfloat16_model_is_edited_in_float32_and_saved_in_bfloat16(tmp_path):
    pre = make_tiny_model("llama", seed=0)  # float32
    post = make_post_trained(pre, seed=1, scale=0.05).to(torch.bfloat16)
    save_model(post, tmp_path / "post", tokenizer=False)
    out = save_edited(tmp_path / "post", pretrained=pre, edit=SignScale(), output_dir=tmp_path / "edited")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    # W_pre (float32) + F(ΔW) summed in float32, then rounded once to bfloat16
    for name, expected in reference_edited_state(pre, post, sign_scale).items():
        assert loaded.state_dict()[name].dtype == torch.bfloat16
        torch.testing.assert_close(loaded.state_dict()[name], expected, rtol=0.008, atol=1e-6, msg=name)


def test_gradients_are_passed_to_gradient_aware_edits():
    pre = make_tiny_model("llama", seed=0)
    post = make_post_trained(pre, seed=1)
    generator = torch.Generator().manual_seed(5)
    names = [n for n in reference_state_dict(post) if "layers.0" in n]
    gradients = {n: torch.randn(post.state_dict()[n].shape, generator=generator) for n in names}
    edited = apply_edit_(
        copy.deepcopy(post), pretrained=pre, edit=GradientMask(), include=r"layers\.0\.", gradients=gradients
    )
    for name in names:
        w_pre, w_post = pre.state_dict()[name].double(), post.state_dict()[name].double()
        delta = w_post - w_pre
        expected = w_pre + torch.where(delta * gradients[name].double() < 0, delta, 0.0)
        torch.testing.assert_close(edited.state_dict()[name].double(), expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"GradientMask needs the gradient.*missing for .*model\.layers\.1\."):
        apply_edit_(copy.deepcopy(post), pretrained=pre, edit=GradientMask(), gradients=gradients)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


class WrongShape:
    def edit_tensor(self, name, delta, gradient=None):
        return delta.flatten()


class Diverging:
    def edit_tensor(self, name, delta, gradient=None):
        return delta / 0.0


def test_bad_edits_are_named(tiny_pair, tmp_path):
    pair = tiny_pair("llama-tied", shard="post")
    post = pair.post
    with pytest.raises(ValueError, match=r"edit must be an editing operation of lightning_delta.edits.*got str"):
        apply_edit_(copy.deepcopy(post), pretrained=pair.pre, edit="dare")
    with pytest.raises(ValueError, match=r"returned shape \(4096,\) for model\.embed_tokens\.weight.*\(128, 32\)"):
        apply_edit_(copy.deepcopy(post), pretrained=pair.pre, edit=WrongShape())
    with pytest.raises(ValueError, match=r"Diverging returned NaN or inf values for model\.embed_tokens\.weight"):
        apply_edit_(copy.deepcopy(post), pretrained=pair.pre, edit=Diverging())
    # a tied tensor is edited under its first name only
    with pytest.raises(ValueError, match=r"not among the selected delta tensors: lm_head\.weight"):
        apply_edit_(copy.deepcopy(post), pretrained=pair.pre, edit={"lm_head.weight": torch.zeros(VOCAB_SIZE, 32)})
    with pytest.raises(ValueError, match=r"model\.norm\.weight \(\(3,\), expected \(32,\)\)"):
        apply_edit_(copy.deepcopy(post), pretrained=pair.pre, edit={"model.norm.weight": torch.zeros(3)})


def test_errors_leave_the_model_unchanged_before_editing(tiny_pair):
    pair = tiny_pair("llama", shard="post")
    post = copy.deepcopy(pair.post)
    with pytest.raises(ValueError, match=r"missing from pre"):
        apply_edit_(post, pretrained={"model.norm.weight": pair.pre.model.norm.weight}, edit=SignScale())
    with pytest.raises(ValueError, match=r"select no floating-point tensor"):
        apply_edit_(post, pretrained=pair.pre_dir, edit=SignScale(), include="nothing")
    for name, tensor in post.state_dict().items():
        assert torch.equal(tensor, pair.post.state_dict()[name]), name


def test_parametrized_model_is_refused():
    pre = make_tiny_model("llama", seed=0)
    post = make_post_trained(pre, seed=1)

    class Identity(torch.nn.Module):
        def forward(self, weight):
            return weight

    parametrize.register_parametrization(post.model.layers[0].mlp.up_proj, "weight", Identity())
    message = r"parametrizations on model\.layers\.0\.mlp\.up_proj.*remove_parametrizations"
    with pytest.raises(ValueError, match=message):
        apply_edit_(post, pretrained=pre, edit=SignScale())


def test_tied_model_with_untied_pretrained_is_ambiguous():
    pre = make_tiny_model("llama", seed=0)  # lm_head and embed_tokens differ
    post = make_post_trained(make_tiny_model("llama-tied", seed=0), seed=1)
    with pytest.raises(ValueError, match=r"lm_head\.weight and model\.embed_tokens\.weight are one tied tensor"):
        apply_edit_(post, pretrained=pre, edit=SignScale())


def test_save_edited_argument_errors(tiny_pair, tmp_path):
    pair = tiny_pair("llama", shard=None)
    with pytest.raises(ValueError, match=r"output_dir .* is a directory the models are read from"):
        save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=pair.post_dir)
    with pytest.raises(ValueError, match=r"output_dir .* is a directory the models are read from"):
        save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=pair.pre_dir)
    with pytest.raises(ValueError, match=r"safetensors only"):
        save_edited(
            pair.post_dir,
            pretrained=pair.pre_dir,
            edit=SignScale(),
            output_dir=tmp_path / "out",
            safe_serialization=False,
        )
    with pytest.raises(ValueError, match=r"Linear without save_pretrained.*apply_edit_"):
        save_edited(torch.nn.Linear(2, 2), pretrained=pair.pre_dir, edit=SignScale(), output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"must be a Hugging Face model directory .* with a config\.json"):
        save_edited(
            pair.post_dir / "model.safetensors", pretrained=pair.pre_dir, edit=SignScale(), output_dir=tmp_path / "out"
        )
    with pytest.raises(ValueError, match=r"dtype must be None, 'auto', a torch\.dtype.*'float31'"):
        save_edited(
            pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=tmp_path / "out", dtype="float31"
        )
    assert not (tmp_path / "out").exists()


def test_save_edited_casts_to_the_requested_dtype(tiny_pair, tmp_path):
    pair = tiny_pair("llama", shard=None)
    out = save_edited(
        pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=tmp_path / "edited", dtype="bfloat16"
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    for name, expected in reference_edited_state(pair.pre, pair.post.to(torch.bfloat16), sign_scale).items():
        torch.testing.assert_close(loaded.state_dict()[name], expected, rtol=0.008, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------- the output directory
def snapshot(directory) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes)."""
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def hidden_siblings(directory) -> list[str]:
    return sorted(path.name for path in directory.parent.iterdir() if path.name.startswith(f".{directory.name}."))


def test_save_edited_refuses_a_non_empty_output_dir_and_leaves_it_untouched(tiny_pair, tmp_path):
    pair = tiny_pair("llama", shard=None)
    out = tmp_path / "edited"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    (out / "notes.txt").write_bytes(b"another model's files")
    before = snapshot(out)
    with pytest.raises(ValueError, match=rf"output_dir {out} is not empty.*overwrite=True.*--overwrite.*empty"):
        save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=out)
    assert snapshot(out) == before
    assert hidden_siblings(out) == []


def test_save_edited_writes_into_an_existing_empty_dir(tiny_pair, tmp_path):
    pair = tiny_pair("llama", shard=None)
    out = tmp_path / "edited"
    out.mkdir()
    save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, expected in reference_edited_state(pair.pre, pair.post, sign_scale).items():
        torch.testing.assert_close(loaded.state_dict()[name], expected, rtol=0, atol=2e-7, msg=name)
    assert hidden_siblings(out) == []


def test_save_edited_overwrite_replaces_the_whole_directory(tiny_pair, tmp_path):
    pair = tiny_pair("llama", shard="post")  # the old model: a sharded checkpoint with its index
    out = tmp_path / "edited"
    shutil.copytree(pair.post_dir, out)
    (out / "stale.txt").write_text("left by the old model")
    assert (out / "model.safetensors.index.json").is_file()
    save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=out, overwrite=True)
    assert sorted(path.name for path in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists() and not (out / "stale.txt").exists()
    assert hidden_siblings(out) == []
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, expected in reference_edited_state(pair.pre, pair.post, sign_scale).items():
        torch.testing.assert_close(loaded.state_dict()[name], expected, rtol=0, atol=2e-7, msg=name)


def _crashing_save(self, save_directory, **kwargs):
    (Path(save_directory) / "model-00001-of-00002.safetensors").write_bytes(b"half a model")
    raise OSError("No space left on device")


@pytest.mark.parametrize("existing", [False, True])
def test_a_crash_while_saving_leaves_no_half_model(tiny_pair, tmp_path, monkeypatch, existing):
    pair = tiny_pair("llama", shard=None)
    out = tmp_path / "edited"
    if existing:  # an old model that overwrite=True would replace: it must survive the crash whole
        shutil.copytree(pair.post_dir, out)
        before = snapshot(out)
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", _crashing_save)
    with pytest.raises(OSError, match="No space left"):
        save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=out, overwrite=existing)
    assert hidden_siblings(out) == []
    if existing:
        assert snapshot(out) == before
    else:
        assert not out.exists()


def test_a_crash_while_saving_with_default_arguments_leaves_nothing(tiny_pair, tmp_path, monkeypatch):
    pair = tiny_pair("llama", shard=None)
    out = tmp_path / "new" / "edited"
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", _crashing_save)
    with pytest.raises(OSError, match="No space left"):
        save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=out)
    assert not out.exists() and hidden_siblings(out) == []


def test_save_edited_output_dir_that_is_a_file(tiny_pair, tmp_path):
    pair = tiny_pair("llama", shard=None)
    out = tmp_path / "edited"
    out.write_bytes(b"not a directory")
    with pytest.raises(ValueError, match=rf"output_dir {out} exists and is not a directory"):
        save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=out)
    with pytest.raises(ValueError, match=rf"output_dir {out} exists and is not a directory"):
        save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=out, overwrite=True)
    assert out.read_bytes() == b"not a directory" and hidden_siblings(out) == []


def test_save_edited_overwrite_never_deletes_an_input(tiny_pair, tmp_path):
    pair = tiny_pair("llama", shard=None)
    before = snapshot(pair.post_dir)
    with pytest.raises(ValueError, match=r"holds .*post, which the models are read from"):
        save_edited(
            pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=pair.post_dir.parent, overwrite=True
        )
    assert snapshot(pair.post_dir) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_symlinked_output_dir_is_written_through_and_stays_a_link(tiny_pair, tmp_path, overwrite):
    """As ``cp`` and ``save_pretrained`` do: the model goes where the link points; the link is never replaced.
    Without overwrite the link points to an empty directory; with it, to one holding an old model."""
    from lightning_delta.cli import run

    pair = tiny_pair("llama", shard=None)
    target, link = tmp_path / "disk" / "edited", tmp_path / "edited"
    target.mkdir(parents=True)
    if overwrite:
        (target / "stale.txt").write_text("left by the old model")
    link.symlink_to(target, target_is_directory=True)
    run(
        [
            "edit",
            "--model",
            str(pair.post_dir),
            "--pretrained",
            str(pair.pre_dir),
            "--edit",
            "DARE",
            "--edit.p",
            "0.5",
            "--output_dir",
            str(link),
            "--overwrite",
            str(overwrite).lower(),
        ]
    )
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "model.safetensors").is_file() and not (target / "stale.txt").exists()
    assert hidden_siblings(target) == [] and hidden_siblings(link) == []
    from lightning_delta.edits import DARE

    expected = {
        name: pair.pre.state_dict()[name].double() + delta.double()
        for name, delta in DARE(p=0.5)(compute_delta(pair.post_dir, pretrained=pair.pre_dir)).items()
    }
    loaded = transformers.AutoModelForCausalLM.from_pretrained(link).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name].double(), value, rtol=0, atol=1e-6, msg=name)


def test_a_dangling_symlink_output_dir_is_refused(tiny_pair, tmp_path):
    pair = tiny_pair("llama", shard=None)
    link = tmp_path / "edited"
    link.symlink_to(tmp_path / "missing", target_is_directory=True)
    with pytest.raises(ValueError, match=r"is a symbolic link to .*missing, which does not exist"):
        save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=SignScale(), output_dir=link)
    assert link.is_symlink() and not (tmp_path / "missing").exists()


def test_the_post_trained_weights_as_w_pre_are_refused(tiny_pair, tmp_path):
    """`--pretrained` naming the post-trained directory: ΔW is zero everywhere, every edit a no-op; refused, and
    nothing is written."""
    pair = tiny_pair("llama", shard=None)
    with pytest.raises(ValueError, match=r"ΔW = W_post − W_pre is zero in every one of the \d+ selected tensors"):
        save_edited(pair.post_dir, pretrained=pair.post_dir, edit=SignScale(), output_dir=tmp_path / "edited")
    assert not (tmp_path / "edited").exists()
