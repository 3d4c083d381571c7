"""Swap ratio: the pairing, the swapped images, exact probabilities of hand-made models that read known
pixels, pooling, skipped pairs and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from caap_lightning.model_tests import RATIO_FLOOR, SwapPairs, SwapRatio, border_masks, floored_ratio, region_swap, swapped_images
from caap_lightning.model_tests.views import dilate, edge_width

F = RATIO_FLOOR
SIZE = 16
K = 4


class ChannelReader(nn.Module):
    """Class c's logit is ``scale`` times the mean of channel c over ``watched``: it reads only that region."""

    def __init__(self, watched: torch.Tensor, scale: float = 4.0):
        super().__init__()
        self.register_buffer("watched", watched.float())
        self.scale = scale
        self.weight = nn.Parameter(torch.zeros(1))  # a parameter, so that the model has a device and dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x * self.watched).sum((2, 3)) / self.watched.sum() + self.weight


def coloured(classes: list) -> torch.Tensor:
    """One image per class c: channel c is 1 everywhere, the others 0 (K channels)."""
    images = torch.zeros(len(classes), K, SIZE, SIZE)
    for i, c in enumerate(classes):
        images[i, c] = 1.0
    return images


def p(logit: float, others: list) -> float:
    """The softmax probability of a class with ``logit`` against the ``others``' logits."""
    return math.exp(logit) / (math.exp(logit) + sum(math.exp(o) for o in others))


def test_each_image_is_paired_with_the_one_half_the_batch_on():
    assert SwapPairs(4).donors.tolist() == [2, 3, 0, 1]
    assert SwapPairs(5).donors.tolist() == [2, 3, 4, 0, 1]
    assert SwapPairs(2).donors.tolist() == [1, 0]
    with pytest.raises(ValueError, match="a swap needs a donor other than the image"):
        SwapPairs(1)


