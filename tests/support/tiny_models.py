"""Tiny random Hugging Face models, post-trained copies, a tiny tokenizer and a fake offline Hub cache, for tests.

Everything is built from configs in memory (nothing is downloaded) and seeded, so two calls give the same weights.
The pytest fixtures built on these live in ``conftest.py``.

Families (:data:`FAMILIES`): ``llama`` (untied), ``llama-tied`` (``tie_word_embeddings=True``), ``mistral``,
``qwen2``, ``clip`` (``CLIPModel``: text and vision towers) and ``clip-vision`` (``CLIPVisionModel``). Language models
use :data:`VOCAB_SIZE` tokens, which :func:`make_tiny_tokenizer` fills exactly, with ids pad 0, bos 1, eos 2, unk 3.
"""

from __future__ import annotations

import copy
import json
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FAMILIES = ("llama", "llama-tied", "mistral", "qwen2", "clip", "clip-vision")
CAUSAL_LM_FAMILIES = ("llama", "llama-tied", "mistral", "qwen2")
VOCAB_SIZE = 128
HIDDEN_SIZE = 32
IMAGE_SIZE = 32
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Sentences the tokenizer's merges are learned from (GSM8K-like arithmetic and plain English).
TOKENIZER_CORPUS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May?",
    "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "The answer is 10. What is 3 + 4? The answer is 7.",
    "The quick brown fox jumps over the lazy dog. A photo of a cat. A photo of a dog.",
    "Please answer the question step by step and give the final number.",
)

_LANGUAGE_SIZES = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_TOWER_SIZES = dict(hidden_size=HIDDEN_SIZE, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_config(family: str, **overrides):
    """The config of a tiny ``family`` model (hidden 32, 2 layers, vocabulary 128); ``overrides`` replace fields."""
    from transformers import CLIPConfig, CLIPVisionConfig, LlamaConfig, MistralConfig, Qwen2Config

    if family in ("llama", "llama-tied"):
        return LlamaConfig(**{**_LANGUAGE_SIZES, "tie_word_embeddings": family == "llama-tied", **overrides})
    if family == "mistral":
        return MistralConfig(**{**_LANGUAGE_SIZES, "tie_word_embeddings": False, **overrides})
    if family == "qwen2":
        return Qwen2Config(**{**_LANGUAGE_SIZES, "tie_word_embeddings": False, **overrides})
    vision = dict(_TOWER_SIZES, image_size=IMAGE_SIZE, patch_size=8)
    if family == "clip-vision":
        return CLIPVisionConfig(**{**vision, **overrides})
    if family == "clip":
        text = dict(
            _TOWER_SIZES,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return CLIPConfig(**{"text_config": text, "vision_config": vision, "projection_dim": 16, **overrides})
    raise ValueError(f"Unknown family {family!r}; choose one of {', '.join(FAMILIES)}.")


def make_tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype | None = None, **overrides) -> nn.Module:
    """A tiny randomly initialised ``family`` model in eval mode, the same for the same ``seed``.

    The global random state is left untouched. ``dtype`` casts the weights; ``overrides`` go to :func:`tiny_config`.
    """
    from transformers import CLIPModel, CLIPVisionModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    classes = {
        "llama": LlamaForCausalLM,
        "llama-tied": LlamaForCausalLM,
        "mistral": MistralForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "clip": CLIPModel,
        "clip-vision": CLIPVisionModel,
    }
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = classes[family](config)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def make_post_trained(model: nn.Module, seed: int = 1, scale: float = 0.01) -> nn.Module:
    """A "post-trained" copy of ``model``: every floating-point parameter plus ``scale`` · N(0, 1) noise.

    Tied parameters get one perturbation and stay tied; buffers are copied unchanged; ``model`` is not modified.
    The noise is drawn in float32 from a generator seeded with ``seed``, then cast to the parameter's dtype.
    """
    post = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in post.named_parameters():  # each tied parameter once
            if parameter.is_floating_point():
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                parameter.add_((scale * noise).to(parameter.dtype))
    return post.eval()


def make_tiny_tokenizer(tmp_path: str | Path | None = None):
    """A tiny fast tokenizer with a chat template, exactly :data:`VOCAB_SIZE` tokens, built in memory.

    A BPE model over the printable ASCII characters (anything else becomes ``<unk>``), with merges learned from
    :data:`TOKENIZER_CORPUS`; words keep their leading space, and decoding gives the text back. Special tokens:
    ``<pad>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos), ``<unk>`` 3, then ``<|system|>``, ``<|user|>``,
    ``<|assistant|>``. The chat template writes ``<|role|>\\n{content}</s>\\n`` per message and ``<|assistant|>\\n``
    for the generation prompt. No BOS is added by ``__call__``. With ``tmp_path`` the tokenizer is saved there too
    (``AutoTokenizer.from_pretrained(tmp_path)`` reads it back).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(
        Regex(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s+"), behavior="isolated"
    )
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[*SPECIAL_TOKENS, *ROLE_TOKENS],
        initial_alphabet=list(string.printable),
        show_progress=False,
    )
    backend.train_from_iterator(list(TOKENIZER_CORPUS) * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=128,
    )
    if tmp_path is not None:
        tokenizer.save_pretrained(str(tmp_path))
    return tokenizer


def make_tiny_image_processor():
    """A ``CLIPImageProcessor`` for :data:`IMAGE_SIZE` × :data:`IMAGE_SIZE` images (the tiny CLIP models')."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def save_model(
    model: nn.Module,
    directory: str | Path,
    shard: bool = False,
    tokenizer: bool = True,
) -> Path:
    """``model.save_pretrained(directory)`` (safetensors), sharded into several files with an index when ``shard``.

    With ``tokenizer`` the tiny tokenizer (language models and CLIP) and image processor (CLIP) are saved too.
    """
    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size="20KB" if shard else "50GB")
    model_type = model.config.model_type
    if tokenizer:
        if model_type != "clip_vision_model":
            make_tiny_tokenizer(directory)
        if model_type.startswith("clip"):
            make_tiny_image_processor().save_pretrained(str(directory))
    return directory


