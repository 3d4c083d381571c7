"""Small helpers shared by the engine, the metrics and the callbacks."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def upsample_maps(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample patch maps ``(B, gh, gw)`` to pixel maps ``(B, H, W)``.

    Maps already at ``size`` are returned unchanged, so metrics accept patch-level
    and pixel-level maps alike.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (B, h, w), got shape {tuple(maps.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    # align_corners=False is what torchvision/pytorch-grad-cam use for display maps.
    out = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return out[:, 0].to(maps.dtype if maps.is_floating_point() else torch.float32)


def target_score(logits: torch.Tensor, targets: torch.Tensor, score: str) -> torch.Tensor:
    """Each row's score of its target class: the softmax probability (``"probability"``) or the logit.

    Logits keep their dtype (a bf16 model's maps stay bf16); probabilities are taken in float32.
    """
    if score == "probability":
        logits = logits.float().softmax(-1)
    return logits.gather(-1, targets[:, None])[:, 0]


def model_normalization(
    model: torch.nn.Module,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    channels: int = 3,
) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The (mean, std) a model's inputs of ``channels`` channels were normalised with.

    Explicit arguments win; then timm's ``pretrained_cfg``; then ImageNet's, which is
    what timm uses for a model built without a pretrained config (for a model of other than
    three channels, ImageNet's averaged over RGB, per channel). A ``std`` that cannot
    normalise (a zero, negative or non-finite entry) or a non-finite ``mean`` is refused.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    if channels != 3:  # a grey-scale model: RGB's statistics, averaged
        default_mean, default_std = (sum(IMAGENET_MEAN) / 3,) * channels, (sum(IMAGENET_STD) / 3,) * channels
    mean = tuple(mean) if mean is not None else tuple(cfg.get("mean", default_mean))
    std = tuple(std) if std is not None else tuple(cfg.get("std", default_std))
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need {channels} channels (the model's input channels), got mean={mean}, std={std}"
        )
    if not all(math.isfinite(m) for m in mean):
        raise ValueError(f"mean={mean} is not finite; pass the mean the model's inputs were normalised with")
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(
            f"std={std} must have {'three' if channels == 3 else channels} positive entries (a zero entry divides "
            "by zero when an image "
            "is normalised); pass the std the model's inputs were normalised with"
        )
    return mean, std


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixel-space [0, 1] images ``(B, 3, H, W)`` to the model's input space."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def unnormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The model's input space back to pixel space [0, 1] (clamped), for display."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def gaussian_blur(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's blur: a unit impulse smoothed by a Gaussian with reflecting borders.

    RISE builds its ``kernel_size`` kernel with ``scipy.ndimage.gaussian_filter`` on an
    impulse (mode ``reflect``), which is flatter than a truncated Gaussian; the kernel is
    applied per channel with zero padding ``kernel_size // 2``.
    """
    kernel = rise_blur_kernel(kernel_size, sigma).to(images.device, images.dtype)
    c = images.shape[1]
    weight = kernel.expand(c, 1, kernel_size, kernel_size)
    return F.conv2d(images, weight, padding=kernel_size // 2, groups=c)


def rise_blur_kernel(kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """The 2-D kernel of :func:`gaussian_blur` (``scipy.ndimage.gaussian_filter`` of an impulse)."""
    from scipy.ndimage import gaussian_filter
    import numpy as np

    impulse = np.zeros((kernel_size, kernel_size))
    impulse[kernel_size // 2, kernel_size // 2] = 1.0
    return torch.from_numpy(gaussian_filter(impulse, sigma)).float()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode and restore every module's own ``training`` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def output_logits(output) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` (Hugging Face's output objects),
    a dict's ``"logits"``, or a tuple's or list's first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"cannot read logits from a model output of type {type(output).__name__}: return a tensor, an object "
            "or dict with `logits`, or a tuple whose first element is the logits"
        )
    return logits
