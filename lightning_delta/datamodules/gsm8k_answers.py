"""The final number of a GSM8K answer, generated or reference, and whether two match (the ``chat`` protocol's
reading; the lm-eval protocols' filters are in :mod:`~lightning_delta.datamodules.gsm8k_protocols`)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["extract_final_number", "numbers_match"]

# A number as written in GSM8K answers and model outputs: optional sign (ASCII or Unicode minus), optional "$",
# digits with thousands commas, optional decimals; or a bare decimal such as ".5".
_NUMBER = re.compile(r"[-−]?\s?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
# "the answer is 12", "The final answer is: $42", "answer: 7": the stated answer, before any later number
_STATED = re.compile(r"\banswer\s*(?:is|:)\s*:?\s*(?:\*\*)?\s*(" + _NUMBER.pattern + ")", re.IGNORECASE)


def _canonical(number: str) -> str | None:
    text = number.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The final answer of a GSM8K-style solution as a canonical number string, or ``None``.

    The number after the last ``####`` is taken; without ``####``, the number of the last "the answer is n" (or
    "answer: n"), so that "The answer is 12 (3 x 4)." gives 12; without either, the last number. Thousands commas,
    ``$`` and trailing zeros are dropped, so ``"1,000.50"`` gives ``"1000.5"`` and ``"-3.0"`` gives ``"-3"``.

    Example:
        >>> extract_final_number("She has 48/2 = <<48/2=24>>24 clips.\\n#### 1,024")
        '1024'
        >>> extract_final_number("The loss is $-3.50, so the answer is -3.5.")
        '-3.5'
        >>> extract_final_number("The final answer is 42. It took 2 steps.")
        '42'
        >>> extract_final_number("no number here") is None
        True
    """
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _canonical(found[0])
    stated = _STATED.findall(text)
    if stated:
        return _canonical(stated[-1])
    found = _NUMBER.findall(text)
    return _canonical(found[-1]) if found else None


def numbers_match(prediction: str | None, reference: str | None) -> bool:
    """Exact match of two canonical numbers (``None`` never matches)."""
    if prediction is None or reference is None:
        return False
    return Decimal(prediction) == Decimal(reference)
