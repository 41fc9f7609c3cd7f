"""GSM8KDataModule: tokens and masks, few-shot, truncation, errors, answer extraction, accuracy and the Riemann term."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch

from lightning_delta.callbacks import RiemannCallback
from lightning_delta.datamodules import GSM8KDataModule, GSM8KEvaluator
from lightning_delta.datamodules.gsm8k import AnswerLineEnded
from lightning_delta.datamodules.gsm8k_answers import extract_final_number
from lightning_delta.losses import CausalLMLoss
from lightning_delta.module import DeltaEditModule
from tests.support.datamodule_fixtures import (
    GSM8K_ROWS,
    GSM8K_TRAIN_ROWS,
    write_gsm8k,
    write_jsonl,
    write_parquet,
)
from tests.support.riemann_support import brute_force, random_edits, weights_at
from tests.support.tiny_models import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat(question: str) -> str:  # the tiny chat template, written out by hand
    return f"<|user|>\n{question}</s>\n<|assistant|>\n"


def check_example(batch: dict, row: int, prompt_ids: list[int], answer_ids: list[int]) -> None:
    """Token by token: prompt then answer, labels -100 on the prompt and the padding, attention on the tokens."""
    length = len(prompt_ids) + len(answer_ids)
    assert batch["input_ids"][row, :length].tolist() == prompt_ids + answer_ids
    assert batch["labels"][row, : len(prompt_ids)].tolist() == [-100] * len(prompt_ids)
    assert batch["labels"][row, len(prompt_ids) : length].tolist() == answer_ids
    assert (batch["labels"][row, length:] == -100).all() and (batch["input_ids"][row, length:] == 0).all()
    assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
    prompt = batch["prompt_input_ids"][row]  # left-padded for generation
    assert prompt[prompt.shape[0] - len(prompt_ids) :].tolist() == prompt_ids
    assert batch["prompt_attention_mask"][row].sum() == len(prompt_ids)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_tokens_and_masks_token_by_token(tokenizer, tmp_path, fmt):
    main = write_gsm8k(tmp_path, fmt)
    data = str(main / "test.jsonl") if fmt == "jsonl" else str(main)  # one file, or the hub's folder layout
    dm = GSM8KDataModule(tokenizer, data=data, batch_size=3)
    batch = next(iter(dm.val_dataloader()))
    assert len(dm.val_dataloader().dataset) == len(GSM8K_ROWS)
    for row in range(3):
        question, answer = GSM8K_ROWS[row]["question"], GSM8K_ROWS[row]["answer"]
        check_example(batch, row, ids(tokenizer, chat(question)), ids(tokenizer, answer + "</s>\n"))
        answer_positions = batch["labels"][row] != -100
        assert tokenizer.decode(batch["input_ids"][row][answer_positions]) == answer + "</s>\n"
    assert batch["answers"] == [r["answer"] for r in GSM8K_ROWS[:3]]


def test_few_shot_turns_come_from_the_train_split(tokenizer, tmp_path):
    main = write_gsm8k(tmp_path)
    dm = GSM8KDataModule(tokenizer, data=str(main), few_shot=2, system_prompt="Solve.", batch_size=1)
    batch = next(iter(dm.val_dataloader()))
    shots = "".join(f"<|user|>\n{r['question']}</s>\n<|assistant|>\n{r['answer']}</s>\n" for r in GSM8K_TRAIN_ROWS)
    prompt = "<|system|>\nSolve.</s>\n" + shots + chat(GSM8K_ROWS[0]["question"])
    check_example(batch, 0, ids(tokenizer, prompt), ids(tokenizer, GSM8K_ROWS[0]["answer"] + "</s>\n"))


def shot_and_question_tokens(tokenizer, batch: dict, row: int) -> tuple[list[int], list[int]]:
    """The prompt tokens of ``row`` split into (the few-shot turns, the evaluated question's turn)."""
    prompt = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()].tolist()
    turn = ids(tokenizer, "<|user|>\n")
    starts = [i for i in range(len(prompt)) if prompt[i : i + len(turn)] == turn]
    return prompt[: starts[-1]], prompt[starts[-1] :]


