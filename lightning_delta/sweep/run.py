"""A sweep, run: every point of the grid parsed and checked, then run under ``trainer.validate``, one row each."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_delta.callbacks import RiemannCallback
from lightning_delta.cli.parser import DeltaCLI
from lightning_delta.edits import edit_class
from lightning_delta.plots import plot_all
from lightning_delta.sweep.grid import apply_overrides
from lightning_delta.sweep.loop import SweepPoint, make_points, run_sweep
from lightning_delta.sweep.report import SweepReport
from lightning_delta.sweep.reuse import SweepReuse
from lightning_delta.sweep.rows import SweepRow

__all__ = ["check_point", "run_point", "sweep", "sweep_points"]


def _config_dict(parser: LightningArgumentParser, config: Any) -> dict[str, Any]:
    """A parsed config as plain JSON types (class paths resolved, defaults filled in)."""
    config = json.loads(parser.dump(config, format="json", skip_unset=False))
    config.pop("config", None)
    return config


# trainer.validate's own arguments, in what `validate --print_config` prints: a sweep accepts and ignores them.
_VALIDATE_ONLY = ("ckpt_path", "verbose", "weights_only")


def sweep_points(args: Any) -> tuple[list[SweepPoint], dict[str, Any], DeltaCLI]:
    """The points of the sweep that ``args`` describes (command line or config dict), its ``sweep`` section, and the
    parse-only CLI that :func:`run_point` instantiates each point with.

    Every point is parsed, and its edit and RiemannCallback built, before the first one runs: a grid key the config
    does not have, or a value an edit refuses (DARE's ``p = 1``), is an error naming the point, and no point runs.
    """
    cli = DeltaCLI(args=args, run=False, instantiate=False)
    base = {key: value for key, value in _config_dict(cli.parser, cli.config).items() if key not in _VALIDATE_ONLY}
    settings = base.pop("sweep")
    grid = settings.get("grid")

    def normalize(config: dict[str, Any]) -> dict[str, Any]:
        config = dict(config)
        config.setdefault("riemann", {})["filename"] = None  # the row holds the result; one JSON per point is noise
        overrides = {
            key: value
            for key, value in _flat(config).items()
            if _flat(base).get(key, _MISSING) != value and key != "riemann.filename"
        }
        _check_edit_keys(config.get("edit"), overrides)
        exit_on_error, cli.parser.exit_on_error = cli.parser.exit_on_error, False
        try:
            parsed = _config_dict(cli.parser, cli.parser.parse_object(config))
        except argparse.ArgumentError as error:
            raise ValueError(
                f"The sweep grid point {overrides} is not a valid config: {_parse_problem(error)}. "
                "No point was run; fix the grid (sweep.grid) and run the sweep again."
            ) from None
        finally:
            cli.parser.exit_on_error = exit_on_error
        check_point(parsed, overrides)
        return {key: value for key, value in parsed.items() if key != "sweep" and key not in _VALIDATE_ONLY}

    return make_points(base, grid, normalize), settings, cli


_MISSING = object()


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``{"edit.init_args.p": 0.9, ...}``)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_edit_keys(edit: Any, overrides: Mapping[str, Any]) -> None:
    """Refuse a grid key ``edit.init_args.<argument>`` that the point's edit does not take, naming its arguments."""
    name = edit.get("class_path") if isinstance(edit, Mapping) else edit
    cls = edit_class(name) if isinstance(name, str) else None
    for key in overrides:
        argument = key.removeprefix("edit.init_args.")
        if cls is not None and key != argument and argument not in cls.parameter_names():
            raise ValueError(
                f"The sweep grid key {key!r}: {cls.__name__} takes no `{argument}`; its arguments are "
                f"{', '.join(cls.parameter_names())}. No point was run; fix the grid (sweep.grid) and run the sweep "
                "again."
            )


def _parse_problem(error: Exception) -> str:
    """The line of a jsonargparse error that names the problem (``Option 'q' is not accepted``), else its first."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "not accepted" in line or "Key " in line or "does not exist" in line]
    return "; ".join(dict.fromkeys(named)) if named else lines[0] if lines else type(error).__name__


def check_point(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Build a parsed point's edit and RiemannCallback (cheap: no model, no data), so that a value they refuse is
    found before any point runs; ``overrides`` name the point in the error."""
    sections: dict[str, Any] = {
        "edit": config.get("edit"),
        "riemann": {
            "class_path": f"{RiemannCallback.__module__}.RiemannCallback",
            "init_args": config.get("riemann") or {},
        },
    }
    for name, section in sections.items():
        if not isinstance(section, Mapping) or "class_path" not in section:
            continue
        module, _, class_name = section["class_path"].rpartition(".")
        try:
            getattr(importlib.import_module(module), class_name)(**(section.get("init_args") or {}))
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"The sweep grid point {dict(overrides)} has an invalid {name}: {error} No point was "
                "run; fix the grid (sweep.grid) and run the sweep again."
            ) from None


