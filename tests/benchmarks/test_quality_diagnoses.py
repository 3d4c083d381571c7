"""The per-image diagnoses of ``benchmarks/quality.py`` against hand-worked cases and scipy."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr


def test_spearman_matches_scipy_with_and_without_ties(diagnose):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, 4, generator=gen)
    b = a + 0.7 * torch.randn(5, 4, 4, generator=gen)
    b[0] = b[0].round()  # ties
    b[1] = -a[1]
    ours = diagnose.spearman(a, b)
    for i in range(5):
        assert ours[i].item() == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten()).statistic, abs=1e-12)
    assert ours[1].item() == pytest.approx(-1.0)


def test_saturated_when_the_blank_scores_at_least_every_patch(diagnose):
    maps = torch.tensor([[[0.2, 0.9]], [[0.2, 0.4]], [[0.5, 0.5]]])
    flags = diagnose.saturated(maps, torch.tensor([0.5, 0.5, 0.5]))
    assert flags.tolist() == [False, True, True]


def test_border_bias_compares_background_patches_on_the_ring_and_inside(diagnose):
    masks = torch.zeros(3, 16, 16)
    masks[:, 4:8, 4:8] = 1  # 4 px patches: the object is patch (1, 1), off the ring
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1] = 1.0  # only the object scores: the background is flat
    maps[1] = 1.0
    maps[1, 0, :] = 0.0  # the top row of the ring scores 0: 4 of its 12 patches, all background
    maps[1, 1, 1] = 2.0
    out = diagnose.border_bias(maps, masks)
    assert out["bias"][0].item() == 0.0
    # Ring background mean 8/12, inner background (patches (1,2), (2,1), (2,2)) 1; range 2.
    assert out["bias"][1].item() == pytest.approx((8 / 12 - 1) / 2)
    assert math.isnan(out["bias"][2].item())  # a flat map has no range
    assert out["touches"].tolist() == [False, False, False]
    masks[2, :4, :4] = 1
    assert diagnose.border_bias(maps, masks)["touches"].tolist() == [False, False, True]


def test_prediction_entropy_is_log_classes_when_uniform_and_zero_when_certain():
    from caap_lightning.attribution.blanks import prediction_entropy

    entropy = prediction_entropy(torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0]]))
    assert entropy[0].item() == pytest.approx(math.log(4))
    assert entropy[1].item() < 1e-15


def _stat(mean, sem=0.01):
    return {"mean": mean, "sem": sem, "n": 100}


def test_tuned_settings_take_each_ablations_largest_gain_and_keep_defaults_without_one(quality):
    def row(d_insdel, d_aupr):
        return {"vs_default": {"insdel": _stat(d_insdel), "aupr_fg": _stat(d_aupr)}}

    ablations = {
        "layer_cutoff": {"0": row(0.05, -0.01), "1": row(0.02, 0.05), "2": row(0.0, 0.0)},
        "selection": {"box1": row(0.0, 0.0), "point": row(-0.02, 0.01)},
        "blank": {"white": row(0.0, 0.0), "auto": row(0.01, 0.0)},
        "score": {"probability": row(0.0, 0.0), "logit": row(-0.1, 0.05)},
    }
    assert quality.tuned_settings(ablations, depth=4) == {"layer_cutoff": 1, "blank": "auto"}


def test_leads_needs_error_bars_that_overlap_no_other_method(quality):
    methods = {"a": {"insdel": _stat(0.50, 0.01)}, "b": {"insdel": _stat(0.47, 0.01)}, "c": {"insdel": _stat(0.10)}}
    assert quality.leads(methods, "a", "insdel")
    methods["b"]["insdel"] = _stat(0.485, 0.01)  # 0.49 < 0.495: the bars overlap
    assert not quality.leads(methods, "a", "insdel")
    assert not quality.leads(methods, "c", "insdel")


def test_versus_best_baseline_pairs_on_the_images_not_used_to_choose(quality):
    per_image = {"caap_x": {"insdel": torch.tensor([1.0, 1.0, 3.0, 5.0]), "aupr_fg": torch.zeros(4)},
                 "rollout": {"insdel": torch.tensor([0.0, 0.0, 1.0, 1.0]), "aupr_fg": torch.ones(4)},
                 "random": {"insdel": torch.zeros(4), "aupr_fg": torch.zeros(4)}}
    methods = {name: {m: _stat(float(v[m].mean())) for m in ("insdel", "aupr_fg")} for name, v in per_image.items()}
    rows = quality.versus_best_baseline(methods, per_image, ["caap_x"], n_chosen=2)
    insdel = next(r for r in rows if r["metric"] == "insdel")
    assert insdel["baseline"] == "rollout"
    assert insdel["held_out"]["mean"] == pytest.approx(3.0) and insdel["held_out"]["n"] == 2
    assert insdel["all"]["mean"] == pytest.approx(2.0)