def contains(tokens: list[int], part: list[int]) -> bool:
    return any(tokens[i : i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


def test_few_shot_from_a_directory_takes_train_questions_never_the_evaluated_one(tokenizer, tmp_path):
    main = write_gsm8k(tmp_path)
    dm = GSM8KDataModule(tokenizer, data=str(main), few_shot=2, batch_size=5)
    batch = next(iter(dm.val_dataloader()))
    for row, evaluated in enumerate(GSM8K_ROWS):
        shots, question = shot_and_question_tokens(tokenizer, batch, row)
        assert question == ids(tokenizer, chat(evaluated["question"]))
        assert all(contains(shots, ids(tokenizer, r["question"])) for r in GSM8K_TRAIN_ROWS)
        assert not any(contains(shots, ids(tokenizer, r["question"])) for r in GSM8K_ROWS)


def test_few_shot_with_one_file_needs_few_shot_data(tokenizer, tmp_path):
    main = write_gsm8k(tmp_path)
    one_file = GSM8KDataModule(tokenizer, data=str(main / "test.jsonl"), few_shot=2)
    with pytest.raises(ValueError, match=r"`few_shot=2` .* `data` '.*test.jsonl' is one file .* `few_shot_data=`"):
        one_file.setup()
    assert one_file.examples is None
    # the default few_shot=0 needs no shots: one file is fine
    assert len(GSM8KDataModule(tokenizer, data=str(main / "test.jsonl")).val_dataloader().dataset) == len(GSM8K_ROWS)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_few_shot_data_a_train_file_gives_its_first_rows_as_shots(tokenizer, tmp_path, fmt):
    main = write_gsm8k(tmp_path, fmt)
    test_file, train_file = sorted(main.glob(f"test*.{fmt}"))[0], sorted(main.glob(f"train*.{fmt}"))[0]
    dm = GSM8KDataModule(tokenizer, data=str(test_file), few_shot=1, few_shot_data=str(train_file), batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    first = GSM8K_TRAIN_ROWS[0]
    for row in range(2):
        prompt = f"<|user|>\n{first['question']}</s>\n<|assistant|>\n{first['answer']}</s>\n" + chat(
            GSM8K_ROWS[row]["question"]
        )
        check_example(batch, row, ids(tokenizer, prompt), ids(tokenizer, GSM8K_ROWS[row]["answer"] + "</s>\n"))


def test_few_shot_from_the_evaluated_source_is_refused(tokenizer, tmp_path):
    main = write_gsm8k(tmp_path)
    test_file = str(main / "test.jsonl")
    same = "would come from the evaluated examples .* both read .*test.jsonl"
    with pytest.raises(ValueError, match=same):  # the same file, whatever few_shot_split says
        GSM8KDataModule(tokenizer, data=test_file, few_shot=1, few_shot_data=test_file).setup()
    with pytest.raises(ValueError, match=same):  # the same file, spelt differently
        GSM8KDataModule(
            tokenizer,
            data=test_file,
            few_shot=1,
            few_shot_data=str(main / ".." / "main" / "test.jsonl"),
            few_shot_split="test",
        ).setup()
    with pytest.raises(ValueError, match=same):  # the evaluated split of a directory
        GSM8KDataModule(tokenizer, data=str(main), few_shot=1, few_shot_split="test").setup()
    with pytest.raises(ValueError, match=same):  # the directory's test file, as few_shot_data
        GSM8KDataModule(tokenizer, data=str(main), few_shot=1, few_shot_data=test_file).setup()
    with pytest.raises(ValueError, match="would come from the evaluated split 'test' of 'openai/gsm8k'"):
        GSM8KDataModule(tokenizer, few_shot=1, few_shot_split="test").setup()  # refused before any download


def test_few_shot_question_among_the_evaluated_ones_is_refused(tokenizer, tmp_path):
    main = write_gsm8k(tmp_path)
    leaky = write_jsonl(
        tmp_path / "leaky" / "train.jsonl", [GSM8K_TRAIN_ROWS[0], {**GSM8K_ROWS[3], "answer": "#### 2.5"}]
    )
    dm = GSM8KDataModule(tokenizer, data=str(main / "test.jsonl"), few_shot=2, few_shot_data=str(leaky))
    with pytest.raises(
        ValueError,
        match=r"evaluated GSM8K row 3 .*test.jsonl has the same question as the few-shot "
        r"row 1 .*leaky.train.jsonl \('Half of 5 is what\?'\)",
    ):
        dm.setup()
    # one shot, the first row, does not reach the leaking second one
    dm = GSM8KDataModule(tokenizer, data=str(main / "test.jsonl"), few_shot=1, few_shot_data=str(leaky))
    assert len(dm.val_dataloader().dataset) == len(GSM8K_ROWS)


def test_few_shot_from_a_directory_without_train_split(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "only_test" / "test.jsonl", GSM8K_ROWS).parent
    with pytest.raises(
        FileNotFoundError,
        match=r"No GSM8K few-shot file for split 'train' in .*only_test.* "
        r"The 2 few-shot examples come from split 'train' .*`few_shot_data=`",
    ):
        GSM8KDataModule(tokenizer, data=str(data), few_shot=2).setup()
    with pytest.raises(ValueError, match="`few_shot=3` but split 'train' of .* has 2 examples"):
        GSM8KDataModule(tokenizer, data=str(write_gsm8k(tmp_path)), few_shot=3).setup()


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"question": "Q?", "solution": "#### 1"},
            r"lacks the field 'answer': each row needs the fields 'question' "
            r"and 'answer'; this row has 'question', 'solution'",
        ),
        ({"answer": "#### 1"}, r"lacks the field 'question': .* this row has 'answer'\."),
        (
            {"problem": "Q?", "solution": "#### 1"},
            r"lacks the fields 'question' and 'answer': .* 'problem', 'solution'",
        ),
        ({"question": "Q?", "answer": None}, r"lacks the field 'answer': .* this row has 'question'\."),
        ({"question": "Q?", "answer": 7}, r": the field 'answer' is a int \('7'\), expected a str"),
    ],
)
def test_rows_without_question_or_answer_name_file_row_and_fields(tokenizer, tmp_path, bad, message):
    path = write_jsonl(tmp_path / "test.jsonl", [GSM8K_ROWS[0], GSM8K_ROWS[1], bad])
    with pytest.raises(
        ValueError, match=rf"GSM8K row 2 \(counting from 0\) of .*{tmp_path.name}.test\.jsonl.*{message}"
    ):
        GSM8KDataModule(tokenizer, data=str(path)).setup()
    # limit stops before the bad row: the first two rows are fine
    assert len(GSM8KDataModule(tokenizer, data=str(path), limit=2).val_dataloader().dataset) == 2


