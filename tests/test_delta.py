"""Tests of :mod:`lightning_delta.delta`: ΔW from modules, state dicts, (sharded) safetensors directories, ``.bin``
files and an offline Hub cache, each against ``post − pre`` computed independently in float64; the clear errors;
and the one-tensor-at-a-time reading."""

from __future__ import annotations

import re
import weakref

import pytest
import torch
from safetensors.torch import save_file

from lightning_delta import sources
from lightning_delta.attach import edit_differences
from lightning_delta.delta import compute_delta, delta_names, iter_delta, load_tensors, tied_names
from tests.support.tiny_models import (
    make_fake_hub_repo,
    make_post_trained,
    make_tiny_model,
    read_index,
    reference_state_dict,
    save_model,
)


def reference_delta(pre: torch.nn.Module, post: torch.nn.Module) -> dict[str, torch.Tensor]:
    """post − pre in float64 for every floating tensor, each tied tensor once (first name), from the modules."""
    pre_state, post_state = reference_state_dict(pre), reference_state_dict(post)
    return {
        name: post_state[name].double() - pre_state[name].double()
        for name in post_state
        if post_state[name].is_floating_point()
    }


def assert_matches_reference(delta: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], atol=1e-6) -> None:
    assert sorted(delta) == sorted(reference)
    for name, expected in reference.items():
        assert delta[name].dtype in (torch.float32, torch.float64), name
        assert delta[name].shape == expected.shape, name
        torch.testing.assert_close(delta[name].double(), expected, rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize(
    ("family", "shard"),
    [("llama", "post"), ("llama-tied", "both"), ("mistral", None), ("qwen2", "pre"), ("clip-vision", "both")],
)
def test_compute_delta_from_saved_directories(tiny_pair, family, shard):
    pair = tiny_pair(family, shard=shard)
    if shard in ("post", "both"):
        assert len(set(read_index(pair.post_dir)["weight_map"].values())) > 1  # really sharded
    if shard is None:
        assert (pair.post_dir / "model.safetensors").is_file()
    delta = compute_delta(pair.post_dir, pretrained=pair.pre_dir)
    assert_matches_reference(delta, reference_delta(pair.pre, pair.post))
    assert max(float(value.abs().max()) for value in delta.values()) > 0.01  # the perturbation is there


@pytest.mark.parametrize("family", ["llama", "llama-tied", "clip"])
@pytest.mark.parametrize("pre_kind", ["module", "state_dict", "directory"])
@pytest.mark.parametrize("post_kind", ["module", "state_dict", "directory"])
def test_compute_delta_from_modules_state_dicts_and_directories(tiny_pair, family, pre_kind, post_kind):
    pair = tiny_pair(family, shard="post")
    kinds = {
        "module": (pair.pre, pair.post),
        "state_dict": (pair.pre.state_dict(), pair.post.state_dict()),
        "directory": (str(pair.pre_dir), pair.post_dir),
    }
    delta = compute_delta(kinds[post_kind][1], pretrained=kinds[pre_kind][0])
    assert_matches_reference(delta, reference_delta(pair.pre, pair.post))


def test_delta_of_a_module_is_a_new_tensor_and_the_weights_are_untouched():
    pre = make_tiny_model("llama", seed=0)
    post = make_post_trained(pre, seed=1)
    before = {name: tensor.clone() for name, tensor in post.state_dict().items()}
    delta = compute_delta(post, pretrained=pre)
    delta["model.norm.weight"].zero_()
    for name, tensor in post.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not any(value.requires_grad for value in delta.values())


def test_compute_delta_from_offline_hub_cache(tiny_pair, offline_hub):
    pair = tiny_pair("qwen2", shard="post")
    make_fake_hub_repo(offline_hub, "tiny-org/qwen2-base", pair.pre_dir)
    make_fake_hub_repo(offline_hub, "tiny-org/qwen2-instruct", pair.post_dir)
    delta = compute_delta("tiny-org/qwen2-instruct", pretrained="tiny-org/qwen2-base")
    assert_matches_reference(delta, reference_delta(pair.pre, pair.post))
    # a hub id and a module mixed
    assert_matches_reference(
        compute_delta(pair.post, pretrained="tiny-org/qwen2-base"), reference_delta(pair.pre, pair.post)
    )


def test_hub_id_missing_from_offline_cache(offline_hub):
    with pytest.raises(ValueError, match=r"pre-trained weights.*'tiny-org/absent'.*HF_HUB_OFFLINE"):
        compute_delta({"w": torch.zeros(1)}, pretrained="tiny-org/absent")


def test_compute_delta_from_single_files(tmp_path):
    pre = make_tiny_model("clip-vision", seed=3)
    post = make_post_trained(pre, seed=4)
    save_file({k: v.contiguous() for k, v in pre.state_dict().items()}, tmp_path / "pre.safetensors")
    torch.save(post.state_dict(), tmp_path / "pytorch_model.bin")
    delta = compute_delta(tmp_path / "pytorch_model.bin", pretrained=tmp_path / "pre.safetensors")
    assert_matches_reference(delta, reference_delta(pre, post))
    # a directory holding only pytorch_model.bin is read with torch.load(weights_only=True)
    bin_dir = tmp_path / "bin-dir"
    bin_dir.mkdir()
    torch.save(post.state_dict(), bin_dir / "pytorch_model.bin")
    assert_matches_reference(compute_delta(bin_dir, pretrained=pre), reference_delta(pre, post))


class NotATensor:
    """Any pickled object: unpickling it could run code, so weights_only loading refuses it."""


def test_bin_file_with_objects_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "trap": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"post-trained weights.*not loaded.*weights_only=True"):
        compute_delta(tmp_path, pretrained={"w": torch.zeros(2)})


