"""Argument checks shared by the attribution methods, the metrics and the callbacks: fail before any work.

One implementation of each: a target is checked, and refused with the same exception and message, by
CAAP, the baselines and the metrics alike.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

TargetLike = Union[None, int, Sequence[int], Tensor]


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


def check_int(name: str, value: object, minimum: int, unit: str = "") -> None:
    """Raise ``TypeError`` unless ``value`` is an int (not a bool), ``ValueError`` below ``minimum``."""
    what = f"an int >= {minimum}" + (f" ({unit})" if unit else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value}")


def check_image_batch(images: torch.Tensor, channels: Optional[int] = None) -> None:
    """What every consumer of an image batch checks first: a float ``(B, C, H, W)`` tensor of at least
    one image, with ``channels`` channels where the model fixes them, and finite pixels."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0); pass at least one image")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be float, normalised with the model's mean/std, got {images.dtype}; "
            "convert them (e.g. images.float() / 255) and normalise them as the model's inputs were"
        )
    if channels is not None and images.shape[1] != channels:
        raise ValueError(
            f"images have {images.shape[1]} channels but the model expects {channels}; "
            "convert grey-scale or RGBA images to RGB first"
        )
    bad = (~torch.isfinite(images.flatten(1)).all(1)).nonzero()[:, 0].tolist()
    if bad:
        raise ValueError(f"images contain NaN or inf pixels (image(s) {bad} of the batch); fix or drop those images")


def check_images(model: nn.Module, images: Tensor) -> None:
    """Raise on images ``model`` cannot take, before any work: not a float ``(B, C, H, W)`` batch of
    finite pixels, or, for a ViT (any library's, or the ``Classifier`` around one) or a CNN that
    ConvCAAP reads, other channels or another size than the model takes. Other models are run as
    they are, so only the batch itself is checked."""
    # Imported here: the modules that know the model families import this one.
    from caap_lightning.attribution import stages, twins, vit

    model = twins.timm_form(model)
    if isinstance(model, vit.Classifier):
        model = model.vit
    patch_embed = getattr(model, "patch_embed", None)
    if getattr(patch_embed, "proj", None) is None or getattr(patch_embed, "patch_size", None) is None:
        channels = stages.in_channels(stages.conv_stages(model)) if stages.is_supported(model) else None
        check_image_batch(images, channels)
        return
    check_image_batch(images)
    _check_vit_images(model, patch_embed, images)


def _check_vit_images(model: nn.Module, patch_embed: nn.Module, images: Tensor) -> None:
    channels = patch_embed.proj.in_channels
    ph, pw = (patch_embed.patch_size,) * 2 if isinstance(patch_embed.patch_size, int) else patch_embed.patch_size
    h, w = images.shape[-2:]
    fixed = getattr(patch_embed, "img_size", None)
    strict = fixed is not None and getattr(patch_embed, "strict_img_size", True) and not getattr(
        model, "dynamic_img_size", False)
    reasons = []
    if images.shape[1] != channels:
        reasons.append(f"images have {images.shape[1]} channels but the model expects {channels}")
    if h % ph or w % pw:
        reasons.append(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
    if strict and (h, w) != tuple(fixed):
        reasons.append(f"image size {h}x{w} differs from the model's img_size {tuple(fixed)}")
    if reasons:
        expected = (channels, *fixed) if strict else (channels, h, w)
        raise ValueError(
            f"images must be (B, {', '.join(map(str, expected))}) for {type(model).__name__}, got "
            f"{tuple(images.shape)}: {'; '.join(reasons)}; resize or crop the images, convert their channels, "
            "or build the model with dynamic_img_size=True to take other sizes"
        )


def check_target(
    target: TargetLike, batch: Optional[int], num_classes: Optional[int] = None, device=None
) -> Optional[Tensor]:
    """``target`` as a long tensor of class indices, one per image (an int: every image's); ``None`` stays ``None``.

    ``TypeError`` for anything but integer class indices, ``ValueError`` for the wrong number of them or
    (where ``num_classes`` is given) one out of range. ``batch=None`` takes any number of targets.
    """
    if target is None:
        return None
    try:
        targets = target.detach() if isinstance(target, Tensor) else torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"target must be integer class indices (an int, a list/tuple or a tensor), got {target!r}"
        ) from err
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(
            f"target must be integer class indices, got {targets.dtype} values; pass class indices "
            "(e.g. labels.long()), not scores, probabilities or one-hot rows"
        )
    if targets.dim() > 1:
        raise ValueError(f"target must be one class per image (an int or a 1-d list), got shape {tuple(targets.shape)}")
    targets = targets.to(device=device, dtype=torch.long).reshape(-1)
    if batch is not None and targets.numel() == 1 and batch > 1:
        targets = targets.expand(batch)
    if batch is not None and targets.numel() != batch:
        raise ValueError(
            f"target has {targets.numel()} entries for a batch of {batch} images; pass one class per image"
        )
    if num_classes is not None:
        check_target_range(targets, num_classes)
    return targets


def check_target_range(targets: Tensor, num_classes: int) -> None:
    """Raise unless every target is a class index in ``[0, num_classes)`` (for a caller that learns
    ``num_classes`` from the model's logits, after :func:`check_target`)."""
    bad = (targets < 0) | (targets >= num_classes)
    if targets.numel() and bad.any():
        raise ValueError(
            f"target {targets[bad].unique().tolist()} is out of range for a model with {num_classes} classes "
            f"(class indices are 0..{num_classes - 1}), at image(s) {bad.nonzero()[:, 0].tolist()}"
        )


def model_device_dtype(model: nn.Module) -> Tuple[Optional[torch.device], Optional[torch.dtype]]:
    """The device and floating dtype of the model's first floating parameter (or buffer); None if it has none."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None


def check_finite_weights(*modules: Optional[nn.Module]) -> None:
    """Raise when a floating parameter or buffer of ``modules`` holds NaN or inf (one sync)."""
    named = [
        (name, t)
        for module in modules
        if module is not None
        for name, t in (*module.named_parameters(), *module.named_buffers())
        if t.is_floating_point()
    ]
    if not named:
        return
    device = named[0][1].device  # a head may live elsewhere: one stack, one sync
    # A finite sum proves every entry finite (NaN and inf propagate) at the cost of one read; only
    # a sum that is not (a NaN, an inf, or a rare overflow of large finite values) is looked into.
    sums = torch.stack([t.detach().sum(dtype=torch.float32).to(device) for _, t in named])
    if bool(torch.isfinite(sums).all()):
        return
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named])
    if not bool(finite.all()):
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(
            f"the model's weights contain NaN or inf ({shown}), so every map would be NaN; the "
            "training has diverged or the checkpoint is broken: attribute finite weights"
        )
