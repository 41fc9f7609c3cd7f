"""The README's Python blocks, run as written: only hub ids and example paths become tiny local models, and GPUs
become CPU processes. Shared by ``tests/test_readme.py`` and the multi-process script
``tests/support/readme_multinode.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"

# What tells the README's Python blocks apart, in the order they appear.
BLOCKS = {
    "python_quick_start": "DeltaEditModule(",
    "export": "save_edited(",
    "existing_project": 'module_name="model"',
    "multi_node": "num_nodes=2",
    "compressed": "load_compressed(",
}


def python_blocks(readme: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)


def block(name: str) -> str:
    """The README block called ``name`` (see :data:`BLOCKS`), exactly as written."""
    found = [text for text in python_blocks() if BLOCKS[name] in text]
    if len(found) != 1:
        raise AssertionError(f"README should have one Python block with {BLOCKS[name]!r}, found {len(found)}.")
    return found[0]


def substitute(text: str, replacements: dict[str, str]) -> str:
    """``text`` with each key replaced; a key that is not in the text is an error (the README moved on)."""
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"{old!r} is no longer in the README block:\n{text}")
        text = text.replace(old, new)
    return text


def with_tiny_paths(text: str, pre_dir: str | Path, post_dir: str | Path, out_dir: str | Path | None = None) -> str:
    """``text`` with the README's hub ids and example paths replaced by tiny local ones; none may be left."""
    replacements = {
        '"meta-llama/Meta-Llama-3-8B-Instruct"': repr(str(post_dir)),  # the longer id first
        '"meta-llama/Meta-Llama-3-8B"': repr(str(pre_dir)),
        '"path/to/post"': repr(str(post_dir)),
        '"path/to/pre"': repr(str(pre_dir)),
        '"out/llama-bitdelta-3bit"': repr(str(out_dir)),
    }
    for old, new in replacements.items():
        text = text.replace(old, new)
    for left in ("meta-llama/", "path/to/", '"out/'):
        if left in text:
            raise AssertionError(f"{left!r} is still in the README block; map it to a tiny local model:\n{text}")
    return text


def multi_node_on_cpu(devices: int, strategy: str, logger: bool) -> str:
    """The multi-node block on ``devices`` CPU processes of one node, with ``strategy``; ``logger=False`` added
    when ``logger`` is False (the README's trainer has Lightning's default logger)."""
    text = substitute(
        block("multi_node"),
        {
            'accelerator="gpu", devices=8, num_nodes=2, strategy="ddp"': f'accelerator="cpu", devices={devices}, num_nodes=1, strategy={strategy!r}',
        },
    )
    if not logger:
        text = substitute(text, {"inference_mode=False,": "inference_mode=False, logger=False,"})
    return text