# ---------------------------------------------------------------------------------------------------------------
# Selection, tied tensors, dtypes


def test_include_and_exclude_are_regular_expressions_on_names():
    pre = make_tiny_model("mistral", seed=0)
    post = make_post_trained(pre, seed=1)
    mlp = compute_delta(post, pretrained=pre, include=r"\.mlp\.")
    assert mlp and all(".mlp." in name for name in mlp)
    assert len(mlp) == 2 * 3  # two layers × gate, up, down
    no_norms = compute_delta(post, pretrained=pre, exclude=[r"norm", r"^lm_head\."])
    expected = [name for name in reference_delta(pre, post) if "norm" not in name and name != "lm_head.weight"]
    assert list(no_norms) == expected
    both = delta_names(post, pretrained=pre, include=r"layers\.1\.", exclude=r"proj")
    assert both == ["model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"]


def test_tied_embedding_is_handled_once(tiny_pair):
    pair = tiny_pair("llama-tied", shard="both")
    assert tied_names(pair.post) == {"model.embed_tokens.weight": ["lm_head.weight"]}
    assert "lm_head.weight" not in read_index(pair.post_dir)["weight_map"]  # the file leaves the tied copy out
    expected = reference_delta(pair.pre, pair.post)
    assert "lm_head.weight" not in expected
    for pre, post in [(pair.pre, pair.post), (pair.pre_dir, pair.post), (pair.pre, pair.post_dir)]:
        names = delta_names(post, pretrained=pre)
        assert names.count("model.embed_tokens.weight") == 1 and "lm_head.weight" not in names
    # either name of the tied tensor selects it, under its first name
    assert list(compute_delta(pair.post, pretrained=pair.pre, include=r"^lm_head\.")) == ["model.embed_tokens.weight"]
    assert "model.embed_tokens.weight" not in delta_names(pair.post, pretrained=pair.pre, exclude=r"^lm_head\.")


