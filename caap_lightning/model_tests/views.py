"""What a model test shows the model: a suspect region alone, the image without it, the border ring, a swap.

The insertion ratio removes a region by painting it, and an edge around it, in the mean colour of
the image's other pixels, so no outline of what was removed is left for the model to read. A swap
fills the hole it leaves from the image's own surroundings instead (:func:`fill_from_surroundings`,
as the ImageNet-9 background challenge tiles a background), so that a person reading the swapped
image sees one object on a whole background, not a second object's silhouette in a flat colour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The border ring's width as a share of each side: the outer eighth holds frames, corner tags and edge text.
BORDER_SHARE = 1 / 8
# The width of the edge around a mask that neither view keeps, as a share of the shorter side: a mask's edge is
# uncertain (anti-aliased outlines, a trimap's boundary), and an edge left behind draws the removed part's outline.
EDGE_SHARE = 1 / 32


def border_masks(n: int, size: tuple, share: float = BORDER_SHARE) -> Tensor:
    """``(n, H, W)`` bool: a ring ``round(share * side)`` pixels wide (at least 1) around each image."""
    if not 0 < share < 0.5:
        raise ValueError(f"the border's share of each side must be in (0, 0.5), got {share!r}")
    h, w = size
    dy, dx = max(1, round(share * h)), max(1, round(share * w))
    if 2 * dy >= h or 2 * dx >= w:
        raise ValueError(f"images of {h}x{w} pixels have no inside within a border {dy}x{dx} pixels wide")
    ring = torch.ones(h, w, dtype=torch.bool)
    ring[dy : h - dy, dx : w - dx] = False
    return ring.expand(n, h, w).clone()


# The centre box's side as a share of each side: a mask-free stand-in for the object of an object-centred photo,
# whose rest (the surround) holds most of a background, the border ring included.
CENTRE_SHARE = 1 / 2


def centre_masks(n: int, size: tuple, share: float = CENTRE_SHARE) -> Tensor:
    """``(n, H, W)`` bool: a box ``round(share * side)`` pixels wide (at least 1) in the middle of each image, the
    object's proxy where a probe has no object masks (most photos are framed on their object)."""
    if not 0 < share < 1:
        raise ValueError(f"the centre's share of each side must be in (0, 1), got {share!r}")
    h, w = size
    bh, bw = max(1, round(share * h)), max(1, round(share * w))
    if bh >= h or bw >= w:
        raise ValueError(f"images of {h}x{w} pixels have no surround around a centre {bh}x{bw} pixels wide")
    top, left = (h - bh) // 2, (w - bw) // 2
    box = torch.zeros(h, w, dtype=torch.bool)
    box[top : top + bh, left : left + bw] = True
    return box.expand(n, h, w).clone()


def edge_width(size: tuple, share: float = EDGE_SHARE) -> int:
    """The edge's width in pixels for images of ``size``: ``round(share * shorter side)``, at least 1."""
    return max(1, round(share * min(size)))


def dilate(masks: Tensor, width: int) -> Tensor:
    """``masks`` grown by ``width`` pixels in every direction (a square neighbourhood)."""
    grown = F.max_pool2d(masks[:, None].float(), 2 * width + 1, stride=1, padding=width)
    return grown[:, 0] > 0


