"""The swap-statistics benchmark: its four statistics on hand-built pairs, its baseline against SwapRatio, its bookkeeping."""

from __future__ import annotations

import pytest
import torch

from caap_lightning.model_tests import SwapPairs, SwapRatio


def found_pairs():
    """Four pairs: swapped top-1 and probabilities, the clean classes and the part classes (region's, rest's)."""
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]], dtype=torch.float64)
    return {
        "top1": probs.argmax(1), "probs": probs,
        "clean": (torch.tensor([0, 0, 2, 1]), torch.tensor([1, 1, 2, 0])),  # pair 2 agrees: skipped
        "parts": (torch.tensor([0, 1, 0, 0]), torch.tensor([1, 0, 2, 1])),
        "seconds": {"clean": 0.0, "parts": 0.0},
    }


def test_the_four_statistics_on_hand_built_pairs(swap_probe_size):
    found = found_pairs()
    # clean classes, pairs 0, 1, 3: top-1 0, 1, 0 against region classes 0, 0, 1 and rest classes 1, 1, 0
    assert swap_probe_size.score(found, "votes, clean classes") == (round((1 + 1) / (2 + 1), 4), 1, 2, 3)
    p_region, p_rest = (0.7 + 0.1 + 0.3) / 3, (0.2 + 0.8 + 0.6) / 3
    assert swap_probe_size.score(found, "probability, clean classes")[0] == pytest.approx((p_region + 0.05) / (p_rest + 0.05), abs=1e-4)
    # part classes, every pair scored: top-1 0, 1, 2, 0 against 0, 1, 0, 0 (region) and 1, 0, 2, 1 (rest)
    assert swap_probe_size.score(found, "votes, part classes") == (round((3 + 1) / (1 + 1), 4), 3, 1, 4)
    p_region, p_rest = (0.7 + 0.8 + 0.3 + 0.6) / 4, (0.2 + 0.1 + 0.4 + 0.3) / 4
    assert swap_probe_size.score(found, "probability, part classes")[0] == pytest.approx((p_region + 0.05) / (p_rest + 0.05), abs=1e-4)
    agreeing = {**found, "clean": (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))}
    assert swap_probe_size.score(agreeing, "votes, clean classes") == (None, 0, 0, 0)


def test_the_baseline_statistic_is_the_callbacks_swap_ratio(swap_probe_size):
    torch.manual_seed(0)
    # A model whose class follows the colour of both parts, so that the pairs' classes differ.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(32, 4)).eval()
    images = torch.randn(6, 3, 32, 32) + torch.randn(6, 3, 1, 1) * 3
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    donors = SwapPairs(6).donors
    for region in ("outside", "mask"):
        found = swap_probe_size.swap_votes(model, images, masks, region)
        metric = SwapRatio(model, region=region)
        metric.update(images, masks, images[donors], masks[donors])
        value, _, _, scored = swap_probe_size.score(found, "probability, clean classes")
        assert scored == int(metric.count) >= 2
        assert value == pytest.approx(float(metric.compute()), abs=1e-4)


def test_a_late_run_and_a_false_alarm_are_counted(swap_probe_size):
    def run(control, scores, consistent, conflicting, reliance):
        history = [{"epoch": e + 1, "acc_consistent": a, "acc_conflicting": c, "reliance": r,
                    "swap": {"background/16": {"scores": {"votes, clean classes": (s, 0, 0, 1)}}}}
                   for e, (s, a, c, r) in enumerate(zip(scores, consistent, conflicting, reliance))]
        return {"dataset": "shapes", "cue": "marker", "cue_correlation": 0.25 if control else 0.95, "seed": 0,
                "control": control, "history": history}

    runs = [
        run(False, [1.0, 1.2, 1.3, 4.0], [50, 80, 90, 95], [50, 60, 40, 20], [20, 40, 60, 80]),  # gap 2, alarm 4: late
        run(False, [1.0, 3.0, 6.0, 8.0], [50, 80, 90, 95], [50, 60, 40, 20], [20, 40, 60, 80]),  # alarm 2: in time
        run(True, [0.5, 0.6, 2.5, 0.6], [50, 80, 90, 95], [50, 80, 90, 95], [25, 10, 5, 5]),  # a false alarm at epoch 3
    ]
    monitor = {"patience": 1, "min_delta": 0.1}
    row = swap_probe_size.evaluate(runs, "background/16", "votes, clean classes", 1.5, monitor)
    assert (row["shortcut_runs"], row["alarmed"], row["late"]) == (2, 2, ["scratch/shapes/marker/0.95/seed 0"])
    assert row["false_alarms"] == ["scratch/shapes/marker/0.25/seed 0"] and row["controls_peak"] == 2.5
    assert row["median_lead"] == -1.0  # leads -2 and 0


def test_the_threshold_window_is_every_grid_threshold_that_meets_all_targets(swap_probe_size):
    def run(control, scores):
        consistent, conflicting = [50, 80, 90, 95], ([50, 80, 90, 95] if control else [50, 60, 40, 20])
        # The shortcut run follows the cue on 40% or more from epoch 2, when its gap opens: both make it due then.
        reliance = [5] * 4 if control else [20, 60, 80, 80]
        history = [{"epoch": e + 1, "acc_consistent": a, "acc_conflicting": c, "reliance": r,
                    "swap": {"border/64": {"scores": {"probability, clean classes": (s, 0, 0, 1)}}}}
                   for e, (s, a, c, r) in enumerate(zip(scores, consistent, conflicting, reliance))]
        return {"dataset": "fashion", "cue": "border", "cue_correlation": 0.25 if control else 0.95, "seed": 0,
                "control": control, "history": history}

    # The gap opens at epoch 2: the shortcut run alarms in time only below its 1.3 there, the control stays
    # clean only at or above its peak of 1.1 (a score must be past the threshold to count).
    runs = [run(False, [1.0, 1.3, 4.0, 8.0]), run(True, [0.5, 0.6, 1.1, 0.6])]
    monitor = {"patience": 1, "min_delta": 0.1}
    window = swap_probe_size.threshold_window(runs, "border/64", "probability, clean classes", monitor)
    assert window == {"low": 1.1, "high": 1.28, "count": 10}
    # A control peak above the shortcut run's score leaves no threshold.
    runs[1] = run(True, [0.5, 0.6, 1.4, 0.6])
    assert swap_probe_size.threshold_window(runs, "border/64", "probability, clean classes", monitor) == {
        "low": None, "high": None, "count": 0}
