"""Insertion ratio: exact gains of hand-made models that read known pixels, the views each part is shown in,
outlines hidden when a part is removed, pooling, skipped images and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchmetrics import MetricCollection

from caap_lightning.model_tests import RATIO_FLOOR, InsertionRatio, border_masks, floored_ratio, region_insertion, rest_colour
from caap_lightning.model_tests.views import dilate, edge_width, fill_with_mean_of_rest, suspect_views

F = RATIO_FLOOR
SIZE = 16


class PixelReader(nn.Module):
    """Class 0's logit is ``scale`` times the mean of channel 0 over ``watched``; the other classes' are 0."""

    def __init__(self, watched: torch.Tensor, scale: float = 4.0, num_classes: int = 4):
        super().__init__()
        self.register_buffer("watched", watched.float())
        self.scale = scale
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.zeros(1))  # a parameter, so that the model has a device and dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        read = (x[:, 0] * self.watched).sum((1, 2)) / self.watched.sum()
        logits = torch.zeros(len(x), self.num_classes, dtype=x.dtype, device=x.device)
        logits[:, 0] = self.scale * read + self.weight
        return logits


def p0(logit: float, num_classes: int = 4) -> float:
    """Class 0's probability when its logit is ``logit`` and the others' are 0."""
    return math.exp(logit) / (math.exp(logit) + num_classes - 1)


def ring_images(n: int = 3) -> torch.Tensor:
    """Channel 0 is 1 on the default border ring and 0 inside; the other channels random."""
    images = torch.rand(n, 3, SIZE, SIZE)
    images[:, 0] = border_masks(n, (SIZE, SIZE)).float()
    return images


def test_border_masks_are_the_outer_eighth_of_each_side():
    ring = border_masks(2, (32, 24))
    assert ring.shape == (2, 32, 24) and ring.dtype == torch.bool
    inside = torch.zeros(32, 24, dtype=torch.bool)
    inside[4:28, 3:21] = True  # round(32 / 8) = 4 rows, round(24 / 8) = 3 columns
    assert torch.equal(ring[0], ~inside) and torch.equal(ring[1], ring[0])
    assert border_masks(1, (4, 4), share=0.01)[0].sum() == 12  # at least one pixel wide
    with pytest.raises(ValueError, match=r"share of each side must be in \(0, 0.5\)"):
        border_masks(1, (8, 8), share=0.5)
    with pytest.raises(ValueError, match="no inside"):
        border_masks(1, (2, 2), share=0.25)


def test_a_removed_region_takes_the_mean_colour_of_the_rest():
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    masks = torch.tensor([[[True, False], [False, False]], [[True, True], [False, True]]])
    filled = fill_with_mean_of_rest(images, masks)
    # Image 0: pixel (0, 0) takes the mean of the other three pixels, per channel.
    assert torch.allclose(filled[0, :, 0, 0], images[0].flatten(1)[:, 1:].mean(1))
    # Image 1: three pixels take the one remaining pixel's colour.
    assert torch.equal(filled[1, :, 0, 0], images[1, :, 1, 0]) and torch.equal(filled[1, :, 1, 1], images[1, :, 1, 0])
    assert torch.equal(filled[~masks[:, None].expand_as(images)], images[~masks[:, None].expand_as(images)])


def test_the_views_keep_the_mask_outline_only_where_the_mask_is_shown():
    images = torch.rand(2, 3, SIZE, SIZE)
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    masks[:, 4:10, 5:12] = True
    edge = dilate(masks, edge_width((SIZE, SIZE)))  # a pixel around the mask at 16 px: neither view keeps it
    assert edge_width((SIZE, SIZE)) == 1 and edge_width((224, 224)) == 7 and int(edge[0].sum()) == 8 * 9
    colour = torch.tensor([0.1, 0.2, 0.3])
    hidden, only_mask = fill_with_mean_of_rest(images, edge), torch.where(masks[:, None], images, colour.view(1, 3, 1, 1))
    # region="mask": the mask alone on the colour; the image with the mask painted over.
    suspect, rest = suspect_views(images, masks, "mask", colour)
    assert torch.equal(suspect, only_mask) and torch.equal(rest, hidden)
    # region="outside" (an object mask): the background with the object painted over; the object alone.
    suspect, rest = suspect_views(images, masks, "outside", colour)
    assert torch.equal(suspect, hidden) and torch.equal(rest, only_mask)
    # Painted over, the object and its edge leave no outline: there every pixel has the mean colour of the rest.
    inside = suspect[0][:, edge[0]]
    assert torch.allclose(inside, images[0][:, ~edge[0]].mean(1, keepdim=True).expand_as(inside))
    ring = edge[0] & ~masks[0]
    assert torch.allclose(rest[0][:, ring], colour[:, None].expand(3, int(ring.sum())))


def test_a_model_reading_only_the_border_restores_its_class_from_the_border_alone():
    images = ring_images()
    model = PixelReader(border_masks(1, (SIZE, SIZE))[0])
    found = region_insertion(model, images, border_masks(3, (SIZE, SIZE)))
    gain = p0(4.0) - p0(0.0)  # the border alone reads 1; the blank reads 0
    assert torch.allclose(found.suspect, torch.full((3,), gain, dtype=torch.float64), atol=1e-6)
    # The image without its border: the ring painted in the inside's colour (0) reads as the blank.
    assert torch.allclose(found.rest, torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert found.target.tolist() == [0, 0, 0] and found.scored.all()
    assert float(floored_ratio(found.suspect.mean(), found.rest.mean())) == pytest.approx((gain + F) / F, rel=1e-5)


def test_a_model_reading_the_object_scores_below_one_on_the_background_test():
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    masks[:, 5:11, 5:11] = True
    images = torch.zeros(2, 3, SIZE, SIZE)
    images[:, 0] = masks.float()  # the object reads 1, the background 0
    model = PixelReader(masks[0])
    found = region_insertion(model, images, masks, region="outside")
    # The background alone: the object painted in the background's colour (0) reads as the blank.
    assert torch.allclose(found.suspect, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(found.rest, torch.full((2,), p0(4.0) - p0(0.0), dtype=torch.float64), atol=1e-6)
    metric = InsertionRatio(model, region="outside")
    metric.update(images, masks)
    assert float(metric.compute()) == pytest.approx(F / (p0(4.0) - p0(0.0) + F), rel=1e-5)


def test_gains_are_the_positive_part_over_the_blank_for_the_given_targets():
    images = ring_images(2)
    model = PixelReader(border_masks(1, (SIZE, SIZE))[0], scale=-4.0)  # the border *lowers* class 0
    found = region_insertion(model, images, border_masks(2, (SIZE, SIZE)), target=[0, 1])
    # Class 0 alone loses probability (a negative gain counts as 0); class 1 gains what class 0 loses.
    assert found.suspect[0] == 0 and found.target.tolist() == [0, 1]
    expected = math.exp(0) / (math.exp(-4.0) + 3) - 0.25
    assert float(found.suspect[1]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="class"):
        region_insertion(model, images, border_masks(2, (SIZE, SIZE)), target=[0, 7])


def test_the_metric_pools_gains_before_the_ratio_and_skips_empty_masks():
    images = ring_images(4)
    masks = border_masks(4, (SIZE, SIZE))
    masks[3] = False  # nothing to compare: skipped
    model = PixelReader(border_masks(1, (SIZE, SIZE))[0])
    images[1, 0] = 0.5 * images[1, 0]  # a fainter border: a smaller gain
    # With one colour for the whole set, batches accumulate to what one batch of the scored images gives.
    colour = rest_colour(images[:3], masks[:3])
    metric = InsertionRatio(model, colour=colour, image_ratios=True)
    metric.update(images[:2], masks[:2])
    metric.update(images[2:], masks[2:])
    out = metric.compute_details()
    found = region_insertion(model, images[:3], masks[:3], colour=colour)
    assert int(out["count"]) == 3 and int(out["skipped"]) == 1
    assert float(out["suspect_gain"]) == pytest.approx(float(found.suspect.mean()))
    assert float(out["insertion_ratio"]) == pytest.approx(float(floored_ratio(found.suspect.mean(), found.rest.mean())))
    per_image = out["image_ratios"]
    assert torch.allclose(per_image[:3], floored_ratio(found.suspect, found.rest)) and torch.isnan(per_image[3])
    # Two regions in one collection keep their own states.
    both = MetricCollection({"cue": InsertionRatio(model), "background": InsertionRatio(model, region="outside")})
    both.update(images[:3], masks[:3])
    values = both.compute()
    assert float(values["cue"]) != pytest.approx(float(values["background"]))


def test_bad_input_is_refused_with_what_to_change():
    model = PixelReader(border_masks(1, (SIZE, SIZE))[0])
    images = ring_images(2)
    with pytest.raises(ValueError, match="every one of the 2 masks covers the whole image"):
        region_insertion(model, images, torch.ones(2, SIZE, SIZE, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"do not match the images"):
        region_insertion(model, images, border_masks(2, (8, 8)))
    with pytest.raises(ValueError, match="region"):
        InsertionRatio(model, region="inside")
    with pytest.raises(ValueError, match="floor must be a probability > 0"):
        InsertionRatio(model, floor=0)


def test_the_removed_rest_takes_the_batch_colour_of_that_region_and_the_blank_is_that_colour():
    images = ring_images(3)
    masks = border_masks(3, (SIZE, SIZE))
    colour = rest_colour(images, masks)
    # The mean over every image's inside pixels, per channel: channel 0 is 0 inside the ring.
    assert colour.shape == (3,) and colour[0] == 0
    assert torch.allclose(colour, images.permute(1, 0, 2, 3)[:, ~masks].mean(1))
    model = PixelReader(border_masks(1, (SIZE, SIZE))[0])
    found = region_insertion(model, images, masks)
    assert torch.equal(found.colour, colour)
    # A colour given is used instead: channel 0 at 1 makes the blank read as the border does, so nothing gains.
    bright = torch.tensor([1.0, 0.5, 0.5])
    found = region_insertion(model, images, masks, colour=bright)
    assert torch.allclose(found.suspect, torch.zeros(3, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="colour has 2 channels but the images 3"):
        region_insertion(model, images, masks, colour=torch.zeros(2))
