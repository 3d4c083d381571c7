"""Attribution methods by name, so that callbacks, configs and benchmarks can pick them.

A name stands for one method and, for each model family it applies to (``"vit"``: Vision
Transformers, timm's, Hugging Face's or torchvision's; ``"cnn"``: the CNNs ConvCAAP reads), the
class that computes it there: ``get_method("caap", vit)`` is a :class:`CAAP`,
``get_method("caap", resnet)`` a :class:`ConvCAAP`. The baselines are one class each for both families.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from torch import nn

from caap_lightning.attribution.base import FAMILIES, family_of
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
from caap_lightning.attribution.cnn import ConvCAAP
from caap_lightning.checks import check_choice

__all__ = ["FAMILIES", "METHODS", "available_methods", "family_of", "get_method", "method_class"]


def _both(cls: type) -> Dict[str, type]:
    return {"vit": cls, "cnn": cls}


# name -> {family: class}; rollout and tattr read attention, which CNNs do not have.
_CLASSES: Dict[str, Dict[str, type]] = {
    "caap": {"vit": CAAP, "cnn": ConvCAAP},
    "gradcam": _both(GradCAM),
    "rollout": {"vit": AttentionRollout},
    "tattr": {"vit": TransformerAttribution},
    "input_x_gradient": _both(InputXGradient),
    "simple_insertion": _both(SimpleInsertion),
    "simple_deletion": _both(SimpleDeletion),
    "occlusion": _both(PatchOcclusion),
    "random": _both(RandomMap),
}

# The ViT's classes by name (every name has one); method_class() gives any family's.
METHODS: Dict[str, type] = {name: classes["vit"] for name, classes in _CLASSES.items()}

_FAMILY_NAMES = {"vit": "timm Vision Transformers", "cnn": "CNNs"}


def available_methods(family: Optional[str] = None) -> List[str]:
    """The registered names, or those that apply to ``family`` (``"vit"`` or ``"cnn"``).

    ``occlusion`` also needs the ``baselines`` extra installed.
    """
    if family is None:
        return list(_CLASSES)
    _check_family(family)
    return [name for name, classes in _CLASSES.items() if family in classes]


def method_class(name: str, model_or_family: Union[nn.Module, str]) -> type:
    """The class that computes ``name`` for a model (or a family, ``"vit"`` or ``"cnn"``).

    ``ValueError`` for an unknown name, an unsupported model, or a method that does not
    apply to the family (it names the methods that do).
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown attribution method {name!r}; available: {available_methods()}")
    if isinstance(model_or_family, str):
        family = _check_family(model_or_family)
    else:
        family = family_of(model_or_family)
    classes = _CLASSES[name]
    if family not in classes:
        only = " and ".join(_FAMILY_NAMES[f] for f in classes)
        raise ValueError(
            f"{name!r} applies to {only} only, not to {_FAMILY_NAMES[family]}; the methods for "
            f"{_FAMILY_NAMES[family]} are {available_methods(family)}"
        )
    return classes[family]


def get_method(name: str, model: nn.Module, **kwargs: Any):
    """``method_class(name, model)(model, **kwargs)``: e.g. ``get_method("caap", model, layer_cutoff=3)``."""
    return method_class(name, model)(model, **kwargs)


def _check_family(family: str) -> str:
    check_choice("family", family, FAMILIES)
    return family
