"""The model tests, one entry each: which part of the image a test suspects, and how it asks the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.metrics._checks import check_masks
from caap_lightning.metrics.functional import scorable_regions
from caap_lightning.model_tests.insertion_ratio import InsertionRatio
from caap_lightning.model_tests.pooled_region_ratio import PooledRegionRatio
from caap_lightning.model_tests.swap_pairs import SwapPairs
from caap_lightning.model_tests.swap_ratio import SwapRatio
from caap_lightning.model_tests.views import (
    BORDER_SHARE, CENTRE_SHARE, border_masks, centre_masks, rest_colour, suspect_views,
)

TestKind = Literal["insertion", "swap"]
Part = Literal["background", "cue", "border", "surround"]
# The probe field that marks each part: the background is everything off the object masks; the border ring and
# the surround (everything off a centre box, the object's proxy) need none.
PART_MASKS: Dict[str, Optional[str]] = {"background": "masks", "cue": "cue_masks", "border": None, "surround": None}
# The mask-free parts: the regions each test reads, made from the images' size alone.
MASK_FREE = {"border": border_masks, "surround": centre_masks}
_PART_WORDS = {
    "background": "the background (everything off the object, any cue there included)",
    "cue": "the cue",
    "border": f"the image's border (its outer {BORDER_SHARE:.1%} on each side)",
    "surround": f"the surround (everything off the image's centre box, {CENTRE_SHARE:.0%} of each side)",
}
# What the rest of each part is, in words (the alarm: "41 of 64 images follow the cue, not the rest of the image").
REST_WORDS = {"background": "the object", "cue": "the rest of the image", "border": "the inside", "surround": "the centre"}


@dataclass(frozen=True)
class ModelTest:
    """A test of the model itself on the probe (not of a method's maps), about one ``part`` of each image.

    ``kind="insertion"``: the class probability the part alone restores over what the rest alone
    restores (:class:`~caap_lightning.model_tests.InsertionRatio`). ``kind="swap"``: on each image
    given its donor's part (:class:`SwapPairs`), the probability of the donor's class over that of
    its own (:class:`~caap_lightning.model_tests.SwapRatio`).
    """

    kind: TestKind
    part: Part

    @property
    def needs(self) -> Optional[str]:
        """The probe field the test reads (``None``: the border ring or the surround, which need no masks)."""
        return PART_MASKS[self.part]

    @property
    def region(self) -> str:
        """The metric's ``region``: the mask is the suspect (``"mask"``), or everything outside it is (the object's
        background, the centre box's surround)."""
        return "outside" if self.part in ("background", "surround") else "mask"

    @property
    def name(self) -> str:
        """Its name in :data:`MODEL_TESTS`, which ``CAAPCallback(metrics=...)`` takes: its main scalar's too."""
        return f"{self.part}_{self.kind}_ratio"

    @property
    def scalars(self) -> Dict[str, str]:
        """Each scalar it logs (``<prefix>/<scalar>``) by the key of its meter's ``compute_details()``: the ratio, and
        for a swap the share of probe pairs that follow the swapped region (``<part>_swap_follow_share``)."""
        if self.kind == "swap":
            return {self.name: "swap_ratio", f"{self.part}_swap_follow_share": "follow_share"}
        return {self.name: "insertion_ratio"}

    @property
    def by_default(self) -> bool:
        """Whether ``CAAPCallback(metrics=None)`` runs it: the swap ratios, which the alarm watches by default."""
        return self.kind == "swap"

    @property
    def meaning(self) -> str:
        """What the score measures, in words (the alarm's text)."""
        part = _PART_WORDS[self.part]
        if self.kind == "insertion":
            return (f"the class probability that {part} alone restores over what {REST_WORDS[self.part]} alone "
                    "restores; 1 when they restore it equally")
        return (f"on probe images given {part} of another probe image, the probability of that image's class over "
                "the probability of their own; 1 when the model follows both parts equally")

    def meaning_of(self, scalar: str) -> str:
        """What its logged ``scalar`` (a key of :attr:`scalars`) measures, in words."""
        if scalar.endswith("_follow_share"):
            return (f"the share of probe images given {_PART_WORDS[self.part]} of another probe image of another "
                    "class on which the model gives that image's class a higher probability than their own")
        return self.meaning

    def regions(self, images: Tensor, masks: Mapping[str, Tensor]) -> Tensor:
        """The masks of ``images`` this test reads: their ``needs`` field, or the border ring or centre box."""
        if self.needs is None:
            return MASK_FREE[self.part](len(images), tuple(images.shape[-2:]))
        return masks[self.needs]

    def probe_regions(self, probe: ProbeBatch) -> Tensor:
        masks = {k: getattr(probe, k) for k in ("masks", "cue_masks") if getattr(probe, k) is not None}
        return self.regions(probe.images, masks)

    def colour(self, probe: ProbeBatch) -> Tensor:
        """The stand-in for a removed rest, from the whole probe: the same on every rank and check."""
        return rest_colour(probe.images, self.probe_regions(probe))

    def build(self, model: nn.Module, probe: ProbeBatch) -> PooledRegionRatio:
        """Its meter, keeping each image's own ratio (what the alarm ranks the images by)."""
        if self.kind == "swap":
            return SwapRatio(model, region=self.region, image_ratios=True)
        return InsertionRatio(model, region=self.region, colour=self.colour(probe), image_ratios=True)

    def check_scorable(self, probe: ProbeBatch) -> None:
        """``ValueError`` unless some probe image has both a part and a rest (or, for a swap, a partner)."""
        if self.kind == "swap":
            SwapPairs(len(probe))
        scorable_regions(check_masks(self.probe_regions(probe)))

    def swapped(self, probe: ProbeBatch) -> Tensor:
        """A swap test's swapped images of the whole ``probe`` (each with its :class:`SwapPairs` donor's part): they
        depend on the images alone, so the callback makes them once per probe rather than at every check."""
        return SwapPairs(len(probe)).swapped(probe.images, self.probe_regions(probe), self.region)

    def views(self, probe: ProbeBatch, rows: Sequence[int]) -> Dict[str, Tensor]:
        """What the test showed the model of the probe images ``rows`` (normalised images), by column title."""
        index = torch.as_tensor(rows, dtype=torch.long)
        regions = self.probe_regions(probe)
        if self.kind == "swap":
            swapped = SwapPairs(len(probe)).swapped(probe.images, regions, self.region, index)
            return {f"swapped {self.part}": swapped}  # a short title: it heads a narrow column
        alone, without = suspect_views(probe.images[index], regions[index], self.region, self.colour(probe))
        return {f"{self.part} alone": alone, f"without the {self.part}": without}


# One entry per model test, by the name `CAAPCallback(metrics=...)` takes and logs it under.
MODEL_TESTS: Dict[str, ModelTest] = {
    test.name: test
    for test in (ModelTest(kind, part) for kind in ("insertion", "swap") for part in PART_MASKS)
}
