"""Attribution mass: how much positive attribution falls in a region."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from caap_lightning.metrics._per_image_mean import PerImageMean
from caap_lightning.metrics._checks import check_choice
from caap_lightning.metrics.functional import MASS_REGIONS, attribution_mass


class AttributionMass(PerImageMean):
    """Mean share of the positive part of relative maps (``A - A_blank``) in a region.

    ``region="mask"`` measures the mask (the object, or a known cue), ``"outside"`` the
    rest (background reliance). With ``normalize_by_area`` the share is divided by the
    region's share of the image: a uniform map scores 1, a map preferring the region
    more. A map with no positive part (every value <= 0) has no evidence in the region:
    mass 0 (normalised too), and the image counts. The normalised mass cannot exceed
    1 / (the region's share): for a large region, such as the background, use
    :class:`~caap_lightning.metrics.DensityRatio`, which compares the region with the rest.
    ``compute()`` returns the mean mass, a 0-dim tensor; ``compute_details()`` returns
    ``attribution_mass`` (the same), ``count`` (images scored) and ``skipped`` (images whose
    region is empty). Masks are binary, ``(B, H, W)`` or ``(B, 1, H, W)``.
    """

    def __init__(self, region: str = "mask", normalize_by_area: bool = False, **kwargs: Any) -> None:
        check_choice("region", region, MASS_REGIONS)
        variant = f"{region}_{'ratio' if normalize_by_area else 'share'}"
        super().__init__(names=("attribution_mass",), variant=variant, **kwargs)
        self.region = region
        self.normalize_by_area = normalize_by_area

    def update(self, maps: Tensor, masks: Tensor) -> None:
        mass = attribution_mass(maps, masks, region=self.region, normalize_by_area=self.normalize_by_area)
        self._accumulate(attribution_mass=mass)
