"""Hugging Face and torchvision ViTs as timm ``VisionTransformer`` twins that CAAP can drive.

CAAP runs a timm ViT's own sub-modules on token subsets (``vit.py``). A plain pre-norm ViT of
another library has the same parts under other names, so :func:`as_timm_vit` builds a timm
``VisionTransformer`` whose sub-modules and parameters *are* the original's (no copies): the
twin computes what the original computes and always follows its current weights. Models whose
parts do not fit (a distilled head, shifted windows, a CNN stem, a pooled head over several
tokens) are refused at construction, naming the part.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


SUPPORTED_VITS = (
    "timm VisionTransformer (plain blocks, global_pool 'token' or 'avg'), transformers "
    "ViTForImageClassification, DeiTForImageClassification, ViTMSNForImageClassification and "
    "IJepaForImageClassification, torchvision VisionTransformer "
    "(vit_b_16 and family), each also as torch.compile() returns it"
)

_SUPPORTED_POOLS = ("token", "avg")

# What each refused Hugging Face family has that CAAP cannot patch (matched on the class name's start).
_HF_REFUSED = {
    "DeiTForImageClassificationWithTeacher": "a distilled head (the class and distillation tokens' "
    "classifiers averaged); CAAP reads one head on the class token: use DeiTForImageClassification",
    "Swin": "shifted-window attention and patch merging between stages",
    "ViTHybrid": "a CNN backbone as its patch embedding (a hybrid)",
    "Dinov2": "a classifier on the class token concatenated with the mean of the patch tokens; CAAP "
    "reads a head on the class token or on the patch mean",
    "Beit": "a relative position bias in every attention",
    "Data2VecVision": "a relative position bias in every attention",
}
# Supported classifier -> the attribute holding its backbone.
_HF_SUPPORTED = {
    "ViTForImageClassification": "vit",
    "DeiTForImageClassification": "deit",
    "ViTMSNForImageClassification": "vit",
    "IJepaForImageClassification": "ijepa",
}


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), however deep; else ``module``."""
    while type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
        module = module._orig_mod
    return module


def vit_kind(module: nn.Module) -> Optional[str]:
    """``"timm"``, ``"transformers"`` or ``"torchvision"`` for a ViT-like image model of that library
    (also one CAAP refuses, so that it is found and refused with a reason); ``None`` otherwise."""
    from timm.models.vision_transformer import VisionTransformer

    module = unwrap_compiled(module)
    if isinstance(module, VisionTransformer):  # a subclass of the user's own too (e.g. a LightningModule)
        return "timm"
    origin = type(module).__module__
    if origin.startswith("timm."):
        vit_like = hasattr(module, "patch_embed") and hasattr(module, "forward_features")
        return "timm" if vit_like else None
    if origin.startswith("transformers."):
        config = getattr(module, "config", None)
        attention = hasattr(config, "num_attention_heads") or hasattr(config, "num_heads")
        image_input = getattr(module, "main_input_name", None) == "pixel_values"
        return "transformers" if image_input and hasattr(config, "patch_size") and attention else None
    if origin.startswith("torchvision."):
        from torchvision.models import MaxVit, SwinTransformer, VisionTransformer

        return "torchvision" if isinstance(module, (VisionTransformer, SwinTransformer, MaxVit)) else None
    return None


# model -> (the identity of its parameters and modules when the twin was built, the twin)
_TWINS: "weakref.WeakKeyDictionary[nn.Module, Tuple[Tuple[int, ...], nn.Module]]" = weakref.WeakKeyDictionary()


def as_timm_vit(model: nn.Module) -> nn.Module:
    """The timm ``VisionTransformer`` that CAAP reads for ``model``; ``ValueError`` naming the part it cannot read.

    A timm ViT is returned itself; a Hugging Face or torchvision one as its twin, built once and
    kept while ``model`` lives, rebuilt when its modules or parameter objects were replaced.
    """
    model = timm_form(model)
    check_supported_vit(model)
    return model


def timm_form(model: nn.Module) -> nn.Module:
    """``model`` uncompiled, and a Hugging Face or torchvision ViT as its twin; a timm model is not judged
    here (the baselines that only run its forward take any timm ViT, CAAP checks it in :func:`as_timm_vit`)."""
    model = unwrap_compiled(model)
    kind = vit_kind(model)
    if kind not in ("transformers", "torchvision"):
        return model
    identity = (*map(id, model.parameters()), *map(id, model.modules()))
    cached = _TWINS.get(model)
    if cached is None or cached[0] != identity:
        parts = _hf_parts(model) if kind == "transformers" else _torchvision_parts(model)
        cached = _TWINS[model] = (identity, _assemble(parts))
    return cached[1]


def _timm_classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


