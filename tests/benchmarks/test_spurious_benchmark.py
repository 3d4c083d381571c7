"""The spurious-cue runs' bookkeeping (``cue_runs.py``) and report (``spurious.py``) on scripted histories, and one
tiny smoke run."""

from __future__ import annotations

import json

import pytest

from caap_lightning.callbacks import SpuriousCueMonitor
from caap_lightning.model_tests import MODEL_TESTS, is_judged

# Every model test's scalars (ratios and swap follow shares) and the map-based scores.
SCORES = (*(scalar for test in MODEL_TESTS.values() for scalar in test.scalars),
          "cue_density_ratio", "background_density_ratio", "fixed_position_ratio")


def history(consistent, conflicting, reliance=None, accuracy=None, skill=None, **scores):
    """Rows as the recorder writes them; each score defaults to 1 (neither region preferred), the swap probe's skill
    to 0.9 (every check judged)."""
    n = len(consistent)
    reliance = reliance or [0.0] * n
    accuracy = accuracy or [90.0] * n
    skill = skill or [0.9] * n
    columns = {name: scores.get(name, [1.0] * n) for name in SCORES}
    return [
        {"epoch": e + 1, "accuracy": accuracy[e], "acc_consistent": consistent[e], "acc_conflicting": conflicting[e],
         "reliance": reliance[e], **{name: columns[name][e] for name in SCORES}, "swap_probe_skill": skill[e],
         "judged": is_judged(skill[e])}
        for e in range(n)
    ]


def run(cue, strength, seed, rows, control=False, dataset="shapes", method="caap"):
    return {"dataset": dataset, "cue": cue, "cue_correlation": strength, "seed": seed, "method": method,
            "control": control, "history": rows}


def test_gap_epoch_is_the_first_epoch_ten_points_apart(cue_runs):
    rows = history([50, 70, 90, 95], [45, 61, 80, 20])
    assert cue_runs.gap_epoch(rows) == 3  # 9 points at epoch 2 is not yet a gap; exactly 10 is
    assert cue_runs.gap_epoch(history([50, 60], [50, 59])) is None
    assert cue_runs.gap_epoch(rows, points=50) == 4


def test_lead_time(cue_runs):
    assert cue_runs.lead_time(alarm=2, due=5) == 3
    assert cue_runs.lead_time(alarm=5, due=2) == -3
    assert cue_runs.lead_time(alarm=None, due=2) is None


def test_the_due_epoch_is_the_onset(cue_runs):
    """Issue 29: an alarm is measured against the onset (40% reliance) alone; the gap is reported beside it."""
    # Follows the cue on 40% at epoch 2 while the accuracies are still within 10 points: due at its onset.
    partial = history([60, 70, 80], [58, 64, 50], reliance=[20.0, 41.0, 48.0])
    assert (cue_runs.onset_epoch(partial), cue_runs.gap_epoch(partial), cue_runs.due_epoch(partial)) == (2, 3, 2)
    # The gap first (as in a slow fine-tune that still follows the cue on few images): still due at the onset.
    gapped = history([60, 80, 90], [55, 60, 40], reliance=[20.0, 30.0, 45.0])
    assert (cue_runs.onset_epoch(gapped), cue_runs.gap_epoch(gapped), cue_runs.due_epoch(gapped)) == (3, 2, 3)
    # A gap without an onset is due at no epoch.
    assert cue_runs.due_epoch(history([60, 80], [55, 60], reliance=[20.0, 39.9])) is None
    assert cue_runs.due_epoch(history([60], [60], reliance=[39.9])) is None
    assert cue_runs.run_kind(run("marker", 1.0, 0, partial)) == "shortcut"


