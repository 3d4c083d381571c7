"""Insertion / Deletion against a naive one-image-one-step reference and hand-computed AUCs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate, gaussian_filter
from torch import nn

from caap_lightning.metrics import InsertionDeletion, insertion_deletion
from caap_lightning.utils import gaussian_blur


def rise_blur_numpy(image: np.ndarray) -> np.ndarray:
    """RISE's substrate: 11x11 impulse smoothed by scipy (reflect), zero-padded per channel."""
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1.0
    kernel = gaussian_filter(impulse, 5.0)
    return np.stack([correlate(channel, kernel, mode="constant", cval=0.0) for channel in image])


def naive_curves(model, image, pixel_map, step, target=None):
    """The RISE loop: one image, one step, one forward at a time."""
    c, h, w = image.shape
    order = np.argsort(-pixel_map.reshape(-1), kind="stable")
    n = (h * w + step - 1) // step
    with torch.no_grad():
        clean = model(image[None])[0]
    target = int(clean.argmax()) if target is None else target
    blurred = torch.from_numpy(rise_blur_numpy(image.double().numpy())).float()
    curves = {}
    for mode, start, finish in (
        ("deletion", image.clone(), torch.zeros_like(image)),
        ("insertion", blurred, image.clone()),
    ):
        scores = []
        for i in range(n + 1):
            with torch.no_grad():
                scores.append(float(model(start[None]).softmax(1)[0, target]))
            coords = torch.from_numpy(order[step * i : step * (i + 1)].copy())
            start.view(c, -1)[:, coords] = finish.reshape(c, -1)[:, coords]
        curves[mode] = np.array(scores)
    return curves


