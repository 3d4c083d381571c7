"""COCO-format datasets: an image folder and an annotation file (polygons or RLE) via pycocotools."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch.utils.data import Dataset

from caap_lightning.datamodules.base import MaskedImageDataModule, as_mask, read_image, read_json
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD


def rle_runs(counts: Union[str, bytes]) -> List[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, in Python).

    pycocotools decodes without bounds checks, so a corrupt string gives a wrong mask or writes
    past it; reading the runs here lets :func:`rle_problem` reject it first.
    """
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    runs: List[int] = []
    p = 0
    while p < len(data):
        value, shift, more = 0, 0, True
        while more:
            if p == len(data):
                raise ValueError("the string ends inside a run length")
            # A character holds 5 bits of the value and a "more follows" bit; the last one's top bit is the sign.
            c = data[p] - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]  # runs after the second are stored as differences to the run two back
        runs.append(value)
    return runs


def rle_problem(rle: dict, height: int, width: int) -> Optional[str]:
    """What is wrong with a COCO RLE for a ``height`` x ``width`` image, or ``None`` if it is sound."""
    if not isinstance(rle.get("size"), (list, tuple)) or list(rle["size"]) != [height, width]:
        return f"its size {rle.get('size')} is not the image's [{height}, {width}]"
    counts = rle.get("counts")
    if isinstance(counts, (str, bytes)):
        try:
            runs: Sequence[int] = rle_runs(counts)
        except ValueError as error:  # a non-ASCII string, too
            return f"its compressed counts do not decode ({error})"
    elif isinstance(counts, list) and all(isinstance(c, int) for c in counts):
        runs = counts
    else:
        return "its counts are neither a compressed string nor a list of run lengths"
    if any(r < 0 for r in runs):
        return "it has a negative run length"
    if sum(runs) != height * width:
        return f"its runs cover {sum(runs)} pixels, not {height}x{width} = {height * width}"
    return None


