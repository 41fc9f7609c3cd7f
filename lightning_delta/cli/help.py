"""``lightning-delta COMMAND --help`` at once: the stored help of the locked environment, or the help kept in this one.

The stored help (:mod:`lightning_delta.cli._help`) is written by :func:`write_stored_help` from the live parsers
(:func:`live_help`) in the project's locked environment. It is printed only while the sources and libraries it was
written from are unchanged (:func:`fingerprint`); in any other environment the first call prints the live parser's help
(seconds: it imports torch, Lightning and transformers) and keeps it under :func:`help_cache_dir` with its own
fingerprint, so the next calls are fast again. This module imports neither torch nor Lightning.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_delta.cache import cache_root
from lightning_delta.cli.registry import COMMANDS, command_parser, import_command

__all__ = [
    "fingerprint",
    "generate_help",
    "generated_help",
    "help_cache_dir",
    "help_text",
    "live_help",
    "write_stored_help",
]

HELP_ENV = "LIGHTNING_DELTA_HELP"
HELP_WIDTH = 80  # the stored help is formatted for this many columns (argparse's width when not on a terminal)
HELP_PACKAGES = (
    "jsonargparse",
    "lightning",
    "torch",
    "torchmetrics",
    "torchvision",
    "transformers",
    "docstring_parser",
    "typeshed_client",
)  # the libraries whose signatures and formatting the help shows
HELP_MODULE = Path(__file__).with_name("_help.py")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # lightning_delta/


def live_help(command: str) -> str:
    """``lightning-delta COMMAND --help`` from the live parser (imports the library: seconds)."""
    import_command(command)
    return command_parser(command).format_help()


# The package that makes the help text (its descriptions, formatter and lists): a change anywhere in it counts. In
# the package's other modules only what the help can show counts: module-level code, functions' signatures and
# docstrings, and in classes their docstrings, attributes and ``__init__`` (jsonargparse reads its body for
# ``**kwargs``); not the bodies of functions nor the other methods of classes.
HELP_SOURCES = "cli/"  # the files under it, paths relative to the package


def _help_source(path: Path, name: str) -> bytes:
    """What of the package file ``name`` can show in the help (see :data:`HELP_SOURCES`)."""
    if not path.is_file():
        return b"<missing>"
    if name.startswith(HELP_SOURCES):
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

    root = PACKAGE_ROOT
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + _help_source(root / name, name) + b"\0")
    versions: dict[str, str | None] = {}
    for package in HELP_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": "{}.{}".format(*sys.version_info[:2]),
        "packages": versions,
        "files": list(files),
        "sources": digest.hexdigest(),
    }


def _help_applies() -> bool:
    """Whether a help formatted for :data:`HELP_WIDTH` columns may be printed: the terminal is that wide, no
    ``JSONARGPARSE_*`` variable changes the parsers and ``LIGHTNING_DELTA_HELP=live`` does not ask for the live one."""
    if os.environ.get(HELP_ENV) == "live" or any(name.startswith("JSONARGPARSE_") for name in os.environ):
        return False
    return shutil.get_terminal_size().columns >= HELP_WIDTH


def _stored_help(command: str) -> str | None:
    """The stored help of ``command`` if it is what the live parser would print here, else ``None``."""
    try:
        stored = importlib.import_module("lightning_delta.cli._help")
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
    environment = hashlib.sha256(f"{sys.prefix}\0{PACKAGE_ROOT}".encode()).hexdigest()[:16]
    return cache_root() / "help" / environment


def imported_package_files() -> list[str]:
    """The package modules imported so far, as paths relative to the package: what a help just made was made from."""
    root = PACKAGE_ROOT
    files = (
        getattr(module, "__file__", None)
        for name, module in list(sys.modules.items())
        if name.startswith("lightning_delta") and name != "lightning_delta.cli._help"
    )
    return sorted(Path(file).resolve().relative_to(root).as_posix() for file in files if file)


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
    """Write :mod:`lightning_delta.cli._help` from the live parsers (a fresh process): run it after changing anything
    the help shows, ``python -c "import lightning_delta.cli as c; c.write_stored_help()"``."""
    generated = generated_help()
    text = (
        '"""Written by ``lightning_delta.cli.write_stored_help()`` from the live parsers: do not edit.\n\n'
        'The help of each command, and the fingerprint of the sources and libraries it was made from."""\n\n'
        "FINGERPRINTS = {\n"
        + "".join(f"    {command!r}: {value!r},\n" for command, value in generated["fingerprints"].items())
        + "}\n\n"
        "HELP = {\n" + "".join(f"    {command!r}: {text!r},\n" for command, text in generated["help"].items()) + "}\n"
    )
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path
