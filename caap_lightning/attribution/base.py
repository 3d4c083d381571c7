"""The base of every attribution method: one call shape, ``Method(model).attribute(images, target=...)``.

``AttributionMethod`` checks the images, the target and the weights, puts the model in eval mode
(restoring every flag afterwards), moves the images to the model's device and dtype, and upsamples
on request; a method implements ``_attribute(images, targets) -> (B, gh, gw)``. What differs between
model families (the classifier, the input checks, the patch grid, Grad-CAM's layer) is an adapter:
a ViT (timm's, or a Hugging Face or torchvision one through its timm twin) or a CNN that ConvCAAP reads.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from caap_lightning.attribution import stages, vit
from caap_lightning.attribution.twins import SUPPORTED_VITS, unwrap_compiled, vit_kind
from caap_lightning.checks import TargetLike, check_finite_weights, check_images, check_target, model_device_dtype
from caap_lightning.utils import eval_mode, upsample_maps

GridLike = stages.GridLike
FAMILIES = ("vit", "cnn")

# Logits, the activations Grad-CAM reads (in the graph) and how to lay them out as (B, C, gh, gw).
_CamForward = Tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def family_of(model: nn.Module) -> str:
    """``"vit"`` for a Vision Transformer (timm's, one with ``patch_embed.patch_size``, or a Hugging Face
    or torchvision one: :func:`twins.vit_kind`), ``"cnn"`` for a CNN that ConvCAAP reads
    (:func:`stages.conv_stages`), either also compiled; a ``ValueError`` naming both otherwise."""
    model = unwrap_compiled(model)
    if vit_kind(model) or getattr(getattr(model, "patch_embed", None), "patch_size", None) is not None:
        return "vit"
    if stages.is_supported(model):
        return "cnn"
    raise ValueError(
        f"{type(model).__name__} is not a model the attribution methods read: they take a timm Vision "
        f"Transformer (a model with `patch_embed.patch_size`) or a CNN ({stages.SUPPORTED}), or another ViT "
        f"({SUPPORTED_VITS}); pass that model itself, not the module that holds it"
    )


class _ViTAdapter:
    """How the methods read a ViT (through its timm form): the ViT (and ``head``) as classifier, its patch grid."""

    def __init__(self, model: nn.Module, head: Optional[nn.Module], grid: GridLike) -> None:
        if grid is not None:
            raise ValueError(
                f"grid={grid!r} is for CNNs: a ViT's maps are on its own patch grid (image size / patch size); "
                "remove grid="
            )
        self.classifier = vit.Classifier(model, head)
        self.num_classes = self.classifier.num_classes
        self.model, self.head = self.classifier.vit, head  # a Hugging Face or torchvision ViT's timm twin
        self.channels: int = self.model.patch_embed.proj.in_channels

    def check_weights(self) -> None:
        check_finite_weights(self.model, self.head)

    def grid(self, images: torch.Tensor) -> Tuple[int, int]:
        return vit.grid_size(self.model, *images.shape[-2:])

    def cam_forward(self, images: torch.Tensor) -> _CamForward:
        """Grad-CAM's activations: the output of ``blocks[-1].norm1``, at the patch tokens."""
        captured = []
        hook = self.model.blocks[-1].norm1.register_forward_hook(lambda m, args, out: captured.append(out))
        try:
            logits = self.classifier(images)
        finally:
            hook.remove()
        P, grid = self.model.num_prefix_tokens, self.grid(images)
        return logits, captured[-1], lambda tokens: tokens[:, P:].unflatten(1, grid).movedim(-1, 1)


