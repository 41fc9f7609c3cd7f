"""Tests of :mod:`lightning_delta.compress`: an edited delta stored compactly, loaded back onto the base bit for bit
equal to what ``save_edited`` writes, its bytes on disk equal to ``Family.stored_bytes``, its PEFT adapter loaded by
``peft`` itself, swapped in place on one base, and its bad inputs refused."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from lightning_delta.cli import run
from lightning_delta.compress import (
    CompressedDelta,
    apply_compressed_,
    forms,
    load_compressed,
    remove_compressed_,
    save_compressed,
)
from lightning_delta.compress.forms import pack_bits, unpack_bits
from lightning_delta.demo.digits import DigitsDataModule
from lightning_delta.edits import (
    DARE,
    DELLA,
    BitDelta,
    Extrapolate,
    LowRank,
    MagnitudePrune,
    PerTensor,
    SignBiased,
    tensor_generator,
)
from lightning_delta.export import save_edited
from lightning_delta.planning.family import FAMILIES
from lightning_delta.planning.plan import plan_edit
from tests.support.readme_support import README, block
from tests.support.tiny_models import make_tiny_model, make_tiny_pair, reference_state_dict, save_model

EDITS = {
    "bitdelta": BitDelta(),
    "bitdelta-3-bits": BitDelta(bits=3),
    "bitdelta-sign-of-zero": BitDelta(sign_of_zero=1),
    "bitdelta-3-blocks-scaled": BitDelta(blocks=3, scale=0.5),
    "bitdelta-normal": BitDelta(magnitudes="normal", seed=2),
    "dare": DARE(p=0.9, seed=1),
    "dare-k": DARE(p=0.5, k=0.5, seed=1),
    "drop-only": DARE(p=0.7, rescale=False),
    "della": DELLA(p=0.8, epsilon=0.2, seed=3),
    "ties-trim": MagnitudePrune(p=0.9),
    "lowrank": LowRank(rank=2),
    "lowrank-randomized": LowRank(rank=3, method="randomized", seed=4),
    "expo": Extrapolate(alpha=0.5),
    "sign-biased": SignBiased(p=0.5, k=0.5),
    "per-tensor": PerTensor(
        {"mlp": BitDelta(bits=2), "self_attn": DARE(p=0.8, seed=5), "embed|lm_head": LowRank(rank=4)}, unmatched="keep"
    ),
}
FORMS = {
    "bitdelta": {"signs"},
    "bitdelta-3-bits": {"signs"},
    "bitdelta-sign-of-zero": {"signs"},
    "bitdelta-3-blocks-scaled": {"signs"},
    "bitdelta-normal": {"dense"},
    "dare": {"sparse"},
    "dare-k": {"dense"},
    "drop-only": {"sparse"},
    "della": {"sparse"},
    "ties-trim": {"sparse"},
    "lowrank": {"factors", "dense"},
    "lowrank-randomized": {"factors", "dense"},
    "expo": {"dense"},
    "sign-biased": {"dense"},
    "per-tensor": {"signs", "sparse", "factors", "dense"},
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A float32 and a bf16 tiny Llama pair (the bf16 one has exact zeros in ΔW, as real bf16 fine-tunes do)."""
    root = tmp_path_factory.mktemp("pairs")
    return {
        "float32": make_tiny_pair(root / "float32", scale=0.01),
        "bfloat16": make_tiny_pair(root / "bfloat16", scale=0.01, dtype=torch.bfloat16, shard=None),
    }


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equality is bit for bit (``-0.0`` is not ``0.0``)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(want) <= set(got)
    differ = [
        name
        for name, tensor in want.items()
        if got[name].dtype != tensor.dtype or not torch.equal(bits(got[name]), bits(tensor))
    ]
    assert not differ, differ


def saved_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model directory, read with safetensors (no transformers)."""
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def bytes_on_disk(directory: Path) -> dict[str, int]:
    """Tensor name -> the bytes of its data in the compressed delta's safetensors files, from each file's own header
    (8-byte little-endian length, then JSON with ``data_offsets``), parts summed per tensor."""
    sizes: dict[str, int] = {}
    for file in sorted(directory.glob("delta-*.safetensors")):
        raw = file.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        header.pop("__metadata__", None)
        for key, entry in header.items():
            start, stop = entry["data_offsets"]
            name = key.rpartition("/")[0]
            sizes[name] = sizes.get(name, 0) + stop - start
        assert max(entry["data_offsets"][1] for entry in header.values()) == len(raw) - 8 - length  # nothing else
    return sizes


def deltas(pair) -> dict[str, torch.Tensor]:
    """ΔW = W_post − W_pre in float32 of every tensor, from the modules' state dicts."""
    pre = reference_state_dict(pair.pre)
    return {name: tensor.float() - pre[name].float() for name, tensor in reference_state_dict(pair.post).items()}


