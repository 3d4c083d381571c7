"""Which model of a LightningModule the callbacks explain (a timm ViT or a supported CNN), and the head that
completes a headless ViT."""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import nn

from caap_lightning.attribution import cnn

SUPPORTED = (
    "a get_attribution_model() method returning the model, a `model` attribute, or a single supported model "
    f"among the module's submodules: a timm VisionTransformer, or a CNN that ConvCAAP reads ({cnn.SUPPORTED})"
)


def _vit_class() -> type:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def is_vit(module: nn.Module) -> bool:
    return isinstance(module, _vit_class())


def is_supported(module: nn.Module) -> bool:
    """Whether the callbacks can attribute ``module`` as it is: a timm ViT, or a CNN ``conv_stages`` reads."""
    return is_vit(module) or cnn.is_supported(module)


def _supported_paths(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(attribute path, model)`` of every supported model in ``module`` (each object once)."""
    return [(path, m) for path, m in module.named_modules() if is_supported(m)]


def _path_list(paths: List[str]) -> str:
    return ", ".join(repr(p) for p in paths)


def find_model(pl_module: nn.Module) -> nn.Module:
    """The model to explain: ``get_attribution_model()``, ``.model``, the module itself, or its one supported model.

    ``.model`` is taken as it is unless it merely wraps supported models (a backbone and head
    in one ``nn.Module``): then the model is looked up among all the submodules, like for
    ``self.backbone``. A ``.model`` that is neither is returned for the methods to judge.
    """
    hook = getattr(pl_module, "get_attribution_model", None)
    if callable(hook):
        return hook()
    inner = getattr(pl_module, "model", None)
    if isinstance(inner, nn.Module) and (is_supported(inner) or not _supported_paths(inner)):
        return inner
    if is_supported(pl_module):
        return pl_module
    found = _supported_paths(pl_module)
    if len(found) == 1:
        return found[0][1]
    if found:
        listed = ", ".join(f"{p!r} ({type(m).__name__})" for p, m in found)
        raise ValueError(
            f"it holds {len(found)} supported models ({listed}); define get_attribution_model() returning the "
            "one to explain."
        )
    raise ValueError(f"no timm VisionTransformer nor supported CNN found; the callbacks attribute {SUPPORTED}.")


def _outside(pl_module: nn.Module, vit: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(path, module)`` of every submodule of ``pl_module`` that is not part of ``vit``."""
    inside = {id(m) for m in vit.modules()}
    return [(path, m) for path, m in pl_module.named_modules() if path and id(m) not in inside]


def _named_head(pl_module: nn.Module, vit: nn.Module, path: str) -> nn.Module:
    try:
        module = pl_module.get_submodule(path)
    except AttributeError:
        linears = [p for p, m in _outside(pl_module, vit) if isinstance(m, nn.Linear)]
        raise ValueError(
            f"head={path!r} names no submodule of {type(pl_module).__name__}; its nn.Linear layers outside the "
            f"ViT are: {_path_list(linears) or 'none'}."
        ) from None
    if isinstance(module, nn.Linear) and module.in_features != vit.num_features:
        raise ValueError(
            f"head={path!r} takes {module.in_features} features but the ViT gives {vit.num_features}; "
            "name the layer that takes the ViT's pooled features."
        )
    return module


def _linear_head(pl_module: nn.Module, vit: nn.Module) -> nn.Module:
    linears = [(p, m) for p, m in _outside(pl_module, vit) if isinstance(m, nn.Linear)]
    fitting = [(p, m) for p, m in linears if m.in_features == vit.num_features]
    if len(fitting) == 1:
        return fitting[0][1]
    remedy = "pass head='<attribute path>' to the callback or define get_attribution_head()"
    if fitting:
        raise ValueError(
            f"the ViT has no head (num_classes=0) and {len(fitting)} nn.Linear layers take its "
            f"{vit.num_features} features ({_path_list([p for p, _ in fitting])}); {remedy}."
        )
    others = ", ".join(f"{p!r} ({m.in_features} in)" for p, m in linears) or "none"
    raise ValueError(
        f"the ViT has no head (num_classes=0) and no nn.Linear outside it takes its {vit.num_features} features "
        f"(nn.Linear layers outside the ViT: {others}); {remedy}."
    )


def _check_cnn_head(model: nn.Module, head: Optional[str]) -> None:
    """A CNN is attributed through its own head: ``head=`` and a headless timm CNN are refused."""
    if head is not None:
        raise ValueError(
            f"head={head!r} completes a timm ViT built with num_classes=0, but the attribution model "
            f"({type(model).__name__}) is a CNN, which is attributed through its own head; remove head=."
        )
    cnn.check_classifier(model, cnn.conv_stages(model))


def find_head(pl_module: nn.Module, model: nn.Module, head: Optional[str] = None) -> Optional[nn.Module]:
    """The module's own head of a ViT built with ``num_classes=0``; ``None`` for any other model.

    ``get_attribution_head()``, else the submodule at the attribute path ``head`` (e.g.
    ``"classifier"``, ``"heads.0"``), else the one ``nn.Linear`` outside the ViT that takes its
    ``num_features``. A supported CNN keeps its own head.
    """
    if not is_vit(model) and is_supported(model):
        _check_cnn_head(model, head)
        return None
    num_classes = getattr(model, "num_classes", None)
    if num_classes != 0:
        if head is not None:
            what = f"the ViT has its own head (num_classes={num_classes})"
            if num_classes is None:
                what = f"the attribution model ({type(model).__name__}) is not a headless timm ViT"
            raise ValueError(
                f"{what}, so head={head!r} would be ignored; remove head= or build the ViT with num_classes=0."
            )
        return None
    hook = getattr(pl_module, "get_attribution_head", None)
    if callable(hook):
        module = hook()
        if not isinstance(module, nn.Module):
            raise ValueError(f"get_attribution_head() returned {type(module).__name__}; it must return an nn.Module.")
        return module
    if head is not None:
        return _named_head(pl_module, model, head)
    return _linear_head(pl_module, model)


def find_attribution_model(pl_module: nn.Module, head: Optional[str] = None) -> Tuple[nn.Module, Optional[nn.Module]]:
    """``(model, head)``: the model to explain and, for a ViT built with ``num_classes=0``, the head that completes it.

    Walks the module tree only (no forward), so the callbacks call it at every check and pick
    up a model swapped during the fit (an averaged copy, ``configure_model``).
    """
    model = find_model(pl_module)
    return model, find_head(pl_module, model, head)