def test_a_swap_check_below_min_skill_is_not_replayed(cue_runs):
    """The replay counts a swap check as the monitor does: only where the swap probe's skill reaches min_skill."""
    rows = history([1] * 4, [1] * 4, skill=[0.1, 0.2, 0.8, 0.9], background_swap_ratio=[9.0, 9.0, 9.0, 9.0],
                   background_density_ratio=[9.0] * 4)
    settings = dict(threshold=4.0, patience=2, min_delta=0.1)
    assert cue_runs.replay_alarm_epoch(rows, "background_swap_ratio", **settings, min_skill=0.5) == 4
    assert cue_runs.replay_alarm_epoch(rows, "background_swap_ratio", **settings, min_skill=None) == 2
    # A map-based score has no swap probe: every check counts.
    assert cue_runs.replay_alarm_epoch(rows, "background_density_ratio", **settings, min_skill=0.5) == 2
    # A row without a recorded skill is not judged.
    missing = [{**row, "swap_probe_skill": None} for row in rows]
    assert cue_runs.replay_alarm_epoch(missing, "background_swap_ratio", **settings, min_skill=0.5) is None
    # A swap statistic that only an older results file records (a candidate) is judged as the swap tests' are.
    candidates = [{**row, "background_swap_top1_excess": 9.0} for row in rows]
    assert cue_runs.replay_alarm_epoch(candidates, "background_swap_top1_excess", **settings, min_skill=0.5) == 4


def test_each_regime_replays_its_own_score_through_the_monitor(cue_runs):
    rising = [1.0, 2.0, 3.0, 4.0, 5.0]
    rows = history([1] * 5, [1] * 5, cue_density_ratio=rising, background_density_ratio=[1.0] * 5)
    assert cue_runs.replay_alarm_epoch(rows, "cue_density_ratio", threshold=1.5, patience=2, min_delta=0.0) == 3
    assert cue_runs.replay_alarm_epoch(rows, "cue_density_ratio", threshold=3.5, patience=2, min_delta=0.0) == 5
    assert cue_runs.replay_alarm_epoch(rows, "background_density_ratio", threshold=1.5, patience=1, min_delta=0.0) is None
    # A score past the threshold from the first check: the monitor's own rule decides, check by check.
    flat = history([1] * 4, [1] * 4, fixed_position_ratio=[9.0] * 4)
    monitor = SpuriousCueMonitor(threshold=4.0, patience=2, min_delta=0.1)
    expected = []
    for row in flat:
        monitor.update(row["fixed_position_ratio"])
        expected.append(monitor.alarmed)
    assert cue_runs.replay_alarms(flat, "fixed_position_ratio", threshold=4.0, patience=2, min_delta=0.1) == expected
    # An epoch without a score (a failed check) is no check at all.
    gappy = history([1] * 4, [1] * 4, cue_density_ratio=[1.0, None, 2.0, 3.0])
    assert cue_runs.replay_alarm_epoch(gappy, "cue_density_ratio", threshold=1.5, patience=2, min_delta=0.0) == 4


def test_ground_truth_is_measured_reliance(spurious, cue_runs):
    shortcut = run("marker", 0.95, 0, history([99, 99], [40, 2], reliance=[45.0, 96.5]))
    weak = run("marker", 0.8, 0, history([95, 95], [80, 80], reliance=[10.0, 39.9]))
    control = run("marker", 0.25, 0, history([90, 90], [90, 90], reliance=[26.0, 3.0], accuracy=[80.0, 84.9]), control=True)
    assert [cue_runs.run_kind(r) for r in (shortcut, weak, control)] == ["shortcut", "other", "control"]
    assert cue_runs.control_problems(control) == ["accuracy 84.9% < 85%", "reliance reached 26% >= 25% (epoch 1, accuracy 80%)"]
    clean = run("marker", 0.25, 1, history([90], [91], reliance=[4.0], accuracy=[90.5]), control=True)
    assert cue_runs.control_problems(clean) == []
    truth = spurious.ground_truth([shortcut, weak, control, clean])
    assert truth["by_group"]["scratch/shapes/marker/0.95"]["shortcut_runs"] == 1
    assert truth["by_group"]["scratch/shapes/marker/0.25"]["reliance"] == [3.0, 4.0]
    assert truth["by_group"]["scratch/shapes/marker/0.95"]["onset_epochs"] == [1]
    assert list(truth["flawed_controls"]) == ["scratch/shapes/marker/0.25/seed 0"]
    assert truth["not_shortcut"] == ["scratch/shapes/marker/0.8/seed 0"]
    fine_tune = {**shortcut, "init": "pretrained"}
    assert list(spurious.ground_truth([fine_tune])["by_group"]) == ["pretrained/shapes/marker/0.95"]


