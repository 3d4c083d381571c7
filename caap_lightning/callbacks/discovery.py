"""Which model of a LightningModule the callbacks explain (a ViT or a supported CNN), the head that completes a
headless ViT, and the check, in setup, that the classifier they explain is the module's own."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from caap_lightning.attribution import cnn
from caap_lightning.attribution.twins import SUPPORTED_VITS, unwrap_compiled, vit_kind
from caap_lightning.utils import IMAGENET_MEAN, IMAGENET_STD, eval_mode, normalize, output_logits

SUPPORTED = (
    "a get_attribution_model() method returning the model, a `model` attribute, or a single supported model "
    f"among the module's submodules: a ViT ({SUPPORTED_VITS}), or a CNN that ConvCAAP reads ({cnn.SUPPORTED})"
)
# Probe images that verify_attribution_model runs through both forwards: a few are enough to tell models apart.
VERIFY_IMAGES = 4


def is_vit(module: nn.Module) -> bool:
    """Whether ``module`` is a timm ViT (the family whose headless form a head of the module completes)."""
    return vit_kind(module) == "timm"


def is_supported(module: nn.Module) -> bool:
    """Whether the callbacks can attribute ``module`` as it is: a ViT :func:`vit_kind` knows, or a CNN
    ``conv_stages`` reads."""
    return vit_kind(module) is not None or cnn.is_supported(module)


def _supported_paths(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(attribute path, model)`` of every supported model in ``module`` (each object once), outermost only:
    a supported model inside another (a timm ViT in a Hugging Face wrapper) is part of it."""
    found: List[Tuple[str, nn.Module]] = []
    for path, m in module.named_modules():
        if is_supported(m) and not any(path.startswith(f"{outer}.") or not outer for outer, _ in found):
            found.append((path, m))
    return found


def _path_list(paths: List[str]) -> str:
    return ", ".join(repr(p) for p in paths)


def find_model(pl_module: nn.Module) -> nn.Module:
    """The model to explain: ``get_attribution_model()``, ``.model``, the module itself, or its one supported model.

    ``.model`` is taken as it is unless it merely wraps supported models (a backbone and head
    in one ``nn.Module``): then the model is looked up among all the submodules, like for
    ``self.backbone``. A ``.model`` that is neither is returned for the methods to judge. A
    ``torch.compile``d model, wherever it comes from, is unwrapped: the methods drive its modules.
    """
    hook = getattr(pl_module, "get_attribution_model", None)
    if callable(hook):
        return unwrap_compiled(hook())
    pl_module = unwrap_compiled(pl_module)
    inner = getattr(pl_module, "model", None)
    if isinstance(inner, nn.Module):
        inner = unwrap_compiled(inner)
        if is_supported(inner) or not _supported_paths(inner):
            return inner
    if is_supported(pl_module):
        return pl_module
    found = _supported_paths(pl_module)
    if len(found) == 1:
        return unwrap_compiled(found[0][1])
    if found:
        listed = ", ".join(f"{p!r} ({type(m).__name__})" for p, m in found)
        raise ValueError(
            f"it holds {len(found)} supported models ({listed}); define get_attribution_model() returning the "
            "one to explain."
        )
    raise ValueError(f"no supported ViT nor CNN found; the callbacks attribute {SUPPORTED}.")


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


def _head_container(pl_module: nn.Module, vit: nn.Module, path: str) -> str:
    """The path of the head holding the submodule at ``path``: its outermost ancestor that holds no part of the
    ViT and that is a module with a forward of its own (not the LightningModule, a ModuleList or a ModuleDict).

    A head ``Sequential(LayerNorm, Linear)`` or ``Linear-ReLU-Linear`` is the whole ``Sequential``, not the
    ``nn.Linear`` in it that takes the ViT's features.
    """
    vit_parts = {id(m) for m in vit.modules()}
    head = path
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        ancestor = pl_module.get_submodule(".".join(parts[:end]))
        if isinstance(ancestor, (nn.ModuleList, nn.ModuleDict)):
            break
        if any(id(m) in vit_parts for m in ancestor.modules()):
            break
        head = ".".join(parts[:end])
    return head


