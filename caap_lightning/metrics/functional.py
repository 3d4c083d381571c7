"""The maths of the attribution metrics, one function per metric, per image.

Each function returns per-image values; an image the metric cannot score (an empty
region) gets NaN, and the ``Metric`` classes count it as skipped. The density ratios
(:func:`density_ratio`, :func:`fixed_position_ratio`) pool the batch into one value; their
per-image parts are :func:`region_evidence` and :func:`fixed_position_evidence`. Maps may be patch-level
``(B, gh, gw)`` or pixel-level ``(B, H, W)``, finite; patch maps are upsampled bilinearly
to the mask or image size with :func:`~caap_lightning.utils.upsample_maps`, only when
their aspect ratio is the same (``gh * W == gw * H``). Masks are binary: ``bool``, or
values exactly 0 and 1, ``(B, H, W)`` or ``(B, 1, H, W)``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caap_lightning.metrics._checks import (
    TargetLike,
    check_choice,
    check_grid,
    check_images,
    check_int,
    check_maps,
    check_masks,
    check_protocol,
    check_target,
    check_target_range,
    check_tolerance,
    model_device_dtype,
)
from caap_lightning.utils import eval_mode, gaussian_blur, output_logits, upsample_maps

# Pixels within this share of the map's scale of its maximum count as tied maxima:
# bilinear interpolation of equal patch values is equal only up to float rounding.
_TIE_TOLERANCE = 1e-6
# A row of outputs within this of summing to 1 (entries in [0, 1]) is a probability distribution.
_DISTRIBUTION_TOLERANCE = 1e-3
OUTPUTS = ("auto", "logits", "probabilities")
Outputs = Literal["auto", "logits", "probabilities"]
AUPR_REGIONS = ("foreground", "background")
MASS_REGIONS = ("mask", "outside")


class InsertionDeletionResult(NamedTuple):
    """Per-image insertion and deletion results; curves hold the ``n + 1`` scores."""

    insertion: Tensor
    deletion: Tensor
    insertion_curve: Tensor
    deletion_curve: Tensor
    target: Tensor
    substrate_is_target: Tensor


class AUPRResult(NamedTuple):
    """Per-image average precision and its lift over chance (AP / positive share)."""

    aupr: Tensor
    lift: Tensor


def default_step(model: nn.Module) -> int:
    """One patch of pixels, ``patch_size ** 2``, read from a timm ViT's ``patch_embed``."""
    patch_size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch_size is None:
        raise ValueError(
            f"cannot infer the step of {type(model).__name__}: it has no timm "
            "`patch_embed.patch_size`; pass `step` (pixels per step) explicitly"
        )
    if isinstance(patch_size, int):
        return patch_size * patch_size
    return int(math.prod(patch_size))