def test_bad_rows_in_sharded_parquet_and_in_the_shots_name_their_own_file(tokenizer, tmp_path):
    main = tmp_path / "main"
    write_parquet(main / "test-00000-of-00002.parquet", GSM8K_ROWS[:2])
    write_parquet(main / "test-00001-of-00002.parquet", [GSM8K_ROWS[2], {"question": "Q?", "answer": None}])
    write_jsonl(main / "train.jsonl", GSM8K_TRAIN_ROWS)
    with pytest.raises(
        ValueError,
        match=r"GSM8K row 1 \(counting from 0\) of .*test-00001-of-00002.parquet lacks "
        r"the field 'answer'",
    ):
        GSM8KDataModule(tokenizer, data=str(main)).setup()
    assert len(GSM8KDataModule(tokenizer, data=str(main), limit=3).val_dataloader().dataset) == 3  # across shards
    write_jsonl(main / "train.jsonl", [{"q": "What is 3 + 4?", "a": "#### 7"}])
    with pytest.raises(
        ValueError,
        match=r"GSM8K few-shot row 0 \(counting from 0\) of .*train.jsonl lacks the fields "
        r"'question' and 'answer': .* this row has 'q', 'a'",
    ):
        GSM8KDataModule(tokenizer, data=str(main), few_shot=1, limit=2).setup()


