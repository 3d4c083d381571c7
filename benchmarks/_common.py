"""What the benchmark scripts share: a quiet CPU Trainer, the GPU's clock, the tiny ViT's recipe.

The scripts run as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

from typing import Any, Union

import lightning as L
import torch

# The ViT that ``train_synthetic.py`` trains on the synthetic shapes and ``quality.py`` attributes.
TINY_VIT = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4)
TINY_VIT_RECIPE = dict(lr=1e-3, weight_decay=0.05, warmup_epochs=0.5)
# The deeper ViT that ``quality.py --data fashion`` trains: twice the blocks (so k = L//2 = 4) and
# twice the width of the tiny one, sized so that its training fits about 30 CPU-minutes.
DEEP_VIT = dict(patch_size=8, embed_dim=128, depth=8, num_heads=4)
# Four Fashion-MNIST classes that differ in silhouette (trouser, bag, sneaker, shirt): small
# models learn them on the CPU in minutes.
FASHION_CLASSES = [1, 8, 7, 6]


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A one-device CPU Trainer that writes and prints nothing of its own; ``kwargs`` override."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**options, **kwargs})


def synchronize(device: Union[torch.device, str] = "cuda") -> None:
    """Wait for the work queued on ``device``, so that a clock read next covers it; a no-op off CUDA."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
