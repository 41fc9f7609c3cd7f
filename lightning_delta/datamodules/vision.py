"""The eight image tasks of the paper's CLIP experiments, and the zero-shot classifier whose vision tower is edited.

:class:`VisionDataModule` reads each task from a parquet data set in the hub's format (``data``: a hub id such as
FusionBench's ``tanganke/sun397``, or a local copy; see :mod:`lightning_delta.datamodules.vision_parquet`), or from
a folder (``root``): MNIST, SVHN, GTSRB, DTD, EuroSAT, Stanford Cars and SUN397 through torchvision and RESISC45 as an
image folder. It turns images into ``pixel_values`` with the CLIP image processor.
:class:`ZeroShotClassifier` is the CLIP vision tower with a fixed head built once from the CLIP text tower over the
task's class names and templates: ``logits = scale · normalize(image features) @ normalize(text head)ᵀ``. The head
is the same for W_pre and W_post; only the vision tower (``vision_model.*``, ``visual_projection.weight``, named as in
``CLIPModel``) carries parameters, so the edit touches the vision tower alone.

A folder (``root``) holds torchvision's layout for each task (``download=True`` fetches them where torchvision can)
or, for RESISC45 and any image-folder copy, one sub-folder per class; files are read in sorted order (SUN397's too,
which torchvision leaves in the file system's order), and DTD's class numbers are its 47 classes' sorted order
whichever classes a split file holds::

    data/resisc45/airplane/airplane_001.jpg
    data/resisc45/beach/beach_001.jpg
    data/resisc45/forest/forest_001.jpg

No tokenizer is needed for the data: images become ``pixel_values`` with the CLIP image processor (``processor``, by
default ``openai/clip-vit-base-patch32``'s; give a local CLIP directory to stay offline). The model,
:class:`ZeroShotClassifier`, reads the CLIP tokenizer saved with ``clip`` (or ``tokenizer``) to build its head.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_delta.datamodules._common import check_fields, check_positive, validation_loader
from lightning_delta.datamodules.classnames import CLASSNAMES, check_task, get_templates
from lightning_delta.datamodules.task_classnames import get_classnames
from lightning_delta.datamodules.vision_parquet import ParquetImages
from lightning_delta.sources import load_model

if TYPE_CHECKING:
    from transformers import CLIPModel

__all__ = ["VisionDataModule", "ZeroShotClassifier", "build_vision_dataset", "expected_layout"]

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
TEST_EVERY = 5  # tasks without an official test split: every fifth image (in the dataset's order) is the test split

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def expected_layout(task: str, root: str | Path, split: str = "test") -> tuple[list[Path], str]:
    """The paths that must exist for ``task`` under ``root``, and how to get them."""
    root, task = Path(root), check_task(task)
    if task == "mnist":
        return (
            [root / "MNIST" / "raw" / name for name in _MNIST_FILES],
            "pass download=True, or put the four unpacked MNIST idx files in <root>/MNIST/raw",
        )
    if task == "svhn":
        return (
            [root / "svhn" / f"{split}_32x32.mat"],
            "pass download=True, or put SVHN's cropped-digits file <split>_32x32.mat in <root>/svhn (reading it "
            "needs scipy)",
        )
    if task == "gtsrb":
        folder = "Training" if split == "train" else "Final_Test/Images"
        paths = [root / "gtsrb" / "GTSRB" / folder] + (
            [] if split == "train" else [root / "gtsrb" / "GT-final_test.csv"]
        )
        return paths, "pass download=True, or unpack the GTSRB archives into <root>/gtsrb"
    if task == "dtd":
        return [root / "dtd" / "dtd"], "pass download=True, or unpack dtd-r1.0.1.tar.gz into <root>/dtd"
    if task == "eurosat":
        return [root / "eurosat" / "2750"], "pass download=True, or unpack EuroSAT.zip (RGB) into <root>/eurosat"
    if task == "stanford_cars":
        return (
            [root / "stanford_cars" / "devkit", root / "stanford_cars" / f"cars_{split}"],
            "torchvision can no longer download Stanford Cars: get the images and devkit (e.g. from Kaggle's "
            "copy) and lay them out as <root>/stanford_cars/{devkit,cars_train,cars_test, "
            "cars_test_annos_withlabels.mat}; reading them needs scipy",
        )
    if task == "sun397":
        return [root / "SUN397" / "ClassName.txt"], "pass download=True (37 GB), or unpack SUN397.tar.gz into <root>"
    return (
        [root / "resisc45"],
        "download NWPU-RESISC45 and unpack it so that each class is a folder <root>/resisc45/<class>/*.jpg "
        "(e.g. <root>/resisc45/airplane); optional split folders <root>/resisc45/<split>/<class>/ are used when "
        "present",
    )


def _length(dataset: Dataset) -> int:
    """``len(dataset)``: torchvision's data sets, RESISC45's folder and :class:`ParquetImages` all have one (a
    ``Dataset`` need not)."""
    return len(cast(Sized, dataset))


class _Every(Subset):
    """A fixed train/test split for datasets without one: index % TEST_EVERY == 0 is test."""

    def __init__(self, dataset: Dataset, split: str) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(
                f"This task has no official split; `split` must be 'train', 'test' or 'all', got {split!r}."
            )
        indices: Sequence[int] = range(_length(dataset))
        if split != "all":
            indices = [i for i in indices if (i % TEST_EVERY == 0) == (split == "test")]
        super().__init__(dataset, list(indices))


def _resisc45(root: Path, split: str, transform: Any) -> Dataset:
    from torchvision.datasets import ImageFolder

    base = root / "resisc45"
    for candidate in (base / split, base / "NWPU-RESISC45", base):
        if candidate.is_dir() and any(p.is_dir() for p in candidate.iterdir()):
            folder = candidate
            break
    else:
        raise FileNotFoundError(f"no class folders under {base}")
    names = CLASSNAMES["resisc45"]
    dataset = ImageFolder(str(folder), transform=transform)
    unknown = [c for c in dataset.classes if c.replace("_", " ") not in names]
    if unknown:
        raise ValueError(
            f"RESISC45 folders {unknown} in {folder} are not RESISC45 classes; expected folders among "
            f"{[n.replace(' ', '_') for n in names]}."
        )
    to_global = [names.index(c.replace("_", " ")) for c in dataset.classes]
    dataset.target_transform = to_global.__getitem__
    return dataset if folder == base / split else _Every(dataset, split)


def _check_mnist(dataset: Any, root: Path, split: str) -> Any:
    """Every MNIST image needs its label, a digit 0-9: raise naming the idx files otherwise."""
    prefix = "train" if split == "train" else "t10k"
    raw = root / "MNIST" / "raw"
    images, labels = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    if len(dataset.data) != len(dataset.targets):
        raise ValueError(
            f"MNIST {images} holds {len(dataset.data)} images but {labels} holds {len(dataset.targets)} "
            "labels; each image needs one label. Replace the two files by a matching pair."
        )
    outside = (dataset.targets < 0) | (dataset.targets > 9)
    if outside.any():
        index = int(outside.nonzero()[0])
        raise ValueError(
            f"MNIST label {index} (counting from 0) of {labels} is {int(dataset.targets[index])}, not a digit 0-9."
        )
    return dataset


def _sorted_sun397(dataset: Any) -> Any:
    """torchvision's SUN397 with its images in sorted path order (torchvision keeps the file system's order)."""
    order = sorted(range(len(dataset._image_files)), key=lambda i: dataset._image_files[i])
    dataset._image_files = [dataset._image_files[i] for i in order]
    dataset._labels = [dataset._labels[i] for i in order]
    return dataset


def _dtd_classes_numbered_in_full(dataset: Any, split: str) -> Any:
    """torchvision's DTD with each class numbered by its place among all 47 sorted classes (torchvision numbers the
    classes that the split file holds, so a partial file shifts them)."""
    names = CLASSNAMES["dtd"]
    folders = [path.parent.name for path in dataset._image_files]
    unknown = sorted(set(folders) - set(names))
    if unknown:
        raise ValueError(
            f"DTD's {split} split file ({dataset._meta_folder}) names folders {unknown} that are not DTD "
            f"classes; expected folders among {names}."
        )
    dataset._labels = [names.index(folder) for folder in folders]
    dataset.classes, dataset.class_to_idx = list(names), {name: i for i, name in enumerate(names)}
    return dataset


def _check_gtsrb_test_csv(path: Path) -> None:
    """Every row of GTSRB's ``GT-final_test.csv`` needs ``Filename`` and a ``ClassId`` 0-42; raise naming the row."""
    fields = {"Filename": str, "ClassId": str}
    with open(path, newline="") as file:
        for index, row in enumerate(csv.DictReader(file, delimiter=";", skipinitialspace=True)):
            row = {key: (value or None) for key, value in row.items() if key is not None}  # "" is missing too
            origin = f"row {index} (counting from 0, after the header) of {path}"
            check_fields(row, origin, fields, "GTSRB")
            if not row["ClassId"].strip().isdigit() or int(row["ClassId"]) >= len(CLASSNAMES["gtsrb"]):
                raise ValueError(
                    f"GTSRB {origin}: `ClassId` is {row['ClassId']!r}, expected a class index 0-"
                    f"{len(CLASSNAMES['gtsrb']) - 1}."
                )


