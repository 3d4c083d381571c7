"""What a check measures and logs: one entry per map metric, and the table of every scalar a callback logs.

The model tests (swap and insertion ratios) have their own table,
:data:`~caap_lightning.model_tests.MODEL_TESTS`; ``CAAPCallback(metrics=...)`` takes names from both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.metrics import (
    AUPR,
    AttributionMass,
    DensityRatio,
    FixedPositionRatio,
    InsertionDeletion,
    PointingGame,
    attribution_mass,
    fixed_position_evidence,
    ratio_of_densities,
    region_evidence,
)
from caap_lightning.metrics.functional import HOT_REGION_SHARE, scorable_regions
from caap_lightning.model_tests import MODEL_TESTS, ModelTest
from caap_lightning.utils import upsample_maps

ImageScores = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class MeterContext:
    """What a map metric's meter is built with."""

    model: nn.Module
    step: Optional[int]  # pixels per Insertion/Deletion step (None: the metric's own default)
    curves: bool  # keep the Insertion/Deletion curves, for the figure


@dataclass(frozen=True)
class MetricSpec:
    """One metric of a method's maps: the probe field it needs, its meter, its update and its logged scalars.

    ``scalars`` maps each logged scalar (``caap/<scalar>``) to a key of the meter's
    ``compute_details()``. ``score_images`` gives the metric per image from the pixel maps and
    the masks it needs (``None`` for none), for :attr:`ProbeResult.per_image`. ``part`` is what the
    alarm calls the part of the image the metric is about.
    """

    needs: Optional[str]  # "masks", "cue_masks" or None
    build: Callable[[MeterContext], Any]
    scalars: Dict[str, str]
    score_images: Optional[ImageScores] = None
    maps_only: bool = False  # the meter takes the maps alone
    part: Optional[str] = None
    meaning: str = ""

    def update(self, meter: Any, pixel_maps: torch.Tensor, images: torch.Tensor, masks: Dict[str, torch.Tensor],
               targets: torch.Tensor) -> None:
        if self.maps_only:
            meter.update(pixel_maps)
        elif self.needs is None:  # Insertion/Deletion scores the images themselves
            meter.update(images, pixel_maps, target=targets)
        else:
            meter.update(pixel_maps, masks[self.needs])


def _mass(needs: str, region: str, by_area: bool, scalar: str, part: str) -> MetricSpec:
    return MetricSpec(
        needs, lambda ctx: AttributionMass(region=region, normalize_by_area=by_area), {scalar: "attribution_mass"},
        score_images=lambda maps, masks: attribution_mass(maps, masks, region=region, normalize_by_area=by_area),
        part=part,
    )


def _density(needs: str, region: str, scalar: str, part: str, meaning: str) -> MetricSpec:
    return MetricSpec(
        needs, lambda ctx: DensityRatio(region=region), {scalar: "density_ratio"},
        score_images=lambda maps, masks: ratio_of_densities(*region_evidence(maps, masks, region=region)),
        part=part, meaning=meaning,
    )


