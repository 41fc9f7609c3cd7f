"""The ``lightning-delta`` command line: it parses the command and calls the function that runs it.

::

    lightning-delta validate --config configs/llama3-8b-instruct-gsm8k.yaml --edit.p 0.9   # one Riemann analysis
    lightning-delta sweep    --config configs/llama3-8b-instruct-gsm8k.yaml                # its grid, resumable
    lightning-delta edit     --model post/ --pretrained pre/ --edit DARE --edit.p 0.9 --output_dir edited/
    lightning-delta compress --model post/ --pretrained pre/ --edit BitDelta --output_dir delta/
    lightning-delta plot     --results results.jsonl --output_dir figures/
    lightning-delta demo                                                                   # offline, a few minutes

``validate`` and ``sweep`` read the same config, parsed by :class:`~lightning_delta.runner.DeltaCLI` (a
LightningCLI, see :mod:`lightning_delta.runner`): ``--print_config`` prints the whole config, and any key can be
overridden on the command line (``--trainer.devices 8``). ``edit``, ``plot`` and ``demo`` are parsed from their
functions' signatures by jsonargparse (also with ``--config`` and ``--print_config``).

Two things happen here and nowhere else:

- Help comes back at once. This module imports neither torch nor Lightning: ``lightning-delta --help`` is built
  here, and ``lightning-delta COMMAND --help`` prints the command's help from :mod:`lightning_delta._help`, which
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
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_delta.cache import cache_root
from lightning_delta.shipped import resolve_config_argument

__all__ = [
    "COMMANDS",
    "check_edit_argument",
    "close_process_group",
    "command_parser",
    "fingerprint",
    "help_cache_dir",
    "help_text",
    "live_help",
    "main",
    "run",
    "write_stored_help",
]

# The commands: the module and function that run each, and its line in `lightning-delta --help`. The ANALYSES take
# the rest of the command line, which DeltaCLI parses (a LightningCLI: it builds the trainer too); the others take
# what a parser made from their function's signature parsed.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "validate": ("lightning_delta.runner", "validate",
                 "One Riemann analysis of an edit: term, trapezoid and exact ΔL, printed and written to a run "
                 "directory."),
    "sweep": ("lightning_delta.runner", "sweep",
              "A grid of Riemann analyses, one JSONL row per point, resumable; a line per point, a closing table."),
    "edit": ("lightning_delta.runner", "edit",
             "Write the edited model W_pre + F(ΔW) with save_pretrained (safetensors), tokenizer files beside it."),
    "compress": ("lightning_delta.compress.command", "compress",
                 "Write the edited delta F(ΔW) in its family's compact form (safetensors), to load onto the base."),
    "plot": ("lightning_delta.runner", "plot", "Draw the figures of one or more sweep results files."),
    "estimate": ("lightning_delta.estimate", "estimate", "Peak memory per process of a config, from config.json."),
    "plan": ("lightning_delta.plan", "plan",
             "Plan an edit per tensor under a budget from the Riemann terms, measure its exact ΔL, write the plan."),
    "demo": ("lightning_delta.demo", "demo",
             "Build a real small pre/post pair on the bundled digits, sweep the edits, print a table (offline)."),
}
ANALYSES = ("validate", "sweep")
CONFIG_HELP = "Path to a configuration file."
DEBUG_ENV = "LIGHTNING_DELTA_DEBUG"
HELP_ENV = "LIGHTNING_DELTA_HELP"
HELP_WIDTH = 80  # the stored help is formatted for this many columns (argparse's width when not on a terminal)
HELP_PACKAGES = ("jsonargparse", "lightning", "torch", "torchmetrics", "torchvision", "transformers",
                 "docstring_parser", "typeshed_client")  # the libraries whose signatures and formatting the help shows
HELP_MODULE = Path(__file__).with_name("_help.py")
DESCRIPTION = (
    "Edit the delta parameters of a post-trained model and measure what the edit does to the loss. "
    "`lightning-delta COMMAND --help` lists a command's arguments. On an error only its message is printed: add "
    f"--debug (or set {DEBUG_ENV}=1) for the traceback."
)


def command_function(command: str) -> Callable[..., Any]:
    """The function that runs ``command`` (importing it imports torch and Lightning)."""
    module, name, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), name)


def _import_command(command: str) -> None:
    """Import the runner and ``command``'s module: the DataModules, edits and evaluators they define are what the help
    lists and what a class name resolves to. The demo's module only for ``demo``, so that ``validate`` and the
    others never depend on it."""
    importlib.import_module("lightning_delta.runner")
    importlib.import_module(COMMANDS[command][0])


def __getattr__(name: str) -> Any:
    """The commands' functions and DeltaCLI, as ``lightning_delta.cli.<name>``, imported on first use."""
    if name in COMMANDS:
        return command_function(name)
    if name == "DeltaCLI":
        return importlib.import_module("lightning_delta.runner").DeltaCLI
    raise AttributeError(f"module 'lightning_delta.cli' has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------- parsers
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
    runner = importlib.import_module("lightning_delta.runner")
    if command in ANALYSES:
        return runner.DeltaCLI.config_parser(command)
    parser = ArgumentParser(prog=f"lightning-delta {command}", description=COMMANDS[command][2],
                            formatter_class=runner.HelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
    parser.add_function_arguments(command_function(command), as_group=False, sub_configs=True)
    if command in ("edit", "compress"):
        next(action for action in parser._actions if action.dest == "edit").help = runner.edit_help()
    return parser


# -------------------------------------------------------------------------------------------------------- help
def live_help(command: str) -> str:
    """``lightning-delta COMMAND --help`` from the live parser (imports the library: seconds)."""
    _import_command(command)
    return command_parser(command).format_help()


# The modules that make the help text (its descriptions, formatter and lists): a change anywhere in them counts. In
# the package's other modules only what the help can show counts: module-level code, functions' signatures and
# docstrings, and in classes their docstrings, attributes and ``__init__`` (jsonargparse reads its body for
# ``**kwargs``); not the bodies of functions nor the other methods of classes.
HELP_SOURCES = ("cli.py", "runner.py")


def _help_source(path: Path, name: str) -> bytes:
    """What of the package file ``name`` can show in the help (see :data:`HELP_SOURCES`)."""
    if not path.is_file():
        return b"<missing>"
    if name in HELP_SOURCES:
        return path.read_bytes()
    tree = ast.parse(path.read_bytes(), filename=name)
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            node.body = [item for item in node.body if not isinstance(item, functions) or item.name == "__init__"]
        elif isinstance(node, functions) and node.name != "__init__":
            docstring = ast.get_docstring(node, clean=False)
            node.body = [ast.Expr(ast.Constant(docstring))] if docstring is not None else []
    return ast.dump(tree).encode()


def fingerprint(files: Sequence[str]) -> dict[str, Any]:
    """What a command's help was made from: Python's version, :data:`HELP_PACKAGES`' versions, and the SHA-256 of
    what the help can show of the package's ``files`` (paths relative to the package; see :data:`HELP_SOURCES`)."""
    from importlib import metadata

    root = Path(__file__).parent
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + _help_source(root / name, name) + b"\0")
    versions = {}
    for package in HELP_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": "%d.%d" % sys.version_info[:2], "packages": versions, "files": list(files),
            "sources": digest.hexdigest()}


