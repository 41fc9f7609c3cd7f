"""The 8×8 handwritten digits bundled with scikit-learn (no download), as short token sequences for a causal LM.

An image is 64 pixels of gray level 0…16. Each pixel is cut to three levels (0–5, 6–11, 12–16 give 0, 1, 2) and each
2×2 patch of pixels becomes one token (``27·a + 9·b + 3·c + d`` for the patch's pixels read row by row, 81 tokens), so
a sequence is ``<bos> t_1 … t_16 <answer> d`` (19 tokens), the patches in reading order and ``d`` the digit's own
token. The task loss is the causal-LM loss of the answer token only (labels are ``-100`` elsewhere), the same shape
as GSM8K's loss of the answer given the question; accuracy is the arg-max over the ten digit tokens.

Vocabulary (:data:`VOCAB_SIZE` = 96): patches 0–80, digits 0–9 are tokens 81–90, ``<bos>`` 91, ``<answer>`` 92;
93–95 are unused.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DigitSequences",
    "DigitsDataModule",
    "answer_accuracy",
    "digit_sequences",
    "load_digit_splits",
    "patch_tokens",
    "shifted_copies",
    "VOCAB_SIZE",
]

LEVELS = 3  # gray levels 0…16 cut to three
PATCH = 2  # a token is a PATCH×PATCH square of pixels
PATCH_TOKENS = LEVELS ** (PATCH * PATCH)  # 81
PATCHES = (8 // PATCH) ** 2  # 16 tokens per image
DIGIT_TOKEN = PATCH_TOKENS  # token of digit d: DIGIT_TOKEN + d
BOS_TOKEN = DIGIT_TOKEN + 10
ANSWER_TOKEN = BOS_TOKEN + 1
VOCAB_SIZE = 96
SEQUENCE_LENGTH = PATCHES + 3  # <bos>, the patches, <answer>, the digit
IGNORE_INDEX = -100


@lru_cache(maxsize=4)
def _splits(test_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # scikit-learn only when the digits are read: it takes half a second, which `lightning-delta --help` need not wait
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.data.astype(np.int64)
    targets = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, targets, test_size=test_fraction, random_state=seed, stratify=targets
    )
    for array in (train_x, test_x, train_y, test_y):
        array.setflags(write=False)  # shared between callers by the cache
    return {"train": (train_x, train_y), "test": (test_x, test_y)}


def load_digit_splits(test_fraction: float = 0.25, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, digits), "test": (images, digits)}``: a stratified split of the 1797 digits (1347 and 450).

    Read once per process (every sweep point's data module asks again); the arrays are read-only.

    Shapes: images ``(N, 64)`` int64 in 0…16, digits ``(N,)`` int64 in 0…9.
    """
    return dict(_splits(test_fraction, seed))


