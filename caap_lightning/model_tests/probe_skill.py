"""Whether a swap test can be judged: does the model tell the swap probe's images apart at all?

A swap ratio compares the probability of the donor's class with that of the image's own. A model
that cannot yet tell classes apart (at the start of training, or a fresh head) gives every class
about the same probability, so its ratio and follow share read whatever small preference its
random features have, often for a whole background's colour: the alarm's threshold would be read
on noise. The swap probe's *skill* is how far the model's clean predictions are from chance: the
mean probability of each clean swap-probe image's top-1 class, chance-corrected as Cohen's kappa
is, 0 when every class gets ``1 / K`` and 1 when every image gets one class with certainty.

It reads the model's confidence, not its accuracy against labels: a model that follows a shortcut
is wrong on every image whose cue names another class, yet it tells the images apart, which is
just what the swap test needs. ``SpuriousCueMonitor`` counts a swap-test check only where the
skill reaches its ``min_skill`` (``docs/callbacks.md``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torchmetrics import Metric

# The skill a check needs to be judged, chosen on the benchmark's runs (benchmarks/results/spurious.md).
JUDGED_SKILL = 0.3


def chance_corrected(value: float, chance: float) -> float:
    """``(value - chance) / (1 - chance)``: 0 at chance, 1 at the best value (1)."""
    return (value - chance) / (1.0 - chance)


def is_judged(skill: Optional[float], min_skill: Optional[float] = JUDGED_SKILL) -> bool:
    """Whether a check whose swap probe has ``skill`` counts (``min_skill=None``: every check counts; a check
    without a skill, ``None`` or NaN, counts only then)."""
    if min_skill is None:
        return True
    return skill is not None and skill == skill and skill >= min_skill


class ProbeSkill(Metric):
    """The model's chance-corrected confidence on the clean swap probe (see the module's docstring), synced as a
    sum. ``update(probs)`` takes the clean class probabilities ``(B, K)`` of a rank's share of the swap probe;
    ``compute()`` is NaN before any update."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("top_probability", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("classes", torch.tensor(0), dist_reduce_fx="max")

    def update(self, probs: Tensor) -> None:
        self.top_probability += probs.max(1).values.double().sum()
        self.images += len(probs)
        self.classes = torch.maximum(self.classes, torch.tensor(probs.shape[1], device=self.classes.device))

    def compute(self) -> Tensor:
        images, classes = int(self.images), int(self.classes)
        if images == 0 or classes < 2:
            return torch.tensor(float("nan"))
        return torch.tensor(chance_corrected(float(self.top_probability) / images, 1.0 / classes))
