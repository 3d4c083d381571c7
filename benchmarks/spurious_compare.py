"""Compare result files of ``spurious.py`` that trained the same grid with different swap probes.

``spurious.py --swap-images N`` trains every run again with a swap probe of ``N`` images. The fits must be the
same (the swap probe is only read by the callback), so the first section checks every recorded training value
against the first file's; the rest says what the probe's size changed for the alarm: per mask regime, the window
of thresholds that meets every target and the clean controls' highest judged reading (read from each file's own
report), how the controls' judged readings on each probe correlate with the first file's (sampling noise would
decorrelate them; a systematic reading would not), the highest judged control readings with the accuracy of their
check, and, on the background-cue runs, how the cue swap with cue masks only compares with the background swap.

    python benchmarks/spurious_compare.py benchmarks/results/spurious.json \\
        benchmarks/results/spurious-swap128.json benchmarks/results/spurious-swap256.json

writes ``benchmarks/results/spurious-compare.md`` and ``.json`` (``--output`` for another stem).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from cue_runs import FOLLOW_REGIMES, MAP_REGIMES, label
from harness import RESULTS, fmt, rounded, table

# What training alone decides (the probe's accuracy and reliance, the map-based scores): equal in every file.
TRAINING_KEYS = ("accuracy", "acc_conflicting", "acc_consistent", "reliance", *MAP_REGIMES.values())
# The judged control readings listed per file, highest first.
TOP_READINGS = 10
# The regime whose score the highest readings are listed for: object masks, the monitor's first default.
LISTED_REGIME = "object masks only"
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
    """The follow shares' report per regime at the monitor's own ``min_skill``: detections, window, control peak."""
    wanted = min_skill_of(result)
    for row in result["summary"]["follow"]["skill_sweep"]:
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
            skill = row.get("swap_probe_skill")
            if row.get(key) is not None and skill is not None and (min_skill is None or skill >= min_skill):
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


def compare(paths: Sequence[Path]) -> Dict[str, Any]:
    results = [load(path) for path in paths]
    first = results[0]
    listed = FOLLOW_REGIMES[LISTED_REGIME]
    files = []
    for path, result in zip(paths, results):
        path = path.resolve()
        checks, differ = training_differences(first, result)
        readings = {regime: judged_control_readings(result, key) for regime, key in FOLLOW_REGIMES.items()}
        top = sorted(readings[LISTED_REGIME].items(), key=lambda item: -item[1][0])[:TOP_READINGS]
        files.append({
            "file": str(path.relative_to(RESULTS) if path.is_relative_to(RESULTS) else path),
            "swap_images": swap_images(result),
            "training": {"checks": checks, "differ": differ},
            "regimes": regime_rows(result),
            "controls_against_first": {
                regime: correlation(judged_control_readings(first, key), readings[regime])
                for regime, key in FOLLOW_REGIMES.items()
            },
            "highest_control_readings": [
                {"run": run, "epoch": epoch, "score": score, "accuracy": accuracy}
                for (run, epoch), (score, accuracy) in top
            ],
            "cue_against_background": cue_against_background(result),
        })
    return {"command": "python benchmarks/spurious_compare.py " + " ".join(str(p) for p in paths),
            "listed_score": listed, "files": files}


def report(comparison: Dict[str, Any]) -> List[str]:
    files = comparison["files"]
    name = [f"{f['swap_images']} swap images" for f in files]
    lines = ["# The swap probe's size: the same grid on each probe", "",
             f"Made by `{comparison['command']}`.", "",
             "## Training is the same",
             "", f"Checks whose {', '.join(f'`{k}`' for k in TRAINING_KEYS)} equal the first file's:", ""]
    lines += table(["probe", "file", "checks", "differing"],
                   [[n, f"`{f['file']}`", f["training"]["checks"], len(f["training"]["differ"])]
                    for n, f in zip(name, files)])
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
    lines += table(["regime", "probe", "shortcut runs alarmed", "controls alarmed", "window", "controls' peak",
                    "controls' readings vs the first file (r)"], rows)
    lines += ["", f"## The highest judged control readings of `{comparison['listed_score']}`", ""]
    for n, f in zip(name, files):
        lines += [f"{n}:", ""]
        lines += table(["reading", "run", "epoch", "probe accuracy"],
                       [[fmt(t["score"]), t["run"], t["epoch"], f"{fmt(t['accuracy'], 1)}%"]
                        for t in f["highest_control_readings"]])
        lines.append("")
    lines += ["## The cue swap on background cues", "",
              "On the background-cue runs (whose cue mask is everything off the object) the cue swap with cue "
              "masks only lays the other image's backdrop behind the object, as the background swap does with "
              "object masks:", ""]
    lines += table(["probe", "checks", "equal follow shares", "largest difference"],
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
    args.output.with_suffix(".json").write_text(json.dumps(comparison, indent=1) + "\n")
    args.output.with_suffix(".md").write_text("\n".join(report(comparison)))
    print("\n".join(report(comparison)))


if __name__ == "__main__":
    main()
