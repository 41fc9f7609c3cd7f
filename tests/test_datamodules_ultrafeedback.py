"""UltraFeedbackDataModule and DPOLoss: tokens and masks, the loss against float64 by hand, one reference pass per
batch, reward accuracy, the Riemann term against brute force, and the errors."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_delta.callbacks import RiemannCallback
from lightning_delta.datamodules import UltraFeedbackDataModule
from lightning_delta.losses import DPOLoss, build_loss
from lightning_delta.module import DeltaEditModule
from tests.support.datamodule_fixtures import (
    ULTRAFEEDBACK_ROWS,
    ultrafeedback_row,
    write_jsonl,
    write_ultrafeedback,
)
from tests.support.riemann_support import brute_force, random_edits, weights_at
from tests.support.tiny_models import make_post_trained, make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def models():
    reference = make_tiny_model("llama", dtype=torch.float64)
    return reference, make_post_trained(reference, scale=0.05)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_pair(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    prompt = f"<|user|>\n{row['chosen'][0]['content']}</s>\n<|assistant|>\n"  # the tiny template, by hand
    return (
        ids(tokenizer, prompt),
        ids(tokenizer, row["chosen"][1]["content"] + "</s>\n"),
        ids(tokenizer, row["rejected"][1]["content"] + "</s>\n"),
    )


def test_tokens_and_masks_token_by_token(tokenizer, tmp_path):
    dm = UltraFeedbackDataModule(tokenizer, data=str(tmp_path), batch_size=5)
    write_ultrafeedback(tmp_path)
    batch = next(iter(dm.val_dataloader()))
    width = batch["chosen_input_ids"].shape[1]
    assert batch["rejected_input_ids"].shape[1] == width  # one length for both sides
    for row, data_row in enumerate(ULTRAFEEDBACK_ROWS):
        prompt, chosen, rejected = expected_pair(tokenizer, data_row)
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            length = len(prompt) + len(answer)
            assert batch[f"{side}_input_ids"][row, :length].tolist() == prompt + answer
            assert batch[f"{side}_labels"][row].tolist() == [-100] * len(prompt) + answer + [-100] * (width - length)
            assert batch[f"{side}_attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
            assert (batch[f"{side}_input_ids"][row, length:] == 0).all()
    assert batch["score_chosen"].tolist() == [r["score_chosen"] for r in ULTRAFEEDBACK_ROWS]


def hand_dpo(model, reference, tokenizer, rows, beta: float) -> tuple[float, list[bool]]:
    """Σ_pairs −log σ(β[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)]) from unpadded float64 forwards, one token
    at a time, and whether each chosen reward beats the rejected one."""

    def logp(net, prompt, answer):
        with torch.no_grad():
            logits = net(input_ids=torch.tensor([prompt + answer])).logits[0].double()
        total = 0.0
        for i, token in enumerate(answer):
            position = len(prompt) + i - 1  # the logits that predict this token
            total += float(logits[position, token] - torch.logsumexp(logits[position], dim=0))
        return total

    loss, wins = 0.0, []
    for row in rows:
        prompt, chosen, rejected = expected_pair(tokenizer, row)
        reward_w = beta * (logp(model, prompt, chosen) - logp(reference, prompt, chosen))
        reward_l = beta * (logp(model, prompt, rejected) - logp(reference, prompt, rejected))
        loss += -math.log(1.0 / (1.0 + math.exp(-(reward_w - reward_l))))
        wins.append(reward_w > reward_l)
    return loss, wins


class CountingReference(torch.nn.Module):
    """Wraps the reference model and records the batch size of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, **kwargs):
        self.calls.append(kwargs["input_ids"].shape[0])
        return self.model(**kwargs)


def test_dpo_loss_against_float64_by_hand(tokenizer, models, tmp_path):
    reference, post = models
    write_ultrafeedback(tmp_path)
    dm = UltraFeedbackDataModule(tokenizer, data=str(tmp_path), batch_size=2)
    loss = DPOLoss(CountingReference(reference), beta=0.3)
    total, count, correct, pairs = 0.0, 0.0, 0, 0
    for batch in dm.val_dataloader():
        prepared = loss.prepare(batch)
        output = loss(post, prepared)
        total, count = total + float(output.total.detach()), count + float(output.count)
        assert output.total.dtype == torch.float64
        chosen, rejected = loss.rewards(post, prepared)
        correct, pairs = correct + int((chosen > rejected).sum()), pairs + chosen.numel()
    expected, wins = hand_dpo(post, reference, tokenizer, ULTRAFEEDBACK_ROWS, beta=0.3)
    assert total == pytest.approx(expected, rel=1e-10)
    assert count == len(ULTRAFEEDBACK_ROWS)
    assert correct / pairs == pytest.approx(sum(wins) / len(wins))
    assert loss.reference.calls == [4, 4, 2]  # once per batch, chosen and rejected together


