"""One set of input checks for CAAP and every baseline: the same inputs fail the same way, early."""

from __future__ import annotations

import pytest
import torch

from caap_lightning import CAAP
from caap_lightning.attribution import SimpleDeletion, SimpleInsertion, available_methods, get_method

pytestmark = pytest.mark.filterwarnings("ignore:CAAP. the .* blank is itself classified")


@pytest.fixture
def model(vit_factory):
    return vit_factory(scale=4.0, seed=0, reg_tokens=1)


def _images(n, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _with_pixel(value, image):
    images = _images(3)
    images[image, 1, 5, 7] = value
    return images


BAD_INPUTS = [
    # (images, target, error, message)
    pytest.param(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), None, TypeError,
                 r"images must be float, normalised with the model's mean/std, got torch\.uint8", id="uint8"),
    pytest.param(torch.zeros(2, 3, 32, 32, dtype=torch.int8), [0, 1], TypeError,
                 r"images must be float, normalised with the model's mean/std, got torch\.int8", id="int8"),
    pytest.param(_with_pixel(float("nan"), 1), None, ValueError,
                 r"NaN or inf pixels \(image\(s\) \[1\] of the batch\)", id="nan-pixel"),
    pytest.param(_with_pixel(float("-inf"), 2), None, ValueError,
                 r"NaN or inf pixels \(image\(s\) \[2\] of the batch\)", id="inf-pixel"),
    pytest.param(_images(3), 1.7, TypeError, r"target must be integer class indices, got torch\.float32", id="float"),
    pytest.param(_images(3), [1.0, 2.0, 0.0], TypeError, r"target must be integer class indices, got torch\.float32",
                 id="float-list"),
    pytest.param(_images(3), torch.tensor([1.7, 0.2, 3.0], dtype=torch.float64), TypeError,
                 r"target must be integer class indices, got torch\.float64", id="float-tensor"),
    pytest.param(_images(3), True, TypeError, r"target must be integer class indices, got torch\.bool", id="bool"),
    pytest.param(_images(3), torch.tensor([True, False, True]), TypeError,
                 r"target must be integer class indices, got torch\.bool", id="bool-tensor"),
    pytest.param(_images(3), "cat", TypeError, r"target must be integer class indices", id="string"),
    pytest.param(_images(3), [0, -1, 2], ValueError,
                 r"target \[-1\] is out of range for a model with 5 classes \(class indices are 0\.\.4\)",
                 id="negative"),
    pytest.param(_images(3), [0, 5, 7], ValueError, r"target \[5, 7\] is out of range for a model with 5 classes",
                 id="too-large"),
    pytest.param(_images(3), [0, 1], ValueError, r"target has 2 entries for a batch of 3 images", id="length"),
]


@pytest.mark.parametrize("images, target, error, message", BAD_INPUTS)
def test_every_method_refuses_a_bad_input_with_the_same_message(model, images, target, error, message):
    messages = set()
    for name in available_methods():
        with pytest.raises(error, match=message) as caught:
            get_method(name, model).attribute(images, target=target)
        messages.add(str(caught.value))
    assert len(messages) == 1, messages


def test_float_targets_are_not_truncated_to_a_class(model):
    # 1.7 once became class 1 silently; integer-valued targets in an int tensor still work.
    caap = CAAP(model)
    with pytest.raises(TypeError, match="target must be integer class indices"):
        caap.attribute(_images(1), target=torch.tensor([1.0]))
    maps = caap.attribute(_images(1), target=torch.tensor([1], dtype=torch.uint8))
    torch.testing.assert_close(maps, caap.attribute(_images(1), target=1))


def test_targets_are_checked_before_any_forward(model):
    calls = []
    hook = model.patch_embed.register_forward_hook(lambda *args: calls.append(1))
    try:
        for name in available_methods():
            with pytest.raises(ValueError, match="out of range"):
                get_method(name, model).attribute(_images(2), target=[0, 9])
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_every_method_refuses_nan_or_inf_weights_and_names_them(model, value):
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[3, 2] = value
    messages = set()
    for name in available_methods():
        with pytest.raises(ValueError, match=r"weights contain NaN or inf \(blocks\.1\.mlp\.fc1\.weight\)") as caught:
            get_method(name, model).attribute(_images(2), target=[0, 1])
        messages.add(str(caught.value))
    assert len(messages) == 1
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        CAAP(model).blank_score(target=0)


def test_nan_weights_in_the_head_are_named(vit_factory):
    headless = vit_factory(num_classes=0)
    head = torch.nn.Linear(32, 3)
    with torch.no_grad():
        head.bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"weights contain NaN or inf \(bias\)"):
        CAAP(headless, head=head).attribute(_images(1), target=0)


@pytest.mark.parametrize("method", [CAAP, SimpleInsertion, SimpleDeletion])
@pytest.mark.parametrize("std", [(0.5, 0.0, 0.5), (0.0, 0.0, 0.0), (0.5, -0.2, 0.5), (0.5, float("nan"), 0.5)])
def test_a_std_that_cannot_normalise_fails_at_construction(model, method, std):
    with pytest.raises(ValueError, match=r"std=.* must have three positive entries \(a zero entry divides by zero"):
        method(model, std=std)


def test_blank_score_checks_its_target_as_attribute_does(model):
    caap = CAAP(model)
    with pytest.raises(TypeError, match="target must be integer class indices"):
        caap.blank_score(target=0.5)
    with pytest.raises(ValueError, match=r"target \[5\] is out of range"):
        caap.blank_score(target=[1, 5])
    assert caap.blank_score(target=[1, 3, 1]).shape == (3,)
