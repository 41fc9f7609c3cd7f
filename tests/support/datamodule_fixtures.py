"""Small data files in the real formats of GSM8K, UltraFeedback binarized, MNIST (raw idx) and RESISC45 (image folder).

Nothing is downloaded: each writer lays out a few rows or images exactly as the hub or torchvision keeps them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# GSM8K-like rows (short, so that the tiny tokenizer keeps them under 128 tokens): answers end with "#### n".
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A pen costs $1,250 and a cap $50. Total?", "answer": "1,250 + 50 = 1,300\n#### 1,300"},
    {"question": "It was 2 degrees, then fell 7. Now?", "answer": "2 - 7 = -5\n#### -5"},
    {"question": "Half of 5 is what?", "answer": "5 / 2 = 2.5\n#### 2.5"},
    {
        "question": "She sold 48 clips in April and half as many in May. How many in May?",
        "answer": "48/2 = 24\n#### 24",
    },
]
GSM8K_TRAIN_ROWS = [
    {"question": "What is 3 + 4?", "answer": "#### 7"},
    {"question": "What is 10 - 8?", "answer": "#### 2"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


def write_gsm8k(root: Path, fmt: str = "jsonl", test_rows: list[dict] | None = None) -> Path:
    """``root/main/{train,test}`` files as on the hub (``main/test-00000-of-00001.parquet``) or as jsonl."""
    rows = GSM8K_ROWS if test_rows is None else test_rows
    main = root / "main"
    if fmt == "parquet":
        write_parquet(main / "test-00000-of-00001.parquet", rows)
        write_parquet(main / "train-00000-of-00001.parquet", GSM8K_TRAIN_ROWS)
    else:
        write_jsonl(main / "test.jsonl", rows)
        write_jsonl(main / "train.jsonl", GSM8K_TRAIN_ROWS)
    return main


def ultrafeedback_row(
    prompt: str, chosen: str, rejected: str, score_chosen: float = 8.0, score_rejected: float = 3.0
) -> dict:
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "prompt_id": f"{abs(hash(prompt)) % 10**8:08d}",
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "messages": [user, {"role": "assistant", "content": chosen}],
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


ULTRAFEEDBACK_ROWS = [
    ultrafeedback_row("What is 3 + 4?", "The answer is 7.", "It is 10."),
    ultrafeedback_row("Name a pet.", "A dog.", "The quick brown fox jumps over the lazy dog."),
    ultrafeedback_row("How many clips?", "She sold 72 clips.", "Clips."),
    ultrafeedback_row("Say hi.", "Hi!", "No.", 6.5, 6.0),
    ultrafeedback_row("Give a number.", "48", "A photo of a cat."),
]


def write_ultrafeedback(root: Path, rows: list[dict] | None = None, split: str = "test_prefs") -> Path:
    """``root/data/<split>-00000-of-00001.parquet``, the hub's layout."""
    return write_parquet(
        root / "data" / f"{split}-00000-of-00001.parquet", ULTRAFEEDBACK_ROWS if rows is None else rows
    )


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format of MNIST's raw files: magic (0, 0, dtype 0x08, ndim), big-endian sizes, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, num_train: int = 4, num_test: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unpacked idx files in ``root/MNIST/raw``; returns the test images (N, 28, 28) and labels (N,)."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = None
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out = (images, labels)
    return out


def write_resisc45(
    root: Path, classes: tuple[str, ...] = ("airplane", "sea_ice", "wetland"), per_class: int = 2, seed: int = 0
) -> Path:
    """``root/resisc45/<class>/<class>_00i.jpg`` (NWPU-RESISC45's layout; here PNG-encoded 16×16 images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / "resisc45"
    for name in classes:
        (base / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / name / f"{name}_{i + 1:03d}.png")
    return base


GTSRB_CSV_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def write_gtsrb_test(
    root: Path, labels: tuple[int, ...] = (16, 1, 38), seed: int = 0, csv_lines: list[str] | None = None
) -> list[np.ndarray]:
    """GTSRB's test split as unpacked from its archives: ``root/gtsrb/GTSRB/Final_Test/Images/0000i.ppm`` and the
    semicolon-separated ``root/gtsrb/GT-final_test.csv`` (``csv_lines`` replaces its rows); returns the images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    folder.mkdir(parents=True, exist_ok=True)
    images, lines = [], []
    for i, label in enumerate(labels):
        pixels = rng.integers(0, 256, size=(30, 31, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.ppm")
        images.append(pixels)
        lines.append(f"{i:05d}.ppm;31;30;5;5;25;24;{label}")
    rows = lines if csv_lines is None else csv_lines
    (root / "gtsrb" / "GT-final_test.csv").write_text("\n".join([GTSRB_CSV_HEADER, *rows]) + "\n")
    return images


# GSM8K's other config: the same questions, answers with Socratic sub-questions ("How many ...? ** ...").
GSM8K_SOCRATIC_ROWS = [
    {"question": row["question"], "answer": "How many in all? ** " + row["answer"]} for row in GSM8K_ROWS
]
# A train split long enough for lm-eval's 5-shot draw, in the real answers' form (calculator notes, "#### n").
GSM8K_TRAIN_POOL = [
    {
        "question": f"A box holds {n} pens and Ann buys {n + 2} boxes. How many pens does she have?",
        "answer": f"She has {n} * {n + 2} = <<{n}*{n + 2}={n * (n + 2)}>>{n * (n + 2)} pens.\n#### {n * (n + 2)}",
    }
    for n in range(2, 14)
]


def write_gsm8k_repository(root: Path, test_rows: list[dict] | None = None) -> Path:
    """A copy of the ``openai/gsm8k`` repository: ``main/`` and ``socratic/``, each with
    ``{train,test}-00000-of-00001.parquet`` (columns question, answer), as ``hf download`` lays it out."""
    rows = GSM8K_ROWS if test_rows is None else test_rows
    write_parquet(root / "main" / "test-00000-of-00001.parquet", rows)
    write_parquet(root / "main" / "train-00000-of-00001.parquet", GSM8K_TRAIN_POOL)
    write_parquet(root / "socratic" / "test-00000-of-00001.parquet", GSM8K_SOCRATIC_ROWS)
    write_parquet(
        root / "socratic" / "train-00000-of-00001.parquet",
        [{**row, "answer": "How many? ** " + row["answer"]} for row in GSM8K_TRAIN_POOL],
    )
    (root / "README.md").write_text("---\nconfigs:\n- config_name: main\n- config_name: socratic\n---\n")
    return root


def write_hub_cache_entry(
    cache: Path, repo_id: str, source: Path, revision: str = "0" * 40, repo_type: str = "dataset"
) -> Path:
    """``source``'s files in the hub download cache's layout, as ``hf download <repo_id> --repo-type dataset``
    leaves them: ``<cache>/datasets--org--name/blobs/<hash>``, ``snapshots/<revision>/<path>`` linking to the blob,
    ``refs/main`` holding the revision. Returns the snapshot folder."""
    import hashlib

    base = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = base / "snapshots" / revision
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(file.relative_to(source).parts) + 1)) / "blobs" / blob.name)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(revision)
    return snapshot


