"""DeltaCLI: the config of one analysis (``model``, ``data``, ``edit``, ``riemann``, ``trainer``) to a Trainer.

The path of one point::

    config (YAML, command line or dict)
      -> DeltaCLI: parses it; builds DeltaEditModule, the DataModule and a Trainer with a RiemannCallback
      -> trainer.validate: the callback's RiemannResult (term, trapezoid, exact ΔL, accuracy)
      -> validate prints RiemannResult.table(); a sweep makes it a SweepRow (lightning_delta.sweep)
      -> plot_all: the figures (lightning_delta.plots)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_delta import datamodules  # noqa: F401  (its DataModules: listed in --help, known by class name)
from lightning_delta.callbacks import RiemannCallback
from lightning_delta.cli.help_format import (
    EVALUATOR_HELP,
    LOSS_HELP,
    SWEEP_DESCRIPTION,
    VALIDATE_DESCRIPTION,
    HelpFormatter,
    data_help,
    edit_help,
    hide_from_help,
    listing,
    summary,
)
from lightning_delta.datamodules import GSM8KEvaluator
from lightning_delta.edits import DeltaEdit
from lightning_delta.losses import LOSSES, DeltaLoss
from lightning_delta.module import DeltaEditModule
from lightning_delta.parametrize import EDtype
from lightning_delta.sweep.rows import dataset_label

__all__ = ["TRAINER_DEFAULTS", "DeltaCLI", "PointInputs", "delta_edit_module", "run_directory"]

TRAINER_DEFAULTS = {
    "inference_mode": False,
    "use_distributed_sampler": False,
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}

# RiemannCallback arguments that only make sense for a module that is not a DeltaEditModule.
_RIEMANN_SKIP = {"pretrained", "edit", "module_name", "include", "exclude", "loss_fn", "E_dtype"}


# DeltaCLI's `args` that build its parser and parse nothing (DeltaCLI.config_parser).
_PARSER_ONLY = object()


@contextmanager
def _quiet_args_warning() -> Iterator[None]:
    # LightningCLI warns when `args` is given while sys.argv has arguments too; here that is by design.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        yield


LossName = Literal["causal_lm", "classification", "dpo"]  # the names of LOSSES (a test keeps them the same)


def delta_edit_module(
    model: str | nn.Module,
    *,
    pretrained: str | nn.Module,
    edit: DeltaEdit,
    loss: LossName | DeltaLoss = "causal_lm",
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    evaluator: GSM8KEvaluator | Callable[[nn.Module, Any], Any] | None = None,
    dtype: str | None = None,
    E_dtype: EDtype = "float32",  # noqa: N803 (the paper's name)
    accuracy_post: float | None = None,
) -> DeltaEditModule:
    """The post-trained model with the edit: W_post, W_pre, the loss, the edited tensors, the accuracy.

    The ``model`` section of ``validate`` and ``sweep``: a :class:`~lightning_delta.DeltaEditModule` built from what
    a config or command line can hold.

    Args:
        model: the post-trained model (W_post): a local directory or hub id (``AutoModelForCausalLM``), or a
            module's class_path and init_args (e.g. lightning_delta.datamodules.ZeroShotClassifier for the CLIP
            tasks).
        pretrained: the pre-trained weights (W_pre): a local directory, safetensors file or hub id, or a module.
        edit: the edit, set by the top-level ``--edit`` (linked here).
        loss: the loss, by name (or a DeltaLoss class_path).
        include: regular expressions on tensor names (re.search): only the tensors that match one are edited. One
            pattern or a list.
        exclude: regular expressions on tensor names: the tensors that match one are left as they are, e.g.
            '^(lm_head.weight)$'. One pattern or a list.
        evaluator: the accuracy at t = 0 and t = 1.
        dtype: the dtype the models are loaded in (bfloat16, float16, float32); default: as stored.
        E_dtype: how E is kept: float32 (float64 for float64 models), or model: each tensor's own dtype, half the
            memory for bf16 models (see the README's Precision section).
        accuracy_post: the accuracy at t = 0 when already measured on this model and data: the evaluator then runs
            at t = 1 only (a sweep gives it to the grid points after the first on each data set).
    """
    return DeltaEditModule(
        model,
        pretrained=pretrained,
        edit=edit,
        loss=loss,
        include=include,
        exclude=exclude,
        evaluator=evaluator,
        dtype=dtype,
        E_dtype=E_dtype,
        accuracy_post=accuracy_post,
    )


@dataclass(frozen=True)
class PointInputs:
    """What a sweep gives the module of the point being built (:meth:`DeltaCLI.instantiate_point`), from the earlier
    points that share it (:class:`~lightning_delta.sweep.reuse.SweepReuse`).

    Attributes:
        model: W_post as loaded for an earlier point, used in place of ``model.model`` (``None``: load it).
        loss: the DPO loss (with its reference model) of that point, used in place of ``model.loss`` (``None``: build
            it).
        accuracy_post: the accuracy at t = 0 measured on the same model and data (``None``: measure it).
    """

    model: nn.Module | None = None
    loss: DeltaLoss | None = None
    accuracy_post: float | None = None


def _loss_help() -> str:
    return listing(LOSS_HELP, [(name, summary(cls)) for name, cls in LOSSES.items()])


class DeltaCLI(LightningCLI):
    """LightningCLI for one Riemann analysis: ``model``, ``data``, ``edit``, ``riemann``, ``trainer``.

    ``model`` is a :class:`~lightning_delta.DeltaEditModule` (its arguments as :func:`delta_edit_module` documents
    them), ``data`` any LightningDataModule, ``edit`` an operation of :mod:`lightning_delta.edits` (linked into
    ``model.edit``), ``riemann`` the :class:`RiemannCallback` added to the trainer, and ``sweep`` the grid and
    results file that ``validate`` ignores (and does not list in its help).

    Args:
        args: command-line arguments, or a config dict / Namespace (``None``: ``sys.argv``).
        run: True parses a ``validate`` subcommand and runs it; False only parses (and instantiates): a sweep.
        instantiate: False parses without building the model, data or trainer (what ``sweep`` needs).
        kwargs: passed to LightningCLI.
    """

    def __init__(self, args: Any = None, run: bool = True, instantiate: bool = True, **kwargs: Any) -> None:
        self._instantiate = instantiate
        self._sweep_point = False
        self._validate_parser = run
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_defaults", dict(TRAINER_DEFAULTS))
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("load_from_checkpoint_support", False)  # nothing is trained, so nothing is checkpointed
        if run:
            kwargs.setdefault(
                "parser_kwargs",
                {
                    "prog": "lightning-delta",
                    "formatter_class": HelpFormatter,
                    "validate": {"description": VALIDATE_DESCRIPTION, "formatter_class": HelpFormatter},
                },
            )
        else:
            kwargs.setdefault(
                "parser_kwargs",
                {"prog": "lightning-delta sweep", "description": SWEEP_DESCRIPTION, "formatter_class": HelpFormatter},
            )
        with _quiet_args_warning():
            super().__init__(delta_edit_module, LightningDataModule, args=args, run=run, **kwargs)

    @classmethod
    def config_parser(cls, command: str = "sweep") -> LightningArgumentParser:
        """The parser of ``command`` (``validate`` or ``sweep``), built without parsing anything: ``sweep``'s
        parses an analysis config with its ``sweep`` section; ``validate``'s also ``trainer.validate``'s own
        arguments."""
        if command not in ("validate", "sweep"):
            raise ValueError(f"DeltaCLI parses `validate` and `sweep`, not {command!r}.")
        cli = cls(args=_PARSER_ONLY, run=command == "validate", instantiate=False)
        return cli._subcommand_parsers["validate"] if command == "validate" else cli.parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is _PARSER_ONLY:
            self.config = Namespace(seed_everything=False, subcommand=None)  # nothing parsed: nothing to build or run
            return
        super().parse_arguments(parser, args)

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # validate prints its own table (after_validate); --verbose true adds Lightning's
            self._subcommand_parsers["validate"].set_defaults(verbose=False)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"validate": {"model", "dataloaders", "datamodule"}}

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """LightningCLI's trainer, model and data arguments, the data's with the library's DataModules in its help."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults(
            {f"trainer.{key}": value for key, value in self.trainer_defaults.items() if key != "callbacks"}
        )
        parser.add_lightning_class_args(self._model_class, "model")
        parser.add_subclass_arguments(LightningDataModule, "data", fail_untyped=False, required=True, help=data_help())
        _set_title(parser, "data", "The data: a LightningDataModule")
        _set_title(parser, "model", "The model: W_post, W_pre, the loss, the edited tensors, the accuracy")
        _set_help(parser, "model.loss", _loss_help())
        _set_help(parser, "model.evaluator", EVALUATOR_HELP)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_subclass_arguments(DeltaEdit, "edit", required=True, help=edit_help())
        _set_title(parser, "edit", "The edit F: W_pre + F(ΔW) replaces W_post")
        parser.link_arguments("edit", "model.edit", apply_on="instantiate")
        parser.callback_keys.append("riemann")  # what add_lightning_class_args does, with the arguments above skipped
        parser.add_class_arguments(RiemannCallback, "riemann", fail_untyped=False, sub_configs=True, skip=_RIEMANN_SKIP)
        # validate reads the same config files as sweep (and dumps their sweep section), but leaves it out of its help
        sweep_arguments = [
            parser.add_argument(
                "--sweep.results",
                type=str,
                default="results.jsonl",
                help="JSONL file of sweep rows, one per finished point.",
            ),
            parser.add_argument(
                "--sweep.grid",
                type=Any,
                default=None,
                help="A mapping of dotted keys to lists of values (a Cartesian product), or a list of such mappings, "
                "e.g. '{edit.init_args.p: [0.1, 0.5, 0.9]}'.",
            ),
            parser.add_argument("--sweep.figures", type=str | None, default=None, help="Directory for the figures."),
            parser.add_argument(
                "--sweep.max_points",
                type=int | None,
                default=None,
                help="Stop after this many new points (run the sweep again for the rest).",
            ),
            parser.add_argument(
                "--sweep.reuse",
                type=bool,
                default=True,
                help="Load W_post once for the points that share it and measure the accuracy at "
                "W_post once per data set (the rows are the same; false: every point loads "
                "and measures everything itself, e.g. for an evaluator that draws random "
                "numbers).",
            ),
        ]
        if self._validate_parser:
            for action in sweep_arguments:
                hide_from_help(action)
        else:  # sweep reads what validate --print_config printed: trainer.validate's own keys are accepted, ignored
            added = parser.add_method_arguments(self.trainer_class, "validate", skip=self.subcommands()["validate"])
            for action in parser._actions:
                if action.dest in added:
                    hide_from_help(action)

    def instantiate_classes(self) -> None:
        if self._instantiate:
            super().instantiate_classes()

    def instantiate_point(self, config: dict[str, Any], inputs: PointInputs | None = None) -> None:
        """Parse ``config`` with this CLI's parser and build its model, data and trainer (one sweep point; the
        parser, slow to build, is reused); the module takes the model and loss that ``inputs`` gives, if any."""
        self.config = self.parser.parse_object(config)
        self.save_config_callback = None
        self._sweep_point = True  # writes nothing but its row: no run directory
        inputs = inputs or PointInputs()
        if inputs.model is not None:
            self.config["model"]["model"] = inputs.model
        if inputs.loss is not None:
            self.config["model"]["loss"] = inputs.loss
        if inputs.accuracy_post is not None:
            self.config["model"]["accuracy_post"] = inputs.accuracy_post
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
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # Trainer.__init__ sets it, undeclared
        return next(callback for callback in callbacks if isinstance(callback, RiemannCallback))

    def after_validate(self) -> None:
        """Print the result as a short table (global rank 0), with where it was written."""
        callback = self.riemann_callback()
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective: read on every rank
        if callback.result is None or not self.trainer.is_global_zero:
            return
        written = None
        if callback.filename:
            stem, suffix = Path(callback.filename).stem, Path(callback.filename).suffix
            candidates = list(directory.glob(f"{stem}*{suffix}"))
            written = max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None
        data = self.config.get("validate", self.config).get("data") or {}
        print(callback.result.table(dataset=_data_label(data), written=written), flush=True)


def _set_title(parser: LightningArgumentParser, group: str, title: str) -> None:
    """Set the title of the argument group ``group`` (one that adding a class's arguments made)."""
    assert parser.groups is not None, "the parser has argument groups once a class's arguments are added"
    parser.groups[group].title = title


def _set_help(parser: LightningArgumentParser, dest: str, text: str) -> None:
    """Set the help of the argument ``dest`` (one the class signatures added without a description of its values)."""
    action = next(action for action in parser._actions if action.dest == dest)
    action.help = text


def _data_label(data: Any) -> str:
    if isinstance(data, Namespace):
        data = data.as_dict()
    return dataset_label(data) if isinstance(data, dict) else str(data)


def run_directory(root: str | None = None) -> str:
    """``<root>/lightning_logs/version_<N>`` (``root`` defaults to the working directory) with ``<N>`` one more than the
    largest existing version: the directory a CSVLogger or TensorBoardLogger at ``root`` would write to. Nothing is
    created. A second process that takes the same number before the first has written there fails on the existing
    ``config.yaml`` rather than write over it."""
    return CSVLogger(save_dir=os.getcwd() if root is None else root).log_dir
