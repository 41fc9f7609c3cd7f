"""The GSM8K evaluation protocols: prompt, few-shot examples, stop strings and answer extraction.

``protocol`` of :class:`~lightning_delta.datamodules.GSM8KDataModule` and
:class:`~lightning_delta.datamodules.GSM8KEvaluator`:

- ``"chat"`` (default): the question through the tokenizer's chat template (the plain ``Question: …\\nAnswer:``
  format without one), after ``few_shot`` worked examples, the first ones of the train split; the answer is the
  number after ``####``, else after "the answer is", else the last number
  (:func:`~lightning_delta.datamodules.gsm8k_answers.extract_final_number`).
- ``"lm-eval"``: lm-evaluation-harness's ``gsm8k`` task (``lm_eval/tasks/gsm8k/gsm8k.yaml``, version 3.0): 5 shots
  drawn from the train split by ``random.Random(1234).sample`` (one draw per evaluated question, in the test split's
  order), each ``Question: <question>\\nAnswer: <answer>`` joined by a blank line, then
  ``Question: <question>\\nAnswer:``; no chat template; generation stops at ``Question:``, ``</s>`` or
  ``<|im_end|>``; two accuracies: ``strict-match`` (the number after ``#### ``) and ``flexible-extract`` (the last
  number), each compared as lm-eval's ``exact_match`` does (commas, ``$``, a final ``.`` and case ignored).
- ``"lm-eval-cot-llama"``: lm-evaluation-harness's ``gsm8k_cot_llama`` (``gsm8k-cot-llama.yaml``, version 4.0; run
  there with ``--apply_chat_template --fewshot_as_multiturn``), the protocol of Llama-3-Instruct's reported GSM8K
  figure: 8 fixed chain-of-thought examples as chat turns, each answer ending "The final answer is n";
  ``strict-match`` reads the number after "The final answer is", ``flexible-extract`` the last number.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

__all__ = [
    "COT_LLAMA_PROMPT",
    "COT_LLAMA_SHOTS",
    "PROTOCOLS",
    "check_protocol",
    "cot_target",
    "filter_answers",
    "lm_eval_reference",
    "lm_eval_shot_indices",
    "normalise",
    "regex_filter",
]

PROTOCOLS = ("chat", "lm-eval", "lm-eval-cot-llama")
DEFAULT_SHOTS = {"chat": 0, "lm-eval": 5, "lm-eval-cot-llama": 8}  # each task's num_fewshot
LM_EVAL_SEED = 1234  # lm-eval's default --fewshot_random_seed
LM_EVAL_FORMAT = "Question: {question}\nAnswer:"  # doc_to_text; target delimiter " ", few-shot delimiter "\n\n"
STOP_STRINGS = {  # generation_kwargs.until of each task (lm-eval adds the tokenizer's eos token)
    "lm-eval": ("Question:", "</s>", "<|im_end|>"),
    "lm-eval-cot-llama": ("<|eot_id|>", "<|start_header_id|>user<|end_header_id|>", "Q:", "</s>", "<|im_end|>"),
}
_NUMBER_OR_AMOUNT = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
FILTERS = {  # filter_list: name -> (regex_pattern, group_select), then take_first
    "lm-eval": {"strict-match": (r"#### (\-?[0-9\.\,]+)", 0), "flexible-extract": (_NUMBER_OR_AMOUNT, -1)},
    "lm-eval-cot-llama": {
        "strict-match": (rf"The final answer is ({_NUMBER_OR_AMOUNT})", -1),
        "flexible-extract": (_NUMBER_OR_AMOUNT, -1),
    },
}
IGNORED = (",", r"\$", "(?s).*#### ", r"\.$")  # exact_match's regexes_to_ignore (with ignore_case: true)
FALLBACK = "[invalid]"  # what a filter gives when its pattern does not match

COT_LLAMA_PROMPT = (
    "Given the following problem, reason and give a final answer to the problem.\nProblem: {question}\nYour response "
    'should end with "The final answer is [answer]" where [answer] is the response to the problem.\n'
)
COT_LLAMA_SHOTS = (  # fewshot_config.samples of gsm8k-cot-llama.yaml, in order (sampler: first_n)
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
        "will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
        "21 - 15 = 6. The final answer is 6",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The final answer is 5",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they "
        "had 74 - 35 = 39. The final answer is 39",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
        "give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The "
        "final answer is 8",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The "
        "final answer is 9",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to "
        "thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
        "were added. 9 + 20 is 29. The final answer is 29",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls "
        "did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
        "had 35 - 2 = 33 golf balls. The final answer is 33",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
        "left. 23 - 15 is 8. The final answer is 8",
    ),
)

CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, e.g. "<<48/2=24>>"


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {', '.join(map(repr, PROTOCOLS))}, got {protocol!r}.")
    return protocol


def lm_eval_shot_indices(num_pool: int, num_questions: int, k: int, seed: int = LM_EVAL_SEED) -> list[list[int]]:
    """The train rows lm-eval puts before each evaluated question: its sampler is one ``random.Random(seed)`` that
    draws ``sample(train rows, k)`` for each question in turn (``random.sample`` picks by position only, so drawing
    from ``range(num_pool)`` gives the same rows)."""
    generator = random.Random(seed)
    return [generator.sample(range(num_pool), k) for _ in range(num_questions)]


def regex_filter(text: str, pattern: str, group_select: int) -> str:
    """lm-eval's ``regex`` filter: match ``group_select`` of all matches; of a match with groups, the first
    non-empty group; stripped; :data:`FALLBACK` when nothing matches."""
    matches = re.findall(pattern, text)
    if not matches:
        return FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), FALLBACK)
    return match.strip()


def normalise(text: str) -> str:
    """What lm-eval's ``exact_match`` compares: :data:`IGNORED` removed, in order, then lower case."""
    for pattern in IGNORED:
        text = re.sub(pattern, "", text)
    return text.lower()


def lm_eval_reference(protocol: str, answer: str) -> str:
    """The reference answer as the task's ``doc_to_target`` writes it: the whole answer for ``gsm8k``, the text after
    the last ``####`` for ``gsm8k_cot_llama``."""
    return answer.split("####")[-1].strip() if protocol == "lm-eval-cot-llama" else answer


def filter_answers(protocol: str, text: str) -> dict[str, str]:
    """Each filter's answer (``strict-match``, ``flexible-extract``) for a generated ``text``."""
    return {name: regex_filter(text, pattern, group) for name, (pattern, group) in FILTERS[protocol].items()}


def filter_matches(protocol: str, texts: Sequence[str], references: Sequence[str]) -> dict[str, int]:
    """How many ``texts`` each filter gets right against their reference answers (lm-eval's ``exact_match``)."""
    targets = [normalise(lm_eval_reference(protocol, reference)) for reference in references]
    counts = dict.fromkeys(FILTERS[protocol], 0)
    for text, target in zip(texts, targets):
        for name, answer in filter_answers(protocol, text).items():
            counts[name] += normalise(answer) == target
    return counts


def cot_target(answer: str) -> str:
    """A GSM8K answer in the chain-of-thought shots' form: its lines as one paragraph, ending
    "The final answer is n" in place of ``#### n``."""
    body, _, final = answer.rpartition("####")
    body = " ".join(line.strip() for line in body.splitlines() if line.strip())
    return f"{body} The final answer is {final.strip()}".strip()


def drop_calculator_notes(answer: str) -> str:
    """``answer`` without GSM8K's calculator notes: ``"48/2 = <<48/2=24>>24"`` becomes ``"48/2 = 24"``."""
    return CALCULATOR_NOTE.sub("", answer)
