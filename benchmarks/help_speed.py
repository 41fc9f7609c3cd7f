"""``python -m benchmarks.help_speed``: how long ``lightning-delta [COMMAND] --help`` takes, first and second call.

Each command runs twice as a user runs it (the console script beside this interpreter, a subprocess) with an empty
help cache of its own (``LIGHTNING_DELTA_CACHE``): the first call shows whether the stored help applies in this
environment (the locked one) or the live parser builds it; the second, whether the kept help comes back. It prints
a table, the seconds of each call and where the help came from; it asserts nothing (the goal, under 2 s, is read
off the table). ``--python`` measures another environment's console script, e.g. a venv pip resolved on its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning_delta.cli import COMMANDS as LIBRARY_COMMANDS  # imports neither torch nor Lightning

COMMANDS = ("", *LIBRARY_COMMANDS)


def timed_help(console: Path, command: str, cache: Path) -> tuple[float, bool]:
    """Seconds of one ``--help`` call, and whether it left a kept help behind (the live parser made it)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("COLUMNS", "LIGHTNING_DELTA_HELP") and not key.startswith("JSONARGPARSE_")
    }
    env["LIGHTNING_DELTA_CACHE"] = str(cache)
    before = set(cache.rglob("*.json"))
    started = time.perf_counter()
    subprocess.run([str(console), *([command] if command else []), "--help"], env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    return seconds, bool(set(cache.rglob("*.json")) - before)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose console script to time")
    args = parser.parse_args(argv)
    console = Path(args.python).with_name("lightning-delta")
    print(f"lightning-delta --help from {console}")
    print("| command | first call (s) | made by | second call (s) |\n|---|---:|---|---:|")
    worst = 0.0
    for command in COMMANDS:
        with tempfile.TemporaryDirectory() as cache:
            first, built = timed_help(console, command, Path(cache))
            second, _ = timed_help(console, command, Path(cache))
        made = "—" if not command else ("live parser, kept" if built else "stored help")
        worst = max(worst, second)
        print(f"| {command or '(top)'} | {first:.2f} | {made} | {second:.2f} |")
    print(f"slowest second call: {worst:.2f} s")


if __name__ == "__main__":
    main()
