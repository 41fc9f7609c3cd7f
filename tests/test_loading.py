"""load_model, the one model loader: modules as they are, the class a directory's config names or the one asked for,
stored or requested dtype, hub ids from the offline cache, its callers (DeltaEditModule, DPOLoss, CLIP towers, save_edited),
remote code never run, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

from lightning_delta.datamodules import ZeroShotClassifier
from lightning_delta.losses import DPOLoss
from lightning_delta.module import DeltaEditModule
from lightning_delta.sources import check_dtype, load_model
from tests.support.tiny_models import make_fake_hub_repo, make_tiny_model, save_model


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_a_module_comes_back_as_it_is():
    model = nn.Linear(2, 2).train()
    assert load_model(model, torch.float64) is model
    assert model.weight.dtype == torch.float32 and model.training  # neither cast nor put in eval mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_class_of_the_config_in_its_stored_dtype(tmp_path, dtype):
    model = make_tiny_model("llama", dtype=dtype)
    directory = save_model(model, tmp_path / "llama", tokenizer=False)
    loaded = load_model(directory)
    assert type(loaded) is transformers.LlamaForCausalLM and not loaded.training
    assert loaded.model.embed_tokens.weight.dtype == dtype
    assert same_weights(loaded, model)
    assert load_model(str(directory), "float64").lm_head.weight.dtype == torch.float64


def test_the_class_asked_for_by_class_or_name(tmp_path):
    directory = save_model(make_tiny_model("clip"), tmp_path / "clip", tokenizer=False)
    assert type(load_model(directory)) is transformers.CLIPModel
    assert type(load_model(directory, model_class="CLIPVisionModel")) is transformers.CLIPVisionModel
    assert type(load_model(directory, model_class=transformers.CLIPTextModel)) is transformers.CLIPTextModel


def test_a_hub_id_from_the_offline_cache(tmp_path, offline_hub):
    model = make_tiny_model("qwen2")
    make_fake_hub_repo(offline_hub, "tiny-org/qwen2", save_model(model, tmp_path / "qwen2", tokenizer=False))
    loaded = load_model("tiny-org/qwen2", model_class="AutoModelForCausalLM")
    assert type(loaded) is transformers.Qwen2ForCausalLM and same_weights(loaded, model)
    with pytest.raises(ValueError, match=r"'tiny-org/absent' is neither an existing file.*HF_HUB_OFFLINE"):
        load_model("tiny-org/absent")


def test_the_callers_load_through_it(tmp_path):
    llama = make_tiny_model("llama", dtype=torch.float64)
    llama_dir = save_model(llama, tmp_path / "llama", tokenizer=False)
    module = DeltaEditModule(str(llama_dir), pretrained=llama, edit={}, dtype="float32")
    assert type(module.model) is transformers.LlamaForCausalLM and module.model.lm_head.weight.dtype == torch.float32
    dpo = DeltaEditModule(llama, pretrained=str(llama_dir), edit={}, loss="dpo")
    assert same_weights(dpo.loss.reference, llama) and not dpo.loss.reference.training
    assert same_weights(DPOLoss(llama_dir).reference, llama)

    clip = make_tiny_model("clip")
    clip_dir = save_model(clip, tmp_path / "clip")
    tower = make_tiny_model("clip-vision", seed=3)
    tower_dir = save_model(tower, tmp_path / "tower", tokenizer=False)
    classifier = ZeroShotClassifier(clip_dir, classnames=["a", "b"], templates=["{}"], vision_model=tower_dir)
    assert same_weights(classifier.vision_model, tower)  # the class its config names: CLIPVisionModel
    assert torch.equal(classifier.visual_projection.weight, clip.visual_projection.weight)


def test_remote_code_is_never_run(tmp_path):
    directory = save_model(make_tiny_model("llama"), tmp_path / "custom", tokenizer=False)
    marker = tmp_path / "remote-code-ran"
    (directory / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["CustomForCausalLM"]
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    assert type(load_model(directory)) is transformers.LlamaModel  # not a transformers class: AutoModel
    assert type(load_model(directory, model_class="AutoModelForCausalLM")) is transformers.LlamaForCausalLM
    assert not marker.exists()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda tmp: load_model(3), r"`model` must be an nn.Module, a local directory or a hub id, got int"),
        (lambda tmp: DPOLoss({"w": torch.zeros(1)}), r"`reference` must be an nn.Module.*got dict"),
        (lambda tmp: load_model(tmp, "float31"), r"dtype must be None, 'auto', a torch.dtype.*'float31'"),
        (lambda tmp: load_model(tmp), r"must be a Hugging Face model directory \(or hub id\) with a config\.json"),
        (lambda tmp: load_model(tmp / "absent" / "model.safetensors"), r"does not exist \(and is not a hub id"),
        (lambda tmp: load_model(tmp / "m", model_class="NoSuchModel"), r"model_class must be .*'NoSuchModel'"),
    ],
)
def test_errors(tmp_path, call, message):
    save_model(make_tiny_model("llama"), tmp_path / "m", tokenizer=False)
    with pytest.raises(ValueError, match=message):
        call(tmp_path)


def test_check_dtype():
    assert check_dtype(None) is None and check_dtype("auto") == "auto"
    assert check_dtype(torch.float16) is torch.float16 and check_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="got 'Tensor'"):
        check_dtype("Tensor")
