"""Heatmap grids and curve figures for the callbacks, and the loggers they go to."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure


def heatmap_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    titles: Sequence[str],
    masks: Optional[torch.Tensor] = None,
    cue_masks: Optional[torch.Tensor] = None,
) -> np.ndarray:
    """One row per image: image | relative map overlay | object mask | cue mask, as ``(H, W, 3)`` uint8.

    ``images`` are pixel-space ``(n, 3, H, W)`` in [0, 1]; ``maps`` relative pixel maps
    ``(n, H, W)``, drawn red where they favour the target and blue where they oppose it.
    Mask columns dim the image outside the mask; a column whose masks are ``None`` is left out.
    """
    columns = ["image", "CAAP (A - A_blank)"]
    mask_columns = [(name, m) for name, m in (("object mask", masks), ("cue mask", cue_masks)) if m is not None]
    columns += [name for name, _ in mask_columns]
    rows = len(images)
    figure = Figure(figsize=(1.9 * len(columns), 2.0 * rows), dpi=72)
    axes = np.asarray(figure.subplots(rows, len(columns), squeeze=False))
    for i in range(rows):
        image = images[i].permute(1, 2, 0).float().cpu().numpy()
        heat = maps[i].float().cpu().numpy()
        limit = float(np.abs(heat).max()) or 1.0
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(titles[i], fontsize=7)
        axes[i, 1].imshow(image)
        axes[i, 1].imshow(heat, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.65)
        axes[i, 1].set_title(f"max |map| {limit:.3f}", fontsize=7)
        for col, (_, mask) in enumerate(mask_columns, start=2):
            keep = mask[i].float().cpu().numpy()[..., None]
            axes[i, col].imshow(image * (0.2 + 0.8 * keep))
    for ax in axes.flat:
        ax.set_axis_off()
    header = 0.25 / figure.get_figheight()  # a quarter inch on top for the column names
    figure.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - header))
    for col, name in enumerate(columns):
        box = axes[0, col].get_position()
        figure.text((box.x0 + box.x1) / 2, 1 - header / 2, name, ha="center", va="center", fontsize=8, weight="bold")
    return render(figure)


def curves_figure(curves: Dict[str, torch.Tensor], title: str) -> Figure:
    """Mean insertion/deletion curves (target probability against the share of pixels changed)."""
    figure = Figure(figsize=(4.0, 3.0), dpi=72)
    ax = figure.subplots()
    for name, curve in curves.items():
        values = curve.float().cpu().numpy()
        ax.plot(np.linspace(0, 1, len(values)), values, label=name)
    ax.set_xlabel("share of pixels inserted / deleted")
    ax.set_ylabel("target probability")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def render(figure: Figure) -> np.ndarray:
    """The figure's pixels as ``(H, W, 3)`` uint8 (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def tensorboard_writers(trainer: Trainer) -> List:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer (rank zero only writes)."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def log_image(trainer: Trainer, tag: str, image: np.ndarray, step: int) -> None:
    for writer in tensorboard_writers(trainer):
        writer.add_image(tag, image, global_step=step, dataformats="HWC")


def log_figure(trainer: Trainer, tag: str, figure: Figure, step: int) -> None:
    for writer in tensorboard_writers(trainer):
        writer.add_figure(tag, figure, global_step=step, close=False)


def log_text(trainer: Trainer, tag: str, text: str, step: int) -> None:
    for writer in tensorboard_writers(trainer):
        writer.add_text(tag, text, global_step=step)


def log_scalars(trainer: Trainer, scalars: Dict[str, float], step: int) -> None:
    """Scalars outside a LightningModule's ``log`` (hooks where it is not allowed), every logger."""
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)