class CocoSource(Dataset):
    """Images of a COCO annotation file labelled by a category mapping, with that category's mask.

    ``categories`` are COCO category names in class order (``None``: every category, by id).
    An image's label is the mapped category covering the largest area in it; its mask is the
    union of that category's instances. Images with no instance of a mapped category are
    listed in ``skipped`` (and warned about) instead of being given an empty mask.
    """

    def __init__(self, image_dir: str, annotation_file: str, categories: Optional[List[str]] = None):
        for path in (Path(image_dir), Path(annotation_file)):
            if not path.exists():
                raise FileNotFoundError(f"COCO dataset path {str(path)!r} does not exist")
        self.image_dir = Path(image_dir)
        # Imported here, not at the top: only COCO data needs pycocotools, and the other datamodules
        # must import in an environment set up without the project's pins (a GPU image lacked it).
        from pycocotools.coco import COCO

        self.annotation_file = str(annotation_file)
        self.coco = COCO()
        # Parsed here, not by COCO(path), so that a truncated file fails naming itself.
        self.coco.dataset = read_json(Path(annotation_file))
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        known = {c["name"]: c["id"] for c in sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])}
        self.classes = list(known) if categories is None else list(categories)
        unknown = [name for name in self.classes if name not in known]
        if unknown or not self.classes:
            raise ValueError(f"categories {unknown or self.classes} not in {annotation_file}; it has {list(known)}")
        category_to_label = {known[name]: label for label, name in enumerate(self.classes)}

        self.items: List[Tuple[int, int, List[dict]]] = []
        self.skipped: List[str] = []
        for image_id in sorted(self.coco.getImgIds()):
            anns = [a for a in self.coco.imgToAnns[image_id] if a["category_id"] in category_to_label]
            for ann in anns:
                self.check_rle(ann)
            if not anns:
                self.skipped.append(self.coco.imgs[image_id]["file_name"])
                continue
            area: Dict[int, float] = {}
            for a in anns:
                area[a["category_id"]] = area.get(a["category_id"], 0.0) + self.ann_area(a)
            # Largest area wins; ties go to the lower class index.
            category = max(area, key=lambda c: (area[c], -category_to_label[c]))
            self.items.append((image_id, category_to_label[category], [a for a in anns if a["category_id"] == category]))
        if not self.items:
            raise ValueError(
                f"{annotation_file} gives no image to classify: it lists {len(self.coco.imgs)} images, none with an "
                f"instance of {self.classes}; check that it is the instances file of this split, or the categories"
            )
        if self.skipped:
            warnings.warn(
                f"{len(self.skipped)} of {len(self.coco.imgs)} images in {annotation_file} have no instance of "
                f"{self.classes} and are left out (e.g. {self.skipped[:3]})",
                stacklevel=2,
            )

    def describe(self, ann: dict) -> str:
        """Where an annotation is: its id, its image's id and file, and the annotation file."""
        info = self.coco.imgs[ann["image_id"]]
        return f"annotation {ann.get('id')} (image {ann['image_id']}, {info['file_name']}) in {self.annotation_file}"

    def check_rle(self, ann: dict) -> None:
        """Fail, naming the annotation, if its segmentation is a corrupt RLE (polygons are left to pycocotools)."""
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, dict):
            info = self.coco.imgs[ann["image_id"]]
            problem = rle_problem(segmentation, info["height"], info["width"])
            if problem is not None:
                raise ValueError(f"{self.describe(ann)} has a corrupt RLE segmentation: {problem}")

    def ann_area(self, ann: dict) -> float:
        if "area" in ann:
            return float(ann["area"])
        from pycocotools import mask as mask_utils

        return float(mask_utils.area(self.segmentation_rle(ann)))

    def segmentation_rle(self, ann: dict) -> dict:
        try:
            return self.coco.annToRLE(ann)
        except Exception as error:  # pycocotools raises a bare Exception for a malformed polygon
            raise ValueError(f"{self.describe(ann)} has a segmentation pycocotools cannot read: {error}") from error

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, object]:
        image_id, label, anns = self.items[i]
        info = self.coco.imgs[image_id]
        image = read_image(self.image_dir / info["file_name"])
        if image.size != (info["width"], info["height"]):
            raise ValueError(
                f"{info['file_name']} is {image.size[0]}x{image.size[1]} but its annotation says "
                f"{info['width']}x{info['height']}; the masks would not line up"
            )
        from pycocotools import mask as mask_utils

        mask = np.zeros((info["height"], info["width"]), dtype=bool)
        for ann in anns:
            mask |= mask_utils.decode(self.segmentation_rle(ann)).astype(bool)
        return {"image": image, "label": label, "mask": as_mask(mask)}


class CocoMaskDataModule(MaskedImageDataModule):
    """A COCO-format dataset (image folder + annotation file) as image classification with object masks.

    ``categories`` maps COCO category names to class indices (their order); each image is
    labelled with its largest mapped category and masked with the union of its instances.
    Images without a mapped instance are reported in ``skipped_images``, not masked empty.
    The validation split also serves as the test split and the probe set.
    """

    def __init__(
        self,
        train_images: str,
        train_annotations: str,
        val_images: str,
        val_annotations: str,
        categories: Optional[List[str]] = None,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        mean: Tuple[float, float, float] = IMAGENET_MEAN,
        std: Tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
    ):
        super().__init__(img_size=img_size, batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed)
        self.train_images, self.train_annotations = train_images, train_annotations
        self.val_images, self.val_annotations = val_images, val_annotations
        self.categories = None if categories is None else list(categories)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_names(self) -> List[str]:
        return list(self.categories) if self.categories is not None else list(self.sources()[0].classes)

    @property
    def skipped_images(self) -> Dict[str, List[str]]:
        """File names left out per split because they have no instance of a mapped category."""
        train, val, _ = self.sources()
        return {"train": list(train.skipped), "val": list(val.skipped)}

    def build_sources(self) -> Tuple[CocoSource, CocoSource, CocoSource]:
        train = CocoSource(self.train_images, self.train_annotations, self.categories)
        # Validation uses the training classes, so labels mean the same in both splits.
        val = CocoSource(self.val_images, self.val_annotations, train.classes)
        return train, val, val
