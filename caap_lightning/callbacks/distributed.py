"""A check under DDP: each rank's share of the probe (``probe[rank::world]``), and the shares gathered back."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import lightning as L
import torch
from torch import nn

from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.model_tests import SwapPairs, SwapShard
from caap_lightning.utils import eval_mode

MASK_FIELDS = ("masks", "cue_masks")


@dataclass
class ProbeShard:
    """This rank's share of the probe batch on the device, with the classes its maps explain."""

    images: torch.Tensor
    masks: Dict[str, torch.Tensor]  # "masks" and "cue_masks", where the probe has them
    targets: torch.Tensor
    scores: torch.Tensor  # the model's probability of each target
    swaps: Optional[SwapShard]  # this rank's share of the swap pairs; None where no swap test runs
    finite: bool = True  # whether the model's outputs on this rank's images were all finite


def share_of(n: int, trainer: L.Trainer) -> torch.Tensor:
    """The probe indices this rank handles: ``probe[rank::world]``."""
    return torch.arange(n)[trainer.global_rank :: trainer.world_size]


def classify_shard(
    trainer: L.Trainer, classifier: nn.Module, probe: ProbeBatch, swap_probe: Optional[ProbeBatch], by_label: bool,
    device: torch.device, swap_views: Optional[Dict[str, torch.Tensor]] = None,
) -> ProbeShard:
    """This rank's share of the probe (and of the swap probe, with its share of each swap test's swapped images
    ``swap_views``) on ``device``, the classes its maps explain (the labels with ``by_label``, else the model's
    top-1) and their probabilities.

    The probe is the start of the swap probe, so this rank's share of it is the start of its share of the swap
    probe: one forward pass classifies both.
    """
    larger = probe if swap_probe is None else swap_probe

    def rows_on_device(rows: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        # As Lightning does to batches: e.g. bf16 under "bf16-true", whose weights are bf16.
        images = trainer.precision_plugin.convert_input(larger.images[rows].to(device))
        masks = {k: getattr(larger, k)[rows].to(device) for k in MASK_FIELDS if getattr(larger, k) is not None}
        return images, masks

    all_images, all_masks = rows_on_device(share_of(len(larger), trainer))
    with torch.no_grad(), eval_mode(classifier):
        probs = classifier(all_images).float().softmax(-1)
    all_top1 = probs.argmax(-1)
    index = share_of(len(probe), trainer)
    mine = len(index)
    targets = probe.labels[index].to(device) if by_label else all_top1[:mine]
    scores = probs[:mine].gather(1, targets[:, None])[:, 0]
    shard = ProbeShard(all_images[:mine], {k: m[:mine] for k, m in all_masks.items()}, targets, scores, None,
                       bool(torch.isfinite(probs).all()))
    if swap_probe is None:
        return shard
    pairs, rows = SwapPairs(len(swap_probe)), share_of(len(swap_probe), trainer)
    images, masks, top1 = all_images[: len(rows)], {k: m[: len(rows)] for k, m in all_masks.items()}, all_top1[: len(rows)]
    local = pairs.donors_within(rows)
    if local is not None:
        # This rank holds every donor (one process does): its own images and classes, nothing recomputed.
        local = local.to(device)
        donor_images, donor_top1, donor_masks = images[local], top1[local], {k: m[local] for k, m in masks.items()}
    else:
        donor_images, donor_masks = rows_on_device(pairs.donors_of(rows))
        with torch.no_grad(), eval_mode(classifier):
            donor_top1 = classifier(donor_images).float().argmax(-1)
    views = {name: trainer.precision_plugin.convert_input(view[rows].to(device))
             for name, view in (swap_views or {}).items()}
    shard.swaps = SwapShard(images, masks, top1, donor_images, donor_masks, donor_top1, probs[: len(rows)], views)
    return shard


def gather_shards(trainer: L.Trainer, shard: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble per-rank shards ``probe[rank::world]`` into the whole probe's order, on the CPU."""
    world = trainer.world_size
    if world == 1:
        return shard.detach().cpu()
    size = math.ceil(n / world)
    padded = shard.new_zeros((size, *shard.shape[1:]))
    padded[: len(shard)] = shard
    gathered = trainer.strategy.all_gather(padded).cpu()  # (world, size, ...)
    rank_by_rank = torch.cat([gathered[rank, : len(range(rank, n, world))] for rank in range(world)])
    return in_probe_order(rank_by_rank, n, world)


def in_probe_order(gathered: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Per-image values that torchmetrics gathered rank by rank (the shards ``probe[rank::world]`` one after
    another) in the probe's own order."""
    order = torch.cat([torch.arange(rank, n, world) for rank in range(world)])
    out = torch.empty_like(gathered)
    out[order] = gathered
    return out