def shifted_copies(images: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every image moved by −1, 0 or +1 pixel in each direction (9 copies, blank pixels where it moved away from).

    The training data of the demo pair: nine times as many distinct images keep a model of hundreds of thousands of
    parameters from memorising 1347 digits. Shapes: ``(N, 64)``, ``(N,)`` in; ``(9N, 64)``, ``(9N,)`` out, the
    unshifted copy fifth.
    """
    square = np.asarray(images).reshape(-1, 8, 8)
    copies = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            moved = np.zeros_like(square)
            moved[:, max(dy, 0) : 8 + min(dy, 0), max(dx, 0) : 8 + min(dx, 0)] = square[
                :, max(-dy, 0) : 8 + min(-dy, 0), max(-dx, 0) : 8 + min(-dx, 0)
            ]
            copies.append(moved.reshape(-1, 64))
    return np.concatenate(copies), np.tile(np.asarray(digits), 9)


def patch_tokens(images: np.ndarray | Tensor) -> Tensor:
    """The 16 patch tokens of each image, in reading order. ``(N, 64)`` gray levels in, ``(N, 16)`` int64 in 0…80 out.

    Example:
        >>> patch_tokens(torch.full((1, 64), 16))[0, :3].tolist()  # all black: level 2 everywhere, 2·(27+9+3+1)
        [80, 80, 80]
    """
    levels = (torch.tensor(np.asarray(images), dtype=torch.long) * LEVELS // 17).view(-1, 8, 8)  # 0…2
    side = 8 // PATCH
    patches = levels.view(-1, side, PATCH, side, PATCH).permute(0, 1, 3, 2, 4).reshape(-1, PATCHES, PATCH * PATCH)
    weights = LEVELS ** torch.arange(PATCH * PATCH - 1, -1, -1)  # 27, 9, 3, 1
    return (patches * weights).sum(dim=-1)


def digit_sequences(
    images: np.ndarray, digits: np.ndarray, answer_only: bool = True, answer_fraction: float = 1.0, seed: int = 0
) -> dict[str, Tensor]:
    """Token sequences and labels for a batch of images.

    Args:
        images: ``(N, 64)`` gray levels; digits: ``(N,)``.
        answer_only: labels only on the answer token (the task loss); False also labels every patch (next-patch
            prediction, the generic pre-training objective).
        answer_fraction: label the answer of this fraction of the images only (drawn with ``seed``); 1 labels all.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``(N, 19)``.
    """
    patches = patch_tokens(images)  # (N, 16)
    answers = torch.tensor(np.asarray(digits), dtype=torch.long)
    n = patches.shape[0]
    input_ids = torch.cat(
        [torch.full((n, 1), BOS_TOKEN), patches, torch.full((n, 1), ANSWER_TOKEN), (DIGIT_TOKEN + answers)[:, None]],
        dim=1,
    )  # (N, 19)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if not answer_only:
        labels[:, 1 : PATCHES + 1] = patches
    answered = torch.ones(n, dtype=torch.bool)
    if answer_fraction < 1.0:
        answered = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < answer_fraction
    labels[answered, -1] = input_ids[answered, -1]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


class DigitSequences(Dataset):
    """A split of the digits as dicts of ``(19,)`` tensors (see :func:`digit_sequences`)."""

    def __init__(self, images: np.ndarray, digits: np.ndarray, **kwargs: Any) -> None:
        self.tensors = digit_sequences(images, digits, **kwargs)

    def __len__(self) -> int:
        return self.tensors["input_ids"].shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


class DigitsDataModule(pl.LightningDataModule):
    """Evaluation data for the demo: one split of the digits, the answer token labelled.

    Under several processes each gets a disjoint share (``UnrepeatedDistributedSampler``: no padding by repeats,
    which would bias the loss); create the Trainer with ``use_distributed_sampler=False``.

    Args:
        split: ``"test"`` (450 images) or ``"train"`` (1347).
        limit: keep the first ``limit`` images of the split (``None``: all).
        batch_size: images per batch.
        seed: the seed of the train/test split.
    """

    def __init__(self, split: str = "test", limit: int | None = None, batch_size: int = 150, seed: int = 0) -> None:
        super().__init__()
        if split not in ("train", "test"):
            raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
        if limit is not None and limit < 1:
            raise ValueError(f"`limit` must be None or >= 1, got {limit!r}.")
        self.split, self.limit, self.batch_size, self.seed = split, limit, batch_size, seed
        self.dataset: DigitSequences | None = None

    def setup(self, stage: str | None = None) -> None:
        images, digits = load_digit_splits(seed=self.seed)[self.split]
        if self.limit is not None:
            images, digits = images[: self.limit], digits[: self.limit]
        self.dataset = DigitSequences(images, digits)

    def val_dataloader(self) -> DataLoader:
        assert self.dataset is not None  # setup made it
        sampler = None
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(self.dataset, shuffle=False)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler)


def answer_accuracy(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(correct, total)``: the arg-max over the ten digit tokens at the answer position against the label."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        scores = logits[:, -2, DIGIT_TOKEN : DIGIT_TOKEN + 10]  # (B, 10): the prediction of the last token
        predicted = scores.argmax(dim=-1) + DIGIT_TOKEN
        target = batch["input_ids"][:, -1]
        correct = (predicted == target).sum().to(torch.float64)
    return correct, torch.tensor(float(target.numel()), dtype=torch.float64)