def check_supported_vit(model: nn.Module) -> None:
    """Raise a ``ValueError`` naming the first part of the timm ViT ``model`` that CAAP cannot patch."""
    VisionTransformer, Block, Attention = _timm_classes()
    if not isinstance(model, VisionTransformer):
        kind = vit_kind(model)
        what = f"a {kind} model of another architecture" if kind else "not a Vision Transformer"
        raise ValueError(
            f"{type(model).__name__} is {what}, which CAAP cannot patch; supported: {SUPPORTED_VITS} "
            "(a CNN goes to ConvCAAP)"
        )
    if hasattr(model, "head_dist"):
        raise ValueError(
            f"{type(model).__name__} has a distillation head (head_dist); CAAP reads one head only."
        )
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(
            f"global_pool={model.global_pool!r} uses an attention-pool head "
            f"({type(model.attn_pool).__name__}); CAAP supports global_pool 'token' or 'avg'."
        )
    if model.global_pool not in _SUPPORTED_POOLS:
        raise ValueError(
            f"global_pool={model.global_pool!r} is not supported; CAAP supports 'token' or 'avg'."
        )
    if getattr(model, "pool_include_prefix", False):
        raise ValueError("pool_include_prefix=True is not supported: CAAP pools patch tokens only.")
    if model.global_pool == "token" and model.num_prefix_tokens == 0:
        raise ValueError("global_pool='token' needs a class token, but the model has no prefix tokens.")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise ValueError(
                f"blocks[{i}] is a {type(block).__name__}; CAAP supports timm's plain "
                "vision_transformer.Block only."
            )
        if type(block.attn) is not Attention:
            raise ValueError(
                f"blocks[{i}].attn is a {type(block.attn).__name__}; CAAP supports timm's plain "
                "Attention (no rotary or other attention variants)."
            )
        if getattr(block.attn, "gate", None) is not None:
            raise ValueError(f"blocks[{i}].attn is gated; gated attention is not supported by CAAP.")


class StackedQKV(nn.Module):
    """timm's fused ``qkv`` projection from separate query, key and value ``Linear`` s (shared, not copied)."""

    def __init__(self, query: nn.Module, key: nn.Module, value: nn.Module) -> None:
        super().__init__()
        self.query, self.key, self.value = query, key, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)


