"""Fashion-MNIST garments pasted on a larger canvas, with object masks and optional spurious cues."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torchvision.transforms.v2 as v2
from PIL import Image
from torchvision.datasets import FashionMNIST

from caap_lightning.datamodules.base import MaskedImageDataModule
from caap_lightning.datamodules.cues import CUE_KINDS, DrawnSplit, as_sample, check_cue_kind, compose, cue_margin, draw_cue
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD

CUES = ("none", *CUE_KINDS)
CueOrNone = Literal["none", "marker", "watermark", "border", "background"]
# Where Debian's package dataset-fashion-mnist installs the four gzip'd IDX files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def find_fashion_mnist(root: str) -> None:
    """Put the four IDX files in ``<root>/FashionMNIST/raw`` (where torchvision reads them).

    Each file is taken from there, else from ``root`` itself, else from Debian's package
    directory, plain or gzip'd (``.gz`` is unpacked into the raw folder). Never downloads.
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    missing = []
    for name in IDX_FILES:
        if (raw / name).is_file():
            continue
        candidates = [raw / f"{name}.gz"] + [d / f for d in (Path(root), DEBIAN_DIR) for f in (name, f"{name}.gz")]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            missing.append(name)
            continue
        raw.mkdir(parents=True, exist_ok=True)
        # Unpack beside the target and rename, so that an interrupted copy never looks complete.
        partial = raw / f"{name}.partial"
        with (gzip.open(found) if found.suffix == ".gz" else open(found, "rb")) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, raw / name)
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: no {', '.join(missing)} (plain or .gz) in {str(raw)!r}, {str(root)!r} or "
            f"{str(DEBIAN_DIR)!r}. Install Debian's package (`apt-get install dataset-fashion-mnist`, which puts "
            f"them in {str(DEBIAN_DIR)!r}), or put the four IDX files, gzip'd or not, in {str(raw)!r}. "
            f"Nothing is downloaded."
        )


class FashionCanvas(DrawnSplit):
    """One split of the canvas set; sample ``i`` shows garment ``indices[i % len(indices)]``.

    Its size, position and cue come from a generator seeded with ``(seed, split, i)``, so a
    split longer than its garments shows each garment several times, placed anew.
    ``labels`` maps a Fashion-MNIST label to the class index; ``cue_correlation`` is the
    probability that the cue's class equals the label. With ``cache`` each canvas is drawn once
    and kept.
    """

    def __init__(
        self,
        garments: FashionMNIST,
        indices: Sequence[int],
        labels: Dict[int, int],
        length: int,
        img_size: int,
        cue: CueOrNone,
        cue_correlation: float,
        object_size: Tuple[float, float],
        cue_size: int,
        mask_threshold: float,
        seed: int,
        split: str,
        cache: bool = False,
    ):
        super().__init__(length, seed, split, cache)
        self.garments = garments
        self.indices = list(indices)
        self.labels = dict(labels)
        self.num_classes = len(self.labels)
        self.img_size = img_size
        self.cue = cue
        self.cue_correlation = cue_correlation
        self.object_size = object_size
        self.cue_size = cue_size
        self.margin = cue_margin(cue_size)  # garments keep inside the border's width
        self.mask_threshold = mask_threshold

    def draw(self, i: int) -> Dict[str, object]:
        garment, fashion_label = self.garments[self.indices[i % len(self.indices)]]
        label = self.labels[int(fashion_label)]
        # Placement and background are drawn before the cue, so they do not depend on the cue kind.
        rng = self.rng(i)
        s, m = self.img_size, self.margin
        size = int(np.clip(round(rng.uniform(*self.object_size) * s), 4, s - 2 * m))
        y, x = (int(v) for v in rng.integers(m, s - m - size, 2, endpoint=True))
        grey = np.asarray(garment.resize((size, size), Image.BILINEAR), np.float32) / 255
        obj = np.zeros((s, s), bool)
        obj[y : y + size, x : x + size] = grey > self.mask_threshold
        value = np.zeros((s, s), np.float32)
        value[y : y + size, x : x + size] = grey
        level = np.full((3, 1, 1), rng.uniform(0.05, 0.25), np.float32)
        noise = rng.normal(0.0, 0.02, (s, s)).astype(np.float32)
        cue = None
        if self.cue != "none":
            cue = draw_cue(self.cue, rng, label, self.num_classes, self.cue_correlation, obj, self.cue_size)
        image, obj = compose(obj, value[None], level, noise[None], cue)
        return as_sample(label, image, obj, cue)


