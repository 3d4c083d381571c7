"""Why one shortcut run alarms late: the swap test's statistic, or the probe's size?

``spurious.py`` finds one shortcut run whose alarm comes two epochs after the accuracy gap: at
the epoch after the gap the model follows the cue on about two thirds of the cue-conflicting
validation images, yet the 16-image probe's swap ratio reads barely above 1. This script trains
the runs of ``spurious.py``'s grid again (``cue_runs.py``'s recipes, data and ``fit_run``) and, at every
epoch's weights, scores the swap test four ways on a probe of 16 images (the default) and of 64:

- ``probability, clean classes``: ``SwapRatio`` as the callback logs it, the mean probability
  of the donor's class over the mean of the own, the classes being each clean image's top-1;
- ``votes, clean classes``: how many swapped images the model names as the donor's class over
  how many it names as the own (each count plus 1);
- ``votes, part classes``: the classes are those each part names alone (the donor's region
  alone, the image's rest alone, shown as ``InsertionRatio`` shows them), the votes as above;
- ``probability, part classes``: those classes, pooled probabilities.

Part classes matter on a probe whose images are themselves cue-conflicting (the benchmark's
validation set, where the cue is independent of the label): there a half-shortcut model's clean
top-1 is sometimes the cue's class and sometimes the object's, so neither clean class says
what the swapped parts name. Each statistic drives the monitor's rule (``SpuriousCueMonitor``'s
patience and ``min_delta``) at thresholds 1.5 and 2, for the two regions the monitor's
defaults use: the background (object masks) and the border ring (no masks). The report gives
per setting the shortcut runs alarmed, those more than one epoch after the gap, the controls
alarmed and their highest score; for each statistic, the thresholds of a fine grid at which it
meets every target (none: no threshold can); the votes behind each late run; and the seconds
each test costs against the run's whole check.

    python benchmarks/swap_probe_size.py --workers 2      # writes benchmarks/results/swap-probe-size.*
    python benchmarks/swap_probe_size.py --quick          # a smoke run: prints the summary
    python benchmarks/swap_probe_size.py --rescore benchmarks/results/swap-probe-size.json   # no training
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lightning.pytorch.utilities import disable_possible_user_warnings

from caap_lightning.callbacks import SpuriousCueMonitor
from caap_lightning.datamodules import CUE_KINDS
from caap_lightning.datamodules.fashion import find_fashion_mnist
from caap_lightning.model_tests import SwapPairs, border_masks, floored_ratio, rest_colour, suspect_views
from caap_lightning.models import ViTClassifier
from caap_lightning.utils import eval_mode

import cue_runs
from harness import RESULTS, fmt, init_worker

PROBE_SIZES = (16, 64)
# The monitor's default regions: the background with object masks, the border ring with none.
REGIONS = {"background": ("masks", "outside"), "border": (None, "mask")}
STATISTICS = ("probability, clean classes", "votes, clean classes", "votes, part classes", "probability, part classes")
THRESHOLDS = (1.5, 2.0)
# The fine grid on which each statistic's window is sought: every threshold that meets all the targets.
WINDOW_GRID = tuple(round(1.0 + 0.02 * i, 2) for i in range(1, 101))
VOTE_PRIOR = 1.0  # added to each count, so that a probe with no vote either way reads 1


# ---------------------------------------------------------------------- one test
def swap_votes(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, region: str) -> Dict[str, Any]:
    """Per pair of the probe: the swapped image's probabilities and top-1, with both ways of naming each part's class."""
    pairs = SwapPairs(len(images))
    donors = pairs.donors
    start = time.perf_counter()
    with torch.no_grad(), eval_mode(model):
        clean = model(images).argmax(1)
        swapped = model(pairs.swapped(images, masks, region)).softmax(1).double()
    clean_s = time.perf_counter() - start
    with torch.no_grad(), eval_mode(model):
        alone, rest = suspect_views(images, masks, region, rest_colour(images, masks))
        region_class, rest_class = model(alone).argmax(1)[donors], model(rest).argmax(1)
    return {
        "top1": swapped.argmax(1), "probs": swapped,
        "clean": (clean[donors], clean), "parts": (region_class, rest_class),
        "seconds": {"clean": clean_s, "parts": time.perf_counter() - start},
    }


def score(found: Dict[str, Any], statistic: str) -> Tuple[Optional[float], int, int, int]:
    """``statistic``'s value (``None`` when no pair is scored), the votes for the region and the rest, the pairs scored."""
    kind, classes = statistic.split(", ")
    suspect, own = found["clean" if classes == "clean classes" else "parts"]
    scored = suspect != own  # a pair whose two classes agree tells nothing
    votes_region = int((found["top1"] == suspect)[scored].sum())
    votes_rest = int((found["top1"] == own)[scored].sum())
    count = int(scored.sum())
    if not count:
        return None, 0, 0, 0
    if kind == "votes":
        value = (votes_region + VOTE_PRIOR) / (votes_rest + VOTE_PRIOR)
    else:
        p_region = found["probs"].gather(1, suspect[:, None])[:, 0][scored].mean()
        p_rest = found["probs"].gather(1, own[:, None])[:, 0][scored].mean()
        value = float(floored_ratio(p_region, p_rest))  # SwapRatio's own pooling
    return round(value, 4), votes_region, votes_rest, count


