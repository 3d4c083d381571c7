"""SpuriousCueMonitor: an alarm when the model comes to rely on a spurious cue, the background or a fixed position."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from caap_lightning.callbacks import figures
from caap_lightning.callbacks.arguments import DEFAULT_PROBE_IMAGES, DEFAULT_SWAP_IMAGES, check_choices, check_prefix
from caap_lightning.callbacks.arguments import check_unique_prefix
from caap_lightning.callbacks.caap_callback import CAAPCallback
from caap_lightning.callbacks.drawing import column_title
from caap_lightning.callbacks.errors import ON_ERROR, attempt
from caap_lightning.callbacks.meters import SKILL
from caap_lightning.callbacks.metric_table import LoggedScalar
from caap_lightning.callbacks.result import ProbeResult
from caap_lightning.callbacks.alarm_report import report_alarm, scalar_layout
from caap_lightning.callbacks.strategies import MIN_GROUP_IMAGES, StrategyGroup, discover_strategies, log_strategies
from caap_lightning.metrics._checks import check_int
from caap_lightning.model_tests import JUDGED_SKILL, is_judged

ALARM_ON = ("high", "low")
STRATEGIES = (True, False, "auto")
# The default scores, in order of preference (docs/callbacks.md says why, and benchmarks/results/spurious.md backs
# it): the swap tests ask the model itself which part it follows where the parts disagree, which is what a
# shortcut changes, and their follow share (the share of swap pairs that follow the swapped part) grades it as the
# benchmark's ground truth does; object masks first, as the background holds every cue off the object. The
# insertion and map-based ratios serve where the swap tests are left out.
DEFAULT_SCORES = (
    "background_swap_follow_share", "cue_swap_follow_share", "border_swap_follow_share",
    "background_insertion_ratio", "cue_insertion_ratio", "border_insertion_ratio",
    "cue_density_ratio", "background_density_ratio", "fixed_position_ratio",
)
# The default scores' threshold: a share of swap pairs, the same at any region size. Chosen by the benchmark's
# replay of fine-tunes and from-scratch runs on CAAPCallback's default swap probe (benchmarks/results/spurious.md);
# the ratios want their own thresholds (docs/callbacks.md).
DEFAULT_THRESHOLD = 0.4
# One check past the threshold alarms: waiting for a second check delayed the benchmark's alarms past the onset
# without preventing a false one (benchmarks/results/spurious.md).
DEFAULT_PATIENCE = 1
# Below this many probe images, strategy discovery warns that its clusters are anecdotes.
STRATEGY_PROBE_IMAGES = 64


class SpuriousCueMonitor(Callback):
    """Watches a scalar that :class:`CAAPCallback` logs, in the manner of ``EarlyStopping``, and raises an alarm.

    Each check of a fit (each new :class:`ProbeResult` a ``CAAPCallback`` publishes as ``last``)
    logs ``<prefix>/score``. A check is *bad* when its score is past ``threshold`` and does not
    improve on the best so far by more than ``min_delta``; ``patience`` bad checks in a row raise
    the alarm: ``<prefix>/alarm`` = 1, a warning, and a text entry and images naming the probe
    images that rely most on the watched part. The rule, the default scores and what the alarm
    shows, in full: ``docs/callbacks.md``. :meth:`update` is the rule alone, without a Trainer.

    Args:
        monitor: a scalar a ``CAAPCallback`` logs, e.g. ``"caap/cue_density_ratio"``; ``None`` takes the
            first of ``DEFAULT_SCORES`` that one logs (a swap test's follow share where the probe allows one).
        threshold: the score must be past this to count; ``None`` counts every check that does not improve.
        min_delta: how much better than the best a score must be to count as an improvement.
        patience: bad checks in a row that raise the alarm.
        min_skill: a swap-test check counts only where the model's skill on the clean swap probe
            (``caap/swap_probe_skill``: its mean top-1 probability, chance-corrected; 0 at chance, 1 when certain)
            reaches this; below it the model cannot tell the images apart and a swap test reads noise. ``None``
            counts every check.
        alarm_on: ``"high"`` if a higher score means more reliance, ``"low"`` if a lower one does.
        stop_training: stop the fit when the alarm goes off.
        num_images: probe images named (and drawn) in the alarm's text entry.
        strategies: cluster the probe's maps at every check (``"auto"``: where the probe has no masks).
        strategy_max_clusters: the most strategies a group may split into.
        strategy_examples: images drawn per strategy.
        on_error: ``"warn"`` reports a failing report or strategy step and goes on; ``"raise"`` stops.
        prefix: the first part of the names logged; give each monitor of a Trainer its own.
    """

    def __init__(
        self,
        monitor: Optional[str] = None,
        threshold: Optional[float] = DEFAULT_THRESHOLD,
        min_delta: float = 0.1,
        patience: int = DEFAULT_PATIENCE,
        min_skill: Optional[float] = JUDGED_SKILL,
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
        check_choices(alarm_on=(alarm_on, ALARM_ON), on_error=(on_error, ON_ERROR))
        if not (isinstance(strategies, bool) or strategies == "auto"):
            raise ValueError(f"strategies={strategies!r} is not one of {STRATEGIES}")
        if patience < 1 or min_delta < 0 or num_images < 0:
            raise ValueError(
                f"need patience >= 1, min_delta >= 0 and num_images >= 0; got {patience}, {min_delta}, {num_images}"
            )
        check_int("strategy_max_clusters", strategy_max_clusters, 2, "the most strategies a group splits into")
        check_int("strategy_examples", strategy_examples, 1, "images drawn per strategy")
        if monitor is not None and "/" not in monitor:
            raise ValueError(f"monitor={monitor!r} must be a metric logged by CAAPCallback, e.g. 'caap/cue_density_ratio'")
        if min_skill is not None and not 0.0 <= min_skill < 1.0:
            raise ValueError(f"min_skill={min_skill!r} must be in [0, 1) (0: chance, 1: certain) or None")
        check_prefix(prefix)
        self.monitor, self.threshold, self.min_delta, self.patience = monitor, threshold, min_delta, patience
        self.min_skill = min_skill
        self.alarm_on, self.stop_training, self.num_images = alarm_on, stop_training, num_images
        self.strategies, self.strategy_max_clusters = strategies, strategy_max_clusters
        self.strategy_examples = strategy_examples
        self.on_error, self.prefix = on_error, prefix

        self.monitor_key: Optional[str] = monitor
        self.best = math.inf if alarm_on == "high" else -math.inf
        self.wait = 0
        self.alarms: List[Dict[str, float]] = []  # one row per alarm: epoch, step, score
        self.history: List[Dict[str, float]] = []  # one row per counted check: epoch, step, score, alarm
        self.discovers_strategies = False  # `strategies` resolved against the probe, at the run's start
        self.last_strategies: Dict[str, StrategyGroup] = {}  # group -> its strategies, at the last check
        self._sources: List[CAAPCallback] = []
        self._source: Optional[CAAPCallback] = None  # the callback that logs the watched scalar
        self._watched: Optional[LoggedScalar] = None  # its entry in that callback's `logged` table
        self._method: Optional[str] = None  # the attribution method whose maps are drawn and clustered
        self._warned_threshold_for: Optional[str] = None
        self._seen: Optional[ProbeResult] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_unique_prefix(trainer, SpuriousCueMonitor, self.prefix,
                            "(e.g. SpuriousCueMonitor(monitor='caap/background_density_ratio', prefix='spurious_bg'))")
        self._sources = [cb for cb in trainer.callbacks if isinstance(cb, CAAPCallback)]
        if not self._sources:
            raise ValueError("SpuriousCueMonitor watches the metrics of a CAAPCallback, but the trainer has none; add one")
        self._source = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.watch(self._sources)

    on_test_start = on_validation_start  # whichever run starts: after every callback's setup

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.watch(self._sources)
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, SpuriousCueMonitor)]
        if monitors[0] is self:  # TensorBoard reads one layout per run: the first monitor writes it for all
            figures.log_scalar_layout(trainer, scalar_layout(monitors, self._sources))

    def watch(self, sources: Sequence[CAAPCallback]) -> None:
        """Choose the watched scalar from the ``logged`` tables of ``sources``, which their ``setup`` filled (the
        hooks call this once every setup has run)."""
        if self._source is not None:
            return
        sources = [source for source in sources if source.logged]
        if not sources:
            return  # a fit without validation: the CAAPCallback has said that it never checks
        owners = {tag: source for source in sources for tag in source.logged_metrics}
        key = self.monitor or default_key(sources, sorted(owners))
        if key not in owners:
            raise ValueError(f"monitor={key!r} is not among the metrics CAAPCallback logs here: {sorted(owners)}")
        self.monitor_key, self._source = key, owners[key]
        self._watched = self._source.logged.get(key)  # None for <prefix>/seconds
        self._method = self._watched.method if self._watched is not None else self._source.methods[0]
        if self._watched is not None:
            try:
                self._watched.check_scorable()
            except ValueError as exc:
                raise ValueError(f"SpuriousCueMonitor cannot watch {key} on this probe of "
                                 f"{len(self._watched.probe)} image(s): {exc}") from exc
        self._resolve_strategies(len(self._source.probe), self._source.probe)
        self._warn_if_default_threshold_unsuited()

    def _warn_if_default_threshold_unsuited(self) -> None:
        if self._watched is not None and self.threshold == DEFAULT_THRESHOLD and self._warned_threshold_for != self.monitor_key:
            self._warned_threshold_for = self.monitor_key  # once per watched scalar
            warning = default_threshold_warning(self._watched)
            if warning:
                rank_zero_warn(warning)

    def _resolve_strategies(self, images: int, probe: Any) -> None:
        if self.strategies == "auto":
            self.discovers_strategies = probe.masks is None and probe.cue_masks is None
        else:
            self.discovers_strategies = bool(self.strategies)
        if self.discovers_strategies and images < STRATEGY_PROBE_IMAGES:
            # "auto" on the probe a default CAAPCallback takes, a setting the README recommends, says it as info.
            say = rank_zero_info if self.strategies == "auto" and images >= DEFAULT_PROBE_IMAGES else rank_zero_warn
            say(
                f"SpuriousCueMonitor: strategy discovery clusters the {images} probe images; clusters of so few "
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
        past = not first if self.threshold is None else self.past(score)
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
        self.read(trainer, result)

    def read(self, trainer: L.Trainer, result: ProbeResult) -> None:
        """Take one published check: discover strategies (where on) and, for a fit's check, count its score."""
        self._seen = result
        if self.discovers_strategies and self._method in result.method_maps:
            self.last_strategies = {}  # a failure leaves none rather than the last check's
            found = attempt(trainer, self.on_error, "SpuriousCueMonitor: discovering strategies", result.epoch,
                            self._discover, trainer, result, skipped="the strategies are left out of this check")
            self.last_strategies = found or {}
        if result.stage == "fit":
            self._count(trainer, result)

    def _count(self, trainer: L.Trainer, result: ProbeResult) -> None:
        score = result.metrics.get(self.monitor_key)
        if score is None or not math.isfinite(score):
            why = result.unscored.get(self.monitor_key, "the callback did not compute it at this check")
            rank_zero_warn(
                f"SpuriousCueMonitor: the check at epoch {result.epoch} is not counted: {self.monitor_key} was not "
                f"logged there ({why}); the count stays at {self.wait} of {self.patience}."
            )
            return
        skill = self.skill_of(result)
        if self.judges_skill and not is_judged(skill, self.min_skill):
            self._not_judged(trainer, result, score, skill)
            return
        raised = self.update(score)
        self.history.append({"epoch": result.epoch, "step": result.step, "score": score, "alarm": float(self.alarmed)})
        figures.log_scalars(trainer, {f"{self.prefix}/score": score, f"{self.prefix}/alarm": float(self.alarmed),
                                      f"{self.prefix}/judged": 1.0}, result.step)
        if raised:
            self.alarms.append({"epoch": result.epoch, "step": result.step, "score": score})
            attempt(trainer, self.on_error, "SpuriousCueMonitor: reporting the alarm", result.epoch, report_alarm,
                    self, trainer, result, score, skipped="the report is skipped")
        if self.stop_training and self.alarmed:
            trainer.should_stop = trainer.strategy.reduce_boolean_decision(True, all=False)

    @property
    def judges_skill(self) -> bool:
        """Whether the watched scalar is a swap test's, whose checks count only at ``min_skill``."""
        test = None if self._watched is None else self._watched.model_test
        return self.min_skill is not None and test is not None and test.kind == "swap"

    def skill_of(self, result: ProbeResult) -> Optional[float]:
        """The swap probe's skill at this check, where the watched scalar is a swap test's (else ``None``)."""
        if not self.judges_skill or self._source is None:
            return None
        # The published list names the skill's scalar: the contract, not the callback's own naming.
        key = next((tag for tag in self._source.logged_metrics if tag.rsplit("/", 1)[-1] == SKILL), None)
        return None if key is None else result.metrics.get(key)

    def _not_judged(self, trainer: L.Trainer, result: ProbeResult, score: float, skill: Optional[float]) -> None:
        """Say (log and TensorBoard) why a check is not counted: the model cannot tell the swap probe's classes apart."""
        shown = "unknown" if skill is None or skill != skill else f"{skill:.2f}"
        why = (f"the model's skill on the clean swap probe is {shown}, below min_skill={self.min_skill} (its mean "
               "top-1 probability, chance-corrected: 0 at chance, 1 when certain); a model that cannot yet tell the "
               "images apart answers a swap test by noise")
        rank_zero_info(f"SpuriousCueMonitor: the check at epoch {result.epoch} is not judged ({self.monitor_key} "
                       f"{score:.3f}): {why}; the count stays at {self.wait} of {self.patience}.")
        figures.log_scalars(trainer, {f"{self.prefix}/score": score, f"{self.prefix}/judged": 0.0}, result.step)
        if trainer.is_global_zero:
            figures.log_text(trainer, f"{self.prefix}/not_judged", f"Epoch {result.epoch}: not judged: {why}.",
                             result.step)

    def _discover(self, trainer: L.Trainer, result: ProbeResult) -> Dict[str, StrategyGroup]:
        found = discover_strategies(result.method_maps[self._method], result.targets, result.class_name,
                                    max_clusters=self.strategy_max_clusters,
                                    min_evidence=result.map_evidence.get(self._method, 0.0))
        if trainer.is_global_zero:
            log_strategies(trainer, self.prefix, result, found, self._method, column_title(self._method),
                           self.strategy_examples)
        return found

    # ------------------------------------------------------------------ the alarm's report
    @property
    def watched(self) -> Optional[LoggedScalar]:
        """The watched scalar's entry in its callback's ``logged`` table (``None`` before a run, or for seconds)."""
        return self._watched

    @property
    def source(self) -> Optional[CAAPCallback]:
        """The callback that logs the watched scalar."""
        return self._source

    @property
    def method(self) -> Optional[str]:
        """The attribution method whose maps the alarm draws and clusters."""
        return self._method

    def past(self, score: float) -> bool:
        """Whether ``score`` is past the threshold (``False`` without one)."""
        sign = 1.0 if self.alarm_on == "high" else -1.0
        return self.threshold is not None and sign * (score - self.threshold) > 0

    def image_scores(self, result: ProbeResult) -> Optional[torch.Tensor]:
        """The watched scalar per probe image, as the result publishes it (``None`` for a scalar without)."""
        return result.per_image.get(self.monitor_key)

    @property
    def part(self) -> str:
        """The part of the image the watched scalar is about (``"background"``, ``"cue"``, ...), for the alarm."""
        part = None if self._watched is None else self._watched.part
        return part or "monitored region"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "alarms": [dict(a) for a in self.alarms],
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.best = state_dict["best"]
        self.wait = state_dict["wait"]
        self.alarms = [dict(a) for a in state_dict.get("alarms", [])]
        self.history = [dict(h) for h in state_dict.get("history", [])]


def default_threshold_warning(watched: LoggedScalar) -> Optional[str]:
    """What is wrong with watching ``watched`` at the default threshold, chosen for the swap tests' follow shares on
    a swap probe of ``DEFAULT_SWAP_IMAGES``: another kind of score, or a follow share on fewer images (``None``:
    nothing)."""
    test, images = watched.model_test, len(watched.probe)
    if test is not None and watched.detail == "follow_share":
        if images >= DEFAULT_SWAP_IMAGES:
            return None
        return (f"SpuriousCueMonitor: watching {watched.tag} at the default threshold {DEFAULT_THRESHOLD} on {images} "
                f"swap images; it was chosen on {DEFAULT_SWAP_IMAGES}, and on fewer the share is noisy "
                "(docs/callbacks.md). Give CAAPCallback more probe images, or set `threshold`.")
    return (f"SpuriousCueMonitor: watching {watched.tag} at the default threshold {DEFAULT_THRESHOLD}, which was "
            "chosen for the swap tests' follow shares (a share of probe pairs, not a ratio); the benchmark chose "
            "other thresholds (and patience) for the ratios: see docs/callbacks.md. Set `threshold` (and "
            "`patience`) for it, or watch a follow share.")


def default_key(sources: Sequence[CAAPCallback], logged: List[str]) -> str:
    """The first of ``DEFAULT_SCORES`` that the ``sources`` log for their primary method, as their tables list it."""
    for score in DEFAULT_SCORES:
        keys = [tag for source in sources for tag, entry in source.logged.items()
                if entry.method == source.methods[0] and tag.rsplit("/", 1)[-1] == score]
        if len(keys) > 1:
            raise ValueError(f"SpuriousCueMonitor's default could watch any of {keys}; set `monitor` to one of them")
        if keys:
            return keys[0]
    raise ValueError(
        "SpuriousCueMonitor's default watches caap/background_swap_follow_share (with object masks), "
        "caap/cue_swap_follow_share (with cue masks) or caap/border_swap_follow_share (without masks), or else an "
        f"insertion ratio or a density ratio, but the CAAPCallbacks log none of them (they log {logged}): add "
        "'border_swap_ratio' (or a swap test the probe's masks allow) to CAAPCallback's `metrics`, or set "
        "`monitor` to one of those it logs."
    )
