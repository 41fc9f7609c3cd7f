"""The resumable loop of a sweep: its points, run in order, each row appended as soon as its point finishes.

This module runs no model: :func:`lightning_delta.sweep.run.sweep` gives :func:`run_sweep` the function that turns one
point into its row.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_info

from lightning_delta.sweep.grid import apply_overrides, config_key, expand_grid
from lightning_delta.sweep.results import ResultsFile, ResultsLock

if TYPE_CHECKING:
    from lightning_delta.sweep.report import SweepReport
    from lightning_delta.sweep.rows import SweepRow

__all__ = ["SweepPoint", "make_points", "run_sweep"]


@dataclass
class SweepPoint:
    """One point of a sweep: its overrides, the full config they give, and that config's key."""

    overrides: dict[str, Any]
    config: dict[str, Any]
    key: str = ""
    index: int = 0

    def __post_init__(self) -> None:
        if not self.key:
            self.key = config_key(self.config)


def make_points(
    base: Mapping[str, Any],
    grid: Any,
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[SweepPoint]:
    """The sweep's points: ``base`` with each grid point's overrides, passed through ``normalize`` (the parser, which
    fills in defaults so that spelling a default out does not change the key). Points with equal keys are merged."""
    points: list[SweepPoint] = []
    seen: set[str] = set()
    for overrides in expand_grid(grid):
        config = apply_overrides(base, overrides)
        if normalize is not None:
            config = normalize(config)
        point = SweepPoint(overrides, config, index=len(points))
        if point.key in seen:
            continue
        seen.add(point.key)
        points.append(point)
    return points


def run_sweep(
    points: Sequence[SweepPoint],
    results: str | os.PathLike,
    run_point: Callable[[SweepPoint], SweepRow],
    should_write: Callable[[], bool] = lambda: True,
    max_points: int | None = None,
    report: SweepReport | None = None,
) -> list[SweepRow]:
    """Run every point whose key is not in ``results`` yet, appending its row as soon as it finishes.

    The process that writes holds the results file's :class:`ResultsLock` from start to end; the others take no
    lock.

    Args:
        points: from :func:`make_points`.
        results: the JSONL file; created if missing, resumed if present.
        run_point: runs one point and returns its row (:meth:`SweepRow.of`).
        should_write: asked at the start and after each point; False on the processes of a distributed run that do
            not write (every rank runs every point; the rank is only sure once the first trainer has set up, and the
            lock follows the answer).
        max_points: stop after running this many new points (``None``: all).
        report: prints what the sweep does (a line per finished point, a closing table); ``None``: one log line.

    Returns:
        Every row of the results file that belongs to ``points``, old and new, in the order of ``points``.

    Raises:
        ResultsLockedError: another sweep holds ``results`` (nothing is run or written).
    """
    lock = ResultsLock(results)
    try:
        return _run_sweep(points, ResultsFile(results), lock, run_point, should_write, max_points, report)
    finally:
        lock.release()
        if report is not None:
            report.close()


def _run_sweep(
    points: Sequence[SweepPoint],
    results_file: ResultsFile,
    lock: ResultsLock,
    run_point: Callable[[SweepPoint], SweepRow],
    should_write: Callable[[], bool],
    max_points: int | None,
    report: SweepReport | None,
) -> list[SweepRow]:
    if should_write():
        lock.acquire()
        results_file.repair()
    done = results_file.keys()
    todo = [point for point in points if point.key not in done]
    run = todo if max_points is None else todo[:max_points]
    if report is not None:
        report.start(points, done, results_file.path, len(run))
    else:
        rank_zero_info(
            f"Sweep: {len(points)} points, {len(points) - len(todo)} already in {results_file.path}, {len(todo)} to run."
        )
    for point in run:
        if report is not None:
            report.point_started(point)
        row = run_point(point)
        writes = should_write()
        if writes and not lock.held:
            lock.acquire()
        elif lock.held and not writes:
            lock.release()
        if writes:
            results_file.append(row.to_dict())
        if report is not None:
            report.point_finished(row)
    keys = {point.key: point.index for point in points}
    rows = sorted((row for row in results_file.rows() if row.key in keys), key=lambda row: keys[row.key])
    if report is not None:
        report.finish(rows, max_points)
    return rows
