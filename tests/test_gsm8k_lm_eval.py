"""The lm-eval protocols against lm-evaluation-harness itself: its task YAMLs run on local files render the same
prompts (token for token), stop at the same strings, and its filters and exact_match read canned generations as
ours do."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_delta.datamodules import GSM8KDataModule, GSM8KEvaluator
from lightning_delta.datamodules import gsm8k_protocols as protocols
from tests.support.datamodule_fixtures import GSM8K_ROWS, GSM8K_TRAIN_POOL, write_gsm8k_repository, write_parquet
from tests.support.tiny_models import make_tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval (lm-evaluation-harness) is a test dependency")

TASK_FILES = {"lm-eval": "gsm8k.yaml", "lm-eval-cot-llama": "gsm8k-cot-llama.yaml"}

# Realistic model outputs: the two the issue names, then strict/flexible disagreements, amounts, signs, no number.
CANNED = [
    ("The answer is 12 (3 x 4).", "#### 12"),
    ("The final answer is 42. In total it took 2 steps.", "#### 42"),
    ("48/2 = 24 clips in May.\n#### 24", "#### 24"),
    ("She has 3 + 4 = 7 apples.\n#### 7\n\nShe is happy.", "#### 7"),
    ("It costs $1,300.", "#### 1,300"),
    ("The total is 1,300 dollars.\n#### 1,300", "#### 1,300"),
    ("It fell to -5 degrees.", "#### -5"),
    ("Half of 5 is 2.5.", "#### 2.5"),
    ("So the answer is 18.00", "#### 18"),
    ("I do not know.", "#### 3"),
    ("#### $20", "#### 20"),
    ("Step 1: 2 + 2 = 4. Step 2: 4 * 3 = 12. The final answer is 12", "#### 12"),
    ("The final answer is $1,250.", "#### 1,250"),
    ("There are 6 trees. 21 - 15 = 6. The final answer is 6\n\nQ: next", "#### 6"),
    ("The answer: 9 toys, 2 from mom.", "#### 9"),
    ("10 - 8 = 2.\n#### 2.", "#### 2"),
    ("He has 5 apples and 3 pears, so 8 fruits.", "#### 8"),
]


def lm_eval_task(protocol: str, repository: Path, num_fewshot: int | None = None):
    """lm-eval's task built from its installed YAML, reading the local parquet files of ``repository/main``."""
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask

    config = yaml.safe_load((Path(lm_eval.tasks.__file__).parent / "gsm8k" / TASK_FILES[protocol]).read_text())
    files = {split: str(repository / "main" / f"{split}-00000-of-00001.parquet") for split in ("train", "test")}
    config.update(dataset_path="parquet", dataset_name=None, dataset_kwargs={"data_files": files})
    if num_fewshot is not None:
        config["num_fewshot"] = num_fewshot
    return ConfigurableTask(config=config)


def lm_eval_contexts(task, tokenizer=None, system_prompt=None) -> list[str]:
    """The contexts lm-eval builds with its default few-shot seed; through the chat template, as
    ``--apply_chat_template --fewshot_as_multiturn`` renders them (HFLM.apply_chat_template)."""
    task.set_fewshot_seed(1234)
    chat = None
    if tokenizer is not None:

        def chat(history, add_generation_prompt=True):
            return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt)

    task.build_all_requests(
        apply_chat_template=chat is not None,
        fewshot_as_multiturn=chat is not None,
        chat_template=chat,
        system_instruction=system_prompt,
    )
    return [instance.args[0] for instance in task.instances]


def hflm_tokens(tokenizer, context: str) -> list[int]:
    """Token ids as lm-eval's HFLM encodes a generation context: no special tokens where it starts with bos."""
    starts_with_bos = bool(tokenizer.bos_token) and context.startswith(tokenizer.bos_token)
    return tokenizer(context, add_special_tokens=False if starts_with_bos else True)["input_ids"]