def naive_auc(scores: np.ndarray) -> float:
    return (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (len(scores) - 1)


class TinyConvNet(nn.Module):
    """Accepts any image size, so image areas need not divide by the step."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)) * 4.0)


class OnePixelModel(nn.Module):
    """Logits ``(weight * x[0, row, col], 0)``: only one pixel matters."""

    def __init__(self, row: int, col: int, weight: float = 3.0) -> None:
        super().__init__()
        self.row, self.col, self.weight = row, col, weight

    def forward(self, x):
        logit = self.weight * x[:, 0, self.row, self.col]
        return torch.stack([logit, torch.zeros_like(logit)], 1)


class RegionModel(nn.Module):
    """Class 0's logit grows with the mean of a square region: the square is the evidence."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.float())

    def forward(self, x):
        inside = (x[:, 0] * self.mask).sum((1, 2)) / self.mask.sum()
        logit = 8.0 * inside - 2.0
        return torch.stack([logit, torch.zeros_like(logit)], 1)


class ConstantModel(nn.Module):
    def forward(self, x):
        return torch.tensor([[1.0, 0.2, -0.5]]).expand(x.shape[0], -1)


def assert_matches_naive(model, images, maps, step, target=None):
    result = insertion_deletion(model, images, maps, target=target, step=step, batch_size=16)
    for i in range(images.shape[0]):
        t = None if target is None else int(target[i])
        curves = naive_curves(model, images[i], maps[i].numpy(), step, t)
        np.testing.assert_allclose(result.deletion_curve[i].numpy(), curves["deletion"], atol=1e-5)
        np.testing.assert_allclose(result.insertion_curve[i].numpy(), curves["insertion"], atol=1e-5)
        assert float(result.deletion[i]) == pytest.approx(naive_auc(curves["deletion"]), abs=1e-5)
        assert float(result.insertion[i]) == pytest.approx(naive_auc(curves["insertion"]), abs=1e-5)
    return result


def test_blur_is_rise_substrate():
    image = torch.randn(2, 3, 13, 17)
    expected = np.stack([rise_blur_numpy(im.double().numpy()) for im in image])
    np.testing.assert_allclose(gaussian_blur(image).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("step", [64, 100, 37])
def test_vit_matches_naive_reference(vit_factory, step):
    model = vit_factory(scale=3.0, seed=1)
    torch.manual_seed(2)
    # Three images: batches of 16 perturbed images then straddle games and images.
    images = torch.randn(3, 3, 32, 32)
    maps = torch.rand(3, 32, 32)
    result = assert_matches_naive(model, images, maps, step)
    assert result.deletion_curve.shape == (3, math.ceil(32 * 32 / step) + 1)


@pytest.mark.parametrize("size,step", [((13, 17), 7), ((13, 17), 20), ((9, 11), 98), ((5, 7), 1)])
def test_non_dividing_sizes_match_naive_reference(size, step):
    model = TinyConvNet().eval()
    torch.manual_seed(3)
    images = torch.randn(2, 3, *size)
    # Rounded maps force ties, which must break the same way as a stable sort.
    maps = (torch.rand(2, *size) * 4).round()
    assert_matches_naive(model, images, maps, step, target=torch.tensor([1, 3]))


def test_patch_maps_are_upsampled_bilinearly(vit_factory):
    model = vit_factory(scale=3.0, seed=4)
    torch.manual_seed(5)
    images = torch.randn(1, 3, 32, 32)
    patch_maps = torch.rand(1, 4, 4)
    pixel_maps = nn.functional.interpolate(patch_maps[:, None], size=(32, 32), mode="bilinear")[:, 0]
    assert_matches_naive(model, images, pixel_maps, 64)
    from_patches = insertion_deletion(model, images, patch_maps)
    from_pixels = insertion_deletion(model, images, pixel_maps)
    torch.testing.assert_close(from_patches.insertion, from_pixels.insertion)
    torch.testing.assert_close(from_patches.deletion, from_pixels.deletion)


@pytest.mark.parametrize("step", [5, 16, 30])
def test_one_pixel_model_hand_computed(step):
    # The pixel at (2, 3) of a 6x8 image has rank 13 in the map, so it changes at
    # step m = 13 // step + 1: deletion scores sigmoid(w x) before and 1/2 after;
    # insertion scores sigmoid(w * blurred) before and sigmoid(w x) after.
    h, w, row, col, weight = 6, 8, 2, 3, 3.0
    pixel_map = torch.arange(h * w, 0, -1, dtype=torch.float32).view(h, w)
    pixel_map[row, col], pixel_map.view(-1)[13] = pixel_map.view(-1)[13].item(), pixel_map[row, col].item()
    image = torch.rand(3, h, w) + 0.5
    model = OnePixelModel(row, col, weight)
    n, m = math.ceil(h * w / step), 13 // step + 1
    p_image = 1 / (1 + math.exp(-weight * float(image[0, row, col])))
    blurred = rise_blur_numpy(image.double().numpy())[0, row, col]
    p_blurred = 1 / (1 + math.exp(-weight * blurred))
    expected_deletion = ((m - 0.5) * p_image + (n - m + 0.5) * 0.5) / n
    expected_insertion = ((m - 0.5) * p_blurred + (n - m + 0.5) * p_image) / n

    metric = InsertionDeletion(model, step=step)
    metric.update(image[None], pixel_map[None])
    out = metric.compute_details()
    assert float(out["deletion"]) == pytest.approx(expected_deletion, abs=1e-6)
    assert float(out["insertion"]) == pytest.approx(expected_insertion, abs=1e-6)
    assert float(out["insdel"]) == pytest.approx(expected_insertion - expected_deletion, abs=1e-6)
    # Class 0 wins on the image, the zero substrate is a tie that argmax gives class 0.
    assert int(out["left_out"]) == 1


def test_constant_model_insertion_equals_deletion():
    images, maps = torch.randn(3, 3, 10, 12), torch.rand(3, 10, 12)
    result = insertion_deletion(ConstantModel(), images, maps, step=9)
    p = torch.tensor([1.0, 0.2, -0.5]).softmax(0)[0].double()
    torch.testing.assert_close(result.insertion, result.deletion)
    torch.testing.assert_close(result.insertion, p.expand(3))


def test_good_map_deletes_fast_and_inserts_fast():
    torch.manual_seed(6)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:9, 6:12] = True
    images = torch.rand(4, 3, 16, 16) * 0.2 + mask * 1.0
    model = RegionModel(mask)
    perfect = mask.float().expand(4, -1, -1) + torch.rand(4, 16, 16) * 0.01
    inverted = 1 - perfect
    random = torch.rand(4, 16, 16)
    scores = {name: insertion_deletion(model, images, m, step=8) for name, m in
              (("perfect", perfect), ("inverted", inverted), ("random", random))}
    assert (scores["inverted"].deletion > scores["random"].deletion).all()
    assert (scores["random"].deletion > scores["perfect"].deletion).all()
    assert (scores["perfect"].insertion > scores["inverted"].insertion).all()


def test_default_step_is_one_patch(vit_factory):
    model = vit_factory()
    assert InsertionDeletion(model).step == 64
    with pytest.raises(ValueError, match="pass `step`"):
        InsertionDeletion(TinyConvNet())
    with pytest.raises(ValueError, match="odd"):
        InsertionDeletion(model, blur_kernel=10)


def test_target_defaults_to_clean_top1(vit_factory):
    model = vit_factory(scale=3.0, seed=7)
    images, maps = torch.randn(3, 3, 32, 32), torch.rand(3, 4, 4)
    top1 = model(images).argmax(1)
    implicit = insertion_deletion(model, images, maps)
    explicit = insertion_deletion(model, images, maps, target=top1)
    other = insertion_deletion(model, images, maps, target=(top1 + 1) % 5)
    assert torch.equal(implicit.target, top1)
    torch.testing.assert_close(implicit.insertion, explicit.insertion)
    assert not torch.allclose(implicit.insertion, other.insertion)


def test_batch_size_changes_nothing_and_batches_forwards():
    model = TinyConvNet().eval()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    images, maps = torch.randn(3, 3, 9, 9), torch.rand(3, 9, 9)
    small = insertion_deletion(model, images, maps, step=10, batch_size=5)
    calls.clear()
    large = insertion_deletion(model, images, maps, step=10, batch_size=64)
    # n = 9 steps: one clean forward, then 3 images x 2 games x 9 steps in one batch.
    assert calls == [3, 54]
    torch.testing.assert_close(small.insertion_curve, large.insertion_curve)
    torch.testing.assert_close(small.deletion_curve, large.deletion_curve)


def test_model_runs_in_eval_without_grad_and_flags_restored():
    model = TinyConvNet()
    model.train()
    model.features[0].eval()
    seen = []
    model.register_forward_hook(
        lambda module, args, out: seen.append((module.training, module.features[1].training, torch.is_grad_enabled()))
    )
    insertion_deletion(model, torch.randn(1, 3, 8, 8), torch.rand(1, 8, 8), step=16)
    assert seen and all(flags == (False, False, False) for flags in seen)
    assert model.training and model.features[1].training and not model.features[0].training
    assert torch.is_grad_enabled()


def test_left_out_images_and_per_image_outputs():
    # The zero substrate's logits tie and argmax picks class 0: images whose target is
    # class 0 (a positive pixel) are left out, those with a negative pixel (class 1) not.
    model = OnePixelModel(0, 0)
    images = torch.rand(4, 3, 4, 4) + 0.1
    images[1, 0, 0, 0] = -1.0
    images[3, 0, 0, 0] = -1.0
    maps = torch.rand(4, 4, 4)
    metric = InsertionDeletion(model, step=4, per_image=True, curves=True)
    metric.update(images[:2], maps[:2])
    metric.update(images[2:], maps[2:])
    out = metric.compute_details()
    functional = insertion_deletion(model, images, maps, step=4)
    assert int(out["count"]) == 4 and int(out["left_out"]) == 2
    assert out["substrate_is_target"].tolist() == [True, False, True, False]
    torch.testing.assert_close(out["insertion_per_image"], functional.insertion)
    torch.testing.assert_close(out["deletion_per_image"], functional.deletion)
    informative = functional.insertion[[1, 3]].mean() - functional.deletion[[1, 3]].mean()
    torch.testing.assert_close(out["insdel_informative"], informative)
    torch.testing.assert_close(out["insdel"], functional.insertion.mean() - functional.deletion.mean())
    torch.testing.assert_close(out["insertion_curve"], functional.insertion_curve.mean(0))
    torch.testing.assert_close(out["deletion_curve"], functional.deletion_curve.mean(0))
    assert out["insertion_curve"].shape == (5,)


def test_non_finite_maps_rejected_naming_every_image():
    maps = torch.rand(4, 4, 4)
    maps[0, 1, 1] = float("inf")
    maps[2, 0, 3] = float("nan")
    metric = InsertionDeletion(ConstantModel(), step=4)
    with pytest.raises(ValueError, match=r"maps contain NaN or inf in image\(s\) \[0, 2\]"):
        metric.update(torch.randn(4, 3, 4, 4), maps)
    with pytest.raises(ValueError, match=r"maps contain NaN or inf in image\(s\) \[0, 2\]"):
        insertion_deletion(ConstantModel(), torch.randn(4, 3, 4, 4), maps, step=4)
    # Nothing was accumulated: a NaN image cannot poison the mean.
    assert int(metric.count) == 0 and float(metric.insertion_sum) == 0.0
    images = torch.randn(4, 3, 4, 4)
    images[3, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"images contain NaN or inf pixels \(image\(s\) \[3\] of the batch\)"):
        metric.update(images, torch.rand(4, 4, 4))


class SoftmaxModel(nn.Module):
    """A classifier that ends in a softmax: its outputs are probabilities."""

    def __init__(self, logits_model: nn.Module) -> None:
        super().__init__()
        self.logits_model = logits_model

    def forward(self, x):
        return self.logits_model(x).softmax(-1)


def test_a_model_that_outputs_probabilities_is_not_softmaxed_again():
    images, maps = torch.randn(3, 3, 10, 12), torch.rand(3, 10, 12)
    logits_model = TinyConvNet(seed=2)
    reference = insertion_deletion(logits_model, images, maps, step=9)
    for outputs in ("auto", "probabilities"):
        result = insertion_deletion(SoftmaxModel(logits_model), images, maps, step=9, outputs=outputs)
        torch.testing.assert_close(result.insertion_curve, reference.insertion_curve)
        torch.testing.assert_close(result.deletion_curve, reference.deletion_curve)
    # Softmaxed again, the probabilities of four classes flatten towards 1/4.
    again = insertion_deletion(SoftmaxModel(logits_model), images, maps, step=9, outputs="logits")
    assert float((again.deletion_curve - 0.25).abs().max()) < float((reference.deletion_curve - 0.25).abs().max())
    assert not torch.allclose(again.deletion_curve, reference.deletion_curve)


def test_outputs_argument_is_checked():
    images, maps = torch.randn(2, 3, 10, 12), torch.rand(2, 10, 12)
    with pytest.raises(ValueError, match=r"outputs='probabilities', but the model's outputs are not distributions"):
        insertion_deletion(ConstantModel(), images, maps, step=9, outputs="probabilities")
    with pytest.raises(ValueError, match=r"outputs='softmax' is not one of \('auto', 'logits', 'probabilities'\)"):
        insertion_deletion(ConstantModel(), images, maps, step=9, outputs="softmax")
    # Logits that are no distribution are softmaxed under "auto" as under "logits".
    torch.testing.assert_close(insertion_deletion(ConstantModel(), images, maps, step=9).insertion,
                               insertion_deletion(ConstantModel(), images, maps, step=9, outputs="logits").insertion)