def scripted_grid(high=9.0):
    """Shortcut runs whose scores step to ``high`` one epoch before their gap, and quiet controls at 1.5."""
    runs = []
    for cue, seed in [(c, s) for c in ("marker", "watermark") for s in (0, 1)]:
        gap = history([50, 60, 99, 99, 99], [50, 60, 50, 5, 2], reliance=[20, 20, 40, 90, 95],
                      **{name: [1.0, high, high, high, high] for name in SCORES})
        runs.append(run(cue, 1.0, seed, gap))
        quiet = history([90] * 5, [90] * 5, reliance=[5] * 5, **{name: [1.2, 1.5, 1.4, 1.5, 1.3] for name in SCORES})
        runs.append(run(cue, 0.25, seed, quiet, control=True))
    return runs


def test_detection_and_targets_per_regime(spurious, cue_runs):
    runs = scripted_grid()
    monitor = dict(threshold=4.0, patience=2, min_delta=0.1)
    replayed = spurious.with_alarms(runs, "cue+object masks", monitor)
    d = cue_runs.detection(replayed)
    assert (d["shortcut_runs"], d["alarmed"], d["controls"], d["false_alarms"]) == (4, 4, 4, 0)
    assert d["due_epochs"] == [3] * 4 and d["lead_epochs"] == [3 - a for a in d["alarm_epochs"]]
    assert spurious.by_cue_kind(replayed)["scratch/shapes/watermark"]["shortcut_runs"] == 2
    check = spurious.target_check(replayed, "cue+object masks")
    assert check["all_shortcuts_alarmed"] and check["no_control_alarm"]
    assert check["lead"] == (d["median_lead_epochs"] >= 0 and min(d["lead_epochs"]) >= -1)
    # Without masks only the watermark's shortcut runs are the target; every control still counts.
    ring = "no masks: border ring"
    none = spurious.target_check(spurious.with_alarms(runs, ring, monitor), ring)
    assert none["detail"]["shortcut_runs"] == 2 and none["detail"]["controls"] == 4
    # A threshold under the controls' scores alarms on them and misses nothing.
    low = spurious.target_check(spurious.with_alarms(runs, ring, dict(monitor, threshold=1.1)), ring)
    assert not low["no_control_alarm"] and low["detail"]["false_alarms"] == 4 and low["all_shortcuts_alarmed"]


def test_a_late_alarm_fails_the_lead_target(spurious):
    late = history([99] * 5, [2] * 5, reliance=[95] * 5, background_swap_ratio=[1.0, 1.0, 1.0, 9.0, 9.0])
    replayed = spurious.with_alarms([run("marker", 1.0, 0, late)], "cue+object masks", dict(threshold=4.0, patience=1, min_delta=0.1))
    check = spurious.target_check(replayed, "cue+object masks")
    assert check["detail"]["lead_epochs"] == [1 - 4] and check["detail"]["late_runs"] == ["scratch/shapes/marker/1.0/seed 0"]
    assert check["all_shortcuts_alarmed"] and not check["lead"]


