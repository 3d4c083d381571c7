"""Density ratio: how much denser the positive evidence is inside a region than outside it."""

from __future__ import annotations

from typing import Any, Dict

from torch import Tensor

from caap_lightning.metrics._checks import check_choice
from caap_lightning.metrics._per_image_mean import PerImageMean
from caap_lightning.metrics.functional import MASS_REGIONS, ratio_of_densities, region_evidence


class DensityRatio(PerImageMean):
    """Evidence density inside a region over the density outside it, pooled over the images seen.

    ``region="mask"`` puts the mask inside (a known cue: on the cue over off it), ``"outside"``
    the rest (object masks: the background over the object). The evidence is the positive part of
    relative maps (``A - A_blank``), each map normalised to sum 1 so that every image weighs the
    same (see :func:`~caap_lightning.metrics.functional.evidence`). A uniform map scores 1 at any
    region size, a map preferring the region more; a map with no positive part counts as uniform.
    Unlike the area-normalised mass, the ratio has no ceiling set by the region's area. ``compute()``
    returns the ratio, a 0-dim tensor; ``compute_details()`` returns ``density_ratio`` (the same),
    ``evidence_share`` and ``area_share`` (the means it is made of), ``count`` and ``skipped``
    (images whose region is empty or whole). A batch with no scorable image is refused.
    """

    higher_is_better = False

    def __init__(self, region: str = "mask", **kwargs: Any) -> None:
        check_choice("region", region, MASS_REGIONS)
        super().__init__(names=("evidence_share", "area_share"), variant=f"density_{region}", **kwargs)
        self.main_key = "density_ratio"
        self.region = region

    def update(self, maps: Tensor, masks: Tensor) -> None:
        shares = region_evidence(maps, masks, region=self.region)
        self._accumulate(evidence_share=shares.share, area_share=shares.area)

    def _details(self) -> Dict[str, Tensor]:
        details = super()._details()
        ratio = ratio_of_densities(details["evidence_share"], details["area_share"])
        return {"density_ratio": ratio, **details}
