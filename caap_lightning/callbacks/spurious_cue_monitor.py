"""SpuriousCueMonitor: an alarm when the model comes to rely on a spurious cue, the background or a fixed position."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from caap_lightning.callbacks import figures
from caap_lightning.callbacks.caap_callback import (
    COLUMN_TITLES,
    METRICS,
    ON_ERROR,
    CAAPCallback,
    CheckFailed,
    MetricSpec,
    ProbeResult,
    guarded,
    probe_tested_by,
)
from caap_lightning.callbacks.strategies import (
    ALL,
    MIN_GROUP_IMAGES,
    StrategyGroup,
    discover_strategies,
    evidence_floor,
    log_strategies,
    place_of,
)
from caap_lightning.metrics import border_masks, fixed_position_evidence
from caap_lightning.metrics._checks import check_int, check_masks
from caap_lightning.metrics.functional import HOT_REGION_SHARE, scorable_regions
from caap_lightning.metrics.region_insertion_ratio import BORDER_SHARE, suspect_views
from caap_lightning.metrics.region_swap_ratio import swap_donors, swapped_images
from caap_lightning.utils import unnormalize, upsample_maps

ALARM_ON = ("high", "low")
STRATEGIES = (True, False, "auto")
# The default scores, in order of preference. The model tests ask the model itself, not a map, so a cue spread
# over many patches (a background colour, a frame) counts too. The swap ratios come first: they ask which part
# the model follows where the region and the rest disagree, which is what a shortcut changes, while a part that
# restores the class alone (the insertion ratios) does so for a model that knows both the object and the cue;
# on the benchmark the insertion ratios alarmed later (benchmarks/results/spurious.md). Object masks come first:
# the background holds every cue off the object; then cue masks, then the border, which needs no masks.
# The map-based ratios are the fallback where a callback's `metrics` leave the model tests out.
DEFAULT_SCORES = (
    "background_swap_ratio", "cue_swap_ratio", "border_swap_ratio",
    "background_insertion_ratio", "cue_insertion_ratio", "border_insertion_ratio",
    "cue_density_ratio", "background_density_ratio", "fixed_position_ratio",
)
# One threshold for the default scores: each is 1 when the suspect region and the rest are equal (in the class
# the model follows, the class they restore alone, or evidence density), whatever the region's size, so "a tenth
# more" means the same for a cue, a background and a border. Chosen by the benchmark's sweep on its tuning runs,
# the swap ratios on CAAPCallback's 64-image swap probe, where it alone met every target (higher thresholds
# left a run more than an epoch late), and confirmed on the held-out cue kinds and dataset; the controls' swap
# ratios stayed at or below 1.06 (benchmarks/results/spurious.md). On 16 images they are too noisy for any
# threshold (swap-probe-size.md). The fallback scores (insertion and density ratios) alarm on controls at it:
# the same sweeps chose 1.5 for the insertion ratios and 2 (patience 2) for CAAP's map-based scores.
DEFAULT_THRESHOLD = 1.1
# One check past the threshold alarms: the scores mean the same from the first check on, and on the benchmark
# waiting for a second check delayed the alarms (far more of them over an epoch after the accuracy gap) and
# prevented no false alarm (benchmarks/results/spurious.md).
DEFAULT_PATIENCE = 1
# Below this many probe images, strategy discovery warns that its clusters are anecdotes.
STRATEGY_PROBE_IMAGES = 64
_RESTORES = "the class probability that {} alone restores over what {} alone restores; 1 when they restore it equally"
_FOLLOWS = ("on probe images given {} of another probe image, the probability of that image's class over the "
            "probability of their own; 1 when the model follows both parts equally")
_BORDER = f"the image's border (its outer {BORDER_SHARE:.1%} on each side)"
# What each score measures, for the alarm's text.
SCORE_MEANINGS = {
    "cue_insertion_ratio": _RESTORES.format("the cue", "the rest of the image"),
    "background_insertion_ratio": _RESTORES.format("the background (everything off the object, any cue there included)",
                                                   "the object"),
    "border_insertion_ratio": _RESTORES.format(_BORDER, "the inside"),
    "cue_swap_ratio": _FOLLOWS.format("the cue"),
    "background_swap_ratio": _FOLLOWS.format("the background (everything off the object, any cue there included)"),
    "border_swap_ratio": _FOLLOWS.format(_BORDER),
    "cue_density_ratio": "the evidence density on the cue over its density off it; 1 for a uniform map",
    "background_density_ratio": "the evidence density off the object over its density on it; 1 for a uniform map",
    "fixed_position_ratio": (
        f"the evidence density in each image's hot region (the top {HOT_REGION_SHARE:.0%} of the pixels of the other "
        "images' mean evidence) over its density elsewhere; 1 for a uniform map"
    ),
}
# The region each score is about, for the alarm's text.
SCORE_REGIONS = (("fixed_position", "fixed position"), ("border", "border"), ("cue", "cue"), ("background", "background"))


def _check_test_regions(maps: torch.Tensor, masks: Optional[torch.Tensor]) -> None:
    """A model test's regions must have an inside and an outside, as a density ratio's must."""
    scorable_regions(border_masks(len(maps), tuple(maps.shape[-2:])) if masks is None else check_masks(masks))


class SpuriousCueMonitor(Callback):
    """Watches a metric of :class:`CAAPCallback`, in the manner of ``EarlyStopping``, and raises an alarm.

    Each check of a fit (each new :class:`ProbeResult` the ``CAAPCallback`` publishes) logs
    ``<prefix>/score``. As in ``EarlyStopping``, a check that improves on the best value so far
    by more than ``min_delta`` becomes the best (with ``alarm_on="high"`` a higher score means
    more reliance, so the best is the lowest); a check is *bad* when the score is past
    ``threshold`` and is no such improvement. The first check sets the best value, and is bad when
    it is past the threshold: the default scores mean the same at every check (1 = both parts restore the class equally),
    so a cue learnt before the first check alarms as early as patience allows. A score that rises
    past the threshold alarms; one that keeps falling does not, nor does anything below the
    threshold. After ``patience`` bad checks in a row the alarm goes off: ``<prefix>/alarm`` = 1,
    a warning naming the epoch and the score that fired, and a text entry (``<prefix>/alarm``) with
    the probe images that rely most on the cue, the background or the fixed position and their
    heatmaps (``<prefix>/alarm_images``; for the fixed-position score with each image's hot region);
    with ``stop_training`` the fit stops. ``<prefix>/alarm`` stays 1 while the bad checks go on and
    is 0 at every other check. Checks of ``validate``/``test`` runs do not count: they see the same
    weights as the fit's last check. The best value, the count and the alarms survive a resume from
    checkpoint; several monitors (with different ``prefix``) run in one Trainer.

    With ``strategies`` on, every check of a fit or a validation also clusters the probe's maps, per
    explained class and overall, in the manner of SpRAy (see
    :mod:`~caap_lightning.callbacks.strategies`), and logs each cluster's mean map, size and most
    typical images (``<prefix>/strategies``, ``<prefix>/strategies/<group>``,
    ``<prefix>/strategies/<group>/clusters``): it shows *how* a class is recognised, e.g. in two
    ways, one of them a corner. The last result is :attr:`last_strategies`.

    Args:
        monitor: a metric logged by a ``CAAPCallback``, e.g. ``"caap/cue_density_ratio"`` (the first
            of its ``methods``) or ``"caap/gradcam/cue_density_ratio"``. ``None`` picks
            ``caap/background_swap_ratio`` when the probe has object masks (with or without cue
            masks), else ``caap/cue_swap_ratio`` with cue masks, else ``caap/border_swap_ratio`` (no
            masks): each, on probe images given another probe image's region, the probability of
            that image's class over that of their own, 1 when the model follows both parts equally,
            at any region size; where the callback logs none, the insertion ratios, then the density
            ratios (``DEFAULT_SCORES``; ``docs/metrics.md``; how they were chosen:
            ``benchmarks/results/spurious.md``).
        threshold: the score must be past this to count (above for ``alarm_on="high"``); ``None``
            counts every check that does not improve (and the first check only sets the best).
            The default, :data:`DEFAULT_THRESHOLD`, serves the three default scores on
            ``CAAPCallback``'s 64-image swap probe; a fallback score wants its own (``docs/metrics.md``).
        min_delta: how much better than the best value so far a score must be to count as an
            improvement (which resets the count).
        patience: bad checks in a row that raise the alarm.
        alarm_on: ``"high"`` if a higher score means more reliance on the cue (mass on the cue or
            the background), ``"low"`` if a lower one does (e.g. ``caap/pointing_game``).
        stop_training: stop the fit when the alarm goes off.
        num_images: probe images named (and drawn) in the alarm's text entry.
        strategies: strategy discovery: ``"auto"`` when the probe has neither object nor cue masks,
            ``True`` always, ``False`` never. It wants a probe of 64 to 256 images
            (``CAAPCallback(num_images=...)``); a class with fewer than 8 is clustered only among all.
        strategy_max_clusters: the most strategies a group may split into (the eigengap picks 1 to this).
        strategy_examples: images drawn per strategy.
        on_error: ``"warn"`` reports a failing alarm report or strategy step and lets training go on;
            ``"raise"`` stops.
        prefix: the first part of the names logged; give each monitor of a Trainer its own.
    """

    def __init__(
        self,
        monitor: Optional[str] = None,
        threshold: Optional[float] = DEFAULT_THRESHOLD,
        min_delta: float = 0.1,
        patience: int = DEFAULT_PATIENCE,
        alarm_on: str = "high",
        stop_training: bool = False,
        num_images: int = 4,
        strategies: Union[bool, Literal["auto"]] = "auto",
        strategy_max_clusters: int = 6,
        strategy_examples: int = 3,
        on_error: str = "warn",
        prefix: str = "spurious",
    ) -> None:
        super().__init__()
        for name, value, choices in (("alarm_on", alarm_on, ALARM_ON), ("on_error", on_error, ON_ERROR)):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {choices}")
        if not (isinstance(strategies, bool) or strategies == "auto"):
            raise ValueError(f"strategies={strategies!r} is not one of {STRATEGIES}")
        if patience < 1 or min_delta < 0 or num_images < 0:
            raise ValueError(f"need patience >= 1, min_delta >= 0 and num_images >= 0; got {patience}, {min_delta}, {num_images}")
        check_int("strategy_max_clusters", strategy_max_clusters, 2, "the most strategies a group splits into")
        check_int("strategy_examples", strategy_examples, 1, "images drawn per strategy")
        if monitor is not None and "/" not in monitor:
            raise ValueError(
                f"monitor={monitor!r} must be a metric logged by CAAPCallback, e.g. 'caap/cue_density_ratio'"
            )
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty name without '/', got {prefix!r}")
        self.monitor = monitor
        self.threshold = threshold
        self.min_delta = min_delta
        self.patience = patience
        self.alarm_on = alarm_on
        self.stop_training = stop_training
        self.num_images = num_images
        self._warned_threshold_for: Optional[str] = None
        self.strategies = strategies
        self.strategy_max_clusters = strategy_max_clusters
        self.strategy_examples = strategy_examples
        self.on_error = on_error
        self.prefix = prefix

        self.monitor_key: Optional[str] = monitor
        self.best = math.inf if alarm_on == "high" else -math.inf
        self.wait = 0
        self.alarms: List[Dict[str, float]] = []  # one row per alarm: epoch, step, score
        self.history: List[Dict[str, float]] = []  # one row per counted check: epoch, step, score, alarm
        self.discovers_strategies = False  # `strategies` resolved against the probe, in setup
        self.last_strategies: Dict[str, StrategyGroup] = {}  # group -> its strategies, at the last check
        self._source: Optional[CAAPCallback] = None
        self._method: Optional[str] = None  # the attribution method whose scalar is watched
        self._spec: Optional[MetricSpec] = None  # the watched scalar's metric, where it is one of METRICS
        self._seen: Optional[ProbeResult] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        siblings = [cb for cb in trainer.callbacks if isinstance(cb, SpuriousCueMonitor) and cb.prefix == self.prefix]
        if len(siblings) > 1:
            raise ValueError(
                f"the Trainer has {len(siblings)} SpuriousCueMonitors with prefix={self.prefix!r}; give each its own "
                "prefix (e.g. SpuriousCueMonitor(monitor='caap/background_density_ratio', prefix='spurious_bg'))"
            )
        sources = [cb for cb in trainer.callbacks if isinstance(cb, CAAPCallback)]
        if not sources:
            raise ValueError("SpuriousCueMonitor watches the metrics of a CAAPCallback, but the trainer has none; add one")
        for source in sources:  # their setup may come after this one: it is idempotent
            source.setup(trainer, pl_module, stage)
        sources = [source for source in sources if source.active_metrics]
        if not sources:
            return  # a fit without validation: the CAAPCallback has said that it never checks
        logged = {name: source for source in sources for name in source.logged_metrics}
        if self.monitor is None:
            self.monitor_key = self._default_key(sources, sorted(logged))
        elif self.monitor not in logged:
            raise ValueError(f"monitor={self.monitor!r} is not among the metrics CAAPCallback logs here: {sorted(logged)}")
        self._source = logged[self.monitor_key]
        self._method, self._spec = self._watched(self._source, self.monitor_key)
        self._check_scorable(self._source)
        self._resolve_strategies(self._source)
        self._warn_if_default_threshold_unsuited()

    def _warn_if_default_threshold_unsuited(self) -> None:
        """Once: a score other than a swap ratio at the default threshold, which was chosen for the swap ratios."""
        if self._spec is None or self._spec.swap or self.threshold != DEFAULT_THRESHOLD:
            return
        if self._warned_threshold_for == self.monitor_key:
            return
        self._warned_threshold_for = self.monitor_key
        rank_zero_warn(
            f"SpuriousCueMonitor: watching {self.monitor_key} at the default threshold {DEFAULT_THRESHOLD}, which "
            "was chosen for the swap ratios; on the benchmark this kind of score alarmed on controls at it "
            "(benchmarks/results/spurious.md chose 1.5 for the insertion ratios, 2 with patience=2 for the density "
            "ratios). Set `threshold` (and `patience`) for it, or let CAAPCallback log a swap ratio."
        )

    @staticmethod
    def _default_key(sources: List[CAAPCallback], logged: List[str]) -> str:
        for score in DEFAULT_SCORES:
            keys = [source.tag(source.methods[0], score) for source in sources if score in source.active_metrics]
            if len(keys) > 1:
                raise ValueError(f"SpuriousCueMonitor's default could watch any of {keys}; set `monitor` to one of them")
            if keys:
                return keys[0]
        raise ValueError(
            "SpuriousCueMonitor's default watches caap/background_swap_ratio (with object masks), "
            "caap/cue_swap_ratio (with cue masks) or caap/border_swap_ratio (without masks), or else an insertion "
            f"ratio or a density ratio, but the CAAPCallbacks log none of them (they log {logged}): add "
            "'border_swap_ratio' (or a swap ratio the probe's masks allow) to CAAPCallback's `metrics`, or set "
            "`monitor` to one of those it logs."
        )

    @staticmethod
    def _watched(source: CAAPCallback, key: str) -> Tuple[str, Optional[MetricSpec]]:
        """The method whose scalar ``key`` is, and that scalar's metric (``None`` for one outside METRICS)."""
        for method in source.methods:
            for metric in source.active_metrics:
                if any(source.tag(method, scalar) == key for scalar in METRICS[metric].scalars):
                    return method, METRICS[metric]
        return source.methods[0], None

    def _check_scorable(self, source: CAAPCallback) -> None:
        """Fail in setup, not at every check, on a probe the watched metric refuses (blank masks for a density
        ratio, a single image for the fixed-position ratio): its per-image values of blank maps say so."""
        spec = self._spec
        if spec is None:
            return
        probe = probe_tested_by(spec, source.probe, source.swap_probe)
        masks = None if spec.needs is None else getattr(probe, spec.needs)
        check = spec.per_image if spec.model_test_per_image is None else _check_test_regions
        if check is None:
            return
        try:
            check(torch.zeros(len(probe), *probe.images.shape[-2:]), masks)
        except ValueError as exc:
            raise ValueError(
                f"SpuriousCueMonitor cannot watch {self.monitor_key} on this probe of {len(probe)} image(s): {exc}"
            ) from exc

    def _resolve_strategies(self, source: CAAPCallback) -> None:
        probe = source.probe
        if self.strategies == "auto":
            self.discovers_strategies = probe.masks is None and probe.cue_masks is None
        else:
            self.discovers_strategies = bool(self.strategies)
        if self.discovers_strategies and len(probe) < STRATEGY_PROBE_IMAGES:
            rank_zero_warn(
                f"SpuriousCueMonitor: strategy discovery clusters the {len(probe)} probe images; clusters of so few "
                f"are anecdotes, and a class with fewer than {MIN_GROUP_IMAGES} is not clustered on its "
                f"own. Give CAAPCallback num_images={STRATEGY_PROBE_IMAGES} to 256, or strategies=False."
            )

    # ------------------------------------------------------------------ checks
    def update(self, score: float) -> bool:
        """Take one score; ``True`` when it raises the alarm (the count reaches ``patience``).

        The first score sets the best value; it is bad when it is past the threshold (with no
        threshold it only sets the best).
        """
        sign = 1.0 if self.alarm_on == "high" else -1.0
        first = math.isinf(self.best)
        improved = not first and sign * (self.best - score) > self.min_delta
        if self.threshold is None:
            past = not first
        else:
            past = sign * (score - self.threshold) > 0
        if first or improved:
            self.best = score
        self.wait = self.wait + 1 if past and not improved else 0
        return self.wait == self.patience

    @property
    def alarmed(self) -> bool:
        """Whether the bad checks in a row have reached ``patience`` (the alarm is on)."""
        return self.wait >= self.patience

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._source is None:
            return
        result = self._source.last
        if result is None or result is self._seen:
            return  # no new check since the last one
        self._seen = result
        if self.discovers_strategies:
            try:
                guarded(trainer, self.on_error, "SpuriousCueMonitor: discovering strategies", result.epoch,
                        self._discover, trainer, result, skipped="the strategies are left out of this check")
            except CheckFailed:
                self.last_strategies = {}
        if result.stage == "fit":
            self._count(trainer, result)

    def _count(self, trainer: L.Trainer, result: ProbeResult) -> None:
        score = result.metrics.get(self.monitor_key)
        if score is None or not math.isfinite(score):
            swap = self._spec is not None and self._spec.swap
            why = "the model gave every probe image the class of its partner" if swap else "no probe image could be scored for it"
            rank_zero_warn(
                f"SpuriousCueMonitor: the check at epoch {result.epoch} is not counted: {self.monitor_key} was not "
                f"logged there ({why}); the count stays at "
                f"{self.wait} of {self.patience}."
            )
            return
        raised = self.update(score)
        self.history.append({"epoch": result.epoch, "step": result.step, "score": score, "alarm": float(self.alarmed)})
        figures.log_scalars(
            trainer, {f"{self.prefix}/score": score, f"{self.prefix}/alarm": float(self.alarmed)}, result.step
        )
        if raised:
            self.alarms.append({"epoch": result.epoch, "step": result.step, "score": score})
            try:
                guarded(trainer, self.on_error, "SpuriousCueMonitor: reporting the alarm", result.epoch, self._report,
                        trainer, result, score, skipped="the report is skipped")
            except CheckFailed:
                pass
        if self.stop_training and self.alarmed:
            trainer.should_stop = trainer.strategy.reduce_boolean_decision(True, all=False)

    def _discover(self, trainer: L.Trainer, result: ProbeResult) -> None:
        self.last_strategies = {}  # a failure below leaves none rather than the last check's
        maps = result.method_maps[self._method]
        self.last_strategies = discover_strategies(
            maps, result.targets, result.class_name, max_clusters=self.strategy_max_clusters,
            min_evidence=evidence_floor(self._method, self._source.score),
        )
        if trainer.is_global_zero:
            log_strategies(
                trainer, self.prefix, result, self.last_strategies, self._method, self._map_title,
                self.strategy_examples,
            )

    @property
    def _map_title(self) -> str:
        method = self._method or "caap"
        return COLUMN_TITLES.get(method, method)

    # ------------------------------------------------------------------ the alarm's report
    def _report(self, trainer: L.Trainer, result: ProbeResult, score: float) -> None:
        threshold = "" if self.threshold is None else f", past the threshold {self.threshold}"
        where = figures.describe_destinations(trainer)
        see = f" See '{self.monitor_key}' and the '{self.prefix}/alarm' text in {where}." if where else ""
        meaning = self._meaning
        rank_zero_warn(
            f"SpuriousCueMonitor: alarm at epoch {result.epoch} (step {result.step}): {self.monitor_key} = {score:.3f} "
            f"has not improved on its best {self.best:.3f} by more than {self.min_delta} for {self.patience} checks in a row"
            f"{threshold}; the model relies on the {self.region}{f' ({meaning})' if meaning else ''}.{see}"
        )
        if not trainer.is_global_zero or self.num_images == 0:
            return
        per_image = self.per_image_scores(result)
        rows = self.top_images(per_image, len(result.targets))
        probe = result.probe
        lines = [
            f"**Alarm at epoch {result.epoch}, step {result.step}**: `{self.monitor_key}` = {score:.3f} "
            f"(best {self.best:.3f}; {self.patience} checks in a row without improving on it by more than "
            f"{self.min_delta}{threshold}).",
        ]
        if meaning:
            lines += ["", f"The score is {meaning}."]
        found = self._fixed_position(result) if self._is_fixed_position else None
        if found is not None:
            lines += ["", *self._fixed_position_lines(result, found)]
        lines += [
            "",
            f"Probe images that rely most on the {self.region}:",
            "",
            f"| probe image | label | explained class | p | {self.region} score |",
            "|---|---|---|---|---|",
        ]
        for i in rows:
            value = "n/a" if per_image is None else f"{float(per_image[i]):.3f}"
            cue = "" if probe.cue_labels is None else f" (cue: {result.class_name(int(probe.cue_labels[i]))})"
            lines.append(
                f"| #{i} | {result.class_name(int(probe.labels[i]))}{cue} | {result.class_name(int(result.targets[i]))} "
                f"| {float(result.scores[i]):.2f} | {value} |"
            )
        extra = " with each image's hot region" if found is not None else ""
        if self._spec is not None and self._spec.model_test_per_image is not None:
            shown = (f"the image with another probe image's {self.region}" if self._spec.swap
                     else f"the {self.region} alone and the image without it")
            extra = f", and what the test showed the model: {shown}"
        lines += ["", f"Their heatmaps{extra}: image `{self.prefix}/alarm_images` at this step."]
        figures.log_text(trainer, f"{self.prefix}/alarm", "\n".join(lines), result.step)
        if rows:
            image = result.draw_rows(rows, self._test_views(result, rows)) if found is None else self._draw_hot_regions(
                result, rows, found)
            figures.log_image(trainer, f"{self.prefix}/alarm_images", image, result.step)

    def _test_views(self, result: ProbeResult, rows: List[int]) -> Optional[Dict[str, torch.Tensor]]:
        """For a model test, the views it showed the model of ``rows`` (normalised images), by column title."""
        spec = self._spec
        if spec is None or spec.model_test_per_image is None:
            return None
        # A swap paired the images across the swap probe, whose first images are the maps' probe.
        probe = probe_tested_by(spec, result.probe, result.swap_probe)
        index = torch.as_tensor(rows, dtype=torch.long)
        masks = {k: getattr(probe, k)[index] for k in ("masks", "cue_masks") if getattr(probe, k) is not None}
        regions = spec.test_regions(probe.images[index], masks)
        if spec.swap:
            donors = swap_donors(len(probe))[index]
            donor_masks = {k: getattr(probe, k)[donors] for k in masks}
            donor_regions = spec.test_regions(probe.images[donors], donor_masks)
            swapped = swapped_images(probe.images[index], regions, probe.images[donors], donor_regions, spec.region)
            return {f"swapped {self.region}": swapped}  # a short title: it heads a narrow column
        alone, without = suspect_views(probe.images[index], regions, spec.region, spec.test_colour(probe))
        return {f"{self.region} alone": alone, f"without the {self.region}": without}

    @property
    def _is_fixed_position(self) -> bool:
        return (self.monitor_key or "").endswith("/fixed_position_ratio")

    @property
    def _meaning(self) -> str:
        scalar = (self.monitor_key or "").rsplit("/", 1)[-1]
        return SCORE_MEANINGS.get(scalar, "")

    def _pixel_maps(self, result: ProbeResult) -> torch.Tensor:
        """The watched method's maps at the probe's image size, as its metrics saw them."""
        return upsample_maps(result.method_maps[self._method].float(), tuple(result.probe.images.shape[-2:]))

    def _fixed_position(self, result: ProbeResult) -> Any:
        return fixed_position_evidence(self._pixel_maps(result))

    def _fixed_position_lines(self, result: ProbeResult, found: Any) -> List[str]:
        """Where the hot region sits, and the strategy (if discovered) that puts most evidence there."""
        area = float(found.area[0])
        lines = [
            f"The hot region of all the probe's maps together sits at the {place_of(found.hot_region.float())} "
            f"({area:.0%} of the image); each image's own hot region is chosen from the other images' maps."
        ]
        group = self.last_strategies.get(ALL)
        if group is not None and group.strategies:
            size = tuple(found.hot_region.shape)
            means = upsample_maps(torch.stack([s.mean_map for s in group.strategies]), size)
            shares = ((means * found.hot_region).sum((1, 2)) / means.sum((1, 2))).tolist()
            j = max(range(len(shares)), key=shares.__getitem__)
            strategy = group.strategies[j]
            members = ", ".join(f"#{i}" for i in strategy.members[: self.strategy_examples].tolist())
            lines.append(
                f"Of the {len(group.strategies)} strategies among all classes (`{self.prefix}/strategies/all`), "
                f"strategy {j + 1} ({len(strategy.members)} images, e.g. {members}) puts the most evidence there: "
                f"{shares[j]:.0%} of its mean map, at the {strategy.place}."
            )
        return lines

    def _draw_hot_regions(self, result: ProbeResult, rows: List[int], found: Any) -> Any:
        """The alarm's images: image | the watched maps | each image's hot region."""
        index = torch.as_tensor(rows, dtype=torch.long)
        overlays = {
            self._map_title: self._pixel_maps(result)[index],
            "hot region": found.regions[index].float(),
        }
        probe = result.probe
        return figures.heatmap_grid(
            unnormalize(probe.images[index], result.mean, result.std), overlays, [result.row_title(i) for i in rows]
        )

    def per_image_scores(self, result: ProbeResult) -> Optional[torch.Tensor]:
        """The watched scalar per probe image (``None`` for a scalar without per-image values)."""
        published = result.per_image.get(self.monitor_key)
        if published is not None or self._spec is None or self._spec.per_image is None:
            return published
        masks = None if self._spec.needs is None else getattr(result.probe, self._spec.needs)
        return self._spec.per_image(self._pixel_maps(result), masks).float()

    @property
    def region(self) -> str:
        scalar = (self.monitor_key or "").rsplit("/", 1)[-1]
        return next((name for part, name in SCORE_REGIONS if part in scalar), "monitored region")

    def top_images(self, per_image: Optional[torch.Tensor], n: int) -> List[int]:
        """Probe indices whose maps score worst on the monitored region (most reliance first)."""
        if per_image is None:
            return list(range(min(self.num_images, n)))
        high = self.alarm_on == "high"
        worst = per_image.nan_to_num(-math.inf if high else math.inf)
        order = torch.argsort(worst, descending=high, stable=True)
        return order[: self.num_images].tolist()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "best": self.best,
            "wait": self.wait,
            "alarms": [dict(a) for a in self.alarms],
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.best = state_dict["best"]
        self.wait = state_dict["wait"]
        self.alarms = [dict(a) for a in state_dict.get("alarms", [])]
        self.history = [dict(h) for h in state_dict.get("history", [])]
