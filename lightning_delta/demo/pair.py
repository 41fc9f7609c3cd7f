"""A real pre-trained / post-trained pair in the paper's regime, built offline in about a minute and cached.

* **Pre-training** (W_pre): a small Llama (Hugging Face ``LlamaForCausalLM``, 549,504 parameters by default) learns
  the generic objective of the digit sequences, next-patch prediction, over the training images moved by up to one
  pixel (:func:`~lightning_delta.demo.digits.shifted_copies`), with the answer labelled on a fraction of them. It
  leaves a capable base model that is far from done with the task (about 64 % test accuracy).
* **Post-training** (W_post): from W_pre, a short fine-tuning on the task alone, the answer token, with a small
  learning rate, as instruction tuning does: ΔW = W_post − W_pre is a few percent of ‖W_pre‖ (the regime of real
  post-training deltas; :func:`delta_regime` measures it per module), and the task loss drops by about half.

Both models are saved with ``save_pretrained`` under ``<cache_dir>/digits-llama-<key>/{pre,post}``, where the key
hashes the settings and the recipe's version, so a second run with the same settings loads them instead of training.
:func:`scaled_pretrained` derives from them the pre-trained models of smaller deltas, ``W_post − s·ΔW`` (the
delta-scale experiment), cached beside them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_delta.cache import cache_root
from lightning_delta.demo.digits import (
    BOS_TOKEN,
    SEQUENCE_LENGTH,
    VOCAB_SIZE,
    DigitSequences,
    answer_accuracy,
    digit_sequences,
    load_digit_splits,
    shifted_copies,
)
from lightning_delta.losses import CausalLMLoss

__all__ = [
    "SHIPPED_SEEDS",
    "PairSettings",
    "DemoPair",
    "build_pair",
    "default_cache_dir",
    "delta_regime",
    "module_kind",
    "scaled_pretrained",
    "ship_pairs",
    "shipped_pair",
]

# Bump when the recipe changes in a way the settings do not show (2: patches, shifts, 549k params; 3: the weights
# initialised here, not by transformers, and eager attention).
RECIPE_VERSION = 3
INITIALIZER_RANGE = 0.02  # the std of every matrix at initialisation (Llama's config default)


@dataclass(frozen=True)
class PairSettings:
    """How the demo's models are built; every field is part of the cache key."""

    hidden_size: int = 128  # width of the Llama
    intermediate_size: int = 512  # width of its MLP
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    pretrain_steps: int = 1000  # next-patch prediction on shifted training digits, some answers
    pretrain_lr: float = 3e-3
    pretrain_answer_fraction: float = 0.3  # the fraction of pre-training images whose answer is labelled
    posttrain_steps: int = 200  # answers only, from W_pre: a small ΔW
    posttrain_lr: float = 1e-4
    batch_size: int = 64
    seed: int = 0

    def key(self) -> str:
        payload = json.dumps({"recipe": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# The reference pairs that ship with the package: trained by :func:`ship_pairs` with the default recipe at these
# seeds, so that every machine analyses the same weights (training itself differs between CPUs: float rounding,
# amplified over 1,200 steps, gave 62-70 % W_pre accuracy on three machines).
SHIPPED_DIR = Path(__file__).resolve().parent / "pairs"
SHIPPED_SEEDS = (0, 1, 2)


@dataclass
class DemoPair:
    """Where the pair lies, what it scores on the test split, and where what is derived from it is written."""

    pre_dir: Path
    post_dir: Path
    trained: bool  # False: loaded (shipped, or cached from an earlier run)
    info: dict[str, Any]
    work_dir: Path | None = None  # where derived models go (scaled_pretrained); default: beside pre_dir
    source: str = "trained"  # "shipped": one of the package's reference pairs; "trained": trained on this machine

    @property
    def label(self) -> str:
        """How the demo names the pair: ``the reference pair (seed 0)`` or ``your pair (seed 0)``."""
        kind = "the reference pair" if self.source == "shipped" else "your pair"
        return f"{kind} (seed {self.info['settings']['seed']})"


def default_cache_dir() -> Path:
    """``demo/`` under the library's cache folder (:func:`~lightning_delta.cache.cache_root`):
    ``$LIGHTNING_DELTA_CACHE/demo``, else ``$XDG_CACHE_HOME/lightning_delta/demo``, else
    ``~/.cache/lightning_delta/demo``."""
    return cache_root() / "demo"


class CausalLMTraining(pl.LightningModule):
    """Trains a causal LM on the mean of :class:`~lightning_delta.losses.CausalLMLoss` (AdamW, constant rate)."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr, self.loss = model, lr, CausalLMLoss()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        output = self.loss(self.model, batch)
        return (output.total / output.count).float()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)


def _llama(settings: PairSettings) -> LlamaForCausalLM:
    config = LlamaConfig(  # type: ignore[call-arg]  # attn_implementation: a keyword every config takes, untyped
        vocab_size=VOCAB_SIZE,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_attention_heads,
        max_position_embeddings=SEQUENCE_LENGTH,
        tie_word_embeddings=False,
        bos_token_id=BOS_TOKEN,
        eos_token_id=None,
        pad_token_id=None,
        initializer_range=INITIALIZER_RANGE,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    initialize(model, settings.seed)
    return model


@torch.no_grad()
def initialize(model: nn.Module, seed: int) -> None:
    """Every matrix drawn from N(0, INITIALIZER_RANGE²) and every norm weight set to 1, in the order of
    ``named_parameters``, from a generator of its own: the pair does not depend on how a transformers release
    initialises (or orders the initialisation of) a Llama, which changed the trained pair between releases."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if parameter.ndim >= 2:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * INITIALIZER_RANGE)
        else:
            parameter.fill_(1.0)


def _train(model: nn.Module, dataset: DigitSequences, steps: int, lr: float, settings: PairSettings) -> None:
    generator = torch.Generator().manual_seed(settings.seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=steps * settings.batch_size, generator=generator)
    loader = DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model.train()
    trainer.fit(CausalLMTraining(model, lr), train_dataloaders=loader)
    model.eval()


def evaluate(model: nn.Module, split: str = "test") -> dict[str, float]:
    """Answer loss and accuracy of ``model`` on a split."""
    tensors = digit_sequences(*load_digit_splits()[split])
    with torch.no_grad():
        output = CausalLMLoss()(model, tensors)
        correct, total = answer_accuracy(model, tensors)
    return {"loss": float(output.total / output.count), "accuracy": float(correct / total)}


# ------------------------------------------------------------------------------------------------- the regime
def module_kind(name: str) -> str:
    """The kind of module a tensor belongs to, the same in every layer: ``q_proj``, ``mlp.up_proj``, ``norms``,
    ``embed_tokens``, ``lm_head``, ... (the rows of the regime table).

    Example:
        >>> module_kind("model.layers.1.self_attn.q_proj.weight"), module_kind("model.norm.weight")
        ('self_attn.q_proj', 'norms')
    """
    if "norm" in name:
        return "norms"
    kind = re.sub(r"^model\.", "", name.removesuffix(".weight").removesuffix(".bias"))
    return re.sub(r"^layers\.\d+\.", "", kind)


def delta_regime(post: dict[str, Tensor], pre: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """How large ΔW is next to W_pre, per kind of module (:func:`module_kind`) and in all (``"all"``).

    For each group: ``delta_norm`` ‖ΔW‖ and ``pre_norm`` ‖W_pre‖ (Frobenius norms over every tensor of the group,
    computed in float64), their ratio ``ratio``, and ``parameters``, the number of entries.
    """
    sums: dict[str, list[float]] = {}
    for name, weight in pre.items():
        delta = post[name].double() - weight.double()
        for group in (module_kind(name), "all"):
            entry = sums.setdefault(group, [0.0, 0.0, 0])
            entry[0] += float(delta.square().sum())
            entry[1] += float(weight.double().square().sum())
            entry[2] += weight.numel()
    regime = {}
    for group, (delta_sq, pre_sq, count) in sums.items():
        delta_norm, pre_norm = math.sqrt(delta_sq), math.sqrt(pre_sq)
        regime[group] = {
            "delta_norm": delta_norm,
            "pre_norm": pre_norm,
            "ratio": delta_norm / pre_norm if pre_norm > 0 else math.inf,
            "parameters": int(count),
        }
    return regime


# ----------------------------------------------------------------------------------------------------- the pair
def build_pair(
    cache_dir: str | os.PathLike | None = None, settings: PairSettings | None = None, retrain: bool = False
) -> DemoPair:
    """Load the pair from the cache, or train and cache it (``retrain=True``: train even if cached)."""
    settings = settings or PairSettings()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = root / f"digits-llama-{settings.key()}"
    info_path = directory / "pair.json"
    if info_path.is_file() and not retrain:
        return DemoPair(directory / "pre", directory / "post", False, json.loads(info_path.read_text()), directory)

    started = time.time()
    pl.seed_everything(settings.seed, verbose=False)
    train_images, train_digits = shifted_copies(*load_digit_splits()["train"])
    model = _llama(settings)
    generic = DigitSequences(
        train_images,
        train_digits,
        answer_only=False,
        answer_fraction=settings.pretrain_answer_fraction,
        seed=settings.seed,
    )
    _train(model, generic, settings.pretrain_steps, settings.pretrain_lr, settings)
    staging = root / f".digits-llama-{settings.key()}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging / "pre")
    pre_weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    pre_scores = evaluate(model)
    pretrain_seconds = time.time() - started
    _train(model, DigitSequences(train_images, train_digits), settings.posttrain_steps, settings.posttrain_lr, settings)
    model.save_pretrained(staging / "post")
    info = {
        "settings": asdict(settings),
        "pre": pre_scores,
        "post": evaluate(model),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "regime": delta_regime(model.state_dict(), pre_weights),
        "train_seconds": {
            "pre": round(pretrain_seconds, 1),
            "post": round(time.time() - started - pretrain_seconds, 1),
        },
    }
    (staging / "pair.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, directory)  # the cache entry appears whole or not at all
    return DemoPair(directory / "pre", directory / "post", True, info, directory)


def shipped_pair(seed: int = 0, cache_dir: str | os.PathLike | None = None) -> DemoPair:
    """The reference pair of ``seed`` that ships with the package, measured here: its test loss and accuracy and its
    regime are computed from the shipped weights on this machine (seconds), not read from the file. What is
    derived from it (the delta-scale models) is written under ``cache_dir`` (:func:`default_cache_dir`).

    Raises:
        ValueError: no pair of that seed ships; the message lists those that do.
    """
    directory = SHIPPED_DIR / f"seed-{seed}"
    if not (directory / "pair.json").is_file():
        shipped = sorted(int(path.name.split("-")[1]) for path in SHIPPED_DIR.glob("seed-*"))
        raise ValueError(
            f"No reference pair of seed {seed} ships with lightning_delta (those of seeds {shipped} do); "
            "train one with `lightning-delta demo --train true`."
        )
    made = json.loads((directory / "pair.json").read_text())
    pre = LlamaForCausalLM.from_pretrained(directory / "pre").eval()
    post = LlamaForCausalLM.from_pretrained(directory / "post").eval()
    info = {
        "settings": made["settings"],
        "pre": evaluate(pre),
        "post": evaluate(post),
        "parameters": sum(parameter.numel() for parameter in post.parameters()),
        "regime": delta_regime(post.state_dict(), pre.state_dict()),
        "made": made,  # what training measured where the pair was made
    }
    digest = hashlib.sha256((directory / "post" / "model.safetensors").read_bytes()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return DemoPair(
        directory / "pre", directory / "post", False, info, root / f"shipped-seed-{seed}-{digest}", "shipped"
    )


def ship_pairs(
    seeds: tuple[int, ...] = SHIPPED_SEEDS,
    destination: str | os.PathLike = SHIPPED_DIR,
    cache_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Train the default recipe at ``seeds`` (or take them from the cache) and copy each pair into ``destination``
    as ``seed-<s>/{pre,post}`` (``save_pretrained``: config.json and model.safetensors) with ``pair.json``, the
    settings and what training measured. How the shipped reference pairs were made:
    ``python -c "from lightning_delta.demo.pair import ship_pairs; ship_pairs()"``."""
    written = []
    for seed in seeds:
        built = build_pair(cache_dir, PairSettings(seed=seed))
        target = Path(destination) / f"seed-{seed}"
        shutil.rmtree(target, ignore_errors=True)
        for side, source in (("pre", built.pre_dir), ("post", built.post_dir)):
            (target / side).mkdir(parents=True)
            for name in ("config.json", "model.safetensors"):
                shutil.copyfile(source / name, target / side / name)
        record = {key: built.info[key] for key in ("settings", "pre", "post", "parameters")}
        record["regime"] = {"all": built.info["regime"]["all"]}
        record.update(torch=torch.__version__, recipe=RECIPE_VERSION)
        (target / "pair.json").write_text(json.dumps(record, indent=1) + "\n")
        written.append(target)
    return written


def scaled_pretrained(pair: DemoPair, scale: float) -> Path:
    """A pre-trained model whose delta to W_post is ``s·ΔW``: ``W_post − s·(W_post − W_pre)``, cached beside the pair.

    ``s = 1`` is W_pre itself; ``s = 0.5`` puts the pre-trained model halfway to W_post, so every edit of its delta
    acts on half of ΔW (the delta-scale experiment of the demo). Written once, as ``pre-scaled-<s>``.
    """
    if not (isinstance(scale, (int, float)) and 0 < scale <= 1):
        raise ValueError(f"`scale` must be in (0, 1], got {scale!r}.")
    if scale == 1:
        return pair.pre_dir
    directory = (pair.work_dir or pair.pre_dir.parent) / f"pre-scaled-{scale:g}"
    if (directory / "config.json").is_file():
        return directory
    post = LlamaForCausalLM.from_pretrained(pair.post_dir)
    pre = LlamaForCausalLM.from_pretrained(pair.pre_dir).state_dict()
    with torch.no_grad():
        for name, weight in post.state_dict().items():
            weight.sub_(scale * (weight - pre[name]))  # W_post − s·ΔW, in the weights' float32
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    post.save_pretrained(staging)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
    return directory
