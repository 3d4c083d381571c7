"""Fixed-position ratio: evidence that keeps to one place across images, found from the maps alone."""

from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from caap_lightning.metrics._checks import check_maps
from caap_lightning.metrics._detailed_metric import DetailedMetric
from caap_lightning.metrics.functional import (
    HOT_REGION_SHARE,
    check_region_share,
    fixed_position_evidence,
    ratio_of_densities,
)


class FixedPositionRatio(DetailedMetric):
    """Evidence density in each image's hot region over the rest, the hot region chosen from the other images.

    For cues without masks (a watermark, a text tag, a border, a logo): evidence that sits in the
    same place in images whose objects are elsewhere. Each image's hot region is the
    ``region_share`` of the pixels where the other images' mean evidence is highest (see
    :func:`~caap_lightning.metrics.functional.fixed_position_evidence`); the ratio pools the
    images as :class:`DensityRatio` does: 1 for uniform maps, or peaks that move from image to
    image; high when the evidence keeps to one place. Objects that themselves sit in one place
    (centred photographs) score high too. The maps of every update are kept (the region depends on
    all of them) and must share one size. ``compute()`` returns the ratio, a 0-dim tensor, NaN with
    fewer than 2 images (no others to choose a region from); ``compute_details()`` returns
    ``fixed_position_ratio`` (the same), ``evidence_share``, ``area_share`` and ``count``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    main_key = "fixed_position_ratio"

    def __init__(self, region_share: float = HOT_REGION_SHARE, **kwargs: Any) -> None:
        check_region_share(region_share)
        super().__init__(**kwargs)
        self.region_share = region_share
        self.add_state("maps", default=[], dist_reduce_fx="cat")

    def update(self, maps: Tensor) -> None:
        if not isinstance(maps, Tensor) or maps.dim() != 3:
            shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
            raise ValueError(f"maps must be a (B, h, w) tensor, got {shape}")
        check_maps(maps, maps.shape[0], "maps")
        if self.maps and self.maps[0].shape[1:] != maps.shape[1:]:
            raise ValueError(
                f"maps of size {tuple(maps.shape[1:])} after maps of size {tuple(self.maps[0].shape[1:])}: the hot "
                "region is one set of pixels for every image; pass every batch's maps at one size"
            )
        self.maps.append(maps.detach().float())

    def _details(self) -> Dict[str, Tensor]:
        maps = dim_zero_cat(self.maps) if len(self.maps) else torch.zeros(0, 1, 1)
        count = torch.tensor(maps.shape[0])
        if maps.shape[0] < 2:
            nan = torch.tensor(math.nan, dtype=torch.float64)
            return {"fixed_position_ratio": nan, "evidence_share": nan, "area_share": nan, "count": count}
        found = fixed_position_evidence(maps, self.region_share)
        share, area = found.share.mean(), found.area.mean()
        return {"fixed_position_ratio": ratio_of_densities(share, area), "evidence_share": share, "area_share": area,
                "count": count}