def test_late_alarms_show_the_gap_and_score_against_the_controls_peak(spurious):
    # Onset and gap at epoch 2 (41% reliance, 12 points), the score still under the control's peak of 2.5 at
    # epoch 3, alarm at epoch 4.
    late = history([40, 52, 80, 99, 99], [40, 40, 30, 5, 2], reliance=[25, 41, 60, 90, 95],
                   background_swap_ratio=[1.0, 1.2, 2.1, 9.0, 9.0], border_swap_ratio=[1.0, 1.0, 3.0, 3.0, 3.0])
    noisy = history([50, 50, 70, 50, 50], [50, 50, 50, 50, 50], reliance=[5] * 5,
                    background_swap_ratio=[1.0, 2.5, 1.0, 1.0, 1.0], border_swap_ratio=[1.4] * 5)
    runs = [run("marker", 1.0, 0, late), run("marker", 0.25, 0, noisy, control=True)]
    found = spurious.late_alarms(runs, dict(threshold=4.0, patience=1, min_delta=0.1), spurious.WATCHES["swap"])
    # The two object-mask regimes watch one score: one entry; the cue swap (1 throughout) never alarms, so it is
    # not late; without masks a marker is not a target cue.
    assert list(found) == ["cue+object masks, object masks only", "cue masks only", "no masks: border ring",
                           "no masks: surround"]
    assert all(found[regime]["late"] == [] for regime in ("cue masks only", "no masks: border ring", "no masks: surround"))
    masked = found["cue+object masks, object masks only"]
    # Due at the onset (epoch 2), the gap it has opened by then shown beside it.
    assert masked["late"] == [{"run": "scratch/shapes/marker/1.0/seed 0", "due_epoch": 2, "alarm_epoch": 4,
                               "gap_points": 12.0, "reliance": [41, 60], "score": [1.2, 2.1], "judged": [True, True]}]
    assert masked["control_peak"] == {"score": 2.5, "run": "scratch/shapes/marker/0.25/seed 0", "epoch": 2,
                                      "accuracy": 90.0}
    # The reference detector fired on the control too (20 points at epoch 3).
    truth = spurious.ground_truth(runs)
    assert truth["controls"] == 1 and truth["gap_on_controls"] == ["scratch/shapes/marker/0.25/seed 0 (epoch 3)"]
    text = "\n".join(spurious.late_section(found, "swap"))
    assert "| 2 (12) | 41, 60 | 1.2, 2.1 | True, True | 4 |" in text
    assert "1 of 1 late runs are at or below it at g + 1" in text


def test_the_threshold_is_chosen_on_the_tuning_runs_and_confirmed_on_the_others(spurious):
    tuning = scripted_grid(high=9.0)
    # Held out: fashion runs whose shortcut scores reach only 5, so a threshold of 6 or more would miss them.
    held_out = [{**r, "dataset": "fashion"} for r in scripted_grid(high=5.0)]
    summary = spurious.summarize(tuning + held_out, dict(threshold=4.0, patience=1, min_delta=0.1))["caap"]
    choice = summary["threshold_choice"]
    # Thresholds from 1.5 (the controls' peak is not past it) to 8 separate the tuning runs at either patience (the
    # scores step up a check before the gap); patience 1 alarms a check earlier (lead 1, not 0), so it is taken,
    # and then the middle threshold.
    assert choice["patience"] == 1 and choice["tied"] == [1.5, 2.0, 3.0, 4.0, 6.0, 8.0] and choice["threshold"] == 3.0
    by_setting = {(row["patience"], row["threshold"]): row for row in choice["sweep"]}
    assert by_setting[(1, 3.0)]["lead"] == 1 + 1 + 1 and by_setting[(2, 3.0)]["lead"] == 0  # three regimes' medians
    assert by_setting[(1, 3.0)]["targets_met"] == by_setting[(2, 3.0)]["targets_met"] == 9
    assert len(choice["sweep"]) == len(spurious.RATIO_SWEEP) * len(spurious.SWEEP_PATIENCE)
    # The default scores and the insertion ratios are watched too, with the same rule.
    model_tests = spurious.summarize(tuning, dict(threshold=4.0, patience=1, min_delta=0.1))
    assert [model_tests[watch]["threshold_choice"]["threshold"] for watch in ("swap", "insertion")] == [3.0, 3.0]
    held = summary["regimes"]["object masks only"]["held_out_at_chosen"]
    assert held["all_shortcuts_alarmed"] and held["no_control_alarm"] and held["detail"]["shortcut_runs"] == 4
    assert spurious.choose_threshold(held_out, dict(threshold=4.0, patience=1, min_delta=0.1), spurious.WATCHES["caap"]) is None