class _CNNAdapter:
    """How the methods read a supported CNN: the model as classifier, ``grid`` or its last map's grid."""

    def __init__(self, model: nn.Module, head: Optional[nn.Module], grid: GridLike) -> None:
        if head is not None:
            raise ValueError(
                f"head= is for a ViT built with num_classes=0; {type(model).__name__}'s own head gives its "
                "logits: remove head="
            )
        model = unwrap_compiled(model)
        self.table = stages.conv_stages(model)
        stages.check_classifier(model, self.table)
        self.classifier = model
        self.num_classes = self.table.num_classes
        self.model = model
        self.channels = stages.in_channels(self.table)
        self.fixed_grid = stages.check_grid(grid)
        self._stage_grids: Dict[Tuple[int, int], Tuple[int, int]] = {}  # image size -> the last stage's grid

    def check_weights(self) -> None:
        check_finite_weights(self.model)

    def grid(self, images: torch.Tensor) -> Tuple[int, int]:
        size = tuple(images.shape[-2:])
        if self.fixed_grid is None:
            # The last map's size depends on the image size only: one forward of one image per size.
            if size not in self._stage_grids:
                with torch.no_grad():
                    x = images[:1]
                    for stage in self.table.stages:
                        x = stage(x)
                self._stage_grids[size] = tuple(x.shape[-2:])
            return self._stage_grids[size]
        if self.fixed_grid[0] > size[0] or self.fixed_grid[1] > size[1]:
            raise ValueError(
                f"grid={self.fixed_grid} is finer than the images ({size[0]}x{size[1]} pixels); pick a grid of "
                f"at most {size}"
            )
        return self.fixed_grid

    def cam_forward(self, images: torch.Tensor) -> _CamForward:
        """Grad-CAM's activations: the last stage's feature map, already laid out as maps."""
        x = images
        for stage in self.table.stages:
            x = stage(x)
        return self.table.head(x), x, lambda maps: maps


_ADAPTERS = {"vit": _ViTAdapter, "cnn": _CNNAdapter}


class AttributionMethod:
    """Base of every attribution method (CAAP, ConvCAAP, the baselines): input checks, targets, the
    head, eval mode, optional upsampling.

    Subclasses implement ``_attribute(images, targets, **options) -> (B, gh, gw)``, where
    ``options`` are a method's own per-call arguments (CAAP's ``relative``); ``images`` are
    already checked and on the model's device and dtype, ``targets`` are checked class
    indices (or ``None``), and the model and head are in eval mode. Logits come from
    ``self.classifier`` (a ViT, then ``head`` where given; or the CNN itself); ``self.adapter``
    holds what differs between the families (the classifier, the grid, Grad-CAM's layer).
    """

    def __init__(self, model: nn.Module, head: Optional[nn.Module] = None, grid: GridLike = None) -> None:
        self.family = family_of(model)
        self.adapter = _ADAPTERS[self.family](model, head, grid)
        self.classifier = self.adapter.classifier
        self.model = self.adapter.model  # what the method reads: a ViT's timm model, an uncompiled model
        self.head = head

    def attribute(
        self, images: torch.Tensor, target: TargetLike = None, upsample: bool = False, **options: Any
    ) -> torch.Tensor:
        """Maps for a batch of normalised images ``(B, C, H, W)``.

        Args:
            target: class per image (int, list or tensor); ``None`` = the predicted class.
            upsample: return pixel maps ``(B, H, W)`` (bilinear) instead of ``(B, gh, gw)``.
        """
        check_images(self.model, images)
        device, dtype = model_device_dtype(self.model)
        if target is not None:
            target = check_target(target, len(images), self.adapter.num_classes, device)
        self.adapter.check_weights()
        images = images.to(device=device, dtype=dtype)
        with eval_mode(self.classifier):
            maps = self._attribute(images, target, **options).detach().float()
        if upsample:
            maps = upsample_maps(maps, tuple(images.shape[-2:]))
        return maps

    def _attribute(self, images: torch.Tensor, targets: Optional[torch.Tensor], **options: Any) -> torch.Tensor:
        raise NotImplementedError

    def _targets(self, targets: Optional[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """The checked ``targets``, or the arg-max of ``logits`` when ``None``."""
        if targets is None:
            return logits.detach().argmax(-1)
        # A copy: a target tensor made in inference mode (a validation loop's) cannot be saved for
        # backward by `gather`; one copied here, inside `_gradients()`, can.
        return targets.clone()

    def _grid(self, images: torch.Tensor) -> Tuple[int, int]:
        return self.adapter.grid(images)