def _linear_head(pl_module: nn.Module, vit: nn.Module) -> nn.Module:
    """The one head holding the ``nn.Linear`` layers that take the ViT's ``num_features`` (:func:`_head_container`)."""
    linears = [(p, m) for p, m in _outside(pl_module, vit) if isinstance(m, nn.Linear)]
    fitting = [p for p, m in linears if m.in_features == vit.num_features]
    heads = list(dict.fromkeys(_head_container(pl_module, vit, p) for p in fitting))
    if len(heads) == 1:
        return pl_module.get_submodule(heads[0])
    remedy = "pass head='<attribute path>' to the callback or define get_attribution_head()"
    if heads:
        held = "" if heads == fitting else f", in the heads {_path_list(heads)}"
        raise ValueError(
            f"the ViT has no head (num_classes=0) and {len(fitting)} nn.Linear layers take its "
            f"{vit.num_features} features ({_path_list(fitting)}){held}; {remedy}."
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
    ``"classifier"``, ``"heads.0"``), else the one head outside the ViT whose ``nn.Linear`` takes its
    ``num_features`` (the whole ``Sequential`` or head module that holds it). A supported CNN keeps its own head.
    """
    if cnn.is_supported(model):
        _check_cnn_head(model, head)
        return None
    # Only a timm ViT is completed by a head of the module's; any other model's own head gives its outputs.
    num_classes = getattr(model, "num_classes", None) if is_vit(model) else None
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


def names_its_classifier(pl_module: nn.Module, model: nn.Module, head: Optional[str] = None) -> bool:
    """Whether the module names the whole classifier the callbacks explain: ``get_attribution_model()``, and for
    a headless timm ViT also ``get_attribution_head()`` or ``head=``. Such a classifier is the user's word and is
    not compared with the module's forward, whose outputs may be features or several things."""
    if not callable(getattr(pl_module, "get_attribution_model", None)):
        return False
    headless = is_vit(model) and getattr(model, "num_classes", None) == 0
    return not headless or head is not None or callable(getattr(pl_module, "get_attribution_head", None))


# ---------------------------------------------------------------------- the classifier is the module's
def check_class_scores(logits: torch.Tensor, what: str = "the model") -> None:
    """``ValueError`` for outputs that cannot be explained as class scores ``(B, num_classes)``: another shape,
    a single output per image (a one-logit binary model), or NaN/inf on some image (named)."""
    if logits.dim() != 2:
        raise ValueError(
            f"{what} gives outputs of shape {tuple(logits.shape)}, not class scores (B, num_classes); the callbacks "
            "explain a classifier: return the logits from get_attribution_model() (and get_attribution_head())"
        )
    if logits.shape[1] == 1:
        raise ValueError(
            f"{what} gives one output per image (a one-logit binary classifier, e.g. trained with "
            "BCEWithLogitsLoss): the softmax of a single score is always 1, so every map would be flat, "
            "insertion would equal deletion and the model tests could compare no classes. Give it two outputs: "
            "BinaryAsTwoClasses(head) (caap_lightning.callbacks.discovery) returns torch.cat([torch.zeros_like(z), "
            "z], dim=1), whose softmax (1 - sigmoid(z), sigmoid(z)) holds BCE's probabilities, class 1 the positive "
            "one (for a timm ViT: build it with num_classes=0 and return BinaryAsTwoClasses(self.head) from "
            "get_attribution_head()); or train it with two classes and cross-entropy"
        )
    rows = nonfinite_rows(logits)
    if rows:
        raise ValueError(
            f"{what} gives NaN or inf outputs on probe image(s) {rows}: no class can be read from them (a NaN "
            "argmaxes to class 0); the training has diverged or the images are broken"
        )


