"""Where CAAPCallback's probe batch comes from, and how many images it takes."""

from __future__ import annotations

from typing import Optional, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from caap_lightning.callbacks.probe import ProbeKeys, probe_from_loader, raw_eval_loader, to_probe_batch
from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.model_tests import MODEL_TESTS


def runs_swaps(metrics: Optional[Sequence[str]]) -> bool:
    """Whether ``metrics`` (``None``: the defaults) hold a swap ratio."""
    return metrics is None or any(m in MODEL_TESTS and MODEL_TESTS[m].kind == "swap" for m in metrics)


def probe_size(metrics: Optional[Sequence[str]], num_images: int, swap_images: int) -> int:
    """Images to take from the probe's source: the maps' and, where more, the swap ratios'."""
    return max(num_images, swap_images) if runs_swaps(metrics) else num_images


def probe_source(
    trainer: L.Trainer, pl_module: L.LightningModule, stage: str, user_probe: Optional[ProbeBatch], size: int,
    keys: ProbeKeys,
) -> ProbeBatch:
    """The probe from the first source there is: the user's, the datamodule's ``probe_batch(size)``, else the first
    ``size`` images of the raw validation (or test) dataloader."""
    datamodule = trainer.datamodule
    if user_probe is not None:
        return user_probe
    if callable(getattr(datamodule, "probe_batch", None)):
        return to_probe_batch(datamodule.probe_batch(size), keys)
    loader = raw_eval_loader(trainer, pl_module, stage)
    if loader is None:
        raise ValueError(
            "CAAPCallback found no probe images: pass probe=... (images, a tuple, a dict or a Dataset), give "
            f"the datamodule a probe_batch(n) method, or give the Trainer's {stage} a validation dataloader."
        )
    return probe_from_loader(loader, size, keys)


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
