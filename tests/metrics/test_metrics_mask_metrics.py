"""AUPR, pointing game and attribution mass on hand-computed cases and against sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from caap_lightning.metrics import AUPR, AttributionMass, PointingGame, attribution_mass, aupr, pointing_game


def square_mask(size=16, box=(4, 10, 5, 12)):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[box[0] : box[1], box[2] : box[3]] = True
    return mask


def test_perfect_map_scores_one():
    masks = torch.stack([square_mask(), square_mask(box=(0, 3, 0, 16))])
    maps = masks.float() * 2.0 + 1.0
    auc = AUPR()
    auc.update(maps, masks)
    pg = PointingGame()
    pg.update(maps, masks)
    assert float(auc.compute_details()["aupr"]) == pytest.approx(1.0)
    assert float(pg.compute_details()["pointing_game"]) == pytest.approx(1.0)
    background = AUPR(region="background")
    background.update(maps, masks)
    assert float(background.compute_details()["aupr"]) == pytest.approx(1.0)


def test_inverted_map_scores_below_random():
    torch.manual_seed(0)
    masks = torch.stack([square_mask()] * 8)
    perfect = masks.float() + 0.1 * torch.rand(8, 16, 16)
    inverted = 1 - perfect
    random = torch.rand(8, 16, 16)
    assert (aupr(inverted, masks).aupr < aupr(random, masks).aupr).all()
    assert (aupr(random, masks).aupr < aupr(perfect, masks).aupr).all()


@pytest.mark.parametrize("region", ["foreground", "background"])
def test_aupr_matches_sklearn(region):
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(6, 20, 24, generator=generator) < torch.linspace(0.05, 0.6, 6)[:, None, None]
    maps = torch.randn(6, 20, 24, generator=generator, dtype=torch.float64)
    maps[0] = maps[0].round()  # ties: sklearn scores a tied group at one threshold
    maps[1] = 0.0  # a constant map ties every pixel
    result = aupr(maps, masks, region=region)
    for i in range(6):
        score = maps[i].flatten().numpy()
        score = (score - score.min()) / (score.max() - score.min()) if score.max() > score.min() else score * 0
        label = masks[i].flatten().numpy()
        if region == "background":
            score, label = 1 - score, ~label
        expected = average_precision_score(label, score)
        assert float(result.aupr[i]) == pytest.approx(expected, abs=1e-6)
        assert float(result.lift[i]) == pytest.approx(expected / label.mean(), abs=1e-6)


def test_aupr_lift_and_skips():
    masks = torch.stack([square_mask(), torch.zeros(16, 16, dtype=torch.bool), torch.ones(16, 16, dtype=torch.bool)])
    maps = torch.rand(3, 4, 4)
    foreground, background = AUPR(), AUPR(region="background")
    foreground.update(maps, masks)
    background.update(maps, masks)
    fg, bg = foreground.compute_details(), background.compute_details()
    # The empty mask has no foreground, the full one no background.
    assert (int(fg["count"]), int(fg["skipped"])) == (2, 1)
    assert (int(bg["count"]), int(bg["skipped"])) == (2, 1)
    per_image = aupr(maps, masks)
    share = masks[0].float().mean()
    assert float(per_image.lift[0]) == pytest.approx(float(per_image.aupr[0] / share))
    # A full mask is trivially AP = 1 with lift 1.
    assert float(per_image.aupr[2]) == 1.0 and float(per_image.lift[2]) == 1.0
    assert torch.isnan(per_image.aupr[1])
    torch.testing.assert_close(fg["aupr"], per_image.aupr[[0, 2]].mean())
    torch.testing.assert_close(fg["lift"], per_image.lift[[0, 2]].mean())


def test_pointing_game_ties_share_and_tolerance():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0:4, 0:4] = True
    # Four tied maxima, one of them inside the mask: the expected hit is 1/4.
    pixel_map = torch.zeros(8, 8)
    for r, c in [(3, 3), (7, 7), (7, 0), (0, 7)]:
        pixel_map[r, c] = 1.0
    assert float(pointing_game(pixel_map[None], mask[None])[0]) == pytest.approx(0.25)
    # A single maximum at (5, 5): distance to the mask's corner (3, 3) is sqrt(8) ~ 2.83.
    single = torch.zeros(8, 8)
    single[5, 5] = 1.0
    assert float(pointing_game(single[None], mask[None], tolerance=2)[0]) == 0.0
    assert float(pointing_game(single[None], mask[None], tolerance=3)[0]) == 1.0
    # (5, 3) is 2 pixels below the mask.
    below = torch.zeros(8, 8)
    below[5, 3] = 1.0
    assert float(pointing_game(below[None], mask[None], tolerance=1)[0]) == 0.0
    assert float(pointing_game(below[None], mask[None], tolerance=2)[0]) == 1.0
    # A constant map ties everywhere: the score is the mask's share of the image.
    assert float(pointing_game(torch.ones(1, 8, 8), mask[None])[0]) == pytest.approx(16 / 64)


def test_pointing_game_ties_survive_bilinear_rounding():
    # A 2x2 plateau of patches upsamples to 64 pixels equal to 0.1 up to float rounding
    # (exact equality finds only 3 of them); a quarter of the plateau is in the mask.
    patch_map = torch.zeros(1, 4, 4)
    patch_map[0, 1:3, 1:3] = 0.1
    mask = square_mask(size=32, box=(8, 16, 8, 16))
    assert float(pointing_game(patch_map, mask[None])[0]) == pytest.approx(0.25)


def test_pointing_game_patch_map_and_skips():
    mask = square_mask(size=32, box=(8, 16, 16, 24))
    patch_map = torch.zeros(4, 4)
    patch_map[1, 2] = 1.0  # the patch covering rows 8-15, columns 16-23
    metric = PointingGame()
    metric.update(torch.stack([patch_map, patch_map.T]), torch.stack([mask, mask]))
    metric.update(patch_map[None], torch.zeros(1, 32, 32, dtype=torch.bool))
    out = metric.compute_details()
    assert (int(out["count"]), int(out["skipped"])) == (2, 1)
    assert float(out["pointing_game"]) == pytest.approx(0.5)


def test_attribution_mass_hand_computed():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, :1] = True  # a quarter of the image
    relative = torch.full((4, 4), -1.0)
    relative[0, 0] = 3.0  # inside
    relative[3, 3] = 1.0  # outside
    relative[2, 2] = -5.0  # negative attribution does not count
    maps, masks = relative[None], mask[None]
    assert float(attribution_mass(maps, masks)[0]) == pytest.approx(0.75)
    assert float(attribution_mass(maps, masks, region="outside")[0]) == pytest.approx(0.25)
    assert float(attribution_mass(maps, masks, normalize_by_area=True)[0]) == pytest.approx(0.75 / 0.25)
    assert float(attribution_mass(maps, masks, "outside", True)[0]) == pytest.approx(0.25 / 0.75)


def test_attribution_mass_uniform_map_normalises_to_one():
    masks = torch.stack([square_mask(), square_mask(box=(0, 2, 0, 2))])
    uniform = torch.ones(2, 4, 4)
    for region in ("mask", "outside"):
        metric = AttributionMass(region=region, normalize_by_area=True)
        metric.update(uniform, masks)
        assert float(metric.compute_details()["attribution_mass"]) == pytest.approx(1.0)
    raw = AttributionMass(region="outside")
    raw.update(uniform, masks)
    area_outside = (~masks).float().mean((1, 2)).mean()
    assert float(raw.compute_details()["attribution_mass"]) == pytest.approx(float(area_outside))


def test_attribution_mass_skips_empty_regions_only():
    masks = torch.stack([square_mask(), torch.zeros(16, 16, dtype=torch.bool), torch.ones(16, 16, dtype=torch.bool)])
    maps = torch.rand(3, 16, 16)
    maps[0] = -1.0  # no positive attribution: mass 0, scored
    inside, outside = AttributionMass(), AttributionMass(region="outside")
    inside.update(maps, masks)
    outside.update(maps, masks)
    # Image 1 has no mask (skipped inside), image 2 no outside (skipped outside).
    inside_out, outside_out = inside.compute_details(), outside.compute_details()
    assert (int(inside_out["count"]), int(inside_out["skipped"])) == (2, 1)
    assert (int(outside_out["count"]), int(outside_out["skipped"])) == (2, 1)
    # Inside: image 0 scores 0, the full mask of image 2 holds everything.
    assert float(inside_out["attribution_mass"]) == pytest.approx(0.5)
    # Outside: image 0 scores 0, image 1's outside is the whole image.
    assert float(outside_out["attribution_mass"]) == pytest.approx(0.5)


@pytest.mark.parametrize("normalize_by_area", [False, True])
def test_attribution_mass_without_positive_part_is_zero(normalize_by_area):
    # A relative map entirely below the blank: no evidence anywhere, so none in the mask.
    masks = torch.stack([square_mask(), square_mask(box=(0, 8, 0, 8))])
    relative = -torch.rand(2, 4, 4) - 0.1
    relative[1, 0, 0] = 0.0  # zero is not positive either
    for region in ("mask", "outside"):
        mass = attribution_mass(relative, masks, region=region, normalize_by_area=normalize_by_area)
        assert mass.tolist() == [0.0, 0.0]
        metric = AttributionMass(region=region, normalize_by_area=normalize_by_area)
        metric.update(relative, masks)
        out = metric.compute_details()
        assert float(out["attribution_mass"]) == 0.0
        assert (int(out["count"]), int(out["skipped"])) == (2, 0)


@pytest.mark.parametrize(
    "metric", [AUPR(), AUPR(region="background"), PointingGame(tolerance=1), AttributionMass()]
)
def test_non_finite_map_names_the_image(metric):
    maps = torch.rand(4, 4, 4)
    maps[3, 0, 2] = float("nan")
    maps[1, 1, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"maps contain NaN or inf in image\(s\) \[1, 3\]"):
        metric.update(maps, torch.stack([square_mask()] * 4))


def test_bad_arguments_fail_fast():
    with pytest.raises(ValueError, match="region"):
        AUPR(region="fg")
    with pytest.raises(ValueError, match="region"):
        AttributionMass(region="inside")
    with pytest.raises(ValueError, match="tolerance"):
        PointingGame(tolerance=-1)
    with pytest.raises(ValueError, match="masks must be"):
        aupr(torch.rand(2, 4, 4), torch.ones(2, 2, 16, 16))


def test_metrics_accumulate_like_one_batch():
    generator = torch.Generator().manual_seed(2)
    maps = torch.randn(6, 4, 4, generator=generator)
    masks = torch.rand(6, 16, 16, generator=generator) < 0.3
    for make in (AUPR, PointingGame, AttributionMass):
        split, whole = make(), make()
        split.update(maps[:2], masks[:2])
        split.update(maps[2:], masks[2:])
        whole.update(maps, masks)
        for key, value in whole.compute_details().items():
            torch.testing.assert_close(split.compute_details()[key], value)
    np.testing.assert_allclose(
        float(AttributionMass()(maps, masks)),
        float(torch.nanmean(attribution_mass(maps, masks))),
    )
