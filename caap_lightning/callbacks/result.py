"""ProbeResult: one check of the whole probe batch, as CAAPCallback publishes it and other callbacks read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from caap_lightning.callbacks import drawing
from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.metrics import fixed_position_evidence
from caap_lightning.metrics.functional import FixedPositionEvidence
from caap_lightning.model_tests import ModelTest
from caap_lightning.utils import upsample_maps


@dataclass
class ProbeResult:
    """One check on the whole probe batch (gathered across ranks, identical on every rank).

    This is what :class:`CAAPCallback` publishes (``callback.last``) and what other callbacks
    such as :class:`SpuriousCueMonitor` read: the metrics under their logged names, each one's
    values per image, the maps, the probe they explain and how to draw them.
    """

    epoch: int
    step: int
    stage: str  # "fit", "validate" or "test": the Trainer function that ran the check
    metrics: Dict[str, float]
    targets: torch.Tensor  # the class each map explains, (n,)
    scores: torch.Tensor  # the model's probability of the target, (n,)
    method_maps: Dict[str, torch.Tensor]  # the patch maps of every method that succeeded, primary first
    probe: ProbeBatch  # the probe images (normalised), labels and masks, on the CPU
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    # The swap ratios' probe (``probe`` its first images), None where no swap ratio runs.
    swap_probe: Optional[ProbeBatch] = None
    class_names: List[str] = field(default_factory=list)
    method_curves: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)  # their mean ins/del curves
    # The map metrics' values per image, computed on the first read of `per_image`: only an alarm report needs them.
    map_image_values: Optional[Callable[[], Dict[str, torch.Tensor]]] = field(default=None, repr=False)
    # The model tests' values per image of their own probe (a swap's: every pair of the swap probe, whose first images
    # are `probe`), computed with the check (they need the model, not the maps).
    model_test_image_values: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # Why each scalar the callback logs has no value at this check, by its logged name (where one has none).
    unscored: Dict[str, str] = field(default_factory=dict)
    # The least value each method's maps must reach to hold evidence (strategies.evidence_floor): the map's units.
    map_evidence: Dict[str, float] = field(default_factory=dict)
    _per_image: Optional[Dict[str, torch.Tensor]] = field(default=None, init=False, repr=False)
    _hot_regions: Dict[str, FixedPositionEvidence] = field(default_factory=dict, init=False, repr=False)

    @property
    def per_image(self) -> Dict[str, torch.Tensor]:
        """Each logged metric with per-image values, under its logged name, ``(n,)``: which images carry the
        reliance (NaN where an image could not be scored)."""
        if self._per_image is None:
            computed = {} if self.map_image_values is None else self.map_image_values()
            n = len(self.probe)
            self._per_image = {**computed, **{k: v[:n] for k, v in self.model_test_image_values.items()}}
        return self._per_image

    @property
    def maps(self) -> torch.Tensor:
        """The primary method's patch maps (CAAP's: relative, ``A - A_blank``), ``(n, gh, gw)``."""
        if not self.method_maps:
            raise ValueError(f"no attribution method gave maps at the check of epoch {self.epoch}")
        return next(iter(self.method_maps.values()))

    @property
    def curves(self) -> Dict[str, torch.Tensor]:
        """The primary method's mean insertion/deletion curves (empty without that metric)."""
        return next(iter(self.method_curves.values()), {})

    def pixel_maps(self, method: str) -> torch.Tensor:
        """``method``'s maps at the probe's image size, as its metrics saw them."""
        return upsample_maps(self.method_maps[method].float(), tuple(self.probe.images.shape[-2:]))

    def hot_regions(self, method: str) -> FixedPositionEvidence:
        """Where ``method``'s maps put evidence at a fixed position: each image's hot region and its share
        (:func:`~caap_lightning.metrics.fixed_position_evidence`)."""
        if method not in self._hot_regions:
            self._hot_regions[method] = fixed_position_evidence(self.pixel_maps(method))
        return self._hot_regions[method]

    def model_test_views(self, test: ModelTest, rows: List[int]) -> Dict[str, torch.Tensor]:
        """What ``test`` showed the model of the probe images ``rows`` (normalised images), by column title: a
        swap paired the images across the swap probe, whose first images are the maps' probe."""
        tested = self.swap_probe if test.kind == "swap" and self.swap_probe is not None else self.probe
        return test.views(tested, rows)

    def class_name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else str(index)

    def row_title(self, i: int) -> str:
        """``#index label -> explained class p=score`` (and the cue's class where known)."""
        probe = self.probe
        label = self.class_name(int(probe.labels[i])) if int(probe.labels[i]) >= 0 else "?"
        title = f"#{i} {label} -> {self.class_name(int(self.targets[i]))} p={float(self.scores[i]):.2f}"
        if probe.cue_labels is not None:
            title += f", cue: {self.class_name(int(probe.cue_labels[i]))}"
        return title

    def draw_rows(self, rows: List[int], views: Optional[Dict[str, torch.Tensor]] = None) -> Any:
        """The heatmap grid of the given probe rows (image | an overlay per method | masks | ``views``), ``(H, W, 3)``
        uint8; ``views`` are further columns of normalised images of those rows, by title."""
        return drawing.draw_rows(self, rows, views)
