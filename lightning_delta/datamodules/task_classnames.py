"""The class names of an image task in label order, wherever they come from: the library's table
(:data:`~lightning_delta.datamodules.classnames.CLASSNAMES`), a parquet data set's ``label`` ``ClassLabel``
(:func:`~lightning_delta.datamodules.vision_parquet.classnames_from_data`), or the metadata of a torchvision folder
(Stanford Cars' ``devkit/cars_meta.mat``, SUN397's ``ClassName.txt``)."""

from __future__ import annotations

from pathlib import Path

from lightning_delta.datamodules.classnames import CLASSNAMES, check_task
from lightning_delta.datamodules.vision_parquet import classnames_from_data

__all__ = ["get_classnames"]


def _sun397_names(root: Path) -> list[str]:
    path = root / "SUN397" / "ClassName.txt"
    if not path.exists():
        raise FileNotFoundError(f"SUN397 class names need {path} (shipped in the SUN397 archive).")
    # "/a/apartment_building/outdoor" -> "apartment building outdoor"
    return [
        line.strip()[3:].replace("/", " ").replace("_", " ") for line in path.read_text().splitlines() if line.strip()
    ]


def _cars_names(root: Path) -> list[str]:
    path = root / "stanford_cars" / "devkit" / "cars_meta.mat"
    if not path.exists():
        raise FileNotFoundError(f"Stanford Cars class names need {path} (the devkit of the dataset).")
    try:
        import scipy.io
    except ImportError as error:
        raise ImportError("Reading Stanford Cars' devkit/cars_meta.mat needs scipy: pip install scipy") from error
    return [str(name) for name in scipy.io.loadmat(str(path), squeeze_me=True)["class_names"].tolist()]


def get_classnames(
    task: str,
    root: str | None = None,
    data: str | None = None,
    config: str | None = None,
) -> list[str]:
    """The class names of ``task`` in label order. Stanford Cars and SUN397 read them from their data: the parquet
    data set ``data`` (hub id or path; its ``label``'s ``ClassLabel`` names, see
    :func:`lightning_delta.datamodules.vision_parquet.classnames_from_data`) or the metadata under ``root``."""
    task = check_task(task)
    if data is not None:
        return classnames_from_data(task, data, config)
    if task in CLASSNAMES:
        return list(CLASSNAMES[task])
    if root is None:
        raise ValueError(
            f"The class names of {task} come with its data: pass `data` (the parquet data set, e.g. a "
            "hub id) or `root` (the dataset folder)."
        )
    return _sun397_names(Path(root)) if task == "sun397" else _cars_names(Path(root))