def auc(curve: Tensor) -> Tensor:
    """RISE's normalised area under ``n + 1`` equally spaced scores (trapezoid rule)."""
    curve = curve.double()
    n = curve.shape[-1] - 1
    return (curve.sum(-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / n


def insertion_deletion(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: TargetLike = None,
    step: Optional[int] = None,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    outputs: Outputs = "auto",
) -> InsertionDeletionResult:
    """Insertion and deletion AUCs of the RISE protocol (Petsiuk et al., 2018).

    Pixels are ranked by the map (upsampled to the image size; ties go to the lower
    flat pixel index). Deletion replaces the next ``step`` pixels, all channels, of the
    image with the normalised zero; insertion replaces those of the RISE-blurred image
    with the image's. ``n = ceil(H * W / step)`` steps give ``n + 1`` softmax
    probabilities of the target class (``target``, or the clean image's top-1 when
    None); the AUC is ``(sum - first / 2 - last / 2) / n``.

    Args:
        model: classifier returning logits for ``images``, which are in its input
            (normalised) space; evaluated in eval mode without grad.
        images: ``(B, C, H, W)`` float images, moved to the model's device and cast to
            its parameter dtype (as CAAP does); a timm ViT's ``patch_embed`` decides the
            channels and size it takes.
        maps: ``(B, gh, gw)`` patch maps of the images' aspect ratio or ``(B, H, W)``
            pixel maps; finite.
        target: class per image as CAAP takes it (an int for every image, a list/tuple
            or an integer tensor of ``B``), or None for the clean top-1 prediction.
        step: pixels per step; default one patch (``patch_size ** 2``) of a timm ViT.
        blur_kernel, blur_sigma: RISE's blur for the insertion substrate.
        batch_size: perturbed images per forward pass.
        outputs: what the model returns: ``"logits"`` (softmaxed), ``"probabilities"`` (a model ending
            in a softmax: read as they are, not softmaxed again), or ``"auto"``: probabilities when every
            row of the clean images' outputs is a distribution (entries in [0, 1] summing to 1).

    Returns:
        Per-image AUCs, curves ``(B, n + 1)``, the targets used, and whether the
        deletion substrate (the all-zero image) is itself classified as the target, on
        the model's device.
    """
    check_images(model, images)
    b, _, h, w = images.shape
    check_maps(maps, b, "images")
    check_grid(maps, (h, w), "images")
    targets = check_target(target, b)
    step = default_step(model) if step is None else step
    check_protocol(step, blur_kernel, blur_sigma, batch_size)
    check_choice("outputs", outputs, OUTPUTS)
    n = math.ceil(h * w / step)
    device, dtype = model_device_dtype(model)
    images = images.to(device=device or images.device, dtype=dtype or images.dtype)
    device = images.device

    pixel_maps = upsample_maps(maps.to(device), (h, w)).reshape(b, h * w)
    order = torch.argsort(pixel_maps, dim=1, descending=True, stable=True)
    positions = torch.arange(h * w, device=device).expand(b, -1)
    rank = torch.empty_like(order).scatter_(1, order, positions)

    # Sources 0..B-1 are the deletion games, B..2B-1 the insertion games; each image of
    # a game is ``where(rank < replaced, finish, start)``.
    start = torch.cat([images, gaussian_blur(images, blur_kernel, blur_sigma)])
    finish = torch.cat([torch.zeros_like(images), images])
    steps = torch.arange(n + 1, device=device)
    # Deletion step 0 and insertion step n are the clean image, scored once below.
    source = torch.cat([torch.arange(b, device=device), torch.arange(b, 2 * b, device=device)])
    source = source.repeat_interleave(n)
    replaced = torch.cat([steps[1:].repeat(b), steps[:-1].repeat(b)]) * step

    with eval_mode(model), torch.no_grad():
        clean = torch.cat([output_logits(model(chunk)).float() for chunk in images.split(batch_size)])
        if targets is None:
            targets = clean.argmax(1)
        else:
            targets = targets.to(device)
            check_target_range(targets, clean.shape[1])
        probabilities = reads_probabilities(clean, outputs)
        clean_scores = _probabilities(clean, probabilities).gather(1, targets[:, None])[:, 0]
        scores = torch.empty(source.numel(), device=device)
        predicted = torch.empty(source.numel(), dtype=torch.long, device=device)
        for lo in range(0, source.numel(), batch_size):
            s, k = source[lo : lo + batch_size], replaced[lo : lo + batch_size]
            mask = (rank[s % b] < k[:, None]).view(-1, 1, h, w)
            logits = output_logits(model(torch.where(mask, finish[s], start[s]))).float()
            scores[lo : lo + batch_size] = _probabilities(logits, probabilities).gather(1, targets[s % b, None])[:, 0]
            predicted[lo : lo + batch_size] = logits.argmax(1)

    deletion_curve = torch.cat([clean_scores[:, None], scores[: b * n].view(b, n)], 1)
    insertion_curve = torch.cat([scores[b * n :].view(b, n), clean_scores[:, None]], 1)
    # The last deletion step is the all-zero substrate.
    substrate_is_target = predicted[: b * n].view(b, n)[:, -1] == targets
    return InsertionDeletionResult(
        insertion=auc(insertion_curve),
        deletion=auc(deletion_curve),
        insertion_curve=insertion_curve,
        deletion_curve=deletion_curve,
        target=targets,
        substrate_is_target=substrate_is_target,
    )


def is_distribution(outputs: Tensor) -> bool:
    """Whether every row of ``outputs`` ``(B, C)`` is a probability distribution: entries in [0, 1] summing to 1."""
    outputs = outputs.detach().double()
    in_range = bool(((outputs >= 0) & (outputs <= 1)).all())
    return in_range and bool(((outputs.sum(-1) - 1).abs() <= _DISTRIBUTION_TOLERANCE).all())


def reads_probabilities(outputs: Tensor, kind: Outputs) -> bool:
    """Whether a model's ``outputs`` are read as probabilities (else softmaxed): ``kind`` says, or ``"auto"``
    detects a model ending in a softmax; ``"probabilities"`` that are no distributions are refused."""
    if kind == "logits":
        return False
    found = is_distribution(outputs)
    if kind == "probabilities" and not found:
        raise ValueError(
            "outputs='probabilities', but the model's outputs are not distributions (entries in [0, 1] summing "
            "to 1 per image); pass outputs='logits' for a model that returns logits"
        )
    return found


def _probabilities(outputs: Tensor, probabilities: bool) -> Tensor:
    return outputs if probabilities else outputs.softmax(1)


def _pixel_maps(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Validated float64 pixel maps ``(B, H, W)`` and boolean masks ``(B, H, W)``."""
    masks = check_masks(masks)
    check_maps(maps, masks.shape[0], "masks")
    check_grid(maps, masks.shape[-2:], "masks")
    return upsample_maps(maps.to(masks.device), masks.shape[-2:]).double(), masks


def _average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Per-row average precision, with tied scores as one threshold (as sklearn does)."""
    n = scores.shape[1]
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    sorted_scores = scores.gather(1, order)
    hits = labels.gather(1, order).double()
    positions = torch.arange(n, device=scores.device).expand_as(sorted_scores)
    precision = hits.cumsum(1) / (positions + 1)
    # Each pixel takes the precision at the last pixel of its tie group.
    group_end = torch.ones_like(hits, dtype=torch.bool)
    group_end[:, :-1] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    end_index = torch.where(group_end, positions, n).flip(1).cummin(1).values.flip(1)
    return (hits * precision.gather(1, end_index)).sum(1) / hits.sum(1)


def aupr(maps: Tensor, masks: Tensor, region: str = "foreground") -> AUPRResult:
    """Average precision of the min-max normalised map as a pixel score for the mask.

    ``region="foreground"`` scores the map against the mask (AUPR1); ``"background"``
    scores ``1 - map`` against the inverted mask (AUPR0). The lift divides AP by the
    region's share of the image, the AP of a random map. NaN where the region is empty.
    """
    check_choice("region", region, AUPR_REGIONS)
    pixel_maps, masks = _pixel_maps(maps, masks)
    scores = pixel_maps.flatten(1)
    low, high = scores.aminmax(dim=1, keepdim=True)
    # A constant map normalises to zeros: every pixel ties.
    scores = (scores - low) / torch.where(high > low, high - low, 1.0)
    labels = masks.flatten(1)
    if region == "background":
        scores, labels = 1 - scores, ~labels
    share = labels.double().mean(1)
    ap = torch.where(share > 0, _average_precision(scores, labels), math.nan)
    return AUPRResult(aupr=ap, lift=ap / share)


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """1 if the map's arg-max pixel lies in the mask (or within ``tolerance`` pixels of it).

    With tied maxima the score is the share of tied pixels that hit: the expected hit
    under random tie-breaking. NaN where the mask is empty.
    """
    check_tolerance(tolerance)
    pixel_maps, masks = _pixel_maps(maps, masks)
    hit_region = masks
    if tolerance > 0:
        offsets = torch.arange(-tolerance, tolerance + 1, device=masks.device)
        disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= tolerance**2).float()
        near = F.conv2d(masks[:, None].float(), disk[None, None], padding=tolerance)
        hit_region = near[:, 0] > 0
    flat = pixel_maps.flatten(1)
    low, high = flat.aminmax(dim=1, keepdim=True)
    tied = flat >= high - _TIE_TOLERANCE * (high - low + high.abs())
    score = (tied & hit_region.flatten(1)).sum(1) / tied.sum(1)
    return torch.where(masks.flatten(1).any(1), score.double(), math.nan)


def attribution_mass(
    maps: Tensor, masks: Tensor, region: str = "mask", normalize_by_area: bool = False
) -> Tensor:
    """Share of the map's positive part inside the mask (``"mask"``) or outside it.

    ``maps`` are relative maps (``A - A_blank``). ``normalize_by_area`` divides the
    share by the region's share of the image, so a uniform map scores 1. A map with no
    positive part (every value <= 0, e.g. a relative map below the blank everywhere)
    holds no evidence anywhere, so none in the region: its mass is 0 (the normalised
    form too). NaN only where the region is empty.
    """
    check_choice("region", region, MASS_REGIONS)
    pixel_maps, masks = _pixel_maps(maps, masks)
    positive = pixel_maps.clamp_min(0).flatten(1)
    inside = masks.flatten(1)
    if region == "outside":
        inside = ~inside
    total = positive.sum(1)
    area = inside.double().mean(1)
    # No positive evidence: 0 / 1 rather than 0 / 0.
    mass = (positive * inside).sum(1) / torch.where(total > 0, total, 1.0)
    if normalize_by_area:
        mass = mass / area
    return torch.where(area > 0, mass, math.nan)


# Each map's evidence is mixed with a uniform map of this weight (relative to its own total), so that a
# region holding all the evidence gives a large finite ratio (at most 1 + 1 / (floor * area share)), not inf.
DENSITY_FLOOR = 0.01
# The fixed-position score's hot region: this share of the pixels, the top of the other images' mean map.
HOT_REGION_SHARE = 0.1


class RegionEvidence(NamedTuple):
    """Per image: the region's share of the evidence and of the pixels; NaN where the image is not scored."""

    share: Tensor
    area: Tensor


class FixedPositionEvidence(NamedTuple):
    """Per image, the evidence share in its hot region (chosen from the other images); the region's area share;
    each image's hot region ``(B, h, w)``; and the hot region of all the maps together ``(h, w)``, for display."""

    share: Tensor
    area: Tensor
    regions: Tensor
    hot_region: Tensor


def evidence(maps: Tensor) -> Tensor:
    """Each map's positive part as a distribution over its pixels, ``(B, h * w)`` float64, rows summing to 1.

    A map with no positive part (every value <= 0) prefers no pixel: it becomes uniform. Every row is
    mixed with a uniform floor of weight :data:`DENSITY_FLOOR`, which changes no ranking.
    """
    positive = maps.double().clamp_min(0).flatten(1)
    pixels = positive.shape[1]
    total = positive.sum(1, keepdim=True)
    share = torch.where(total > 0, positive / torch.where(total > 0, total, 1.0), 1.0 / pixels)
    return (share + DENSITY_FLOOR / pixels) / (1 + DENSITY_FLOOR)


def ratio_of_densities(share: Tensor, area: Tensor) -> Tensor:
    """Evidence density inside a region over the density outside it, from the region's share of the
    evidence and of the pixels: ``(share / area) / ((1 - share) / (1 - area))``; 1 where they are equal."""
    return (share / area) * ((1 - area) / (1 - share))


def scorable_regions(masks: Tensor) -> Tensor:
    """``(B,)`` bool: the images whose ``(B, H, W)`` bool mask marks part of the image, neither none nor all of it.

    Raises when no image has such a mask (blank or inverted masks): a region score compares the
    region with the rest, and then has nothing to compare.
    """
    marked = masks.flatten(1)
    area = marked.double().mean(1)
    scored = (area > 0) & (area < 1)
    if not bool(scored.any()):
        which = "is empty" if not bool(marked.any()) else "covers the whole image" if bool(marked.all()) else (
            "is empty or covers the whole image")
        raise ValueError(
            f"every one of the {len(area)} masks {which}, so no image has an inside and an outside to compare: a "
            "region score needs masks that mark part of an image; check that the masks are not blank or inverted"
        )
    return scored


def region_evidence(maps: Tensor, masks: Tensor, region: str = "mask") -> RegionEvidence:
    """Each image's share of the evidence (see :func:`evidence`) inside the mask (``"mask"``) or outside it.

    An image whose region is empty or covers it whole has nothing to compare: NaN, skipped by the
    callers. A batch in which no image has such a region (blank or inverted masks) is refused.
    """
    check_choice("region", region, MASS_REGIONS)
    pixel_maps, masks = _pixel_maps(maps, masks)
    inside = masks.flatten(1)
    if region == "outside":
        inside = ~inside
    area = inside.double().mean(1)
    scored = scorable_regions(masks)
    share = (evidence(pixel_maps) * inside).sum(1)
    return RegionEvidence(share=torch.where(scored, share, math.nan), area=torch.where(scored, area, math.nan))


def density_ratio(maps: Tensor, masks: Tensor, region: str = "mask") -> Tensor:
    """The batch's evidence density inside the region over its density outside, a 0-dim float64 tensor.

    Pooled over the scored images (see :func:`region_evidence`), each image's evidence weighing the
    same: :func:`ratio_of_densities` of the mean evidence share and the mean area share. A uniform
    map scores 1 whatever the region's size, a map preferring the region more, one avoiding it less.
    """
    shares = region_evidence(maps, masks, region)
    scored = ~torch.isnan(shares.share)
    return ratio_of_densities(shares.share[scored].mean(), shares.area[scored].mean())


def check_region_share(region_share: float) -> None:
    """Raise unless the hot region's share of the image is in (0, 1)."""
    if isinstance(region_share, bool) or not isinstance(region_share, (int, float)) or not 0 < region_share < 1:
        raise ValueError(f"region_share must be a share of the image in (0, 1), got {region_share!r}")


def hot_pixel_count(pixels: int, region_share: float) -> int:
    """Pixels in a hot region of ``region_share`` of ``pixels``: at least one, and never all of them."""
    return min(max(round(region_share * pixels), 1), pixels - 1)


def top_pixels(scores: Tensor, count: int) -> Tensor:
    """``(B, N)`` bool: each row's ``count`` highest scores; ties go to the lower index, as in the RISE ranking."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :count]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def fixed_position_evidence(
    maps: Tensor, region_share: float = HOT_REGION_SHARE, chunk: int = 64
) -> FixedPositionEvidence:
    """Evidence that sits in the same place in every image, from the maps alone.

    Image ``i``'s hot region is the ``region_share`` of the pixels where the *other* images' mean
    evidence (see :func:`evidence`) is highest: leave-one-out, so that an image never selects its
    own peak, and a map that merely has a peak somewhere scores as a uniform one does. Maps are
    compared at their own resolution and must share it; rows are ranked ``chunk`` at a time.
    """
    check_region_share(region_share)
    check_int("chunk", chunk, 1, "maps per step")
    if not isinstance(maps, Tensor) or maps.dim() != 3:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a (B, h, w) tensor, got {shape}")
    check_maps(maps, maps.shape[0], "maps")
    b, h, w = maps.shape
    if b < 2:
        raise ValueError(
            f"the fixed-position score needs at least 2 maps, got {b}: each image's hot region is chosen from the "
            "other images' maps; pass the maps of 2 or more images"
        )
    if h * w < 2:
        raise ValueError(f"maps of {h}x{w} pixels have no region to single out; pass maps of at least 2 pixels")
    count = hot_pixel_count(h * w, region_share)
    mass = evidence(maps)
    # Summed in sorted order: the hot region is a ranking, and pixels whose totals tie but for rounding would
    # otherwise change places with the order of the images (DDP gathers them rank by rank).
    total = mass.sort(0).values.sum(0, keepdim=True)
    regions = torch.cat([top_pixels(total - rows, count) for rows in mass.split(chunk)])
    share = (mass * regions).sum(1)
    area = torch.full_like(share, count / (h * w))
    return FixedPositionEvidence(
        share=share, area=area, regions=regions.view(b, h, w), hot_region=top_pixels(total, count).view(h, w)
    )


def fixed_position_ratio(maps: Tensor, region_share: float = HOT_REGION_SHARE) -> Tensor:
    """Evidence density in each image's hot region over the rest (see :func:`fixed_position_evidence`), pooled
    over the images as :func:`density_ratio` is: a 0-dim float64 tensor, 1 for uniform maps or for peaks
    that move from image to image, high when the evidence keeps to one place."""
    found = fixed_position_evidence(maps, region_share)
    return ratio_of_densities(found.share.mean(), found.area.mean())
