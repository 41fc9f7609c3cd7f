"""A sweep's rows: one finished point each, as one line of the results file (:class:`SweepRow`)."""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import cache
from importlib import metadata
from typing import TYPE_CHECKING, Any

from lightning_delta.callbacks.result import RiemannResult

if TYPE_CHECKING:
    from lightning_delta.sweep.loop import SweepPoint

__all__ = ["DATASET_KEYS", "SweepRow", "dataset_label", "library_versions"]

# The data module's arguments that pick its data, in the order the data set label names them (``Vision/mnist/test``).
DATASET_KEYS = ("task", "tasks", "name", "subset", "split")


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

        Raises:
            ValueError: ``data`` is no row: the missing and unknown fields are named.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"A sweep row must be a mapping of its fields, got {type(data).__name__}: {data!r:.200}.")
        data = dict(data)
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
        return cls(**{**data, "result": RiemannResult.from_dict(data["result"])})
