"""The bound ``metrics_speed.py`` reports rests on its FLOP count; check it against the arithmetic."""

from __future__ import annotations

import timm
import torch


def test_forward_flops_count_every_product_of_a_vit_attention_included(metrics_speed):
    tokens, dim, hidden, patch, classes, depth = 17, 32, 128, 8, 4, 2
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=patch, embed_dim=dim, depth=depth,
        num_heads=2, mlp_ratio=hidden / dim, num_classes=classes,
    ).eval()
    patch_embed = (tokens - 1) * 3 * patch**2 * dim
    block = (
        tokens * dim * 3 * dim  # qkv
        + 2 * tokens * tokens * dim  # q @ k^T and attn @ v over all heads
        + tokens * dim * dim  # proj
        + 2 * tokens * dim * hidden  # mlp
    )
    head = dim * classes  # on the class token only
    macs = patch_embed + depth * block + head
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert metrics_speed.forward_flops(model, torch.randn(3, 32, 32)) == 2 * macs
    # The count switches fused attention off to see its products, and switches it back.
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused

