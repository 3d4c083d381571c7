"""Inputs the metrics must refuse (or take as CAAP takes them) instead of scoring them wrongly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from caap_lightning.metrics import (
    AUPR,
    AttributionMass,
    InsertionDeletion,
    PointingGame,
    attribution_mass,
    aupr,
    insertion_deletion,
    pointing_game,
)


def square_masks(n: int = 2, size: int = 16) -> torch.Tensor:
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, 4:10, 5:12] = True
    return masks


def every_mask_metric():
    """Each mask metric as ``score(maps, masks)``, functional and class alike."""

    def updated(metric):
        def score(maps, masks):
            metric.update(maps, masks)
            return metric.compute()

        return score

    return {
        "aupr": lambda maps, masks: aupr(maps, masks).aupr,
        "pointing_game": pointing_game,
        "attribution_mass": attribution_mass,
        "AUPR": updated(AUPR()),
        "PointingGame": updated(PointingGame()),
        "AttributionMass": updated(AttributionMass()),
    }


MASK_METRICS = list(every_mask_metric())


class SmallNet(nn.Module):
    """Any image size, 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)) * 3.0)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("name", MASK_METRICS)
def test_trimap_is_refused_with_the_fix(name):
    # An Oxford Pets trimap: 1 foreground, 2 background, 3 border. Every value is non-zero.
    trimap = torch.full((2, 16, 16), 2, dtype=torch.long)
    trimap[:, 4:10, 5:12] = 1
    trimap[:, 3, 4:13] = 3
    with pytest.raises(ValueError, match=r"masks must be binary.*values \{1, 2, 3\}.*masks == 1"):
        every_mask_metric()[name](torch.rand(2, 4, 4), trimap)


@pytest.mark.parametrize("name", MASK_METRICS)
def test_soft_mask_is_refused(name):
    soft = square_masks().float() * 0.5
    with pytest.raises(ValueError, match=r"masks must be binary.*values \{0, 0.5\}"):
        every_mask_metric()[name](torch.rand(2, 4, 4), soft)


def test_many_mask_values_are_elided():
    with pytest.raises(ValueError, match=r"values \{0, 0.1, 0.2, 0.3, 0.4, 0.5, \.\.\.\}"):
        aupr(torch.rand(1, 4, 4), torch.arange(16.0).view(1, 4, 4) / 10)


@pytest.mark.parametrize("name", MASK_METRICS)
def test_binary_masks_of_any_dtype_and_channel_dim_agree(name):
    torch.manual_seed(0)
    maps, masks = torch.randn(2, 4, 4), square_masks()
    reference = every_mask_metric()[name](maps, masks)
    for variant in (masks.to(torch.uint8), masks.float(), masks.long(), masks[:, None], masks[:, None].double()):
        torch.testing.assert_close(every_mask_metric()[name](maps, variant), reference)


@pytest.mark.parametrize("shape", [(2, 2, 16, 16), (2, 16), (2, 1, 1, 16, 16)])
def test_mask_shapes_other_than_bhw_or_b1hw_are_refused(shape):
    with pytest.raises(ValueError, match=r"masks must be \(B, H, W\) or \(B, 1, H, W\)"):
        pointing_game(torch.rand(2, 4, 4), torch.ones(shape, dtype=torch.bool))


# ---------------------------------------------------------------- grids


@pytest.mark.parametrize("name", MASK_METRICS)
def test_maps_of_another_aspect_ratio_than_the_masks_are_refused(name):
    masks = torch.zeros(2, 16, 32, dtype=torch.bool)
    masks[:, 4:8, 4:20] = True
    with pytest.raises(ValueError, match=r"maps of shape \(2, 4, 4\) do not fit the masks of size 16x32"):
        every_mask_metric()[name](torch.rand(2, 4, 4), masks)


def test_patch_maps_of_the_same_aspect_ratio_are_upsampled():
    torch.manual_seed(1)
    masks = torch.rand(2, 16, 32) < 0.4
    patch_maps = torch.randn(2, 2, 4)
    pixel_maps = nn.functional.interpolate(patch_maps[:, None], size=(16, 32), mode="bilinear")[:, 0]
    torch.testing.assert_close(aupr(patch_maps, masks).aupr, aupr(pixel_maps, masks).aupr)
    torch.testing.assert_close(attribution_mass(patch_maps, masks), attribution_mass(pixel_maps, masks))


