"""Argument checks of the metrics, functional and class: fail before any work.

The checks every module shares (targets, images, choices) live in ``caap_lightning.checks``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from caap_lightning.checks import (  # the checks every module shares, also read from here by the metrics
    TargetLike,
    check_choice,
    check_images,
    check_int,
    check_target,
    check_target_range,
    model_device_dtype,
)

__all__ = [
    "TargetLike", "check_choice", "check_grid", "check_images", "check_int", "check_masks", "check_maps",
    "check_protocol", "check_target", "check_target_range", "check_tolerance", "model_device_dtype",
]

# How many distinct mask values an error message lists before it elides the rest.
_SHOWN_VALUES = 6


def check_protocol(step: int, blur_kernel: int, blur_sigma: float, batch_size: int) -> None:
    """Raise on insertion/deletion settings the protocol cannot run with."""
    check_int("step", step, 1, "pixels per step")
    check_int("blur_kernel", blur_kernel, 1, "an odd size")
    if blur_kernel % 2 == 0:
        raise ValueError(f"blur_kernel must be a positive odd size, got {blur_kernel}")
    if blur_sigma <= 0:
        raise ValueError(f"blur_sigma must be > 0, got {blur_sigma}")
    check_int("batch_size", batch_size, 1, "images per forward pass")


def check_tolerance(tolerance: int) -> None:
    """Raise unless the pointing-game tolerance is a whole number of pixels >= 0."""
    check_int("tolerance", tolerance, 0, "pixels")


def _bad_images(values: Tensor) -> list:
    """Indices (along dim 0) of the images holding NaN or inf."""
    return (~torch.isfinite(values.flatten(1)).all(1)).nonzero()[:, 0].tolist()


def check_maps(maps: Tensor, batch: int, of: str) -> None:
    """Raise unless ``maps`` are a finite ``(batch, h, w)`` tensor, naming every bad image."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a (B, h, w) tensor, got {type(maps).__name__}")
    if maps.dim() != 3 or maps.shape[0] != batch:
        raise ValueError(f"maps must be (B, h, w) for the {batch} {of}, got shape {tuple(maps.shape)}")
    bad = _bad_images(maps)
    if bad:
        raise ValueError(
            f"maps contain NaN or inf in image(s) {bad} of the batch; a metric of them would be "
            "NaN: fix or drop those maps"
        )


def check_grid(maps: Tensor, size: Tuple[int, int], of: str) -> None:
    """Raise unless ``(B, h, w)`` maps can be upsampled to ``size``: the same aspect ratio."""
    h, w = maps.shape[-2:]
    height, width = size
    if h * width != w * height:
        raise ValueError(
            f"maps of shape {tuple(maps.shape)} do not fit the {of} of size {height}x{width}: a "
            f"{h}x{w} grid has another aspect ratio, and upsampling would stretch it; compute the "
            f"maps for the {of}' size"
        )


def check_masks(masks: Tensor, batch: Optional[int] = None) -> Tensor:
    """Binary masks ``(B, H, W)`` or ``(B, 1, H, W)`` as a boolean ``(B, H, W)``; else raise.

    Only ``bool`` masks or masks whose values are exactly 0 and 1 (any dtype) are taken:
    a soft mask or a raw trimap would otherwise count every non-zero pixel as foreground.
    """
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a (B, H, W) tensor, got {type(masks).__name__}")
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"masks must be (B, H, W) or (B, 1, H, W), got shape {tuple(masks.shape)}")
    if batch is not None and masks.shape[0] != batch:
        raise ValueError(f"masks must be one per map: {masks.shape[0]} masks for {batch} maps")
    if masks.dtype == torch.bool:
        return masks
    values = torch.unique(masks)
    if not ((values == 0) | (values == 1)).all():
        shown = ", ".join(f"{v:g}" for v in values[:_SHOWN_VALUES].tolist())
        more = ", ..." if values.numel() > _SHOWN_VALUES else ""
        raise ValueError(
            f"masks must be binary (bool, or values exactly 0 and 1), got values {{{shown}{more}}}; "
            "binarise it, e.g. masks == 1 for Pets trimaps' foreground, or masks > 0.5 for a soft mask"
        )
    return masks == 1
