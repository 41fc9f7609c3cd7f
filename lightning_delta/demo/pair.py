"""A real pre-trained / post-trained pair, built offline in about a minute and cached.

* **Pre-training** (W_pre): a tiny Llama (Hugging Face ``LlamaForCausalLM``) learns the generic objective of the
  digit sequences, next-pixel prediction over every training image, with the answer as one more token (a briefly
  trained classifier; ``pretrain_digits`` can restrict the answers it sees to some digits).
* **Post-training** (W_post): from W_pre, fine-tuning on the task alone, the answer token, with a small learning
  rate and few steps, as instruction tuning does: ΔW = W_post − W_pre is small next to W_pre and W_post is still
  under-trained (the situation EXPO exploits).

Both models are saved with ``save_pretrained`` under ``<cache_dir>/digits-llama-<key>/{pre,post}``, where the key
hashes the settings, so a second run with the same settings loads them instead of training.
"""

from __future__ import annotations

import hashlib
import json
import os
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

from lightning_delta.demo.digits import (
    BOS_TOKEN,
    SEQUENCE_LENGTH,
    VOCAB_SIZE,
    DigitSequences,
    answer_accuracy,
    digit_sequences,
    load_digit_splits,
)
from lightning_delta.losses import CausalLMLoss

__all__ = ["PairSettings", "DemoPair", "build_pair", "default_cache_dir"]

RECIPE_VERSION = 1  # bump when the recipe changes in a way the settings do not show


@dataclass(frozen=True)
class PairSettings:
    """How the demo's models are built; every field is part of the cache key."""

    hidden_size: int = 32  # width of the tiny Llama
    intermediate_size: int = 64  # width of its MLP
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    pretrain_steps: int = 300  # next-pixel prediction on all digits, and their answers
    pretrain_lr: float = 3e-3
    posttrain_steps: int = 200  # answers only, from W_pre: a small ΔW
    posttrain_lr: float = 3e-4
    batch_size: int = 64
    pretrain_digits: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)  # the digits whose answers pre-training sees
    seed: int = 0

    def key(self) -> str:
        payload = json.dumps({"recipe": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass
class DemoPair:
    """Where the pair lies, and what it scores on the test split."""

    pre_dir: Path
    post_dir: Path
    trained: bool  # False: loaded from the cache
    info: dict[str, Any]


def default_cache_dir() -> Path:
    """``$LIGHTNING_DELTA_CACHE/demo``, else ``$XDG_CACHE_HOME/lightning_delta/demo``, else ``~/.cache/...``."""
    if os.environ.get("LIGHTNING_DELTA_CACHE"):
        return Path(os.environ["LIGHTNING_DELTA_CACHE"]) / "demo"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lightning_delta" / "demo"


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


def _tiny_llama(settings: PairSettings) -> nn.Module:
    config = LlamaConfig(
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
    )
    return LlamaForCausalLM(config)


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


def build_pair(cache_dir: str | os.PathLike | None = None, settings: PairSettings | None = None,
               retrain: bool = False) -> DemoPair:
    """Load the pair from the cache, or train and cache it (``retrain=True``: train even if cached)."""
    settings = settings or PairSettings()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = root / f"digits-llama-{settings.key()}"
    info_path = directory / "pair.json"
    if info_path.is_file() and not retrain:
        return DemoPair(directory / "pre", directory / "post", False, json.loads(info_path.read_text()))

    started = time.time()
    pl.seed_everything(settings.seed, verbose=False)
    splits = load_digit_splits()
    model = _tiny_llama(settings)
    generic = DigitSequences(*splits["train"], answer_only=False, answer_digits=settings.pretrain_digits)
    _train(model, generic, settings.pretrain_steps, settings.pretrain_lr, settings)
    staging = root / f".digits-llama-{settings.key()}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging / "pre")
    pre_scores = evaluate(model)
    _train(model, DigitSequences(*splits["train"]), settings.posttrain_steps, settings.posttrain_lr, settings)
    model.save_pretrained(staging / "post")
    info = {
        "settings": asdict(settings),
        "pre": pre_scores,
        "post": evaluate(model),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "train_seconds": round(time.time() - started, 1),
    }
    (staging / "pair.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, directory)  # the cache entry appears whole or not at all
    return DemoPair(directory / "pre", directory / "post", True, info)
