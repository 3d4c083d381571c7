"""The swap views on a textured background: the hole a removed part leaves continues the texture, the image's own
object is unchanged, and nothing of the donor's object but the region the test names is left."""

from __future__ import annotations

import pytest
import torch

from caap_lightning.datamodules import SyntheticSpuriousDataModule
from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.model_tests import MODEL_TESTS, SwapPairs, border_masks, centre_masks, swapped_images
from caap_lightning.model_tests.swap_ratio import cue_on_top, is_backdrop
from caap_lightning.model_tests.views import dilate, edge_width, fill_from_surroundings

SIZE = 32
UNIQUE = torch.tensor([2.0, -1.0, 2.0])  # a colour no texture pixel (in [0, 1]) has: the donor's object


def textured(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def disc(n: int, cy: int, cx: int, radius: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    return (((ys - cy) ** 2 + (xs - cx) ** 2) <= radius**2).expand(n, SIZE, SIZE).clone()


def paint(images: torch.Tensor, masks: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    return torch.where(masks[:, None], colour.view(1, 3, 1, 1), images)


def has_colour(images: torch.Tensor, colour: torch.Tensor) -> bool:
    return bool((images == colour.view(1, 3, 1, 1)).all(1).any())


def assert_continues_texture(swapped: torch.Tensor, hole: torch.Tensor, texture: torch.Tensor) -> None:
    """The filled hole's pixel spread is at least half the texture's (a flat fill has none)."""
    for i in range(len(swapped)):
        assert float(swapped[i][:, hole[i]].std()) >= 0.5 * float(texture[i].std())


def test_the_fill_continues_the_texture_and_copies_only_source_pixels():
    images = textured(2, 0)
    holes = disc(2, 16, 16, 7)
    filled = fill_from_surroundings(paint(images, holes, UNIQUE), holes)
    assert not has_colour(filled, UNIQUE)
    assert torch.equal(filled[:, :, ~holes[0]], images[:, :, ~holes[0]])
    assert_continues_texture(filled, holes, images)
    # A hole that covers the image but for one pixel takes that pixel, the only source.
    nearly_all = torch.ones(1, SIZE, SIZE, dtype=torch.bool)
    nearly_all[0, 3, 5] = False
    assert torch.equal(fill_from_surroundings(images[:1], nearly_all), images[:1, :, 3:4, 5:6].expand(1, 3, SIZE, SIZE))


def test_the_background_swap_shows_the_own_object_on_the_donor_background_without_the_donor_object():
    objects, donor_objects = disc(2, 10, 10, 5), disc(2, 20, 19, 7)  # overlapping objects at different places
    images = paint(textured(2, 1), objects, torch.tensor([0.2, 0.9, 0.4]))
    donors = paint(textured(2, 2), donor_objects, UNIQUE)
    swapped = swapped_images(images, objects, donors, donor_objects, "outside")
    assert torch.equal(swapped[:, :, objects[0]], images[:, :, objects[0]])
    assert not has_colour(swapped, UNIQUE)
    hole = dilate(donor_objects, edge_width((SIZE, SIZE))) & ~objects
    assert_continues_texture(swapped, hole, textured(2, 2))


def test_the_cue_swap_carries_the_donor_cue_and_nothing_else_of_the_donor():
    cues, donor_cues = torch.zeros(2, SIZE, SIZE, dtype=torch.bool), torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    cues[:, 2:8, 2:8] = True  # the image's own cue: top left
    donor_cues[:, 24:30, 24:30] = True  # the donor's: bottom right
    objects = disc(2, 16, 16, 6)
    own_cue = torch.tensor([-1.0, 2.0, 2.0])
    images = paint(textured(2, 3), cues, own_cue)
    donors = paint(paint(textured(2, 4), objects, UNIQUE), donor_cues, torch.tensor([2.0, 2.0, -1.0]))
    swapped = swapped_images(images, cues, donors, donor_cues, "mask")
    assert torch.equal(swapped[:, :, donor_cues[0]], donors[:, :, donor_cues[0]])
    assert not has_colour(swapped, UNIQUE) and not has_colour(swapped, own_cue)
    hole = dilate(cues, edge_width((SIZE, SIZE)))
    assert_continues_texture(swapped, hole, textured(2, 3))
    untouched = ~hole & ~donor_cues
    assert torch.equal(swapped[:, :, untouched[0]], images[:, :, untouched[0]])


def test_a_background_cue_swap_shows_the_own_object_on_the_donor_background_without_the_donor_object():
    # Cue masks only, the cue a background: each mask is everything but the object. Laid on top, the donor's
    # background would cut the image's object to the donor object's outline; it goes behind the object instead.
    objects, donor_objects = disc(2, 10, 10, 5), disc(2, 20, 19, 7)
    images = paint(textured(2, 7), objects, torch.tensor([0.2, 0.9, 0.4]))
    donors = paint(textured(2, 8), donor_objects, UNIQUE)
    swapped = swapped_images(images, ~objects, donors, ~donor_objects, "mask")
    assert torch.equal(swapped[:, :, objects[0]], images[:, :, objects[0]])
    assert not has_colour(swapped, UNIQUE)
    hole = dilate(donor_objects, edge_width((SIZE, SIZE))) & ~objects
    assert_continues_texture(swapped, hole, textured(2, 8))
    assert torch.equal(swapped, swapped_images(images, objects, donors, donor_objects, "outside"))
    # The image's object inside the donor's: still the donor's background around it, not the donor's outline.
    inner = disc(2, 20, 19, 3)
    inside = swapped_images(paint(textured(2, 7), inner, UNIQUE * 0), ~inner, donors, ~donor_objects, "mask")
    assert not has_colour(inside, UNIQUE)
    assert_continues_texture(inside, dilate(donor_objects, edge_width((SIZE, SIZE))) & ~inner, textured(2, 8))


def test_which_donor_masks_go_behind_the_image_rest():
    def box(top: int, left: int, side: int) -> torch.Tensor:
        mask = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
        mask[:, top:top + side, left:left + side] = True
        return mask

    ring = border_masks(1, (SIZE, SIZE))
    background, donor_background = ~disc(1, 12, 12, 8), ~disc(1, 18, 18, 9)
    cases = {
        "a background": (background, donor_background, True),
        "a marker elsewhere": (box(2, 2, 6), box(24, 24, 6), False),
        "a letter in the same corner": (box(2, 2, 6), box(3, 2, 5), False),
        "the border ring": (ring, ring, False),
        "a large patch elsewhere": (box(0, 0, 18), box(14, 14, 18), False),  # behind, most of it would be hidden
    }
    for name, (masks, donor_masks, backdrop) in cases.items():
        assert is_backdrop(masks, donor_masks).tolist() == [backdrop], name
    # A batch that mixes the two swaps each pair as it would be swapped alone.
    masks, donor_masks = torch.cat([background, box(2, 2, 6)]), torch.cat([donor_background, box(24, 24, 6)])
    images, donors = textured(2, 9), textured(2, 10)
    mixed = swapped_images(images, masks, donors, donor_masks, "mask")
    for i in range(2):
        alone = swapped_images(images[i:i + 1], masks[i:i + 1], donors[i:i + 1], donor_masks[i:i + 1], "mask")
        assert torch.equal(mixed[i:i + 1], alone)
    # ... the background behind the image's object, the marker on top.
    assert not torch.equal(mixed[:1], cue_on_top(images[:1], masks[:1], donors[:1], donor_masks[:1]))
    assert torch.equal(mixed[1:], cue_on_top(images[1:], masks[1:], donors[1:], donor_masks[1:]))


def test_the_border_swap_carries_the_donor_border_and_nothing_else_of_the_donor():
    rings = border_masks(2, (SIZE, SIZE))
    objects = disc(2, 16, 16, 10)
    images = textured(2, 5)
    donors = paint(textured(2, 6), objects, UNIQUE)
    swapped = swapped_images(images, rings, donors, rings, "mask")
    assert torch.equal(swapped[:, :, rings[0]], donors[:, :, rings[0]])
    assert not has_colour(swapped, UNIQUE)
    edge = dilate(rings, edge_width((SIZE, SIZE))) & ~rings  # the ring's edge on the inside: the image's texture
    assert_continues_texture(swapped, edge, images)
    inside = ~dilate(rings, edge_width((SIZE, SIZE)))
    assert torch.equal(swapped[:, :, inside[0]], images[:, :, inside[0]])


def copied_from(filled: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether every pixel (a column of ``filled``, ``(C, N)``) is a copy of some pixel of ``source`` ``(C, M)``."""
    return bool((filled[:, :, None] == source[:, None, :]).all(0).any(1).all())


@pytest.mark.parametrize("size, share, box", [((32, 32), 0.5, (8, 8, 16, 16)), ((15, 11), 0.4, (4, 3, 6, 4)),
                                             ((15, 10), 0.5, (3, 2, 8, 5))])
def test_the_centre_box_is_round_share_of_each_side_in_the_middle(size, share, box):
    top, left, height, width = box  # by hand: round(share * side) wide, (side - width) // 2 from the top and left
    masks = centre_masks(3, size, share)
    expected = torch.zeros(size, dtype=torch.bool)
    expected[top : top + height, left : left + width] = True
    assert masks.shape == (3, *size) and masks.dtype == torch.bool
    assert all(torch.equal(m, expected) for m in masks)
    assert int(centre_masks(1, (32, 32), share=0.25).sum()) == 8 * 8


def test_a_centre_box_without_a_surround_or_share_out_of_range_is_refused():
    for share in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"the centre's share of each side must be in \(0, 1\)"):
            centre_masks(1, (32, 32), share=share)
    with pytest.raises(ValueError, match="images of 2x2 pixels have no surround around a centre 2x2 pixels wide"):
        centre_masks(1, (2, 2), share=0.9)
    with pytest.raises(ValueError, match="no surround"):
        centre_masks(1, (1, 8))


def test_the_surround_swap_shows_the_own_centre_on_the_donor_surround_without_the_donor_centre():
    centre = centre_masks(2, (SIZE, SIZE))
    images = paint(textured(2, 7), disc(2, 16, 16, 6), torch.tensor([0.2, 0.9, 0.4]))  # an object in the centre
    donors = paint(textured(2, 8), centre, UNIQUE)  # the donor's centre: a colour found nowhere else
    swapped = swapped_images(images, centre, donors, centre, "outside")
    assert torch.equal(swapped[:, :, centre[0]], images[:, :, centre[0]])
    assert not has_colour(swapped, UNIQUE)
    # Around the centre, the donor's own surround: beyond the edge as it is, on the edge filled from it.
    near = dilate(centre, edge_width((SIZE, SIZE)))[0]
    assert torch.equal(swapped[:, :, ~near], donors[:, :, ~near])
    hole = near & ~centre[0]
    for i in range(2):
        assert copied_from(swapped[i][:, hole], donors[i][:, ~near])
        assert float(swapped[i][:, hole].std()) >= 0.5 * float(donors[i][:, ~centre[0]].std())


def test_the_surround_swap_test_reads_the_centre_box_and_shows_the_same_view():
    test = MODEL_TESTS["surround_swap_ratio"]
    assert (test.kind, test.part, test.needs, test.region, test.by_default) == ("swap", "surround", None, "outside", True)
    assert test.scalars == {"surround_swap_ratio": "swap_ratio", "surround_swap_follow_share": "follow_share"}
    images = paint(textured(4, 9), centre_masks(4, (SIZE, SIZE)) & ~disc(4, 16, 16, 5), UNIQUE)
    assert torch.equal(test.regions(images, {}), centre_masks(4, (SIZE, SIZE)))
    rows = [0, 3]
    (view,) = test.views(ProbeBatch(images, torch.arange(4)), rows).values()
    donors = SwapPairs(4).donors[rows]
    centre, near = centre_masks(1, (SIZE, SIZE))[0], dilate(centre_masks(1, (SIZE, SIZE)), edge_width((SIZE, SIZE)))[0]
    for k, (row, donor) in enumerate(zip(rows, donors.tolist())):
        assert torch.equal(view[k][:, centre], images[row][:, centre])
        assert copied_from(view[k][:, ~centre], images[donor][:, ~near])  # nothing of the donor's centre


def test_with_background_cue_masks_the_cue_swap_shows_the_background_swap_images():
    # The benchmark's background cue: its mask is every pixel but the object, so with cue masks only the cue swap
    # must show the model what the background swap shows it with object masks, on every pair.
    data = SyntheticSpuriousDataModule(num_classes=4, img_size=32, cue_size=6, object_size=(0.55, 0.9), num_train=8,
                                       num_val=64, num_test=8, cue="background", cue_correlation=0.25)
    data.setup("fit")
    probe = data.probe_batch(64)
    assert torch.equal(probe.cue_masks, ~probe.masks)
    assert torch.equal(MODEL_TESTS["cue_swap_ratio"].swapped(probe), MODEL_TESTS["background_swap_ratio"].swapped(probe))