def build_vision_dataset(
    task: str, root: str | Path, split: str = "test", download: bool = False, transform: Any = None
) -> Dataset:
    """The torchvision dataset (or RESISC45 image folder) of ``task``: items ``(PIL image, label)``.

    Raises:
        FileNotFoundError: the data is not under ``root``; the message says how to get it.
        ValueError: MNIST images without labels (or labels outside 0-9); a row of GTSRB's ``GT-final_test.csv``
            without ``Filename`` or a ``ClassId`` 0-42 (the message names the file and row).
    """
    from torchvision import datasets as tv

    task, root = check_task(task), Path(root).expanduser()
    paths, how = expected_layout(task, root, split)
    missing = [p for p in paths if not p.exists()]
    if missing and not (download and task not in ("stanford_cars", "resisc45")):
        raise FileNotFoundError(f"{task} data not found: {', '.join(map(str, missing))} missing. To get it: {how}.")
    common = dict(transform=transform)
    try:
        if task == "mnist":
            return _check_mnist(tv.MNIST(str(root), train=split == "train", download=download, **common), root, split)
        if task == "svhn":
            return tv.SVHN(str(root / "svhn"), split=split, download=download, **common)
        if task == "gtsrb":
            if split != "train" and (root / "gtsrb" / "GT-final_test.csv").exists():
                _check_gtsrb_test_csv(root / "gtsrb" / "GT-final_test.csv")
            return tv.GTSRB(str(root), split=split, download=download, **common)
        if task == "dtd":
            return _dtd_classes_numbered_in_full(tv.DTD(str(root), split=split, download=download, **common), split)
        if task == "eurosat":
            return _Every(tv.EuroSAT(str(root), download=download, **common), split)
        if task == "stanford_cars":
            return tv.StanfordCars(str(root), split=split, download=False, **common)
        if task == "sun397":
            return _Every(_sorted_sun397(tv.SUN397(str(root), download=download, **common)), split)
        return _resisc45(root, split, transform)
    except (RuntimeError, FileNotFoundError) as error:
        raise FileNotFoundError(f"{task} data could not be read under {root} ({error}). To get it: {how}.") from error


