"""GSM8K: the causal-LM loss of the answer given the question, and accuracy by greedy generation (paper §4, §5).

Each example is a question and its worked answer ending in ``#### <number>``, as in ``openai/gsm8k``. The prompt is
the question through the tokenizer's chat template (after optional few-shot turns from the train split); the target
is the answer as the template writes the assistant's turn. Labels are ``-100`` on the prompt and on padding, so
:class:`~lightning_delta.losses.CausalLMLoss` sums over answer tokens only.

A local file holds the evaluated examples, one JSON object with ``question`` and ``answer`` per line (``gsm8k.jsonl``;
``.json`` and ``.parquet`` files with these two columns are read too)::

    {"question": "Ann has 3 apples and buys 4 more. How many apples does she have?", "answer": "3 + 4 = 7\\n#### 7"}
    {"question": "A pen costs $2. What do 5 pens cost?", "answer": "5 * 2 = 10\\n#### 10"}
    {"question": "Tom reads 6 pages a day. How many pages does he read in 3 days?", "answer": "6 * 3 = 18\\n#### 18"}

The tokenizer (``tokenizer``, required) is the post-trained model's: its directory or hub id.

``protocol`` picks how the model is asked and how its answers are read (:mod:`.gsm8k_protocols`): ``"chat"``
(default), ``"lm-eval"`` (lm-evaluation-harness's ``gsm8k``, 5-shot plain text, strict and flexible accuracies) or
``"lm-eval-cot-llama"`` (its ``gsm8k_cot_llama``, 8-shot chat chain of thought). Give the same ``protocol`` to the
:class:`GSM8KEvaluator`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from lightning_delta.datamodules import gsm8k_protocols as protocols
from lightning_delta.datamodules._common import (
    LazyTokenizer,
    TokenizedDataModule,
    chat_messages,
    check_positive,
    encode,
    load_rows,
    local_files,
    pad_left,
    pad_right,
    resolve_chat_template,
    split_completion,
    validation_loader,
)
from lightning_delta.datamodules.gsm8k_answers import extract_final_number, numbers_match
from lightning_delta.losses import IGNORE_INDEX

__all__ = ["AnswerLineEnded", "GSM8KDataModule", "GSM8KEvaluator", "PLAIN_FORMAT", "STOP_STRINGS"]

PLAIN_FORMAT = "Question: {question}\nAnswer:"  # without a chat template; the answer follows after a space
STOP_STRINGS = ("\n\nQuestion:",)  # the next turn of PLAIN_FORMAT: few-shot turns are joined by a blank line
ANSWER_LINE = re.compile(r"####[^\n]*\d[^\n]*\n")  # a final-answer line with a number, ended by its line break
FIELDS = {"question": str, "answer": str}  # what every GSM8K row holds
CONFIGS = ("main", "socratic")  # the two configs of openai/gsm8k, each a folder of the repository


class GSM8KDataModule(TokenizedDataModule):
    """Question → answer batches of GSM8K for the causal-LM loss and generation accuracy.

    Batch (a dict; B examples, T the longest example, P the longest prompt):
        ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with ``-100`` on prompt and padding
        (right-padded, what :class:`~lightning_delta.losses.CausalLMLoss` reads); ``prompt_input_ids`` (B, P) and
        ``prompt_attention_mask`` (B, P), left-padded for generation; ``answers``: the reference answer texts.

    Args:
        tokenizer: the tokenizer that writes prompts and answers as token ids (required): the post-trained model's
            directory or hub id (its tokenizer files, read with ``AutoTokenizer.from_pretrained``; ``lightning-delta
            edit`` copies them beside an edited model), or a tokenizer object. A missing pad token is set to eos.
        data: where the examples are: a hub id (its snapshot in the hub download cache when there is one, as
            ``hf download openai/gsm8k --repo-type dataset`` leaves it, which works offline with
            ``HF_HUB_OFFLINE=1``; else ``datasets.load_dataset``), a local ``.jsonl`` file with one
            ``{"question": ..., "answer": "... #### <number>"}`` object per line (or a ``.json`` / ``.parquet`` file
            with those two columns) holding the evaluated split, or a directory with ``<split>.jsonl`` /
            ``<split>-*.parquet`` files (the hub's layout; a copy of the whole repository is read in its ``config``
            folder).
        config: ``"main"`` (default) or ``"socratic"``, the data set's two configs (the latter's answers ask
            themselves sub-questions); the two are never mixed.
        split: the evaluated split (``"test"`` in the paper); a ``data`` that is one file is that split whatever
            ``split`` says.
        protocol: ``"chat"`` (default), ``"lm-eval"`` or ``"lm-eval-cot-llama"`` (see the module's docstring).
        few_shot: number of worked examples put before each question (default: the protocol's, 0, 5 or 8): the
            first ones of ``few_shot_split`` (``"chat"``), lm-eval's draw from it (``"lm-eval"``), or the task's
            fixed examples (``"lm-eval-cot-llama"``). They never come from the evaluated examples: a ``data`` that is
            one file holds only those, so it needs ``few_shot_data``; a source and split that are the evaluated
            ones, or a shot whose question is an evaluated question, is an error.
        few_shot_data: where the few-shot examples come from: a train file, a directory or a hub id (default
            ``data``, a directory or hub id with a ``few_shot_split`` split).
        few_shot_split: the split of the few-shot examples (ignored when ``few_shot_data`` is one file).
        max_length: the most tokens of an example; longer ones lose prompt tokens from the left (one warning
            counts them); an answer that alone needs ``max_length`` tokens or more is an error.
        batch_size: examples per batch of the validation DataLoader (per process).
        num_workers: worker processes of the validation DataLoader.
        limit: evaluate the first ``limit`` examples only (``None``: all).
        chat_template: ``None`` uses the tokenizer's chat template where it has one (a warning otherwise, then the
            plain ``"Question: …\\nAnswer: …"`` format); ``True`` requires it; ``False`` always uses the plain format.
        system_prompt: an optional system message (chat template only). A template without a system role, or one
            that writes it elsewhere than before the conversation (Mistral-7B-Instruct-v0.3 puts it in the last user
            turn), gets it at the head of the first user turn instead, with a warning.
        drop_calculator_notes: take GSM8K's calculator notes (``<<48/2=24>>``) out of the loss target. Off by
            default: the target is then the answer as the data set ships it, the text lm-eval's few-shot examples
            show and the loss earlier results measured; the notes are tokens no instruct model writes unprompted,
            so dropping them measures the loss of the reasoning alone.

    Raises:
        ValueError: bad arguments, an empty split, a row without ``question`` or ``answer`` (the message names the
            file and row), an answer longer than ``max_length``, few-shot examples that would come from the
            evaluated ones.
        FileNotFoundError: a local path that does not exist.

    Example::

        dm = GSM8KDataModule("meta-llama/Meta-Llama-3-8B-Instruct", max_length=1024, batch_size=4)
        module = DeltaEditModule(post, pre, DARE(p=0.9), evaluator=dm.evaluator())
    """

    def __init__(
        self,
        tokenizer: Any,
        data: str = "openai/gsm8k",
        config: str = "main",
        split: str = "test",
        protocol: str = "chat",
        few_shot: int | None = None,
        few_shot_data: str | None = None,
        few_shot_split: str = "train",
        max_length: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        limit: int | None = None,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        drop_calculator_notes: bool = False,
    ) -> None:
        super().__init__(tokenizer, max_length, batch_size, num_workers)
        self.protocol = protocols.check_protocol(protocol)
        few_shot = protocols.DEFAULT_SHOTS[protocol] if few_shot is None else few_shot
        if not isinstance(few_shot, int) or isinstance(few_shot, bool) or few_shot < 0:
            raise ValueError(f"`few_shot` must be an integer >= 0, got {few_shot!r}.")
        if config not in CONFIGS:
            raise ValueError(f"`config` must be 'main' or 'socratic' (the configs of openai/gsm8k), got {config!r}.")
        if protocol == "lm-eval-cot-llama" and few_shot > len(protocols.COT_LLAMA_SHOTS):
            raise ValueError(
                f"`few_shot={few_shot}` but gsm8k_cot_llama has {len(protocols.COT_LLAMA_SHOTS)} examples."
            )
        if protocol == "lm-eval" and chat_template:
            raise ValueError(
                "`protocol='lm-eval'` is lm-eval's gsm8k task on plain text, without a chat template; "
                "pass `chat_template=None` or False, or `protocol='lm-eval-cot-llama'` for chat."
            )
        if protocol == "lm-eval-cot-llama" and chat_template is False:
            raise ValueError(
                "`protocol='lm-eval-cot-llama'` writes its turns through the chat template; pass "
                "`chat_template=None` or True."
            )
        self.data, self.config, self.split, self.limit = data, config, split, limit
        self.drop_calculator_notes = bool(drop_calculator_notes)
        self.few_shot, self.few_shot_data, self.few_shot_split = few_shot, few_shot_data, few_shot_split
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.examples: list[dict[str, Any]] | None = None
        self.num_truncated = 0

    def setup(self, stage: str | None = None) -> None:
        if self.examples is not None:
            return
        reads_shots = self.few_shot and self.protocol != "lm-eval-cot-llama"
        if reads_shots:
            self.check_shot_source()
        rows, origins = load_rows(self.data, self.split, self.config, self.limit, "GSM8K", FIELDS)
        shots = self.shots_per_question(rows, origins)
        if self.protocol == "lm-eval":
            use_template = False
        else:
            chat_template = True if self.protocol == "lm-eval-cot-llama" else self.chat_template
            use_template = resolve_chat_template(self.tokenizer, chat_template, PLAIN_FORMAT)
        examples = [
            self.encode_example(row["question"], row["answer"], question_shots, use_template, origin)
            for row, origin, question_shots in zip(rows, origins, shots)
        ]
        self.num_truncated = sum(example.pop("truncated") for example in examples)
        if self.num_truncated:
            rank_zero_warn(
                f"{self.num_truncated} of {len(examples)} GSM8K examples are longer than max_length={self.max_length} "
                "tokens; their prompts were truncated from the left (few-shot turns and the start of the question go "
                "first). Raise `max_length` to keep them whole."
            )
        self.examples = examples

    def check_shot_source(self) -> None:
        """Refuse few-shot examples that would come from the evaluated ones (before anything is loaded)."""
        k, data, split = self.few_shot, self.data, self.split
        source = data if self.few_shot_data is None else self.few_shot_data
        evaluated = local_files(data, split, "GSM8K", self.config)
        if self.few_shot_data is None and evaluated is not None and not Path(data).expanduser().is_dir():
            raise ValueError(
                f"`few_shot={k}` needs worked examples apart from the evaluated ones, but `data` {data!r} is one file "
                f"that holds only the evaluated examples: the shots would be evaluated questions with their answers. "
                "Pass `few_shot_data=` a GSM8K train file (e.g. train.jsonl or train-00000-of-00001.parquet), or give "
                "`data` as a directory holding train and test files."
            )
        try:
            shot_files = local_files(source, self.few_shot_split, "GSM8K few-shot", self.config)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{error} The {k} few-shot examples come from split {self.few_shot_split!r} of {source!r}: add that "
                "file, or pass `few_shot_data=` a GSM8K train file."
            ) from error
        if evaluated is not None and shot_files is not None:
            same = sorted({f.resolve() for f in evaluated} & {f.resolve() for f in shot_files})
            if same:
                raise ValueError(
                    f"The few-shot examples (`few_shot_data={self.few_shot_data!r}`, split {self.few_shot_split!r}) "
                    f"would come from the evaluated examples (`data={data!r}`, split {split!r}): both read "
                    f"{', '.join(map(str, same))}. Pass `few_shot_data=` a train file, or a `few_shot_split` other "
                    "than the evaluated one."
                )
        elif evaluated is None and shot_files is None and source == data and self.few_shot_split == split:
            raise ValueError(
                f"The few-shot examples would come from the evaluated split {split!r} of {data!r}: set "
                "`few_shot_split` to another split (e.g. 'train') or pass `few_shot_data=`."
            )

    def shots_per_question(self, rows: list[dict], origins: list[str]) -> list[list[dict]]:
        """The worked examples before each evaluated question, by protocol: the first ``few_shot`` train rows
        (``"chat"``), lm-eval's draw of ``few_shot`` train rows for each question in turn (``"lm-eval"``), or the
        first ``few_shot`` of gsm8k_cot_llama's fixed examples (``"lm-eval-cot-llama"``)."""
        k = self.few_shot
        if k == 0:
            return [[] for _ in rows]
        if self.protocol == "lm-eval-cot-llama":
            shots = [{"question": question, "answer": target} for question, target in protocols.COT_LLAMA_SHOTS[:k]]
            return [shots for _ in rows]
        if self.protocol == "chat":
            shots = self.load_shots(rows, origins, k)
            return [shots for _ in rows]
        pool = self.load_shots(rows, origins, None)
        if len(pool) < k:
            raise ValueError(f"`few_shot={k}` but the few-shot split {self.few_shot_split!r} has {len(pool)} examples.")
        return [[pool[i] for i in drawn] for drawn in protocols.lm_eval_shot_indices(len(pool), len(rows), k)]

    def load_shots(self, rows: list[dict], origins: list[str], limit: int | None) -> list[dict]:
        """The first ``limit`` rows (all: ``None``) of the few-shot source; none may ask an evaluated question of
        ``rows``."""
        k = self.few_shot
        source = self.data if self.few_shot_data is None else self.few_shot_data
        shots, shot_origins = load_rows(source, self.few_shot_split, self.config, limit, "GSM8K few-shot", FIELDS)
        if len(shots) < k:
            raise ValueError(
                f"`few_shot={k}` but split {self.few_shot_split!r} of {source!r} has {len(shots)} "
                "examples; lower `few_shot` or pass `few_shot_data=` with more."
            )
        shot_questions = {" ".join(shot["question"].split()): where for shot, where in zip(shots, shot_origins)}
        for row, origin in zip(rows, origins):
            where = shot_questions.get(" ".join(row["question"].split()))
            if where is not None:
                raise ValueError(
                    f"The evaluated GSM8K {origin} has the same question as the few-shot {where} "
                    f"({row['question'][:60]!r}), so its answer would be in its own prompt. Take the few-shot "
                    "examples from a train split apart from the evaluated examples (`few_shot_data=`)."
                )
        return shots

    def encode_example(
        self, question: str, answer: str, shots: list[dict], use_template: bool, origin: str = "example"
    ) -> dict[str, Any]:
        """Token ids of one example: ``prompt_ids`` (masked), ``answer_ids`` (the target), ``truncated``."""
        tokenizer = self.tokenizer
        reference = answer
        if self.drop_calculator_notes:
            answer = protocols.drop_calculator_notes(answer)
        if use_template:
            asked = protocols.COT_LLAMA_PROMPT if self.protocol == "lm-eval-cot-llama" else "{question}"
            if self.protocol == "lm-eval-cot-llama":
                answer = protocols.cot_target(answer)
            turns = []
            for shot in shots:
                turns += [asked.format(question=shot["question"]), shot["answer"]]
            messages = chat_messages(tokenizer, self.system_prompt, [*turns, asked.format(question=question)])
            prompt, completion = split_completion(tokenizer, messages, answer)
            # the template writes its own special tokens; lm-eval adds the tokenizer's where it wrote no bos
            bos_written = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)
            prompt_ids = encode(tokenizer, prompt, special_tokens=self.protocol != "chat" and not bos_written)
        else:
            parts = [PLAIN_FORMAT.format(question=s["question"]) + " " + s["answer"] + "\n\n" for s in shots]
            prompt = "".join(parts) + PLAIN_FORMAT.format(question=question)
            completion = " " + answer + (tokenizer.eos_token or "")
            prompt_ids = encode(tokenizer, prompt, special_tokens=True)
        answer_ids = encode(tokenizer, completion)
        if len(answer_ids) >= self.max_length:
            raise ValueError(
                f"GSM8K {origin}: the answer alone has {len(answer_ids)} tokens, which leaves no room for the "
                f"question within max_length={self.max_length}. Raise `max_length`. The answer begins: {answer[:80]!r}"
            )
        truncated = len(prompt_ids) + len(answer_ids) > self.max_length
        if truncated:
            prompt_ids = prompt_ids[len(prompt_ids) + len(answer_ids) - self.max_length :]
        return {"prompt_ids": prompt_ids, "answer_ids": answer_ids, "answer": reference, "truncated": truncated}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        sequences = [e["prompt_ids"] + e["answer_ids"] for e in examples]
        targets = [[IGNORE_INDEX] * len(e["prompt_ids"]) + e["answer_ids"] for e in examples]
        input_ids = pad_right(sequences, pad)
        prompt_input_ids = pad_left([e["prompt_ids"] for e in examples], pad)
        return {
            "input_ids": input_ids,  # (B, T)
            "attention_mask": pad_right([[1] * len(s) for s in sequences], 0),  # (B, T)
            "labels": pad_right(targets, IGNORE_INDEX),  # (B, T)
            "prompt_input_ids": prompt_input_ids,  # (B, P), left-padded
            "prompt_attention_mask": pad_left([[1] * len(e["prompt_ids"]) for e in examples], 0),  # (B, P)
            "answers": [e["answer"] for e in examples],
        }

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self.examples is not None  # setup made them
        return validation_loader(self, self.examples, self.batch_size, self.num_workers, self.collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def evaluator(self, max_new_tokens: int = 256) -> GSM8KEvaluator:
        """The generation-accuracy evaluator for ``DeltaEditModule(evaluator=...)``, with this tokenizer and
        protocol."""
        return GSM8KEvaluator(self.tokenizer, max_new_tokens=max_new_tokens, protocol=self.protocol)


class GSM8KEvaluator(LazyTokenizer):
    """``(model, batch) -> (correct, total)``: greedy generation from the prompt, then exact match of final numbers.

    The batch's left-padded prompts are generated together by ``model.generate`` (greedy, KV cache). A row stops at
    the end of its answer: an eos token (the model's generation config's and the tokenizer's), the line break that
    ends its first ``#### <number>`` line, or a stop string (default :data:`STOP_STRINGS`: the next few-shot turn of
    the plain format); the batch stops when every row has stopped, or after ``max_new_tokens``. The text is cut
    there (:meth:`answer_text`), and the number after ``####`` (or the last number) is compared with the reference
    answer's (:func:`~lightning_delta.datamodules.gsm8k_answers.extract_final_number`). Use as ``DeltaEditModule(evaluator=...)``,
    which sums the counts across processes and logs ``accuracy/post`` (t = 0) and ``accuracy/edit`` (t = 1); or
    count :meth:`generate`'s texts yourself with :meth:`count_matches`.

    With ``protocol="lm-eval"`` or ``"lm-eval-cot-llama"`` (lm-evaluation-harness's ``gsm8k`` and
    ``gsm8k_cot_llama``, :mod:`.gsm8k_protocols`) a row stops at the task's stop strings or eos only, and each
    answer is read by the task's two filters: the evaluator returns ``{"strict-match": (correct, total),
    "flexible-extract": (correct, total)}`` (:meth:`count_filter_matches`), which ``DeltaEditModule`` logs as
    ``accuracy/<post|edit>/<filter>``, the first also as ``accuracy/post`` and ``accuracy/edit``.

    Args:
        tokenizer: the tokenizer that decodes the generated answers (and gives the pad id): the post-trained model's
            directory or hub id, or a tokenizer object.
        max_new_tokens: generation budget per answer (256 is lm-eval's too).
        stop_strings: texts that end an answer where they begin (transformers' ``stop_strings``; for a tokenizer whose
            vocabulary transformers' stop-string search cannot read, such as a WordLevel one, they are searched in
            the generated tokens' texts instead, as :class:`AnswerLineEnded` searches its pattern); default: the
            protocol's (:data:`STOP_STRINGS` for ``"chat"``, the task's ``until`` for the lm-eval protocols).
        protocol: ``"chat"`` (default), ``"lm-eval"`` or ``"lm-eval-cot-llama"``: the one the DataModule uses.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_new_tokens: int = 256,
        stop_strings: Sequence[str] | None = None,
        protocol: str = "chat",
    ) -> None:
        check_positive("max_new_tokens", max_new_tokens)
        self.protocol = protocols.check_protocol(protocol)
        if stop_strings is None:
            stop_strings = STOP_STRINGS if protocol == "chat" else protocols.STOP_STRINGS[protocol]
        if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"`stop_strings` must be a list of non-empty strings, got {stop_strings!r}.")
        self._tokenizer_source = tokenizer
        self._tokenizer: Any = None
        self._token_texts: list[str] | None = None
        self.max_new_tokens = max_new_tokens
        self.stop_strings = tuple(stop_strings)
        self.accuracy_names = tuple(protocols.FILTERS.get(protocol, ()))  # several readings of each answer
        self._stop_strings_by_transformers: bool | None = None

    @property
    def reads_answer_line(self) -> bool:
        """Whether a row stops after its first ``#### <number>`` line (``"chat"``; lm-eval stops at its strings)."""
        return self.protocol == "chat"

    @property
    def stop_strings_by_transformers(self) -> bool:
        """Whether transformers' ``stop_strings`` serve this tokenizer (they read its vocabulary and fail on some,
        e.g. WordLevel tokenizers, with "substring not found"); else :class:`AnswerLineEnded` searches them."""
        if self._stop_strings_by_transformers is None:
            try:
                StopStringCriteria(self.tokenizer, list(self.stop_strings))
                self._stop_strings_by_transformers = True
            except ValueError:
                self._stop_strings_by_transformers = False
        return self._stop_strings_by_transformers

    @property
    def token_texts(self) -> list[str]:
        """Every token id's text, decoded alone without special tokens (built once)."""
        if self._token_texts is None:
            tokenizer = self.tokenizer
            self._token_texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        return self._token_texts

    @torch.no_grad()
    def generate_ids(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        """The greedy continuations' token ids ``(B, N)``, ``N <= max_new_tokens``: each row ends with the token that
        ends its answer, then padding."""
        prompt = batch["prompt_input_ids"]
        tokenizer = self.tokenizer
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        by_transformers = bool(self.stop_strings) and self.stop_strings_by_transformers
        searched = () if by_transformers else self.stop_strings
        output = model.generate(  # type: ignore[operator]  # transformers' GenerationMixin (or peft's), not nn.Module
            input_ids=prompt,
            attention_mask=batch["prompt_attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=eos or None,
            pad_token_id=tokenizer.pad_token_id,
            stop_strings=list(self.stop_strings) if by_transformers else None,
            tokenizer=tokenizer,
            stopping_criteria=StoppingCriteriaList(
                [AnswerLineEnded(self.token_texts, prompt.shape[1], searched, answer_line=self.reads_answer_line)]
                if self.reads_answer_line or searched
                else []
            ),
            # a model sharded by FSDP2 gathers its weights on all processes at every step: all must step together
            synced_gpus=True if any(isinstance(p, DTensor) for p in model.parameters()) else None,
        )
        return output[:, prompt.shape[1] :]

    def generate(self, model: nn.Module, batch: dict[str, Any]) -> list[str]:
        """The greedy answers to the batch's prompts, decoded without special tokens and cut at their end."""
        texts = self.tokenizer.batch_decode(self.generate_ids(model, batch), skip_special_tokens=True)
        return [self.answer_text(text) for text in texts]

    def answer_text(self, text: str) -> str:
        """``text`` up to where the answer ends: before the first stop string, or before the line break that ends
        the first ``#### <number>`` line, whichever comes first."""
        ends = [text.find(stop) for stop in self.stop_strings]
        line = ANSWER_LINE.search(text) if self.reads_answer_line else None
        if line is not None:
            ends.append(line.end() - 1)
        return text[: min((end for end in ends if end >= 0), default=len(text))]

    @staticmethod
    def count_matches(texts: Sequence[str], references: Sequence[str], device: Any = None) -> tuple[Tensor, Tensor]:
        """``(correct, total)`` as float64 tensors (): texts whose final number equals their reference's.

        Example:
            >>> GSM8KEvaluator.count_matches(["so 3 + 4 = 7", "#### 1,000"], ["#### 7", "#### 999"])
            (tensor(1., dtype=torch.float64), tensor(2., dtype=torch.float64))
        """
        if len(texts) != len(references):
            raise ValueError(f"Got {len(texts)} generated texts for {len(references)} reference answers.")
        correct = sum(
            numbers_match(extract_final_number(text), extract_final_number(reference))
            for text, reference in zip(texts, references)
        )
        return (
            torch.tensor(float(correct), dtype=torch.float64, device=device),
            torch.tensor(float(len(texts)), dtype=torch.float64, device=device),
        )

    def count_filter_matches(
        self, texts: Sequence[str], references: Sequence[str], device: Any = None
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """``{filter: (correct, total)}`` as float64 tensors () under an lm-eval protocol: each filter's answer
        (``strict-match``, ``flexible-extract``) against the reference, as lm-eval's ``exact_match`` compares them.

        Example:
            >>> evaluator = GSM8KEvaluator("unused", protocol="lm-eval")
            >>> counts = evaluator.count_filter_matches(["3 + 4 = 7.\\n#### 7", "It is 7"], ["#### 7", "#### 7"])
            >>> {name: float(correct) for name, (correct, total) in counts.items()}
            {'strict-match': 1.0, 'flexible-extract': 2.0}
        """
        if len(texts) != len(references):
            raise ValueError(f"Got {len(texts)} generated texts for {len(references)} reference answers.")
        total = torch.tensor(float(len(texts)), dtype=torch.float64, device=device)
        return {
            name: (torch.tensor(float(correct), dtype=torch.float64, device=device), total)
            for name, correct in protocols.filter_matches(self.protocol, texts, references).items()
        }

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        texts = self.generate(model, batch)
        device = batch["prompt_input_ids"].device
        if self.accuracy_names:
            return self.count_filter_matches(texts, batch["answers"], device=device)
        return self.count_matches(texts, batch["answers"], device=device)


class AnswerLineEnded(StoppingCriteria):
    """Stops a row at the line break that ends its first ``#### <number>`` line (:data:`ANSWER_LINE`), or at one of
    ``stop_strings``.

    transformers' stop strings match fixed texts; this one is "a line break after ``####`` and a number". Each call
    reads only the tokens generated since the last one and adds their texts (``token_texts``, every token decoded
    alone; ids past the tokenizer's vocabulary add nothing) to the row's text, which the pattern then searches.
    A token decoded alone can lose a leading space (SentencePiece) or be part of a multi-byte character (byte-level
    BPE); neither changes a ``#``, a digit or a line break, all the pattern reads.

    Args:
        token_texts: the text of every token id (:attr:`GSM8KEvaluator.token_texts`).
        prompt_length: the (padded) prompt length: the generated tokens start there.
        stop_strings: texts that also end a row (default none: transformers' ``stop_strings`` search them where they
            can read the tokenizer).
        answer_line: stop at the first answer line (the chat protocol); False: at ``stop_strings`` alone.
    """

    def __init__(
        self, token_texts: Sequence[str], prompt_length: int, stop_strings: Sequence[str] = (), answer_line: bool = True
    ) -> None:
        self.token_texts, self.prompt_length = token_texts, prompt_length
        self.stop_strings, self.answer_line = tuple(stop_strings), answer_line
        self.texts: list[str] = []
        self.read = 0  # generated tokens already read

    def __call__(self, input_ids: Tensor, scores: Any = None, **kwargs: Any) -> Tensor:
        new = input_ids[:, self.prompt_length + self.read :].tolist()
        if not self.texts:
            self.texts = [""] * len(new)
        self.read += len(new[0]) if new else 0
        texts, known = self.token_texts, len(self.token_texts)
        self.texts = [
            text + "".join(texts[token] for token in tokens if token < known) for text, tokens in zip(self.texts, new)
        ]
        ended = [
            (self.answer_line and ANSWER_LINE.search(text) is not None)
            or any(stop in text for stop in self.stop_strings)
            for text in self.texts
        ]
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)
