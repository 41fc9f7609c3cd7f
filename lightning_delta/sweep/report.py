"""What a sweep prints: a line per finished point (a progress bar on a terminal) and a closing table of the grid."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from lightning_delta.callbacks.result import RiemannResult
from lightning_delta.sweep.grid import short_name

if TYPE_CHECKING:
    from lightning_delta.sweep.loop import SweepPoint
    from lightning_delta.sweep.rows import SweepRow

__all__ = ["SweepReport", "point_label"]


def point_label(overrides: Mapping[str, Any]) -> str:
    """A point as its grid overrides, keys shortened to their last part and class paths to class names.

    Example:
        >>> point_label({"edit": "lightning_delta.edits.DARE", "edit.init_args.p": 0.9, "data.init_args.task": "mnist"})
        'DARE p=0.9 task=mnist'
        >>> point_label({})
        'the base config'
    """
    parts = []
    for key, value in overrides.items():
        if isinstance(value, str) and "." in value and key.rsplit(".", 1)[-1] in ("edit", "data", "model", "loss"):
            parts.append(short_name(value))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(parts) or "the base config"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4g}"


def _accuracy(result: RiemannResult) -> str:
    if result.accuracy_post is None or result.accuracy_edit is None:
        return "-"
    return f"{100 * result.accuracy_post:.1f}% -> {100 * result.accuracy_edit:.1f}%"


class SweepReport:
    """What ``lightning-delta sweep`` prints: one line per finished point (term, exact ΔL, accuracy, seconds), then a
    table of every point of the grid, with the ones left to run; on a terminal, a Rich progress bar over the grid.

    Args:
        file: where to print (default ``sys.stdout``).
        bar: draw the progress bar (``None``: when ``file`` is a terminal and Rich is installed). While it is drawn,
            :attr:`live` is true: a point's own progress (Lightning's bar would fight the live display for the
            terminal) comes through :meth:`batches` and :meth:`batch_done` instead.
    """

    def __init__(self, file: TextIO | None = None, bar: bool | None = None) -> None:
        self.file = file if file is not None else sys.stdout
        if bar is None:
            bar = bool(getattr(self.file, "isatty", lambda: False)()) and _rich_installed()
        self.bar = bar
        self._progress: Any = None
        self._grid_task: Any = None
        self._point_task: Any = None
        self._points: list[SweepPoint] = []
        self._before: set[str] = set()
        self._now: dict[str, SweepRow] = {}
        self._number = 0
        self._to_run = 0
        self._results: Path | None = None

    @property
    def live(self) -> bool:
        """Whether the progress bar is on the terminal now."""
        return self._progress is not None

    def print(self, text: str = "") -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.file, flush=True)

    def start(self, points: Sequence[SweepPoint], done: set[str], results: Path, to_run: int) -> None:
        """The sweep begins: ``points`` in all, those whose keys are in ``done`` already written, ``to_run`` to run."""
        self._points, self._results, self._to_run = list(points), Path(results), to_run
        self._before = {point.key for point in points if point.key in done}
        left = len(points) - len(self._before)
        self.print(
            f"Sweep: {_points(len(points))}, {len(self._before)} already in {results}, {left} to run"
            + (f", {to_run} of them now (--sweep.max_points)." if to_run < left else ".")
        )
        if self.bar and to_run:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(file=self.file)
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._grid_task = self._progress.add_task("sweep", total=to_run)
            self._progress.start()

    def point_started(self, point: SweepPoint) -> None:
        self._number += 1
        if self._progress is not None:
            if self._point_task is not None:
                self._progress.remove_task(self._point_task)
            description = f"point {self._number}/{self._to_run}: {point_label(point.overrides)}"
            self._point_task = self._progress.add_task(description, total=None)

    def batches(self, total: int | None) -> None:
        """The point under way has ``total`` batches (while :attr:`live`)."""
        if self._progress is not None and self._point_task is not None:
            self._progress.update(self._point_task, total=total, completed=0)

    def batch_done(self) -> None:
        """One more batch of the point under way is done (while :attr:`live`)."""
        if self._progress is not None and self._point_task is not None:
            self._progress.advance(self._point_task)

    def point_finished(self, row: SweepRow) -> None:
        """One line: the point, its term, exact ΔL, accuracy at W_post -> edited, and its seconds."""
        self._now[row.key] = row
        result = row.result
        self.print(
            f"[{self._number}/{self._to_run}] {point_label(row.overrides)}: term {_number(result.term)}, "
            f"exact ΔL {_number(result.exact)}, accuracy {_accuracy(result)}, {row.seconds:.1f} s"
        )
        if self._progress is not None:
            self._progress.advance(self._grid_task)

    def finish(self, rows: Sequence[SweepRow], max_points: int | None = None) -> None:
        """The closing table: every point with its numbers, or ``left``; then how to run what is left."""
        self.close()
        written = {row.key: row for row in rows}
        header = ("#", "point", "term", "exact ΔL", "accuracy", "seconds", "run")
        table = [header]
        for number, point in enumerate(self._points, start=1):
            row = written.get(point.key)
            label = point_label(point.overrides)
            if row is None:
                table.append((str(number), label, "", "", "", "", "left"))
                continue
            when = "now" if point.key in self._now else "before"
            table.append(
                (
                    str(number),
                    label,
                    _number(row.result.term),
                    _number(row.result.exact),
                    _accuracy(row.result),
                    f"{row.seconds:.1f}",
                    when,
                )
            )
        widths = [max(len(line[column]) for line in table) for column in range(len(header))]
        self.print()
        for line in table:
            self.print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        left = sum(1 for point in self._points if point.key not in written)
        summary = (
            f"{_points(len(self._now))} run now, {len(self._before)} before, {left} left; rows in {self._results}."
        )
        if left:
            stopped = f"--sweep.max_points {max_points} stopped the sweep: " if max_points is not None else ""
            summary += f" {stopped}run the same command again to run the {left} left."
        self.print(summary)

    def close(self) -> None:
        """Take the progress bar off the terminal (the lines printed above it stay)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _points(count: int) -> str:
    return f"{count} point{'' if count == 1 else 's'}"


def _rich_installed() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True
