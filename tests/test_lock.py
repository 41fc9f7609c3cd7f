"""``requirements.lock`` and ``pyproject.toml`` agree: every requirement of the package (and its test extra) is locked
at a version its range admits, and the lock holds exactly the packages those requirements reach."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.locked import LOCK, locked_versions, requires_lock

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
REFRESH = "run `make lock` (README: Refreshing the lock)"


def project_requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_requirement_is_locked_inside_its_range():
    locked = locked_versions()
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} of pyproject.toml is not in {LOCK.name}: {REFRESH}"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={locked[name]}, outside pyproject.toml's {requirement}: {REFRESH}"
        )


def test_the_lock_pins_each_package_once_with_hashes():
    text = LOCK.read_text()
    blocks = [block for block in text.split("\n") if block and not block.startswith((" ", "#"))]
    names = [canonicalize_name(block.split("==")[0].split("[")[0]) for block in blocks]
    assert len(names) == len(set(names)) == len(locked_versions())
    assert all(block.rstrip().endswith("\\") for block in blocks), "every pin is followed by its hashes"


@requires_lock
def test_the_lock_is_the_closure_of_the_requirements():
    """Walk the installed packages' own requirements from pyproject's: what they reach is what the lock pins (a
    stale pin or a missing one both fail). Needs the locked environment, whose metadata it reads."""
    environment = default_environment()
    reached: set[str] = set()
    todo = [(requirement, "") for requirement in project_requirements()]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in reached:
            continue
        reached.add(key)
        for text in metadata.requires(name) or []:
            todo.extend((Requirement(text), extra) for extra in [""] + sorted(requirement.extras))
    reached_names = {key.split("[")[0] for key in reached}
    locked = set(locked_versions())
    assert reached_names - locked == set(), f"reached but not locked: {REFRESH}"
    assert locked - reached_names - {"setuptools"} == set(), f"locked but reached by nothing: {REFRESH}"
