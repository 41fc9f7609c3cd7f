"""Where the library keeps what it makes for reuse: ``$LIGHTNING_DELTA_CACHE``, else
``$XDG_CACHE_HOME/lightning_delta``, else ``~/.cache/lightning_delta`` (the demo's pairs and derived models under
``demo/``, the help made outside the locked environment under ``help/``). Imports nothing heavy: the console entry
reads it before torch is loaded."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """The library's cache folder (see the module's docstring); not created here."""
    if os.environ.get("LIGHTNING_DELTA_CACHE"):
        return Path(os.environ["LIGHTNING_DELTA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_delta"