# ------------------------------------------------------------------------------------------------ round trip
ROUND_TRIPS = [(label, "bfloat16") for label in EDITS] + [
    (label, "float32") for label in ("bitdelta-3-bits", "dare", "ties-trim", "lowrank", "per-tensor")
]


@pytest.mark.slow
@pytest.mark.parametrize(("label", "dtype"), ROUND_TRIPS)
def test_the_loaded_model_is_what_save_edited_writes_bit_for_bit(pairs, tmp_path, label, dtype):
    pair, edit = pairs[dtype], EDITS[label]
    written = save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=edit, output_dir=tmp_path / "edited")
    compressed = save_compressed(
        pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=edit, output_dir=tmp_path / "compressed"
    )
    header = json.loads((compressed / "compressed.json").read_text())
    assert header["format"] == "lightning_delta.compressed" and header["version"] == 1
    assert {record["form"] for record in header["tensors"].values()} == FORMS[label]
    loaded = load_compressed(pair.pre_dir, compressed)
    assert_same_bits(loaded.state_dict(), saved_state(written))
    dense = sum(delta.numel() * 4 for delta in deltas(pair).values())
    assert header["tensor_bytes"] == sum(bytes_on_disk(compressed).values())
    if FORMS[label] <= {"signs", "sparse", "factors"}:
        assert header["tensor_bytes"] < dense / 3


def test_the_bf16_pair_has_exact_zeros_that_bitdelta_keeps_or_signs_by_its_own_convention(pairs):
    delta = deltas(pairs["bfloat16"])["model.layers.0.mlp.up_proj.weight"]
    assert 0 < int((delta == 0).sum()) < delta.numel() // 10
    kept = BitDelta().edit_tensor("w", delta)
    signed = BitDelta(sign_of_zero=1).edit_tensor("w", delta)
    mean = delta.abs().double().mean()
    assert torch.equal(kept == 0, delta == 0)
    assert torch.equal(signed, torch.where(delta >= 0, 1.0, -1.0) * mean.float())  # BitDelta's mask: ΔW >= 0


def test_a_plan_file_and_the_plan_give_the_same_compressed_model(pairs, tmp_path):
    pair = pairs["bfloat16"]
    plan = PerTensor({"q_proj": BitDelta(bits=2), "up_proj": DARE(p=0.9)}, unmatched="keep")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"family": "mixed", "edit": plan.config()}))
    from_file = load_compressed(
        pair.pre_dir,
        save_compressed(pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=plan_file, output_dir=tmp_path / "a"),
    )
    written = save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=plan, output_dir=tmp_path / "edited")
    assert_same_bits(from_file.state_dict(), saved_state(written))


def test_tensors_left_out_of_the_edit_keep_their_post_trained_values(pairs, tmp_path):
    pair = pairs["bfloat16"]
    written = save_edited(
        pair.post_dir, pretrained=pair.pre_dir, edit=DARE(p=0.9), output_dir=tmp_path / "edited", include="mlp"
    )
    compressed = save_compressed(
        pair.post_dir,
        pretrained=pair.pre_dir,
        edit_or_plan=DARE(p=0.9),
        output_dir=tmp_path / "compressed",
        include="mlp",
    )
    header = json.loads((compressed / "compressed.json").read_text())
    forms = {name: record["form"] for name, record in header["tensors"].items()}
    assert {form for name, form in forms.items() if "mlp" in name} == {"sparse"}
    assert {form for name, form in forms.items() if "mlp" not in name} == {"post"}
    assert_same_bits(load_compressed(pair.pre_dir, compressed).state_dict(), saved_state(written))


