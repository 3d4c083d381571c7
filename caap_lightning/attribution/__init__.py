"""Attribution methods with one call shape: ``Method(model).attribute(images, target=...)``."""

from caap_lightning.attribution.base import AttributionMethod
from caap_lightning.attribution.caap import CAAP
from caap_lightning.attribution.cnn import ConvCAAP
from caap_lightning.attribution.twins import as_timm_vit, unwrap_compiled, vit_kind

__all__ = ["AttributionMethod", "CAAP", "ConvCAAP", "as_timm_vit", "unwrap_compiled", "vit_kind"]
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
from caap_lightning.attribution.registry import available_methods, family_of, get_method, method_class  # noqa: E402

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
    "family_of",
    "get_method",
    "method_class",
]