def _help_applies() -> bool:
    """Whether a help formatted for :data:`HELP_WIDTH` columns may be printed: the terminal is that wide, no
    ``JSONARGPARSE_*`` variable changes the parsers and ``LIGHTNING_DELTA_HELP=live`` does not ask for the live one."""
    if os.environ.get(HELP_ENV) == "live" or any(name.startswith("JSONARGPARSE_") for name in os.environ):
        return False
    return shutil.get_terminal_size().columns >= HELP_WIDTH


def _stored_help(command: str) -> str | None:
    """The stored help of ``command`` if it is what the live parser would print here, else ``None``."""
    try:
        stored = importlib.import_module("lightning_delta._help")
    except ImportError:
        return None
    made_from = stored.FINGERPRINTS.get(command)
    if made_from is None or made_from != fingerprint(made_from["files"]):
        return None
    return stored.HELP.get(command)


def help_cache_dir() -> Path:
    """Where the help made in this environment is kept: ``$LIGHTNING_DELTA_CACHE/help``, else
    ``$XDG_CACHE_HOME/lightning_delta/help``, else ``~/.cache/lightning_delta/help``; one folder per environment (a
    hash of the interpreter's prefix and the package's location), so that two virtual environments never share it."""
    environment = hashlib.sha256(f"{sys.prefix}\0{Path(__file__).resolve().parent}".encode()).hexdigest()[:16]
    return cache_root() / "help" / environment


