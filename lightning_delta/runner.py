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

import argparse
import functools
import gc
import importlib
import inspect
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn

from lightning_delta import datamodules  # noqa: F401  (its DataModules: listed in --help, known by class name)
from lightning_delta.callbacks import RiemannCallback, RiemannResult
from lightning_delta.datamodules import GSM8KEvaluator
from lightning_delta.edits import EDITS, DeltaEdit, edit_class
from lightning_delta.export import save_edited
from lightning_delta.losses import LOSSES, DeltaLoss
from lightning_delta.module import DeltaEditModule
from lightning_delta.parametrize import E_DTYPES
from lightning_delta.plots import plot_all
from lightning_delta.sweep import (
    SweepPoint,
    SweepReport,
    SweepRow,
    apply_overrides,
    canonical_json,
    config_key,
    dataset_label,
    iter_rows,
    make_points,
    run_sweep,
)

__all__ = [
    "DeltaCLI",
    "SweepReuse",
    "delta_edit_module",
    "edit",
    "plot",
    "result_table",
    "run_directory",
    "run_point",
    "sweep",
    "sweep_points",
    "validate",
]

# What every analysis needs from the Trainer: gradients under validate, no sampler that repeats samples across
# processes (each sample counts once in the loss sums), nothing to train, so nothing to log or checkpoint unless asked.
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


# ------------------------------------------------------------------------------------------------- the help
VALIDATE_DESCRIPTION = (
    "One Riemann analysis: the post-trained model (--model.model), the pre-trained weights (--model.pretrained), the "
    "data (--data), the edit (--edit) and C (--riemann.num_points), run under trainer.validate. Prints the term, "
    "trapezoid, exact ΔL, losses, accuracy and the modules with the largest terms, and writes config.yaml and "
    "riemann.json into a run directory of its own (trainer.log_dir). A --config file holds the same keys; "
    "--print_config prints the whole config."
)
SWEEP_DESCRIPTION = (
    "A grid of Riemann analyses: the config that validate reads, with --sweep.grid (dotted keys to lists of values) "
    "and --sweep.results (a JSONL file, one row per point). Running it again runs only the points missing there. "
    "Prints a line per finished point and a closing table of the grid with what is left."
)

# Dotted key -> help, for the keys whose values the library names (the classes and names it ships).
LOSS_HELP = "the loss, by name:"
EVALUATOR_HELP = (
    "accuracy at t = 0 and t = 1, a callable (model, batch) -> (correct, total). Default: the loss's own, if it has "
    "one. The library's:\n- GSM8KEvaluator: greedy generation, exact match of the final number (needs "
    "--model.evaluator.tokenizer, the post-trained model's directory or hub id)\n- "
    "lightning_delta.demo.digits.answer_accuracy: the demo's digit accuracy\n- any other function by its import "
    "path, or a class with init_args whose instances are such callables"
)


def _summary(obj: Any) -> str:
    """The first sentence of ``obj``'s docstring as plain text (reST roles and literals unwrapped)."""
    text = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text).replace("``", "")
    return re.split(r"\.\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")


def _library_subclasses(base: type) -> list[type]:
    """The imported subclasses of ``base`` that this library's public modules define, in definition order."""
    found: list[type] = []
    todo = list(base.__subclasses__())
    while todo:
        cls = todo.pop(0)
        public = not any(part.startswith("_") for part in cls.__module__.split("."))
        if cls not in found and cls.__module__.startswith("lightning_delta") and public:
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _listing(intro: str, items: Sequence[tuple[str, str]]) -> str:
    """``intro`` and one ``- name: description`` line per item (kept as lines by :class:`HelpFormatter`)."""
    return intro + "".join(f"\n- {name}: {description}" for name, description in items)


def data_help() -> str:
    return _listing(
        "the DataModule, by class name (its arguments as --data.<argument>, all of them with --data.help NAME), or "
        "a class path. The library's:",
        [(cls.__name__, _summary(cls)) for cls in _library_subclasses(LightningDataModule)],
    )


