"""COCO-format datasets: an image folder and an annotation file (polygons or RLE) via pycocotools."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from caap_lightning.datamodules.base import MaskedImageDataModule, as_mask
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD


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

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(annotation_file))
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
            if not anns:
                self.skipped.append(self.coco.imgs[image_id]["file_name"])
                continue
            area: Dict[int, float] = {}
            for a in anns:
                area[a["category_id"]] = area.get(a["category_id"], 0.0) + self.ann_area(a)
            # Largest area wins; ties go to the lower class index.
            category = max(area, key=lambda c: (area[c], -category_to_label[c]))
            self.items.append((image_id, category_to_label[category], [a for a in anns if a["category_id"] == category]))
        if self.skipped:
            warnings.warn(
                f"{len(self.skipped)} of {len(self.coco.imgs)} images in {annotation_file} have no instance of "
                f"{self.classes} and are left out (e.g. {self.skipped[:3]})",
                stacklevel=2,
            )

    def ann_area(self, ann: dict) -> float:
        if "area" in ann:
            return float(ann["area"])
        from pycocotools import mask as mask_utils

        return float(mask_utils.area(self.coco.annToRLE(ann)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, object]:
        image_id, label, anns = self.items[i]
        info = self.coco.imgs[image_id]
        image = Image.open(self.image_dir / info["file_name"]).convert("RGB")
        if image.size != (info["width"], info["height"]):
            raise ValueError(
                f"{info['file_name']} is {image.size[0]}x{image.size[1]} but its annotation says "
                f"{info['width']}x{info['height']}; the masks would not line up"
            )
        mask = np.zeros((info["height"], info["width"]), dtype=bool)
        for ann in anns:
            mask |= self.coco.annToMask(ann).astype(bool)
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