# ----------------------------------------------------------------------------- image data sets in the hub's parquet
# Where the parquet files of FusionBench's data for each task lie in its hub repository (the config's sub-folder).
FUSIONBENCH_FOLDERS = {"tanganke": "data", "ylecun/mnist": "mnist", "ufldl-stanford/svhn": "cropped_digits"}


def image_classnames(task: str) -> list[str]:
    """Names for the ``label`` ClassLabel of ``task``'s data set: the library's, or for Stanford Cars and SUN397 as
    many names as they have classes, SUN397's in its ``ClassName.txt`` form (``/a/abbey``)."""
    from lightning_delta.datamodules import CLASSNAMES

    if task == "sun397":
        return [f"/{chr(ord('a') + i % 26)}/scene_{i:03d}/indoor" for i in range(397)]
    if task == "stanford_cars":
        return [f"car {i}" for i in range(196)]  # short: the tiny CLIP text tower reads 32 tokens
    return list(CLASSNAMES[task])


def write_image_parquet(path: Path, labels: list[int], names: list[str], seed: int = 0) -> list[bytes]:
    """One parquet file of an image data set, written by ``datasets`` itself (``Dataset.from_dict`` with the
    ``Image`` and ``ClassLabel`` features, then ``to_parquet``): ``image`` a struct ``{bytes, path}`` holding PNG
    files (every third a JPEG file), ``label`` the class index. Returns the image files' bytes, row by row."""
    import io

    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for i in range(len(labels)):
        pixels = rng.integers(0, 256, size=(12 + i % 3, 14, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG" if i % 3 == 2 else "PNG")
        files.append(buffer.getvalue())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    rows = {
        "image": [{"bytes": data, "path": f"{i:05d}.{'jpg' if i % 3 == 2 else 'png'}"} for i, data in enumerate(files)],
        "label": list(labels),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return files


def write_fusionbench_repository(
    root: Path, repo_id: str, task: str, splits: dict[str, list[list[int]]], seed: int = 0
) -> dict[str, list[bytes]]:
    """A copy of ``repo_id``'s hub repository as FusionBench reads it: for each split, one parquet file per list of
    labels (``data/test-00000-of-00002.parquet``, ...; ``mnist/`` for ``ylecun/mnist``, ``cropped_digits/`` and a
    ``full_numbers/`` config of another schema for ``ufldl-stanford/svhn``) and a README.md. Returns the image files'
    bytes of each split, in row order."""
    folder = FUSIONBENCH_FOLDERS.get(repo_id, FUSIONBENCH_FOLDERS["tanganke"])
    names = image_classnames(task)
    written: dict[str, list[bytes]] = {}
    for number, (split, shards) in enumerate(splits.items()):
        written[split] = []
        for index, labels in enumerate(shards):
            path = root / folder / f"{split}-{index:05d}-of-{len(shards):05d}.parquet"
            written[split] += write_image_parquet(path, labels, names, seed=seed + 10 * number + index)
    if repo_id == "ufldl-stanford/svhn":  # the other config: whole house numbers with their digits' boxes
        write_parquet(
            root / "full_numbers" / "test-00000-of-00001.parquet",
            [{"image": {"bytes": b"", "path": "1.png"}, "digits": {"bbox": [[1, 2, 3, 4]], "label": [5]}}],
        )
    (root / "README.md").write_text(f"---\npretty_name: {repo_id}\n---\n")
    return written
