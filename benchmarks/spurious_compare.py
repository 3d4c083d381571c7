"""Compare result files of ``spurious.py`` that trained the same grid again: on another swap probe, or recording
other statistics.

``spurious.py --swap-images N`` trains every run again with a swap probe of ``N`` images; a version of the code that
records candidate statistics beside the follow share trains it again too. The fits must be the same (the callback
only reads the model), so the first section checks every recorded training value against the first file's; the
rest says what changed for the alarm: per mask regime, the window of thresholds that meets every target and the
clean controls' highest judged reading (read from each file's own report), how the controls' judged readings
correlate with the first file's (sampling noise would decorrelate them; a systematic reading would not), both ends
of the window for every share statistic a file recorded, the highest judged control readings with the accuracy of
their check, and, on the background-cue runs, how the cue swap with cue masks only compares with the background
swap.

    python benchmarks/spurious_compare.py benchmarks/results/spurious.json \\
        benchmarks/results/spurious-swap128.json benchmarks/results/spurious-swap256.json \\
        benchmarks/results/spurious-chance.json benchmarks/results/spurious-sure.json

writes ``benchmarks/results/spurious-compare.md`` and ``.json`` (``--output`` for another stem).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import spurious
from cue_runs import FOLLOW_REGIMES, MAP_REGIMES, REGIMES, counted, label
from harness import RESULTS, fmt, rounded, table

# What training alone decides (the probe's accuracy and reliance, the map-based scores): equal in every file.
TRAINING_KEYS = ("accuracy", "acc_conflicting", "acc_consistent", "reliance", *MAP_REGIMES.values())
# The judged control readings listed per file, highest first.
TOP_READINGS = 10
# The regime whose score the highest readings are listed for: object masks, the monitor's first default.
LISTED_REGIME = "object masks only"
# The regimes whose ends are listed (cue and object masks read the object masks' test, as object masks only do).
END_REGIMES = ("object masks only", "cue masks only", "no masks: border ring", "no masks: surround")
# The callback's share statistic: the share of pairs that follow the swapped region.
FOLLOW_SHARE = "follow_share"
# The end of a candidate's scalar that gives the share of pairs it counted (e.g. the pairs the model is sure of).
COUNTED_PAIRS = "_pairs"
# Two follow shares closer than this are equal (they are counts over the same pairs, recorded to 4 decimals).
EQUAL = 1e-9


def load(path: Path) -> Dict[str, Any]:
    result = json.loads(path.read_text())
    if "summary" not in result:
        raise SystemExit(f"{path} holds no report (run spurious.py to its end, or --rescore it)")
    return result


def caap_runs(result: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The trained runs (not the baselines' replays) by their label."""
    return {label(run): run for run in result["runs"] if run["method"] == "caap"}


def swap_images(result: Dict[str, Any]) -> int:
    return int(result["setup"]["swap_images"])


def training_differences(first: Dict[str, Any], other: Dict[str, Any]) -> Tuple[int, List[str]]:
    """How many checks the two files share, and each one whose training values differ (run, epoch, key)."""
    checks, differ = 0, []
    runs = caap_runs(other)
    for name, run in caap_runs(first).items():
        if name not in runs:
            differ.append(f"{name}: missing")
            continue
        for row, twin in zip(run["history"], runs[name]["history"], strict=True):
            checks += 1
            differ += [f"{name} epoch {row['epoch']}: {key}" for key in TRAINING_KEYS if row.get(key) != twin.get(key)]
    return checks, differ


def min_skill_of(result: Dict[str, Any]) -> Optional[float]:
    return result["setup"]["monitor_defaults"]["min_skill"]


