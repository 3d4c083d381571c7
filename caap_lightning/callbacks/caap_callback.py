"""CAAPCallback: CAAP maps (and other methods' maps) of a fixed probe batch and their metrics, logged as the model trains."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import Dataset

from caap_lightning.attribution import cnn, registry, vit
from caap_lightning.attribution.blanks import BLANK_KINDS
from caap_lightning.attribution.caap import CONSTRUCTIONS as VIT_CONSTRUCTIONS, SCORES
from caap_lightning.attribution.selection import SELECTIONS
from caap_lightning.callbacks import figures
from caap_lightning.callbacks.discovery import (
    check_class_scores,
    find_attribution_model,
    names_its_classifier,
    verify_attribution_model,
)
from caap_lightning.callbacks.probe import (
    ProbeKeys,
    check_pixel_range,
    check_probe,
    eval_source,
    first_samples,
    probe_from_dataset,
    probe_from_loader,
    raw_eval_loader,
    resolve_normalization,
    to_probe_batch,
)
from caap_lightning.datamodules.base import ProbeBatch
from caap_lightning.metrics import (
    AUPR,
    AttributionMass,
    DensityRatio,
    FixedPositionRatio,
    InsertionDeletion,
    InsertionRatio,
    PointingGame,
    SwapRatio,
    attribution_mass,
    border_masks,
    fixed_position_evidence,
    rest_colour,
    ratio_of_densities,
    region_evidence,
    swap_donors,
)
from caap_lightning.utils import eval_mode, unnormalize, upsample_maps

TARGETS = ("predicted", "label")
ON_ERROR = ("warn", "raise")
PRECISIONS = ("trainer", "32")
# Heatmap-grid column titles of the attribution methods (others: the method's name).
COLUMN_TITLES = {"caap": "CAAP (A - A_blank)"}
# CAAP's constructions on each model family (registry.family_of), and the one used where none is given:
# each family's own default (see the `construction` argument for why the ViT's is no longer windowed).
CONSTRUCTIONS = {"vit": VIT_CONSTRUCTIONS, "cnn": cnn.CONSTRUCTIONS}
DEFAULT_CONSTRUCTION = {"vit": "parallel", "cnn": "standard"}
DEFAULT_WINDOW = 2  # patches around each patch that construction="windowed" recomputes
FAMILY_NAMES = {"vit": "a timm ViT", "cnn": "a CNN"}


def model_test_regions(needs: Optional[str], images: torch.Tensor, masks: Dict[str, torch.Tensor]) -> torch.Tensor:
    """A model test's masks for ``images``: the probe's ``needs`` field, or the border ring where it needs none."""
    return border_masks(len(images), tuple(images.shape[-2:])) if needs is None else masks[needs]


def model_test_colour(needs: Optional[str], probe: ProbeBatch) -> torch.Tensor:
    """A model test's stand-in for a removed rest, from the whole probe: the same on every rank and check."""
    masks = {k: getattr(probe, k) for k in ("masks", "cue_masks") if getattr(probe, k) is not None}
    return rest_colour(probe.images, model_test_regions(needs, probe.images, masks))


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the check: the probe field it needs, its meter, its update and its logged scalars.

    ``scalars`` maps each logged scalar (``caap/<scalar>``) to a key of the meter's
    ``compute_details()``. ``region``/``by_area`` are set for mass metrics, which also have a
    per-image value (published in :attr:`ProbeResult.per_image`). ``per_image`` gives a metric's
    per-image values from the pixel maps and the masks it needs (``None`` for none), as the
    :class:`SpuriousCueMonitor` reads them to name the images behind an alarm. ``maps_only``
    meters take the maps alone.
    """

    needs: Optional[str]  # "masks", "cue_masks" or None
    build: Callable[["_MeterContext"], Any]
    scalars: Dict[str, str]
    region: Optional[str] = None
    by_area: bool = False
    per_image: Optional[Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]] = None
    maps_only: bool = False
    # A test of the model itself, not of a method's maps: computed once per check, logged under the primary
    # method's name; its per-image values are this key of the meter's compute_details().
    model_test_per_image: Optional[str] = None
    # A model test on pairs of probe images (each with its donor's region): its update also takes the donors.
    swap: bool = False
    # Whether `metrics=None` takes it (where the probe allows it).
    by_default: bool = True

    def test_regions(self, images: torch.Tensor, masks: Dict[str, torch.Tensor]) -> torch.Tensor:
        return model_test_regions(self.needs, images, masks)

    def test_colour(self, probe: ProbeBatch) -> torch.Tensor:
        return model_test_colour(self.needs, probe)

    def update(self, meter: Any, pixel_maps: torch.Tensor, shard: "_ProbeShard") -> None:
        if self.swap:
            images, donors = shard.swap_images, shard.donor_images
            meter.update(
                images, self.test_regions(images, shard.swap_masks).to(images.device),
                donors, self.test_regions(donors, shard.donor_masks).to(images.device),
                target=shard.swap_top1, donor_target=shard.donor_top1,
            )
        elif self.model_test_per_image is not None:
            images = shard.images
            meter.update(images, self.test_regions(images, shard.masks).to(images.device), target=shard.targets)
        elif self.maps_only:
            meter.update(pixel_maps)
        elif self.needs is None:  # Insertion/Deletion scores the images themselves
            meter.update(shard.images, pixel_maps, target=shard.targets)
        else:
            meter.update(pixel_maps, shard.masks[self.needs])


def probe_tested_by(spec: MetricSpec, probe: ProbeBatch, swap_probe: Optional[ProbeBatch]) -> ProbeBatch:
    """The probe a metric's updates saw: the swap probe for a swap ratio (where there is one), else the maps' probe."""
    return swap_probe if spec.swap and swap_probe is not None else probe


@dataclass(frozen=True)
class _MeterContext:
    model: nn.Module
    step: Optional[int]
    curves: bool
    probe: ProbeBatch


def _mass(needs: str, region: str, by_area: bool, scalar: str) -> MetricSpec:
    return MetricSpec(
        needs, lambda ctx: AttributionMass(region=region, normalize_by_area=by_area),
        {scalar: "attribution_mass"}, region=region, by_area=by_area,
        per_image=lambda maps, masks: attribution_mass(maps, masks, region=region, normalize_by_area=by_area),
    )


def _density(needs: str, region: str, scalar: str) -> MetricSpec:
    return MetricSpec(
        needs, lambda ctx: DensityRatio(region=region), {scalar: "density_ratio"},
        per_image=lambda maps, masks: ratio_of_densities(*region_evidence(maps, masks, region=region)),
    )


def _insertion(needs: Optional[str], region: str, scalar: str) -> MetricSpec:
    # Asked for by name only: the swap ratios took over the alarm from them (benchmarks/results/spurious.md), and
    # their forward passes did not fit the check's budget beside the swap ratios' (callback-overhead.md).
    return MetricSpec(
        needs, lambda ctx: InsertionRatio(ctx.model, region=region, colour=model_test_colour(needs, ctx.probe), per_image=True),
        {scalar: "insertion_ratio"}, region=region, model_test_per_image="insertion_ratio_per_image", by_default=False,
    )


def _swap(needs: Optional[str], region: str, scalar: str) -> MetricSpec:
    return MetricSpec(
        needs, lambda ctx: SwapRatio(ctx.model, region=region, per_image=True), {scalar: "swap_ratio"}, region=region,
        model_test_per_image="swap_ratio_per_image", swap=True,
    )


def _fixed_position_per_image(maps: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    found = fixed_position_evidence(maps)
    return ratio_of_densities(found.share, found.area)


# One entry per metric: adding a metric is adding a line here.
METRICS: Dict[str, MetricSpec] = {
    "aupr_fg": MetricSpec("masks", lambda ctx: AUPR(region="foreground"), {"aupr_fg": "aupr", "aupr_fg_lift": "lift"}),
    "aupr_bg": MetricSpec("masks", lambda ctx: AUPR(region="background"), {"aupr_bg": "aupr", "aupr_bg_lift": "lift"}),
    "pointing_game": MetricSpec("masks", lambda ctx: PointingGame(), {"pointing_game": "pointing_game"}),
    "insertion_deletion": MetricSpec(
        None,
        # Its forwards dominate the check; on a CPU, batches of 256 run them faster than batches of 64.
        lambda ctx: InsertionDeletion(ctx.model, step=ctx.step, batch_size=256, curves=ctx.curves),
        {k: k for k in ("insertion", "deletion", "insdel", "insdel_informative")},
    ),
    "background_mass": _mass("masks", "outside", False, "background_mass"),
    "background_mass_ratio": _mass("masks", "outside", True, "background_mass_ratio"),
    "cue_mass": _mass("cue_masks", "mask", False, "cue_mass"),
    "cue_mass_ratio": _mass("cue_masks", "mask", True, "cue_mass_ratio"),
    # Density on the region over density off it: 1 for a uniform map at any region size.
    "background_density_ratio": _density("masks", "outside", "background_density_ratio"),
    "cue_density_ratio": _density("cue_masks", "mask", "cue_density_ratio"),
    "fixed_position_ratio": MetricSpec(
        None, lambda ctx: FixedPositionRatio(), {"fixed_position_ratio": "fixed_position_ratio"},
        per_image=_fixed_position_per_image, maps_only=True,
    ),
    # The model's class restored by a region alone over the rest alone: 1 when they restore it equally.
    "background_insertion_ratio": _insertion("masks", "outside", "background_insertion_ratio"),
    "cue_insertion_ratio": _insertion("cue_masks", "mask", "cue_insertion_ratio"),
    "border_insertion_ratio": _insertion(None, "mask", "border_insertion_ratio"),
    # On each image with its region swapped for another image's: the donor's class over the own, 1 = equal.
    "background_swap_ratio": _swap("masks", "outside", "background_swap_ratio"),
    "cue_swap_ratio": _swap("cue_masks", "mask", "cue_swap_ratio"),
    "border_swap_ratio": _swap(None, "mask", "border_swap_ratio"),
}
# The metrics that test the model rather than a method's maps.
MODEL_TESTS = tuple(name for name, spec in METRICS.items() if spec.model_test_per_image is not None)


class CheckFailed(Exception):
    """A step of a check failed and was reported (``on_error="warn"``); the step is skipped."""


def per_image_values(
    method_maps: Dict[str, torch.Tensor], probe: ProbeBatch, metrics: List[str], tag: Callable[[str, str], str]
) -> Dict[str, torch.Tensor]:
    """Each region metric of ``metrics`` per probe image, for every method's maps, under its logged name."""
    size = tuple(probe.images.shape[-2:])
    out = {}
    for name, maps in method_maps.items():
        pixel_maps = upsample_maps(maps.float(), size)  # as the metrics saw them
        for metric in metrics:
            spec = METRICS[metric]
            if spec.per_image is None:
                continue
            values = spec.per_image(pixel_maps, None if spec.needs is None else getattr(probe, spec.needs)).float()
            for scalar in spec.scalars:
                out[tag(name, scalar)] = values
    return out


