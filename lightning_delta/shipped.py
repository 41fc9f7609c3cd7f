"""The configs that ship inside the package (``lightning_delta/configs/``, also ``configs/`` in a clone), found by
name: ``lightning-delta validate --config llama3-8b-instruct-gsm8k`` works from any directory, the wheel included.

Example:
    >>> shipped_config("demo").name, "llama3-8b-instruct-gsm8k" in shipped_config_names()
    ('demo.yaml', True)
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIGS_DIR", "resolve_config_argument", "shipped_config", "shipped_config_names"]

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
_CONFIG_FLAGS = ("--config", "-c")


def shipped_config_names() -> list[str]:
    """The names of the shipped configs (file names without ``.yaml``), sorted."""
    return sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml"))


def shipped_config(name: str) -> Path:
    """The shipped config ``name`` (with or without ``.yaml``).

    Raises:
        FileNotFoundError: no shipped config has that name; the message lists them.
    """
    path = CONFIGS_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        raise FileNotFoundError(
            f"{name!r} is neither a config file here nor a shipped config; the shipped configs are "
            f"{', '.join(shipped_config_names())} (give a path to use a file of your own)."
        )
    return path


def resolve_config_argument(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config NAME`` (or ``-c NAME``, ``--config=NAME``) that names no existing file replaced by
    the shipped config of that name. A value with a path separator or a ``.yaml``/``.yml``/``.json`` suffix is a path
    the user means: left to the parser (which says it is missing) unless a shipped config has that file name."""
    resolved = list(argv)
    for index, arg in enumerate(resolved):
        if arg in _CONFIG_FLAGS and index + 1 < len(resolved):
            resolved[index + 1] = _resolve(resolved[index + 1])
        elif arg.startswith("--config="):
            resolved[index] = "--config=" + _resolve(arg.split("=", 1)[1])
    return resolved


def _resolve(value: str) -> str:
    if Path(value).exists() or value.lstrip().startswith(("{", "[")):
        return value
    if "/" in value or "\\" in value:
        return value
    if value.endswith((".yml", ".json")):
        return value
    return str(shipped_config(value))
