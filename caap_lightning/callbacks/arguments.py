"""The callbacks' argument checks: each fails at construction (or, for what needs the model or the Trainer, in
setup), saying what to change."""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from caap_lightning.attribution import cnn, registry
from caap_lightning.attribution.blanks import BLANK_KINDS
from caap_lightning.attribution.caap import CONSTRUCTIONS as VIT_CONSTRUCTIONS, SCORES
from caap_lightning.attribution.selection import SELECTIONS
from caap_lightning.callbacks.errors import ON_ERROR
from caap_lightning.callbacks.metric_table import METRIC_NAMES
from caap_lightning.checks import check_images

TARGETS = ("predicted", "label")
PRECISIONS = ("trainer", "32")
# CAAP's constructions on each model family (registry.family_of), and the one used where none is given:
# each family's own default (docs/callbacks.md says why the ViT's is not the windowed one).
FAMILY_CONSTRUCTIONS = {"vit": VIT_CONSTRUCTIONS, "cnn": cnn.CONSTRUCTIONS}
DEFAULT_CONSTRUCTION = {"vit": "parallel", "cnn": "standard"}
DEFAULT_WINDOW = 2  # patches around each patch that construction="windowed" recomputes
DEFAULT_PROBE_IMAGES = 16  # CAAPCallback's num_images: few enough attributions for a check on every epoch
# The swap probe's size where `swap_images` is not given: the size SpuriousCueMonitor's default threshold was chosen on.
DEFAULT_SWAP_IMAGES = 64
FAMILY_NAMES = {"vit": "a timm ViT", "cnn": "a CNN"}


def check_sizes(every_n_epochs: int, num_images: int, swap_images: Optional[int], max_images_logged: int) -> None:
    if every_n_epochs < 1 or num_images < 1 or (swap_images is not None and swap_images < 2) or max_images_logged < 0:
        raise ValueError(
            f"need every_n_epochs >= 1, num_images >= 1, swap_images >= 2 (a swap pairs two images) and "
            f"max_images_logged >= 0; got every_n_epochs={every_n_epochs}, num_images={num_images}, "
            f"swap_images={swap_images}, max_images_logged={max_images_logged}"
        )


def check_caap_settings(
    layer_cutoff: Any, construction: Optional[str], window: Optional[int], selection: str, blank: str, score: str
) -> None:
    """``ValueError`` for a CAAP setting of no valid form (what needs the model is checked in setup)."""
    check_cutoff_form(layer_cutoff)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ValueError(f"window must be an int >= 0 (patches around each patch) or None, got {window!r}")
    if construction is not None and construction not in {c for family in FAMILY_CONSTRUCTIONS.values() for c in family}:
        raise ValueError(
            f"construction={construction!r} is not one of {VIT_CONSTRUCTIONS} (a ViT's) or {cnn.CONSTRUCTIONS} "
            "(a CNN's), or None (the model family's default)"
        )
    check_choices(selection=(selection, tuple(SELECTIONS)), blank=(blank, BLANK_KINDS), score=(score, SCORES))


def check_choices(**given: Tuple[str, Sequence[str]]) -> None:
    """``ValueError`` for an argument outside its choices: ``check_choices(target=(target, TARGETS))``."""
    for name, (value, choices) in given.items():
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


def check_prefix(prefix: str) -> None:
    if not prefix or "/" in prefix:
        raise ValueError(f"prefix must be a non-empty name without '/', got {prefix!r}")


def check_run_settings(insertion_deletion_steps: Optional[int], target: str, on_error: str, precision: str) -> None:
    if insertion_deletion_steps is not None and insertion_deletion_steps < 1:
        raise ValueError(
            f"insertion_deletion_steps must be >= 1 or None (one patch per step), got {insertion_deletion_steps}"
        )
    check_choices(target=(target, TARGETS), on_error=(on_error, ON_ERROR), precision=(precision, PRECISIONS))


def check_metrics(metrics: Optional[Sequence[str]]) -> None:
    if metrics is None:
        return
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown or len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics {list(metrics)} must be distinct names from {list(METRIC_NAMES)}; unknown: {unknown}")