def test_tokenizer_without_chat_template_or_pad_token(tmp_path):
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = None
    main = write_gsm8k(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        GSM8KDataModule(tokenizer, data=str(main), chat_template=True).setup()
    tokenizer.pad_token = None
    dm = GSM8KDataModule(tokenizer, data=str(main), batch_size=2)
    with pytest.warns(UserWarning) as records:
        batch = next(iter(dm.val_dataloader()))
    messages = " ".join(str(r.message) for r in records)
    assert "no pad token" in messages and "no chat template" in messages
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    question, answer = GSM8K_ROWS[0]["question"], GSM8K_ROWS[0]["answer"]
    check_example_plain = ids(tokenizer, f"Question: {question}\nAnswer:"), ids(tokenizer, f" {answer}</s>")
    length = sum(map(len, check_example_plain))
    assert batch["input_ids"][0, :length].tolist() == check_example_plain[0] + check_example_plain[1]
    assert batch["labels"][0, len(check_example_plain[0]) : length].tolist() == check_example_plain[1]


def test_long_examples_lose_prompt_tokens_from_the_left_with_one_counted_warning(tokenizer, tmp_path):
    main = write_gsm8k(tmp_path)
    lengths = [
        (len(ids(tokenizer, chat(r["question"]))), len(ids(tokenizer, r["answer"] + "</s>\n"))) for r in GSM8K_ROWS
    ]
    max_length = sorted(p + a for p, a in lengths)[2]  # the two longest examples do not fit
    assert max_length > max(a for _, a in lengths)
    dm = GSM8KDataModule(tokenizer, data=str(main), max_length=max_length, batch_size=5)
    with pytest.warns(UserWarning, match=f"2 of 5 GSM8K examples are longer than max_length={max_length}"):
        dm.setup()
    batch = next(iter(dm.val_dataloader()))
    for row, (p, a) in enumerate(lengths):
        prompt = ids(tokenizer, chat(GSM8K_ROWS[row]["question"]))
        kept = prompt[max(0, p + a - max_length) :]
        check_example(batch, row, kept, ids(tokenizer, GSM8K_ROWS[row]["answer"] + "</s>\n"))
    assert batch["input_ids"].shape[1] == max_length
    with pytest.raises(ValueError, match="answer alone has .* tokens"):
        GSM8KDataModule(tokenizer, data=str(main), max_length=min(a for _, a in lengths)).setup()


def test_missing_and_empty_data(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GSM8KDataModule(tokenizer, data=str(tmp_path / "nope.jsonl")).setup()
    with pytest.raises(FileNotFoundError, match="No GSM8K file for split 'test'"):
        GSM8KDataModule(tokenizer, data=str(tmp_path)).setup()
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty" / "test-00000-of-00001.parquet"
    empty.parent.mkdir()
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), str(empty))
    with pytest.raises(ValueError, match="split 'test' has no examples"):
        GSM8KDataModule(tokenizer, data=str(empty.parent)).setup()
    with pytest.raises(ValueError, match="has no examples"):
        GSM8KDataModule(tokenizer, data=str(write_jsonl(tmp_path / "test.jsonl", []))).setup()
    with pytest.raises(ValueError, match="few_shot"):
        GSM8KDataModule(tokenizer, few_shot=-1)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("The total is 1,000 + 250 = <<1000+250=1250>>1,250 dollars.\n#### 1,250", "1250"),
        ("It fell to 3 - 8 = <<3-8=-5>>-5 degrees.\n#### -5", "-5"),
        ("Each costs 7 / 2 = <<7/2=3.5>>3.5 dollars.\n#### 3.50", "3.5"),
        ("#### $1,234,567.00", "1234567"),
        ("So she has 12 apples, and then 5 more, which makes 17 apples in total.", "17"),  # no ####: last number
        ("The answer is −0.25.", "-0.25"),
        ("The answer is .5", "0.5"),
        ("I do not know.", None),
        ("#### 4 and some trailing 9", "4"),
    ],
)
def test_final_number_extraction(text, expected):
    assert extract_final_number(text) == expected


