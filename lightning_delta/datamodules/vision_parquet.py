"""Image classification data sets in the hub's parquet format, as FusionBench's CLIP experiments read them.

Each split is one or more parquet files with the columns ``image`` (a struct ``{"bytes", "path"}`` holding a PNG or
JPEG file, the ``datasets.Image`` feature) and ``label`` (a ``datasets.ClassLabel``), written by ``datasets``
(``Dataset.to_parquet``, ``push_to_hub``) with the features in the file's schema metadata. On the hub they lie as
``data/<split>-0000i-of-0000n.parquet`` (FusionBench's ``tanganke/<task>`` sets) or
``<config>/<split>-0000i-of-0000n.parquet`` (``ylecun/mnist``, ``ufldl-stanford/svhn``), e.g.::

    tanganke/sun397/data/test-00000-of-00018.parquet
    ufldl-stanford/svhn/cropped_digits/test-00000-of-00001.parquet

A data set is given as a hub id, read from its snapshot in the hub download cache when there is one (offline under
``HF_HUB_OFFLINE=1``; ``hf download <id> --repo-type dataset`` puts it there) and else by ``datasets.load_dataset``;
or as a local folder (a copy of the hub repository) or parquet file. The rows keep the files' order, the files are
read in sorted order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightning_delta.datamodules._common import hub_offline, not_cached_message, resolve_files
from lightning_delta.datamodules.classnames import CLASSNAMES, check_task

__all__ = ["FUSIONBENCH_DATA", "ParquetImages", "classnames_from_data", "load_parquet_images"]

# The hub id and config of each task's data in FusionBench (config/dataset/image_classification/{train,test}/
# <task>.yaml): the data its CLIP checkpoints (tanganke/clip-vit-base-patch32_<task>) were fine-tuned and evaluated on.
FUSIONBENCH_DATA: dict[str, tuple[str, str | None]] = {
    "sun397": ("tanganke/sun397", None),
    "stanford_cars": ("tanganke/stanford_cars", None),
    "resisc45": ("tanganke/resisc45", None),
    "eurosat": ("tanganke/eurosat", None),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits"),
    "gtsrb": ("tanganke/gtsrb", None),
    "mnist": ("ylecun/mnist", None),
    "dtd": ("tanganke/dtd", None),
}
COLUMNS = ("image", "label")


def _files(data: str, split: str, config: str | None) -> list[Path] | None:
    """The parquet files of ``split`` (local, or the hub snapshot's), or ``None`` for a hub id to read online."""
    files = resolve_files(data, split, config, "image")
    if files is not None:
        wrong = [str(f) for f in files if f.suffix != ".parquet"]
        if wrong:
            raise ValueError(
                f"Image data sets are parquet files (columns `image` and `label`); {', '.join(wrong)} "
                "is not one. Point `data` at the parquet files of the split, or use `root` for image "
                "folders."
            )
    return files


def _not_cached(data: str, config: str | None, error: Exception) -> FileNotFoundError:
    detail = f"{f' (config {config!r})' if config else ''} (nor in the datasets cache: {type(error).__name__})"
    return FileNotFoundError(not_cached_message(data, "image", None, detail))


def load_parquet_images(data: str, split: str, config: str | None = None) -> tuple[Any, list[tuple[int, str]]]:
    """``split`` of the parquet data set ``data`` as a ``datasets.Dataset`` with an ``Image`` column ``image`` and an
    integer column ``label``, and the origin of each file's first row (for messages): ``[(first row, file), ...]``.

    Raises:
        FileNotFoundError: a missing local path or split; offline, a hub id that is not cached (with the command that
            fetches it).
        ValueError: files that are not parquet, or that lack the columns ``image`` and ``label``.
    """
    import datasets  # here, not at the top: it takes seconds to import

    files = _files(data, split, config)
    if files is None:
        try:
            dataset = datasets.load_dataset(data, config, split=split)
        except Exception as error:
            if not hub_offline():
                raise
            raise _not_cached(data, config, error) from error
        origins = [(0, f"{data} (split {split!r})")]
    else:
        dataset = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        origins = _file_origins(files)
    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        where = ", ".join(name for _, name in origins)
        raise ValueError(
            f"The image data set {data!r} (split {split!r}: {where}) lacks the column(s) "
            f"{', '.join(map(repr, missing))}; it has {', '.join(map(repr, dataset.column_names))}. An "
            "image data set needs `image` (the image file's bytes) and `label` (the class index)."
        )
    if not isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image())  # a plain struct {bytes, path}: decode it as images
    return dataset, origins