class BinaryAsTwoClasses(nn.Module):
    """A one-logit binary head ``z`` as two class scores ``(0, z)``: their softmax is ``(1 - sigmoid(z),
    sigmoid(z))``, the probabilities BCE gives, so class 1 is the positive class and class 0 the negative one."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = output_logits(self.head(features))
        return torch.cat([torch.zeros_like(z), z], dim=-1)


def nonfinite_rows(logits: torch.Tensor) -> List[int]:
    """The images (rows of ``logits`` ``(B, C)``) with a NaN or inf output: their class cannot be read."""
    return (~torch.isfinite(logits.detach().float()).all(-1)).nonzero()[:, 0].tolist()


def verify_attribution_model(
    pl_module: nn.Module,
    classifier: nn.Module,
    images: torch.Tensor,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    against_forward: bool = True,
) -> Optional[str]:
    """Check, on the first :data:`VERIFY_IMAGES` ``images``, that ``classifier`` (what the callbacks explain)
    gives class scores and, with ``against_forward``, the outputs of the module's own forward.

    Both run without grad, in eval mode, with the module's ``training`` flags and every random
    generator restored after. ``ValueError`` when the outputs differ, naming the largest difference,
    the modules the forward ran around the classifier or the normalisation it applies, and the
    remedies. Returns a sentence to warn with where either forward fails on the images (nothing is
    then compared), else ``None``.
    """
    parameter = next(classifier.parameters(), None)
    if parameter is not None:
        images = images.to(device=parameter.device, dtype=parameter.dtype)
    images = images[:VERIFY_IMAGES]
    with _untouched(pl_module, classifier, images.device):
        try:
            explained = classifier(images)
        except Exception as exc:  # not a setting to refuse: each check runs it again and reports where it fails
            return (
                f"the attribution model ({_describe(classifier)}) failed on a batch of probe images "
                f"({type(exc).__name__}: {exc}), so it could not be checked; the checks report where it fails."
            )
        check_class_scores(explained, f"the attribution model ({type(classifier).__name__})")
        # A module without a forward of its own has no outputs to compare with: nothing to say.
        if not against_forward or not _has_own_forward(pl_module):
            return None
        ran: List[Tuple[str, str, str]] = []
        try:
            with _recording_outside(pl_module, classifier, ran):
                own = output_logits(pl_module(images))
        except Exception as exc:  # any failure: the forward does not take a batch of images
            return (
                f"the attribution model could not be compared with {type(pl_module).__name__}'s forward, which "
                f"failed on a batch of probe images ({type(exc).__name__}: {exc}); define get_attribution_model() "
                "(and get_attribution_head() for a headless ViT) to name the classifier to explain."
            )
        if _same_outputs(own, explained):
            return None
        rows = nonfinite_rows(own)
        if rows:
            raise ValueError(
                f"{type(pl_module).__name__}'s forward gives NaN or inf outputs on probe image(s) {rows}; the "
                "training has diverged or the images are broken"
            )
        raise ValueError(_mismatch(pl_module, classifier, images, own, explained, ran, mean, std))


def _has_own_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class (not torch's or Lightning's base) defines ``forward``."""
    forward = type(module).forward
    library = (getattr(forward, "__module__", None) or "").split(".")[0]  # None for code run by exec()
    return forward is not nn.Module.forward and library not in ("lightning", "pytorch_lightning")


