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
these rows.

The package, one module per job: :mod:`~lightning_delta.sweep.grid` (the grid and the point keys),
:mod:`~lightning_delta.sweep.rows` (:class:`SweepRow`), :mod:`~lightning_delta.sweep.results` (the file and its lock),
:mod:`~lightning_delta.sweep.loop` (the resumable loop, which runs no model), :mod:`~lightning_delta.sweep.report`
(what it prints), :mod:`~lightning_delta.sweep.reuse` (what points share in one process) and
:mod:`~lightning_delta.sweep.run` (:func:`~lightning_delta.sweep.run.sweep`: parse, check and run the points under
``trainer.validate``). This module re-exports the first five, which import no model code; import ``sweep`` itself
from :mod:`lightning_delta.sweep.run`.
"""

from lightning_delta.sweep.grid import VOLATILE_KEYS, apply_overrides, canonical_json, config_key, drop_key, expand_grid
from lightning_delta.sweep.loop import SweepPoint, make_points, run_sweep
from lightning_delta.sweep.report import SweepReport, point_label
from lightning_delta.sweep.results import ResultsFile, ResultsLock, ResultsLockedError, iter_rows
from lightning_delta.sweep.rows import DATASET_KEYS, SweepRow, dataset_label, library_versions

__all__ = [
    "DATASET_KEYS",
    "VOLATILE_KEYS",
    "ResultsFile",
    "ResultsLock",
    "ResultsLockedError",
    "SweepPoint",
    "SweepReport",
    "SweepRow",
    "apply_overrides",
    "canonical_json",
    "config_key",
    "dataset_label",
    "drop_key",
    "expand_grid",
    "iter_rows",
    "library_versions",
    "make_points",
    "point_label",
    "run_sweep",
]