@pytest.mark.slow
def test_reference_runs_once_per_batch_through_the_riemann_sweep(tokenizer, models, tmp_path):
    reference, post = models
    write_ultrafeedback(tmp_path)
    dm = UltraFeedbackDataModule(tokenizer, data=str(tmp_path), batch_size=2)
    model = make_post_trained(reference, scale=0.05)
    edits = random_edits(model, pattern="layers.1.mlp", scale=0.05)
    plain = DPOLoss(reference, beta=0.5)
    expected = brute_force(model, edits, lambda m, b: plain(m, plain.prepare(b)), dm.val_dataloader(), num_points=2)
    expected_accuracy = {}  # reward accuracy at t = 0 and t = 1, on plain copies of the weights
    for t in (0.0, 1.0):
        point = weights_at(model, edits, t)
        wins = [
            float(chosen > rejected)
            for batch in dm.val_dataloader()
            for chosen, rejected in zip(*plain.rewards(point, batch))
        ]
        expected_accuracy[t] = sum(wins) / len(wins)

    loss = DPOLoss(CountingReference(reference), beta=0.5)
    module = DeltaEditModule(model, pretrained=None, edit=edits, loss=loss)
    assert module.evaluator == loss.evaluator  # the loss's reward accuracy, at t = 0 and t = 1, by default
    callback = RiemannCallback(num_points=2, filename=None)
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
    for name in expected["names"]:
        assert result.term_per_tensor[name] == pytest.approx(expected["term_per_tensor"][name], rel=1e-6, abs=1e-12)
    assert result.losses == pytest.approx(expected["losses"].tolist(), rel=1e-10)
    assert result.count == len(ULTRAFEEDBACK_ROWS)  # count = pairs
    # 3 batches, 3 points each (the accuracy counted in the forwards at t = 0 and t = 1): one reference pass per batch
    assert loss.reference.calls == [4, 4, 2]
    assert float(trainer.callback_metrics["accuracy/post"]) == pytest.approx(expected_accuracy[0.0])
    assert float(trainer.callback_metrics["accuracy/edit"]) == pytest.approx(expected_accuracy[1.0])


def test_dpo_is_registered_with_build_loss(models):
    loss = build_loss("dpo", reference=models[0], beta=0.2)
    assert isinstance(loss, DPOLoss) and loss.beta == 0.2
    assert not any(p.requires_grad for p in loss.reference.parameters())
    with pytest.raises(ValueError, match="`beta` must be a positive number"):
        DPOLoss(models[0], beta=0.0)
    with pytest.raises(ValueError, match="chosen_/rejected_"):
        DPOLoss(models[0]).prepare({"input_ids": torch.zeros(1, 2, dtype=torch.long)})


def test_over_long_pairs_are_truncated_dropped_or_refused(tokenizer, tmp_path):
    rows = [
        ultrafeedback_row("Say hi, please, say hi to me now.", "Hi!", "No."),
        ultrafeedback_row("Q?", "The quick brown fox jumps over the lazy dog. " * 3, "Ok."),
    ]
    write_ultrafeedback(tmp_path, rows)
    prompt, chosen, rejected = expected_pair(tokenizer, rows[0])
    max_length = len(prompt) + len(chosen) - 3  # the first pair loses three prompt tokens
    long_answer = len(expected_pair(tokenizer, rows[1])[1])
    assert long_answer >= max_length
    with pytest.raises(
        ValueError,
        match=r"row 1 \(counting from 0\) of .*test_prefs-00000-of-00001.parquet: an answer "
        "alone has",
    ):
        UltraFeedbackDataModule(tokenizer, data=str(tmp_path), max_length=max_length).setup()
    dm = UltraFeedbackDataModule(tokenizer, data=str(tmp_path), max_length=max_length, too_long="drop")
    with pytest.warns(UserWarning, match=r"Of 2 UltraFeedback pairs, 1 are longer .* and 1 were dropped"):
        batch = next(iter(dm.val_dataloader()))
    assert batch["chosen_input_ids"].shape == (1, max_length)
    assert batch["chosen_input_ids"][0].tolist() == prompt[3:] + chosen


def test_errors_for_missing_data_empty_split_template_and_bad_rows(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="No UltraFeedback file for split 'test_prefs'"):
        UltraFeedbackDataModule(tokenizer, data=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="has no examples"):
        UltraFeedbackDataModule(tokenizer, data=str(write_jsonl(tmp_path / "e" / "test_prefs.jsonl", []))).setup()
    bad = ultrafeedback_row("A?", "yes", "no")
    bad["rejected"][0] = {"role": "user", "content": "B?"}
    with pytest.raises(ValueError, match="different prompts"):
        UltraFeedbackDataModule(tokenizer, data=str(write_jsonl(tmp_path / "bad.jsonl", [bad]))).setup()
    with pytest.raises(ValueError, match="`too_long` must be one of"):
        UltraFeedbackDataModule(tokenizer, too_long="cut")
    plain = make_tiny_tokenizer()
    plain.chat_template = None
    path = str(write_jsonl(tmp_path / "ok.jsonl", ULTRAFEEDBACK_ROWS[:1]))
    with pytest.raises(ValueError, match="no chat template"):
        UltraFeedbackDataModule(plain, data=path, chat_template=True).setup()
    dm = UltraFeedbackDataModule(plain, data=path)
    with pytest.warns(UserWarning, match="no chat template"):
        batch = next(iter(dm.val_dataloader()))
    prompt = ids(plain, "user: What is 3 + 4?\nassistant:")
    answer = ids(plain, " The answer is 7.</s>")
    assert batch["chosen_labels"][0, : len(prompt) + len(answer)].tolist() == [-100] * len(prompt) + answer


