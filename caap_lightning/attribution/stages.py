"""A CNN as ``stem -> stages -> head``: the table ConvCAAP and the CNN baselines read a model by.

Each supported family (``SUPPORTED``) has a builder that names its stage boundaries (the cuts)
and shares the model's own modules; :func:`conv_stages` picks it, and refuses any other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caap_lightning.utils import eval_mode

SUPPORTED = (
    "torchvision ResNet, VGG, DenseNet and ConvNeXt; "
    "timm ResNet, VGG, DenseNet and ConvNeXt"
)
GridLike = Union[None, int, Tuple[int, int]]
# A cut between two stages: its index, its stage's name, None (the middle boundary) or "auto".
CutLike = Union[None, int, str]


@dataclass(frozen=True)
class ConvStages:
    """A CNN as ``stem -> stages -> head``, sharing the model's own modules.

    ``stages[0]`` is the stem; ``names[k]`` names the cut at the output of ``stages[k]``
    (``k = 0`` is the stem's output, ``k = len(stages) - 1`` the map entering the head).
    ``num_classes`` is what the head gives (``0``: a timm model built without a classifier;
    ``None``: the head has no ``Linear`` to read it from).
    """

    family: str
    names: Tuple[str, ...]
    stages: Tuple[Callable[[Tensor], Tensor], ...]
    head: Callable[[Tensor], Tensor]
    num_classes: Optional[int] = None

    @property
    def depth(self) -> int:
        """``S``: the number of stages after the stem (cuts are ``0..S``)."""
        return len(self.stages) - 1


def _linear_classes(module: nn.Module) -> Optional[int]:
    """A torchvision head's class count: its last ``Linear`` (a replaced head may wrap it in a Sequential)."""
    linears = [layer for layer in module.modules() if isinstance(layer, nn.Linear)]
    return linears[-1].out_features if linears else None


def _tv_resnet(m) -> ConvStages:
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    layers = (m.layer1, m.layer2, m.layer3, m.layer4)
    return ConvStages(
        "torchvision ResNet",
        ("stem", "layer1", "layer2", "layer3", "layer4"),
        (stem, *layers),
        lambda x: m.fc(torch.flatten(m.avgpool(x), 1)),
        _linear_classes(m.fc),
    )


def _timm_resnet(m) -> ConvStages:
    stem = nn.Sequential(m.conv1, m.bn1, m.act1, m.maxpool)
    layers = (m.layer1, m.layer2, m.layer3, m.layer4)
    names = ("stem", "layer1", "layer2", "layer3", "layer4")
    return ConvStages("timm ResNet", names, (stem, *layers), m.forward_head, m.num_classes)


def _vgg_blocks(m, family: str, head: Callable[[Tensor], Tensor], num_classes: Optional[int]) -> ConvStages:
    """``features`` split after each MaxPool; each block is named by its closing pool."""
    names, blocks, current = [], [], []
    for i, layer in enumerate(m.features):
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            names.append(f"features.{i}")
            blocks.append(nn.Sequential(*current))
            current = []
    if len(blocks) < 2:
        raise ValueError(
            f"{type(m).__name__}.features has {len(blocks)} MaxPool2d; ConvCAAP cuts VGG at its pools and needs two"
        )
    tail = nn.Sequential(*current)  # layers after the last pool, if any, run before the head
    return ConvStages(family, tuple(names), tuple(blocks), lambda x: head(tail(x)), num_classes)


def _tv_vgg(m) -> ConvStages:
    def head(x):
        return m.classifier(torch.flatten(m.avgpool(x), 1))

    return _vgg_blocks(m, "torchvision VGG", head, _linear_classes(m.classifier))


def _timm_vgg(m) -> ConvStages:
    return _vgg_blocks(m, "timm VGG", m.forward_head, m.num_classes)


def _densenet_blocks(
    m, family: str, head: Callable[[Tensor, nn.Module], Tensor], num_classes: Optional[int]
) -> ConvStages:
    """The stem (everything before ``denseblock1``), each dense block and transition, then the head."""
    children = list(m.features.named_children())
    first = next(i for i, (name, _) in enumerate(children) if name.startswith("denseblock"))
    last = max(i for i, (name, _) in enumerate(children) if name.startswith("denseblock"))
    stem = nn.Sequential(*(module for _, module in children[:first]))
    body = children[first:last + 1]
    tail = nn.Sequential(*(module for _, module in children[last + 1:]))  # norm5
    return ConvStages(
        family,
        ("stem", *(f"features.{name}" for name, _ in body)),
        (stem, *(module for _, module in body)),
        lambda x: head(x, tail),
        num_classes,
    )


def _tv_densenet(m) -> ConvStages:
    def head(x, tail):
        return m.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(tail(x)), (1, 1)), 1))

    return _densenet_blocks(m, "torchvision DenseNet", head, _linear_classes(m.classifier))


