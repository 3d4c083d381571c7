"""AUPR1 / AUPR0: average precision of the map for the foreground or the background."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from caap_lightning.metrics._per_image_mean import PerImageMean
from caap_lightning.metrics._checks import check_choice
from caap_lightning.metrics.functional import AUPR_REGIONS, aupr


class AUPR(PerImageMean):
    """Mean average precision of min-max normalised maps as pixel scores for a mask.

    ``region="foreground"`` is AUPR1 (map vs. mask), ``"background"`` AUPR0 (``1 - map``
    vs. the inverted mask). ``compute()`` returns the mean AP, a 0-dim tensor;
    ``compute_details()`` returns ``aupr`` (the same), ``lift`` (the mean of AP over the
    region's share of the image, i.e. over chance), ``count`` (images scored) and
    ``skipped`` (images whose region is empty: an empty mask, or a full one for the
    background). Masks are binary, ``(B, H, W)`` or ``(B, 1, H, W)``.
    """

    higher_is_better = True

    def __init__(self, region: str = "foreground", **kwargs: Any) -> None:
        check_choice("region", region, AUPR_REGIONS)
        super().__init__(names=("aupr", "lift"), variant=region, **kwargs)
        self.region = region

    def update(self, maps: Tensor, masks: Tensor) -> None:
        result = aupr(maps, masks, region=self.region)
        self._accumulate(aupr=result.aupr, lift=result.lift)
