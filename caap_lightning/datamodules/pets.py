"""Oxford-IIIT Pet: 37 breeds (or the 2 species) with pet/background masks from the trimaps."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Literal, Tuple

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets import OxfordIIITPet

from caap_lightning.datamodules.base import MaskedImageDataModule, as_mask, check_layout
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD

PET_LAYOUT = """<root>/oxford-iiit-pet/
    images/<image_id>.jpg
    annotations/trainval.txt, annotations/test.txt   (lines "<image_id> <breed 1-37> <species 1-2> <breed id>")
    annotations/trimaps/<image_id>.png              (1 = pet, 2 = background, 3 = border)"""

# Trimap value of the background; pet (1) and its border (3) both count as the object.
_TRIMAP_BACKGROUND = 2


def check_pet_layout(root: str) -> None:
    """Fail with the expected layout if ``root`` lacks a split list, an image or a trimap."""
    base = Path(root) / "oxford-iiit-pet"

    def files_of(listing: Path) -> Iterator[Path]:
        for image_id in (line.split()[0] for line in listing.read_text().splitlines() if line.strip()):
            yield base / "images" / f"{image_id}.jpg"
            yield base / "annotations" / "trimaps" / f"{image_id}.png"

    listings = [base / "annotations" / f"{split}.txt" for split in ("trainval", "test")]
    check_layout("Oxford-IIIT Pet", root, listings, files_of, PET_LAYOUT, "about 800 MB")


class PetSource(Dataset):
    """One split of torchvision's ``OxfordIIITPet`` as sample dicts with a foreground mask."""

    def __init__(self, root: str, split: str, label_type: str):
        target = "category" if label_type == "breed" else "binary-category"
        self.dataset = OxfordIIITPet(root, split=split, target_types=[target, "segmentation"])
        self.classes = self.dataset.classes if label_type == "breed" else self.dataset.bin_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, object]:
        image, (label, trimap) = self.dataset[i]
        return {"image": image, "label": label, "mask": as_mask(np.asarray(trimap) != _TRIMAP_BACKGROUND)}


class OxfordPetDataModule(MaskedImageDataModule):
    """torchvision's Oxford-IIIT Pet with object masks (trimap pet + border) aligned to the images.

    ``label_type="breed"`` gives the 37 breeds, ``"species"`` cat/dog. Trains on ``trainval``;
    validates and tests on ``test`` (the probe batch comes from it). ``download=False`` reads
    ``<root>/oxford-iiit-pet`` and fails with the expected layout if it is missing.
    """

    def __init__(
        self,
        root: str = "data",
        label_type: Literal["breed", "species"] = "breed",
        download: bool = False,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        mean: Tuple[float, float, float] = IMAGENET_MEAN,
        std: Tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
    ):
        super().__init__(img_size=img_size, batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed)
        if label_type not in ("breed", "species"):
            raise ValueError(f"label_type must be 'breed' (37 classes) or 'species' (2), got {label_type!r}")
        self.root = root
        self.label_type = label_type
        self.download = download
        self.num_classes = 37 if label_type == "breed" else 2

    @property
    def class_names(self) -> List[str]:
        return list(self.sources()[0].classes)

    def prepare_data(self) -> None:
        # Lightning runs this on one process before any setup, so that ranks do not download at once.
        if self.download:
            OxfordIIITPet(self.root, download=True)

    def build_sources(self) -> Tuple[PetSource, PetSource, PetSource]:
        self.prepare_data()  # probe_batch without a Trainer; a check only once the files are there
        check_pet_layout(self.root)
        train = PetSource(self.root, "trainval", self.label_type)
        test = PetSource(self.root, "test", self.label_type)
        return train, test, test
