"""The commands of ``lightning-delta``: the function that runs each, and the parsers of their command lines.

Importing this module imports neither torch nor Lightning: :func:`top_parser` needs none, and
:func:`command_parser` imports the command's module when it is called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

__all__ = ["ANALYSES", "COMMANDS", "DEBUG_ENV", "command_function", "command_parser", "import_command", "top_parser"]

# The commands: the module and function that run each, and its line in `lightning-delta --help`. The ANALYSES take
# the rest of the command line, which DeltaCLI parses (a LightningCLI: it builds the trainer too); the others take
# what a parser made from their function's signature parsed.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "validate": (
        "lightning_delta.cli.commands",
        "validate",
        "One Riemann analysis of an edit: term, trapezoid and exact ΔL, printed and written to a run directory.",
    ),
    "sweep": (
        "lightning_delta.sweep.run",
        "sweep",
        "A grid of Riemann analyses, one JSONL row per point, resumable; a line per point, a closing table.",
    ),
    "edit": (
        "lightning_delta.cli.commands",
        "edit",
        "Write the edited model W_pre + F(ΔW) with save_pretrained (safetensors), tokenizer files beside it.",
    ),
    "compress": (
        "lightning_delta.compress.command",
        "compress",
        "Write the edited delta F(ΔW) in its family's compact form (safetensors), to load onto the base.",
    ),
    "plot": ("lightning_delta.cli.commands", "plot", "Draw the figures of one or more sweep results files."),
    "estimate": ("lightning_delta.estimate", "estimate", "Peak memory per process of a config, from config.json."),
    "plan": (
        "lightning_delta.planning.command",
        "plan",
        "Plan an edit per tensor under a budget from the Riemann terms, measure its exact ΔL, write the plan.",
    ),
    "demo": (
        "lightning_delta.demo.command",
        "demo",
        "Build a real small pre/post pair on the bundled digits, sweep the edits, print a table (offline).",
    ),
}
ANALYSES = ("validate", "sweep")
DEBUG_ENV = "LIGHTNING_DELTA_DEBUG"
CONFIG_HELP = "Path to a configuration file."
DESCRIPTION = (
    "Edit the delta parameters of a post-trained model and measure what the edit does to the loss. "
    "`lightning-delta COMMAND --help` lists a command's arguments. On an error only its message is printed: add "
    f"--debug (or set {DEBUG_ENV}=1) for the traceback."
)


def command_function(command: str) -> Callable[..., Any]:
    """The function that runs ``command`` (importing it imports torch and Lightning)."""
    module, name, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), name)


def import_command(command: str) -> None:
    """Import the parser module and ``command``'s module: the DataModules, edits and evaluators they define are what the help
    lists and what a class name resolves to. The demo's module only for ``demo``, so that ``validate`` and the
    others never depend on it."""
    importlib.import_module("lightning_delta.cli.parser")
    importlib.import_module(COMMANDS[command][0])


def top_parser() -> ArgumentParser:
    """``lightning-delta`` and its commands, each with its line of help; imports nothing of the library."""
    parser = ArgumentParser(prog="lightning-delta", description=DESCRIPTION)
    commands = parser.add_subcommands(required=True, dest="command")
    for name, (_, _, summary) in COMMANDS.items():
        commands.add_subcommand(name, ArgumentParser(description=summary), help=summary)
    return parser


def command_parser(command: str) -> ArgumentParser:
    """The parser of one command: DeltaCLI's for ``validate`` and ``sweep``; for ``edit``, ``plot`` and ``demo`` one
    of their function's arguments, with ``--config`` (what ``jsonargparse.auto_cli`` builds)."""
    parsers = importlib.import_module("lightning_delta.cli.parser")
    formatting = importlib.import_module("lightning_delta.cli.help_format")
    if command in ANALYSES:
        return parsers.DeltaCLI.config_parser(command)
    parser = ArgumentParser(
        prog=f"lightning-delta {command}", description=COMMANDS[command][2], formatter_class=formatting.HelpFormatter
    )
    parser.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
    parser.add_function_arguments(command_function(command), as_group=False, sub_configs=True)
    if command in ("edit", "compress"):
        next(action for action in parser._actions if action.dest == "edit").help = formatting.edit_help()
    return parser