# ---------------------------------------------------------------------- one run
def run_job(job: Tuple[str, str, float, int, str], settings: Dict[str, Any]) -> Dict[str, Any]:
    """Train one run as ``spurious.py`` does, then score every statistic at each epoch's weights."""
    record, snapshots = cue_runs.fit_run(job, "caap", settings)
    data = cue_runs.build_data(*job[:4], settings)
    data.setup("fit")
    model = ViTClassifier(**settings["recipes"][job[0]]["model"], num_classes=data.num_classes, img_size=data.img_size,
                          mean=data.mean, std=data.std)
    probes = {n: data.probe_batch(n) for n in settings["probe_sizes"]}
    for row, weights in zip(record["history"], snapshots):
        model.model.load_state_dict(weights)
        row["swap"] = {}
        for (n, probe), (region, (needs, kind)) in itertools.product(probes.items(), REGIONS.items()):
            masks = probe.masks if needs else border_masks(n, tuple(probe.images.shape[-2:]))
            found = swap_votes(model, probe.images, masks, kind)
            row["swap"][f"{region}/{n}"] = {
                "scores": {s: score(found, s) for s in STATISTICS},
                "seconds": {k: round(v, 4) for k, v in found["seconds"].items()},
            }
    return {k: record[k] for k in ("dataset", "cue", "cue_correlation", "seed", "control", "history")}


# ---------------------------------------------------------------------- what the runs say
def series(run: Dict[str, Any], key: str, statistic: str) -> List[Dict[str, Any]]:
    return [{"epoch": h["epoch"], "s": h["swap"][key]["scores"][statistic][0]} for h in run["history"]]


def evaluate(runs: Sequence[Dict[str, Any]], key: str, statistic: str, threshold: float, monitor: Dict[str, Any]) -> Dict[str, Any]:
    """The monitor's alarms on one statistic (``cue_runs.detection``'s bookkeeping), and the controls' peak."""
    settings = {**monitor, "threshold": threshold}
    replayed = [{**r, "alarm_epoch": cue_runs.replay_alarm_epoch(series(r, key, statistic), "s", **settings),
                 "due_epoch": cue_runs.due_epoch(r["history"])} for r in runs]
    found = cue_runs.detection(replayed)
    controls = [r for r in replayed if r["control"]]
    peaks = [x["s"] for r in controls for x in series(r, key, statistic) if x["s"] is not None]
    return {
        "shortcut_runs": found["shortcut_runs"], "alarmed": found["alarmed"], "missed": found["missed"],
        "late": found["late_runs"], "median_lead": found["median_lead_epochs"], "controls": found["controls"],
        "false_alarms": [cue_runs.label(r) for r in controls if r["alarm_epoch"] is not None],
        "controls_peak": max(peaks, default=None),
    }


def meets_targets(row: Dict[str, Any]) -> bool:
    """Every shortcut run alarmed, none more than an epoch late, median lead >= 0, no control alarmed."""
    return (row["alarmed"] == row["shortcut_runs"] and not row["late"] and not row["false_alarms"]
            and row["median_lead"] is not None and row["median_lead"] >= 0)


def threshold_window(runs: Sequence[Dict[str, Any]], key: str, statistic: str, monitor: Dict[str, Any]) -> Dict[str, Any]:
    """The thresholds of ``WINDOW_GRID`` at which ``statistic`` meets every target (``None`` bounds: none does)."""
    good = [t for t in WINDOW_GRID if meets_targets(evaluate(runs, key, statistic, t, monitor))]
    return {"low": good[0] if good else None, "high": good[-1] if good else None, "count": len(good)}


