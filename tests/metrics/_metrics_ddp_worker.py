"""Runs every metric on a shard of the data; importable by name in spawned processes."""

from __future__ import annotations

import socket
from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from caap_lightning.metrics import AUPR, AttributionMass, InsertionDeletion, PointingGame


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compute_all(model: nn.Module, data: Dict[str, torch.Tensor], rank: int = 0, world_size: int = 1):
    """Each rank takes a contiguous share of the images and updates twice."""
    metrics = {
        "insdel": InsertionDeletion(model, step=16, batch_size=8, per_image=True, curves=True),
        "aupr1": AUPR(),
        "aupr0": AUPR(region="background"),
        "pointing_game": PointingGame(tolerance=1),
        "mass": AttributionMass(region="outside", normalize_by_area=True),
    }
    n = data["images"].shape[0]
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    for part in (slice(lo, (lo + hi) // 2), slice((lo + hi) // 2, hi)):
        metrics["insdel"].update(data["images"][part], data["maps"][part], data["target"][part])
        for name in ("aupr1", "aupr0", "pointing_game", "mass"):
            metrics[name].update(data["maps"][part], data["masks"][part])
    # Both entry points sync: compute()'s scalar and every value of compute_details().
    return {name: {"compute": metric.compute(), **metric.compute_details()} for name, metric in metrics.items()}


def run(rank: int, world_size: int, port: int, model: nn.Module, data, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = compute_all(model, data, rank, world_size)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def density_shard(rank: int, port: int, maps: torch.Tensor, masks: torch.Tensor, out_path: str) -> None:
    """The density and fixed-position ratios on uneven shares (3 and 2 images); rank 0 saves what it computed."""
    from caap_lightning.metrics import DensityRatio, FixedPositionRatio

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        part = slice(0, 3) if rank == 0 else slice(3, None)
        density, fixed = DensityRatio(region="outside"), FixedPositionRatio()
        density.update(maps[part], masks[part])
        fixed.update(maps[part])
        values = {"density": density.compute_details(), "fixed": fixed.compute_details()}
        if rank == 0:
            torch.save(values, out_path)
    finally:
        dist.destroy_process_group()
