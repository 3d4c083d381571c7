"""Attribution metrics as torchmetrics: each class accumulates, its functional twin computes.

The tests of the model itself (the insertion and swap ratios) are in :mod:`caap_lightning.model_tests`.
"""

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
from caap_lightning.metrics.precision_recall import AUPR

__all__ = [
    "AUPR",
    "AttributionMass",
    "DensityRatio",
    "FixedPositionRatio",
    "InsertionDeletion",
    "PointingGame",
    "attribution_mass",
    "aupr",
    "density_ratio",
    "evidence",
    "fixed_position_evidence",
    "fixed_position_ratio",
    "insertion_deletion",
    "pointing_game",
    "ratio_of_densities",
    "region_evidence",
]
