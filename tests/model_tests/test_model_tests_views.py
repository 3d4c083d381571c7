"""The swap views on a textured background: the hole a removed part leaves continues the texture, the image's own
object is unchanged, and nothing of the donor's object but the region the test names is left."""

from __future__ import annotations

import torch

from caap_lightning.model_tests import border_masks, swapped_images
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