class _PointProgress(Callback):
    """Advances the sweep's progress bar over a point's batches (Lightning's own bar is off while it is drawn)."""

    def __init__(self, report: SweepReport) -> None:
        self.report = report

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        batches = trainer.num_val_batches
        total = sum(batches) if isinstance(batches, list) else batches
        self.report.batches(int(total) if total != float("inf") else None)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.report.batch_done()


def run_point(
    cli: DeltaCLI, point: SweepPoint, report: SweepReport | None = None, reuse: SweepReuse | None = None
) -> SweepRow:
    """Instantiate one point's config, run ``trainer.validate`` with its RiemannCallback and return its row.

    While ``report`` draws a progress bar on the terminal, the point's batches advance it, and Lightning's progress
    bar (which would draw over it) is off. With ``reuse``, the point takes W_post and the accuracy at W_post from the
    earlier points that share them (:class:`SweepReuse`).
    """
    started = time.time()
    bar = report if report is not None and report.live else None  # the sweep's progress bar on the terminal
    config = apply_overrides(point.config, {"trainer.enable_progress_bar": False}) if bar is not None else point.config
    # The previous point's, freed before loading: the trainer is None only until instantiate_point sets it again.
    cli.model = cli.datamodule = cli.trainer = cli.config_init = None  # type: ignore[assignment]
    cli.instantiate_point(config, reuse.begin(point.config) if reuse is not None else None)
    if reuse is not None:
        reuse.keep(cli.model, (point.config.get("model") or {}).get("loss"))
    if bar is not None:
        cli.trainer.callbacks.append(_PointProgress(bar))  # type: ignore[attr-defined]  # set, undeclared, by Trainer
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    result = cli.riemann_callback().result
    assert result is not None, "RiemannCallback gives its result at the end of trainer.validate"
    row = SweepRow.of(point, cli.model.edit.config(), result, started)
    if reuse is not None:
        reuse.end(result)
    return row


def _is_global_zero() -> bool:
    """Whether this process is global rank 0, the one that writes the sweep's rows and holds the results lock.

    Before the first trainer has set up, ``rank_zero_only.rank`` comes from ``RANK``, ``LOCAL_RANK`` or
    ``SLURM_PROCID`` only, so the first process of a node started by hand with ``NODE_RANK`` > 0 (or torchrun's
    ``GROUP_RANK``) reads 0 there; it is not rank 0 either. Global rank 0 is always on node 0.
    """
    node_rank = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    return rank_zero_only.rank == 0 and int(node_rank) == 0  # type: ignore[attr-defined]  # Lightning sets it


def sweep(args: Sequence[str] | dict[str, Any] | None = None, progress: bool = True) -> list[SweepRow]:
    """A grid of Riemann analyses, one JSONL row each, resumable; with sweep.figures, the figures are drawn.

    ``args``: the command line after ``sweep`` (``--config ...``), or the config as a dict (what the demo gives).
    Rows go to ``sweep.results``; running the same sweep again runs only the points missing there. The writing
    process holds ``<sweep.results>.lock`` while the sweep runs: a second sweep on the same results file raises
    :class:`~lightning_delta.sweep.ResultsLockedError` before running anything.

    With ``sweep.reuse`` (the default), each process loads W_post once for the points that share it and runs the
    evaluator at t = 0 once per data set (:class:`SweepReuse`); the rows are those of ``sweep.reuse: false``, where
    every point loads and measures everything itself.

    ``progress`` (global rank 0): print a line per finished point and a closing table of the grid with what is left
    (:class:`~lightning_delta.sweep.SweepReport`), with a progress bar on a terminal; False prints one log line.
    """
    points, settings, cli = sweep_points(args)
    report = SweepReport() if progress and _is_global_zero() else None
    reuse = SweepReuse() if settings.get("reuse", True) else None
    rows = run_sweep(
        points,
        settings["results"],
        functools.partial(run_point, cli, report=report, reuse=reuse),
        should_write=_is_global_zero,
        max_points=settings.get("max_points"),
        report=report,
    )
    if settings.get("figures") and _is_global_zero():
        for path in plot_all(rows, settings["figures"]).values():
            print(f"figure: {path}")
    return rows
