"""The project's locked environment (``requirements.lock``, what ``make test`` and ``.ci/run`` install).

A test that compares with a number or text stored in the repository, made in the locked environment, runs only there:
it carries :data:`requires_lock`, whose skip reason names the packages that differ. Everything else runs anywhere.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

LOCK = Path(__file__).resolve().parents[2] / "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)", re.M)


def locked_versions(path: Path = LOCK) -> dict[str, str]:
    """Every pinned package of the lock, by canonical name."""
    return {canonicalize_name(name): version for name, version in _PIN.findall(path.read_text())}


@cache
def differences_from_lock() -> tuple[str, ...]:
    """The locked packages whose installed version differs (or that are missing), as ``name locked -> installed``."""
    found = []
    for name, version in sorted(locked_versions().items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            found.append(f"{name} {version} -> {installed}")
    return tuple(found)


requires_lock = pytest.mark.skipif(
    bool(differences_from_lock()),
    reason="compares with a figure made in the locked environment (requirements.lock), and this one differs: "
    + ", ".join(differences_from_lock()[:5]),
)
