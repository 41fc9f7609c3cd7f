"""What the DataModules share: tokenizer and data loading, chat formatting, padding, the unrepeated sampler."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# The files a tokenizer is read from: a fast tokenizer's, its config, or a slow tokenizer's vocabulary.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as is, or ``AutoTokenizer.from_pretrained`` of a path or hub id; a pad token is ensured.

    Raises:
        ValueError: a local directory without tokenizer files (:data:`TOKENIZER_FILES`), or an object that is no
            tokenizer.
    """
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        directory = Path(tokenizer).expanduser()
        if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
            present = sorted(entry.name for entry in directory.iterdir())
            raise ValueError(
                f"The tokenizer directory {directory} has no tokenizer: none of {', '.join(TOKENIZER_FILES)}. It "
                f"holds: {', '.join(present[:10]) or 'nothing'}{' …' if len(present) > 10 else ''}. Give the "
                "directory of the post-trained model with its tokenizer files (e.g. --data.tokenizer post/)."
            )

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise ValueError(
            f"`tokenizer` must be a path, a hub id or a Hugging Face tokenizer, got {type(tokenizer).__name__}."
        )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token to pad with; set `pad_token`.")
        rank_zero_warn(
            f"The tokenizer has no pad token; padding with its eos token {tokenizer.eos_token!r}. Padding positions "
            "are masked (attention_mask 0, labels -100), so this does not change the loss."
        )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat_template(tokenizer: Any, chat_template: bool | None, fallback: str) -> bool:
    """Whether to use the tokenizer's chat template: ``None`` uses it where present (warning otherwise)."""
    present = has_chat_template(tokenizer)
    if chat_template is True and not present:
        raise ValueError(
            "`chat_template=True` but the tokenizer has no chat template. Use the tokenizer of an instruction-tuned "
            f"model, set `tokenizer.chat_template`, or pass `chat_template=False` for the plain format {fallback!r}."
        )
    if chat_template is None and not present:
        rank_zero_warn(f"The tokenizer has no chat template; prompts use the plain format {fallback!r}.")
    return present if chat_template is None else bool(chat_template)


def split_completion(tokenizer: Any, prompt_messages: list[dict], answer: str) -> tuple[str, str]:
    """``(prompt text, completion text)`` through the chat template: the completion is what the template adds after
    the generation prompt for the assistant's ``answer`` (its end-of-turn tokens included)."""
    prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*prompt_messages, {"role": "assistant", "content": answer}], tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(prompt):
        raise ValueError(
            "The chat template does not write the conversation as the generation prompt followed by the answer, so "
            "the answer tokens cannot be told from the prompt; pass `chat_template=False`."
        )
    return prompt, full[len(prompt) :]


def system_turn_leads(tokenizer: Any) -> bool:
    """Whether the chat template writes a system message at the head of the conversation, both in the generation
    prompt and in the conversation with the answer. Templates without a system role raise on it; Mistral-7B-Instruct
    -v0.3's writes it into the last user turn, which is the question in the prompt but not once the answer follows."""
    return _system_turn_leads(tokenizer, tokenizer.chat_template)


@functools.lru_cache(maxsize=8)
def _system_turn_leads(tokenizer: Any, template: str) -> bool:  # once per tokenizer and template
    system, user, assistant = "SYSTEM-PROBE", "USER-PROBE", "ASSISTANT-PROBE"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": assistant}], tokenize=False, add_generation_prompt=False
        )
    except Exception:  # jinja2's TemplateError from raise_exception, or whatever the template trips on
        return False
    return all(system in text and text.index(system) < text.index(user) for text in (prompt, full))