def _timm_densenet(m) -> ConvStages:
    return _densenet_blocks(m, "timm DenseNet", lambda x, tail: m.forward_head(tail(x)), m.num_classes)


def _timm_convnext(m) -> ConvStages:
    names = ("stem", *(f"stages.{i}" for i in range(len(m.stages))))
    stages = (m.stem, *m.stages)
    return ConvStages("timm ConvNeXt", names, stages, lambda x: m.forward_head(m.norm_pre(x)), m.num_classes)


def _tv_convnext(m) -> ConvStages:
    names = tuple(f"features.{i}" for i in range(len(m.features)))
    def head(x):
        return m.classifier(m.avgpool(x))

    return ConvStages("torchvision ConvNeXt", names, tuple(m.features), head, _linear_classes(m.classifier))


def _family_table() -> List[Tuple[type, Callable[[nn.Module], ConvStages]]]:
    import timm.models.convnext
    import timm.models.densenet
    import timm.models.resnet
    import timm.models.vgg
    import torchvision.models as tvm

    return [
        (tvm.ResNet, _tv_resnet),
        (timm.models.resnet.ResNet, _timm_resnet),
        (tvm.VGG, _tv_vgg),
        (timm.models.vgg.VGG, _timm_vgg),
        (tvm.DenseNet, _tv_densenet),
        (timm.models.densenet.DenseNet, _timm_densenet),
        (tvm.ConvNeXt, _tv_convnext),
        (timm.models.convnext.ConvNeXt, _timm_convnext),
    ]


def _builder(model: nn.Module) -> Optional[Callable[[nn.Module], ConvStages]]:
    return next((build for cls, build in _family_table() if isinstance(model, cls)), None)


def is_supported(model: nn.Module) -> bool:
    """Whether ``model`` is of a CNN family that :func:`conv_stages` reads."""
    return _builder(model) is not None


def conv_stages(model: nn.Module) -> ConvStages:
    """The stage table of a supported CNN; ``ValueError`` naming what is supported otherwise."""
    build = _builder(model)
    if build is None:
        raise ValueError(f"ConvCAAP does not support {type(model).__name__}; supported: {SUPPORTED}")
    return build(model)


def check_classifier(model: nn.Module, table: ConvStages) -> None:
    """Refuse a CNN whose outputs are features (timm's ``num_classes=0``): there is no class to attribute."""
    if table.num_classes == 0:
        raise ValueError(
            f"{type(model).__name__} has num_classes=0: its outputs are features, not class scores; build it "
            "with its classifier (num_classes > 0) or give it one with model.reset_classifier(num_classes)"
        )


def check_grid(grid: GridLike) -> Optional[Tuple[int, int]]:
    """``grid`` as a pair ``(gh, gw)`` (an int is a square grid), or ``None``."""
    if grid is None:
        return None
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    ok = (
        isinstance(grid, (tuple, list)) and len(grid) == 2
        and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    )
    if not ok:
        raise ValueError(f"grid must be None, a positive int or a pair of positive ints (gh, gw), got {grid!r}")
    return tuple(grid)


def stage_macs(model: nn.Module, image_size: Tuple[int, int] = (224, 224)) -> List[int]:
    """Multiply-adds per image of each stage (stem first) and, last, of the head.

    Counts ``Conv2d`` and ``Linear`` layers (normalisations, activations and pooling are
    left out), with hooks removed before returning.
    """
    table = conv_stages(model)
    count = [0]

    def hook(module, args, out):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            count[0] += out.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            count[0] += out.numel() * module.in_features

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    p = next(model.parameters())
    x = torch.zeros(1, in_channels(table), *image_size, device=p.device, dtype=p.dtype)
    per_stage = []
    try:
        with torch.no_grad(), eval_mode(model):
            for stage in (*table.stages, table.head):
                count[0] = 0
                x = stage(x)
                per_stage.append(count[0])
    finally:
        for handle in handles:
            handle.remove()
    return per_stage


def in_channels(table: ConvStages) -> int:
    """The channels the CNN takes: its stem's first convolution's ``in_channels``."""
    stem = table.stages[0]
    conv = next(m for m in stem.modules() if isinstance(m, nn.Conv2d))
    return conv.in_channels