def imported_package_files() -> list[str]:
    """The package modules imported so far, as paths relative to the package: what a help just made was made from."""
    root = Path(__file__).resolve().parent
    return sorted(
        Path(module.__file__).resolve().relative_to(root).as_posix()
        for name, module in list(sys.modules.items())
        if name.startswith("lightning_delta") and name != "lightning_delta._help" and getattr(module, "__file__", None)
    )


def _cached_help(command: str) -> str | None:
    """The help of ``command`` that an earlier call made in this environment, if it is still current."""
    try:
        cached = json.loads((help_cache_dir() / f"{command}.json").read_text(encoding="utf-8"))
        made_from, text = cached["fingerprint"], cached["help"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return text if made_from == fingerprint(made_from["files"]) else None


def _cache_help(command: str, text: str) -> None:
    """Keep ``text``, the live help of ``command`` just made in this process, with what it was made from (the package
    modules imported so far). A cache that cannot be written is left alone: the help was printed all the same."""
    files = imported_package_files()
    path = help_cache_dir() / f"{command}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"fingerprint": fingerprint(files), "help": text}), encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        pass


def help_text(command: str) -> str:
    """``lightning-delta COMMAND --help``: the stored help when it is current, else the help an earlier call made in
    this environment (see :func:`help_cache_dir`), else the live parser's, which is then kept for the next call.

    The stored help was made in the project's locked environment; in any other (a release of transformers or
    jsonargparse pip chose on another day), the first call takes seconds and the later ones do not."""
    if not _help_applies():
        return live_help(command)
    stored = _stored_help(command)
    if stored is None:
        stored = _cached_help(command)
    if stored is None:
        previous = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = str(HELP_WIDTH)  # the kept help is formatted as the stored one is
        try:
            stored = live_help(command)
        finally:
            if previous is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = previous
        _cache_help(command, stored)
    return stored


def generate_help() -> dict[str, Any]:
    """Every command's live help (at :data:`HELP_WIDTH` columns) and the fingerprint of what it was made from: the
    package modules imported once its parser is built. Run it in a fresh process (as :func:`write_stored_help`
    does): the known subclasses a help lists are the imported ones, so ``demo``, whose module imports more, comes
    last (:data:`COMMANDS`' order)."""
    if shutil.get_terminal_size().columns != HELP_WIDTH:
        raise RuntimeError(f"generate_help formats for {HELP_WIDTH} columns: run it with COLUMNS={HELP_WIDTH}.")
    texts, fingerprints = {}, {}
    for command in COMMANDS:
        texts[command] = live_help(command)
        fingerprints[command] = fingerprint(imported_package_files())
    return {"help": texts, "fingerprints": fingerprints}


def generated_help() -> dict[str, Any]:
    """:func:`generate_help` in a fresh Python process."""
    env = {**os.environ, "COLUMNS": str(HELP_WIDTH)}
    env.pop(HELP_ENV, None)
    for name in [name for name in env if name.startswith("JSONARGPARSE_")]:
        env.pop(name)
    code = "import json, lightning_delta.cli as cli; print(json.dumps(cli.generate_help()))"
    finished = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"Generating the help failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def write_stored_help(path: str | os.PathLike = HELP_MODULE) -> Path:
    """Write :mod:`lightning_delta._help` from the live parsers (a fresh process): run it after changing anything
    the help shows, ``python -c "import lightning_delta.cli as c; c.write_stored_help()"``."""
    generated = generated_help()
    text = (
        '"""Written by ``lightning_delta.cli.write_stored_help()`` from the live parsers: do not edit.\n\n'
        "The help of each command, and the fingerprint of the sources and libraries it was made from.\"\"\"\n\n"
        "FINGERPRINTS = {\n"
        + "".join(f"    {command!r}: {value!r},\n" for command, value in generated["fingerprints"].items())
        + "}\n\n"
        "HELP = {\n"
        + "".join(f"    {command!r}: {text!r},\n" for command, text in generated["help"].items())
        + "}\n"
    )
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- running
def _options(argv: Sequence[str], prefix: str) -> list[tuple[str, str | None]]:
    """``(option, value)`` for each ``--edit``-like option of ``argv``, in order (``--a b`` and ``--a=b`` alike)."""
    found = []
    for i, arg in enumerate(argv):
        if arg == prefix or arg.startswith(prefix + ".") or arg.startswith(prefix + "="):
            option, equals, value = arg.partition("=")
            found.append((option, value if equals else argv[i + 1] if i + 1 < len(argv) else None))
    return found


def _unknown_edit(value: str, option: str) -> ValueError:
    import difflib

    from lightning_delta.edits import EDITS

    known = {cls.__name__: name for name, cls in EDITS.items()}
    spellings = {**{name.lower(): cls for cls, name in known.items()}, **{cls.lower(): cls for cls in known}}
    close = difflib.get_close_matches(value.lower(), list(spellings), n=1, cutoff=0.6)
    hint = f" Did you mean {spellings[close[0]]}?" if close else ""
    return ValueError(
        f"Unknown edit {value!r} for {option}.{hint} The edits are {', '.join(known)} (or a class path such as "
        "lightning_delta.edits.DARE); set their arguments with --edit.<argument>, e.g. --edit DARE --edit.p 0.9."
    )


def check_edit_argument(argv: Sequence[str]) -> None:
    """Check the ``--edit`` options of a command line before jsonargparse reads them (it would print its usage and
    "Does not validate against any of the Union subtypes"): ``--edit NAME`` and ``--edit.help NAME`` must name an
    edit (the nearest is suggested), ``--edit.<argument>`` must come after ``--edit NAME`` and be one of that edit's
    arguments. Class paths of other packages, config files and JSON values are left to jsonargparse."""
    options = _options(argv, "--edit")
    if not options:
        return
    from lightning_delta.edits import edit_class

    current: type | None = None
    chosen = False  # whether an --edit NAME came before
    for index, (option, value) in enumerate(options):
        if option in ("--edit", "--edit.class_path") or (option == "--edit.help" and value is not None):
            if value is None or value.lstrip().startswith("{") or Path(value).exists():
                current, chosen = None, option != "--edit.help" or chosen
                continue
            cls = edit_class(value)
            if cls is None and "." not in value:
                raise _unknown_edit(value, option)
            if option != "--edit.help":
                current, chosen = cls, True
            continue
        argument = option[len("--edit."):].removeprefix("init_args.")
        if not chosen:
            later = next((value for option, value in options[index + 1:] if option == "--edit"), None)
            if later is not None:
                raise ValueError(
                    f"{option} comes before --edit {later}: put --edit CLASS before its arguments, e.g. "
                    f"--edit {later} {option} {value}."
                )
            continue  # the edit comes from a config file: jsonargparse checks its arguments
        if current is not None and argument not in current.parameter_names():
            raise ValueError(
                f"{current.__name__} takes no `{argument}` ({option}); its arguments are "
                f"{', '.join(current.parameter_names())} (--edit.<argument>; all of them with --edit.help "
                f"{current.__name__})."
            )


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
    _import_command(command)
    if command in ANALYSES:
        return command_function(command)(rest)
    parser = command_parser(command)
    config = parser.parse_args(rest)
    # `instantiate_classes` is the name before jsonargparse 4.49
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    arguments = instantiate(config)
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


if __name__ == "__main__":
    main()