def check_methods(methods: List[str], method_kwargs: Dict[str, Dict[str, Any]], layer_cutoff: Any = None) -> None:
    """``ValueError`` for method names the registry lacks or repeats, misplaced or unknown ``method_kwargs``,
    ``occlusion`` without captum, and ``layer_cutoff="auto"`` without CAAP: at construction, not mid-training."""
    available = registry.available_methods()
    unknown = [m for m in methods if m not in available]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods {methods} must be one or more distinct names from {available}; unknown: {unknown}")
    misplaced = [name for name in method_kwargs if name not in methods or name == "caap"]
    if misplaced:
        raise ValueError(
            f"method_kwargs has {misplaced}, but its keys must be methods in `methods` ({methods}) other than 'caap': "
            "CAAP takes the callback's own layer_cutoff, selection, blank, construction and window"
        )
    for name, kwargs in method_kwargs.items():
        check_method_kwargs(name, registry.METHODS[name], kwargs)
    if "occlusion" in methods and importlib.util.find_spec("captum") is None:
        raise ValueError("the occlusion method needs captum, which is not installed: pip install 'caap-lightning[baselines]'")
    if layer_cutoff == "auto" and "caap" not in methods:
        raise ValueError(f"layer_cutoff='auto' calibrates CAAP, which is not in methods={methods}; add 'caap' or drop it")


def check_cutoff_form(layer_cutoff: Any) -> None:
    """``ValueError`` for a ``layer_cutoff`` of no valid form; a stage name is checked in setup, against the CNN's."""
    if layer_cutoff is None or isinstance(layer_cutoff, str) and layer_cutoff:
        return
    if isinstance(layer_cutoff, int) and not isinstance(layer_cutoff, bool) and layer_cutoff >= 0:
        return
    raise ValueError(
        f"layer_cutoff must be an int >= 0, None (the middle), a CNN's stage name or 'auto' (calibrated), "
        f"got {layer_cutoff!r}"
    )


def check_method_kwargs(name: str, method_class: type, kwargs: Dict[str, Any]) -> None:
    """``ValueError`` for a ``method_kwargs[name]`` argument that ``method_class`` does not take."""
    takes = [p for p in inspect.signature(method_class).parameters if p != "model"]
    wrong = [k for k in kwargs if k not in takes]
    if wrong:
        raise ValueError(f"method_kwargs[{name!r}] has {wrong}, which {method_class.__name__} does not take; it takes {takes}")


def check_family_settings(
    family: str, construction: Optional[str], grid: Any, window: Optional[int], layer_cutoff: Union[None, int, str]
) -> None:
    """CAAP settings given that only the other model family takes: refused, saying what to change."""
    choices = FAMILY_CONSTRUCTIONS[family]
    if construction is not None and construction not in choices:
        raise ValueError(
            f"construction={construction!r} does not apply to {FAMILY_NAMES[family]}, whose CAAP constructions are "
            f"{choices} (default {DEFAULT_CONSTRUCTION[family]!r}); pass one of those, or leave construction unset."
        )
    if family == "vit" and grid is not None:
        raise ValueError(
            f"grid={grid} sets a CNN's patch grid; a ViT's maps are on its own patches (image size / "
            "patch size): remove grid=."
        )
    if family == "cnn" and window is not None:
        raise ValueError(
            f"window={window} is the radius of a ViT's windowed construction, which a CNN does not have; "
            "remove window=."
        )
    if family == "vit" and isinstance(layer_cutoff, str) and layer_cutoff != "auto":
        raise ValueError(
            f"layer_cutoff={layer_cutoff!r} names a stage, which only a CNN has; a ViT's layer_cutoff is a "
            "number of blocks (an int), None (half of them) or 'auto'."
        )


def check_model_images(model: nn.Module, images: torch.Tensor) -> None:
    """The checks that the attribution methods of ``model`` make of their images, in setup."""
    check_images(model, images)


def check_unique_prefix(trainer: Any, cls: type, prefix: str, remedy: str) -> None:
    """Two instances of ``cls`` logging under one prefix would overwrite each other's scalars."""
    same = [cb for cb in trainer.callbacks if isinstance(cb, cls) and cb.prefix == prefix]
    if len(same) > 1:
        raise ValueError(
            f"the Trainer has {len(same)} {cls.__name__}s with prefix={prefix!r}; give each its own prefix {remedy}"
        )


def warn_if_never_run(trainer: Any, every_n_epochs: int, has_validation: bool) -> None:
    """One warning for a fit in which no check can happen: it would otherwise say nothing at all."""
    if not has_validation:
        rank_zero_warn(
            "CAAPCallback runs at the end of validation, but this fit has no validation loop "
            "(no val dataloader, or limit_val_batches=0): it will never check. Give the fit validation data."
        )
        return
    max_epochs, every_val = trainer.max_epochs, trainer.check_val_every_n_epoch
    if max_epochs is None or max_epochs < 0 or every_val is None:
        return
    if not any((e + 1) % every_n_epochs == 0 and (e + 1) % every_val == 0 for e in range(max_epochs)):
        rank_zero_warn(
            f"CAAPCallback(every_n_epochs={every_n_epochs}) never runs in this fit of max_epochs={max_epochs} "
            f"with check_val_every_n_epoch={every_val}: lower every_n_epochs."
        )
