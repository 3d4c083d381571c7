"""Heatmap grids and curve figures for the callbacks, and the loggers they go to."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure


def heatmap_grid(
    images: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    titles: Sequence[str],
    masks: Optional[torch.Tensor] = None,
    cue_masks: Optional[torch.Tensor] = None,
    min_tile: int = 112,
) -> np.ndarray:
    """One row per image: image | one overlay per map | object mask | cue mask, as ``(H, W, 3)`` uint8.

    ``images`` are pixel-space ``(n, 3, H, W)`` in [0, 1]; ``maps`` gives the overlay columns
    in order, as ``{column title: pixel maps (n, H, W)}``.
    Maps are drawn red where they favour the target and blue where they oppose it (a
    non-negative map, e.g. Grad-CAM's, only goes red), each tile scaled to its own largest
    magnitude. Mask columns dim the image outside the mask; a column whose masks are ``None``
    is left out. Each row is captioned with its title and the first map's largest magnitude.
    Drawn with numpy and PIL: a matplotlib grid costs seconds per check on a CPU.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    overlays = list(maps.items())
    if not overlays:
        raise ValueError("heatmap_grid needs at least one map column")
    mask_columns = [(name, m) for name, m in (("object mask", masks), ("cue mask", cue_masks)) if m is not None]
    columns = ["image"] + [name for name, _ in overlays] + [name for name, _ in mask_columns]
    n, _, h, w = images.shape
    scale = max(1, -(-min_tile // min(h, w)))  # nearest-neighbour upscaling of small images
    th, tw, gap, caption = h * scale, w * scale, 4, 16
    width = len(columns) * tw + (len(columns) - 1) * gap
    canvas = np.full((caption + n * (caption + th + gap), width, 3), 255, dtype=np.uint8)
    pixels = images.permute(0, 2, 3, 1).float().cpu().numpy()
    heats = [m.float().cpu().numpy() for _, m in overlays]
    limits = [np.abs(heat).reshape(n, -1).max(1) for heat in heats]  # per column, per row
    shades = [0.2 + 0.8 * m.float().cpu().numpy()[..., None] for _, m in mask_columns]
    cmap = colormaps["RdBu_r"]
    for i in range(n):
        tiles = [pixels[i]]
        for heat, limit in zip(heats, limits):
            tiles.append(0.35 * pixels[i] + 0.65 * cmap(0.5 + 0.5 * heat[i] / (float(limit[i]) or 1.0))[..., :3])
        tiles += [pixels[i] * shade[i] for shade in shades]
        top = caption + i * (caption + th + gap) + caption
        for col, tile in enumerate(tiles):
            big = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
            left = col * (tw + gap)
            canvas[top : top + th, left : left + tw] = np.clip(big * 255 + 0.5, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for col, name in enumerate(columns):
        draw.text((col * (tw + gap) + 2, 2), name, fill=(0, 0, 0))
    for i, title in enumerate(titles):
        text = f"{title}   max |map| {float(limits[0][i]):.3f}"
        draw.text((2, caption + i * (caption + th + gap) + 2), text, fill=(0, 0, 0))
    return np.asarray(image)


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
    figure.subplots_adjust(left=0.16, right=0.97, bottom=0.16, top=0.9)
    return figure


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
