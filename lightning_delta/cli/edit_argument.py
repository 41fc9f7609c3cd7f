"""The ``--edit`` options of a command line, checked before jsonargparse reads them (it would print its usage)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_delta.edits import DeltaEdit

__all__ = ["check_edit_argument"]


def _options(argv: Sequence[str], prefix: str) -> list[tuple[str, str | None]]:
    """``(option, value)`` for each ``--edit``-like option of ``argv``, in order (``--a b`` and ``--a=b`` alike)."""
    found = []
    for i, arg in enumerate(argv):
        if arg == prefix or arg.startswith(prefix + ".") or arg.startswith(prefix + "="):
            option, equals, value = arg.partition("=")
            found.append((option, value if equals else argv[i + 1] if i + 1 < len(argv) else None))
    return found


def _unknown_edit(value: str, option: str) -> ValueError:

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

    current: type[DeltaEdit] | None = None
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
        argument = option[len("--edit.") :].removeprefix("init_args.")
        if not chosen:
            later = next((value for option, value in options[index + 1 :] if option == "--edit"), None)
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
