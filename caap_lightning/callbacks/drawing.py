"""What a check draws: the heatmap grid of probe rows and the Insertion/Deletion curves, and how it names methods."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import lightning as L
import torch

from caap_lightning.callbacks import figures
from caap_lightning.utils import unnormalize, upsample_maps

if TYPE_CHECKING:
    from caap_lightning.callbacks.result import ProbeResult

# Heatmap-grid column titles of the attribution methods (others: the method's name).
COLUMN_TITLES = {"caap": "CAAP (A - A_blank)"}


def column_title(method: str) -> str:
    """The heatmap grid's column title of ``method``'s maps."""
    return COLUMN_TITLES.get(method, method)


def display_name(method: str) -> str:
    """How messages name a method: ``CAAP``, else its registry name."""
    return "CAAP" if method == "caap" else method


def draw_rows(result: "ProbeResult", rows: List[int], views: Optional[Dict[str, torch.Tensor]] = None) -> Any:
    """The heatmap grid of ``result``'s probe ``rows``: image | an overlay per method | masks | ``views``."""
    probe = result.probe
    index = torch.as_tensor(rows, dtype=torch.long)
    size = tuple(probe.images.shape[-2:])
    overlays = {column_title(name): upsample_maps(maps[index].cpu(), size) for name, maps in result.method_maps.items()}
    return figures.heatmap_grid(
        unnormalize(probe.images[index], result.mean, result.std),
        overlays,
        [result.row_title(i) for i in rows],
        masks=None if probe.masks is None else probe.masks[index],
        cue_masks=None if probe.cue_masks is None else probe.cue_masks[index],
        views={title: unnormalize(v, result.mean, result.std) for title, v in (views or {}).items()},
    )


def log_check_images(trainer: L.Trainer, prefix: str, result: "ProbeResult", primary: str, rows: int) -> None:
    """The check's heatmap grid (its first ``rows`` probe images) and the methods' mean curves."""
    shown = list(range(min(rows, len(result.probe))))
    if shown and result.method_maps:
        figures.log_image(trainer, f"{prefix}/heatmaps", result.draw_rows(shown), result.step)
    if not result.curves:
        return
    auc = {k: result.metrics.get(f"{prefix}/{k}", math.nan) for k in ("insertion", "deletion")}
    title = f"epoch {result.epoch}: insertion {auc['insertion']:.3f}, deletion {auc['deletion']:.3f}"
    if len(result.method_curves) > 1:
        title = f"{display_name(primary)} {title}"
    curves = {
        label if name == primary else f"{name} {label}": curve
        for name, pair in result.method_curves.items()
        for label, curve in pair.items()
    }
    figures.log_image(trainer, f"{prefix}/insertion_deletion", figures.curves_image(curves, title), result.step)
