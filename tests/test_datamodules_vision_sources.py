"""The image data as users have it: FusionBench's parquet data sets (``tanganke/<task>``, ``ylecun/mnist``,
``ufldl-stanford/svhn``) by local path and by hub id from the hub download cache offline, and torchvision folders
read in sorted order (SUN397) with DTD's classes numbered in full."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_delta.datamodules import CLASSNAMES, VisionDataModule, ZeroShotClassifier, get_classnames
from lightning_delta.datamodules.vision_parquet import FUSIONBENCH_DATA, readable
from tests.support.datamodule_fixtures import image_classnames, write_fusionbench_repository, write_hub_cache_entry
from tests.support.tiny_models import make_tiny_image_processor, make_tiny_model, make_tiny_tokenizer

RESISC45_TEST = [[3, 0, 44, 7], [12, 3, 9]]  # two files of the test split
RESISC45_TRAIN = [[1, 2, 5, 8, 13]]


@pytest.fixture(scope="module")
def processor():
    return make_tiny_image_processor()


def resisc45_copy(root: Path) -> dict[str, list[bytes]]:
    return write_fusionbench_repository(
        root, "tanganke/resisc45", "resisc45", {"train": RESISC45_TRAIN, "test": RESISC45_TEST}
    )


def everything(dm) -> dict[str, torch.Tensor]:
    batches = list(dm.val_dataloader())
    return {key: torch.cat([batch[key] for batch in batches]) for key in ("pixel_values", "labels")}


def expected_pixels(processor, files: list[bytes]) -> torch.Tensor:
    """Each image file decoded by PIL directly and passed through the processor on its own."""
    return torch.stack(
        [
            processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")["pixel_values"][0]
            for data in files
        ]
    )


def test_a_local_copy_of_a_fusionbench_set_reads_its_own_splits_in_file_order(tmp_path, processor):
    images = resisc45_copy(tmp_path / "resisc45")
    test = everything(VisionDataModule("resisc45", data=str(tmp_path / "resisc45"), processor=processor, batch_size=3))
    assert test["labels"].tolist() == RESISC45_TEST[0] + RESISC45_TEST[1]  # both files, in order: no split of ours
    torch.testing.assert_close(test["pixel_values"], expected_pixels(processor, images["test"]), rtol=0, atol=0)
    train = everything(
        VisionDataModule("resisc45", data=str(tmp_path / "resisc45"), split="train", processor=processor, batch_size=8)
    )
    assert train["labels"].tolist() == RESISC45_TRAIN[0]
    torch.testing.assert_close(train["pixel_values"], expected_pixels(processor, images["train"]), rtol=0, atol=0)
    # one parquet file is the split itself
    second = tmp_path / "resisc45" / "data" / "test-00001-of-00002.parquet"
    single = everything(VisionDataModule("resisc45", data=str(second), processor=processor))
    assert single["labels"].tolist() == RESISC45_TEST[1]
    limited = VisionDataModule("resisc45", data=str(tmp_path / "resisc45"), processor=processor, limit=2)
    assert everything(limited)["labels"].tolist() == RESISC45_TEST[0][:2]


@pytest.mark.parametrize("task", sorted(FUSIONBENCH_DATA))
def test_each_task_by_hub_id_offline_from_the_download_cache_equals_the_folder(task, tmp_path, offline_hub, processor):
    repo_id, config = FUSIONBENCH_DATA[task]
    size = len(image_classnames(task))
    labels = [[size - 1, 0, size // 2], [1]]
    images = write_fusionbench_repository(tmp_path / "copy", repo_id, task, {"test": labels})
    write_hub_cache_entry(offline_hub, repo_id, tmp_path / "copy")
    by_id = everything(VisionDataModule(task, data=repo_id, config=config, processor=processor, batch_size=3))
    by_folder = everything(VisionDataModule(task, data=str(tmp_path / "copy"), config=config, processor=processor))
    assert by_id["labels"].tolist() == by_folder["labels"].tolist() == labels[0] + labels[1]
    torch.testing.assert_close(by_id["pixel_values"], expected_pixels(processor, images["test"]), rtol=0, atol=0)
    torch.testing.assert_close(by_folder["pixel_values"], by_id["pixel_values"], rtol=0, atol=0)


def test_hub_id_offline_without_a_cached_copy_says_how_to_fetch_it(offline_hub, processor):
    dm = VisionDataModule("dtd", data="tanganke/dtd", processor=processor)
    with pytest.raises(
        FileNotFoundError,
        match=r"image data set 'tanganke/dtd' \(revision 'main'\) is not in the hub "
        r"download cache .*`hf download tanganke/dtd --repo-type dataset`",
    ):
        dm.setup()


def test_svhn_reads_one_config_never_both(tmp_path, processor):
    write_fusionbench_repository(tmp_path / "svhn", "ufldl-stanford/svhn", "svhn", {"test": [[4, 2]]})
    with pytest.raises(
        ValueError,
        match=r"split 'test' in 2 folders \('cropped_digits' and 'full_numbers'\).*never "
        r"mixed",
    ):
        VisionDataModule("svhn", data=str(tmp_path / "svhn"), processor=processor).setup()
    dm = VisionDataModule("svhn", data=str(tmp_path / "svhn"), config="cropped_digits", processor=processor)
    assert everything(dm)["labels"].tolist() == [4, 2]


@pytest.mark.slow
def test_sun397_and_cars_class_names_come_from_the_data_sets_class_label(tmp_path, offline_hub):
    for task in ("sun397", "stanford_cars"):
        repo_id, _ = FUSIONBENCH_DATA[task]
        write_fusionbench_repository(tmp_path / task, repo_id, task, {"test": [[0, 1]]})
        write_hub_cache_entry(offline_hub, repo_id, tmp_path / task)
    sun397 = get_classnames("sun397", data="tanganke/sun397")
    assert len(sun397) == 397 and sun397[:2] == ["scene 000 indoor", "scene 001 indoor"]
    assert get_classnames("stanford_cars", data=str(tmp_path / "stanford_cars")) == image_classnames("stanford_cars")
    assert readable("/a/apartment_building/outdoor") == "apartment building outdoor"
    assert readable("AM General Hummer SUV 2000") == "AM General Hummer SUV 2000"
    dm = VisionDataModule("sun397", data="tanganke/sun397", processor=make_tiny_image_processor())
    assert dm.classnames == sun397
    clip = make_tiny_model("clip", dtype=torch.float64)
    model = ZeroShotClassifier(clip, task="sun397", data="tanganke/sun397", tokenizer=make_tiny_tokenizer())
    assert model.classnames == sun397 and model.head.shape[0] == 397
    direct = ZeroShotClassifier(clip, classnames=sun397, templates=model.templates, tokenizer=make_tiny_tokenizer())
    torch.testing.assert_close(model.head, direct.head, rtol=0, atol=0)


def test_a_data_set_of_another_task_or_without_its_columns_is_refused(tmp_path, processor):
    write_fusionbench_repository(tmp_path / "mnist", "ylecun/mnist", "mnist", {"test": [[1, 2]]})
    with pytest.raises(
        ValueError,
        match=r"The `label` of .* has 10 classes \(0, 1, 2, \.\.\.\) but resisc45 has 45: "
        r"is it resisc45's data set\?",
    ):
        VisionDataModule("resisc45", data=str(tmp_path / "mnist"), processor=processor).setup()
    from tests.support.datamodule_fixtures import write_parquet

    write_parquet(
        tmp_path / "plain" / "test-00000-of-00001.parquet", [{"img": {"bytes": b"", "path": "a.png"}, "label": 1}]
    )
    with pytest.raises(ValueError, match=r"lacks the column\(s\) 'image'; it has 'img', 'label'"):
        VisionDataModule("mnist", data=str(tmp_path / "plain"), processor=processor).setup()


def test_a_label_outside_the_classes_names_the_file_and_row(tmp_path, processor):
    import datasets

    from tests.support.datamodule_fixtures import write_image_parquet

    # ClassLabel names of the right number, but a label (written without the feature's check) of another data set
    folder = tmp_path / "eurosat" / "data"
    write_image_parquet(folder / "test-00000-of-00002.parquet", [1, 2], image_classnames("eurosat"))
    rows = datasets.Dataset.from_parquet(str(folder / "test-00000-of-00002.parquet")).to_dict()
    rows["label"] = [3, 10, 4]
    rows["image"] = rows["image"] + rows["image"][:1]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "test-00001-of-00002.parquet"))
    with pytest.raises(
        ValueError,
        match=r"eurosat row 1 \(counting from 0\) of .*test-00001-of-00002.parquet: `label` "
        r"is 10, expected a class index 0-9",
    ):
        VisionDataModule("eurosat", data=str(tmp_path / "eurosat"), processor=processor).setup()


def test_root_or_data_one_of_them(tmp_path):
    with pytest.raises(ValueError, match="either `root` .* or `data` .*, not both"):
        VisionDataModule("mnist", root=str(tmp_path), data="ylecun/mnist")
    with pytest.raises(ValueError, match="either `root` .* or `data` .*, not neither"):
        VisionDataModule("mnist")


# ----------------------------------------------------------------------------- torchvision folders, sorted
def write_sun397(root: Path, images: dict[str, list[str]]) -> None:
    """``root/SUN397/ClassName.txt`` and ``root/SUN397/<letter>/<class>/sun_<name>.jpg`` (JPEG files)."""
    base = root / "SUN397"
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("".join(f"{name}\n" for name in images))
    for index, (name, files) in enumerate(images.items()):
        (base / name.strip("/")).mkdir(parents=True)
        for number, file in enumerate(files):
            Image.new("RGB", (6, 5), (index * 40, number * 30, 7)).save(base / name.strip("/") / f"sun_{file}.jpg")


def test_sun397_folder_is_read_in_sorted_order_whatever_the_file_system_lists(tmp_path, monkeypatch, processor):
    write_sun397(tmp_path, {"/a/abbey": ["zz", "aa"], "/b/bakery/shop": ["mm"], "/a/airplane_cabin": ["bb", "cc"]})
    listed = Path.rglob

    def reversed_listing(self, pattern, *args, **kwargs):  # a file system that lists the newest first
        return iter(sorted(listed(self, pattern, *args, **kwargs), reverse=True))

    monkeypatch.setattr(Path, "rglob", reversed_listing)
    dm = VisionDataModule("sun397", root=str(tmp_path), split="all", processor=processor, batch_size=5)
    dm.setup()
    files = sorted((tmp_path / "SUN397").rglob("sun_*.jpg"))
    names = [line[3:] for line in (tmp_path / "SUN397" / "ClassName.txt").read_text().split()]
    expected = [names.index("/".join(f.relative_to(tmp_path / "SUN397").parts[1:-1])) for f in files]
    assert everything(dm)["labels"].tolist() == expected == [0, 0, 2, 2, 1]
    reference = [processor(images=Image.open(f).convert("RGB"), return_tensors="pt")["pixel_values"][0] for f in files]
    torch.testing.assert_close(everything(dm)["pixel_values"], torch.stack(reference), rtol=0, atol=0)
    test = VisionDataModule("sun397", root=str(tmp_path), processor=processor)  # every fifth of the sorted files
    assert everything(test)["labels"].tolist() == [expected[0]]


def write_dtd(root: Path, split_lines: list[str]) -> None:
    """``root/dtd/dtd/images/<class>/<class>_0001.jpg`` and ``labels/test1.txt`` (and empty train1/val1)."""
    base = root / "dtd" / "dtd"
    (base / "labels").mkdir(parents=True)
    for line in split_lines:
        (base / "images" / line).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6), (len(line), 20, 30)).save(base / "images" / line)
    (base / "labels" / "test1.txt").write_text("".join(f"{line}\n" for line in split_lines))


def test_dtd_classes_are_numbered_among_all_47_whichever_a_split_file_holds(tmp_path, processor):
    write_dtd(tmp_path, ["zigzagged/zigzagged_0001.jpg", "banded/banded_0002.jpg", "porous/porous_0003.jpg"])
    labels = everything(VisionDataModule("dtd", root=str(tmp_path), processor=processor))["labels"].tolist()
    names = CLASSNAMES["dtd"]
    assert labels == [names.index("zigzagged"), names.index("banded"), names.index("porous")] == [46, 0, 31]
    write_dtd(tmp_path / "other", ["velvet/velvet_0001.jpg"])
    with pytest.raises(ValueError, match=r"names folders \['velvet'\] that are not DTD classes"):
        VisionDataModule("dtd", root=str(tmp_path / "other"), processor=processor).setup()
