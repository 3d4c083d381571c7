"""The spurious-cue benchmark's bookkeeping on scripted histories (no training)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def history(consistent, conflicting, scores, alarms=None):
    alarms = alarms or [False] * len(scores)
    return [
        {"epoch": e, "acc_consistent": a, "acc_conflicting": b, "score": s, "alarm": al}
        for e, (a, b, s, al) in enumerate(zip(consistent, conflicting, scores, alarms), start=1)
    ]


def test_gap_epoch_is_the_first_epoch_ten_points_apart(spurious):
    rows = history([50, 70, 90, 95], [45, 61, 80, 20], [1, 1, 1, 1])
    assert spurious.gap_epoch(rows) == 3  # 9 points at epoch 2 is not yet a gap; exactly 10 is
    assert spurious.gap_epoch(history([50, 60], [50, 59], [1, 1])) is None
    assert spurious.gap_epoch(rows, points=50) == 4


def test_alarm_epoch_and_lead_time(spurious):
    rows = history([1] * 4, [1] * 4, [1] * 4, alarms=[False, False, True, True])
    assert spurious.alarm_epoch(rows) == 3
    assert spurious.alarm_epoch(history([1], [1], [1])) is None
    assert spurious.lead_time(alarm=2, gap=5) == 3
    assert spurious.lead_time(alarm=5, gap=2) == -3
    assert spurious.lead_time(alarm=None, gap=2) is None


def test_signal_epoch_is_the_first_score_past_the_threshold(spurious):
    rows = history([1] * 4, [1] * 4, [0.5, None, 4.5, 3.0])
    assert spurious.signal_epoch(rows, threshold=4.0) == 3
    assert spurious.signal_epoch(rows, threshold=5.0) is None
    assert spurious.signal_epoch(rows, threshold=None) is None


def test_replay_goes_through_the_monitor(spurious):
    rising = history([1] * 5, [1] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert spurious.replay_alarm_epoch(rising, threshold=1.5, patience=2, min_delta=0.0) == 3
    assert spurious.replay_alarm_epoch(rising, threshold=3.5, patience=2, min_delta=0.0) == 5
    flat = history([1] * 5, [1] * 5, [1.0] * 5)
    assert spurious.replay_alarm_epoch(flat, threshold=1.5, patience=1, min_delta=0.0) is None
    # An epoch without a score (a failed check) is no check at all.
    gappy = history([1] * 4, [1] * 4, [1.0, None, 2.0, 3.0])
    assert spurious.replay_alarm_epoch(gappy, threshold=1.5, patience=2, min_delta=0.0) == 4


def test_summary_counts_detections_false_alarms_and_leads(spurious):
    def run(cue, seed, alarm, gap):
        return {"method": "caap", "cue_correlation": cue, "seed": seed, "alarm_epoch": alarm, "gap_epoch": gap}

    runs = [run(0.25, 0, None, None), run(0.25, 1, 4, None), run(0.95, 0, 2, 3), run(0.95, 1, None, 2), run(1.0, 0, 3, 1)]
    by_cue = spurious.detection(runs, control=0.25)
    assert by_cue["0.25"]["control"] and by_cue["0.25"]["alarmed"] == 1
    assert by_cue["0.95"]["detection_rate"] == 0.5
    assert by_cue["0.95"]["lead_epochs"] == [1, None]
    assert by_cue["1.0"]["median_lead_epochs"] == -2
    targets = spurious.target_check(runs, control=0.25)
    assert not targets["all_strong_alarmed"] and targets["missed_runs"] == ["0.95/seed 1"]
    assert not targets["no_control_alarm"] and targets["false_alarm_runs"] == ["seed 1 (epoch 4)"]


def test_a_baseline_replays_the_caap_runs_weights_through_the_callback(spurious):
    settings = spurious.demo_setup(spurious.DEFAULT_CONFIG)
    settings["model"].update(embed_dim=32, depth=2, num_heads=2)
    settings["data"].update(img_size=32, cue_size=6, num_train=64, num_val=32, batch_size=32)
    settings.update(max_epochs=2, num_images=4, construction="parallel", monitor={})
    trained, snapshots = spurious.fit_run("caap", 1.0, 0, settings)
    replayed, _ = spurious.fit_run("gradcam", 1.0, 0, settings, snapshots)
    assert replayed["method"] == "gradcam" and len(replayed["history"]) == 2
    for ours, theirs in zip(replayed["history"], trained["history"]):
        assert (ours["acc_consistent"], ours["acc_conflicting"]) == (theirs["acc_consistent"], theirs["acc_conflicting"])
        assert all(math.isfinite(ours[k]) for k in ("aupr_fg", "background_mass_ratio", "score"))


def test_rescore_replays_a_recorded_run_through_todays_monitor(spurious, tmp_path):
    """The learnable-shapes record, with its alarms wiped, gets back the alarms of the current rule."""
    recorded = RESULTS / "spurious-learnable-shapes" / "spurious-windowed.json"
    path = tmp_path / recorded.name
    shutil.copy(recorded, path)
    result = json.loads(path.read_text())
    for run in result["runs"]:
        run["alarm_epoch"] = None
        for row in run["history"]:
            row["alarm"] = False
    path.write_text(json.dumps(result))

    rescored = spurious.rescore(path)
    alarms = {(r["cue_correlation"], r["seed"]): r["alarm_epoch"] for r in rescored["runs"]}
    # Seed 1's cue mass ratio is past the threshold from the first check and flat: 11.83, 11.36, 11.16, 11.23, ...
    assert alarms == {(0.25, 0): None, (1.0, 0): 3, (0.25, 1): None, (1.0, 1): 5, (0.25, 2): None, (1.0, 2): 3}
    assert rescored["summary"]["caap"]["targets"] == {
        "all_strong_alarmed": True, "missed_runs": [], "no_control_alarm": True, "false_alarm_runs": [],
    }
    assert "replayed from the recorded scores" in path.with_suffix(".md").read_text()
    assert (tmp_path / result["setup"]["plot"]).exists()
