"""DataModules for the paper's three tasks: GSM8K, UltraFeedback preference pairs and the eight CLIP image tasks."""

from lightning_delta.datamodules.classnames import CLASSNAMES, TASKS, TEMPLATES, get_templates
from lightning_delta.datamodules.gsm8k import GSM8KDataModule, GSM8KEvaluator
from lightning_delta.datamodules.task_classnames import get_classnames
from lightning_delta.datamodules.ultrafeedback import UltraFeedbackDataModule
from lightning_delta.datamodules.vision import VisionDataModule, ZeroShotClassifier, build_vision_dataset

__all__ = [
    "CLASSNAMES",
    "GSM8KDataModule",
    "GSM8KEvaluator",
    "TASKS",
    "TEMPLATES",
    "UltraFeedbackDataModule",
    "VisionDataModule",
    "ZeroShotClassifier",
    "build_vision_dataset",
    "get_classnames",
    "get_templates",
]
