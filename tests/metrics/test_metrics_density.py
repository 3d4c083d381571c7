"""Density ratios: 1 for a uniform map at any region size, exact values on hand-made maps, leave-one-out hot regions."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torchmetrics import MetricCollection

from caap_lightning.metrics import (
    AttributionMass,
    DensityRatio,
    FixedPositionRatio,
    density_ratio,
    fixed_position_evidence,
    fixed_position_ratio,
    region_evidence,
)
from caap_lightning.metrics.functional import DENSITY_FLOOR

A = DENSITY_FLOOR


def floored(ratio_in: float, ratio_out: float) -> float:
    """The documented ratio from the area-normalised masses inside and outside: (r_in + floor) / (r_out + floor)."""
    return (ratio_in + A) / (ratio_out + A)


def square_masks(n: int, size: int, side: int = 10) -> torch.Tensor:
    masks = torch.zeros(n, side, side, dtype=torch.bool)
    masks[:, :size, :size] = True
    return masks


@pytest.mark.parametrize("size", [1, 2, 4, 5, 8, 9])
@pytest.mark.parametrize("region", ["mask", "outside"])
def test_a_uniform_map_scores_one_at_any_region_size(size, region):
    maps = torch.full((3, 10, 10), 0.7)
    masks = square_masks(3, size)
    assert float(density_ratio(maps, masks, region)) == pytest.approx(1.0, abs=1e-12)
    metric = DensityRatio(region=region)
    metric.update(maps, masks)
    assert float(metric.compute()) == pytest.approx(1.0, abs=1e-12)
    # A constant patch map upsamples to a constant pixel map: 1 as well.
    # (upsampled in float32: equal up to its rounding)
    assert float(density_ratio(torch.full((3, 2, 2), 0.3), masks, region)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("size", [2, 4, 6, 8])
def test_a_background_twice_as_dense_scores_about_two_whatever_the_object_size(size):
    """Density 2 off the object and 1 on it: the density ratio is ~2 at every size, the mass ratio stays below 1 / background share."""
    masks = square_masks(1, size)
    maps = torch.where(masks, 1.0, 2.0)
    a = size * size / 100  # the object's area share
    total = a + 2 * (1 - a)
    expected = floored(2 / total, 1 / total)
    assert float(density_ratio(maps, masks, "outside")) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(2.0, rel=0.02)
    mass_ratio = AttributionMass(region="outside", normalize_by_area=True)
    mass_ratio.update(maps, masks)
    assert float(mass_ratio.compute()) == pytest.approx((2 * (1 - a) / total) / (1 - a)) and float(mass_ratio.compute()) < 1 / (1 - a)
    # Seen from the mask (the cue form): density on the object over density off it.
    assert float(density_ratio(maps, masks, "mask")) == pytest.approx(floored(1 / total, 2 / total), rel=1e-12)


def test_hand_computed_values_and_the_floor_bounds_the_ratio():
    masks = square_masks(1, 5)  # a quarter of the image
    only_inside = masks.double()
    # All the evidence inside: (1 / 0.25 + floor) / (0 + floor) = 1 + 1 / (floor * 0.25).
    assert float(density_ratio(only_inside, masks)) == pytest.approx(1 + 1 / (A * 0.25), rel=1e-12)
    assert float(density_ratio(only_inside, masks, "outside")) == pytest.approx(A / (4 + A), rel=1e-12)
    # Three times the density inside: mass inside 3 * 0.25 / (3 * 0.25 + 0.75) = 0.5.
    three = torch.where(masks, 3.0, 1.0)
    assert float(density_ratio(three, masks)) == pytest.approx(floored(0.5 / 0.25, 0.5 / 0.75), rel=1e-12)
    # Negative values are no evidence: only the positive part counts.
    assert float(density_ratio(torch.where(masks, 3.0, -5.0), masks)) == pytest.approx(1 + 1 / (A * 0.25), rel=1e-12)
    shares = region_evidence(three, masks)
    assert float(shares.share[0]) == pytest.approx((0.5 + A * 0.25) / (1 + A), rel=1e-12)
    assert float(shares.area[0]) == 0.25


def test_a_map_with_no_positive_part_counts_as_uniform():
    masks = square_masks(2, 3)
    relative = -torch.rand(2, 10, 10)  # below the blank everywhere
    assert float(density_ratio(relative, masks)) == pytest.approx(1.0, abs=1e-12)
    assert float(density_ratio(torch.zeros(2, 10, 10), masks, "outside")) == pytest.approx(1.0, abs=1e-12)
    assert float(fixed_position_ratio(torch.zeros(4, 5, 5))) == pytest.approx(1.0, abs=1e-12)


def test_images_are_pooled_and_classes_accumulate_like_one_batch():
    masks = square_masks(4, 5)
    masks[1] = False  # empty region: skipped
    masks[2, :, :] = True  # whole image: skipped too
    maps = torch.stack([torch.where(masks[0], 3.0, 1.0), torch.rand(10, 10), torch.rand(10, 10), torch.ones(10, 10)])
    # Pooled over the two scored images: mean evidence share (0.5 and 0.25, floored) over mean area share.
    share = ((0.5 + A * 0.25) / (1 + A) + 0.25) / 2
    expected = (share / 0.25) / ((1 - share) / 0.75)
    assert float(density_ratio(maps, masks)) == pytest.approx(expected, rel=1e-12)
    metric = DensityRatio()
    metric.update(maps[:1], masks[:1])
    metric.update(maps[1:], masks[1:])
    details = metric.compute_details()
    assert float(details["density_ratio"]) == pytest.approx(expected, rel=1e-12)
    assert (int(details["count"]), int(details["skipped"])) == (2, 2)
    assert float(details["area_share"]) == 0.25


@pytest.mark.parametrize("fill, which", [(False, "is empty"), (True, "covers the whole image")])
@pytest.mark.parametrize("region", ["mask", "outside"])
def test_a_region_empty_or_whole_in_every_image_is_refused(fill, which, region):
    masks = torch.full((3, 8, 8), fill)
    with pytest.raises(ValueError, match=f"every one of the 3 masks {which}, so no image has an inside and an outside"):
        density_ratio(torch.rand(3, 8, 8), masks, region)
    with pytest.raises(ValueError, match="not blank or inverted"):
        DensityRatio(region=region).update(torch.rand(3, 8, 8), masks)
    mixed = masks.clone()
    mixed[0] = not fill
    with pytest.raises(ValueError, match="is empty or covers the whole image"):
        density_ratio(torch.rand(3, 8, 8), mixed, region)


def test_the_two_regions_stay_apart_in_a_metric_collection():
    masks = square_masks(2, 5)
    maps = torch.where(masks, 3.0, 1.0)
    collection = MetricCollection({"cue": DensityRatio("mask"), "background": DensityRatio("outside")})
    collection.update(maps, masks)
    out = collection.compute()
    assert float(out["cue"]) == pytest.approx(floored(2, 2 / 3), rel=1e-12)
    assert float(out["background"]) == pytest.approx(floored(2 / 3, 2), rel=1e-12)


def one_hot_maps(pixels, side: int = 2) -> torch.Tensor:
    maps = torch.zeros(len(pixels), side * side)
    maps[torch.arange(len(pixels)), torch.as_tensor(pixels)] = 1.0
    return maps.view(-1, side, side)


def test_fixed_position_exact_values():
    # Every image's evidence on pixel 3 (of 4), a region of one pixel: 1 + 1 / (floor * 0.25).
    fixed = one_hot_maps([3, 3, 3, 3])
    assert float(fixed_position_ratio(fixed, region_share=0.25)) == pytest.approx(1 + 4 / A, rel=1e-12)
    found = fixed_position_evidence(fixed, region_share=0.25)
    assert found.hot_region.tolist() == [[False, False], [False, True]]
    assert found.regions.flatten(1).nonzero()[:, 1].tolist() == [3, 3, 3, 3]
    # Uniform maps: 1.
    assert float(fixed_position_ratio(torch.ones(5, 4, 4))) == pytest.approx(1.0, abs=1e-12)


def test_leave_one_out_a_peak_that_moves_never_selects_itself():
    """Each image peaks where no other does: its hot region is another's peak, which holds only the floor."""
    moving = one_hot_maps([0, 1, 2, 3])
    found = fixed_position_evidence(moving, region_share=0.25)
    # The other three peaks tie; the lowest pixel index wins.
    assert found.regions.flatten(1).nonzero()[:, 1].tolist() == [1, 0, 0, 0]
    share = (A / 4) / (1 + A)
    assert found.share.tolist() == pytest.approx([share] * 4, rel=1e-12)
    assert float(fixed_position_ratio(moving, region_share=0.25)) == pytest.approx(A / (4 / 3 + A), rel=1e-12)
    fixed_share = (1 + A / 4) / (1 + A)
    # Three fixed at pixel 3, two moving: every hot region is pixel 3, which only the fixed ones fill.
    mixed = one_hot_maps([3, 3, 3, 0, 1])
    found = fixed_position_evidence(mixed, region_share=0.25)
    assert found.regions.flatten(1).nonzero()[:, 1].tolist() == [3, 3, 3, 3, 3]
    assert found.share.tolist() == pytest.approx([fixed_share] * 3 + [share] * 2, rel=1e-12)
    mean = (3 * fixed_share + 2 * share) / 5
    assert float(fixed_position_ratio(mixed, 0.25)) == pytest.approx((mean / 0.25) / ((1 - mean) / 0.75), rel=1e-12)