def chat_messages(tokenizer: Any, system_prompt: str | None, turns: Sequence[str]) -> list[dict]:
    """The conversation of ``turns`` (user, assistant, user, ...) after ``system_prompt``: as a system message where
    the chat template writes one at the head of the conversation (:func:`system_turn_leads`), else at the head of
    the first user turn, followed by a blank line (with a warning)."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
    if not system_prompt:
        return messages
    if system_turn_leads(tokenizer):
        return [{"role": "system", "content": system_prompt}, *messages]
    _warn_system_folded(tokenizer.chat_template)
    return [{"role": "user", "content": f"{system_prompt}\n\n{messages[0]['content']}"}, *messages[1:]]


def _warn_system_folded(template: str) -> None:  # Python shows the same warning once per place
    rank_zero_warn(
        "The chat template has no system role, or does not write the system message at the head of the "
        "conversation (Mistral-7B-Instruct-v0.3's puts it into the last user turn); `system_prompt` is put at the "
        "head of the first user turn instead, followed by a blank line."
    )


def encode(tokenizer: Any, text: str, special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])


def local_files(data: str, split: str, what: str, config: str | None = None) -> list[Path] | None:
    """The local files that hold ``split`` of ``data``, or ``None`` when ``data`` is a hub id.

    A single file is the split itself, whatever ``split`` says; a directory holds ``<split>*.{jsonl,json,parquet}``,
    searched in its sub-folders too. A directory with a sub-folder named ``config`` (a copy of a hub repository
    such as ``openai/gsm8k``, whose ``main/`` and ``socratic/`` are two configs) is read in that sub-folder only.
    Files of ``split`` in two sub-folders are two configs, never mixed: that is an error.

    Raises:
        FileNotFoundError: a local path that does not exist, or a directory without a file for ``split``.
        ValueError: a directory whose files for ``split`` lie in several sub-folders (configs).
    """
    path = Path(data).expanduser()
    if path.is_dir():
        folder = path / config if config and (path / config).is_dir() else path
        files = sorted(f for f in folder.rglob("*") if f.suffix in LOCAL_SUFFIXES and f.name.startswith(split))
        if not files:
            raise FileNotFoundError(
                f"No {what} file for split {split!r} in {folder}: expected {split}.jsonl, {split}.json or "
                f"{split}-*.parquet there (the hub's layout)."
            )
        _check_one_config(files, folder, split, config, what)
        return files
    if path.suffix in LOCAL_SUFFIXES:
        if not path.exists():
            raise FileNotFoundError(f"The {what} file {path} does not exist.")
        return [path]
    if data.startswith((".", "/", "~")) or path.suffix:
        raise FileNotFoundError(
            f"{what} data {data!r} is neither an existing directory, a .json/.jsonl/.parquet file nor a hub id."
        )
    return None


def _check_one_config(files: list[Path], folder: Path, split: str, config: str | None, what: str) -> None:
    """Raise when the files of ``split`` under ``folder`` lie in more than one sub-folder (one per config)."""
    groups = sorted({f.relative_to(folder).parts[0] if len(f.relative_to(folder).parts) > 1 else "." for f in files})
    if len(groups) > 1:
        wanted = f"`config={config!r}` is none of them" if config else "no `config` picks one"
        raise ValueError(
            f"{folder} holds {what} files of split {split!r} in {len(groups)} folders ({names(groups)}): these are "
            f"configs of the data set and are never mixed, and {wanted}. Point `data` at one of those folders, or "
            "pass the folder's name as `config`."
        )


def hub_offline() -> bool:
    """Whether the Hugging Face Hub client is in offline mode (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The folder of data set ``repo_id``'s snapshot in the hub download cache (``HF_HUB_CACHE``, laid out by
    ``hf download <repo_id> --repo-type dataset``), or ``None`` when it is not cached. Never downloads."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True))
    except Exception:  # not cached (the client raises one of several errors for that): the caller decides
        return None


def fetch_command(repo_id: str, revision: str | None = None) -> str:
    """The shell command that puts data set ``repo_id`` into the hub download cache."""
    tail = f" --revision {revision}" if revision else ""
    return (
        f"`hf download {repo_id} --repo-type dataset{tail}` (older clients: `huggingface-cli download {repo_id} "
        f"--repo-type dataset{tail}`)"
    )


def not_cached_message(repo_id: str, what: str, revision: str | None = None, detail: str = "") -> str:
    from huggingface_hub import constants

    return (
        f"The {what} data set {repo_id!r} (revision {revision or 'main'!r}) is not in the hub download cache "
        f"{constants.HF_HUB_CACHE}{detail}, and HF_HUB_OFFLINE=1 forbids downloading it. While online, run "
        f"{fetch_command(repo_id, revision)}, or pass `data=` a local folder or file."
    )