def without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


def assistant(content):
    return {"role": "assistant", "content": content}


USER = {"role": "user", "content": "Q?"}


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            without(ULTRAFEEDBACK_ROWS[0], "rejected"),
            r"lacks the field 'rejected': each row needs the fields 'prompt', 'chosen' and 'rejected'; this row has "
            r"'prompt', 'prompt_id', 'chosen', 'messages', 'score_chosen', 'score_rejected'\.",
        ),
        (without(ULTRAFEEDBACK_ROWS[0], "prompt"), r"lacks the field 'prompt': .* this row has 'prompt_id', 'chosen'"),
        (
            {"prompt": "Q?", "response_a": "A", "response_b": "B"},
            r"lacks the fields 'chosen' and 'rejected': .* this row has 'prompt', 'response_a', 'response_b'\.",
        ),
        ({**ULTRAFEEDBACK_ROWS[0], "chosen": None}, r"lacks the field 'chosen'"),
        (
            {**ULTRAFEEDBACK_ROWS[0], "chosen": "The answer is 7."},
            r": the field 'chosen' is a str \('The answer is 7.'\), expected a list",
        ),
        ({**ULTRAFEEDBACK_ROWS[0], "rejected": []}, r": `rejected` must be a non-empty list of .* it is '\[\]'"),
        (
            {**ULTRAFEEDBACK_ROWS[0], "chosen": [USER, "The answer is 7."]},
            r": `chosen` must be a non-empty list of \{'role', 'content'\} messages ending with the assistant's answer; "
            r"its message 1 is a str \('The answer is 7.'\)",
        ),
        (
            {**ULTRAFEEDBACK_ROWS[0], "chosen": [USER, {"role": "assistant"}]},
            r"`chosen` must be .*; its message 1 has no string 'content' \(it has 'role'\)",
        ),
        (
            {**ULTRAFEEDBACK_ROWS[0], "rejected": [{"content": "Q?"}, assistant("No.")]},
            r"`rejected` must be .*; its message 0 has no string 'role' \(it has 'content'\)",
        ),
        (
            {**ULTRAFEEDBACK_ROWS[0], "chosen": [USER, {"role": "assistant", "content": 7}]},
            r"`chosen` must be .*; its message 1 has no string 'content' \(it has 'role', 'content'\)",
        ),
        (
            {**ULTRAFEEDBACK_ROWS[0], "rejected": [assistant("Hi."), USER]},
            r"`rejected` must be .*; its last message has role 'user'\.",
        ),
    ],
)
def test_rows_without_fields_or_with_malformed_messages_name_file_row_and_fields(tokenizer, tmp_path, bad, message):
    path = write_jsonl(tmp_path / "test_prefs.jsonl", [*ULTRAFEEDBACK_ROWS[:2], bad])
    with pytest.raises(
        ValueError,
        match=rf"UltraFeedback row 2 \(counting from 0\) of .*{tmp_path.name}.test_prefs"
        rf"\.jsonl.*{message}",
    ):
        UltraFeedbackDataModule(tokenizer, data=str(path)).setup()
    # limit stops before the bad row: the first two rows are fine
    assert len(UltraFeedbackDataModule(tokenizer, data=str(path), limit=2).val_dataloader().dataset) == 2


def test_bad_row_in_the_hub_layout_names_its_parquet_file(tokenizer, tmp_path):
    write_ultrafeedback(tmp_path, [ULTRAFEEDBACK_ROWS[0], without(ULTRAFEEDBACK_ROWS[1], "prompt")])
    with pytest.raises(
        ValueError,
        match=r"UltraFeedback row 1 \(counting from 0\) of .*data.test_prefs-00000-of-00001"
        r"\.parquet lacks the field 'prompt': each row needs the fields 'prompt', "
        r"'chosen' and 'rejected'",
    ):
        UltraFeedbackDataModule(tokenizer, data=str(tmp_path)).setup()


def test_constructor_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(UltraFeedbackDataModule, "data")
    parser.add_class_arguments(DPOLoss, "loss", skip={"reference"})
    config = parser.parse_string(
        "data:\n  tokenizer: some/tokenizer\n  split: train_prefs\n  too_long: drop\nloss:\n  beta: 0.05\n"
    )
    dm = UltraFeedbackDataModule(**config.data.as_dict())
    assert (dm.split, dm.too_long, config.loss.beta) == ("train_prefs", "drop", 0.05)
