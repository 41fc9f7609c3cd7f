"""The help of the analysis commands: their descriptions, the lists of the library's classes, and the formatter."""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Sequence
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningDataModule

from lightning_delta.edits import EDITS

__all__ = [
    "EVALUATOR_HELP",
    "LOSS_HELP",
    "SWEEP_DESCRIPTION",
    "VALIDATE_DESCRIPTION",
    "HelpFormatter",
    "data_help",
    "edit_help",
    "hide_from_help",
    "listing",
    "summary",
]

VALIDATE_DESCRIPTION = (
    "One Riemann analysis: the post-trained model (--model.model), the pre-trained weights (--model.pretrained), the "
    "data (--data), the edit (--edit) and C (--riemann.num_points), run under trainer.validate. Prints the term, "
    "trapezoid, exact ΔL, losses, accuracy and the modules with the largest terms, and writes config.yaml and "
    "riemann.json into a run directory of its own (trainer.log_dir). A --config file holds the same keys; "
    "--print_config prints the whole config."
)
SWEEP_DESCRIPTION = (
    "A grid of Riemann analyses: the config that validate reads, with --sweep.grid (dotted keys to lists of values) "
    "and --sweep.results (a JSONL file, one row per point). Running it again runs only the points missing there. "
    "Prints a line per finished point and a closing table of the grid with what is left."
)

# Dotted key -> help, for the keys whose values the library names (the classes and names it ships).
LOSS_HELP = "the loss, by name:"
EVALUATOR_HELP = (
    "accuracy at t = 0 and t = 1, a callable (model, batch) -> (correct, total). Default: the loss's own, if it has "
    "one. The library's:\n- GSM8KEvaluator: greedy generation, exact match of the final number (needs "
    "--model.evaluator.tokenizer, the post-trained model's directory or hub id)\n- "
    "lightning_delta.demo.digits.answer_accuracy: the demo's digit accuracy\n- any other function by its import "
    "path, or a class with init_args whose instances are such callables"
)


def summary(obj: Any) -> str:
    """The first sentence of ``obj``'s docstring as plain text (reST roles and literals unwrapped)."""
    text = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text).replace("``", "")
    return re.split(r"\.\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")


def _library_subclasses(base: type) -> list[type]:
    """The imported subclasses of ``base`` that this library's public modules define, in definition order."""
    found: list[type] = []
    todo: list[type] = list(base.__subclasses__())
    while todo:
        cls = todo.pop(0)
        public = not any(part.startswith("_") for part in cls.__module__.split("."))
        if cls not in found and cls.__module__.startswith("lightning_delta") and public:
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def listing(intro: str, items: Sequence[tuple[str, str]]) -> str:
    """``intro`` and one ``- name: description`` line per item (kept as lines by :class:`HelpFormatter`)."""
    return intro + "".join(f"\n- {name}: {description}" for name, description in items)


def data_help() -> str:
    return listing(
        "the DataModule, by class name (its arguments as --data.<argument>, all of them with --data.help NAME), or "
        "a class path. The library's:",
        [(cls.__name__, summary(cls)) for cls in _library_subclasses(LightningDataModule)],
    )


def edit_help() -> str:
    return listing(
        "the editing operation F, by class name (its arguments as --edit.<argument>, e.g. --edit DARE --edit.p 0.9; "
        "all of them with --edit.help NAME), or a class path:",
        [(cls.__name__, summary(cls)) for cls in EDITS.values()],
    )


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with three changes: a help text's ``\n- `` lines stay lines; such a list of the
    library's classes replaces jsonargparse's list of known subclasses, as does nothing for a ``torch.nn.Module``
    or ``torch.Tensor`` (every imported module class of torch and transformers); arguments marked by
    :func:`hide_from_help` are left out."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action)
        start = text.rfind(", known subclasses: ")
        if start >= 0 and text.endswith(")"):
            listed = text[start:]
            if "\n- " in (action.help or "") or "torch.nn.Module" in listed or "torch.Tensor" in listed:
                text = text[:start] + ")"
        return text

    def add_usage(self, usage: Any, actions: Any, *args: Any, **kwargs: Any) -> None:
        super().add_usage(usage, [action for action in actions if not _hidden(action)], *args, **kwargs)

    def add_argument(self, action: argparse.Action) -> None:
        if not _hidden(action):
            super().add_argument(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        first, *items = text.split("\n- ")
        lines = super()._split_lines(first, width)
        for item in items:
            wrapped = super()._split_lines(item, width - 2)
            lines += ["- " + wrapped[0], *("  " + line for line in wrapped[1:])]
        return lines


_HIDDEN_FROM_HELP = "hidden_from_help"  # the attribute of an argparse.Action that hide_from_help sets


def hide_from_help(action: argparse.Action) -> None:
    """Leave ``action`` out of the help, still parsed and dumped: argparse's ``help=SUPPRESS`` would also leave it out
    of jsonargparse's dumps."""
    setattr(action, _HIDDEN_FROM_HELP, True)


def _hidden(action: argparse.Action) -> bool:
    """Whether ``action`` is parsed and dumped but left out of the help (:func:`hide_from_help`)."""
    return bool(getattr(action, _HIDDEN_FROM_HELP, False))