def _fixed_position_of_images(maps: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    found = fixed_position_evidence(maps)
    return ratio_of_densities(found.share, found.area)


# One entry per map metric: adding a metric is adding a line here.
METRICS: Dict[str, MetricSpec] = {
    "aupr_fg": MetricSpec("masks", lambda ctx: AUPR(region="foreground"), {"aupr_fg": "aupr", "aupr_fg_lift": "lift"}),
    "aupr_bg": MetricSpec("masks", lambda ctx: AUPR(region="background"), {"aupr_bg": "aupr", "aupr_bg_lift": "lift"}),
    "pointing_game": MetricSpec("masks", lambda ctx: PointingGame(), {"pointing_game": "pointing_game"}),
    "insertion_deletion": MetricSpec(
        None,
        # Its forwards dominate the check; on a CPU, large batches run them faster than the default.
        lambda ctx: InsertionDeletion(ctx.model, step=ctx.step, batch_size=256, curves=ctx.curves),
        {k: k for k in ("insertion", "deletion", "insdel", "insdel_informative")},
    ),
    "background_mass": _mass("masks", "outside", False, "background_mass", "background"),
    "background_mass_ratio": _mass("masks", "outside", True, "background_mass_ratio", "background"),
    "cue_mass": _mass("cue_masks", "mask", False, "cue_mass", "cue"),
    "cue_mass_ratio": _mass("cue_masks", "mask", True, "cue_mass_ratio", "cue"),
    # Density on the region over density off it: 1 for a uniform map at any region size.
    "background_density_ratio": _density(
        "masks", "outside", "background_density_ratio", "background",
        "the evidence density off the object over its density on it; 1 for a uniform map",
    ),
    "cue_density_ratio": _density(
        "cue_masks", "mask", "cue_density_ratio", "cue",
        "the evidence density on the cue over its density off it; 1 for a uniform map",
    ),
    "fixed_position_ratio": MetricSpec(
        None, lambda ctx: FixedPositionRatio(), {"fixed_position_ratio": "fixed_position_ratio"},
        score_images=_fixed_position_of_images, maps_only=True, part="fixed position",
        meaning=(f"the evidence density in each image's hot region (the top {HOT_REGION_SHARE:.0%} of the pixels of "
                 "the other images' mean evidence) over its density elsewhere; 1 for a uniform map"),
    ),
}
# Every name `CAAPCallback(metrics=...)` takes: the map metrics, then the model tests.
METRIC_NAMES = (*METRICS, *MODEL_TESTS)


def needs_of(name: str) -> Optional[str]:
    """The probe field a metric or model test reads (``None``: none)."""
    return METRICS[name].needs if name in METRICS else MODEL_TESTS[name].needs


def available_metrics(probe: ProbeBatch, pairs: int) -> List[str]:
    """The metrics and model tests this probe's masks allow (a swap needs ``pairs`` >= 2 images)."""
    return [m for m in METRIC_NAMES if (needs_of(m) is None or getattr(probe, needs_of(m)) is not None)
            and not (m in MODEL_TESTS and MODEL_TESTS[m].kind == "swap" and pairs < 2)]


def default_metrics(available: Sequence[str]) -> List[str]:
    """What ``metrics=None`` takes of ``available``: every map metric and the swap ratios."""
    return [m for m in available if m in METRICS or MODEL_TESTS[m].by_default]


def map_image_values(
    method_maps: Dict[str, torch.Tensor], probe: ProbeBatch, metrics: Sequence[str], tag: Callable[[str, str], str]
) -> Dict[str, torch.Tensor]:
    """Each map metric of ``metrics`` per probe image, for every method's maps, under its logged name."""
    size = tuple(probe.images.shape[-2:])
    out = {}
    for name, maps in method_maps.items():
        pixel_maps = upsample_maps(maps.float(), size)  # as the metrics saw them
        for metric in metrics:
            spec = METRICS.get(metric)
            if spec is None or spec.score_images is None:
                continue
            values = spec.score_images(pixel_maps, None if spec.needs is None else getattr(probe, spec.needs)).float()
            for scalar in spec.scalars:
                out[tag(name, scalar)] = values
    return out


@dataclass(frozen=True)
class LoggedScalar:
    """One scalar a :class:`~caap_lightning.callbacks.CAAPCallback` logs, as its ``logged`` table publishes it.

    ``method`` is the attribution method whose maps it scores (a model test's is the primary
    method, whose maps are drawn beside it); ``probe`` the probe its values are computed on (a
    swap ratio's is the swap probe).
    """

    tag: str
    metric: str  # the name `metrics=` takes
    method: str
    probe: ProbeBatch
    spec: Optional[MetricSpec] = None  # a map metric's entry
    model_test: Optional[ModelTest] = None  # a model test's entry

    @property
    def part(self) -> Optional[str]:
        """The part of the image the scalar is about (``"background"``, ``"cue"``, ...), where it has one."""
        return self.model_test.part if self.model_test is not None else self.spec.part

    @property
    def detail(self) -> str:
        """The key of its meter's ``compute_details()`` it logs: what kind of scalar it is (a swap test's
        ``"swap_ratio"`` or ``"follow_share"``, a map metric's ``"density_ratio"``, ...)."""
        scalars = self.model_test.scalars if self.model_test is not None else self.spec.scalars
        return scalars[self.tag.rsplit("/", 1)[-1]]

    @property
    def meaning(self) -> str:
        return self.model_test.meaning_of(self.tag.rsplit("/", 1)[-1]) if self.model_test is not None else self.spec.meaning

    def check_scorable(self) -> None:
        """``ValueError`` where no probe image can be scored for it (blank masks, a lone image)."""
        self.check_regions()
        if self.model_test is None and self.spec.score_images is not None:
            masks = None if self.spec.needs is None else getattr(self.probe, self.spec.needs)
            self.spec.score_images(torch.zeros(len(self.probe), *self.probe.images.shape[-2:]), masks)

    def check_regions(self) -> None:
        """``ValueError`` where the masks it reads mark no image's region (blank or whole-image masks), or a model
        test has no pair: every check would fail the same way."""
        if self.model_test is not None:
            self.model_test.check_scorable(self.probe)
        elif self.spec.needs is not None:
            scorable_regions(getattr(self.probe, self.spec.needs))


def check_scorable_table(logged: Dict[str, LoggedScalar]) -> None:
    """Raise, in setup, where the masks a logged scalar reads mark no region in the probe it is computed on: it
    would fail every check the same way."""
    for tag, entry in logged.items():
        try:
            entry.check_regions()
        except ValueError as exc:
            which = "swap probe" if entry.model_test is not None and entry.model_test.kind == "swap" else "probe"
            needs = (entry.model_test or entry.spec).needs
            remedy = "" if needs is None else (f". Give {needs} that mark part of each image (the maps' probe is the "
                                               f"swap probe's first images), or leave out the metrics that read {needs}")
            raise ValueError(
                f"CAAPCallback cannot watch {tag} on this {which} of {len(entry.probe)} image(s): {exc}{remedy}"
            ) from exc


def why_unscored(entry: LoggedScalar, computed: bool, finite_outputs: bool) -> str:
    """Why ``entry`` has no value at a check (``computed``: its step ran), in words for the monitor's message."""
    if not computed:
        return "its step failed at this check (a warning said why)"
    if not finite_outputs:
        return "the model's outputs on the probe images were not finite (NaN or inf)"
    if entry.model_test is not None and entry.model_test.kind == "swap":
        labels = entry.probe.labels
        if bool((labels >= 0).all()) and len(labels.unique()) == 1:
            return "the probe's images are all of one class, so no pair has two classes to compare"
        return "the model gave every probe image the class of its partner"
    return "no probe image could be scored for it"


def unscored_reasons(
    logged: Dict[str, LoggedScalar], metrics: Dict[str, float], methods: Sequence[str], tested: bool, finite: bool
) -> Dict[str, str]:
    """Why each scalar of ``logged`` missing from ``metrics`` has no value: the ``methods`` whose maps were made,
    whether the model ``tested`` ran, and whether the model's outputs were ``finite``."""
    ran = {tag: tested if entry.model_test is not None else entry.method in methods for tag, entry in logged.items()}
    return {tag: why_unscored(entry, ran[tag], finite) for tag, entry in logged.items() if tag not in metrics}


def logged_table(
    methods: Sequence[str], metrics: Sequence[str], tag: Callable[[str, str], str], probe: ProbeBatch,
    swap_probe: Optional[ProbeBatch],
) -> Dict[str, LoggedScalar]:
    """Every scalar logged with these methods and metrics (the model tests once, with the primary method)."""
    table: Dict[str, LoggedScalar] = {}
    for method in methods:
        for metric in metrics:
            if metric in METRICS:
                for scalar in METRICS[metric].scalars:
                    table[tag(method, scalar)] = LoggedScalar(tag(method, scalar), metric, method, probe,
                                                              spec=METRICS[metric])
            elif method == methods[0]:
                test = MODEL_TESTS[metric]
                tested = swap_probe if test.kind == "swap" and swap_probe is not None else probe
                for scalar in test.scalars:
                    table[tag(method, scalar)] = LoggedScalar(tag(method, scalar), metric, method, tested, model_test=test)
    return table


def resolve_metrics(requested: Optional[Sequence[str]], probe: ProbeBatch, pairs: int) -> List[str]:
    """The metrics a check runs: ``requested`` (``None``: :func:`default_metrics`), refused where the probe's masks
    or its ``pairs`` images (the swap probe's size) do not allow them."""
    available = available_metrics(probe, pairs)
    if requested is None:
        return default_metrics(available)
    unpaired = [m for m in available_metrics(probe, 2) if m in requested and m not in available]  # swaps, < 2 images
    if unpaired:
        raise ValueError(
            f"CAAPCallback metrics {sorted(unpaired)} swap a region between probe images, but the probe has "
            f"{pairs}; give the probe at least 2 images, or remove them."
        )
    missing = [m for m in requested if m not in available]
    if missing:
        needs = sorted({needs_of(m) for m in missing})
        raise ValueError(
            f"CAAPCallback metrics {missing} need {' and '.join(needs)}, but the probe batch has none; remove them "
            f"from `metrics` (this data allows {available}), or leave `metrics` unset."
        )
    return list(requested)