def late_votes(runs: Sequence[Dict[str, Any]], late: Sequence[str], sizes: Sequence[int]) -> List[Dict[str, Any]]:
    """For each run late at any setting: reliance and the background votes at the gap epoch and the one after."""
    rows = []
    for run in (r for r in runs if cue_runs.label(r) in late):
        gap = cue_runs.due_epoch(run["history"])  # what "late" is measured against (the gap may never open)
        for h in run["history"][gap - 1 : gap + 1]:
            rows.append({"run": cue_runs.label(run), "epoch": h["epoch"], "gap_epoch": gap, "reliance": h["reliance"],
                         **{f"{s} ({n})": h["swap"][f"background/{n}"]["scores"][s][1:] for n in sizes
                            for s in STATISTICS if s.startswith("votes")}})
    return rows


def costs(runs: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Median seconds per test (clean classes: 2 forward passes of the probe; part classes: 2 more) against the whole check."""
    out: Dict[str, Dict[str, float]] = {}
    rows = [h for r in runs for h in r["history"] if h["attribution_s"]]
    for key in rows[0]["swap"]:
        out[key] = {
            kind: round(statistics.median(h["swap"][key]["seconds"][kind] / h["attribution_s"] for h in rows), 4)
            for kind in ("clean", "parts")
        }
    return out


def summarize(runs: Sequence[Dict[str, Any]], sizes: Sequence[int], monitor: Dict[str, Any]) -> Dict[str, Any]:
    table = {
        f"{region}/{n}/{statistic}/{threshold}": evaluate(runs, f"{region}/{n}", statistic, threshold, monitor)
        for region, n, statistic, threshold in itertools.product(REGIONS, sizes, STATISTICS, THRESHOLDS)
    }
    late = sorted({name for row in table.values() for name in row["late"]})
    windows = {f"{region}/{n}/{statistic}": threshold_window(runs, f"{region}/{n}", statistic, monitor)
               for region, n, statistic in itertools.product(REGIONS, sizes, STATISTICS)}
    return {"settings": table, "windows": windows, "late_votes": late_votes(runs, late, sizes), "cost_of_check": costs(runs)}


# ---------------------------------------------------------------------- report
def markdown(result: Dict[str, Any]) -> str:
    setup, summary = result["setup"], result["summary"]
    lines = [
        "# Swap test: statistic and probe size against the lead bound",
        "",
        f"Made by `{setup['command']}` ({setup['runs']} trained runs of `spurious.py`'s grid: {', '.join(setup['datasets'])}; "
        f"cues {', '.join(setup['cues'])}; cue strengths {setup['cue_correlations']}; seeds {setup['seeds']}; "
        f"{setup['wall_min']:.0f} min on {setup['machine']}). Monitor rule: patience {setup['monitor']['patience']}, "
        f"min_delta {setup['monitor']['min_delta']}."
        + (f" Summarised again, without training, by `{setup['rescored']}`." if setup.get("rescored") else "")
        + " A run is *late* when its alarm comes more than one epoch after "
        "the accuracy gap; the controls' peak is their highest score at any epoch.",
        "",
        "| region / probe | statistic | threshold | shortcut runs alarmed | late | median lead | controls alarmed | controls' peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["settings"].items():
        region_size, statistic, threshold = name.rsplit("/", 2)
        lines.append(
            f"| {region_size} | {statistic} | {threshold} | {row['alarmed']}/{row['shortcut_runs']} | "
            f"{len(row['late'])}{' (' + ', '.join(row['late']) + ')' if row['late'] else ''} | {fmt(row['median_lead'])} | "
            f"{len(row['false_alarms'])}/{row['controls']} | {fmt(row['controls_peak'])} |"
        )
    grid = f"{WINDOW_GRID[0]:g} to {WINDOW_GRID[-1]:g} in steps of {WINDOW_GRID[1] - WINDOW_GRID[0]:.2f}"
    lines += ["", "## Thresholds that meet every target", "",
              f"Of the thresholds {grid}, those at which a statistic alarms on every shortcut run, none more than one "
              "epoch after its gap, with a median lead of at least 0, and on no control. A statistic with none cannot "
              "meet the targets at any threshold on these runs.", "",
              "| region / probe | statistic | thresholds that meet every target |", "|---|---|---|"]
    for name, window in summary["windows"].items():
        region_size, statistic = name.rsplit("/", 1)
        found = ("none" if not window["count"] else
                 f"{window['low']:g} to {window['high']:g} ({window['count']} of {len(WINDOW_GRID)})")
        lines.append(f"| {region_size} | {statistic} | {found} |")
    lines += ["", "## The votes behind the late runs (background; votes for the region, for the rest, pairs scored)", ""]
    if summary["late_votes"]:
        keys = [k for k in summary["late_votes"][0] if k not in ("run", "epoch", "gap_epoch", "reliance")]
        lines += ["| run | epoch (gap epoch) | reliance % | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
        for row in summary["late_votes"]:
            lines.append(f"| {row['run']} | {row['epoch']} ({row['gap_epoch']}) | {fmt(row['reliance'], 1)} | "
                         + " | ".join("/".join(map(str, row[k])) for k in keys) + " |")
    else:
        lines.append("No run is late at any setting.")
    lines += ["", "## Cost: seconds of each test over the seconds of the run's whole check (medians over epochs)", "",
              "| region / probe | clean classes | part classes |", "|---|---|---|"]
    lines += [f"| {key} | {fmt(c['clean'], 3)} | {fmt(c['parts'], 3)} |" for key, c in summary["cost_of_check"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shapes, marker, one seed, tiny data, 2 epochs; writes nothing")
    parser.add_argument("--data", nargs="+", default=list(cue_runs.DATASETS), choices=cue_runs.DATASETS)
    parser.add_argument("--cues", nargs="+", default=list(CUE_KINDS), choices=CUE_KINDS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cue-correlations", type=float, nargs="+", default=None,
                        help="default: the control (1 / classes) and 0.95, the strength of the late run")
    parser.add_argument("--workers", type=int, default=1, help="processes, one torch thread each")
    parser.add_argument("--fashion-root", default=cue_runs.FASHION_ROOT)
    parser.add_argument("--output-dir", type=Path, default=None, help="default: benchmarks/results (none with --quick)")
    parser.add_argument("--rescore", type=Path, default=None,
                        help="a swap-probe-size.json: summarise its recorded runs again (no training), rewrite it and its .md")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.rescore is not None:
        return rescore(args.rescore, argv)
    disable_possible_user_warnings()
    data = ["shapes"] if args.quick else args.data
    settings = {
        "recipes": {name: cue_runs.recipe(name, args.quick) for name in data},
        "num_val": cue_runs.QUICK["num_val"] if args.quick else 512,
        # The callback as the grid it studies ran it: its swaps on the 16-image probe (it scores its own 16 and 64).
        "num_images": 16, "swap_images": 16, "construction": "parallel", "baselines": [], "fashion_root": args.fashion_root,
        "monitor": cue_runs.settings_of(SpuriousCueMonitor()), "probe_sizes": PROBE_SIZES,
    }
    if "fashion" in data:
        find_fashion_mnist(args.fashion_root)
    jobs = [(d, cue, strength, seed, "scratch")
            for d in data
            for cue, strength, seed in itertools.product(
                ["marker"] if args.quick else args.cues,
                args.cue_correlations or [cue_runs.control_of(d, settings), 0.95],
                args.seeds[:1] if args.quick else args.seeds)]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, initializer=init_worker) as pool:
        runs = []
        for run in pool.map(run_job, jobs, itertools.repeat(settings)):
            runs.append(run)
            print(json.dumps({"done": cue_runs.label(run), "of": len(jobs), "runs": len(runs)}), flush=True)
    monitor = settings["monitor"]
    setup = {
        "command": " ".join(["python benchmarks/swap_probe_size.py", *(argv if argv is not None else sys.argv[1:])]),
        "runs": len(runs), "datasets": data, "cues": sorted({j[1] for j in jobs}), "seeds": sorted({j[3] for j in jobs}),
        "cue_correlations": sorted({j[2] for j in jobs}), "probe_sizes": list(PROBE_SIZES), "monitor": monitor,
        "machine": f"{os.cpu_count()} cores",
        "wall_min": (time.perf_counter() - start) / 60,
    }
    result = {"setup": setup, "summary": summarize(runs, PROBE_SIZES, monitor), "runs": runs}
    write(result, args.output_dir or (None if args.quick else RESULTS))
    return result


def rescore(path: Path, argv: Optional[List[str]]) -> Dict[str, Any]:
    """The recorded runs of ``path`` summarised by this code, written back beside it."""
    result = json.loads(path.read_text())
    setup = result["setup"]
    result["summary"] = summarize(result["runs"], setup["probe_sizes"], setup["monitor"])
    setup["rescored"] = " ".join(["python benchmarks/swap_probe_size.py", *(argv if argv is not None else sys.argv[1:])])
    write(result, path.parent)
    return result


def write(result: Dict[str, Any], output: Optional[Path]) -> None:
    report = markdown(result)
    print(report)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "swap-probe-size.json").write_text(json.dumps(result, indent=1) + "\n")
        (output / "swap-probe-size.md").write_text(report)


if __name__ == "__main__":
    main()
