"""Attribution metrics as torchmetrics: each class accumulates, its functional twin computes."""

from caap_lightning.metrics.density_ratio import DensityRatio
from caap_lightning.metrics.fixed_position_ratio import FixedPositionRatio
from caap_lightning.metrics.functional import (
    attribution_mass,
    aupr,
    density_ratio,
    evidence,
    fixed_position_evidence,
    fixed_position_ratio,
    insertion_deletion,
    pointing_game,
    ratio_of_densities,
    region_evidence,
)
from caap_lightning.metrics.insdel import InsertionDeletion
from caap_lightning.metrics.mass import AttributionMass
from caap_lightning.metrics.pointing import PointingGame
from caap_lightning.metrics.region_insertion_ratio import (
    InsertionRatio,
    border_masks,
    insertion_ratio,
    region_insertion,
    rest_colour,
)
from caap_lightning.metrics.precision_recall import AUPR
from caap_lightning.metrics.region_swap_ratio import SwapRatio, region_swap, swap_donors, swapped_images

__all__ = [
    "AUPR",
    "AttributionMass",
    "DensityRatio",
    "FixedPositionRatio",
    "InsertionDeletion",
    "InsertionRatio",
    "PointingGame",
    "SwapRatio",
    "attribution_mass",
    "border_masks",
    "aupr",
    "density_ratio",
    "evidence",
    "fixed_position_evidence",
    "fixed_position_ratio",
    "insertion_deletion",
    "insertion_ratio",
    "pointing_game",
    "ratio_of_densities",
    "region_evidence",
    "region_insertion",
    "region_swap",
    "rest_colour",
    "swap_donors",
    "swapped_images",
]
