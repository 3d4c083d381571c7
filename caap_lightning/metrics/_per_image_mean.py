"""The accumulator shared by the mask metrics: means of per-image scores, skips counted."""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class PerImageMean(Metric):
    """Means of per-image scores over the scored images; NaN marks a skipped image.

    The first of ``names`` decides whether an image is scored. ``compute()`` returns each
    mean, ``count`` (scored images) and ``skipped``.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._names = tuple(names)
        for name in self._names:
            self.add_state(f"{name}_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("skipped", torch.tensor(0), dist_reduce_fx="sum")

    def _accumulate(self, **scores: Tensor) -> None:
        scored = ~torch.isnan(scores[self._names[0]])
        for name in self._names:
            total = getattr(self, f"{name}_sum")
            setattr(self, f"{name}_sum", total + scores[name][scored].sum().to(total))
        self.count += int(scored.sum())
        self.skipped += int((~scored).sum())

    def compute(self) -> Dict[str, Tensor]:
        means = {name: getattr(self, f"{name}_sum") / self.count for name in self._names}
        return {**means, "count": self.count, "skipped": self.skipped}