def test_exact_match_counts():
    correct, total = GSM8KEvaluator.count_matches(
        ["#### 7", "so 1,300 in total", "-5.0", "nothing"], [r["answer"] for r in GSM8K_ROWS[:4]]
    )
    assert float(correct) == 3 and float(total) == 4
    assert correct.dtype == total.dtype == torch.float64
    with pytest.raises(ValueError, match="Got 1 generated texts for 2 reference answers"):
        GSM8KEvaluator.count_matches(["#### 7"], ["#### 7", "#### 8"])


def greedy(model, prompt_ids: list[int], steps: int) -> list[int]:
    """Plain greedy decoding of one unpadded prompt (argmax of the full forward at every step)."""
    sequence = list(prompt_ids)
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([sequence])).logits[0, -1]
        token = int(logits.argmax())
        sequence.append(token)
        if token == 2:
            break
    return sequence[len(prompt_ids) :]


def test_generation_evaluator_against_plain_greedy_decoding(tokenizer, tmp_path):
    model = make_tiny_model("llama", dtype=torch.float64)
    dm = GSM8KDataModule(tokenizer, data=str(write_gsm8k(tmp_path)), batch_size=3)
    batch = next(iter(dm.val_dataloader()))
    evaluator = dm.evaluator(max_new_tokens=6)
    texts = evaluator.generate(model, batch)
    for row, text in enumerate(texts):
        prompt = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()].tolist()
        assert text == tokenizer.decode(greedy(model, prompt, 6), skip_special_tokens=True)
    # make the first reference agree with what the model says, the others not
    numbers = [extract_final_number(text) for text in texts]
    batch["answers"] = [f"#### {numbers[0] or 'x'}", "#### 123456789", "#### 987654321"]
    correct, total = evaluator(model, batch)
    assert (float(correct), float(total)) == (1.0 if numbers[0] is not None else 0.0, 3.0)


def unpadded_prompts(batch: dict) -> list[list[int]]:
    return [row[mask.bool()].tolist() for row, mask in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]


def first_prefix(tokenizer, tokens: list[int], ended) -> list[int]:
    """The shortest prefix of ``tokens`` whose decoded text satisfies ``ended`` (all of them if none does)."""
    for length in range(1, len(tokens) + 1):
        if ended(tokenizer.decode(tokens[:length], skip_special_tokens=True)):
            return tokens[:length]
    return tokens


def ordinary_pair(tokenizer, tokens: list[int], start: int) -> list[int]:
    """The first two consecutive tokens from ``start`` on that are not special tokens."""
    special = set(tokenizer.all_special_ids)
    return next(tokens[i : i + 2] for i in range(start, len(tokens) - 1) if not special & set(tokens[i : i + 2]))