def resolve_files(
    data: str,
    split: str,
    config: str | None,
    what: str,
    revision: str | None = None,
) -> list[Path] | None:
    """The files holding ``split`` of ``data`` (:func:`local_files`); for a hub id, those of its snapshot in the
    hub download cache. ``None``: a hub id to read with ``datasets.load_dataset`` (online, or its Arrow cache).

    Raises:
        FileNotFoundError: offline, a hub id whose snapshot lacks ``split`` (the message names the id, the revision
            and the command that fetches it).
    """
    files = local_files(data, split, what, config)
    if files is not None:
        return files
    snapshot = hub_snapshot(data, revision)
    if snapshot is None:
        return None
    try:
        return local_files(str(snapshot), split, what, config)
    except FileNotFoundError:
        if not hub_offline():
            return None
        detail = f" with split {split!r}{f' of config {config!r}' if config else ''} (its snapshot {snapshot} lacks it)"
        raise FileNotFoundError(not_cached_message(data, what, revision, detail)) from None


def load_rows(
    data: str, split: str, config: str | None, limit: int | None, what: str, fields: Mapping[str, type] | None = None
) -> tuple[list[dict], list[str]]:
    """Rows of a local json/jsonl/parquet file, a directory holding ``<split>*.{jsonl,json,parquet}``, or a hub id
    (its snapshot in the hub download cache when there is one: offline under ``HF_HUB_OFFLINE=1``), and where each
    comes from (``"row 3 (counting from 0) of /data/test.jsonl"``), for error messages.

    ``config`` picks the sub-folder of a directory (or snapshot) that holds several configs, and the config of a
    hub id read by ``datasets``. ``fields`` maps the names every row must have to their type; each kept row is
    checked (:func:`check_fields`).

    Raises:
        FileNotFoundError: a local path that does not exist, or a directory without a file for ``split``; offline,
            a hub id that is not cached (the message says how to fetch it).
        ValueError: an empty split (after ``limit``); a row without one of ``fields`` or with a value of another type;
            a directory whose files of ``split`` lie in several configs.
    """
    import datasets  # here, not at the top: it takes seconds to import and only loading rows needs it

    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"`limit` must be a positive number of examples or None, got {limit!r}.")
    files = resolve_files(data, split, config, what)
    rows: list[dict] = []
    origins: list[str] = []
    if files is None:
        try:
            dataset = (
                datasets.load_dataset(data, config, split=split) if config else datasets.load_dataset(data, split=split)
            )
        except Exception as error:
            if not hub_offline():
                raise
            detail = f" (nor in the datasets cache: {type(error).__name__})"
            raise FileNotFoundError(not_cached_message(data, what, None, detail)) from error
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        rows = list(dataset)
        origins = [f"row {i} (counting from 0) of split {split!r} of {data}" for i in range(len(rows))]
    else:
        _check_not_empty(files, split, what)
        for file in files:  # one file at a time, so that each row can be traced to its file
            if limit is not None and len(rows) >= limit:
                break
            if _is_empty(file):
                continue
            try:
                dataset = datasets.load_dataset(LOCAL_SUFFIXES[file.suffix], data_files=str(file), split="train")
            except datasets.exceptions.DatasetGenerationError as error:
                raise ValueError(_unreadable(file, error)) from error
            if limit is not None:
                dataset = dataset.select(range(min(limit - len(rows), len(dataset))))
            rows += list(dataset)
            origins += [f"row {i} (counting from 0) of {file}" for i in range(len(dataset))]
    if not rows:
        raise ValueError(f"The {what} split {split!r} of {data!r} has no examples.")
    for row, origin in zip(rows, origins):
        check_fields(row, origin, fields or {}, what)
    return rows, origins