@dataclass
class TinyPair:
    """A pre-trained model, its post-trained copy, and both saved as Hugging Face directories."""

    family: str
    pre: nn.Module
    post: nn.Module
    pre_dir: Path
    post_dir: Path


def make_tiny_pair(
    tmp_path: str | Path,
    family: str = "llama",
    seed: int = 0,
    shard: str | None = "post",
    scale: float = 0.01,
    dtype: torch.dtype | None = None,
) -> TinyPair:
    """A seeded pre/post pair of ``family`` saved under ``tmp_path / family / {pre, post}``.

    ``shard`` is ``"pre"``, ``"post"``, ``"both"`` or None: which directories get a sharded checkpoint
    (``model.safetensors.index.json`` and several shards). Both directories also get the tiny tokenizer and, for
    CLIP, the image processor.
    """
    if shard not in ("pre", "post", "both", None):
        raise ValueError(f"shard must be 'pre', 'post', 'both' or None, got {shard!r}.")
    pre = make_tiny_model(family, seed=seed, dtype=dtype)
    post = make_post_trained(pre, seed=seed + 1, scale=scale)
    root = Path(tmp_path) / family
    pre_dir = save_model(pre, root / "pre", shard=shard in ("pre", "both"))
    post_dir = save_model(post, root / "post", shard=shard in ("post", "both"))
    return TinyPair(family, pre, post, pre_dir, post_dir)


def reference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with each tied tensor once (first name kept), as detached copies."""
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        kept[name] = tensor.detach().clone()
    return kept


def make_fake_hub_repo(
    cache_dir: str | Path, repo_id: str, source_dir: str | Path, commit: str = "0" * 40, revision: str = "main"
) -> Path:
    """Lay ``source_dir``'s files out as the Hub cache does (``models--org--name/snapshots/<commit>`` and
    ``refs/<revision>``) under ``cache_dir``, so that hub id ``repo_id`` resolves offline. Returns the snapshot."""
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    shutil.copytree(source_dir, snapshot, dirs_exist_ok=True)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return snapshot


def read_index(directory: str | Path) -> dict:
    """The ``model.safetensors.index.json`` of a sharded directory."""
    return json.loads((Path(directory) / "model.safetensors.index.json").read_text())
