"""Oxford-IIIT Pet: 37 breeds (or the 2 species) with pet/background masks from the trimaps."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Literal, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets import OxfordIIITPet

from caap_lightning.datamodules.base import MaskedImageDataModule, as_mask, check_layout, image_size, read_image
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD

PET_LAYOUT = """<root>/oxford-iiit-pet/
    images/<image_id>.jpg
    annotations/trainval.txt, annotations/test.txt   (lines "<image_id> <breed 1-37> <species 1-2> <breed id>")
    annotations/trimaps/<image_id>.png              (1 = pet, 2 = background, 3 = border)"""

# Trimap value of the background; pet (1) and its border (3) both count as the object.
_TRIMAP_BACKGROUND = 2
_TRIMAP_VALUES = (1, 2, 3)


def check_pet_layout(root: str) -> None:
    """Fail with the expected layout if ``root`` lacks a split list, an image or a trimap."""
    base = Path(root) / "oxford-iiit-pet"

    def files_of(listing: Path) -> Iterator[Path]:
        for image_id in (line.split()[0] for line in listing.read_text().splitlines() if line.strip()):
            yield base / "images" / f"{image_id}.jpg"
            yield base / "annotations" / "trimaps" / f"{image_id}.png"

    listings = [base / "annotations" / f"{split}.txt" for split in ("trainval", "test")]
    check_layout("Oxford-IIIT Pet", root, listings, files_of, PET_LAYOUT, "about 800 MB")


def check_trimap_sizes(pairs: Sequence[Tuple[Path, Path]]) -> None:
    """Fail, naming the files, if a trimap is not the size of its image (the mask would not line up).

    Reads the headers only, so every file of the dataset is checked at setup.
    """
    wrong = []
    for image, trimap in pairs:
        image_wh, trimap_wh = image_size(image), image_size(trimap)
        if image_wh != trimap_wh:
            wrong.append(f"{trimap} is {trimap_wh[0]}x{trimap_wh[1]} but {image.name} is {image_wh[0]}x{image_wh[1]}")
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise ValueError(
            f"{len(wrong)} Oxford-IIIT Pet trimaps do not match their images' size, so masks would not line up: {shown}"
        )


def trimap_mask(trimap: np.ndarray, path: Path) -> np.ndarray:
    """The object (pet + border) mask of a trimap; fail naming ``path`` if it is not a 1/2/3 trimap.

    A trimap saved as 0/255, say, has no value 2 and would otherwise become all object.
    """
    if trimap.ndim != 2:
        raise ValueError(f"trimap {str(path)!r} has shape {trimap.shape}; a trimap is one channel of values 1, 2, 3")
    if trimap.min() < min(_TRIMAP_VALUES) or trimap.max() > max(_TRIMAP_VALUES):
        raise ValueError(
            f"trimap {str(path)!r} holds the values {np.unique(trimap).tolist()}; a trimap holds only "
            f"{list(_TRIMAP_VALUES)} (pet, background, border)"
        )
    return trimap != _TRIMAP_BACKGROUND


class PetSource(Dataset):
    """One split of torchvision's ``OxfordIIITPet`` as sample dicts with a foreground mask."""

    def __init__(self, root: str, split: str, label_type: str):
        self.dataset = OxfordIIITPet(root, split=split)
        self.classes = self.dataset.classes if label_type == "breed" else self.dataset.bin_classes
        # torchvision's own lists, so the files read and named are the ones it lists.
        self.labels = self.dataset._labels if label_type == "breed" else self.dataset._bin_labels
        self.files = list(zip(self.dataset._images, self.dataset._segs))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Dict[str, object]:
        image_path, trimap_path = self.files[i]
        image = read_image(image_path)
        trimap = np.asarray(read_image(trimap_path, mode=None))
        return {"image": image, "label": self.labels[i], "mask": as_mask(trimap_mask(trimap, trimap_path))}


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
        check_trimap_sizes(train.files + test.files)
        return train, test, test
