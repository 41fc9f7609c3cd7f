"""A sweep's grid: a base config and blocks of overrides on dotted keys, and the key that names each point."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["VOLATILE_KEYS", "apply_overrides", "canonical_json", "config_key", "drop_key", "expand_grid", "short_name"]

# Dotted keys that change where or how fast a point runs, not what it measures: left out of the key.
VOLATILE_KEYS = (
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.logger",
    "trainer.callbacks",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.enable_checkpointing",
    "trainer.default_root_dir",
    "trainer.profiler",
    "trainer.barebones",
    "riemann.filename",
    "model.accuracy_post",  # a sweep gives the accuracy at t = 0 it measured before: the same number
    "sweep",
    "config",
    "subcommand",
)


def expand_grid(grid: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The points of ``grid``: one dict of dotted-key overrides per point, in order.

    A mapping is one block; a list of mappings is several blocks whose points are concatenated. In a block a list
    value is swept and any other value is fixed; the last key varies fastest. A key of several dotted keys joined by
    commas takes a list of tuples, one value per key, so that these keys vary together.

    Example:
        >>> expand_grid({"edit.init_args.p": [0.1, 0.9], "edit.init_args.k": 0})
        [{'edit.init_args.p': 0.1, 'edit.init_args.k': 0}, {'edit.init_args.p': 0.9, 'edit.init_args.k': 0}]
        >>> len(expand_grid([{"a": [1, 2]}, {"b": [1, 2, 3]}]))
        5
        >>> expand_grid({"a,b": [[1, 2], [3, 4]]})
        [{'a': 1, 'b': 2}, {'a': 3, 'b': 4}]
    """
    if grid is None:
        return [{}]
    blocks = [grid] if isinstance(grid, Mapping) else list(grid)
    points: list[dict[str, Any]] = []
    for number, block in enumerate(blocks):
        if not isinstance(block, Mapping):
            raise ValueError(
                f"Each block of the sweep grid must be a mapping of dotted keys; block {number} is {block!r}."
            )
        keys = list(block)
        values = [block[key] if isinstance(block[key], (list, tuple)) else [block[key]] for key in keys]
        empty = [key for key, options in zip(keys, values) if len(options) == 0]
        if empty:
            raise ValueError(f"The sweep grid lists no values for {empty} in block {number}.")
        for combination in itertools.product(*values):
            point: dict[str, Any] = {}
            for key, value in zip(keys, combination):
                if "," not in key:
                    point[key] = value
                    continue
                names = [name.strip() for name in key.split(",")]
                if not isinstance(value, (list, tuple)) or len(value) != len(names):
                    raise ValueError(
                        f"The sweep grid key {key!r} varies {len(names)} keys together; each of its values "
                        f"must be a list of {len(names)}, got {value!r}."
                    )
                point.update(zip(names, value))
            points.append(point)
    return points


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``config`` with each dotted key of ``overrides`` set; ``config`` is not modified.

    Shorter keys are applied first, so ``edit`` (a class) is set before ``edit.init_args.p``. A string given for a
    key whose current value is a ``class_path`` mapping switches the class: ``init_args`` start empty unless the
    class stays the same.

    Example:
        >>> apply_overrides({"edit": {"class_path": "DARE", "init_args": {"p": 0.1}}}, {"edit.init_args.p": 0.9})
        {'edit': {'class_path': 'DARE', 'init_args': {'p': 0.9}}}
    """
    result = copy.deepcopy(dict(config))
    for key in sorted(overrides, key=lambda key: key.count(".")):
        value = copy.deepcopy(overrides[key])
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        current = node.get(leaf)
        if isinstance(value, str) and isinstance(current, dict) and "class_path" in current:
            same = short_name(current["class_path"]) == short_name(value)
            value = {"class_path": value, "init_args": copy.deepcopy(current.get("init_args", {})) if same else {}}
        node[leaf] = value
    return result


def short_name(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def drop_key(config: dict[str, Any], dotted: str) -> None:
    """Remove the dotted key from the nested dict ``config`` in place, if it is there."""
    *parents, leaf = dotted.split(".")
    node: Any = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def canonical_json(value: Any) -> str:
    """Sorted, compact JSON: equal configs give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def config_key(config: Mapping[str, Any], volatile: Iterable[str] = VOLATILE_KEYS) -> str:
    """The first 16 hex digits of the SHA-256 of ``config``'s canonical JSON, ``volatile`` keys left out.

    Example:
        >>> config_key({"a": 1, "trainer": {"devices": 8}}) == config_key({"trainer": {"devices": 1}, "a": 1})
        True
    """
    stripped = json.loads(canonical_json(config))
    for dotted in volatile:
        drop_key(stripped, dotted)
    return hashlib.sha256(canonical_json(stripped).encode("utf-8")).hexdigest()[:16]
