"""Pointing game: does the map's maximum fall on the object?"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from caap_lightning.metrics._per_image_mean import PerImageMean
from caap_lightning.metrics._checks import check_tolerance
from caap_lightning.metrics.functional import pointing_game


class PointingGame(PerImageMean):
    """Share of images whose arg-max pixel lies in the mask (within ``tolerance`` pixels).

    Tied maxima score the share of tied pixels that hit. ``compute()`` returns the
    share, a 0-dim tensor; ``compute_details()`` returns ``pointing_game`` (the same),
    ``count`` (images scored) and ``skipped`` (images with an empty mask). ``tolerance``
    is an int >= 0 (pixels); masks are binary, ``(B, H, W)`` or ``(B, 1, H, W)``.
    """

    higher_is_better = True

    def __init__(self, tolerance: int = 0, **kwargs: Any) -> None:
        check_tolerance(tolerance)
        super().__init__(names=("pointing_game",), variant=f"tolerance{tolerance}", **kwargs)
        self.tolerance = tolerance

    def update(self, maps: Tensor, masks: Tensor) -> None:
        self._accumulate(pointing_game=pointing_game(maps, masks, tolerance=self.tolerance))
