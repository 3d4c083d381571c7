"""The maths of the attribution metrics, one function per metric, per image.

Each function returns per-image values; an image the metric cannot score (an empty
region) gets NaN, and the ``Metric`` classes count it as skipped. Maps may be patch-level
``(B, gh, gw)`` or pixel-level ``(B, H, W)``, finite; patch maps are upsampled bilinearly
to the mask or image size with :func:`~caap_lightning.utils.upsample_maps`, only when
their aspect ratio is the same (``gh * W == gw * H``). Masks are binary: ``bool``, or
values exactly 0 and 1, ``(B, H, W)`` or ``(B, 1, H, W)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caap_lightning.metrics._checks import (
    TargetLike,
    check_choice,
    check_grid,
    check_images,
    check_maps,
    check_masks,
    check_protocol,
    check_target,
    check_target_range,
    check_tolerance,
    model_device_dtype,
)
from caap_lightning.utils import eval_mode, gaussian_blur, upsample_maps

# Pixels within this share of the map's scale of its maximum count as tied maxima:
# bilinear interpolation of equal patch values is equal only up to float rounding.
_TIE_TOLERANCE = 1e-6
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
        clean = torch.cat([model(chunk).float() for chunk in images.split(batch_size)])
        if targets is None:
            targets = clean.argmax(1)
        else:
            targets = targets.to(device)
            check_target_range(targets, clean.shape[1])
        clean_scores = clean.softmax(1).gather(1, targets[:, None])[:, 0]
        scores = torch.empty(source.numel(), device=device)
        predicted = torch.empty(source.numel(), dtype=torch.long, device=device)
        for lo in range(0, source.numel(), batch_size):
            s, k = source[lo : lo + batch_size], replaced[lo : lo + batch_size]
            mask = (rank[s % b] < k[:, None]).view(-1, 1, h, w)
            logits = model(torch.where(mask, finish[s], start[s])).float()
            scores[lo : lo + batch_size] = logits.softmax(1).gather(1, targets[s % b, None])[:, 0]
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