def test_untied_post_of_tied_pre_gives_both_deltas():
    pre = make_tiny_model("llama-tied", seed=0)
    post = make_tiny_model("llama", seed=0)  # same initial weights, lm_head untied and re-initialised
    delta = compute_delta(post, pretrained=pre, include=r"embed_tokens|lm_head")
    embed = pre.model.embed_tokens.weight.double()
    torch.testing.assert_close(
        delta["lm_head.weight"].double(), post.lm_head.weight.double() - embed, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        delta["model.embed_tokens.weight"].double(), post.model.embed_tokens.weight.double() - embed, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    ("pre_dtype", "post_dtype", "delta_dtype"),
    [
        (torch.float32, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16, torch.float32),
        (torch.float32, torch.float64, torch.float64),
    ],
)
def test_mixed_dtypes_are_computed_in_at_least_float32(tmp_path, pre_dtype, post_dtype, delta_dtype):
    pre = make_tiny_model("llama", seed=0, dtype=pre_dtype)
    post = make_post_trained(make_tiny_model("llama", seed=0), seed=1).to(post_dtype)
    save_model(post, tmp_path / "post", tokenizer=False)
    for post_source in (post, tmp_path / "post"):
        delta = compute_delta(post_source, pretrained=pre)
        assert {value.dtype for value in delta.values()} == {delta_dtype}
        # the stored values, subtracted in float64: exact up to the float32 rounding of the difference
        assert_matches_reference(delta, reference_delta(pre, post), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Memory: one tensor at a time


def test_iter_delta_reads_lazily_and_holds_one_delta(tiny_pair, monkeypatch):
    pair = tiny_pair("llama", shard="both")
    reads = []
    dropped = []  # weak references to the deltas the consumer has dropped
    original_get = sources.SafetensorsSource._get

    def counting_get(self, name):
        # when the next tensor is read, every delta the consumer dropped has been freed (tensors hold no reference
        # cycles, so reference counting frees them at once): the iterator keeps none
        assert all(reference() is None for reference in dropped), "iter_delta kept a delta alive"
        reads.append(name)
        return original_get(self, name)

    monkeypatch.setattr(sources.SafetensorsSource, "_get", counting_get)

    def refuse_whole_file_loading(*args, **kwargs):
        raise AssertionError("a whole checkpoint was loaded at once")

    monkeypatch.setattr("safetensors.torch.load_file", refuse_whole_file_loading)
    monkeypatch.setattr("safetensors.torch.load", refuse_whole_file_loading)

    iterator = iter_delta(pair.post_dir, pretrained=pair.pre_dir)
    assert reads == []  # the checks at call time read only names, shapes and dtypes
    count = 0
    for name, delta in iterator:
        count += 1
        assert reads[-2:] == [name, name] and len(reads) == 2 * count  # one pair read per step
        dropped.append(weakref.ref(delta))
        del delta
    assert count == len(reference_delta(pair.pre, pair.post))


def test_safetensors_files_are_memory_mapped_not_read_whole(tiny_pair):
    pair = tiny_pair("llama", shard="post")
    with load_tensors(pair.post_dir) as source:
        assert isinstance(source, sources.SafetensorsSource)
        weight_map = read_index(pair.post_dir)["weight_map"]
        assert len(source) == len(weight_map)
        assert source._handles == {}  # the names come from the index: no shard opened yet
        assert source.shape("model.embed_tokens.weight") == (128, 32)  # from the shard's header
        source.get("model.norm.weight")
        # only the shards holding those two tensors are opened, each with safe_open (memory-mapped)
        expected = {weight_map["model.embed_tokens.weight"], weight_map["model.norm.weight"]}
        assert {path.name for path in source._handles} == expected
        assert all(type(handle).__name__ == "safe_open" for handle in source._handles.values())


def test_iter_delta_closes_files_when_done(tiny_pair):
    pair = tiny_pair("llama", shard="both")
    opened = []
    original_handle = sources.SafetensorsSource._handle

    def recording_handle(self, path):
        opened.append(self)
        return original_handle(self, path)

    sources.SafetensorsSource._handle = recording_handle
    try:
        for _ in iter_delta(pair.post_dir, pretrained=pair.pre_dir):
            pass
    finally:
        sources.SafetensorsSource._handle = original_handle
    assert opened and all(source._handles == {} for source in opened)


def test_attach_iterates_deltas_of_a_module_against_a_directory(tiny_pair):
    class Half:
        def edit_tensor(self, name, delta, gradient=None):
            return 0.5 * delta

    pair = tiny_pair("llama-tied", shard="pre")
    differences = edit_differences(pair.post, pretrained=pair.pre_dir, edit=Half(), exclude=r"norm")
    expected = {
        name: -0.5 * value for name, value in reference_delta(pair.pre, pair.post).items() if "norm" not in name
    }
    assert_matches_reference(differences, expected)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_tensors_are_named():
    pre = make_tiny_model("llama", seed=0)
    post = make_post_trained(pre, seed=1)
    pre_state = dict(pre.state_dict())
    del pre_state["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match=r"missing from pre.*model\.layers\.1\.mlp\.down_proj\.weight.*exclude="):
        compute_delta(post, pretrained=pre_state)
    post_state = dict(post.state_dict())
    post_state.pop("lm_head.weight")
    with pytest.raises(ValueError, match=r"1 tensor of pre .* missing from post.*: lm_head\.weight"):
        compute_delta(post_state, pretrained=pre)
    # leaving the tensor out, as the message says, works
    assert "lm_head.weight" not in compute_delta(post_state, pretrained=pre, exclude=r"^lm_head\.weight$")


def test_resized_vocabulary_is_a_shape_mismatch(tiny_pair, tmp_path):
    pre = make_tiny_model("llama", seed=0)
    post = make_tiny_model("llama", seed=1, vocab_size=130)
    save_model(post, tmp_path / "resized", tokenizer=False)
    for post_source in (post, tmp_path / "resized"):
        embedding = re.escape("model.embed_tokens.weight (pre (128, 32), post (130, 32))")
        with pytest.raises(ValueError, match=embedding) as error:
            compute_delta(post_source, pretrained=pre)
        assert "lm_head.weight (pre (128, 32), post (130, 32))" in str(error.value)
        assert "resized vocabulary" in str(error.value)
    assert "lm_head.weight" not in compute_delta(post, pretrained=pre, exclude=r"embed_tokens|lm_head")


@pytest.mark.parametrize("side", ["pre", "post"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("as_directory", [False, True])
def test_nan_and_inf_are_named(tmp_path, side, bad_value, as_directory):
    pre = make_tiny_model("qwen2", seed=0)
    post = make_post_trained(pre, seed=1)
    damaged = pre if side == "pre" else post
    with torch.no_grad():
        damaged.model.layers[0].self_attn.q_proj.weight[3, 5] = bad_value
    source = save_model(damaged, tmp_path / side, tokenizer=False) if as_directory else damaged
    pre_source, post_source = (source, post) if side == "pre" else (pre, source)
    kind = "NaN" if bad_value != bad_value else "inf"
    pattern = rf"{side}-trained tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'.*holds .*1 {kind}"
    with pytest.raises(ValueError, match=pattern):
        compute_delta(post_source, pretrained=pre_source)
    assert "model.layers.0.self_attn.q_proj.weight" not in compute_delta(
        post_source, pretrained=pre_source, exclude="q_proj"
    )


@pytest.mark.parametrize(
    ("include", "exclude"),
    [("no_such_tensor", None), (None, "."), (r"\.mlp\.", "mlp"), ([r"^vision_model\."], None)],
)
def test_nothing_selected(include, exclude):
    pre = make_tiny_model("llama", seed=0)
    post = make_post_trained(pre, seed=1)
    with pytest.raises(ValueError, match=r"select no floating-point tensor.*Available names \(21\): model\.embed"):
        compute_delta(post, pretrained=pre, include=include, exclude=exclude)


def test_nothing_in_common():
    with pytest.raises(ValueError, match=r"do not hold the same tensors.*: a\b.*: b\b"):
        compute_delta({"a": torch.zeros(1)}, pretrained={"b": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"select no floating-point tensor"):
        compute_delta({"step": torch.tensor(2)}, pretrained={"step": torch.tensor(1)})


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (42, r"pre-trained weights.*got int"),
        ("./no/such/dir", r"pre-trained weights.*'\./no/such/dir' does not exist"),
        ({"w": [1.0, 2.0]}, r"pre-trained weights.*map names to tensors.*'w'"),
    ],
)
def test_unusable_sources(source, message):
    with pytest.raises(ValueError, match=message):
        compute_delta({"w": torch.zeros(2)}, pretrained=source)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"post-trained weights: No weights found in .*config\.json"):
        compute_delta(tmp_path, pretrained={"w": torch.zeros(2)})


def test_incomplete_sharded_checkpoint(tiny_pair):
    pair = tiny_pair("llama", shard="post")
    shard = sorted(pair.post_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=rf"{shard.name}.*do not exist"):
        compute_delta(pair.post_dir, pretrained=pair.pre_dir)


def test_invalid_patterns():
    state = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"include pattern '\(' is not a valid regular expression"):
        compute_delta(state, pretrained=state, include="(")
    with pytest.raises(ValueError, match=r"exclude must be a regular expression.*got int"):
        compute_delta(state, pretrained=state, exclude=3)


def test_device_argument():
    pre = {"w": torch.zeros(3)}
    post = {"w": torch.ones(3, dtype=torch.bfloat16)}
    [(name, delta)] = list(iter_delta(post, pretrained=pre, device="cpu"))
    assert name == "w" and delta.device.type == "cpu" and delta.dtype == torch.float32
    with pytest.raises(ValueError, match=r"device must be a torch\.device.*'gpu0'"):
        iter_delta(post, pretrained=pre, device="gpu0")


def _public_pair_functions():
    """Every public function that takes W_post and W_pre, with its arguments in the order W_post, W_pre, rest."""
    from lightning_delta import DeltaEditModule, apply_edit_, edits, plan_edit, save_edited
    from lightning_delta.attach import attach_edit
    from lightning_delta.editing import iter_edited
    from lightning_delta.targets import ModuleTarget

    dare = edits.DARE(p=0.5)
    return {
        "compute_delta": (compute_delta, ()),
        "iter_delta": (iter_delta, ()),
        "delta_names": (delta_names, ()),
        "iter_edited": (iter_edited, (dare,)),
        "edit_differences": (edit_differences, (dare,)),
        "attach_edit": (attach_edit, (dare,)),
        "apply_edit_": (apply_edit_, (dare,)),
        "save_edited": (save_edited, (dare, "out")),
        "DeltaEditModule": (DeltaEditModule, (dare,)),
        "ModuleTarget": (ModuleTarget, (dare,)),
        "plan_edit": (plan_edit, (None, "dare", 0.5)),
    }


@pytest.mark.parametrize(
    "name",
    [
        "compute_delta",
        "iter_delta",
        "delta_names",
        "iter_edited",
        "edit_differences",
        "attach_edit",
        "apply_edit_",
        "save_edited",
        "DeltaEditModule",
        "ModuleTarget",
        "plan_edit",
    ],
)
def test_w_pre_is_keyword_only_so_a_swapped_pair_is_an_error(name):
    """``f(pre, post)`` in the order before W_post came first gave −ΔW silently; W_pre is keyword-only now."""
    function, rest = _public_pair_functions()[name]
    post = torch.nn.Linear(3, 2)
    pre = {key: value.detach() - 0.1 for key, value in post.state_dict().items()}
    with pytest.raises(TypeError, match=r"positional argument"):
        result = function(pre, post, *rest)
        list(result) if name in ("iter_delta", "iter_edited") else None
    assert torch.equal(compute_delta(post, pretrained=pre)["weight"], post.weight.detach() - pre["weight"])


def test_a_bf16_pre_directory_with_a_float32_post_is_warned_with_its_rounding(tmp_path):
    """W_pre saved in bf16 beside a float32 W_post: ΔW holds W_pre's rounding. The warning names both dtypes and
    gives ‖bf16(W_post) − W_post‖ / ‖ΔW‖ over the tensors, here against an explicit float64 sum."""
    pre = make_tiny_model("llama", dtype=torch.bfloat16)
    post = make_post_trained(make_tiny_model("llama"), scale=0.01)
    pre.save_pretrained(tmp_path / "pre")
    with pytest.warns(UserWarning, match=r"W_pre is stored in torch\.bfloat16 and W_post in torch\.float32") as record:
        delta = compute_delta(post, pretrained=tmp_path / "pre")
    rounding = deltas = 0.0
    for name, tensor in post.state_dict().items():
        if name in delta:
            exact = tensor.double()
            rounding += float(((tensor.to(torch.bfloat16).double() - exact) ** 2).sum())
            deltas += float(((exact - pre.state_dict()[name].double()) ** 2).sum())
    (message,) = [str(warning.message) for warning in record if "rounding" in str(warning.message)]
    shown = float(re.search(r"moves it by ([0-9.e+-]+) % of ‖ΔW‖", message).group(1))
    assert shown == pytest.approx(100 * (rounding / deltas) ** 0.5, rel=1e-3)
    assert f"for {len(delta)} of the {len(delta)} selected tensors" in message


def test_the_same_dtype_on_both_sides_gives_no_warning(llama_pair, recwarn):
    compute_delta(llama_pair.post_dir, pretrained=llama_pair.pre_dir)
    assert not [warning for warning in recwarn if "rounding" in str(warning.message)]


def test_integer_buffers_on_both_sides_stay_skipped():
    post = {"w": torch.ones(2), "step": torch.tensor(4)}
    pre = {"w": torch.zeros(2), "step": torch.tensor(3)}
    assert list(compute_delta(post, pretrained=pre)) == ["w"]
    with pytest.raises(ValueError, match=r"integer on the other for 1 tensor: w \(pre torch\.int32, post"):
        compute_delta(post, pretrained={**pre, "w": torch.zeros(2, dtype=torch.int32)})
