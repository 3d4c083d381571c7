"""Insertion ratio: does a region alone restore the model's class better than the rest of the image alone?

The map-based ratios (:class:`~caap_lightning.metrics.DensityRatio`) ask where a map puts its
evidence; patch maps cannot see a cue spread over many patches (a background colour, a frame),
because no single patch carries it. This test asks the model directly, as activation patching
does with whole regions: the *suspect* part of each image is shown alone, then the image with
the suspect removed, and the class probability each restores is compared.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

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
from caap_lightning.model_tests.pooled_region_ratio import RATIO_FLOOR, PooledRegionRatio
from caap_lightning.model_tests.views import rest_colour, suspect_views
from caap_lightning.utils import eval_mode, output_logits


class RegionInsertion(NamedTuple):
    """Per image: the target probability the suspect alone and the rest alone add over the blank's."""

    suspect: Tensor  # (B,) float64, >= 0
    rest: Tensor  # (B,) float64, >= 0
    target: Tensor  # (B,) the classes scored
    scored: Tensor  # (B,) bool: the image has both a suspect part and a rest
    colour: Tensor  # (C,) the colour that stood in for the removed rest, and filled the blank image


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
    (``"outside"``: the background of an object mask); see
    :func:`~caap_lightning.model_tests.suspect_views` for how each part is removed. Each gain is
    the positive part of the view's target probability minus the blank's, the blank being the
    image of one ``colour`` (``(C,)``, normalised; ``None``: the batch's
    :func:`~caap_lightning.model_tests.rest_colour`), so a part that explains nothing adds 0.
    ``target`` as :func:`~caap_lightning.metrics.functional.insertion_deletion` takes it
    (``None``: the clean image's top-1). An image whose mask is empty or whole has nothing to compare (``scored``
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
        chunks = torch.cat(views).split(batch_size)
        probs = torch.cat([output_logits(model(chunk)).float().softmax(1) for chunk in chunks]).double()
    if targets is None:
        targets = probs[2 * b + 1 :].argmax(1)
    else:
        targets = targets.to(images.device)
        check_target_range(targets, probs.shape[1])
    base = probs[2 * b][targets]
    gains = [(probs[lo : lo + b].gather(1, targets[:, None])[:, 0] - base).clamp_min(0) for lo in (0, b)]
    return RegionInsertion(suspect=gains[0], rest=gains[1], target=targets, scored=scored, colour=colour)


class InsertionRatio(PooledRegionRatio):
    """The class probability a suspect region alone restores over what the rest alone restores, pooled.

    ``region="outside"`` with object masks asks whether the background alone explains the
    prediction better than the object alone; ``region="mask"`` with cue masks (or
    :func:`~caap_lightning.model_tests.border_masks`) the same of the cue (or the image's border).
    Gains are pooled over the scored images before the ratio
    (:func:`~caap_lightning.model_tests.floored_ratio` of the mean gains), so images that
    neither part explains weigh little. No ceiling is set by the region's area: a model that
    reads only the suspect scores about ``(1 + floor) / floor`` whatever its size. ``colour`` as
    :func:`region_insertion` takes it: give the colour of a whole set (e.g.
    :func:`~caap_lightning.model_tests.rest_colour` of a probe batch) so that every batch of it,
    and every process under DDP, is shown against the same stand-in; ``None`` takes each batch's
    own. Each update costs ``2B + 1`` forward passes (``3B + 1`` without a ``target``, which
    classifies the images first). ``compute()`` returns
    the ratio; ``compute_details()`` also ``suspect_gain`` and ``rest_gain`` (the means),
    ``count`` and ``skipped``, and with ``image_ratios`` each scored image's own ratio as
    ``image_ratios`` (NaN where skipped; under DDP gathered rank by rank).
    """

    main_key = "insertion_ratio"
    suspect_key = "suspect_gain"
    rest_key = "rest_gain"

    def __init__(
        self,
        model: nn.Module,
        region: str = "mask",
        colour: Optional[Tensor] = None,
        floor: float = RATIO_FLOOR,
        batch_size: int = 64,
        image_ratios: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, region, floor, batch_size, image_ratios, **kwargs)
        self.colour = colour

    def update(self, images: Tensor, masks: Tensor, target: TargetLike = None) -> None:
        found = region_insertion(self.model, images, masks, self.region, target, self.colour, self.batch_size)
        self._add(found.suspect, found.rest, found.scored)
