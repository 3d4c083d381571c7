"""Synthetic shapes with a spurious cue: generated in memory, seeded, with exact object and cue masks."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torchvision.transforms.v2 as v2

from caap_lightning.datamodules.base import MaskedImageDataModule
from caap_lightning.datamodules.cues import CueKind, DrawnSplit, as_sample, check_cue_kind, compose, draw_cue
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD

SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond")


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Pixels of ``shape`` (bounding box ``size``) at offsets ``dx``, ``dy`` from its centre."""
    r = size / 2
    if shape == "disc":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # upright, apex at the top
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


class SyntheticShapes(DrawnSplit):
    """One split of the synthetic set; sample ``i`` is drawn from its own seeded generator.

    ``cue_correlation`` is the probability that the cue's class equals the label; ``None``
    draws no cue. The label of sample ``i`` is ``i % num_classes`` (balanced classes).
    """

    def __init__(
        self,
        length: int,
        num_classes: int,
        img_size: int,
        cue: CueKind,
        cue_correlation: Optional[float],
        shape_contrast: float,
        object_size: Tuple[float, float],
        cue_size: int,
        seed: int,
        split: str,
    ):
        # Drawing costs about as much as a tiny ViT's step on it, so each sample is drawn once.
        super().__init__(length, seed, split, cache=True)
        self.num_classes = num_classes
        self.img_size = img_size
        self.cue = cue
        self.cue_correlation = cue_correlation
        self.shape_contrast = shape_contrast
        self.object_size = object_size
        self.cue_size = cue_size
        self.yy, self.xx = np.mgrid[0:img_size, 0:img_size].astype(np.float32) + 0.5

    def background(self, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, float]:
        """A grey, softly textured background: its tinted level ``(3, 1, 1)``, its texture ``(1, H, W)``, its grey.

        The texture is random oriented gratings plus pixel noise.
        """
        s = self.img_size
        base = rng.uniform(0.3, 0.7)
        texture = np.zeros((s, s), np.float32)
        for _ in range(3):
            freq = rng.uniform(1.0, 4.0) * 2 * np.pi / s
            angle = rng.uniform(0, np.pi)
            texture += np.sin(freq * (np.cos(angle) * self.xx + np.sin(angle) * self.yy) + rng.uniform(0, 2 * np.pi))
        texture = 0.04 * texture + rng.normal(0.0, 0.02, (s, s)).astype(np.float32)
        tint = rng.uniform(-0.04, 0.04, 3).astype(np.float32)
        return base + tint[:, None, None], texture[None], base

    def draw(self, i: int) -> Dict[str, object]:
        rng = self.rng(i)
        label = i % self.num_classes
        level, texture, base = self.background(rng)

        s = self.img_size
        size = rng.uniform(*self.object_size) * s
        cx, cy = rng.uniform(size / 2, s - size / 2, 2)
        obj = shape_mask(SHAPES[label], self.xx - cx, self.yy - cy, size)
        # Brightness sets the contrast to the background; hue is random, so only the shape tells the class.
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if self.cue == "background" and self.cue_correlation is not None:
            # A background cue dims the background to a class colour at half brightness, on which a dark
            # shape can vanish (black on dark blue): the shape is brighter than it, in every class.
            sign = 1.0
        colour = base + sign * self.shape_contrast + rng.uniform(-0.15, 0.15, 3)
        cue = None
        if self.cue_correlation is not None:
            cue = draw_cue(self.cue, rng, label, self.num_classes, self.cue_correlation, obj, self.cue_size)
        image, obj = compose(obj, colour[:, None, None].astype(np.float32), level, texture, cue)
        return as_sample(label, image, obj, cue)