def test_a_quick_run_writes_its_report_and_rescores_it(spurious, cue_runs, tmp_path, monkeypatch):
    """Tiny fits from scratch and fine-tunes, CAAP and Grad-CAM's replay of their weights, through main() and --rescore:
    each run records its init, each epoch its swap probe's skill and whether the check was judged (issue 29)."""
    monkeypatch.setattr(cue_runs, "QUICK", dict(cue_runs.QUICK, num_train=64, num_val=32))
    monkeypatch.setattr(cue_runs, "PRETRAINED_DIR", tmp_path / "pretrained")  # this test's own pretraining
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    result = spurious.main(["--quick", "--data", "shapes", "--cues", "watermark", "--cue-correlations", "1.0",
                            "--init", "scratch", "pretrained", "--num-images", "4", "--output-dir", str(tmp_path)])
    runs = result["runs"]
    assert [(r["init"], r["method"]) for r in runs] == [("pretrained", "caap"), ("pretrained", "gradcam"),
                                                      ("scratch", "caap"), ("scratch", "gradcam")]
    assert all(len(r["history"]) == 2 for r in runs) and len(list((tmp_path / "pretrained").glob("*.pt"))) == 1
    # Checks at chance are not judged, and their notes (files, without a logger) leave with each fit's own folder.
    assert not all(row["judged"] for r in runs for row in r["history"])
    assert list(workdir.iterdir()) == []
    assert result["setup"]["baselines_replay_caap_weights"] and result["setup"]["replay_matches_live"]
    min_skill = result["setup"]["monitor"]["min_skill"]
    assert min_skill == SpuriousCueMonitor().min_skill
    for row in (row for r in runs for row in r["history"]):
        # A swap ratio has no value where the model gives an image and its donor one class (every pair, at chance).
        assert all(row[name] is not None and row[name] > 0 for name in SCORES if "swap" not in name)
        assert all(row[name] is None or row[name] > 0 for name in SCORES if name.endswith("_swap_ratio"))
        assert all(row[name] is None or 0 <= row[name] <= 1 for name in SCORES if name.endswith("_follow_share"))
        assert 0 <= row["swap_probe_skill"] <= 1 and row["judged"] == is_judged(row["swap_probe_skill"], min_skill)
    report = (tmp_path / "spurious.md").read_text()
    for init in ("pretrained", "scratch"):
        assert f"cue+object masks, {init} (marker, watermark, border, background cues): every shortcut run alarmed" in report
    plots = [f"spurious_{init}_shapes_{watch}.png" for init in ("pretrained", "scratch") for watch in ("follow", "swap")]
    assert result["setup"]["plots"] == plots and all((tmp_path / name).stat().st_size > 0 for name in plots)
    # The model tests are the same on the replayed models; the map-based scores are each method's own.
    for caap, gradcam in (runs[:2], runs[2:]):
        for a, b in zip(caap["history"], gradcam["history"]):
            assert all(a[key] == b[key] for key in (*spurious.MODEL_TESTS, "swap_probe_skill", "judged"))

    rescored = spurious.main(["--rescore", str(tmp_path / "spurious.json"), "--threshold", "1e9"])
    assert rescored["setup"]["monitor"]["threshold"] == 1e9
    for watch, regime in (("swap", "no masks: border ring"), ("swap", "no masks: surround"), ("insertion", "no masks: surround"),
                          ("caap", "no masks"), ("gradcam", "no masks")):
        assert all(d["alarmed"] == 0 for d in rescored["summary"][watch]["regimes"][regime]["by_cue"].values())
    assert "--rescore spurious.json --threshold 1000000000.0`" in (tmp_path / "spurious.md").read_text()
    assert json.loads((tmp_path / "spurious.json").read_text())["setup"]["monitor"]["threshold"] == 1e9
    # The report keeps the live run's own settings apart from the replayed ones, through a second rescore too.
    live = f"watched each fit (`threshold={result['setup']['monitor']['threshold']}`"
    spurious.main(["--rescore", str(tmp_path / "spurious.json"), "--threshold", "7"])
    assert live in (tmp_path / "spurious.md").read_text() and "`threshold=7.0`" in (tmp_path / "spurious.md").read_text()

    # Another min_skill rewrites every judged flag: between the lowest and highest recorded skill, some of each.
    skills = sorted(row["swap_probe_skill"] for r in runs for row in r["history"])
    assert skills[0] < skills[-1]
    middle = (skills[0] + skills[-1]) / 2
    spurious.main(["--rescore", str(tmp_path / "spurious.json"), "--min-skill", str(middle)])
    written = json.loads((tmp_path / "spurious.json").read_text())
    assert written["setup"]["monitor"]["min_skill"] == middle
    flags = [(row["judged"], row["swap_probe_skill"]) for r in written["runs"] for row in r["history"]]
    assert all(judged == is_judged(skill, middle) for judged, skill in flags)
    assert {judged for judged, _ in flags} == {True, False}
    assert all(r["init"] in ("scratch", "pretrained") for r in written["runs"])


