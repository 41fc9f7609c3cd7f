"""Entry of a fresh measuring process: ``python -m benchmarks.worker '<json spec>'`` prints one result line."""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

from benchmarks.common import emit


def work(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the worker named by ``spec["kind"]``; an exception becomes ``{"error": ...}``."""
    try:
        if spec["kind"] == "riemann":
            from benchmarks.riemann import riemann_worker as worker
        elif spec["kind"] == "overhead":
            from benchmarks.riemann import overhead_worker as worker
        elif spec["kind"] == "paired":
            from benchmarks.riemann import paired_worker as worker
        elif spec["kind"] == "gpu":
            from benchmarks.riemann import gpu_worker as worker
        elif spec["kind"] == "edit":
            from benchmarks.edits import edit_worker as worker
        elif spec["kind"] == "lowrank_demo":
            from benchmarks.edits import demo_worker as worker
        else:
            raise ValueError(
                f"Unknown worker kind {spec['kind']!r}; known: riemann, paired, overhead, gpu, edit, lowrank_demo."
            )
        return worker(spec)
    except Exception as error:  # reported in the table, never a crash of the whole benchmark
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def main() -> None:
    emit(work(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