class FashionCanvasDataModule(MaskedImageDataModule):
    """Fashion-MNIST garments at random sizes and positions on a larger RGB canvas, with optional cues.

    Each 28 px grey garment is resized to ``object_size`` (a fraction of ``img_size``) and pasted
    at a random position on a dark, noisy grey canvas; ``masks`` are the pasted garment pixels
    brighter than ``mask_threshold``. ``cue`` adds a spurious cue whose class is drawn as in the
    synthetic set: in training it matches the label with probability ``cue_correlation``; in
    validation and test (so the probe batch) it is drawn independently of the label, so
    ``cue_labels != labels`` marks the cue-conflicting images. The cue kinds are drawn as on the
    shapes (:mod:`caap_lightning.datamodules.cues`); ``cue_masks`` are their pixels:

    * ``"marker"``: a ``cue_size`` square in a free corner, coloured ``CUE_COLOURS[k]``;
    * ``"watermark"``: the digit ``k`` (3x5 pixel font scaled by ``cue_size // 4``) in white,
      always at the bottom-right;
    * ``"border"``: a frame ``cue_size // 4`` wide around the canvas in ``CUE_COLOURS[k]``;
    * ``"background"``: the canvas itself is ``CUE_COLOURS[k]`` at half brightness; the cue
      never overlaps the garment, and its mask is everything but the garment.

    Marker and watermark are drawn over the garment where they meet it, and those pixels leave the
    object mask; garments keep ``cue_size // 4`` pixels from the edges, so the border never covers
    them. ``cue="none"`` draws no cue (``cue_masks``/``cue_labels`` are ``None``).

    ``classes`` keeps some Fashion-MNIST classes (their label indices, e.g. ``[1, 8, 7, 6]``:
    trouser, bag, sneaker, shirt), relabelled ``0..len(classes) - 1`` in that order; by default
    all ten. Training uses the training garments of those classes (all 60000 by default);
    validation and test the first and second halves of their test garments.
    ``num_train``/``num_val``/``num_test`` set a split's length (default: one canvas per garment;
    longer splits show garments again, placed anew). Canvas ``i`` of a split is drawn from
    ``(seed, split, i)`` whenever it is read: the same for every instance and epoch, and for every
    cue kind except for the cue itself. ``cache`` keeps every canvas drawn (drawing one costs about
    as much as a tiny ViT's training step on it), at the price of memory: an image and two masks,
    ``5 * img_size**2`` bytes, per canvas.

    Data never downloads: ``prepare_data`` takes the IDX files from ``<root>/FashionMNIST/raw``,
    ``root`` or Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
    unpacking ``.gz`` into ``<root>/FashionMNIST/raw``, and fails saying how to get them.
    """

    def __init__(
        self,
        root: str = "data",
        cue: CueOrNone = "none",
        cue_correlation: float = 0.9,
        img_size: int = 64,
        object_size: Tuple[float, float] = (0.4, 0.8),
        cue_size: int = 8,
        mask_threshold: float = 0.1,
        num_train: Optional[int] = None,
        num_val: Optional[int] = None,
        num_test: Optional[int] = None,
        batch_size: int = 64,
        num_workers: int = 0,
        mean: Tuple[float, float, float] = IMAGENET_MEAN,
        std: Tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
        classes: Optional[List[int]] = None,
        cache: bool = False,
    ):
        super().__init__(img_size=img_size, batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed)
        check_cue_kind(cue, CUES)
        every = list(range(len(FashionMNIST.classes)))
        classes = every if classes is None else [int(c) for c in classes]
        if len(classes) < 2 or len(set(classes)) != len(classes) or not set(classes) <= set(every):
            raise ValueError(f"classes must be 2 or more distinct Fashion-MNIST labels in 0..9, got {classes}")
        if not 0.0 <= cue_correlation <= 1.0:
            raise ValueError(f"cue_correlation must be in [0, 1], got {cue_correlation}")
        if not 0.0 < object_size[0] <= object_size[1] <= 1.0:
            raise ValueError(f"object_size must be 0 < min <= max <= 1 (fraction of img_size), got {object_size}")
        if not 1 <= cue_size <= img_size // 3:
            raise ValueError(f"cue_size must be in [1, img_size // 3 = {img_size // 3}], got {cue_size}")
        if not 0.0 <= mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1) (garment brightness), got {mask_threshold}")
        if any(n is not None and n < 1 for n in (num_train, num_val, num_test)):
            raise ValueError(
                f"num_train, num_val and num_test must be positive or None, got {num_train}, {num_val}, {num_test}"
            )
        self.root = root
        self.classes = classes
        self.num_classes = len(classes)
        self.cue = cue
        self.cue_correlation = float(cue_correlation)
        self.object_size = (float(object_size[0]), float(object_size[1]))
        self.cue_size = int(cue_size)
        self.mask_threshold = float(mask_threshold)
        self.cache = bool(cache)
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test

    @property
    def class_names(self) -> List[str]:
        return [FashionMNIST.classes[c] for c in self.classes]

    def prepare_data(self) -> None:
        find_fashion_mnist(self.root)

    def split(self, garments: FashionMNIST, indices: Sequence[int], split: str, length: Optional[int]) -> FashionCanvas:
        # Outside training the cue is independent of the label: correlation 1/num_classes.
        correlation = self.cue_correlation if split == "train" else 1.0 / self.num_classes
        return FashionCanvas(
            garments=garments,
            indices=indices,
            labels={fashion: k for k, fashion in enumerate(self.classes)},
            length=len(indices) if length is None else length,
            img_size=self.img_size,
            cue=self.cue,
            cue_correlation=correlation,
            object_size=self.object_size,
            cue_size=self.cue_size,
            mask_threshold=self.mask_threshold,
            seed=self.seed,
            split=split,
            cache=self.cache,
        )

    def build_sources(self) -> Tuple[FashionCanvas, FashionCanvas, FashionCanvas]:
        self.prepare_data()  # probe_batch without a Trainer; only a check once the files are there
        train = FashionMNIST(self.root, train=True, download=False)
        test = FashionMNIST(self.root, train=False, download=False)
        train_indices, test_indices = self.garments_of_classes(train), self.garments_of_classes(test)
        half = len(test_indices) // 2
        return (
            self.split(train, train_indices, "train", self.num_train),
            self.split(test, test_indices[:half], "val", self.num_val),
            self.split(test, test_indices[half:], "test", self.num_test),
        )

    def garments_of_classes(self, garments: FashionMNIST) -> List[int]:
        """Indices of the garments of ``classes``, in their file order."""
        keep = np.isin(np.asarray(garments.targets), self.classes)
        indices = np.flatnonzero(keep).tolist()
        if not indices:
            raise ValueError(f"the Fashion-MNIST files under {self.root!r} have no garment of classes {self.classes}")
        return indices

    def train_transform(self) -> v2.Transform:
        # Canvases are already drawn at img_size with random placement; a flip would move the watermark.
        return v2.Compose(self.normalize_transform())

    def eval_transform(self) -> v2.Transform:
        return v2.Compose(self.normalize_transform())