def copied_from(filled: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether every pixel (a column of ``filled``, ``(C, N)``) is a copy of some pixel of ``source`` ``(C, M)``."""
    return bool((filled[:, :, None] == source[:, None, :]).all(0).any(1).all())


def test_the_swapped_image_takes_the_donor_region_and_hides_its_own():
    images, donors = torch.rand(2, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True
    donor_masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    donor_masks[:, 9:14, 8:12] = True
    width = edge_width((SIZE, SIZE))
    # region="mask" (a cue): the donor's cue on the image, the image's own cue and its edge filled from its rest
    # (issue 29: a tiled fill rather than the rest's mean colour, which drew the removed part's outline).
    cue = swapped_images(images, masks, donors, donor_masks, "mask")
    assert torch.equal(cue[:, :, donor_masks[0]], donors[:, :, donor_masks[0]])
    hidden = dilate(masks, width)[0]
    for i in range(2):
        assert copied_from(cue[i][:, hidden], images[i][:, ~hidden])
    untouched = ~hidden & ~donor_masks[0]
    assert torch.equal(cue[:, :, untouched], images[:, :, untouched])
    # region="outside" (an object mask): the image's object on the donor's background, the donor's object filled
    # from the donor's own background.
    scene = swapped_images(images, masks, donors, donor_masks, "outside")
    assert torch.equal(scene[:, :, masks[0]], images[:, :, masks[0]])
    gone = dilate(donor_masks, width)[0] & ~masks[0]
    for i in range(2):
        assert copied_from(scene[i][:, gone], donors[i][:, ~dilate(donor_masks, width)[0]])
    background = ~masks[0] & ~dilate(donor_masks, width)[0]
    assert torch.equal(scene[:, :, background], donors[:, :, background])


@pytest.mark.parametrize("reads_border", [True, False])
def test_the_swap_gives_the_donor_class_to_a_model_that_reads_the_region_and_the_own_to_one_that_reads_the_rest(reads_border):
    ring = border_masks(1, (SIZE, SIZE))[0]
    model = ChannelReader(ring if reads_border else ~ring)
    classes = [0, 1, 2, 3]
    images = coloured(classes)
    donors = SwapPairs(4).donors
    masks = border_masks(4, (SIZE, SIZE))
    found = region_swap(model, images, masks, images[donors], masks, target=classes, donor_target=donors.tolist())
    # The border holds the donor's colour (its class's channel at 1), the inside the image's own.
    high, low = p(4.0, [0.0, 0.0, 0.0]), p(0.0, [4.0, 0.0, 0.0])
    suspect, rest = (high, low) if reads_border else (low, high)
    assert torch.allclose(found.suspect, torch.full((4,), suspect, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(found.rest, torch.full((4,), rest, dtype=torch.float64), atol=1e-6)
    assert found.scored.all() and found.donor_target.tolist() == [2, 3, 0, 1]
    metric = SwapRatio(model, image_ratios=True)
    metric.update(images, masks, images[donors], masks, target=classes, donor_target=donors)
    out = metric.compute_details()
    assert float(out["swap_ratio"]) == pytest.approx((suspect + F) / (rest + F), rel=1e-5)
    assert float(out["suspect_probability"]) == pytest.approx(suspect, rel=1e-5)
    assert (float(out["swap_ratio"]) > 1) == reads_border


def test_the_background_swap_puts_each_object_on_another_background():
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    masks[:, 5:11, 5:11] = True
    images = coloured([0, 1])
    model = ChannelReader(~dilate(masks, edge_width((SIZE, SIZE)))[0])  # reads the background only
    found = region_swap(model, images, masks, images.flip(0), masks.flip(0), region="outside", target=[0, 1],
                        donor_target=[1, 0])
    # The background (and the painted-over donor object) is the donor's colour: the donor's class wins.
    assert torch.allclose(found.suspect, torch.full((2,), p(4.0, [0.0] * 3), dtype=torch.float64), atol=1e-6)
    assert torch.allclose(found.rest, torch.full((2,), p(0.0, [4.0, 0.0, 0.0]), dtype=torch.float64), atol=1e-6)


def test_unclassified_images_take_their_top_1_and_pairs_of_one_class_are_skipped():
    ring = border_masks(1, (SIZE, SIZE))[0]
    model = ChannelReader(~ring)
    images = coloured([0, 1, 0, 2])
    masks = border_masks(4, (SIZE, SIZE))
    masks[3] = False  # nothing to swap: skipped
    donors = SwapPairs(4).donors  # 0 <- 2 (both class 0: skipped), 1 <- 3 (empty donor mask: skipped), 2 <- 0, 3 <- 1
    found = region_swap(model, images, masks, images[donors], masks[donors])
    assert found.target.tolist() == [0, 1, 0, 2] and found.donor_target.tolist() == [0, 2, 0, 1]
    assert found.scored.tolist() == [False, False, False, False]
    given = region_swap(model, images, masks, images[donors], masks[donors], target=[0, 1, 0, 2], donor_target=[1, 2, 3, 1])
    assert given.scored.tolist() == [True, False, True, False]
    metric = SwapRatio(model, image_ratios=True)
    metric.update(images[:2], masks[:2], images[donors[:2]], masks[donors[:2]], target=[0, 1], donor_target=[1, 2])
    metric.update(images[2:], masks[2:], images[donors[2:]], masks[donors[2:]], target=[0, 2], donor_target=[3, 1])
    out = metric.compute_details()
    assert int(out["count"]) == 2 and int(out["skipped"]) == 2
    kept = given.scored
    expected = floored_ratio(given.suspect[kept].mean(), given.rest[kept].mean())
    assert float(out["swap_ratio"]) == pytest.approx(float(expected))
    per_image = out["image_ratios"]
    assert torch.isnan(per_image[~kept]).all() and torch.allclose(per_image[kept], floored_ratio(given.suspect, given.rest)[kept])


def test_bad_input_is_refused_with_what_to_change():
    model = ChannelReader(border_masks(1, (SIZE, SIZE))[0])
    images = coloured([0, 1])
    masks = border_masks(2, (SIZE, SIZE))
    with pytest.raises(ValueError, match=r"donor_images \(1, 4, 16, 16\) do not match the images"):
        region_swap(model, images, masks, images[:1], masks[:1])
    with pytest.raises(ValueError, match=r"donor_masks \(2, 8, 8\) do not match"):
        region_swap(model, images, masks, images, border_masks(2, (8, 8)))
    with pytest.raises(ValueError, match="every one of the 2 masks covers the whole image"):
        region_swap(model, images, torch.ones(2, SIZE, SIZE, dtype=torch.bool), images, masks)
    with pytest.raises(ValueError, match="out of range"):
        region_swap(model, images, masks, images.flip(0), masks, target=[0, 1], donor_target=[1, 9])
    with pytest.raises(ValueError, match="region"):
        SwapRatio(model, region="inside")


def test_the_follow_share_counts_the_pairs_that_follow_the_swapped_region():
    """A model that reads the border: three donors bring a border of their own class (the pair follows it), the
    fourth a border of the image's own class (it does not); the suite logs the share beside the ratio."""
    from caap_lightning.datamodules.base import ProbeBatch
    from caap_lightning.model_tests import MODEL_TESTS, ModelTestSuite, SwapShard

    ring = border_masks(1, (SIZE, SIZE))[0]
    model = ChannelReader(ring)
    classes, donor_classes = [0, 1, 2, 3], [2, 3, 0, 1]
    images = coloured(classes)
    donors = coloured([2, 3, 0, 3])  # the last donor's border holds the image's own colour
    masks = border_masks(4, (SIZE, SIZE))
    metric = SwapRatio(model, image_ratios=True)
    metric.update(images, masks, donors, masks, target=classes, donor_target=donor_classes)
    out = metric.compute_details()
    assert int(out["follows"]) == 3 and float(out["follow_share"]) == pytest.approx(0.75)
    assert MODEL_TESTS["border_swap_ratio"].scalars == {
        "border_swap_ratio": "swap_ratio", "border_swap_follow_share": "follow_share"}
    suite = ModelTestSuite(["border_swap_ratio"], model, ProbeBatch(images, torch.tensor(classes)))
    probs = model(images).softmax(-1).detach()
    shard = SwapShard(images, {}, torch.tensor(classes), donors, {}, torch.tensor(donor_classes), probs)
    suite.update(images, {}, torch.tensor(classes), shard)
    # Each clean image's top class has p(4 | 0, 0, 0): the skill is that, chance-corrected (issue 29).
    assert suite.skill() == pytest.approx((p(4.0, [0.0] * 3) - 1 / K) / (1 - 1 / K), rel=1e-6)
    (share, follows), (ratio, ratios) = suite.compute()["border_swap_follow_share"], suite.compute()["border_swap_ratio"]
    assert float(share) == pytest.approx(0.75) and follows.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert float(ratio) == pytest.approx(float(out["swap_ratio"])) and (ratios > 1).tolist() == [True] * 3 + [False]