def test_bit_packing_against_an_explicit_loop():
    generator = torch.Generator().manual_seed(0)
    for count in (1, 7, 8, 9, 64, 1001):
        mask = torch.rand(count, generator=generator) < 0.3
        packed = pack_bits(mask)
        expected = [
            sum(int(mask[8 * byte + bit]) << bit for bit in range(8) if 8 * byte + bit < count)
            for byte in range(-(-count // 8))
        ]
        assert packed.dtype == torch.uint8 and packed.tolist() == expected
        assert torch.equal(unpack_bits(packed, count), mask)


# ---------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    ("family", "value"),
    [
        ("bitdelta", 1),
        ("bitdelta", 3),
        ("dare", 0.1),
        ("dare", 0.25),
        ("magnitude_prune", 0.05),
        ("lowrank", 2),
        ("lowrank", 64),
    ],
)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_bytes_on_disk_are_family_stored_bytes_of_the_edited_tensors(pairs, tmp_path, family, value, dtype):
    pair, spec = pairs[dtype], FAMILIES[family]
    edit = spec.edit(value, seed=7)
    compressed = save_compressed(
        pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=edit, output_dir=tmp_path / "compressed"
    )
    on_disk = bytes_on_disk(compressed)
    for name, delta in deltas(pair).items():
        edited = edit.edit_tensor(name, delta)
        assert on_disk[name] == spec.stored_bytes(value, delta.shape, 4, edited), name


def test_goals_bitdelta_one_sixteenth_and_dare_a_tenth_plus_the_bitmap(pairs, tmp_path):
    """1-bit BitDelta of a bf16 model's linear layers: about 1/16 of the dense bf16 delta (1/32 of the float32 delta
    that gives the model back exactly); DARE at p = 0.9: at most 0.1 × the dense (float32) bytes plus the bitmap."""
    pair = pairs["bfloat16"]
    linear = [name for name, module in pair.post.named_modules() if isinstance(module, torch.nn.Linear)]
    include = [rf"^{re.escape(name)}\.weight$" for name in linear]
    sizes = {name: tensor.numel() for name, tensor in deltas(pair).items() if name.removesuffix(".weight") in linear}
    signs = bytes_on_disk(
        save_compressed(
            pair.post_dir,
            pretrained=pair.pre_dir,
            edit_or_plan=BitDelta(sign_of_zero=1),
            output_dir=tmp_path / "b",
            include=include,
        )
    )
    bf16_dense = sum(2 * n for n in sizes.values())
    assert sum(signs[name] for name in sizes) == sum(-(-n // 8) + 4 for n in sizes.values())
    assert 1 / 16 <= sum(signs[name] for name in sizes) / bf16_dense < 1 / 15
    sparse = bytes_on_disk(
        save_compressed(
            pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=DARE(p=0.9), output_dir=tmp_path / "d", include=include
        )
    )
    total = sum(sizes.values())
    kept_bound = 0.1 * total + 3 * (0.09 * total) ** 0.5  # the kept count is binomial(n, 0.1): 3 sigma above its mean
    assert sum(sparse[name] for name in sizes) <= 4 * kept_bound + sum(-(-n // 8) for n in sizes.values())


def test_a_dare_plan_stores_exactly_its_stored_bytes_within_the_budget(tmp_path):
    """Issue 23, item 19: the planner counts DARE's mask as drawn, so the file never exceeds the byte budget."""
    pair = make_tiny_pair(tmp_path, scale=0.01, dtype=torch.bfloat16, shard=None)
    planned = [name for name in deltas(pair) if "proj" in name]
    dense = sum(deltas(pair)[name].numel() for name in planned) * 4
    budget = 0.12 * dense
    plan = plan_edit(
        pair.post_dir,
        pretrained=pair.pre_dir,
        datamodule=DigitsDataModule(limit=12, batch_size=6),
        family_name="dare",
        include="proj",
        candidates=[0.05, 0.1, 0.2],
        refine=0,
        measure=False,
        seed=3,
        budget_bytes=budget,
    )
    assert set(plan.settings) == set(planned)
    on_disk = bytes_on_disk(
        save_compressed(pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=plan, output_dir=tmp_path / "compressed")
    )
    assert plan.stored_bytes == plan.cost == sum(on_disk[name] for name in planned) <= budget
    reference = 0
    for name in planned:  # the kept count from the mask drawn again, and the values' positions in int32 or a bitmap
        delta = deltas(pair)[name].reshape(-1)
        draws = torch.rand(delta.numel(), generator=tensor_generator(3, name), dtype=torch.float32)
        kept = int(((draws >= 1 - plan.settings[name]) & (delta != 0)).sum())
        reference += 4 * kept + min(-(-delta.numel() // 8), 4 * kept)
    assert reference == plan.stored_bytes


# ----------------------------------------------------------------------------------------------------- peft
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_peft_adapter_loaded_by_peft_and_merged_is_the_compressed_model(pairs, tmp_path, dtype):
    peft = pytest.importorskip("peft", reason="peft is an optional dependency (the `bench` extra)")
    pair = pairs["float32" if dtype == torch.float32 else "bfloat16"]
    edit = PerTensor({"up_proj|embed": LowRank(rank=2), "q_proj|lm_head": LowRank(rank=3)}, unmatched="keep")
    compressed = save_compressed(
        pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=edit, output_dir=tmp_path / "compressed"
    )
    header = json.loads((compressed / "compressed.json").read_text())
    low_rank = [name for name, record in header["tensors"].items() if record["form"] == "factors"]
    assert header["adapter"]["modules"] == sorted(name.removesuffix(".weight") for name in low_rank)
    assert "model.embed_tokens" in header["adapter"]["modules"] and "lm_head" in header["adapter"]["modules"]
    ours = load_compressed(pair.pre_dir, compressed).state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(pair.pre_dir)
    merged = peft.PeftModel.from_pretrained(base, compressed / "adapter").merge_and_unload().state_dict()
    pre = reference_state_dict(pair.pre)
    for name in low_rank:
        assert merged[name].dtype == dtype
        # F(ΔW) in float64, from the factors peft read: its rounding to the model's dtype is all that may differ
        step = torch.finfo(dtype).eps * (ours[name].double().abs() + (ours[name].double() - pre[name].double()).abs())
        assert bool(((merged[name].double() - ours[name].double()).abs() <= step).all()), name
        assert not torch.equal(merged[name], pre[name])
    assert all(torch.equal(merged[name], pre[name]) for name in merged if name not in low_rank)


# --------------------------------------------------------------------------------------- many deltas, one base
def test_apply_and_remove_swap_fine_tunes_on_one_base_in_place(pairs, tmp_path):
    pair = pairs["bfloat16"]
    edits = {"bits": BitDelta(bits=2), "sparse": DARE(p=0.9, seed=2), "low": LowRank(rank=2)}
    paths = {
        label: save_compressed(pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=edit, output_dir=tmp_path / label)
        for label, edit in edits.items()
    }
    written = {
        label: saved_state(
            save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=edit, output_dir=tmp_path / f"edited-{label}")
        )
        for label, edit in edits.items()
    }
    base_state = saved_state(pair.pre_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(pair.pre_dir)
    pointers = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    held = {label: CompressedDelta(path, in_memory=True) for label, path in paths.items()}
    assert all(delta.nbytes == sum(bytes_on_disk(paths[label]).values()) for label, delta in held.items())
    for label in ["bits", "sparse", "low", "bits"]:
        apply_compressed_(model, held[label])
        assert_same_bits(model.state_dict(), written[label])
        remove_compressed_(model, held[label], pair.pre_dir)
        assert_same_bits(model.state_dict(), base_state)
    assert {name: tensor.data_ptr() for name, tensor in model.state_dict().items()} == pointers  # in place
    apply_compressed_(model, paths["sparse"])  # streamed from disk, one tensor at a time
    assert_same_bits(model.state_dict(), written["sparse"])


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize(
    "label",
    [
        "bitdelta",
        "bitdelta-3-blocks-scaled",
        "dare",
        "drop-only",
        "ties-trim",
        "della",
        "lowrank",
        "expo",
        "per-tensor",
    ],
)
def test_pieces_are_the_decoded_tensor_bit_for_bit_at_any_size(pairs, tmp_path, label, in_memory):
    """Decoding piece by piece (reading only each piece's parts: bits from the middle of a byte, values after a
    running count, indices by search) gives the whole decoded tensor bit for bit, for piece sizes that split rows,
    bytes and the positions every way."""
    pair = pairs["bfloat16"]
    path = save_compressed(
        pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=EDITS[label], output_dir=tmp_path / "delta"
    )
    with CompressedDelta(path, in_memory=in_memory) as delta:
        for name in delta.names:
            whole = delta.tensor(name).reshape(-1)
            for entries in (1, 7, 13, 64, 1000, whole.numel()):
                pieces = list(delta.pieces(name, entries))
                assert [start for start, _ in pieces] == list(
                    itertools.accumulate([0] + [piece.numel() for _, piece in pieces[:-1]])
                )
                joined = torch.cat([piece for _, piece in pieces])
                assert joined.dtype == whole.dtype and torch.equal(bits(joined), bits(whole)), (name, entries)


def test_a_swap_in_small_pieces_is_what_save_edited_writes_bit_for_bit(pairs, tmp_path, monkeypatch):
    """apply_compressed_ edits each tensor piece by piece; with pieces of 7 entries (every form split mid-row and
    mid-byte) the model is still save_edited's, and remove_compressed_ gives the base back."""
    monkeypatch.setattr(forms, "PIECE_ENTRIES", 7)
    pair = pairs["bfloat16"]
    model = transformers.AutoModelForCausalLM.from_pretrained(pair.pre_dir)
    base_state = saved_state(pair.pre_dir)
    for label in ("bitdelta-3-bits", "dare", "ties-trim", "lowrank", "per-tensor"):
        path = save_compressed(
            pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=EDITS[label], output_dir=tmp_path / label
        )
        written = saved_state(
            save_edited(
                pair.post_dir, pretrained=pair.pre_dir, edit=EDITS[label], output_dir=tmp_path / f"edited-{label}"
            )
        )
        apply_compressed_(model, path)
        assert_same_bits(model.state_dict(), written)
        remove_compressed_(model, path, pair.pre_dir)
        assert_same_bits(model.state_dict(), base_state)


# ------------------------------------------------------------------------------------------------ bad input
def test_another_format_version_is_refused(pairs, tmp_path):
    pair = pairs["float32"]
    compressed = save_compressed(
        pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=BitDelta(), output_dir=tmp_path / "compressed"
    )
    header_file = compressed / "compressed.json"
    header = json.loads(header_file.read_text())
    header_file.write_text(json.dumps({**header, "version": 2}))
    with pytest.raises(ValueError, match=r"format version 2; this version of lightning_delta reads version 1"):
        load_compressed(pair.pre_dir, compressed)
    header_file.write_text(json.dumps({**header, "format": "something else"}))
    with pytest.raises(ValueError, match=r"is not a lightning_delta.compressed header \(its format is 'something"):
        load_compressed(pair.pre_dir, compressed)
    with pytest.raises(ValueError, match=r"is not a compressed delta: it has no compressed.json"):
        load_compressed(pair.pre_dir, pair.post_dir)


def test_a_base_of_other_shapes_or_names_is_refused_before_anything_changes(pairs, tmp_path):
    pair = pairs["float32"]
    compressed = save_compressed(
        pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=DARE(p=0.9), output_dir=tmp_path / "compressed"
    )
    wider = make_tiny_model("llama", intermediate_size=48)
    before = {name: tensor.clone() for name, tensor in wider.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"was not made for this model: 6 tensors of the delta have other shapes in "
        r"the model: .*model.layers.0.mlp.gate_proj.weight \(delta \(64, 32\), model "
        r"\(48, 32\)\)",
    ):
        apply_compressed_(wider, compressed)
    assert all(torch.equal(wider.state_dict()[name], tensor) for name, tensor in before.items())
    other = save_model(make_tiny_model("clip-vision"), tmp_path / "vision", tokenizer=False)
    with pytest.raises(
        ValueError,
        match=r"was not made for this model: 21 tensors of the delta are not in the model: "
        r"lm_head.weight, .* and 11 more. Load it onto the base model it was computed",
    ):
        load_compressed(other, compressed)


def test_a_truncated_file_is_refused(pairs, tmp_path):
    pair = pairs["float32"]
    compressed = save_compressed(
        pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=BitDelta(bits=2), output_dir=tmp_path / "compressed"
    )
    shard = compressed / "delta-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"delta-00001.safetensors .*: the file is missing, truncated or damaged"):
        load_compressed(pair.pre_dir, compressed)
    shard.unlink()
    with pytest.raises(ValueError, match=r"the file is missing, truncated or damaged"):
        CompressedDelta(compressed)


def test_a_crash_while_saving_leaves_no_directory(pairs, tmp_path, monkeypatch):
    import lightning_delta.compress.save as save_module

    pair = pairs["float32"]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_module.forms, "encode_sparse", crash)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(
            pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=DARE(p=0.9), output_dir=tmp_path / "compressed"
        )
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_output_dir_is_refused_without_overwrite(pairs, tmp_path):
    pair = pairs["float32"]
    out = tmp_path / "compressed"
    save_compressed(pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=BitDelta(), output_dir=out)
    with pytest.raises(ValueError, match=r"is not empty; refusing to write a model over its files"):
        save_compressed(pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=DARE(p=0.5), output_dir=out)
    save_compressed(pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=DARE(p=0.5), output_dir=out, overwrite=True)
    assert {record["form"] for record in json.loads((out / "compressed.json").read_text())["tensors"].values()} == {
        "sparse"
    }
    with pytest.raises(ValueError, match=r"which the models are read from"):
        save_compressed(pair.post_dir, pretrained=pair.pre_dir, edit_or_plan=DARE(p=0.5), output_dir=pair.post_dir)


# ------------------------------------------------------------------------------------------ command line, README
def test_the_compress_command_takes_an_edit_or_a_plan(pairs, tmp_path, capsys):
    pair = pairs["bfloat16"]
    path = run(
        [
            "compress",
            "--model",
            str(pair.post_dir),
            "--pretrained",
            str(pair.pre_dir),
            "--edit",
            "BitDelta",
            "--edit.bits",
            "2",
            "--output_dir",
            str(tmp_path / "bits"),
        ]
    )
    assert "Compressed delta of BitDelta(bits=2" in capsys.readouterr().out
    written = save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=BitDelta(bits=2), output_dir=tmp_path / "edited")
    assert_same_bits(load_compressed(pair.pre_dir, path).state_dict(), saved_state(written))
    with pytest.raises(
        ValueError,
        match=r"compress: give the edit \(--edit CLASS ...\) or the plan \(--plan plan.json\), "
        r"exactly one; got edit=None and plan=None",
    ):
        run(
            [
                "compress",
                "--model",
                str(pair.post_dir),
                "--pretrained",
                str(pair.pre_dir),
                "--output_dir",
                str(tmp_path / "none"),
            ]
        )
    with pytest.raises(ValueError, match=r"holds no plan: a plan.json has an 'edit' entry with name 'per_tensor'"):
        run(
            [
                "compress",
                "--model",
                str(pair.post_dir),
                "--pretrained",
                str(pair.pre_dir),
                "--plan",
                str(path / "compressed.json"),
                "--output_dir",
                str(tmp_path / "bad"),
            ]
        )


def readme_compress_commands() -> list[list[str]]:
    """The bash lines of the README's section on compressed deltas, comments dropped."""
    text = README.read_text()
    section = text[text.index("## Storing an edited delta at the size it costs") :]
    commands = section[section.index("```bash\n") + len("```bash\n") :]
    return [shlex.split(line, comments=True) for line in commands[: commands.index("```")].splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_walk_through_plan_compress_load_runs_as_written(tmp_path, monkeypatch):
    pair = make_tiny_pair(tmp_path / "made", scale=0.01)
    shutil.copytree(pair.pre_dir, tmp_path / "pre")
    shutil.copytree(pair.post_dir, tmp_path / "post")
    config = {
        "model": "post",
        "pretrained": "pre",
        "family": "bitdelta",
        "average": 2,
        "refine": 1,
        "num_points": 2,
        "data": {"class_path": "lightning_delta.demo.digits.DigitsDataModule", "init_args": {"limit": 12}},
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    commands = readme_compress_commands()
    assert [command[:2] for command in commands] == [["lightning-delta", "plan"]] + [
        ["lightning-delta", "compress"]
    ] * 2
    plan = run(commands[0][1:])
    for command in commands[1:]:
        run(command[1:])
    namespace: dict = {}
    exec(compile(block("compressed"), "README.md", "exec"), namespace)  # noqa: S102 - the README's own code

    header = json.loads((tmp_path / "delta" / "compressed.json").read_text())
    assert json.loads((tmp_path / "planned" / "compressed.json").read_text()) == header
    assert header["tensor_bytes"] == plan.stored_bytes <= 5000 == plan.budget_bytes
    assert len({record["form"] for record in header["tensors"].values()}) == 1 and len(set(plan.settings.values())) > 1
    written = save_edited(pair.post_dir, pretrained=pair.pre_dir, edit=plan.edit(), output_dir=tmp_path / "edited")
    assert_same_bits(namespace["planned"].state_dict(), saved_state(written))
    assert_same_bits(namespace["base"].state_dict(), saved_state(pair.pre_dir))