def _unreadable(file: Path, error: Exception) -> str:
    """Why ``datasets`` could not read a local file: for JSON, the first line that is not a JSON value."""
    if file.suffix in (".json", ".jsonl"):
        with open(file, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
        try:
            json.loads("\n".join(lines))
            return f"Cannot read {file} ({error.__cause__ or error})."  # one JSON document, read by datasets' rules
        except json.JSONDecodeError:
            pass
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as bad:
                shown = line if len(line) <= 80 else line[:77] + "..."
                return (
                    f"Line {number} of {file} is not valid JSON ({bad.msg} at column {bad.colno}): {shown!r}. "
                    "Each line of a JSON Lines file must be one complete JSON object; fix or remove that line."
                )
    return f"Cannot read {file} ({error.__cause__ or error})."


def check_fields(row: Any, origin: str, fields: Mapping[str, type], what: str) -> None:
    """Raise a ValueError naming ``origin``, the expected and the found fields when ``row`` lacks one of ``fields``
    (absent or null) or holds a value of another type.

    >>> check_fields({"question": "2 + 2?", "solution": "4"}, "row 7 of test.jsonl",
    ...              {"question": str, "answer": str}, "GSM8K")
    Traceback (most recent call last):
    ...
    ValueError: GSM8K row 7 of test.jsonl lacks the field 'answer': each row needs the fields 'question' and \
'answer'; this row has 'question', 'solution'.
    """
    expected = f"the field{'s' * (len(fields) > 1)} {names(fields)}"
    if not isinstance(row, dict):
        raise ValueError(f"{what} {origin} is a {type(row).__name__}, not a record; each row needs {expected}.")
    found = ", ".join(repr(key) for key, value in row.items() if value is not None) or "no fields"
    missing = [name for name in fields if row.get(name) is None]
    if missing:
        raise ValueError(
            f"{what} {origin} lacks the field{'s' * (len(missing) > 1)} {names(missing)}: each row "
            f"needs {expected}; this row has {found}."
        )
    for name, kind in fields.items():
        if not isinstance(row[name], kind):
            raise ValueError(
                f"{what} {origin}: the field {name!r} is a {type(row[name]).__name__} "
                f"({str(row[name])[:60]!r}), expected a {kind.__name__}."
            )


def names(items: Any) -> str:
    """``'a'``, ``'a' and 'b'``, ``'a', 'b' and 'c'``."""
    quoted = [repr(item) for item in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _is_empty(file: Path) -> bool:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq  # comes with datasets; only parquet files need it

        return pq.ParquetFile(str(file)).metadata.num_rows == 0
    return file.read_text().strip() in ("", "[]")


def _check_not_empty(files: list[Path], split: str, what: str) -> None:
    """Raise for local files without rows (``datasets`` fails on them with an unrelated error)."""
    if all(_is_empty(file) for file in files):
        raise ValueError(f"The {what} split {split!r} has no examples: {', '.join(map(str, files))} hold no rows.")


def pad_right(sequences: Sequence[Sequence[int]], value: int, length: int | None = None) -> Tensor:
    """(B, T) long tensor, each row padded on the right with ``value`` to ``length`` (default the longest)."""
    length = max(len(s) for s in sequences) if length is None else length
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
    return out


def pad_left(sequences: Sequence[Sequence[int]], value: int) -> Tensor:
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            out[row, length - len(sequence) :] = torch.as_tensor(list(sequence), dtype=torch.long)
    return out


def validation_loader(
    module: Any, examples: Dataset | Sequence[Any], batch_size: int, num_workers: int, collate_fn: Any
) -> DataLoader:
    """A DataLoader that gives each sample to exactly one process, so that the loss sums count each once.

    Under several processes the sampler is Lightning's ``UnrepeatedDistributedSampler`` (a ``DistributedSampler``,
    so Lightning leaves it in place): no sample is repeated to even out the ranks, which would bias the loss sums.
    """
    dataset = cast(Dataset, examples)  # a list is a map-style data set too (indexing and len), as PyTorch reads it
    trainer = getattr(module, "trainer", None)
    sampler = None
    if trainer is not None and trainer.world_size > 1:
        sampler = UnrepeatedDistributedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn
    )


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


class LazyTokenizer:
    """A ``tokenizer`` property that loads ``self._tokenizer_source`` (a path, hub id or tokenizer) on first use."""

    _tokenizer_source: Any
    _tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_source)
        return self._tokenizer


class TokenizedDataModule(LazyTokenizer, pl.LightningDataModule):
    """What the language DataModules share: argument checks and a tokenizer loaded on first use."""

    def __init__(self, tokenizer: Any, max_length: int, batch_size: int, num_workers: int) -> None:
        super().__init__()
        check_positive("max_length", max_length)
        check_positive("batch_size", batch_size)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an integer >= 0, got {num_workers!r}.")
        self._tokenizer_source = tokenizer
        self._tokenizer: Any = None
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
