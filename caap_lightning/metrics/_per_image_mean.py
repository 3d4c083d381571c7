"""The accumulator shared by the mask metrics: means of per-image scores, skips counted."""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import Tensor

from caap_lightning.metrics._detailed_metric import DetailedMetric


class PerImageMean(DetailedMetric):
    """Means of per-image scores over the scored images; NaN marks a skipped image.

    The first of ``names`` is the main value (``compute()``) and decides whether an image
    is scored. ``compute_details()`` returns each mean, ``count`` (scored images) and
    ``skipped``. ``variant`` names the configuration in the state names, so that a
    ``MetricCollection`` never merges two configurations into one compute group (it
    merges metrics whose states are equal after the first update, e.g. the mass inside
    and outside of maps with no positive part: both 0).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, names: Sequence[str], variant: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._names = tuple(names)
        self.main_key = self._names[0]
        self._sums = {name: f"{name}_sum_{variant}" for name in self._names}
        for state in self._sums.values():
            self.add_state(state, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("skipped", torch.tensor(0), dist_reduce_fx="sum")

    def _accumulate(self, **scores: Tensor) -> None:
        scored = ~torch.isnan(scores[self._names[0]])
        for name, state in self._sums.items():
            total = getattr(self, state)
            setattr(self, state, total + scores[name][scored].sum().to(total))
        self.count += int(scored.sum())
        self.skipped += int((~scored).sum())

    def _details(self) -> Dict[str, Tensor]:
        means = {name: getattr(self, state) / self.count for name, state in self._sums.items()}
        return {**means, "count": self.count, "skipped": self.skipped}
