"""The ``lightning-delta`` command line: it parses the command and calls the function that runs it.

::

    lightning-delta validate --config configs/llama3-8b-instruct-gsm8k.yaml --edit.p 0.9   # one Riemann analysis
    lightning-delta sweep    --config configs/llama3-8b-instruct-gsm8k.yaml                # its grid, resumable
    lightning-delta edit     --model post/ --pretrained pre/ --edit DARE --edit.p 0.9 --output_dir edited/
    lightning-delta plot     --results results.jsonl --output_dir figures/
    lightning-delta demo                                                                   # offline, a few minutes

``validate`` and ``sweep`` read the same config, parsed by :class:`~lightning_delta.runner.DeltaCLI` (a
LightningCLI, see :mod:`lightning_delta.runner`): ``--print_config`` prints the whole config, and any key can be
overridden on the command line (``--trainer.devices 8``). Each ``validate`` run writes its ``config.yaml`` and
``riemann.json`` into ``trainer.log_dir``, a directory of its own. ``edit``, ``plot`` and ``demo`` are parsed from
their functions' signatures by jsonargparse (also with ``--config`` and ``--print_config``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_delta.demo import demo
from lightning_delta.edits import EDITS
from lightning_delta.runner import DeltaCLI, edit, plot, sweep, validate

__all__ = ["COMMANDS", "check_edit_argument", "command_parser", "main", "run"]

# The commands, each the function that runs it. The ANALYSES take the rest of the command line, which DeltaCLI parses
# (a LightningCLI: it builds the trainer too); the others take what a parser made from their signature parsed.
COMMANDS: dict[str, Callable[..., Any]] = {"validate": validate, "sweep": sweep, "edit": edit, "plot": plot,
                                           "demo": demo}
ANALYSES = ("validate", "sweep")
CONFIG_HELP = "Path to a configuration file."


def _summary(function: Callable[..., Any]) -> str:
    """The first paragraph of ``function``'s docstring, on one line: its help in the list of commands."""
    return " ".join((inspect.getdoc(function) or "").split("\n\n")[0].split())


def command_parser() -> ArgumentParser:
    """The parser of ``lightning-delta``: a subcommand per command of :data:`COMMANDS`.

    ``validate`` and ``sweep`` get DeltaCLI's parser of an analysis config; ``edit``, ``plot`` and ``demo`` a parser
    of their function's arguments, with ``--config`` (what ``jsonargparse.auto_cli`` builds).
    """
    parser = ArgumentParser(prog="lightning-delta")
    parser.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
    commands = parser.add_subcommands(required=True)
    for name, function in COMMANDS.items():
        if name in ANALYSES:
            subparser = DeltaCLI.config_parser()
        else:
            subparser = ArgumentParser(description=_summary(function))
            subparser.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
            subparser.add_function_arguments(function, as_group=False, sub_configs=True)
        commands.add_subcommand(name, subparser, help=_summary(function))
    return parser


def check_edit_argument(argv: Sequence[str]) -> None:
    """Refuse ``--edit NAME`` for a name that is no edit, listing the edits (jsonargparse would only say that the
    name is not a dot import path). Class paths, config files and JSON values are left to jsonargparse."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--edit"]
    values += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--edit=")]
    known = {cls.__name__: name for name, cls in EDITS.items()}
    for value in values:
        if value in known or "." in value or value.lstrip().startswith("{") or Path(value).exists():
            continue
        lower = {name.lower(): name for name in known}
        hint = f" Did you mean {lower[value.lower()]}?" if value.lower() in lower else ""
        hint = f" Did you mean {[cls for cls, name in known.items() if name == value][0]}?" if value in EDITS else hint
        raise ValueError(
            f"Unknown edit {value!r} for --edit.{hint} The edits are {', '.join(known)} (or a class path such as "
            "lightning_delta.edits.DARE); set their arguments with --edit.<argument>, e.g. --edit DARE --edit.p 0.9."
        )


def run(argv: Sequence[str] | None = None) -> Any:
    """Run one command and return what it made (the CLI, rows, paths); ``main`` is the console script around it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    check_edit_argument(argv)
    if argv and argv[0] in ANALYSES:
        return COMMANDS[argv[0]](argv[1:])
    parser = command_parser()
    config = parser.parse_args(argv)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # the name before jsonargparse 4.49
    arguments = instantiate(config)
    arguments.pop("config", None)
    command = arguments.pop("subcommand")
    arguments = arguments[command]
    arguments.pop("config", None)
    return COMMANDS[command](**arguments)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-delta`` console script (returns nothing: the exit status is 0 on success)."""
    run(argv)


if __name__ == "__main__":
    main()
