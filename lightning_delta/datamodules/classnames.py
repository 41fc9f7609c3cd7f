"""Class names and prompt templates of the eight image tasks, for CLIP zero-shot heads.

Class names are the datasets' own labels written as words (label order = the index the dataset gives), and the
templates are the usual CLIP zero-shot prompts per task. Stanford Cars (196 models) and SUN397 (397 scenes) take
their names from the metadata shipped with the data
(:func:`~lightning_delta.datamodules.task_classnames.get_classnames`): the ``label`` ``ClassLabel`` of a parquet
data set (``data``), or ``devkit/cars_meta.mat`` and ``ClassName.txt`` under ``root``.
"""

from __future__ import annotations

__all__ = ["CLASSNAMES", "TASKS", "TEMPLATES", "get_templates", "check_task"]

TASKS = ("mnist", "svhn", "gtsrb", "dtd", "eurosat", "stanford_cars", "sun397", "resisc45")

_DIGITS = [str(digit) for digit in range(10)]

CLASSNAMES: dict[str, list[str]] = {
    "mnist": _DIGITS,
    "svhn": _DIGITS,
    # GTSRB's 43 sign classes, by class id 0..42.
    "gtsrb": [
        "red and white circle 20 kph speed limit",
        "red and white circle 30 kph speed limit",
        "red and white circle 50 kph speed limit",
        "red and white circle 60 kph speed limit",
        "red and white circle 70 kph speed limit",
        "red and white circle 80 kph speed limit",
        "end / de-restriction of 80 kph speed limit",
        "red and white circle 100 kph speed limit",
        "red and white circle 120 kph speed limit",
        "red and white circle red car and black car no passing",
        "red and white circle red truck and black car no passing",
        "red and white triangle road intersection warning",
        "white and yellow diamond priority road",
        "red and white upside down triangle yield right-of-way",
        "stop",
        "empty red and white circle",
        "red and white circle no truck entry",
        "red circle with white horizonal stripe no entry",
        "red and white triangle with exclamation mark warning",
        "red and white triangle with black left curve approaching warning",
        "red and white triangle with black right curve approaching warning",
        "red and white triangle with black double curve approaching warning",
        "red and white triangle rough / bumpy road warning",
        "red and white triangle car skidding / slipping warning",
        "red and white triangle with merging / narrow lanes warning",
        "red and white triangle with person digging / construction / road work warning",
        "red and white triangle with traffic light approaching warning",
        "red and white triangle with person walking warning",
        "red and white triangle with child and person walking warning",
        "red and white triangle with bicyle warning",
        "red and white triangle with snowflake / ice warning",
        "red and white triangle with deer warning",
        "white circle with gray strike bar no speed limit",
        "blue circle with white right turn arrow mandatory",
        "blue circle with white left turn arrow mandatory",
        "blue circle with white forward arrow mandatory",
        "blue circle with white forward or right turn arrow mandatory",
        "blue circle with white forward or left turn arrow mandatory",
        "blue circle with white keep right arrow mandatory",
        "blue circle with white keep left arrow mandatory",
        "blue circle with white arrows indicating a traffic circle",
        "white circle with gray strike bar indicating no passing for cars has ended",
        "white circle with gray strike bar indicating no passing for trucks has ended",
    ],
    # DTD's 47 texture categories, in the sorted order of its image folders.
    "dtd": [
        "banded",
        "blotchy",
        "braided",
        "bubbly",
        "bumpy",
        "chequered",
        "cobwebbed",
        "cracked",
        "crosshatched",
        "crystalline",
        "dotted",
        "fibrous",
        "flecked",
        "freckled",
        "frilly",
        "gauzy",
        "grid",
        "grooved",
        "honeycombed",
        "interlaced",
        "knitted",
        "lacelike",
        "lined",
        "marbled",
        "matted",
        "meshed",
        "paisley",
        "perforated",
        "pitted",
        "pleated",
        "polka-dotted",
        "porous",
        "potholed",
        "scaly",
        "smeared",
        "spiralled",
        "sprinkled",
        "stained",
        "stratified",
        "striped",
        "studded",
        "swirly",
        "veined",
        "waffled",
        "woven",
        "wrinkled",
        "zigzagged",
    ],
    # EuroSAT's 10 land-use classes, in the sorted order of its folders (AnnualCrop, Forest, HerbaceousVegetation,
    # Highway, Industrial, Pasture, PermanentCrop, Residential, River, SeaLake).
    "eurosat": [
        "annual crop land",
        "forest",
        "brushland or shrubland",
        "highway or road",
        "industrial buildings or commercial buildings",
        "pasture land",
        "permanent crop land",
        "residential buildings or homes or apartments",
        "river",
        "lake or sea",
    ],
    # NWPU-RESISC45's 45 scene classes; the folder of each is the name with "_" for spaces.
    "resisc45": [
        "airplane",
        "airport",
        "baseball diamond",
        "basketball court",
        "beach",
        "bridge",
        "chaparral",
        "church",
        "circular farmland",
        "cloud",
        "commercial area",
        "dense residential",
        "desert",
        "forest",
        "freeway",
        "golf course",
        "ground track field",
        "harbor",
        "industrial area",
        "intersection",
        "island",
        "lake",
        "meadow",
        "medium residential",
        "mobile home park",
        "mountain",
        "overpass",
        "palace",
        "parking lot",
        "railway",
        "railway station",
        "rectangular farmland",
        "river",
        "roundabout",
        "runway",
        "sea ice",
        "ship",
        "snowberg",
        "sparse residential",
        "stadium",
        "storage tank",
        "tennis court",
        "terrace",
        "thermal power station",
        "wetland",
    ],
}

TEMPLATES: dict[str, list[str]] = {
    "mnist": ['a photo of the number: "{}".'],
    "svhn": ['a photo of the number: "{}".'],
    "gtsrb": [
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ],
    "dtd": [
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ],
    "eurosat": [
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ],
    "stanford_cars": [
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ],
    "sun397": ["a photo of a {}.", "a photo of the {}."],
    "resisc45": [
        "satellite imagery of {}.",
        "aerial imagery of {}.",
        "satellite photo of {}.",
        "aerial photo of {}.",
        "satellite view of {}.",
        "aerial view of {}.",
        "satellite imagery of a {}.",
        "aerial imagery of a {}.",
        "satellite photo of a {}.",
        "aerial photo of a {}.",
        "satellite view of a {}.",
        "aerial view of a {}.",
        "satellite imagery of the {}.",
        "aerial imagery of the {}.",
        "satellite photo of the {}.",
        "aerial photo of the {}.",
        "satellite view of the {}.",
        "aerial view of the {}.",
    ],
}


def check_task(task: str) -> str:
    """The task name in lower case; an unknown one raises with the list."""
    name = str(task).lower().replace("-", "_")
    name = {"cars": "stanford_cars", "stanfordcars": "stanford_cars"}.get(name, name)
    if name not in TASKS:
        raise ValueError(f"Unknown vision task {task!r}; choose one of {', '.join(TASKS)}.")
    return name


def get_templates(task: str) -> list[str]:
    """The zero-shot prompt templates of ``task`` (each with one ``{}`` for the class name)."""
    return list(TEMPLATES[check_task(task)])
