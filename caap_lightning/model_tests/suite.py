"""The model tests of one check: each run once on a rank's share of the probe, apart from any attribution."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.model_tests.pooled_region_ratio import PooledRegionRatio
from caap_lightning.model_tests.probe_skill import ProbeSkill
from caap_lightning.model_tests.swap_pairs import SwapShard
from caap_lightning.model_tests.table import MODEL_TESTS


class ModelTestSuite:
    """One meter per named model test, built for ``model`` (the classifier) and ``probe`` (the maps' probe).

    :meth:`update` takes a rank's share of the probe (and of the swap pairs); :meth:`compute`
    returns each test's details and :meth:`skill` the swap probe's, synced across processes as torchmetrics
    syncs them.
    """

    def __init__(self, names: Sequence[str], model: nn.Module, probe: ProbeBatch) -> None:
        self.meters: Dict[str, PooledRegionRatio] = {name: MODEL_TESTS[name].build(model, probe) for name in names}
        self.probe_skill = ProbeSkill()

    def __bool__(self) -> bool:
        return bool(self.meters)

    @property
    def needs_swaps(self) -> bool:
        return any(MODEL_TESTS[name].kind == "swap" for name in self.meters)

    def update(self, images: Tensor, masks: Mapping[str, Tensor], targets: Tensor, swaps: Optional[SwapShard]) -> None:
        """Each test on this rank's ``images`` (their ``masks`` and explained ``targets``) or its swap pairs."""
        device = images.device
        if self.needs_swaps:
            self.probe_skill.to(device).update(swaps.probs)
        for name, meter in self.meters.items():
            test = MODEL_TESTS[name]
            meter.to(device)
            if test.kind == "swap":
                meter.update(
                    swaps.images, test.regions(swaps.images, swaps.masks).to(device),
                    swaps.donor_images, test.regions(swaps.donor_images, swaps.donor_masks).to(device),
                    target=swaps.top1, donor_target=swaps.donor_top1, swapped=swaps.views.get(name),
                )
            else:
                meter.update(images, test.regions(images, masks).to(device), target=targets)

    def compute(self) -> Dict[str, Tuple[Tensor, Tensor]]:
        """Each test's scalars (:attr:`ModelTest.scalars`), each with its value per image (NaN where skipped; under
        DDP rank by rank): a ratio's are each image's own ratio, a follow share's 1 where the pair follows the
        swapped region (its own ratio above 1) and 0 where it does not."""
        out: Dict[str, Tuple[Tensor, Tensor]] = {}
        for name, meter in self.meters.items():
            details = meter.compute_details()
            ratios = details["image_ratios"]
            follows = torch.where(ratios.isnan(), ratios, (ratios > 1).to(ratios.dtype))
            for scalar, key in MODEL_TESTS[name].scalars.items():
                out[scalar] = (details[key], follows if key == "follow_share" else ratios)
        return out

    def skill(self) -> Optional[float]:
        """The swap probe's skill (:class:`ProbeSkill`), ``None`` where no swap test ran."""
        return float(self.probe_skill.compute()) if self.needs_swaps else None

    def reset(self) -> None:
        for meter in self.meters.values():
            meter.reset()
        self.probe_skill.reset()
