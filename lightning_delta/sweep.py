"""Resumable sweeps: a grid of analysis configs, one JSON row per finished point in a JSONL results file.

A sweep is a base config (the one ``lightning-delta validate`` reads) and a grid of overrides on dotted keys::

    grid:
      - edit: lightning_delta.edits.DARE            # a class name switches the edit (its init_args start empty)
        edit.init_args.p: [0.1, 0.5, 0.9]           # lists are swept, scalars are fixed
        edit.init_args.k: [0.0, 0.5]
      - edit: lightning_delta.edits.BitDelta
        edit.init_args.bits: [1, 2, 3, 4]

Each block is a Cartesian product; the blocks are concatenated (6 + 4 = 10 points above). Keys joined by commas
vary together (``data.init_args.task,model.model.init_args.task: [[mnist, mnist], [svhn, svhn]]``). Every point is
keyed by
the SHA-256 of its canonical config (sorted JSON, keys that do not change the numbers left out: devices, strategy,
loggers, ...). A row is appended, flushed and fsync'ed as soon as its point finishes, so a crash loses at most the
point under way; running the sweep again skips every key already in the file. A torn last line (the process died in
the middle of a write) is cut off before anything new is appended. While a sweep runs, the process that writes the
rows holds ``<results>.lock`` (a :class:`filelock.FileLock`, freed when the process ends, even when it is killed): a
second sweep on the same file stops at once instead of running the same points again and writing duplicate rows.

Each line of the results file is one :class:`SweepRow` (``dataclasses.asdict``; :meth:`SweepRow.from_dict` reads it
back): the point's key and config, its edit and data set, the :class:`~lightning_delta.callbacks.RiemannResult`
measured there, and when and with what it ran. The figures (:mod:`lightning_delta.plots`) and the demo's table read
these rows. This module runs no model: :mod:`lightning_delta.runner` gives :func:`run_sweep` the function that turns
one point into its row.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from filelock import FileLock, Timeout
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_delta.callbacks.result import RiemannResult

__all__ = [
    "ResultsFile",
    "ResultsLockedError",
    "SweepPoint",
    "SweepReport",
    "SweepRow",
    "apply_overrides",
    "config_key",
    "dataset_label",
    "expand_grid",
    "iter_rows",
    "library_versions",
    "make_points",
    "point_label",
    "run_sweep",
]

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
    "sweep",
    "config",
    "subcommand",
)

# The data module's arguments that pick its data, in the order the data set label names them (``Vision/mnist/test``).
DATASET_KEYS = ("task", "tasks", "name", "subset", "split")


# ------------------------------------------------------------------------------------------------------- the grid
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
            raise ValueError(f"Each block of the sweep grid must be a mapping of dotted keys; block {number} is {block!r}.")
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
                    raise ValueError(f"The sweep grid key {key!r} varies {len(names)} keys together; each of its values "
                                     f"must be a list of {len(names)}, got {value!r}.")
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
            same = _short_name(current["class_path"]) == _short_name(value)
            value = {"class_path": value, "init_args": copy.deepcopy(current.get("init_args", {})) if same else {}}
        node[leaf] = value
    return result


def _short_name(class_path: str) -> str:
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


@cache
def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on (those installed)."""
    versions = {"python": platform.python_version()}
    for package in ("lightning_delta", "torch", "lightning", "transformers", "torchmetrics", "jsonargparse", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


# ------------------------------------------------------------------------------------------------------ the rows
def dataset_label(data: Mapping[str, Any]) -> str:
    """The data set of a config's ``data`` section as a short label: the data module's name without ``DataModule``
    and the arguments that pick its data (:data:`DATASET_KEYS`).

    Example:
        >>> dataset_label({"class_path": "lightning_delta.datamodules.VisionDataModule",
        ...                "init_args": {"task": "mnist", "split": "test", "batch_size": 8}})
        'Vision/mnist/test'
    """
    name = str(data.get("class_path", "data")).rsplit(".", 1)[-1].removesuffix("DataModule") or "data"
    init_args = data.get("init_args") or {}
    picks = [str(init_args[key]) for key in DATASET_KEYS if init_args.get(key)]
    return "/".join([name, *picks])


@dataclass
class SweepRow:
    """One finished point of a sweep, as one line of the results file (its :func:`dataclasses.asdict`).

    What the figures (:mod:`lightning_delta.plots`), the demo's table and its findings read: the measured numbers
    are the fields of :attr:`result` (``row.result.term``, ``row.result.exact``, ``row.result.accuracy_edit``, ...).
    """

    key: str  # config_key of the point's config: a resumed sweep skips the keys already in the file
    index: int  # the point's position among the sweep's points
    overrides: dict[str, Any]  # the grid's dotted keys for this point, e.g. {"edit.init_args.p": 0.9}
    edit: dict[str, Any]  # the edit as edit.config(), e.g. {"name": "dare", "p": 0.9, "k": 0.0, ...}
    dataset: str  # the data it was measured on (dataset_label), e.g. "Digits/test", "GSM8K/test"
    result: RiemannResult  # what the RiemannCallback measured: term, trapezoid, exact ΔL, losses, accuracy, ...
    config: dict[str, Any]  # the point's whole config as the parser normalised it (what the key hashes)
    versions: dict[str, str]  # versions of Python and the libraries it ran with (library_versions)
    started: str  # local start time, e.g. "2025-01-31T12:00:00+0100"
    seconds: float  # wall-clock seconds the point took, set-up included

    @classmethod
    def of(cls, point: SweepPoint, edit: Mapping[str, Any], result: RiemannResult, started: float) -> SweepRow:
        """The row of ``point``, whose run began at ``started`` (a ``time.time()``) and ends now."""
        return cls(
            key=point.key,
            index=point.index,
            overrides=point.overrides,
            edit=dict(edit),
            dataset=dataset_label(point.config.get("data") or {}),
            result=result,
            config=point.config,
            versions=dict(library_versions()),
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            seconds=round(time.time() - started, 3),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepRow:
        """The row that :meth:`to_dict` gave ``data`` (a line of a results file).

        Rows of the previous format, which copied five numbers of the result into a ``"metrics"`` dict, are read too:
        the copy is dropped, and the accuracies, which only it held, move into the result.

        Raises:
            ValueError: ``data`` is no row: the missing and unknown fields are named.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"A sweep row must be a mapping of its fields, got {type(data).__name__}: {data!r:.200}.")
        data = dict(data)
        metrics = data.pop("metrics", None)
        known = [item.name for item in fields(cls)]
        missing = [name for name in known if name not in data]
        unknown = [name for name in data if name not in known]
        if missing or unknown or not isinstance(data["result"], Mapping):
            raise ValueError(
                f"Not a sweep row: missing fields {missing}, unknown fields {unknown}"
                f"{'' if missing or isinstance(data['result'], Mapping) else ', a result that is no mapping'}. "
                f"A row has the fields {', '.join(known)} (see lightning_delta.sweep.SweepRow); results files are "
                "written by `lightning-delta sweep` and `lightning-delta demo`."
            )
        result = dict(data["result"])
        if isinstance(metrics, Mapping):
            for name in ("accuracy_post", "accuracy_edit"):
                if result.get(name) is None and metrics.get(name) is not None:
                    result[name] = metrics[name]
        return cls(**{**data, "result": RiemannResult.from_dict(result)})


# -------------------------------------------------------------------------------------------------- the results
class ResultsFile:
    """An append-only JSONL file of sweep rows, each with a ``key``; safe against a crash at any moment.

    Reading tolerates a torn last line (a write cut short); :meth:`repair` cuts it off so that the next append
    starts on a fresh line. A malformed line elsewhere is a corrupt file and raises.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """Every complete row, in file order (a torn last line is ignored, with a warning)."""
        rows, torn = self._parse()
        if torn is not None:
            rank_zero_warn(f"{self.path}: the last line is incomplete (a write was cut short); it is ignored.")
        return rows

    def rows(self) -> list[SweepRow]:
        """Every complete row as a :class:`SweepRow`.

        Raises:
            ValueError: naming the file and the row that is no sweep row.
        """
        rows = []
        for number, row in enumerate(self.read()):
            try:
                rows.append(SweepRow.from_dict(row))
            except ValueError as error:
                raise ValueError(f"{self.path}, row {number + 1}: {error}") from None
        return rows

    def keys(self) -> set[str]:
        return {row["key"] for row in self.read() if "key" in row}

    def _parse(self) -> tuple[list[dict[str, Any]], int | None]:
        """The rows, and the byte offset where a torn last line starts (``None``: there is none).

        Every row is written with one ``write`` ending in a newline, so a crash can only leave a prefix of the last
        row without its newline: that tail is torn. A line that ended with a newline and is not JSON is corruption.
        """
        if not self.path.exists():
            return [], None
        data = self.path.read_bytes()
        body, _, tail = data.rpartition(b"\n") if b"\n" in data else (b"", b"", data)
        rows = []
        for number, line in enumerate(body.split(b"\n") if body else []):
            if line.strip():
                rows.append(self._row(line, number))
        if tail.strip():
            try:
                rows.append(self._row(tail, len(rows)))
            except ValueError:
                return rows, len(data) - len(tail)
        return rows, None

    def _row(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path}, line {number + 1}: not JSON ({error}); the file is corrupt.") from None
        if not isinstance(row, dict):
            raise ValueError(f"{self.path}, line {number + 1}: a row must be a JSON object, got {row!r}.")
        return row

    def repair(self) -> None:
        """Cut off a torn last line, and end a complete last row with a newline if it lacks one."""
        if not self.path.exists():
            return
        _, torn = self._parse()
        with open(self.path, "r+b") as handle:
            if torn is not None:
                handle.truncate(torn)
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, row: Mapping[str, Any]) -> None:
        """Write ``row`` as one line with a single write, then flush and fsync."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(row, default=str, ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


class ResultsLockedError(RuntimeError):
    """Another sweep holds the lock of this results file."""


class ResultsLock:
    """``<results>.lock`` beside the results file: held by the one process that writes the rows of a sweep.

    It is tried once (no waiting): a second sweep on the same file raises :class:`ResultsLockedError` instead of
    running the points that the first is running. The operating system frees the lock when its process ends, killed
    or not, so a lock file left behind blocks nothing.
    """

    def __init__(self, results: str | os.PathLike) -> None:
        self.results = Path(results)
        self.path = self.results.with_name(self.results.name + ".lock")
        self._lock = FileLock(str(self.path), timeout=0)
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise ResultsLockedError(
                f"Another sweep holds {self.results} (its lock {self.path} is taken). Two sweeps on one results file "
                "would run the same points twice and write duplicate rows. Wait for that sweep to finish (this one "
                "then resumes from its rows), or give this sweep another results file (--sweep.results)."
            ) from None
        self.held = True

    def release(self) -> None:
        if self.held:
            self._lock.release()
            self.held = False


# ---------------------------------------------------------------------------------------------------- the sweep
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
    points, seen = [], set()
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


# ------------------------------------------------------------------------------------------------- the report
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
            parts.append(_short_name(value))
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
        self.print(f"Sweep: {_points(len(points))}, {len(self._before)} already in {results}, {left} to run"
                   + (f", {to_run} of them now (--sweep.max_points)." if to_run < left else "."))
        if self.bar and to_run:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(file=self.file)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=console, transient=True)
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
        self.print(f"[{self._number}/{self._to_run}] {point_label(row.overrides)}: term {_number(result.term)}, "
                   f"exact ΔL {_number(result.exact)}, accuracy {_accuracy(result)}, {row.seconds:.1f} s")
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
            table.append((str(number), label, _number(row.result.term), _number(row.result.exact),
                          _accuracy(row.result), f"{row.seconds:.1f}", when))
        widths = [max(len(line[column]) for line in table) for column in range(len(header))]
        self.print()
        for line in table:
            self.print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        left = sum(1 for point in self._points if point.key not in written)
        summary = (f"{_points(len(self._now))} run now, {len(self._before)} before, {left} left; rows in "
                   f"{self._results}.")
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


def iter_rows(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> Iterator[SweepRow]:
    """The rows of one or several results files, in order.

    Raises:
        FileNotFoundError: naming every path that is not an existing file, before any row is read.
    """
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(path) for path in paths]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"No results file at {', '.join(missing)}: check the path, or write it with `lightning-delta sweep` "
            "(its --sweep.results) first."
        )
    return (row for path in paths for row in ResultsFile(path).rows())
