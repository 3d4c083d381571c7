"""The probe images' normalisation: where CAAPCallback's mean/std come from, and a check of the pixels against them."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD, model_normalization

# Un-normalised pixels may overshoot [0, 1] a little (resizing); a wrong mean/std overshoots far more.
PIXEL_MARGIN = 0.25
Channels = Tuple[float, float, float]


def resolve_normalization(
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    datamodule: Any,
    pl_module: Any,
    model: Any,
) -> Tuple[Channels, Channels, Optional[str]]:
    """The images' ``(mean, std)`` and a sentence to say once where no one gave them (else ``None``).

    In order: the callback's own ``mean``/``std``, the datamodule's ``mean``/``std`` attributes,
    the LightningModule's (numbers or tensors, e.g. buffers), the model's timm ``pretrained_cfg``,
    ImageNet's. The sentence names the source for the last two, which are guesses.
    """
    if (mean is None) != (std is None):
        raise ValueError(f"give CAAPCallback both mean and std, or neither; got mean={mean}, std={std}")
    given = (
        ("CAAPCallback's mean/std", mean, std),
        ("the datamodule's mean/std", getattr(datamodule, "mean", None), getattr(datamodule, "std", None)),
        ("the LightningModule's mean/std", getattr(pl_module, "mean", None), getattr(pl_module, "std", None)),
    )
    for source, m, s in given:
        if m is not None and s is not None:
            return _channels(m, s, source) + (None,)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        m, s = _channels(*model_normalization(model), "the model's pretrained_cfg")
        return m, s, (f"normalising with the model's pretrained_cfg mean={m}, std={s} (no mean/std from the callback, "
                      "the datamodule or the module); pass mean=/std= if the images are normalised otherwise")
    m, s = _channels(IMAGENET_MEAN, IMAGENET_STD, "ImageNet")
    return m, s, (f"no mean/std given (callback, datamodule, module or the model's pretrained_cfg): assuming "
                  f"ImageNet's mean={m}, std={s}; pass mean=/std= if the images are normalised otherwise")


def _channels(mean: Any, std: Any, source: str) -> Tuple[Channels, Channels]:
    """Three floats each (from a sequence or a tensor of any shape), std positive."""
    m = tuple(float(v) for v in torch.as_tensor(mean, dtype=torch.float64).flatten().tolist())
    s = tuple(float(v) for v in torch.as_tensor(std, dtype=torch.float64).flatten().tolist())
    if len(m) != 3 or len(s) != 3 or min(s) <= 0:
        raise ValueError(f"{source} must be 3 channels each, std > 0; got mean={m}, std={s}")
    return m, s  # type: ignore[return-value]


def check_pixel_range(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Optional[str]:
    """A warning when the probe's pixel values contradict ``mean``/``std``; ``None`` when they agree.

    It flags images that look like [0, 255] pixels, like un-normalised [0, 1] pixels while
    ``mean``/``std`` normalise, or that un-normalise with ``mean``/``std`` far outside [0, 1].
    """
    x = images.detach().float()
    lo, hi = x.min().item(), x.max().item()
    said = f"the probe images range over [{lo:.3g}, {hi:.3g}] but mean={tuple(mean)}, std={tuple(std)}"
    if lo >= 0 and hi > 1.5 and (x == x.round()).float().mean().item() >= 0.9:
        return (f"{said}: they look like [0, 255] pixels; scale and normalise them "
                "(v2.ToDtype(torch.float32, scale=True), then v2.Normalize(mean, std))")
    identity = all(abs(m) < 1e-6 for m in mean) and all(abs(s - 1) < 1e-6 for s in std)
    if lo >= 0 and hi <= 1 and not identity:
        return (f"{said}: they look like un-normalised [0, 1] pixels; normalise them (v2.Normalize(mean, std)), "
                "or pass mean=[0, 0, 0], std=[1, 1, 1] if the model takes [0, 1] pixels")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    pixels = x * s + m  # not utils.unnormalize: its clamp would hide the overshoot
    outside = ((pixels < -PIXEL_MARGIN) | (pixels > 1 + PIXEL_MARGIN)).float().mean().item()
    if outside > 0.01:
        return (f"{said}: un-normalised with them, {outside:.0%} of the pixel values fall outside [0, 1] (range "
                f"[{pixels.min().item():.3g}, {pixels.max().item():.3g}]); pass the mean/std the images were "
                "normalised with")
    return None