def our_prompts(dm) -> list[list[int]]:
    dm.setup()
    return [example["prompt_ids"] for example in dm.examples]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def test_lm_eval_prompts_equal_lm_eval_gsm8k_token_for_token(tokenizer, tmp_path):
    repository = write_gsm8k_repository(tmp_path / "gsm8k")
    task = lm_eval_task("lm-eval", repository)
    contexts = lm_eval_contexts(task)
    assert task.config.num_fewshot == 5 and len(contexts) == len(GSM8K_ROWS)
    dm = GSM8KDataModule(tokenizer, data=str(repository), protocol="lm-eval", max_length=2048)  # 5 shots by default
    assert our_prompts(dm) == [hflm_tokens(tokenizer, context) for context in contexts]
    # each question gets its own draw of shots (lm-eval's sampler is one generator for the whole test split)
    assert len({tuple(ids) for ids in our_prompts(dm)}) == len(GSM8K_ROWS)
    assert all(context.count("\n\nQuestion: ") == 5 for context in contexts)
    until = task.instances[0].args[1]["until"]
    assert GSM8KEvaluator(tokenizer, protocol="lm-eval").stop_strings == tuple(until)


def test_lm_eval_prompts_with_a_limit_keep_lm_eval_draws(tokenizer, tmp_path):
    repository = write_gsm8k_repository(tmp_path / "gsm8k")
    contexts = lm_eval_contexts(lm_eval_task("lm-eval", repository))
    dm = GSM8KDataModule(tokenizer, data=str(repository), protocol="lm-eval", max_length=2048, limit=3)
    assert our_prompts(dm) == [hflm_tokens(tokenizer, context) for context in contexts[:3]]


@pytest.mark.parametrize("system_prompt", [None, "Solve the problem."])
def test_cot_llama_prompts_equal_lm_eval_chat_multiturn_token_for_token(tokenizer, tmp_path, system_prompt):
    repository = write_gsm8k_repository(tmp_path / "gsm8k")
    task = lm_eval_task("lm-eval-cot-llama", repository)
    contexts = lm_eval_contexts(task, tokenizer, system_prompt)
    assert task.config.num_fewshot == 8
    dm = GSM8KDataModule(
        tokenizer, data=str(repository), protocol="lm-eval-cot-llama", max_length=4096, system_prompt=system_prompt
    )
    assert our_prompts(dm) == [hflm_tokens(tokenizer, context) for context in contexts]
    until = task.instances[0].args[1]["until"]
    assert GSM8KEvaluator(tokenizer, protocol="lm-eval-cot-llama").stop_strings == tuple(until)


def canned_task(protocol: str, tmp_path: Path):
    """lm-eval's task over a test split whose references are CANNED's, each answered by CANNED's text."""
    repository = tmp_path / "canned"
    rows = [{"question": f"Question number {i}?", "answer": reference} for i, (_, reference) in enumerate(CANNED)]
    write_parquet(repository / "main" / "test-00000-of-00001.parquet", rows)
    write_parquet(repository / "main" / "train-00000-of-00001.parquet", GSM8K_TRAIN_POOL)
    task = lm_eval_task(protocol, repository, num_fewshot=0)
    task.build_all_requests()
    for instance, (text, _) in zip(task.instances, CANNED):
        instance.resps.append(text)
    task.apply_filters()
    return task


@pytest.mark.parametrize("protocol", ["lm-eval", "lm-eval-cot-llama"])
def test_filters_and_exact_match_equal_lm_eval_on_canned_generations(protocol, tmp_path):
    task = canned_task(protocol, tmp_path)
    texts, references = [text for text, _ in CANNED], [reference for _, reference in CANNED]
    expected_counts = dict.fromkeys(protocols.FILTERS[protocol], 0)
    for instance, text in zip(task.instances, texts):
        ours = protocols.filter_answers(protocol, text)
        for name in protocols.FILTERS[protocol]:
            assert ours[name] == instance.filtered_resps[name], (name, text)
            result = task.process_results(instance.doc, [instance.filtered_resps[name]])
            expected_counts[name] += result["exact_match"]
    counts = GSM8KEvaluator("unused", protocol=protocol).count_filter_matches(texts, references)
    assert {name: float(correct) for name, (correct, _) in counts.items()} == expected_counts
    assert all(float(total) == len(CANNED) for _, total in counts.values())
    assert expected_counts["strict-match"] != expected_counts["flexible-extract"]  # the two readings differ here