class SyntheticSpuriousDataModule(MaskedImageDataModule):
    """Coloured shapes on a textured background, with an optional spurious cue.

    Class ``k`` is the shape ``SHAPES[k]`` (disc, square, triangle, cross, ring, diamond) with
    random colour, size and position; ``masks`` are its exact visible pixels. The cue names a
    class: in training it matches the label with probability ``cue_correlation``; in validation
    (and so the probe batch) and test it is drawn independently of the label, so
    ``cue_labels != labels`` marks the cue-conflicting images. ``cue_correlation=None`` draws no
    cue anywhere (``cue_masks``/``cue_labels`` are ``None``). ``cue`` sets its kind, drawn as by
    ``FashionCanvasDataModule`` (:mod:`caap_lightning.datamodules.cues`); ``cue_masks`` are its pixels:

    * ``"marker"`` (the default): a ``cue_size`` square in an image corner that the shape leaves
      free, coloured ``CUE_COLOURS[k]``;
    * ``"watermark"``: the digit ``k`` (3x5 pixel font scaled by ``cue_size // 4``) in white,
      always at the bottom-right;
    * ``"border"``: a frame ``cue_size // 4`` wide around the image in ``CUE_COLOURS[k]``;
    * ``"background"``: the background's level is ``CUE_COLOURS[k]`` at half brightness, under its
      usual texture, and the shape is always the brighter side of ``shape_contrast``; the cue never
      covers the shape, and its mask is everything but the shape.

    Watermark and border are drawn over the shape where they meet it, and those pixels leave the
    object mask. A low ``shape_contrast`` (brightness step between shape and background) makes
    the shape harder to see than the cue. Training images are flipped horizontally, except with a
    watermark, which a flip would mirror and move. No files: sample ``i`` of a split is drawn from
    ``(seed, split, i)`` on first use and kept in memory; every cue kind gets the same shapes and
    backgrounds (but for a background cue's level and the shape's brightness on it).

    The defaults are the recipe of ``benchmarks/train_synthetic.py`` (4 classes, 64 px,
    ``shape_contrast`` 0.4, shapes 0.45-0.8 of the image side, i.e. 4-6 patches of 8 px across,
    8000 training images, horizontal flips), chosen so that a tiny ViT trained from scratch on the
    CPU learns the shapes without a cue, while a cue that names the label and is easier to see wins.
    What it reaches is measured, not recorded here: ``benchmarks/quality.py`` trains it
    (``benchmarks/results/quality.md``, its model; ``benchmarks/results/README.md`` lists the results).
    """

    def __init__(
        self,
        num_classes: int = 4,
        img_size: int = 64,
        cue_correlation: Optional[float] = 0.9,
        shape_contrast: float = 0.4,
        object_size: Tuple[float, float] = (0.45, 0.8),
        cue_size: int = 8,
        num_train: int = 8000,
        num_val: int = 1000,
        num_test: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        mean: Tuple[float, float, float] = IMAGENET_MEAN,
        std: Tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
        cue: CueKind = "marker",
    ):
        super().__init__(img_size=img_size, batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed)
        check_cue_kind(cue)
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES)}] (one shape per class), got {num_classes}")
        if cue_correlation is not None and not 0.0 <= cue_correlation <= 1.0:
            raise ValueError(f"cue_correlation must be in [0, 1] or None (no cue), got {cue_correlation}")
        if not 0.0 < object_size[0] <= object_size[1] <= 1.0:
            raise ValueError(f"object_size must be 0 < min <= max <= 1 (fraction of img_size), got {object_size}")
        if not 1 <= cue_size <= img_size // 3:
            raise ValueError(f"cue_size must be in [1, img_size // 3 = {img_size // 3}], got {cue_size}")
        if min(num_train, num_val, num_test) < 1:
            raise ValueError("num_train, num_val and num_test must be positive")
        self.num_classes = num_classes
        self.cue = cue
        self.cue_correlation = cue_correlation
        self.shape_contrast = float(shape_contrast)
        self.object_size = (float(object_size[0]), float(object_size[1]))
        self.cue_size = int(cue_size)
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test

    @property
    def class_names(self) -> List[str]:
        return list(SHAPES[: self.num_classes])

    def split(self, split: str, length: int) -> SyntheticShapes:
        # Outside training the cue is independent of the label: correlation 1/num_classes.
        correlation = self.cue_correlation
        if correlation is not None and split != "train":
            correlation = 1.0 / self.num_classes
        return SyntheticShapes(
            length=length,
            num_classes=self.num_classes,
            img_size=self.img_size,
            cue=self.cue,
            cue_correlation=correlation,
            shape_contrast=self.shape_contrast,
            object_size=self.object_size,
            cue_size=self.cue_size,
            seed=self.seed,
            split=split,
        )

    def build_sources(self) -> Tuple[SyntheticShapes, SyntheticShapes, SyntheticShapes]:
        return self.split("train", self.num_train), self.split("val", self.num_val), self.split("test", self.num_test)

    def train_transform(self) -> v2.Transform:
        # Shapes are already drawn at img_size and at random positions; a flip is all they need,
        # but it would mirror the watermark and move it to the other corner.
        flip = [] if self.cue == "watermark" else [v2.RandomHorizontalFlip()]
        return v2.Compose([*flip, *self.normalize_transform()])

    def eval_transform(self) -> v2.Transform:
        return v2.Compose(self.normalize_transform())
