"""The pieces of a timm ``VisionTransformer`` that CAAP drives by hand.

CAAP runs the model's own sub-modules (``norm1``, ``attn.qkv``, ``mlp``, ...) on token
subsets, so it supports exactly the block layout below and refuses anything else at
construction instead of producing a wrong map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn


_SUPPORTED_POOLS = ("token", "avg")


def _timm_classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


def check_supported_vit(model: nn.Module) -> None:
    """Raise a ``ValueError`` naming the first part of ``model`` CAAP cannot patch."""
    VisionTransformer, Block, Attention = _timm_classes()
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"CAAP supports timm VisionTransformer models; got {type(model).__name__}. "
            "Pass the timm ViT itself (e.g. `pl_module.model`), not a wrapper or a CNN."
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


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def weights_version(model: nn.Module) -> Tuple:
    """A cheap key that changes whenever any parameter or buffer is changed in place.

    Optimiser steps and ``load_state_dict`` modify tensors in place, which bumps their
    version counters; replacing a tensor changes its storage pointer.
    """
    return tuple(
        (t.data_ptr(), t._version) for t in list(model.parameters()) + list(model.buffers())
    )


def grid_size(model: nn.Module, height: int, width: int) -> Tuple[int, int]:
    ph, pw = model.patch_embed.patch_size
    return height // ph, width // pw


def check_images(model: nn.Module, images: torch.Tensor) -> None:
    """Clear errors for inputs the model cannot take, before any work is done."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0); pass at least one image")
    in_chans = model.patch_embed.proj.in_channels
    if images.shape[1] != in_chans:
        raise ValueError(
            f"images have {images.shape[1]} channels but the model expects {in_chans}; "
            "convert grey-scale or RGBA images to RGB first"
        )
    ph, pw = model.patch_embed.patch_size
    h, w = images.shape[-2:]
    if h % ph or w % pw:
        raise ValueError(
            f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}; "
            f"resize or crop to a multiple of the patch size"
        )
    fixed = model.patch_embed.img_size
    if not getattr(model, "dynamic_img_size", False) and fixed is not None and (h, w) != tuple(fixed):
        raise ValueError(
            f"image size {h}x{w} differs from the model's img_size {tuple(fixed)}; resize the "
            "images, or build the model with dynamic_img_size=True to accept other sizes"
        )


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``h_0``: the tokens entering block 1 (after ``norm_pre``)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def qkv(block: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries (already scaled), keys and values of ``block`` for states ``x`` (..., R, D).

    Returns contiguous tensors of shape (heads, ..., R, head_dim): heads first, so that
    attention against keys shared by every patch group is one batched product per head.
    """
    attn = block.attn
    q, k, v = (
        attn.qkv(block.norm1(x))
        .unflatten(-1, (3, attn.num_heads, attn.head_dim))
        .movedim((-3, -2), (0, 1))
        .contiguous()
        .unbind(0)
    )
    return attn.q_norm(q) * attn.scale, attn.k_norm(k), v


def finish_block(block: nn.Module, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of ``block`` after the attention product: projection, residuals, MLP.

    ``x`` (..., R, D) are the block's input states, ``attended`` (heads, ..., R, head_dim).
    """
    attn = block.attn
    o = attn.proj(attn.norm(attended.movedim(0, -2).flatten(-2)))
    x = x + block.ls1(o)
    return x + block.ls2(block.mlp(block.norm2(x)))


@dataclass
class TokenStates:
    """Residual stream of one forward: ``states[l]`` is ``h_l`` (l = 0..L), (B, T, D), and
    the keys/values of block ``l+1`` computed from ``h_l`` (l = 0..L-1), (H, B, T, d)."""

    states: List[torch.Tensor]
    keys: List[torch.Tensor]
    values: List[torch.Tensor]


def forward_states(model: nn.Module, images: torch.Tensor, keep_kv: bool = True) -> TokenStates:
    """Run the blocks by hand and keep every ``h_l`` (and each block's keys/values)."""
    x = embed(model, images)
    states, keys, values = [x], [], []
    for block in model.blocks:
        q, k, v = qkv(block, x)
        attended = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        x = finish_block(block, x, attended)
        states.append(x)
        if keep_kv:
            keys.append(k)
            values.append(v)
    return TokenStates(states, keys, values)


def head_logits(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """Logits from pooled features, as ``VisionTransformer.forward_head`` computes them."""
    return model.head(model.head_drop(model.fc_norm(pooled)))


def pool_final(model: nn.Module, final_states: torch.Tensor) -> torch.Tensor:
    """Pool ``norm(h_L)`` (B, T, D) as the model does (``token`` or ``avg``)."""
    normed = model.norm(final_states)
    if model.global_pool == "token":
        return normed[:, 0]
    return normed[:, model.num_prefix_tokens:].mean(1)


def num_classes(model: nn.Module) -> Optional[int]:
    return getattr(model, "num_classes", None)