def _file_origins(files: list[Path]) -> list[tuple[int, str]]:
    import pyarrow.parquet as pq

    origins, start = [], 0
    for file in files:
        origins.append((start, str(file)))
        start += pq.ParquetFile(str(file)).metadata.num_rows
    return origins


def where(origins: list[tuple[int, str]], index: int) -> str:
    """``"row 3 (counting from 0) of /data/test-00001-of-00002.parquet"`` for row ``index`` of the whole split."""
    start, name = max((o for o in origins if o[0] <= index), key=lambda o: o[0])
    return f"row {index - start} (counting from 0) of {name}"


def _features(data: str, split: str, config: str | None) -> Any:
    """The ``datasets.Features`` of the data set, from the schema of its first parquet file (nothing is copied)."""
    import datasets
    import pyarrow.parquet as pq

    files = _files(data, split, config)
    if files is not None:
        return datasets.Features.from_arrow_schema(pq.read_schema(str(files[0])))
    try:
        return datasets.load_dataset_builder(data, config).info.features
    except Exception as error:
        if not hub_offline():
            raise
        raise _not_cached(data, config, error) from error


def readable(name: str) -> str:
    """A class name as words: SUN397's ``/a/apartment_building/outdoor`` -> ``apartment building outdoor``."""
    return re.sub(r"^/[a-z]/", "", name).replace("/", " ").replace("_", " ").strip()


def classnames_from_data(task: str, data: str, config: str | None = None, split: str = "test") -> list[str]:
    """The class names of ``task`` in label order: the names of the data set's ``label`` (``ClassLabel``) as words
    for Stanford Cars and SUN397; the library's names (:data:`CLASSNAMES`) for the others, after checking that the
    data set has as many classes.

    Raises:
        ValueError: a Stanford Cars or SUN397 data set whose ``label`` has no class names; a data set with another
            number of classes than the task.
    """
    import datasets

    task = check_task(task)
    label = _features(data, split, config).get("label")
    names = label.names if isinstance(label, datasets.ClassLabel) else None
    if task in CLASSNAMES:
        if names is not None and len(names) != len(CLASSNAMES[task]):
            raise ValueError(
                f"The `label` of {data!r} has {len(names)} classes ({', '.join(names[:3])}, ...) but "
                f"{task} has {len(CLASSNAMES[task])}: is it {task}'s data set?"
            )
        return list(CLASSNAMES[task])
    if names is None:
        raise ValueError(
            f"The class names of {task} come with its data, but the `label` of {data!r} is "
            f"{label!r}, not a ClassLabel with names. Give a data set whose `label` is a ClassLabel (as "
            f"{FUSIONBENCH_DATA[task][0]!r}), or pass `root` (torchvision's layout) or `classnames`."
        )
    return [readable(name) for name in names]


class ParquetImages(Dataset):
    """Items ``(PIL image, label)`` of a parquet image data set (:func:`load_parquet_images`), in the files' order.

    Every label is checked once, here: an integer from 0 to ``num_classes - 1``.

    Raises:
        ValueError: a missing label or one outside the classes (the message names the file and row).
    """

    def __init__(self, data: str, split: str, config: str | None, num_classes: int, task: str) -> None:
        self.dataset, origins = load_parquet_images(data, split, config)
        self.labels = self.dataset["label"][:]  # the label column alone; the images stay on disk
        for index, label in enumerate(self.labels):
            if not isinstance(label, int) or not 0 <= label < num_classes:
                raise ValueError(
                    f"{task} {where(origins, index)}: `label` is {label!r}, expected a class index 0-{num_classes - 1}."
                )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index]["image"], self.labels[index]