@dataclass
class ProbeResult:
    """One check on the whole probe batch (gathered across ranks, identical on every rank).

    This is what :class:`CAAPCallback` publishes (``callback.last``) and what other callbacks
    such as :class:`SpuriousCueMonitor` read: the metrics under their logged names, the maps,
    the probe they explain and how to draw them.
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
    # What per_image computes on its first read: only an alarm report needs it, not every check.
    per_image_values: Optional[Callable[[], Dict[str, torch.Tensor]]] = field(default=None, repr=False)
    # The model tests' per-image values, computed with the check (they need the model, not the maps).
    model_test_per_image: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _per_image: Optional[Dict[str, torch.Tensor]] = field(default=None, init=False, repr=False)

    @property
    def per_image(self) -> Dict[str, torch.Tensor]:
        """Each region metric per probe image under its logged name, ``(n,)``: which images carry the reliance."""
        if self._per_image is None:
            computed = {} if self.per_image_values is None else self.per_image_values()
            self._per_image = {**computed, **self.model_test_per_image}
        return self._per_image

    @property
    def maps(self) -> torch.Tensor:
        """The primary method's patch maps (CAAP's: relative, ``A - A_blank``), ``(n, gh, gw)``."""
        return next(iter(self.method_maps.values()))

    @property
    def curves(self) -> Dict[str, torch.Tensor]:
        """The primary method's mean insertion/deletion curves (empty without that metric)."""
        return next(iter(self.method_curves.values()), {})

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
        probe = self.probe
        index = torch.as_tensor(rows, dtype=torch.long)
        size = tuple(probe.images.shape[-2:])
        overlays = {
            COLUMN_TITLES.get(name, name): upsample_maps(maps[index].cpu(), size) for name, maps in self.method_maps.items()
        }
        return figures.heatmap_grid(
            unnormalize(probe.images[index], self.mean, self.std),
            overlays,
            [self.row_title(i) for i in rows],
            masks=None if probe.masks is None else probe.masks[index],
            cue_masks=None if probe.cue_masks is None else probe.cue_masks[index],
            views={title: unnormalize(v, self.mean, self.std) for title, v in (views or {}).items()},
        )


@dataclass
class _ProbeShard:
    """This rank's share of the probe batch on the device, with the classes its maps explain."""

    images: torch.Tensor
    masks: Dict[str, torch.Tensor]  # "masks" and "cue_masks", where the probe has them
    targets: torch.Tensor
    scores: torch.Tensor
    # The swap tests' pairs, from this rank's share of the swap probe: its images and masks, each one's donor
    # (swap_donors over the whole swap probe) with its masks, and the top-1 class of each image and of its donor
    # (a swap compares the class the model sees in the image with the one it sees in the donor); all None (and
    # {}) where no swap test runs.
    swap_images: Optional[torch.Tensor]
    swap_masks: Dict[str, torch.Tensor]
    swap_top1: Optional[torch.Tensor]
    donor_images: Optional[torch.Tensor]
    donor_masks: Dict[str, torch.Tensor]
    donor_top1: Optional[torch.Tensor]


