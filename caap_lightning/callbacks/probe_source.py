"""How many images CAAPCallback's probe takes, and the checks of what it took (where it comes from: ``probe.py``)."""

from __future__ import annotations

from typing import Optional, Sequence

from lightning.pytorch.utilities import rank_zero_warn

from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.model_tests import MODEL_TESTS


def runs_swaps(metrics: Optional[Sequence[str]]) -> bool:
    """Whether ``metrics`` (``None``: the defaults) hold a swap ratio."""
    return metrics is None or any(m in MODEL_TESTS and MODEL_TESTS[m].kind == "swap" for m in metrics)


def probe_size(metrics: Optional[Sequence[str]], num_images: int, swap_images: int) -> int:
    """Images to take from the probe's source: the maps' and, where more, the swap ratios'."""
    return max(num_images, swap_images) if runs_swaps(metrics) else num_images


def check_labels_for(target: str, probe: ProbeBatch) -> ProbeBatch:
    """``probe``, or a ``ValueError`` where ``target="label"`` meets images without labels."""
    if target == "label" and bool((probe.labels < 0).any()):
        raise ValueError(
            "CAAPCallback(target='label') explains each image's label, but the probe has images without "
            "labels; give the probe labels, or use target='predicted'"
        )
    return probe


def warn_if_few_swap_images(images: int, swap_images: int) -> None:
    """The swap probe asked for is larger than the source: on few images the swap ratios are noisy."""
    if images < swap_images:
        rank_zero_warn(
            f"CAAPCallback: the swap ratios run on the {images} probe images there are, fewer than "
            f"swap_images={swap_images}; on few images they are noisy, and SpuriousCueMonitor's default "
            "threshold was chosen on larger swap probes (docs/callbacks.md). Give a larger probe where you can."
        )
