"""SpuriousCueMonitor: an alarm when the model comes to rely on a spurious cue or on the background."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from caap_lightning.callbacks import figures
from caap_lightning.callbacks.caap_callback import MASS_METRICS, PREFIX, CAAPCallback, CheckFailed, ProbeResult
from caap_lightning.metrics import attribution_mass

MODES = ("max", "min")


class SpuriousCueMonitor(Callback):
    """Watches a metric of :class:`CAAPCallback`, in the manner of ``EarlyStopping``, and raises an alarm.

    Each check (each time the ``CAAPCallback`` produced new values) logs ``spurious/score``. As
    in ``EarlyStopping``, a check that improves on the best value so far by more than
    ``min_delta`` becomes the best (with ``mode="max"`` a higher score means more reliance, so the
    best is the lowest); a check is *bad* when the score is past ``threshold`` and is no such
    improvement. So a score that rises past the threshold alarms, and so does one that is past it
    from the first check and stays there (a cue learnt before the first check); a score that
    keeps falling does not, nor does anything below the threshold.
    After ``patience`` bad checks in a row the alarm goes off:
    ``spurious/alarm`` = 1, a warning naming the epoch and the metric, and a TensorBoard text
    entry (``spurious/alarm``) with the probe images that rely most on the cue or background and
    their heatmaps (``spurious/alarm_images``); with ``stop_training`` the fit stops. Every
    other check logs ``spurious/alarm`` = 0. The best value, the count and the alarms survive a
    resume from checkpoint.

    Args:
        monitor: a metric logged by ``CAAPCallback``, e.g. ``"caap/cue_mass_ratio"`` (the first of
            its ``methods``) or ``"caap/gradcam/cue_mass_ratio"``. ``None`` picks
            ``caap/cue_mass_ratio`` when the probe has cue masks, else
            ``caap/background_mass_ratio``: area-normalised masses (a uniform map scores 1),
            since raw mass follows the region's area.
        threshold: the score must be past this to count (above for ``mode="max"``); ``None``
            counts every check that does not improve. The default suits the ``*_ratio``
            metrics (a uniform map scores 1): on ``benchmarks/spurious.py`` any threshold from 3
            to 8 caught every strong cue and 1.5 false-alarmed on 4 of 5 controls. The ratio cannot exceed 1 / (the region's
            share of the image), so lower it for large cue regions.
        min_delta: how much better than the best value so far a score must be to count as an
            improvement (which resets the count).
        patience: bad checks in a row that raise the alarm.
        mode: ``"max"`` if a higher score means more reliance on the cue, else ``"min"``.
        stop_training: stop the fit when the alarm goes off.
        num_images: probe images named (and drawn) in the alarm's text entry.
    """

    def __init__(
        self,
        monitor: Optional[str] = None,
        threshold: Optional[float] = 4.0,
        min_delta: float = 0.1,
        patience: int = 2,
        mode: str = "max",
        stop_training: bool = False,
        num_images: int = 4,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        if patience < 1 or min_delta < 0 or num_images < 0:
            raise ValueError(f"need patience >= 1, min_delta >= 0 and num_images >= 0; got {patience}, {min_delta}, {num_images}")
        if monitor is not None and not monitor.startswith(PREFIX):
            raise ValueError(f"monitor={monitor!r} must be a metric logged by CAAPCallback, e.g. 'caap/cue_mass_ratio'")
        self.monitor = monitor
        self.threshold = threshold
        self.min_delta = min_delta
        self.patience = patience
        self.mode = mode
        self.stop_training = stop_training
        self.num_images = num_images

        self.monitor_key: Optional[str] = monitor
        self.best = math.inf if mode == "max" else -math.inf
        self.wait = 0
        self.alarms: List[Dict[str, float]] = []  # one row per alarm: epoch, step, score
        self.history: List[Dict[str, float]] = []  # one row per check: epoch, step, score, alarm
        self._caap: Optional[CAAPCallback] = None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        found = [cb for cb in trainer.callbacks if isinstance(cb, CAAPCallback)]
        if len(found) != 1:
            raise ValueError(
                f"SpuriousCueMonitor watches the metrics of one CAAPCallback, but the trainer has {len(found)}; "
                "add exactly one CAAPCallback to the trainer's callbacks"
            )
        caap = found[0]
        caap.prepare(trainer, pl_module)
        logged = caap.logged_metrics
        if self.monitor is None:
            choice = next((PREFIX + m for m in ("cue_mass_ratio", "background_mass_ratio") if m in caap.active_metrics), None)
            if choice is None:
                raise ValueError(
                    "SpuriousCueMonitor's default watches caap/cue_mass_ratio or caap/background_mass_ratio, which "
                    f"need cue or object masks; the probe batch has neither (CAAPCallback logs {logged}). "
                    "Use a datamodule with masks, or set `monitor` to one of those metrics."
                )
            self.monitor_key = choice
        elif self.monitor not in logged:
            raise ValueError(f"monitor={self.monitor!r} is not among the metrics CAAPCallback logs here: {logged}")
        self._caap = caap

    # ------------------------------------------------------------------ checks
    def update(self, score: float) -> bool:
        """Take one score; ``True`` when it raises the alarm (the count reaches ``patience``)."""
        sign = 1.0 if self.mode == "max" else -1.0
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
        if trainer.sanity_checking or self._caap is None:
            return
        result = self._caap.last
        if result is None or (self.history and (self.history[-1]["epoch"], self.history[-1]["step"]) == (result.epoch, result.step)):
            return  # no new check since the last one
        score = result.metrics.get(self.monitor_key)
        if score is None:
            return
        raised = self.update(score)
        self.history.append({"epoch": result.epoch, "step": result.step, "score": score, "alarm": float(self.alarmed)})
        figures.log_scalars(trainer, {"spurious/score": score, "spurious/alarm": float(self.alarmed)}, result.step)
        if raised:
            self.alarms.append({"epoch": result.epoch, "step": result.step, "score": score})
            try:  # with the CAAPCallback's on_error: a failing report must not end the fit
                self._caap.guard("SpuriousCueMonitor: reporting the alarm", result.epoch, self._report, trainer, result, score)
            except CheckFailed:
                pass
        if self.stop_training and self.alarmed:
            trainer.should_stop = trainer.strategy.reduce_boolean_decision(True, all=False)

    def _report(self, trainer: L.Trainer, result: ProbeResult, score: float) -> None:
        caap = self._caap
        threshold = "" if self.threshold is None else f", past the threshold {self.threshold}"
        rank_zero_warn(
            f"SpuriousCueMonitor: alarm at epoch {result.epoch} (step {result.step}): {self.monitor_key} = {score:.3f} "
            f"has not improved on its best {self.best:.3f} by more than {self.min_delta} for {self.patience} checks in a row"
            f"{threshold}; the model relies on the {self.region}. See '{self.monitor_key}' and the "
            "'spurious/alarm' text in TensorBoard."
        )
        if not trainer.is_global_zero or self.num_images == 0:
            return
        per_image = self._per_image(result)
        rows = self.top_images(per_image, len(result.targets))
        lines = [
            f"**Alarm at epoch {result.epoch}, step {result.step}**: `{self.monitor_key}` = {score:.3f} "
            f"(best {self.best:.3f}; {self.patience} checks in a row more than {self.min_delta} worse than it{threshold}).",
            "",
            f"Probe images that rely most on the {self.region}:",
            "",
            f"| probe image | label | explained class | p | {self.region} score |",
            "|---|---|---|---|---|",
        ]
        for i in rows:
            value = "n/a" if per_image is None else f"{float(per_image[i]):.3f}"
            cue = "" if caap.probe.cue_labels is None else f" (cue: {caap.class_name(int(caap.probe.cue_labels[i]))})"
            lines.append(
                f"| #{i} | {caap.class_name(int(caap.probe.labels[i]))}{cue} | {caap.class_name(int(result.targets[i]))} "
                f"| {float(result.scores[i]):.2f} | {value} |"
            )
        lines += ["", "Their heatmaps: image `spurious/alarm_images` at this step."]
        figures.log_text(trainer, "spurious/alarm", "\n".join(lines), result.step)
        if rows:
            figures.log_image(trainer, "spurious/alarm_images", caap.draw_rows(rows, result), result.step)

    @property
    def region(self) -> str:
        key = self.monitor_key or ""
        return "cue" if "cue" in key else "background" if "background" in key else "monitored region"

    def _per_image(self, result: ProbeResult) -> Optional[torch.Tensor]:
        """The monitored mass metric per probe image, from the monitored method's maps (only mass metrics have one)."""
        method, name = self._caap.split_tag(self.monitor_key or "")
        if name not in MASS_METRICS or method not in result.method_maps:
            return None
        region, mask_field, by_area = MASS_METRICS[name]
        masks = getattr(self._caap.probe, mask_field)
        return attribution_mass(result.method_maps[method], masks, region=region, normalize_by_area=by_area).float()

    def top_images(self, per_image: Optional[torch.Tensor], n: int) -> List[int]:
        """Probe indices whose maps score worst on the monitored region (most reliance first)."""
        if per_image is None:
            return list(range(min(self.num_images, n)))
        worst = per_image.nan_to_num(-math.inf if self.mode == "max" else math.inf)
        order = torch.argsort(worst, descending=self.mode == "max", stable=True)
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
