"""UltraFeedback binarized preference pairs for the DPO loss (EXPO, paper §6).

Each row has ``prompt``, ``chosen`` and ``rejected`` (lists of ``{"role", "content"}`` messages, the last the
assistant's), and optionally ``score_chosen`` and ``score_rejected``, as in ``HuggingFaceH4/ultrafeedback_binarized``.
The conversation before the last message is the prompt, written with the tokenizer's chat template and masked
(``-100``); the last message of ``chosen`` and of ``rejected`` is the answer scored by
:class:`~lightning_delta.losses.DPOLoss`.

A local file holds the evaluated pairs, one JSON object per line (``ultrafeedback.jsonl``; ``.json`` and ``.parquet``
files with these columns are read too). ``chosen`` and ``rejected`` hold the whole conversation, or only the
assistant's answer, whose prompt is then ``prompt`` as the user's message; ``score_chosen`` and ``score_rejected``
(numbers, in every row or in none) are optional::

    {"prompt": "Name a primary colour.", "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "Green."}]}
    {"prompt": "What is 2 + 2?", "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    {"prompt": "Say hi.", "chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}], "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "No."}]}

The tokenizer (``tokenizer``, required) is the post-trained model's: its directory or hub id.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lightning_delta.datamodules._common import (
    TokenizedDataModule,
    encode,
    load_rows,
    pad_right,
    resolve_chat_template,
    split_completion,
    validation_loader,
)
from lightning_delta.losses import IGNORE_INDEX

__all__ = ["UltraFeedbackDataModule"]

PLAIN_FORMAT = "{role}: {content}\n"  # without a chat template, per message; the prompt ends with "assistant:"
TOO_LONG = ("error", "drop")
FIELDS = {"prompt": str, "chosen": list, "rejected": list}  # what every row holds (scores are optional)


class UltraFeedbackDataModule(TokenizedDataModule):
    """Chosen/rejected pairs through the chat template, prompt masked, for :class:`~lightning_delta.losses.DPOLoss`.

    Batch (a dict, B pairs): ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_attention_mask``, ``rejected_labels``, all (B, T) right-padded to one length
    T, labels ``-100`` on the prompt and padding; ``score_chosen`` and ``score_rejected`` (B,) float.

    Args:
        tokenizer: the tokenizer that writes prompts and answers as token ids (required): the post-trained model's
            directory or hub id (its tokenizer files, read with ``AutoTokenizer.from_pretrained``), or a tokenizer
            object. A missing pad token is set to eos.
        data: where the pairs are: a hub id, a local ``.jsonl`` file with one ``{"prompt": ..., "chosen": [...],
            "rejected": [...]}`` object per line (or a ``.json`` / ``.parquet`` file with those columns) holding the
            evaluated split, or a directory with ``<split>-*.parquet`` / ``<split>.jsonl`` files (the hub's layout).
        split: ``"test_prefs"`` (or ``"train_prefs"``); a ``data`` that is one file is that split whatever ``split``
            says.
        max_length: the most tokens of prompt + answer; longer pairs lose prompt tokens from the left (one warning
            counts them).
        too_long: what to do with a pair whose answer alone needs ``max_length`` tokens or more: ``"error"``, or
            ``"drop"`` the pair (counted in a warning).
        batch_size: pairs per batch of the validation DataLoader (per process).
        num_workers: worker processes of the validation DataLoader.
        limit: the first ``limit`` pairs only (``None``: all).
        chat_template: ``None`` uses the tokenizer's chat template where it has one (a warning otherwise, then the
            plain ``"role: content"`` lines); ``True`` requires it; ``False`` always uses the plain format.

    Raises:
        ValueError: bad arguments, an empty split, a row without ``prompt``, ``chosen`` or ``rejected`` or with a
            malformed message list (the message names the file and row).
        FileNotFoundError: a local path that does not exist.

    Example::

        dm = UltraFeedbackDataModule("HuggingFaceH4/zephyr-7b-dpo-full", max_length=1024, batch_size=2)
        module = DeltaEditModule(post, pretrained=sft, edit=Extrapolate(alpha=0.3), loss="dpo")
    """

    def __init__(
        self,
        tokenizer: Any,
        data: str = "HuggingFaceH4/ultrafeedback_binarized",
        split: str = "test_prefs",
        max_length: int = 1024,
        too_long: str = "error",
        batch_size: int = 4,
        num_workers: int = 0,
        limit: int | None = None,
        chat_template: bool | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length, batch_size, num_workers)
        if too_long not in TOO_LONG:
            raise ValueError(f"`too_long` must be one of {TOO_LONG}, got {too_long!r}.")
        self.data, self.split, self.too_long, self.limit, self.chat_template = (
            data,
            split,
            too_long,
            limit,
            chat_template,
        )
        self.examples: list[dict[str, Any]] | None = None
        self.num_truncated = 0
        self.num_dropped = 0

    def setup(self, stage: str | None = None) -> None:
        if self.examples is not None:
            return
        rows, origins = load_rows(self.data, self.split, None, self.limit, "UltraFeedback", FIELDS)
        use_template = resolve_chat_template(self.tokenizer, self.chat_template, PLAIN_FORMAT)
        examples = []
        self.num_truncated = self.num_dropped = 0
        for row, origin in zip(rows, origins):
            example = self.encode_pair(row, use_template, origin)
            if example is None:
                self.num_dropped += 1
                continue
            self.num_truncated += example.pop("truncated")
            examples.append(example)
        if self.num_truncated or self.num_dropped:
            rank_zero_warn(
                f"Of {len(rows)} UltraFeedback pairs, {self.num_truncated} are longer than max_length="
                f"{self.max_length} tokens and had their prompts truncated from the left, and {self.num_dropped} were "
                "dropped because an answer alone does not fit. Raise `max_length` to keep them whole."
            )
        if not examples:
            raise ValueError(f"No UltraFeedback pair of split {self.split!r} fits in max_length={self.max_length}.")
        self.examples = examples

    @staticmethod
    def _conversation(row: dict, key: str, origin: str) -> tuple[list[dict], str]:
        """(the messages before the answer, the answer) of ``row[key]``, a list of ``{"role", "content"}`` messages
        ending with the assistant's."""
        messages = row[key]
        shape = f"`{key}` must be a non-empty list of {{'role', 'content'}} messages ending with the assistant's answer"
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"UltraFeedback {origin}: {shape}; it is {str(messages)[:80]!r}.")
        for position, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(
                    f"UltraFeedback {origin}: {shape}; its message {position} is a "
                    f"{type(message).__name__} ({str(message)[:60]!r})."
                )
            bad = [name for name in ("role", "content") if not isinstance(message.get(name), str)]
            if bad:
                found = ", ".join(repr(k) for k, v in message.items() if v is not None) or "no fields"
                raise ValueError(
                    f"UltraFeedback {origin}: {shape}; its message {position} has no string "
                    f"{' or '.join(map(repr, bad))} (it has {found})."
                )
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"UltraFeedback {origin}: {shape}; its last message has role {messages[-1]['role']!r}.")
        return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], messages[-1]["content"]

    def _plain(self, messages: list[dict], answer: str) -> tuple[str, str]:
        prompt = "".join(PLAIN_FORMAT.format(**m) for m in messages) + "assistant:"
        return prompt, " " + answer + (self.tokenizer.eos_token or "")

    def encode_pair(self, row: dict, use_template: bool, origin: str = "row") -> dict[str, Any] | None:
        """Token ids of one pair (``None`` when dropped as too long); ``origin`` says where the row is, for errors."""
        chosen_messages, chosen = self._conversation(row, "chosen", origin)
        rejected_messages, rejected = self._conversation(row, "rejected", origin)
        if chosen_messages != rejected_messages:
            raise ValueError(f"UltraFeedback {origin}: `chosen` and `rejected` have different prompts.")
        if not chosen_messages:
            chosen_messages = [{"role": "user", "content": row["prompt"]}]
        tokenizer = self.tokenizer
        if use_template:
            prompt, chosen_text = split_completion(tokenizer, chosen_messages, chosen)
            _, rejected_text = split_completion(tokenizer, chosen_messages, rejected)
            prompt_ids = encode(tokenizer, prompt)
        else:
            prompt, chosen_text = self._plain(chosen_messages, chosen)
            _, rejected_text = self._plain(chosen_messages, rejected)
            prompt_ids = encode(tokenizer, prompt, special_tokens=True)
        answers = [encode(tokenizer, chosen_text), encode(tokenizer, rejected_text)]
        longest = max(len(a) for a in answers)
        if longest >= self.max_length:
            if self.too_long == "drop":
                return None
            raise ValueError(
                f"UltraFeedback {origin}: an answer alone has {longest} tokens, which leaves no room for the prompt "
                f"within max_length={self.max_length}. Raise `max_length` or pass `too_long='drop'`."
            )
        truncated = len(prompt_ids) + longest > self.max_length
        if truncated:
            prompt_ids = prompt_ids[len(prompt_ids) + longest - self.max_length :]
        return {
            "prompt_ids": prompt_ids,
            "chosen_ids": answers[0],
            "rejected_ids": answers[1],
            "score_chosen": float(row.get("score_chosen", float("nan"))),
            "score_rejected": float(row.get("score_rejected", float("nan"))),
            "truncated": truncated,
        }

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        length = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
        batch: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            sequences = [e["prompt_ids"] + e[f"{side}_ids"] for e in examples]
            targets = [[IGNORE_INDEX] * len(e["prompt_ids"]) + e[f"{side}_ids"] for e in examples]
            batch[f"{side}_input_ids"] = pad_right(sequences, pad, length)  # (B, T)
            batch[f"{side}_attention_mask"] = pad_right([[1] * len(s) for s in sequences], 0, length)  # (B, T)
            batch[f"{side}_labels"] = pad_right(targets, IGNORE_INDEX, length)  # (B, T)
            batch[f"score_{side}"] = torch.tensor([e[f"score_{side}"] for e in examples], dtype=torch.float64)
        return batch

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self.examples is not None  # setup made them
        return validation_loader(self, self.examples, self.batch_size, self.num_workers, self.collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
