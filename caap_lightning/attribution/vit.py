"""The pieces of a timm ``VisionTransformer`` that CAAP drives by hand.

CAAP runs the model's own sub-modules (``norm1``, ``attn.qkv``, ``mlp``, ...) on token
subsets, so it supports exactly the block layout below and refuses anything else at
construction instead of producing a wrong map. The input checks and the ``Classifier``
(the ViT and, for a headless one, the head that gives its logits) are shared by CAAP and
every baseline, so that they accept and refuse the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from caap_lightning.attribution.twins import timm_form
from caap_lightning.checks import model_device_dtype
from caap_lightning.utils import eval_mode


def grid_size(model: nn.Module, height: int, width: int) -> Tuple[int, int]:
    ph, pw = model.patch_embed.patch_size
    return height // ph, width // pw


class Classifier(nn.Module):
    """A ViT (as the timm model :func:`twins.timm_form` gives) and, for one built with
    ``num_classes=0``, the head that gives its logits.

    ``head`` maps the ViT's pooled pre-logits ``(B, num_features)`` to class scores; without
    it the ViT's own head does. It holds references, not copies, so it runs the current
    weights. ``patch_embed`` is the ViT's, so metrics read the patch and image size from it.
    """

    def __init__(self, model: nn.Module, head: Optional[nn.Module] = None) -> None:
        super().__init__()
        model = timm_form(model)
        n_cls = getattr(model, "num_classes", None)
        if head is None and n_cls == 0:
            raise ValueError(
                f"{type(model).__name__} has num_classes=0: its outputs are features, not class scores; "
                "pass head=<the module that maps its pooled features to logits>"
            )
        if head is not None:
            if not isinstance(head, nn.Module):
                raise TypeError(f"head must be an nn.Module, got {type(head).__name__}")
            if n_cls != 0:
                raise ValueError(
                    f"head= is for a ViT built with num_classes=0, but this one has its own head "
                    f"(num_classes={n_cls}); remove head= or build the ViT with num_classes=0"
                )
            n_cls = _head_classes(model, head)
        self.vit = model
        self.head = head
        self.num_classes: Optional[int] = n_cls

    @property
    def patch_embed(self) -> nn.Module:
        return self.vit.patch_embed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's own forward, then ``head`` where given."""
        out = self.vit(images)
        return out if self.head is None else self.head(out)

    def pooled_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from pooled final states ``(..., D)``, as ``VisionTransformer.forward_head`` does."""
        model = self.vit
        pre_logits = model.head_drop(model.fc_norm(pooled))
        return (model.head if self.head is None else self.head)(pre_logits)


def _head_classes(model: nn.Module, head: nn.Module) -> int:
    """The number of classes ``head`` gives, from one forward of a zero feature vector."""
    dim = model.num_features
    device, dtype = model_device_dtype(model)
    with torch.no_grad(), eval_mode(head):
        try:
            out = head(torch.zeros(1, dim, device=device, dtype=dtype))
        except Exception as err:  # any failure means the head cannot take the ViT's features
            raise ValueError(
                f"head must map the ViT's pooled features (B, {dim}) to logits, but head(torch.zeros(1, {dim})) "
                f"failed: {err}; pass the module that takes the ViT's {dim} features"
            ) from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1 or out.shape[1] < 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"head must map the ViT's pooled features (B, {dim}) to logits (B, num_classes), "
            f"but it gave {got} for (1, {dim})"
        )
    return out.shape[1]


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


def pool_final(model: nn.Module, final_states: torch.Tensor) -> torch.Tensor:
    """Pool ``norm(h_L)`` (B, T, D) as the model does (``token`` or ``avg``)."""
    normed = model.norm(final_states)
    if model.global_pool == "token":
        return normed[:, 0]
    return normed[:, model.num_prefix_tokens:].mean(1)
