"""What a check shows a person: the heatmap grid of probe rows, the Insertion/Deletion curves, how it names methods,
and a word at the start of a check that holds the progress bar still for long."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from caap_lightning.callbacks import figures
from caap_lightning.utils import unnormalize, upsample_maps

if TYPE_CHECKING:
    from caap_lightning.callbacks.caap_callback import CAAPCallback
    from caap_lightning.callbacks.result import ProbeResult

# Heatmap-grid column titles of the attribution methods (others: the method's name).
COLUMN_TITLES = {"caap": "CAAP (A - A_blank)"}


# A check that took longer than this is announced at the next check's start: the progress bar stands still meanwhile.
SLOW_CHECK_SECONDS = 5.0


def announce_if_slow(callback: "CAAPCallback") -> float:
    """Say what a check does as it starts, where the last check took over :data:`SLOW_CHECK_SECONDS`; the start time
    (``time.perf_counter()``), from which the check's seconds are counted."""
    last = callback.history[-1].get(f"{callback.prefix}/seconds") if callback.history else None
    if last is not None and last > SLOW_CHECK_SECONDS:
        methods = ", ".join(display_name(name) for name in callback.methods)
        tests = "" if callback.swap_probe is None else f" and the swap tests on {len(callback.swap_probe)} images"
        rank_zero_info(f"CAAPCallback: checking the model: {methods} maps of {len(callback.probe)} probe images{tests} "
                       f"(the last check took {last:.0f} s; training goes on after it).")
    return time.perf_counter()


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
