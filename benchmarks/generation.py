"""GSM8K generation: the library's evaluator against Hugging Face ``generate`` called the naive way.

``python -m benchmarks.generation`` (or the ``generation`` item of ``python -m benchmarks``). Random Llamas with the
tests' 128-token tokenizer, float32, greedy, 256 new tokens; one batch of 8 GSM8K-style prompts (plain format, two
shots, left-padded by :class:`~lightning_delta.datamodules.GSM8KDataModule`). Variants, interleaved in one process
(the order rotates every round):

- ``naive``: ``model.generate`` one prompt at a time (unpadded), no stopping but eos: the way a script calls it;
- ``previous``: the evaluator before rows stopped: one batched, left-padded ``model.generate`` (KV cache), no
  stopping but eos;
- ``library``: :meth:`GSM8KEvaluator.generate_ids`: the same batch, each row stopping at the end of its answer.

A random model writes neither eos, ``####`` nor ``Question:``, so two cases: ``no stop`` (every row runs 256 tokens:
batching alone), and ``answers end`` where the end of an answer is emulated by a stop string, the text of two
tokens the model writes in some rows (each row then ends at its first one, between a few and 256 tokens, or not
at all). Tokens per second count answer tokens: each row's tokens up to where the library stops it (the same
for every variant: the first tokens of every variant are checked equal, row by row).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightning_delta.datamodules import GSM8KDataModule, GSM8KEvaluator
from lightning_delta.datamodules.gsm8k import PLAIN_FORMAT
from tests.support.tiny_models import VOCAB_SIZE, make_tiny_tokenizer

MAX_NEW_TOKENS = 256
BATCH = 8
# random Llamas over the tests' 128-token vocabulary: the tests' tiny one and a larger one
MODELS = {
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "small": dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
    ),
}
PLAN = {"tiny": (("tiny",), 1, 16), "full": (("tiny", "small"), 3, MAX_NEW_TOKENS)}  # models, rounds, new tokens
VARIANTS = ("naive", "previous", "library")
QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. What did she earn?",
    "What is 3 + 4?",
    "A pen costs $2. What do 5 pens cost?",
    "Tom reads 6 pages a day. How many pages does he read in 3 days?",
    "The quick brown fox jumps over 10 dogs and then 7 more. How many dogs?",
    "Half of 48 is what?",
    "Ann has 3 apples and buys 4 more. How many apples does she have?",
]
SHOTS = [
    {"question": "What is 10 - 8?", "answer": "10 - 8 = 2\n#### 2"},
    {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
]


def build_model(size: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **MODELS[size],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def prompt_batch(tokenizer: Any, directory: Path) -> dict[str, Any]:
    """One left-padded batch of :data:`QUESTIONS` in the plain few-shot format, built by the DataModule."""
    import json

    test, train = directory / "test.jsonl", directory / "train.jsonl"
    test.write_text("".join(json.dumps({"question": q, "answer": "#### 0"}) + "\n" for q in QUESTIONS))
    train.write_text("".join(json.dumps(shot) + "\n" for shot in SHOTS))
    dm = GSM8KDataModule(
        tokenizer,
        data=str(test),
        few_shot=len(SHOTS),
        few_shot_data=str(train),
        chat_template=False,
        batch_size=BATCH,
        max_length=1024,
    )
    batch = next(iter(dm.val_dataloader()))
    assert PLAIN_FORMAT.split("{")[0] in tokenizer.decode(batch["prompt_input_ids"][0])
    return batch


def naive(model: torch.nn.Module, batch: dict[str, Any], tokenizer: Any, new_tokens: int) -> list[list[int]]:
    rows = []
    for prompt, mask in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"]):
        ids = prompt[mask.bool()][None]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        rows.append(out[0, ids.shape[1] :].tolist())
    return rows


def previous(model: torch.nn.Module, batch: dict[str, Any], tokenizer: Any, new_tokens: int) -> list[list[int]]:
    prompt = batch["prompt_input_ids"]
    out = model.generate(
        input_ids=prompt,
        attention_mask=batch["prompt_attention_mask"],
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[:, prompt.shape[1] :].tolist()


def stop_string(tokenizer: Any, rows: list[list[int]]) -> str:
    """The text of two tokens the model writes (no special tokens), taken where it appears in the most rows first
    at different places: what makes the answers end at different lengths."""
    special = set(tokenizer.all_special_ids)
    texts = [tokenizer.decode(row) for row in rows]
    best, best_score = None, -1
    for row in rows:
        for i in range(4, len(row) - 1, 3):
            if special & set(row[i : i + 2]):
                continue
            candidate = tokenizer.decode(row[i : i + 2])
            places = {text.find(candidate) for text in texts if candidate in text}
            if len(places) > best_score:
                best, best_score = candidate, len(places)
    return best


def measure(size: str, rounds: int, new_tokens: int) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    tokenizer = make_tiny_tokenizer()
    model = build_model(size)
    with tempfile.TemporaryDirectory() as directory:
        batch = prompt_batch(tokenizer, Path(directory))
    reference = naive(model, batch, tokenizer, new_tokens)
    cases = []
    for case, stops in (("no stop", []), ("answers end", [stop_string(tokenizer, reference)])):
        evaluator = GSM8KEvaluator(tokenizer, max_new_tokens=new_tokens, stop_strings=stops)
        _ = evaluator.token_texts  # built once per evaluator, outside the timing

        def library(model_, batch_, tokenizer_, new_tokens_, evaluator=evaluator) -> list[list[int]]:
            return evaluator.generate_ids(model_, batch_).tolist()

        functions = {"naive": naive, "previous": previous, "library": library}
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        outputs: dict[str, list[list[int]]] = {}
        for round_index in range(rounds):
            order = VARIANTS[round_index % 3 :] + VARIANTS[: round_index % 3]
            for name in order:
                start = time.perf_counter()
                outputs[name] = functions[name](model, batch, tokenizer, new_tokens)
                times[name].append(time.perf_counter() - start)
            print(
                f"[{time.strftime('%H:%M:%S')}] {size} {case} round {round_index + 1}: "
                + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in VARIANTS),
                file=sys.stderr,
                flush=True,
            )
        stopped = outputs["library"]
        pad = tokenizer.pad_token_id
        lengths = [len(row) - next((i for i, t in enumerate(reversed(row)) if t != pad), len(row)) for row in stopped]
        identical = all(
            outputs[name][row][: lengths[row]] == stopped[row][: lengths[row]]
            for name in VARIANTS
            for row in range(len(stopped))
        )
        answer_tokens = sum(lengths)
        cases.append(
            {
                "model": size,
                "parameters": sum(p.numel() for p in model.parameters()),
                "case": case,
                "stop_strings": stops,
                "rows": len(stopped),
                "answer_tokens": answer_tokens,
                "row_lengths": lengths,
                "times_s": times,
                "identical": identical,
                "tokens_per_s": {name: answer_tokens / statistics.median(times[name]) for name in VARIANTS},
                "speedup_vs_naive": [n / lib for n, lib in zip(times["naive"], times["library"])],
                "speedup_vs_previous": [p / lib for p, lib in zip(times["previous"], times["library"])],
            }
        )
    return cases


def run(mode: str = "full", sizes: list[str] | None = None, rounds: int | None = None) -> dict[str, Any]:
    """The models of ``mode``'s plan (``tiny``: the tiny model, one round, 16 tokens: for tests), or ``sizes``."""
    planned, planned_rounds, new_tokens = PLAN["tiny" if mode == "tiny" else "full"]
    sizes, rounds = sizes or list(planned), rounds or planned_rounds
    return {
        "max_new_tokens": new_tokens,
        "batch": BATCH,
        "rounds": rounds,
        "cases": [case for size in sizes for case in measure(size, rounds, new_tokens)],
    }


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """Rows for the suite's table: item, case, library, baseline, ratio, check."""
    rows = []
    for case in result.get("cases", []):
        label = (
            f"{case['model']} ({case['parameters'] / 1e6:.2g}M), {case['case']}, {case['rows']} rows, "
            f"{case['answer_tokens']} answer tok"
        )
        tps = case["tokens_per_s"]
        rows.append(
            [
                "generation tok/s",
                label,
                f"{tps['library']:.0f} tok/s",
                f"naive {tps['naive']:.0f}, previous {tps['previous']:.0f} tok/s",
                "× naive "
                + ", ".join(f"{r:.2f}" for r in case["speedup_vs_naive"])
                + "; × previous "
                + ", ".join(f"{r:.2f}" for r in case["speedup_vs_previous"]),
                "tokens identical" if case["identical"] else "TOKENS DIFFER",
            ]
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | case | answer tokens (rows' lengths) | naive tok/s | previous tok/s | library tok/s | "
        "library speed-up × naive, per round | × previous, per round | tokens |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    for case in result["cases"]:
        tps = case["tokens_per_s"]
        lengths = ", ".join(map(str, case["row_lengths"]))
        lines.append(
            f"| {case['model']} ({case['parameters'] / 1e6:.2g}M) | {case['case']} | "
            f"{case['answer_tokens']} ({lengths}) | {tps['naive']:.0f} | {tps['previous']:.0f} | "
            f"{tps['library']:.0f} | "
            + ", ".join(f"{r:.2f}" for r in case["speedup_vs_naive"])
            + " | "
            + ", ".join(f"{r:.2f}" for r in case["speedup_vs_previous"])
            + " | "
            + ("identical" if case["identical"] else "DIFFER")
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model, one round, 16 tokens (seconds)")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 1 with --tiny)")
    args = parser.parse_args(argv)
    sizes = args.models.split(",") if args.models else None
    result = run("tiny" if args.tiny else "full", sizes, args.rounds)
    for case in result["cases"]:
        print(
            f"{case['model']} {case['case']}: stop strings {case['stop_strings']!r}; seconds per round "
            + "; ".join(f"{name} " + ", ".join(f"{t:.2f}" for t in case["times_s"][name]) for name in VARIANTS)
        )
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
