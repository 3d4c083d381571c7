"""The README's copy-paste example runs as printed and logs what it says."""

from __future__ import annotations

import warnings

import pytest
import torch

from _readme import README, readme_block


def test_the_own_module_example_runs_and_logs_heatmaps_and_the_monitors_score(tmp_path, monkeypatch, events_reader):
    monkeypatch.chdir(tmp_path)  # Lightning's default logger writes lightning_logs/ here
    torch.manual_seed(0)  # the example draws random data and weights; seeded, the monitor's checks are fixed
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(readme_block("own-module"), str(README), "exec"), namespace)
    # The README's own settings draw no warning about themselves (what an untrained model on noise does may be said).
    about_settings = ("strategy discovery clusters", "swap images", "num_images", "swap_images")
    said = [str(w.message) for w in caught if str(w.message).startswith(("CAAPCallback", "SpuriousCueMonitor"))]
    assert [m for m in said if any(s in m for s in about_settings)] == []
    caap = namespace["caap"]
    assert len(caap.history) == 2 and "caap/insdel" in caap.last.metrics
    events = events_reader(tmp_path / "lightning_logs")
    assert len(events["images"]["caap/heatmaps"]) == 2
    last = events["scalars"]["caap/insdel"][max(events["scalars"]["caap/insdel"])]
    assert last == pytest.approx(caap.last.metrics["caap/insdel"], rel=1e-6)  # float32 in the event file
    # Without masks the monitor watches the border swap test's follow share: its score at every check where the share
    # was logged.
    border, scores = events["scalars"]["caap/border_swap_follow_share"], events["scalars"]["spurious/score"]
    assert border and sorted(scores) == sorted(border)
    assert all(scores[step] == pytest.approx(border[step]) for step in border)
