"""Food-101: 101 dishes, no object masks (the probe batch carries ``masks=None``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from torch.utils.data import Dataset
from torchvision.datasets import Food101

from caap_lightning.datamodules.base import MaskedImageDataModule, check_layout
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD

FOOD101_LAYOUT = """<root>/food-101/
    images/<class>/<image_id>.jpg
    meta/train.json, meta/test.json   ({"<class>": ["<class>/<image_id>", ...], ...})"""


def check_food101_layout(root: str) -> None:
    """Fail with the expected layout if ``root`` lacks a split list or a listed image."""
    base = Path(root) / "food-101"

    def files_of(listing: Path) -> Iterator[Path]:
        for names in json.loads(listing.read_text()).values():
            yield from (base / "images" / f"{name}.jpg" for name in names)

    listings = [base / "meta" / f"{split}.json" for split in ("train", "test")]
    check_layout("Food-101", root, listings, files_of, FOOD101_LAYOUT, "about 5 GB")


class Food101Source(Dataset):
    """One split of torchvision's ``Food101`` as sample dicts (no masks)."""

    def __init__(self, root: str, split: str):
        self.dataset = Food101(root, split=split)
        self.classes = self.dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, object]:
        image, label = self.dataset[i]
        return {"image": image, "label": label}


class Food101DataModule(MaskedImageDataModule):
    """torchvision's Food-101; without masks, only faithfulness metrics apply to its probe batch.

    Trains on ``train``; validates and tests on ``test`` (the probe batch comes from it).
    ``download=False`` reads ``<root>/food-101`` and fails with the expected layout if it is missing.
    """

    num_classes = 101

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        mean: Tuple[float, float, float] = IMAGENET_MEAN,
        std: Tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
    ):
        super().__init__(img_size=img_size, batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed)
        self.root = root
        self.download = download

    @property
    def class_names(self) -> List[str]:
        return list(self.sources()[0].classes)

    def prepare_data(self) -> None:
        # Lightning runs this on one process before any setup, so that ranks do not download at once.
        if self.download:
            Food101(self.root, download=True)

    def build_sources(self) -> Tuple[Food101Source, Food101Source, Food101Source]:
        self.prepare_data()  # probe_batch without a Trainer; a check only once the files are there
        check_food101_layout(self.root)
        test = Food101Source(self.root, "test")
        return Food101Source(self.root, "train"), test, test
