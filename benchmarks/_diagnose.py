"""Per-image diagnoses of where and why a CAAP map loses, for ``quality.py``.

Each function takes maps ``(B, gh, gw)`` and what they are judged against, and returns per-image
values (the report takes their mean and standard error), so a reader can split any score by them.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def saturated(maps: torch.Tensor, blank_scores: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the blank's own score for the target is at least every patch's.

    Such a map holds only how much each patch *lowers* the score of a blank already read as the
    class; it ranks patches by harm, not by evidence.
    """
    return blank_scores.to(maps) >= maps.flatten(1).amax(1)


def patch_coverage(masks: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """``(B, gh, gw)``: the share of each patch's pixels inside the object mask."""
    return F.adaptive_avg_pool2d(masks.float()[:, None], grid)[:, 0]


def ring(grid: Tuple[int, int], device=None) -> torch.Tensor:
    """``(gh, gw)`` bool: the patches on the grid's outer ring, where a box selection is clipped."""
    inner = torch.zeros(grid, dtype=torch.bool, device=device)
    inner[1:-1, 1:-1] = True
    return ~inner


def border_bias(maps: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
    """How much higher a map scores background patches on the grid's ring than inside it.

    Only background patches (no object pixel) are compared, so a map that finds the object is not
    mistaken for one that shuns the border. Per image, ``bias`` is the mean of the ring's
    background patches minus the mean of the inner ones, over the map's range (max - min): 0 for
    a map blind to position, negative where a clipped box carries less of the image at the
    border, positive where the map prefers it; NaN where either group is empty or the map is
    flat. ``touches`` marks the objects with a patch (at least half covered) on the ring.
    """
    grid = tuple(maps.shape[-2:])
    edge = ring(grid, maps.device).flatten()
    cover = patch_coverage(masks, grid).flatten(1).to(maps.device)
    flat = maps.flatten(1).double()
    background = cover == 0
    outer, inner = background & edge, background & ~edge

    def mean_over(where):
        return (flat * where).sum(1) / where.sum(1)  # NaN where empty

    spread = flat.amax(1) - flat.amin(1)
    bias = (mean_over(outer) - mean_over(inner)) / spread.where(spread > 0, torch.nan)
    return {"bias": bias, "touches": ((cover >= 0.5) & edge).any(1)}


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the rank correlation of two maps of each image (Pearson's r of the ranks; ties get
    their average rank, as in scipy.stats.spearmanr)."""
    return _pearson(_average_ranks(a.flatten(1).double()), _average_ranks(b.flatten(1).double()))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    # Rank = number below + half the number equal (+ 1/2): the average rank of a tie.
    below = (x[:, None, :] < x[:, :, None]).sum(-1).double()
    equal = (x[:, None, :] == x[:, :, None]).sum(-1).double()
    return below + (equal + 1) / 2


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