class CAAPCallback(Callback):
    """Attribution maps of a fixed probe batch and their metrics, at the end of validation.

    The probe batch is taken once, in ``setup``: ``probe`` if given, else the datamodule's
    ``probe_batch(num_images)``, else the first ``num_images`` samples of the validation (or
    test) dataloader, in the same order on every rank. Where a swap ratio runs, ``swap_images``
    are taken instead when they are more, and the maps explain the first ``num_images``. At the end of every
    ``every_n_epochs``-th validation of a fit, and of every ``validate``/``test`` run, the
    callback attributes the probe images with each of ``methods`` (CAAP alone by default) and
    logs, per method, each metric as a scalar. The first method is the primary one: its scalars
    are ``<prefix>/<scalar>`` (e.g. ``caap/insdel``, ``caap/cue_density_ratio``); every further
    method's are ``<prefix>/<method>/<scalar>`` (e.g. ``caap/gradcam/insdel``). The model tests
    (the swap ratios such as ``caap/background_swap_ratio``, what :class:`SpuriousCueMonitor`
    watches by default, and the insertion ratios) are logged once, under the primary's names. It also logs
    ``<prefix>/seconds`` (the whole check's wall time), a heatmap grid with one overlay column per
    method (``<prefix>/heatmaps``) and the mean Insertion/Deletion curves of every method
    (``<prefix>/insertion_deletion``); loggers that cannot show images get PNG files under the
    run's log directory. Each check's result is published as :attr:`last` (a
    :class:`ProbeResult`). Under DDP each rank attributes its share of the probe batch, the
    metrics sync, and rank zero draws the images. The history of metric values survives a
    resume from checkpoint; several instances (with different ``prefix``) run in one Trainer.

    The model attributed, a timm ``VisionTransformer`` or a CNN that
    :class:`~caap_lightning.attribution.cnn.ConvCAAP` reads (a torchvision or timm ResNet, VGG,
    DenseNet or ConvNeXt), is found at every check (so a module swapped during the fit is
    picked up): ``pl_module.get_attribution_model()``, else ``pl_module.model`` (or the one
    supported model in it), else the one supported model among the module's submodules. Each
    method is built for the model's family (``registry.get_method``): ``caap`` is
    :class:`~caap_lightning.CAAP` on a ViT and ``ConvCAAP`` on a CNN. A ViT built with
    ``num_classes=0`` is completed by the module's own head: ``get_attribution_head()``, else
    the submodule named by ``head``, else the one head that holds the ``nn.Linear`` taking the
    ViT's features (a whole ``nn.Sequential`` head, not its first layer); a CNN is attributed
    through its own head. Unless the module names its classifier (``get_attribution_model()``,
    and ``get_attribution_head()`` or ``head`` for a headless ViT), setup runs the module's own
    forward and the attribution model on a few probe images and refuses when their outputs
    differ (:func:`~caap_lightning.callbacks.discovery.verify_attribution_model`).

    Args:
        every_n_epochs: run after the validation of every n-th epoch of a fit.
        num_images: size of the probe batch (each rank attributes a share under DDP).
        swap_images: the least size of the swap ratios' probe: the first ``max(num_images,
            swap_images)`` images of the same source (the maps' probe is its first ``num_images``),
            or fewer where the source has fewer. A swap costs one forward pass per image, not an
            attribution, and on 16 images the ratio is too noisy for any threshold to alarm in time
            and never on a control: while a model follows a cue on two thirds of the conflicting
            images, 16 swaps can still split evenly (``benchmarks/results/swap-probe-size.md``).
        probe: the probe itself: images ``(n, 3, H, W)``, a tuple ``(images, labels[, masks[,
            cue_masks]])``, a dict with those keys, a ``ProbeBatch`` or a ``Dataset`` (its first
            ``num_images`` samples, or ``swap_images`` where more and a swap ratio runs). Images are normalised as the model expects; masks are
            ``(n, H, W)`` or ``(n, 1, H, W)``, bool or 0/1.
        probe_keys: the names of a dict batch's fields, e.g. ``{"images": "pixel_values",
            "labels": "label"}``, where the defaults (``image``/``images``/``pixel_values``/``x``,
            ``label``/``labels``/``target``/``y``, ``mask``/``masks``, ...) do not cover them.
        mean, std: the normalisation of the images, for the blank and the display; else the
            datamodule's ``mean``/``std``, else the model's ``pretrained_cfg`` (said once).
        head: attribute path on the LightningModule of the head of a ViT built with
            ``num_classes=0`` (e.g. ``"classifier"``), where it cannot be found by itself.
        methods: *which* attribution methods, by registry name (see
            :func:`~caap_lightning.attribution.registry.available_methods`: ``caap``, ``gradcam``,
            ``rollout``, ``tattr``, ``input_x_gradient``, ``simple_insertion``,
            ``simple_deletion``, ``occlusion``, ``random``); the first is the primary one.
            Default ``["caap"]``. CAAP's maps are relative (``A - A_blank``), the others' as the
            method returns them. ``rollout`` and ``tattr`` read attention, so a CNN takes the others.
        method_kwargs: constructor arguments per method other than ``caap``, e.g.
            ``{"simple_insertion": {"batch_size": 32}}``. Methods that take ``mean``/``std``
            get the data's normalisation unless given here.
        layer_cutoff, selection, blank, score: CAAP's settings (see :class:`~caap_lightning.CAAP`
            and :class:`~caap_lightning.attribution.cnn.ConvCAAP`). ``layer_cutoff`` is a number of
            blocks on a ViT; on a CNN a cut index or a stage name (e.g. ``"layer2"``), checked in
            setup against the CNN's stages; ``None`` takes the middle one.
            ``layer_cutoff="auto"`` picks it once, at the first check, with the method's
            ``calibrate`` on the probe batch: the cutoff sweep ``k = 0..L`` by InsDel, with the
            check's Insertion/Deletion steps. The first check rather than the fit's start, because a
            fine-tune's new head is untrained at the start and the sweep would rank noise. The
            sweep costs about ``L + 1`` checks, once; its table is logged as
            ``<prefix>/layer_cutoff_sweep`` (text) and the pick survives a resume.
        construction: *how* CAAP computes its maps, not which methods run. On a ViT:
            ``"parallel"`` (exact, batched, CAAP's own default and the default here),
            ``"windowed"`` (also recomputes the blank tokens within ``window`` patches of each
            patch), ``"efficient"`` (E-CAAP, approximate) or ``"standard"`` (textbook activation
            patching, one forward per patch). ``windowed`` was the default here while the alarm read
            the maps; the monitor's default scores now test the model instead, ``parallel`` scores
            higher on the deeper quality testbed, and ``windowed``'s extra cost put the check over
            its budget (``benchmarks/results/callback-overhead.md``; quality against cost:
            ``quality.md`` and ``quality-fashion.md``). On a CNN:
            ``"standard"`` (the default there) or ``"frozen"`` (``docs/cnn.md``). ``None`` takes
            the model family's default; one of the other family's is refused in setup.
        window: radius, in patches, of the recomputed window of a ViT's ``construction="windowed"``
            (``None``: 2); a CNN has none, and refuses it in setup.
        grid: a CNN's patch grid for CAAP (``(gh, gw)`` or an int; see ``ConvCAAP``): ``None`` puts
            one patch on each cell of the cut's feature map. CAAP's cost grows with the patches, so
            a coarser grid (e.g. ``7`` at 224 px) keeps the check cheap on large images
            (``benchmarks/results/speed-cpu-resnet50.json``). A ViT refuses it in setup.
        metrics: any of ``aupr_fg``, ``aupr_bg``, ``pointing_game``, ``insertion_deletion``,
            ``background_mass``, ``background_mass_ratio``, ``cue_mass``, ``cue_mass_ratio``,
            ``background_density_ratio``, ``cue_density_ratio``, ``fixed_position_ratio``,
            ``background_insertion_ratio``, ``cue_insertion_ratio``, ``border_insertion_ratio``,
            ``background_swap_ratio``, ``cue_swap_ratio``, ``border_swap_ratio``;
            ``None`` takes every metric the probe batch's masks allow (the swap ratios need 2
            images) but the insertion ratios, which are computed where named. Mass metrics read
            the map's positive part; ``*_mass_ratio`` divides by the region's share of the image;
            ``*_density_ratio`` is the evidence density on the region over that off it, and
            ``fixed_position_ratio`` the same for the place that the other probe images' evidence
            shares. The ``*_insertion_ratio`` scores test the model rather than a map: the class
            probability the background (the cue, the image's border) alone restores over what the
            rest alone restores (:class:`~caap_lightning.metrics.InsertionRatio`); so do the
            ``*_swap_ratio`` scores: on each image with its background (cue, border) taken from the
            image half the probe further on, the probability of that image's top-1 class over the
            image's own (:class:`~caap_lightning.metrics.SwapRatio`). The model tests run once per
            check, under the primary method's name (``docs/metrics.md``).
        target: the class each map explains: ``"predicted"`` (the model's top-1) or ``"label"``.
        insertion_deletion_steps: steps of each Insertion/Deletion curve (``ceil(H * W / steps)``
            pixels each); the default 16 keeps the check cheap. ``None`` takes one patch per step
            on a ViT, the benchmark protocol, at about ``num_patches / 16`` times the cost, and
            one image row per step on a CNN (RISE's protocol for CNNs).
        log_images: log the heatmap grid and the curve figure.
        max_images_logged: rows of the heatmap grid.
        precision: ``"trainer"`` runs the check's forwards as the Trainer runs its validation
            steps (under ``precision="bf16-mixed"``, in bf16 autocast; ``tests/gpu`` checks that
            its maps rank the patches as fp32's do); ``"32"`` runs them without autocast, so that
            a mixed-precision fit gets the float32 maps and metrics of a float32 evaluation.
        on_error: ``"warn"`` reports a failure (on the rank where it happened) and lets training
            go on: a failing primary method skips the check, a failing further method is left
            out of it (the others are logged). ``"raise"`` stops.
        prefix: the first part of every logged name; give each instance its own when a Trainer
            has several.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 16,
        swap_images: int = 64,
        probe: Any = None,
        probe_keys: Optional[Dict[str, Union[str, List[str]]]] = None,
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        head: Optional[str] = None,
        methods: Optional[List[str]] = None,
        method_kwargs: Optional[Dict[str, Dict[str, Any]]] = None,
        layer_cutoff: Optional[Union[int, str]] = None,
        selection: str = "box1",
        blank: str = "white",
        construction: Optional[str] = None,
        window: Optional[int] = None,
        grid: Optional[Union[int, Tuple[int, int]]] = None,
        score: str = "probability",
        metrics: Optional[List[str]] = None,
        target: str = "predicted",
        insertion_deletion_steps: Optional[int] = 16,
        log_images: bool = True,
        max_images_logged: int = 8,
        on_error: str = "warn",
        precision: Union[str, int] = "trainer",
        prefix: str = "caap",
    ) -> None:
        super().__init__()
        precision = str(precision)  # 32, as Lightning's own precision flag accepts it
        if every_n_epochs < 1 or num_images < 1 or swap_images < 2 or max_images_logged < 0:
            raise ValueError(
                f"need every_n_epochs >= 1, num_images >= 1, swap_images >= 2 (a swap pairs two images) and "
                f"max_images_logged >= 0; got every_n_epochs={every_n_epochs}, num_images={num_images}, "
                f"swap_images={swap_images}, max_images_logged={max_images_logged}"
            )
        check_cutoff_form(layer_cutoff)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
            raise ValueError(f"window must be an int >= 0 (patches around each patch) or None, got {window!r}")
        if construction is not None and construction not in {c for family in CONSTRUCTIONS.values() for c in family}:
            raise ValueError(
                f"construction={construction!r} is not one of {VIT_CONSTRUCTIONS} (a ViT's) or {cnn.CONSTRUCTIONS} "
                "(a CNN's), or None (the model family's default)"
            )
        if insertion_deletion_steps is not None and insertion_deletion_steps < 1:
            raise ValueError(f"insertion_deletion_steps must be >= 1 or None (one patch per step), got {insertion_deletion_steps}")
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty name without '/', got {prefix!r}")
        for name, value, choices in (
            ("selection", selection, tuple(SELECTIONS)),
            ("blank", blank, BLANK_KINDS),
            ("score", score, SCORES),
            ("target", target, TARGETS),
            ("on_error", on_error, ON_ERROR),
            ("precision", precision, PRECISIONS),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {choices}")
        if metrics is not None:
            unknown = [m for m in metrics if m not in METRICS]
            if unknown or len(set(metrics)) != len(metrics):
                raise ValueError(f"metrics {list(metrics)} must be distinct names from {list(METRICS)}; unknown: {unknown}")
        methods = ["caap"] if methods is None else list(methods)
        method_kwargs = {name: dict(kwargs) for name, kwargs in (method_kwargs or {}).items()}
        check_methods(methods, method_kwargs)
        if layer_cutoff == "auto" and "caap" not in methods:
            raise ValueError(f"layer_cutoff='auto' calibrates CAAP, which is not in methods={methods}; add 'caap' or drop it")
        self.probe_keys = ProbeKeys.from_mapping(probe_keys)
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.swap_images = swap_images
        self.user_mean = None if mean is None else tuple(float(m) for m in mean)
        self.user_std = None if std is None else tuple(float(s) for s in std)
        self.head = head
        self.methods = methods
        self.method_kwargs = method_kwargs
        self.layer_cutoff = layer_cutoff
        self.selection = selection
        self.blank = blank
        self._construction = construction
        self._window = window
        self.grid = None if grid is None else cnn.check_grid(grid)
        self.score = score
        self.metrics = None if metrics is None else list(metrics)
        self.target = target
        self.insertion_deletion_steps = insertion_deletion_steps
        self.log_images = log_images
        self.max_images_logged = max_images_logged
        self.on_error = on_error
        self.precision = precision
        self.prefix = prefix
        self.user_probe = None if probe is None else _own_probe(probe, self._probe_size, self.probe_keys)

        self.history: List[Dict[str, Any]] = []
        self.last: Optional[ProbeResult] = None
        self.probe: Optional[ProbeBatch] = None  # the probe batch the maps explain, on the CPU
        self.swap_probe: Optional[ProbeBatch] = None  # the swap ratios' probe (None where none runs), on the CPU
        self.class_names: List[str] = []
        self.mean: Optional[tuple] = None
        self.std: Optional[tuple] = None
        self.active_metrics: List[str] = []
        self._model: Optional[nn.Module] = None  # the ViT or CNN attributed
        self._family: Optional[str] = None  # its registry.family_of: "vit" or "cnn"
        self._head: Optional[nn.Module] = None  # the module's own head of a headless ViT
        self._classifier: Optional[nn.Module] = None  # the model (and that head): what the metrics' forwards run
        self._methods: Dict[str, Any] = {}  # name -> the attribution method, in `methods` order
        self._meters: Dict[str, Dict[str, Any]] = {}  # method -> metric -> meter
        self._probe_for: Optional[tuple] = None
        self._built_for: Optional[tuple] = None
        self._checked_schedule_of: Optional[tuple] = None
        # layer_cutoff="auto": the sweep's rows and the cutoff it picked (kept in the checkpoint).
        self.calibration: Optional[List[Dict[str, float]]] = None
        self.calibrated_cutoff: Optional[int] = None

    @property
    def state_key(self) -> str:
        # Several instances in one Trainer each keep their own state, as EarlyStopping's do.
        return self._generate_state_key(prefix=self.prefix, methods=self.methods)

    @property
    def construction(self) -> Optional[str]:
        """The construction given, else the attributed model family's default (``None`` until setup finds the model)."""
        if self._construction is not None or self._family is None:
            return self._construction
        return DEFAULT_CONSTRUCTION[self._family]

    @construction.setter
    def construction(self, value: Optional[str]) -> None:
        self._construction = value

    @property
    def window(self) -> Optional[int]:
        """The window given, else ``DEFAULT_WINDOW`` on a ViT (``None`` on a CNN, which has none, and before setup)."""
        if self._window is not None or self._family != "vit":
            return self._window
        return DEFAULT_WINDOW

    @window.setter
    def window(self, value: Optional[int]) -> None:
        self._window = value

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # A SpuriousCueMonitor may have run this setup already: the warnings come once per run.
        first = self._checked_schedule_of != (id(trainer), stage)
        self._checked_schedule_of = (id(trainer), stage)
        if stage == "fit" and eval_source(trainer, pl_module, "fit") is None:
            # Nothing to check in this fit: say so instead of failing on a probe it would never use.
            if first:
                self._warn_if_never_run(trainer)
            return
        self.prepare(trainer, pl_module, stage)
        if not first:
            return
        if stage == "fit":
            self._warn_if_never_run(trainer)
        if self.log_images and not figures.image_capable(trainer):
            rank_zero_warn(
                "CAAPCallback: the Trainer's loggers cannot show images "
                f"({', '.join(type(lg).__name__ for lg in trainer.loggers) or 'no logger'}); the heatmap grids "
                f"and curves are saved as {figures.describe_destinations(trainer)}."
            )

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Optional[str] = None) -> None:
        """Take the probe batch, resolve the metrics and build the methods; fail here on a wrong configuration."""
        self._check_siblings(trainer)
        if self.num_images < trainer.world_size:
            raise ValueError(f"num_images={self.num_images} is below the {trainer.world_size} processes; raise num_images")
        datamodule = trainer.datamodule
        if self._probe_for != (id(datamodule),) or self.probe is None:
            taken = self._take_probe(trainer, pl_module, stage or trainer_stage(trainer))
            self.probe = first_samples(taken, self.num_images)
            if self.target == "label" and bool((self.probe.labels < 0).any()):
                raise ValueError(
                    "CAAPCallback(target='label') explains each image's label, but the probe has images without "
                    "labels; give the probe labels, or use target='predicted'"
                )
            self.active_metrics = self._resolve_metrics(self.probe, len(taken))
            self.swap_probe = taken if any(METRICS[m].swap for m in self.active_metrics) else None
            if self.swap_probe is not None and len(taken) < self.swap_images:
                rank_zero_warn(
                    f"CAAPCallback: the swap ratios run on the {len(taken)} probe images there are, fewer than "
                    f"swap_images={self.swap_images}; on few images they are noisy, and SpuriousCueMonitor's default "
                    "threshold was chosen on 64 (benchmarks/results/spurious.md). Give a larger probe where you can."
                )
            self.class_names = _class_names(datamodule)
            self._probe_for = (id(datamodule),)
            self._built_for = None
        self._build(trainer, pl_module)

    def _take_probe(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> ProbeBatch:
        datamodule = trainer.datamodule
        if self.user_probe is not None:
            probe = self.user_probe
        elif callable(getattr(datamodule, "probe_batch", None)):
            probe = to_probe_batch(datamodule.probe_batch(self._probe_size), self.probe_keys)
        else:
            loader = raw_eval_loader(trainer, pl_module, stage)
            if loader is None:
                raise ValueError(
                    "CAAPCallback found no probe images: pass probe=... (images, a tuple, a dict or a Dataset), give "
                    f"the datamodule a probe_batch(n) method, or give the Trainer's {stage} a validation dataloader."
                )
            probe = probe_from_loader(loader, self._probe_size, self.probe_keys)
        return check_probe(probe.to("cpu"))

    @property
    def _probe_size(self) -> int:
        """Images to take from the probe's source: the maps' and, where more, the swap ratios'."""
        swaps = self.metrics is None or any(METRICS[m].swap for m in self.metrics)
        return max(self.num_images, self.swap_images) if swaps else self.num_images

    def _build(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the model and (re)build the methods and meters when it, or a build setting, changed."""
        try:
            model, head = find_attribution_model(pl_module, self.head)
        except ValueError as exc:
            raise ValueError(f"CAAPCallback cannot attribute {type(pl_module).__name__}: {exc}") from exc
        building: Optional[str] = None  # the method being built, named in the error
        try:
            self._family = registry.family_of(model)
            self._check_family_settings(self._family)
            # What the built methods depend on: setting e.g. `callback.construction` between runs rebuilds them.
            settings = (tuple(self.methods), self.layer_cutoff, self.selection, self.blank, self.construction,
                        self.window, self.grid, self.score)
            key = (id(model), id(head), settings)
            if self._built_for == key:
                return
            mean, std, message = resolve_normalization(self.user_mean, self.user_std, trainer.datamodule, pl_module, model)
            if message and self._built_for is None:
                rank_zero_info(f"CAAPCallback: {message}")
            methods: Dict[str, Any] = {}
            self.mean, self.std = mean, std
            for building in self.methods:
                methods[building] = self._build_method(building, model, head)
            building = None
            check_model_images(self._family, model, self.probe.images[:1])
        except ValueError as exc:
            which = "" if building is None else f" with {display_name(building)}"
            raise ValueError(
                f"CAAPCallback cannot attribute {type(pl_module).__name__} (attribution model: "
                f"{type(model).__name__}){which}: {exc} Return a timm VisionTransformer or a supported CNN "
                f"({cnn.SUPPORTED}) from get_attribution_model(), change the method's settings, or remove the callback."
            ) from exc
        # A CNN is its own classifier; a ViT's needs the module's head where it is headless.
        classifier = vit.Classifier(model, head) if self._family == "vit" else model
        try:
            note = verify_attribution_model(pl_module, classifier, self.probe.images, self.mean, self.std,
                                            against_forward=not names_its_classifier(pl_module, model, self.head))
        except ValueError as exc:
            raise ValueError(f"CAAPCallback cannot attribute {type(pl_module).__name__}: {exc}") from exc
        if note and self._built_for is None:
            rank_zero_warn(f"CAAPCallback: {note}")
        if self._built_for is None:
            warning = check_pixel_range(self.probe.images, self.mean, self.std)
            if warning:
                rank_zero_warn(f"CAAPCallback: {warning}")
        self._model, self._head = model, head
        self._methods = methods
        self._classifier = classifier
        self._meters = self._build_meters(self._classifier, tuple(self.probe.images.shape[-2:]))
        self._built_for = key

    def _check_family_settings(self, family: str) -> None:
        """CAAP settings given that only the other model family takes: refused, saying what to change."""
        given, choices = self._construction, CONSTRUCTIONS[family]
        if given is not None and given not in choices:
            raise ValueError(
                f"construction={given!r} does not apply to {FAMILY_NAMES[family]}, whose CAAP constructions are "
                f"{choices} (default {DEFAULT_CONSTRUCTION[family]!r}); pass one of those, or leave construction unset."
            )
        if family == "vit" and self.grid is not None:
            raise ValueError(
                f"grid={self.grid} sets a CNN's patch grid; a ViT's maps are on its own patches (image size / "
                "patch size): remove grid=."
            )
        if family == "cnn" and self._window is not None:
            raise ValueError(
                f"window={self._window} is the radius of a ViT's windowed construction, which a CNN does not have; "
                "remove window=."
            )
        if family == "vit" and isinstance(self.layer_cutoff, str) and self.layer_cutoff != "auto":
            raise ValueError(
                f"layer_cutoff={self.layer_cutoff!r} names a stage, which only a CNN has; a ViT's layer_cutoff is a "
                "number of blocks (an int), None (half of them) or 'auto'."
            )

    def _check_siblings(self, trainer: L.Trainer) -> None:
        """Two instances logging under one prefix would overwrite each other's scalars."""
        same = [cb for cb in trainer.callbacks if isinstance(cb, CAAPCallback) and cb.prefix == self.prefix]
        if len(same) > 1:
            raise ValueError(
                f"the Trainer has {len(same)} CAAPCallbacks with prefix={self.prefix!r}; give each its own prefix "
                "(e.g. CAAPCallback(prefix='caap_gradcam', methods=['gradcam'])) so their scalars do not collide"
            )

    def _warn_if_never_run(self, trainer: L.Trainer) -> None:
        """One warning for a fit in which no check can happen: it would otherwise say nothing at all."""
        if eval_source(trainer, trainer.lightning_module, "fit") is None:
            rank_zero_warn(
                "CAAPCallback runs at the end of validation, but this fit has no validation loop "
                "(no val dataloader, or limit_val_batches=0): it will never check. Give the fit validation data."
            )
            return
        max_epochs = trainer.max_epochs
        every_val = trainer.check_val_every_n_epoch
        if max_epochs is None or max_epochs < 0 or every_val is None:
            return
        if not any((e + 1) % self.every_n_epochs == 0 and (e + 1) % every_val == 0 for e in range(max_epochs)):
            rank_zero_warn(
                f"CAAPCallback(every_n_epochs={self.every_n_epochs}) never runs in this fit of max_epochs={max_epochs} "
                f"with check_val_every_n_epoch={every_val}: lower every_n_epochs."
            )

    def _build_method(self, name: str, model: nn.Module, head: Optional[nn.Module]) -> Any:
        """The model family's ``name``: CAAP with the callback's settings, or a baseline with its ``method_kwargs``
        (and the data's mean/std)."""
        method_class = registry.method_class(name, model)
        takes = inspect.signature(method_class).parameters
        if name == "caap":
            # "auto" starts at the middle cutoff until calibrate_cutoff picks one (or a resume restores it).
            cutoff = self.calibrated_cutoff if self.layer_cutoff == "auto" else self.layer_cutoff
            settings = dict(
                layer_cutoff=cutoff, selection=self.selection, blank=self.blank, construction=self.construction,
                window=self.window, grid=self.grid, score=self.score, mean=self.mean, std=self.std, head=head,
            )
            # A CNN's CAAP takes no window or head: _check_family_settings refused them where given.
            return registry.get_method(name, model, **{k: v for k, v in settings.items() if k in takes})
        kwargs = dict(self.method_kwargs.get(name, {}))
        check_method_kwargs(name, method_class, kwargs)
        for arg, value in (("mean", self.mean), ("std", self.std), ("head", head)):
            if arg in takes:
                kwargs.setdefault(arg, value)
        return registry.get_method(name, model, **kwargs)

    def tag(self, method: str, scalar: str) -> str:
        """The logged name of ``method``'s ``scalar``: ``<prefix>/<scalar>`` for the first method, else
        ``<prefix>/<method>/<scalar>``."""
        return f"{self.prefix}/{scalar}" if method == self.methods[0] else f"{self.prefix}/{method}/{scalar}"

    @property
    def logged_metrics(self) -> List[str]:
        """The scalars this callback logs with the methods and metrics in use (known after ``setup``)."""
        return [self.tag(name, s) for name in self.methods for m in self.metrics_of(name) for s in METRICS[m].scalars] + [
            f"{self.prefix}/seconds"
        ]

    def metrics_of(self, method: str) -> List[str]:
        """The active metrics computed for ``method``: the model tests run once, with the primary method."""
        if method == self.methods[0]:
            return list(self.active_metrics)
        return [m for m in self.active_metrics if m not in MODEL_TESTS]

    def _resolve_metrics(self, probe: ProbeBatch, swap_images: int) -> List[str]:
        available = [m for m, spec in METRICS.items() if spec.needs is None or getattr(probe, spec.needs) is not None]
        if swap_images < 2:  # a swap pairs each image with another
            unpaired = [m for m in available if METRICS[m].swap]
            if self.metrics is not None and set(unpaired) & set(self.metrics):
                raise ValueError(
                    f"CAAPCallback metrics {sorted(set(unpaired) & set(self.metrics))} swap a region between probe "
                    f"images, but the probe has {swap_images}; give the probe at least 2 images, or remove them."
                )
            available = [m for m in available if m not in unpaired]
        if self.metrics is None:
            return [m for m in available if METRICS[m].by_default]
        missing = [m for m in self.metrics if m not in available]
        if missing:
            needs = sorted({METRICS[m].needs for m in missing})
            raise ValueError(
                f"CAAPCallback metrics {missing} need {' and '.join(needs)}, but the probe batch has none; remove them "
                f"from `metrics` (this data allows {available}), or leave `metrics` unset."
            )
        return list(self.metrics)

    def _build_meters(self, model: nn.Module, size: tuple) -> Dict[str, Dict[str, Any]]:
        """One set of metric meters per method: the meters accumulate state between update and compute."""
        context = _MeterContext(model=model, step=self._step_pixels(size), curves=self.log_images, probe=self.probe)
        return {method: {name: METRICS[name].build(context) for name in self.metrics_of(method)} for method in self.methods}

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.run_check(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_check(trainer, pl_module)

    def state_dict(self) -> Dict[str, Any]:
        return {"history": [dict(row) for row in self.history], "calibrated_cutoff": self.calibrated_cutoff,
                "calibration": self.calibration}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]
        if self.layer_cutoff == "auto" and state_dict.get("calibrated_cutoff") is not None:
            self.calibration = state_dict.get("calibration")
            self.calibrated_cutoff = int(state_dict["calibrated_cutoff"])
            if "caap" in self._methods:  # restored after setup built CAAP
                self._methods["caap"].layer_cutoff = self.calibrated_cutoff

    # ------------------------------------------------------------------ layer_cutoff="auto"
    def calibrate_cutoff(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``layer_cutoff="auto"``, once: sweep the cutoffs on the probe batch and keep the best InsDel."""
        if self.layer_cutoff != "auto" or self.calibrated_cutoff is not None:
            return
        caap = self._methods["caap"]
        try:
            with self._forward_context(trainer):
                rows = self.guard(
                    trainer, "CAAPCallback: calibrating layer_cutoff", trainer.current_epoch, self._sweep_cutoffs, trainer, pl_module,
                    skipped=f"the cutoff stays at the middle one ({caap.layer_cutoff})",
                )
        except CheckFailed:
            rows = None
        # Every rank takes rank zero's pick, so that all of them attribute with the same cutoff.
        picked = caap.layer_cutoff if rows is None else max(rows, key=lambda r: r["insdel"])["layer_cutoff"]
        self.calibrated_cutoff = int(trainer.strategy.broadcast(picked, src=0))
        caap.layer_cutoff = self.calibrated_cutoff
        self.calibration = rows
        if rows is None:
            return
        lines = [f"k={r['layer_cutoff']}: InsDel {r['insdel']:.3f}" + (f", AUPR1 {r['aupr_fg']:.3f}" if "aupr_fg" in r else "")
                 for r in rows]
        rank_zero_info(
            f"CAAPCallback: layer_cutoff='auto' picked k={self.calibrated_cutoff} of 0..{caap.depth} on the "
            f"{len(self.probe)} probe images ({'; '.join(lines)})."
        )
        if trainer.is_global_zero:
            text = "\n".join(["| k | InsDel | AUPR1 |", "|---|---|---|"] + [
                f"| {r['layer_cutoff']}{' (picked)' if r['layer_cutoff'] == self.calibrated_cutoff else ''} | "
                f"{r['insdel']:.4f} | {r.get('aupr_fg', math.nan):.4f} |" for r in rows
            ])
            figures.log_text(trainer, f"{self.prefix}/layer_cutoff_sweep", text, log_step(trainer))

    def _sweep_cutoffs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> List[Dict[str, float]]:
        probe, device = self.probe, pl_module.device
        images = trainer.precision_plugin.convert_input(probe.images.to(device))
        target = probe.labels.to(device) if self.target == "label" else None
        masks = None if probe.masks is None else probe.masks.to(device)
        with eval_mode(self._model):
            return self._methods["caap"].calibrate(
                images, target=target, masks=masks, step=self._step_pixels(tuple(images.shape[-2:]))
            )

    def _step_pixels(self, size: tuple) -> Optional[int]:
        """Pixels per Insertion/Deletion step: ``insertion_deletion_steps`` steps per curve.

        ``None``: one patch of a ViT (``None`` here: the metric reads it), one image row of a CNN (RISE's choice
        for CNNs, as ``ConvCAAP.calibrate``'s).
        """
        steps = self.insertion_deletion_steps
        if steps is None:
            return None if self._family == "vit" else size[1]
        return math.ceil(size[0] * size[1] / steps)

    # ------------------------------------------------------------------ the check
    def run_check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Optional[ProbeResult]:
        """Attribute the probe batch, compute and log the metrics; ``None`` if it failed (``on_error="warn"``)."""
        epoch, step, stage = trainer.current_epoch, log_step(trainer), trainer_stage(trainer)
        try:
            # The model is looked up again: a module swapped during the fit (an averaged copy) is attributed fresh.
            self.guard(trainer, "CAAPCallback: finding the model to attribute", epoch, self.prepare, trainer, pl_module)
        except CheckFailed:
            return None
        self.calibrate_cutoff(trainer, pl_module)  # layer_cutoff="auto": the first check picks it
        start = time.perf_counter()
        primary = self.methods[0]
        shard: Optional[_ProbeShard] = None
        maps: Dict[str, torch.Tensor] = {}
        with self._forward_context(trainer):
            try:
                shard = self.guard(
                    trainer, "CAAPCallback: classifying the probe images", epoch, self._classify_shard, pl_module
                )
            except CheckFailed:
                pass
            for name in self.methods if shard is not None else []:
                try:
                    maps[name] = self.guard(
                        trainer, f"CAAPCallback: computing the {display_name(name)} maps and metric updates", epoch,
                        self._attribute_shard, pl_module, name, shard,
                        skipped="this check is skipped" if name == primary else "its metrics are left out of this check",
                    )
                except CheckFailed:
                    if name == primary:
                        break
        done = self._agree_on_failures(trainer, pl_module, maps, epoch)
        if primary not in done:
            self._reset_meters()
            return None
        try:
            result = self.guard(
                trainer, "CAAPCallback: computing the metrics", epoch, self._finish, trainer, shard, done, epoch, step, stage
            )
        except CheckFailed:
            return None
        finally:
            self._reset_meters()
        if self.log_images and trainer.is_global_zero:
            try:
                self.guard(trainer, "CAAPCallback: logging the heatmaps", epoch, self._log_images, trainer, result)
            except CheckFailed:
                pass
        result.metrics[f"{self.prefix}/seconds"] = time.perf_counter() - start
        for name, value in result.metrics.items():
            # Values are synced already; "max" makes the seconds the longest rank's time.
            pl_module.log(name, value, sync_dist=True, reduce_fx="max")
        self.last = result
        self.history.append({"epoch": epoch, "step": step, "stage": stage, **result.metrics})
        return result

    def _agree_on_failures(
        self, trainer: L.Trainer, pl_module: L.LightningModule, maps: Dict[str, torch.Tensor], epoch: int
    ) -> Dict[str, torch.Tensor]:
        """The maps of the methods that succeeded on every rank; every rank learns which failed where.

        So no rank waits in a collective the others skip, and a rank whose own step worked says
        which other rank made it skip (that rank's warning gives the cause).
        """
        failed = torch.tensor([float(name not in maps) for name in self.methods], device=pl_module.device)
        if trainer.world_size == 1:
            return {name: maps[name] for name in self.methods if name in maps}
        per_rank = trainer.strategy.all_gather(failed).reshape(trainer.world_size, len(self.methods)).cpu()
        done = {}
        for j, name in enumerate(self.methods):
            ranks = [r for r in range(trainer.world_size) if per_rank[r, j] > 0]
            if not ranks:
                done[name] = maps[name]
            elif name in maps and trainer.is_global_zero:
                skipped = "this check is skipped" if j == 0 else "its metrics are left out of this check"
                rank_zero_warn(
                    f"CAAPCallback: {display_name(name)} failed at epoch {epoch} on rank(s) {ranks} (their warnings say "
                    f"why); {skipped} on every rank."
                )
        return done

    def guard(
        self, trainer: L.Trainer, what: str, epoch: int, fn: Callable, *args: Any, skipped: str = "this check is skipped"
    ) -> Any:
        """``fn(*args)`` under the callback's ``on_error`` (see :func:`guarded`)."""
        return guarded(trainer, self.on_error, what, epoch, fn, *args, skipped=skipped)

    def _forward_context(self, trainer: L.Trainer):
        """The autocast of the Trainer's validation steps (``precision="trainer"``), else none.

        Lightning enters it around each ``validation_step`` only, not around epoch-end hooks,
        so the check enters it itself.
        """
        if self.precision == "32":
            return contextlib.nullcontext()
        return trainer.precision_plugin.val_step_context()

    def _reset_meters(self) -> None:
        for meters in self._meters.values():
            for meter in meters.values():
                meter.reset()

    def _classify_shard(self, pl_module: L.LightningModule) -> _ProbeShard:
        """This rank's share of the probe (and of the swap probe) on the device, the classes its maps explain and
        their probabilities.

        The probe is the start of the swap probe, so this rank's share of it is the start of its share of the swap
        probe (``probe[rank::world]``): one forward pass classifies both.
        """
        trainer = pl_module.trainer
        device = pl_module.device
        swap_probe = self.swap_probe
        larger = self.probe if swap_probe is None else swap_probe

        def shard_of(rows: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
            # As Lightning does to batches: e.g. bf16 under "bf16-true", whose weights are bf16.
            images = trainer.precision_plugin.convert_input(larger.images[rows].to(device))
            masks = {k: getattr(larger, k)[rows].to(device) for k in ("masks", "cue_masks") if getattr(larger, k) is not None}
            return images, masks

        def share(n: int) -> torch.Tensor:
            return torch.arange(n)[trainer.global_rank :: trainer.world_size]

        all_images, all_masks = shard_of(share(len(larger)))
        with torch.no_grad(), eval_mode(self._classifier):
            logits = self._classifier(all_images)
        check_class_scores(logits, "the model")  # a NaN would argmax to class 0 and read as a class
        probs = logits.float().softmax(-1)
        all_top1 = probs.argmax(-1)
        index = share(len(self.probe))
        mine = len(index)
        images, masks = all_images[:mine], {k: m[:mine] for k, m in all_masks.items()}
        targets = self.probe.labels[index].to(device) if self.target == "label" else all_top1[:mine]
        scores = probs[:mine].gather(1, targets[:, None])[:, 0]
        if swap_probe is None:
            return _ProbeShard(images, masks, targets, scores, None, {}, None, None, {}, None)
        index = share(len(swap_probe))
        mine = len(index)
        swap_images, swap_masks, swap_top1 = all_images[:mine], {k: m[:mine] for k, m in all_masks.items()}, all_top1[:mine]
        donors = swap_donors(len(swap_probe))[index]
        held = torch.full((len(swap_probe),), -1, dtype=torch.long)
        held[index] = torch.arange(mine)
        local = held[donors].to(device)
        if bool((local >= 0).all()):
            # This rank holds every donor (one process does): its own images and classes, nothing recomputed.
            donor_images, donor_top1 = swap_images[local], swap_top1[local]
            donor_masks = {k: m[local] for k, m in swap_masks.items()}
        else:
            donor_images, donor_masks = shard_of(donors)
            with torch.no_grad(), eval_mode(self._classifier):
                donor_top1 = self._classifier(donor_images).float().argmax(-1)
        return _ProbeShard(images, masks, targets, scores, swap_images, swap_masks, swap_top1, donor_images, donor_masks,
                           donor_top1)

    def _attribute_shard(self, pl_module: L.LightningModule, name: str, shard: _ProbeShard) -> torch.Tensor:
        """``name``'s maps of this rank's share of the probe; updates that method's metric states."""
        method = self._methods[name]
        # Gradient methods turn autograd back on themselves, inside Lightning's inference mode too.
        extra = {"relative": True} if name == "caap" else {}
        maps = method.attribute(shard.images, target=shard.targets, **extra).float()
        with torch.no_grad():
            pixel_maps = upsample_maps(maps, tuple(shard.images.shape[-2:]))
            for metric, meter in self._meters[name].items():
                meter.to(pl_module.device)
                METRICS[metric].update(meter, pixel_maps, shard)
        return maps

    def _finish(
        self, trainer: L.Trainer, shard: _ProbeShard, maps: Dict[str, torch.Tensor], epoch: int, step: int, stage: str
    ) -> ProbeResult:
        """Synced metric values of each method in ``maps`` and the shards gathered into one result for the whole probe."""
        metrics: Dict[str, float] = {}
        curves: Dict[str, Dict[str, torch.Tensor]] = {}
        n = len(self.probe)
        tested: Dict[str, torch.Tensor] = {}
        for name in maps:
            for metric, meter in self._meters[name].items():
                out = meter.compute_details()
                for scalar, key in METRICS[metric].scalars.items():
                    value = float(out[key])
                    # A metric with no scorable image (e.g. every mask empty) gives NaN: nothing to log.
                    if math.isfinite(value):
                        metrics[self.tag(name, scalar)] = value
                    per_image_key = METRICS[metric].model_test_per_image
                    if per_image_key is not None:
                        # A swap ratio's per-image values are those of the maps' images (the first of its probe).
                        tested_n = len(probe_tested_by(METRICS[metric], self.probe, self.swap_probe))
                        values = in_probe_order(out[per_image_key].float().cpu(), tested_n, trainer.world_size)
                        tested[self.tag(name, scalar)] = values[:n]
                if metric == "insertion_deletion":
                    curves[name] = {k: out[f"{k}_curve"].cpu() for k in ("insertion", "deletion") if f"{k}_curve" in out}
        method_maps = {name: _gather_shards(trainer, m, n) for name, m in maps.items()}
        return ProbeResult(
            epoch=epoch, step=step, stage=stage, metrics=metrics,
            targets=_gather_shards(trainer, shard.targets, n).long(), scores=_gather_shards(trainer, shard.scores, n),
            method_maps=method_maps, probe=self.probe, swap_probe=self.swap_probe, mean=tuple(self.mean), std=tuple(self.std),
            class_names=list(self.class_names), method_curves=curves, per_image_values=functools.partial(
                per_image_values, method_maps, self.probe, list(self.active_metrics), self.tag
            ),
            model_test_per_image=tested,
        )

    # ------------------------------------------------------------------ images
    def _log_images(self, trainer: L.Trainer, result: ProbeResult) -> None:
        rows = list(range(min(self.max_images_logged, len(self.probe))))
        if rows:
            figures.log_image(trainer, f"{self.prefix}/heatmaps", result.draw_rows(rows), result.step)
        if result.curves:
            auc = {k: result.metrics.get(f"{self.prefix}/{k}", math.nan) for k in ("insertion", "deletion")}
            title = f"epoch {result.epoch}: insertion {auc['insertion']:.3f}, deletion {auc['deletion']:.3f}"
            if len(result.method_curves) > 1:
                title = f"{display_name(self.methods[0])} {title}"
            curves = {
                label if name == self.methods[0] else f"{name} {label}": curve
                for name, pair in result.method_curves.items()
                for label, curve in pair.items()
            }
            figures.log_image(trainer, f"{self.prefix}/insertion_deletion", figures.curves_image(curves, title), result.step)


def guarded(
    trainer: L.Trainer, on_error: str, what: str, epoch: int, fn: Callable, *args: Any,
    skipped: str = "this check is skipped",
) -> Any:
    """``fn(*args)``; with ``on_error="warn"`` a failure is reported and raised as :class:`CheckFailed`.

    The warning is given on the rank where the failure happened (``rank_zero_warn`` would hide
    a failure on any other rank).
    """
    if on_error == "raise":
        return fn(*args)
    try:
        return fn(*args)
    except Exception as exc:  # a monitor must not end the training it watches
        where = f" on rank {trainer.global_rank}" if trainer.world_size > 1 else ""
        warnings.warn(
            f"{what} failed at epoch {epoch}{where} ({type(exc).__name__}: {exc}); {skipped} and training "
            "continues. Set on_error='raise' to stop on it instead.",
            stacklevel=3,
        )
        raise CheckFailed from exc


def _class_names(datamodule: Any) -> List[str]:
    try:
        return [str(name) for name in datamodule.class_names]
    except (AttributeError, NotImplementedError, TypeError):
        return []


def _own_probe(probe: Any, n: int, keys: ProbeKeys) -> ProbeBatch:
    """The user's ``probe`` argument as a checked ProbeBatch of at most ``n`` images, at construction."""
    batch = probe_from_dataset(probe, n, keys) if isinstance(probe, Dataset) else to_probe_batch(probe, keys)
    return check_probe(first_samples(batch, n))


def _gather_shards(trainer: L.Trainer, shard: torch.Tensor, n: int) -> torch.Tensor:
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


def check_methods(methods: List[str], method_kwargs: Dict[str, Dict[str, Any]]) -> None:
    """``ValueError`` for method names the registry lacks or repeats, misplaced or unknown ``method_kwargs``,
    and ``occlusion`` without captum: at construction, not mid-training."""
    available = registry.available_methods()
    unknown = [m for m in methods if m not in available]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods {methods} must be one or more distinct names from {available}; unknown: {unknown}")
    misplaced = [name for name in method_kwargs if name not in methods or name == "caap"]
    if misplaced:
        raise ValueError(
            f"method_kwargs has {misplaced}, but its keys must be methods in `methods` ({methods}) other than 'caap': "
            "CAAP takes the callback's own layer_cutoff, selection, blank, construction and window"
        )
    for name, kwargs in method_kwargs.items():
        check_method_kwargs(name, registry.METHODS[name], kwargs)
    if "occlusion" in methods and importlib.util.find_spec("captum") is None:
        raise ValueError("the occlusion method needs captum, which is not installed: pip install 'caap-lightning[baselines]'")


def check_cutoff_form(layer_cutoff: Any) -> None:
    """``ValueError`` for a ``layer_cutoff`` of no valid form; a stage name is checked in setup, against the CNN's."""
    if layer_cutoff is None or isinstance(layer_cutoff, str) and layer_cutoff:
        return
    if isinstance(layer_cutoff, int) and not isinstance(layer_cutoff, bool) and layer_cutoff >= 0:
        return
    raise ValueError(
        f"layer_cutoff must be an int >= 0, None (the middle), a CNN's stage name or 'auto' (calibrated), "
        f"got {layer_cutoff!r}"
    )


def check_method_kwargs(name: str, method_class: type, kwargs: Dict[str, Any]) -> None:
    """``ValueError`` for a ``method_kwargs[name]`` argument that ``method_class`` does not take."""
    takes = [p for p in inspect.signature(method_class).parameters if p != "model"]
    wrong = [k for k in kwargs if k not in takes]
    if wrong:
        raise ValueError(f"method_kwargs[{name!r}] has {wrong}, which {method_class.__name__} does not take; it takes {takes}")


def check_model_images(family: str, model: nn.Module, images: torch.Tensor) -> None:
    """The checks that the attribution methods of ``model``'s family make of their images, in setup."""
    if family == "vit":
        vit.check_images(model, images)
    else:
        cnn.check_images(cnn.conv_stages(model), images)


def display_name(method: str) -> str:
    """How messages name a method: ``CAAP``, else its registry name."""
    return "CAAP" if method == "caap" else method


def trainer_stage(trainer: L.Trainer) -> str:
    """``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``: the Trainer function running now."""
    return trainer.state.fn.value if trainer.state.fn is not None else "fit"


def log_step(trainer: L.Trainer) -> int:
    """The step Lightning gives the scalars logged now, so that images line up with them in TensorBoard."""
    # LearningRateMonitor reads the same counter.
    return trainer.fit_loop.epoch_loop._batches_that_stepped
