"""VisionDataModule and ZeroShotClassifier: real file layouts (MNIST idx, RESISC45 folders), the zero-shot head
against a direct computation, the Riemann term against brute force, and the errors for missing data."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_delta.callbacks import RiemannCallback
from lightning_delta.datamodules import CLASSNAMES, TASKS, VisionDataModule, ZeroShotClassifier, get_classnames
from lightning_delta.datamodules.classnames import get_templates
from lightning_delta.losses import ClassificationLoss
from lightning_delta.module import DeltaEditModule
from tests.support.datamodule_fixtures import _write_idx, write_gtsrb_test, write_mnist, write_resisc45
from tests.support.riemann_support import brute_force, random_edits
from tests.support.tiny_models import make_post_trained, make_tiny_image_processor, make_tiny_model, make_tiny_tokenizer

# The tiny CLIP text tower pools at the largest token id (CLIP's legacy rule for eos id 2) under a causal mask: the
# class name comes first so that every position sees it.
TEMPLATES = ["{} in a photo.", "{} is what the photo shows."]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def clip():
    return make_tiny_model("clip", dtype=torch.float64)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def test_class_names_and_templates():
    sizes = {"mnist": 10, "svhn": 10, "gtsrb": 43, "dtd": 47, "eurosat": 10, "resisc45": 45}
    assert {task: len(get_classnames(task)) for task in sizes} == sizes
    assert all(len(set(CLASSNAMES[task])) == size for task, size in sizes.items())
    assert CLASSNAMES["dtd"] == sorted(CLASSNAMES["dtd"])
    assert all(t.count("{}") == 1 for task in TASKS for t in get_templates(task))
    with pytest.raises(ValueError, match="Unknown vision task 'imagenet'; choose one of mnist"):
        get_classnames("imagenet")
    with pytest.raises(ValueError, match="pass `data` .* or `root`"):
        get_classnames("sun397")


def test_sun397_names_come_from_its_class_list(tmp_path):
    (tmp_path / "SUN397").mkdir()
    (tmp_path / "SUN397" / "ClassName.txt").write_text("/a/abbey\n/a/apartment_building/outdoor\n/b/bakery/shop\n")
    assert get_classnames("sun397", str(tmp_path)) == ["abbey", "apartment building outdoor", "bakery shop"]


def test_mnist_idx_files_through_the_clip_processor(tmp_path):
    images, labels = write_mnist(tmp_path)
    processor = make_tiny_image_processor()
    dm = VisionDataModule("mnist", str(tmp_path), processor=processor, batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].tolist() == labels[:4].tolist()
    from PIL import Image

    direct = processor(images=Image.fromarray(images[1]).convert("RGB"), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(batch["pixel_values"][1], direct)
    assert len(dm.val_dataloader().dataset) == len(labels)
    assert len(VisionDataModule("mnist", str(tmp_path), processor=processor, limit=3).val_dataloader().dataset) == 3


def test_resisc45_image_folder_labels_are_the_class_indices(tmp_path):
    write_resisc45(tmp_path, classes=("airplane", "sea_ice", "wetland"), per_class=5)
    processor = make_tiny_image_processor()
    names = CLASSNAMES["resisc45"]
    everything = VisionDataModule("resisc45", str(tmp_path), processor=processor, split="all", batch_size=15)
    labels = next(iter(everything.val_dataloader()))["labels"].tolist()
    assert labels == [names.index("airplane")] * 5 + [names.index("sea ice")] * 5 + [names.index("wetland")] * 5
    test = VisionDataModule("resisc45", str(tmp_path), processor=processor, batch_size=15)
    train = VisionDataModule("resisc45", str(tmp_path), processor=processor, split="train", batch_size=15)
    assert len(test.val_dataloader().dataset) == 3 and len(train.val_dataloader().dataset) == 12  # every fifth
    (tmp_path / "resisc45" / "not_a_class").mkdir()
    (tmp_path / "resisc45" / "not_a_class" / "x.png").write_bytes(
        (tmp_path / "resisc45" / "airplane" / "airplane_001.png").read_bytes()
    )
    with pytest.raises(ValueError, match="are not RESISC45 classes"):
        VisionDataModule("resisc45", str(tmp_path), processor=processor).setup()


@pytest.mark.parametrize("task", TASKS)
def test_missing_data_says_how_to_get_it(task, tmp_path):
    dm = VisionDataModule(task, str(tmp_path / "nothing"), processor=make_tiny_image_processor())
    with pytest.raises(FileNotFoundError, match=f"{task} data not found: .* To get it: "):
        dm.setup()


def test_mnist_images_without_labels_name_both_files(tmp_path):
    images, labels = write_mnist(tmp_path, num_test=7)
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels[:5])  # two images lose their labels
    dm = VisionDataModule("mnist", str(tmp_path), processor=make_tiny_image_processor())
    with pytest.raises(
        ValueError,
        match=r"MNIST .*t10k-images-idx3-ubyte holds 7 images but .*t10k-labels-idx1-ubyte "
        r"holds 5 labels; each image needs one label",
    ):
        dm.setup()
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([1, 2, 3, 4, 10, 5, 6]))
    with pytest.raises(
        ValueError,
        match=r"MNIST label 4 \(counting from 0\) of .*t10k-labels-idx1-ubyte is 10, not a "
        r"digit 0-9",
    ):
        VisionDataModule("mnist", str(tmp_path), processor=make_tiny_image_processor()).setup()
    # the train split's files are intact
    train = VisionDataModule("mnist", str(tmp_path), processor=make_tiny_image_processor(), split="train")
    assert len(train.val_dataloader().dataset) == 4


def test_gtsrb_test_split_reads_its_csv_labels(tmp_path):
    images = write_gtsrb_test(tmp_path, labels=(16, 1, 38))
    processor = make_tiny_image_processor()
    batch = next(iter(VisionDataModule("gtsrb", str(tmp_path), processor=processor, batch_size=3).val_dataloader()))
    assert batch["labels"].tolist() == [16, 1, 38]
    from PIL import Image

    direct = processor(images=Image.fromarray(images[2]), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(batch["pixel_values"][2], direct)


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ["00000.ppm;31;30;5;5;25;24;16", "00001.ppm;31;30;5;5;25;24"],
            r"row 1 \(counting from 0, after the header\) of .*GT-final_test.csv lacks the field 'ClassId': each row needs "
            r"the fields 'Filename' and 'ClassId'; this row has 'Filename', 'Width', 'Height', 'Roi.X1', 'Roi.Y1', "
            r"'Roi.X2', 'Roi.Y2'\.",
        ),
        (
            ["00000.ppm;31;30;5;5;25;24;16", ";31;30;5;5;25;24;1"],
            r"row 1 \(counting from 0, after the header\) of .*GT-final_test.csv lacks the field 'Filename'",
        ),
        (
            ["00000.ppm;31;30;5;5;25;24;16", "00001.ppm;31;30;5;5;25;24;43"],
            r"row 1 \(counting from 0, after the header\) of .*GT-final_test.csv: `ClassId` is '43', expected a class "
            r"index 0-42",
        ),
    ],
)
def test_gtsrb_csv_rows_without_fields_name_file_row_and_fields(tmp_path, lines, message):
    write_gtsrb_test(tmp_path, labels=(16, 1), csv_lines=lines)
    with pytest.raises(ValueError, match=rf"GTSRB {message}"):
        VisionDataModule("gtsrb", str(tmp_path), processor=make_tiny_image_processor()).setup()


def test_gtsrb_csv_without_a_classid_column(tmp_path):
    write_gtsrb_test(tmp_path, labels=(16,), csv_lines=["00000.ppm;31;30;5;5;25;24;16"])
    csv = tmp_path / "gtsrb" / "GT-final_test.csv"
    csv.write_text(csv.read_text().replace(";ClassId", ";Class"))
    with pytest.raises(
        ValueError,
        match=r"GTSRB row 0 .*GT-final_test.csv lacks the field 'ClassId': .* this row has "
        r"'Filename', .*'Roi.Y2', 'Class'\.",
    ):
        VisionDataModule("gtsrb", str(tmp_path), processor=make_tiny_image_processor()).setup()


def test_empty_split_and_bad_arguments(tmp_path):
    write_resisc45(tmp_path, classes=("airplane",), per_class=1)  # one image: the test split (index 0) holds it
    with pytest.raises(ValueError, match="The resisc45 split 'train' under .* has no images"):
        VisionDataModule("resisc45", str(tmp_path), split="train", processor=make_tiny_image_processor()).setup()
    with pytest.raises(ValueError, match="batch_size"):
        VisionDataModule("mnist", str(tmp_path), batch_size=0)


def direct_logits(clip, tokenizer, names, templates, pixel_values) -> torch.Tensor:
    """Zero-shot logits written out: one text at a time, loops over classes and templates."""
    head = []
    for name in names:
        features = []
        for template in templates:
            tokens = torch.tensor([tokenizer(template.format(name))["input_ids"]])
            with torch.no_grad():
                pooled = clip.text_model(input_ids=tokens).pooler_output
                feature = clip.text_projection(pooled)[0]
            features.append(feature / feature.norm())
        mean = torch.stack(features).mean(dim=0)
        head.append(mean / mean.norm())
    with torch.no_grad():
        image = clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output)
    image = image / image.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * image @ torch.stack(head).T


def test_zero_shot_head_against_a_direct_computation(clip, tokenizer):
    model = ZeroShotClassifier(clip, classnames=NAMES, templates=TEMPLATES, tokenizer=tokenizer)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = direct_logits(clip, tokenizer, NAMES, TEMPLATES, pixels)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), expected, rtol=1e-10, atol=1e-10)
    assert model.head.shape == (10, 16) and not torch.allclose(model.head[0], model.head[1])
    # only the vision tower carries parameters, named as in CLIPModel; the head is no parameter and not saved
    assert all(name.startswith(("vision_model.", "visual_projection.")) for name in model.state_dict())
    assert set(model.state_dict()) == {
        n for n in clip.state_dict() if n.startswith(("vision_model.", "visual_projection."))
    }


def test_head_is_shared_by_pre_and_post_vision_towers(clip, tokenizer):
    post_clip = make_post_trained(clip, scale=0.05)
    pre = ZeroShotClassifier(clip, task="mnist", tokenizer=tokenizer)
    post = ZeroShotClassifier(clip, task="mnist", tokenizer=tokenizer, vision_model=post_clip)
    torch.testing.assert_close(pre.head, post.head, rtol=0, atol=0)
    assert pre.templates == get_templates("mnist") and pre.classnames == CLASSNAMES["mnist"]
    changed = [n for n, p in post.named_parameters() if not torch.equal(p, dict(pre.named_parameters())[n])]
    assert changed and all(n.startswith(("vision_model.", "visual_projection.")) for n in changed)
    with pytest.raises(ValueError, match="Pass `tokenizer=`"):
        ZeroShotClassifier(clip, task="mnist")


def test_a_clip_vision_model_as_the_vision_tower(clip, tokenizer):
    tower = make_post_trained(make_tiny_model("clip-vision", dtype=torch.float64), scale=0.05)  # no projection
    model = ZeroShotClassifier(clip, classnames=NAMES, templates=TEMPLATES, tokenizer=tokenizer, vision_model=tower)
    assert set(model.state_dict()) == {
        n for n in clip.state_dict() if n.startswith(("vision_model.", "visual_projection."))
    }
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=clip.dtype)
    with torch.no_grad():
        features = F.normalize(clip.visual_projection(tower(pixel_values=pixels).pooler_output), dim=-1)
        torch.testing.assert_close(model.image_features(pixels), features, rtol=0, atol=0)


@pytest.mark.slow
def test_riemann_term_through_the_datamodule_equals_brute_force(clip, tokenizer, tmp_path):
    write_mnist(tmp_path, num_test=7)
    dm = VisionDataModule("mnist", str(tmp_path), processor=make_tiny_image_processor(), batch_size=3)
    model = ZeroShotClassifier(clip, classnames=NAMES, templates=TEMPLATES, tokenizer=tokenizer)
    edits = random_edits(model, pattern="vision_model.encoder.layers.1", scale=0.05)
    head = model.head.clone()
    expected = brute_force(model, edits, ClassificationLoss(), dm.val_dataloader(), num_points=3)

    correct, seen = 0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            correct += int((model(batch["pixel_values"]).argmax(dim=-1) == batch["labels"]).sum())
            seen += batch["labels"].numel()
    module = DeltaEditModule(model, pretrained=None, edit=edits, loss="classification")  # top-1 accuracy by default
    assert module.evaluator is ClassificationLoss.evaluator
    callback = RiemannCallback(num_points=3, filename=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=dm, verbose=False)
    result = callback.result
    for name in expected["names"]:
        assert result.term_per_tensor[name] == pytest.approx(expected["term_per_tensor"][name], rel=1e-6, abs=1e-12)
    assert result.losses == pytest.approx(expected["losses"].tolist(), rel=1e-10)
    assert result.count == 7
    assert float(trainer.callback_metrics["accuracy/post"]) == pytest.approx(correct / seen)
    torch.testing.assert_close(model.head, head, rtol=0, atol=0)  # the head does not move with t


def test_constructor_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(VisionDataModule, "data")
    parser.add_class_arguments(ZeroShotClassifier, "model")
    config = parser.parse_string(
        "data:\n  task: resisc45\n  root: /data\n  batch_size: 64\n"
        "model:\n  clip: openai/clip-vit-base-patch32\n  task: resisc45\n"
        "  vision_model: /checkpoints/resisc45\n"
    )
    dm = VisionDataModule(**config.data.as_dict())
    assert (dm.task, dm.root, dm.batch_size, dm.processor) == ("resisc45", "/data", 64, "openai/clip-vit-base-patch32")
    assert config.model.vision_model == "/checkpoints/resisc45"


def test_pixel_batches_match_numpy_images(tmp_path):
    images, _ = write_mnist(tmp_path, num_test=2)
    processor = make_tiny_image_processor()
    batch = next(iter(VisionDataModule("mnist", str(tmp_path), processor=processor, batch_size=2).val_dataloader()))
    # CLIP's processor resizes 28 -> 32, normalises per channel; the three channels are the same grey image here
    mean = np.array(processor.image_mean)[:, None, None]
    std = np.array(processor.image_std)[:, None, None]
    grey = batch["pixel_values"][0].numpy() * std + mean
    assert np.allclose(grey[0], grey[1], atol=1e-2) and np.allclose(grey[1], grey[2], atol=1e-2)
    assert F.cosine_similarity(batch["pixel_values"][0].flatten(), batch["pixel_values"][1].flatten(), dim=0) < 0.99
