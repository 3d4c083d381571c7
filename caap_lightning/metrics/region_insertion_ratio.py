"""Insertion ratio: does a region alone restore the model's class better than the rest of the image alone?

The map-based ratios (:class:`~caap_lightning.metrics.DensityRatio`) ask where a map puts its
evidence; patch maps cannot see a cue spread over many patches (a background colour, a frame),
because no single patch carries it. This test asks the model directly, as activation patching
does with whole regions: the *suspect* part of each image is shown alone, then the image with
the suspect removed, and the class probability each restores is compared.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from caap_lightning.metrics._checks import (
    TargetLike,
    check_choice,
    check_images,
    check_int,
    check_masks,
    check_target,
    check_target_range,
    model_device_dtype,
)
from caap_lightning.metrics._detailed_metric import DetailedMetric
from caap_lightning.metrics.functional import MASS_REGIONS, scorable_regions
from caap_lightning.utils import eval_mode

# Probability added to both gains: it keeps the ratio finite and near 1 when neither part restores the class.
INSERTION_FLOOR = 0.05
# The border ring's width as a share of each side: the outer eighth holds frames, corner tags and edge text.
BORDER_SHARE = 1 / 8
# The width of the edge around a mask that neither view keeps, as a share of the shorter side: a mask's edge is
# uncertain (anti-aliased outlines, a trimap's boundary), and an edge left behind draws the removed part's outline.
EDGE_SHARE = 1 / 32


class RegionInsertion(NamedTuple):
    """Per image: the target probability the suspect alone and the rest alone add over the blank's."""

    suspect: Tensor  # (B,) float64, >= 0
    rest: Tensor  # (B,) float64, >= 0
    target: Tensor  # (B,) the classes scored
    scored: Tensor  # (B,) bool: the image has both a suspect part and a rest
    colour: Tensor  # (C,) the colour that stood in for the removed rest, and filled the blank image


def border_masks(n: int, size: tuple, share: float = BORDER_SHARE) -> Tensor:
    """``(n, H, W)`` bool: a ring ``round(share * side)`` pixels wide (at least 1) around each image."""
    if not 0 < share < 0.5:
        raise ValueError(f"the border's share of each side must be in (0, 0.5), got {share!r}")
    h, w = size
    dy, dx = max(1, round(share * h)), max(1, round(share * w))
    if 2 * dy >= h or 2 * dx >= w:
        raise ValueError(f"images of {h}x{w} pixels have no inside within a border {dy}x{dx} pixels wide")
    ring = torch.ones(h, w, dtype=torch.bool)
    ring[dy : h - dy, dx : w - dx] = False
    return ring.expand(n, h, w).clone()


def edge_width(size: tuple, share: float = EDGE_SHARE) -> int:
    """The edge's width in pixels for images of ``size``: ``round(share * shorter side)``, at least 1."""
    return max(1, round(share * min(size)))


def dilate(masks: Tensor, width: int) -> Tensor:
    """``masks`` grown by ``width`` pixels in every direction (a square neighbourhood)."""
    grown = F.max_pool2d(masks[:, None].float(), 2 * width + 1, stride=1, padding=width)
    return grown[:, 0] > 0


