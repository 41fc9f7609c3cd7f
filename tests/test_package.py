"""The public API: every exported name resolves, and the edits load without Lightning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lightning_delta


@pytest.mark.slow
def test_every_exported_name_resolves():
    for name in lightning_delta.__all__:
        assert getattr(lightning_delta, name) is not None, name
    assert lightning_delta.compute_delta.__module__ == "lightning_delta.delta"
    with pytest.raises(AttributeError, match="no_such_name"):
        lightning_delta.no_such_name  # noqa: B018


@pytest.mark.subprocess
def test_edits_import_without_lightning_and_dpo_is_always_registered():
    code = (
        "import sys, lightning_delta.edits\n"
        "assert 'lightning' not in sys.modules, 'edits pulled in Lightning'\n"
        "from lightning_delta.losses import available_losses\n"
        "assert 'dpo' in available_losses(), available_losses()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def _package_modules() -> dict[str, Path]:
    root = Path(lightning_delta.__file__).parent
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imported_modules(node, modules: dict, current: str) -> set[str]:
    """The package modules an import statement names (``from a.b import c`` counts a.b.c when that is a module)."""
    import ast

    names = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in modules and name != current}


# The console entry may defer its imports so that `lightning-delta --help` starts fast; nothing else may.
DEFERRED_IMPORTS_ALLOWED = {
    "lightning_delta.cli",
    "lightning_delta.cli.registry",
    "lightning_delta.cli.help",
    "lightning_delta.cli.edit_argument",
}


def test_imports_point_downward_and_none_hides_in_a_function():
    """Every import between the package's modules, at the top or inside a function, points downward: together they
    form no cycle. Only the console entry imports package modules inside functions (to start fast), never to dodge
    a cycle. Imports under ``if TYPE_CHECKING:`` are for annotations only and are not followed."""
    import ast

    modules = _package_modules()
    graph: dict[str, set[str]] = {}
    hidden = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        targets = set()
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            targets |= _imported_modules(node, modules, name)
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    deferred = _imported_modules(node, modules, name)
                    targets |= deferred
                    if deferred and name not in DEFERRED_IMPORTS_ALLOWED:
                        hidden.append(f"{name}:{node.lineno}")
        graph[name] = {
            target for target in targets if not name.startswith(target + ".") and target != "lightning_delta"
        }
    assert not hidden, f"package modules imported inside functions: {hidden}"

    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
