"""CAAP's fast constructions against the spec's naive per-patch oracle (hooks on real blocks)."""

from __future__ import annotations

import pytest
import torch

from caap_lightning import CAAP
from caap_lightning.attribution.blanks import make_blank
from caap_lightning.attribution.selection import SELECTIONS
from _oracle_reference import within


def _stage_inputs(model, image):
    """Inputs of the L blocks and of model.norm for one image (real timm forward)."""
    captured = []
    stages = list(model.blocks) + [model.norm]
    hooks = [m.register_forward_pre_hook(lambda m, a: captured.append(a[0].clone())) for m in stages]
    try:
        logits = model(image)
    finally:
        for h in hooks:
            h.remove()
    return captured, logits


def oracle(model, images, targets, k, selection, blank_image, score, construction="parallel", window=0):
    """The spec's oracle, one patch at a time. ``construction``: parallel, windowed or standard."""
    model.eval()
    P = model.num_prefix_tokens
    gh, gw = model.patch_embed.dynamic_feat_size(images.shape[-2:])
    radius, metric = SELECTIONS[selection]
    blank_in, _ = _stage_inputs(model, blank_image)
    stages = list(model.blocks) + [model.norm]
    maps = torch.zeros(len(images), gh * gw)
    for b in range(len(images)):
        src_in, _ = _stage_inputs(model, images[b:b + 1])
        for p in range(gh * gw):
            sel = [P + q for q in within((gh, gw), p, radius, metric)]
            keep = [P + q for q in within((gh, gw), p, window, "chebyshev")] if construction == "windowed" else sel
            outside = [P + q for q in range(gh * gw) if P + q not in keep]

            def make_hook(stage):
                def hook(module, args):
                    x = args[0].clone()
                    if construction != "standard":
                        x[:, outside] = blank_in[stage][:, outside]
                    if stage <= k:  # stage index s feeds h_s: stages 1..k+1 in the spec's terms
                        x[:, sel] = src_in[stage][:, sel]
                    return (x,)
                return hook

            hooks = [m.register_forward_pre_hook(make_hook(s)) for s, m in enumerate(stages)]
            try:
                logits = model(blank_image)
            finally:
                for h in hooks:
                    h.remove()
            value = logits[0].softmax(-1) if score == "probability" else logits[0]
            maps[b, p] = value[targets[b]]
    return maps.view(len(images), gh, gw)


CONFIGS = {
    "cls": dict(),
    "avg": dict(global_pool="avg", class_token=False, fc_norm=True),
    "avg_cls": dict(global_pool="avg"),
    "registers": dict(reg_tokens=2),
    "layer_scale_qk_norm": dict(init_values=0.5, qk_norm=True),
    "clip_norm_pre": dict(pre_norm=True),
    "no_embed_class": dict(no_embed_class=True, reg_tokens=1, init_values=1.0),
}


def _spread_model(vit_factory, seed=0, **kwargs):
    model = vit_factory(scale=8.0, seed=seed, **kwargs)
    return model


def _images(n, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _assert_spread(maps, floor=0.05):
    spread = (maps.amax((1, 2)) - maps.amin((1, 2))).min().item()
    assert spread > floor, f"maps too flat to test anything (spread {spread:.4f})"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("score", ["probability", "logit"])
def test_parallel_matches_oracle_across_architectures(vit_factory, config, score):
    model = _spread_model(vit_factory, **CONFIGS[config])
    images = _images(2)
    targets = torch.tensor([1, 3])
    caap = CAAP(model, layer_cutoff=2, selection="box1", score=score)
    maps = caap.attribute(images, target=targets)
    expected = oracle(model, images, targets, 2, "box1", make_blank("white", (32, 32), caap.mean, caap.std), score)
    _assert_spread(expected, 0.02 if score == "probability" else 0.25)
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_parallel_matches_oracle_every_selection_and_cutoff(vit_factory, selection, k):
    model = _spread_model(vit_factory, seed=2, reg_tokens=1, init_values=0.5)
    images = _images(1, seed=3)
    targets = torch.tensor([2])
    caap = CAAP(model, layer_cutoff=k, selection=selection)
    expected = oracle(model, images, targets, k, selection, make_blank("white", (32, 32), caap.mean, caap.std), "probability")
    _assert_spread(expected, 0.02)
    torch.testing.assert_close(caap.attribute(images, target=targets), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (48, 32), (16, 40)])
def test_parallel_matches_oracle_other_image_sizes(vit_factory, size):
    model = _spread_model(vit_factory, seed=4, dynamic_img_size=True, global_pool="avg", fc_norm=True)
    g = torch.Generator().manual_seed(5)
    images = torch.randn(1, 3, *size, generator=g)
    targets = torch.tensor([0])
    caap = CAAP(model, layer_cutoff=1, selection="cross1", blank="noise")
    expected = oracle(model, images, targets, 1, "cross1", make_blank("noise", size, caap.mean, caap.std), "probability")
    _assert_spread(expected, 0.02)
    torch.testing.assert_close(caap.attribute(images, target=targets), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", ["cls", "avg", "registers"])
@pytest.mark.parametrize("k", [0, 2, 4])
def test_standard_matches_textbook_patching(vit_factory, config, k):
    model = _spread_model(vit_factory, seed=6, **CONFIGS[config])
    images = _images(2, seed=7)
    targets = torch.tensor([4, 0])
    caap = CAAP(model, layer_cutoff=k, construction="standard", selection="box1", chunk_size=5)
    expected = oracle(model, images, targets, k, "box1", make_blank("white", (32, 32), caap.mean, caap.std),
                      "probability", construction="standard")
    _assert_spread(expected, 0.02)
    torch.testing.assert_close(caap.attribute(images, target=targets), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", ["cls", "avg"])
@pytest.mark.parametrize("window", [2, 3])
def test_windowed_matches_its_oracle(vit_factory, config, window):
    model = _spread_model(vit_factory, seed=8, img_size=48, **CONFIGS[config])
    images = _images(1, size=48, seed=9)
    targets = torch.tensor([1])
    caap = CAAP(model, layer_cutoff=2, construction="windowed", window=window, selection="box1")
    expected = oracle(model, images, targets, 2, "box1", make_blank("white", (48, 48), caap.mean, caap.std),
                      "probability", construction="windowed", window=window)
    _assert_spread(expected, 0.02)
    torch.testing.assert_close(caap.attribute(images, target=targets), expected, atol=1e-4, rtol=0)


def test_windowed_with_window_at_selection_radius_is_parallel(vit_factory):
    model = _spread_model(vit_factory, seed=10)
    images = _images(2, seed=11)
    parallel = CAAP(model, layer_cutoff=2).attribute(images)
    windowed = CAAP(model, layer_cutoff=2, construction="windowed", window=1).attribute(images)
    torch.testing.assert_close(windowed, parallel, atol=1e-5, rtol=0)


def test_windowed_with_a_window_covering_the_grid_is_standard(vit_factory):
    # 4x4 patches: a radius-3 box around any patch covers the grid, so every blank token is recomputed.
    model = _spread_model(vit_factory, seed=12)
    images = _images(2, seed=13)
    standard = CAAP(model, layer_cutoff=2, construction="standard").attribute(images)
    _assert_spread(standard, 0.02)
    windowed = CAAP(model, layer_cutoff=2, construction="windowed", window=3).attribute(images)
    torch.testing.assert_close(windowed, standard, atol=1e-5, rtol=0)
    # A window that leaves the far corner frozen is not standard.
    narrower = CAAP(model, layer_cutoff=2, construction="windowed", window=2).attribute(images)
    assert (narrower - standard).abs().max() > 1e-4
