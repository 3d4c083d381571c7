"""The accumulator both model tests share: a per-image suspect value and rest value, pooled into one ratio."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from caap_lightning.metrics._checks import check_choice, check_int
from caap_lightning.metrics._detailed_metric import DetailedMetric
from caap_lightning.metrics.functional import MASS_REGIONS

# Probability added to both pooled values: it keeps the ratio finite and near 1 when neither part holds the class.
RATIO_FLOOR = 0.05


def floored_ratio(suspect: Tensor, rest: Tensor, floor: float = RATIO_FLOOR) -> Tensor:
    """``(suspect + floor) / (rest + floor)``, elementwise: 1 when both parts score equally, above 1 when the
    suspect scores more. The ratio of both model tests, pooled or per image."""
    return (suspect + floor) / (rest + floor)


class PooledRegionRatio(DetailedMetric):
    """The state of a region test that pools a per-image suspect value and rest value into one ratio.

    Subclasses name the values (``main_key``, ``suspect_key``, ``rest_key``) and compute them in
    ``update`` with :meth:`_add`; the ratio is :func:`floored_ratio` of the pooled means, so
    images where neither value is large weigh little. The model is held by reference, as
    :class:`~caap_lightning.metrics.InsertionDeletion` holds it. With ``image_ratios`` the
    details also hold each scored image's own ratio as ``image_ratios`` (NaN where skipped; under
    DDP gathered rank by rank).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    suspect_key: str
    rest_key: str

    def __init__(
        self,
        model: nn.Module,
        region: str = "mask",
        floor: float = RATIO_FLOOR,
        batch_size: int = 64,
        image_ratios: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("region", region, MASS_REGIONS)
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor > 0:
            raise ValueError(f"floor must be a probability > 0, got {floor!r}")
        check_int("batch_size", batch_size, 1, "images per forward pass")
        object.__setattr__(self, "model", model)  # a reference, not a submodule: outside the state and the .to() moves
        self.region = region
        self.floor = float(floor)
        self.batch_size = batch_size
        self.image_ratios = image_ratios
        # The test and the region in the state names, so that a MetricCollection never merges two tests' states.
        self._states = {name: f"{name}_{self.main_key}_{region}" for name in ("suspect_sum", "rest_sum")}
        for state in self._states.values():
            self.add_state(state, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("skipped", torch.tensor(0), dist_reduce_fx="sum")
        if image_ratios:
            self.add_state("ratio_of_each_image", [], dist_reduce_fx="cat")

    def _add(self, suspect: Tensor, rest: Tensor, scored: Tensor) -> None:
        """Pool one batch's per-image values of the images ``scored``; the rest count as skipped."""
        scored = scored.to(suspect.device)
        for name, values in (("suspect_sum", suspect), ("rest_sum", rest)):
            total = getattr(self, self._states[name])
            setattr(self, self._states[name], total + values[scored].sum().to(total))
        self.count += int(scored.sum())
        self.skipped += int((~scored).sum())
        if self.image_ratios:
            ratio = floored_ratio(suspect, rest, self.floor)
            self.ratio_of_each_image.append(torch.where(scored, ratio, torch.nan).to(self.device))

    def _details(self) -> Dict[str, Tensor]:
        suspect = getattr(self, self._states["suspect_sum"]) / self.count
        rest = getattr(self, self._states["rest_sum"]) / self.count
        out = {
            self.main_key: floored_ratio(suspect, rest, self.floor),
            self.suspect_key: suspect,
            self.rest_key: rest,
            "count": self.count,
            "skipped": self.skipped,
        }
        if self.image_ratios:
            out["image_ratios"] = dim_zero_cat(self.ratio_of_each_image)
        return out