def generation_batch(tokenizer, tmp_path, dtype):
    model = make_tiny_model("llama", dtype=dtype, max_position_embeddings=256)
    dm = GSM8KDataModule(tokenizer, data=str(write_gsm8k(tmp_path)), batch_size=5)
    batch = next(iter(dm.val_dataloader()))
    assert len(set(batch["prompt_attention_mask"].sum(1).tolist())) > 1  # left padding is exercised
    return model, batch


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_generation_equals_unpadded_greedy_token_for_token(tokenizer, tmp_path, dtype):
    """Left-padded, KV-cached batch generation against a full forward per step on each unpadded prompt."""
    model, batch = generation_batch(tokenizer, tmp_path, dtype)
    generated = GSM8KEvaluator(tokenizer, max_new_tokens=40).generate_ids(model, batch)
    for row, prompt in enumerate(unpadded_prompts(batch)):
        expected = greedy(model, prompt, 40)
        assert generated[row, : len(expected)].tolist() == expected
        assert (generated[row, len(expected) :] == tokenizer.pad_token_id).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_row_stops_at_its_first_stop_string_and_the_text_is_cut_there(tokenizer, tmp_path, dtype):
    model, batch = generation_batch(tokenizer, tmp_path, dtype)
    references = [greedy(model, prompt, 40) for prompt in unpadded_prompts(batch)]
    stop = tokenizer.decode(ordinary_pair(tokenizer, references[0], 6))  # a text the model writes, in some rows
    evaluator = GSM8KEvaluator(tokenizer, max_new_tokens=40, stop_strings=[stop])
    generated = evaluator.generate_ids(model, batch)
    texts = evaluator.generate(model, batch)
    lengths = []
    for row, reference in enumerate(references):
        expected = first_prefix(tokenizer, reference, lambda text: stop in text)
        lengths.append(len(expected))
        assert generated[row, : len(expected)].tolist() == expected
        assert (generated[row, len(expected) :] == tokenizer.pad_token_id).all()
        full = tokenizer.decode(reference, skip_special_tokens=True)
        assert texts[row] == (full[: full.index(stop)] if stop in full else full)
    assert min(lengths) < max(lengths) and generated.shape[1] == max(
        lengths
    )  # rows stop apart, the batch with the last
    assert sum(stop in tokenizer.decode(reference) for reference in references) >= 2


@pytest.mark.slow
def test_each_row_stops_at_the_end_of_its_answer_line(tokenizer, tmp_path, monkeypatch):
    """The answer-line rule through ``model.generate``, with the rule's pattern set to a text the model writes."""
    model, batch = generation_batch(tokenizer, tmp_path, torch.float64)
    references = [greedy(model, prompt, 40) for prompt in unpadded_prompts(batch)]
    marker = tokenizer.decode(ordinary_pair(tokenizer, references[1], 9))
    monkeypatch.setattr("lightning_delta.datamodules.gsm8k.ANSWER_LINE", re.compile(re.escape(marker)))
    evaluator = GSM8KEvaluator(tokenizer, max_new_tokens=40)
    generated = evaluator.generate_ids(model, batch)
    texts = evaluator.generate(model, batch)
    for row, reference in enumerate(references):
        expected = first_prefix(tokenizer, reference, lambda text: marker in text)
        assert generated[row, : len(expected)].tolist() == expected
        full = tokenizer.decode(reference, skip_special_tokens=True)
        assert texts[row] == (full[: full.index(marker) + len(marker) - 1] if marker in full else full)


def test_answer_line_criterion_fires_at_the_line_break_after_the_final_number(tokenizer):
    answers = [
        "She sold 48/2 = 24 clips.\n#### 72\n\nQuestion: What",
        "so 7 + 1 = 8 and\n####\n 8 then\nmore",
        "no final line\nat all",
    ]
    rows = [ids(tokenizer, text) for text in answers]
    width = max(map(len, rows))
    rows = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]

    def ended(text: str) -> bool:  # written apart from the pattern: "####", a digit on its line, a line break
        if "####" not in text:
            return False
        line, _, rest = text.split("####", 1)[1].partition("\n")
        return any(c.isdigit() for c in line) and _ == "\n"

    prompt = [[5, 6, 7]] * 3  # prompt tokens are never read
    criterion = AnswerLineEnded(GSM8KEvaluator(tokenizer).token_texts, prompt_length=3)
    fired = [None] * 3
    for step in range(1, width + 1):
        input_ids = torch.tensor([p + row[:step] for p, row in zip(prompt, rows)])
        for row, done in enumerate(criterion(input_ids, None).tolist()):
            if done and fired[row] is None:
                fired[row] = step
    expected = [len(first_prefix(tokenizer, row, ended)) for row in rows]
    assert fired[0] == expected[0] and tokenizer.decode(rows[0][: fired[0]]).endswith("#### 72\n")
    assert fired[1] is None and fired[2] is None  # a "####" line without a number, and no "####" line
    assert expected[1] == expected[2] == width