def edit_help() -> str:
    return _listing(
        "the editing operation F, by class name (its arguments as --edit.<argument>, e.g. --edit DARE --edit.p 0.9; "
        "all of them with --edit.help NAME), or a class path:",
        [(cls.__name__, _summary(cls)) for cls in EDITS.values()],
    )


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with three changes: a help text's ``\n- `` lines stay lines; such a list of the
    library's classes replaces jsonargparse's list of known subclasses, as does nothing for a ``torch.nn.Module``
    or ``torch.Tensor`` (every imported module class of torch and transformers); arguments marked
    ``hidden_from_help`` are left out."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action)
        start = text.rfind(", known subclasses: ")
        if start >= 0 and text.endswith(")"):
            listed = text[start:]
            if "\n- " in (action.help or "") or "torch.nn.Module" in listed or "torch.Tensor" in listed:
                text = text[:start] + ")"
        return text

    def add_usage(self, usage: Any, actions: Any, *args: Any, **kwargs: Any) -> None:
        super().add_usage(usage, [action for action in actions if not _hidden(action)], *args, **kwargs)

    def add_argument(self, action: argparse.Action) -> None:
        if not _hidden(action):
            super().add_argument(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        first, *items = text.split("\n- ")
        lines = super()._split_lines(first, width)
        for item in items:
            wrapped = super()._split_lines(item, width - 2)
            lines += ["- " + wrapped[0], *("  " + line for line in wrapped[1:])]
        return lines


def _hidden(action: argparse.Action) -> bool:
    """Whether ``action`` is parsed and dumped but left out of the help (``action.hidden_from_help``): argparse's
    ``help=SUPPRESS`` would also leave it out of jsonargparse's dumps."""
    return getattr(action, "hidden_from_help", False)


# -------------------------------------------------------------------------------------------- the model section
LossName = Literal[tuple(LOSSES)]  # "causal_lm", "classification", "dpo"
EDtype = Literal[E_DTYPES]  # "float32", "model"


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
    """
    reuse = _SWEEP_REUSE.get()
    if reuse is None:
        return DeltaEditModule(model, pretrained=pretrained, edit=edit, loss=loss, include=include, exclude=exclude,
                               evaluator=evaluator, dtype=dtype, E_dtype=E_dtype)
    shared_model, shared_loss = reuse.shared(model, loss)
    module = DeltaEditModule(shared_model, pretrained=pretrained, edit=edit, loss=shared_loss, include=include,
                             exclude=exclude, evaluator=evaluator, dtype=dtype, E_dtype=E_dtype)
    reuse.keep(module, loss)
    return module


# The SweepReuse of the sweep point being built in this process (None outside a reusing sweep).
_SWEEP_REUSE: ContextVar[SweepReuse | None] = ContextVar("sweep_reuse", default=None)


def _loss_help() -> str:
    return _listing(LOSS_HELP, [(name, _summary(cls)) for name, cls in LOSSES.items()])


# ----------------------------------------------------------------------------------------- config -> Trainer
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
            kwargs.setdefault("parser_kwargs", {
                "prog": "lightning-delta", "formatter_class": HelpFormatter,
                "validate": {"description": VALIDATE_DESCRIPTION, "formatter_class": HelpFormatter},
            })
        else:
            kwargs.setdefault("parser_kwargs", {"prog": "lightning-delta sweep", "description": SWEEP_DESCRIPTION,
                                                "formatter_class": HelpFormatter})
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

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # validate prints its own table (after_validate); --verbose true adds Lightning's
            self._subcommand_parsers["validate"].set_defaults(verbose=False)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"validate": {"model", "dataloaders", "datamodule"}}

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """LightningCLI's trainer, model and data arguments, the data's with the library's DataModules in its help."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{key}": value for key, value in self.trainer_defaults.items()
                             if key != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model")
        parser.add_subclass_arguments(LightningDataModule, "data", fail_untyped=False, required=True, help=data_help())
        parser.groups["data"].title = "The data: a LightningDataModule"
        parser.groups["model"].title = "The model: W_post, W_pre, the loss, the edited tensors, the accuracy"
        _set_help(parser, "model.loss", _loss_help())
        _set_help(parser, "model.evaluator", EVALUATOR_HELP)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_subclass_arguments(DeltaEdit, "edit", required=True, help=edit_help())
        parser.groups["edit"].title = "The edit F: W_pre + F(ΔW) replaces W_post"
        parser.link_arguments("edit", "model.edit", apply_on="instantiate")
        parser.callback_keys.append("riemann")  # what add_lightning_class_args does, with the arguments above skipped
        parser.add_class_arguments(RiemannCallback, "riemann", fail_untyped=False, sub_configs=True, skip=_RIEMANN_SKIP)
        # validate reads the same config files as sweep (and dumps their sweep section), but leaves it out of its help
        sweep_arguments = [
            parser.add_argument("--sweep.results", type=str, default="results.jsonl",
                                help="JSONL file of sweep rows, one per finished point."),
            parser.add_argument(
                "--sweep.grid",
                type=Any,
                default=None,
                help="A mapping of dotted keys to lists of values (a Cartesian product), or a list of such mappings, "
                     "e.g. '{edit.init_args.p: [0.1, 0.5, 0.9]}'.",
            ),
            parser.add_argument("--sweep.figures", type=str | None, default=None, help="Directory for the figures."),
            parser.add_argument("--sweep.max_points", type=int | None, default=None,
                                help="Stop after this many new points (run the sweep again for the rest)."),
            parser.add_argument("--sweep.reuse", type=bool, default=True,
                                help="Load W_post once for the points that share it and measure the accuracy at "
                                     "W_post once per data set (the rows are the same; false: every point loads "
                                     "and measures everything itself, e.g. for an evaluator that draws random "
                                     "numbers)."),
        ]
        if self._validate_parser:
            for action in sweep_arguments:
                action.hidden_from_help = True
        else:  # sweep reads what validate --print_config printed: trainer.validate's own keys are accepted, ignored
            added = parser.add_method_arguments(self.trainer_class, "validate", skip=self.subcommands()["validate"])
            for action in parser._actions:
                if action.dest in added:
                    action.hidden_from_help = True

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
        print(result_table(callback.result, dataset=_data_label(data), written=written), flush=True)


def _set_help(parser: LightningArgumentParser, dest: str, text: str) -> None:
    """Set the help of the argument ``dest`` (one the class signatures added without a description of its values)."""
    action = next(action for action in parser._actions if action.dest == dest)
    action.help = text


def _data_label(data: Any) -> str:
    if isinstance(data, Namespace):
        data = data.as_dict()
    return dataset_label(data) if isinstance(data, dict) else str(data)


def result_table(result: RiemannResult, dataset: str = "", written: str | os.PathLike | None = None,
                 top: int = 5) -> str:
    """A :class:`~lightning_delta.callbacks.RiemannResult` as a few lines: term, trapezoid, exact ΔL, the losses,
    the accuracy, and the ``top`` modules by |term| (a module's term is the sum of its tensors')."""
    edit = result.config.get("edit") or {}
    name = EDITS[edit["name"]].__name__ if edit.get("name") in EDITS else edit.get("name", "the edit")
    arguments = ", ".join(f"{key}={value}" for key, value in edit.items() if key != "name")
    title = f"Riemann analysis of {name}({arguments})" + (f" on {dataset}" if dataset else "")
    points = f"C = {result.num_points}" if result.rule in ("left", "trapezoid") else f"{result.passes} nodes"
    title += f", {points}, mean over {result.count:g} items (tokens or examples)"
    rows = [
        (f"term ({result.rule} rule)", f"{result.term:+.6g}"),
        ("trapezoid", "-" if result.trapezoid is None else f"{result.trapezoid:+.6g}"),
        ("exact ΔL", f"{result.exact:+.6g}"),
        ("loss W_post -> edited", f"{result.loss_post:.6g} -> {result.loss_edit:.6g}"),
    ]
    if result.rule != "left":
        rows.append(("|term − exact ΔL|", f"{result.completeness_gap:.3g} ({result.passes} backward passes)"))
    if result.error_per_tensor:
        rows.append(("error estimate", f"{max(result.error_per_tensor.values()):.3g} (largest per tensor)"))
    if result.accuracy_post is not None and result.accuracy_edit is not None:
        rows.append(("accuracy W_post -> edited",
                     f"{100 * result.accuracy_post:.2f}% -> {100 * result.accuracy_edit:.2f}%"))
    modules: dict[str, float] = {}
    for tensor, value in result.term_per_tensor.items():
        module = tensor.rsplit(".", 1)[0] if "." in tensor else tensor
        modules[module] = modules.get(module, 0.0) + value
    largest = sorted(modules.items(), key=lambda item: abs(item[1]), reverse=True)[:top]
    width = max(len(label) for label, _ in rows)
    lines = [title] + [f"  {label.ljust(width)}  {value}" for label, value in rows]
    if largest:
        lines.append(f"  top {len(largest)} of {len(modules)} modules by |term|:")
        module_width = max(len(module) for module, _ in largest)
        lines += [f"    {module.ljust(module_width)}  {value:+.4g}" for module, value in largest]
    if written is not None:
        written = Path(written)
        if written.is_absolute() and written.is_relative_to(Path.cwd()):
            written = written.relative_to(Path.cwd())
        lines.append(f"  written to {written}")
    return "\n".join(lines)


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
        overrides = {key: value for key, value in _flat(config).items() if _flat(base).get(key, _MISSING) != value
                     and key != "riemann.filename"}
        _check_edit_keys(config.get("edit"), overrides)
        exit_on_error, cli.parser.exit_on_error = cli.parser.exit_on_error, False
        try:
            parsed = _config_dict(cli.parser, cli.parser.parse_object(config))
        except argparse.ArgumentError as error:
            raise ValueError(f"The sweep grid point {overrides} is not a valid config: {_parse_problem(error)}. "
                             "No point was run; fix the grid (sweep.grid) and run the sweep again.") from None
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
    sections = {"edit": config.get("edit"), "riemann": {"class_path": f"{RiemannCallback.__module__}.RiemannCallback",
                                                         "init_args": config.get("riemann") or {}}}
    for name, section in sections.items():
        if not isinstance(section, Mapping) or "class_path" not in section:
            continue
        module, _, class_name = section["class_path"].rpartition(".")
        try:
            getattr(importlib.import_module(module), class_name)(**(section.get("init_args") or {}))
        except (ValueError, TypeError) as error:
            raise ValueError(f"The sweep grid point {dict(overrides)} has an invalid {name}: {error} No point was "
                             "run; fix the grid (sweep.grid) and run the sweep again.") from None


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


def run_point(cli: DeltaCLI, point: SweepPoint, report: SweepReport | None = None,
              reuse: SweepReuse | None = None) -> SweepRow:
    """Instantiate one point's config, run ``trainer.validate`` with its RiemannCallback and return its row.

    While ``report`` draws a progress bar on the terminal, the point's batches advance it, and Lightning's progress
    bar (which would draw over it) is off. With ``reuse``, the point takes W_post and the accuracy at W_post from the
    earlier points that share them (:class:`SweepReuse`).
    """
    started = time.time()
    live = report is not None and report.live
    config = apply_overrides(point.config, {"trainer.enable_progress_bar": False}) if live else point.config
    cli.model = cli.datamodule = cli.trainer = cli.config_init = None  # the previous point's, freed before loading
    accuracy_post = reuse.begin(point.config) if reuse is not None else None
    building = _SWEEP_REUSE.set(reuse)
    try:
        cli.instantiate_point(config)
    finally:
        _SWEEP_REUSE.reset(building)
    cli.model.accuracy_post_given = accuracy_post
    if live:
        cli.trainer.callbacks.append(_PointProgress(report))
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    result = cli.riemann_callback().result
    row = SweepRow.of(point, cli.model.edit.config(), result, started)
    if reuse is not None:
        reuse.end(result)
    return row


# A point's config keys that change E alone: points that differ only there share W_post, the data, the loss and the
# evaluator, so they share the accuracy at t = 0 (with the DPO loss, model.pretrained is its reference: not listed).
EDIT_ONLY_KEYS = ("edit", "model.edit", "model.include", "model.exclude", "model.E_dtype", "riemann")


def keeps_the_model_as_given(strategy: Any) -> bool:
    """Whether ``strategy`` (a ``trainer.strategy`` config value) runs validation on the module as given: one device
    or DDP (not wrapped under validate). Sharded strategies (FSDP, DeepSpeed, model parallel) rewrite its parameters
    in place, so the module cannot serve another point."""
    name = strategy.get("class_path", "") if isinstance(strategy, Mapping) else str(strategy)
    name = name.rsplit(".", 1)[-1].lower()
    return name in ("auto", "single_device", "singledevicestrategy") or name.startswith("ddp")


class SweepReuse:
    """What the points of a sweep share in one process, so that each point builds little more than its own E.

    **W_post.** The post-trained model (and, with the DPO loss, its reference) is loaded at the first point and
    serves every later point with the same ``model.model``, ``model.dtype``, ``model.loss`` (with DPO also
    ``model.pretrained``) and ``trainer`` section; after each point its edit is dropped
    (:meth:`~lightning_delta.DeltaEditModule.drop_edit`), which leaves W_post as loaded. A point with another model
    lets go of the one held before loading its own. A model given as a class_path (built by the parser), or run under a
    strategy that shards it in place (:func:`keeps_the_model_as_given`), is built afresh at every point.

    **The accuracy at t = 0.** Measured at the first point of a data set (its row's ``accuracy_post``) and given to
    every later point whose config differs from it only in :data:`EDIT_ONLY_KEYS` and ``model.pretrained`` (unless
    the loss is DPO): those run their evaluator at t = 1 only
    (:attr:`~lightning_delta.DeltaEditModule.accuracy_post_given`). At t = 0 every edited tensor reads
    ``W_post + 0·E``, which is W_post exactly for any finite E, so the accuracy there is one number.

    **The loss at t = 0** is measured at every point: it comes with the gradient at t = 0, which each point needs for
    its own E (the first Riemann point), so it costs nothing extra. Rows equal those of a sweep without reuse in
    every field but the timings ``started`` and ``seconds`` (tests/test_sweep.py, bit for bit, 1 and 2 processes).
    """

    def __init__(self) -> None:
        self._held: str | None = None  # the model key of the model held
        self._model: nn.Module | None = None
        self._loss: DeltaLoss | None = None  # the DPO loss (with its reference model) of the model held
        self._point: str | None = None  # the model key of the point being built (None: it builds its own)
        self._module: DeltaEditModule | None = None  # the point's module, whose edit is dropped when it ends
        self._accuracy_key: str | None = None
        self._accuracies: dict[str, float] = {}  # accuracy key -> accuracy at t = 0

    @staticmethod
    def model_key(config: Mapping[str, Any]) -> str | None:
        """What the W_post of a point's config depends on, as a string (``None``: not shared, see the class)."""
        model, trainer = config.get("model") or {}, config.get("trainer") or {}
        if not isinstance(model.get("model"), str) or not keeps_the_model_as_given(trainer.get("strategy", "auto")):
            return None
        dpo = model.get("loss") == "dpo"
        return canonical_json({"model": model["model"], "dtype": model.get("dtype"), "loss": model.get("loss"),
                               "reference": model.get("pretrained") if dpo else None, "trainer": trainer})

    @staticmethod
    def accuracy_key(config: Mapping[str, Any]) -> str:
        """The key of a point's config without what changes E alone: equal keys, equal accuracy at t = 0."""
        dpo = (config.get("model") or {}).get("loss") == "dpo"
        return config_key(config, EDIT_ONLY_KEYS + (() if dpo else ("model.pretrained",)))

    def begin(self, config: Mapping[str, Any]) -> float | None:
        """Before a point: drop the previous point's edit, let go of a model this point does not share, and return
        the accuracy at t = 0 measured on its data before (``None``: not yet)."""
        self._drop_edit()
        self._point = self.model_key(config)
        if self._point != self._held and self._model is not None:
            self._held, self._model, self._loss = None, None, None
            gc.collect()  # the model's modules hold reference cycles: free it before the next one loads
        self._accuracy_key = self.accuracy_key(config)
        return self._accuracies.get(self._accuracy_key)

    def shared(self, model: Any, loss: Any) -> tuple[Any, Any]:
        """The model and loss the point's module is built with: those held, when the point shares them."""
        if self._point is None or self._point != self._held:
            return model, loss
        return self._model, self._loss if self._loss is not None else loss

    def keep(self, module: DeltaEditModule, loss: Any) -> None:
        """The point's module is built: hold its model (and a DPO loss) for the points that share it."""
        self._module = module
        if self._point is not None and self._held is None:
            self._held, self._model = self._point, module.model
            self._loss = module.loss if loss == "dpo" else None

    def end(self, result: RiemannResult | None) -> None:
        """After a point: remember its accuracy at t = 0 for its data set, and drop its edit."""
        if result is not None and result.accuracy_post is not None and self._accuracy_key is not None:
            self._accuracies.setdefault(self._accuracy_key, result.accuracy_post)
        self._drop_edit()

    def _drop_edit(self) -> None:
        if self._module is not None:
            self._module.drop_edit()
            self._module = None


def _is_global_zero() -> bool:
    """Whether this process is global rank 0, the one that writes the sweep's rows and holds the results lock.

    Before the first trainer has set up, ``rank_zero_only.rank`` comes from ``RANK``, ``LOCAL_RANK`` or
    ``SLURM_PROCID`` only, so the first process of a node started by hand with ``NODE_RANK`` > 0 (or torchrun's
    ``GROUP_RANK``) reads 0 there; it is not rank 0 either. Global rank 0 is always on node 0.
    """
    node_rank = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    return rank_zero_only.rank == 0 and int(node_rank) == 0


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


# ---------------------------------------------------------------------------------------------- edit and plot
def edit(
    model: str,
    *,
    pretrained: str,
    edit: DeltaEdit,
    output_dir: str,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
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
        include: regular expressions on tensor names (re.search): only the tensors that match one are edited. One
            pattern or a list.
        exclude: regular expressions on tensor names: the tensors that match one are left as they are, e.g.
            ``'^(lm_head.weight)$'``. One pattern or a list.
        dtype: dtype to load the model in (``bfloat16``, ``float32``, ...); default its stored dtype.
        overwrite: replace a non-empty ``output_dir`` whole (its old files, an old shard index included, are
            removed once the new model is complete).
    """
    path = save_edited(model, pretrained=pretrained, edit=edit, output_dir=output_dir, include=include,
                       exclude=exclude, dtype=dtype, overwrite=overwrite)
    print(f"Edited model ({edit!r}) written to {path}")
    return path


def plot(results: str | list[str], output_dir: str = "figures", extension: str = "png") -> list[str]:
    """Draw every figure the rows of the results files allow (see :mod:`lightning_delta.plots`).

    Rows of different settings (C, model, data, loss, ...) are drawn as separate lines, labelled by what differs.

    Args:
        results: the JSONL results file written by ``lightning-delta sweep`` or ``demo``, or a list of them;
            each must exist.
        output_dir: where the figures go.
        extension: image format (``png``, ``pdf``, ``svg``).
    """
    paths = [results] if isinstance(results, (str, os.PathLike)) else list(results)
    rows = list(iter_rows(paths))
    if not rows:
        raise ValueError(f"No rows in {', '.join(map(str, paths))}: run `lightning-delta sweep` first.")
    written = plot_all(rows, output_dir, extension)
    for path in written.values():
        print(f"figure: {path}")
    return [str(path) for path in written.values()]
