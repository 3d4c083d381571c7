"""Pointing game: does the map's maximum fall on the object?"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from caap_lightning.metrics._per_image_mean import PerImageMean
from caap_lightning.metrics.functional import check_tolerance, pointing_game


class PointingGame(PerImageMean):
    """Share of images whose arg-max pixel lies in the mask (within ``tolerance`` pixels).

    Tied maxima score the share of tied pixels that hit. ``compute()`` returns
    ``pointing_game``, ``count`` and ``skipped`` (images with an empty mask).
    """

    higher_is_better = True

    def __init__(self, tolerance: int = 0, **kwargs: Any) -> None:
        check_tolerance(tolerance)
        super().__init__(names=("pointing_game",), **kwargs)
        self.tolerance = tolerance

    def update(self, maps: Tensor, masks: Tensor) -> None:
        self._accumulate(pointing_game=pointing_game(maps, masks, tolerance=self.tolerance))