def _comparable(own: torch.Tensor, explained: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The module's outputs and the attribution model's, as the same quantity."""
    if own.dim() == 2 and own.shape[1] == 1 and explained.shape == (own.shape[0], 2):
        # A one-logit module explained through BinaryAsTwoClasses: its logit is the classes' difference.
        explained = explained[:, 1:] - explained[:, :1]
    return own, explained


def _same_outputs(own: torch.Tensor, explained: torch.Tensor) -> bool:
    """Whether the module's outputs are the attribution model's logits, or their softmax or log-softmax (a
    forward that ends in one explains the same classifier: the callbacks softmax the logits themselves)."""
    own, explained = _comparable(own, explained)
    if own.shape != explained.shape:
        return False
    # The same modules on the same images agree to rounding; half precisions round more coarsely.
    tolerance = 1e-2 if min(own.element_size(), explained.element_size()) < 4 else 1e-4
    own, explained = own.detach().float(), explained.detach().float()
    forms = (explained, explained.softmax(-1), explained.log_softmax(-1))
    return any(bool(torch.allclose(own, form, rtol=tolerance, atol=tolerance)) for form in forms)


def _difference(own: torch.Tensor, explained: torch.Tensor) -> str:
    own, explained = _comparable(own, explained)
    if own.shape != explained.shape:
        return (
            f"the module's forward gives outputs of shape {tuple(own.shape)}, the attribution model "
            f"{tuple(explained.shape)}"
        )
    gap = float((own.detach().float() - explained.detach().float()).abs().max())
    return f"their outputs differ by up to {gap:.3g}"


def _mismatch(
    pl_module: nn.Module, classifier: nn.Module, images: torch.Tensor, own: torch.Tensor, explained: torch.Tensor,
    ran: List[Tuple[str, str, str]], mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
) -> str:
    name = type(pl_module).__name__
    lines = [
        f"the attribution model ({_describe(classifier)}) is not {name}'s classifier: on {len(images)} probe images "
        f"{_difference(own, explained)}."
    ]
    around = [
        f"{', '.join(f'{path!r} ({kind})' for w, path, kind in ran if w == when)} {when} it"
        for when in ("before", "after")
        if any(w == when for w, _, _ in ran)
    ]
    if around:
        lines.append(f"The module's forward also runs {' and '.join(around)}.")
    normaliser = _normalisation_in_forward(classifier, images, own, mean, std)
    if normaliser is not None:
        lines.append(
            f"Its forward normalises the images itself (its outputs equal the attribution model's on the images "
            f"normalised with mean={normaliser[0]}, std={normaliser[1]}), but the callbacks give the attribution "
            "model the images as the data gives them: move that normalisation into the data's transforms "
            f"(v2.Normalize(mean, std)) and give the callback mean=/std= (not mean=0, std=1)."
        )
    lines.append(
        "Name the classifier that gives the module's outputs: get_attribution_model() returning it (a timm ViT "
        "built with num_classes=0 is completed by get_attribution_head() or head='<attribute path>', which may be "
        "a whole nn.Sequential head)."
    )
    return " ".join(lines)


def _describe(classifier: nn.Module) -> str:
    parts = [type(getattr(classifier, "vit", classifier)).__name__]
    head = getattr(classifier, "head", None) if hasattr(classifier, "vit") else None
    if head is not None:
        parts.append(f"head {type(head).__name__}")
    return " + ".join(parts)


def _normalisation_in_forward(
    classifier: nn.Module, images: torch.Tensor, own: torch.Tensor, mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """The ``(mean, std)`` with which the classifier, on the normalised images, gives the module's outputs."""
    candidates = [(tuple(mean), tuple(std))] if mean is not None and std is not None else []
    candidates += [(IMAGENET_MEAN, IMAGENET_STD), ((0.5,) * 3, (0.5,) * 3)]
    for m, s in dict.fromkeys(candidates):
        if images.shape[1] == len(m) and _same_outputs(own, classifier(normalize(images, m, s))):
            return m, s
    return None


@contextlib.contextmanager
def _untouched(pl_module: nn.Module, classifier: nn.Module, device: torch.device) -> Iterator[None]:
    """No grad, both modules in eval mode (their ``training`` flags restored) and every random generator restored."""
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), eval_mode(pl_module), eval_mode(classifier):
        yield


@contextlib.contextmanager
def _recording_outside(pl_module: nn.Module, classifier: nn.Module, ran: List[Tuple[str, str, str]]) -> Iterator[None]:
    """Append ``(when, path, type)`` for each outermost module of ``pl_module`` outside ``classifier`` that a forward
    runs, ``when`` being ``"before"`` or ``"after"`` the classifier's first module started."""
    inside = {id(m) for m in classifier.modules()}
    holders = {id(m) for m in pl_module.modules() if id(m) not in inside and any(id(c) in inside for c in m.modules())}
    state = {"started": False, "depth": 0}

    def start_inside(module: nn.Module, args: Any) -> None:
        state["started"] = True

    def enter(module: nn.Module, args: Any) -> None:
        state["depth"] += 1

    def leave(path: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            state["depth"] -= 1
            if state["depth"] == 0:
                ran.append(("after" if state["started"] else "before", path, type(module).__name__))

        return hook

    handles = []
    try:
        for path, module in pl_module.named_modules():
            if id(module) in inside:
                handles.append(module.register_forward_pre_hook(start_inside))
            elif path and id(module) not in holders:
                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave(path)))
        yield
    finally:
        for handle in handles:
            handle.remove()