class InProjection(nn.Module):
    """timm's fused ``qkv`` projection read from an ``nn.MultiheadAttention``'s ``in_proj`` parameters."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.attention.in_proj_weight, self.attention.in_proj_bias)


class _Activation(nn.Module):
    """A plain activation function (transformers' ``hidden_act`` may be one) as a module."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


@dataclass
class _BlockParts:
    """One pre-norm block in timm's words: ``x + proj(attn(qkv(norm1(x))))``, then ``x + fc2(act(fc1(norm2(x))))``."""

    norm1: nn.Module
    qkv: nn.Module
    proj: nn.Module
    norm2: nn.Module
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear


@dataclass
class _ViTParts:
    """A plain ViT's parts: a patch conv, prefix tokens (class first), position embeddings over prefix
    and patches, blocks, the final norm and the head on the class token (without a class token: on
    the mean of the patch tokens)."""

    source: str  # e.g. "transformers DeiTForImageClassification", for messages
    patch_conv: nn.Module
    img_size: Tuple[int, int]
    cls_token: Optional[nn.Parameter]
    reg_token: Optional[nn.Parameter]  # further prefix tokens after the class token (DeiT's distillation token)
    pos_embed: nn.Parameter
    num_heads: int
    blocks: List[_BlockParts]
    norm: nn.Module
    head: nn.Module
    num_classes: int


def _refuse(source: str, part: str) -> ValueError:
    return ValueError(f"{source} has {part}, which CAAP cannot patch; supported: {SUPPORTED_VITS}")


def _pair(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _as_module(activation) -> nn.Module:
    return activation if isinstance(activation, nn.Module) else _Activation(activation)


def _head_classes(head: nn.Module) -> int:
    """The classes a head gives: its last ``Linear``'s outputs; ``0`` for a head without one (features out)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 0


def _hf_parts(model: nn.Module) -> _ViTParts:
    name = type(model).__name__
    source = f"transformers {name}"
    for prefix, part in _HF_REFUSED.items():
        if name.startswith(prefix):
            raise _refuse(source, part)
    backbone = getattr(model, _HF_SUPPORTED.get(name, ""), None)
    if backbone is None:
        raise ValueError(f"{source} is not a model CAAP reads; supported: {SUPPORTED_VITS}")
    config, embeddings = model.config, backbone.embeddings
    # transformers 5 names the layers `layers`; 4.x keeps them in `encoder.layer`.
    layers = getattr(backbone, "layers", None) or backbone.encoder.layer
    distillation = getattr(embeddings, "distillation_token", None)
    return _ViTParts(
        source=source,
        patch_conv=embeddings.patch_embeddings.projection,
        img_size=_pair(config.image_size),
        cls_token=getattr(embeddings, "cls_token", None),  # I-JEPA has none: its head reads the patch mean
        reg_token=distillation,
        pos_embed=embeddings.position_embeddings,
        num_heads=config.num_attention_heads,
        blocks=[_hf_block(layer) for layer in layers],
        norm=backbone.layernorm,
        head=model.classifier,
        num_classes=_head_classes(model.classifier),
    )


def _hf_block(layer: nn.Module) -> _BlockParts:
    attention = layer.attention
    if hasattr(attention, "q_proj"):  # transformers 5
        qkv = StackedQKV(attention.q_proj, attention.k_proj, attention.v_proj)
        proj = attention.o_proj
    else:  # transformers 4: ViTSelfAttention's query/key/value, ViTSelfOutput's dense
        inner = attention.attention
        qkv, proj = StackedQKV(inner.query, inner.key, inner.value), attention.output.dense
    if hasattr(layer, "mlp"):  # transformers 5
        fc1, act, fc2 = layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2
    else:  # transformers 4: ViTIntermediate, then ViTOutput (whose forward also adds the residual)
        fc1, act, fc2 = layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense
    return _BlockParts(layer.layernorm_before, qkv, proj, layer.layernorm_after, fc1, _as_module(act), fc2)


def _torchvision_parts(model: nn.Module) -> _ViTParts:
    from torchvision.models import VisionTransformer

    source = f"torchvision {type(model).__name__}"
    if not isinstance(model, VisionTransformer):
        raise _refuse(source, "windowed or multi-axis attention between downsampling stages")
    if not isinstance(model.conv_proj, nn.Conv2d):
        raise _refuse(source, "a convolutional stem (conv_stem_configs) as its patch embedding")
    return _ViTParts(
        source=source,
        patch_conv=model.conv_proj,
        img_size=_pair(model.image_size),
        cls_token=model.class_token,
        reg_token=None,
        pos_embed=model.encoder.pos_embedding,
        num_heads=model.encoder.layers[0].num_heads if len(model.encoder.layers) else 1,
        blocks=[_torchvision_block(source, i, block) for i, block in enumerate(model.encoder.layers)],
        norm=model.encoder.ln,
        head=model.heads,
        num_classes=_head_classes(model.heads),
    )


def _torchvision_block(source: str, index: int, block: nn.Module) -> _BlockParts:
    attention = block.self_attention
    plain = (
        attention._qkv_same_embed_dim and attention.bias_k is None and not attention.add_zero_attn
        and attention.batch_first
    )
    if not plain:
        raise _refuse(source, f"an nn.MultiheadAttention in encoder.layers[{index}] with separate q/k/v "
                              "dimensions, key/value biases or zero attention")
    mlp = block.mlp  # torchvision's MLPBlock: Linear, activation, Dropout, Linear, Dropout
    return _BlockParts(block.ln_1, InProjection(attention), attention.out_proj, block.ln_2, mlp[0], mlp[1], mlp[3])


def _assemble(parts: _ViTParts) -> nn.Module:
    """A timm ``VisionTransformer`` made of ``parts`` themselves; its own skeleton is built on the meta device."""
    from timm.models.vision_transformer import VisionTransformer

    conv = parts.patch_conv
    patch = _pair(conv.kernel_size)
    if _pair(conv.stride) != patch or _pair(conv.padding) != (0, 0):
        raise _refuse(parts.source, f"a patch convolution with kernel {patch}, stride {_pair(conv.stride)} and "
                                    f"padding {_pair(conv.padding)} (not one patch per kernel)")
    dim = parts.pos_embed.shape[-1]
    extra = 0 if parts.reg_token is None else parts.reg_token.shape[1]
    with torch.device("meta"):
        twin = VisionTransformer(
            img_size=parts.img_size, patch_size=patch, in_chans=conv.in_channels,
            num_classes=parts.num_classes, embed_dim=dim, depth=len(parts.blocks), num_heads=parts.num_heads,
            class_token=parts.cls_token is not None, reg_tokens=extra, fc_norm=False,
            global_pool="avg" if parts.cls_token is None else "token",
        )
    twin.patch_embed.proj = conv
    twin.cls_token = parts.cls_token
    twin.reg_token = parts.reg_token
    twin.pos_embed = parts.pos_embed
    for block, own in zip(twin.blocks, parts.blocks):
        block.norm1, block.norm2 = own.norm1, own.norm2
        block.attn.qkv, block.attn.proj = own.qkv, own.proj
        block.mlp.fc1, block.mlp.act, block.mlp.fc2 = own.fc1, own.act, own.fc2
    twin.norm = parts.norm
    twin.head = parts.head
    _check_twin(twin, parts)
    return twin


def _check_twin(twin: nn.Module, parts: _ViTParts) -> None:
    tokens = twin.num_prefix_tokens + twin.patch_embed.num_patches
    if tuple(parts.pos_embed.shape[1:]) != (tokens, twin.embed_dim):
        raise _refuse(parts.source, f"position embeddings of shape {tuple(parts.pos_embed.shape)} for "
                                    f"{tokens} tokens (only embeddings over the prefix and patch tokens are read)")
    left: Dict[str, torch.Tensor] = {
        name: t for name, t in (*twin.named_parameters(), *twin.named_buffers()) if t.is_meta
    }
    if left:  # every part must be the original's; a skeleton tensor left over would compute garbage
        raise RuntimeError(f"the timm twin of {parts.source} kept skeleton tensors {sorted(left)}")
