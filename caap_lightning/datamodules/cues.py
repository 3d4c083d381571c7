"""What the generated datamodules share: their cues (the class a cue names, where it is drawn, its mask) and splits.

``SyntheticSpuriousDataModule`` and ``FashionCanvasDataModule`` draw their cues with these
functions, so a cue kind looks and behaves the same on shapes and on garments. A sample is
composed as: a background (a colour *level* plus a texture or noise *variation*), the object
over it, then the cue (:func:`compose`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from caap_lightning.datamodules.base import as_mask

CUE_KINDS = ("marker", "watermark", "border", "background")
CueKind = Literal["marker", "watermark", "border", "background"]
# Each split draws its samples from its own generators: (seed, split id, sample index).
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# One saturated colour per class: six primaries and secondaries, then four hues between them.
CUE_COLOURS = (
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.0, 1.0),
    (1.0, 1.0, 0.0),
    (1.0, 0.0, 1.0),
    (0.0, 1.0, 1.0),
    (1.0, 0.5, 0.0),
    (0.5, 1.0, 0.0),
    (0.0, 0.5, 1.0),
    (1.0, 0.0, 0.5),
)
# The watermark names its class by its glyph, not its colour: every class's is white.
WATERMARK_COLOUR = (1.0, 1.0, 1.0)
# A background cue is its class colour at half brightness, so bright objects stay distinct from it.
BACKGROUND_BRIGHTNESS = 0.5
# 3x5 pixel digits: the watermark of class k is the digit k.
DIGIT_GLYPHS = (
    ("111", "101", "101", "101", "111"),
    ("010", "110", "010", "010", "111"),
    ("111", "001", "111", "100", "111"),
    ("111", "001", "111", "001", "111"),
    ("101", "101", "111", "001", "001"),
    ("111", "100", "111", "001", "111"),
    ("111", "100", "111", "101", "111"),
    ("111", "001", "010", "010", "010"),
    ("111", "101", "111", "101", "111"),
    ("111", "101", "111", "001", "111"),
)


def check_cue_kind(cue: str, allowed: Tuple[str, ...] = CUE_KINDS) -> None:
    if cue not in allowed:
        raise ValueError(f"cue must be one of {allowed}, got {cue!r}")


def cue_class(rng: np.random.Generator, label: int, num_classes: int, correlation: float) -> int:
    """The class the cue names: ``label`` with probability ``correlation``, else one of the others, uniformly."""
    if rng.random() < correlation:
        return label
    others = [k for k in range(num_classes) if k != label]
    return int(others[rng.integers(len(others))])


def cue_margin(cue_size: int) -> int:
    """The gap between a marker or watermark and the image edge, and the border's width."""
    return max(1, cue_size // 4)


def marker_corner(rng: np.random.Generator, obj: np.ndarray, cue_size: int) -> Tuple[int, int]:
    """Top-left pixel of a ``cue_size`` square in a random image corner that the object ``obj`` leaves free.

    A corner is free when the square and a one-pixel ring around it miss the object; with no free
    corner, the corner that overlaps the object least.
    """
    s, c = obj.shape[0], cue_size
    margin = cue_margin(c)
    corners = [(margin, margin), (margin, s - margin - c), (s - margin - c, margin), (s - margin - c, s - margin - c)]
    overlap = [obj[max(0, y - 1) : y + c + 1, max(0, x - 1) : x + c + 1].sum() for y, x in corners]
    free = [k for k, o in enumerate(overlap) if o == 0] or [int(np.argmin(overlap))]
    return corners[free[rng.integers(len(free))]]


def marker_mask(rng: np.random.Generator, obj: np.ndarray, cue_size: int) -> np.ndarray:
    y, x = marker_corner(rng, obj, cue_size)
    mask = np.zeros(obj.shape, bool)
    mask[y : y + cue_size, x : x + cue_size] = True
    return mask


def watermark_mask(cue_label: int, img_size: int, cue_size: int) -> np.ndarray:
    """The digit ``cue_label`` (3x5 pixels scaled by the margin) at the bottom-right, the margin from both edges."""
    m = cue_margin(cue_size)
    glyph = np.array([[ch == "1" for ch in row] for row in DIGIT_GLYPHS[cue_label]])
    glyph = glyph.repeat(m, 0).repeat(m, 1)
    h, w = glyph.shape
    mask = np.zeros((img_size, img_size), bool)
    mask[img_size - m - h : img_size - m, img_size - m - w : img_size - m] = glyph
    return mask


def border_mask(img_size: int, cue_size: int) -> np.ndarray:
    """A frame around the image, the margin wide."""
    m = cue_margin(cue_size)
    mask = np.ones((img_size, img_size), bool)
    mask[m:-m, m:-m] = False
    return mask


@dataclass(frozen=True)
class Cue:
    """One drawn cue: its kind, the class it names, its pixels and the colour they are painted.

    For a ``"background"`` cue, ``mask`` is every pixel but the object and ``colour`` the
    background's level, under the background's own texture.
    """

    kind: str
    label: int
    mask: np.ndarray  # (H, W) bool
    colour: np.ndarray  # (3,) float32


def draw_cue(
    kind: str, rng: np.random.Generator, label: int, num_classes: int, correlation: float, obj: np.ndarray, cue_size: int
) -> Cue:
    """The cue of a sample whose class is ``label`` and whose object covers ``obj``.

    Its class comes first from ``rng`` (:func:`cue_class`), then, for a marker, its corner.
    """
    cue_label = cue_class(rng, label, num_classes, correlation)
    colour = np.asarray(CUE_COLOURS[cue_label], np.float32)
    if kind == "marker":
        return Cue(kind, cue_label, marker_mask(rng, obj, cue_size), colour)
    if kind == "watermark":
        return Cue(kind, cue_label, watermark_mask(cue_label, obj.shape[0], cue_size), np.asarray(WATERMARK_COLOUR, np.float32))
    if kind == "border":
        return Cue(kind, cue_label, border_mask(obj.shape[0], cue_size), colour)
    if kind == "background":
        return Cue(kind, cue_label, ~obj, BACKGROUND_BRIGHTNESS * colour)
    raise ValueError(f"unknown cue kind {kind!r}; known: {CUE_KINDS}")


def compose(
    obj: np.ndarray, object_pixels: np.ndarray, level: np.ndarray, variation: np.ndarray, cue: Optional[Cue]
) -> Tuple[np.ndarray, np.ndarray]:
    """The ``(3, H, W)`` image and the object mask that remains visible.

    The object (``object_pixels`` where ``obj``) lies on the background ``level + variation``;
    a background cue replaces ``level``; any other cue is painted over both, and its pixels
    leave the object mask.
    """
    if cue is not None and cue.kind == "background":
        level = cue.colour[:, None, None]
    image = np.where(obj[None], object_pixels, level + variation)
    if cue is not None and cue.kind != "background":
        image = np.where(cue.mask[None], cue.colour[:, None, None], image)
        obj = obj & ~cue.mask
    return image, obj


def as_sample(label: int, image: np.ndarray, obj: np.ndarray, cue: Optional[Cue]) -> Dict[str, object]:
    """The sample dict of a composed float image in [0, 1]: uint8 image, object mask, and the cue's mask and class."""
    sample: Dict[str, object] = {"label": label}
    if cue is not None:
        sample["cue_mask"] = as_mask(cue.mask)
        sample["cue_label"] = cue.label
    pixels = np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    sample["image"] = tv_tensors.Image(torch.from_numpy(pixels))
    sample["mask"] = as_mask(obj)
    return sample


class DrawnSplit(Dataset):
    """A split of ``length`` samples, sample ``i`` drawn by :meth:`draw` from ``(seed, split, i)``.

    With ``cache`` each sample is drawn once and kept (each read gets its own dict).
    """

    def __init__(self, length: int, seed: int, split: str, cache: bool):
        self.length = length
        self.seed = seed
        self.split_id = SPLIT_IDS[split]
        self._drawn: Optional[Dict[int, Dict[str, object]]] = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Dict[str, object]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        if self._drawn is None:
            return self.draw(i)
        if i not in self._drawn:
            self._drawn[i] = self.draw(i)
        return dict(self._drawn[i])

    def rng(self, i: int) -> np.random.Generator:
        """Sample ``i``'s own generator: the same in every instance, epoch and process."""
        return np.random.default_rng([self.seed, self.split_id, i])

    def draw(self, i: int) -> Dict[str, object]:
        raise NotImplementedError
