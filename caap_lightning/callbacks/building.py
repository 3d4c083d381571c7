"""How CAAPCallback finds the model to attribute and builds each attribution method for it."""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from caap_lightning.attribution import cnn, registry
from caap_lightning.attribution.twins import SUPPORTED_VITS, unwrap_compiled
from caap_lightning.callbacks.arguments import check_method_kwargs, check_model_images
from caap_lightning.callbacks.discovery import find_attribution_model, names_its_classifier, verify_attribution_model
from caap_lightning.callbacks.drawing import display_name
from caap_lightning.datamodules.base import ProbeBatch


def find_model(pl_module: nn.Module, head: Optional[str]) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The model to attribute (unwrapped where compiled) and a headless ViT's head, or a ``ValueError`` saying why
    there is none."""
    try:
        model, found_head = find_attribution_model(pl_module, head)
    except ValueError as exc:
        raise ValueError(f"CAAPCallback cannot attribute {type(pl_module).__name__}: {exc}") from exc
    return unwrap_compiled(model), found_head


def cannot_attribute(pl_module: nn.Module, model: nn.Module, exc: Exception, method: Optional[str] = None) -> ValueError:
    """The error for a model, or a method's settings, that the check cannot attribute: what to change."""
    which = "" if method is None else f" with {display_name(method)}"
    return ValueError(
        f"CAAPCallback cannot attribute {type(pl_module).__name__} (attribution model: "
        f"{type(model).__name__}){which}: {exc} Return a supported ViT ({SUPPORTED_VITS}) or a supported "
        f"CNN ({cnn.SUPPORTED}) from get_attribution_model(), change the method's settings, or remove the callback."
    )


def build_methods(
    pl_module: nn.Module, names: Sequence[str], model: nn.Module, head: Optional[nn.Module], family: str,
    caap_settings: Dict[str, Any], method_kwargs: Dict[str, Dict[str, Any]], probe_images: torch.Tensor,
) -> Dict[str, Any]:
    """Each method of ``names`` built for ``model``, checked on one probe image; the error names the method."""
    methods = {}
    for name in names:
        try:
            methods[name] = build_method(name, model, head, caap_settings, method_kwargs.get(name, {}))
        except ValueError as exc:
            raise cannot_attribute(pl_module, model, exc, name) from exc
    try:
        check_model_images(model, probe_images[:1])
    except ValueError as exc:
        raise cannot_attribute(pl_module, model, exc) from exc
    return methods


def build_method(
    name: str, model: nn.Module, head: Optional[nn.Module], caap_settings: Dict[str, Any], kwargs: Dict[str, Any]
) -> Any:
    """The model family's ``name``: CAAP with the callback's ``caap_settings``, or a baseline with its ``kwargs``
    (and the data's mean/std, from ``caap_settings``, where it takes them)."""
    method_class = registry.method_class(name, model)
    takes = inspect.signature(method_class).parameters
    if name == "caap":
        # A CNN's CAAP takes no window or head: check_family_settings refused them where given.
        settings = {**caap_settings, "head": head}
        return registry.get_method(name, model, **{k: v for k, v in settings.items() if k in takes})
    kwargs = dict(kwargs)
    check_method_kwargs(name, method_class, kwargs)
    for arg, value in (("mean", caap_settings["mean"]), ("std", caap_settings["std"]), ("head", head)):
        if arg in takes:
            kwargs.setdefault(arg, value)
    return registry.get_method(name, model, **kwargs)


def verify_classifier(
    pl_module: nn.Module, model: nn.Module, classifier: nn.Module, probe: ProbeBatch, mean: Sequence[float],
    std: Sequence[float], head: Optional[str], warn: bool,
) -> None:
    """Refuse a classifier whose outputs differ from the module's own forward, since the maps would explain another
    model than the one trained (unless the module names its classifier itself); with ``warn``, say where the
    comparison could not run."""
    try:
        note = verify_attribution_model(pl_module, classifier, probe.images, mean, std,
                                        against_forward=not names_its_classifier(pl_module, model, head))
    except ValueError as exc:
        raise ValueError(f"CAAPCallback cannot attribute {type(pl_module).__name__}: {exc}") from exc
    if note and warn:
        rank_zero_warn(f"CAAPCallback: {note}")