def fill_with_mean_of_rest(images: Tensor, masks: Tensor) -> Tensor:
    """``images`` with each mask's pixels set to the mean colour of that image's other pixels.

    A region painted in the colour around it keeps no outline: removing an object or a cue this
    way does not leave its silhouette behind for the model to read.
    """
    keep = (~masks)[:, None].to(images.dtype)
    mean = (images * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp_min(1)
    return torch.where(masks[:, None], mean, images)


def hide_regions(images: Tensor, masks: Tensor) -> Tensor:
    """``images`` with each mask, and an edge :func:`edge_width` pixels wide around it, painted in the mean
    colour of that image's other pixels (:func:`fill_with_mean_of_rest`): the region removed, no outline left."""
    return fill_with_mean_of_rest(images, dilate(masks, edge_width(tuple(images.shape[-2:]))))


def rest_colour(images: Tensor, masks: Tensor) -> Tensor:
    """``(C,)``: the mean colour of the pixels outside the masks, over every image of the batch.

    What stands in for a removed rest: the typical colour of that region across the images, which
    no single image's cue sets (a background colour that names one class is averaged with the
    others), and against which an object keeps its contrast (a grey or white stand-in can swallow a
    grey garment that a dark background shows).
    """
    outside = (~masks)[:, None].to(images.dtype)
    return (images * outside).sum((0, 2, 3)) / outside.sum((0, 2, 3)).clamp_min(1)


def suspect_views(images: Tensor, masks: Tensor, region: str, colour: Tensor) -> tuple[Tensor, Tensor]:
    """The suspect alone and the image without it, for ``region`` ``"mask"`` (the mask is the suspect)
    or ``"outside"`` (everything but the mask is: the background of an object mask).

    One rule for both: the mask's pixels, when removed, take the mean colour of that image's rest,
    and so does an edge :func:`edge_width` pixels wide around the mask
    (:func:`fill_with_mean_of_rest`), so that no outline of what was removed is left; the rest,
    when removed, takes ``colour`` (see :func:`rest_colour`), which keeps the mask's outline. The
    edge belongs to neither view.
    """
    hidden = hide_regions(images, masks)
    only_mask = torch.where(masks[:, None], images, colour.to(images).view(1, -1, 1, 1))
    if region == "mask":
        return only_mask, hidden
    return hidden, only_mask


def region_insertion(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    region: str = "mask",
    target: TargetLike = None,
    colour: Optional[Tensor] = None,
    batch_size: int = 64,
) -> RegionInsertion:
    """How much of the target's probability the suspect region alone, and the rest alone, restore.

    The suspect is the mask (``region="mask"``: a cue, a border ring) or everything outside it
    (``"outside"``: the background of an object mask); see :func:`suspect_views` for how each
    part is removed. Each gain is the positive part of the view's target probability minus the
    blank's, the blank being the image of one ``colour`` (``(C,)``, normalised; ``None``: the
    batch's :func:`rest_colour`), so a part that explains nothing adds 0. ``target`` as
    :func:`~caap_lightning.metrics.functional.insertion_deletion` takes it (``None``: the clean
    image's top-1). An image whose mask is empty or whole has nothing to compare (``scored``
    False); a batch with no other image is refused.
    """
    check_choice("region", region, MASS_REGIONS)
    check_images(model, images)
    masks = check_masks(masks)
    b = images.shape[0]
    if masks.shape != (b, *images.shape[-2:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not match the images {tuple(images.shape)}: need (B, H, W)")
    check_int("batch_size", batch_size, 1, "images per forward pass")
    targets = check_target(target, b)
    scored = scorable_regions(masks)
    device, dtype = model_device_dtype(model)
    images = images.to(device=device or images.device, dtype=dtype or images.dtype)
    masks = masks.to(images.device)
    colour = rest_colour(images, masks) if colour is None else colour.to(images).flatten()
    if colour.numel() != images.shape[1]:
        raise ValueError(f"colour has {colour.numel()} channels but the images {images.shape[1]}: pass one value per channel")
    suspect, rest = suspect_views(images, masks, region, colour)
    # The clean images are classified only when no target is given.
    views = [suspect, rest, colour.view(1, -1, 1, 1).expand_as(images[:1])] + ([images] if targets is None else [])
    with eval_mode(model), torch.no_grad():
        probs = torch.cat([model(chunk).float().softmax(1) for chunk in torch.cat(views).split(batch_size)]).double()
    if targets is None:
        targets = probs[2 * b + 1 :].argmax(1)
    else:
        targets = targets.to(images.device)
        check_target_range(targets, probs.shape[1])
    base = probs[2 * b][targets]
    gains = [(probs[lo : lo + b].gather(1, targets[:, None])[:, 0] - base).clamp_min(0) for lo in (0, b)]
    return RegionInsertion(suspect=gains[0], rest=gains[1], target=targets, scored=scored, colour=colour)


def insertion_ratio(suspect: Tensor, rest: Tensor, floor: float = INSERTION_FLOOR) -> Tensor:
    """``(suspect + floor) / (rest + floor)``, elementwise: 1 when both parts restore the class equally,
    above 1 when the suspect alone restores more of it than the rest does."""
    return (suspect + floor) / (rest + floor)


class PooledRegionRatio(DetailedMetric):
    """The state of a region test that pools a per-image suspect value and rest value into one ratio.

    Subclasses name the values (``main_key``, ``suspect_key``, ``rest_key``) and compute them in
    ``update`` with :meth:`_add`; the ratio is :func:`insertion_ratio` of the pooled means, so
    images where neither value is large weigh little. The model is held by reference, as
    :class:`~caap_lightning.metrics.InsertionDeletion` holds it.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    suspect_key: str
    rest_key: str

    def __init__(
        self,
        model: nn.Module,
        region: str = "mask",
        floor: float = INSERTION_FLOOR,
        batch_size: int = 64,
        per_image: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("region", region, MASS_REGIONS)
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor > 0:
            raise ValueError(f"floor must be a probability > 0, got {floor!r}")
        check_int("batch_size", batch_size, 1, "images per forward pass")
        object.__setattr__(self, "model", model)  # a reference, not a submodule: outside the state and the .to() moves
        self.region = region
        self.floor = float(floor)
        self.batch_size = batch_size
        self.per_image = per_image
        # The test and the region in the state names, so that a MetricCollection never merges two tests' states.
        self._states = {name: f"{name}_{self.main_key}_{region}" for name in ("suspect_sum", "rest_sum")}
        for state in self._states.values():
            self.add_state(state, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("skipped", torch.tensor(0), dist_reduce_fx="sum")
        if per_image:
            self.add_state("ratio_per_image", [], dist_reduce_fx="cat")

    def _add(self, suspect: Tensor, rest: Tensor, scored: Tensor) -> None:
        """Pool one batch's per-image values of the images ``scored``; the rest count as skipped."""
        scored = scored.to(suspect.device)
        for name, values in (("suspect_sum", suspect), ("rest_sum", rest)):
            total = getattr(self, self._states[name])
            setattr(self, self._states[name], total + values[scored].sum().to(total))
        self.count += int(scored.sum())
        self.skipped += int((~scored).sum())
        if self.per_image:
            ratio = insertion_ratio(suspect, rest, self.floor)
            self.ratio_per_image.append(torch.where(scored, ratio, torch.nan).to(self.device))

    def _details(self) -> Dict[str, Tensor]:
        suspect = getattr(self, self._states["suspect_sum"]) / self.count
        rest = getattr(self, self._states["rest_sum"]) / self.count
        out = {
            self.main_key: insertion_ratio(suspect, rest, self.floor),
            self.suspect_key: suspect,
            self.rest_key: rest,
            "count": self.count,
            "skipped": self.skipped,
        }
        if self.per_image:
            out[f"{self.main_key}_per_image"] = dim_zero_cat(self.ratio_per_image)
        return out


class InsertionRatio(PooledRegionRatio):
    """The class probability a suspect region alone restores over what the rest alone restores, pooled.

    ``region="outside"`` with object masks asks whether the background alone explains the
    prediction better than the object alone; ``region="mask"`` with cue masks (or
    :func:`border_masks`) the same of the cue (or the image's border). Gains are pooled over the
    scored images before the ratio (:func:`insertion_ratio` of the mean gains), so images that
    neither part explains weigh little. No ceiling is set by the region's area: a model that
    reads only the suspect scores about ``(1 + floor) / floor`` whatever its size. ``colour`` as
    :func:`region_insertion` takes it: give the colour of a whole set (e.g. :func:`rest_colour` of
    a probe batch) so that every batch of it, and every process under DDP, is shown against the
    same stand-in; ``None`` takes each batch's own. Each update costs ``2B + 1`` forward passes
    (``3B + 1`` without a ``target``, which classifies the images first). ``compute()`` returns
    the ratio; ``compute_details()`` also ``suspect_gain`` and ``rest_gain`` (the means),
    ``count`` and ``skipped``, and with
    ``per_image`` each scored image's own ratio as ``insertion_ratio_per_image`` (NaN where
    skipped; under DDP gathered rank by rank).
    """

    main_key = "insertion_ratio"
    suspect_key = "suspect_gain"
    rest_key = "rest_gain"

    def __init__(
        self,
        model: nn.Module,
        region: str = "mask",
        colour: Optional[Tensor] = None,
        floor: float = INSERTION_FLOOR,
        batch_size: int = 64,
        per_image: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, region, floor, batch_size, per_image, **kwargs)
        self.colour = colour

    def update(self, images: Tensor, masks: Tensor, target: TargetLike = None) -> None:
        found = region_insertion(self.model, images, masks, self.region, target, self.colour, self.batch_size)
        self._add(found.suspect, found.rest, found.scored)
