"""How well maps do, in the paper's format: per-image scores, their means ± sem, timing and the table.

``quality.py`` (ViTs) and ``quality_cnn.py`` (CNNs) score their methods with these.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning as L
import torch

from caap_lightning.datamodules import FashionCanvasDataModule, SyntheticSpuriousDataModule
from caap_lightning.metrics import aupr, insertion_deletion, pointing_game

from harness import FASHION_CLASSES

METRICS = ("deletion", "insertion", "insdel", "aupr_fg", "aupr_bg", "pointing_game")
HEADERS = {"deletion": "Del ↓", "insertion": "Ins ↑", "insdel": "InsDel ↑", "aupr_fg": "AUPR1 ↑",
           "aupr_bg": "AUPR0 ↑", "pointing_game": "PG ↑"}


def testbed_data(args: argparse.Namespace) -> L.LightningDataModule:
    """The testbed's data without a cue (``args.data``, ``num_train``, ``seed``, ``fashion_root``)."""
    if args.data == "shapes":
        return SyntheticSpuriousDataModule(cue_correlation=None, num_train=args.num_train, seed=args.seed)
    # Cached: a canvas is drawn once, not once per epoch.
    return FashionCanvasDataModule(root=args.fashion_root, cue="none", classes=FASHION_CLASSES,
                                   num_train=args.num_train, num_val=1000, seed=args.seed, cache=True)


def attribute_all(method, images: torch.Tensor, labels: torch.Tensor, batch: int) -> Tuple[torch.Tensor, float]:
    """Maps of every image, and the process-CPU seconds they took."""
    cpu = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CAAP's saturated-blank warning: the blank scores are recorded
        maps = torch.cat([method.attribute(images[i:i + batch], target=labels[i:i + batch])
                          for i in range(0, len(images), batch)])
    return maps, time.process_time() - cpu


def seconds_per_image(methods: Dict[str, Any], images: torch.Tensor, labels: torch.Tensor, rounds: int = 3) -> Dict[str, float]:
    """Wall seconds per image of one ``attribute`` call on a fixed batch, for every method.

    The machine is shared: the methods take turns in each round, so that they meet the same
    load, and each keeps its fastest round, the least disturbed one.
    """
    fastest = {label: math.inf for label in methods}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            for label, method in methods.items():
                start = time.perf_counter()
                method.attribute(images, target=labels)
                fastest[label] = min(fastest[label], time.perf_counter() - start)
    return {label: round(t / len(images), 5) for label, t in fastest.items()}


def per_image_scores(model, maps, images, labels, masks, step: int, metric_batch: int) -> Dict[str, torch.Tensor]:
    """Every metric of every image, in [0, 1] (the reports show percent)."""
    result = insertion_deletion(model, images, maps, target=labels, step=step, batch_size=metric_batch)
    insertion, deletion = result.insertion.double(), result.deletion.double()
    return {
        "deletion": deletion,
        "insertion": insertion,
        "insdel": insertion - deletion,
        "aupr_fg": aupr(maps, masks, region="foreground").aupr,
        "aupr_bg": aupr(maps, masks, region="background").aupr,
        "pointing_game": pointing_game(maps, masks),
        "substrate_is_target": result.substrate_is_target,
    }


def score_method(method, model, images, labels, masks, step: int, batch: int, metric_batch: int):
    """One method's per-image scores on the held-out images and their summary row (with CPU seconds per image)."""
    maps, cpu = attribute_all(method, images, labels, batch)
    scores = per_image_scores(model, maps, images, labels, masks, step, metric_batch)
    row = summarise(scores)
    row["cpu_seconds_per_image"] = round(cpu / len(images), 5)
    return scores, row, maps


def mean_sem(values: torch.Tensor) -> Dict[str, float]:
    """Mean, standard error and count of the finite values."""
    values = values[torch.isfinite(values)].double()
    n = values.numel()
    sem = values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": round(values.mean().item(), 4), "sem": round(sem, 4), "n": n}


def summarise(scores: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """A method's row: every metric's mean ± sem, and InsDel where the deletion substrate is not the target."""
    row: Dict[str, Any] = {m: mean_sem(scores[m]) for m in METRICS}
    row["insdel_informative"] = mean_sem(scores["insdel"][~scores["substrate_is_target"]])
    return row


def paired(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], metric: str, n: int) -> Dict[str, float]:
    """Mean ± sem of the per-image difference ``a - b`` over the first ``n`` images."""
    return mean_sem(a[metric][:n] - b[metric][:n])


def fmt_stat(stat: Dict[str, float]) -> str:
    """A mean ± sem in percent (``–`` where no image was scored)."""
    if stat["n"] == 0:
        return "–"
    return f"{100 * stat['mean']:.2f}±{100 * stat['sem']:.2f}"


def fmt_diff(stat: Dict[str, float]) -> str:
    """A paired difference in percent, with its sign."""
    return f"{100 * stat['mean']:+.2f}±{100 * stat['sem']:.2f}"


def score_table(rows: Dict[str, Dict[str, Any]], names: List[str], label: Callable[[str], Optional[str]],
                first: str = "Method") -> List[str]:
    """The paper's table: a row per name of ``rows`` (shown as ``label(name)``, else the name), a column per
    metric and the seconds per map."""
    lines = [f"| {first} | " + " | ".join(HEADERS[m] for m in METRICS) + " | s / image |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for name in names:
        row = rows[name]
        lines.append(f"| {label(name) or name} | " + " | ".join(fmt_stat(row[m]) for m in METRICS)
                     + f" | {row['seconds_per_image']:.4f} |")
    return lines