def load_image_processor(processor: Any) -> Any:
    if isinstance(processor, (str, Path)):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(processor))
    return processor


class _Processed(Dataset):
    """``{"pixel_values": (3, H, W), "labels": ()}`` items from a dataset of ``(PIL image, label)``."""

    def __init__(self, dataset: Dataset, processor: Any) -> None:
        self.dataset, self.processor = dataset, processor

    def __len__(self) -> int:
        return _length(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image, label = self.dataset[index]
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "labels": torch.tensor(int(label))}


class VisionDataModule(pl.LightningDataModule):
    """One of the eight image tasks as ``{"pixel_values": (B, 3, H, W), "labels": (B,)}`` batches.

    Args:
        task: ``mnist``, ``svhn``, ``gtsrb``, ``dtd``, ``eurosat``, ``stanford_cars``, ``sun397`` or ``resisc45``.
        root: the folder holding the data in torchvision's layout (``<root>/MNIST/raw``, ``<root>/svhn``,
            ``<root>/gtsrb``, ``<root>/dtd``, ``<root>/eurosat``, ``<root>/stanford_cars``, ``<root>/SUN397``), or
            ``<root>/resisc45/<class>/<image>.jpg`` for RESISC45 (one folder per class, named as its class with
            ``_`` for spaces, e.g. ``<root>/resisc45/airplane/airplane_001.jpg``). Give ``root`` or ``data``.
        data: a parquet data set in the hub's format (columns ``image`` and ``label``, files
            ``<split>-*.parquet``): a hub id, such as FusionBench's ``tanganke/<task>``
            (:data:`~lightning_delta.datamodules.vision_parquet.FUSIONBENCH_DATA`), read from the hub download cache
            when it is there (offline with ``HF_HUB_OFFLINE=1``); a local folder (a copy of the hub repository); or
            a parquet file. Its own splits are used.
        config: the sub-folder of ``data`` that holds the config to read, where it has several (``cropped_digits``
            of ``ufldl-stanford/svhn``).
        processor: the CLIP image processor that turns images into ``pixel_values``: a path or hub id
            (``AutoImageProcessor``; the CLIP model's directory holds one) or an object. No tokenizer is needed.
        split: ``"test"`` (default) or ``"train"`` (DTD also ``"val"``); with ``data``, any split of the data set.
            In ``root``, EuroSAT, SUN397 and an unsplit RESISC45 folder have no official split: every fifth image is
            ``"test"``, the rest ``"train"``, ``"all"`` is all.
        download: let torchvision download the data (not possible for Stanford Cars and RESISC45).
        batch_size: images per batch of the validation DataLoader (per process).
        num_workers: worker processes of the validation DataLoader.
        limit: the first ``limit`` images only (``None``: all).

    Raises:
        ValueError: an unknown task or bad arguments; neither or both of ``root`` and ``data``; (in ``setup``) a
            parquet data set without the columns ``image`` and ``label``, or with a label outside the task's classes.
        FileNotFoundError: (in ``setup``) missing data, with how to get it.
    """

    def __init__(
        self,
        task: str,
        root: str | None = None,
        data: str | None = None,
        config: str | None = None,
        processor: Any = DEFAULT_CLIP,
        split: str = "test",
        download: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        self.task = check_task(task)
        check_positive("batch_size", batch_size)
        if limit is not None:
            check_positive("limit", limit)
        if (root is None) == (data is None):
            raise ValueError(
                f"Give the {self.task} images as either `root` (a folder) or `data` (a parquet data set, "
                f"e.g. a hub id), not {'both' if root is not None else 'neither'}."
            )
        if download and data is not None:
            raise ValueError(
                "`download` is for torchvision's folders (`root`); a hub id in `data` is read from the "
                "hub download cache or downloaded by `datasets`."
            )
        self.root, self.data, self.config = root, data, config
        self.processor, self.split, self.download = processor, split, download
        self.batch_size, self.num_workers, self.limit = batch_size, num_workers, limit
        self.dataset: Dataset | None = None

    @property
    def classnames(self) -> list[str]:
        return get_classnames(self.task, self.root, self.data, self.config)

    @property
    def templates(self) -> list[str]:
        return get_templates(self.task)

    def prepare_data(self) -> None:
        if self.download:
            assert self.root is not None  # download comes with root, not data (__init__)
            build_vision_dataset(self.task, self.root, self.split, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        dataset: Dataset
        if self.data is not None:
            dataset = ParquetImages(self.data, self.split, self.config, len(self.classnames), self.task)
        else:
            assert self.root is not None  # root or data (__init__)
            dataset = build_vision_dataset(self.task, self.root, self.split, download=False)
        if self.limit is not None:
            dataset = Subset(dataset, range(min(self.limit, _length(dataset))))
        if _length(dataset) == 0:
            where = f"under {self.root}" if self.data is None else f"of {self.data}"
            raise ValueError(f"The {self.task} split {self.split!r} {where} has no images.")
        self.dataset = _Processed(dataset, load_image_processor(self.processor))

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self.dataset is not None  # setup made it
        return validation_loader(self, self.dataset, self.batch_size, self.num_workers, None)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def _vision_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear | None]:
    """(vision transformer, visual projection or None) of a CLIPModel, CLIPVisionModel(WithProjection)."""
    vision = getattr(model, "vision_model", None)
    if vision is None and getattr(getattr(model, "config", None), "model_type", None) == "clip_vision_model":
        vision = model  # transformers 5's CLIPVisionModel is the tower itself (CLIPModel.vision_model is one)
    if vision is None:
        raise ValueError(f"{type(model).__name__} has no `vision_model`; give a CLIP model or CLIP vision model.")
    return vision, getattr(model, "visual_projection", None)


def _load_clip(source: Any, dtype: Any) -> CLIPModel:
    """``CLIPModel`` for ``clip`` (a module is kept as it is)."""
    return cast("CLIPModel", load_model(source, dtype, "CLIPModel", argument="clip"))


def _load_vision(source: Any, dtype: Any) -> nn.Module:
    """A vision tower as the class its config names: ``CLIPModel``, ``CLIPVisionModel`` or
    ``CLIPVisionModelWithProjection`` (a module is kept as it is)."""
    return load_model(source, dtype, argument="vision_model")


class ZeroShotClassifier(nn.Module):
    """CLIP vision tower + fixed zero-shot head: ``logits = s · (f / ‖f‖) @ Hᵀ`` (B, K).

    ``f`` (B, D) are the projected image features, ``H`` (K, D) the head: for each class the mean of the normalised
    text features of its templates, normalised again; ``s = exp(logit_scale)`` of the CLIP model. The head is
    computed once here and is a buffer (not a parameter, not in the state dict), so W_pre and W_post share it and
    only the vision tower is edited. Works with :class:`~lightning_delta.losses.ClassificationLoss`.

    Args:
        clip: the CLIP model (text and vision towers): path, hub id or ``CLIPModel``.
        task: one of the eight tasks, for its class names and templates (or give ``classnames`` and ``templates``).
        classnames: explicit class names (with ``templates``, instead of ``task``).
        templates: explicit prompt templates, each with one ``{}`` for the class name.
        root: the data folder, for Stanford Cars and SUN397 whose class names come with the data.
        data: the parquet data set (hub id or path), for Stanford Cars and SUN397: the names of its ``label``
            ``ClassLabel``, as words (instead of ``root``). For the other tasks, its number of classes is checked.
        config: the config (sub-folder) of ``data``, where it has several.
        vision_model: the vision tower to use instead of ``clip``'s (a per-task fine-tuned tower, W_post): path or
            module (``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` or ``CLIPModel``).
        tokenizer: the CLIP tokenizer for the text tower: a path, hub id or object (default: the one saved
            with ``clip``; needed when ``clip`` is a module).
        dtype: dtype for models loaded from paths.
    """

    vision_model: nn.Module
    visual_projection: nn.Linear
    head: Tensor  # (K, D), a buffer
    logit_scale: Tensor  # (), a buffer

    def __init__(
        self,
        clip: Any = DEFAULT_CLIP,
        task: str | None = None,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        root: str | None = None,
        data: str | None = None,
        config: str | None = None,
        vision_model: Any = None,
        tokenizer: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if task is not None:
            classnames = classnames if classnames is not None else get_classnames(task, root, data, config)
            templates = templates if templates is not None else get_templates(task)
        elif classnames is None or templates is None:
            raise ValueError("Give `task`, or both `classnames` and `templates`.")
        if not classnames or not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError("`classnames` must be non-empty and each template must hold exactly one '{}'.")
        model = _load_clip(clip, dtype)
        if tokenizer is None:
            if not isinstance(clip, (str, Path)):
                raise ValueError("Pass `tokenizer=` (the CLIP tokenizer) when `clip` is a module.")
            tokenizer = clip
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        head = self.zero_shot_head(model, tokenizer, classnames, templates)
        vision, projection = _vision_parts(_load_vision(vision_model, dtype) if vision_model is not None else model)
        self.vision_model = vision
        self.visual_projection = projection if projection is not None else model.visual_projection
        self.classnames, self.templates = list(classnames), list(templates)
        self.register_buffer("head", head.to(self.visual_projection.weight.dtype), persistent=False)  # (K, D)
        scale = model.logit_scale.detach().exp().to(self.visual_projection.weight.dtype)
        self.register_buffer("logit_scale", scale.clone(), persistent=False)  # ()

    @staticmethod
    @torch.no_grad()
    def zero_shot_head(model: CLIPModel, tokenizer: Any, classnames: list[str], templates: list[str]) -> Tensor:
        """(K, D): per class, the normalised mean of the normalised text features of its templates."""
        device = model.text_projection.weight.device
        rows = []
        for name in classnames:
            tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt").to(device)
            pooled = model.text_model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output
            features = F.normalize(model.text_projection(pooled), dim=-1)  # (templates, D)
            rows.append(F.normalize(features.mean(dim=0), dim=-1))
        return torch.stack(rows)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(B, D) normalised projected image features of ``pixel_values`` (B, 3, H, W)."""
        dtype = self.visual_projection.weight.dtype
        pooled = self.vision_model(pixel_values=pixel_values.to(dtype)).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.logit_scale * self.image_features(pixel_values) @ self.head.T  # (B, K)
