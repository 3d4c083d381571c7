"""The swap probe's skill (issue 29): a model at chance is not judged, a confident one is, a confident but wrong one
(a shortcut) is too; exact values by hand, NaN before an update, and ``is_judged``'s rule for a missing skill."""

from __future__ import annotations

import math

import pytest
import torch

from caap_lightning.model_tests import JUDGED_SKILL, ProbeSkill, is_judged

K = 4


def skill_of(*batches: torch.Tensor) -> float:
    metric = ProbeSkill()
    for probs in batches:
        metric.update(probs)
    return float(metric.compute())


def one_hot_ish(classes: list, top: float = 0.97) -> torch.Tensor:
    """Each row gives its class ``top`` and the others the rest in equal parts."""
    probs = torch.full((len(classes), K), (1 - top) / (K - 1))
    probs[torch.arange(len(classes)), torch.tensor(classes)] = top
    return probs


def test_a_model_at_chance_has_no_skill_and_is_not_judged():
    skill = skill_of(torch.full((8, K), 1 / K))
    assert skill == pytest.approx(0.0, abs=1e-12) and not is_judged(skill)


def test_a_confident_model_is_judged_right_or_wrong():
    labels = [0, 1, 2, 3, 0, 1]
    right = skill_of(one_hot_ish(labels))
    assert right == pytest.approx((0.97 - 0.25) / 0.75) and right > 0.95 and is_judged(right)
    # A shortcut: every image given the class its cue names, none its label: as sure, so as judged.
    wrong = skill_of(one_hot_ish([(c + 1) % K for c in labels]))
    assert wrong == pytest.approx(right) and is_judged(wrong)


def test_the_skill_by_hand_and_across_updates():
    # K = 4: top-1 probabilities 0.25 and 1.0, mean 0.625, chance-corrected (0.625 - 0.25) / 0.75 = 0.5.
    half = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]])
    assert skill_of(half) == pytest.approx(0.5)
    assert skill_of(half[:1], half[1:]) == pytest.approx(0.5)  # split equals whole
    assert is_judged(0.5) and JUDGED_SKILL == 0.3 and is_judged(0.3) and not is_judged(0.3 - 1e-9)
    # Two classes: top 0.75 -> (0.75 - 0.5) / 0.5 = 0.5.
    assert skill_of(torch.tensor([[0.25, 0.75]])) == pytest.approx(0.5)


def test_no_update_is_nan_and_a_missing_skill_is_judged_only_without_min_skill():
    metric = ProbeSkill()
    assert math.isnan(float(metric.compute()))
    metric.update(one_hot_ish([0, 1]))
    metric.reset()
    assert math.isnan(float(metric.compute()))
    for missing in (None, float("nan")):
        assert not is_judged(missing) and not is_judged(missing, 0.0) and is_judged(missing, None)
    assert is_judged(0.0, None) and is_judged(0.0, 0.0) and not is_judged(0.3, 0.4) and is_judged(0.4, 0.4)