def test_answer_text_cuts_at_the_first_end():
    evaluator = GSM8KEvaluator("unused", stop_strings=["\n\nQuestion:", "STOP"])
    assert evaluator.answer_text("3 + 4 = 7\n#### 7\n#### 9") == "3 + 4 = 7\n#### 7"
    assert evaluator.answer_text("7 apples\n\nQuestion: x #### 5\n") == "7 apples"
    assert evaluator.answer_text("#### 7 STOP\n") == "#### 7 "
    assert evaluator.answer_text("#### no number\n7") == "#### no number\n7"
    assert GSM8KEvaluator("unused").stop_strings == ("\n\nQuestion:",)


@pytest.mark.parametrize("bad", ["\n\nQuestion:", [""], [3]])
def test_stop_strings_must_be_a_list_of_texts(bad):
    with pytest.raises(ValueError, match="`stop_strings` must be a list of non-empty strings"):
        GSM8KEvaluator("unused", stop_strings=bad)


@pytest.mark.slow
def test_riemann_term_through_the_datamodule_equals_brute_force(tokenizer, tmp_path):
    model = make_tiny_model("llama", dtype=torch.float64)
    edits = random_edits(model, scale=0.05)
    dm = GSM8KDataModule(tokenizer, data=str(write_gsm8k(tmp_path)), batch_size=2)
    reference = brute_force(model, edits, CausalLMLoss(), dm.val_dataloader(), num_points=4)

    module = DeltaEditModule(model, pretrained=None, edit=edits, evaluator=GSM8KEvaluator(tokenizer, max_new_tokens=3))
    callback = RiemannCallback(num_points=4, filename=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=dm, verbose=False)
    result = callback.result
    for name in reference["names"]:
        assert result.term_per_tensor[name] == pytest.approx(reference["term_per_tensor"][name], rel=1e-6, abs=1e-12)
    assert result.term == pytest.approx(float(reference["inner"].sum(dim=1)[:-1].mean()), rel=1e-6)
    assert result.losses == pytest.approx(reference["losses"].tolist(), rel=1e-10)
    answer_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in dm.val_dataloader())
    assert result.count == answer_tokens
    evaluator = GSM8KEvaluator(tokenizer, max_new_tokens=3)
    for key, t in (("accuracy/post", 0.0), ("accuracy/edit", 1.0)):  # reported beside the Riemann figures
        point = weights_at(make_tiny_model("llama", dtype=torch.float64), edits, t)  # the model itself is parametrized
        counts = [evaluator(point, batch) for batch in dm.val_dataloader()]
        expected = sum(float(c) for c, _ in counts) / sum(float(n) for _, n in counts)
        assert float(trainer.callback_metrics[key]) == pytest.approx(expected)
        assert getattr(result, key.replace("/", "_")) == pytest.approx(expected)  # and in the result record


def test_unrepeated_sampler_under_several_processes(tokenizer, tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(7)]
    dm = GSM8KDataModule(tokenizer, data=str(write_jsonl(tmp_path / "test.jsonl", rows)), batch_size=2)
    seen = []
    for rank in range(2):
        dm.trainer = type("FakeTrainer", (), {"world_size": 2, "global_rank": rank})()
        loader = dm.val_dataloader()
        from torch.utils.data import DistributedSampler

        assert isinstance(loader.sampler, DistributedSampler)  # Lightning keeps it in place
        seen += [answer for batch in loader for answer in batch["answers"]]
    assert sorted(seen) == sorted(r["answer"] for r in rows)  # every example once, none repeated


