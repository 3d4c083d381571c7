"""Selection operators ``S(p)``: which patch tokens are patched for patch ``p``."""

from __future__ import annotations

from typing import Tuple

import torch

from caap_lightning.checks import check_choice

# name -> (radius, metric): the members of S(p) are the patches within ``radius`` of p.
SELECTIONS = {
    "point": (0, "chebyshev"),
    "box1": (1, "chebyshev"),  # 3x3
    "box2": (2, "chebyshev"),  # 5x5
    "cross1": (1, "manhattan"),  # p and its 4 neighbours
}


def neighbourhoods(
    grid: Tuple[int, int], radius: int, metric: str = "chebyshev", device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patch indices within ``radius`` of every patch, clipped at the border.

    Returns ``index`` (N, m) and ``valid`` (N, m) with ``m`` the largest member count.
    Rows with fewer members are padded with ``p`` itself (always a member), so that a
    padded slot is harmless in a gather or scatter; ``valid`` marks the real members.
    Border patches have fewer members, which biases their scores towards the blank's.
    """
    gh, gw = grid
    rows = torch.arange(gh, device=device).repeat_interleave(gw)
    cols = torch.arange(gw, device=device).repeat(gh)
    dr = (rows[:, None] - rows[None, :]).abs()
    dc = (cols[:, None] - cols[None, :]).abs()
    dist = torch.maximum(dr, dc) if metric == "chebyshev" else dr + dc
    member = dist <= radius  # (N, N)
    m = int(member.sum(1).max())
    # Members first (stable order by patch index), then padding slots.
    order = torch.argsort((~member).to(torch.int8), dim=1, stable=True)[:, :m]
    valid = torch.gather(member, 1, order)
    own = torch.arange(gh * gw, device=device)[:, None].expand_as(order)
    index = torch.where(valid, order, own)
    return index, valid


def selection_members(name: str, grid: Tuple[int, int], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    check_choice("selection", name, tuple(SELECTIONS))
    radius, metric = SELECTIONS[name]
    return neighbourhoods(grid, radius, metric, device)
