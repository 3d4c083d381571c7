"""Spurious-cue detection: does ``SpuriousCueMonitor`` catch shortcut learning, in time, without false alarms?

A tiny ViT (the packaged ``demo.yaml``'s) is trained on CPU on two generated datasets, ``shapes``
(``SyntheticSpuriousDataModule``) and ``fashion`` (``FashionCanvasDataModule``), each with every
cue kind (marker, watermark, border, background) at several cue strengths: the training-set
probability that the cue names the label, ``1 / num_classes`` for the control (the cue carries no
information), then 0.8, 0.95 and 1.0. Outside training the cue is independent of the label, so the
validation set measures what each model learnt. Each run starts from scratch (``--init scratch``)
or is a fine-tune (``--init pretrained``): the model first trained on clean data of the same domain
with no cue, then given a fresh head (``cue_runs.PRETRAIN``), the scenario of a user fine-tuning a
pretrained ViT.

Ground truth is measured, not assumed: a run's *reliance* is the share of cue-conflicting
validation images predicted as the cue's class; its *onset* the first epoch with reliance of 40%
or more, and a *shortcut run* one that has an onset. A control should learn the object (>= 85%
validation accuracy) and keep its reliance below 25% throughout (the report names controls that
do not). An alarm is in time when it comes no later than one epoch after the onset.

Each fit has ``CAAPCallback`` logging, after every epoch, every model test (swap ratios and their
follow shares, insertion ratios; ``REGIMES``: the swap test each *mask regime* watches, for a user
who has cue and object masks, only object masks, or no masks), the map-based scores
(``MAP_REGIMES``) and the swap probe's skill, which says whether each check is judged. One
trained run serves every regime and monitor (``WATCHES``): each is replayed from the recorded
per-epoch scores through ``SpuriousCueMonitor.update`` and its judged rule; a live monitor on the
default score checks that the replay is faithful. Each baseline (``--baselines``) then drives the
same callbacks on a replay of the fit's weights, epoch by epoch, so its maps' scores are compared on
the same models.

The report gives, per monitor, regime, init, dataset and cue kind, the detection rate over
shortcut runs, the false alarms over controls and the lead time against the onset (and the
accuracy-gap epoch beside it: the first epoch at which cue-conflicting accuracy is 10 points below
cue-consistent accuracy), the targets as met / NOT met, the window of thresholds that meets every
target and the controls' highest judged reading, a sweep of ``min_skill``, what each late alarm's
run showed, and the score trajectories. Each monitor's threshold and patience are also chosen on
part of the grid (``TUNING``) and confirmed on the held-out cue kinds and dataset.

    python benchmarks/spurious.py --quick                        # a smoke run: prints the summary
    python benchmarks/spurious.py --workers 2                    # the grid; writes benchmarks/results/spurious.*
    python benchmarks/spurious.py --init pretrained --baselines  # the fine-tunes alone, no baseline replays
    python benchmarks/spurious.py --data shapes --cues marker    # part of it
    python benchmarks/spurious.py --rescore benchmarks/results/spurious.json   # replay today's monitor

An epoch here is a fixed number of batches (``RECIPES``: 32 on the shapes, 16 on Fashion-MNIST),
and epochs are counted from 1 (epoch ``e`` = the checks after ``e`` epochs of training).
Fashion-MNIST is read as ``FashionCanvasDataModule`` reads it (Debian's ``dataset-fashion-mnist``,
or IDX files under ``--fashion-root``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from lightning.pytorch.utilities import disable_possible_user_warnings

from caap_lightning.attribution.caap import CONSTRUCTIONS
from caap_lightning.attribution.registry import available_methods
from caap_lightning.callbacks import SpuriousCueMonitor
from caap_lightning.callbacks.arguments import DEFAULT_SWAP_IMAGES
from caap_lightning.callbacks.spurious_cue_monitor import DEFAULT_SCORES
from caap_lightning.model_tests import MODEL_TESTS, is_judged
from caap_lightning.datamodules import CUE_KINDS
from caap_lightning.datamodules.fashion import find_fashion_mnist

import cue_runs
from cue_runs import (
    INITS, Job, CONTROL_ACCURACY, CONTROL_RELIANCE, DATASETS, FASHION_ROOT, GAP_POINTS, LATEST_LEAD, LIVE_SCORE,
    FOLLOW_REGIMES, MAP_REGIMES, MODEL, RECORDED, REGIMES, SHORTCUT_RELIANCE, SKILL, control_of, control_problems,
    counted, detection, due_epoch, gap_epoch, is_late, label, lead_time, onset_epoch, recipe, replay_alarm_epoch,
    run_jobs, run_kind, settings_of,
)
from harness import RESULTS, display, fmt, median, rounded, table

STRONG_CUES = (0.8, 0.95, 1.0)
# The same regimes' insertion ratios, the defaults before the swap ratios: compared with them.
INSERTION_REGIMES = {regime: key.replace("_swap_", "_insertion_") for regime, key in REGIMES.items()}
# The replay grids for the threshold (a ratio is 1 where the suspect region and the rest count equally; a share
# is the share of swap pairs that follow the swapped region), and the finer ones the window is measured on.
RATIO_SWEEP = (1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
SHARE_SWEEP = tuple(round(0.05 * k, 2) for k in range(1, 20))
RATIO_WINDOW_GRID = tuple(round(0.25 * 1.05 ** k, 4) for k in range(100))
SHARE_WINDOW_GRID = tuple(round(0.01 * k, 2) for k in range(1, 100))
SWEEP_PATIENCE = (1, 2)


class Watch(NamedTuple):
    """A monitor compared: the runs whose scores it reads, its score per regime, its title and threshold grids."""

    method: str
    regimes: Dict[str, str]
    title: str
    sweep: Tuple[float, ...] = RATIO_SWEEP
    window_grid: Tuple[float, ...] = RATIO_WINDOW_GRID


# The model tests are read from CAAP's fits (a baseline's replay sees the same models, so the same values).
WATCHES = {
    "follow": Watch("caap", FOLLOW_REGIMES, "Swap follow shares (the share of swap pairs that follow the swapped "
                    "region; they test the model, not a map)", SHARE_SWEEP, SHARE_WINDOW_GRID),
    "swap": Watch("caap", REGIMES, "Swap ratios (they test the model, not a map)"),
    "insertion": Watch("caap", INSERTION_REGIMES, "Insertion ratios (they test the model)"),
    "caap": Watch("caap", MAP_REGIMES, "CAAP maps (density ratios and the fixed-position ratio)"),
    "gradcam": Watch("gradcam", MAP_REGIMES, "Grad-CAM maps (density ratios and the fixed-position ratio)"),
}
# The cue kinds each regime's target covers: without masks, a cue at a fixed position (the border ring), or one
# around the centre (the surround, a background too).
TARGET_CUES = {
    "cue+object masks": CUE_KINDS,
    "object masks only": CUE_KINDS,
    "cue masks only": CUE_KINDS,
    "no masks: border ring": ("watermark", "border"),
    "no masks: surround": ("watermark", "border", "background"),
    "no masks": ("watermark", "border"),
}
# The watch the monitor's defaults are (its scores per regime), and the watches drawn per init and dataset.
DEFAULT_WATCH = "follow" if DEFAULT_SCORES[0].endswith("_follow_share") else "swap"
PLOTTED = ("follow", "swap")
# The threshold is chosen on these (dataset, cue kind) pairs and confirmed on the others.
TUNING = (("shapes", "marker"), ("shapes", "watermark"), ("shapes", "background"))


# ---------------------------------------------------------------------- what a run's history says


def methods_of(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """The methods of ``runs`` in their first-seen order (CAAP's trained runs come first)."""
    return list(dict.fromkeys(r["method"] for r in runs))


def in_tuning(run: Dict[str, Any]) -> bool:
    return (run["dataset"], run["cue"]) in TUNING


# ---------------------------------------------------------------------- detection and targets
def with_alarms(
    runs: Sequence[Dict[str, Any]], regime: str, monitor: Dict[str, Any], regimes: Dict[str, str] = REGIMES
) -> List[Dict[str, Any]]:
    """``runs`` with their ``alarm_epoch`` under ``regime``'s monitor (``monitor``: threshold, patience, min_delta,
    min_skill) watching its score of ``regimes``, and their ``due_epoch`` (:func:`cue_runs.due_epoch`)."""
    key = regimes[regime]
    return [{**r, "alarm_epoch": replay_alarm_epoch(r["history"], key, **monitor), "due_epoch": due_epoch(r["history"])}
            for r in runs]


def by_cue_kind(runs: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``detection`` per init, dataset and cue kind, keyed ``"<init>/<dataset>/<cue>"``."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(f"{init_of(run)}/{run['dataset']}/{run['cue']}", []).append(run)
    return {name: detection(group) for name, group in groups.items()}


def init_of(run: Dict[str, Any]) -> str:
    return run.get("init", "scratch")


def target_check(runs: Sequence[Dict[str, Any]], regime: str) -> Dict[str, Any]:
    """The issue's targets for one regime, on runs that carry ``alarm_epoch``.

    Every shortcut run of the regime's cue kinds alarmed, no control alarmed, median lead >= 0
    and no alarm more than one epoch after the due epoch (the gap, or the cue followed on 40%).
    """
    covered = detection([r for r in runs if r["cue"] in TARGET_CUES[regime] or r["control"]])
    return {
        "cues": list(TARGET_CUES[regime]),
        "all_shortcuts_alarmed": not covered["missed"] and covered["shortcut_runs"] > 0,
        "no_control_alarm": not covered["false_alarm_runs"],
        "lead": covered["median_lead_epochs"] is not None and covered["median_lead_epochs"] >= 0 and not covered["late_runs"],
        "detail": covered,
    }


def targets_met(check: Dict[str, Any]) -> int:
    return sum(check[k] for k in ("all_shortcuts_alarmed", "no_control_alarm", "lead"))


def all_met(check: Dict[str, Any]) -> bool:
    return targets_met(check) == 3


def choose_threshold(
    runs: Sequence[Dict[str, Any]], monitor: Dict[str, Any], watch: Watch
) -> Optional[Dict[str, Any]]:
    """The sweep's threshold and patience that meet most targets of every regime on the tuning runs (``None``: no
    tuning runs).

    Ties go to the fewest missed shortcut runs plus false alarms, then to the fewest alarms more
    than one epoch after the due epoch and the earliest alarms (the sum of the regimes' median
    leads), then to the larger patience (the one less likely to alarm on a noisy check), then to
    the middle of that patience's tied thresholds: a plateau's middle is the choice least likely to
    tip over on held-out runs.
    """
    tuning = [r for r in runs if in_tuning(r)]
    if not tuning:
        return None
    rows = []
    for patience, threshold in itertools.product(SWEEP_PATIENCE, watch.sweep):
        settings = {**monitor, "threshold": threshold, "patience": patience}
        checks = {regime: target_check(with_alarms(tuning, regime, settings, watch.regimes), regime)
                  for regime in watch.regimes}
        errors = sum(len(c["detail"]["missed"]) + len(c["detail"]["false_alarm_runs"]) for c in checks.values())
        late = sum(len(c["detail"]["late_runs"]) for c in checks.values())
        leads = [c["detail"]["median_lead_epochs"] for c in checks.values()]
        lead = sum(leads) if all(v is not None for v in leads) else -math.inf
        rows.append({"threshold": threshold, "patience": patience, "targets_met": sum(targets_met(c) for c in checks.values()),
                     "errors": errors, "late": late, "lead": lead, "checks": {regime: compact(c) for regime, c in checks.items()}})

    def rank(row: Dict[str, Any]) -> Tuple[int, int, int, float]:
        return row["targets_met"], -row["errors"], -row["late"], row["lead"]

    best = max(rank(r) for r in rows)
    tied = [r for r in rows if rank(r) == best]
    patience = max(r["patience"] for r in tied)
    thresholds = [r["threshold"] for r in tied if r["patience"] == patience]
    return {"tuning": [f"{d}/{c}" for d, c in TUNING], "sweep": rows, "patience": patience, "tied": thresholds,
            "threshold": thresholds[(len(thresholds) - 1) // 2]}


def compact(check: Dict[str, Any]) -> Dict[str, Any]:
    """A target check without its per-run lists, for the sweep table."""
    detail = check["detail"]
    return {
        **{k: check[k] for k in ("all_shortcuts_alarmed", "no_control_alarm", "lead")},
        **{k: detail[k] for k in ("shortcut_runs", "alarmed", "controls", "false_alarms", "median_lead_epochs")},
    }


def threshold_checks(
    runs: Sequence[Dict[str, Any]], regime: str, monitor: Dict[str, Any], watch: Watch
) -> List[Tuple[float, Dict[str, Any]]]:
    """Each threshold of ``watch.window_grid`` (at ``monitor``'s other settings) with ``regime``'s targets on ``runs``
    (:func:`target_check`)."""
    return [(t, target_check(with_alarms(runs, regime, {**monitor, "threshold": t}, watch.regimes), regime))
            for t in watch.window_grid]


def threshold_window(
    runs: Sequence[Dict[str, Any]], regime: str, monitor: Dict[str, Any], watch: Watch
) -> Dict[str, Any]:
    """The thresholds of ``watch.window_grid`` (at ``monitor``'s patience) that meet every target of ``regime`` on
    every run, on scratch runs and fine-tunes alike: the widest unbroken stretch of them, and its width
    (highest over lowest; the issue asks for at least 2)."""
    met = [t for t, check in threshold_checks(runs, regime, monitor, watch) if all_met(check)]
    stretches: List[List[float]] = []
    for t in met:
        grid = watch.window_grid
        if stretches and grid.index(t) == grid.index(stretches[-1][-1]) + 1:
            stretches[-1].append(t)
        else:
            stretches.append([t])
    widest = max(stretches, key=lambda s: s[-1] / s[0], default=None)
    if widest is None:
        return {"low": None, "high": None, "width": None}
    return {"low": widest[0], "high": widest[-1], "width": rounded(widest[-1] / widest[0], 2)}


def control_peaks(runs: Sequence[Dict[str, Any]], key: str, min_skill: Optional[float]) -> Dict[str, Any]:
    """The controls' highest reading of ``key`` at a judged check (the monitor counts it) and at one it does not
    count (the model could not tell the swap probe's classes apart), with where each came."""
    out: Dict[str, Any] = {}
    for name, judged in (("judged", True), ("not_judged", False)):
        found = [(row[key], label(r), row["epoch"], row.get("accuracy")) for r in runs if r["control"]
                 for row in r["history"] if row.get(key) is not None and counted(row, key, min_skill) == judged]
        peak = max(found, default=None)
        out[name] = None if peak is None else {"score": peak[0], "run": peak[1], "epoch": peak[2], "accuracy": peak[3]}
    return out


SKILL_SWEEP = (None, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def skill_sweep(runs: Sequence[Dict[str, Any]], settings: Dict[str, Any], watch: Watch) -> List[Dict[str, Any]]:
    """Per ``min_skill`` of ``SKILL_SWEEP`` (``None``: every check counts), at ``settings``' threshold and patience:
    each regime's targets on every run, its window of thresholds and the controls' highest judged reading."""
    trained = [r for r in runs if r["method"] == watch.method]
    rows = []
    for min_skill in SKILL_SWEEP:
        monitor = {**settings, "min_skill": min_skill}
        regimes = {}
        for regime, key in watch.regimes.items():
            check = target_check(with_alarms(trained, regime, monitor, watch.regimes), regime)
            regimes[regime] = {**compact(check), "window": threshold_window(trained, regime, monitor, watch),
                               "control_peak": control_peaks(trained, key, min_skill)["judged"]}
        rows.append({"min_skill": min_skill, "regimes": regimes})
    return rows


def skill_section(rows: Sequence[Dict[str, Any]], watch: str, settings: Dict[str, Any]) -> List[str]:
    lines = ["", f"## {watch_title(watch)}: which checks to judge (`min_skill`)", "",
             f"At threshold {fmt(settings['threshold'])} and patience {settings['patience']}, each `min_skill` (none: "
             "every check counts). A cell: shortcut runs alarmed · controls alarmed · median lead; the window of "
             "thresholds that meets every target (its width); the controls' highest judged reading.", ""]
    regimes = list(rows[0]["regimes"]) if rows else []
    body = []
    for row in rows:
        cells_ = []
        for regime in regimes:
            r = row["regimes"][regime]
            window, peak = r["window"], r["control_peak"]
            span = "none" if window["low"] is None else f"{fmt(window['low'], 3)}-{fmt(window['high'], 3)} ({fmt(window['width'])}x)"
            cells_.append(f"{r['alarmed']}/{r['shortcut_runs']} · {r['false_alarms']}/{r['controls']} · "
                          f"{fmt(r['median_lead_epochs'])}; {span}; {fmt(None if peak is None else peak['score'], 3)}")
        body.append([fmt(row["min_skill"]), *cells_])
    return lines + table(["min_skill", *regimes], body)


def watches_of(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """The monitors of ``WATCHES`` whose runs are among ``runs``."""
    methods = methods_of(runs)
    return [name for name, watch in WATCHES.items() if watch.method in methods]


def summarize(runs: Sequence[Dict[str, Any]], monitor: Dict[str, Any]) -> Dict[str, Any]:
    """Per monitor compared (``WATCHES``): the threshold and patience chosen on the tuning runs; per regime,
    detection by init and cue kind and the targets at that choice (on every run, per init, and on the held-out
    runs), the window of thresholds that meets every target, and the controls' highest judged reading."""
    summary: Dict[str, Any] = {}
    for name in watches_of(runs):
        watch = WATCHES[name]
        group = [r for r in runs if r["method"] == watch.method]
        choice = choose_threshold(group, monitor, watch)
        held_out = [r for r in group if not in_tuning(r)] if choice is not None else []
        chosen = monitor if choice is None else {**monitor, "threshold": choice["threshold"], "patience": choice["patience"]}
        if name == DEFAULT_WATCH:  # the monitor's defaults watch these scores: read them at its settings
            chosen = monitor
        regimes = {}
        for regime, key in watch.regimes.items():
            replayed = with_alarms(group, regime, chosen, watch.regimes)
            inits = list(dict.fromkeys(init_of(r) for r in group))
            regimes[regime] = {
                "score": key,
                "by_cue": by_cue_kind(replayed),
                "targets": target_check(replayed, regime),
                "targets_by_init": {init: target_check([r for r in replayed if init_of(r) == init], regime)
                                    for init in inits},
                "held_out_at_chosen": (
                    target_check(with_alarms(held_out, regime, chosen, watch.regimes), regime) if held_out else None
                ),
                "window": threshold_window(group, regime, chosen, watch),
                "control_peaks": control_peaks(group, key, chosen.get("min_skill")),
            }
        summary[name] = {"regimes": regimes, "threshold_choice": choice, "settings": chosen}
        if watch.method == "caap" and name in PLOTTED:
            summary[name]["skill_sweep"] = skill_sweep(group, chosen, watch)
    return summary


def ground_truth(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Per dataset, cue kind and strength (the trained runs): shortcut runs, accuracies, reliance; the flawed controls."""
    trained = [r for r in runs if r["method"] == "caap"]
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for run in trained:
        groups.setdefault(f"{init_of(run)}/{run['dataset']}/{run['cue']}/{run['cue_correlation']}", []).append(run)
    table = {
        name: {
            "control": group[0]["control"],
            "runs": len(group),
            "shortcut_runs": sum(run_kind(r) == "shortcut" for r in group),
            "accuracy": [r["history"][-1]["accuracy"] for r in group],
            "reliance": [r["history"][-1]["reliance"] for r in group],
            "gap_epochs": [gap_epoch(r["history"]) for r in group],
            "onset_epochs": [onset_epoch(r["history"]) for r in group],
            "first_judged": [next((row["epoch"] for row in r["history"] if row.get("judged")), None) for r in group],
        }
        for name, group in groups.items()
    }
    flawed = {label(r): control_problems(r) for r in trained if r["control"] and control_problems(r)}
    other = [label(r) for r in trained if run_kind(r) == "other"]
    # The reference detector's own false alarms: a gap on a control is noise of the accuracies, not a cue.
    control_gaps = [(label(r), gap_epoch(r["history"])) for r in trained if r["control"]]
    gap_on_controls = [f"{name} (epoch {gap})" for name, gap in control_gaps if gap is not None]
    return {"by_group": table, "flawed_controls": flawed, "not_shortcut": other,
            "controls": len(control_gaps), "gap_on_controls": gap_on_controls}


def late_alarms(runs: Sequence[Dict[str, Any]], monitor: Dict[str, Any], watch: Watch) -> Dict[str, Any]:
    """Per regime (regimes of one score together), CAAP's shortcut runs of its cue kinds that alarmed later than
    the lead target allows under ``watch`` at ``monitor``: the due epoch, reliance and watched score at it and
    the one after; and the highest judged score any control reached, which a threshold must stay above."""
    trained = [r for r in runs if r["method"] == "caap"]
    # Regimes that watch the same score over the same cue kinds replay the same alarms: one entry for them.
    merged: Dict[Tuple[str, Tuple[str, ...]], List[str]] = {}
    for regime, key in watch.regimes.items():
        merged.setdefault((key, tuple(TARGET_CUES[regime])), []).append(regime)
    out = {}
    for (key, cues), names in merged.items():
        regime = names[0]
        late = []
        covered = [r for r in trained if r["cue"] in cues and run_kind(r) == "shortcut"]
        for run in with_alarms(covered, regime, monitor, watch.regimes):
            if not is_late(lead_time(run["alarm_epoch"], run["due_epoch"])):
                continue
            # History rows are epochs 1, 2, ...: row due - 1 is the due epoch; an alarm this late has a row after it.
            at, after = run["history"][run["due_epoch"] - 1], run["history"][run["due_epoch"]]
            late.append({
                "run": label(run), "due_epoch": run["due_epoch"], "alarm_epoch": run["alarm_epoch"],
                "gap_points": rounded(at["acc_consistent"] - at["acc_conflicting"], 1),
                "reliance": [at["reliance"], after["reliance"]], "score": [at[key], after[key]],
                "judged": [at.get("judged"), after.get("judged")],
            })
        out[", ".join(names)] = {"score": key, "late": late,
                                 "control_peak": control_peaks(trained, key, monitor.get("min_skill"))["judged"]}
    return out


# ---------------------------------------------------------------------- reports
def swap_probe_size(setup: Dict[str, Any]) -> str:
    """The images the swap ratios ran on: the probe or ``swap_images``, the larger (runs recorded before
    ``swap_images`` existed swapped within the probe)."""
    return f"{max(setup['num_images'], setup.get('swap_images', 0))} images"


def cells(values: Iterable[Any], digits: int = 2) -> str:
    return ", ".join(fmt(v, digits) for v in values)


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def setup_section(setup: Dict[str, Any], n_runs: int) -> List[str]:
    live = setup["monitor"]
    lines = [
        "# Spurious-cue detection benchmark: cue kinds, datasets and mask regimes",
        "",
        f"`{setup['command']}`: seeds {cells(setup['seeds'])}; cue strengths "
        + "; ".join(f"{d}: {cells(s)}" for d, s in setup["cue_correlations"].items())
        + f" (the first: the control, 1 / classes); {setup['workers']} worker process(es) of 1 CPU thread ({setup['machine']}).",
        *setup.get("amended", []),
        *([setup["rescored"]] if setup.get("rescored") else []),
        "",
        "Recipes (a tiny ViT, `caap_lightning/configs/demo.yaml`'s: "
        f"{setup['model_summary']}; `CAAPCallback` with a probe of {setup['num_images']} images "
        f"(the swap ratios: {swap_probe_size(setup)}), `construction=\"{setup['construction']}\"`). "
        "`init: scratch` trains it from random weights; `init: pretrained` first trains it on clean data of the same "
        "domain with no cue (the pretraining column), then fine-tunes it with a fresh head on the cue set, as a user "
        "fine-tunes a pretrained ViT:",
        "",
    ]
    seconds = setup["run_seconds"]
    lines += table(
        ["dataset/init", "data", "pretraining (no cue)", "epochs x batches of 64", "lr",
         "a trained run: median wall s (CPU s)", "a baseline's replay: median wall s"],
        [[name, ", ".join(f"{k}={v}" for k, v in r["data"].items() if k not in ("mean", "std")),
          pretraining_text(r), f"{r['epochs']} x {r['batches_per_epoch']}", fmt(r["model"]["lr"], 4),
          f"{fmt(seconds.get(name, {}).get('trained'), 0)} ({fmt(seconds.get(name, {}).get('trained_cpu'), 0)})",
          fmt(seconds.get(name, {}).get("replayed"), 0)]
         for name, r in setup["recipes"].items()],
    )
    lines += [
        "",
        f"Monitor: `SpuriousCueMonitor` settings `threshold={live['threshold']}`, `patience={live['patience']}`, "
        f"`min_delta={live['min_delta']}`, `min_skill={live.get('min_skill')}` (its defaults: "
        f"{defaults_text(setup['monitor_defaults'])}). "
        + live_monitor_text(setup) + " "
        + ("Each baseline replays the CAAP fit's weights epoch by epoch (same accuracies every epoch: "
           f"{'checked' if setup['baselines_replay_caap_weights'] else 'MISMATCH, see the JSON'})." if setup["methods"][1:] else ""),
        "",
        f"Wall time: {setup['wall_min']:.1f} min for {n_runs} runs; load average {setup['load_average']} at the start.",
        "",
        "Definitions. *Reliance*: the share of cue-conflicting validation images (all "
        f"{setup['num_val']}; the cue is independent of the label there) predicted as the cue's class. *Onset*: the "
        f"first epoch with reliance >= {SHORTCUT_RELIANCE:g}%; a *shortcut run* is one that has an onset. *Control*: "
        f"cue strength 1 / classes; it should reach >= {CONTROL_ACCURACY:g}% validation accuracy with reliance < "
        f"{CONTROL_RELIANCE:g}% at every epoch. *Gap epoch*: the first epoch at which cue-conflicting accuracy is "
        f"{GAP_POINTS:g} points below cue-consistent accuracy (reported beside the onset: in a slow fine-tune it can open "
        "while the model follows the cue on few images). *Due epoch*: the onset; *lead* = due epoch - alarm epoch "
        "(positive: the alarm came first), and an alarm more than "
        f"{-LATEST_LEAD} epoch after the due epoch is late. *Judged*: a check whose swap probe skill "
        "(`caap/swap_probe_skill`: the mean top-1 probability of the clean swap probe, chance-corrected) reaches the "
        "monitor's `min_skill`; a swap-test monitor counts only judged checks. Mask regimes and the swap test each "
        "watches: " + "; ".join(f"{regime}: `{score}`" for regime, score in REGIMES.items())
        + ", as a ratio or as the share of pairs that follow the swapped region (`*_follow_share`); the insertion "
        "ratios compared with them: " + "; ".join(f"{regime}: `{score}`" for regime, score in INSERTION_REGIMES.items())
        + "; the map-based scores: "
        + "; ".join(f"{regime}: `{score}`" for regime, score in MAP_REGIMES.items()) + ". A "
        "background cue's mask is every pixel but the object, so for it the first three regimes watch the same region "
        "(the cue swap lays such a mask behind the image's object, as a backdrop: `is_backdrop`).",
    ]
    return lines


def pretraining_text(recipe: Dict[str, Any]) -> str:
    pretrain = recipe.get("pretrain")
    if pretrain is None:
        return "-"
    data = ", ".join(f"{k}={v}" for k, v in pretrain["data"].items() if k in ("classes", "num_classes", "cue", "cue_correlation"))
    return f"{data}; {pretrain['epochs']} epochs"


def live_monitor_text(setup: Dict[str, Any]) -> str:
    """What the live monitor ran with, and whether the replay reproduced it when the grid ran."""
    checked = "checked" if setup["replay_matches_live"] else "NO, see the JSON"
    ran = setup.get("live_monitor", None if setup.get("rescored") else setup["monitor"])
    if ran is None:  # rescored before the live settings were kept apart from the replayed ones
        return (f"A live monitor on `{setup['monitor']['monitor']}` watched each fit with the settings of the code that ran "
                f"the grid, which this rescored file no longer holds; replaying the recorded scores with those settings "
                f"reproduced its alarms: {checked}.")
    return (f"A live monitor on `{setup['monitor']['monitor']}` watched each fit (`threshold={ran['threshold']}`, "
            f"`patience={ran['patience']}`, `min_delta={ran['min_delta']}`, `min_skill={ran.get('min_skill')}`); "
            "replaying the recorded scores with those "
            f"settings reproduces its alarms: {checked}.")


def ground_truth_section(truth: Dict[str, Any]) -> List[str]:
    lines = ["", "## Ground truth (trained runs)", ""]
    lines += table(
        ["dataset/cue/strength", "runs", "shortcut runs", "final accuracy %", "final reliance %", "gap epochs"],
        [[name + (" (control)" if g["control"] else ""), g["runs"], g["shortcut_runs"], cells(g["accuracy"], 1),
          cells(g["reliance"], 1), cells(g["gap_epochs"])] for name, g in truth["by_group"].items()],
    )
    flawed = truth["flawed_controls"]
    lines += [
        "",
        "Controls that are not clean: " + ("none." if not flawed else "; ".join(f"{k}: {', '.join(v)}" for k, v in flawed.items()) + "."),
        "Runs with an informative cue that did not become shortcut runs (counted in neither detections nor false alarms): "
        + (", ".join(truth["not_shortcut"]) if truth["not_shortcut"] else "none") + ".",
        f"The accuracy-gap detector itself fires on {len(truth['gap_on_controls'])} of {truth['controls']} controls"
        + (": " + ", ".join(truth["gap_on_controls"]) if truth["gap_on_controls"] else "") + ".",
    ]
    return lines


def late_section(late: Dict[str, Any], watch: str) -> List[str]:
    lines = [
        "", f"## {watch_title(watch)} at the chosen setting: alarms more than {-LATEST_LEAD} epoch after the due epoch", "",
        "What the shortcut runs behind each late alarm showed at the due epoch (g) and "
        "one epoch later (g + 1), against the highest judged score any control reached in that regime. Where a late "
        "run's score at g + 1 is at or below that peak, no threshold of that score alarms by g + 1 and leaves every "
        "control clean.", "",
    ]
    rows = [[regime, f"`{part['score']}`", item["run"], f"{item['due_epoch']} ({fmt(item['gap_points'], 1)})",
             cells(item["reliance"], 1), cells(item["score"]), cells(item["judged"]), item["alarm_epoch"]]
            for regime, part in late.items() for item in part["late"]]
    if not rows:
        return lines + ["None: every alarm came at most one epoch after the due epoch."]
    lines += table(["regime", "score", "run", "due epoch g (gap, points)", "reliance % at g, g + 1", "score at g, g + 1",
                    "judged at g, g + 1", "alarm epoch"], rows)
    lines.append("")
    for regime, part in late.items():
        peak = part["control_peak"]
        if part["late"] and peak is not None:
            below = sum(item["score"][1] is not None and item["score"][1] <= peak["score"] for item in part["late"])
            lines.append(f"- {regime}: controls' highest judged `{part['score']}` {fmt(peak['score'])} ({peak['run']}, "
                         f"epoch {peak['epoch']}); {below} of {len(part['late'])} late runs are at or below it at g + 1.")
    return lines


def watch_title(name: str) -> str:
    return WATCHES[name][2]


def detection_section(name: str, part: Dict[str, Any]) -> List[str]:
    chosen = part["settings"]
    which = "the monitor's setting" if name == DEFAULT_WATCH else "the setting chosen on the tuning runs"
    lines = ["", f"## {watch_title(name)}: detection at {which} (threshold {fmt(chosen['threshold'])}, "
             f"patience {chosen['patience']}, min_skill {fmt(chosen.get('min_skill'))})", ""]
    rows = []
    for regime, result in part["regimes"].items():
        for group, d in result["by_cue"].items():
            rows.append([regime, group, f"{d['alarmed']}/{d['shortcut_runs']}", f"{d['false_alarms']}/{d['controls']}",
                         cells(d["alarm_epochs"]), cells(d["due_epochs"]), cells(d["lead_epochs"]), fmt(d["median_lead_epochs"])])
    lines += table(["regime", "init/dataset/cue", "shortcut runs alarmed", "controls alarmed", "alarm epochs",
                    "due epochs", "lead (epochs)", "median lead"], rows)
    lines += ["", "Targets, per init:", ""]
    for regime, result in part["regimes"].items():
        for init, check in result["targets_by_init"].items():
            lines.append(target_line(f"{regime}, {init}", check))
    lines += [
        "", "The window of thresholds that meets every target of a regime on every run (both inits; the widest "
        "unbroken stretch of a fine grid), and the controls' highest reading at a judged check (which the monitor "
        "counts) and at a check it does not judge:", "",
    ]
    rows = []
    for regime, result in part["regimes"].items():
        window, peaks = result["window"], result["control_peaks"]
        half = None if window["low"] is None or peaks["judged"] is None else peaks["judged"]["score"] <= chosen["threshold"] / 2
        rows.append([regime, f"`{result['score']}`", f"{fmt(window['low'], 3)} - {fmt(window['high'], 3)}", fmt(window["width"]),
                     peak_text(peaks["judged"]), peak_text(peaks["not_judged"]),
                     "-" if half is None else ("yes" if half else "no")])
    lines += table(["regime", "score", "window", "width (high / low)", "controls' highest judged",
                    "controls' highest not judged", "judged peak <= threshold / 2"], rows)
    return lines


def peak_text(peak: Optional[Dict[str, Any]]) -> str:
    if peak is None:
        return "-"
    return f"{fmt(peak['score'], 3)} ({peak['run']}, epoch {peak['epoch']}, accuracy {fmt(peak['accuracy'], 1)}%)"


def target_line(regime: str, check: Dict[str, Any]) -> str:
    detail = check["detail"]
    missed = f" (missed: {', '.join(detail['missed'])})" if detail["missed"] else ""
    false = f" (false alarms: {', '.join(detail['false_alarm_runs'])})" if detail["false_alarm_runs"] else ""
    late = f"; later than {-LATEST_LEAD} epoch after the due epoch: {', '.join(detail['late_runs'])}" if detail["late_runs"] else ""
    return (
        f"- {regime} ({', '.join(check['cues'])} cues): every shortcut run alarmed "
        f"({detail['alarmed']}/{detail['shortcut_runs']}): {met(check['all_shortcuts_alarmed'])}{missed}; no control alarmed "
        f"({detail['false_alarms']}/{detail['controls']}): {met(check['no_control_alarm'])}{false}; median lead >= 0 and "
        f"none later than {-LATEST_LEAD} epoch after the due epoch (median {fmt(detail['median_lead_epochs'])}): "
        f"{met(check['lead'])}{late}."
    )


def threshold_section(name: str, part: Dict[str, Any], live: Dict[str, Any]) -> List[str]:
    choice = part["threshold_choice"]
    lines = ["", f"## {watch_title(name)}: choosing the threshold and patience", ""]
    if choice is None:
        return lines + [f"No tuning runs ({', '.join(f'{d}/{c}' for d, c in TUNING)}) in this run: no threshold chosen."]
    regimes = list(part["regimes"])
    lines += [
        f"Each regime's monitor replayed on the tuning runs ({', '.join(choice['tuning'])}) for each patience and "
        "threshold, with the monitor's min_delta and min_skill. A cell: shortcut runs alarmed · controls alarmed · "
        "median lead, "
        "**bold** when the regime's three targets are met.",
        "",
    ]
    rows = []
    for row in choice["sweep"]:
        rows.append([row["patience"], fmt(row["threshold"])] + [sweep_cell(row["checks"][regime]) for regime in regimes]
                    + [row["targets_met"]])
    lines += table(["patience", "threshold", *regimes, f"targets met (of {3 * len(regimes)})"], rows)
    chosen, patience = choice["threshold"], choice["patience"]
    same = chosen == live["threshold"] and patience == live["patience"]
    lines += [
        "",
        f"Chosen: patience {patience}, threshold {fmt(chosen)} (best on the tuning runs at that patience: "
        f"{cells(choice['tied'])}; ties go to the fewest late alarms, the earliest alarms, the larger patience, then the "
        "middle threshold). The detection tables use it (those of the monitor's default scores use the monitor's "
        "setting); the monitor's own settings are "
        f"patience {live['patience']}, threshold {fmt(live['threshold'])}: {'the same' if same else 'a different setting'}.",
    ]
    held = {regime: result["held_out_at_chosen"] for regime, result in part["regimes"].items()}
    if all(h is None for h in held.values()):
        return lines + ["No held-out runs in this run: nothing to confirm the threshold on."]
    lines += ["", f"Held-out runs (every other dataset/cue kind) at patience {patience}, threshold {fmt(chosen)}:", ""]
    lines += [target_line(regime, check) for regime, check in held.items() if check is not None]
    return lines


def sweep_cell(check: Dict[str, Any]) -> str:
    text = f"{check['alarmed']}/{check['shortcut_runs']} · {check['false_alarms']}/{check['controls']} · {fmt(check['median_lead_epochs'])}"
    return f"**{text}**" if check["all_shortcuts_alarmed"] and check["no_control_alarm"] and check["lead"] else text


def scores_section(runs: Sequence[Dict[str, Any]], summary: Dict[str, Any]) -> List[str]:
    """Every recorded score as the only score of a monitor, per cue kind: what each would catch in any regime whose
    masks allow it. A follow share is read at the follow-share watch's chosen setting, any other score at the swap
    ratios'."""
    cues = list(dict.fromkeys(r["cue"] for r in runs))
    lines = [
        "", "## Every recorded score, per cue kind", "",
        "Each score watched alone by a monitor at the chosen setting of its kind (the follow shares' for a follow "
        "share, the swap ratios' for any other score), over both datasets and inits. A cell: shortcut runs "
        "alarmed · controls alarmed · median lead. The model tests (swap and insertion ratios) are read from CAAP's "
        "fits (they do not depend on the maps); the map-based scores from each method's own.", "",
    ]
    rows = []
    for method in methods_of(runs):
        group = [r for r in runs if r["method"] == method]
        for key in [k for k in RECORDED if k != SKILL] if method == "caap" else MAP_REGIMES.values():
            monitor = settings_for(key, summary)
            cell = []
            for cue in cues:
                d = detection(with_alarms([r for r in group if r["cue"] == cue], key, monitor, {key: key}))
                cell.append(f"{d['alarmed']}/{d['shortcut_runs']} · {d['false_alarms']}/{d['controls']} · "
                            f"{fmt(d['median_lead_epochs'])}")
            source = "the model" if key in MODEL_TESTS else f"{display(method)} maps"
            rows.append([f"`{key}`", source, *cell])
    return lines + table(["score", "reads", *cues], rows)


def settings_for(key: str, summary: Dict[str, Any]) -> Dict[str, Any]:
    """The chosen monitor setting for a score of ``key``'s kind: a follow share's, or the swap ratios'."""
    return summary["follow" if key.endswith("_follow_share") else "swap"]["settings"]


def runs_section(runs: Sequence[Dict[str, Any]], summary: Dict[str, Any]) -> List[str]:
    lines = [
        "", "## Per run: final epoch", "",
        "Scores: final (maximum); alarms of the default watch's scores at its chosen setting. The model tests of "
        "a baseline's row are those of the CAAP fit (the same models); its map-based scores are from its own maps.", "",
    ]
    rows = []
    for run in runs:
        last = run["history"][-1]
        scores = []
        for key in RECORDED:
            peak = max((row[key] for row in run["history"] if row.get(key) is not None), default=None)
            scores.append(f"{fmt(last.get(key))} ({fmt(peak)})")
        watch = WATCHES[DEFAULT_WATCH]
        monitor = summary[DEFAULT_WATCH]["settings"]
        alarms = [fmt(replay_alarm_epoch(run["history"], key, **monitor)) for key in watch.regimes.values()]
        rows.append([display(run["method"]), init_of(run), run["dataset"], run["cue"], run["cue_correlation"], run["seed"],
                     run_kind(run), fmt(last["accuracy"], 1), fmt(last["reliance"], 1), *scores,
                     fmt(gap_epoch(run["history"])), fmt(due_epoch(run["history"])), *alarms])
    header = ["method", "init", "dataset", "cue", "strength", "seed", "kind", "accuracy %", "reliance %", *RECORDED, "gap", "due",
              *(f"alarm ({regime})" for regime in WATCHES[DEFAULT_WATCH].regimes)]
    return lines + table(header, rows)


def markdown(result: Dict[str, Any]) -> str:
    setup, summary, runs = result["setup"], result["summary"], result["runs"]
    monitor = monitor_settings(setup)
    lines = setup_section(setup, len(runs))
    lines += ground_truth_section(result["ground_truth"])
    for name, part in summary.items():
        lines += detection_section(name, part)
        lines += threshold_section(name, part, monitor)
        if "skill_sweep" in part:
            lines += skill_section(part["skill_sweep"], name, part["settings"])
    lines += late_section(result["late_alarms"], DEFAULT_WATCH)
    lines += scores_section(runs, summary)
    lines += runs_section(runs, summary)
    lines += ["", "Score trajectories (one panel per regime and cue kind; v = alarm at the watch's chosen setting; "
              "hollow points: checks not judged):", ""]
    lines += [f"![{name}]({name})" for name in setup["plots"]]
    return "\n".join(lines) + "\n"


def defaults_text(defaults: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {fmt(v)}" for k, v in defaults.items())


def monitor_settings(setup: Dict[str, Any]) -> Dict[str, Any]:
    return {k: setup["monitor"].get(k) for k in ("threshold", "patience", "min_delta", "min_skill")}


def plot_name(stem: str, init: str, dataset: str, watch: str) -> str:
    return f"{stem}_{init}_{dataset}_{watch}.png"


def plot_names(stem: str, runs: Sequence[Dict[str, Any]]) -> List[str]:
    return [plot_name(stem, init, dataset, watch) for init, dataset, watch in plotted(runs)]


def plotted(runs: Sequence[Dict[str, Any]]) -> List[Tuple[str, str, str]]:
    """The (init, dataset, watch) of each plot: the model tests' watches, per init and dataset."""
    inits = list(dict.fromkeys(init_of(r) for r in runs))
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    return list(itertools.product(inits, datasets, [w for w in PLOTTED if w in watches_of(runs)]))


def plot(runs: Sequence[Dict[str, Any]], path: Path, monitor: Dict[str, Any], watch: str) -> None:
    """A monitor's scores per epoch: a row per regime, a column per cue kind, a colour per cue strength."""
    regimes = WATCHES[watch].regimes
    shares = watch == "follow"
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

    cues = list(dict.fromkeys(r["cue"] for r in runs))
    strengths = sorted({r["cue_correlation"] for r in runs})
    palette = iter(("tab:orange", "tab:red", "tab:purple", "tab:blue", "tab:green", "tab:brown"))
    colours = {s: "tab:grey" if any(r["control"] for r in runs if r["cue_correlation"] == s) else next(palette) for s in strengths}
    first_seed = min(r["seed"] for r in runs)
    figure = Figure(figsize=(max(3.6 * len(cues), 6.0), 2.8 * len(regimes)), dpi=100)
    axes = figure.subplots(len(regimes), len(cues), squeeze=False, sharex=True)
    for (row, (regime, key)), (col, cue) in itertools.product(enumerate(regimes.items()), enumerate(cues)):
        ax = axes[row, col]
        for run in (r for r in runs if r["cue"] == cue):
            epochs = [h["epoch"] for h in run["history"]]
            scores = [h[key] if h[key] is not None else math.nan for h in run["history"]]
            name = ("control" if run["control"] else f"cue {run['cue_correlation']}") if run["seed"] == first_seed else None
            style = dict(color=colours[run["cue_correlation"]], alpha=0.8, lw=1.2)
            ax.plot(epochs, scores, label=name, **style)
            unjudged = [(e, v) for e, v, h in zip(epochs, scores, run["history"]) if not counted(h, key, monitor.get("min_skill"))]
            if unjudged:
                ax.plot(*zip(*unjudged), "o", mfc="none", color=style["color"], ms=3, lw=0)
            alarm = replay_alarm_epoch(run["history"], key, **monitor)
            if alarm is not None:
                ax.plot(alarm, scores[epochs.index(alarm)], "v", color=style["color"], ms=6)
        if monitor["threshold"] is not None:
            ax.axhline(monitor["threshold"], color="black", ls="--", lw=1)
        if shares:
            ax.set_ylim(-0.02, 1.02)
        else:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{cue}: {regime}", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if col == 0:
            ax.set_ylabel(key, fontsize=8)
        if row == len(regimes) - 1:
            ax.set_xlabel("epoch")
    axes[0, 0].legend(fontsize=7)
    figure.suptitle(f"{init_of(runs[0])}, {runs[0]['dataset']}: {watch_title(watch)}; score per epoch (dashed: "
                    "threshold)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


def write_outputs(result: Dict[str, Any], runs: Sequence[Dict[str, Any]], output: Path, stem: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for init, dataset, watch in plotted(runs):
        group = [r for r in runs if init_of(r) == init and r["dataset"] == dataset and r["method"] == WATCHES[watch].method]
        plot(group, output / plot_name(stem, init, dataset, watch), result["summary"][watch]["settings"], watch)
    (output / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (output / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {output / stem}.md, {stem}.json and {len(result['setup']['plots'])} plots", file=sys.stderr)


# ---------------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one seed, marker and watermark, control and 1.0, tiny data, 2 epochs; "
                        "writes nothing unless --output-dir is given")
    parser.add_argument("--data", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--init", nargs="+", default=list(INITS), choices=INITS,
                        help="train from scratch, fine-tune a model pretrained on clean data of the domain, or both")
    parser.add_argument("--cues", nargs="+", default=None, choices=CUE_KINDS, help="default: all (--quick: marker, watermark)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cue-correlations", type=float, nargs="+", default=None,
                        help="default: the control (1 / classes), 0.8, 0.95, 1.0 (--quick: control, 1.0)")
    parser.add_argument(
        "--baselines", nargs="*", default=["gradcam"], choices=[m for m in available_methods() if m != "caap"],
        help="methods that also drive the callbacks, on the weights of CAAP's fit (default: gradcam)",
    )
    parser.add_argument("--construction", default="parallel", choices=CONSTRUCTIONS, help="CAAP's construction in the callback")
    parser.add_argument("--num-val", type=int, default=512, help="validation images, all used for the accuracies and reliance")
    parser.add_argument("--num-images", type=int, default=16, help="CAAPCallback's probe batch (its default)")
    parser.add_argument("--swap-images", type=int, default=DEFAULT_SWAP_IMAGES,
                        help="CAAPCallback's swap probe (its default)")
    parser.add_argument("--threshold", type=float, default=None, help="default: SpuriousCueMonitor's")
    parser.add_argument("--patience", type=int, default=None, help="default: SpuriousCueMonitor's")
    parser.add_argument("--min-delta", type=float, default=None, help="default: SpuriousCueMonitor's")
    parser.add_argument("--min-skill", type=float, default=None, help="default: SpuriousCueMonitor's")
    parser.add_argument("--workers", type=int, default=1, help="processes, one torch thread each")
    parser.add_argument(
        "--fashion-root", default=FASHION_ROOT,
        help="FashionCanvasDataModule's root, where it unpacks Debian's Fashion-MNIST (never downloaded); default: under the temp dir",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="default: benchmarks/results (none with --quick)")
    parser.add_argument(
        "--rescore", type=Path, default=None, metavar="JSON",
        help="train nothing: replay a recorded run's scores through today's SpuriousCueMonitor (its recorded settings "
        "unless --threshold/--patience/--min-delta are given) and rewrite its JSON, report and plots next to it",
    )
    parser.add_argument(
        "--amend", nargs=2, type=Path, default=None, metavar=("JSON", "RERUN_JSON"),
        help="train nothing: take --amend-scores from a rerun of part of JSON's grid (after a change to those tests "
        "alone), once every other recorded score of those runs is checked to be the same, and rewrite JSON; then "
        "--rescore it",
    )
    parser.add_argument("--amend-scores", nargs="+", default=[], help="the scores --amend takes from the rerun")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def given_monitor(args: argparse.Namespace) -> Dict[str, Any]:
    given = {"threshold": args.threshold, "patience": args.patience, "min_delta": args.min_delta,
             "min_skill": args.min_skill}
    return {k: v for k, v in given.items() if v is not None}


def grid(args: argparse.Namespace, settings: Dict[str, Any]) -> List[Job]:
    """Every (dataset, cue kind, cue strength, seed, init) of the run, the fine-tunes first (the shorter runs)."""
    seeds = args.seeds[:1] if args.quick else args.seeds
    cues = args.cues or (list(cue_runs.QUICK["cues"]) if args.quick else list(CUE_KINDS))
    jobs = []
    for init in sorted(args.init, key=lambda name: name != "pretrained"):
        for dataset in args.data:
            control = control_of(dataset, settings)
            strengths = args.cue_correlations or ([control, 1.0] if args.quick else [control, *STRONG_CUES])
            jobs += [(dataset, cue, strength, seed, init) for cue, strength, seed in itertools.product(cues, strengths, seeds)]
    return jobs


def job_of(run: Dict[str, Any]) -> Job:
    return run["dataset"], run["cue"], run["cue_correlation"], run["seed"], run.get("init", "scratch")


def consistency_checks(runs: Sequence[Dict[str, Any]], monitor: Dict[str, Any]) -> Dict[str, bool]:
    """The replay reproduces the live monitor; a baseline's replay saw the CAAP fit's models."""
    replay = all(replay_alarm_epoch(r["history"], LIVE_SCORE, **monitor) == r["live_alarm_epoch"] for r in runs)
    caap = {job_of(r): r for r in runs if r["method"] == "caap"}

    def accuracies(run: Dict[str, Any]) -> List[Tuple[Any, Any]]:
        return [(h["acc_consistent"], h["acc_conflicting"]) for h in run["history"]]

    same = all(
        accuracies(r) == accuracies(caap[job_of(r)])
        for r in runs if r["method"] != "caap"
    )
    return {"replay_matches_live": replay, "baselines_replay_caap_weights": same}


def recipe_key(run: Dict[str, Any]) -> str:
    """The run's key in the setup's recipes: the dataset, with ``/pretrained`` for a fine-tune."""
    return run["dataset"] if init_of(run) == "scratch" else f"{run['dataset']}/{init_of(run)}"


def run_seconds(runs: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Optional[float]]]:
    out = {}
    for key in dict.fromkeys(recipe_key(r) for r in runs):
        group = [r for r in runs if recipe_key(r) == key]
        out[key] = {
            "trained": median(r["wall_s"] for r in group if r["method"] == "caap"),
            "trained_cpu": median(r["cpu_s"] for r in group if r["method"] == "caap"),
            "replayed": median(r["wall_s"] for r in group if r["method"] != "caap"),
        }
    return out


def rescore(path: Path, given: Dict[str, Any]) -> Dict[str, Any]:
    """Replay a recorded run's scores through the current ``SpuriousCueMonitor`` and rewrite its files.

    For a change of the monitor's rule or settings: every regime's alarms are recomputed; the
    models, scores and accuracies are the recorded ones.
    """
    result = json.loads(path.read_text())
    setup, runs = result["setup"], result["runs"]
    if "recipes" not in setup:
        raise ValueError(f"{path} was written by the single-cue version of this script; --rescore reads this version's JSON")
    if runs and any(key not in runs[0]["history"][0] for key in RECORDED):
        raise ValueError(f"{path} lacks some of today's model tests (written before they were recorded); run the grid again")
    if "rescored" not in setup:  # the live run's settings, before the first replay replaces them
        setup["live_monitor"] = dict(setup["monitor"])
    setup["monitor"].update(given)
    for run in runs:  # whether each check is judged at the replayed min_skill
        for row in run["history"]:
            row["judged"] = is_judged(row.get(SKILL), setup["monitor"].get("min_skill"))
    setup["monitor_defaults"] = settings_of(SpuriousCueMonitor())  # today's, which the report compares with
    setup["rescored"] = (
        "The alarms were replayed from the recorded scores through the `SpuriousCueMonitor` of the code that "
        "wrote this report, not taken from the live run: `python benchmarks/spurious.py --rescore "
        + " ".join([path.name, *(f"--{k.replace('_', '-')} {v}" for k, v in given.items())]) + "`."
    )
    result["ground_truth"] = ground_truth(runs)
    stem = path.stem
    setup["plots"] = plot_names(stem, runs)
    result["summary"] = summary = summarize(runs, monitor_settings(setup))
    result["late_alarms"] = late_alarms(runs, summary[DEFAULT_WATCH]["settings"], WATCHES[DEFAULT_WATCH])
    write_outputs(result, runs, path.parent, path.stem)
    return result


# What differs between two fits of the same grid cell by design: times, and the live monitor's settings.
UNCOMPARED = ("attribution_s", "wall_s", "live_alarm")


def grid_cell(run: Dict[str, Any]) -> Tuple[Any, ...]:
    return tuple(run[k] for k in ("init", "dataset", "cue", "cue_correlation", "seed", "method"))


def amend(path: Path, rerun_path: Path, scores: Sequence[str]) -> None:
    """Replace ``scores`` in the runs of ``path`` that ``rerun_path`` trained again, and note it in the setup.

    For a change to some model tests alone: a fit is seeded and the callback leaves training bit-identical, so a
    rerun reproduces every other recorded value exactly; that is checked, so the amended file holds one code's
    numbers for the runs it names.
    """
    if not scores or any(score not in RECORDED for score in scores):
        raise ValueError(f"--amend-scores must name recorded scores ({', '.join(RECORDED)}), got {list(scores)}")
    result, rerun = json.loads(path.read_text()), json.loads(rerun_path.read_text())
    runs = {grid_cell(run): run for run in result["runs"]}
    for new in rerun["runs"]:
        old = runs.get(grid_cell(new))
        if old is None or len(old["history"]) != len(new["history"]):
            raise ValueError(f"{'/'.join(map(str, grid_cell(new)))} is not a run of {path.name}'s grid "
                             "(or ran other epochs); --amend takes scores from a rerun of the same grid cells")
        for before, after in zip(old["history"], new["history"]):
            differ = [k for k in before if k not in (*scores, *UNCOMPARED) and before[k] != after.get(k)]
            if differ:
                raise ValueError(f"{'/'.join(map(str, grid_cell(new)))} epoch {before['epoch']}: the rerun differs on "
                                 f"{differ}, so it is not the same fit; run the whole grid again")
            before.update({score: after[score] for score in scores})
    result["setup"].setdefault("amended", []).append(
        f"`{', '.join(scores)}` of the {len(rerun['runs'])} runs of `{rerun['setup']['command']}` were taken from "
        f"that rerun (`python benchmarks/spurious.py --amend {path.name} {rerun_path.name} --amend-scores "
        f"{' '.join(scores)}`); every other recorded value of those runs was the same in both."
    )
    path.write_text(json.dumps(result, indent=1) + "\n")


def run_settings(args: argparse.Namespace, monitor: Dict[str, Any]) -> Dict[str, Any]:
    """What every worker needs to train and record a run."""
    return {
        "recipes": {(name if init == "scratch" else f"{name}/{init}"): recipe(name, args.quick, init)
                    for init in args.init for name in args.data},
        "num_val": cue_runs.QUICK["num_val"] if args.quick else args.num_val,
        "num_images": args.num_images,
        "swap_images": args.swap_images,
        "construction": args.construction,
        "monitor": monitor,
        "baselines": list(args.baselines),
        "fashion_root": args.fashion_root,
    }


def run_setup(
    args: argparse.Namespace,
    argv: Optional[List[str]],
    settings: Dict[str, Any],
    jobs: List[Job],
    runs: List[Dict[str, Any]],
    stem: str,
    started: Tuple[float, float],
) -> Dict[str, Any]:
    """The report's setup: the command, the grid, the recipes, the monitors, the checks and the machine."""
    load, start = started
    methods = ["caap", *args.baselines]
    monitor = settings["monitor"]
    return {
        "command": " ".join(["python benchmarks/spurious.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "recipes": settings["recipes"],
        "model_summary": f"ViT patch {MODEL['patch_size']}, dim {MODEL['embed_dim']}, depth {MODEL['depth']}",
        "inits": list(args.init),
        "datasets": list(args.data),
        "cues": list(dict.fromkeys(job[1] for job in jobs)),
        "seeds": sorted({job[3] for job in jobs}),
        "cue_correlations": {d: sorted({j[2] for j in jobs if j[0] == d}) for d in args.data},
        "num_val": settings["num_val"],
        "num_images": args.num_images,
        "swap_images": args.swap_images,
        "construction": args.construction,
        "methods": methods,
        "monitor": {"monitor": "caap/" + LIVE_SCORE, **monitor},
        "monitor_defaults": settings_of(SpuriousCueMonitor()),
        "regimes": REGIMES,
        "tuning": [f"{d}/{c}" for d, c in TUNING],
        **consistency_checks(runs, monitor),
        "workers": args.workers,
        "machine": f"{os.cpu_count()} cores",
        "load_average": f"{load:.1f}",
        "wall_min": (time.perf_counter() - start) / 60,
        "run_seconds": run_seconds(runs),
        "plots": plot_names(stem, runs),
    }


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.amend is not None:
        amend(*args.amend, args.amend_scores)
        return {}
    if args.rescore is not None:
        return rescore(args.rescore, given_monitor(args))
    disable_possible_user_warnings()
    output = args.output_dir or (None if args.quick else RESULTS)
    monitor = settings_of(SpuriousCueMonitor(**given_monitor(args)))
    settings = run_settings(args, monitor)
    if "fashion" in args.data:
        find_fashion_mnist(args.fashion_root)  # once, before the workers would unpack the files side by side
    jobs = grid(args, settings)
    started = (os.getloadavg()[0], time.perf_counter())
    runs = run_jobs(jobs, settings, args.workers)
    stem = "-".join(["spurious",
                     *([] if args.construction == "parallel" else [args.construction]),
                     *([] if args.swap_images == DEFAULT_SWAP_IMAGES else [f"swap{args.swap_images}"])])
    setup = run_setup(args, argv, settings, jobs, runs, stem, started)
    if output is not None:  # the runs first: a report that fails is rebuilt from them with --rescore
        output.mkdir(parents=True, exist_ok=True)
        (output / f"{stem}.json").write_text(json.dumps({"setup": setup, "runs": runs}, indent=1) + "\n")
    summary = summarize(runs, monitor)
    result = {"setup": setup, "runs": runs, "ground_truth": ground_truth(runs), "summary": summary,
              "late_alarms": late_alarms(runs, summary[DEFAULT_WATCH]["settings"], WATCHES[DEFAULT_WATCH])}
    print(markdown(result))
    if output is not None:
        write_outputs(result, runs, output, stem)
    return result


if __name__ == "__main__":
    main()
