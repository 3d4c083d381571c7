"""caap_lightning.datamodules: loaders with object masks and a fixed probe batch."""

from caap_lightning.datamodules.base import EpochShuffleSampler, MaskedImageDataModule, ProbeBatch, collate_samples
from caap_lightning.datamodules.coco import CocoMaskDataModule
from caap_lightning.datamodules.cues import CUE_KINDS
from caap_lightning.datamodules.fashion import FashionCanvasDataModule
from caap_lightning.datamodules.food101 import Food101DataModule
from caap_lightning.datamodules.pets import OxfordPetDataModule
from caap_lightning.datamodules.synthetic import SyntheticSpuriousDataModule

__all__ = [
    "CUE_KINDS",
    "CocoMaskDataModule",
    "EpochShuffleSampler",
    "FashionCanvasDataModule",
    "Food101DataModule",
    "MaskedImageDataModule",
    "OxfordPetDataModule",
    "ProbeBatch",
    "SyntheticSpuriousDataModule",
    "collate_samples",
]
