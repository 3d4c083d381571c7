"""Food-101: 101 dishes, no object masks (the probe batch carries ``masks=None``)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from torch.utils.data import Dataset
from torchvision.datasets import Food101

from caap_lightning.datamodules.base import MaskedImageDataModule, check_layout, read_image, read_json
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD

FOOD101_LAYOUT = """<root>/food-101/
    images/<class>/<image_id>.jpg
    meta/train.json, meta/test.json   ({"<class>": ["<class>/<image_id>", ...], ...})
    meta/classes.txt                  (one class a line; else the classes of both listings, sorted)"""

# A split's listing: class name -> "<class>/<image_id>" names of its images.
Listing = Dict[str, List[str]]


def read_food101_listing(path: Path) -> Listing:
    """Parse a ``meta/<split>.json`` listing, failing with its name if it is broken."""
    listing = read_json(path)
    if not isinstance(listing, dict) or not all(
        isinstance(names, list) and all(isinstance(n, str) for n in names) for names in listing.values()
    ):
        raise ValueError(f"{str(path)!r} is not a Food-101 listing: expected {{\"<class>\": [\"<class>/<image_id>\", ...]}}")
    return listing


def load_food101_listings(root: str) -> Dict[str, Listing]:
    """The train and test listings; fail with the expected layout if one, or an image it lists, is missing."""
    base = Path(root) / "food-101"
    listings: Dict[str, Listing] = {}

    def files_of(path: Path) -> Iterator[Path]:
        listings[path.stem] = read_food101_listing(path)
        for names in listings[path.stem].values():
            yield from (base / "images" / f"{name}.jpg" for name in names)

    paths = [base / "meta" / f"{split}.json" for split in ("train", "test")]
    check_layout("Food-101", root, paths, files_of, FOOD101_LAYOUT, "about 5 GB")
    return listings


def food101_classes(root: str, listings: Dict[str, Listing]) -> List[str]:
    """The class names in label order, the same for every split: ``meta/classes.txt``, else every listing's.

    Numbering each split by its own classes would shift the labels of a split that lacks one.
    """
    listed = sorted(set().union(*listings.values()))
    path = Path(root) / "food-101" / "meta" / "classes.txt"
    if not path.is_file():
        return listed
    classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    unknown = sorted(set(listed) - set(classes))
    if unknown:
        raise ValueError(f"the listings have classes {unknown[:5]} that {str(path)!r} lacks; fix or delete it")
    return classes


class Food101Source(Dataset):
    """One split of a Food-101 listing as sample dicts (no masks), labelled by ``classes``."""

    def __init__(self, root: str, listing: Listing, classes: List[str]):
        label_of = {name: label for label, name in enumerate(classes)}
        images = Path(root) / "food-101" / "images"
        self.classes = list(classes)
        # The listing's order, as torchvision's Food101 reads it, so the probe draws the same images.
        self.items = [(images / f"{name}.jpg", label_of[cls]) for cls, names in listing.items() for name in names]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, object]:
        path, label = self.items[i]
        return {"image": read_image(path), "label": label}


class Food101DataModule(MaskedImageDataModule):
    """The Food-101 dataset (torchvision's download and layout); without masks, only faithfulness metrics apply.

    Trains on ``train``; validates and tests on ``test`` (the probe batch comes from it). Labels
    follow ``meta/classes.txt``, identically in both splits. ``download=False`` reads
    ``<root>/food-101`` and fails with the expected layout if it is missing.
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
        listings = load_food101_listings(self.root)
        classes = food101_classes(self.root, listings)
        test = Food101Source(self.root, listings["test"], classes)
        return Food101Source(self.root, listings["train"], classes), test, test
