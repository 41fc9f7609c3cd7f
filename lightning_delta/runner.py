"""From a config to results: one analysis (``validate``), a grid of them (``sweep``), an edited model (``edit``) and
the figures (``plot``). :mod:`lightning_delta.cli` parses the command line and calls these; the demo calls
:func:`sweep`.

The path of one point, top to bottom in this file::

    config (YAML, command line or dict)
      -> DeltaCLI: parses it; builds DeltaEditModule, the DataModule and a Trainer with a RiemannCallback
      -> run_point: trainer.validate; the callback's RiemannResult (term, trapezoid, exact ΔL, accuracy)
      -> SweepRow.of: the point's row (lightning_delta.sweep), appended to the results file by run_sweep
      -> plot_all: the figures (lightning_delta.plots)
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_delta.callbacks import RiemannCallback
from lightning_delta.edits import DeltaEdit
from lightning_delta.export import save_edited
from lightning_delta.module import DeltaEditModule
from lightning_delta.plots import plot_all
from lightning_delta.sweep import SweepPoint, SweepRow, iter_rows, make_points, run_sweep

__all__ = ["DeltaCLI", "edit", "plot", "run_directory", "run_point", "sweep", "sweep_points", "validate"]

# What every analysis needs from the Trainer: gradients under validate (DESIGN.md §2.3), no sampler that repeats
# samples across processes (§2.5), nothing to train, so nothing to log or checkpoint unless asked.
TRAINER_DEFAULTS = {
    "inference_mode": False,
    "use_distributed_sampler": False,
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}

# RiemannCallback arguments that only make sense for a module that is not a DeltaEditModule.
_RIEMANN_SKIP = {"pretrained", "edit", "module_name", "include", "exclude", "loss_fn"}


# DeltaCLI's `args` that build its parser and parse nothing (DeltaCLI.config_parser).
_PARSER_ONLY = object()


@contextmanager
def _quiet_args_warning() -> Iterator[None]:
    # LightningCLI warns when `args` is given while sys.argv has arguments too; here that is by design.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        yield


# ----------------------------------------------------------------------------------------- config -> Trainer
class DeltaCLI(LightningCLI):
    """LightningCLI for one Riemann analysis: ``model`` (DeltaEditModule), ``data``, ``edit``, ``riemann``, ``trainer``.

    ``model`` is a :class:`~lightning_delta.DeltaEditModule`, ``data`` any LightningDataModule, ``edit`` an operation
    of :mod:`lightning_delta.edits` (linked into ``model.edit``), ``riemann`` the :class:`RiemannCallback` added to
    the trainer, and ``sweep`` the grid and results file that ``validate`` ignores.

    Args:
        args: command-line arguments, or a config dict / Namespace (``None``: ``sys.argv``).
        run: True parses a ``validate`` subcommand and runs it; False only parses (and instantiates).
        instantiate: False parses without building the model, data or trainer (what ``sweep`` needs).
        kwargs: passed to LightningCLI.
    """

    def __init__(self, args: Any = None, run: bool = True, instantiate: bool = True, **kwargs: Any) -> None:
        self._instantiate = instantiate
        self._sweep_point = False
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_defaults", dict(TRAINER_DEFAULTS))
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        with _quiet_args_warning():
            super().__init__(DeltaEditModule, LightningDataModule, args=args, run=run, **kwargs)

    @classmethod
    def config_parser(cls) -> LightningArgumentParser:
        """The parser of an analysis config, built without parsing anything: what ``sweep`` parses (``validate``
        parses it too, with ``trainer.validate``'s own arguments)."""
        return cls(args=_PARSER_ONLY, run=False, instantiate=False).parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is _PARSER_ONLY:
            self.config = Namespace(seed_everything=False)  # nothing parsed, so nothing to seed, build or run
            return
        super().parse_arguments(parser, args)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_subclass_arguments(DeltaEdit, "edit", required=True)
        parser.link_arguments("edit", "model.edit", apply_on="instantiate")
        parser.callback_keys.append("riemann")  # what add_lightning_class_args does, with the arguments above skipped
        parser.add_class_arguments(RiemannCallback, "riemann", fail_untyped=False, sub_configs=True, skip=_RIEMANN_SKIP)
        parser.add_argument("--sweep.results", type=str, default="results.jsonl", help="JSONL file of sweep rows.")
        parser.add_argument(
            "--sweep.grid",
            type=Any,
            default=None,
            help="A mapping of dotted keys to lists of values (a Cartesian product), or a list of such mappings.",
        )
        parser.add_argument("--sweep.figures", type=str | None, default=None, help="Directory for the figures.")
        parser.add_argument("--sweep.max_points", type=int | None, default=None, help="Stop after this many new points.")

    def instantiate_classes(self) -> None:
        if self._instantiate:
            super().instantiate_classes()

    def instantiate_point(self, config: dict[str, Any]) -> None:
        """Parse ``config`` with this CLI's parser and build its model, data and trainer (one sweep point; the
        parser, slow to build, is reused)."""
        self.config = self.parser.parse_object(config)
        self.save_config_callback = None
        self._sweep_point = True  # writes nothing but its row: no run directory
        super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer; without a logger it gets a run directory of its own as ``default_root_dir``.

        ``config.yaml`` (SaveConfigCallback) and ``riemann.json`` (RiemannCallback) go to ``trainer.log_dir``: a
        logger's versioned directory, or ``default_root_dir`` when there is no logger (``logger: false``, as in the
        shipped configs). So that a run never writes over another's files, a trainer without a logger gets
        ``<default_root_dir>/lightning_logs/version_<N>`` (``<N>`` the next free version, as Lightning's
        TensorBoardLogger and CSVLogger number theirs) as its ``default_root_dir``; nothing else is logged there.
        """
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if not self._sweep_point and not trainer_config.get("logger"):
            kwargs["default_root_dir"] = run_directory(trainer_config.get("default_root_dir"))
        return super().instantiate_trainer(**kwargs)

    def riemann_callback(self) -> RiemannCallback:
        return next(callback for callback in self.trainer.callbacks if isinstance(callback, RiemannCallback))


def run_directory(root: str | None = None) -> str:
    """``<root>/lightning_logs/version_<N>`` (``root`` defaults to the working directory) with ``<N>`` one more than the
    largest existing version: the directory a CSVLogger or TensorBoardLogger at ``root`` would write to. Nothing is
    created. A second process that takes the same number before the first has written there fails on the existing
    ``config.yaml`` rather than write over it."""
    return CSVLogger(save_dir=os.getcwd() if root is None else root).log_dir


def validate(args: Sequence[str]) -> DeltaCLI:
    """One Riemann analysis under trainer.validate; its config.yaml and riemann.json go to a directory of its own.

    ``args`` are the command line after ``validate`` (``--config ...``, ``--edit.p 0.9``, ``--print_config``);
    :class:`DeltaCLI` parses them, builds the trainer and runs ``trainer.validate``. Returns the DeltaCLI, whose
    ``riemann_callback().result`` holds the :class:`~lightning_delta.callbacks.RiemannResult`.
    """
    return DeltaCLI(args=["validate", *args])


# ------------------------------------------------------------------------------------------------------- sweep
def _config_dict(parser: LightningArgumentParser, config: Any) -> dict[str, Any]:
    """A parsed config as plain JSON types (class paths resolved, defaults filled in)."""
    config = json.loads(parser.dump(config, format="json", skip_none=False))
    config.pop("config", None)
    return config


def sweep_points(args: Any) -> tuple[list[SweepPoint], dict[str, Any], DeltaCLI]:
    """The points of the sweep that ``args`` describes (command line or config dict), its ``sweep`` section, and the
    parse-only CLI that :func:`run_point` instantiates each point with."""
    cli = DeltaCLI(args=args, run=False, instantiate=False)
    base = _config_dict(cli.parser, cli.config)
    settings = base.pop("sweep")

    def normalize(config: dict[str, Any]) -> dict[str, Any]:
        config = dict(config)
        config.setdefault("riemann", {})["filename"] = None  # the row holds the result; one JSON per point is noise
        return {key: value for key, value in _config_dict(cli.parser, cli.parser.parse_object(config)).items()
                if key != "sweep"}

    return make_points(base, settings.get("grid"), normalize), settings, cli


def run_point(cli: DeltaCLI, point: SweepPoint) -> SweepRow:
    """Instantiate one point's config, run ``trainer.validate`` with its RiemannCallback and return its row."""
    started = time.time()
    cli.instantiate_point(point.config)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    return SweepRow.of(point, cli.model.edit.config(), cli.riemann_callback().result, started)