def test_fixed_position_regions_do_not_depend_on_the_order_of_the_images():
    # Three pixels hold the same three values in three orders: their totals tie but for rounding, which
    # depends on the order of summation. DDP gathers the probe rank by rank, so the order must not matter.
    values = [0.13203048706054688, 0.30742281675338745, 0.6340786814689636]
    maps = torch.full((5, 16), 0.01)
    for pixel in range(3):
        maps[:3, pixel] = torch.tensor(values[pixel:] + values[:pixel])
        maps[3:, pixel] = 0.5
    maps = maps.view(5, 4, 4)
    order = [0, 2, 4, 1, 3]  # two ranks' shards, one after the other
    assert torch.equal(fixed_position_evidence(maps[order]).regions, fixed_position_evidence(maps).regions[order])
    assert float(fixed_position_ratio(maps[order])) == pytest.approx(float(fixed_position_ratio(maps)), rel=1e-12)


def test_fixed_position_class_keeps_the_maps_and_matches_the_function():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(7, 6, 6, generator=generator)
    maps[:, 5, 5] += 2.0  # a corner cue
    metric = FixedPositionRatio()
    metric.update(maps[:3])
    metric.update(maps[3:])
    details = metric.compute_details()
    assert float(metric.compute()) == pytest.approx(float(fixed_position_ratio(maps)), rel=1e-6)
    assert int(details["count"]) == 7 and float(details["area_share"]) == pytest.approx(4 / 36)
    assert float(metric.compute()) > 2.0
    single = FixedPositionRatio()
    single.update(maps[:1])
    assert torch.isnan(single.compute())  # no other image to choose a region from
    with pytest.raises(ValueError, match="one size"):
        metric.update(torch.rand(2, 3, 3))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: fixed_position_ratio(torch.rand(1, 4, 4)), "at least 2 maps"),
        (lambda: fixed_position_ratio(torch.rand(3, 4, 4), region_share=1.0), "region_share"),
        (lambda: FixedPositionRatio(region_share=0), "region_share"),
        (lambda: fixed_position_ratio(torch.rand(3, 16)), r"\(B, h, w\)"),
        (lambda: fixed_position_ratio(torch.full((3, 2, 2), float("nan"))), "NaN"),
        (lambda: DensityRatio(region="inside"), "region"),
        (lambda: density_ratio(torch.rand(2, 4, 4), torch.rand(2, 4, 4)), "binary"),
    ],
)
def test_bad_input_fails_with_what_to_change(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_two_processes_report_what_one_does(tmp_path, monkeypatch):
    # Spawned (not forked: a forked child would inherit a process group an earlier test left) processes
    # import the worker by name, so its folder goes on sys.path.
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    worker = importlib.import_module("_metrics_ddp_worker")
    generator = torch.Generator().manual_seed(2)
    maps = torch.rand(5, 6, 6, generator=generator)
    maps[:, 0, 0] += 1.5
    masks = square_masks(5, 3, side=6)
    masks[4] = False
    out_path = tmp_path / "density.pt"
    mp.spawn(worker.density_shard, args=(worker.free_port(), maps, masks, str(out_path)), nprocs=2, join=True)
    out = torch.load(out_path, weights_only=True)
    single_density, single_fixed = DensityRatio(region="outside"), FixedPositionRatio()
    single_density.update(maps, masks)
    single_fixed.update(maps)
    for name, single in (("density", single_density), ("fixed", single_fixed)):
        for key, value in single.compute_details().items():
            torch.testing.assert_close(out[name][key], value, msg=f"{name}/{key}")