def test_rescore_refuses_the_single_cue_format(spurious, tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"setup": {"monitor": {}}, "runs": []}))
    with pytest.raises(ValueError, match="single-cue version"):
        spurious.rescore(old, {})


def test_amend_takes_the_named_scores_from_a_rerun_of_the_same_fits_only(spurious, tmp_path):
    def grid_file(name, cue_share, accuracy=90.0, command="python benchmarks/spurious.py"):
        rows = history([90, 90], [80, 80], accuracy=[accuracy] * 2, cue_swap_follow_share=[cue_share] * 2)
        runs = [run("background", 0.25, 0, rows, control=True) | {"init": "scratch"},
                run("marker", 0.25, 0, history([90, 90], [80, 80])) | {"init": "scratch"}]
        path = tmp_path / name
        path.write_text(json.dumps({"setup": {"command": command}, "runs": runs[:1] if "rerun" in name else runs}))
        return path

    grid, rerun = grid_file("grid.json", 0.9), grid_file("rerun.json", 0.1, command="python benchmarks/spurious.py --cues background")
    spurious.main(["--amend", str(grid), str(rerun), "--amend-scores", "cue_swap_follow_share"])
    amended = json.loads(grid.read_text())
    assert [row["cue_swap_follow_share"] for r in amended["runs"] for row in r["history"]] == [0.1, 0.1, 1.0, 1.0]
    assert "`cue_swap_follow_share` of the 1 runs of `python benchmarks/spurious.py --cues background`" in amended["setup"]["amended"][0]
    # A rerun that is not the same fit (another accuracy) is refused, and so is a score the grid does not record.
    with pytest.raises(ValueError, match=r"differs on \['accuracy'\]"):
        spurious.amend(grid_file("grid.json", 0.9), grid_file("rerun.json", 0.1, accuracy=50.0), ["cue_swap_follow_share"])
    other = grid_file("rerun.json", 0.1)
    other.write_text(other.read_text().replace('"seed": 0', '"seed": 5'))
    with pytest.raises(ValueError, match="is not a run of grid.json's grid"):
        spurious.amend(grid, other, ["cue_swap_follow_share"])
    with pytest.raises(ValueError, match="must name recorded scores"):
        spurious.amend(grid, rerun, ["accuracy"])