def _is_global_zero() -> bool:
    """Whether this process is global rank 0, the one that writes the sweep's rows and holds the results lock.

    Before the first trainer has set up, ``rank_zero_only.rank`` comes from ``RANK``, ``LOCAL_RANK`` or
    ``SLURM_PROCID`` only, so the first process of a node started by hand with ``NODE_RANK`` > 0 (or torchrun's
    ``GROUP_RANK``) reads 0 there; it is not rank 0 either. Global rank 0 is always on node 0.
    """
    node_rank = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    return rank_zero_only.rank == 0 and int(node_rank) == 0


def sweep(args: Sequence[str] | dict[str, Any] | None = None) -> list[SweepRow]:
    """A grid of Riemann analyses, one JSONL row each, resumable; with sweep.figures, the figures are drawn.

    ``args``: the command line after ``sweep`` (``--config ...``), or the config as a dict (what the demo gives).
    Rows go to ``sweep.results``; running the same sweep again runs only the points missing there. The writing
    process holds ``<sweep.results>.lock`` while the sweep runs: a second sweep on the same results file raises
    :class:`~lightning_delta.sweep.ResultsLockedError` before running anything.
    """
    points, settings, cli = sweep_points(args)
    rows = run_sweep(
        points,
        settings["results"],
        functools.partial(run_point, cli),
        should_write=_is_global_zero,
        max_points=settings.get("max_points"),
    )
    if settings.get("figures") and _is_global_zero():
        for path in plot_all(rows, settings["figures"]).values():
            print(f"figure: {path}")
    return rows


