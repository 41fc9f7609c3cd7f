"""GSM8K and UltraFeedback data as users have it: a copy of the hub repository (two configs), the hub download cache
offline, and what is said when nothing is cached."""

from __future__ import annotations

import pytest

from lightning_delta.datamodules import GSM8KDataModule, UltraFeedbackDataModule
from tests.support.datamodule_fixtures import (
    GSM8K_ROWS,
    GSM8K_SOCRATIC_ROWS,
    ULTRAFEEDBACK_ROWS,
    write_gsm8k_repository,
    write_hub_cache_entry,
    write_ultrafeedback,
)
from tests.support.tiny_models import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def answers(dm) -> list[str]:
    dm.setup()
    return [example["answer"] for example in dm.examples]


def test_a_repository_copy_reads_one_config_never_both(tokenizer, tmp_path):
    repository = write_gsm8k_repository(tmp_path / "gsm8k")
    assert answers(GSM8KDataModule(tokenizer, data=str(repository))) == [r["answer"] for r in GSM8K_ROWS]
    socratic = GSM8KDataModule(tokenizer, data=str(repository), config="socratic")
    assert answers(socratic) == [r["answer"] for r in GSM8K_SOCRATIC_ROWS]
    # one config's folder given directly is that config
    assert answers(GSM8KDataModule(tokenizer, data=str(repository / "socratic"), config="socratic")) == [
        r["answer"] for r in GSM8K_SOCRATIC_ROWS
    ]


def test_unknown_config_and_a_folder_of_unnamed_configs_are_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"`config` must be 'main' or 'socratic'.*got 'Main'"):
        GSM8KDataModule(tokenizer, config="Main")
    repository = write_gsm8k_repository(tmp_path / "gsm8k")
    (repository / "main").rename(repository / "first")  # two config folders, neither named by `config`
    with pytest.raises(
        ValueError,
        match=r"holds GSM8K files of split 'test' in 2 folders \('first' and 'socratic'\)"
        r".*never mixed",
    ):
        GSM8KDataModule(tokenizer, data=str(repository)).setup()


@pytest.mark.parametrize("config", ["main", "socratic"])
def test_hub_id_offline_from_the_download_cache_equals_the_folder(tokenizer, tmp_path, offline_hub, config):
    repository = write_gsm8k_repository(tmp_path / "gsm8k")
    write_hub_cache_entry(offline_hub, "openai/gsm8k", repository)
    by_id = GSM8KDataModule(tokenizer, config=config, few_shot=2, batch_size=5)
    by_folder = GSM8KDataModule(tokenizer, data=str(repository), config=config, few_shot=2, batch_size=5)
    for name in ("input_ids", "labels", "prompt_input_ids"):
        assert (
            next(iter(by_id.val_dataloader()))[name].tolist() == next(iter(by_folder.val_dataloader()))[name].tolist()
        )
    expected = GSM8K_ROWS if config == "main" else GSM8K_SOCRATIC_ROWS
    assert answers(by_id) == [r["answer"] for r in expected]


def test_hub_id_offline_without_a_cached_copy_says_how_to_fetch_it(tokenizer, offline_hub):
    with pytest.raises(
        FileNotFoundError,
        match=r"'openai/gsm8k' \(revision 'main'\) is not in the hub download cache "
        r".*HF_HUB_OFFLINE=1.*`hf download openai/gsm8k --repo-type dataset`"
        r".*`huggingface-cli download openai/gsm8k --repo-type dataset`",
    ):
        GSM8KDataModule(tokenizer).setup()


def test_hub_snapshot_without_the_split_offline_names_what_is_missing(tokenizer, tmp_path, offline_hub):
    repository = write_gsm8k_repository(tmp_path / "gsm8k")
    for file in repository.glob("*/test-*"):
        file.unlink()
    write_hub_cache_entry(offline_hub, "openai/gsm8k", repository)
    with pytest.raises(FileNotFoundError, match=r"with split 'test' of config 'main' \(its snapshot .* lacks it\)"):
        GSM8KDataModule(tokenizer).setup()


def test_ultrafeedback_hub_id_offline_from_the_download_cache(tokenizer, tmp_path, offline_hub):
    write_ultrafeedback(tmp_path / "uf")
    write_hub_cache_entry(offline_hub, "HuggingFaceH4/ultrafeedback_binarized", tmp_path / "uf")
    by_id = UltraFeedbackDataModule(tokenizer, data="HuggingFaceH4/ultrafeedback_binarized", batch_size=5)
    by_folder = UltraFeedbackDataModule(tokenizer, data=str(tmp_path / "uf"), batch_size=5)
    batch_id, batch_folder = next(iter(by_id.val_dataloader())), next(iter(by_folder.val_dataloader()))
    assert len(by_id.val_dataloader().dataset) == len(ULTRAFEEDBACK_ROWS)
    assert batch_id.keys() == batch_folder.keys()
    for name, value in batch_id.items():
        if hasattr(value, "tolist"):
            assert value.tolist() == batch_folder[name].tolist()


