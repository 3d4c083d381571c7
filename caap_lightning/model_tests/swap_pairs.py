"""The swap test's pairs: which probe image gives each image its swapped region."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor

from caap_lightning.metrics._checks import check_int
from caap_lightning.model_tests.swap_ratio import swapped_images


@dataclass(frozen=True)
class SwapPairs:
    """Each of ``n`` probe images paired with its donor: the image half the probe further on (cyclically).

    A fixed pairing that needs no labels (a probe may have none) and is the same on every
    process, so a probe split across ranks swaps the same pairs as on one; a pair whose two
    classes agree is skipped by :func:`~caap_lightning.model_tests.region_swap`. The callback's
    swap ratios, the alarm's pictures of them and the benchmarks all pair images through this.
    """

    n: int
    donors: Tensor = field(init=False, repr=False, compare=False)  # (n,) long: each image's donor

    def __post_init__(self) -> None:
        check_int("n", self.n, 2, "images to pair (a swap needs a donor other than the image)")
        object.__setattr__(self, "donors", (torch.arange(self.n) + self.n // 2) % self.n)

    def donors_of(self, rows: Tensor) -> Tensor:
        """The donors of the probe images ``rows``, as probe indices."""
        return self.donors[rows]

    def donors_within(self, rows: Tensor) -> Optional[Tensor]:
        """Where each of ``rows``' donors sits among ``rows`` (a rank's share of the probe), or ``None`` when some
        donor is not among them (another rank holds it)."""
        held = torch.full((self.n,), -1, dtype=torch.long)
        held[rows] = torch.arange(len(rows))
        local = held[self.donors[rows]]
        return local if bool((local >= 0).all()) else None

    def swapped(self, images: Tensor, masks: Tensor, region: str, rows: Optional[Tensor] = None) -> Tensor:
        """The probe images ``rows`` (default: all ``n``) each with its suspect region from its donor, as the swap
        test shows them to the model (:func:`~caap_lightning.model_tests.swapped_images`); ``images``/``masks``
        are the whole probe's."""
        rows = torch.arange(self.n) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        donors = self.donors[rows]
        return swapped_images(images[rows], masks[rows], images[donors], masks[donors], region)


@dataclass
class SwapShard:
    """A rank's share of the swap pairs on the device: its images and masks, each one's donor with its masks, and
    the top-1 class of each image and of its donor (a swap compares the class the model sees in each); the
    images' clean class probabilities tell whether the model tells them apart at all
    (:class:`~caap_lightning.model_tests.probe_skill.ProbeSkill`)."""

    images: Tensor
    masks: Dict[str, Tensor]  # "masks" and "cue_masks", where the probe has them
    top1: Tensor
    donor_images: Tensor
    donor_masks: Dict[str, Tensor]
    donor_top1: Tensor
    probs: Tensor  # (B, K) the images' clean class probabilities
    views: Dict[str, Tensor] = field(default_factory=dict)  # each swap test's swapped images, made once per probe