def fill_with_mean_of_rest(images: Tensor, masks: Tensor) -> Tensor:
    """``images`` with each mask's pixels set to the mean colour of that image's other pixels.

    A region painted in the colour around it keeps no outline: removing an object or a cue this
    way does not leave its silhouette behind for the model to read.
    """
    keep = (~masks)[:, None].to(images.dtype)
    mean = (images * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp_min(1)
    return torch.where(masks[:, None], mean, images)


def hide_regions(images: Tensor, masks: Tensor) -> Tensor:
    """``images`` with each mask, and an edge :func:`edge_width` pixels wide around it, painted in the mean
    colour of that image's other pixels (:func:`fill_with_mean_of_rest`): the region removed, no outline left."""
    return fill_with_mean_of_rest(images, dilate(masks, edge_width(tuple(images.shape[-2:]))))


# The shifts a hole is filled from, as shares of its bounding box: whole tiles first (the texture beside the hole),
# then halves and quarters for a hole too large for a whole tile to fit beside it.
FILL_SCALES = (1.0, 0.5, 0.25, 0.125)
FILL_DIRECTIONS = ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


def _bounding_extent(holes: Tensor, dim: int) -> Tensor:
    """``(B,)``: each hole's bounding-box extent in pixels along ``dim`` (1: rows, 2: columns), 0 where empty."""
    along = holes.any(3 - dim)  # (B, side): whether each row (column) holds part of the hole
    side = along.shape[1]
    first = along.float().argmax(1)
    last = side - 1 - along.flip(1).float().argmax(1)
    return torch.where(along.any(1), last - first + 1, torch.zeros_like(first))


def fill_from_surroundings(images: Tensor, holes: Tensor) -> Tensor:
    """``images`` with each ``holes`` pixel copied from a pixel off the hole a tile away: the image shifted by its
    hole's bounding box, up, down, sideways or diagonally, then by halves and quarters of it, each pass also
    reading the pixels the passes before filled. What no shift reaches (a hole that covers nearly all of the
    image) takes the mean colour of the pixels off the hole.

    A tiled fill continues the surrounding texture and keeps no outline of the hole; it is deterministic, batched
    and runs on the images' device (the background of ImageNet-9's "only BG-T" images is tiled so).
    """
    b, c, h, w = images.shape
    known, left = ~holes, holes.clone()
    out = images.clone()
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    height, width = _bounding_extent(holes, 1), _bounding_extent(holes, 2)
    for scale in FILL_SCALES:
        dy = (height * scale).ceil().long().clamp_min(1).view(b, 1, 1)
        dx = (width * scale).ceil().long().clamp_min(1).view(b, 1, 1)
        for sy, sx in FILL_DIRECTIONS:
            if not bool(left.any()):
                return out
            y, x = ys + sy * dy, xs + sx * dx
            inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            index = (y.clamp(0, h - 1) * w + x.clamp(0, w - 1)).view(b, -1)
            take = left & inside & known.view(b, -1).gather(1, index).view(b, h, w)
            shifted = out.view(b, c, -1).gather(2, index[:, None].expand(b, c, -1)).view(b, c, h, w)
            out = torch.where(take[:, None], shifted, out)
            known, left = known | take, left & ~take
    return torch.where(left[:, None], fill_with_mean_of_rest(images, holes), out)


def rest_colour(images: Tensor, masks: Tensor) -> Tensor:
    """``(C,)``: the mean colour of the pixels outside the masks, over every image of the batch.

    What stands in for a removed rest: the typical colour of that region across the images, which
    no single image's cue sets (a background colour that names one class is averaged with the
    others), and against which an object keeps its contrast (a grey or white stand-in can swallow a
    grey garment that a dark background shows).
    """
    outside = (~masks)[:, None].to(images.dtype)
    return (images * outside).sum((0, 2, 3)) / outside.sum((0, 2, 3)).clamp_min(1)


def suspect_views(images: Tensor, masks: Tensor, region: str, colour: Tensor) -> tuple[Tensor, Tensor]:
    """The suspect alone and the image without it, for ``region`` ``"mask"`` (the mask is the suspect)
    or ``"outside"`` (everything but the mask is: the background of an object mask).

    One rule for both: the mask's pixels, when removed, take the mean colour of that image's rest,
    and so does an edge :func:`edge_width` pixels wide around the mask
    (:func:`fill_with_mean_of_rest`), so that no outline of what was removed is left; the rest,
    when removed, takes ``colour`` (see :func:`rest_colour`), which keeps the mask's outline. The
    edge belongs to neither view.
    """
    hidden = hide_regions(images, masks)
    only_mask = torch.where(masks[:, None], images, colour.to(images).view(1, -1, 1, 1))
    if region == "mask":
        return only_mask, hidden
    return hidden, only_mask