def test_compare_checks_the_fits_and_correlates_the_controls_readings(spurious_compare, tmp_path):
    """spurious_compare.py: a file whose training values differ is named; the controls' judged readings on two
    probes are correlated over the checks judged on both; the cue swap is set against the background swap."""
    def grid_file(name, shares, accuracy=90.0, swap_images=64):
        control = history([90] * 4, [80] * 4, accuracy=[accuracy] * 4, skill=[0.1, 0.9, 0.9, 0.9],
                          background_swap_follow_share=shares, cue_swap_follow_share=[*shares[:3], 0.5])
        rows = [run("background", 0.25, 0, control, control=True) | {"init": "scratch"},
                run("background", 1.0, 0, history([90] * 4, [80] * 4, reliance=[10, 50, 60, 70],
                                                  background_swap_follow_share=[0.1, 0.5, 0.7, 0.9],
                                                  cue_swap_follow_share=[0.1, 0.5, 0.7, 0.9])) | {"init": "scratch"}]
        regime = {"alarmed": 1, "shortcut_runs": 1, "false_alarms": 0, "controls": 1,
                  "window": {"low": 0.3, "high": 0.4, "width": 1.33}, "control_peak": None}
        summary = {"follow": {"skill_sweep": [{"min_skill": 0.3, "regimes": {r: regime for r in spurious_compare.FOLLOW_REGIMES}}]}}
        path = tmp_path / name
        defaults = {"threshold": 0.4, "patience": 1, "min_delta": 0.1, "min_skill": 0.3}
        path.write_text(json.dumps({"setup": {"swap_images": swap_images, "monitor_defaults": defaults},
                                    "runs": rows, "summary": summary}))
        return path

    first = grid_file("a.json", [0.9, 0.1, 0.2, 0.3])
    same = grid_file("b.json", [0.0, 0.2, 0.4, 0.6], swap_images=256)  # the unjudged first check is left out
    other = grid_file("c.json", [0.0, 0.2, 0.0, 0.1], accuracy=50.0)
    comparison = spurious_compare.compare([first, same, other])
    a, b, c = comparison["files"]
    assert (a["training"], b["training"]["differ"]) == ({"checks": 8, "differ": []}, [])
    assert c["training"]["differ"] == [f"scratch/shapes/background/0.25/seed 0 epoch {e}: accuracy" for e in range(1, 5)]
    assert b["controls_against_first"]["object masks only"] == {"checks": 3, "r": 1.0}
    assert c["controls_against_first"]["object masks only"] == {"checks": 3, "r": -0.5}
    assert [t["score"] for t in b["highest_control_readings"]] == [0.6, 0.4, 0.2]
    # Background-cue runs only: the control's cue swap equals its background swap but at the last check, the
    # shortcut run's (both 1.0) at all four.
    assert b["cue_against_background"] == {"checks": 8, "equal": 7, "largest_gap": 0.1}
    # The shortcut run follows the cue from epoch 2 (0.5), so a threshold below 0.5 catches it in time; the control's
    # judged readings (0.2, 0.4, 0.6) stay quiet from 0.6: no window. No run has a border-ring cue.
    assert b["window_ends"]["follow_share"]["object masks only"] == {
        "catches_every_run_up_to": 0.49, "no_control_from": 0.6, "ratio": 0.82, "control_peak": 0.6}
    assert b["window_ends"]["follow_share"]["no masks: border ring"]["catches_every_run_up_to"] is None
    # Every run here is a shapes run: the shapes' ends are the first file's own, and no other dataset is listed.
    assert comparison["first_file_ends_by_dataset"] == {"shapes": a["window_ends"]["follow_share"]}
    report = "\n".join(spurious_compare.report(comparison))
    assert f"| `{b['file']}` (256 swap images) |" in report and "| 0.6 | scratch/shapes/background/0.25/seed 0 | 4 | 90% |" in report


def test_compare_lists_each_recorded_share_statistic_but_not_a_count_of_pairs(spurious_compare):
    """A candidate's share of the pairs it counted (``*_pairs``) has no threshold: it is not a statistic whose window
    the comparison reports."""
    row = {"epoch": 1, "background_swap_ratio": 1.0, "background_swap_follow_share": 0.5, "background_swap_sure_share": 0.4,
           "background_swap_sure_pairs": 0.8, "background_swap_top1_excess": 0.1, "cue_swap_follow_share": 0.5}
    result = {"runs": [run("background", 1.0, 0, [row])]}
    assert spurious_compare.share_statistics(result) == ["follow_share", "sure_share", "top1_excess"]
    # The highest control readings list them all, the count of pairs too.
    assert spurious_compare.candidates_at(row) == {
        "sure_share": 0.4, "sure_pairs": 0.8, "top1_excess": 0.1}
