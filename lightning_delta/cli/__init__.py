"""The ``lightning-delta`` command line: it parses the command and calls the function that runs it.

::

    lightning-delta validate --config configs/llama3-8b-instruct-gsm8k.yaml --edit.p 0.9   # one Riemann analysis
    lightning-delta sweep    --config configs/llama3-8b-instruct-gsm8k.yaml                # its grid, resumable
    lightning-delta edit     --model post/ --pretrained pre/ --edit DARE --edit.p 0.9 --output_dir edited/
    lightning-delta compress --model post/ --pretrained pre/ --edit BitDelta --output_dir delta/
    lightning-delta plot     --results results.jsonl --output_dir figures/
    lightning-delta demo                                                                   # offline, a few minutes

``validate`` and ``sweep`` read the same config, parsed by :class:`~lightning_delta.cli.parser.DeltaCLI` (a
LightningCLI): ``--print_config`` prints the whole config, and any key can be
overridden on the command line (``--trainer.devices 8``). ``edit``, ``plot`` and ``demo`` are parsed from their
functions' signatures by jsonargparse (also with ``--config`` and ``--print_config``).

Two things happen here and nowhere else:

- Help comes back at once. This module imports neither torch nor Lightning: ``lightning-delta --help`` is built
  here, and ``lightning-delta COMMAND --help`` prints the command's help from :mod:`lightning_delta.cli._help`, which
  :func:`write_stored_help` writes from the live parsers (:func:`live_help`) in the project's locked environment.
  It is printed only while the sources and libraries it was written from are unchanged (:func:`fingerprint`); in
  any other environment the first call prints the live parser's help (seconds: it imports torch, Lightning and
  transformers) and keeps it under :func:`help_cache_dir` with its own fingerprint, so the next calls are fast
  again. Either is printed only while the terminal is at least :data:`HELP_WIDTH` columns wide and no
  ``JSONARGPARSE_*`` variable changes the parsers; ``LIGHTNING_DELTA_HELP=live`` forces the live help. The tests
  keep the stored help equal to the live parsers' output.
- Errors come back as their message. :func:`main` prints ``lightning-delta: error: <message>`` on stderr and
  exits with status 1 (130 when interrupted); ``--debug`` anywhere on the line, or ``LIGHTNING_DELTA_DEBUG=1``,
  shows the traceback instead. :func:`run` raises, for callers in Python.

The package: this module (the entry point), :mod:`~lightning_delta.cli.registry` (the commands and their parsers),
:mod:`~lightning_delta.cli.help` (the stored and kept help), :mod:`~lightning_delta.cli.edit_argument` (the
``--edit`` check), and, imported only to run a command, :mod:`~lightning_delta.cli.parser` (``DeltaCLI``),
:mod:`~lightning_delta.cli.help_format` (its help's formatting and lists) and :mod:`~lightning_delta.cli.commands`
(``validate``, ``edit`` and ``plot``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning_delta.cli.edit_argument import check_edit_argument
from lightning_delta.cli.help import (
    HELP_WIDTH,
    fingerprint,
    generate_help,
    generated_help,
    help_cache_dir,
    help_text,
    live_help,
    write_stored_help,
)
from lightning_delta.cli.registry import (
    ANALYSES,
    COMMANDS,
    DEBUG_ENV,
    command_function,
    command_parser,
    import_command,
    top_parser,
)
from lightning_delta.shipped import resolve_config_argument

__all__ = [
    "COMMANDS",
    "HELP_WIDTH",
    "check_edit_argument",
    "close_process_group",
    "command_parser",
    "fingerprint",
    "generate_help",
    "generated_help",
    "help_cache_dir",
    "help_text",
    "live_help",
    "main",
    "run",
    "write_stored_help",
]


def __getattr__(name: str) -> Any:
    """The commands' functions and DeltaCLI, as ``lightning_delta.cli.<name>``, imported on first use."""
    if name in COMMANDS:
        return command_function(name)
    if name == "DeltaCLI":
        return importlib.import_module("lightning_delta.cli.parser").DeltaCLI
    raise AttributeError(f"module 'lightning_delta.cli' has no attribute {name!r}")


def run(argv: Sequence[str] | None = None) -> Any:
    """Run one command and return what it made (the CLI, rows, paths); errors are raised. ``main`` is the console
    script around it. ``--help`` (and a bad command line) exits with :class:`SystemExit`, as argparse does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top_parser().parse_args(argv)  # prints the help, or the error, and exits
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if rest in (["--help"], ["-h"]):
        sys.stdout.write(help_text(command))
        sys.stdout.flush()
        raise SystemExit(0)
    check_edit_argument(rest)
    rest = resolve_config_argument(rest)
    import_command(command)
    if command in ANALYSES:
        return command_function(command)(rest)
    parser = command_parser(command)
    config = parser.parse_args(rest)
    arguments = parser.instantiate(config)
    arguments.pop("config", None)
    return command_function(command)(**arguments)


def error_message(error: BaseException) -> str:
    """The one line ``main`` prints for ``error``: the message of the library's errors (ValueError, RuntimeError,
    OSError), the type and message of any other."""
    message = str(error).strip() or type(error).__name__
    if isinstance(error, (ValueError, RuntimeError, OSError)):
        return message
    return f"{type(error).__name__}: {message}"


def close_process_group() -> None:
    """Destroy the default process group that a distributed command leaves open (Lightning keeps it for the next
    ``trainer`` call). Left to the interpreter's exit, gloo's threads were torn down in no fixed order, and under load
    a process aborted after its work was done ('terminate called without an active exception', status -6)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-delta`` console script: exit status 0 on success; on an error its message alone
    (status 1), the traceback with ``--debug`` or ``LIGHTNING_DELTA_DEBUG=1``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        run(argv)
        close_process_group()
    except KeyboardInterrupt:
        if debug:
            raise
        print("lightning-delta: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:  # noqa: BLE001 - the command line shows every error as its message
        if debug:
            raise
        print(f"lightning-delta: error: {error_message(error)}", file=sys.stderr)
        print(f"(the traceback: add --debug, or set {DEBUG_ENV}=1)", file=sys.stderr)
        raise SystemExit(1) from None
