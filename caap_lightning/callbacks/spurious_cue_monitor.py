"""SpuriousCueMonitor: an alarm when the model comes to rely on a spurious cue or on the background."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from caap_lightning.callbacks import figures
from caap_lightning.callbacks.caap_callback import ON_ERROR, CAAPCallback, CheckFailed, ProbeResult, guarded

ALARM_ON = ("high", "low")
# The default scores, in order of preference: cue masks say most, object masks less.
DEFAULT_SCORES = ("cue_mass_ratio", "background_mass_ratio")


class SpuriousCueMonitor(Callback):
    """Watches a metric of :class:`CAAPCallback`, in the manner of ``EarlyStopping``, and raises an alarm.

    Each check of a fit (each new :class:`ProbeResult` the ``CAAPCallback`` publishes) logs
    ``<prefix>/score``. As in ``EarlyStopping``, a check that improves on the best value so far
    by more than ``min_delta`` becomes the best (with ``alarm_on="high"`` a higher score means
    more reliance, so the best is the lowest); a check is *bad* when the score is past
    ``threshold`` and is no such improvement. So a score that rises past the threshold alarms,
    and so does one that is past it from the first check and stays there (a cue learnt before
    the first check); a score that keeps falling does not, nor does anything below the
    threshold. After ``patience`` bad checks in a row the alarm goes off: ``<prefix>/alarm`` = 1,
    a warning naming the epoch and the metric, and a text entry (``<prefix>/alarm``) with the
    probe images that rely most on the cue or background and their heatmaps
    (``<prefix>/alarm_images``); with ``stop_training`` the fit stops. ``<prefix>/alarm`` stays 1
    while the bad checks go on and is 0 at every other check. Checks of ``validate``/``test`` runs do not count: they see the same
    weights as the fit's last check. The best value, the count and the alarms survive a resume
    from checkpoint; several monitors (with different ``prefix``) run in one Trainer.

    Args:
        monitor: a metric logged by a ``CAAPCallback``, e.g. ``"caap/cue_mass_ratio"`` (the first
            of its ``methods``) or ``"caap/gradcam/cue_mass_ratio"``. ``None`` picks
            ``caap/cue_mass_ratio`` when the probe has cue masks, else
            ``caap/background_mass_ratio``: area-normalised masses (a uniform map scores 1),
            since raw mass follows the region's area.
        threshold: the score must be past this to count (above for ``alarm_on="high"``); ``None``
            counts every check that does not improve. The default suits the ``*_ratio``
            metrics (a uniform map scores 1; ``benchmarks/results/spurious.md`` shows how it was
            chosen). The ratio cannot exceed 1 / (the region's share of the image), so lower it
            for large regions.
        min_delta: how much better than the best value so far a score must be to count as an
            improvement (which resets the count).
        patience: bad checks in a row that raise the alarm.
        alarm_on: ``"high"`` if a higher score means more reliance on the cue (mass on the cue or
            the background), ``"low"`` if a lower one does (e.g. ``caap/pointing_game``).
        stop_training: stop the fit when the alarm goes off.
        num_images: probe images named (and drawn) in the alarm's text entry.
        on_error: ``"warn"`` reports a failing alarm report and lets training go on; ``"raise"`` stops.
        prefix: the first part of the names logged; give each monitor of a Trainer its own.
    """

    def __init__(
        self,
        monitor: Optional[str] = None,
        threshold: Optional[float] = 4.0,
        min_delta: float = 0.1,
        patience: int = 2,
        alarm_on: str = "high",
        stop_training: bool = False,
        num_images: int = 4,
        on_error: str = "warn",
        prefix: str = "spurious",
    ) -> None:
        super().__init__()
        for name, value, choices in (("alarm_on", alarm_on, ALARM_ON), ("on_error", on_error, ON_ERROR)):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {choices}")
        if patience < 1 or min_delta < 0 or num_images < 0:
            raise ValueError(f"need patience >= 1, min_delta >= 0 and num_images >= 0; got {patience}, {min_delta}, {num_images}")
        if monitor is not None and "/" not in monitor:
            raise ValueError(f"monitor={monitor!r} must be a metric logged by CAAPCallback, e.g. 'caap/cue_mass_ratio'")
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty name without '/', got {prefix!r}")
        self.monitor = monitor
        self.threshold = threshold
        self.min_delta = min_delta
        self.patience = patience
        self.alarm_on = alarm_on
        self.stop_training = stop_training
        self.num_images = num_images
        self.on_error = on_error
        self.prefix = prefix

        self.monitor_key: Optional[str] = monitor
        self.best = math.inf if alarm_on == "high" else -math.inf
        self.wait = 0
        self.alarms: List[Dict[str, float]] = []  # one row per alarm: epoch, step, score
        self.history: List[Dict[str, float]] = []  # one row per counted check: epoch, step, score, alarm
        self._source: Optional[CAAPCallback] = None
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
                "prefix (e.g. SpuriousCueMonitor(monitor='caap/background_mass_ratio', prefix='spurious_background'))"
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

    @staticmethod
    def _default_key(sources: List[CAAPCallback], logged: List[str]) -> str:
        for score in DEFAULT_SCORES:
            keys = [source.tag(source.methods[0], score) for source in sources if score in source.active_metrics]
            if len(keys) > 1:
                raise ValueError(f"SpuriousCueMonitor's default could watch any of {keys}; set `monitor` to one of them")
            if keys:
                return keys[0]
        raise ValueError(
            "SpuriousCueMonitor's default watches caap/cue_mass_ratio or caap/background_mass_ratio, which "
            f"need cue or object masks; the probe batch has neither (the CAAPCallbacks log {logged}). "
            "Use probe data with masks, or set `monitor` to one of those metrics."
        )

    # ------------------------------------------------------------------ checks
    def update(self, score: float) -> bool:
        """Take one score; ``True`` when it raises the alarm (the count reaches ``patience``)."""
        sign = 1.0 if self.alarm_on == "high" else -1.0
        improved = sign * (self.best - score) > self.min_delta  # always the first score (best is +-inf)
        past = self.threshold is None or sign * (score - self.threshold) > 0
        if improved:
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
        if result is None or result is self._seen or result.stage != "fit":
            return  # no new check of a fit since the last one
        self._seen = result
        score = result.metrics.get(self.monitor_key)
        if score is None or not math.isfinite(score):
            rank_zero_warn(
                f"SpuriousCueMonitor: the check at epoch {result.epoch} is not counted: {self.monitor_key} was not "
                "logged there (no probe image could be scored for it); the count stays at "
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

    def _report(self, trainer: L.Trainer, result: ProbeResult, score: float) -> None:
        threshold = "" if self.threshold is None else f", past the threshold {self.threshold}"
        where = figures.describe_destinations(trainer)
        see = f" See '{self.monitor_key}' and the '{self.prefix}/alarm' text in {where}." if where else ""
        rank_zero_warn(
            f"SpuriousCueMonitor: alarm at epoch {result.epoch} (step {result.step}): {self.monitor_key} = {score:.3f} "
            f"has not improved on its best {self.best:.3f} by more than {self.min_delta} for {self.patience} checks in a row"
            f"{threshold}; the model relies on the {self.region}.{see}"
        )
        if not trainer.is_global_zero or self.num_images == 0:
            return
        per_image = result.per_image.get(self.monitor_key)
        rows = self.top_images(per_image, len(result.targets))
        probe = result.probe
        lines = [
            f"**Alarm at epoch {result.epoch}, step {result.step}**: `{self.monitor_key}` = {score:.3f} "
            f"(best {self.best:.3f}; {self.patience} checks in a row without improving on it by more than "
            f"{self.min_delta}{threshold}).",
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
        lines += ["", f"Their heatmaps: image `{self.prefix}/alarm_images` at this step."]
        figures.log_text(trainer, f"{self.prefix}/alarm", "\n".join(lines), result.step)
        if rows:
            figures.log_image(trainer, f"{self.prefix}/alarm_images", result.draw_rows(rows), result.step)

    @property
    def region(self) -> str:
        key = self.monitor_key or ""
        return "cue" if "cue" in key else "background" if "background" in key else "monitored region"

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