def test_mistral_v03_template_with_a_system_prompt_puts_it_in_the_first_user_turn(tmp_path):
    from tests.support.chat_templates import MISTRAL_V03, tokenizer_with_template
    from tests.support.datamodule_fixtures import write_gsm8k

    mistral = tokenizer_with_template(tmp_path / "mistral", MISTRAL_V03)
    assert mistral.chat_template == MISTRAL_V03
    main = write_gsm8k(tmp_path)
    dm = GSM8KDataModule(mistral, data=str(main / "test.jsonl"), system_prompt="Solve it.", batch_size=2)
    with pytest.warns(UserWarning, match="`system_prompt` is put at the head of the first user turn"):
        batch = next(iter(dm.val_dataloader()))
    for row in range(2):
        question, answer = GSM8K_ROWS[row]["question"], GSM8K_ROWS[row]["answer"]
        prompt = mistral(f"<s>[INST] Solve it.\n\n{question}[/INST]", add_special_tokens=False)["input_ids"]
        target = mistral(f" {answer}</s>", add_special_tokens=False)["input_ids"]
        length = len(prompt) + len(target)
        assert batch["input_ids"][row, :length].tolist() == prompt + target
        assert batch["labels"][row, len(prompt) : length].tolist() == target
        assert (batch["labels"][row, : len(prompt)] == -100).all()


@pytest.mark.parametrize("model", ["llama3", "qwen2", "zephyr", "mistral-v0.3"])
@pytest.mark.parametrize("system_prompt", [None, "Solve it step by step."])
@pytest.mark.parametrize("few_shot", [0, 2])
def test_real_chat_templates_give_the_prompt_and_loss_mask_of_apply_chat_template(
    tmp_path, model, system_prompt, few_shot
):
    """The paper's four instruct models' chat templates, as in their tokenizer_config.json, with their special
    tokens: the batch holds the ids ``tokenizer.apply_chat_template`` gives for the conversation, the prompt
    masked and the answer (with the template's end of turn) the target, with and without a system prompt and few-
    shot turns. Mistral-v0.3 writes a system message into the last user turn: there it heads the first user turn."""
    import warnings

    from tests.support.chat_templates import SPECIAL_TOKENS, TEMPLATES, tokenizer_with_template
    from tests.support.datamodule_fixtures import GSM8K_TRAIN_ROWS, write_gsm8k

    tokenizer = tokenizer_with_template(tmp_path / model, TEMPLATES[model], SPECIAL_TOKENS[model])
    assert tokenizer.chat_template == TEMPLATES[model]
    main = write_gsm8k(tmp_path / "gsm8k")
    dm = GSM8KDataModule(
        tokenizer, data=str(main), system_prompt=system_prompt, few_shot=few_shot, batch_size=5, max_length=512
    )
    with warnings.catch_warnings(record=True):
        batch = next(iter(dm.val_dataloader()))
    folded = system_prompt is not None and model == "mistral-v0.3"
    for row, example in enumerate(GSM8K_ROWS):
        turns = []
        for shot in GSM8K_TRAIN_ROWS[:few_shot]:
            turns += [{"role": "user", "content": shot["question"]}, {"role": "assistant", "content": shot["answer"]}]
        turns.append({"role": "user", "content": example["question"]})
        if folded:
            turns[0] = {"role": "user", "content": f"{system_prompt}\n\n{turns[0]['content']}"}
        elif system_prompt is not None:
            turns.insert(0, {"role": "system", "content": system_prompt})
        prompt = list(
            tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
        full = list(
            tokenizer.apply_chat_template(
                [*turns, {"role": "assistant", "content": example["answer"]}], tokenize=True, return_dict=False
            )
        )
        assert full[: len(prompt)] == prompt
        assert batch["input_ids"][row, : len(full)].tolist() == full
        assert (batch["labels"][row, : len(prompt)] == -100).all()
        assert batch["labels"][row, len(prompt) : len(full)].tolist() == full[len(prompt) :]
        assert (batch["labels"][row, len(full) :] == -100).all()
        assert (batch["attention_mask"][row, len(full) :] == 0).all()
        assert batch["prompt_input_ids"][row, -len(prompt) :].tolist() == prompt
        if system_prompt is not None:
            assert system_prompt in tokenizer.decode(prompt)
        if model == "qwen2" and system_prompt is None:
            assert "You are a helpful assistant." in tokenizer.decode(prompt)  # the template's default system turn
