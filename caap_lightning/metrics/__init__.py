"""Attribution metrics as torchmetrics: each class accumulates, its functional twin computes."""

from caap_lightning.metrics.functional import attribution_mass, aupr, insertion_deletion, pointing_game
from caap_lightning.metrics.insdel import InsertionDeletion
from caap_lightning.metrics.mass import AttributionMass
from caap_lightning.metrics.pointing import PointingGame
from caap_lightning.metrics.precision_recall import AUPR

__all__ = [
    "AUPR",
    "AttributionMass",
    "InsertionDeletion",
    "PointingGame",
    "attribution_mass",
    "aupr",
    "insertion_deletion",
    "pointing_game",
]
