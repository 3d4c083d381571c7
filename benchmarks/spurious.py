"""Spurious-cue detection: does ``SpuriousCueMonitor`` catch shortcut learning, early, without false alarms?

Trains the demo's setup (``configs/demo.yaml``: a tiny ViT from scratch on synthetic shapes
whose corner marker is easier to see than the shape) on CPU for several cue strengths, the
training-set probability that the marker names the label: ``1 / num_classes`` is the control
(the marker carries no information), then 0.8, 0.95 and 1.0. Each fit has ``CAAPCallback`` and
``SpuriousCueMonitor`` driven by CAAP maps; then each baseline (Grad-CAM by default) drives the
same callbacks on a replay of that fit's weights, epoch by epoch. After every epoch it records the accuracy on the cue-consistent and the cue-conflicting validation images
(the marker is independent of the label outside training), the cue and background mass, AUPR1
and the pointing game on the object mask, and the monitor's alarm state.

The ground truth is the detector a user with labelled conflicting data would use: the *gap
epoch*, the first epoch at which cue-conflicting accuracy is 10 points below cue-consistent
accuracy. The summary gives, per method and cue strength, the detection rate, the false alarms
on the controls and the lead time (gap epoch minus alarm epoch: positive = the alarm came
first). The recorded monitor scores are replayed through ``SpuriousCueMonitor.update`` over a
grid of (threshold, patience, min_delta), which is where the monitor's defaults come from.

    python benchmarks/spurious.py --quick                 # one seed, prints the summary
    python benchmarks/spurious.py                         # 3 seeds; writes benchmarks/results/spurious.*
    python benchmarks/spurious.py --seeds 0 1 2 3 4       # the recorded result
    python benchmarks/spurious.py --threshold 2 --patience 2   # other live monitor settings

Epochs are counted from 1 (epoch ``e`` = the checks after ``e`` epochs of training).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import lightning as L
import torch
import yaml
from lightning.pytorch.utilities import disable_possible_user_warnings

from caap_lightning.attribution.caap import CONSTRUCTIONS
from caap_lightning.attribution.registry import available_methods
from caap_lightning.callbacks import CAAPCallback, SpuriousCueMonitor
from caap_lightning.datamodules import SyntheticSpuriousDataModule
from caap_lightning.demo import DEFAULT_CONFIG, cue_accuracy
from caap_lightning.models import ViTClassifier

from _common import quiet_trainer

RESULTS = Path(__file__).resolve().parent / "results"
METHOD_NAMES = {"caap": "CAAP", "gradcam": "Grad-CAM"}
STRONG_CUES = (0.8, 0.95, 1.0)
# The probe metrics recorded each epoch (insertion/deletion is left out: the monitor does not read it).
METRICS = ("cue_mass", "cue_mass_ratio", "background_mass", "background_mass_ratio", "aupr_fg", "pointing_game")
GAP_POINTS = 10.0
# The replay grid for the monitor's settings (scores are area-normalised masses: uniform map = 1).
SWEEP_THRESHOLDS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
SWEEP_PATIENCE = (1, 2, 3)
SWEEP_MIN_DELTAS = (0.0, 0.1, 0.5, 1.0)


class ReplayedClassifier(ViTClassifier):
    """Loads, at the start of each epoch, the weights an earlier fit had at its end, instead of training.

    A baseline's callbacks then watch exactly the model trajectory CAAP's watched. Set
    ``snapshots`` (one ``model`` state dict per epoch) before fitting with ``limit_train_batches=1``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.snapshots: List[Dict[str, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.model.load_state_dict(self.snapshots[self.current_epoch])


class EpochRecorder(L.Callback):
    """After each validation (and the callbacks' check): cue accuracies, probe metrics, alarm state, weights."""

    def __init__(self, accuracy_batch: Any, caap: CAAPCallback, monitor: SpuriousCueMonitor) -> None:
        self.accuracy_batch = accuracy_batch
        self.caap = caap
        self.monitor = monitor
        self.history: List[Dict[str, Any]] = []
        self.snapshots: List[Dict[str, torch.Tensor]] = []
        self.start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        counts = cue_accuracy(pl_module, self.accuracy_batch)
        # A failed check leaves the previous check in place: then this epoch has no metrics and no score.
        last = self.caap.last
        metrics = last.metrics if last is not None and last.epoch == trainer.current_epoch else {}
        latest = self.monitor.history[-1] if self.monitor.history else {}
        check = latest if latest.get("epoch") == trainer.current_epoch else {}
        row: Dict[str, Any] = {
            "epoch": trainer.current_epoch + 1,
            "acc_consistent": percent(*counts["cue-consistent"]),
            "acc_conflicting": percent(*counts["cue-conflicting"]),
            "follows_cue": percent(*counts["follows-cue"]),
        }
        row.update({name: rounded(metrics.get("caap/" + name)) for name in METRICS})
        row["score"] = rounded(check.get("score"))
        row["alarm"] = bool(check.get("alarm", 0.0))
        row["attribution_s"] = rounded(metrics.get("caap/seconds"), 2)
        row["wall_s"] = round(time.perf_counter() - self.start, 1)
        self.history.append(row)
        self.snapshots.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def percent(correct: int, total: int) -> Optional[float]:
    return round(100.0 * correct / total, 2) if total else None


def rounded(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


# ---------------------------------------------------------------------- what a run's history says
def gap_epoch(history: Sequence[Dict[str, Any]], points: float = GAP_POINTS) -> Optional[int]:
    """The first epoch at which cue-conflicting accuracy is ``points`` below cue-consistent accuracy."""
    for row in history:
        if row["acc_consistent"] is not None and row["acc_conflicting"] is not None:
            if row["acc_consistent"] - row["acc_conflicting"] >= points:
                return row["epoch"]
    return None


def signal_epoch(history: Sequence[Dict[str, Any]], threshold: Optional[float]) -> Optional[int]:
    """The first epoch whose monitored score is past ``threshold``: when the maps show the cue, before any patience."""
    if threshold is None:
        return None
    return next((row["epoch"] for row in history if row["score"] is not None and row["score"] > threshold), None)


def alarm_epoch(history: Sequence[Dict[str, Any]]) -> Optional[int]:
    """The first epoch whose check left the monitor's alarm on."""
    return next((row["epoch"] for row in history if row["alarm"]), None)


def replay_alarms(
    history: Sequence[Dict[str, Any]], threshold: Optional[float], patience: int, min_delta: float, key: str = "score"
) -> List[bool]:
    """Whether a ``SpuriousCueMonitor`` with these settings has its alarm on after each recorded epoch."""
    monitor = SpuriousCueMonitor(threshold=threshold, patience=patience, min_delta=min_delta)
    alarms = []
    for row in history:
        if row[key] is not None:
            monitor.update(row[key])
        alarms.append(monitor.alarmed)
    return alarms


def replay_alarm_epoch(
    history: Sequence[Dict[str, Any]], threshold: Optional[float], patience: int, min_delta: float, key: str = "score"
) -> Optional[int]:
    """The alarm epoch a ``SpuriousCueMonitor`` with these settings would give on the recorded scores."""
    alarms = replay_alarms(history, threshold, patience, min_delta, key)
    return next((row["epoch"] for row, alarm in zip(history, alarms) if alarm), None)


def lead_time(alarm: Optional[int], gap: Optional[int]) -> Optional[int]:
    """Epochs by which the alarm preceded the accuracy gap (negative: it came later)."""
    return None if alarm is None or gap is None else gap - alarm


def methods_of(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """The methods of ``runs`` in their first-seen order (CAAP's trained runs come first)."""
    return list(dict.fromkeys(r["method"] for r in runs))


def display(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def median(values: Iterable[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def detection(runs: Sequence[Dict[str, Any]], control: float) -> Dict[str, Any]:
    """Per cue strength: runs, runs with an accuracy gap, alarms and lead times."""
    by_cue: Dict[str, Any] = {}
    for cue in sorted({r["cue_correlation"] for r in runs}):
        group = [r for r in runs if r["cue_correlation"] == cue]
        alarmed = [r for r in group if r["alarm_epoch"] is not None]
        leads = [lead_time(r["alarm_epoch"], r["gap_epoch"]) for r in group]
        by_cue[str(cue)] = {
            "control": cue == control,
            "runs": len(group),
            "gap_runs": sum(r["gap_epoch"] is not None for r in group),
            "alarmed": len(alarmed),
            "detection_rate": len(alarmed) / len(group),
            "alarm_epochs": [r["alarm_epoch"] for r in group],
            "signal_epochs": [r.get("signal_epoch") for r in group],
            "gap_epochs": [r["gap_epoch"] for r in group],
            "lead_epochs": leads,
            "median_lead_epochs": median(leads),
        }
    return by_cue


def target_check(runs: Sequence[Dict[str, Any]], control: float) -> Dict[str, Any]:
    """The issue's targets: every run with cue_correlation >= 0.95 alarmed, no alarm on a control."""
    missed = [f"{r['cue_correlation']}/seed {r['seed']}" for r in runs if r["cue_correlation"] >= 0.95 and r["alarm_epoch"] is None]
    false = [f"seed {r['seed']} (epoch {r['alarm_epoch']})" for r in runs if r["cue_correlation"] == control and r["alarm_epoch"] is not None]
    return {"all_strong_alarmed": not missed, "missed_runs": missed, "no_control_alarm": not false, "false_alarm_runs": false}


def sweep(runs: Sequence[Dict[str, Any]], control: float) -> List[Dict[str, Any]]:
    """Replays every run's scores through the monitor for each (threshold, patience, min_delta)."""
    rows = []
    for threshold, patience, min_delta in itertools.product(SWEEP_THRESHOLDS, SWEEP_PATIENCE, SWEEP_MIN_DELTAS):
        replayed = [
            {**r, "alarm_epoch": replay_alarm_epoch(r["history"], threshold, patience, min_delta)} for r in runs
        ]
        by_cue = detection(replayed, control)
        strong = [r for r in replayed if r["cue_correlation"] >= 0.95]
        rows.append(
            {
                "threshold": threshold,
                "patience": patience,
                "min_delta": min_delta,
                "alarmed": {cue: v["alarmed"] for cue, v in by_cue.items()},
                "runs": {cue: v["runs"] for cue, v in by_cue.items()},
                "median_lead_strong": median(lead_time(r["alarm_epoch"], r["gap_epoch"]) for r in strong),
                "median_alarm_strong": median(r["alarm_epoch"] for r in strong),
                **target_check(replayed, control),
            }
        )
    return rows


def summarize(runs: Sequence[Dict[str, Any]], control: float) -> Dict[str, Any]:
    summary: Dict[str, Any] = {}
    for method in methods_of(runs):
        group = [r for r in runs if r["method"] == method]
        summary[method] = {
            "by_cue_correlation": detection(group, control),
            "targets": target_check(group, control),
            "sweep": sweep(group, control),
        }
    return summary


# ---------------------------------------------------------------------- training
def demo_setup(config: Path) -> Dict[str, Any]:
    """The model, data and epochs of the demo's LightningCLI YAML."""
    spec = yaml.safe_load(config.read_text())
    return {
        "model": dict(spec["model"]),
        "data": dict(spec["data"]["init_args"]),
        "demo_max_epochs": int(spec["trainer"]["max_epochs"]),
    }


def fit_run(
    method: str,
    cue_correlation: float,
    seed: int,
    settings: Dict[str, Any],
    snapshots: Optional[List[Dict[str, torch.Tensor]]] = None,
) -> Tuple[Dict[str, Any], List[Dict[str, torch.Tensor]]]:
    """One fit of the demo's setup, its callbacks driven by ``method``'s maps: the run's record and weights.

    With ``snapshots`` (the weights of a fit of the same cue and seed) the fit replays them
    instead of training, so every method watches the same model.
    """
    L.seed_everything(seed, verbose=False)
    data = SyntheticSpuriousDataModule(**{**settings["data"], "cue_correlation": cue_correlation, "seed": seed})
    model_class = ViTClassifier if snapshots is None else ReplayedClassifier
    model = model_class(**settings["model"], num_classes=data.num_classes, img_size=data.img_size, mean=data.mean, std=data.std)
    if snapshots is not None:
        model.snapshots = snapshots
    options = dict(num_images=settings["num_images"], construction=settings["construction"], metrics=list(METRICS), log_images=False)
    caap = CAAPCallback(methods=[method], **options)
    monitor = SpuriousCueMonitor(**settings["monitor"], num_images=0)
    data.setup("fit")
    recorder = EpochRecorder(data.probe_batch(data.num_val), caap, monitor)
    trainer = quiet_trainer(
        max_epochs=settings["max_epochs"],
        # The accuracies are the recorder's, on every validation image; the loop only triggers the check.
        limit_val_batches=1,
        limit_train_batches=1.0 if snapshots is None else 1,
        callbacks=[caap, monitor, recorder],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    history = recorder.history
    record = {
        "method": method,
        "cue_correlation": cue_correlation,
        "seed": seed,
        "alarm_epoch": alarm_epoch(history),
        "gap_epoch": gap_epoch(history),
        "signal_epoch": signal_epoch(history, monitor.threshold),
        "monitor": monitor.monitor_key,
        "model": "trained" if snapshots is None else "replayed from the CAAP run's weights",
        "wall_s": round(time.perf_counter() - start, 1),
        "history": history,
    }
    return record, recorder.snapshots


# ---------------------------------------------------------------------- reports
def plot(runs: Sequence[Dict[str, Any]], path: Path, threshold: Optional[float], control: float) -> None:
    """Cue-mass ratio and accuracy gap per epoch, one panel column per method, a colour per cue strength."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    methods = methods_of(runs)
    cues = sorted({r["cue_correlation"] for r in runs})
    palette = iter(("tab:orange", "tab:red", "tab:purple", "tab:blue", "tab:green", "tab:brown"))
    colours = {cue: "tab:grey" if cue == control else next(palette) for cue in cues}
    figure = Figure(figsize=(5.0 * len(methods), 7.0), dpi=100)
    axes = figure.subplots(2, len(methods), squeeze=False, sharex=True, sharey="row")
    for col, method in enumerate(methods):
        top, bottom = axes[0, col], axes[1, col]
        for run in (r for r in runs if r["method"] == method):
            epochs = [row["epoch"] for row in run["history"]]
            label = "control" if run["cue_correlation"] == control else f"cue {run['cue_correlation']}"
            label = label if run["seed"] == min(r["seed"] for r in runs) else None
            style = dict(color=colours[run["cue_correlation"]], alpha=0.8, lw=1.3)
            top.plot(epochs, [row["cue_mass_ratio"] or math.nan for row in run["history"]], label=label, **style)
            gap = [row["acc_consistent"] - row["acc_conflicting"] for row in run["history"]]
            bottom.plot(epochs, gap, **style)
            if run["alarm_epoch"] is not None:
                i = epochs.index(run["alarm_epoch"])
                top.plot(epochs[i], run["history"][i]["cue_mass_ratio"], "v", color=style["color"], ms=7)
        if threshold is not None:
            top.axhline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
        bottom.axhline(GAP_POINTS, color="black", ls=":", lw=1, label=f"{GAP_POINTS:g}-point gap")
        top.set_yscale("log")
        top.set_title(f"{display(method)}: cue mass (area-normalised; v = alarm)", fontsize=10)
        top.set_ylabel("cue_mass_ratio (uniform map = 1)")
        bottom.set_title("accuracy: cue-consistent minus cue-conflicting", fontsize=10)
        bottom.set_ylabel("points")
        bottom.set_xlabel("epoch")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: ``-`` for none, floats with at most ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value)


def replay_sentence(setup: Dict[str, Any]) -> str:
    """How the baselines saw the CAAP runs' models, or that none ran."""
    baselines = setup["methods"][1:]
    if not baselines:
        return ": the CAAP run trains the model (no baseline replays in this run)."
    check = "checked: same accuracies every epoch" if setup["baselines_replay_caap_weights"] else "MISMATCH: see the JSON"
    return (
        f": the CAAP run trains the model, and each baseline's run ({', '.join(baselines)}) replays that run's "
        f"weights epoch by epoch with the baseline's maps through the same callbacks, so every method watches the "
        f"same models ({check})."
    )


def markdown(result: Dict[str, Any]) -> str:
    setup, summary, runs = result["setup"], result["summary"], result["runs"]
    control = setup["control_cue_correlation"]
    live = setup["monitor"]
    construction = "" if setup["construction"] == "parallel" else f", with CAAP's `{setup['construction']}` construction"
    lines = [
        f"# Spurious-cue detection benchmark{construction}",
        "",
        f"`{setup['command']}`: the setup of `{setup['config']}` "
        f"({setup['model_summary']}, {setup['data_summary']}), "
        f"{setup['max_epochs']} epochs (the config trains {setup['demo_max_epochs']}), seeds {setup['seeds']}, on {setup['threads']} CPU threads "
        f"({setup['machine']}). `CAAPCallback` (probe of {setup['num_images']} images, `construction=\"{setup['construction']}\"`, "
        f"`target=\"predicted\"`) and `SpuriousCueMonitor` (`monitor={live['monitor']}`, "
        f"`threshold={live['threshold']}`, `patience={live['patience']}`, `min_delta={live['min_delta']}`) "
        "watch each fit" + replay_sentence(setup),
        *([setup["rescored"]] if setup.get("rescored") else []),
        "",
        f"Wall time: {setup['wall_min']:.1f} min for {len(runs)} runs (median {setup['median_trained_run_s']:.0f} s a trained run "
        f"with CAAP, {fmt(setup['median_replayed_run_s'], 0)} s a baseline's replay of its weights; "
        f"load average {setup['load_average']} at the start, the cores were shared).",
        "",
        f"Accuracies are on all {setup['num_val']} validation images, where the cue is independent of the label; "
        f"the *gap epoch* is the first epoch at which cue-conflicting accuracy is {GAP_POINTS:g} points below "
        "cue-consistent accuracy (a shortcut a user with labelled conflicting data would see). "
        "*Signal epoch*: the first epoch whose score is past the threshold (what the maps show, before the "
        "monitor's patience; the monitor cannot alarm before check patience + 1, since the first check sets its "
        "best). Lead = gap epoch - alarm epoch (positive: the alarm came first). *Follows cue*: the share of "
        f"cue-conflicting images predicted as the cue's class ({100 * control:.0f}% for a model blind to the cue and to the shape, "
        "0% for one that reads the shape only). Epochs count from 1.",
        "",
        "## Detection with the live settings",
        "",
        "| method | cue_correlation | runs | runs with a gap | alarmed | detection rate | gap epochs | signal epochs | alarm epochs | lead (epochs) | median lead |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, part in summary.items():
        for cue, row in part["by_cue_correlation"].items():
            name = f"{cue} (control)" if row["control"] else cue
            lines.append(
                f"| {display(method)} | {name} | {row['runs']} | {row['gap_runs']} | {row['alarmed']} "
                f"| {row['detection_rate']:.0%} | {', '.join(fmt(e) for e in row['gap_epochs'])} "
                f"| {', '.join(fmt(e) for e in row['signal_epochs'])} | {', '.join(fmt(e) for e in row['alarm_epochs'])} "
                f"| {', '.join(fmt(e) for e in row['lead_epochs'])} "
                f"| {fmt(row['median_lead_epochs'])} |"
            )
    lines += ["", "Targets (every run with cue_correlation >= 0.95 alarmed; no alarm on a control):", ""]
    for method, part in summary.items():
        t = part["targets"]
        strong = "met" if t["all_strong_alarmed"] else f"NOT met, missed: {', '.join(t['missed_runs'])}"
        quiet = "met" if t["no_control_alarm"] else f"NOT met, false alarms: {', '.join(t['false_alarm_runs'])}"
        lines.append(f"- {display(method)}: all strong-cue runs alarmed: {strong}; controls quiet: {quiet}.")
    controls = [r["history"][-1] for r in runs if r["cue_correlation"] == control and r["method"] == "caap"]
    if controls:
        k = round(1 / control)  # a control's marker names the label on 1 image in num_classes
        accuracies = [(h["acc_consistent"] + (k - 1) * h["acc_conflicting"]) / k for h in controls]
        follows = [h["follows_cue"] for h in controls]
        scores = [h["score"] for h in controls if h["score"] is not None]
        if min(accuracies) >= 200 * control:  # well above chance: the controls learnt the shapes
            final = f"{fmt(min(scores))}-{fmt(max(scores))}" if scores else "missing (failed checks)"
            verdict = (
                f": they learnt the shapes, not the cue, and their final monitor score is {final} "
                f"(the threshold is {live['threshold']})."
            )
        else:
            verdict = (
                " (chance as well): in this setup a control model has learnt neither the shape nor the cue when the "
                "run ends, so its maps explain a near-chance prediction."
            )
        lines += [
            "",
            f"Controls: their final accuracy is about {min(accuracies):.0f}-{max(accuracies):.0f}% (chance {100 * control:.0f}%) "
            f"and they predict the cue's class on {min(follows):.0f}-{max(follows):.0f}% of the cue-conflicting images"
            + verdict,
            "",
            "A limit of the monitor is structural and sets the lead times: the first check only sets the best "
            "value, so no alarm comes before check patience + 1.",
        ]

    lines += [
        "",
        "## Per run: final epoch",
        "",
        "| method | cue | seed | acc consistent | acc conflicting | follows cue | cue mass | cue mass ratio (max) | background mass ratio | AUPR1 | PG | gap | alarm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        last = r["history"][-1]
        peak = max((row["cue_mass_ratio"] for row in r["history"] if row["cue_mass_ratio"] is not None), default=None)
        lines.append(
            f"| {display(r['method'])} | {r['cue_correlation']} | {r['seed']} | {fmt(last['acc_consistent'], 1)} "
            f"| {fmt(last['acc_conflicting'], 1)} | {fmt(last['follows_cue'], 1)} | {fmt(last['cue_mass'], 3)} | {fmt(last['cue_mass_ratio'])} ({fmt(peak)}) "
            f"| {fmt(last['background_mass_ratio'])} | {fmt(last['aupr_fg'], 3)} | {fmt(last['pointing_game'], 2)} "
            f"| {fmt(r['gap_epoch'])} | {fmt(r['alarm_epoch'])} |"
        )

    lines += [
        "",
        "## Monitor settings replayed on the recorded scores",
        "",
        "Each run's per-epoch `cue_mass_ratio` replayed through `SpuriousCueMonitor.update` with other settings "
        f"(replaying the live settings reproduces the live alarms: {'checked' if setup['replay_matches_live'] else 'NO, see the JSON'}). "
        "A cell reads: runs alarmed with cue_correlation >= 0.95 · with 0.8 · controls alarmed (false alarms) · "
        "median lead on the >= 0.95 runs; **bold**: both targets met.",
    ]
    for method, part in summary.items():
        lines += sweep_table(method, part["sweep"], live["min_delta"], control)
    lines += ["", f"![cue-mass trajectories]({setup['plot']})", ""]
    return "\n".join(lines)


def sweep_table(method: str, rows: Sequence[Dict[str, Any]], min_delta: float, control: float) -> List[str]:
    """Threshold x patience at ``min_delta``, and which cells another ``min_delta`` would change."""

    def cell(row: Dict[str, Any]) -> str:
        alarmed, runs = row["alarmed"], row["runs"]
        strong = [str(c) for c in runs if float(c) >= 0.95]
        text = (
            f"{sum(alarmed[c] for c in strong)}/{sum(runs[c] for c in strong)} · "
            f"{alarmed.get('0.8', '-')}/{runs.get('0.8', '-')} · {alarmed.get(str(control), '-')}/{runs.get(str(control), '-')} · "
            f"{fmt(row['median_lead_strong'])}"
        )
        return f"**{text}**" if row["all_strong_alarmed"] and row["no_control_alarm"] else text

    def key(row: Dict[str, Any]) -> tuple:
        return tuple(row["alarmed"].values())

    grid = {(r["threshold"], r["patience"]): r for r in rows if r["min_delta"] == min_delta}
    patiences = sorted({p for _, p in grid})
    lines = [
        "",
        f"{display(method)}, min_delta {min_delta:g}:",
        "",
        "| threshold | " + " | ".join(f"patience {p}" for p in patiences) + " |",
        "|---|" + "---|" * len(patiences),
    ]
    for threshold in sorted({t for t, _ in grid}):
        lines.append(f"| {threshold:g} | " + " | ".join(cell(grid[(threshold, p)]) for p in patiences) + " |")
    changed = sorted(
        {r["min_delta"] for r in rows if r["min_delta"] != min_delta and key(r) != key(grid[(r["threshold"], r["patience"])])}
    )
    others = sorted({r["min_delta"] for r in rows} - {min_delta})
    lines += [
        "",
        f"Other min_delta ({', '.join(f'{d:g}' for d in others)}): "
        + ("no cell changes." if not changed else f"cells change with min_delta {', '.join(f'{d:g}' for d in changed)} (see the JSON)."),
    ]
    return lines


# ---------------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed; writes nothing unless --output-dir is given")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the demo's LightningCLI YAML")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cue-correlations", type=float, nargs="+", default=None, help="default: control, 0.8, 0.95, 1.0")
    parser.add_argument(
        "--baselines", nargs="*", default=["gradcam"], choices=[m for m in available_methods() if m != "caap"],
        help="methods that also drive the callbacks, on the weights of CAAP's fit (default: gradcam)",
    )
    parser.add_argument(
        "--construction", default="parallel", choices=CONSTRUCTIONS,
        help="CAAP's construction in the callback: spurious.md was recorded with parallel, spurious-windowed.md with "
        "windowed (the callback's default); the monitor's defaults hold for both",
    )
    parser.add_argument(
        "--epochs", type=int, default=6,
        help="the demo trains 4; 6 leaves the monitor (no alarm before check patience + 1) room, and the controls more checks to fail",
    )
    parser.add_argument("--num-train", type=int, default=None, help="default: the config's num_train")
    parser.add_argument("--num-val", type=int, default=1024, help="validation images, all used for the cue accuracies")
    parser.add_argument("--num-images", type=int, default=16, help="CAAPCallback's probe batch (its default)")
    parser.add_argument("--threshold", type=float, default=None, help="default: SpuriousCueMonitor's")
    parser.add_argument("--patience", type=int, default=None, help="default: SpuriousCueMonitor's")
    parser.add_argument("--min-delta", type=float, default=None, help="default: SpuriousCueMonitor's")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads: on 2 shared cores the tiny ViT trained 4-10x slower with 2 threads than with 1",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="default: benchmarks/results (none with --quick)")
    parser.add_argument(
        "--rescore", type=Path, default=None, metavar="JSON",
        help="train nothing: replay a recorded run's scores through today's SpuriousCueMonitor (same settings) "
        "and rewrite its JSON, report and plot next to it",
    )
    return parser.parse_args(argv)


def rescore(path: Path) -> Dict[str, Any]:
    """Replay a recorded run's scores through the current ``SpuriousCueMonitor`` and rewrite its files.

    For a change of the monitor's rule: the alarms (per epoch and per run) are recomputed with the
    run's own threshold, patience and min_delta; the models, scores and accuracies are the recorded ones.
    """
    result = json.loads(path.read_text())
    setup, runs = result["setup"], result["runs"]
    setup.setdefault("construction", "parallel")  # recorded before --construction existed
    live = setup["monitor"]
    for run in runs:
        alarms = replay_alarms(run["history"], live["threshold"], live["patience"], live["min_delta"])
        for row, alarm in zip(run["history"], alarms):
            row["alarm"] = alarm
        run["alarm_epoch"] = alarm_epoch(run["history"])
    setup["rescored"] = (
        "The alarms were replayed from the recorded scores through the `SpuriousCueMonitor` of the code that "
        "wrote this report, with the run's settings, not taken from the live run (whose monitor may have "
        f"counted checks by another rule; `spurious.md` says when it changed): `python benchmarks/spurious.py --rescore {path}`."
    )
    control = setup["control_cue_correlation"]
    result["summary"] = summarize(runs, control)
    report = markdown(result)
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text(report)
    plot(runs, path.parent / setup["plot"], live["threshold"], control)
    print(report)
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.rescore is not None:
        return rescore(args.rescore)
    torch.set_num_threads(args.threads)
    disable_possible_user_warnings()
    seeds = args.seeds[:1] if args.quick else args.seeds
    output = args.output_dir or (None if args.quick else RESULTS)

    settings = demo_setup(args.config)
    settings["data"]["num_val"] = args.num_val
    if args.num_train is not None:
        settings["data"]["num_train"] = args.num_train
    settings["max_epochs"] = args.epochs
    settings["num_images"] = args.num_images
    settings["construction"] = args.construction
    given = {"threshold": args.threshold, "patience": args.patience, "min_delta": args.min_delta}
    settings["monitor"] = {k: v for k, v in given.items() if v is not None}
    num_classes = settings["data"]["num_classes"]
    control = round(1.0 / num_classes, 4)
    cues = args.cue_correlations or [control, *STRONG_CUES]

    load = os.getloadavg()
    start = time.perf_counter()
    runs = []
    for seed, cue in itertools.product(seeds, cues):
        trained, snapshots = fit_run("caap", cue, seed, settings)
        replayed = [fit_run(name, cue, seed, settings, snapshots)[0] for name in args.baselines]
        for run in (trained, *replayed):
            runs.append(run)
            last = run["history"][-1]
            progress = {k: run[k] for k in ("method", "cue_correlation", "seed", "alarm_epoch", "gap_epoch", "wall_s")}
            progress["final"] = {k: last[k] for k in ("acc_consistent", "acc_conflicting", "cue_mass_ratio", "score")}
            print(json.dumps(progress), flush=True)

    live = SpuriousCueMonitor(**settings["monitor"])
    live_settings = {"monitor": runs[0]["monitor"], "threshold": live.threshold, "patience": live.patience, "min_delta": live.min_delta}
    replay_matches = all(
        replay_alarm_epoch(r["history"], live.threshold, live.patience, live.min_delta) == r["alarm_epoch"] for r in runs
    )
    caap_runs = {(r["cue_correlation"], r["seed"]): r for r in runs if r["method"] == "caap"}
    # A replayed fit must see the weights CAAP's fit saw: the same accuracies at every epoch.
    same_models = all(
        [(h["acc_consistent"], h["acc_conflicting"]) for h in r["history"]]
        == [(h["acc_consistent"], h["acc_conflicting"]) for h in caap_runs[(r["cue_correlation"], r["seed"])]["history"]]
        for r in runs
        if r["method"] != "caap"
    )
    model, data = settings["model"], settings["data"]
    # parallel's files keep the plain name; another construction's carry it, so that runs side by side.
    stem = "spurious" if args.construction == "parallel" else f"spurious-{args.construction}"
    plot_name = f"{stem}_cue_mass.png"
    result = {
        "setup": {
            "command": " ".join(["python benchmarks/spurious.py", *(argv if argv is not None else sys.argv[1:])]),
            "quick": args.quick,
            "config": str(args.config.name),
            "model_summary": f"ViT patch {model['patch_size']}, dim {model['embed_dim']}, depth {model['depth']}, from scratch",
            "data_summary": (
                f"{num_classes} classes, {data['img_size']} px, shape_contrast {data['shape_contrast']}, "
                f"{data['num_train']} training images"
            ),
            "model": model,
            "data": {k: v for k, v in data.items() if k != "cue_correlation"},
            "max_epochs": settings["max_epochs"],
            "demo_max_epochs": settings["demo_max_epochs"],
            "num_val": data["num_val"],
            "num_images": settings["num_images"],
            "construction": settings["construction"],
            "seeds": seeds,
            "cue_correlations": cues,
            "control_cue_correlation": control,
            "methods": ["caap", *args.baselines],
            "baselines_replay_caap_weights": same_models,
            "monitor": live_settings,
            "replay_matches_live": replay_matches,
            "gap_points": GAP_POINTS,
            "threads": args.threads,
            "machine": f"{os.cpu_count()} cores",
            "load_average": f"{load[0]:.1f}",
            "wall_min": (time.perf_counter() - start) / 60,
            "median_trained_run_s": statistics.median(r["wall_s"] for r in runs if r["method"] == "caap"),
            "median_replayed_run_s": median(r["wall_s"] for r in runs if r["method"] != "caap"),
            "plot": plot_name,
        },
        "runs": runs,
        "summary": summarize(runs, control),
    }
    report = markdown(result)
    print(report)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (output / f"{stem}.md").write_text(report)
        plot(runs, output / plot_name, live.threshold, control)
        print(f"wrote {output / stem}.md, {stem}.json and {plot_name}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