# ---------------------------------------------------------------------------------------------- edit and plot
def edit(
    model: str,
    pretrained: str,
    edit: DeltaEdit,
    output_dir: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the edited model W_pre + F(ΔW) with save_pretrained (safetensors), tokenizer files beside it.

    The model is written into a hidden sibling of ``output_dir`` and renamed into place when complete, so a failed
    run leaves no half-written model.

    Args:
        model: the post-trained model (W_post): a Hugging Face directory or hub id.
        pretrained: the pre-trained weights (W_pre): a directory, safetensors file or hub id.
        edit: the editing operation, e.g. ``--edit DARE --edit.p 0.9``.
        output_dir: where the edited model is written: a new or empty directory (a non-empty one needs
            ``--overwrite true``).
        include: regular expressions on tensor names: only these are edited.
        exclude: regular expressions on tensor names: these are left as they are.
        dtype: dtype to load the model in (``bfloat16``, ``float32``, ...); default its stored dtype.
        overwrite: replace a non-empty ``output_dir`` whole (its old files, an old shard index included, are
            removed once the new model is complete).
    """
    path = save_edited(model, pretrained, edit, output_dir, include=include, exclude=exclude, dtype=dtype,
                       overwrite=overwrite)
    print(f"Edited model ({edit!r}) written to {path}")
    return path


def plot(results: list[str], output_dir: str = "figures", extension: str = "png") -> list[str]:
    """Draw every figure the rows of the results files allow (see :mod:`lightning_delta.plots`).

    Rows of different settings (C, model, data, loss, ...) are drawn as separate lines, labelled by what differs.

    Args:
        results: JSONL results files written by ``lightning-delta sweep`` or ``demo``; each must exist.
        output_dir: where the figures go.
        extension: image format (``png``, ``pdf``, ``svg``).
    """
    rows = list(iter_rows(results))
    if not rows:
        raise ValueError(f"No rows in {', '.join(map(str, results))}: run `lightning-delta sweep` first.")
    written = plot_all(rows, output_dir, extension)
    for path in written.values():
        print(f"figure: {path}")
    return [str(path) for path in written.values()]
