"""The meters of a callback's checks: each method's map metrics, and the model tests once, apart from the maps."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from caap_lightning.callbacks.distributed import ProbeShard, in_probe_order
from caap_lightning.callbacks.metric_table import METRICS, MeterContext
from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.model_tests import MODEL_TESTS, ModelTestSuite
from caap_lightning.utils import upsample_maps

Curves = Dict[str, Dict[str, torch.Tensor]]
# The scalar that logs the swap probe's skill (model_tests.ProbeSkill): whether a swap-test check can be judged.
SKILL = "swap_probe_skill"


class CheckMeters:
    """One meter per map metric of each method (``meters[method][metric]``), and the model tests' suite."""

    def __init__(self, methods: Sequence[str], metrics: Sequence[str], classifier: nn.Module, step: Optional[int],
                 curves: bool, probe: ProbeBatch) -> None:
        context = MeterContext(classifier, step, curves)
        self.maps = {method: {m: METRICS[m].build(context) for m in metrics if m in METRICS} for method in methods}
        self.model_tests = ModelTestSuite([m for m in metrics if m in MODEL_TESTS], classifier, probe)

    def __getitem__(self, method: str) -> Dict[str, Any]:
        return self.maps[method]

    def update(self, method: str, maps: torch.Tensor, shard: ProbeShard) -> None:
        """``method``'s metrics of its maps of this rank's share of the probe."""
        with torch.no_grad():
            pixel_maps = upsample_maps(maps, tuple(shard.images.shape[-2:]))
            for metric, meter in self.maps[method].items():
                meter.to(shard.images.device)
                METRICS[metric].update(meter, pixel_maps, shard.images, shard.masks, shard.targets)

    def test_model(self, shard: ProbeShard) -> bool:
        """The model tests on this rank's share of the probe (and of the swap pairs)."""
        self.model_tests.update(shard.images, shard.masks, shard.targets, shard.swaps)
        return True

    def compute(
        self, methods: Sequence[str], tested: bool, tag: Callable[[str, str], str], primary: str,
        tested_sizes: Dict[str, int], world: int,
    ) -> Tuple[Dict[str, float], Curves, Dict[str, torch.Tensor]]:
        """The synced scalars of ``methods`` (and of the model tests where ``tested``, under the ``primary`` method's
        names) by logged name, finite ones only (a metric with no scorable image gives NaN: nothing to log); each
        method's mean curves; and the model tests' values per image of their own probe, by logged name.

        A model test's own probe has ``tested_sizes[tag]`` images (a swap ratio's is the swap probe, whose first
        images are the maps' probe); torchmetrics gathered its per-image values rank by rank.
        """
        scalars: Dict[str, float] = {}
        curves: Curves = {}
        for method in methods:
            for metric, meter in self.maps[method].items():
                out = meter.compute_details()
                scalars.update({tag(method, scalar): float(out[key]) for scalar, key in METRICS[metric].scalars.items()})
                if metric == "insertion_deletion":
                    curves[method] = {k: out[f"{k}_curve"].cpu() for k in ("insertion", "deletion") if f"{k}_curve" in out}
        image_values = {}
        for name, (ratio, image_ratios) in (self.model_tests.compute() if tested else {}).items():
            key = tag(primary, name)
            scalars[key] = float(ratio)
            image_values[key] = in_probe_order(image_ratios.float().cpu(), tested_sizes[key], world)
        skill = self.model_tests.skill() if tested else None
        if skill is not None:
            scalars[tag(primary, SKILL)] = skill
        return {k: v for k, v in scalars.items() if math.isfinite(v)}, curves, image_values

    def reset(self) -> None:
        for meters in self.maps.values():
            for meter in meters.values():
                meter.reset()
        self.model_tests.reset()
