"""``layer_cutoff="auto"``: the cutoff sweep on the probe batch, its pick and its report."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from caap_lightning.callbacks import figures
from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.utils import eval_mode

Rows = List[Dict[str, float]]


def sweep_cutoffs(
    trainer: L.Trainer, caap: Any, model: Any, probe: ProbeBatch, by_label: bool, step: Optional[int], device: Any
) -> Rows:
    """``caap.calibrate`` on the probe: each cutoff's InsDel (and AUPR1 where the probe has object masks)."""
    images = trainer.precision_plugin.convert_input(probe.images.to(device))
    target = probe.labels.to(device) if by_label else None
    masks = None if probe.masks is None else probe.masks.to(device)
    with eval_mode(model):
        return caap.calibrate(images, target=target, masks=masks, step=step)


def pick_cutoff(trainer: L.Trainer, rows: Optional[Rows], fallback: int) -> int:
    """The best InsDel's cutoff (``fallback`` where the sweep failed), rank zero's on every rank, so that all of
    them attribute with the same cutoff."""
    picked = fallback if rows is None else max(rows, key=lambda r: r["insdel"])["layer_cutoff"]
    return int(trainer.strategy.broadcast(picked, src=0))


def report_sweep(trainer: L.Trainer, prefix: str, rows: Rows, picked: int, depth: int, images: int, step: int) -> None:
    """The sweep's rows, once as a message and once as a logged table (``<prefix>/layer_cutoff_sweep``)."""
    lines = [f"k={r['layer_cutoff']}: InsDel {r['insdel']:.3f}" + (f", AUPR1 {r['aupr_fg']:.3f}" if "aupr_fg" in r else "")
             for r in rows]
    rank_zero_info(
        f"CAAPCallback: layer_cutoff='auto' picked k={picked} of 0..{depth} on the "
        f"{images} probe images ({'; '.join(lines)})."
    )
    if trainer.is_global_zero:
        text = "\n".join(["| k | InsDel | AUPR1 |", "|---|---|---|"] + [
            f"| {r['layer_cutoff']}{' (picked)' if r['layer_cutoff'] == picked else ''} | "
            f"{r['insdel']:.4f} | {r.get('aupr_fg', math.nan):.4f} |" for r in rows
        ])
        figures.log_text(trainer, f"{prefix}/layer_cutoff_sweep", text, step)
