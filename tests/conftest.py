"""Shared fixtures: tiny random-weight ViTs that make the whole suite fast."""

from __future__ import annotations

import pytest
import timm
import torch


def make_tiny_vit(scale: float = 1.0, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny timm ViT (32 px, patch 8, 4 blocks, dim 32) in eval mode.

    ``scale`` multiplies every weight matrix: timm's default init gives almost flat
    attribution maps, so correctness tests scale the weights up to make maps vary.
    """
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=5)
    cfg.update(kwargs)
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg)
    if scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 or "token" in name or "pos_embed" in name:
                    p.mul_(scale)
    return model.eval()


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def vit_factory():
    """``vit_factory(scale=..., seed=..., **timm_kwargs)`` builds a tiny ViT."""
    return make_tiny_vit