def test_constructor_from_yaml(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(GSM8KDataModule, "data")
    config = parser.parse_string(
        f"data:\n  tokenizer: {tmp_path}/tok\n  data: {tmp_path}/main\n  few_shot: 2\n  max_length: 512\n  limit: 3\n"
    )
    dm = GSM8KDataModule(**config.data.as_dict())
    assert (dm.few_shot, dm.max_length, dm.limit, dm.data) == (2, 512, 3, f"{tmp_path}/main")
    make_tiny_tokenizer(tmp_path / "tok")
    write_gsm8k(tmp_path)
    assert len(dm.val_dataloader().dataset) == 3


@pytest.mark.slow
def test_a_model_sharded_by_fsdp2_generates_in_step_with_the_other_processes(tokenizer, tmp_path, monkeypatch):
    """Under FSDP2 every decoding step gathers weights on all processes, so generate runs with synced_gpus (each
    process steps until all have stopped); the tokens are those of the unsharded model (one gloo process here)."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_delta.sharded import shard_model

    model, batch = generation_batch(tokenizer, tmp_path, torch.float64)
    evaluator = GSM8KEvaluator(tokenizer, max_new_tokens=20)
    expected = evaluator.generate_ids(model, batch)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = shard_model(copy.deepcopy(model), init_device_mesh("cpu", (1,)))
        synced, generate = [], type(sharded).generate
        monkeypatch.setattr(
            type(sharded),
            "generate",
            lambda self, **kwargs: synced.append(kwargs["synced_gpus"]) or generate(self, **kwargs),
        )
        generated = evaluator.generate_ids(sharded, batch)
    finally:
        dist.destroy_process_group()
    assert synced == [True]
    assert torch.equal(generated, expected)


def test_default_extraction_takes_the_stated_answer_before_a_later_number():
    assert extract_final_number("The answer is 12 (3 x 4).") == "12"  # not 4
    assert extract_final_number("The final answer is 42. In total it took 2 steps.") == "42"  # not 2
    assert extract_final_number("The answer: 9 toys, 2 from mom.") == "9"
    assert extract_final_number("So the answer is 3, then 4 and finally the answer is 5. Done in 6.") == "5"
    assert extract_final_number("3 + 4 = 7") == "7"  # no stated answer: the last number, as before
    assert extract_final_number("The answer is 12.\n#### 13") == "13"  # `####` first, as before


def word_level_tokenizer():
    """A WordLevel tokenizer over the tiny models' 128 ids (``t004`` … ``t127`` after the special tokens), whose
    vocabulary transformers' stop-string search cannot read ("substring not found")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i:03d}" for i in range(4, 128)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_stop_strings_with_a_word_level_tokenizer_stop_each_row_at_its_first_one():
    """transformers' stop strings fail on a WordLevel tokenizer; the evaluator then searches them in the generated
    tokens' texts: each row stops at the token that writes the stop string, against plain greedy decoding."""
    tokenizer = word_level_tokenizer()
    model = make_tiny_model("llama", dtype=torch.float64)
    prompts = [[5, 9, 14, 30], [40, 41], [77, 12, 99]]
    references = [greedy(model, prompt, 12) for prompt in prompts]
    stop_token = next(token for token in references[0][2:] if token > 3)  # a word the model writes in row 0
    stop = tokenizer.convert_ids_to_tokens(stop_token)
    width = max(map(len, prompts))
    batch = {
        "prompt_input_ids": torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
        "prompt_attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
        "answers": ["#### 1"] * 3,
    }
    evaluator = GSM8KEvaluator(tokenizer, max_new_tokens=12, stop_strings=[stop])
    assert not evaluator.stop_strings_by_transformers
    generated = evaluator.generate_ids(model, batch)
    texts = evaluator.generate(model, batch)
    for row, reference in enumerate(references):
        expected = reference[: reference.index(stop_token) + 1] if stop_token in reference else reference
        assert generated[row, : len(expected)].tolist() == expected
        assert (generated[row, len(expected) :] == tokenizer.pad_token_id).all()
        full = tokenizer.decode(reference, skip_special_tokens=True)
        assert texts[row] == (full[: full.index(stop)] if stop in full else full)
    assert evaluator(model, batch)[1].item() == 3.0
