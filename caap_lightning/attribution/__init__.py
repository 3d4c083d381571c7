"""Attribution methods with one call shape: ``Method(model).attribute(images, target=...)``."""

from caap_lightning.attribution.caap import CAAP

__all__ = ["CAAP"]
from caap_lightning.attribution.baselines import (  # noqa: E402
    AttentionRollout,
    GradCAM,
    InputXGradient,
    PatchOcclusion,
    RandomMap,
    SimpleDeletion,
    SimpleInsertion,
    TransformerAttribution,
)
from caap_lightning.attribution.registry import available_methods, get_method  # noqa: E402

__all__ += [
    "AttentionRollout",
    "GradCAM",
    "InputXGradient",
    "PatchOcclusion",
    "RandomMap",
    "SimpleDeletion",
    "SimpleInsertion",
    "TransformerAttribution",
    "available_methods",
    "get_method",
]