def regime_rows(result: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The default watch's report (the follow shares) per regime at the monitor's own ``min_skill``: detections,
    window, control peak."""
    wanted = min_skill_of(result)
    for row in result["summary"][spurious.DEFAULT_WATCH]["skill_sweep"]:
        if row["min_skill"] == wanted:
            return row["regimes"]
    raise SystemExit(f"the report holds no min_skill sweep row for {wanted}")


def judged_control_readings(result: Dict[str, Any], key: str) -> Dict[Tuple[str, int], Tuple[float, float]]:
    """Each judged check of a clean control on ``key``: (run, epoch) -> (reading, the probe's accuracy there)."""
    min_skill = min_skill_of(result)
    out = {}
    for name, run in caap_runs(result).items():
        if not run["control"]:
            continue
        for row in run["history"]:
            if counted(row, key, min_skill):
                out[(name, row["epoch"])] = (row[key], row["accuracy"])
    return out


def correlation(first: Dict[Tuple[str, int], Tuple[float, float]],
                other: Dict[Tuple[str, int], Tuple[float, float]]) -> Dict[str, Any]:
    """Pearson's correlation of the readings of the checks judged in both files (``None`` where undefined)."""
    shared = sorted(set(first) & set(other))
    xs, ys = [first[k][0] for k in shared], [other[k][0] for k in shared]
    if len(shared) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:  # too few, or a constant reading: none defined
        return {"checks": len(shared), "r": None}
    return {"checks": len(shared), "r": rounded(statistics.correlation(xs, ys), 2)}


def cue_against_background(result: Dict[str, Any]) -> Dict[str, Any]:
    """On background-cue runs (whose cue mask is the object's complement): the cue swap against the background swap."""
    cue, background = FOLLOW_REGIMES["cue masks only"], FOLLOW_REGIMES["object masks only"]
    gaps = [abs(row[cue] - row[background]) for run in caap_runs(result).values() if run["cue"] == "background"
            for row in run["history"] if row.get(cue) is not None and row.get(background) is not None]
    return {"checks": len(gaps), "equal": sum(gap <= EQUAL for gap in gaps),
            "largest_gap": rounded(max(gaps), 4) if gaps else None}


def swap_statistics(row: Dict[str, Any]) -> Dict[str, Any]:
    """What the listed regime's swap test recorded at one check, by statistic, its ratio aside: ``follow_share``, any
    candidate a results file recorded beside it, and a candidate's share of the pairs it counted (``*_pairs``)."""
    prefix = REGIMES[LISTED_REGIME].replace("_ratio", "_")
    return {key[len(prefix):]: value for key, value in row.items()
            if key.startswith(prefix) and not key.endswith("_ratio")}


def candidates_at(row: Dict[str, Any]) -> Dict[str, Any]:
    """What the file's candidate statistics read at a check, counted pairs included (the follow share aside): e.g.
    how many pairs a candidate read where the follow share is high."""
    return {statistic: value for statistic, value in swap_statistics(row).items() if statistic != FOLLOW_SHARE}


def share_statistics(result: Dict[str, Any]) -> List[str]:
    """The share statistics the file's swap tests recorded (``"follow_share"``, and any candidates beside it); not a
    share of the pairs that a candidate counted (``*_pairs``), which says how many it read, not whether they follow."""
    row = next(iter(caap_runs(result).values()))["history"][0]
    return [statistic for statistic in swap_statistics(row) if not statistic.endswith(COUNTED_PAIRS)]


def window_ends(result: Dict[str, Any], statistic: str, dataset: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """Per regime of :data:`END_REGIMES`, watching ``statistic`` at the file's monitor defaults: the highest threshold
    that catches every shortcut run in time, the lowest at which no control alarms, and their ratio (a window of
    thresholds meeting every target exists where it is at least 1; the issue asked for 2), with the controls'
    highest judged reading. ``dataset``: on its runs alone (``None``: every run)."""
    runs = [run for run in result["runs"] if run["method"] == "caap" and dataset in (None, run["dataset"])]
    regimes = {regime: key.replace("_ratio", f"_{statistic}") for regime, key in REGIMES.items()}
    watch = spurious.Watch("caap", regimes, statistic, spurious.SHARE_SWEEP, spurious.SHARE_WINDOW_GRID)
    monitor = {k: v for k, v in result["setup"]["monitor_defaults"].items() if k != "threshold"}
    out = {}
    for regime in END_REGIMES:
        checks = spurious.threshold_checks(runs, regime, monitor, watch)
        high = max((t for t, check in checks if check["all_shortcuts_alarmed"] and check["lead"]), default=None)
        low = min((t for t, check in checks if check["no_control_alarm"]), default=None)
        peak = spurious.control_peaks(runs, regimes[regime], monitor["min_skill"])["judged"]
        out[regime] = {"catches_every_run_up_to": high, "no_control_from": low,
                       "ratio": rounded(high / low, 2) if high and low else None,
                       "control_peak": None if peak is None else peak["score"]}
    return out


def compare(paths: Sequence[Path]) -> Dict[str, Any]:
    results = [load(path) for path in paths]
    first = results[0]
    listed = FOLLOW_REGIMES[LISTED_REGIME]
    files = []
    first_readings = {regime: judged_control_readings(first, key) for regime, key in FOLLOW_REGIMES.items()}
    for path, result in zip(paths, results):
        path = path.resolve()
        checks, differ = training_differences(first, result)
        readings = {regime: judged_control_readings(result, key) for regime, key in FOLLOW_REGIMES.items()}
        top = sorted(readings[LISTED_REGIME].items(), key=lambda item: -item[1][0])[:TOP_READINGS]
        histories = {name: {row["epoch"]: row for row in run["history"]} for name, run in caap_runs(result).items()}
        files.append({
            "file": str(path.relative_to(RESULTS) if path.is_relative_to(RESULTS) else path),
            "swap_images": swap_images(result),
            "training": {"checks": checks, "differ": differ},
            "regimes": regime_rows(result),
            "controls_against_first": {
                regime: correlation(first_readings[regime], readings[regime]) for regime in FOLLOW_REGIMES
            },
            "highest_control_readings": [
                {"run": run, "epoch": epoch, "score": score, "accuracy": accuracy,
                 "candidates": candidates_at(histories[run][epoch])}
                for (run, epoch), (score, accuracy) in top
            ],
            "cue_against_background": cue_against_background(result),
            "window_ends": {statistic: window_ends(result, statistic) for statistic in share_statistics(result)},
        })
    # Per dataset: whether a regime has a window where the objects sit in the centre (Fashion-MNIST) or anywhere.
    by_dataset = {dataset: window_ends(first, FOLLOW_SHARE, dataset)
                  for dataset in dict.fromkeys(run["dataset"] for run in first["runs"])}
    return {"command": "python benchmarks/spurious_compare.py " + " ".join(str(p) for p in paths),
            "listed_score": listed, "files": files, "first_file_ends_by_dataset": by_dataset}


def report(comparison: Dict[str, Any]) -> List[str]:
    files = comparison["files"]
    name = [f"`{f['file']}` ({f['swap_images']} swap images)" for f in files]
    lines = ["# The same grid, trained again: on other swap probes, or recording other statistics", "",
             f"Made by `{comparison['command']}`.", "",
             "## Training is the same",
             "", f"Checks whose {', '.join(f'`{k}`' for k in TRAINING_KEYS)} equal the first file's:", ""]
    lines += table(["file", "checks", "differing"],
                   [[n, f["training"]["checks"], len(f["training"]["differ"])] for n, f in zip(name, files)])
    for f in files:
        lines += [f"- `{f['file']}`: {d}" for d in f["training"]["differ"][:20]]
    lines += ["", "## The alarm per regime", "",
              "At each file's own monitor defaults; the window is the range of thresholds that meets every target "
              "(every shortcut run caught no later than one epoch after its onset, no clean control); the "
              "controls' peak is their highest judged reading.", ""]
    rows = []
    for regime in FOLLOW_REGIMES:
        for n, f in zip(name, files):
            r = f["regimes"][regime]
            window = r["window"]
            peak = r["control_peak"]
            corr = f["controls_against_first"][regime]
            rows.append([regime, n, f"{r['alarmed']}/{r['shortcut_runs']}", f"{r['false_alarms']}/{r['controls']}",
                         "-" if window["low"] is None else f"{fmt(window['low'])}-{fmt(window['high'])} "
                         f"({fmt(window['width'])}x)",
                         "-" if peak is None else f"{fmt(peak['score'])} ({peak['run']}, epoch {peak['epoch']}, "
                         f"{fmt(peak['accuracy'], 1)}%)",
                         f"{fmt(corr['r'])} over {corr['checks']}"])
    lines += table(["regime", "file", "shortcut runs alarmed", "controls alarmed", "window", "controls' peak",
                    "controls' readings vs the first file (r)"], rows)
    lines += ["", f"## The highest judged control readings of `{comparison['listed_score']}`", "",
              "With what a file's candidate statistics of the same swap test read at that check.", ""]
    for n, f in zip(name, files):
        lines += [f"{n}:", ""]
        top = f["highest_control_readings"]
        candidates = list(top[0]["candidates"]) if top else []
        lines += table(["reading", "run", "epoch", "probe accuracy", *(f"`{c}`" for c in candidates)],
                       [[fmt(t["score"]), t["run"], t["epoch"], f"{fmt(t['accuracy'], 1)}%",
                         *(fmt(t["candidates"][c], 3) for c in candidates)] for t in top])
        lines.append("")
    lines += ["## Both ends of the window, per share statistic", "",
              "Per file and share statistic each swap test recorded, at the file's monitor defaults: the highest "
              "threshold that still catches every shortcut run in time, the lowest at which no clean control "
              "alarms, and their ratio: thresholds meeting every target exist where it is at least 1, and the "
              "issue asked for 2. `follow_share` is the callback's (the donor's class above the own); files made to "
              "compare other statistics name theirs in their own report.", ""]
    rows = [[f"`{f['file']}`", f"`{statistic}`", regime, fmt(e["catches_every_run_up_to"]), fmt(e["no_control_from"]),
             fmt(e["ratio"]), fmt(e["control_peak"], 3)]
            for f in files for statistic, ends in f["window_ends"].items() for regime, e in ends.items()]
    lines += table(["file", "statistic", "regime", "catches every shortcut run up to", "no control alarms from",
                    "ratio", "controls' judged peak"], rows)
    lines += ["", f"## Both ends per dataset: `{files[0]['file']}`'s `follow_share`", "",
              "Fashion-MNIST's garments sit in the centre of the canvas; the shapes sit anywhere.", ""]
    lines += table(["dataset", "regime", "catches every shortcut run up to", "no control alarms from", "ratio",
                    "controls' judged peak"],
                   [[dataset, regime, fmt(e["catches_every_run_up_to"]), fmt(e["no_control_from"]), fmt(e["ratio"]),
                     fmt(e["control_peak"], 3)]
                    for dataset, ends in comparison["first_file_ends_by_dataset"].items() for regime, e in ends.items()])
    lines += ["", "## The cue swap on background cues", "",
              "On the background-cue runs (whose cue mask is everything off the object) the cue swap with cue "
              "masks only lays the other image's backdrop behind the object, as the background swap does with "
              "object masks:", ""]
    lines += table(["file", "checks", "equal follow shares", "largest difference"],
                   [[n, f["cue_against_background"]["checks"], f["cue_against_background"]["equal"],
                     fmt(f["cue_against_background"]["largest_gap"], 4)] for n, f in zip(name, files)])
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="spurious.py result files; the first is the reference")
    parser.add_argument("--output", type=Path, default=RESULTS / "spurious-compare",
                        help="the stem of the .md and .json written")
    args = parser.parse_args()
    comparison = compare(args.results)
    text = "\n".join(report(comparison))
    args.output.with_suffix(".json").write_text(json.dumps(comparison, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
