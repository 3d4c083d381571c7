"""Attribution methods by name, so that callbacks, configs and benchmarks can pick them."""

from __future__ import annotations

from typing import Any, Dict, List

from torch import nn

from caap_lightning.attribution.baselines import (
    AttentionRollout,
    GradCAM,
    InputXGradient,
    PatchOcclusion,
    RandomMap,
    SimpleDeletion,
    SimpleInsertion,
    TransformerAttribution,
)
from caap_lightning.attribution.caap import CAAP

METHODS: Dict[str, type] = {
    "caap": CAAP,
    "gradcam": GradCAM,
    "rollout": AttentionRollout,
    "tattr": TransformerAttribution,
    "input_x_gradient": InputXGradient,
    "simple_insertion": SimpleInsertion,
    "simple_deletion": SimpleDeletion,
    "occlusion": PatchOcclusion,
    "random": RandomMap,
}


def available_methods() -> List[str]:
    """The registered names (``occlusion`` also needs the ``baselines`` extra installed)."""
    return list(METHODS)


def get_method(name: str, model: nn.Module, **kwargs: Any):
    """``METHODS[name](model, **kwargs)``: e.g. ``get_method("caap", model, layer_cutoff=3)``."""
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; available: {available_methods()}")
    return METHODS[name](model, **kwargs)
