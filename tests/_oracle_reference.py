"""The naive rules the oracle tests check CAAP, ConvCAAP and the CNN baselines against, written once."""

from __future__ import annotations

from fractions import Fraction

import torch

from caap_lightning.attribution.selection import SELECTIONS


def random_images(n, size, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_spread(maps, floor):
    spread = (maps.amax((1, 2)) - maps.amin((1, 2))).min().item()
    assert spread > floor, f"maps too flat to test anything (spread {spread:.2e})"


def within(grid, p, radius, metric):
    """The patches of ``grid`` within ``radius`` of patch ``p`` (``"chebyshev"``, else city-block), in order."""
    gh, gw = grid
    r, c = divmod(p, gw)
    out = []
    for q in range(gh * gw):
        rq, cq = divmod(q, gw)
        d = max(abs(r - rq), abs(c - cq)) if metric == "chebyshev" else abs(r - rq) + abs(c - cq)
        if d <= radius:
            out.append(q)
    return out


def members(grid, p, selection):
    """The patches of ``S(p)`` on ``grid``, by the selection's radius and metric."""
    return set(within(grid, p, *SELECTIONS[selection]))


def patch_of(i, cells, patches):
    """The patch of ``patches`` along one axis that holds the centre of cell (pixel) ``i`` of ``cells``."""
    centre = Fraction(2 * i + 1, 2 * cells)
    return next(q for q in range(patches) if Fraction(q, patches) <= centre < Fraction(q + 1, patches))
