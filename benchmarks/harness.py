"""What the benchmark scripts share: recipes, training, timing, table writing and display names.

A report script imports this module (and the libraries beside it, ``cue_runs.py``,
``map_quality.py``, ``_diagnose.py``), never another report script. The scripts run as
``python benchmarks/<script>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import lightning as L
import torch
from lightning.pytorch.utilities import disable_possible_user_warnings

from caap_lightning.callbacks import CAAPCallback

RESULTS = Path(__file__).resolve().parent / "results"

# ---------------------------------------------------------------------- recipes
# The ViT that ``train_synthetic.py`` trains on the synthetic shapes and ``quality.py`` attributes.
TINY_VIT = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4)
TINY_VIT_RECIPE = dict(lr=1e-3, weight_decay=0.05, warmup_epochs=0.5)
# The deeper ViT that ``quality.py --data fashion`` trains: twice the blocks (so k = L//2 = 4) and
# twice the width of the tiny one, small enough to train on the CPU (the report records how long it took).
DEEP_VIT = dict(patch_size=8, embed_dim=128, depth=8, num_heads=4)
# Four Fashion-MNIST classes that differ in silhouette (trouser, bag, sneaker, shirt): small
# models learn them on the CPU in minutes.
FASHION_CLASSES = [1, 8, 7, 6]

# Display names of the attribution methods, by registry name: one set for every report.
METHOD_NAMES = {
    "caap": "CAAP", "random": "Random", "gradcam": "Grad-CAM", "rollout": "Rollout", "tattr": "T-Attr (grad)",
    "input_x_gradient": "Input×Gradient", "simple_insertion": "Simple Insertion",
    "simple_deletion": "Simple Deletion", "occlusion": "Occlusion (captum)",
}


# ---------------------------------------------------------------------- training
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


def fit_timed(module: L.LightningModule, data: L.LightningDataModule, epochs: int, num_train: int) -> Dict[str, Any]:
    """Train ``module`` for ``epochs`` without validation; the training record (size, wall and CPU seconds)."""
    start, cpu = time.perf_counter(), time.process_time()
    quiet_trainer(max_epochs=epochs, limit_val_batches=0).fit(module, datamodule=data)
    return {"epochs": epochs, "num_train": num_train, "train_seconds": round(time.perf_counter() - start, 1),
            "train_cpu_seconds": round(time.process_time() - cpu, 1)}


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: L.LightningDataModule) -> float:
    """The share of ``data``'s validation images that ``model`` classifies correctly."""
    correct = total = 0
    for batch in data.val_dataloader():
        correct += int((model(batch.images).argmax(-1) == batch.labels).sum())
        total += len(batch.labels)
    return correct / total


def init_worker() -> None:
    # Each worker process trains on one thread: the cores are the parallelism.
    torch.set_num_threads(1)
    disable_possible_user_warnings()


# ---------------------------------------------------------------------- timing and recording
def synchronize(device: Union[torch.device, str] = "cuda") -> None:
    """Wait for the work queued on ``device``, so that a clock read next covers it; a no-op off CUDA."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


class EpochClock(L.Callback):
    """Wall and CPU seconds of every epoch (train start to validation end) and of every CAAP check.

    Each reading first drains the module's device queue (a no-op on the CPU), so that work queued
    before a reading (the last validation step's, before the check) is not charged after it.
    """

    def __init__(self) -> None:
        self.rows: List[Dict[str, float]] = []
        self._start = (0.0, 0.0)
        self._check = (0.0, 0.0)

    @staticmethod
    def _now(pl_module: L.LightningModule) -> tuple:
        synchronize(pl_module.device)
        return time.perf_counter(), time.process_time()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # the check stays wrapped for the validate runs after the fit
        caap = next(cb for cb in trainer.callbacks if isinstance(cb, CAAPCallback))
        run_check = caap.run_check

        def timed(trainer: L.Trainer, pl_module: L.LightningModule):
            wall, cpu = self._now(pl_module)
            try:
                return run_check(trainer, pl_module)
            finally:
                end_wall, end_cpu = self._now(pl_module)
                self._check = (end_wall - wall, end_cpu - cpu)

        caap.run_check = timed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._now(pl_module)
        self._check = (0.0, 0.0)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        end_wall, end_cpu = self._now(pl_module)
        epoch_wall, epoch_cpu = end_wall - self._start[0], end_cpu - self._start[1]
        check_wall, check_cpu = self._check
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "epoch_wall_s": round(epoch_wall, 2),
                "epoch_cpu_s": round(epoch_cpu, 2),
                "check_wall_s": round(check_wall, 2),
                "check_cpu_s": round(check_cpu, 2),
                "overhead_wall": round(check_wall / (epoch_wall - check_wall), 4),
                "overhead_cpu": round(check_cpu / (epoch_cpu - check_cpu), 4),
            }
        )


def percent(correct: int, total: int) -> Optional[float]:
    return round(100.0 * correct / total, 2) if total else None


def rounded(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def median(values: Iterable[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------- tables and names
def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: ``-`` for none, floats with at most ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def display(method: str) -> str:
    """A method's display name (its registry name where it has none)."""
    return METHOD_NAMES.get(method, method)
