"""Blank images ``b``: the context every patch is attributed against."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, Sequence, Tuple, Union

import torch

from caap_lightning.utils import gaussian_blur, normalize

# The blanks built from the image size alone; "auto" picks one of them per model (choose_blank).
FIXED_BLANKS = ("white", "black", "mean", "noise", "blur_noise")
BLANK_KINDS = (*FIXED_BLANKS, "auto")

BlankSpec = Union[str, torch.Tensor]


def check_blank(blank: BlankSpec, kinds: Sequence[str] = BLANK_KINDS) -> None:
    if isinstance(blank, torch.Tensor):
        if blank.dim() != 4 or blank.shape[0] != 1:
            raise ValueError(
                f"a custom blank must be a normalised image tensor of shape (1, 3, H, W) ((1, C, H, W) for a "
                f"model of C input channels), got {tuple(blank.shape)}"
            )
        if not torch.isfinite(blank).all():
            raise ValueError("the custom blank image contains NaN or inf")
    elif blank not in kinds:
        raise ValueError(f"blank={blank!r} is not one of {tuple(kinds)} or a (1, 3, H, W) tensor")


@torch.no_grad()
def choose_blank(
    blank: BlankSpec,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    size: Tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    device=None,
    dtype=None,
) -> BlankSpec:
    """``blank`` itself, or for ``"auto"`` the fixed blank the model reads as closest to no class.

    Closest to uniform means the highest entropy of the predicted distribution (the smallest KL
    divergence to the uniform one). A blank the model reads as one class saturates that class's
    maps (every patch can then only lower the score); this picks, per model and image size, the
    one of :data:`FIXED_BLANKS` that does so least. ``logits_of`` maps normalised images
    ``(n, 3, H, W)`` to logits; it runs once on all candidates, so the choice follows the
    current weights at every call.
    """
    if not (isinstance(blank, str) and blank == "auto"):
        return blank
    candidates = torch.cat([make_blank(kind, size, mean, std, seed) for kind in FIXED_BLANKS]).to(device, dtype)
    return FIXED_BLANKS[int(prediction_entropy(logits_of(candidates)).argmax())]


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``(n,)``: the entropy (nats) of each row's predicted distribution, ``log C`` when uniform."""
    log_p = logits.double().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def make_blank(
    blank: BlankSpec,
    size: Tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
) -> torch.Tensor:
    """The blank image ``(1, C, H, W)`` in the model's normalised input space, with one channel
    per entry of ``mean`` (the model's input channels).

    Built in pixel space [0, 1] and normalised, except ``mean`` (the dataset mean is zero
    after normalisation) and a user's tensor, which is taken as already normalised.
    """
    h, w = size
    channels = len(mean)
    if isinstance(blank, str) and blank == "auto":
        raise ValueError('blank="auto" depends on the model: resolve it with choose_blank first')
    if isinstance(blank, torch.Tensor):
        if tuple(blank.shape[-2:]) != (h, w):
            raise ValueError(
                f"the custom blank is {tuple(blank.shape[-2:])} but the images are {(h, w)}; "
                "pass a blank of the images' size"
            )
        if blank.shape[1] != channels:
            raise ValueError(
                f"the custom blank has {blank.shape[1]} channels but the model takes {channels}; pass a blank "
                "with the model's input channels"
            )
        return blank.detach().float().cpu()
    if blank == "mean":
        return torch.zeros(1, channels, h, w)
    if blank in ("white", "black"):
        pixels = torch.full((1, channels, h, w), 1.0 if blank == "white" else 0.0)
    else:
        gen = torch.Generator().manual_seed(seed)
        pixels = (0.5 + 0.25 * torch.randn(1, channels, h, w, generator=gen)).clamp(0, 1)
        if blank == "blur_noise":
            pixels = gaussian_blur(pixels, kernel_size=11, sigma=5.0)
    return normalize(pixels, mean, std)


def warn_saturated_blank(method: str, blank: BlankSpec, logits: torch.Tensor, targets: torch.Tensor, warned: set) -> None:
    """Warn once per class whose blank probability exceeds 0.5: its maps can then only go down.

    ``logits`` are the blank's ``(1, num_classes)``; ``warned`` holds the classes warned of already.
    """
    probs = logits.float().softmax(-1)[0]
    for cls in sorted(set(targets.tolist()) - warned):
        if probs[cls] > 0.5:
            warned.add(cls)
            warnings.warn(
                f"{method}: the {blank!r} blank is itself classified as class {cls} with "
                f"probability {probs[cls]:.3f} > 0.5, so maps for this class are saturated "
                "(patches can only lower the score). Try another blank (e.g. blank='noise') "
                "or score='logit', and read the relative map (relative=True).",
                stacklevel=_caller_stacklevel(),
            )


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel of the first frame outside this package and torch's wrappers
    (``no_grad``), so that a warning points at the user's call."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith((package, torch_dir)):
        level, frame = level + 1, frame.f_back
    return level
