"""A ViT built with ``num_classes=0`` plus its own head gives the maps of the ViT with that head built in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from caap_lightning import CAAP
from caap_lightning.attribution import available_methods, get_method

pytestmark = pytest.mark.filterwarnings("ignore:CAAP. the .* blank is itself classified")

AVG_POOL = dict(global_pool="avg", class_token=False, fc_norm=True)


def _images(n, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _pair(vit_factory, **kwargs):
    """A tiny ViT with its head (5 classes) and a ``num_classes=0`` copy with identical weights."""
    built_in = vit_factory(scale=8.0, seed=0, **kwargs)
    headless = vit_factory(seed=3, num_classes=0, **kwargs)
    state = {k: v for k, v in built_in.state_dict().items() if not k.startswith("head.")}
    headless.load_state_dict(state)
    assert isinstance(headless.head, nn.Identity) and headless(_images(1)).shape == (1, 32)
    return built_in, headless, built_in.head


@pytest.mark.parametrize("pool", [dict(reg_tokens=1), AVG_POOL])
@pytest.mark.parametrize("construction", ["parallel", "efficient", "windowed", "standard"])
def test_caap_with_head_equals_the_built_in_head(vit_factory, pool, construction):
    built_in, headless, head = _pair(vit_factory, **pool)
    images, targets = _images(2), [1, 4]
    expected = CAAP(built_in, construction=construction, layer_cutoff=2).attribute(images, target=targets)
    caap = CAAP(headless, construction=construction, layer_cutoff=2, head=head)
    assert (expected.amax((1, 2)) - expected.amin((1, 2))).min() > 1e-2  # maps that can differ
    torch.testing.assert_close(caap.attribute(images, target=targets), expected, atol=1e-5, rtol=0)
    # The predicted class, the relative map and the blank's own score go through the head too.
    reference = CAAP(built_in, construction=construction, layer_cutoff=2)
    torch.testing.assert_close(caap.attribute(images), reference.attribute(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(caap.attribute(images, target=targets, relative=True),
                               reference.attribute(images, target=targets, relative=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(caap.blank_score(), reference.blank_score(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", available_methods())
def test_every_baseline_with_head_equals_the_built_in_head(vit_factory, name):
    built_in, headless, head = _pair(vit_factory, reg_tokens=1)
    images, targets = _images(2), [1, 4]
    expected = get_method(name, built_in).attribute(images, target=targets)
    ours = get_method(name, headless, head=head).attribute(images, target=targets)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    predicted = get_method(name, headless, head=head).attribute(images)
    torch.testing.assert_close(predicted, get_method(name, built_in).attribute(images), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"target \[5\] is out of range for a model with 5 classes"):
        get_method(name, headless, head=head).attribute(images, target=5)


def test_a_head_that_changes_the_number_of_classes_sets_the_target_range(vit_factory):
    headless = vit_factory(num_classes=0)
    caap = CAAP(headless, head=nn.Linear(32, 9))
    assert caap.attribute(_images(1), target=8).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="out of range for a model with 9 classes"):
        caap.attribute(_images(1), target=9)


def test_a_head_in_training_mode_is_run_in_eval_mode_and_left_as_found(vit_factory):
    built_in, headless, head = _pair(vit_factory)
    dropped = nn.Sequential(nn.Dropout(0.9), head).train()
    images = _images(2)
    maps = CAAP(headless, head=dropped).attribute(images, target=[0, 1])
    torch.testing.assert_close(maps, CAAP(built_in).attribute(images, target=[0, 1]), atol=1e-5, rtol=0)
    assert dropped.training and dropped[0].training


@pytest.mark.parametrize("name", available_methods())
def test_a_headless_vit_without_head_fails_at_construction(vit_factory, name):
    with pytest.raises(ValueError, match=(
        r"VisionTransformer has num_classes=0: its outputs are features, not class scores; "
        r"pass head=<the module that maps its pooled features to logits>"
    )):
        get_method(name, vit_factory(num_classes=0))


@pytest.mark.parametrize("method", ["caap", "gradcam", "simple_insertion"])
def test_bad_heads_fail_at_construction(vit_factory, method):
    headless = vit_factory(num_classes=0)
    with pytest.raises(ValueError, match=(
        r"head must map the ViT's pooled features \(B, 32\) to logits, but head\(torch\.zeros\(1, 32\)\) failed"
    )):
        get_method(method, headless, head=nn.Linear(7, 3))
    with pytest.raises(ValueError, match=r"to logits \(B, num_classes\), but it gave \(1, 3, 1\)"):
        get_method(method, headless, head=nn.Sequential(nn.Linear(32, 3), nn.Unflatten(1, (3, 1))))
    with pytest.raises(TypeError, match="head must be an nn.Module, got function"):
        get_method(method, headless, head=lambda x: x)
    with pytest.raises(ValueError, match=r"this one has its own head \(num_classes=5\); remove head="):
        get_method(method, vit_factory(), head=nn.Linear(32, 5))


def test_calibrate_scores_the_cutoffs_through_the_head(vit_factory):
    built_in, headless, head = _pair(vit_factory, reg_tokens=1)
    images, labels = _images(2), torch.tensor([1, 4])
    expected = CAAP(built_in).calibrate(images, target=labels, layer_cutoffs=[1, 3])
    rows = CAAP(headless, head=head).calibrate(images, target=labels, layer_cutoffs=[1, 3])
    assert [r["layer_cutoff"] for r in rows] == [1, 3]
    for row, reference in zip(rows, expected):
        assert row == pytest.approx(reference, abs=1e-5)
    assert rows[0]["insdel"] != pytest.approx(rows[1]["insdel"], abs=1e-4)
