"""Attribution mass: how much positive attribution falls in a region."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from caap_lightning.metrics._per_image_mean import PerImageMean
from caap_lightning.metrics.functional import MASS_REGIONS, attribution_mass, check_choice


class AttributionMass(PerImageMean):
    """Mean share of the positive part of relative maps (``A - A_blank``) in a region.

    ``region="mask"`` measures the mask (the object, or a known cue), ``"outside"`` the
    rest (background reliance). With ``normalize_by_area`` the share is divided by the
    region's share of the image: a uniform map scores 1, a map preferring the region
    more. ``compute()`` returns ``attribution_mass``, ``count`` and ``skipped`` (images
    whose region is empty or whose map has no positive part).
    """

    def __init__(self, region: str = "mask", normalize_by_area: bool = False, **kwargs: Any) -> None:
        check_choice("region", region, MASS_REGIONS)
        super().__init__(names=("attribution_mass",), **kwargs)
        self.region = region
        self.normalize_by_area = normalize_by_area

    def update(self, maps: Tensor, masks: Tensor) -> None:
        mass = attribution_mass(maps, masks, region=self.region, normalize_by_area=self.normalize_by_area)
        self._accumulate(attribution_mass=mass)