def test_insertion_deletion_maps_must_fit_the_images():
    images = torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError, match=r"maps of shape \(1, 4, 4\) do not fit the images of size 8x16"):
        insertion_deletion(SmallNet(), images, torch.rand(1, 4, 4), step=8)
    with pytest.raises(ValueError, match=r"maps of shape \(1, 4, 4\)"):
        InsertionDeletion(SmallNet(), step=8).update(images, torch.rand(1, 4, 4))
    # The same aspect ratio is upsampled: (2, 4) on 8x16 is the (8, 16) bilinear map.
    patch = torch.rand(1, 2, 4)
    pixel = nn.functional.interpolate(patch[:, None], size=(8, 16), mode="bilinear")[:, 0]
    from_patch = insertion_deletion(SmallNet(), images, patch, step=8)
    from_pixel = insertion_deletion(SmallNet(), images, pixel, step=8)
    torch.testing.assert_close(from_patch.insertion_curve, from_pixel.insertion_curve)


# ---------------------------------------------------------------- targets


def test_int_and_sequence_targets_are_taken_as_caap_takes_them():
    torch.manual_seed(2)
    images, maps = torch.randn(3, 3, 6, 6), torch.rand(3, 6, 6)
    model = SmallNet()
    by_tensor = insertion_deletion(model, images, maps, target=torch.tensor([2, 2, 2]), step=9)
    by_int = insertion_deletion(model, images, maps, target=2, step=9)
    assert by_int.target.tolist() == [2, 2, 2]
    torch.testing.assert_close(by_int.insertion, by_tensor.insertion)
    torch.testing.assert_close(by_int.deletion, by_tensor.deletion)
    mixed = torch.tensor([0, 3, 1])
    expected = insertion_deletion(model, images, maps, target=mixed, step=9)
    for target in ([0, 3, 1], (0, 3, 1), torch.tensor([0, 3, 1], dtype=torch.int32), torch.tensor(1)):
        result = insertion_deletion(model, images, maps, target=target, step=9)
        if isinstance(target, torch.Tensor) and target.dim() == 0:
            assert result.target.tolist() == [1, 1, 1]
        else:
            torch.testing.assert_close(result.insertion, expected.insertion)
    metric = InsertionDeletion(model, step=9)
    metric.update(images, maps, target=2)
    torch.testing.assert_close(metric.compute(), (by_tensor.insertion - by_tensor.deletion).mean())


@pytest.mark.parametrize(
    "target, error, message",
    [
        (4, ValueError, r"target \[4\] is out of range for a model with 4 classes .*image\(s\) \[0, 1, 2\]"),
        ([0, -1, 2], ValueError, r"target \[-1\] is out of range .* image\(s\) \[1\]"),
        ([0, 1], ValueError, r"target has 2 entries for a batch of 3 images; pass one class per image"),
        (torch.zeros(3, 1, dtype=torch.long), ValueError, r"target must be one class per image"),
        # A wrong type of target is a TypeError, as in CAAP and the baselines (one check_target for all).
        (1.0, TypeError, r"target must be integer class indices, got torch.float32"),
        ([0.0, 1.0, 2.0], TypeError, r"target must be integer class indices"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"target must be integer class indices"),
        (True, TypeError, r"target must be integer class indices, got torch.bool"),
        (torch.tensor([True, False, True]), TypeError, r"target must be integer class indices, got torch.bool"),
        ("cat", TypeError, r"target must be integer class indices \(an int, a list/tuple or a tensor\)"),
    ],
)
def test_bad_targets_name_target(target, error, message):
    images, maps = torch.randn(3, 3, 6, 6), torch.rand(3, 6, 6)
    with pytest.raises(error, match=message):
        insertion_deletion(SmallNet(), images, maps, target=target, step=9)
    with pytest.raises(error, match=message):
        InsertionDeletion(SmallNet(), step=9).update(images, maps, target)


