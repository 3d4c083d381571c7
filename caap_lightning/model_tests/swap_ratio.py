"""Swap ratio: when a region and the rest of the image name different classes, which does the model follow?

The insertion ratio (:mod:`~caap_lightning.model_tests.insertion_ratio`) asks whether a
suspect region *alone* restores the class. A model that has learnt both the object and a cue
passes that test for both parts, so the ratio stays near 1 until the cue has all but replaced the
object. A shortcut shows where the two disagree: on an image whose cue names another class. The
swap test makes such images from the probe, as background-swap benchmarks do (the "mixed-rand"
images of Xiao et al., 2021, "Noise or signal: the role of image backgrounds in object
recognition"): each image's suspect region is replaced with a donor image's, and the probability
the model gives the donor's class is compared with the probability it gives the image's own.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

import torch
from torch import Tensor, nn

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
from caap_lightning.metrics.functional import MASS_REGIONS, scorable_regions
from caap_lightning.model_tests.pooled_region_ratio import PooledRegionRatio
from caap_lightning.model_tests.views import dilate, edge_width, fill_from_surroundings
from caap_lightning.utils import eval_mode, output_logits


class RegionSwap(NamedTuple):
    """Per image: the probability of the donor's class and of the image's own class on the swapped image."""

    suspect: Tensor  # (B,) float64: the donor's target, whose suspect region the swapped image shows
    rest: Tensor  # (B,) float64: the image's own target, whose rest the swapped image shows
    target: Tensor  # (B,) the images' classes
    donor_target: Tensor  # (B,) the donors' classes
    scored: Tensor  # (B,) bool: both masks mark part of their image and the two classes differ


# A donor mask is a backdrop (a background cue, whose mask is all but the object) when it covers more than this share
# of the frame, is not the image's own pixels and would stay mostly in view behind the image's rest: laid on top, it
# would cover the image's object and cut it to the donor object's outline.
BACKDROP_SHARE = 1 / 4


def swapped_images(images: Tensor, masks: Tensor, donor_images: Tensor, donor_masks: Tensor, region: str) -> Tensor:
    """Each image with its suspect part taken from its donor, and no trace of any other part of the donor.

    ``"outside"`` (the background of an object mask is the suspect): the image's object laid on the donor,
    whose own object and its edge (:func:`~caap_lightning.model_tests.views.edge_width` pixels) are filled from the
    donor's background (:func:`~caap_lightning.model_tests.views.fill_from_surroundings`), so that no silhouette of
    the donor's object is left. ``region="mask"`` (the mask is the suspect: a cue, the border ring): the donor's
    mask laid on the image (:func:`cue_on_top`), or, where it is a backdrop (:func:`is_backdrop`), behind the
    image's rest: the ``"outside"`` swap of the masks' complements, so that a background cue is the donor's
    background behind the image's own object, as with object masks.
    """
    check_choice("region", region, MASS_REGIONS)
    if region == "outside":
        return on_donor_background(images, masks, donor_images, donor_masks)
    backdrop = is_backdrop(masks, donor_masks)
    if not bool(backdrop.any()):
        return cue_on_top(images, masks, donor_images, donor_masks)
    behind = on_donor_background(images, ~masks, donor_images, ~donor_masks)
    if bool(backdrop.all()):
        return behind
    return torch.where(backdrop[:, None, None, None], behind, cue_on_top(images, masks, donor_images, donor_masks))


def is_backdrop(masks: Tensor, donor_masks: Tensor) -> Tensor:
    """``(B,)`` bool: whether each donor's mask goes behind the image's rest in the swap rather than on top of it.

    It does where it covers more than :data:`BACKDROP_SHARE` of the frame, differs from the image's own mask, and
    no more than half of it would be hidden behind the image's rest. A marker or a watermark is small; the border
    ring is the same pixels in every image, so it simply replaces the image's own; a large cue elsewhere than the
    image's own would be mostly hidden, so it goes on top.
    """
    area = donor_masks.sum((1, 2))
    hidden = (donor_masks & ~masks).sum((1, 2))
    large = area > BACKDROP_SHARE * donor_masks.shape[-2] * donor_masks.shape[-1]
    differs = (donor_masks != masks).flatten(1).any(1)
    return large & differs & (2 * hidden <= area)


def on_donor_background(images: Tensor, keep: Tensor, donor_images: Tensor, donor_keep: Tensor) -> Tensor:
    """The images' ``keep`` pixels laid on their donors, whose own ``donor_keep`` pixels and an edge around them are
    first filled from the rest of the donor."""
    hole = dilate(donor_keep, edge_width(tuple(images.shape[-2:])))
    return torch.where(keep[:, None], images, fill_from_surroundings(donor_images, hole))


def cue_on_top(images: Tensor, masks: Tensor, donor_images: Tensor, donor_masks: Tensor) -> Tensor:
    """The donors' mask pixels laid on the images, whose own masks and an edge around them are first filled from
    the rest of the image: nothing of the donor but its mask."""
    own = fill_from_surroundings(images, dilate(masks, edge_width(tuple(images.shape[-2:]))))
    return torch.where(donor_masks[:, None], donor_images, own)


def region_swap(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    donor_images: Tensor,
    donor_masks: Tensor,
    region: str = "mask",
    target: TargetLike = None,
    donor_target: TargetLike = None,
    batch_size: int = 64,
    swapped: Optional[Tensor] = None,
) -> RegionSwap:
    """The probabilities, on each image with its suspect part swapped for its donor's, of the two classes.

    ``donor_images``/``donor_masks`` hold each image's donor at the same index (see
    :class:`~caap_lightning.model_tests.SwapPairs`); :func:`swapped_images` builds the swapped images. ``target`` and
    ``donor_target`` as :func:`~caap_lightning.metrics.functional.insertion_deletion` takes a
    target (``None``: the top-1 class of the clean image, or of the clean donor, each costing
    ``B`` forward passes more). A pair is scored where both masks mark part of their image and the
    two classes differ: a donor of the same class tells nothing. ``swapped``: the swapped images, where made
    already (they depend on the images alone, so the callback makes them once per probe).
    """
    check_choice("region", region, MASS_REGIONS)
    check_images(model, images)
    check_images(model, donor_images)
    masks, donor_masks = check_masks(masks), check_masks(donor_masks)
    b = images.shape[0]
    for name, value, reference in (("masks", masks, images), ("donor_images", donor_images, images),
                                   ("donor_masks", donor_masks, donor_images)):
        wanted = (b, *reference.shape[1:]) if name == "donor_images" else (b, *reference.shape[-2:])
        if tuple(value.shape) != wanted:
            raise ValueError(
                f"{name} {tuple(value.shape)} do not match the images {tuple(reference.shape)}: need {wanted}"
            )
    check_int("batch_size", batch_size, 1, "images per forward pass")
    targets, donor_targets = check_target(target, b), check_target(donor_target, b)
    scored = scorable_regions(masks) & scorable_regions(donor_masks)
    device, dtype = model_device_dtype(model)
    images = images.to(device=device or images.device, dtype=dtype or images.dtype)
    donor_images = donor_images.to(images)
    masks, donor_masks = masks.to(images.device), donor_masks.to(images.device)
    if swapped is not None and tuple(swapped.shape) != tuple(images.shape):
        raise ValueError(f"swapped {tuple(swapped.shape)} do not match the images {tuple(images.shape)}")
    views = [swapped_images(images, masks, donor_images, donor_masks, region) if swapped is None else swapped.to(images)]
    # The clean images are classified only where no target is given.
    views += ([images] if targets is None else []) + ([donor_images] if donor_targets is None else [])
    with eval_mode(model), torch.no_grad():
        chunks = torch.cat(views).split(batch_size)
        probs = torch.cat([output_logits(model(chunk)).float().softmax(1) for chunk in chunks]).double()
    clean = iter(probs[lo : lo + b].argmax(1) for lo in range(b, len(probs), b))
    targets = next(clean) if targets is None else targets.to(images.device)
    donor_targets = next(clean) if donor_targets is None else donor_targets.to(images.device)
    for given in (targets, donor_targets):
        check_target_range(given, probs.shape[1])
    swapped = probs[:b]
    return RegionSwap(
        suspect=swapped.gather(1, donor_targets[:, None])[:, 0],
        rest=swapped.gather(1, targets[:, None])[:, 0],
        target=targets,
        donor_target=donor_targets,
        scored=scored.to(images.device) & (targets != donor_targets),
    )


class SwapRatio(PooledRegionRatio):
    """On images whose suspect region comes from an image of another class: the donor's class over the own, pooled.

    ``region="outside"`` with object masks puts each object on another image's background;
    ``region="mask"`` with cue masks (or :func:`~caap_lightning.model_tests.border_masks`) gives each
    image another image's cue (or border). The ratio is ``(mean p(donor's class) + floor) /
    (mean p(own class) + floor)`` over the scored pairs: 1 when the model follows the swapped
    region and the rest equally (a model at chance too), below 1 when it follows the rest (the
    object), above 1 when it follows the region: the share of conflicting images a shortcut
    decides, which the insertion ratio, asking each part alone, does not see while the model still
    knows the object too. Each update costs ``B`` forward passes, ``B`` more for each of
    ``target`` and ``donor_target`` not given. ``compute()`` returns the ratio;
    ``compute_details()`` also ``suspect_probability`` and ``rest_probability`` (the means),
    ``count`` and ``skipped``, ``follows`` and ``follow_share``: how many scored pairs, and what
    share of them, the model gives a higher probability to the donor's class than to the own (the
    pairs that follow the swapped region: a grade where the ratio is a bell), and with
    ``image_ratios`` each scored pair's own ratio as ``image_ratios`` (NaN where skipped).
    """

    main_key = "swap_ratio"
    suspect_key = "suspect_probability"
    rest_key = "rest_probability"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_state("follows", torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self,
        images: Tensor,
        masks: Tensor,
        donor_images: Tensor,
        donor_masks: Tensor,
        target: TargetLike = None,
        donor_target: Optional[TargetLike] = None,
        swapped: Optional[Tensor] = None,
    ) -> None:
        found = region_swap(self.model, images, masks, donor_images, donor_masks, self.region, target, donor_target,
                            self.batch_size, swapped)
        self._add(found.suspect, found.rest, found.scored)
        self.follows += int((found.scored & follows_region(found.suspect, found.rest)).sum())

    def _details(self) -> Dict[str, Tensor]:
        return {**super()._details(), "follows": self.follows, "follow_share": self.follows / self.count}


def follows_region(suspect: Tensor, rest: Tensor) -> Tensor:
    """Per pair: the model gives the donor's class (the swapped region's) a higher probability than the own."""
    return suspect > rest
