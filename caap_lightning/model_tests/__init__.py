"""Tests of the model itself, not of an attribution map: which part of the image does it rely on?

The insertion ratio shows the model a suspect part alone and the rest alone; the swap ratio gives
each probe image another image's part (:class:`SwapPairs`) and asks which class the model follows.
:data:`MODEL_TESTS` lists them as ``CAAPCallback`` runs them, once per check.
"""

from caap_lightning.model_tests.insertion_ratio import InsertionRatio, RegionInsertion, region_insertion
from caap_lightning.model_tests.probe_skill import JUDGED_SKILL, ProbeSkill, is_judged
from caap_lightning.model_tests.pooled_region_ratio import RATIO_FLOOR, PooledRegionRatio, floored_ratio
from caap_lightning.model_tests.suite import ModelTestSuite
from caap_lightning.model_tests.swap_pairs import SwapPairs, SwapShard
from caap_lightning.model_tests.swap_ratio import RegionSwap, SwapRatio, region_swap, swapped_images
from caap_lightning.model_tests.table import MODEL_TESTS, ModelTest
from caap_lightning.model_tests.views import border_masks, centre_masks, fill_from_surroundings, hide_regions, rest_colour, suspect_views

__all__ = [
    "JUDGED_SKILL",
    "MODEL_TESTS",
    "RATIO_FLOOR",
    "InsertionRatio",
    "ModelTest",
    "ModelTestSuite",
    "PooledRegionRatio",
    "ProbeSkill",
    "RegionInsertion",
    "RegionSwap",
    "SwapPairs",
    "SwapRatio",
    "SwapShard",
    "border_masks",
    "centre_masks",
    "fill_from_surroundings",
    "floored_ratio",
    "hide_regions",
    "is_judged",
    "region_insertion",
    "region_swap",
    "rest_colour",
    "suspect_views",
    "swapped_images",
]