# ---------------------------------------------------------------- images and the model


def test_float64_images_are_cast_and_integer_images_refused():
    torch.manual_seed(3)
    images, maps = torch.randn(2, 3, 6, 6), torch.rand(2, 6, 6)
    model = SmallNet()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    as_float = insertion_deletion(model, images, maps, step=9)
    as_double = insertion_deletion(model, images.double(), maps, step=9)
    assert set(seen) == {torch.float32}
    torch.testing.assert_close(as_double.insertion, as_float.insertion)
    for dtype in (torch.uint8, torch.long, torch.bool):
        with pytest.raises(TypeError, match="images must be float, normalised with the model's mean/std"):
            insertion_deletion(model, images.to(dtype), maps, step=9)


def test_bf16_model_gets_images_of_its_dtype(vit_factory):
    model = vit_factory(scale=3.0, seed=4)
    torch.manual_seed(5)
    images, maps = torch.randn(2, 3, 32, 32), torch.rand(2, 4, 4)
    reference = insertion_deletion(model, images, maps, step=128)
    half = vit_factory(scale=3.0, seed=4).to(torch.bfloat16)
    seen = []
    half.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    result = insertion_deletion(half, images, maps, target=reference.target, step=128)
    assert set(seen) == {torch.bfloat16}
    assert result.insertion.dtype == torch.float64
    # bf16 keeps ~3 significant digits; the curves are probabilities.
    torch.testing.assert_close(result.insertion_curve, reference.insertion_curve, atol=0.05, rtol=0)
    torch.testing.assert_close(result.deletion_curve, reference.deletion_curve, atol=0.05, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 4, 32, 32), (1, 3, 16, 16), (1, 3, 32, 48)])
def test_images_the_vit_cannot_take_name_the_expected_shape(vit_factory, shape):
    model = vit_factory()
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 32, 32\) for VisionTransformer"):
        insertion_deletion(model, torch.randn(shape), torch.rand(1, 4, 4))


def test_dynamic_size_vit_needs_whole_patches(vit_factory):
    model = vit_factory(dynamic_img_size=True)
    result = insertion_deletion(model, torch.randn(1, 3, 24, 40), torch.rand(1, 3, 5))
    assert result.insertion_curve.shape == (1, 24 * 40 // 64 + 1)
    # One check_images for the metrics and the engine: the engine's wording of this reason.
    with pytest.raises(ValueError, match=r"image size 36x36 is not divisible by the patch size 8x8"):
        insertion_deletion(model, torch.randn(1, 3, 36, 36), torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 36, 36\)"):
        insertion_deletion(model, torch.randn(1, 1, 36, 36), torch.rand(1, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_images_are_moved_to_the_models_device():
    torch.manual_seed(6)
    images, maps = torch.randn(2, 3, 6, 6), torch.rand(2, 6, 6)
    on_cpu = insertion_deletion(SmallNet(), images, maps, step=9)
    on_gpu = insertion_deletion(SmallNet().cuda(), images, maps, step=9)
    assert on_gpu.insertion.device.type == "cuda"
    torch.testing.assert_close(on_gpu.insertion.cpu(), on_cpu.insertion, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- integer settings


def test_settings_must_be_ints():
    with pytest.raises(TypeError, match=r"tolerance must be an int >= 0 \(pixels\), got 1.5"):
        pointing_game(torch.rand(1, 4, 4), square_masks(1), tolerance=1.5)
    with pytest.raises(TypeError, match="tolerance must be an int"):
        PointingGame(tolerance=1.5)
    with pytest.raises(TypeError, match="tolerance must be an int"):
        PointingGame(tolerance=True)
    with pytest.raises(ValueError, match="tolerance must be an int >= 0"):
        PointingGame(tolerance=-1)
    with pytest.raises(TypeError, match="step must be an int"):
        InsertionDeletion(SmallNet(), step=2.5)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        insertion_deletion(SmallNet(), torch.randn(1, 3, 6, 6), torch.rand(1, 6, 6), step=9, batch_size=8.0)
